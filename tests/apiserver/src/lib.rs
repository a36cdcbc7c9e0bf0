//! A stand-in for the parts of the Kubernetes API that nk3 uses, for nk3's tests: no
//! kube-apiserver runs on the machines nk3 is developed on.
//!
//! It behaves like the real server for what nk3 does, rather than answering what a client
//! wants to hear: HTTPS with client-certificate (or bearer token) authentication,
//! `resourceVersion` on every object and `409 Conflict` with a `Status` body on stale writes,
//! `404`/`422` where the real server gives them, watch streams of newline-delimited events,
//! JSON merge patch and strategic merge patch on nodes, the Eviction subresource answering
//! `429` while a PodDisruptionBudget would be violated, pods that go away after their grace
//! period, and Lease objects as coordination.k8s.io/v1 defines them (checked by
//! deserialising into the `k8s-openapi` types). Every write is recorded with its time, so
//! tests can check the rollout's safety invariants from the log.

mod objects;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{json, Value};
use tokio::sync::broadcast;

// The certificates and kubeconfigs of the real control plane's harness, so both servers
// hand out credentials in the shape k3s writes (SEC1 keys included).
use nk3_controlplane::{certs as tls, kubeconfig};

pub use objects::status;

/// One write the server accepted.
#[derive(Debug, Clone)]
pub struct Write {
    /// When it was applied.
    pub at: SystemTime,
    /// Who wrote (the client certificate's name, or the token's user).
    pub user: String,
    /// `create`, `update`, `patch`, `delete`, `evict`.
    pub verb: String,
    /// `leases`, `nodes`, `pods`, `events`.
    pub resource: String,
    /// The object's name.
    pub name: String,
    /// The object after the write (for deletes: before).
    pub object: Value,
}

/// A change to an object, for watchers.
#[derive(Debug, Clone)]
struct Change {
    resource: String,
    namespace: String,
    name: String,
    kind: &'static str,
    object: Value,
}

/// Everything the server holds.
#[derive(Default)]
struct World {
    rv: u64,
    /// (resource, namespace, name) → object. Cluster-scoped objects have namespace "".
    objects: BTreeMap<(String, String, String), Value>,
    writes: Vec<Write>,
    faults: Vec<u16>,
    write_faults: Vec<u16>,
    unreachable: bool,
    tokens: BTreeMap<String, String>,
}

type Shared = Arc<Mutex<World>>;

/// A running API server on 127.0.0.1.
pub struct ApiServer {
    /// `https://127.0.0.1:<port>`.
    pub url: String,
    ca: tls::Authority,
    world: Shared,
    changes: broadcast::Sender<Change>,
    rt: Option<tokio::runtime::Runtime>,
}

impl std::fmt::Debug for ApiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiServer").field("url", &self.url).finish()
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

type Body = BoxBody<Bytes, Infallible>;

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).boxed()
}

