//! From the YAML tree to the model: keys, types and the format of each value.
//!
//! Every problem is recorded and reading goes on, so one run reports all of them. Checks that
//! relate several values (initiators, subnets, quorum) are in `validate`.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use super::{
    BootLoader, Diagnostics, Inventory, Layout, Node, Role, Secondary, Vars, DEFAULT_NAMESERVERS,
    DEFAULT_NAMESERVERS6,
};
use crate::check;
use crate::yaml::{Path, Yaml};

mod rollout;
mod values;

/// Keys beside `join_address` (under `cluster:` or at the top level).
pub(super) const CLUSTER_KEYS: &[&str] = &[
    "join_address",
    "join_token",
    "join_token_file",
    "default_gateway",
    "nodes",
    "nix_channel",
    "watch_namespaces",
    "prefix_length",
    "nameservers",
    "ssh_authorized_keys",
    "state_version",
    "k3s_extra_flags",
    "k3s_server_flags",
    "k3s_agent_flags",
    "boot_loader",
    "template",
    "vars",
    "rollout",
];

const NODE_KEYS: &[&str] = &[
    "initiator",
    "interface",
    "boot_device",
    "boot_loader",
    "role",
    "hostname",
    "uuid",
    "default_gateway",
    "prefix_length",
    "secondary_ip",
    "secondary_prefix_length",
    "secondary_gateway",
    "k3s_extra_flags",
    "template",
    "vars",
];

const ROLLOUT_KEYS: &[&str] = &[
    "reboot",
    "max_unavailable",
    "lease_duration",
    "drain_timeout",
    "health_timeout",
    "health_checks",
    "upgrade_every",
    "ceph",
];

const CEPH_KEYS: &[&str] = &["namespace", "deployment", "tolerate"];

const CHECK_KEYS: &[&str] = &["name", "command", "http"];

/// The longest duration an inventory may give (a year): a time nk3 adds to the clock, which a
/// larger one would make overflow.
pub const MAX_DURATION: Duration = Duration::from_secs(366 * 24 * 3600);

/// The shortest lease nk3 accepts; a lease must outlive a renewal interval with room to spare.
const MIN_LEASE: Duration = Duration::from_secs(5);

type Entries<'y> = BTreeMap<&'y str, &'y Yaml>;

struct Reader<'a> {
    text: &'a str,
    diags: &'a mut Diagnostics,
}

pub(super) fn read(text: &str, tree: &Yaml, diags: &mut Diagnostics) -> Option<Inventory> {
    Reader { text, diags }.inventory(tree)
}

