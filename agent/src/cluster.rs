//! The cluster half of a rollout (DESIGN sections 6 to 8): the health gate, the rollout
//! Lease (acquire, renew, release, halts), cordon and drain, verification, node annotations
//! and Events. Every API call goes through [`crate::kube`].

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use nk3_common::inventory::HealthCheck;
use nk3_common::kubeconfig;
use nk3_common::lease::{self, Claim, Decision};
use serde_json::json;

use crate::kube::{Kube, KubeError, WatchEvent};

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
/// Lease annotation set by `nk3-agent nudge` (or CI): fetch now.
pub const DESIRED_COMMIT: &str = "nk3.io/desired-commit";

/// The cluster, as this node sees it.
#[derive(Debug)]
pub struct Cluster {
    kube: Arc<Kube>,
    /// This node's name in Kubernetes (its hostname).
    pub me: String,
    kubeconfig: std::path::PathBuf,
    kubectl: std::path::PathBuf,
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
}

/// The result of trying to take a lease.
#[derive(Debug)]
pub enum Acquire {
    /// This node holds the named lease.
    Held(String),
    /// Every slot is held by someone else.
    Busy {
        /// The holder whose claim runs out first.
        holder: String,
        /// Their lease, to watch.
        lease: String,
        /// How long until that claim runs out unless renewed, as seen from here.
        left: Duration,
    },
}

/// Five 409 Conflicts in a row: the write did not happen, and the caller must not act as if
/// it had.
fn conflicts(what: String) -> KubeError {
    KubeError::Status {
        what,
        code: 409,
        reason: "Conflict".into(),
        message: "the object kept changing under five attempts in a row; not written".into(),
    }
}

/// Why it is not safe to disrupt this node now.
pub type NotSafe = String;

fn timestamp_now() -> Timestamp {
    let us = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_micros();
    Timestamp::from_microsecond(i64::try_from(us).unwrap_or(i64::MAX))
        .unwrap_or(Timestamp::UNIX_EPOCH)
}

fn micro_now() -> MicroTime {
    MicroTime(timestamp_now())
}

fn to_system(t: &MicroTime) -> SystemTime {
    let ts = t.0;
    SystemTime::UNIX_EPOCH + Duration::from_nanos(ts.as_nanosecond().max(0) as u64)
}

fn claim(l: &Lease) -> Claim {
    let spec = l.spec.clone().unwrap_or_default();
    let record = serde_json::json!([
        spec.holder_identity,
        spec.acquire_time,
        spec.renew_time,
        spec.lease_duration_seconds,
        spec.lease_transitions
    ])
    .to_string();
    Claim {
        holder: spec.holder_identity,
        record,
        duration: Duration::from_secs(spec.lease_duration_seconds.unwrap_or(0).max(0) as u64),
    }
}

/// When this agent first saw each lease's current record, per (agent, lease): expiry is
/// judged by how long the record has stayed the same here (DESIGN section 7). It outlives a
/// pass, and through `state.json` ([`seen`], [`seed`]) a restart.
static OBSERVED: std::sync::Mutex<BTreeMap<(String, String), (String, SystemTime)>> =
    std::sync::Mutex::new(BTreeMap::new());

/// What agent `me` has seen of the rollout leases, for `state.json`.
pub fn seen(me: &str) -> BTreeMap<String, crate::state::LeaseSeen> {
    let o = OBSERVED.lock().unwrap_or_else(|e| e.into_inner());
    o.iter()
        .filter(|((who, _), _)| who == me)
        .map(|((_, lease), (record, since))| {
            let since = humantime::format_rfc3339_micros(*since).to_string();
            (
                lease.clone(),
                crate::state::LeaseSeen {
                    record: record.clone(),
                    since,
                },
            )
        })
        .collect()
}

