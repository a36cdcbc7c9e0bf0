//! Which inventory node this machine is, and the network facts an inventory may leave out.
//!
//! Pure: the agent gathers [`MachineFacts`] and the routing tables; this decides.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::inventory::{Inventory, Node};

/// What the agent knows about the machine it runs on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MachineFacts {
    /// `--node` / `NK3_NODE`: an address or hostname the operator set.
    pub explicit: Option<String>,
    /// The SMBIOS product UUID (`/sys/class/dmi/id/product_uuid`), when readable.
    pub smbios_uuid: Option<uuid::Uuid>,
    /// Addresses on the machine's interfaces.
    pub addresses: Vec<IpAddr>,
    /// The current hostname.
    pub hostname: Option<String>,
}

/// How the node was recognised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MatchedBy {
    /// The explicit setting.
    Setting,
    /// The node's `uuid` equals the SMBIOS product UUID.
    SmbiosUuid,
    /// The node's address is on one of the machine's interfaces.
    Address,
    /// The node's hostname is the machine's.
    Hostname,
}

impl MatchedBy {
    /// For messages: "by its address".
    pub fn describe(self) -> &'static str {
        match self {
            MatchedBy::Setting => "by the --node setting",
            MatchedBy::SmbiosUuid => "by its SMBIOS product UUID",
            MatchedBy::Address => "by its address",
            MatchedBy::Hostname => "by its hostname",
        }
    }
}

/// Why no single node could be chosen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// The explicit setting names no node.
    #[error("--node `{id}` is neither the address nor the hostname of a node; nodes are: {nodes}")]
    UnknownSetting {
        /// What the setting said.
        id: String,
        /// The inventory's node keys.
        nodes: String,
    },
    /// Nothing about the machine matches a node.
    #[error("this machine is not in the inventory: no node has its UUID ({uuid}), any of its addresses ({addresses}) or its hostname ({hostname})")]
    NotFound {
        /// The machine's UUID, or "unknown".
        uuid: String,
        /// The machine's addresses.
        addresses: String,
        /// The machine's hostname, or "unknown".
        hostname: String,
    },
    /// One kind of evidence matches more than one node.
    #[error("this machine matches several nodes {by}: {nodes}; set --node to choose")]
    Ambiguous {
        /// How they matched.
        by: &'static str,
        /// The nodes' keys.
        nodes: String,
    },
}

/// Finds this machine's node: the explicit setting, else the SMBIOS UUID, else an interface
/// address, else the hostname. A kind of evidence that matches two nodes is an error, never a
/// guess.
pub fn identify<'a>(
    inv: &'a Inventory,
    facts: &MachineFacts,
) -> Result<(&'a Node, MatchedBy), IdentityError> {
    if let Some(id) = &facts.explicit {
        return inv
            .node(id)
            .map(|n| (n, MatchedBy::Setting))
            .ok_or_else(|| IdentityError::UnknownSetting {
                id: id.clone(),
                nodes: keys(inv.nodes.iter()),
            });
    }
    for by in [
        MatchedBy::SmbiosUuid,
        MatchedBy::Address,
        MatchedBy::Hostname,
    ] {
        let found: Vec<&Node> = inv.nodes.iter().filter(|n| matches(n, facts, by)).collect();
        match found.as_slice() {
            [] => continue,
            [n] => return Ok((n, by)),
            many => {
                return Err(IdentityError::Ambiguous {
                    by: by.describe(),
                    nodes: keys(many.iter().copied()),
                })
            }
        }
    }
    let addresses: Vec<String> = facts.addresses.iter().map(ToString::to_string).collect();
    Err(IdentityError::NotFound {
        uuid: facts
            .smbios_uuid
            .map_or("unknown".into(), |u| u.to_string()),
        addresses: if addresses.is_empty() {
            "none".into()
        } else {
            addresses.join(", ")
        },
        hostname: facts.hostname.clone().unwrap_or_else(|| "unknown".into()),
    })
}

/// Node keys for a message: `10.0.0.3, 10.0.0.4`.
fn keys<'a>(nodes: impl Iterator<Item = &'a Node>) -> String {
    nodes.map(|n| n.key.as_str()).collect::<Vec<_>>().join(", ")
}

/// Whether one kind of evidence about the machine points at `n`.
fn matches(n: &Node, facts: &MachineFacts, by: MatchedBy) -> bool {
    match by {
        MatchedBy::Setting => false,
        MatchedBy::SmbiosUuid => n.uuid.is_some() && n.uuid == facts.smbios_uuid,
        MatchedBy::Address => facts.addresses.contains(&n.ip),
        MatchedBy::Hostname => facts.hostname.as_deref() == Some(n.hostname.as_str()),
    }
}

/// A default route: the interface it leaves through and its gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DefaultRoute {
    /// Interface name.
    pub interface: String,
    /// Next hop.
    pub gateway: IpAddr,
}