impl Reader<'_> {
    fn err(&mut self, at: &Path, message: impl Into<String>) {
        self.diags.at(self.text, at, message.into());
    }

    fn inventory(&mut self, tree: &Yaml) -> Option<Inventory> {
        let root = Path::default();
        let top = match tree {
            Yaml::Map(m) => m,
            Yaml::Null => {
                self.err(&root, "the file is empty; an inventory needs at least `join_address`, `join_token` and `nodes`");
                return None;
            }
            other => {
                self.err(
                    &root,
                    format!("an inventory is a mapping of keys, found {}", other.kind()),
                );
                return None;
            }
        };
        let (layout, base, entries) = match top.iter().find(|(k, _)| k == "cluster") {
            Some((_, cluster)) => {
                for (k, _) in top.iter().filter(|(k, _)| k != "cluster") {
                    let hint = if CLUSTER_KEYS.contains(&k.as_str()) {
                        format!("`{k}` belongs under `cluster:` in this layout (or drop `cluster:` and put every key at the top level)")
                    } else {
                        format!(
                            "unknown key `{k}`; the only top-level key of this layout is `cluster`"
                        )
                    };
                    self.err(&root.key(k), hint);
                }
                let base = root.key("cluster");
                (Layout::Seed, base.clone(), self.mapping(cluster, &base)?)
            }
            None => (Layout::Flat, root, top.as_slice()),
        };
        let (f, _) = self.fields(entries, &base, CLUSTER_KEYS, false);
        self.cluster(layout, &base, &f)
    }

    fn cluster(&mut self, layout: Layout, base: &Path, f: &Entries<'_>) -> Option<Inventory> {
        let join_address = match f.get("join_address") {
            Some(v) => self.ip(v, &base.key("join_address")),
            None => {
                self.err(base, "missing `join_address`: the address joining servers reach the cluster at, usually the initiator's");
                None
            }
        };
        let join_token = f
            .get("join_token")
            .and_then(|v| self.join_token(v, &base.key("join_token")));
        let join_token_file = f
            .get("join_token_file")
            .and_then(|v| self.checked(v, &base.key("join_token_file"), check::absolute_path));
        if !f.contains_key("join_token") && !f.contains_key("join_token_file") {
            self.err(base, "missing `join_token` (or `join_token_file`, a path on the node holding it): nodes need the cluster's token to join");
        }
        let default_gateway = f
            .get("default_gateway")
            .and_then(|v| self.ip(v, &base.key("default_gateway")));
        let prefix_length = f
            .get("prefix_length")
            .and_then(|v| self.uint(v, &base.key("prefix_length"), 1, 128))
            .map(|n| n as u8);
        let nameservers = f
            .get("nameservers")
            .map(|v| self.list(v, &base.key("nameservers"), |r, v, at| r.ip(v, at)));
        let ssh_authorized_keys = f.get("ssh_authorized_keys").map_or_else(Vec::new, |v| {
            self.list(v, &base.key("ssh_authorized_keys"), |r, v, at| {
                r.checked(v, at, check::ssh_public_key)
            })
        });
        let state_version = f
            .get("state_version")
            .and_then(|v| self.checked(v, &base.key("state_version"), check::state_version));
        let nix_channel = f
            .get("nix_channel")
            .and_then(|v| self.checked(v, &base.key("nix_channel"), check::channel));
        let watch_namespaces = f.get("watch_namespaces").map_or_else(Vec::new, |v| {
            self.list(v, &base.key("watch_namespaces"), |r, v, at| {
                r.checked(v, at, check::namespace)
            })
        });
        let flags_of = |r: &mut Self, key: &str| {
            f.get(key)
                .map_or_else(Vec::new, |v| r.flags(v, &base.key(key)))
        };
        let k3s_extra_flags = flags_of(self, "k3s_extra_flags");
        let k3s_server_flags = flags_of(self, "k3s_server_flags");
        let k3s_agent_flags = flags_of(self, "k3s_agent_flags");
        let boot_loader = f
            .get("boot_loader")
            .and_then(|v| self.boot_loader(v, &base.key("boot_loader")));
        let template = f
            .get("template")
            .and_then(|v| self.checked(v, &base.key("template"), check::template_path));
        let vars = f
            .get("vars")
            .map_or_else(Vars::new, |v| self.vars(v, &base.key("vars")));
        let rollout = f
            .get("rollout")
            .and_then(|v| self.rollout(v, &base.key("rollout")))
            .unwrap_or_default();
        let defaults = NodeDefaults {
            default_gateway,
            prefix_length,
            boot_loader: boot_loader.unwrap_or(BootLoader::Grub),
            k3s_extra_flags: &k3s_extra_flags,
            k3s_server_flags: &k3s_server_flags,
            k3s_agent_flags: &k3s_agent_flags,
            template: template.as_deref(),
            vars: &vars,
            layout,
        };
        let nodes = match f.get("nodes") {
            Some(v) => self.nodes(v, &base.key("nodes"), &defaults),
            None => {
                self.err(
                    base,
                    "missing `nodes`: a mapping from each node's IP address to its settings",
                );
                Vec::new()
            }
        };
        self.server_flags_on_agents(base, f, &nodes);
        // No resolvers given: public ones of a family the nodes have.
        let nameservers = nameservers.unwrap_or_else(|| {
            let v4 = nodes.is_empty()
                || nodes
                    .iter()
                    .any(|n| n.ip.is_ipv4() || n.secondary.is_some_and(|s| s.ip.is_ipv4()));
            let defaults: &[&str] = if v4 {
                &DEFAULT_NAMESERVERS
            } else {
                &DEFAULT_NAMESERVERS6
            };
            defaults.iter().map(|s| s.parse().expect("valid")).collect()
        });
        Some(Inventory {
            layout,
            join_address: join_address?,
            join_token,
            join_token_file,
            default_gateway,
            nameservers,
            ssh_authorized_keys,
            state_version,
            nix_channel,
            watch_namespaces,
            rollout,
            nodes,
        })
    }

    /// The nodes that could be read; problems with the others are recorded.
    fn nodes(&mut self, v: &Yaml, at: &Path, d: &NodeDefaults<'_>) -> Vec<Node> {
        let Some(entries) = self.mapping(v, at) else {
            return Vec::new();
        };
        if entries.is_empty() {
            self.err(at, "no nodes; list at least one node under `nodes:`");
        }
        entries
            .iter()
            .filter_map(|(key, body)| self.node(key, body, &at.key(key), d))
            .collect()
    }

    fn node(&mut self, key: &str, body: &Yaml, at: &Path, d: &NodeDefaults<'_>) -> Option<Node> {
        let ip: Option<IpAddr> = match key.parse() {
            Ok(ip) => Some(ip),
            Err(_) => {
                self.err(at, format!("node key `{key}` is not an IP address; nodes are keyed by their IPv4 or IPv6 address"));
                None
            }
        };
        let empty = Vec::new();
        let entries = match body {
            Yaml::Null => empty.as_slice(),
            other => self.mapping(other, at)?,
        };
        let (f, extra) = self.fields(entries, at, NODE_KEYS, d.layout == Layout::Flat);
        let initiator = f
            .get("initiator")
            .and_then(|v| self.bool(v, &at.key("initiator")))
            .unwrap_or(false);
        let role = f
            .get("role")
            .and_then(|v| self.role(v, &at.key("role")))
            .unwrap_or(Role::Server);
        let interface = f
            .get("interface")
            .and_then(|v| self.checked(v, &at.key("interface"), check::interface));
        let boot_device = f
            .get("boot_device")
            .and_then(|v| self.checked(v, &at.key("boot_device"), check::boot_device));
        let boot_loader = f
            .get("boot_loader")
            .and_then(|v| self.boot_loader(v, &at.key("boot_loader")))
            .unwrap_or(d.boot_loader);
        let hostname = f
            .get("hostname")
            .and_then(|v| self.checked(v, &at.key("hostname"), check::hostname));
        let uuid = f
            .get("uuid")
            .and_then(|v| self.checked(v, &at.key("uuid"), check::smbios_uuid))
            .and_then(|s| s.parse().ok());
        let default_gateway = match f.get("default_gateway") {
            Some(v) => self.ip(v, &at.key("default_gateway")),
            None => d.default_gateway,
        };
        let prefix_length = f
            .get("prefix_length")
            .and_then(|v| self.uint(v, &at.key("prefix_length"), 1, 128))
            .map(|n| n as u8)
            .or(d.prefix_length)
            .unwrap_or(match ip {
                Some(IpAddr::V6(_)) => 64,
                _ => 24,
            });
        let mut k3s_extra_flags = d.k3s_extra_flags.to_vec();
        k3s_extra_flags.extend_from_slice(match role {
            Role::Server => d.k3s_server_flags,
            Role::Agent => d.k3s_agent_flags,
        });
        if let Some(v) = f.get("k3s_extra_flags") {
            let own = self.flags(v, &at.key("k3s_extra_flags"));
            if role == Role::Agent {
                // From the YAML items themselves, so an index is the written one even when
                // an earlier item was refused.
                let items: Vec<(Path, &str)> = match v {
                    Yaml::Seq(xs) => xs
                        .iter()
                        .enumerate()
                        .filter_map(|(i, x)| match x {
                            Yaml::Str(s) => Some((at.key("k3s_extra_flags").index(i), s.as_str())),
                            _ => None,
                        })
                        .collect(),
                    Yaml::Str(s) => vec![(at.key("k3s_extra_flags"), s.as_str())],
                    _ => Vec::new(),
                };
                for (at, flag) in items {
                    if let Some(why) = server_only(flag) {
                        self.err(&at, format!("{why}, and node {key} has role agent, which k3s would not start with; give it to servers only"));
                    }
                }
            }
            k3s_extra_flags.extend(own);
        }
        let secondary_ip = f
            .get("secondary_ip")
            .and_then(|v| self.ip(v, &at.key("secondary_ip")));
        let secondary = secondary_ip.map(|sip| Secondary {
            ip: sip,
            prefix_length: f
                .get("secondary_prefix_length")
                .and_then(|v| self.uint(v, &at.key("secondary_prefix_length"), 1, 128))
                .map_or(if sip.is_ipv6() { 64 } else { 24 }, |n| n as u8),
            gateway: f
                .get("secondary_gateway")
                .and_then(|v| self.ip(v, &at.key("secondary_gateway"))),
        });
        for k in ["secondary_prefix_length", "secondary_gateway"] {
            if secondary_ip.is_none() && f.contains_key(k) {
                self.err(&at.key(k), format!("`{k}` without `secondary_ip`: there is no second address for it to describe"));
            }
        }
        let template = match f.get("template") {
            Some(v) => self.checked(v, &at.key("template"), check::template_path),
            None => d.template.map(str::to_string),
        };
        let mut vars = d.vars.clone();
        if let Some(v) = f.get("vars") {
            vars.extend(self.vars(v, &at.key("vars")));
        }
        for (k, v) in extra {
            // The flat layout's free host variables.
            if let Some(j) = self.json(v, &at.key(k)) {
                vars.insert(k.to_string(), j);
            }
        }
        let hostname_set = hostname.is_some();
        let hostname = hostname.unwrap_or_else(|| crate::naming::hostname_for(key));
        Some(Node {
            key: key.to_string(),
            ip: ip?,
            hostname,
            hostname_set,
            initiator,
            role,
            interface,
            boot_device,
            boot_loader,
            default_gateway,
            prefix_length,
            uuid,
            k3s_extra_flags,
            secondary,
            template,
            vars,
        })
    }

    /// A known k3s server flag in a list that reaches agent-role nodes: k3s agent refuses
    /// it and never starts. Reported once, at the flag.
    fn server_flags_on_agents(&mut self, base: &Path, f: &Entries<'_>, nodes: &[Node]) {
        let agent = nodes.iter().find(|n| n.role == Role::Agent);
        for (key, reaches) in [
            ("k3s_extra_flags", agent.map(|a| a.key.as_str())),
            ("k3s_agent_flags", Some("")),
        ] {
            let (Some(v), Some(who)) = (f.get(key), reaches) else {
                continue;
            };
            let items: Vec<(Path, &Yaml)> = match v {
                Yaml::Seq(items) => items
                    .iter()
                    .enumerate()
                    .map(|(i, x)| (base.key(key).index(i), x))
                    .collect(),
                other => vec![(base.key(key), other)],
            };
            for (at, item) in items {
                let Yaml::Str(flag) = item else { continue };
                if let Some(why) = server_only(flag) {
                    let whom = if key == "k3s_agent_flags" {
                        "k3s_agent_flags go to agent-role nodes".to_string()
                    } else {
                        format!("k3s_extra_flags go to every node, agent {who} too")
                    };
                    self.err(&at, format!("{why}; {whom}, and k3s agent would not start with it; put it in `k3s_server_flags`"));
                }
            }
        }
    }
}

