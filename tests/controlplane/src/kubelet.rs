//! A kubelet stand-in: the part of a node's k3s that the control plane sees.
//!
//! With the node's own credential (`system:node:<name>`, so the Node authorizer and
//! NodeRestriction apply to it as to a real kubelet) it registers its Node, reports
//! `status.nodeInfo.bootID` and the Ready condition (NotReady for a moment at each start,
//! then Ready, as a kubelet does while its runtime comes up), renews its Lease in
//! `kube-node-lease` (the heartbeat the node-lifecycle controller watches), reports its pods
//! Running and Ready through `pods/status`, and deletes a terminating pod once its grace
//! period is over. Stopped, it does nothing at all: the real controller marks the Node
//! Unknown after its grace period. Nothing here writes Ready=False for a machine that is down.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use serde_json::{json, Value};

use crate::ControlPlane;

/// `leaseDurationSeconds` of the node's heartbeat Lease (a kubelet's default is 40 s,
/// renewed every quarter of it).
pub const NODE_LEASE_SECONDS: u64 = 4;
/// How often the Lease is renewed.
pub const RENEW_EVERY: Duration = Duration::from_secs(1);
/// How often the Node's status is posted when nothing changed (a kubelet's
/// `nodeStatusReportFrequency`, 5 minutes by default): the Ready condition's heartbeat time
/// is not a liveness signal, the Lease is.
const REPORT_EVERY: Duration = Duration::from_secs(60);
/// How often the kubelet compares the Node's status in the API with its own and posts it
/// again when they differ (a kubelet's `nodeStatusUpdateFrequency`, 10 s by default): after
/// the controller marked the Node Unknown, say.
const CHECK_EVERY: Duration = Duration::from_secs(1);
/// How long a starting kubelet says NotReady before Ready.
const STARTING: Duration = Duration::from_millis(300);

#[derive(Debug, Default)]
struct Flags {
    running: AtomicBool,
    quit: AtomicBool,
    boot_id_file: std::sync::Mutex<Option<PathBuf>>,
}

/// One node's kubelet.
#[derive(Debug)]
pub struct Kubelet {
    flags: Arc<Flags>,
    handle: Option<std::thread::JoinHandle<()>>,
}

struct Client {
    base: String,
    http: reqwest::blocking::Client,
    name: String,
}

impl Client {
    fn send(&self, method: reqwest::Method, path: &str, ct: &str, body: &Value) -> Option<Value> {
        let r = self
            .http
            .request(method, format!("{}{path}", self.base))
            .header("content-type", ct)
            .body(serde_json::to_vec(body).ok()?)
            .send()
            .ok()?;
        let ok = r.status().is_success();
        let v: Value = r.json().unwrap_or(Value::Null);
        ok.then_some(v)
    }

    fn get(&self, path: &str) -> Option<Value> {
        let r = self.http.get(format!("{}{path}", self.base)).send().ok()?;
        if !r.status().is_success() {
            return None;
        }
        r.json().ok()
    }
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

fn micro(t: SystemTime) -> String {
    humantime::format_rfc3339_micros(t).to_string()
}

impl Kubelet {
    /// Starts heartbeating for `name`.
    pub(crate) fn start(cp: &ControlPlane, name: &str, boot_id_file: Option<PathBuf>) -> Kubelet {
        let pair = cp
            .authority()
            .client(&format!("system:node:{name}"), &["system:nodes"]);
        let mut pem = pair.cert_pem.clone().into_bytes();
        pem.extend_from_slice(pair.key_pem.as_bytes());
        let http = reqwest::blocking::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(
                reqwest::Certificate::from_pem(cp.ca_pem().as_bytes()).expect("CA"),
            )
            .identity(reqwest::Identity::from_pem(&pem).expect("node identity"))
            .timeout(Duration::from_secs(5))
            .build()
            .expect("client");
        let client = Client {
            base: cp.url(),
            http,
            name: name.to_string(),
        };
        let flags = Arc::new(Flags::default());
        flags.running.store(true, Ordering::SeqCst);
        *flags.boot_id_file.lock().expect("lock") = boot_id_file;
        let f = flags.clone();
        let handle = std::thread::spawn(move || run(&client, &f));
        Kubelet {
            flags,
            handle: Some(handle),
        }
    }

