//! The rollout Leases in the API (DESIGN section 7): acquire, watch, renew, release, and the
//! nudge they carry (the halt: `halts.rs`); what this agent has seen of each holder's record, by which
//! expiry is judged; the background renewer.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use nk3_common::lease::{self, Claim, Decision};

use crate::cluster::*;
use crate::kube::{KubeError, WatchEvent};

/// Where the rollout's Leases are: a namespace and the first one's name, settings
/// (`--lease-namespace`, `--lease-name`; DESIGN section 7). With `max_unavailable: N` the
/// slots are `<name>-0…<name>-N-1`; the first name carries the halt and the nudge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RolloutLease {
    /// The namespace.
    pub namespace: String,
    /// The first Lease's name.
    pub name: String,
}

impl Default for RolloutLease {
    fn default() -> Self {
        RolloutLease {
            namespace: NAMESPACE.to_string(),
            name: LEASE.to_string(),
        }
    }
}

impl RolloutLease {
    /// The slots for `max_unavailable`.
    pub fn slots(&self, max_unavailable: u32) -> Vec<String> {
        lease::names(&self.name, max_unavailable)
    }

    /// Every rollout Lease's name for `max_unavailable`: the first one and the slots.
    pub fn names(&self, max_unavailable: u32) -> Vec<String> {
        let mut names = vec![self.name.clone()];
        for n in self.slots(max_unavailable) {
            if !names.contains(&n) {
                names.push(n);
            }
        }
        names
    }
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
pub(crate) fn conflicts(what: String) -> KubeError {
    KubeError::Status {
        what,
        code: 409,
        reason: "Conflict".into(),
        message: "the object kept changing under five attempts in a row; not written".into(),
    }
}

pub(crate) fn micro_now() -> MicroTime {
    MicroTime(timestamp_now())
}

pub(crate) fn to_system(t: &MicroTime) -> SystemTime {
    let ts = t.0;
    SystemTime::UNIX_EPOCH + Duration::from_nanos(ts.as_nanosecond().max(0) as u64)
}

pub(crate) fn claim(l: &Lease) -> Claim {
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

/// Why the lease a renewer kept was lost, by node, if it was: it stays for the rest of the
/// hold, across passes (see [`lease_lost`]).
static LOST: std::sync::Mutex<BTreeMap<String, String>> = std::sync::Mutex::new(BTreeMap::new());

/// Why node `me`'s rollout lease is no longer its own, if another node holds it now.
pub fn lease_lost(me: &str) -> Option<String> {
    LOST.lock().ok().and_then(|l| l.get(me).cloned())
}

/// Node `me` took a lease afresh: what it lost before is forgotten (only then: a second
/// renewer of the same hold must not wipe a loss the first one saw).
pub fn lease_taken(me: &str) {
    if let Ok(mut l) = LOST.lock() {
        l.remove(me);
    }
}

/// Renews a lease in the background while it lives; a loss it sees is [`lease_lost`].
#[derive(Debug)]
pub struct Renewer {
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Renewer {
    /// One that renews nothing: for an API that keeps its leases itself (a fake).
    #[cfg(test)]
    pub fn none() -> Renewer {
        Renewer {
            stop: Arc::new(AtomicBool::new(true)),
            handle: None,
        }
    }
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

impl Cluster {
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
        let names = self.lease.slots(max_unavailable);
        // Already holding a slot (say, before a reboot): keep it.
        for name in &names {
            if let Some(l) = self.kube.lease(&self.lease.namespace, name)? {
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
                let current = self.kube.lease(&self.lease.namespace, name)?;
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
                        namespace: Some(self.lease.namespace.clone()),
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
                self.kube
                    .create_lease(&self.lease.namespace, &l)
                    .map(|_| ())
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
                self.kube
                    .replace_lease(&self.lease.namespace, &l)
                    .map(|_| ())
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
            let (lease, mut rv) = match self.kube.list_lease(&self.lease.namespace, name) {
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
                    &self.lease.namespace,
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
            let current = self.kube.lease(&self.lease.namespace, lease)?;
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
            let Some(mut l) = self.kube.lease(&self.lease.namespace, lease)? else {
                return Ok(());
            };
            let mut spec = l.spec.take().unwrap_or_default();
            if spec.holder_identity.as_deref() != Some(self.me.as_str()) {
                return Ok(());
            }
            spec.holder_identity = None;
            l.spec = Some(spec);
            match self.kube.replace_lease(&self.lease.namespace, &l) {
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
        for name in self.lease.names(max_unavailable) {
            self.release(&name)?;
        }
        Ok(())
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
        self.watch_first(
            &self.lease.name.clone(),
            crate::clock::deadline(timeout),
            |l| {
                let now = desired(l);
                let Some(b) = &before else {
                    before = Some(now);
                    return (on_release && free(l))
                        .then(|| "the rollout lease is free".to_string());
                };
                if &now != b {
                    return Some(match now {
                        Some(d) => format!("desired commit {d}"),
                        None => "the desired commit was cleared".into(),
                    });
                }
                (on_release && free(l)).then(|| "the rollout lease was released".to_string())
            },
        )
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
                                l.insert(me.me.clone(), message);
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