/// The IPv4 default route with the lowest metric in `/proc/net/route` text.
pub fn default_route_v4(table: &str) -> Option<DefaultRoute> {
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (iface, dest, gw, flags, metric, mask) = (
                f.first()?,
                f.get(1)?,
                f.get(2)?,
                f.get(3)?,
                f.get(6)?,
                f.get(7)?,
            );
            let flags = u32::from_str_radix(flags, 16).ok()?;
            // RTF_UP | RTF_GATEWAY, destination and mask 0.0.0.0.
            if *dest != "00000000" || *mask != "00000000" || flags & 0x3 != 0x3 {
                return None;
            }
            // The kernel prints the address in host (little-endian) byte order.
            let gw = Ipv4Addr::from(u32::from_str_radix(gw, 16).ok()?.swap_bytes());
            Some((
                metric.parse::<u32>().ok()?,
                iface.to_string(),
                IpAddr::V4(gw),
            ))
        })
        .min_by_key(|(metric, _, _)| *metric)
        .map(|(_, interface, gateway)| DefaultRoute { interface, gateway })
}

/// The IPv6 default route with the lowest metric in `/proc/net/ipv6_route` text.
pub fn default_route_v6(table: &str) -> Option<DefaultRoute> {
    table
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() < 10 || f[0] != "00000000000000000000000000000000" || f[1] != "00" {
                return None;
            }
            let gw = Ipv6Addr::from(u128::from_str_radix(f[4], 16).ok()?);
            if gw.is_unspecified() {
                return None;
            }
            Some((
                u32::from_str_radix(f[5], 16).ok()?,
                f[9].to_string(),
                IpAddr::V6(gw),
            ))
        })
        .min_by_key(|(metric, _, _)| *metric)
        .map(|(_, interface, gateway)| DefaultRoute { interface, gateway })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::load;

    const INV: &str = "join_address: 10.0.0.3\njoin_token: t\ndefault_gateway: 10.0.0.1\nnodes:\n  10.0.0.3: { initiator: true, interface: eth0, boot_device: /dev/sda, uuid: 4c4c4544-0042-3510-8052-b4c04f4e4d32 }\n  10.0.0.4: { interface: eth0, boot_device: /dev/sda, hostname: worker-4 }\n  10.0.0.5: { interface: eth0, boot_device: /dev/sda }\n";

    fn facts() -> MachineFacts {
        MachineFacts {
            explicit: None,
            smbios_uuid: None,
            addresses: vec!["127.0.0.1".parse().unwrap()],
            hostname: Some("nixos".into()),
        }
    }

    #[test]
    fn evidence_is_taken_in_order() {
        let inv = load("i", INV).unwrap();
        let mut f = facts();
        f.hostname = Some("worker-4".into());
        assert_eq!(
            identify(&inv, &f).map(|(n, by)| (n.key.as_str(), by)),
            Ok(("10.0.0.4", MatchedBy::Hostname))
        );
        f.addresses.push("10.0.0.5".parse().unwrap());
        assert_eq!(
            identify(&inv, &f).map(|(n, by)| (n.key.as_str(), by)),
            Ok(("10.0.0.5", MatchedBy::Address))
        );
        f.smbios_uuid = Some("4c4c4544-0042-3510-8052-b4c04f4e4d32".parse().unwrap());
        assert_eq!(
            identify(&inv, &f).map(|(n, by)| (n.key.as_str(), by)),
            Ok(("10.0.0.3", MatchedBy::SmbiosUuid))
        );
        f.explicit = Some("worker-4".into());
        assert_eq!(
            identify(&inv, &f).map(|(n, by)| (n.key.as_str(), by)),
            Ok(("10.0.0.4", MatchedBy::Setting))
        );
    }

    #[test]
    fn a_machine_matching_two_nodes_is_not_guessed() {
        let inv = load("i", INV).unwrap();
        let mut f = facts();
        f.addresses = vec!["10.0.0.4".parse().unwrap(), "10.0.0.5".parse().unwrap()];
        let e = identify(&inv, &f).unwrap_err().to_string();
        assert_eq!(e, "this machine matches several nodes by its address: 10.0.0.4, 10.0.0.5; set --node to choose");
    }

    #[test]
    fn an_unknown_machine_is_told_what_was_tried() {
        let inv = load("i", INV).unwrap();
        let e = identify(&inv, &facts()).unwrap_err().to_string();
        assert_eq!(e, "this machine is not in the inventory: no node has its UUID (unknown), any of its addresses (127.0.0.1) or its hostname (nixos)");
        let mut f = facts();
        f.explicit = Some("10.9.9.9".into());
        assert_eq!(
            identify(&inv, &f).unwrap_err().to_string(),
            "--node `10.9.9.9` is neither the address nor the hostname of a node; nodes are: 10.0.0.3, 10.0.0.4, 10.0.0.5"
        );
    }

    #[test]
    fn default_routes_are_read_from_the_kernel_tables() {
        let v4 =
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                  eth1\t00000000\t0100000A\t0003\t0\t0\t200\t00000000\t0\t0\t0\n\
                  eth0\t00000000\t010200C0\t0003\t0\t0\t100\t00000000\t0\t0\t0\n\
                  eth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n";
        assert_eq!(
            default_route_v4(v4),
            Some(DefaultRoute {
                interface: "eth0".into(),
                gateway: "192.0.2.1".parse().unwrap()
            })
        );
        let v6 = "00000000000000000000000000000000 00 00000000000000000000000000000000 00 fd000000000000000000000000000001 00000400 00000002 00000000 00000003     eth0\n";
        assert_eq!(
            default_route_v6(v6),
            Some(DefaultRoute {
                interface: "eth0".into(),
                gateway: "fd00::1".parse().unwrap()
            })
        );
        assert_eq!(default_route_v4("Iface\tDestination\n"), None);
    }
}
