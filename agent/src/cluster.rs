//! The cluster half of a rollout (DESIGN sections 6 to 8): the health gate, the rollout
//! Lease (acquire, renew, release, halts), cordon and drain, verification, node annotations
//! and Events. Every API call goes through [`crate::kube`].

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::jiff::Timestamp;
use nk3_common::kubeconfig;
use nk3_common::lease::{self};
use serde_json::json;

pub use crate::health::Fresh;
use crate::kube::{Kube, KubeError};
use crate::leases::{claim, to_system};
pub use crate::leases::{lease_lost, lease_taken, seed, seen, Acquire, Renewer, RolloutLease};

/// Where the kubelets' heartbeat Leases live.
pub const NODE_LEASES: &str = "kube-node-lease";
/// Where the rollout's Leases live.
pub const NAMESPACE: &str = "kube-system";
/// The Lease's name (with `-0`… for `max_unavailable` > 1).
pub const LEASE: &str = "nk3-rollout";
/// Node annotation: the commit the node runs.
pub const APPLIED_COMMIT: &str = "nk3.io/applied-commit";
/// Node annotation: the rollout phase of the node.
pub const PHASE: &str = "nk3.io/phase";
/// Node annotation: nk3 cordoned this node (so nk3 may uncordon it).
pub const CORDONED: &str = "nk3.io/cordoned";
/// Lease annotation: a commit nobody may apply.
pub const HALTED_COMMIT: &str = "nk3.io/halted-commit";
/// Lease annotation: why it was halted.
pub const HALTED_REASON: &str = "nk3.io/halted-reason";
/// Lease annotation: which node halted it.
pub const HALTED_NODE: &str = "nk3.io/halted-node";
/// Lease annotation: the newer commit that got through after the halt. The halt stays on
/// record (the halted commit is still applied by nobody, a node behind included); it only
/// says the rollout has moved on.
pub const HALT_LIFTED_BY: &str = "nk3.io/halt-lifted-by";
/// Lease annotation: the commits halted before the one above, newest first, as JSON
/// (`[{"commit": …, "node": …, "reason": …}]`, at most [`EARLIER_KEPT`]). They stay halted:
/// a node whose git server is down may still have one as its head.
pub const HALTED_EARLIER: &str = "nk3.io/halted-earlier";
/// Lease annotation: an earlier-halts list nk3 could not read (a hand edit), kept as it was
/// rather than written over.
pub const HALTED_EARLIER_UNREADABLE: &str = "nk3.io/halted-earlier-unreadable";
/// How many earlier halts the Lease keeps.
pub const EARLIER_KEPT: usize = 16;
/// Lease annotation set by `nk3-agent nudge` (or CI): fetch now.
pub const DESIRED_COMMIT: &str = "nk3.io/desired-commit";

/// The cluster, as this node sees it.
#[derive(Debug)]
pub struct Cluster {
    pub(crate) kube: Arc<Kube>,
    /// This node's name in Kubernetes (its hostname).
    pub me: String,
    pub(crate) kubeconfig: std::path::PathBuf,
    pub(crate) kubectl: std::path::PathBuf,
    pub(crate) lease: RolloutLease,
}

impl From<Halt> for nk3_common::rollout::Halt {
    fn from(h: Halt) -> Self {
        let newest = Earlier {
            commit: h.commit,
            node: h.node,
            reason: h.reason,
        };
        nk3_common::rollout::Halt {
            earlier: h.earlier.into_iter().map(Earlier::into).collect(),
            ..newest.into()
        }
    }
}

/// A commit halted before the newest halt.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Earlier {
    /// The commit.
    pub commit: String,
    /// The node that halted it.
    pub node: String,
    /// Why.
    pub reason: String,
}

impl From<Earlier> for nk3_common::rollout::Halt {
    fn from(e: Earlier) -> Self {
        nk3_common::rollout::Halt {
            commit: e.commit,
            reason: e.reason,
            node: e.node,
            earlier: vec![],
        }
    }
}

