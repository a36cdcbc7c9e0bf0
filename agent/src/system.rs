//! The NixOS side: building and switching with `nixos-rebuild`, rebooting with `systemctl`,
//! following a channel with `nix-channel`, and reading what the built, running and booted
//! systems are.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context as _};

pub use crate::command::{CommandFailed, Failure};

/// The commands and paths of the NixOS side, all settings.
#[derive(Debug, Clone)]
pub struct Nixos {
    /// `nixos-rebuild`.
    pub nixos_rebuild: PathBuf,
    /// `systemctl`.
    pub systemctl: PathBuf,
    /// `nix-channel`.
    pub nix_channel: PathBuf,
    /// The configuration.nix the agent writes.
    pub config: PathBuf,
    /// Where `nixos-rebuild build` leaves its `result` link.
    pub work_dir: PathBuf,
    /// The running system's link.
    pub current_system: PathBuf,
    /// The booted system's link.
    pub booted_system: PathBuf,
    /// The boot id file.
    pub boot_id_file: PathBuf,
    /// The longest `nixos-rebuild build` may take.
    pub build_timeout: Duration,
    /// The longest a switch, boot or rollback may take.
    pub switch_timeout: Duration,
}

/// The longest `systemctl reboot` or `nix-channel --add` may take.
const SHORT: Duration = Duration::from_secs(300);

impl Nixos {
    fn rebuild(&self, action: &str, upgrade: bool) -> Command {
        let mut cmd = Command::new(&self.nixos_rebuild);
        cmd.arg(action);
        if upgrade {
            cmd.arg("--upgrade");
        }
        cmd.arg("-I")
            .arg(format!("nixos-config={}", self.config.display()));
        cmd.current_dir(&self.work_dir);
        cmd
    }

    /// `nixos-rebuild build`: the new system's store path.
    pub fn build(&self, upgrade: bool) -> Result<String, CommandFailed> {
        let _ = std::fs::remove_file(self.work_dir.join("result"));
        run(self.rebuild("build", upgrade), self.build_timeout)?;
        let link = self.work_dir.join("result");
        std::fs::canonicalize(&link)
            .map(|p| p.display().to_string())
            .map_err(|e| CommandFailed {
                command: "nixos-rebuild build".into(),
                failure: Failure::Exited,
                status: "no result".into(),
                tail: format!("it left no {} link ({e})", link.display()),
            })
    }

    /// `nixos-rebuild switch`: activate now.
    pub fn switch(&self) -> Result<(), CommandFailed> {
        run(self.rebuild("switch", false), self.switch_timeout)
    }

    /// `nixos-rebuild switch --rollback`: back to the previous generation.
    pub fn rollback(&self) -> Result<(), CommandFailed> {
        let mut cmd = Command::new(&self.nixos_rebuild);
        cmd.args(["switch", "--rollback"])
            .current_dir(&self.work_dir);
        run(cmd, self.switch_timeout)
    }

    /// `nixos-rebuild boot`: make it the default for the next boot.
    pub fn boot(&self) -> Result<(), CommandFailed> {
        run(self.rebuild("boot", false), self.switch_timeout)
    }

    /// `systemctl reboot`.
    pub fn reboot(&self) -> Result<(), CommandFailed> {
        let mut cmd = Command::new(&self.systemctl);
        cmd.arg("reboot");
        run(cmd, SHORT)
    }

    /// Points the `nixos` channel at `https://nixos.org/channels/<name>`.
    pub fn set_channel(&self, name: &str) -> Result<(), CommandFailed> {
        let mut cmd = Command::new(&self.nix_channel);
        cmd.args([
            "--add",
            &format!("https://nixos.org/channels/{name}"),
            "nixos",
        ]);
        run(cmd, SHORT)
    }

    /// The running system's store path.
    pub fn current(&self) -> Option<String> {
        resolve(&self.current_system)
    }

