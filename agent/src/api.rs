//! The production [`RolloutApi`]: the k3s API through [`Cluster`].

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::cluster::{Acquire, Cluster, Fresh, Halt, Renewer};
use crate::effects::{Probes, RolloutApi};
use crate::kube::KubeError;

/// A connected cluster, as the runner uses it.
#[derive(Debug, Clone)]
pub struct Api(pub Arc<Cluster>);

impl RolloutApi for Api {
    fn annotate(&self, commit: Option<&str>, phase: &str) -> Result<(), KubeError> {
        self.0.annotate(commit, phase)
    }
    fn event(&self, reason: &str, message: &str, warning: bool) {
        self.0.event(reason, message, warning)
    }
    fn halt(&self) -> Result<Option<Halt>, KubeError> {
        self.0.halt()
    }
    fn set_halt(
        &self,
        commit: &str,
        reason: &str,
        newer: &dyn Fn(&str) -> bool,
    ) -> Result<(), KubeError> {
        self.0.set_halt(commit, reason, newer)
    }
    fn lift_halt(&self, by: &str) -> Result<(), KubeError> {
        self.0.lift_halt(by)
    }
    fn drain_blocker(&self) -> Result<Option<nk3_common::disruption::Blocker>, KubeError> {
        self.0.drain_blocker()
    }
    fn acquire(&self, max_unavailable: u32, duration: Duration) -> Result<Acquire, KubeError> {
        self.0.acquire(max_unavailable, duration)
    }
    fn wait_for_change(
        &self,
        name: &str,
        holder: &str,
        timeout: Duration,
    ) -> Result<(), KubeError> {
        self.0.wait_for_change(name, holder, timeout)
    }
    fn gate(
        &self,
        members: &[String],
        watch_namespaces: &[String],
        ceph: Option<&nk3_common::inventory::Ceph>,
    ) -> Result<Result<(), String>, KubeError> {
        self.0.gate(members, watch_namespaces, ceph)
    }
    fn ready_nodes(&self) -> Result<Vec<String>, KubeError> {
        self.0.ready_nodes()
    }
    fn renew(&self, lease: &str, duration: Duration) -> Result<(), KubeError> {
        self.0.renew(lease, duration)
    }
    fn keep_renewed(&self, lease: &str, duration: Duration) -> Renewer {
        self.0.keep_renewed(lease, duration)
    }
    fn cordon(&self) -> Result<bool, KubeError> {
        self.0.cordon()
    }
    fn drain(&self, timeout: Duration) -> Result<(), String> {
        self.0.drain(timeout, &|| ())
    }
    fn uncordon(&self, was_unschedulable: bool) -> Result<(), KubeError> {
        self.0.uncordon(was_unschedulable)
    }
    fn release(&self, lease: &str) -> Result<(), KubeError> {
        self.0.release(lease)
    }
    fn let_go(&self, max_unavailable: u32) -> Result<(), KubeError> {
        self.0.let_go(max_unavailable)
    }
    fn healthy(
        &self,
        ready_before: &[String],
        rollout: &nk3_common::inventory::Rollout,
        watch_namespaces: &[String],
        fresh: &Fresh,
        deadline: SystemTime,
        probes: &dyn Probes,
    ) -> Result<(), String> {
        self.0.healthy(
            ready_before,
            rollout,
            watch_namespaces,
            fresh,
            deadline,
            probes,
        )
    }
    fn denied(
        &self,
        perms: &[crate::access::Permission],
    ) -> Result<Option<crate::access::Denied>, KubeError> {
        crate::access::check(self.0.kube(), perms)
    }
}
