//! What a template sees: the source, the cluster and the node, as plain values.

use super::*;

#[derive(Serialize)]
pub(super) struct Ctx<'a> {
    source: SourceView<'a>,
    cluster: ClusterView<'a>,
    node: NodeView<'a>,
}

#[derive(Serialize)]
struct SourceView<'a> {
    repository: String,
    commit: &'a str,
}

#[derive(Serialize)]
struct ClusterView<'a> {
    join_address: String,
    server_url: String,
    token_file: &'a str,
    nameservers: Vec<String>,
    ssh_authorized_keys: &'a [String],
    state_version: &'a str,
    nix_channel: Option<&'a str>,
    watch_namespaces: &'a [String],
    node_count: usize,
}

#[derive(Serialize)]
struct NodeView<'a> {
    ip: String,
    ipv6: bool,
    hostname: &'a str,
    role: &'static str,
    initiator: bool,
    interface: String,
    default_gateway: String,
    prefix_length: u8,
    boot_loader: BootLoader,
    systemd_boot: bool,
    boot_device: Option<&'a str>,
    uuid: Option<String>,
    grub_efi: bool,
    k3s_flags: Vec<String>,
    firewall: Firewall,
    secondary: Option<SecondaryView>,
    vars: &'a Vars,
}

#[derive(Serialize)]
struct SecondaryView {
    ip: String,
    ipv6: bool,
    prefix_length: u8,
    gateway: Option<String>,
}

#[derive(Serialize)]
pub(super) struct Firewall {
    pub(super) tcp: Vec<u16>,
    pub(super) udp: Vec<u16>,
}

/// The value of k3s flag `name` in `flags` (the last one given), if any.
fn flag_value<'f>(flags: &'f [String], name: &str) -> Option<&'f str> {
    flags.iter().rev().find_map(|f| {
        let rest = f.strip_prefix(name)?;
        match rest.strip_prefix('=') {
            Some(v) => Some(v),
            None if rest.is_empty() => Some("true"),
            None => None,
        }
    })
}

/// The ports a node must open for k3s (docs.k3s.io, "Inbound Rules for K3s Nodes"): the
/// API server and embedded etcd on servers, the kubelet everywhere, and what the cluster's
/// flannel backend (`--flannel-backend` on the servers), embedded registry and etcd metrics
/// need.
pub(super) fn firewall(inv: &Inventory, node: &Node) -> Firewall {
    let server_flags: &[String] = inv
        .nodes
        .iter()
        .find(|n| n.role == Role::Server)
        .map_or(&[], |n| n.k3s_extra_flags.as_slice());
    let (mut tcp, mut udp) = match node.role {
        // API server (and supervisor), embedded etcd (client and peer), kubelet.
        Role::Server => (vec![6443, 2379, 2380, 10250], vec![]),
        Role::Agent => (vec![10250], vec![]),
    };
    let v4 = node.ip.is_ipv4() || node.secondary.is_some_and(|s| s.ip.is_ipv4());
    let v6 = node.ip.is_ipv6() || node.secondary.is_some_and(|s| s.ip.is_ipv6());
    match flag_value(server_flags, "--flannel-backend").unwrap_or("vxlan") {
        "vxlan" => udp.push(8472),
        "wireguard-native" => {
            if v4 {
                udp.push(51820);
            }
            if v6 {
                udp.push(51821);
            }
        }
        // host-gw routes pod traffic unencapsulated; none: another CNI says what it needs.
        _ => {}
    }
    if flag_value(server_flags, "--embedded-registry").is_some_and(|v| v != "false") {
        // Spegel's peer-to-peer registry.
        tcp.push(5001);
    }
    if node.role == Role::Server
        && flag_value(server_flags, "--etcd-expose-metrics").is_some_and(|v| v != "false")
    {
        tcp.push(2381);
    }
    Firewall { tcp, udp }
}

pub(super) fn context<'a>(
    inv: &'a Inventory,
    node: &'a Node,
    opts: &'a Options,
) -> Result<Ctx<'a>, RenderError> {
    let interface = node
        .interface
        .clone()
        .or_else(|| opts.facts.interface.clone())
        .ok_or(RenderError::MissingFact {
            node: node.key.clone(),
            what: "interface",
            flag: "interface",
        })?;
    let gateway =
        node.default_gateway
            .or(opts.facts.default_gateway)
            .ok_or(RenderError::MissingFact {
                node: node.key.clone(),
                what: "default_gateway",
                flag: "default-gateway",
            })?;
    let join = inv.join_address;
    let server_url = match join {
        IpAddr::V4(a) => format!("https://{a}:6443"),
        IpAddr::V6(a) => format!("https://[{a}]:6443"),
    };
    let node_ip = match node.secondary {
        Some(sec) => format!("--node-ip={},{}", node.ip, sec.ip),
        None => format!("--node-ip={}", node.ip),
    };
    let mut k3s_flags = vec![node_ip];
    k3s_flags.extend(node.k3s_extra_flags.iter().cloned());
    let state_version = inv
        .state_version
        .as_deref()
        .or(opts.facts.state_version.as_deref())
        .ok_or(RenderError::StateVersion {
            node: node.key.clone(),
        })?;
    Ok(Ctx {
        source: SourceView {
            repository: redact_url(&opts.source.repository),
            commit: &opts.source.commit,
        },
        cluster: ClusterView {
            join_address: join.to_string(),
            server_url,
            token_file: &opts.token_file,
            nameservers: inv.nameservers.iter().map(ToString::to_string).collect(),
            ssh_authorized_keys: &inv.ssh_authorized_keys,
            state_version,
            nix_channel: inv.nix_channel.as_deref(),
            watch_namespaces: &inv.watch_namespaces,
            node_count: inv.nodes.len(),
        },
        node: NodeView {
            ip: node.ip.to_string(),
            ipv6: node.ip.is_ipv6(),
            hostname: &node.hostname,
            role: node.role.as_str(),
            initiator: node.initiator,
            interface,
            default_gateway: gateway.to_string(),
            prefix_length: node.prefix_length,
            boot_loader: node.boot_loader,
            systemd_boot: node.boot_loader == BootLoader::SystemdBoot,
            boot_device: node.boot_device.as_deref(),
            uuid: node.uuid.map(|u| u.to_string()),
            grub_efi: node.boot_loader == BootLoader::GrubEfi,
            k3s_flags,
            firewall: firewall(inv, node),
            secondary: node.secondary.map(|s| SecondaryView {
                ip: s.ip.to_string(),
                ipv6: s.ip.is_ipv6(),
                prefix_length: s.prefix_length,
                gateway: s.gateway.map(|g| g.to_string()),
            }),
            vars: &node.vars,
        },
    })
}
