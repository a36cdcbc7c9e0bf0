//! Side effects behind traits: the clock, the NixOS system, the git source, the k3s API
//! and the inventory's health probes. Their production adapters are here, in `system.rs`,
//! `git/` and `cluster.rs` (with `leases.rs`, `drain.rs`, `health.rs`); the runner uses
//! nothing else, and its tests give it fakes (`runner_tests.rs`).

use std::time::{Duration, SystemTime};

use crate::command::CommandFailed;
use crate::kube::KubeError;
use crate::system::Nixos;

/// Opens the pass's git source.
pub type GitFactory = Box<dyn Fn() -> anyhow::Result<Box<dyn GitSource>> + Send>;
/// Connects to this node's cluster as `host`: `None` when there is no kubeconfig.
pub type ApiFactory =
    Box<dyn Fn(&str) -> anyhow::Result<Option<std::sync::Arc<dyn RolloutApi>>> + Send>;

/// Everything a pass's side effects go through. [`Effects::of`] is the node's own; tests
/// put fakes in.
pub struct Effects {
    /// The NixOS side.
    pub nixos: Box<dyn NixosSystem + Send>,
    /// The git source; `None`: the clone of `--repo`.
    pub git: Option<GitFactory>,
    /// The k3s API; `None`: the one the kubeconfig names.
    pub api: Option<ApiFactory>,
    /// The clock.
    pub clock: Box<dyn Clock + Send>,
    /// The health probes; `None`: this node's, with `--systemctl`.
    pub probes: Option<Box<dyn Probes + Send>>,
}

impl std::fmt::Debug for Effects {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Effects")
            .field("git", &self.git.as_ref().map(|_| "fake"))
            .field("api", &self.api.as_ref().map(|_| "fake"))
            .finish_non_exhaustive()
    }
}

impl Effects {
    /// The node's own side effects, with `nixos`.
    pub fn of(nixos: Nixos) -> Effects {
        Effects {
            nixos: Box::new(nixos),
            git: None,
            api: None,
            clock: Box::new(SystemClock),
            probes: None,
        }
    }
}

/// Time: read and waited for.
pub trait Clock {
    /// Now, on the wall clock.
    fn now(&self) -> SystemTime;
    /// Waits.
    fn sleep(&self, d: Duration);
}

/// This machine's clock.
#[derive(Debug)]
pub struct SystemClock;

/// The one there is.
pub static SYSTEM_CLOCK: SystemClock = SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }

    fn sleep(&self, d: Duration) {
        std::thread::sleep(d);
    }
}

/// The NixOS side: `nixos-rebuild`, `systemctl`, `nix-channel`, and what runs. Each command
/// is bounded by a timeout; its failure says whether it could not start, refused, or ran
/// out of time.
pub trait NixosSystem {
    /// `nixos-rebuild build`: the new system's store path.
    fn build(&self, upgrade: bool) -> Result<String, CommandFailed>;
    /// `nixos-rebuild switch`.
    fn switch(&self) -> Result<(), CommandFailed>;
    /// `nixos-rebuild boot`.
    fn boot(&self) -> Result<(), CommandFailed>;
    /// `nixos-rebuild switch --rollback`.
    fn rollback(&self) -> Result<(), CommandFailed>;
    /// `systemctl reboot`.
    fn reboot(&self) -> Result<(), CommandFailed>;
    /// `nix-channel --add … nixos`.
    fn set_channel(&self, name: &str) -> Result<(), CommandFailed>;
    /// The running system.
    fn current(&self) -> Option<String>;
    /// This boot's id.
    fn boot_id(&self) -> anyhow::Result<String>;
    /// Why switching to `system` needs a reboot (empty: it does not).
    fn reboot_reasons(&self, system: &str) -> Vec<&'static str>;
    /// Whether `system` still runs nk3-agent.
    fn has_agent(&self, system: &str) -> bool;
}

