//! The renderer's own checks: templates refused before they run, the header and body,
//! the firewall, state versions, URLs.

use super::context::firewall;
use super::*;

fn options(commit: &str, state_version: Option<&str>) -> Options {
    Options {
        source: Source {
            repository: "r".into(),
            commit: commit.into(),
        },
        token_file: DEFAULT_TOKEN_FILE.into(),
        facts: HostFacts {
            state_version: state_version.map(String::from),
            ..HostFacts::default()
        },
    }
}

#[test]
fn raw_insertions_are_found_however_they_are_spelt() {
    let raw = |t: &str| unsafe_element(&handlebars::Template::compile(t).unwrap(), 1);
    assert_eq!(raw("a\n  x = {{{node.ip}}};"), Some(Unsafe::Raw(2)));
    for spelling in [
        "{{~& x}}",
        "{{ &node.vars.v}}",
        "{{~ {node.vars.v} ~}}",
        "{{\n&node.vars.v}}",
        "{{#if a}}\n{{#each b}}{{ & this}}{{/each}}{{/if}}",
        "{{#if a}}{{else}}{{{x}}}{{/if}}",
    ] {
        assert!(
            matches!(raw(spelling), Some(Unsafe::Raw(_))),
            "{spelling:?}"
        );
    }
    assert_eq!(
        raw("{{#if a}}\n\n{{&x}}{{/if}}"),
        Some(Unsafe::Raw(3)),
        "lines count from the file's start"
    );
    for partial in [
        "{{#*inline \"p\"}}{{> p}}{{/inline}}{{> p}}",
        "{{> other}}",
        "{{#> layout}}x{{/layout}}",
        "{{* deco}}",
    ] {
        assert!(
            matches!(raw(partial), Some(Unsafe::Partial(_))),
            "{partial:?}"
        );
    }
    assert_eq!(
        raw("x = {{node.ip}}; y = {{nix node.vars}}; {{!-- {{&x}} --}}"),
        None
    );
    assert_eq!(raw(DEFAULT_TEMPLATE), None);
}

