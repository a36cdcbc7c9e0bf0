//! Rendered files are read by real Nix: they parse, and evaluating them with stand-in
//! arguments gives back what the inventory says.

use std::net::IpAddr;

use nk3_common::inventory::{self, Role};
use serde_json::{json, Value};

use crate::support::{
    config_expr, nix_eval_json, nix_instantiate, nk3, render_all, root, run, stderr, stdout,
    EXAMPLES,
};

#[test]
fn every_rendered_example_parses_and_evaluates_to_the_inventory() {
    for ex in EXAMPLES {
        let text = std::fs::read_to_string(root().join(ex.inventory)).unwrap();
        let inv = inventory::load(ex.inventory, &text).unwrap();
        let (dir, files) = render_all(ex);
        for n in &inv.nodes {
            let file = dir.path().join(format!("{}.nix", n.hostname));
            assert!(files.iter().any(|(f, _)| dir.path().join(f) == file));
            let o = run(nix_instantiate().arg("--parse").arg(&file));
            assert!(o.status.success(), "{}: {}", file.display(), stderr(&o));

            let fam = if n.ip.is_ipv6() { "ipv6" } else { "ipv4" };
            let expr = format!(
                "let c = {}; k = c.services.k3s; in {{ host = c.networking.hostName; ifs = builtins.mapAttrs (_: i: i.{fam}.addresses) c.networking.interfaces; role = k.role; tokenFile = k.tokenFile; clusterInit = k.clusterInit or null; serverAddr = k.serverAddr or null; }}",
                config_expr(&file)
            );
            let got = nix_eval_json(&expr);
            let iface = n.interface.clone().unwrap_or_else(|| "enp3s0f0".into());
            let server_url = match inv.join_address {
                IpAddr::V4(a) => format!("https://{a}:6443"),
                IpAddr::V6(a) => format!("https://[{a}]:6443"),
            };
            let (init, addr) = if n.initiator {
                (json!(true), Value::Null)
            } else {
                (Value::Null, json!(server_url))
            };
            let want = json!({
                "host": n.hostname,
                "ifs": { iface: [ { "address": n.ip.to_string(), "prefixLength": n.prefix_length } ] },
                "role": match n.role { Role::Server => "server", Role::Agent => "agent" },
                "tokenFile": "/var/lib/nk3-agent/join-token",
                "clusterInit": init,
                "serverAddr": addr,
            });
            assert_eq!(got, want, "{} node {}", ex.name, n.key);
        }
    }
}

#[test]
fn flipping_the_initiator_changes_only_the_cluster_init_line() {
    let seed = crate::support::seed_inventory();
    let flipped = seed.replacen("initiator: true", "initiator: false", 1);
    assert_ne!(seed, flipped);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("inventory.yaml");
    let render = |text: &str| {
        std::fs::write(&path, text).unwrap();
        let o = run(nk3()
            .args([
                "render",
                "--node",
                "172.30.190.3",
                "--commit",
                "c0ffee",
                "--repository",
                "r",
                "--inventory",
            ])
            .arg(&path));
        assert!(o.status.success(), "{}", stderr(&o));
        stdout(&o)
    };
    let (before, after) = (render(&seed), render(&flipped));
    let (b, a): (Vec<&str>, Vec<&str>) = (before.lines().collect(), after.lines().collect());
    assert_eq!(
        b.len(),
        a.len(),
        "line count changed:\n{before}\n---\n{after}"
    );
    let changed: Vec<(&str, &str)> = b
        .iter()
        .zip(&a)
        .filter(|(x, y)| x != y)
        .map(|(x, y)| (*x, *y))
        .collect();
    assert_eq!(
        changed,
        [(
            "    clusterInit = true;",
            "    serverAddr = \"https://172.30.190.3:6443\";"
        )]
    );
}
