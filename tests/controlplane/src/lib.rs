//! The real Kubernetes control plane on loopback, for nk3's cluster tests.
//!
//! etcd, kube-apiserver, kube-controller-manager and kube-scheduler, built from their Go
//! modules at the versions `go.mod` pins (`build.sh`), started the way k3s configures them:
//! certificates made at test time (an EC CA, a serving certificate for 127.0.0.1, clients
//! named by their certificate's CN and O, keys as SEC1 like k3s.yaml),
//! `--authorization-mode=Node,RBAC`, NodeRestriction admission, no anonymous access,
//! service-account signing keys, and an audit log of every request (what the tests read the
//! cluster's history from). The controller manager runs the real node-lifecycle, disruption,
//! daemonset, deployment and replicaset controllers, with a short node-monitor grace period
//! for speed.
//!
//! What cannot run here — a kubelet and its container runtime — is played by [`kubelet`]:
//! it heartbeats with the node's own `system:node:<name>` credentials, and the real
//! node-lifecycle controller decides Ready from those heartbeats.
#![allow(clippy::print_stderr)] // a harness says what it starts and why it failed

pub mod certs;
pub mod kubeconfig;
pub mod kubelet;

use std::collections::BTreeMap;
use std::io::BufRead as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context as _};
use serde_json::{json, Value};

use certs::{Authority, Pair};
pub use kubelet::Kubelet;

/// How long the node-lifecycle controller waits for a heartbeat before it marks a Node
/// Unknown (kube-controller-manager `--node-monitor-grace-period`; 50s by default).
pub const NODE_MONITOR_GRACE: Duration = Duration::from_secs(6);

/// One API write (or any request) from the audit log.
#[derive(Debug, Clone)]
pub struct Write {
    /// When the API server finished it.
    pub at: SystemTime,
    /// `create`, `update`, `patch`, `delete`, `get`, `list`, `watch`…
    pub verb: String,
    /// `leases`, `nodes`, `pods`, …
    pub resource: String,
    /// `status`, `eviction`, … or empty.
    pub subresource: String,
    /// The object's namespace (empty for cluster objects).
    pub namespace: String,
    /// The object's name.
    pub name: String,
    /// Who asked (`system:admin`, `system:node:<name>`, a service account…).
    pub user: String,
    /// The client's User-Agent (`nk3-agent/…` for the agent).
    pub user_agent: String,
    /// The HTTP status answered.
    pub code: u16,
    /// The object as written (writes only), else `null`.
    pub object: Value,
}

/// Requests as one user.
#[derive(Debug)]
pub struct User {
    base: String,
    http: reqwest::blocking::Client,
}

impl User {
    /// Sends `body` as JSON (`Null`: no body); the status code and the answer (code 0 when
    /// the API did not answer).
    pub fn send(&self, method: reqwest::Method, path: &str, body: &Value) -> (u16, Value) {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if !body.is_null() {
            req = req
                .header("content-type", "application/json")
                .body(serde_json::to_vec(body).unwrap_or_default());
        }
        match req.send() {
            Ok(r) => {
                let code = r.status().as_u16();
                (code, r.json().unwrap_or(Value::Null))
            }
            Err(e) => (0, json!({ "message": e.to_string() })),
        }
    }
}

/// The control plane. Dropping it stops every process.
pub struct ControlPlane {
    dir: tempfile::TempDir,
    bins: PathBuf,
    ca: Arc<Authority>,
    port: u16,
    etcd_port: u16,
    admin: Pair,
    http: reqwest::blocking::Client,
    apiserver: Mutex<Option<Child>>,
    others: Mutex<Vec<Child>>,
    kubelets: Mutex<BTreeMap<String, Kubelet>>,
    /// How far the audit log has been read, and what it said so far.
    audit: Mutex<(u64, Vec<Write>)>,
}

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ControlPlane {{ {} }}", self.url())
    }
}

/// The folder holding the built binaries, building them first when they are missing
/// (`tests/controlplane/build.sh`, which shows its progress).
pub fn binaries() -> anyhow::Result<PathBuf> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("build.sh");
    let out = Command::new(&script)
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("cannot run {}", script.display()))?;
    if !out.status.success() {
        bail!(
            "{} failed (exit {:?}); the real control plane could not be built",
            script.display(),
            out.status.code()
        );
    }
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