#[test]
fn deep_nesting_and_huge_output_are_refused_not_run() {
    let deep = "{{#if a}}".repeat(10_000) + &"{{/if}}".repeat(10_000);
    let e = Template::custom("t", &deep).unwrap_err();
    assert!(e.to_string().contains("nest deeper than 64"), "{e}");
    let inv = crate::inventory::load(
        "i",
        &format!("join_address: 10.0.0.3\njoin_token: t\nstate_version: \"24.05\"\nnodes:\n  10.0.0.3: {{ interface: eth0, default_gateway: 10.0.0.1, boot_device: /dev/sda, vars: {{ a: [{}] }} }}\n", vec!["1"; 200].join(", ")),
    )
    .unwrap();
    let t = Template::custom(
        "t",
        "{{#each node.vars.a}}{{#each ../node.vars.a}}{{#each ../../node.vars.a}}xxxxxxxxxxxxxxxx{{/each}}{{/each}}{{/each}}",
    )
    .unwrap();
    let o = options("c", None);
    let e = t.render(&inv, &inv.nodes[0], &o).unwrap_err();
    assert!(matches!(e, RenderError::TooLarge { .. }), "{e}");
    // Empty bodies write nothing, and would still loop 200^4 times: refused before.
    let idle = Template::custom(
        "t",
        "{{#each node.vars.a}}{{#each ../node.vars.a}}{{#each ../../node.vars.a}}{{#each ../../../node.vars.a}}{{/each}}{{/each}}{{/each}}{{/each}}",
    )
    .unwrap();
    let e = idle.render(&inv, &inv.nodes[0], &o).unwrap_err();
    assert!(
        matches!(
            e,
            RenderError::TooMuchWork {
                depth: 4,
                longest: 200,
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn a_recursive_partial_is_refused_not_run() {
    let t = Template::custom("t", "{{#*inline \"p\"}}{{> p}}{{/inline}}{{> p}}");
    assert!(
        matches!(t, Err(RenderError::Partial { line: 1, .. })),
        "{t:?}"
    );
}

#[test]
fn absent_optional_values_are_null_so_templates_can_test_them() {
    let inv = crate::inventory::load(
        "i",
        "join_address: 10.0.0.3\njoin_token: t\nnodes:\n  10.0.0.3: { interface: eth0, default_gateway: 10.0.0.1, boot_loader: systemd-boot }\n",
    )
    .unwrap();
    let t = Template::custom(
        "t",
        "{{#if node.uuid}}uuid{{else}}no uuid{{/if}}, {{nix node.boot_device}}, {{nix node.secondary}}",
    )
    .unwrap();
    let opts = options("c", Some("23.11"));
    let out = t.render(&inv, &inv.nodes[0], &opts).unwrap();
    assert!(out.ends_with("no uuid, null, null"), "{out}");
}

#[test]
fn the_body_leaves_out_only_the_header() {
    let inv = crate::inventory::load(
        "i",
        "join_address: 10.0.0.3\njoin_token: t\nnodes:\n  10.0.0.3: { interface: eth0, default_gateway: 10.0.0.1, boot_device: /dev/sda }\n",
    )
    .unwrap();
    let n = &inv.nodes[0];
    let mut o = options("one", Some("23.11"));
    let a = Template::builtin().render(&inv, n, &o).unwrap();
    o.source.commit = "another".into();
    let b = Template::builtin().render(&inv, n, &o).unwrap();
    assert_ne!(a, b);
    assert_eq!(body(&a), body(&b));
    assert!(body(&a).starts_with("{ config, lib, pkgs, ... }:"));
    let hand = "# my own notes\n{ }\n";
    assert_eq!(body(hand), hand);
}

fn ports(inv: &str, node: usize) -> (Vec<u16>, Vec<u16>) {
    let inv = crate::inventory::load("i", inv).unwrap();
    let f = firewall(&inv, &inv.nodes[node]);
    (f.tcp, f.udp)
}

fn cluster(flags: &str, second: &str) -> String {
    format!("join_address: 10.0.0.3\njoin_token: t\nk3s_server_flags: [{flags}]\nnodes:\n  10.0.0.3: {{ initiator: true, boot_device: /dev/sda{second} }}\n  10.0.0.4: {{ role: agent, boot_device: /dev/sda{second} }}\n")
}

#[test]
fn the_firewall_follows_the_flannel_backend_and_the_flags() {
    assert_eq!(
        ports(&cluster("", ""), 0),
        (vec![6443, 2379, 2380, 10250], vec![8472])
    );
    assert_eq!(ports(&cluster("", ""), 1), (vec![10250], vec![8472]));
    let wg = cluster("--flannel-backend=wireguard-native", "");
    assert_eq!(
        ports(&wg, 1),
        (vec![10250], vec![51820]),
        "agents follow the servers' backend"
    );
    let dual = cluster(
        "--flannel-backend=wireguard-native, \"--cluster-cidr=10.42.0.0/16,fd00:42::/56\", \"--service-cidr=10.43.0.0/16,fd00:43::/112\"",
        ", secondary_ip: \"fd00::3\"",
    );
    assert_eq!(ports(&dual, 0).1, vec![51820, 51821]);
    assert_eq!(
        ports(&cluster("--flannel-backend=host-gw", ""), 0).1,
        Vec::<u16>::new()
    );
    assert_eq!(
        ports(&cluster("--flannel-backend=none", ""), 1).1,
        Vec::<u16>::new()
    );
    let extras = cluster("--embedded-registry, --etcd-expose-metrics", "");
    assert_eq!(
        ports(&extras, 0).0,
        vec![6443, 2379, 2380, 10250, 5001, 2381]
    );
    assert_eq!(ports(&extras, 1).0, vec![10250, 5001]);
    assert_eq!(
        ports(&cluster("--embedded-registry=false", ""), 1).0,
        vec![10250]
    );
}

#[test]
fn the_installers_state_version_is_found() {
    let installer = "{ config, ... }:\n{\n  # system.stateVersion = \"20.03\";\n  system.stateVersion = \"23.11\"; # Did you read the comment?\n}\n";
    assert_eq!(state_version_in(installer).as_deref(), Some("23.11"));
    assert_eq!(state_version_in("{ }: { }"), None);
    assert_eq!(state_version_in("system.stateVersion = \"latest\";"), None);
}

#[test]
fn no_node_is_rendered_without_a_state_version() {
    let inv = crate::inventory::load(
        "i",
        "join_address: 10.0.0.3\njoin_token: t\nnodes:\n  10.0.0.3: { interface: eth0, default_gateway: 10.0.0.1, boot_device: /dev/sda }\n",
    )
    .unwrap();
    let mut o = options("c", None);
    let t = Template::builtin();
    let e = t.render(&inv, &inv.nodes[0], &o).unwrap_err();
    assert!(e.to_string().contains("no `state_version`"), "{e}");
    o.facts.state_version = Some("22.11".into());
    let out = t.render(&inv, &inv.nodes[0], &o).unwrap();
    assert!(out.contains("system.stateVersion = \"22.11\";"), "{out}");
}

#[test]
fn urls_lose_their_credentials() {
    assert_eq!(
        redact_url("https://user:tok@git.example/x.git"),
        "https://git.example/x.git"
    );
    assert_eq!(redact_url("ssh://git@host/x"), "ssh://git@host/x");
    assert_eq!(redact_url("ssh://git:pw@host/x"), "ssh://host/x");
    assert_eq!(redact_url("https://ghp_token@host/x"), "https://host/x");
    assert_eq!(redact_url("/srv/git/infra"), "/srv/git/infra");
}
