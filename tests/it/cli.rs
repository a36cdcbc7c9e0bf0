//! The `render` and `validate` commands as a person uses them: exit codes, messages, files.

use crate::support::{nk3, run, stderr, stdout};

fn assert_no_panic(text: &str) {
    assert!(
        !text.contains("panicked") && !text.contains("RUST_BACKTRACE"),
        "{text}"
    );
}

#[test]
fn validate_accepts_the_seed_inventory_and_shows_the_node_names() {
    let o = run(nk3().args(["validate", "examples/inventory.yaml"]));
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(
        out.contains("examples/inventory.yaml: valid (`cluster:` layout), 3 nodes"),
        "{out}"
    );
    assert!(
        out.contains("172.30.190.3  d6c27852-4d1c-5830-8e94-40b76fa2b5ec  server, initiator"),
        "{out}"
    );
}

#[test]
fn validate_lists_every_problem_as_file_line_key_message_and_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("inventory.yaml");
    let seed = crate::support::seed_inventory();
    let bad = seed.replace(
        "      interface: enp3s0f0\n      boot_device: /dev/nvme0n1\n    172.30.190.5",
        "      interfce: enp3s0f0\n      boot_device: nvme0n1\n    172.30.190.5",
    );
    std::fs::write(&path, bad).unwrap();
    let o = run(nk3().arg("validate").arg(&path));
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert_no_panic(&err);
    let p = path.display();
    assert!(err.contains(&format!("{p}:13: cluster.nodes.172.30.190.4.interfce: unknown key `interfce`; did you mean `interface`?")), "{err}");
    assert!(err.contains(&format!("{p}:14: cluster.nodes.172.30.190.4.boot_device: boot_device `nvme0n1` is not an absolute path")), "{err}");
    assert!(
        err.contains("2 problems; nothing was rendered or applied"),
        "{err}"
    );
    assert!(stdout(&o).is_empty());
}

#[test]
fn a_missing_file_is_a_message_not_a_crash() {
    let o = run(nk3().args(["validate", "no/such/inventory.yaml"]));
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert_no_panic(&err);
    assert!(
        err.contains("cannot read inventory no/such/inventory.yaml"),
        "{err}"
    );
}

#[test]
fn render_names_the_known_nodes_when_asked_for_another() {
    let o = run(nk3().args([
        "render",
        "--inventory",
        "examples/inventory.yaml",
        "--node",
        "10.9.9.9",
    ]));
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(err.contains("--node `10.9.9.9` is neither the address nor the hostname of a node; nodes are: 172.30.190.3, 172.30.190.4, 172.30.190.5"), "{err}");
    assert!(stdout(&o).is_empty());
}

#[test]
fn validate_names_the_flat_layout() {
    let o = run(nk3().args(["validate", "examples/flat/inventory.yaml"]));
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).starts_with("examples/flat/inventory.yaml: valid (flat layout), 3 nodes\n"),
        "{}",
        stdout(&o)
    );
}

#[test]
fn render_finds_a_node_by_hostname_too() {
    let by_ip = run(nk3().args([
        "render",
        "--inventory",
        "examples/inventory.yaml",
        "--node",
        "172.30.190.4",
    ]));
    let by_name = run(nk3().args([
        "render",
        "--inventory",
        "examples/inventory.yaml",
        "--node",
        "a9bcde5e-240d-54ad-8590-d8e18b7ee42f",
    ]));
    assert!(by_ip.status.success() && by_name.status.success());
    assert_eq!(by_ip.stdout, by_name.stdout);
}

