//! The k3s API client: every call nk3 makes to Kubernetes, in one module.
//!
//! Blocking (it runs on the pass's thread, like git), over rustls with the kubeconfig's CA
//! only (never the system's roots, never unverified), with a client certificate or a bearer
//! token. Connection errors, 429 and 5xx answers are retried with backoff; other errors
//! carry the API's `Status` message. Object shapes are the `k8s-openapi` types.

use std::io::BufRead as _;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use nk3_common::kubeconfig::{Auth, KubeConfig};

/// How long one request may take (watches set their own).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);
/// Attempts for a request that fails in a way worth retrying.
const ATTEMPTS: u32 = 6;

/// A failed API call.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    /// The API answered with an error `Status`.
    #[error("{what}: {code} {reason}: {message}")]
    Status {
        /// The call.
        what: String,
        /// HTTP status.
        code: u16,
        /// `Status.reason`.
        reason: String,
        /// `Status.message`.
        message: String,
    },
    /// The API could not be reached (after retries).
    #[error("{what}: cannot reach the k3s API at {url}: {detail}")]
    Unreachable {
        /// The call.
        what: String,
        /// The server.
        url: String,
        /// Why.
        detail: String,
    },
    /// The answer was not what the API defines.
    #[error("{what}: unexpected answer: {detail}")]
    Decode {
        /// The call.
        what: String,
        /// Why.
        detail: String,
    },
}

