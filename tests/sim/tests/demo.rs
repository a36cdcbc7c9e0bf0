//! The demo end to end: nk3-sim with the real agent binary (built by the same test run).

use std::process::Command;

fn sim(args: &[&str]) -> (bool, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_nk3-sim"))
        .args(["--reboot-time", "500ms"])
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
fn two_at_a_time_on_five_nodes() {
    let (ok, text) = sim(&["--nodes", "5", "--max-unavailable", "2"]);
    assert!(ok, "{text}");
    assert_eq!(
        rows(&text)
            .iter()
            .filter(|r| r.ends_with("applied"))
            .count(),
        5,
        "{text}"
    );
    assert!(
        text.contains("at most 2 node(s) cordoned at once") || text.contains("at most 1 node(s)"),
        "{text}"
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
