//! Objects, their REST verbs, and the TLS side of the server.
// Handlers return ready-made error responses; boxing them would only add noise here.
#![allow(clippy::result_large_err)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use hyper::{Method, Response, StatusCode};
use serde_json::{json, Value};
use tokio::sync::broadcast;

use super::{respond, Body, Change, Shared, Write};

/// A `Status` object as the API server sends with errors.
pub fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": if code < 400 { "Success" } else { "Failure" },
        "message": message, "reason": reason, "code": code,
    })
}

/// An object's resourceVersion as a number.
pub fn rv(v: &Value) -> u64 {
    v["metadata"]["resourceVersion"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

fn now_rfc3339() -> String {
    let secs = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    // Civil date from days since the epoch (Howard Hinnant's algorithm).
    let (days, rem) = ((secs / 86400) as i64, secs % 86400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// A Node as the kubelet reports it.
pub fn node(name: &str, ready: bool) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": { "name": name, "labels": { "kubernetes.io/hostname": name }, "annotations": {} },
        "spec": {},
        "status": { "conditions": [{
            "type": "Ready",
            "status": if ready { "True" } else { "False" },
            "reason": if ready { "KubeletReady" } else { "KubeletNotReady" },
            "lastHeartbeatTime": now_rfc3339(),
            "lastTransitionTime": now_rfc3339(),
        }] },
    })
}

/// A running Pod on `node`.
pub fn pod(name: &str, node: &str, labels: Value, owner: Option<&str>, grace: u64) -> Value {
    let owners = match owner {
        Some(kind) => {
            json!([{ "apiVersion": "apps/v1", "kind": kind, "name": format!("{name}-owner"), "uid": format!("uid-{name}-owner"), "controller": true }])
        }
        None => json!([]),
    };
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": { "name": name, "labels": labels, "ownerReferences": owners },
        "spec": { "nodeName": node, "terminationGracePeriodSeconds": grace, "containers": [{ "name": "main", "image": "busybox" }] },
        "status": { "phase": "Running" },
    })
}

/// The TLS acceptor: the server certificate, and client certificates verified against the
/// CA when presented (a request without one must bring a bearer token).
pub fn acceptor(
    ca: &super::tls::Authority,
    server: &super::tls::Pair,
) -> tokio_rustls::TlsAcceptor {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca.pem().as_bytes()).unwrap())
        .unwrap();
    let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(roots))
        .allow_unauthenticated()
        .build()
        .unwrap();
    let certs = vec![CertificateDer::from_pem_slice(server.cert_pem.as_bytes()).unwrap()];
    let key = PrivateKeyDer::from_pem_slice(server.key_pem.as_bytes()).unwrap();
    let config = rustls::ServerConfig::builder()
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .unwrap();
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

/// The common name of the verified client certificate, if one was presented.
pub fn peer_name(conn: &rustls::ServerConnection) -> Option<String> {
    let der = conn.peer_certificates()?.first()?.as_ref().to_vec();
    // The subject's CN is the last commonName (OID 2.5.4.3) in the certificate: the issuer's
    // comes first.
    let oid = [0x06, 0x03, 0x55, 0x04, 0x03];
    let at = der.windows(5).rposition(|w| w == oid)? + 5;
    let len = *der.get(at + 1)? as usize;
    let bytes = der.get(at + 2..at + 2 + len)?;
    Some(String::from_utf8_lossy(bytes).into_owned())
}

/// What a request needs of the server.
pub struct Ctx<'a> {
    pub world: &'a Shared,
    pub changes: &'a broadcast::Sender<Change>,
    pub user: &'a str,
}

fn kind_of(resource: &str) -> (&'static str, &'static str) {
    match resource {
        "leases" => ("Lease", "coordination.k8s.io/v1"),
        "nodes" => ("Node", "v1"),
        "pods" => ("Pod", "v1"),
        "events" => ("Event", "v1"),
        "daemonsets" => ("DaemonSet", "apps/v1"),
        "deployments" => ("Deployment", "apps/v1"),
        _ => ("Unknown", "v1"),
    }
}

