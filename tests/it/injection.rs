//! No inventory value can become Nix code: for every string field, values holding `"`, `\`,
//! `${`, `''` or a line break are either refused with a message naming the key, or rendered so
//! that Nix reads back exactly the original string.

use nk3_common::inventory;
use nk3_common::render::{HostFacts, Options, Source, Template};

use crate::support::{config_expr, nix_eval_json};

const PAYLOADS: &[&str] = &[
    "a\"b",
    "a\\b",
    "a${builtins.abort \"x\"}b",
    "a''b",
    "a''${b}",
    "a\nb",
    "\\${x}",
];

/// The template that shows what a custom template sees: every kind of insertion.
const PROBE: &str = "{ config, lib, pkgs, ... }:\n{ probe = { escaped = {{node.vars.v}}; helper = {{nix node.vars.v}}; list = {{nix node.vars}}; }; }\n";

fn yaml_quote(s: &str) -> String {
    format!(
        "\"{}\"",
        s.replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('\n', "\\n")
    )
}

/// One string field: where it goes in the inventory, and where Nix finds it again (None for
/// values that are never rendered, such as the token).
struct Field {
    key: &'static str,
    inventory: fn(&str) -> String,
    value: fn(&str) -> String,
    readback: Option<&'static str>,
    probe: bool,
}

fn inv(cluster_extra: &str, node_extra: &str) -> String {
    format!("join_address: 10.0.0.3\njoin_token: tok\ndefault_gateway: 10.0.0.1\n{cluster_extra}nodes:\n  10.0.0.3:\n    initiator: true\n    boot_device: /dev/sda\n    interface: eth0\n{node_extra}")
}

fn fields() -> Vec<Field> {
    vec![
        Field {
            key: "interface",
            inventory: |p| {
                inv(
                    "",
                    &format!("    interface: {}\n", yaml_quote(&format!("e{p}"))),
                )
                .replace("    interface: eth0\n", "")
            },
            value: |p| format!("e{p}"),
            readback: Some("builtins.head (builtins.attrNames c.networking.interfaces)"),
            probe: false,
        },
        Field {
            key: "boot_device",
            inventory: |p| {
                inv(
                    "",
                    &format!(
                        "    boot_device: {}\n",
                        yaml_quote(&format!("/dev/disk/by-id/x{p}"))
                    ),
                )
                .replace("    boot_device: /dev/sda\n", "")
            },
            value: |p| format!("/dev/disk/by-id/x{p}"),
            readback: Some("builtins.head c.boot.loader.grub.devices"),
            probe: false,
        },
        Field {
            key: "hostname",
            inventory: |p| {
                inv(
                    "",
                    &format!("    hostname: {}\n", yaml_quote(&format!("h{p}"))),
                )
            },
            value: |p| format!("h{p}"),
            readback: Some("c.networking.hostName"),
            probe: false,
        },
        Field {
            key: "ssh_authorized_keys",
            inventory: |p| {
                inv(
                    &format!(
                        "ssh_authorized_keys: [{}]\n",
                        yaml_quote(&format!(
                            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExample ops{p}"
                        ))
                    ),
                    "",
                )
            },
            value: |p| format!("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExample ops{p}"),
            readback: Some("builtins.head c.users.users.root.openssh.authorizedKeys.keys"),
            probe: false,
        },
        Field {
            key: "k3s_extra_flags",
            inventory: |p| {
                inv(
                    &format!(
                        "k3s_extra_flags: [{}]\n",
                        yaml_quote(&format!("--node-label=x{p}"))
                    ),
                    "",
                )
            },
            value: |p| format!("--node-label=x{p}"),
            readback: Some("builtins.elemAt c.services.k3s.extraFlags 1"),
            probe: false,
        },
        Field {
            key: "state_version",
            inventory: |p| {
                inv(
                    &format!("state_version: {}\n", yaml_quote(&format!("24.05{p}"))),
                    "",
                )
            },
            value: |p| format!("24.05{p}"),
            readback: Some("c.system.stateVersion"),
            probe: false,
        },
        Field {
            key: "nix_channel",
            inventory: |p| {
                inv(
                    &format!("nix_channel: {}\n", yaml_quote(&format!("nixos{p}"))),
                    "",
                )
            },
            value: |p| format!("nixos{p}"),
            readback: None,
            probe: false,
        },
        Field {
            key: "watch_namespaces",
            inventory: |p| {
                inv(
                    &format!("watch_namespaces: [{}]\n", yaml_quote(&format!("ns{p}"))),
                    "",
                )
            },
            value: |p| format!("ns{p}"),
            readback: None,
            probe: false,
        },
        Field {
            key: "join_token",
            inventory: |p| {
                inv("", "").replace(
                    "join_token: tok",
                    &format!("join_token: {}", yaml_quote(&format!("tok{p}en"))),
                )
            },
            value: |p| format!("tok{p}en"),
            readback: None,
            probe: false,
        },
        Field {
            key: "join_token_file",
            inventory: |p| {
                inv(
                    &format!(
                        "join_token_file: {}\n",
                        yaml_quote(&format!("/run/keys/t{p}"))
                    ),
                    "",
                )
            },
            value: |p| format!("/run/keys/t{p}"),
            readback: None,
            probe: false,
        },
        Field {
            key: "template",
            inventory: |p| {
                inv(
                    &format!("template: {}\n", yaml_quote(&format!("t{p}.hbs"))),
                    "",
                )
            },
            value: |p| format!("t{p}.hbs"),
            readback: None,
            probe: false,
        },
        Field {
            key: "vars",
            inventory: |p| inv(&format!("vars: {{ v: {} }}\n", yaml_quote(p)), ""),
            value: |p| p.to_string(),
            readback: Some("c.probe.escaped"),
            probe: true,
        },
        Field {
            key: "vars",
            inventory: |p| inv("", &format!("    vars: {{ v: {} }}\n", yaml_quote(p))),
            value: |p| p.to_string(),
            readback: Some("c.probe.helper"),
            probe: true,
        },
        Field {
            key: "v",
            inventory: |p| inv("", &format!("    v: {}\n", yaml_quote(p))),
            value: |p| p.to_string(),
            readback: Some("c.probe.list.v"),
            probe: true,
        },
        Field {
            key: "name",
            inventory: |p| {
                inv(
                    &format!(
                        "rollout:\n  health_checks:\n    - name: {}\n      command: [\"true\"]\n",
                        yaml_quote(&format!("c{p}"))
                    ),
                    "",
                )
            },
            value: |p| format!("c{p}"),
            readback: None,
            probe: false,
        },
    ]
}

