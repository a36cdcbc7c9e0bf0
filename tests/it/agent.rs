//! `nk3-agent run`, `status` and `plan` on simulated nodes against real git repositories.

use crate::fixtures::{Daemon, Node, Repo};
use crate::support::{nk3, run, stderr, stdout};

/// The seed's inventory with `reboot: when-needed`, so that a change switches in place.
fn inventory(extra_node_key: &str) -> String {
    format!(
        "cluster:
  join_address: 172.30.190.3
  join_token: 2f909ce8-cae1-439a-86b3-da87b7ee9f55
  default_gateway: 172.30.190.1
  rollout:
    reboot: when-needed
  nodes:
    172.30.190.3:
      initiator: true
      interface: enp3s0f0
      boot_device: /dev/nvme0n1
    172.30.190.4:
      initiator: false
      interface: enp3s0f0
      boot_device: /dev/nvme0n1{extra_node_key}
"
    )
}

const HOST3: &str = "d6c27852-4d1c-5830-8e94-40b76fa2b5ec";
const TOKEN: &str = "2f909ce8-cae1-439a-86b3-da87b7ee9f55";

/// What `nk3-agent render` gives for node .3 at `commit` of `repo`.
fn rendered(node: &Node, inventory: &str, commit: &str) -> String {
    let file = node.root.join("expected-inventory.yaml");
    std::fs::write(&file, inventory).unwrap();
    let o = run(nk3()
        .args(["render", "--node", "172.30.190.3", "--inventory"])
        .arg(&file)
        .args([
            "--repository",
            &node.repo,
            "--commit",
            commit,
            "--state-dir",
        ])
        .arg(node.root.join("var/lib/nk3-agent")));
    assert!(o.status.success(), "{}", stderr(&o));
    stdout(&o)
}

#[test]
fn first_pass_clones_renders_builds_and_switches() {
    let inv = inventory("");
    let repo = Repo::with_inventory(&inv);
    let node = Node::new(&repo.url(), "172.30.190.3");
    let log = node.pass_ok();
    let head = repo.head();
    assert_eq!(node.config(), rendered(&node, &inv, &head));
    assert!(log.contains(&format!("{HOST3} modified:")), "{log}");
    assert!(
        log.contains(&format!("Rebuilding NixOS on {HOST3}")),
        "{log}"
    );
    assert!(log.contains(&format!("commit={}", &head[..12])), "{log}");
    assert!(
        !log.contains(TOKEN),
        "the token leaked into the log:\n{log}"
    );
    // The agent's argv, as the stand-in recorded it: build, then switch (when-needed, and the
    // kernel did not change... the installer's kernel differs, so it reboots).
    let calls = node.calls("nixos-rebuild");
    assert_eq!(
        calls[0],
        "build -I nixos-config=$ROOT/etc/nixos/configuration.nix"
    );
    // The previous file is kept.
    assert_eq!(
        std::fs::read_to_string(
            node.root
                .join("var/lib/nk3-agent/configuration.nix.previous")
        )
        .unwrap(),
        crate::fixtures::INSTALLER_CONFIG
    );
    // The token file k3s reads: the token, mode 0600.
    let token = node.root.join("var/lib/nk3-agent/join-token");
    assert_eq!(
        std::fs::read_to_string(&token).unwrap(),
        format!("{TOKEN}\n")
    );
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&token).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
}

/// Brings a fresh node to the repository's head (through the reboot the installer's kernel
/// forces) and clears the call logs.
fn converged(repo: &Repo) -> Node {
    let node = Node::new(&repo.url(), "172.30.190.3");
    node.pass_ok();
    node.pass_ok();
    let st = node.state();
    assert_eq!(st["phase"]["name"], "idle", "{st}");
    assert_eq!(st["applied"], repo.head().as_str(), "{st}");
    node.clear_calls();
    node
}

#[test]
fn a_new_kernel_reboots_and_the_next_start_finishes() {
    let repo = Repo::with_inventory(&inventory(""));
    let node = Node::new(&repo.url(), "172.30.190.3");
    let log = node.pass_ok();
    // The installer's kernel differs from the built one: boot + reboot, not switch.
    assert_eq!(
        node.calls("nixos-rebuild"),
        [
            "build -I nixos-config=$ROOT/etc/nixos/configuration.nix",
            "boot -I nixos-config=$ROOT/etc/nixos/configuration.nix"
        ]
    );
    assert_eq!(node.calls("systemctl"), ["reboot"]);
    assert!(
        log.contains(&format!(
            "Rebooting {HOST3} (kernel, initrd, kernel modules changed)"
        )),
        "{log}"
    );
    assert_eq!(node.state()["phase"]["name"], "rebooting");
    let log = node.pass_ok();
    assert!(log.contains(&format!("{HOST3} is up on commit")), "{log}");
    let st = node.state();
    assert_eq!(st["phase"]["name"], "idle");
    assert_eq!(st["applied"], repo.head().as_str());
    assert_eq!(
        st["applied_system"],
        node.current_system().display().to_string().as_str()
    );
}

