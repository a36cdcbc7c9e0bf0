//! Fakes of the side-effect traits, for unit tests of the runner and of steps 1 to 3: a git
//! source in memory, a NixOS machine and a k3s API that write down what they were asked.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use crate::cluster::{Acquire, Fresh, Halt, Renewer};
use crate::command::{CommandFailed, Failure};
use crate::effects::{Clock, GitSource, NixosSystem, Probes, RolloutApi};
use crate::git::{Head, Refusal};
use crate::kube::KubeError;

/// The inventory the fakes' node, 172.30.190.3, is in.
pub const INVENTORY: &str = "cluster:
  join_address: 172.30.190.3
  join_token: 2f909ce8-cae1-439a-86b3-da87b7ee9f55
  default_gateway: 172.30.190.1
  state_version: '24.05'
  nodes:
    172.30.190.3: { initiator: true, interface: enp3s0f0, boot_device: /dev/nvme0n1 }
";

/// Commits.
pub const C1: &str = "1111111111111111111111111111111111111111";
pub const C2: &str = "2222222222222222222222222222222222222222";

/// A git source answering from memory.
#[derive(Default)]
pub struct FakeGit {
    /// What each poll answers (the last answer repeats).
    pub heads: RefCell<Vec<Result<&'static str, &'static str>>>,
    /// Commits refused after any other.
    pub refused: Vec<&'static str>,
    /// (commit, path) → text.
    pub files: HashMap<(&'static str, &'static str), String>,
}

impl GitSource for FakeGit {
    fn poll(&self) -> anyhow::Result<Head> {
        let mut heads = self.heads.borrow_mut();
        let next = if heads.len() > 1 {
            heads.remove(0)
        } else {
            heads[0]
        };
        next.map(|c| Head {
            commit: c.to_string(),
            fetched: true,
        })
        .map_err(|e| anyhow::anyhow!("{e}"))
    }
    fn refusal(&self, old: Option<&str>, new: &str, _: bool) -> Option<Refusal> {
        self.refused.contains(&new).then(|| Refusal::Rewritten {
            branch: "main".into(),
            old: old.unwrap_or_default().into(),
            new: new.into(),
        })
    }
    fn read(&self, commit: &str, path: &str) -> anyhow::Result<Option<Vec<u8>>> {
        Ok(self
            .files
            .iter()
            .find(|((c, p), _)| *c == commit && *p == path)
            .map(|(_, text)| text.clone().into_bytes()))
    }
    fn descends(&self, _: &str, _: &str) -> Option<bool> {
        None
    }
    fn display_url(&self) -> String {
        "https://git.example.com/infra.git".into()
    }
}

/// What happened on the fake machine and in the fake cluster, in order.
#[derive(Debug, Default)]
pub struct World {
    /// Every call, as `nixos switch`, `api cordon`, ….
    pub calls: Vec<String>,
    /// The running system.
    pub current: String,
    /// The system before the last switch.
    pub previous: String,
    /// The system the last build made.
    pub built: String,
    /// The rollout lease's holder.
    pub holder: Option<String>,
    /// Whether the node is cordoned.
    pub cordoned: bool,
    /// The halt on record.
    pub halt: Option<Halt>,
    /// The lease goes to another holder while the node drains.
    pub steal_during_drain: bool,
    /// Another node halts this commit while the node drains.
    pub halt_during_drain: Option<String>,
    /// Systems whose health check fails.
    pub unhealthy: Vec<String>,
}

/// The fake machine and cluster, shared by the fakes and the test.
pub type Shared = Arc<Mutex<World>>;

fn with<T>(w: &Shared, call: &str, f: impl FnOnce(&mut World) -> T) -> T {
    let mut w = w.lock().unwrap();
    w.calls.push(call.to_string());
    f(&mut w)
}

/// A NixOS machine: builds always give `/nix/store/1-new`, nothing needs a reboot.
pub struct FakeNixos(pub Shared);

