//! Side effects behind traits: the clock, the NixOS system, the git source and the
//! inventory's health probes; their production adapters are here, in `system.rs` and in
//! `git/`. The k3s API (`cluster.rs`, `leases.rs`) is not behind a trait yet: the runner
//! calls it directly.

use std::time::{Duration, SystemTime};

use crate::command::CommandFailed;
use crate::system::Nixos;

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
            Err(e) => Err(crate::health::innermost(&e)),
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