impl NixosSystem for Nixos {
    fn build(&self, upgrade: bool) -> Result<String, CommandFailed> {
        Nixos::build(self, upgrade)
    }
    fn switch(&self) -> Result<(), CommandFailed> {
        Nixos::switch(self)
    }
    fn boot(&self) -> Result<(), CommandFailed> {
        Nixos::boot(self)
    }
    fn rollback(&self) -> Result<(), CommandFailed> {
        Nixos::rollback(self)
    }
    fn reboot(&self) -> Result<(), CommandFailed> {
        Nixos::reboot(self)
    }
    fn set_channel(&self, name: &str) -> Result<(), CommandFailed> {
        Nixos::set_channel(self, name)
    }
    fn current(&self) -> Option<String> {
        Nixos::current(self)
    }
    fn boot_id(&self) -> anyhow::Result<String> {
        Nixos::boot_id(self)
    }
    fn reboot_reasons(&self, system: &str) -> Vec<&'static str> {
        Nixos::reboot_reasons(self, system)
    }
    fn has_agent(&self, system: &str) -> bool {
        crate::system::has_agent_unit(system)
    }
}

/// The git source: the branch's head on the remote, and the files and history of the
/// commits in the clone.
pub trait GitSource {
    /// Asks the remote for the branch's head, fetching it if the clone lacks it.
    fn poll(&self) -> anyhow::Result<crate::git::Head>;
    /// Why the head `new` is not taken after `old`, the commit taken before: the branch
    /// was rewritten (unless `allow_force_push`), or the commit is not signed as required.
    fn refusal(
        &self,
        old: Option<&str>,
        new: &str,
        allow_force_push: bool,
    ) -> Option<crate::git::Refusal>;
    /// A file of the commit's tree, or `None` when the commit has no such file.
    fn read(&self, commit: &str, path: &str) -> anyhow::Result<Option<Vec<u8>>>;
    /// Whether commit `a` descends from commit `b` (`None`: the clone lacks one of them).
    fn descends(&self, a: &str, b: &str) -> Option<bool>;
    /// The repository's URL without credentials, for messages.
    fn display_url(&self) -> String;
}

/// The k3s API as a rollout uses it: the rollout Leases and the halt on them, this node's
/// Node, the gate, the drain and the health of the cluster after a switch.
pub trait RolloutApi: Send + Sync {
    /// Annotates this node's Node (`nk3.io/applied-commit`, `nk3.io/phase`).
    fn annotate(&self, commit: Option<&str>, phase: &str) -> Result<(), KubeError>;
    /// Posts an Event about this node, best effort.
    fn event(&self, reason: &str, message: &str, warning: bool);
    /// The halt on record, if any.
    fn halt(&self) -> Result<Option<crate::cluster::Halt>, KubeError>;
    /// Halts `commit` for the cluster (see `Cluster::set_halt`); `newer(c)` says whether the
    /// halted commit `c` on record is newer than `commit`.
    fn set_halt(
        &self,
        commit: &str,
        reason: &str,
        newer: &dyn Fn(&str) -> bool,
    ) -> Result<(), KubeError>;
    /// Marks the halt lifted by the newer commit `by`.
    fn lift_halt(&self, by: &str) -> Result<(), KubeError>;
    /// What would stop a drain now (a budget that allows no eviction), if anything.
    fn drain_blocker(&self) -> Result<Option<nk3_common::disruption::Blocker>, KubeError>;
    /// Tries to take one of `max_unavailable` lease slots for `duration`.
    fn acquire(
        &self,
        max_unavailable: u32,
        duration: Duration,
    ) -> Result<crate::cluster::Acquire, KubeError>;
    /// Waits until lease `name` changes from `holder`, at most `timeout`.
    fn wait_for_change(&self, name: &str, holder: &str, timeout: Duration)
        -> Result<(), KubeError>;
    /// The gate: `Ok(Err(why))` when disrupting this node is not safe now.
    fn gate(
        &self,
        members: &[String],
        watch_namespaces: &[String],
        ceph: Option<&nk3_common::inventory::Ceph>,
    ) -> Result<Result<(), String>, KubeError>;
    /// The nodes Ready now.
    fn ready_nodes(&self) -> Result<Vec<String>, KubeError>;
    /// Renews the held lease now (`LeaseLost` when it is someone else's).
    fn renew(&self, lease: &str, duration: Duration) -> Result<(), KubeError>;
    /// Renews the held lease in the background while the returned value lives.
    fn keep_renewed(&self, lease: &str, duration: Duration) -> crate::cluster::Renewer;
    /// Cordons this node; whether it was unschedulable already.
    fn cordon(&self) -> Result<bool, KubeError>;
    /// Evicts this node's pods and waits for them to be gone, at most `timeout`.
    fn drain(&self, timeout: Duration) -> Result<(), String>;
    /// Undoes nk3's cordon (not an operator's: `was_unschedulable`).
    fn uncordon(&self, was_unschedulable: bool) -> Result<(), KubeError>;
    /// Gives the lease back, if this node holds it.
    fn release(&self, lease: &str) -> Result<(), KubeError>;
    /// Gives back every slot this node holds and undoes its own cordon.
    fn let_go(&self, max_unavailable: u32) -> Result<(), KubeError>;
    /// Whether the cluster is healthy with this node after its switch (see
    /// `Cluster::healthy`).
    fn healthy(
        &self,
        ready_before: &[String],
        rollout: &nk3_common::inventory::Rollout,
        watch_namespaces: &[String],
        fresh: &crate::cluster::Fresh,
        deadline: SystemTime,
        probes: &dyn Probes,
    ) -> Result<(), String>;
    /// What these credentials may not do of `perms`, if anything.
    fn denied(
        &self,
        perms: &[crate::access::Permission],
    ) -> Result<Option<crate::access::Denied>, KubeError>;
}

