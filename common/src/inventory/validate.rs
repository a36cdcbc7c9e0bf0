//! Checks that relate several values: one initiator, distinct nodes, addresses that fit the
//! network, and a rollout that cannot break etcd quorum.

use std::collections::HashMap;
use std::net::IpAddr;

use super::{BootLoader, Diagnostics, Inventory, Layout, Node, Role};
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
    c.families(inv);
}

/// IP families: bit 1 IPv4, bit 2 IPv6.
fn family(ip: IpAddr) -> u8 {
    if ip.is_ipv4() {
        1
    } else {
        2
    }
}

fn family_name(f: u8) -> &'static str {
    match f {
        1 => "IPv4",
        2 => "IPv6",
        _ => "IPv4 and IPv6",
    }
}

/// The families of a `--cluster-cidr=`/`--service-cidr=` value in `flags` (`None`: not
/// given, k3s's IPv4 default), and whether every part is a CIDR.
fn cidr_families(flags: &[String], name: &str) -> Option<Result<u8, String>> {
    let value = flags
        .iter()
        .rev()
        .find_map(|f| f.strip_prefix(name)?.strip_prefix('='))?;
    let mut fam = 0;
    for part in value.split(',') {
        let (ip, len) = part.split_once('/').unwrap_or((part, ""));
        match (ip.parse::<IpAddr>(), len.parse::<u8>()) {
            (Ok(ip), Ok(_)) => fam |= family(ip),
            _ => {
                return Some(Err(format!(
                    "`{name}={value}`: `{part}` is not a CIDR (address/length)"
                )))
            }
        }
    }
    Some(Ok(fam))
}

