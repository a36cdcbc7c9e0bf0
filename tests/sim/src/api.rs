//! The k3s API the simulated cluster runs against: the real control plane
//! (`tests/controlplane`: kube-apiserver, kube-controller-manager, kube-scheduler, etcd,
//! a kubelet stand-in per machine) when it is built, else the API test server
//! (`tests/apiserver`), which the simulator says it uses.

use std::path::Path;
use std::time::SystemTime;

use nk3_apiserver::ApiServer;
use nk3_controlplane::ControlPlane;
use serde_json::Value;

/// One write to the API.
#[derive(Debug, Clone)]
pub struct Write {
    /// When.
    pub at: SystemTime,
    /// `leases`, `nodes`, …
    pub resource: String,
    /// The object's namespace.
    pub namespace: String,
    /// The object's name.
    pub name: String,
    /// `create`, `update`, `patch`, `delete`.
    pub verb: String,
    /// Who wrote it (empty on the stand-in).
    pub user: String,
    /// The object as written.
    pub object: Value,
}

/// The cluster's API.
pub enum Api {
    /// The real control plane.
    Real(Box<ControlPlane>),
    /// The stand-in.
    StandIn(Box<ApiServer>),
}

impl Api {
    /// The real control plane if it is built (or `build` says to build it), else the
    /// stand-in (unless `require_real`).
    pub fn start(build: bool, require_real: bool) -> anyhow::Result<Api> {
        let built = nk3_controlplane::built().is_some();
        if built || build || require_real {
            return Ok(Api::Real(Box::new(ControlPlane::try_start()?)));
        }
        Ok(Api::StandIn(Box::new(ApiServer::start())))
    }

    /// What it is, for people.
    pub fn describe(&self) -> String {
        match self {
            Api::Real(_) => format!("the real control plane ({})", nk3_controlplane::versions()),
            Api::StandIn(_) => "the k3s API test server (a stand-in: the real control plane is not built; scripts/demo --build-control-plane builds it, about 6 minutes)".into(),
        }
    }

    /// The kubeconfig a server node's k3s writes.
    pub fn kubeconfig(&self, host: &str) -> String {
        match self {
            Api::Real(c) => c.kubeconfig(host),
            Api::StandIn(a) => a.kubeconfig(host),
        }
    }

    /// The machine's k3s is up: its Node registers and heartbeats (reporting the boot id in
    /// `boot_id`).
    pub fn add_node(&self, host: &str, boot_id: &Path) {
        match self {
            Api::Real(c) => c.add_node_with_boot_id(host, Some(boot_id)),
            Api::StandIn(a) => a.add_node(host, true),
        }
    }

    /// The machine is up (its kubelet heartbeats) or down. On the real control plane
    /// nothing writes Ready=False: the node-lifecycle controller notices the silence.
    pub fn machine_up(&self, host: &str, up: bool) {
        match self {
            Api::Real(c) => c.set_ready(host, up),
            Api::StandIn(a) => a.set_ready(host, up),
        }
    }

    /// A pod on `host` (which takes `grace` seconds to stop).
    pub fn add_pod(&self, ns: &str, name: &str, host: &str, labels: Value, grace: u64) {
        match self {
            Api::Real(c) => c.add_pod(ns, name, host, labels, grace),
            Api::StandIn(a) => a.add_pod(ns, name, host, labels, Some("ReplicaSet"), grace),
        }
    }

    /// `kubectl delete node`.
    pub fn delete_node(&self, host: &str) {
        match self {
            Api::Real(c) => c.delete("nodes", "", host),
            Api::StandIn(a) => a.delete("nodes", "", host),
        }
    }

    /// The API down (k3s's API server stopped) or back.
    pub fn set_down(&self, down: bool) {
        match self {
            Api::Real(c) => c.set_unreachable(down),
            Api::StandIn(a) => a.set_unreachable(down),
        }
    }

    /// How many requests the agents have made so far (the real control plane's audit log;
    /// 0 on the stand-in).
    pub fn requests_by_agents(&self) -> usize {
        match self {
            Api::Real(c) => c
                .requests()
                .iter()
                .filter(|w| w.user_agent.starts_with("nk3-agent"))
                .count(),
            Api::StandIn(_) => 0,
        }
    }

    /// How many requests of users whose name starts with `prefix` the API refused (403).
    pub fn refused_for(&self, prefix: &str) -> usize {
        match self {
            Api::Real(c) => c
                .requests()
                .iter()
                .filter(|w| w.user.starts_with(prefix) && w.code == 403)
                .count(),
            Api::StandIn(_) => 0,
        }
    }

    /// Every successful write, in the order the API committed them.
    pub fn writes(&self) -> Vec<Write> {
        match self {
            Api::Real(c) => c
                .writes()
                .into_iter()
                .map(|w| Write {
                    at: w.at,
                    resource: w.resource,
                    namespace: w.namespace,
                    name: w.name,
                    verb: w.verb,
                    user: w.user,
                    object: w.object,
                })
                .collect(),
            Api::StandIn(a) => a
                .writes()
                .into_iter()
                .map(|w| Write {
                    at: w.at,
                    namespace: w.object["metadata"]["namespace"]
                        .as_str()
                        .unwrap_or_default()
                        .into(),
                    resource: w.resource,
                    name: w.name,
                    verb: w.verb,
                    user: String::new(),
                    object: w.object,
                })
                .collect(),
        }
    }
}
