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

/// What k3s keeps in its data directory once it has joined a cluster: a server's
/// certificates and token, or the client certificate a server signed for the node's kubelet
/// (every node, agent or server, has one). k3s writes none of them before a server answered,
/// so a machine whose k3s still waits to join has none.
const JOINED: [&str; 4] = [
    "agent/client-kubelet.crt",
    "agent/kubelet.kubeconfig",
    "server/tls",
    "server/token",
];

/// The first sign in `data_dir` that k3s has joined a cluster on this machine, if any.
pub fn k3s_joined(data_dir: &Path) -> Option<std::path::PathBuf> {
    JOINED
        .iter()
        .map(|p| data_dir.join(p))
        .find(|p| p.symlink_metadata().is_ok())
}

#[cfg(test)]
mod k3s_tests {
    use super::*;

    #[test]
    fn a_kubelet_certificate_or_server_state_means_k3s_joined() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(k3s_joined(dir.path()), None);
        // What NixOS's k3s module makes before k3s runs (manifests, images) is no sign.
        std::fs::create_dir_all(dir.path().join("server/manifests")).unwrap();
        std::fs::create_dir_all(dir.path().join("agent/images")).unwrap();
        assert_eq!(k3s_joined(dir.path()), None);
        std::fs::write(dir.path().join("agent/client-kubelet.crt"), "x").unwrap();
        assert_eq!(
            k3s_joined(dir.path()),
            Some(dir.path().join("agent/client-kubelet.crt"))
        );
        let server = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(server.path().join("server/tls")).unwrap();
        assert!(k3s_joined(server.path()).is_some());
    }
}