/// The earlier halts an annotation holds (none when it is missing or unreadable).
pub(crate) fn earlier_halts(a: &std::collections::BTreeMap<String, String>) -> Vec<Earlier> {
    a.get(HALTED_EARLIER)
        .and_then(|v| serde_json::from_str(v).ok())
        .unwrap_or_default()
}

/// A commit halted cluster-wide.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Halt {
    /// The commit.
    pub commit: String,
    /// Why.
    pub reason: String,
    /// The node that halted it.
    pub node: String,
    /// The newer commit that got through since, if one did.
    pub lifted_by: Option<String>,
    /// The commits halted before it, newest first.
    pub earlier: Vec<Earlier>,
}

/// Why it is not safe to disrupt this node now.
pub type NotSafe = String;

pub(crate) fn timestamp_now() -> Timestamp {
    let us = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_micros();
    Timestamp::from_microsecond(i64::try_from(us).unwrap_or(i64::MAX))
        .unwrap_or(Timestamp::UNIX_EPOCH)
}

pub(crate) fn is_ready(n: &Node) -> bool {
    n.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
        .is_some_and(|c| c.status == "True")
}

pub(crate) fn name_of(n: &Node) -> String {
    n.metadata.name.clone().unwrap_or_default()
}

impl Cluster {
    /// Connects with the kubeconfig at `path`. `Ok(None)` when there is no such file: this
    /// node's k3s never ran (bootstrap), so it is not part of a cluster yet.
    pub fn connect(path: &std::path::Path, me: &str) -> anyhow::Result<Option<Cluster>> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => anyhow::bail!("cannot read kubeconfig {}: {e}", path.display()),
        };
        let read = |p: &str| std::fs::read(p).map_err(|e| e.to_string());
        let cfg = kubeconfig::parse(&text, &read)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        Ok(Some(Cluster {
            kube: Arc::new(Kube::new(&cfg)?),
            me: me.to_string(),
            kubeconfig: path.to_path_buf(),
            kubectl: "kubectl".into(),
            lease: RolloutLease::default(),
        }))
    }

    /// The API client.
    pub(crate) fn kube(&self) -> &Kube {
        &self.kube
    }

    /// Uses the rollout Leases at `lease`.
    pub fn with_lease(mut self, lease: RolloutLease) -> Cluster {
        self.lease = lease;
        self
    }

    /// Uses `kubectl` (for the Ceph check, which runs `ceph status` in the tools pod).
    pub fn with_kubectl(mut self, kubectl: &std::path::Path) -> Cluster {
        self.kubectl = kubectl.to_path_buf();
        self
    }

    /// The commit halted cluster-wide, if any (kept on the first lease).
    pub fn halt(&self) -> Result<Option<Halt>, KubeError> {
        let Some(l) = self.kube.lease(&self.lease.namespace, &self.lease.name)? else {
            return Ok(None);
        };
        let a = l.metadata.annotations.unwrap_or_default();
        Ok(a.get(HALTED_COMMIT).map(|c| Halt {
            commit: c.clone(),
            reason: a.get(HALTED_REASON).cloned().unwrap_or_default(),
            node: a.get(HALTED_NODE).cloned().unwrap_or_default(),
            lifted_by: a.get(HALT_LIFTED_BY).cloned(),
            earlier: earlier_halts(&a),
        }))
    }

    /// The names of the nodes that are Ready now.
    pub fn ready_nodes(&self) -> Result<Vec<String>, KubeError> {
        Ok(self
            .kube
            .nodes()?
            .iter()
            .filter(|n| is_ready(n))
            .map(name_of)
            .collect())
    }

    /// The health gate: every other node Ready and not cordoned by nk3, and the watched
    /// namespaces' workloads available.
    ///
    /// Only the inventory's nodes (`members`; empty: every node) count: a node taken out of
    /// the inventory no longer holds the rollout up, even if its Node object lingers.
    pub fn gate(
        &self,
        members: &[String],
        watch_namespaces: &[String],
        ceph: Option<&nk3_common::inventory::Ceph>,
    ) -> Result<Result<(), NotSafe>, KubeError> {
        let heartbeats = self.heartbeats()?;
        let now = SystemTime::now();
        for n in self.kube.nodes()? {
            let name = name_of(&n);
            if name == self.me || !(members.is_empty() || members.contains(&name)) {
                continue;
            }
            if !is_ready(&n) {
                return Ok(Err(format!("node {name} is NotReady")));
            }
            // Ready=True stays up to the controller's grace period after a node died: its
            // heartbeat says whether it is alive now.
            match heartbeats.get(&name) {
                None => {
                    return Ok(Err(format!(
                        "node {name} has no heartbeat (no Lease in {NODE_LEASES})"
                    )))
                }
                Some((renewed, duration)) => {
                    if let Some(age) = lease::stale_heartbeat(*renewed, *duration, now) {
                        return Ok(Err(format!(
                            "node {name} has not renewed its heartbeat for {}s (it may be down; its Node still says Ready)",
                            age.as_secs()
                        )));
                    }
                }
            }
            let by_nk3 = n
                .metadata
                .annotations
                .as_ref()
                .is_some_and(|a| a.get(CORDONED).is_some_and(|v| v == "true"));
            if by_nk3 {
                return Ok(Err(format!("node {name} is cordoned by nk3")));
            }
        }
        for ns in watch_namespaces {
            if let Some(why) = self.workloads_unhealthy(ns)? {
                return Ok(Err(why));
            }
        }
        if let Some(c) = ceph {
            if let Err(why) = self.ceph_healthy(c, Duration::from_secs(60)) {
                return Ok(Err(why));
            }
        }
        Ok(Ok(()))
    }

    /// Each node's last heartbeat (renewTime of its Lease in `kube-node-lease`) and that
    /// Lease's duration.
    pub(crate) fn heartbeats(&self) -> Result<BTreeMap<String, (SystemTime, Duration)>, KubeError> {
        Ok(self
            .kube
            .leases(NODE_LEASES)?
            .into_iter()
            .filter_map(|l| {
                let name = l.metadata.name.clone()?;
                let spec = l.spec?;
                let renewed = spec.renew_time.as_ref().map(to_system)?;
                let secs = spec.lease_duration_seconds.unwrap_or(40).max(1) as u64;
                Some((name, (renewed, Duration::from_secs(secs))))
            })
            .collect())
    }

    /// DaemonSets: available = desired; Deployments: available replicas meet the minimum
    /// (replicas − maxUnavailable, as the original tool checked available ≥ replicas − 1).
    pub(crate) fn workloads_unhealthy(&self, ns: &str) -> Result<Option<String>, KubeError> {
        for ds in self
            .kube
            .list_json(&format!("/apis/apps/v1/namespaces/{ns}/daemonsets"))?
        {
            let desired = ds["status"]["desiredNumberScheduled"].as_i64().unwrap_or(0);
            let available = ds["status"]["numberAvailable"].as_i64().unwrap_or(0);
            if available < desired {
                return Ok(Some(format!(
                    "daemonset {ns}/{} has {available} of {desired} available",
                    ds["metadata"]["name"].as_str().unwrap_or("?")
                )));
            }
        }
        for d in self
            .kube
            .list_json(&format!("/apis/apps/v1/namespaces/{ns}/deployments"))?
        {
            let replicas = d["spec"]["replicas"].as_i64().unwrap_or(1);
            let available = d["status"]["availableReplicas"].as_i64().unwrap_or(0);
            let min = (replicas - 1)
                .max(if replicas > 0 { 1 } else { 0 })
                .min(replicas);
            if available < min {
                return Ok(Some(format!(
                    "deployment {ns}/{} has {available} of {replicas} replicas available",
                    d["metadata"]["name"].as_str().unwrap_or("?")
                )));
            }
        }
        Ok(None)
    }

    /// Cordons this node. Returns whether it was already unschedulable (then nk3 leaves it
    /// so, and will not uncordon it).
    pub fn cordon(&self) -> Result<bool, KubeError> {
        let node = self.kube.node(&self.me)?;
        let unschedulable = node
            .as_ref()
            .and_then(|n| n.spec.as_ref())
            .and_then(|s| s.unschedulable)
            .unwrap_or(false);
        // Cordoned by nk3 already (a drain interrupted by a restart): still nk3's to undo.
        let ours = node
            .as_ref()
            .and_then(|n| n.metadata.annotations.as_ref())
            .is_some_and(|a| a.get(CORDONED).is_some_and(|v| v == "true"));
        let was = unschedulable && !ours;
        if !unschedulable {
            self.kube.patch_node(
                &self.me,
                &json!({ "spec": { "unschedulable": true }, "metadata": { "annotations": { CORDONED: "true" } } }),
            )?;
        }
        Ok(was)
    }

    /// Uncordons this node, unless it was unschedulable before nk3 came.
    pub fn uncordon(&self, was_unschedulable: bool) -> Result<(), KubeError> {
        if was_unschedulable {
            return Ok(());
        }
        self.kube
            .patch_node(
                &self.me,
                &json!({ "spec": { "unschedulable": null }, "metadata": { "annotations": { CORDONED: null } } }),
            )
            .map(|_| ())
    }

    /// Sets this node's nk3 annotations.
    pub fn annotate(&self, commit: Option<&str>, phase: &str) -> Result<(), KubeError> {
        let mut a = serde_json::Map::new();
        a.insert(PHASE.into(), json!(phase));
        if let Some(c) = commit {
            a.insert(APPLIED_COMMIT.into(), json!(c));
        }
        self.kube
            .patch_node(&self.me, &json!({ "metadata": { "annotations": a } }))
            .map(|_| ())
    }

    /// Records an Event on this Node (what `kubectl describe node` shows). Best effort.
    pub fn event(&self, reason: &str, message: &str, warning: bool) {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        let ts = timestamp_now().to_string();
        let event = json!({
            "apiVersion": "v1", "kind": "Event",
            "metadata": { "name": format!("{}.nk3.{}", self.me, now.as_nanos()), "namespace": "default" },
            "involvedObject": { "apiVersion": "v1", "kind": "Node", "name": self.me, "uid": self.me },
            "reason": reason, "message": message,
            "type": if warning { "Warning" } else { "Normal" },
            "source": { "component": "nk3-agent", "host": self.me },
            "firstTimestamp": ts, "lastTimestamp": ts, "count": 1,
        });
        if let Err(e) = self.kube.create_event("default", &event) {
            tracing::debug!("cannot record event {reason}: {e}");
        }
    }
}

