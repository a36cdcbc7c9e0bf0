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
    let seed =
        std::fs::read_to_string(crate::support::root().join("examples/inventory.yaml")).unwrap();
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
    assert!(err.contains("no node `10.9.9.9` in examples/inventory.yaml; nodes are: 172.30.190.3, 172.30.190.4, 172.30.190.5"), "{err}");
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
    let seed =
        std::fs::read_to_string(crate::support::root().join("examples/inventory.yaml")).unwrap();
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
        err.contains("my.nix.hbs:3: `{{{n` inserts a value unquoted"),
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
    let o = run(nk3().args(["render", "--inventory", "examples/inventory.yaml"]));
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--node"), "{}", stderr(&o));
}