/// Takes up what agent `me` saw before a restart.
pub fn seed(me: &str, seen: &BTreeMap<String, crate::state::LeaseSeen>) {
    let mut o = OBSERVED.lock().unwrap_or_else(|e| e.into_inner());
    for (lease, s) in seen {
        if let Ok(since) = humantime::parse_rfc3339(&s.since) {
            o.entry((me.to_string(), lease.clone()))
                .or_insert_with(|| (s.record.clone(), since));
        }
    }
}

fn is_ready(n: &Node) -> bool {
    n.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
        .is_some_and(|c| c.status == "True")
}

fn name_of(n: &Node) -> String {
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
        }))
    }

    /// The API client.
    pub(crate) fn kube(&self) -> &Kube {
        &self.kube
    }

    /// Uses `kubectl` (for the Ceph check, which runs `ceph status` in the tools pod).
    pub fn with_kubectl(mut self, kubectl: &std::path::Path) -> Cluster {
        self.kubectl = kubectl.to_path_buf();
        self
    }

    /// The optional Ceph check: `ceph status` in the rook-ceph tools deployment, judged with
    /// the inventory's tolerated warnings.
    pub fn ceph_healthy(
        &self,
        ceph: &nk3_common::inventory::Ceph,
        timeout: Duration,
    ) -> Result<(), String> {
        let mut cmd = std::process::Command::new(&self.kubectl);
        cmd.arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args([
                "-n",
                &ceph.namespace,
                "exec",
                &format!("deploy/{}", ceph.deployment),
            ])
            .args(["--", "ceph", "status", "--format", "json"]);
        let out = crate::command::run(
            cmd,
            timeout.clamp(Duration::from_secs(30), Duration::from_secs(60)),
        )
        .map_err(|e| format!("ceph status: {e}"))?;
        ceph.judge(&String::from_utf8_lossy(&out.stdout))
    }

    /// The commit halted cluster-wide, if any (kept on the first lease).
    pub fn halt(&self) -> Result<Option<Halt>, KubeError> {
        let Some(l) = self.kube.lease(NAMESPACE, LEASE_FIRST)? else {
            return Ok(None);
        };
        let a = l.metadata.annotations.unwrap_or_default();
        Ok(a.get(HALTED_COMMIT).map(|c| Halt {
            commit: c.clone(),
            reason: a.get(HALTED_REASON).cloned().unwrap_or_default(),
            node: a.get(HALTED_NODE).cloned().unwrap_or_default(),
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
    fn heartbeats(&self) -> Result<BTreeMap<String, (SystemTime, Duration)>, KubeError> {
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
    fn workloads_unhealthy(&self, ns: &str) -> Result<Option<String>, KubeError> {
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

    /// How long this agent has seen `name`'s holder record unchanged (zero on first sight
    /// or right after a change).
    fn unchanged_for(&self, name: &str, l: Option<&Lease>) -> Duration {
        let record = l.map(|l| claim(l).record).unwrap_or_default();
        let mut seen = OBSERVED.lock().unwrap_or_else(|e| e.into_inner());
        let now = SystemTime::now();
        let e = seen
            .entry((self.me.clone(), name.to_string()))
            .or_insert_with(|| (record.clone(), now));
        if e.0 != record {
            *e = (record, now);
        }
        now.duration_since(e.1).unwrap_or_default()
    }

    /// Tries to take one of the rollout's lease slots. Conflicts (someone wrote in between)
    /// are re-read and decided again.
    pub fn acquire(&self, max_unavailable: u32, duration: Duration) -> Result<Acquire, KubeError> {
        let names = lease::names(LEASE, max_unavailable);
        // Already holding a slot (say, before a reboot): keep it.
        for name in &names {
            if let Some(l) = self.kube.lease(NAMESPACE, name)? {
                if claim(&l).holder.as_deref() == Some(self.me.as_str()) {
                    self.write_claim(name, Some(l), duration)?;
                    return Ok(Acquire::Held(name.clone()));
                }
            }
        }
        let mut busy: Option<Acquire> = None;
        for name in &names {
            let mut conflicts = 0;
            loop {
                let current = self.kube.lease(NAMESPACE, name)?;
                let unchanged = self.unchanged_for(name, current.as_ref());
                let decision =
                    lease::decide(current.as_ref().map(claim).as_ref(), &self.me, unchanged);
                match decision {
                    Decision::Wait { holder, left } => {
                        let sooner = match &busy {
                            Some(Acquire::Busy { left: l, .. }) => left < *l,
                            _ => true,
                        };
                        if sooner {
                            busy = Some(Acquire::Busy {
                                holder,
                                lease: name.clone(),
                                left,
                            });
                        }
                        break;
                    }
                    _ => match self.write_claim(name, current, duration) {
                        Ok(()) => return Ok(Acquire::Held(name.clone())),
                        Err(e) if e.code() == Some(409) && conflicts < 5 => conflicts += 1,
                        Err(e) => return Err(e),
                    },
                }
            }
        }
        Ok(busy.unwrap_or(Acquire::Busy {
            holder: "?".into(),
            lease: names[0].clone(),
            left: Duration::from_secs(1),
        }))
    }

    /// Creates the lease held by me, or updates `current` (with its resourceVersion) to be.
    fn write_claim(
        &self,
        name: &str,
        current: Option<Lease>,
        duration: Duration,
    ) -> Result<(), KubeError> {
        let secs = i32::try_from(duration.as_secs()).unwrap_or(i32::MAX).max(1);
        match current {
            None => {
                let l = Lease {
                    metadata: ObjectMeta {
                        name: Some(name.to_string()),
                        namespace: Some(NAMESPACE.to_string()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(LeaseSpec {
                        holder_identity: Some(self.me.clone()),
                        lease_duration_seconds: Some(secs),
                        acquire_time: Some(micro_now()),
                        renew_time: Some(micro_now()),
                        lease_transitions: Some(0),
                        ..LeaseSpec::default()
                    }),
                };
                self.kube.create_lease(NAMESPACE, &l).map(|_| ())
            }
            Some(mut l) => {
                let mut spec = l.spec.take().unwrap_or_default();
                let mine = spec.holder_identity.as_deref() == Some(self.me.as_str());
                if !mine {
                    let had = spec
                        .holder_identity
                        .as_deref()
                        .is_some_and(|h| !h.is_empty());
                    if had {
                        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
                    }
                    spec.acquire_time = Some(micro_now());
                    spec.holder_identity = Some(self.me.clone());
                }
                spec.lease_duration_seconds = Some(secs);
                spec.renew_time = Some(micro_now());
                l.spec = Some(spec);
                self.kube.replace_lease(NAMESPACE, &l).map(|_| ())
            }
        }
    }

    /// Waits (watching, not polling) until lease `name` is free, held by someone else than
    /// `holder`, or `timeout` passes (then its holder's claim may have run out).
    pub fn wait_for_change(
        &self,
        name: &str,
        holder: &str,
        timeout: Duration,
    ) -> Result<(), KubeError> {
        let changed = |l: Option<&Lease>| {
            let c = l.map(claim);
            (c.as_ref().and_then(|c| c.holder.as_deref()) != Some(holder)).then_some(())
        };
        self.watch_first(name, crate::clock::deadline(timeout), changed)
            .map(|_| ())
    }

    /// Watches lease `name` as client-go's reflector does — list, watch from the list's
    /// resourceVersion, list again on 410 Expired, back off on other errors — until `done`
    /// returns something for the lease as it is (`None`: absent) or `until` passes. API
    /// errors are waited out (the caller acts again at `until`), never looped on.
    fn watch_first<T>(
        &self,
        name: &str,
        until: Instant,
        mut done: impl FnMut(Option<&Lease>) -> Option<T>,
    ) -> Result<Option<T>, KubeError> {
        let mut backoff = Duration::from_secs(1);
        let mut last_list: Option<Instant> = None;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            // At most one list a second, whatever the server answers.
            if let Some(t) = last_list {
                let since = t.elapsed();
                if since < Duration::from_secs(1) {
                    std::thread::sleep((Duration::from_secs(1) - since).min(left));
                    continue;
                }
            }
            last_list = Some(Instant::now());
            let (lease, mut rv) = match self.kube.list_lease(NAMESPACE, name) {
                Ok(x) => x,
                Err(e) => {
                    tracing::debug!("cannot list lease {name}: {e}");
                    std::thread::sleep(backoff.min(left));
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                    continue;
                }
            };
            if let Some(t) = done(lease.as_ref()) {
                return Ok(Some(t));
            }
            loop {
                let left = until.saturating_duration_since(Instant::now());
                if left < Duration::from_millis(500) {
                    return Ok(None);
                }
                let mut found = None;
                let ended = self.kube.watch_lease(
                    NAMESPACE,
                    name,
                    &mut rv,
                    // Within a pass, short watches: each one's end is progress the
                    // watchdog sees (between passes nothing stalls).
                    left.min(if crate::progress::in_pass() {
                        Duration::from_secs(30)
                    } else {
                        Duration::from_secs(300)
                    }),
                    &mut |l| {
                        found = done(l.as_ref());
                        found.is_some()
                    },
                );
                match ended {
                    Ok(WatchEvent::Changed) => {
                        if let Some(t) = found {
                            return Ok(Some(t));
                        }
                    }
                    Ok(WatchEvent::Ended) => {
                        backoff = Duration::from_secs(1);
                    }
                    Ok(WatchEvent::Expired) => break,
                    Err(e) => {
                        tracing::debug!("watch of lease {name} failed: {e}");
                        std::thread::sleep(backoff.min(left));
                        backoff = (backoff * 2).min(Duration::from_secs(30));
                        break;
                    }
                }
            }
        }
    }

    /// Renews the lease if this node holds it; an error if it does not any more.
    pub fn renew(&self, lease: &str, duration: Duration) -> Result<(), KubeError> {
        for _ in 0..5 {
            let current = self.kube.lease(NAMESPACE, lease)?;
            let holder = current.as_ref().and_then(|l| claim(l).holder);
            if holder.as_deref() != Some(self.me.as_str()) {
                return Err(KubeError::Status {
                    what: format!("renew lease {lease}"),
                    code: 409,
                    reason: "LeaseLost".into(),
                    message: format!(
                        "the lease is held by {} now",
                        holder.unwrap_or_else(|| "nobody".into())
                    ),
                });
            }
            match self.write_claim(lease, current, duration) {
                Err(e) if e.code() == Some(409) => continue,
                other => return other,
            }
        }
        Err(conflicts(format!("renew lease {lease}")))
    }

    /// Gives the lease up (only if this node holds it); annotations stay.
    pub fn release(&self, lease: &str) -> Result<(), KubeError> {
        for _ in 0..5 {
            let Some(mut l) = self.kube.lease(NAMESPACE, lease)? else {
                return Ok(());
            };
            let mut spec = l.spec.take().unwrap_or_default();
            if spec.holder_identity.as_deref() != Some(self.me.as_str()) {
                return Ok(());
            }
            spec.holder_identity = None;
            l.spec = Some(spec);
            match self.kube.replace_lease(NAMESPACE, &l) {
                Err(e) if e.code() == Some(409) => continue,
                other => return other.map(|_| ()),
            }
        }
        Err(conflicts(format!("release lease {lease}")))
    }

    /// Releases every rollout lease this node holds and undoes its own cordon: the end of
    /// a rollout that was interrupted after the node already ran the new system.
    pub fn let_go(&self, max_unavailable: u32) -> Result<(), KubeError> {
        let node = self.kube.node(&self.me)?;
        let ours = node
            .as_ref()
            .and_then(|n| n.metadata.annotations.as_ref())
            .is_some_and(|a| a.get(CORDONED).is_some_and(|v| v == "true"));
        if ours {
            self.uncordon(false)?;
        }
        // By name: an agent node's credentials may read the rollout's Leases, not list the
        // namespace.
        for name in crate::access::lease_names(max_unavailable) {
            self.release(&name)?;
        }
        Ok(())
    }

    /// Marks `commit` halted on the first lease, for every node to see.
    pub fn set_halt(&self, commit: &str, reason: &str) -> Result<(), KubeError> {
        let reason: String = reason.chars().take(500).collect();
        self.annotate_lease(&[
            (HALTED_COMMIT, Some(commit)),
            (HALTED_REASON, Some(&reason)),
            (HALTED_NODE, Some(&self.me)),
        ])
    }

    /// Sets (or, with `None`, removes) annotations on the first lease, creating it, free, if
    /// there is none.
    fn annotate_lease(&self, changes: &[(&str, Option<&str>)]) -> Result<(), KubeError> {
        for _ in 0..5 {
            let mut l = match self.kube.lease(NAMESPACE, LEASE_FIRST)? {
                Some(l) => l,
                None => {
                    let l = Lease {
                        metadata: ObjectMeta {
                            name: Some(LEASE_FIRST.into()),
                            namespace: Some(NAMESPACE.into()),
                            ..ObjectMeta::default()
                        },
                        spec: Some(LeaseSpec::default()),
                    };
                    match self.kube.create_lease(NAMESPACE, &l) {
                        Ok(l) => l,
                        Err(e) if e.code() == Some(409) => continue,
                        Err(e) => return Err(e),
                    }
                }
            };
            let a = l.metadata.annotations.get_or_insert_with(BTreeMap::new);
            for (key, value) in changes {
                match value {
                    Some(v) => a.insert((*key).into(), (*v).into()),
                    None => a.remove(*key),
                };
            }
            match self.kube.replace_lease(NAMESPACE, &l) {
                Err(e) if e.code() == Some(409) => continue,
                other => return other.map(|_| ()),
            }
        }
        Err(conflicts(format!("annotate lease {LEASE_FIRST}")))
    }

    /// Asks every agent to fetch now (`nk3-agent nudge`).
    pub fn nudge(&self, commit: &str) -> Result<(), KubeError> {
        self.annotate_lease(&[(DESIRED_COMMIT, Some(commit))])
    }

    /// Waits up to `timeout`, watching the first lease, for its desired-commit annotation to
    /// change (a nudge), or, with `on_release` (this node is waiting for its turn), for the
    /// lease to become free; says which. Used between polls, so either is acted on at once.
    pub fn wait_for_nudge(
        &self,
        timeout: Duration,
        on_release: bool,
    ) -> Result<Option<String>, KubeError> {
        let desired = |l: Option<&Lease>| {
            l.and_then(|l| l.metadata.annotations.as_ref())
                .and_then(|a| a.get(DESIRED_COMMIT).cloned())
        };
        let free = |l: Option<&Lease>| l.map(claim).is_none_or(|c| !c.is_held());
        let mut before: Option<Option<String>> = None;
        self.watch_first(LEASE_FIRST, crate::clock::deadline(timeout), |l| {
            let now = desired(l);
            let Some(b) = &before else {
                before = Some(now);
                return (on_release && free(l)).then(|| "the rollout lease is free".to_string());
            };
            if &now != b {
                return Some(match now {
                    Some(d) => format!("desired commit {d}"),
                    None => "the desired commit was cleared".into(),
                });
            }
            (on_release && free(l)).then(|| "the rollout lease was released".to_string())
        })
    }

    /// Lifts a halt (a newer commit was applied).
    pub fn lift_halt(&self) -> Result<(), KubeError> {
        self.annotate_lease(&[
            (HALTED_COMMIT, None),
            (HALTED_REASON, None),
            (HALTED_NODE, None),
        ])
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

    /// One health check of the node after a switch: k3s active (through `systemctl`), the
    /// API ready, this node Ready *now* (its Node reports this boot's id, and its kubelet
    /// renewed its heartbeat after `fresh.since`: a Ready condition from before the switch
    /// or the reboot proves nothing), every node that was Ready before still Ready and
    /// heartbeating, and the inventory's own checks. `Err` says what is not healthy yet.
    pub fn healthy(
        &self,
        systemctl: &std::path::Path,
        ready_before: &[String],
        rollout: &nk3_common::inventory::Rollout,
        watch_namespaces: &[String],
        fresh: &Fresh,
        deadline: SystemTime,
    ) -> Result<(), String> {
        // Every probe is bounded by what is left of the health timeout: a check that hangs
        // is stopped and counts as failed, never waited for.
        let left = || {
            deadline
                .duration_since(SystemTime::now())
                .unwrap_or_default()
                // Never less than a probe needs to answer at all: a verification resumed
                // after its deadline judges the node now, with probes that can finish.
                .max(Duration::from_secs(5))
        };
        let checks: &[HealthCheck] = &rollout.health_checks;
        let mut is_active = std::process::Command::new(systemctl);
        is_active.args(["is-active", "--quiet", "k3s.service"]);
        if crate::command::run(is_active, left().min(Duration::from_secs(30))).is_err() {
            return Err("k3s.service is not active".into());
        }
        if !self.kube.ready() {
            return Err("the API is not ready (/readyz)".into());
        }
        let nodes = self.kube.nodes().map_err(|e| e.to_string())?;
        let me = nodes
            .iter()
            .find(|n| name_of(n) == self.me)
            .ok_or_else(|| format!("node {} is not registered", self.me))?;
        let boot_id = me
            .status
            .as_ref()
            .and_then(|s| s.node_info.as_ref())
            .map(|i| i.boot_id.clone())
            .unwrap_or_default();
        if boot_id != fresh.boot_id {
            return Err(format!(
                "node {} has not reported this boot yet (its bootID is {:?}, this boot is {:?})",
                self.me, boot_id, fresh.boot_id
            ));
        }
        if !is_ready(me) {
            return Err(format!("node {} is not Ready", self.me));
        }
        let heartbeats = self.heartbeats().map_err(|e| e.to_string())?;
        match heartbeats.get(&self.me) {
            Some((renewed, _)) if *renewed >= fresh.since => {}
            _ => {
                return Err(format!(
                    "node {}'s kubelet has not renewed its heartbeat since the switch",
                    self.me
                ))
            }
        }
        let now = SystemTime::now();
        for n in ready_before.iter().filter(|n| **n != self.me) {
            let ready = nodes
                .iter()
                .any(|node| name_of(node) == *n && is_ready(node));
            let alive = heartbeats
                .get(n)
                .is_some_and(|(r, d)| lease::stale_heartbeat(*r, *d, now).is_none());
            if !ready || !alive {
                return Err(format!("node {n} was Ready before and is not now"));
            }
        }
        for ns in watch_namespaces {
            if let Some(why) = self.workloads_unhealthy(ns).map_err(|e| e.to_string())? {
                return Err(why);
            }
        }
        if let Some(c) = &rollout.ceph {
            self.ceph_healthy(c, left())?;
        }
        for c in checks {
            match c {
                HealthCheck::Command { name, argv } => {
                    let Some((p, args)) = argv.split_first() else {
                        return Err(format!("health check {name} has no command"));
                    };
                    let mut cmd = std::process::Command::new(p);
                    cmd.args(args);
                    if let Err(e) = crate::command::run(cmd, left()) {
                        return Err(match e.failure {
                            crate::command::Failure::TimedOut => format!(
                                "health check {name} did not finish within the health timeout; it was stopped"
                            ),
                            crate::command::Failure::NotStarted => {
                                format!("health check {name} could not start: {}", e.tail)
                            }
                            crate::command::Failure::Exited => {
                                format!("health check {name} failed ({})", e.status)
                            }
                        });
                    }
                }
                HealthCheck::Http { name, url } => {
                    let ok = reqwest::blocking::Client::builder()
                        .timeout(left().min(Duration::from_secs(10)))
                        .build()
                        .ok()
                        .and_then(|c| c.get(url).send().ok())
                        .is_some_and(|r| r.status().is_success());
                    if !ok {
                        return Err(format!("health check {name} ({url}) failed"));
                    }
                }
            }
        }
        Ok(())
    }

    /// Keeps `lease` renewed from a thread of its own until the returned guard is dropped
    /// (a build, switch or drain can take longer than a lease lasts).
    pub fn keep_renewed(self: &Arc<Self>, lease: &str, duration: Duration) -> Renewer {
        let stop = Arc::new(AtomicBool::new(false));
        let (me, lease, flag) = (self.clone(), lease.to_string(), stop.clone());
        let every = (duration / 3).max(Duration::from_millis(200));
        // The renewer's lines carry the node and commit of the step that started it.
        let span = tracing::Span::current();
        let handle = std::thread::spawn(move || {
            let _entered = span.enter();
            let mut last = Instant::now();
            while !flag.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(100));
                if last.elapsed() >= every {
                    match me.renew(&lease, duration) {
                        Ok(()) => {}
                        Err(KubeError::Status {
                            reason, message, ..
                        }) if reason == "LeaseLost" => {
                            tracing::error!("lost the rollout lease {lease}: {message}");
                            if let Ok(mut l) = LOST.lock() {
                                *l = Some(message);
                            }
                            return;
                        }
                        Err(e) => tracing::warn!("cannot renew lease {lease}: {e}"),
                    }
                    last = Instant::now();
                }
            }
        });
        Renewer {
            stop,
            handle: Some(handle),
        }
    }
}

/// What makes "this node is healthy" a fact about now, not about before the switch.
#[derive(Debug, Clone)]
pub struct Fresh {
    /// This boot's id (`/proc/sys/kernel/random/boot_id`).
    pub boot_id: String,
    /// When the switch (or the boot) happened: the kubelet must have heartbeaten since.
    pub since: SystemTime,
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
        for name in crate::access::lease_names(slots) {
            if let Some(l) = self.kube.lease(NAMESPACE, &name)? {
                leases.insert(name, claim(&l).holder.filter(|h| !h.is_empty()));
            }
        }
        let halted = self.halt()?.map(|h| (h.commit, h.node, h.reason));
        Ok(Overview {
            nodes,
            leases,
            halted,
        })
    }
}

/// The first (or only) lease, which also carries halts.
const LEASE_FIRST: &str = LEASE;

/// Why the lease the running renewer keeps was lost, if it was (for the steps after the
/// drain, which hold no renewer of their own: see [`lease_lost`]).
static LOST: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);

/// Why this agent's rollout lease is no longer its own, if another node holds it now.
pub fn lease_lost() -> Option<String> {
    LOST.lock().ok().and_then(|l| l.clone())
}

/// A lease was taken afresh: what was lost before is forgotten (only then: a second
/// renewer of the same hold must not wipe a loss the first one saw).
pub fn lease_taken() {
    if let Ok(mut l) = LOST.lock() {
        *l = None;
    }
}

/// Renews a lease in the background while it lives; a loss it sees is [`lease_lost`].
#[derive(Debug)]
pub struct Renewer {
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Renewer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            // A renewal in flight may take its retries; waiting for it is the pass's wait.
            while !h.is_finished() {
                crate::progress::beat();
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = h.join();
        }
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
        let e = a.set_halt("abc", "unhealthy").unwrap_err();
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
        a.set_halt("abc", "unhealthy").unwrap();
        assert_eq!(a.halt().unwrap().unwrap().commit, "abc");
    }
}