impl NixosSystem for FakeNixos {
    fn build(&self, _: bool) -> Result<String, CommandFailed> {
        Ok(with(&self.0, "nixos build", |w| {
            w.built = "/nix/store/1-new".into();
            w.built.clone()
        }))
    }
    fn switch(&self) -> Result<(), CommandFailed> {
        with(&self.0, "nixos switch", |w| {
            w.previous = std::mem::replace(&mut w.current, w.built.clone());
        });
        Ok(())
    }
    fn boot(&self) -> Result<(), CommandFailed> {
        with(&self.0, "nixos boot", |_| ());
        Ok(())
    }
    fn rollback(&self) -> Result<(), CommandFailed> {
        with(&self.0, "nixos rollback", |w| {
            w.current = w.previous.clone();
        });
        Ok(())
    }
    fn reboot(&self) -> Result<(), CommandFailed> {
        Err(CommandFailed {
            command: "systemctl reboot".into(),
            failure: Failure::NotStarted,
            status: "not on a fake".into(),
            tail: String::new(),
        })
    }
    fn set_channel(&self, _: &str) -> Result<(), CommandFailed> {
        Ok(())
    }
    fn current(&self) -> Option<String> {
        Some(self.0.lock().unwrap().current.clone())
    }
    fn boot_id(&self) -> anyhow::Result<String> {
        Ok("boot-1".into())
    }
    fn reboot_reasons(&self, _: &str) -> Vec<&'static str> {
        Vec::new()
    }
    fn has_agent(&self, _: &str) -> bool {
        true
    }
}

/// The k3s API of a cluster where this node, `me`, is the only one.
pub struct FakeApi {
    /// This node.
    pub me: String,
    /// The machine and cluster.
    pub world: Shared,
}

const LEASE: &str = "nk3-rollout";

