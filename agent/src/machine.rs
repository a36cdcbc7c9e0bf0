//! Facts about the machine the agent runs on: what identifies it, and its default route.
//! Every path is a setting, so tests point them at files of their own.

use std::net::IpAddr;
use std::path::Path;

use nk3_common::identity::{self, DefaultRoute, MachineFacts};

/// Reads the SMBIOS UUID file, the interface addresses and the hostname. Anything unreadable
/// is simply unknown: identification then relies on the rest.
pub fn facts(explicit: Option<String>, product_uuid_file: &Path) -> MachineFacts {
    let smbios_uuid = std::fs::read_to_string(product_uuid_file)
        .ok()
        .and_then(|s| s.trim().parse().ok());
    MachineFacts {
        explicit,
        smbios_uuid,
        addresses: addresses(),
        hostname: nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok()),
    }
}

/// The addresses on the machine's interfaces (`getifaddrs`).
fn addresses() -> Vec<IpAddr> {
    let Ok(ifaddrs) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    let mut out: Vec<IpAddr> = ifaddrs
        .filter_map(|ifa| {
            let a = ifa.address?;
            if let Some(v4) = a.as_sockaddr_in() {
                Some(IpAddr::V4(v4.ip()))
            } else {
                a.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
            }
        })
        .collect();
    out.dedup();
    out
}

/// The default route for an address of `family_of`'s family, from the kernel's tables.
pub fn default_route(family_of: IpAddr, v4_table: &Path, v6_table: &Path) -> Option<DefaultRoute> {
    if family_of.is_ipv4() {
        identity::default_route_v4(&std::fs::read_to_string(v4_table).ok()?)
    } else {
        identity::default_route_v6(&std::fs::read_to_string(v6_table).ok()?)
    }
}