impl ApiServer {
    /// Starts a server with a fresh CA on a free loopback port.
    pub fn start() -> ApiServer {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let ca = tls::Authority::new("k3s-server-ca");
        let server = ca.server();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr: SocketAddr = listener.local_addr().unwrap();
        let world: Shared = Arc::default();
        let (changes, _) = broadcast::channel(1024);
        let acceptor = objects::acceptor(&ca, &server);
        let (w, c) = (world.clone(), changes.clone());
        rt.spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                if w.lock().unwrap().unreachable {
                    drop(tcp);
                    continue;
                }
                let (acceptor, w, c) = (acceptor.clone(), w.clone(), c.clone());
                tokio::spawn(async move {
                    let Ok(stream) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let user = objects::peer_name(stream.get_ref().1);
                    let service = hyper::service::service_fn(move |req| {
                        let (w, c, user) = (w.clone(), c.clone(), user.clone());
                        async move { Ok::<_, Infallible>(handle(req, w, c, user).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        ApiServer {
            url: format!("https://{addr}"),
            ca,
            world,
            changes,
            rt: Some(rt),
        }
    }

    /// The CA's certificate, PEM.
    pub fn ca_pem(&self) -> String {
        self.ca.pem()
    }

    /// A kubeconfig as k3s writes it, with a client certificate for `user`.
    pub fn kubeconfig(&self, user: &str) -> String {
        kubeconfig::with_certificate(&self.url, &self.ca.pem(), &self.ca.client(user, &[]))
    }

    /// A kubeconfig with a bearer token for `user` (agent-role nodes).
    pub fn token_kubeconfig(&self, user: &str) -> String {
        let token = format!("token-{user}-{}", self.world.lock().unwrap().tokens.len());
        self.world
            .lock()
            .unwrap()
            .tokens
            .insert(token.clone(), user.to_string());
        kubeconfig::with_token(&self.url, &self.ca.pem(), &token)
    }

    /// A kubeconfig whose CA is not the one that signed the server's certificate.
    pub fn kubeconfig_with_wrong_ca(&self, user: &str) -> String {
        let other = tls::Authority::new("someone-else");
        kubeconfig::with_certificate(&self.url, &other.pem(), &self.ca.client(user, &[]))
    }

    fn put(&self, resource: &str, ns: &str, name: &str, mut object: Value) {
        let mut w = self.world.lock().unwrap();
        w.rv += 1;
        object["metadata"]["resourceVersion"] = json!(w.rv.to_string());
        object["metadata"]["name"] = json!(name);
        if !ns.is_empty() {
            object["metadata"]["namespace"] = json!(ns);
        }
        let kind = if w
            .objects
            .contains_key(&(resource.into(), ns.into(), name.into()))
        {
            "MODIFIED"
        } else {
            "ADDED"
        };
        w.objects
            .insert((resource.into(), ns.into(), name.into()), object.clone());
        let _ = self.changes.send(Change {
            resource: resource.into(),
            namespace: ns.into(),
            name: name.into(),
            kind,
            object,
        });
    }

    /// Adds (or replaces) a node, Ready or not.
    pub fn add_node(&self, name: &str, ready: bool) {
        self.put("nodes", "", name, objects::node(name, ready));
    }

    /// Makes a node Ready or NotReady, as the kubelet's status would.
    pub fn set_ready(&self, name: &str, ready: bool) {
        let mut n = self.node(name).expect("no such node");
        n["status"] = objects::node(name, ready)["status"].clone();
        self.put("nodes", "", name, n);
    }

    /// A node as stored.
    pub fn node(&self, name: &str) -> Option<Value> {
        self.get("nodes", "", name)
    }

    /// Any object as stored.
    pub fn get(&self, resource: &str, ns: &str, name: &str) -> Option<Value> {
        self.world
            .lock()
            .unwrap()
            .objects
            .get(&(resource.into(), ns.into(), name.into()))
            .cloned()
    }

    /// Stores an object as given (tests use it to set up a lease of a dead holder, say).
    pub fn set(&self, resource: &str, ns: &str, name: &str, object: Value) {
        self.put(resource, ns, name, object);
    }

    /// Adds a pod on `node`. `owner` is its controller kind (`DaemonSet`, `ReplicaSet`), if
    /// any; `grace` its termination grace period.
    pub fn add_pod(
        &self,
        ns: &str,
        name: &str,
        node: &str,
        labels: Value,
        owner: Option<&str>,
        grace: u64,
    ) {
        self.put(
            "pods",
            ns,
            name,
            objects::pod(name, node, labels, owner, grace),
        );
    }

    /// Adds a PodDisruptionBudget: at least `min_available` pods matching `labels` stay up.
    pub fn add_pdb(&self, ns: &str, name: &str, labels: Value, min_available: i64) {
        self.put(
            "poddisruptionbudgets",
            ns,
            name,
            json!({
                "apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
                "metadata": {},
                "spec": { "minAvailable": min_available, "selector": { "matchLabels": labels } },
            }),
        );
    }

    /// Deletes an object as `kubectl delete` would (an operator removing a dead Node), and
    /// logs it.
    pub fn delete(&self, resource: &str, ns: &str, name: &str) {
        let mut w = self.world.lock().unwrap();
        if let Some(v) = w.objects.remove(&(resource.into(), ns.into(), name.into())) {
            w.writes.push(Write {
                at: SystemTime::now(),
                user: "operator".into(),
                verb: "delete".into(),
                resource: resource.into(),
                name: name.into(),
                object: v.clone(),
            });
            let _ = self.changes.send(Change {
                resource: resource.into(),
                namespace: ns.into(),
                name: name.into(),
                kind: "DELETED",
                object: v,
            });
        }
    }

    /// Every write so far, in order.
    pub fn writes(&self) -> Vec<Write> {
        self.world.lock().unwrap().writes.clone()
    }

    /// The next `n` requests (of any kind) are answered with `status` (429 or 5xx).
    pub fn fail_next(&self, n: usize, status: u16) {
        let mut w = self.world.lock().unwrap();
        w.faults.extend(std::iter::repeat_n(status, n));
    }

    /// The next `n` writes (not reads) are answered with `status`.
    pub fn fail_next_writes(&self, n: usize, status: u16) {
        let mut w = self.world.lock().unwrap();
        w.write_faults.extend(std::iter::repeat_n(status, n));
    }

    /// While set, connections are closed at once (the API is down).
    pub fn set_unreachable(&self, down: bool) {
        self.world.lock().unwrap().unreachable = down;
    }
}

fn respond(code: StatusCode, body: Value) -> Response<Body> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(full(body.to_string()))
        .unwrap()
}

fn query(req: &Request<Incoming>) -> BTreeMap<String, String> {
    req.uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.replace("%3D", "=").replace("%2C", ",")))
        .collect()
}

async fn handle(
    req: Request<Incoming>,
    world: Shared,
    changes: broadcast::Sender<Change>,
    cert_user: Option<String>,
) -> Response<Body> {
    // Authentication: a client certificate the CA signed, or a known bearer token.
    let token_user = req
        .headers()
        .get("authorization")
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.strip_prefix("Bearer "))
        .and_then(|t| world.lock().unwrap().tokens.get(t).cloned());
    let Some(user) = cert_user.or(token_user) else {
        return respond(
            StatusCode::UNAUTHORIZED,
            status(401, "Unauthorized", "Unauthorized"),
        );
    };
    let is_write = req.method() != hyper::Method::GET;
    if let Some(code) = {
        let mut w = world.lock().unwrap();
        if !w.faults.is_empty() {
            Some(w.faults.remove(0))
        } else if is_write && !w.write_faults.is_empty() {
            Some(w.write_faults.remove(0))
        } else {
            None
        }
    } {
        let code = StatusCode::from_u16(code).unwrap();
        let mut r = respond(
            code,
            status(
                code.as_u16(),
                code.canonical_reason().unwrap_or("Error"),
                "injected by the test",
            ),
        );
        if code == StatusCode::TOO_MANY_REQUESTS {
            r.headers_mut().insert("retry-after", "1".parse().unwrap());
        }
        return r;
    }
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let q = query(&req);
    let content_type = req
        .headers()
        .get("content-type")
        .and_then(|h| h.to_str().ok())
        .unwrap_or("")
        .to_string();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let seg: Vec<&str> = path.trim_matches('/').split('/').collect();
    let ctx = objects::Ctx {
        world: &world,
        changes: &changes,
        user: &user,
    };
    match (method.clone(), seg.as_slice()) {
        (Method::GET, ["readyz"] | ["livez"] | ["healthz"]) => Response::new(full("ok")),
        // Leases.
        (Method::GET, ["apis", "coordination.k8s.io", "v1", "namespaces", ns, "leases"])
            if q.get("watch").is_some_and(|w| w == "1" || w == "true") =>
        {
            watch(&world, &changes, "leases", ns, &q)
        }
        (m, ["apis", "coordination.k8s.io", "v1", "namespaces", ns, "leases", rest @ ..]) => {
            ctx.crud(m, "leases", ns, rest.first().copied(), &body, &content_type)
        }
        // Nodes.
        (Method::GET, ["api", "v1", "nodes"])
            if q.get("watch").is_some_and(|w| w == "1" || w == "true") =>
        {
            watch(&world, &changes, "nodes", "", &q)
        }
        (m, ["api", "v1", "nodes", rest @ ..]) => {
            ctx.crud(m, "nodes", "", rest.first().copied(), &body, &content_type)
        }
        // Pods, eviction, events.
        (Method::GET, ["api", "v1", "pods"]) => ctx.list("pods", None, &q),
        (Method::GET, ["api", "v1", "namespaces", ns, "pods"]) => ctx.list("pods", Some(ns), &q),
        (Method::POST, ["api", "v1", "namespaces", ns, "pods", name, "eviction"]) => {
            ctx.evict(ns, name, &body)
        }
        (m, ["api", "v1", "namespaces", ns, "pods", rest @ ..]) => {
            ctx.crud(m, "pods", ns, rest.first().copied(), &body, &content_type)
        }
        (m, ["api", "v1", "namespaces", ns, "events", rest @ ..]) => {
            ctx.crud(m, "events", ns, rest.first().copied(), &body, &content_type)
        }
        // Workloads of watch_namespaces.
        (
            Method::GET,
            ["apis", "apps", "v1", "namespaces", ns, res @ ("daemonsets" | "deployments")],
        ) => ctx.list(res, Some(ns), &q),
        _ => respond(
            StatusCode::NOT_FOUND,
            status(
                404,
                "NotFound",
                &format!("the server could not find the requested resource ({method} {path})"),
            ),
        ),
    }
}

/// A watch: the matching objects changed since `resourceVersion` (or all, as ADDED, without
/// one), then every change as it happens, one JSON event per line, until `timeoutSeconds`.
fn watch(
    world: &Shared,
    changes: &broadcast::Sender<Change>,
    resource: &str,
    ns: &str,
    q: &BTreeMap<String, String>,
) -> Response<Body> {
    let name = q
        .get("fieldSelector")
        .and_then(|f| f.strip_prefix("metadata.name="))
        .map(str::to_string);
    let since: u64 = q
        .get("resourceVersion")
        .and_then(|r| r.parse().ok())
        .unwrap_or(0);
    let timeout = Duration::from_secs(
        q.get("timeoutSeconds")
            .and_then(|t| t.parse().ok())
            .unwrap_or(1800),
    );
    let mut rx = changes.subscribe();
    let initial: Vec<Value> = {
        let w = world.lock().unwrap();
        w.objects
            .iter()
            .filter(|((r, n, o), _)| r == resource && n == ns && name.as_ref().is_none_or(|x| x == o))
            .filter(|(_, v)| objects::rv(v) > since)
            .map(|(_, v)| json!({ "type": if since == 0 { "ADDED" } else { "MODIFIED" }, "object": v }))
            .collect()
    };
    let (mut tx, body) = http_body_util::channel::Channel::<Bytes, Infallible>::new(16);
    let (resource, ns) = (resource.to_string(), ns.to_string());
    tokio::spawn(async move {
        for e in initial {
            if tx.send_data(Bytes::from(format!("{e}\n"))).await.is_err() {
                return;
            }
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let change = tokio::select! {
                c = rx.recv() => c,
                _ = tokio::time::sleep_until(deadline) => return,
            };
            let Ok(c) = change else { return };
            if c.resource != resource
                || c.namespace != ns
                || name.as_ref().is_some_and(|n| *n != c.name)
            {
                continue;
            }
            let line = json!({ "type": c.kind, "object": c.object });
            if tx
                .send_data(Bytes::from(format!("{line}\n")))
                .await
                .is_err()
            {
                return;
            }
        }
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(body.boxed())
        .unwrap()
}