/// The folder of the built binaries, if they are built (nothing is built here).
pub fn built() -> Option<PathBuf> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("build.sh");
    let out = Command::new(&script)
        .arg("--path")
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

/// The versions the binaries are built at, as `go.mod` pins them.
pub fn versions() -> String {
    let gomod = include_str!("../go.mod");
    let of = |m: &str| {
        gomod
            .lines()
            .find_map(|l| {
                let mut w = l.split_whitespace();
                (w.next() == Some(m)).then(|| w.next().unwrap_or("?").to_string())
            })
            .unwrap_or_else(|| "?".into())
    };
    format!(
        "Kubernetes {} (kube-apiserver, kube-controller-manager, kube-scheduler), etcd {}",
        of("k8s.io/kubernetes"),
        of("go.etcd.io/etcd/server/v3")
    )
}

/// A loopback port for a child process to listen on.
///
/// A port the kernel hands out for `:0` lies in its ephemeral range, the same range every
/// outgoing connection takes its source port from: on a busy machine (tests in parallel, each
/// with many connections) another socket can take it before the child binds it. So the port
/// is drawn at random from below that range, where the kernel never assigns one by itself,
/// and checked free by binding it once.
pub fn unused_port() -> u16 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static DRAWN: AtomicU64 = AtomicU64::new(0);
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let (from, to) = if low > 12000 {
        (10000u64, u64::from(low))
    } else {
        (u64::from(low) / 2, u64::from(low))
    };
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mut x = nanos ^ (u64::from(std::process::id()) << 32);
    for _ in 0..1000 {
        // splitmix64 over the time, the process and how many were drawn before.
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15 ^ DRAWN.fetch_add(1, Ordering::Relaxed));
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        let port = (from + z % (to - from)) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port below {to}")
}

const AUDIT_POLICY: &str = "apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
- level: RequestResponse
  verbs: [create, update, patch, delete]
  resources:
  - group: coordination.k8s.io
    resources: [leases]
  - group: ''
    resources: [nodes, nodes/status, pods, pods/status, pods/eviction, events]
- level: Metadata
";

impl ControlPlane {
    /// Starts etcd, kube-apiserver, kube-controller-manager and kube-scheduler; panics
    /// with what went wrong when it cannot (the tests that need it cannot go on).
    pub fn start() -> ControlPlane {
        match ControlPlane::try_start() {
            Ok(c) => c,
            Err(e) => panic!("the real control plane did not start: {e:#}"),
        }
    }