impl Checker<'_> {
    fn err(&mut self, at: &Path, message: String) {
        self.diags.at(self.text, at, message);
    }

    fn node_path(&self, n: &Node) -> Path {
        self.base.key("nodes").key(&n.key)
    }

    /// A node named for a message about another: its key and line. Located only when a
    /// message needs it, since locating is linear in the file.
    fn where_(&self, n: &Node) -> String {
        if self.diags.full() {
            return n.key.clone();
        }
        match locate(self.text, &self.node_path(n).0) {
            Some(l) => format!("{} (line {l})", n.key),
            None => n.key.clone(),
        }
    }

    fn node_set(&mut self, inv: &Inventory) {
        let mut by_ip: HashMap<IpAddr, &Node> = HashMap::new();
        let mut by_name: HashMap<String, &Node> = HashMap::new();
        let mut by_uuid: HashMap<uuid::Uuid, &Node> = HashMap::new();
        for n in &inv.nodes {
            // `::ffff:10.0.0.3` is 10.0.0.3.
            if let Some(first) = by_ip.insert(n.ip.to_canonical(), n) {
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
            // Kubernetes knows node names in lower case only.
            if let Some(first) = by_name.insert(n.hostname.to_ascii_lowercase(), n) {
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
        let c = a.to_canonical();
        if c.is_loopback() || c.is_unspecified() || c.is_multicast() {
            self.err(&at, format!("join_address {a} is a loopback, unspecified or multicast address; joining nodes must reach a server there"));
            return;
        }
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
        let ip = n.ip.to_canonical();
        if ip.is_loopback() || ip.is_unspecified() || ip.is_multicast() {
            self.err(&at, format!("node {} is a loopback, unspecified or multicast address, which every machine (or none) would take for its own; a node's key is the address of its interface", n.key));
        }
        if n.hostname_set
            && !n
                .hostname
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        {
            self.err(&at.key("hostname"), format!("hostname `{}` is not a Kubernetes node name: k3s names the node after it, and node names are lower-case letters, digits and `-`", n.hostname));
        }
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
        if let Some(sec) = n.secondary {
            let sat = at.key("secondary_ip");
            let smax = if sec.ip.is_ipv4() { 32 } else { 128 };
            if sec.ip.is_ipv4() == n.ip.is_ipv4() {
                self.err(&sat, format!("secondary_ip {} is of the same IP family as node {}; a second address is for the other family (dual-stack)", sec.ip, n.key));
            } else if sec.prefix_length > smax {
                self.err(
                    &at.key("secondary_prefix_length"),
                    format!(
                        "prefix length {} is too long for {}; at most {smax}",
                        sec.prefix_length, sec.ip
                    ),
                );
            } else if let Some(gw) = sec.gateway {
                let gat = at.key("secondary_gateway");
                if gw.is_ipv4() != sec.ip.is_ipv4() {
                    self.err(&gat, format!("secondary_gateway {gw} and secondary_ip {} are of different IP families", sec.ip));
                } else if !same_subnet(sec.ip, gw, sec.prefix_length) {
                    self.err(
                        &gat,
                        format!(
                            "secondary_gateway {gw} is outside {}/{}",
                            network(sec.ip, sec.prefix_length),
                            sec.prefix_length
                        ),
                    );
                }
            }
        }
        let bad_device = at.key("boot_device").to_string();
        let already_reported = self.diags.items.iter().any(|d| d.key == bad_device);
        if n.boot_loader == BootLoader::Grub && n.boot_device.is_none() && !already_reported {
            self.err(&at, format!("node {} boots with GRUB but has no `boot_device`; set `boot_device: /dev/…`, or `boot_loader: systemd-boot` for EFI", n.key));
        }
    }

    /// The IP families of the nodes, the pod and service networks and the resolvers agree,
    /// as k3s requires: a node's `--node-ip` must share the pod network's IP version, and a
    /// dual-stack cluster needs both families everywhere (docs.k3s.io, "Dual-stack" and
    /// "Single-stack IPv6" networking).
    fn families(&mut self, inv: &Inventory) {
        let mut nets: Vec<(&str, u8, &Node)> = Vec::new();
        for n in inv.nodes.iter().filter(|n| n.role == Role::Server) {
            for name in ["--cluster-cidr", "--service-cidr"] {
                match cidr_families(&n.k3s_extra_flags, name) {
                    None => nets.push((name, 1, n)),
                    Some(Ok(f)) => nets.push((name, f, n)),
                    Some(Err(m)) => {
                        let at = self.node_path(n);
                        self.err(&at, m);
                    }
                }
            }
        }
        let pick = |name: &str| nets.iter().find(|(k, _, _)| *k == name).copied();
        for name in ["--cluster-cidr", "--service-cidr"] {
            let Some((_, first, by)) = pick(name) else {
                continue;
            };
            for (_, f, n) in nets.iter().filter(|(k, f, _)| *k == name && *f != first) {
                let at = self.node_path(n);
                self.err(&at, format!("server {} has a {} {name} but server {} a {} one; every server must give k3s the same networks", n.key, family_name(*f), self.where_(by), family_name(first)));
            }
        }
        let (Some((_, pods, _)), Some((_, services, _))) =
            (pick("--cluster-cidr"), pick("--service-cidr"))
        else {
            return;
        };
        let hint = "set both in `k3s_server_flags`, e.g. `--cluster-cidr=fd00:42::/56` and `--service-cidr=fd00:43::/112` for IPv6 (with IPv4 ones before them for dual-stack)";
        if pods != services {
            let at = self.base.key("nodes");
            self.err(&at, format!("the pod network (--cluster-cidr) is {} but the service network (--service-cidr) {}; k3s needs them of the same IP families: {hint}", family_name(pods), family_name(services)));
        }
        for n in &inv.nodes {
            let mine = family(n.ip) | n.secondary.map_or(0, |s| family(s.ip));
            let at = self.node_path(n);
            if mine & pods == 0 {
                self.err(&at, format!("node {} has only {} addresses but the pod network (--cluster-cidr, default 10.42.0.0/16) is {}; k3s refuses a node-ip and cluster-cidr of different IP versions: {hint}", n.key, family_name(mine), family_name(pods)));
            } else if pods == 3 && mine != 3 {
                self.err(&at, format!("the cluster is dual-stack (--cluster-cidr has IPv4 and IPv6) but node {} has only an {} address; give it `secondary_ip:` of the other family", n.key, family_name(mine)));
            }
        }
        // An IPv4 resolver where no node has an IPv4 address is one no node can reach (IPv6
        // ones are not judged: router advertisements give IPv4 nodes IPv6 addresses too).
        let all = inv.nodes.iter().fold(0, |acc, n| {
            acc | family(n.ip) | n.secondary.map_or(0, |s| family(s.ip))
        });
        for (i, ns) in inv.nameservers.iter().enumerate() {
            if ns.is_ipv4() && all & 1 == 0 {
                let at = self.base.key("nameservers").index(i);
                self.err(
                    &at,
                    format!(
                        "nameserver {ns} is {} but no node has an {} address to reach it from",
                        family_name(family(*ns)),
                        family_name(family(*ns))
                    ),
                );
            }
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