#[test]
fn render_all_writes_nothing_unless_every_node_renders() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    // The flat example leaves interface and gateway to the node: away from it, they must be given.
    let o = run(nk3()
        .args([
            "render",
            "--inventory",
            "examples/flat/inventory.yaml",
            "--all",
            "--out",
        ])
        .arg(&out));
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(err.contains("node 172.30.190.3: no `interface` in the inventory and none detected on the machine; set `interface:` for this node (or pass --interface"), "{err}");
    assert!(
        !out.exists(),
        "files were written although rendering failed"
    );
    let o = run(nk3()
        .args([
            "render",
            "--inventory",
            "examples/flat/inventory.yaml",
            "--interface",
            "eno1",
            "--all",
            "--out",
        ])
        .arg(&out));
    assert!(
        stderr(&o).contains("no `default_gateway`"),
        "{}",
        stderr(&o)
    );
    let o = run(nk3()
        .args([
            "render",
            "--inventory",
            "examples/flat/inventory.yaml",
            "--interface",
            "eno1",
            "--default-gateway",
            "172.30.190.1",
            "--all",
            "--out",
        ])
        .arg(&out));
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 3);
    let listed = stdout(&o);
    let first = out.join("d6c27852-4d1c-5830-8e94-40b76fa2b5ec.nix");
    assert!(
        listed.starts_with(&format!("172.30.190.3  {}\n", first.display())),
        "{listed}"
    );
    assert_eq!(listed.lines().count(), 3, "{listed}");
}

#[test]
fn rendered_files_name_their_source_without_credentials_or_the_token() {
    let o = run(nk3().args([
        "render",
        "--inventory",
        "examples/inventory.yaml",
        "--node",
        "172.30.190.3",
        "--repository",
        "https://deploy:ghp_secret@git.example.com/infra.git",
        "--commit",
        "4b825dc642cb6eb9a060e54bf8d69288fbee4904",
    ]));
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.starts_with("# Generated by nk3 for d6c27852-4d1c-5830-8e94-40b76fa2b5ec (172.30.190.3) from https://git.example.com/infra.git at commit 4b825dc642cb6eb9a060e54bf8d69288fbee4904.\n"), "{out}");
    assert!(!out.contains("ghp_secret"));
    assert!(
        !out.contains("2f909ce8-cae1-439a-86b3-da87b7ee9f55"),
        "the join token leaked into the configuration"
    );
    assert!(out.contains("tokenFile = \"/var/lib/nk3-agent/join-token\";"));
}

#[test]
fn the_token_file_follows_the_state_directory() {
    let o = run(nk3()
        .args([
            "render",
            "--inventory",
            "examples/inventory.yaml",
            "--node",
            "172.30.190.3",
        ])
        .env("NK3_STATE_DIR", "/srv/nk3"));
    assert!(
        stdout(&o).contains("tokenFile = \"/srv/nk3/join-token\";"),
        "{}",
        stdout(&o)
    );
}

/// Renders the seed's initiator with a repository template holding `template`.
fn render_with_template(template: &str) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    let seed = crate::support::seed_inventory();
    std::fs::write(
        dir.path().join("inventory.yaml"),
        format!("{seed}  template: my.nix.hbs\n"),
    )
    .unwrap();
    std::fs::write(dir.path().join("my.nix.hbs"), template).unwrap();
    run(nk3()
        .args(["render", "--node", "172.30.190.3", "--inventory"])
        .arg(dir.path().join("inventory.yaml")))
}

#[test]
fn a_template_that_inserts_raw_text_is_refused_with_its_line() {
    let o = render_with_template("{ ... }:\n{\n  networking.hostName = {{{node.hostname}}};\n}\n");
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(
        err.contains("my.nix.hbs:3: this expression inserts a value unquoted"),
        "{err}"
    );
}

#[test]
fn a_template_naming_a_missing_value_fails_in_strict_mode() {
    let o = render_with_template("{ ... }:\n{\n  networking.hostName = {{node.hostnme}};\n}\n");
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(
        err.contains("my.nix.hbs") && err.contains("line 3") && err.contains("strict mode"),
        "{err}"
    );
    assert!(stdout(&o).is_empty());
}

#[test]
fn usage_errors_exit_2() {
    let o = run(nk3().args(["render", "--inventory", "examples/inventory.yaml", "--all"]));
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--out"), "{}", stderr(&o));
}

/// An IPv4 address on one of this machine's interfaces, other than loopback (which
/// validation refuses as a node: every machine has it).
fn local_address() -> std::net::IpAddr {
    nix::ifaddrs::getifaddrs()
        .unwrap()
        .filter_map(|i| i.address)
        .filter_map(|a| a.as_sockaddr_in().map(|v4| std::net::IpAddr::V4(v4.ip())))
        .find(|ip| !ip.is_loopback())
        .expect("this test needs a machine with an IPv4 address besides loopback")
}