/// Checks a body has the shape the API defines for the resource (via k8s-openapi's types).
fn validate(resource: &str, v: &Value) -> Result<(), String> {
    use k8s_openapi::api;
    let r = match resource {
        "leases" => serde_json::from_value::<api::coordination::v1::Lease>(v.clone()).map(|_| ()),
        "nodes" => serde_json::from_value::<api::core::v1::Node>(v.clone()).map(|_| ()),
        "pods" => serde_json::from_value::<api::core::v1::Pod>(v.clone()).map(|_| ()),
        "events" => serde_json::from_value::<api::core::v1::Event>(v.clone()).map(|_| ()),
        _ => Ok(()),
    };
    r.map_err(|e| e.to_string())
}

/// RFC 7386 JSON merge patch.
fn merge(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = json!({});
            }
            let t = target.as_object_mut().unwrap();
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        other => *target = other.clone(),
    }
}

impl Ctx<'_> {
    fn record(&self, w: &mut super::World, verb: &str, resource: &str, name: &str, object: &Value) {
        w.writes.push(Write {
            at: SystemTime::now(),
            user: self.user.to_string(),
            verb: verb.into(),
            resource: resource.into(),
            name: name.into(),
            object: object.clone(),
        });
    }

    fn notify(&self, resource: &str, ns: &str, name: &str, kind: &'static str, object: &Value) {
        let _ = self.changes.send(Change {
            resource: resource.into(),
            namespace: ns.into(),
            name: name.into(),
            kind,
            object: object.clone(),
        });
    }

    /// GET (one or list), POST, PUT, PATCH, DELETE.
    pub fn crud(
        &self,
        m: Method,
        resource: &str,
        ns: &str,
        name: Option<&str>,
        body: &[u8],
        content_type: &str,
    ) -> Response<Body> {
        let (kind, api_version) = kind_of(resource);
        let key = |n: &str| (resource.to_string(), ns.to_string(), n.to_string());
        let not_found = |n: &str| {
            respond(
                StatusCode::NOT_FOUND,
                status(404, "NotFound", &format!("{resource} \"{n}\" not found")),
            )
        };
        let parsed = || -> Result<Value, Response<Body>> {
            serde_json::from_slice(body).map_err(|e| {
                respond(
                    StatusCode::BAD_REQUEST,
                    status(400, "BadRequest", &format!("invalid JSON: {e}")),
                )
            })
        };
        match (m, name) {
            (Method::GET, None) => {
                self.list(resource, (!ns.is_empty()).then_some(ns), &BTreeMap::new())
            }
            (Method::GET, Some(n)) => match self.world.lock().unwrap().objects.get(&key(n)) {
                Some(v) => respond(StatusCode::OK, v.clone()),
                None => not_found(n),
            },
            (Method::POST, None) => {
                let mut v = match parsed() {
                    Ok(v) => v,
                    Err(r) => return r,
                };
                let Some(n) = v["metadata"]["name"].as_str().map(str::to_string) else {
                    return respond(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        status(
                            422,
                            "Invalid",
                            &format!(
                                "{kind}.{api_version} is invalid: metadata.name: Required value"
                            ),
                        ),
                    );
                };
                if let Err(e) = validate(resource, &v) {
                    return respond(StatusCode::BAD_REQUEST, status(400, "BadRequest", &e));
                }
                if let Some(r) = self.invalid(resource, &v) {
                    return r;
                }
                let mut w = self.world.lock().unwrap();
                if w.objects.contains_key(&key(&n)) {
                    return respond(
                        StatusCode::CONFLICT,
                        status(
                            409,
                            "AlreadyExists",
                            &format!("{resource} \"{n}\" already exists"),
                        ),
                    );
                }
                w.rv += 1;
                v["kind"] = json!(kind);
                v["apiVersion"] = json!(api_version);
                v["metadata"]["resourceVersion"] = json!(w.rv.to_string());
                v["metadata"]["uid"] = json!(format!("uid-{}", w.rv));
                v["metadata"]["creationTimestamp"] = json!(now_rfc3339());
                if !ns.is_empty() {
                    v["metadata"]["namespace"] = json!(ns);
                }
                w.objects.insert(key(&n), v.clone());
                self.record(&mut w, "create", resource, &n, &v);
                drop(w);
                self.notify(resource, ns, &n, "ADDED", &v);
                respond(StatusCode::CREATED, v)
            }
            (Method::PUT, Some(n)) => {
                let mut v = match parsed() {
                    Ok(v) => v,
                    Err(r) => return r,
                };
                if let Err(e) = validate(resource, &v) {
                    return respond(StatusCode::BAD_REQUEST, status(400, "BadRequest", &e));
                }
                if let Some(r) = self.invalid(resource, &v) {
                    return r;
                }
                let mut w = self.world.lock().unwrap();
                let Some(current) = w.objects.get(&key(n)).cloned() else {
                    return not_found(n);
                };
                if let Some(given) = v["metadata"]["resourceVersion"].as_str() {
                    if given
                        != current["metadata"]["resourceVersion"]
                            .as_str()
                            .unwrap_or("")
                    {
                        return respond(StatusCode::CONFLICT, status(409, "Conflict", &format!("Operation cannot be fulfilled on {resource} \"{n}\": the object has been modified; please apply your changes to the latest version and try again")));
                    }
                }
                w.rv += 1;
                v["kind"] = json!(kind);
                v["apiVersion"] = json!(api_version);
                v["metadata"]["resourceVersion"] = json!(w.rv.to_string());
                v["metadata"]["uid"] = current["metadata"]["uid"].clone();
                v["metadata"]["creationTimestamp"] =
                    current["metadata"]["creationTimestamp"].clone();
                w.objects.insert(key(n), v.clone());
                self.record(&mut w, "update", resource, n, &v);
                drop(w);
                self.notify(resource, ns, n, "MODIFIED", &v);
                respond(StatusCode::OK, v)
            }
            (Method::PATCH, Some(n)) => {
                if !matches!(
                    content_type,
                    "application/merge-patch+json" | "application/strategic-merge-patch+json"
                ) {
                    return respond(StatusCode::UNSUPPORTED_MEDIA_TYPE, status(415, "UnsupportedMediaType", &format!("the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml, application/strategic-merge-patch+json (got {content_type:?})")));
                }
                let patch = match parsed() {
                    Ok(v) => v,
                    Err(r) => return r,
                };
                let mut w = self.world.lock().unwrap();
                let Some(mut v) = w.objects.get(&key(n)).cloned() else {
                    return not_found(n);
                };
                if let Some(given) = patch["metadata"]["resourceVersion"].as_str() {
                    if given != v["metadata"]["resourceVersion"].as_str().unwrap_or("") {
                        return respond(StatusCode::CONFLICT, status(409, "Conflict", &format!("Operation cannot be fulfilled on {resource} \"{n}\": the object has been modified; please apply your changes to the latest version and try again")));
                    }
                }
                // For the fields nk3 patches (annotations, spec.unschedulable) strategic merge
                // and JSON merge agree.
                merge(&mut v, &patch);
                if let Err(e) = validate(resource, &v) {
                    return respond(StatusCode::UNPROCESSABLE_ENTITY, status(422, "Invalid", &e));
                }
                w.rv += 1;
                v["metadata"]["resourceVersion"] = json!(w.rv.to_string());
                w.objects.insert(key(n), v.clone());
                self.record(&mut w, "patch", resource, n, &v);
                drop(w);
                self.notify(resource, ns, n, "MODIFIED", &v);
                respond(StatusCode::OK, v)
            }
            (Method::DELETE, Some(n)) => {
                let mut w = self.world.lock().unwrap();
                let Some(v) = w.objects.remove(&key(n)) else {
                    return not_found(n);
                };
                self.record(&mut w, "delete", resource, n, &v);
                drop(w);
                self.notify(resource, ns, n, "DELETED", &v);
                respond(StatusCode::OK, status(200, "", ""))
            }
            (m, _) => respond(
                StatusCode::METHOD_NOT_ALLOWED,
                status(
                    405,
                    "MethodNotAllowed",
                    &format!("{m} is not supported here"),
                ),
            ),
        }
    }

    /// 422 for values the real server's validation refuses.
    fn invalid(&self, resource: &str, v: &Value) -> Option<Response<Body>> {
        if resource == "leases" {
            if let Some(d) = v["spec"]["leaseDurationSeconds"].as_i64() {
                if d <= 0 {
                    return Some(respond(StatusCode::UNPROCESSABLE_ENTITY, status(422, "Invalid", "Lease.coordination.k8s.io is invalid: spec.leaseDurationSeconds: Invalid value: must be greater than 0")));
                }
            }
        }
        None
    }

    /// A list, filtered by `fieldSelector=spec.nodeName=…`.
    pub fn list(
        &self,
        resource: &str,
        ns: Option<&str>,
        q: &BTreeMap<String, String>,
    ) -> Response<Body> {
        let (kind, api_version) = kind_of(resource);
        let node = q
            .get("fieldSelector")
            .and_then(|f| f.strip_prefix("spec.nodeName="))
            .map(str::to_string);
        let w = self.world.lock().unwrap();
        let items: Vec<Value> = w
            .objects
            .iter()
            .filter(|((r, n, _), _)| r == resource && ns.is_none_or(|x| x == n))
            .filter(|(_, v)| {
                node.as_ref()
                    .is_none_or(|x| v["spec"]["nodeName"].as_str() == Some(x))
            })
            .map(|(_, v)| v.clone())
            .collect();
        respond(
            StatusCode::OK,
            json!({
                "kind": format!("{kind}List"), "apiVersion": api_version,
                "metadata": { "resourceVersion": w.rv.to_string() },
                "items": items,
            }),
        )
    }

    /// The Eviction subresource: 429 while a PodDisruptionBudget would be violated, else the
    /// pod starts terminating and is gone after its grace period.
    pub fn evict(&self, ns: &str, name: &str, body: &[u8]) -> Response<Body> {
        let eviction: Result<k8s_openapi::api::policy::v1::Eviction, _> =
            serde_json::from_slice(body);
        if let Err(e) = eviction {
            return respond(
                StatusCode::BAD_REQUEST,
                status(400, "BadRequest", &format!("invalid Eviction: {e}")),
            );
        }
        let mut w = self.world.lock().unwrap();
        let key = ("pods".to_string(), ns.to_string(), name.to_string());
        let Some(mut pod) = w.objects.get(&key).cloned() else {
            return respond(
                StatusCode::NOT_FOUND,
                status(404, "NotFound", &format!("pods \"{name}\" not found")),
            );
        };
        if !pod["metadata"]["deletionTimestamp"].is_null() {
            return respond(StatusCode::CREATED, status(201, "", ""));
        }
        let matches = |sel: &Value, p: &Value| {
            sel.as_object()
                .is_some_and(|m| m.iter().all(|(k, v)| &p["metadata"]["labels"][k] == v))
        };
        for ((r, n, _), pdb) in &w.objects {
            if r != "poddisruptionbudgets" || n != ns {
                continue;
            }
            let sel = &pdb["spec"]["selector"]["matchLabels"];
            if !matches(sel, &pod) {
                continue;
            }
            let healthy = w
                .objects
                .iter()
                .filter(|((r2, n2, _), p)| {
                    r2 == "pods"
                        && n2 == ns
                        && matches(sel, p)
                        && p["metadata"]["deletionTimestamp"].is_null()
                })
                .count() as i64;
            let min = pdb["spec"]["minAvailable"].as_i64().unwrap_or(0);
            if healthy - 1 < min {
                let mut r = respond(
                    StatusCode::TOO_MANY_REQUESTS,
                    status(
                        429,
                        "TooManyRequests",
                        "Cannot evict pod as it would violate the pod's disruption budget.",
                    ),
                );
                r.headers_mut().insert("retry-after", "1".parse().unwrap());
                return r;
            }
        }
        w.rv += 1;
        pod["metadata"]["deletionTimestamp"] = json!(now_rfc3339());
        pod["metadata"]["resourceVersion"] = json!(w.rv.to_string());
        w.objects.insert(key.clone(), pod.clone());
        self.record(&mut w, "evict", "pods", name, &pod);
        drop(w);
        let grace = pod["spec"]["terminationGracePeriodSeconds"]
            .as_u64()
            .unwrap_or(30);
        let (world, changes) = (self.world.clone(), self.changes.clone());
        let (ns, name) = (ns.to_string(), name.to_string());
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(grace)).await;
            let removed = world.lock().unwrap().objects.remove(&key);
            if let Some(v) = removed {
                let _ = changes.send(Change {
                    resource: "pods".into(),
                    namespace: ns,
                    name,
                    kind: "DELETED",
                    object: v,
                });
            }
        });
        respond(StatusCode::CREATED, status(201, "", ""))
    }
}