    /// Reads the boot id from `file` from now on (the machine's, once the test made it).
    pub fn set_boot_id_file(&self, file: Option<PathBuf>) {
        *self.flags.boot_id_file.lock().expect("lock") = file;
    }

    /// The machine is down: no heartbeat, no pods handled.
    pub fn stop(&self) {
        self.flags.running.store(false, Ordering::SeqCst);
    }

    /// The machine is up again: the kubelet starts anew.
    pub fn resume(&self) {
        self.flags.running.store(true, Ordering::SeqCst);
    }

    pub(crate) fn shutdown(mut self) {
        self.flags.quit.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

struct Life {
    boot_id: String,
    started: Instant,
    ready_posted: bool,
    ready_since: SystemTime,
    last_status: Instant,
    last_check: Instant,
    last_lease: Option<Instant>,
    last_pods: Instant,
    running_pods: BTreeSet<String>,
}

fn boot_id(file: &Option<PathBuf>, name: &str) -> String {
    file.as_ref()
        .and_then(|f| std::fs::read_to_string(f).ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| format!("boot-of-{name}"))
}

fn run(c: &Client, flags: &Flags) {
    let mut life: Option<Life> = None;
    while !flags.quit.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(100));
        if !flags.running.load(Ordering::SeqCst) {
            life = None;
            continue;
        }
        let file = flags.boot_id_file.lock().expect("lock").clone();
        let id = boot_id(&file, &c.name);
        if life.as_ref().is_none_or(|l| l.boot_id != id) {
            // A (re)start: the machine booted, or k3s was started again.
            register(c);
            post_status(c, &id, false, SystemTime::now());
            life = Some(Life {
                boot_id: id,
                started: Instant::now(),
                ready_posted: false,
                ready_since: SystemTime::now(),
                last_status: Instant::now(),
                last_check: Instant::now(),
                last_lease: None,
                last_pods: Instant::now(),
                running_pods: BTreeSet::new(),
            });
        }
        let Some(l) = life.as_mut() else { continue };
        if !l.ready_posted && l.started.elapsed() >= STARTING {
            l.ready_since = SystemTime::now();
            l.ready_posted = post_status(c, &l.boot_id, true, l.ready_since);
            l.last_status = Instant::now();
        } else if l.ready_posted && l.last_status.elapsed() >= REPORT_EVERY {
            post_status(c, &l.boot_id, true, l.ready_since);
            l.last_status = Instant::now();
        } else if l.ready_posted && l.last_check.elapsed() >= CHECK_EVERY {
            l.last_check = Instant::now();
            let differs = c
                .get(&format!("/api/v1/nodes/{}", c.name))
                .is_some_and(|n| {
                    let ready = n["status"]["conditions"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .any(|c| c["type"] == "Ready" && c["status"] == "True");
                    !ready || n["status"]["nodeInfo"]["bootID"] != l.boot_id.as_str()
                });
            if differs {
                l.ready_since = SystemTime::now();
                post_status(c, &l.boot_id, true, l.ready_since);
                l.last_status = Instant::now();
            }
        }
        if l.last_lease.is_none_or(|t| t.elapsed() >= RENEW_EVERY) {
            renew_lease(c);
            l.last_lease = Some(Instant::now());
        }
        if l.ready_posted && l.last_pods.elapsed() >= Duration::from_millis(300) {
            sync_pods(c, &mut l.running_pods);
            l.last_pods = Instant::now();
        }
    }
}

fn register(c: &Client) {
    if c.get(&format!("/api/v1/nodes/{}", c.name)).is_some() {
        return;
    }
    c.send(
        reqwest::Method::POST,
        "/api/v1/nodes",
        "application/json",
        &json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {
                "name": c.name,
                "labels": {
                    "kubernetes.io/hostname": c.name,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64",
                },
            },
        }),
    );
}

