//! The inventory: what `inventory.yaml` declares, after parsing and validation.
//!
//! [`load`] accepts both layouts the original nk3 tool used (everything under `cluster:`, or
//! the same keys at the top level) and returns one model, or every problem found, each naming
//! the file, line and key.

mod diagnostics;
mod parse;
mod validate;

use std::net::IpAddr;
use std::time::Duration;

pub use diagnostics::{Diagnostic, Diagnostics};

/// Where the cluster-level keys sit in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// The original tool's layout: every key under `cluster:`.
    Seed,
    /// The layout of later releases: the same keys at the top level.
    Flat,
}

/// A node's k3s role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Runs the control plane (and etcd); the default.
    Server,
    /// Runs workloads only.
    Agent,
}

impl Role {
    /// The value `services.k3s.role` takes.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Server => "server",
            Role::Agent => "agent",
        }
    }
}

/// Which boot loader the default template configures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BootLoader {
    /// GRUB installed on `boot_device` (what the original tool did); the default.
    Grub,
    /// systemd-boot on the EFI system partition; `boot_device` is not used.
    SystemdBoot,
    /// GRUB for EFI machines, on the EFI system partition (`boot.loader.grub.device =
    /// "nodev"`); `boot_device` is not used.
    GrubEfi,
}

/// When a node reboots after switching to a new generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RebootPolicy {
    /// After every change, as the original tool did; the default.
    Always,
    /// Only when the kernel, initrd, kernel modules or kernel parameters changed.
    WhenNeeded,
}

/// A health check of the inventory's own, run after a node comes back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HealthCheck {
    /// Runs a command (argv, no shell); healthy when it exits 0.
    Command {
        /// Name shown in logs and status.
        name: String,
        /// Program and arguments.
        argv: Vec<String>,
    },
    /// Sends an HTTP GET; healthy on a 2xx answer.
    Http {
        /// Name shown in logs and status.
        name: String,
        /// `http://` or `https://` URL.
        url: String,
    },
}

/// The optional Ceph check (`rollout.ceph`): `ceph status` through the rook-ceph tools
/// deployment must say HEALTH_OK, or warn only of the listed checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ceph {
    /// Namespace of the tools deployment.
    pub namespace: String,
    /// The tools deployment.
    pub deployment: String,
    /// Health check codes (`OSDMAP_FLAGS`, …) that may be warned about.
    pub tolerate: Vec<String>,
}

impl Default for Ceph {
    fn default() -> Self {
        Ceph {
            namespace: "rook-ceph".into(),
            deployment: "rook-ceph-tools".into(),
            tolerate: Vec::new(),
        }
    }
}

impl Ceph {
    /// Judges `ceph status --format json` output: `Err` says why the cluster is not healthy
    /// enough to disrupt a node.
    pub fn judge(&self, status_json: &str) -> Result<(), String> {
        let v: serde_json::Value = serde_json::from_str(status_json)
            .map_err(|e| format!("ceph status is not JSON: {e}"))?;
        let health = &v["health"];
        match health["status"].as_str() {
            Some("HEALTH_OK") => Ok(()),
            Some("HEALTH_WARN") => {
                let codes: Vec<String> = health["checks"]
                    .as_object()
                    .map(|m| m.keys().cloned().collect())
                    .unwrap_or_default();
                let bad: Vec<&String> = codes
                    .iter()
                    .filter(|c| !self.tolerate.contains(c))
                    .collect();
                if bad.is_empty() {
                    Ok(())
                } else {
                    Err(format!(
                        "ceph is HEALTH_WARN: {}",
                        bad.iter()
                            .map(|s| s.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ))
                }
            }
            Some(other) => Err(format!("ceph is {other}")),
            None => Err("ceph status has no health.status".into()),
        }
    }
}

/// The `rollout:` block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rollout {
    /// When to reboot after a switch.
    pub reboot: RebootPolicy,
    /// How many nodes may be disrupted at once (one Lease each).
    pub max_unavailable: u32,
    /// How long a Lease stays valid without renewal; covers a reboot.
    pub lease_duration: Duration,
    /// How long a drain may take before it is given up and retried later.
    pub drain_timeout: Duration,
    /// How long a node may take to become healthy after a switch.
    pub health_timeout: Duration,
    /// The inventory's own checks.
    pub health_checks: Vec<HealthCheck>,
    /// The optional Ceph check.
    pub ceph: Option<Ceph>,
    /// With `nix_channel`: how often to rebuild with `--upgrade` to pick up channel updates.
    /// Unset: only a change of channel upgrades.
    pub upgrade_every: Option<Duration>,
}