/// One node as `status --cluster` shows it.
#[derive(Debug, serde::Serialize)]
pub struct NodeView {
    /// Name.
    pub name: String,
    /// Ready condition.
    pub ready: bool,
    /// Unschedulable.
    pub cordoned: bool,
    /// `nk3.io/applied-commit`.
    pub applied_commit: Option<String>,
    /// `nk3.io/phase`.
    pub phase: Option<String>,
}

/// What `status --cluster` shows.
#[derive(Debug, serde::Serialize)]
pub struct Overview {
    /// Every node.
    pub nodes: Vec<NodeView>,
    /// Lease name → holder, for the rollout's leases.
    pub leases: BTreeMap<String, Option<String>>,
    /// The halted commit, if any.
    pub halted: Option<(String, String, String)>,
    /// The newer commit that got through since the halt, if one did.
    pub halt_lifted_by: Option<String>,
    /// The commits halted before, newest first.
    pub halted_earlier: Vec<Earlier>,
}

impl Cluster {
    /// Every node's commit and phase, the holders of the leases of a rollout of `slots`, and
    /// the halt.
    pub fn overview(&self, slots: u32) -> Result<Overview, KubeError> {
        let nodes = self
            .kube
            .nodes()?
            .iter()
            .map(|n| {
                let a = n.metadata.annotations.clone().unwrap_or_default();
                NodeView {
                    name: name_of(n),
                    ready: is_ready(n),
                    cordoned: n
                        .spec
                        .as_ref()
                        .and_then(|s| s.unschedulable)
                        .unwrap_or(false),
                    applied_commit: a.get(APPLIED_COMMIT).cloned(),
                    phase: a.get(PHASE).cloned(),
                }
            })
            .collect();
        // By name, as an agent node's credentials allow: the first, then the slots.
        let mut leases = BTreeMap::new();
        for name in self.lease.names(slots) {
            if let Some(l) = self.kube.lease(&self.lease.namespace, &name)? {
                leases.insert(name, claim(&l).holder.filter(|h| !h.is_empty()));
            }
        }
        let halt = self.halt()?;
        let halt_lifted_by = halt.as_ref().and_then(|h| h.lifted_by.clone());
        let halted_earlier = halt.as_ref().map(|h| h.earlier.clone()).unwrap_or_default();
        let halted = halt.map(|h| (h.commit, h.node, h.reason));
        Ok(Overview {
            nodes,
            leases,
            halted,
            halt_lifted_by,
            halted_earlier,
        })
    }
}