impl KubeError {
    /// The HTTP status, for an error the API answered.
    pub fn code(&self) -> Option<u16> {
        match self {
            KubeError::Status { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// Which failed answers a request asks again for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Retry {
    /// Connection errors, 429 and 5xx.
    All,
    /// Connection errors and 5xx (a 429 means something to the caller).
    No429,
    /// Nothing: the caller has its own loop (evictions, retried every few seconds within
    /// the drain timeout).
    Never,
}

/// One event of a watch on a Lease.
#[derive(Debug)]
pub enum WatchEvent {
    /// The Lease was added, modified or deleted, and the caller said that was it.
    Changed,
    /// The server cannot serve events from that resourceVersion any more (410 Expired):
    /// list again and watch from the list's version.
    Expired,
    /// The watch ended (its timeout, or the server closed it): watch again from the last
    /// version seen.
    Ended,
}

/// A connection to the k3s API.
#[derive(Debug)]
pub struct Kube {
    base: String,
    http: reqwest::blocking::Client,
    token: Option<String>,
}

#[derive(serde::Deserialize)]
struct ListOf<T> {
    items: Vec<T>,
}

/// What an eviction request got.
#[derive(Debug, PartialEq, Eq)]
pub enum Eviction {
    /// The pod is terminating.
    Started,
    /// A PodDisruptionBudget does not allow it now (429); try again later.
    Blocked(String),
    /// The pod is already gone.
    Gone,
}

impl Kube {
    /// A client for the API the kubeconfig names.
    pub fn new(cfg: &KubeConfig) -> anyhow::Result<Kube> {
        let ca = reqwest::Certificate::from_pem(&cfg.ca_pem)
            .map_err(|e| anyhow::anyhow!("kubeconfig: the CA certificate is not PEM: {e}"))?;
        let mut builder = reqwest::blocking::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(ca)
            .https_only(true)
            .connect_timeout(Duration::from_secs(10))
            .timeout(REQUEST_TIMEOUT)
            .user_agent(concat!("nk3-agent/", env!("CARGO_PKG_VERSION")));
        let mut token = None;
        match &cfg.auth {
            Auth::Certificate { cert_pem, key_pem } => {
                let mut pem = cert_pem.clone();
                pem.push(b'\n');
                pem.extend_from_slice(key_pem);
                let id = reqwest::Identity::from_pem(&pem).map_err(|e| {
                    anyhow::anyhow!("kubeconfig: the client certificate or key is not usable: {e}")
                })?;
                builder = builder.identity(id);
            }
            Auth::Token(t) => token = Some(t.clone()),
        }
        Ok(Kube {
            base: cfg.server.clone(),
            http: builder.build()?,
            token,
        })
    }

    fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<(&str, Vec<u8>)>,
        retry: Retry,
    ) -> Result<(u16, Vec<u8>), KubeError> {
        let attempts = if retry == Retry::Never { 1 } else { ATTEMPTS };
        let what = format!("{method} {path}");
        let mut delay = Duration::from_millis(200);
        let mut last = String::new();
        for attempt in 1..=attempts {
            crate::progress::beat();
            let mut req = self
                .http
                .request(method.clone(), format!("{}{path}", self.base));
            if let Some(t) = &self.token {
                req = req.bearer_auth(t);
            }
            if let Some((ct, bytes)) = &body {
                req = req.header("content-type", *ct).body(bytes.clone());
            }
            match req.send() {
                Err(e) => {
                    last = error_chain(&e);
                    // A certificate the CA did not sign will not get better by asking again.
                    if last.contains("certificate") {
                        break;
                    }
                }
                Ok(resp) => {
                    let code = resp.status().as_u16();
                    let retry_after = resp
                        .headers()
                        .get("retry-after")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse::<u64>().ok());
                    let bytes = resp.bytes().map(|b| b.to_vec()).unwrap_or_default();
                    let transient = code >= 500 || (code == 429 && retry == Retry::All);
                    if !transient {
                        if code >= 400 {
                            return Err(status_error(&what, code, &bytes));
                        }
                        return Ok((code, bytes));
                    }
                    last = status_error(&what, code, &bytes).to_string();
                    if let Some(s) = retry_after {
                        delay = Duration::from_secs(s.min(5));
                    }
                    if attempt == attempts {
                        return Err(status_error(&what, code, &bytes));
                    }
                }
            }
            if attempt < attempts {
                std::thread::sleep(delay);
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
        Err(KubeError::Unreachable {
            what,
            url: self.base.clone(),
            detail: last,
        })
    }

    fn decode<T: DeserializeOwned>(what: &str, bytes: &[u8]) -> Result<T, KubeError> {
        serde_json::from_slice(bytes).map_err(|e| KubeError::Decode {
            what: what.to_string(),
            detail: e.to_string(),
        })
    }

    /// GET an object; `None` when it does not exist.
    pub fn get<T: DeserializeOwned>(&self, path: &str) -> Result<Option<T>, KubeError> {
        match self.request(reqwest::Method::GET, path, None, Retry::All) {
            Ok((_, b)) => Self::decode(path, &b).map(Some),
            Err(e) if e.code() == Some(404) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn send<T: DeserializeOwned, B: Serialize>(
        &self,
        method: reqwest::Method,
        path: &str,
        content_type: &str,
        body: &B,
    ) -> Result<T, KubeError> {
        let bytes = serde_json::to_vec(body).map_err(|e| KubeError::Decode {
            what: path.to_string(),
            detail: e.to_string(),
        })?;
        let (_, b) = self.request(method, path, Some((content_type, bytes)), Retry::All)?;
        Self::decode(path, &b)
    }

    /// The API's own health (`/readyz`).
    pub fn ready(&self) -> bool {
        self.request(reqwest::Method::GET, "/readyz", None, Retry::No429)
            .is_ok()
    }

    fn lease_path(ns: &str, name: Option<&str>) -> String {
        match name {
            Some(n) => format!("/apis/coordination.k8s.io/v1/namespaces/{ns}/leases/{n}"),
            None => format!("/apis/coordination.k8s.io/v1/namespaces/{ns}/leases"),
        }
    }

    /// A Lease, if it exists.
    pub fn lease(&self, ns: &str, name: &str) -> Result<Option<Lease>, KubeError> {
        self.get(&Self::lease_path(ns, Some(name)))
    }

    /// Creates a Lease (409 when someone else created it first).
    pub fn create_lease(&self, ns: &str, lease: &Lease) -> Result<Lease, KubeError> {
        self.send(
            reqwest::Method::POST,
            &Self::lease_path(ns, None),
            "application/json",
            lease,
        )
    }

    /// Replaces a Lease; its `metadata.resourceVersion` must be current (else 409).
    pub fn replace_lease(&self, ns: &str, lease: &Lease) -> Result<Lease, KubeError> {
        let name = lease.metadata.name.as_deref().unwrap_or_default();
        self.send(
            reqwest::Method::PUT,
            &Self::lease_path(ns, Some(name)),
            "application/json",
            lease,
        )
    }

    /// The Lease named `name` (if it exists) and the list's resourceVersion, the version
    /// to watch from (an object's own version may already be older than the server's watch
    /// window).
    pub fn list_lease(&self, ns: &str, name: &str) -> Result<(Option<Lease>, String), KubeError> {
        #[derive(serde::Deserialize)]
        struct LeaseList {
            metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ListMeta,
            items: Vec<Lease>,
        }
        let path = format!(
            "{}?fieldSelector=metadata.name%3D{name}",
            Self::lease_path(ns, None)
        );
        let (_, b) = self.request(reqwest::Method::GET, &path, None, Retry::All)?;
        let list: LeaseList = Self::decode(&path, &b)?;
        Ok((
            list.items.into_iter().next(),
            list.metadata.resource_version.unwrap_or_default(),
        ))
    }

    /// Watches the Lease from `resource_version` for up to `timeout`, calling `on_event`
    /// for each event until it returns true. Bookmarks move `resource_version` on. Returns
    /// how the watch ended: [`WatchEvent::Changed`] when `on_event` said stop,
    /// [`WatchEvent::Expired`] on 410, [`WatchEvent::Ended`] when the stream closed.
    pub fn watch_lease(
        &self,
        ns: &str,
        name: &str,
        resource_version: &mut String,
        timeout: Duration,
        on_event: &mut dyn FnMut(Option<Lease>) -> bool,
    ) -> Result<WatchEvent, KubeError> {
        let secs = timeout.as_secs().max(1);
        let path = format!(
            "{}?watch=1&allowWatchBookmarks=true&fieldSelector=metadata.name%3D{name}&resourceVersion={resource_version}&timeoutSeconds={secs}",
            Self::lease_path(ns, None)
        );
        let what = format!("watch {}", Self::lease_path(ns, Some(name)));
        let mut req = self
            .http
            .get(format!("{}{path}", self.base))
            .timeout(Duration::from_secs(secs) + Duration::from_secs(10));
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().map_err(|e| KubeError::Unreachable {
            what: what.clone(),
            url: self.base.clone(),
            detail: error_chain(&e),
        })?;
        let code = resp.status().as_u16();
        if code == 410 {
            return Ok(WatchEvent::Expired);
        }
        if code >= 400 {
            let b = resp.bytes().map(|b| b.to_vec()).unwrap_or_default();
            return Err(status_error(&what, code, &b));
        }
        let mut reader = std::io::BufReader::new(resp);
        let mut line = String::new();
        loop {
            line.clear();
            crate::progress::beat();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => return Ok(WatchEvent::Ended),
                Ok(_) => {}
            }
            let event: Value = Self::decode(&what, line.as_bytes())?;
            let object = &event["object"];
            let rv = object["metadata"]["resourceVersion"].as_str();
            match event["type"].as_str() {
                Some("ERROR") => {
                    if object["code"].as_u64() == Some(410) {
                        return Ok(WatchEvent::Expired);
                    }
                    return Err(status_error(&what, 500, object.to_string().as_bytes()));
                }
                Some("BOOKMARK") => {
                    if let Some(rv) = rv {
                        *resource_version = rv.to_string();
                    }
                }
                Some(kind @ ("ADDED" | "MODIFIED" | "DELETED")) => {
                    if let Some(rv) = rv {
                        *resource_version = rv.to_string();
                    }
                    let lease = if kind == "DELETED" {
                        None
                    } else {
                        Some(Self::decode::<Lease>(&what, object.to_string().as_bytes())?)
                    };
                    if on_event(lease) {
                        return Ok(WatchEvent::Changed);
                    }
                }
                _ => {}
            }
        }
    }

    /// Every Lease of a namespace (the nodes' heartbeats in `kube-node-lease`).
    pub fn leases(&self, ns: &str) -> Result<Vec<Lease>, KubeError> {
        let path = Self::lease_path(ns, None);
        let (_, b) = self.request(reqwest::Method::GET, &path, None, Retry::All)?;
        Ok(Self::decode::<ListOf<Lease>>(&path, &b)?.items)
    }

    /// A Node.
    pub fn node(&self, name: &str) -> Result<Option<Node>, KubeError> {
        self.get(&format!("/api/v1/nodes/{name}"))
    }

    /// Every Node.
    pub fn nodes(&self) -> Result<Vec<Node>, KubeError> {
        let (_, b) = self.request(reqwest::Method::GET, "/api/v1/nodes", None, Retry::All)?;
        Ok(Self::decode::<ListOf<Node>>("GET /api/v1/nodes", &b)?.items)
    }

    /// Merge-patches a Node (annotations, `spec.unschedulable`).
    pub fn patch_node(&self, name: &str, patch: &Value) -> Result<Node, KubeError> {
        self.send(
            reqwest::Method::PATCH,
            &format!("/api/v1/nodes/{name}"),
            "application/merge-patch+json",
            patch,
        )
    }

    /// Asks to evict a pod through the Eviction API (which honours PodDisruptionBudgets),
    /// only if it is still the pod `uid` (not a new one of the same name). Asked once: the
    /// drain has its own retries.
    pub fn evict(&self, ns: &str, name: &str, uid: &str) -> Result<Eviction, KubeError> {
        let path = format!("/api/v1/namespaces/{ns}/pods/{name}/eviction");
        let body = serde_json::json!({
            "apiVersion": "policy/v1", "kind": "Eviction",
            "metadata": { "name": name, "namespace": ns },
            "deleteOptions": { "preconditions": { "uid": uid } },
        });
        let bytes = serde_json::to_vec(&body).unwrap_or_default();
        match self.request(
            reqwest::Method::POST,
            &path,
            Some(("application/json", bytes)),
            Retry::Never,
        ) {
            Ok(_) => Ok(Eviction::Started),
            Err(KubeError::Status {
                code: 429, message, ..
            }) => Ok(Eviction::Blocked(message)),
            // 404: gone; 409 on the UID precondition: that pod is gone, another took its name.
            Err(e) if matches!(e.code(), Some(404 | 409)) => Ok(Eviction::Gone),
            Err(e) => Err(e),
        }
    }

    /// Lists objects of `path` as JSON (DaemonSets, Deployments of a namespace).
    pub fn list_json(&self, path: &str) -> Result<Vec<Value>, KubeError> {
        let (_, b) = self.request(reqwest::Method::GET, path, None, Retry::All)?;
        Ok(Self::decode::<ListOf<Value>>(path, &b)?.items)
    }

    /// POSTs `body` to `path` (a collection, or a review such as SelfSubjectAccessReview)
    /// and returns what the API made of it.
    pub fn post_json(&self, path: &str, body: &Value) -> Result<Value, KubeError> {
        self.send(reqwest::Method::POST, path, "application/json", body)
    }

    /// Replaces the object at `path`; its `metadata.resourceVersion` must be current.
    pub fn put_json(&self, path: &str, body: &Value) -> Result<Value, KubeError> {
        self.send(reqwest::Method::PUT, path, "application/json", body)
    }

    /// Deletes the object at `path`; a missing one is not an error.
    pub fn delete(&self, path: &str) -> Result<(), KubeError> {
        match self.request(reqwest::Method::DELETE, path, None, Retry::All) {
            Err(e) if e.code() != Some(404) => Err(e),
            _ => Ok(()),
        }
    }

    /// Records a Kubernetes Event (best effort is the caller's choice).
    pub fn create_event(&self, ns: &str, event: &Value) -> Result<(), KubeError> {
        let path = format!("/api/v1/namespaces/{ns}/events");
        self.send::<Value, _>(reqwest::Method::POST, &path, "application/json", event)
            .map(|_| ())
    }
}

fn status_error(what: &str, code: u16, body: &[u8]) -> KubeError {
    let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    KubeError::Status {
        what: what.to_string(),
        code,
        reason: v["reason"].as_str().unwrap_or("").to_string(),
        message: v["message"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| String::from_utf8_lossy(body).chars().take(200).collect()),
    }
}

/// The innermost cause of `e` (a refused certificate, a refused connection), which says
/// more than reqwest's own message.
pub(crate) fn innermost(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}

/// An error and its causes on one line (reqwest's top-level message alone says little).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