    /// Starts it, or says why not.
    pub fn try_start() -> anyhow::Result<ControlPlane> {
        let bins = binaries()?;
        let dir = tempfile::Builder::new()
            .prefix("nk3-controlplane")
            .tempdir()?;
        let d = dir.path();
        let ca = Arc::new(Authority::new("k3s-server-ca"));
        let serving = ca.server();
        let admin = ca.client("system:admin", &["system:masters"]);
        let kcm = ca.client("system:kube-controller-manager", &[]);
        let scheduler = ca.client("system:kube-scheduler", &[]);
        std::fs::write(d.join("ca.crt"), ca.pem())?;
        std::fs::write(d.join("serving.crt"), &serving.cert_pem)?;
        std::fs::write(d.join("serving.key"), &serving.key_pem)?;
        let (sa_key, sa_pub) = certs::signing_key_pem();
        std::fs::write(d.join("sa.key"), sa_key)?;
        std::fs::write(d.join("sa.pub"), sa_pub)?;
        std::fs::write(d.join("audit-policy.yaml"), AUDIT_POLICY)?;
        let port = unused_port();
        let etcd_port = unused_port();
        let url = format!("https://127.0.0.1:{port}");
        let identity = |p: &Pair| {
            let mut pem = p.cert_pem.clone().into_bytes();
            pem.extend_from_slice(p.key_pem.as_bytes());
            reqwest::Identity::from_pem(&pem)
        };
        let http = reqwest::blocking::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(ca.pem().as_bytes())?)
            .identity(identity(&admin)?)
            .timeout(Duration::from_secs(30))
            .build()?;
        let cp = ControlPlane {
            dir,
            bins,
            ca,
            port,
            etcd_port,
            admin,
            http,
            apiserver: Mutex::new(None),
            others: Mutex::new(Vec::new()),
            kubelets: Mutex::new(BTreeMap::new()),
            audit: Mutex::new((0, Vec::new())),
        };
        let d = cp.dir.path().to_path_buf();
        std::fs::write(
            d.join("kcm.kubeconfig"),
            kubeconfig::with_certificate(&url, &cp.ca.pem(), &kcm),
        )?;
        std::fs::write(
            d.join("scheduler.kubeconfig"),
            kubeconfig::with_certificate(&url, &cp.ca.pem(), &scheduler),
        )?;
        let etcd = cp.spawn(
            "etcd",
            &[
                "--name=default".into(),
                format!("--data-dir={}", d.join("etcd").display()),
                format!("--listen-client-urls=http://127.0.0.1:{etcd_port}"),
                format!("--advertise-client-urls=http://127.0.0.1:{etcd_port}"),
                "--listen-peer-urls=http://127.0.0.1:0".into(),
                "--unsafe-no-fsync".into(),
                "--log-level=warn".into(),
            ],
        )?;
        cp.others.lock().expect("lock").push(etcd);
        let up = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", etcd_port)).is_err() {
            if up.elapsed() > Duration::from_secs(30) {
                bail!("etcd did not listen within 30 s: {}", cp.log_tail("etcd"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        cp.start_apiserver()?;
        let kcm = cp.spawn(
            "kube-controller-manager",
            &[
                format!("--kubeconfig={}", d.join("kcm.kubeconfig").display()),
                "--leader-elect=false".into(),
                "--bind-address=127.0.0.1".into(),
                "--secure-port=0".into(),
                "--use-service-account-credentials=true".into(),
                format!(
                    "--service-account-private-key-file={}",
                    d.join("sa.key").display()
                ),
                format!("--root-ca-file={}", d.join("ca.crt").display()),
                "--controllers=*".into(),
                "--node-monitor-period=1s".into(),
                format!(
                    "--node-monitor-grace-period={}s",
                    NODE_MONITOR_GRACE.as_secs()
                ),
                "--concurrent-gc-syncs=5".into(),
                "--v=1".into(),
            ],
        )?;
        cp.others.lock().expect("lock").push(kcm);
        let sched_port = unused_port();
        let sched = cp.spawn(
            "kube-scheduler",
            &[
                format!("--kubeconfig={}", d.join("scheduler.kubeconfig").display()),
                format!(
                    "--authentication-kubeconfig={}",
                    d.join("scheduler.kubeconfig").display()
                ),
                format!(
                    "--authorization-kubeconfig={}",
                    d.join("scheduler.kubeconfig").display()
                ),
                "--leader-elect=false".into(),
                "--bind-address=127.0.0.1".into(),
                format!("--secure-port={sched_port}"),
                "--v=1".into(),
            ],
        )?;
        cp.others.lock().expect("lock").push(sched);
        // The controller manager is at work once its service-account controller has made
        // the default namespace's account.
        let up = Instant::now();
        while cp
            .get("/api/v1/namespaces/default/serviceaccounts/default")
            .is_none()
        {
            if up.elapsed() > Duration::from_secs(90) {
                bail!(
                    "kube-controller-manager did not start within 90 s: {}",
                    cp.log_tail("kube-controller-manager")
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(cp)
    }

    fn spawn(&self, bin: &str, args: &[String]) -> anyhow::Result<Child> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("{bin}.log")))?;
        Command::new(self.bins.join(bin))
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {bin}"))
    }

    fn log_tail(&self, bin: &str) -> String {
        let text =
            std::fs::read_to_string(self.dir.path().join(format!("{bin}.log"))).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    /// Starts kube-apiserver (again, after [`ControlPlane::stop_apiserver`]) and waits until
    /// it is ready.
    pub fn start_apiserver(&self) -> anyhow::Result<()> {
        let d = self.dir.path();
        let p = |f: &str| d.join(f).display().to_string();
        let child = self.spawn(
            "kube-apiserver",
            &[
                format!("--etcd-servers=http://127.0.0.1:{}", self.etcd_port),
                "--bind-address=127.0.0.1".into(),
                "--advertise-address=127.0.0.1".into(),
                format!("--secure-port={}", self.port),
                format!("--cert-dir={}", p("apiserver-certs")),
                format!("--tls-cert-file={}", p("serving.crt")),
                format!("--tls-private-key-file={}", p("serving.key")),
                format!("--client-ca-file={}", p("ca.crt")),
                "--anonymous-auth=false".into(),
                "--authorization-mode=Node,RBAC".into(),
                "--enable-admission-plugins=NodeRestriction".into(),
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
                format!("--service-account-key-file={}", p("sa.pub")),
                format!("--service-account-signing-key-file={}", p("sa.key")),
                "--service-cluster-ip-range=10.43.0.0/16".into(),
                "--enable-bootstrap-token-auth=true".into(),
                "--profiling=false".into(),
                format!("--audit-log-path={}", p("audit.log")),
                format!("--audit-policy-file={}", p("audit-policy.yaml")),
                "--audit-log-format=json".into(),
                "--audit-log-maxsize=0".into(),
                "--v=1".into(),
            ],
        )?;
        *self.apiserver.lock().expect("lock") = Some(child);
        let up = Instant::now();
        loop {
            let ready = self
                .http
                .get(format!("{}/readyz", self.url()))
                .send()
                .is_ok_and(|r| r.status().is_success());
            if ready {
                return Ok(());
            }
            if let Some(c) = self.apiserver.lock().expect("lock").as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    bail!(
                        "kube-apiserver exited ({status}): {}",
                        self.log_tail("kube-apiserver")
                    );
                }
            }
            if up.elapsed() > Duration::from_secs(120) {
                bail!(
                    "kube-apiserver was not ready within 120 s: {}",
                    self.log_tail("kube-apiserver")
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops kube-apiserver (SIGKILL): the API is down, as when k3s restarts.
    pub fn stop_apiserver(&self) {
        if let Some(mut c) = self.apiserver.lock().expect("lock").take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Takes the API down (`true`) or brings it back (`false`).
    pub fn set_unreachable(&self, down: bool) {
        if down {
            self.stop_apiserver();
        } else if self.apiserver.lock().expect("lock").is_none() {
            self.start_apiserver().expect("kube-apiserver restarts");
        }
    }

    /// The API's address.
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// The cluster CA, PEM.
    pub fn ca_pem(&self) -> String {
        self.ca.pem()
    }

    /// The admin kubeconfig, in the shape k3s writes `/etc/rancher/k3s/k3s.yaml` on a
    /// server (`system:admin` in `system:masters`, inline certificate and SEC1 key).
    pub fn admin_kubeconfig(&self) -> String {
        kubeconfig::with_certificate(&self.url(), &self.ca.pem(), &self.admin)
    }

    /// What a server node's agent reads: k3s.yaml (the name is the node's, for the callers
    /// of the old stand-in; k3s gives every server the same admin credential).
    pub fn kubeconfig(&self, _node: &str) -> String {
        self.admin_kubeconfig()
    }

    /// A kubeconfig for a client certificate of user `cn` in `groups`.
    pub fn kubeconfig_for(&self, cn: &str, groups: &[&str]) -> String {
        kubeconfig::with_certificate(&self.url(), &self.ca.pem(), &self.ca.client(cn, groups))
    }

    /// The kubelet's own credential: `system:node:<name>` in `system:nodes`.
    pub fn node_kubeconfig(&self, node: &str) -> String {
        self.kubeconfig_for(&format!("system:node:{node}"), &["system:nodes"])
    }

    /// A kubeconfig with a bearer token.
    pub fn token_kubeconfig(&self, token: &str) -> String {
        kubeconfig::with_token(&self.url(), &self.ca.pem(), token)
    }

    /// A client for user `cn` in `groups` (a client certificate from the cluster CA).
    pub fn user(&self, cn: &str, groups: &[&str]) -> User {
        let p = self.ca.client(cn, groups);
        let mut pem = p.cert_pem.into_bytes();
        pem.extend_from_slice(p.key_pem.as_bytes());
        let http = reqwest::blocking::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(
                reqwest::Certificate::from_pem(self.ca.pem().as_bytes()).expect("CA"),
            )
            .identity(reqwest::Identity::from_pem(&pem).expect("identity"))
            .timeout(Duration::from_secs(30))
            .build()
            .expect("client");
        User {
            base: self.url(),
            http,
        }
    }

    /// The CA, to issue more client certificates.
    pub fn authority(&self) -> Arc<Authority> {
        self.ca.clone()
    }

    // ---- requests, as the admin ----

    /// GET `path` as the admin; `None` for 404 (or the API not answering).
    pub fn get(&self, path: &str) -> Option<Value> {
        let r = self.http.get(format!("{}{path}", self.url())).send().ok()?;
        if !r.status().is_success() {
            return None;
        }
        r.json().ok()
    }

    /// Sends `body` with `method` as the admin; the answer, or the API's error.
    pub fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        content_type: &str,
        body: &Value,
    ) -> anyhow::Result<Value> {
        let r = self
            .http
            .request(method.clone(), format!("{}{path}", self.url()))
            .header("content-type", content_type)
            .body(serde_json::to_vec(body)?)
            .send()?;
        let code = r.status();
        let v: Value = r.json().unwrap_or(Value::Null);
        if !code.is_success() {
            bail!("{method} {path}: {code}: {}", v["message"]);
        }
        Ok(v)
    }

    /// Creates an object (POST to its collection).
    pub fn create(&self, collection: &str, object: &Value) -> anyhow::Result<Value> {
        self.send(
            reqwest::Method::POST,
            collection,
            "application/json",
            object,
        )
    }

    /// Merge-patches an object.
    pub fn patch(&self, path: &str, patch: &Value) -> anyhow::Result<Value> {
        self.send(
            reqwest::Method::PATCH,
            path,
            "application/merge-patch+json",
            patch,
        )
    }

    /// Deletes an object (404 is not an error).
    pub fn delete_path(&self, path: &str) {
        let _ = self.http.delete(format!("{}{path}", self.url())).send();
    }

    /// The path of an object of a kind nk3 uses.
    pub fn path(resource: &str, ns: &str, name: &str) -> String {
        let group = match resource {
            "leases" => "/apis/coordination.k8s.io/v1",
            "poddisruptionbudgets" => "/apis/policy/v1",
            "deployments" | "daemonsets" | "replicasets" | "statefulsets" => "/apis/apps/v1",
            _ => "/api/v1",
        };
        if ns.is_empty() {
            format!("{group}/{resource}/{name}")
        } else {
            format!("{group}/namespaces/{ns}/{resource}/{name}")
        }
    }

    /// An object (`resource` as in the URL: `leases`, `nodes`, `pods`…).
    pub fn get_object(&self, resource: &str, ns: &str, name: &str) -> Option<Value> {
        self.get(&Self::path(resource, ns, name))
    }

    /// A Node.
    pub fn node(&self, name: &str) -> Option<Value> {
        self.get_object("nodes", "", name)
    }

    /// Deletes an object.
    pub fn delete(&self, resource: &str, ns: &str, name: &str) {
        self.delete_path(&Self::path(resource, ns, name));
    }

    /// Every Node's name with its Ready condition's status (`True`, `False`, `Unknown`).
    pub fn node_readiness(&self) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        if let Some(list) = self.get("/api/v1/nodes") {
            for n in list["items"].as_array().into_iter().flatten() {
                let ready = n["status"]["conditions"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|c| c["type"] == "Ready")
                    .and_then(|c| c["status"].as_str())
                    .unwrap_or("None")
                    .to_string();
                out.insert(n["metadata"]["name"].as_str().unwrap_or("").into(), ready);
            }
        }
        out
    }

    /// Waits until the Node's Ready condition is `status`; false when `timeout` passed.
    pub fn wait_ready(&self, node: &str, status: &str, timeout: Duration) -> bool {
        let until = Instant::now() + timeout;
        while Instant::now() < until {
            if self.node_readiness().get(node).map(String::as_str) == Some(status) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    }

    // ---- machines ----

    /// Starts a kubelet stand-in for `node` (it registers the Node and heartbeats with the
    /// node's own credentials), reporting the boot id read from `boot_id_file` (a machine's
    /// `/proc/sys/kernel/random/boot_id`) or a fixed one. Waits until the Node is Ready.
    pub fn add_node_with_boot_id(&self, node: &str, boot_id_file: Option<&Path>) {
        let k = Kubelet::start(self, node, boot_id_file.map(Path::to_path_buf));
        self.kubelets.lock().expect("lock").insert(node.into(), k);
        assert!(
            self.wait_ready(node, "True", Duration::from_secs(30)),
            "node {node} did not get Ready"
        );
    }

    /// The kubelet of `node` reports the boot id in `file` from now on (a machine's
    /// `boot_id`, which a reboot changes: the kubelet then starts anew).
    pub fn set_boot_id_file(&self, node: &str, file: &Path) {
        if let Some(k) = self.kubelets.lock().expect("lock").get(node) {
            k.set_boot_id_file(Some(file.to_path_buf()));
        }
    }

    /// A Node whose kubelet heartbeats, with a boot id of its own.
    pub fn add_node(&self, node: &str) {
        self.add_node_with_boot_id(node, None);
    }

    /// The machine stops (power off, reboot): its kubelet stops heartbeating and handling
    /// pods. The node-lifecycle controller marks it Unknown after the grace period.
    pub fn stop_kubelet(&self, node: &str) {
        if let Some(k) = self.kubelets.lock().expect("lock").get(node) {
            k.stop();
        }
    }

    /// The machine's k3s starts again (after a reboot, with the machine's boot id).
    pub fn start_kubelet(&self, node: &str) {
        if let Some(k) = self.kubelets.lock().expect("lock").get(node) {
            k.resume();
        }
    }

    /// For the old stand-in's callers: the machine up (`true`) or down.
    pub fn set_ready(&self, node: &str, ready: bool) {
        if ready {
            self.start_kubelet(node);
        } else {
            self.stop_kubelet(node);
        }
    }

    // ---- workloads ----

    /// A pod bound to `node` (no controller), which its kubelet runs; it terminates
    /// `grace` seconds after it is asked to.
    pub fn add_pod(&self, ns: &str, name: &str, node: &str, labels: Value, grace: u64) {
        self.ensure_namespace(ns);
        self.create(
            &format!("/api/v1/namespaces/{ns}/pods"),
            &json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": { "name": name, "namespace": ns, "labels": labels },
                "spec": pod_spec(Some(node), grace),
            }),
        )
        .expect("create pod");
    }

    /// A DaemonSet: its controller makes a pod for every node and the scheduler binds them.
    pub fn add_daemonset(&self, ns: &str, name: &str, labels: Value) {
        self.ensure_namespace(ns);
        self.create(
            &format!("/apis/apps/v1/namespaces/{ns}/daemonsets"),
            &json!({
                "apiVersion": "apps/v1", "kind": "DaemonSet",
                "metadata": { "name": name, "namespace": ns },
                "spec": {
                    "selector": { "matchLabels": labels },
                    "template": { "metadata": { "labels": labels }, "spec": pod_spec(None, 0) },
                },
            }),
        )
        .expect("create daemonset");
    }

    /// A Deployment of `replicas`; the scheduler places its pods.
    pub fn add_deployment(&self, ns: &str, name: &str, replicas: u32, labels: Value, grace: u64) {
        self.ensure_namespace(ns);
        self.create(
            &format!("/apis/apps/v1/namespaces/{ns}/deployments"),
            &json!({
                "apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": { "name": name, "namespace": ns },
                "spec": {
                    "replicas": replicas,
                    "selector": { "matchLabels": labels },
                    "template": { "metadata": { "labels": labels }, "spec": pod_spec(None, grace) },
                },
            }),
        )
        .expect("create deployment");
    }

    /// A PodDisruptionBudget with `minAvailable`; the disruption controller keeps its
    /// `disruptionsAllowed`.
    pub fn add_pdb(&self, ns: &str, name: &str, labels: Value, min_available: i64) {
        self.ensure_namespace(ns);
        self.create(
            &format!("/apis/policy/v1/namespaces/{ns}/poddisruptionbudgets"),
            &json!({
                "apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
                "metadata": { "name": name, "namespace": ns },
                "spec": { "minAvailable": min_available, "selector": { "matchLabels": labels } },
            }),
        )
        .expect("create pdb");
    }

    /// Creates the namespace if it is not there.
    pub fn ensure_namespace(&self, ns: &str) {
        if self.get(&format!("/api/v1/namespaces/{ns}")).is_none() {
            let _ = self.create(
                "/api/v1/namespaces",
                &json!({ "apiVersion": "v1", "kind": "Namespace", "metadata": { "name": ns } }),
            );
        }
    }

    /// The pods bound to `node`, as the admin sees them.
    pub fn pods_on(&self, node: &str) -> Vec<Value> {
        self.get(&format!(
            "/api/v1/pods?fieldSelector=spec.nodeName%3D{node}"
        ))
        .and_then(|l| l["items"].as_array().cloned())
        .unwrap_or_default()
    }

    /// Waits until `f` holds, up to `timeout`.
    pub fn wait_for(&self, timeout: Duration, f: impl Fn(&ControlPlane) -> bool) -> bool {
        let until = Instant::now() + timeout;
        while Instant::now() < until {
            if f(self) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    }

    // ---- the audit log ----

    /// Every request the API server finished so far, in order.
    pub fn requests(&self) -> Vec<Write> {
        let path = self.dir.path().join("audit.log");
        let mut cache = self.audit.lock().expect("lock");
        let Ok(mut f) = std::fs::File::open(&path) else {
            return cache.1.clone();
        };
        use std::io::{Seek as _, SeekFrom};
        if f.seek(SeekFrom::Start(cache.0)).is_err() {
            return cache.1.clone();
        }
        let mut reader = std::io::BufReader::new(f);
        let mut line = String::new();
        loop {
            line.clear();
            match reader.read_line(&mut line) {
                // The end, or a line the API server is still writing: read it next time.
                Ok(0) | Err(_) => break,
                Ok(_) if !line.ends_with('\n') => break,
                Ok(n) => {
                    cache.0 += n as u64;
                    if let Some(w) = parse_audit(&line) {
                        cache.1.push(w);
                    }
                }
            }
        }
        cache.1.clone()
    }

    /// The successful writes, in the order etcd committed them: by the written object's
    /// resourceVersion (one counter for every object), a write answered without one (a
    /// delete's `Status`) keeping the place of the write finished just before it.
    pub fn writes(&self) -> Vec<Write> {
        let mut last = 0;
        let mut keyed: Vec<(u64, Write)> = self
            .requests()
            .into_iter()
            .filter(|w| {
                matches!(w.verb.as_str(), "create" | "update" | "patch" | "delete")
                    && (200..300).contains(&w.code)
            })
            .map(|w| {
                let rv = w.object["metadata"]["resourceVersion"]
                    .as_str()
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(last);
                last = last.max(rv);
                (rv, w)
            })
            .collect();
        keyed.sort_by_key(|(rv, _)| *rv);
        keyed.into_iter().map(|(_, w)| w).collect()
    }

    /// Where the components' logs and data are (kept while this value lives).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

fn parse_audit(line: &str) -> Option<Write> {
    let v: Value = serde_json::from_str(line).ok()?;
    if v["stage"] != "ResponseComplete" {
        return None;
    }
    let at = humantime::parse_rfc3339(v["stageTimestamp"].as_str()?).ok()?;
    let r = &v["objectRef"];
    Some(Write {
        at,
        verb: v["verb"].as_str().unwrap_or_default().into(),
        resource: r["resource"].as_str().unwrap_or_default().into(),
        subresource: r["subresource"].as_str().unwrap_or_default().into(),
        namespace: r["namespace"].as_str().unwrap_or_default().into(),
        name: r["name"]
            .as_str()
            .or_else(|| v["responseObject"]["metadata"]["name"].as_str())
            .unwrap_or_default()
            .into(),
        user: v["user"]["username"].as_str().unwrap_or_default().into(),
        user_agent: v["userAgent"].as_str().unwrap_or_default().into(),
        code: v["responseStatus"]["code"].as_u64().unwrap_or(0) as u16,
        object: v["responseObject"].clone(),
    })
}

fn pod_spec(node: Option<&str>, grace: u64) -> Value {
    let mut spec = json!({
        "terminationGracePeriodSeconds": grace,
        "containers": [{ "name": "main", "image": "registry.k8s.io/pause:3.10" }],
    });
    if let Some(n) = node {
        spec["nodeName"] = json!(n);
    }
    spec
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        for (_, k) in std::mem::take(&mut *self.kubelets.lock().expect("lock")) {
            k.shutdown();
        }
        let mut all = std::mem::take(&mut *self.others.lock().expect("lock"));
        if let Some(a) = self.apiserver.lock().expect("lock").take() {
            all.insert(0, a);
        }
        // The controllers first, then the API server, etcd last.
        all.reverse();
        for mut c in all {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::env::var_os("NK3_KEEP_CONTROLPLANE").is_some() {
            let kept = std::mem::replace(
                &mut self.dir,
                tempfile::tempdir().expect("a temporary folder"),
            );
            eprintln!("control plane logs kept in {}", kept.keep().display());
        }
    }
}