#[test]
fn reboot_always_reboots_even_when_a_switch_would_do() {
    let repo = Repo::with_inventory(&inventory(""));
    let node = converged(&repo);
    let always = inventory("").replace("when-needed", "always").replace(
        "boot_device: /dev/nvme0n1\n    172.30.190.4",
        "boot_device: /dev/nvme0n1\n      vars: { x: 1 }\n    172.30.190.4",
    );
    repo.commit(
        "inventory.yaml",
        &always.replace(
            "join_address: 172.30.190.3",
            "join_address: 172.30.190.3\n  nameservers: [ 9.9.9.9 ]",
        ),
        "dns",
    );
    let log = node.pass_ok();
    assert!(log.contains("(reboot: always)"), "{log}");
    assert_eq!(node.calls("systemctl"), ["reboot"]);
}

#[test]
fn an_unchanged_commit_needs_no_action() {
    let repo = Repo::with_inventory(&inventory(""));
    let node = converged(&repo);
    let log = node.pass_ok();
    assert!(
        log.contains(&format!("No action needed on {HOST3}")),
        "{log}"
    );
    assert!(node.calls("nixos-rebuild").is_empty());
}

#[test]
fn a_new_commit_is_applied_by_switching() {
    let repo = Repo::with_inventory(&inventory(""));
    let node = converged(&repo);
    let before = node.current_system();
    let changed = inventory("").replace(
        "default_gateway: 172.30.190.1",
        "default_gateway: 172.30.190.1\n  nameservers: [ 9.9.9.9 ]",
    );
    let head = repo.commit("inventory.yaml", &changed, "use another resolver");
    let log = node.pass_ok();
    assert!(
        log.contains("+  networking.nameservers = [ \"9.9.9.9\" ];"),
        "{log}"
    );
    assert_eq!(
        node.calls("nixos-rebuild"),
        [
            "build -I nixos-config=$ROOT/etc/nixos/configuration.nix",
            "switch -I nixos-config=$ROOT/etc/nixos/configuration.nix"
        ]
    );
    assert!(
        node.calls("systemctl").is_empty(),
        "no reboot for a DNS change"
    );
    assert_ne!(node.current_system(), before);
    assert_eq!(node.config(), rendered(&node, &changed, &head));
    assert_eq!(node.state()["applied"], head.as_str());
}

#[test]
fn a_change_to_another_node_needs_no_action_here() {
    let repo = Repo::with_inventory(&inventory(""));
    let node = converged(&repo);
    let before = node.config();
    let other = inventory("\n      k3s_extra_flags: [ --node-label=disk=ssd ]");
    let head = repo.commit("inventory.yaml", &other, "label .4");
    let log = node.pass_ok();
    assert!(
        log.contains(&format!("No action needed on {HOST3}")),
        "{log}"
    );
    assert!(node.calls("nixos-rebuild").is_empty());
    assert_eq!(node.config(), before, "the file is left alone");
    assert_eq!(node.state()["applied"], head.as_str());
}

#[test]
fn a_rewritten_branch_is_refused_unless_allowed() {
    let repo = Repo::with_inventory(&inventory(""));
    let mut node = converged(&repo);
    repo.commit(
        "inventory.yaml",
        &inventory("").replace("enp3s0f0", "eno1"),
        "second",
    );
    node.pass_ok();
    let applied = repo.head();
    let rewritten = repo.force_push(&inventory("").replace("enp3s0f0", "eno2"));
    let o = node.run_once();
    let log = stderr(&o);
    assert!(
        !o.status.success(),
        "run --once exits 1 after a refused head"
    );
    assert!(
        !run(&mut node.agent(&["status"])).status.success(),
        "and so does status"
    );
    assert!(log.contains("was rewritten"), "{log}");
    assert!(log.contains("--allow-force-push"), "{log}");
    assert!(node.calls("nixos-rebuild").iter().all(|c| !c.is_empty()));
    assert_eq!(node.state()["applied"], applied.as_str());
    assert!(!node.config().contains("eno2"));
    // Reported once, not on every poll.
    let again = stderr(&node.run_once());
    assert!(!again.contains("was rewritten"), "{again}");
    node.env
        .push(("NK3_ALLOW_FORCE_PUSH".into(), "true".into()));
    node.pass_ok();
    assert!(node.config().contains("\"eno2\""));
    assert_eq!(node.state()["applied"], rewritten.as_str());
}

#[test]
fn an_unreachable_remote_keeps_the_node_as_it_is_and_is_reported_once() {
    let repo = Repo::with_inventory(&inventory(""));
    let mut daemon = Daemon::serve(&repo);
    let node = Node::new(&daemon.url(), "172.30.190.3");
    node.pass_ok();
    node.pass_ok();
    let applied = node.state()["applied"].clone();
    daemon.stop();
    let config = node.config();
    let log = node.pass_ok();
    assert!(log.contains("cannot reach git://127.0.0.1"), "{log}");
    assert_eq!(node.config(), config);
    assert_eq!(node.state()["applied"], applied);
    let status = run(&mut node.agent(&["status"]));
    assert!(
        stdout(&status).contains("cannot reach"),
        "{}",
        stdout(&status)
    );
    let log = node.pass_ok();
    assert!(!log.contains("cannot reach"), "reported again:\n{log}");
    daemon.start();
    let head = repo.commit(
        "inventory.yaml",
        &inventory("").replace("enp3s0f0", "eno1"),
        "while it was down",
    );
    let log = node.pass_ok();
    assert!(log.contains("answers again"), "{log}");
    assert_eq!(node.state()["applied"], head.as_str());
}