#[test]
fn every_string_field_is_refused_or_read_back_exactly_by_nix() {
    let dir = tempfile::tempdir().unwrap();
    let opts = Options {
        source: Source {
            repository: "r".into(),
            commit: "c".into(),
        },
        token_file: "/var/lib/nk3-agent/join-token".into(),
        facts: HostFacts {
            state_version: Some("23.11".into()),
            ..HostFacts::default()
        },
    };
    let probe = Template::custom("probe", PROBE).unwrap();
    let builtin = Template::builtin();
    let (mut exprs, mut want, mut refused, mut failures) = (Vec::new(), Vec::new(), 0, Vec::new());
    for f in fields() {
        for p in PAYLOADS {
            let text = (f.inventory)(p);
            let value = (f.value)(p);
            match inventory::load("inventory.yaml", &text) {
                Err(d) => {
                    refused += 1;
                    if !d
                        .items
                        .iter()
                        .any(|i| i.key.split(['.', '[']).any(|seg| seg == f.key))
                    {
                        failures.push(format!(
                            "{} = {p:?}: refused without naming the key: {d}",
                            f.key
                        ));
                    }
                }
                Ok(inv) => {
                    let t = if f.probe { &probe } else { &builtin };
                    let out = t.render(&inv, &inv.nodes[0], &opts).unwrap();
                    match f.readback {
                        None => {
                            if out.contains(&value) {
                                failures.push(format!(
                                    "{} = {p:?} is not meant to be rendered but was",
                                    f.key
                                ));
                            }
                        }
                        Some(rb) => {
                            let file = dir.path().join(format!("case{}.nix", exprs.len()));
                            std::fs::write(&file, &out).unwrap();
                            exprs.push(format!("(let c = {}; in {rb})", config_expr(&file)));
                            want.push((f.key, *p, value));
                        }
                    }
                }
            }
        }
    }
    let got = nix_eval_json(&format!("[ {} ]", exprs.join(" ")));
    for (g, (key, p, value)) in got.as_array().unwrap().iter().zip(&want) {
        if g.as_str() != Some(value.as_str()) {
            failures.push(format!(
                "{key} = {p:?}: Nix read back {g}, expected {value:?}"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // Both outcomes must have happened: line breaks are refused, quotes render.
    assert!(
        refused >= PAYLOADS.len() && want.len() >= 20,
        "refused {refused}, read back {}",
        want.len()
    );
}
