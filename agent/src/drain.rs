//! Step 8 of DESIGN section 6: draining this node through the Eviction API, as
//! `kubectl drain` does: the pods are listed once, DaemonSet and mirror pods left alone, each
//! other pod evicted (a PodDisruptionBudget may refuse, and the API may fail: both are
//! retried every few seconds until `drain_timeout`), and the drain is done when each evicted
//! pod, by UID, is gone.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use nk3_common::disruption::{self, Blocker};
use serde_json::Value;

use crate::cluster::Cluster;
use crate::kube::{Eviction, KubeError};

/// How often a refused eviction is asked again.
const EVICT_EVERY: Duration = Duration::from_secs(5);
/// How often the drain looks whether the evicted pods are gone.
const LOOK_EVERY: Duration = Duration::from_millis(500);

struct PodRef {
    ns: String,
    name: String,
    uid: String,
}

impl Cluster {
    fn my_pods(&self) -> Result<Vec<Value>, KubeError> {
        self.kube().list_json(&format!(
            "/api/v1/pods?fieldSelector=spec.nodeName%3D{}",
            self.me
        ))
    }

    /// The PodDisruptionBudget that stops a drain of this node now, if any: looked at
    /// before cordoning, so a budget that allows nothing does not have every pass cordon,
    /// evict the other pods and time out.
    pub fn drain_blocker(&self) -> Result<Option<Blocker>, KubeError> {
        let pods = self.my_pods()?;
        if !pods.iter().any(disruption::evictable) {
            return Ok(None);
        }
        let budgets = self
            .kube()
            .list_json("/apis/policy/v1/poddisruptionbudgets")?;
        Ok(disruption::blocker(&budgets, &pods))
    }

    /// Evicts this node's pods and waits for them to be gone. `Err` says why it did not
    /// finish within `timeout`; nothing here ends the pass early.
    pub fn drain(&self, timeout: Duration, keep_alive: &dyn Fn()) -> Result<(), String> {
        let deadline = crate::clock::deadline(timeout);
        let pods = loop {
            match self.my_pods() {
                Ok(p) => break p,
                Err(e) if Instant::now() + EVICT_EVERY < deadline => {
                    tracing::debug!("cannot list the pods of {}: {e}", self.me);
                    std::thread::sleep(EVICT_EVERY);
                }
                Err(e) => return Err(format!("drain timed out: cannot list the pods: {e}")),
            }
        };
        let mut left: Vec<PodRef> = pods
            .iter()
            .filter(|p| disruption::evictable(p))
            .map(|p| PodRef {
                ns: p["metadata"]["namespace"]
                    .as_str()
                    .unwrap_or("default")
                    .into(),
                name: p["metadata"]["name"].as_str().unwrap_or_default().into(),
                uid: p["metadata"]["uid"].as_str().unwrap_or_default().into(),
            })
            .collect();
        let mut asked: BTreeSet<String> = BTreeSet::new();
        let mut refused: BTreeMap<String, String> = BTreeMap::new();
        let mut next_ask = Instant::now();
        loop {
            keep_alive();
            // Gone: no such pod, or another pod (a new UID) by that name.
            left.retain(|p| {
                let path = format!("/api/v1/namespaces/{}/pods/{}", p.ns, p.name);
                match self.kube().get::<Value>(&path) {
                    Ok(None) => false,
                    Ok(Some(v)) => v["metadata"]["uid"].as_str() == Some(p.uid.as_str()),
                    Err(_) => true,
                }
            });
            if left.is_empty() {
                return Ok(());
            }
            if Instant::now() >= next_ask {
                let ask: Vec<&PodRef> = left.iter().filter(|p| !asked.contains(&p.uid)).collect();
                for p in ask {
                    let who = format!("{}/{}", p.ns, p.name);
                    match self.kube().evict(&p.ns, &p.name, &p.uid) {
                        Ok(Eviction::Started | Eviction::Gone) => {
                            asked.insert(p.uid.clone());
                            refused.remove(&who);
                        }
                        Ok(Eviction::Blocked(why)) => {
                            refused.insert(who, why);
                        }
                        // 500 for a pod under two budgets, 403, 504…: not this pass's end.
                        Err(e) => {
                            refused.insert(who, e.to_string());
                        }
                    }
                }
                next_ask = Instant::now() + EVICT_EVERY;
            }
            if Instant::now() >= deadline {
                let names: Vec<String> = left
                    .iter()
                    .map(|p| format!("{}/{}", p.ns, p.name))
                    .collect();
                return Err(match refused.iter().next() {
                    Some((pod, why)) => {
                        format!("drain timed out; the eviction of {pod} was refused: {why}")
                    }
                    None => format!(
                        "drain timed out waiting for {} to terminate",
                        names.join(", ")
                    ),
                });
            }
            std::thread::sleep(LOOK_EVERY);
        }
    }
}