#[test]
fn a_broken_clone_is_cloned_again() {
    let repo = Repo::with_inventory(&inventory(""));
    let node = converged(&repo);
    let objects = node.root.join("var/lib/nk3-agent/repo/objects");
    std::fs::remove_dir_all(&objects).unwrap();
    std::fs::create_dir_all(&objects).unwrap();
    let head = repo.commit(
        "inventory.yaml",
        &inventory("").replace("enp3s0f0", "eno1"),
        "after the damage",
    );
    let log = node.pass_ok();
    assert!(log.contains("was broken"), "{log}");
    assert_eq!(node.state()["applied"], head.as_str());
}

#[test]
fn a_bad_inventory_is_not_applied_and_status_says_why() {
    let repo = Repo::with_inventory(&inventory(""));
    let node = converged(&repo);
    let config = node.config();
    let bad = inventory("").replace("initiator: false", "initiator: true");
    let bad_commit = repo.commit("inventory.yaml", &bad, "two initiators");
    let o = node.run_once();
    assert!(!o.status.success());
    let log = stderr(&o);
    assert!(
        log.contains(&format!("inventory.yaml@{}:", &bad_commit[..12])),
        "{log}"
    );
    assert!(log.contains("initiator"), "{log}");
    assert!(node.calls("nixos-rebuild").is_empty());
    assert_eq!(node.config(), config);
    let status = run(&mut node.agent(&["status", "--json"]));
    assert!(
        !status.status.success(),
        "status exits 1 after a refused commit"
    );
    let v: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(v["state"]["last"]["outcome"], "refused");
    assert!(v["state"]["last"]["message"]
        .as_str()
        .unwrap()
        .contains("problem"));
}

#[test]
fn a_build_that_hangs_is_stopped_undone_and_tried_again_not_rejected() {
    let repo = Repo::with_inventory(&inventory(""));
    let mut node = converged(&repo);
    let before = std::fs::read(node.config_path()).unwrap();
    repo.commit(
        "slow.nix.hbs",
        &crate::support::marked_template("slow-build"),
        "template",
    );
    let slow = repo.commit(
        "inventory.yaml",
        &inventory("").replace("  rollout:", "  template: slow.nix.hbs\n  rollout:"),
        "a build that takes a minute",
    );
    node.env.push(("NK3_BUILD_TIMEOUT".into(), "1s".into()));
    let o = node.run_once();
    let log = stderr(&o);
    assert!(!o.status.success(), "{log}");
    assert!(log.contains("did not finish within 1s; stopped"), "{log}");
    assert_eq!(
        std::fs::read(node.config_path()).unwrap(),
        before,
        "restored"
    );
    assert!(
        node.state()["rejected"].is_null(),
        "not rejected: {}",
        node.state()
    );
    assert_eq!(node.state()["phase"]["name"], "idle");
    assert_eq!(node.state()["last"]["commit"], slow.as_str());
    // Unlike a commit Nix refused, the next pass builds it again.
    node.clear_calls();
    assert!(!node.run_once().status.success());
    let builds = node.calls("nixos-rebuild");
    assert_eq!(
        builds.iter().filter(|c| c.starts_with("build")).count(),
        1,
        "{builds:?}"
    );
}

#[test]
fn a_config_nix_rejects_is_undone_and_a_later_commit_applies() {
    let repo = Repo::with_inventory(&inventory(""));
    let node = converged(&repo);
    let before = std::fs::read(node.config_path()).unwrap();
    let system = node.current_system();
    // A custom template with a Nix syntax error: real Nix (nix-instantiate --parse in the
    // stand-in) refuses it.
    repo.commit(
        "broken.nix.hbs",
        "{ config, ... }: {\n  networking.hostName = {{node.hostname}}\n",
        "template",
    );
    let with_template =
        inventory("").replace("  rollout:", "  template: broken.nix.hbs\n  rollout:");
    let bad = repo.commit("inventory.yaml", &with_template, "use the template");
    let o = node.run_once();
    assert!(!o.status.success());
    let log = stderr(&o);
    assert!(log.contains("rejected"), "{log}");
    assert!(log.contains("Changes reverted"), "{log}");
    assert_eq!(
        std::fs::read(node.config_path()).unwrap(),
        before,
        "restored byte for byte"
    );
    assert_eq!(node.current_system(), system);
    let st = node.state();
    assert_eq!(st["rejected"]["commit"], bad.as_str());
    assert!(
        st["rejected"]["error"].as_str().unwrap().contains("error"),
        "{st}"
    );
    // Not built again on the next poll.
    node.clear_calls();
    assert!(!node.run_once().status.success());
    assert!(node.calls("nixos-rebuild").is_empty());
    // A fix applies.
    repo.commit("broken.nix.hbs", "{ config, ... }: {\n  imports = [ ./nk3.nix ];\n  networking.hostName = {{node.hostname}};\n}\n", "fix the template");
    let good = repo.head();
    node.pass_ok();
    assert_eq!(node.state()["applied"], good.as_str());
    assert!(node.config().contains("networking.hostName = \"d6c27852"));
}