    /// This boot's id.
    pub fn boot_id(&self) -> anyhow::Result<String> {
        let text = std::fs::read_to_string(&self.boot_id_file)
            .with_context(|| format!("cannot read {}", self.boot_id_file.display()))?;
        let id = text.trim();
        if id.is_empty() {
            bail!("{} is empty", self.boot_id_file.display());
        }
        Ok(id.to_string())
    }

    /// What differs between the booted system and `system` in the parts only a reboot brings
    /// in: kernel, initrd, kernel modules, kernel parameters. Empty: a switch is enough.
    pub fn reboot_reasons(&self, system: &str) -> Vec<&'static str> {
        let new = Path::new(system);
        let booted = &self.booted_system;
        let mut out = Vec::new();
        for (part, what) in [
            ("kernel", "kernel"),
            ("initrd", "initrd"),
            ("kernel-modules", "kernel modules"),
        ] {
            if resolve(&booted.join(part)) != resolve(&new.join(part)) {
                out.push(what);
            }
        }
        let params = |p: &Path| std::fs::read_to_string(p.join("kernel-params")).ok();
        if params(booted) != params(new) {
            out.push("kernel parameters");
        }
        out
    }
}

/// Whether the built system still runs the agent: NixOS puts every unit under
/// `etc/systemd/system` of the system.
pub fn has_agent_unit(system: &str) -> bool {
    Path::new(system)
        .join("etc/systemd/system/nk3-agent.service")
        .exists()
}

fn resolve(p: &Path) -> Option<String> {
    std::fs::canonicalize(p)
        .ok()
        .map(|p| p.display().to_string())
}

fn run(cmd: Command, timeout: Duration) -> Result<(), CommandFailed> {
    crate::command::run(cmd, timeout).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt as _;

    #[test]
    fn the_tail_starts_at_the_nix_error() {
        let out = std::process::Output {
            status: std::process::ExitStatus::from_raw(256),
            stdout: b"building the system configuration...\n".to_vec(),
            stderr: b"warning: x\nerror: undefined variable 'foo'\n       at /etc/nixos/configuration.nix:3:5\n".to_vec(),
        };
        assert_eq!(
            crate::command::tail(&out),
            "error: undefined variable 'foo' |        at /etc/nixos/configuration.nix:3:5"
        );
    }

    #[test]
    fn reboot_reasons_compare_kernel_initrd_modules_and_params() {
        let dir = tempfile::tempdir().unwrap();
        let mk = |name: &str, kernel: &str, params: &str| {
            let s = dir.path().join(name);
            std::fs::create_dir_all(&s).unwrap();
            std::fs::write(s.join("kernel"), kernel).unwrap();
            std::fs::write(s.join("initrd"), "i").unwrap();
            std::fs::write(s.join("kernel-params"), params).unwrap();
            s
        };
        let booted = mk("booted", "k1", "quiet");
        let nixos = Nixos {
            nixos_rebuild: "nixos-rebuild".into(),
            systemctl: "systemctl".into(),
            nix_channel: "nix-channel".into(),
            config: dir.path().join("configuration.nix"),
            work_dir: dir.path().into(),
            current_system: booted.clone(),
            booted_system: booted,
            boot_id_file: dir.path().join("boot_id"),
            build_timeout: Duration::from_secs(60),
            switch_timeout: Duration::from_secs(60),
        };
        let same = mk("same", "k1", "quiet");
        // Different store paths with equal contents are different systems only when the
        // files resolve differently; here each system has its own files.
        let reasons = nixos.reboot_reasons(same.to_str().unwrap());
        assert_eq!(reasons, vec!["kernel", "initrd"]);
        let booted_self = nixos.booted_system.clone();
        assert!(nixos
            .reboot_reasons(booted_self.to_str().unwrap())
            .is_empty());
        let params = mk("params", "k1", "quiet mitigations=off");
        assert!(nixos
            .reboot_reasons(params.to_str().unwrap())
            .contains(&"kernel parameters"));
    }
}
