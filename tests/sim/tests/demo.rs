//! The demo end to end: nk3-sim with the real agent binary (built by the same test run).

use std::process::Command;

fn sim(args: &[&str]) -> (bool, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_nk3-sim"))
        .args(["--reboot-time", "500ms", "--real-api"])
        .args(args)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    (o.status.success(), text)
}

fn rows(text: &str) -> Vec<&str> {
    text.lines().filter(|l| l.starts_with("node-")).collect()
}

#[test]
fn a_rolling_update_reaches_every_node_one_at_a_time() {
    let (ok, text) = sim(&[]);
    assert!(ok, "{text}");
    let rows = rows(&text);
    assert_eq!(rows.len(), 3, "{text}");
    assert!(rows.iter().all(|r| r.ends_with("applied")), "{text}");
    assert!(
        text.contains("at most 1 node(s) cordoned at once"),
        "{text}"
    );
    assert_eq!(text.matches("k8s is ready on").count(), 3, "{text}");
}

#[test]
fn servers_and_agents_roll_one_node_at_a_time_the_agents_with_their_own_credentials() {
    let (ok, text) = sim(&["--nodes", "5", "--agents", "2"]);
    assert!(ok, "{text}");
    let rows = rows(&text);
    assert_eq!(rows.len(), 5, "{text}");
    assert!(rows.iter().all(|r| r.ends_with("applied")), "{text}");
    assert!(
        text.contains("5 reboot(s), 0 of them without the rebooting node holding a rollout lease"),
        "{text}"
    );
    assert!(
        text.contains("agent-role nodes: 2 of 2 drained and verified with their own credentials; 0 request(s) of theirs refused"),
        "{text}"
    );
    assert!(
        text.contains("at most 1 node(s) cordoned at once"),
        "{text}"
    );
}

#[test]
fn a_broken_generation_is_rolled_back_and_halted_for_everyone() {
    let (ok, text) = sim(&["--broken"]);
    assert!(ok, "{text}");
    let rows = rows(&text);
    assert_eq!(
        rows.iter().filter(|r| r.contains("halted: ")).count(),
        1,
        "{text}"
    );
    assert_eq!(
        rows.iter()
            .filter(|r| r.contains("is halted for the cluster"))
            .count(),
        2,
        "{text}"
    );
    assert!(
        !text.contains("k8s is ready on"),
        "nobody else applied it:\n{text}"
    );
}

#[test]
fn an_agent_killed_in_any_phase_of_a_rollout_is_restarted_and_the_rollout_completes() {
    for phase in ["draining", "switching", "rebooting", "verifying"] {
        let (ok, text) = sim(&["--kill-in", phase]);
        assert!(ok, "{phase}:\n{text}");
        assert!(
            text.contains(&format!("agent killed (SIGKILL) while {phase}")),
            "{phase}:\n{text}"
        );
        assert!(
            rows(&text).iter().all(|r| r.ends_with("applied")),
            "{phase}:\n{text}"
        );
        assert!(
            text.contains("at most 1 node(s) cordoned at once"),
            "{phase}:\n{text}"
        );
    }
}

#[test]
fn the_api_down_for_a_while_delays_the_rollout_and_breaks_nothing() {
    let (ok, text) = sim(&["--api-down", "3s"]);
    assert!(ok, "{text}");
    assert!(text.contains("the k3s API is back"), "{text}");
    assert!(rows(&text).iter().all(|r| r.ends_with("applied")), "{text}");
    assert!(
        text.contains("at most 1 node(s) cordoned at once"),
        "{text}"
    );
}

#[test]
fn two_at_a_time_on_seven_nodes() {
    let (ok, text) = sim(&["--nodes", "7", "--max-unavailable", "2"]);
    assert!(ok, "{text}");
    assert_eq!(
        rows(&text)
            .iter()
            .filter(|r| r.ends_with("applied"))
            .count(),
        7,
        "{text}"
    );
    // Never more than two; the simulator exits 1 if it saw more.
    assert!(!text.contains("at most 3 node(s)"), "{text}");
}

/// The time a table row says the node held the lease.
fn held(row: &str) -> f64 {
    // node, hostname, commit, phase, lease held, outcome…
    row.split_whitespace()
        .nth(4)
        .and_then(|t| t.trim_end_matches('s').parse().ok())
        .unwrap()
}

#[test]
fn the_seed_initiator_flip_disrupts_only_the_two_nodes_it_changes() {
    let (ok, text) = sim(&["--change", "initiator-flip"]);
    assert!(ok, "{text}");
    let rows = rows(&text);
    assert!(rows.iter().all(|r| r.ends_with("applied")), "{text}");
    assert!(held(rows[0]) > 0.0 && held(rows[1]) > 0.0, "{text}");
    assert_eq!(held(rows[2]), 0.0, "node-3 is not touched:\n{text}");
}

#[test]
fn a_change_to_one_node_leaves_the_others_alone() {
    let (ok, text) = sim(&["--change", "one"]);
    assert!(ok, "{text}");
    let rows = rows(&text);
    assert!(held(rows[0]) > 0.0, "{text}");
    assert!(rows[1..].iter().all(|r| held(r) == 0.0), "{text}");
    assert!(text.contains("No action needed on a9bcde5e"), "{text}");
}

#[test]
fn a_second_commit_mid_rollout_is_where_every_node_ends() {
    let (ok, text) = sim(&["--second-commit"]);
    assert!(ok, "{text}");
    let second = text
        .lines()
        .find(|l| l.contains("a second change, mid-rollout"))
        .and_then(|l| l.split_whitespace().nth(3))
        .map(|s| s.trim_end_matches(':').to_string())
        .unwrap_or_else(|| panic!("{text}"));
    assert!(
        rows(&text)
            .iter()
            .all(|r| r.contains(&second[..12]) && r.ends_with("applied")),
        "{second}: {text}"
    );
}

#[test]
fn a_configuration_nix_rejects_disrupts_nobody() {
    let (ok, text) = sim(&["--change", "nix-error"]);
    assert!(ok, "{text}");
    let rows = rows(&text);
    assert!(
        rows.iter()
            .all(|r| r.contains("error: syntax error") && held(r) == 0.0),
        "{text}"
    );
    assert!(text.contains("at most 0 node(s) cordoned"), "{text}");
}

#[test]
fn a_node_that_dies_holding_the_lease_is_waited_for_until_it_leaves_the_inventory() {
    let (ok, text) = sim(&["--die-in", "rebooting"]);
    assert!(ok, "{text}");
    let rows = rows(&text);
    assert_eq!(
        rows.iter()
            .filter(|r| r.ends_with("died; taken out of the inventory"))
            .count(),
        1,
        "{text}"
    );
    assert_eq!(
        rows.iter().filter(|r| r.ends_with("applied")).count(),
        2,
        "{text}"
    );
    // While the dead node was NotReady and in the inventory, nobody else was disrupted.
    assert!(text.contains("is NotReady"), "{text}");
    assert!(text.contains("at most 1 node(s) cordoned"), "{text}");
}

#[test]
fn the_git_server_down_mid_rollout_does_not_stop_it() {
    let (ok, text) = sim(&["--git-down", "20s"]);
    assert!(ok, "{text}");
    assert!(text.contains("the git server is down"), "{text}");
    assert!(
        !text.contains("the git server is back"),
        "the rollout finished without it:\n{text}"
    );
    assert!(rows(&text).iter().all(|r| r.ends_with("applied")), "{text}");
}
