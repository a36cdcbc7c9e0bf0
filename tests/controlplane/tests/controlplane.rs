//! The harness is the real thing: heartbeats, not the harness, decide Ready; NodeRestriction
//! and RBAC are on; the audit log records who wrote what.

use std::time::{Duration, Instant};

use nk3_controlplane::{ControlPlane, NODE_MONITOR_GRACE};
use serde_json::json;

#[test]
fn a_silent_kubelet_stays_ready_until_the_node_lifecycle_controller_marks_it_unknown() {
    let cp = ControlPlane::start();
    cp.add_node("n1");
    let node = cp.node("n1").unwrap();
    assert_eq!(node["status"]["nodeInfo"]["bootID"], "boot-of-n1");
    let lease = cp
        .get_object("leases", "kube-node-lease", "n1")
        .expect("the kubelet's heartbeat lease");
    assert_eq!(lease["spec"]["holderIdentity"], "n1");

    cp.stop_kubelet("n1");
    let stopped = Instant::now();
    // The Node still says Ready for a while: only the controller changes that, from the
    // missing heartbeats.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        cp.node_readiness()["n1"],
        "True",
        "stale Ready, as on a real cluster"
    );
    assert!(cp.wait_ready(
        "n1",
        "Unknown",
        NODE_MONITOR_GRACE + Duration::from_secs(20)
    ));
    assert!(stopped.elapsed() >= NODE_MONITOR_GRACE - Duration::from_secs(1));
    let marked_by = cp
        .writes()
        .into_iter()
        .filter(|w| w.resource == "nodes" && w.subresource == "status" && w.name == "n1")
        .filter(|w| {
            w.object["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["type"] == "Ready" && c["status"] == "Unknown")
        })
        .map(|w| w.user)
        .next();
    assert_eq!(
        marked_by.as_deref(),
        Some("system:serviceaccount:kube-system:node-controller")
    );

    cp.start_kubelet("n1");
    assert!(cp.wait_ready("n1", "True", Duration::from_secs(20)));
}

#[test]
fn a_kubelet_credential_cannot_write_leases_outside_kube_node_lease() {
    let cp = ControlPlane::start();
    cp.add_node("n1");
    let lease = json!({ "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                        "metadata": { "name": "nk3-rollout" }, "spec": {} });
    let kubelet = cp.user("system:node:n1", &["system:nodes"]);
    let (code, answer) = kubelet.send(
        reqwest::Method::POST,
        "/apis/coordination.k8s.io/v1/namespaces/kube-system/leases",
        &lease,
    );
    assert_eq!(code, 403, "{answer}");
    assert!(
        answer["message"]
            .as_str()
            .unwrap()
            .contains("kube-node-lease"),
        "NodeRestriction says why: {answer}"
    );
    // A user no role names may do nothing at all.
    let nobody = cp.user("nobody", &[]);
    let (code, _) = nobody.send(
        reqwest::Method::GET,
        "/api/v1/nodes",
        &serde_json::Value::Null,
    );
    assert_eq!(code, 403);
    // The admin, as k3s.yaml's system:masters, may.
    assert!(cp
        .create(
            "/apis/coordination.k8s.io/v1/namespaces/kube-system/leases",
            &lease
        )
        .is_ok());
    let refused = cp
        .requests()
        .into_iter()
        .filter(|w| w.code == 403)
        .map(|w| w.user)
        .collect::<Vec<_>>();
    assert_eq!(
        refused,
        ["system:node:n1", "nobody"],
        "the audit log names who was refused"
    );
}
