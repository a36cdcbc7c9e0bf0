//! Checks that relate several values: one initiator, distinct nodes, addresses that fit the
//! network, and a rollout that cannot break etcd quorum.

use std::collections::HashMap;
use std::net::IpAddr;

use super::{BootLoader, Diagnostic, Diagnostics, Inventory, Layout, Node, Role};
use crate::yaml::{locate, Path};

struct Checker<'a> {
    text: &'a str,
    base: Path,
    diags: &'a mut Diagnostics,
}

pub(super) fn check(text: &str, inv: &Inventory, diags: &mut Diagnostics) {
    let base = match inv.layout {
        Layout::Seed => Path::default().key("cluster"),
        Layout::Flat => Path::default(),
    };
    let mut c = Checker { text, base, diags };
    c.node_set(inv);
    c.initiators(inv);
    c.join_address(inv);
    for n in &inv.nodes {
        c.node(n);
    }
    c.quorum(inv);
}

impl Checker<'_> {
    fn err(&mut self, at: &Path, message: String) {
        self.diags.push(Diagnostic {
            line: locate(self.text, &at.0),
            key: at.to_string(),
            message,
        });
    }

    fn node_path(&self, n: &Node) -> Path {
        self.base.key("nodes").key(&n.key)
    }

    /// A node named for a message about another: its key and line. Located only when a
    /// message needs it, since locating is linear in the file.
    fn where_(&self, n: &Node) -> String {
        match locate(self.text, &self.node_path(n).0) {
            Some(l) => format!("{} (line {l})", n.key),
            None => n.key.clone(),
        }
    }

    fn node_set(&mut self, inv: &Inventory) {
        let mut by_ip: HashMap<IpAddr, &Node> = HashMap::new();
        let mut by_name: HashMap<&str, &Node> = HashMap::new();
        let mut by_uuid: HashMap<uuid::Uuid, &Node> = HashMap::new();
        for n in &inv.nodes {
            if let Some(first) = by_ip.insert(n.ip, n) {
                let at = self.node_path(n);
                self.err(
                    &at,
                    format!(
                        "node {} is the same address as node {}; each node appears once",
                        n.key,
                        self.where_(first)
                    ),
                );
            }
            if let Some(first) = by_name.insert(&n.hostname, n) {
                let at = if n.hostname_set {
                    self.node_path(n).key("hostname")
                } else {
                    self.node_path(n)
                };
                self.err(
                    &at,
                    format!(
                        "hostname `{}` is also node {}'s; hostnames must be unique",
                        n.hostname,
                        self.where_(first)
                    ),
                );
            }
            if let Some(u) = n.uuid {
                if let Some(first) = by_uuid.insert(u, n) {
                    let at = self.node_path(n).key("uuid");
                    self.err(
                        &at,
                        format!(
                            "uuid {u} is also node {}'s; a machine can be only one node",
                            self.where_(first)
                        ),
                    );
                }
            }
        }
    }

    fn initiators(&mut self, inv: &Inventory) {
        let mut first: Option<&Node> = None;
        for n in inv.nodes.iter().filter(|n| n.initiator) {
            let at = self.node_path(n).key("initiator");
            if n.role == Role::Agent {
                self.err(&at, format!("node {} has role agent and cannot be the initiator; only a server bootstraps the cluster", n.key));
            }
            match first {
                None => first = Some(n),
                Some(f) => self.err(&at, format!("node {} is a second initiator; node {} already bootstraps the cluster, and two would create two clusters", n.key, self.where_(f))),
            }
        }
    }

    fn join_address(&mut self, inv: &Inventory) {
        let at = self.base.key("join_address");
        let a = inv.join_address;
        if let Some(n) = inv.nodes.iter().find(|n| n.ip == a) {
            if n.role == Role::Agent {
                self.err(&at, format!("join_address {a} is node {}, which has role agent; joining nodes need a server's API", n.key));
            }
            return;
        }
        // Not a node: a virtual or load-balanced address is fine if the servers' network reaches it.
        let reachable = inv
            .nodes
            .iter()
            .any(|n| n.role == Role::Server && same_subnet(n.ip, a, n.prefix_length));
        if !reachable && !inv.nodes.is_empty() {
            self.err(&at, format!("join_address {a} is neither a node nor inside any server's subnet; joining nodes could not reach the cluster there"));
        }
    }

    fn node(&mut self, n: &Node) {
        let at = self.node_path(n);
        let max = if n.ip.is_ipv4() { 32 } else { 128 };
        if n.prefix_length > max {
            self.err(
                &at.key("prefix_length"),
                format!(
                    "prefix length {} is too long for {}; at most {max}",
                    n.prefix_length, n.key
                ),
            );
        }
        if let Some(gw) = n.default_gateway {
            // The node's own key when it sets one; otherwise the locator lands on the node.
            let gat = at.key("default_gateway");
            if gw.is_ipv4() != n.ip.is_ipv4() {
                self.err(
                    &gat,
                    format!(
                        "default gateway {gw} and node address {} are of different IP families",
                        n.key
                    ),
                );
            } else if gw == n.ip {
                self.err(
                    &gat,
                    format!("default gateway {gw} is the node's own address"),
                );
            } else if n.prefix_length <= max && !same_subnet(n.ip, gw, n.prefix_length) {
                self.err(&gat, format!("default gateway {gw} is outside node {}'s subnet {}/{}; set the node's `prefix_length` or `default_gateway`", n.key, network(n.ip, n.prefix_length), n.prefix_length));
            }
        }
        let bad_device = at.key("boot_device").to_string();
        let already_reported = self.diags.items.iter().any(|d| d.key == bad_device);
        if n.boot_loader == BootLoader::Grub && n.boot_device.is_none() && !already_reported {
            self.err(&at, format!("node {} boots with GRUB but has no `boot_device`; set `boot_device: /dev/…`, or `boot_loader: systemd-boot` for EFI", n.key));
        }
    }

    fn quorum(&mut self, inv: &Inventory) {
        let servers = inv.server_count();
        let n = inv.rollout.max_unavailable as usize;
        // etcd needs a majority of servers up: floor(S/2) + 1.
        let allowed = if servers >= 3 { (servers - 1) / 2 } else { 1 };
        if n > allowed {
            let at = self.base.key("rollout").key("max_unavailable");
            let quorum = servers / 2 + 1;
            self.err(&at, format!("max_unavailable: {n} could take {n} of {servers} servers down at once; etcd needs {quorum} of {servers} up, so at most {allowed}"));
        }
    }
}