impl Default for Rollout {
    fn default() -> Self {
        Rollout {
            reboot: RebootPolicy::Always,
            max_unavailable: 1,
            lease_duration: Duration::from_secs(15 * 60),
            drain_timeout: Duration::from_secs(10 * 60),
            health_timeout: Duration::from_secs(15 * 60),
            health_checks: Vec::new(),
            ceph: None,
            upgrade_every: None,
        }
    }
}

/// A secret value (the join token). Never printed: `Debug` shows `<redacted>`, and it is not
/// serialised into the template context.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }

    /// The secret itself, for writing the token file and for redacting it from text.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Free values for templates (`vars:`, and a flat-layout node's extra keys).
pub type Vars = serde_json::Map<String, serde_json::Value>;

/// One node of the cluster, with cluster-wide defaults already applied.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    /// The address, as it is written in the inventory (the node's key).
    pub key: String,
    /// The address, parsed.
    pub ip: IpAddr,
    /// `UUIDv5(OID, key)`, or the `hostname:` the node sets.
    pub hostname: String,
    /// Whether the hostname was set in the inventory rather than derived.
    pub hostname_set: bool,
    /// Whether this node bootstraps the cluster (`clusterInit`).
    pub initiator: bool,
    /// k3s role.
    pub role: Role,
    /// The interface the static address goes on; `None` means "detect on the node".
    pub interface: Option<String>,
    /// The disk GRUB is installed on.
    pub boot_device: Option<String>,
    /// Boot loader (node's own, else the cluster's, else GRUB).
    pub boot_loader: BootLoader,
    /// Default gateway (node's own, else the cluster's); `None` means "detect on the node".
    pub default_gateway: Option<IpAddr>,
    /// Prefix length of the node's address (node's, cluster's, else 24 for IPv4, 64 for IPv6).
    pub prefix_length: u8,
    /// The machine's SMBIOS product UUID, for identifying it.
    pub uuid: Option<uuid::Uuid>,
    /// The node's k3s flags beyond those nk3 sets: the cluster's `k3s_extra_flags`, then
    /// `k3s_server_flags` or `k3s_agent_flags` by role, then the node's own.
    pub k3s_extra_flags: Vec<String>,
    /// A second address of the other IP family, for dual-stack clusters.
    pub secondary: Option<Secondary>,
    /// A template path inside the repository (node's own, else the cluster's).
    pub template: Option<String>,
    /// Free template values: the cluster's `vars`, overlaid with the node's.
    pub vars: Vars,
}

/// A node's address of its second IP family (dual-stack).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Secondary {
    /// The address.
    pub ip: IpAddr,
    /// Its prefix length (default 64 for IPv6, 24 for IPv4).
    pub prefix_length: u8,
    /// The default gateway of that family, if any.
    pub gateway: Option<IpAddr>,
}

/// A validated inventory.
#[derive(Debug, Clone, PartialEq)]
pub struct Inventory {
    /// Which layout the file used.
    pub layout: Layout,
    /// Address every joining server talks to (`https://<join_address>:6443`).
    pub join_address: IpAddr,
    /// The k3s join token, when written in the inventory.
    pub join_token: Option<Secret>,
    /// A path on the node holding the token; preferred over `join_token`.
    pub join_token_file: Option<String>,
    /// Default gateway for nodes that do not set their own.
    pub default_gateway: Option<IpAddr>,
    /// DNS servers.
    pub nameservers: Vec<IpAddr>,
    /// Keys allowed to log in as root.
    pub ssh_authorized_keys: Vec<String>,
    /// `system.stateVersion`, when set.
    pub state_version: Option<String>,
    /// NixOS channel the nodes follow (`nixos-24.05`), when set.
    pub nix_channel: Option<String>,
    /// Namespaces whose DaemonSets and Deployments must stay healthy during a rollout.
    pub watch_namespaces: Vec<String>,
    /// The rollout policy.
    pub rollout: Rollout,
    /// The nodes, in file order.
    pub nodes: Vec<Node>,
}

/// Default DNS servers when the inventory names none.
pub const DEFAULT_NAMESERVERS: [&str; 2] = ["1.1.1.1", "8.8.8.8"];

/// The same resolvers' IPv6 addresses, the default when no node has an IPv4 address.
pub const DEFAULT_NAMESERVERS6: [&str; 2] = ["2606:4700:4700::1111", "2001:4860:4860::8888"];