/// The inventory's own health checks (`rollout.health_checks`), run on this node. Both are
/// bounded: nothing here waits longer than it is given.
pub trait Probes {
    /// Whether systemd's `unit` is active (`systemctl is-active`), within `timeout`.
    fn active(&self, unit: &str, timeout: Duration) -> Result<(), CommandFailed>;
    /// Runs `argv` (no shell); it must exit 0 within `timeout`.
    fn command(&self, argv: &[String], timeout: Duration) -> Result<(), CommandFailed>;
    /// GETs `url`; it must answer 2xx within `timeout`. `Err` says why not.
    fn http(&self, url: &str, timeout: Duration) -> Result<(), String>;
}

/// The probes as they run on a node: `systemctl`, a child process, and an HTTP client
/// trusting the system's roots.
#[derive(Debug)]
pub struct SystemProbes {
    /// The systemctl program.
    pub systemctl: std::path::PathBuf,
}

impl Probes for SystemProbes {
    fn active(&self, unit: &str, timeout: Duration) -> Result<(), CommandFailed> {
        let mut cmd = std::process::Command::new(&self.systemctl);
        cmd.args(["is-active", "--quiet", unit]);
        crate::command::run(cmd, timeout).map(|_| ())
    }

    fn command(&self, argv: &[String], timeout: Duration) -> Result<(), CommandFailed> {
        let (program, args) = argv.split_first().map_or(("", &[][..]), |(p, a)| (p, a));
        let mut cmd = std::process::Command::new(program);
        cmd.args(args);
        crate::command::run(cmd, timeout).map(|_| ())
    }

    fn http(&self, url: &str, timeout: Duration) -> Result<(), String> {
        let answer = reqwest::blocking::Client::builder()
            .timeout(timeout)
            .build()
            .and_then(|c| c.get(url).send());
        match answer {
            Ok(r) if r.status().is_success() => Ok(()),
            Ok(r) => Err(format!("HTTP {}", r.status())),
            Err(e) => Err(crate::kube::innermost(&e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::Failure;

    fn argv(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_probe_command_fails_three_ways_and_each_is_told_apart() {
        let p = SystemProbes {
            systemctl: "systemctl".into(),
        };
        let t = Duration::from_secs(5);
        assert!(p.command(&argv(&["true"]), t).is_ok());
        let exited = p.command(&argv(&["false"]), t).unwrap_err();
        assert_eq!(exited.failure, Failure::Exited);
        let missing = p
            .command(&argv(&["/nonexistent/nk3-check"]), t)
            .unwrap_err();
        assert_eq!(missing.failure, Failure::NotStarted);
        let slow = p
            .command(&argv(&["sleep", "30"]), Duration::from_millis(200))
            .unwrap_err();
        assert_eq!(slow.failure, Failure::TimedOut);
    }

    #[test]
    fn an_http_probe_says_why_it_failed() {
        // A port nothing listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let e = SystemProbes {
            systemctl: "systemctl".into(),
        }
        .http(&format!("http://127.0.0.1:{port}/"), Duration::from_secs(5))
        .unwrap_err();
        assert!(e.to_lowercase().contains("refused"), "{e}");
    }
}