fn mask(ip: IpAddr, prefix: u8) -> u128 {
    match ip {
        IpAddr::V4(v4) => {
            let bits = u32::from(v4) as u128;
            let m = if prefix == 0 {
                0
            } else {
                (u32::MAX << (32 - prefix.min(32))) as u128
            };
            bits & m
        }
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            let m = if prefix == 0 {
                0
            } else {
                u128::MAX << (128 - prefix.min(128))
            };
            bits & m
        }
    }
}

fn same_subnet(a: IpAddr, b: IpAddr, prefix: u8) -> bool {
    a.is_ipv4() == b.is_ipv4() && mask(a, prefix) == mask(b, prefix)
}

fn network(ip: IpAddr, prefix: u8) -> IpAddr {
    match ip {
        IpAddr::V4(_) => IpAddr::V4((mask(ip, prefix) as u32).into()),
        IpAddr::V6(_) => IpAddr::V6(mask(ip, prefix).into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnets() {
        let a: IpAddr = "172.30.190.3".parse().unwrap();
        assert!(same_subnet(a, "172.30.190.1".parse().unwrap(), 24));
        assert!(!same_subnet(a, "172.30.191.1".parse().unwrap(), 24));
        assert!(same_subnet(a, "172.30.191.1".parse().unwrap(), 16));
        assert_eq!(network(a, 24).to_string(), "172.30.190.0");
        let b: IpAddr = "fd00::5".parse().unwrap();
        assert!(same_subnet(b, "fd00::1".parse().unwrap(), 64));
        assert!(!same_subnet(b, "fd01::1".parse().unwrap(), 64));
    }
}