fn post_status(c: &Client, boot_id: &str, ready: bool, since: SystemTime) -> bool {
    let now = SystemTime::now();
    let (status, reason, message) = if ready {
        ("True", "KubeletReady", "kubelet is posting ready status")
    } else {
        (
            "False",
            "KubeletNotReady",
            "container runtime status check may not have completed yet",
        )
    };
    let capacity = json!({ "cpu": "4", "memory": "8Gi", "pods": "110" });
    c.send(
        reqwest::Method::PATCH,
        &format!("/api/v1/nodes/{}/status", c.name),
        "application/strategic-merge-patch+json",
        &json!({
            "status": {
                "conditions": [{
                    "type": "Ready", "status": status, "reason": reason, "message": message,
                    "lastHeartbeatTime": rfc3339(now), "lastTransitionTime": rfc3339(since),
                }],
                "nodeInfo": {
                    "machineID": c.name, "systemUUID": c.name, "bootID": boot_id,
                    "kernelVersion": "6.12.0", "osImage": "NixOS",
                    "containerRuntimeVersion": "containerd://2.0.0",
                    "kubeletVersion": "v1.36.3+k3s1", "kubeProxyVersion": "",
                    "operatingSystem": "linux", "architecture": "amd64",
                },
                "addresses": [{ "type": "Hostname", "address": c.name }],
                "capacity": capacity, "allocatable": capacity,
            },
        }),
    )
    .is_some()
}

fn renew_lease(c: &Client) {
    let path = format!(
        "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{}",
        c.name
    );
    let now = micro(SystemTime::now());
    let renewed = c.send(
        reqwest::Method::PATCH,
        &path,
        "application/merge-patch+json",
        &json!({ "spec": { "holderIdentity": c.name, "renewTime": now, "leaseDurationSeconds": NODE_LEASE_SECONDS } }),
    );
    if renewed.is_some() {
        return;
    }
    let uid = c
        .get(&format!("/api/v1/nodes/{}", c.name))
        .and_then(|n| n["metadata"]["uid"].as_str().map(str::to_string));
    let mut meta = json!({ "name": c.name, "namespace": "kube-node-lease" });
    if let Some(uid) = uid {
        meta["ownerReferences"] =
            json!([{ "apiVersion": "v1", "kind": "Node", "name": c.name, "uid": uid }]);
    }
    c.send(
        reqwest::Method::POST,
        "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases",
        "application/json",
        &json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": meta,
            "spec": { "holderIdentity": c.name, "leaseDurationSeconds": NODE_LEASE_SECONDS, "renewTime": now },
        }),
    );
}

fn sync_pods(c: &Client, running: &mut BTreeSet<String>) {
    let Some(list) = c.get(&format!(
        "/api/v1/pods?fieldSelector=spec.nodeName%3D{}",
        c.name
    )) else {
        return;
    };
    let now = SystemTime::now();
    let mut seen = BTreeSet::new();
    for p in list["items"].as_array().into_iter().flatten() {
        let uid = p["metadata"]["uid"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let ns = p["metadata"]["namespace"].as_str().unwrap_or("default");
        let name = p["metadata"]["name"].as_str().unwrap_or_default();
        seen.insert(uid.clone());
        if let Some(at) = p["metadata"]["deletionTimestamp"].as_str() {
            // Its containers were asked to stop; they are gone once the grace period is.
            let due = humantime::parse_rfc3339(at)
                .map(|t| now >= t)
                .unwrap_or(true);
            if due {
                c.send(
                    reqwest::Method::DELETE,
                    &format!("/api/v1/namespaces/{ns}/pods/{name}"),
                    "application/json",
                    &json!({ "apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": 0, "preconditions": { "uid": uid } }),
                );
            }
            continue;
        }
        if running.contains(&uid) {
            continue;
        }
        let t = rfc3339(now);
        let cond = |ty: &str| json!({ "type": ty, "status": "True", "lastTransitionTime": t });
        let ok = c.send(
            reqwest::Method::PATCH,
            &format!("/api/v1/namespaces/{ns}/pods/{name}/status"),
            "application/strategic-merge-patch+json",
            &json!({
                "status": {
                    "phase": "Running", "startTime": t, "hostIP": "127.0.0.1",
                    "conditions": [cond("PodScheduled"), cond("Initialized"), cond("ContainersReady"), cond("Ready")],
                    "containerStatuses": [{
                        "name": "main", "ready": true, "started": true, "restartCount": 0,
                        "image": "registry.k8s.io/pause:3.10", "imageID": "",
                        "state": { "running": { "startedAt": t } },
                    }],
                },
            }),
        );
        if ok.is_some() {
            running.insert(uid);
        }
    }
    running.retain(|u| seen.contains(u));
}