impl RolloutApi for FakeApi {
    fn annotate(&self, _: Option<&str>, phase: &str) -> Result<(), KubeError> {
        with(&self.world, &format!("api annotate {phase}"), |_| Ok(()))
    }
    fn event(&self, reason: &str, _: &str, _: bool) {
        with(&self.world, &format!("api event {reason}"), |_| ());
    }
    fn halt(&self) -> Result<Option<Halt>, KubeError> {
        with(&self.world, "api read halt", |w| Ok(w.halt.clone()))
    }
    fn set_halt(
        &self,
        commit: &str,
        reason: &str,
        _: &dyn Fn(&str) -> bool,
    ) -> Result<(), KubeError> {
        with(&self.world, &format!("api halt {commit}"), |w| {
            w.halt = Some(Halt {
                commit: commit.into(),
                reason: reason.into(),
                node: self.me.clone(),
                lifted_by: None,
                earlier: vec![],
            });
            Ok(())
        })
    }
    fn lift_halt(&self, _: &str) -> Result<(), KubeError> {
        Ok(())
    }
    fn drain_blocker(&self) -> Result<Option<nk3_common::disruption::Blocker>, KubeError> {
        Ok(None)
    }
    fn acquire(&self, _: u32, _: Duration) -> Result<Acquire, KubeError> {
        with(&self.world, "api acquire", |w| match &w.holder {
            Some(h) if *h != self.me => Ok(Acquire::Busy {
                holder: h.clone(),
                lease: LEASE.into(),
                left: Duration::from_secs(60),
            }),
            _ => {
                w.holder = Some(self.me.clone());
                Ok(Acquire::Held(LEASE.into()))
            }
        })
    }
    fn wait_for_change(&self, _: &str, _: &str, _: Duration) -> Result<(), KubeError> {
        Ok(())
    }
    fn gate(
        &self,
        _: &[String],
        _: &[String],
        _: Option<&nk3_common::inventory::Ceph>,
    ) -> Result<Result<(), String>, KubeError> {
        Ok(Ok(()))
    }
    fn ready_nodes(&self) -> Result<Vec<String>, KubeError> {
        Ok(vec![self.me.clone()])
    }
    fn renew(&self, lease: &str, _: Duration) -> Result<(), KubeError> {
        with(&self.world, "api renew", |w| match &w.holder {
            Some(h) if *h == self.me => Ok(()),
            other => Err(KubeError::Status {
                what: format!("renew lease {lease}"),
                code: 409,
                reason: "LeaseLost".into(),
                message: format!(
                    "the lease is held by {} now",
                    other.clone().unwrap_or_default()
                ),
            }),
        })
    }
    fn keep_renewed(&self, _: &str, _: Duration) -> Renewer {
        Renewer::none()
    }
    fn cordon(&self) -> Result<bool, KubeError> {
        with(&self.world, "api cordon", |w| {
            Ok(std::mem::replace(&mut w.cordoned, true))
        })
    }
    fn drain(&self, _: Duration) -> Result<(), String> {
        with(&self.world, "api drain", |w| {
            if w.steal_during_drain {
                w.holder = Some("someone-else".into());
            }
            if let Some(commit) = w.halt_during_drain.take() {
                w.halt = Some(Halt {
                    commit,
                    reason: "k3s did not become ready".into(),
                    node: "node-b".into(),
                    lifted_by: None,
                    earlier: vec![],
                });
            }
            Ok(())
        })
    }
    fn uncordon(&self, was: bool) -> Result<(), KubeError> {
        with(&self.world, "api uncordon", |w| {
            w.cordoned = was;
            Ok(())
        })
    }
    fn release(&self, _: &str) -> Result<(), KubeError> {
        with(&self.world, "api release", |w| {
            if w.holder.as_deref() == Some(self.me.as_str()) {
                w.holder = None;
            }
            Ok(())
        })
    }
    fn let_go(&self, _: u32) -> Result<(), KubeError> {
        with(&self.world, "api let go", |w| {
            if w.holder.as_deref() == Some(self.me.as_str()) {
                w.holder = None;
            }
            w.cordoned = false;
            Ok(())
        })
    }
    fn healthy(
        &self,
        _: &[String],
        _: &nk3_common::inventory::Rollout,
        _: &[String],
        _: &Fresh,
        _: SystemTime,
        _: &dyn Probes,
    ) -> Result<(), String> {
        with(&self.world, "api healthy", |w| {
            if w.unhealthy.contains(&w.current) {
                Err(format!("k3s is not ready on {}", w.current))
            } else {
                Ok(())
            }
        })
    }
    fn denied(
        &self,
        _: &[crate::access::Permission],
    ) -> Result<Option<crate::access::Denied>, KubeError> {
        Ok(None)
    }
}

/// A clock that only moves when it is slept on.
pub struct FakeClock(pub Mutex<SystemTime>);

impl Clock for FakeClock {
    fn now(&self) -> SystemTime {
        *self.0.lock().unwrap()
    }
    fn sleep(&self, d: Duration) {
        *self.0.lock().unwrap() += d;
    }
}

/// An agent for the node 172.30.190.3 with its directories in `dir`, the node's own side
/// effects in place (tests swap in fakes).
pub fn agent(dir: &std::path::Path) -> crate::reconcile::Agent {
    use clap::Parser as _;
    let cli = crate::cli::Cli::parse_from([
        "nk3-agent",
        "run",
        "--repo",
        "https://git.example.com/infra.git",
        "--node",
        "172.30.190.3",
        "--state-dir",
        &dir.join("state").display().to_string(),
        "--nixos-dir",
        &dir.join("nixos").display().to_string(),
    ]);
    let crate::cli::Command::Run(args) = cli.command else {
        unreachable!("parsed as run")
    };
    std::fs::create_dir_all(dir.join("state")).unwrap();
    crate::reconcile::Agent::new(args.agent, Default::default()).unwrap()
}