#[test]
fn a_system_without_the_agent_is_refused() {
    let repo = Repo::with_inventory(&inventory(""));
    let node = converged(&repo);
    let before = node.config();
    repo.commit(
        "lonely.nix.hbs",
        "# nk3-test: no-agent\n{ ... }: { networking.hostName = {{node.hostname}}; }\n",
        "template",
    );
    repo.commit(
        "inventory.yaml",
        &inventory("").replace("  rollout:", "  template: lonely.nix.hbs\n  rollout:"),
        "drop the agent",
    );
    let log = stderr(&node.run_once());
    assert!(log.contains("no nk3-agent.service"), "{log}");
    assert_eq!(node.config(), before);
    assert!(node
        .calls("nixos-rebuild")
        .iter()
        .all(|c| c.starts_with("build")));
}

#[test]
fn a_hand_edit_is_repaired() {
    let repo = Repo::with_inventory(&inventory(""));
    let node = converged(&repo);
    let good = node.config();
    let system = node.current_system();
    std::fs::write(
        node.config_path(),
        good.replace(
            "networking.useDHCP = false;",
            "networking.useDHCP = false;\n  services.k3s.token = \"hand-typed-secret\";",
        ),
    )
    .unwrap();
    let log = node.pass_ok();
    assert!(log.contains("changed by hand"), "{log}");
    assert!(
        log.contains("-  services.k3s.token = \"<redacted>\";"),
        "{log}"
    );
    assert!(!log.contains("hand-typed-secret"), "{log}");
    assert_eq!(node.config(), good);
    assert_eq!(node.current_system(), system, "same file, same system");
}

