//! The side effects a pass has, behind traits: the clock, the NixOS system, the k3s API
//! (with the health probes), and the git source. The runner calls only these; the
//! production adapters are the types of `system.rs`, `cluster.rs` and `git.rs`.

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