/// An inventory with this machine in it (by one of its addresses) and another node
/// recognisable by its SMBIOS UUID; a fake routing table with a default route via eth9.
fn machine_fixture() -> (tempfile::TempDir, std::path::PathBuf, String) {
    let dir = tempfile::tempdir().unwrap();
    let inv = dir.path().join("inventory.yaml");
    let me = local_address().to_string();
    std::fs::write(
        &inv,
        format!("join_address: \"{me}\"\njoin_token: t\nnodes:\n  \"{me}\": {{ initiator: true, boot_device: /dev/sda, prefix_length: 8 }}\n  10.0.0.5: {{ interface: eth0, default_gateway: 10.0.0.1, boot_device: /dev/sda, uuid: 4c4c4544-0042-3510-8052-b4c04f4e4d32 }}\n"),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("route"),
        "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\neth9\t00000000\tFE00007F\t0003\t0\t0\t0\t00000000\t0\t0\t0\n",
    )
    .unwrap();
    (dir, inv, me)
}

#[test]
fn render_without_a_node_finds_this_machine_and_its_default_route() {
    let (dir, inv, me) = machine_fixture();
    let o = run(nk3()
        .args(["render", "--inventory"])
        .arg(&inv)
        .arg("--route-table")
        .arg(dir.path().join("route"))
        .arg("--product-uuid-file")
        .arg(dir.path().join("no-such-file")));
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains(&format!("this machine is node {me}")),
        "{}",
        stderr(&o)
    );
    assert!(
        stderr(&o).contains("recognised by its address"),
        "{}",
        stderr(&o)
    );
    let out = stdout(&o);
    assert!(
        out.contains("networking.interfaces.\"eth9\".ipv4.addresses"),
        "{out}"
    );
    assert!(
        out.contains(
            "networking.defaultGateway = { address = \"127.0.0.254\"; interface = \"eth9\"; };"
        ),
        "{out}"
    );
}

#[test]
fn render_recognises_a_machine_by_its_smbios_uuid_first() {
    let (dir, inv, _) = machine_fixture();
    let uuid = dir.path().join("product_uuid");
    std::fs::write(&uuid, "4C4C4544-0042-3510-8052-B4C04F4E4D32\n").unwrap();
    let o = run(nk3()
        .args(["render", "--inventory"])
        .arg(&inv)
        .arg("--product-uuid-file")
        .arg(&uuid));
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("this machine is node 10.0.0.5")
            && stderr(&o).contains("by its SMBIOS product UUID"),
        "{}",
        stderr(&o)
    );
    assert!(stdout(&o).contains("address = \"10.0.0.5\""));
}

#[test]
fn a_machine_not_in_the_inventory_is_told_so() {
    let o = run(nk3().args([
        "render",
        "--inventory",
        "examples/inventory.yaml",
        "--product-uuid-file",
        "/nonexistent",
    ]));
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(err.contains("this machine is not in the inventory: no node has its UUID (unknown), any of its addresses (") && err.contains("127.0.0.1"), "{err}");
    assert!(stdout(&o).is_empty());
}

#[test]
fn completions_and_the_manual_page_come_from_the_command_line_definition() {
    for shell in ["bash", "zsh", "fish"] {
        let o = run(nk3().args(["completions", shell]));
        assert!(o.status.success(), "{shell}: {}", stderr(&o));
        let text = stdout(&o);
        for word in ["status", "plan", "poll-interval", "allow-force-push"] {
            assert!(text.contains(word), "{shell} completion lacks {word}");
        }
    }
    let o = run(nk3().arg("man"));
    assert!(o.status.success());
    let page = stdout(&o);
    assert!(page.contains(".TH nk3-agent 1"), "{page}");
    for section in ["NK3-AGENT RUN", "NK3-AGENT STATUS", "NK3-AGENT PLAN"] {
        assert!(page.contains(section), "man page lacks {section}");
    }
    assert!(
        page.contains("NK3_POLL_INTERVAL"),
        "settings name their environment variables"
    );
    // Packaging commands stay out of --help.
    let help = stdout(&run(nk3().arg("--help")));
    assert!(
        !help.contains("completions") && !help.contains("\n  man"),
        "{help}"
    );
}