impl Inventory {
    /// The node whose key, address or hostname is `id`.
    pub fn node(&self, id: &str) -> Option<&Node> {
        let ip: Option<IpAddr> = id.parse().ok();
        self.nodes
            .iter()
            .find(|n| n.key == id || Some(n.ip) == ip || n.hostname == id)
    }

    /// The servers' count, which bounds how many nodes may be down at once (etcd quorum).
    pub fn server_count(&self) -> usize {
        self.nodes.iter().filter(|n| n.role == Role::Server).count()
    }
}

/// Parses and validates an inventory. `file` is the name used in messages.
///
/// Returns every problem found, not only the first.
pub fn load(file: &str, text: &str) -> Result<Inventory, Diagnostics> {
    // A byte-order mark is allowed in YAML; lines are counted after it.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut diags = Diagnostics::new(file);
    let tree = match crate::yaml::parse(text) {
        Ok(t) => t,
        Err(e) => {
            diags.push(Diagnostic {
                line: e.line,
                key: String::new(),
                message: e.message,
            });
            return Err(diags);
        }
    };
    let parsed = parse::read(text, &tree, &mut diags);
    if let Some(inv) = &parsed {
        validate::check(text, inv, &mut diags);
    }
    match parsed {
        Some(inv) if diags.is_empty() => Ok(inv),
        _ => Err(diags),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEED: &str = "cluster:\n  join_address: 172.30.190.3\n  join_token: 2f909ce8-cae1-439a-86b3-da87b7ee9f55\n  default_gateway: 172.30.190.1\n  nix_channel: nixos-24.05\n  nodes:\n    172.30.190.3: { initiator: true,  interface: enp3s0f0, boot_device: /dev/nvme0n1 }\n    172.30.190.4: { initiator: false, interface: enp3s0f0, boot_device: /dev/nvme0n1 }\n";

    fn flatten(seed: &str) -> String {
        seed.lines()
            .skip(1)
            .map(|l| format!("{}\n", l.strip_prefix("  ").unwrap()))
            .collect()
    }

    #[test]
    fn ceph_health_is_judged_with_the_tolerated_warnings() {
        let c = Ceph {
            tolerate: vec!["OSDMAP_FLAGS".into()],
            ..Ceph::default()
        };
        assert_eq!(
            c.judge(r#"{"health":{"status":"HEALTH_OK","checks":{}}}"#),
            Ok(())
        );
        assert_eq!(
            c.judge(r#"{"health":{"status":"HEALTH_WARN","checks":{"OSDMAP_FLAGS":{}}}}"#),
            Ok(())
        );
        assert_eq!(
            c.judge(r#"{"health":{"status":"HEALTH_WARN","checks":{"OSDMAP_FLAGS":{},"PG_DEGRADED":{}}}}"#),
            Err("ceph is HEALTH_WARN: PG_DEGRADED".into())
        );
        assert_eq!(
            c.judge(r#"{"health":{"status":"HEALTH_ERR"}}"#),
            Err("ceph is HEALTH_ERR".into())
        );
        assert!(c.judge("not json").is_err());
    }

    #[test]
    fn both_layouts_read_to_the_same_model() {
        let seed = load("inventory.yaml", SEED).unwrap();
        let flat = load("inventory.yaml", &flatten(SEED)).unwrap();
        assert_eq!(seed.layout, Layout::Seed);
        assert_eq!(flat.layout, Layout::Flat);
        assert_eq!(
            Inventory {
                layout: Layout::Seed,
                ..flat
            },
            seed
        );
    }

    #[test]
    fn the_design_example_reads_as_documented() {
        let inv = load("inventory.yaml", SEED).unwrap();
        let n = &inv.nodes[0];
        assert_eq!(n.hostname, "d6c27852-4d1c-5830-8e94-40b76fa2b5ec");
        assert!(n.initiator && !inv.nodes[1].initiator);
        assert_eq!(n.role, Role::Server);
        assert_eq!(n.interface.as_deref(), Some("enp3s0f0"));
        assert_eq!(n.default_gateway, Some("172.30.190.1".parse().unwrap()));
        assert_eq!(n.prefix_length, 24);
        assert_eq!(inv.rollout, Rollout::default());
        assert_eq!(format!("{:?}", inv.join_token), "Some(<redacted>)");
    }

    #[test]
    fn yaml_1_1_booleans_mean_what_the_original_tool_read() {
        let inv = load(
            "inventory.yaml",
            &SEED.replace("initiator: true", "initiator: yes"),
        )
        .unwrap();
        assert!(inv.nodes[0].initiator);
    }
}