#[test]
fn a_second_agent_refuses_to_start() {
    let repo = Repo::with_inventory(&inventory(""));
    let node = Node::new(&repo.url(), "172.30.190.3");
    let first = crate::fixtures::Running(
        node.agent(&["run"])
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let lock = node.root.join("var/lib/nk3-agent/lock");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::fs::read_to_string(&lock).unwrap_or_default().trim() != first.0.id().to_string() {
        assert!(
            std::time::Instant::now() < deadline,
            "the first agent never took the lock"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let o = node.run_once();
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains(&format!("another nk3-agent (pid {})", first.0.id())),
        "{}",
        stderr(&o)
    );
    let status = stdout(&run(&mut node.agent(&["status"])));
    assert!(status.contains("agent        running"), "{status}");
}

#[test]
fn status_and_plan_tell_an_operator_what_is_going_on() {
    let repo = Repo::with_inventory(&inventory(""));
    let node = converged(&repo);
    let status = run(&mut node.agent(&["status"]));
    let text = stdout(&status);
    assert!(status.status.success(), "{text}");
    assert!(
        text.contains(&format!("node         172.30.190.3 ({HOST3})")),
        "{text}"
    );
    assert!(
        text.contains(&format!("applied      {}", repo.head())),
        "{text}"
    );
    assert!(text.contains("phase        idle"), "{text}");
    assert!(text.contains("agent        not running"), "{text}");
    let json: serde_json::Value =
        serde_json::from_slice(&run(&mut node.agent(&["status", "--json"])).stdout).unwrap();
    assert_eq!(json["state"]["host"], HOST3);
    assert!(json["host"]["memory_total_bytes"].as_u64().unwrap() > 0);

    let plan = run(&mut node.agent(&["plan"]));
    assert_eq!(plan.status.code(), Some(0), "{}", stdout(&plan));
    assert!(stdout(&plan).contains(&format!("No action needed on {HOST3}")));
    let changed = inventory("").replace("enp3s0f0", "eno1");
    repo.commit("inventory.yaml", &changed, "rename the interface");
    let plan = run(&mut node.agent(&["plan"]));
    let text = stdout(&plan);
    assert_eq!(plan.status.code(), Some(2), "{text}");
    assert!(text.contains(&format!("{HOST3} modified:")), "{text}");
    assert!(
        text.contains("-  networking.interfaces.\"enp3s0f0\""),
        "{text}"
    );
    assert!(text.contains("+  networking.interfaces.\"eno1\""), "{text}");
    assert!(!text.contains(TOKEN));
    assert!(
        node.calls("nixos-rebuild").is_empty(),
        "plan changes nothing"
    );
    assert_eq!(node.state()["applied"], json["state"]["applied"]);
}

/// Fields of the journal's native protocol in one datagram: `KEY=value` lines, or `KEY`, a
/// little-endian length and the value, for values with line breaks.
fn journal_fields(mut d: &[u8]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    while !d.is_empty() {
        let line_end = d.iter().position(|b| *b == b'\n').unwrap_or(d.len());
        let line = &d[..line_end];
        if let Some(eq) = line.iter().position(|b| *b == b'=') {
            out.push((
                String::from_utf8_lossy(&line[..eq]).into_owned(),
                String::from_utf8_lossy(&line[eq + 1..]).into_owned(),
            ));
            d = &d[(line_end + 1).min(d.len())..];
        } else {
            let key = String::from_utf8_lossy(line).into_owned();
            let rest = &d[line_end + 1..];
            let len = u64::from_le_bytes(rest[..8].try_into().unwrap()) as usize;
            out.push((key, String::from_utf8_lossy(&rest[8..8 + len]).into_owned()));
            d = &rest[(8 + len + 1).min(rest.len())..];
        }
    }
    out
}

#[test]
fn under_journald_entries_carry_the_node_and_the_commit_as_fields_of_their_own() {
    let repo = Repo::with_inventory(&inventory(""));
    let node = converged(&repo);
    // journald's socket, in a mount namespace of the agent's own (/run there is a tmpfs with
    // this directory as /run/systemd/journal): nothing of the machine's is touched.
    let dir = tempfile::tempdir().unwrap();
    let sock = std::os::unix::net::UnixDatagram::bind(dir.path().join("socket")).unwrap();
    sock.set_read_timeout(Some(std::time::Duration::from_millis(200)))
        .unwrap();
    let agent = node.agent(&["run", "--once"]);
    let mut c = std::process::Command::new("unshare");
    c.args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(
            "mount -t tmpfs tmpfs /run && mkdir -p /run/systemd/journal \
             && mount --bind \"$0\" /run/systemd/journal && exec \"$@\"",
        )
        .arg(dir.path())
        .arg(agent.get_program())
        .args(agent.get_args())
        .env("JOURNAL_STREAM", "8:12345");
    if let Some(d) = agent.get_current_dir() {
        c.current_dir(d);
    }
    for (k, v) in agent.get_envs() {
        match v {
            Some(v) => c.env(k, v),
            None => c.env_remove(k),
        };
    }
    let mut child = c.spawn().expect("unshare (util-linux) runs");
    let mut entries = Vec::new();
    let mut buf = vec![0u8; 1 << 20];
    let status = loop {
        if let Ok(n) = sock.recv(&mut buf) {
            if n > 0 {
                entries.push(journal_fields(&buf[..n]));
            }
        }
        if let Some(status) = child.try_wait().unwrap() {
            while let Ok(n) = sock.recv(&mut buf) {
                entries.push(journal_fields(&buf[..n]));
            }
            break status;
        }
    };
    assert!(status.success(), "{status} ({} entries)", entries.len());
    let entry = entries
        .iter()
        .find(|e| {
            e.iter()
                .any(|(k, v)| k == "MESSAGE" && v.starts_with("No action needed on "))
        })
        .unwrap_or_else(|| panic!("no entry said No action needed: {entries:?}"));
    let field = |key: &str| {
        entry
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    };
    assert_eq!(field("NK3_HOST"), Some(HOST3), "{entry:?}");
    assert_eq!(field("NK3_COMMIT"), Some(&repo.head()[..12]), "{entry:?}");
    assert_eq!(field("NK3_PHASE"), Some("idle"), "{entry:?}");
    assert_eq!(
        field("PRIORITY"),
        Some("5"),
        "info is journald's notice: {entry:?}"
    );
    assert_eq!(field("SYSLOG_IDENTIFIER"), Some("nk3-agent"), "{entry:?}");
}

#[test]
fn under_systemd_lines_carry_priority_host_and_commit_and_no_timestamp() {
    let repo = Repo::with_inventory(&inventory(""));
    let node = converged(&repo);
    let o = node
        .agent(&["run", "--once"])
        .env("JOURNAL_STREAM", "8:12345")
        .output()
        .unwrap();
    let log = stderr(&o);
    let line = log
        .lines()
        .find(|l| l.contains("No action needed"))
        .unwrap_or_else(|| panic!("{log}"));
    assert!(line.starts_with("<6>No action needed on "), "{line}");
    assert!(line.contains(&format!("host={HOST3}")), "{line}");
    assert!(
        line.contains(&format!("commit={}", &repo.head()[..12])),
        "{line}"
    );
    assert!(!line.contains('\u{1b}'), "no colours: {line:?}");
}

#[test]
fn a_changed_channel_upgrades_through_the_same_pipeline() {
    let repo = Repo::with_inventory(&inventory(""));
    let node = converged(&repo);
    let with_channel = inventory("").replace(
        "default_gateway: 172.30.190.1",
        "default_gateway: 172.30.190.1\n  nix_channel: nixos-24.05",
    );
    repo.commit("inventory.yaml", &with_channel, "follow 24.05");
    node.pass_ok();
    assert_eq!(
        node.calls("nix-channel"),
        ["--add https://nixos.org/channels/nixos-24.05 nixos"]
    );
    assert_eq!(
        node.calls("nixos-rebuild")[0],
        "build --upgrade -I nixos-config=$ROOT/etc/nixos/configuration.nix"
    );
    assert_eq!(node.state()["channel"], "nixos-24.05");
    node.clear_calls();
    node.pass_ok();
    assert!(
        node.calls("nixos-rebuild").is_empty(),
        "no upgrade until the channel changes"
    );
    // upgrade_every: a due upgrade rebuilds even though nothing else changed.
    let every = with_channel.replace(
        "    reboot: when-needed",
        "    reboot: when-needed\n    upgrade_every: 1s",
    );
    repo.commit("inventory.yaml", &every, "upgrade daily");
    std::thread::sleep(std::time::Duration::from_millis(1100));
    node.pass_ok();
    assert_eq!(
        node.calls("nixos-rebuild")[0],
        "build --upgrade -I nixos-config=$ROOT/etc/nixos/configuration.nix"
    );
}

/// What a node ended in, with its own root taken out of paths, to compare two nodes.
fn end_state(node: &Node) -> (String, String, serde_json::Value, serde_json::Value) {
    let root = node.root.display().to_string();
    let st = node.state();
    (
        node.config().replace(&root, ""),
        node.current_system()
            .display()
            .to_string()
            .replace(&root, ""),
        st["applied"].clone(),
        st["phase"].clone(),
    )
}

/// Kills the agent (SIGKILL, from the stand-in it is running) at `point`, restarts it until it
/// settles, and checks the node ends exactly as a node that was never interrupted.
fn killed_at(point: &str, change: &dyn Fn(&str) -> String, reboots: usize) {
    let repo = Repo::with_inventory(&inventory(""));
    let calm = converged(&repo);
    let mut victim = converged(&repo);
    let head = repo.commit("inventory.yaml", &change(&inventory("")), "change");
    calm.pass_ok();
    calm.pass_ok();
    assert_eq!(calm.state()["applied"], head.as_str());
    assert_eq!(
        calm.calls("systemctl").len(),
        reboots,
        "{point}: the calm node's reboots"
    );

    victim.env.push(("NK3_FAKE_KILL".into(), point.into()));
    let o = victim.run_once();
    use std::os::unix::process::ExitStatusExt as _;
    assert_eq!(
        o.status.signal(),
        Some(9),
        "{point}: the agent was not killed: {}",
        stderr(&o)
    );
    victim.env.clear();
    for _ in 0..3 {
        victim.pass_ok();
    }
    assert_eq!(end_state(&victim), end_state(&calm), "{point}");
    let really_rebooted = victim
        .calls("systemctl")
        .iter()
        .filter(|c| *c == "reboot")
        .count()
        - usize::from(point == "reboot-start");
    assert_eq!(really_rebooted, reboots, "{point}: reboots");
}

fn new_resolver(inv: &str) -> String {
    inv.replace(
        "default_gateway: 172.30.190.1",
        "default_gateway: 172.30.190.1\n  nameservers: [ 9.9.9.9 ]",
    )
}

fn new_kernel_params(inv: &str) -> String {
    new_resolver(inv).replace("when-needed", "always")
}

#[test]
fn killed_at_any_step_of_a_switch_it_ends_as_if_never_interrupted() {
    for point in ["build-start", "build-end", "switch-start", "switch-end"] {
        killed_at(point, &new_resolver, 0);
    }
}

#[test]
fn killed_at_any_step_of_a_reboot_it_ends_as_if_never_interrupted() {
    for point in [
        "build-start",
        "build-end",
        "boot-start",
        "boot-end",
        "reboot-start",
    ] {
        killed_at(point, &new_kernel_params, 1);
    }
}

#[test]
fn a_machine_that_is_no_node_says_so_and_changes_nothing() {
    let repo = Repo::with_inventory(&inventory(""));
    // No --node: the agent looks for this machine's UUID, addresses and hostname, and this
    // test machine has none of the inventory's.
    let node = Node::new(&repo.url(), "");
    let before = node.config();
    let o = node.run_once();
    assert!(!o.status.success());
    let log = stderr(&o);
    assert!(
        log.contains("this machine is not in the inventory"),
        "{log}"
    );
    assert!(
        log.contains("idle until the inventory names this machine"),
        "{log}"
    );
    assert_eq!(node.config(), before);
    assert!(node.calls("nixos-rebuild").is_empty());
    let status = stdout(&run(&mut node.agent(&["status"])));
    assert!(status.contains("not a node"), "{status}");
}

#[test]
fn a_node_without_interface_or_gateway_takes_them_from_its_default_route() {
    let inv = "join_address: 172.30.190.3
join_token: 2f909ce8-cae1-439a-86b3-da87b7ee9f55
rollout: { reboot: when-needed }
nodes:
  172.30.190.3: { initiator: true, boot_device: /dev/nvme0n1 }
";
    let repo = Repo::with_inventory(inv);
    let node = Node::new(&repo.url(), "172.30.190.3");
    // Without a default route it cannot render, says what is missing, and changes nothing.
    let o = node.run_once();
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("no `interface` in the inventory and none detected"),
        "{}",
        stderr(&o)
    );
    assert!(node.config().contains("written by the installer"));
    // The kernel's table: default route via 172.30.190.1 on eno1.
    std::fs::write(
        node.root.join("route"),
        "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
         eno1\t00000000\t01BE1EAC\t0003\t0\t0\t100\t00000000\t0\t0\t0\n",
    )
    .unwrap();
    node.pass_ok();
    let config = node.config();
    assert!(
        config.contains("networking.interfaces.\"eno1\".ipv4.addresses"),
        "{config}"
    );
    assert!(
        config.contains(
            "networking.defaultGateway = { address = \"172.30.190.1\"; interface = \"eno1\"; };"
        ),
        "{config}"
    );
}

#[test]
fn the_daemon_picks_up_new_commits_and_stops_cleanly_on_sigterm() {
    let repo = Repo::with_inventory(&inventory(""));
    let node = converged(&repo);
    let daemon = node
        .agent(&["run"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let head = repo.commit(
        "inventory.yaml",
        &inventory("").replace("enp3s0f0", "eno1"),
        "pushed while the daemon runs",
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while node.state()["applied"] != head.as_str() {
        assert!(
            std::time::Instant::now() < deadline,
            "the daemon never applied {head}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(node.state()["next_poll"].is_string());
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &daemon.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let out = daemon.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let log = stderr(&out);
    assert!(log.contains("stopping on SIGTERM"), "{log}");
    assert_eq!(
        log.matches(&format!("{HOST3} modified:")).count(),
        1,
        "{log}"
    );
}

#[test]
fn a_reboot_that_comes_back_on_the_old_system_rejects_the_commit_without_a_reboot_loop() {
    let repo = Repo::with_inventory(&inventory(""));
    let mut node = converged(&repo);
    let before = std::fs::read(node.config_path()).unwrap();
    let running = node.current_system();
    let bad = repo.commit(
        "inventory.yaml",
        &new_kernel_params(&inventory("")),
        "needs a reboot",
    );
    node.env.push(("NK3_FAKE_BOOT_OLD".into(), "1".into()));
    node.pass_ok();
    assert_eq!(node.calls("systemctl"), ["reboot"]);
    let o = node.run_once();
    assert!(!o.status.success());
    assert!(stderr(&o).contains("rebooted but runs"), "{}", stderr(&o));
    assert_eq!(
        std::fs::read(node.config_path()).unwrap(),
        before,
        "the file matches what runs again"
    );
    assert_eq!(node.current_system(), running);
    assert_eq!(node.state()["rejected"]["commit"], bad.as_str());
    node.run_once();
    node.run_once();
    assert_eq!(node.calls("systemctl"), ["reboot"], "no reboot loop");
    node.env.clear();
    let fixed = repo.commit(
        "inventory.yaml",
        &new_resolver(&inventory("")),
        "a change that switches",
    );
    node.pass_ok();
    assert_eq!(node.state()["applied"], fixed.as_str());
}

#[test]
fn a_server_that_accepts_and_then_hangs_does_not_stall_the_agent() {
    // A listener that accepts connections and never says a word.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let mut hung = Node::new(&format!("git://127.0.0.1:{port}/infra.git"), "172.30.190.3");
    hung.env.push(("NK3_GIT_TIMEOUT".into(), "1s".into()));
    let started = std::time::Instant::now();
    let o = hung.run_once();
    assert!(!o.status.success());
    assert!(stderr(&o).contains("cannot"), "{}", stderr(&o));
    // Generous: the point is that it ends at all, not how fast.
    assert!(started.elapsed() < std::time::Duration::from_secs(30));
    drop(silent);
}

#[test]
fn under_systemd_the_daemon_says_ready_feeds_the_watchdog_and_serves_metrics() {
    use std::io::{Read as _, Write as _};
    let repo = Repo::with_inventory(&inventory(""));
    let node = converged(&repo);
    let head = repo.head();
    let sock_path = node.root.join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .unwrap();
    let port = nk3_controlplane::unused_port();
    let addr = format!("127.0.0.1:{port}");
    // systemd names the process the watchdog is for (WATCHDOG_PID); exec keeps the shell's.
    let agent = node.agent(&[]);
    let _daemon = crate::fixtures::Running(
        std::process::Command::new("sh")
            .arg("-c")
            .arg("WATCHDOG_PID=$$ exec \"$0\" run --metrics-address \"$1\"")
            .arg(agent.get_program())
            .arg(&addr)
            .envs(agent.get_envs().filter_map(|(k, v)| Some((k, v?))))
            .env("NOTIFY_SOCKET", &sock_path)
            .env("WATCHDOG_USEC", "200000")
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut seen = Vec::new();
    let mut buf = [0u8; 1024];
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !(seen.iter().any(|m: &String| m.contains("READY=1"))
        && seen.iter().any(|m| m.contains("WATCHDOG=1"))
        && seen.iter().any(|m| m.contains("STATUS=idle, applied ")))
    {
        assert!(std::time::Instant::now() < deadline, "{seen:?}");
        let n = sock.recv(&mut buf).expect("a message from the agent");
        seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    assert!(
        seen.iter().any(|m| m.contains(&format!(
            "STATUS=idle, applied {}; last pass: No action needed on {HOST3}",
            &head[..12]
        ))),
        "{seen:?}"
    );
    let mut conn = std::net::TcpStream::connect(&addr).unwrap();
    conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    conn.read_to_string(&mut text).unwrap();
    assert!(text.starts_with("HTTP/1.1 200 OK"), "{text}");
    assert!(
        text.contains(&format!("nk3_applied_commit_info{{commit=\"{head}\"}} 1")),
        "{text}"
    );
    assert!(text.contains("nk3_phase{phase=\"idle\"} 1"), "{text}");
    assert!(text.contains("nk3_repository_reachable 1"), "{text}");
}

#[test]
fn run_check_prints_the_settings_a_service_would_run_with() {
    let o = run(nk3()
        .args([
            "run",
            "--check",
            "--repo",
            "https://ci:hunter2@git.example.com/infra.git",
        ])
        .args([
            "--poll-interval",
            "5m",
            "--state-dir",
            "/var/lib/nk3",
            "--allow-force-push",
        ]));
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        v["repo"], "https://git.example.com/infra.git",
        "no credentials printed"
    );
    assert_eq!(v["poll_interval"], "5m");
    assert_eq!(v["state_dir"], "/var/lib/nk3");
    assert_eq!(v["allow_force_push"], true);
    assert_eq!(v["branch"], "main");
    let bad = run(nk3().args(["run", "--check", "--repo", "x", "--poll-intervall", "5m"]));
    assert_eq!(bad.status.code(), Some(2));
    assert!(stderr(&bad).contains("--poll-interval"), "{}", stderr(&bad));
}

#[test]
fn the_installers_state_version_is_kept_when_the_inventory_sets_none() {
    let inv = inventory("");
    let repo = Repo::with_inventory(&inv);
    let node = Node::new(&repo.url(), "172.30.190.3");
    node.pass_ok();
    assert!(
        node.config().contains("system.stateVersion = \"23.11\";"),
        "{}",
        node.config()
    );
    assert_eq!(node.state()["state_version"], "23.11", "remembered");
    // Remembered, not re-read: a later commit keeps it even if the file on disk lost it.
    std::fs::write(node.config_path(), "{ ... }: { }\n").unwrap();
    node.pass_ok();
    assert!(node.config().contains("system.stateVersion = \"23.11\";"));
    // The inventory's own wins.
    let head = repo.commit(
        "inventory.yaml",
        &inv.replace(
            "  default_gateway: 172.30.190.1\n",
            "  default_gateway: 172.30.190.1\n  state_version: \"24.05\"\n",
        ),
        "state_version",
    );
    node.pass_ok();
    assert_eq!(node.state()["applied"], head.as_str());
    assert!(node.config().contains("system.stateVersion = \"24.05\";"));
}

#[test]
fn a_machine_without_a_state_version_keeps_its_configuration_and_is_told_why() {
    let repo = Repo::with_inventory(&inventory(""));
    let node = Node::new(&repo.url(), "172.30.190.3");
    let hand = "{ ... }: { imports = [ ./hardware-configuration.nix ./nk3.nix ]; }\n";
    std::fs::write(node.config_path(), hand).unwrap();
    let o = node.run_once();
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains(
            "no `state_version` in the inventory and none in the configuration.nix being replaced"
        ),
        "{}",
        stderr(&o)
    );
    assert_eq!(node.config(), hand, "nothing replaced");
    assert!(node.calls("nixos-rebuild").is_empty(), "nothing built");
}

#[test]
fn a_fresh_join_address_without_an_initiator_is_refused_not_left_waiting_for_itself() {
    let inv = inventory("").replace("      initiator: true\n", "      initiator: false\n");
    let repo = Repo::with_inventory(&inv);
    let node = Node::new(&repo.url(), "172.30.190.3");
    let o = node.run_once();
    assert!(!o.status.success());
    let log = stderr(&o);
    assert!(
        log.contains(
            "no node is `initiator: true`, and k3s has not joined a cluster on 172.30.190.3 yet"
        ),
        "{log}"
    );
    assert!(node.calls("nixos-rebuild").is_empty());
    // Another fresh machine joins the (adopted, running) cluster at the join address.
    let joiner = Node::new(&repo.url(), "172.30.190.4");
    joiner.pass_ok();
    // And validate says what an inventory without an initiator is for.
    let file = node.root.join("inventory.yaml");
    std::fs::write(&file, &inv).unwrap();
    let out = stdout(&run(nk3().arg("validate").arg(&file)));
    assert!(out.contains("note: no node is `initiator: true`"), "{out}");
}

#[test]
fn a_pass_stalled_where_no_timeout_reaches_stops_feeding_the_watchdog() {
    // A git server that takes the connection and then says nothing, with git's own read
    // timeout ten minutes away: only the watchdog can end this.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for c in listener.incoming() {
            held.push(c);
        }
    });
    let mut node = Node::new(&format!("git://127.0.0.1:{port}/infra.git"), "172.30.190.3");
    node.env.push(("NK3_GIT_TIMEOUT".into(), "10m".into()));
    let sock_path = node.root.join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(std::time::Duration::from_millis(200)))
        .unwrap();
    let agent = node.agent(&[]);
    let mut daemon = std::process::Command::new("sh")
        .arg("-c")
        .arg("WATCHDOG_PID=$$ exec \"$0\" run")
        .arg(agent.get_program())
        .envs(agent.get_envs().filter_map(|(k, v)| Some((k, v?))))
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "1000000")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    let mut late = Vec::new();
    let mut ready = false;
    let mut buf = [0u8; 1024];
    while start.elapsed() < std::time::Duration::from_secs(6) {
        if let Ok(n) = sock.recv(&mut buf) {
            let m = String::from_utf8_lossy(&buf[..n]).into_owned();
            ready |= m.contains("READY=1");
            if m.contains("WATCHDOG=1") && start.elapsed() > std::time::Duration::from_secs(3) {
                late.push(m);
            }
        }
    }
    let _ = daemon.kill();
    let _ = daemon.wait();
    let mut log = String::new();
    std::io::Read::read_to_string(&mut daemon.stderr.take().unwrap(), &mut log).unwrap();
    assert!(ready, "{log}");
    assert!(
        late.is_empty(),
        "still feeding the watchdog: {late:?}\n{log}"
    );
    assert!(log.contains("the pass has made no progress for"), "{log}");
}