#[cfg(test)]
mod tests {
    //! Faults only the stand-in API server can inject; everything else is shown against the
    //! real control plane in `cluster_tests.rs`.
    use super::*;
    use nk3_apiserver::ApiServer;

    fn cluster(api: &ApiServer, me: &str) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k3s.yaml");
        std::fs::write(&path, api.kubeconfig(me)).unwrap();
        Cluster::connect(&path, me).unwrap().unwrap()
    }

    #[test]
    fn storms_of_429_and_5xx_are_ridden_out_and_a_wrong_ca_is_refused() {
        let api = ApiServer::start();
        api.add_node("n1", true);
        let c = cluster(&api, "n1");
        api.fail_next(2, 429);
        api.fail_next(2, 503);
        assert_eq!(c.ready_nodes().unwrap(), ["n1"]);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k3s.yaml");
        std::fs::write(&path, api.kubeconfig_with_wrong_ca("n1")).unwrap();
        let wrong = Cluster::connect(&path, "n1").unwrap().unwrap();
        let e = wrong.ready_nodes().unwrap_err().to_string();
        assert!(
            e.contains("cannot reach") && e.to_lowercase().contains("certificate"),
            "{e}"
        );
        // A bearer token works too (agent-role nodes).
        std::fs::write(&path, api.token_kubeconfig("n1")).unwrap();
        let token = Cluster::connect(&path, "n1").unwrap().unwrap();
        assert_eq!(token.ready_nodes().unwrap(), ["n1"]);
        // No kubeconfig: not part of a cluster (bootstrap).
        assert!(Cluster::connect(&dir.path().join("none"), "n1")
            .unwrap()
            .is_none());
    }

    #[test]
    fn conflict_loops_that_give_up_report_success_a_halt_never_written_is_an_error() {
        let api = ApiServer::start();
        let a = cluster(&api, "a");
        assert!(matches!(
            a.acquire(1, Duration::from_secs(60)).unwrap(),
            Acquire::Held(_)
        ));
        // Every write answered 409: the halt is not written, and the caller is told.
        api.fail_next_writes(5, 409);
        let e = a.set_halt("abc", "unhealthy", &|_| false).unwrap_err();
        assert_eq!(e.code(), Some(409), "{e}");
        assert_eq!(a.halt().unwrap(), None, "nothing was written");
        api.fail_next_writes(5, 409);
        assert!(
            a.release(LEASE).is_err(),
            "a release that did not happen is an error"
        );
        api.fail_next_writes(5, 409);
        assert!(a.renew(LEASE, Duration::from_secs(60)).is_err());
        // Once the API takes writes again, they happen.
        a.set_halt("abc", "unhealthy", &|_| false).unwrap();
        assert_eq!(a.halt().unwrap().unwrap().commit, "abc");
    }
}
