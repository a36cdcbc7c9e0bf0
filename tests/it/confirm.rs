//! The lease confirmed just before each disruptive step, on the real control plane: a node
//! whose lease is taken from it, or whose commit another node halts, while it drains, does
//! not switch.

use std::process::Stdio;
use std::time::Duration;

use nk3_controlplane::ControlPlane;
use serde_json::{json, Value};

use crate::fixtures::{Node, Repo};
use crate::rollout::{api, dns, holder, inventory, lease, member, now_micro, set_lease, HOST3};

/// The drain this node will go through: one pod that takes `grace` seconds to stop, and a
/// drain timeout long enough for it.
fn slow_drain(api: &ControlPlane, grace: u64) -> String {
    api.add_pod("default", "web-0", HOST3, json!({"app": "web"}), grace);
    assert!(api.wait_for(Duration::from_secs(30), |api| {
        api.get_object("pods", "default", "web-0")
            .is_some_and(|p| p["status"]["phase"] == "Running")
    }));
    dns(&inventory(""), "9.9.9.9").replace("drain_timeout: 2s", "drain_timeout: 60s")
}

/// Starts `run --once` and returns once the node is cordoned and its pod is being evicted.
fn until_draining(node: &Node, api: &ControlPlane) -> std::process::Child {
    let child = node
        .agent(&["run", "--once"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    assert!(
        api.wait_for(Duration::from_secs(60), |api| {
            let cordoned = api
                .node(HOST3)
                .is_some_and(|n| n["spec"]["unschedulable"] == true);
            let evicting = api
                .get_object("pods", "default", "web-0")
                .is_some_and(|p| !p["metadata"]["deletionTimestamp"].is_null());
            cordoned && evicting
        }),
        "the node never got to its drain"
    );
    child
}

/// What the pass said, once it ended (within 90 s: else the test fails, the agent killed).
fn finish(child: std::process::Child) -> String {
    crate::fixtures::stderr_within(child, Duration::from_secs(90))
        .expect("the pass did not end within 90 s")
        .1
}

fn uncordoned(api: &ControlPlane) -> bool {
    api.node(HOST3).is_some_and(|n| {
        n["spec"]["unschedulable"].is_null() || n["spec"]["unschedulable"] == false
    })
}

fn switched(node: &Node) -> bool {
    node.calls("nixos-rebuild")
        .iter()
        .any(|c| c.starts_with("switch") || c.starts_with("boot"))
}

#[test]
fn a_lease_taken_away_during_the_drain_stops_the_switch_and_the_node_uncordons() {
    let api = api();
    let repo = Repo::with_inventory(&inventory(""));
    let node = member(&repo, &api, "172.30.190.3", HOST3);
    let head = repo.commit("inventory.yaml", &slow_drain(&api, 6), "resolver");
    let child = until_draining(&node, &api);
    assert_eq!(holder(&api).as_deref(), Some(HOST3));
    // An administrator (or a bug elsewhere) hands the lease to another holder.
    let mut l: Value = lease(&api);
    l["spec"]["holderIdentity"] = json!("someone-else");
    l["spec"]["renewTime"] = json!(now_micro());
    l["spec"]["acquireTime"] = json!(now_micro());
    l["spec"]["leaseDurationSeconds"] = json!(600);
    set_lease(&api, l);
    let log = finish(child);
    assert!(!switched(&node), "switched without the lease:\n{log}");
    assert!(log.contains("lost the rollout lease"), "{log}");
    assert!(uncordoned(&api), "{log}");
    assert_eq!(
        holder(&api).as_deref(),
        Some("someone-else"),
        "the other holder's lease is left alone"
    );
    assert_ne!(node.state()["applied"], head.as_str());
    assert_ne!(node.state()["phase"]["name"], "frozen");

    // Given back, the lease is taken again and the commit goes through.
    let mut l: Value = lease(&api);
    l["spec"]["holderIdentity"] = Value::Null;
    set_lease(&api, l);
    let log = node.pass_ok();
    assert_eq!(node.state()["applied"], head.as_str(), "{log}");
    assert!(switched(&node));
    assert!(uncordoned(&api));
}

#[test]
fn a_commit_halted_by_another_node_during_the_drain_is_not_switched_to() {
    let api = api();
    let repo = Repo::with_inventory(&inventory(""));
    let node = member(&repo, &api, "172.30.190.3", HOST3);
    let head = repo.commit("inventory.yaml", &slow_drain(&api, 6), "resolver");
    let child = until_draining(&node, &api);
    // Another node found the commit unhealthy and halted it, as its agent writes it.
    api.patch(
        &ControlPlane::path("leases", "kube-system", "nk3-rollout"),
        &json!({"metadata": {"annotations": {
            "nk3.io/halted-commit": head,
            "nk3.io/halted-reason": "k3s did not become ready",
            "nk3.io/halted-node": "node-b",
        }}}),
    )
    .unwrap();
    let log = finish(child);
    assert!(!switched(&node), "switched to a halted commit:\n{log}");
    assert!(uncordoned(&api), "{log}");
    assert_eq!(holder(&api), None, "the lease is given back: {log}");
    assert_ne!(node.state()["applied"], head.as_str());
    assert!(log.contains("halted"), "{log}");
    // The halt is another node's and stays.
    assert_eq!(
        lease(&api)["metadata"]["annotations"]["nk3.io/halted-commit"],
        head.as_str()
    );
    // The next pass does not try it again.
    node.clear_calls();
    let log = node.run_once();
    let log = crate::support::stderr(&log);
    assert!(!switched(&node), "{log}");
    assert!(node.calls("nixos-rebuild").is_empty(), "{log}");
}
