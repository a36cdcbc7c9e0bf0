//! The halt on the first rollout Lease (DESIGN section 7): the newest halted commit, why and
//! by whom, whether a newer commit got through since, and the halts before it.

use std::collections::BTreeMap;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::cluster::*;
use crate::kube::KubeError;
use crate::leases::conflicts;

impl Cluster {
    /// Marks `commit` halted on the first lease, for every node to see.
    ///
    /// Unless `newer` says the halted commit on record is newer, this halt becomes the one
    /// on record and the one it replaces joins the earlier halts; else it joins them
    /// itself. Judged on what the write replaces, again after a conflict.
    pub fn set_halt(
        &self,
        commit: &str,
        reason: &str,
        newer: &dyn Fn(&str) -> bool,
    ) -> Result<(), KubeError> {
        let reason: String = reason.chars().take(500).collect();
        self.edit_lease_annotations(&|a| {
            // A list that cannot be read (a hand edit) is kept aside, not written over.
            if let Some(raw) = a.get(HALTED_EARLIER).cloned() {
                if serde_json::from_str::<Vec<Earlier>>(&raw).is_err() {
                    a.insert(HALTED_EARLIER_UNREADABLE.into(), raw);
                    a.remove(HALTED_EARLIER);
                }
            }
            let mut earlier = crate::cluster::earlier_halts(a);
            let this = Earlier {
                commit: commit.into(),
                node: self.me.clone(),
                reason: reason.clone(),
            };
            let current = a.get(HALTED_COMMIT).cloned();
            let newest = match &current {
                Some(c) if c != commit => !newer(c),
                _ => true,
            };
            if newest {
                if let Some(c) = current.filter(|c| c != commit) {
                    earlier.insert(
                        0,
                        Earlier {
                            reason: a.get(HALTED_REASON).cloned().unwrap_or_default(),
                            node: a.get(HALTED_NODE).cloned().unwrap_or_default(),
                            commit: c,
                        },
                    );
                }
                a.insert(HALTED_COMMIT.into(), commit.into());
                a.insert(HALTED_REASON.into(), reason.clone());
                a.insert(HALTED_NODE.into(), self.me.clone());
                a.remove(HALT_LIFTED_BY);
            } else if current.as_deref() != Some(commit) {
                earlier.insert(0, this);
            }
            // Each commit once, its newest record; beyond EARLIER_KEPT the oldest are dropped.
            let mut seen = std::collections::BTreeSet::new();
            earlier.retain(|e| {
                Some(e.commit.as_str()) != a.get(HALTED_COMMIT).map(String::as_str)
                    && seen.insert(e.commit.clone())
            });
            earlier.truncate(EARLIER_KEPT);
            if earlier.is_empty() {
                a.remove(HALTED_EARLIER);
            } else {
                let json = serde_json::to_string(&earlier).unwrap_or_default();
                a.insert(HALTED_EARLIER.into(), json);
            }
        })
    }

    /// Sets (or, with `None`, removes) annotations on the first lease, creating it, free, if
    /// there is none.
    pub(crate) fn annotate_lease(&self, changes: &[(&str, Option<&str>)]) -> Result<(), KubeError> {
        self.edit_lease_annotations(&|a| {
            for (key, value) in changes {
                match value {
                    Some(v) => a.insert((*key).into(), (*v).into()),
                    None => a.remove(*key),
                };
            }
        })
    }

    /// Changes the annotations of the first lease with `edit` (again on a conflict, on what
    /// is there then), creating the lease, free, if there is none.
    fn edit_lease_annotations(
        &self,
        edit: &dyn Fn(&mut BTreeMap<String, String>),
    ) -> Result<(), KubeError> {
        for _ in 0..5 {
            let mut l = match self.kube.lease(&self.lease.namespace, &self.lease.name)? {
                Some(l) => l,
                None => {
                    let l = Lease {
                        metadata: ObjectMeta {
                            name: Some(self.lease.name.clone()),
                            namespace: Some(self.lease.namespace.clone()),
                            ..ObjectMeta::default()
                        },
                        spec: Some(LeaseSpec::default()),
                    };
                    match self.kube.create_lease(&self.lease.namespace, &l) {
                        Ok(l) => l,
                        Err(e) if e.code() == Some(409) => continue,
                        Err(e) => return Err(e),
                    }
                }
            };
            edit(l.metadata.annotations.get_or_insert_with(BTreeMap::new));
            match self.kube.replace_lease(&self.lease.namespace, &l) {
                Err(e) if e.code() == Some(409) => continue,
                other => return other.map(|_| ()),
            }
        }
        Err(conflicts(format!("annotate lease {}", self.lease.name)))
    }

    /// Lifts a halt (a newer commit was applied).
    pub fn lift_halt(&self, by: &str) -> Result<(), KubeError> {
        self.annotate_lease(&[(HALT_LIFTED_BY, Some(by))])
    }
}