/// Cluster-wide values every node starts from.
struct NodeDefaults<'a> {
    default_gateway: Option<IpAddr>,
    prefix_length: Option<u8>,
    boot_loader: BootLoader,
    k3s_extra_flags: &'a [String],
    k3s_server_flags: &'a [String],
    k3s_agent_flags: &'a [String],
    template: Option<&'a str>,
    vars: &'a Vars,
    layout: Layout,
}

/// Flags only `k3s server` takes (k3s's `pkg/cli/cmds/server.go`; `k3s agent`'s are in
/// `agent.go`, and `k3s agent --help` lists them): why `flag` is one, if it is.
pub(crate) fn server_only(flag: &str) -> Option<String> {
    let name = flag.split_once('=').map_or(flag, |(n, _)| n);
    let bare = name.trim_start_matches('-');
    const SERVER_ONLY: &[&str] = &[
        "advertise-address",
        "advertise-port",
        "agent-token-file",
        "cluster-cidr",
        "cluster-dns",
        "cluster-domain",
        "cluster-init",
        "cluster-reset",
        "cluster-reset-restore-path",
        "datastore-cafile",
        "datastore-certfile",
        "datastore-endpoint",
        "datastore-keyfile",
        "default-local-storage-path",
        "disable",
        "disable-agent",
        "disable-cloud-controller",
        "disable-helm-controller",
        "disable-kube-proxy",
        "disable-network-policy",
        "disable-scheduler",
        "egress-selector-mode",
        "embedded-registry",
        "etcd-arg",
        "flannel-backend",
        "flannel-external-ip",
        "flannel-ipv6-masq",
        "helm-job-image",
        "https-listen-port",
        "kine-tls",
        "kube-apiserver-arg",
        "kube-cloud-controller-manager-arg",
        "kube-controller-manager-arg",
        "kube-scheduler-arg",
        "secrets-encryption",
        "service-cidr",
        "service-node-port-range",
        "servicelb-namespace",
        "tls-san",
        "tls-san-security",
        "write-kubeconfig",
        "write-kubeconfig-group",
        "write-kubeconfig-mode",
    ];
    (name.starts_with("--") && (SERVER_ONLY.contains(&bare) || bare.starts_with("etcd-")))
        .then(|| format!("`{name}` is a k3s server flag"))
}

/// The known key closest to `k`, if one is close enough to be a likely misspelling.
fn nearest<'k>(k: &str, known: &[&'k str]) -> Option<&'k str> {
    known
        .iter()
        .map(|n| (strsim::damerau_levenshtein(k, n), *n))
        .filter(|(d, n)| *d <= 2.max(n.len() / 4) && *d < n.len())
        .min_by_key(|(d, _)| *d)
        .map(|(_, n)| n)
}

#[cfg(test)]
mod tests {
    use super::nearest;

    #[test]
    fn suggests_close_keys_only() {
        let known = ["interface", "initiator", "boot_device"];
        assert_eq!(nearest("interfce", &known), Some("interface"));
        assert_eq!(nearest("bootdevice", &known), Some("boot_device"));
        assert_eq!(nearest("rack", &known), None);
    }
}
