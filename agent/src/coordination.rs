//! How this node reaches its cluster for a rollout: the cluster client from the
//! kubeconfig, whether the machine is a member at all (bootstrap), and whether its
//! credentials may run a whole rollout (asked of the API before anything is done).

use std::sync::Arc;

use nk3_common::inventory::{self, Inventory};

use crate::access::{self, Denied};
use crate::cluster::Cluster;
use crate::effects::RolloutApi;
use crate::reconcile::{Agent, Target};

/// How a switch of this node is coordinated (see [`Agent::coordination`]).
pub(crate) enum Coordination {
    /// Under the rollout lease, with this cluster.
    Lease(Arc<dyn RolloutApi>),
    /// Directly: k3s has not joined a cluster on this machine yet.
    Bootstrap,
    /// Not yet: a member without credentials for the API; why, for the operator.
    NoCredentials(String),
}

impl Coordination {
    /// What the decision sees of it, and the cluster when there is one: for a member with a
    /// kubeconfig, `refusal` says whether its credentials may run a whole rollout.
    pub(crate) fn fact(
        self,
        refusal: impl FnOnce(&dyn RolloutApi) -> anyhow::Result<Option<String>>,
    ) -> anyhow::Result<(
        nk3_common::rollout::Coordination,
        Option<Arc<dyn RolloutApi>>,
    )> {
        use nk3_common::rollout::Coordination as C;
        Ok(match self {
            Coordination::Lease(cluster) => match refusal(cluster.as_ref())? {
                None => (C::Lease, Some(cluster)),
                Some(why) => (C::NoCredentials(why), Some(cluster)),
            },
            Coordination::Bootstrap => (C::Bootstrap, None),
            Coordination::NoCredentials(why) => (C::NoCredentials(why), None),
        })
    }
}

impl Agent {
    /// The cluster this node belongs to, or `None` before its k3s ever ran (bootstrap: no
    /// kubeconfig yet), when it applies without the lease.
    pub(crate) fn cluster(&self, host: &str) -> anyhow::Result<Option<Arc<dyn RolloutApi>>> {
        if let Some(connect) = &self.effects.api {
            return connect(host);
        }
        let s = self.settings();
        Ok(Cluster::connect(&s.kubeconfig, host)?.map(|c| {
            let c = c
                .with_kubectl(&s.kubectl)
                .with_lease(s.lease.rollout_lease());
            Arc::new(crate::api::Api(Arc::new(c))) as Arc<dyn RolloutApi>
        }))
    }

    /// How a switch of this node is coordinated with its cluster: under the rollout lease
    /// when there are credentials for the API; directly only when k3s has not joined a
    /// cluster on this machine (bootstrap); not at all while a member has no credentials.
    /// Never judged from a missing kubeconfig alone: agent-role nodes have none of k3s's.
    pub(crate) fn coordination(&self, host: &str) -> anyhow::Result<Coordination> {
        if let Some(c) = self.cluster(host)? {
            return Ok(Coordination::Lease(c));
        }
        let s = self.settings();
        Ok(match crate::machine::k3s_joined(&s.k3s_data_dir) {
            None => Coordination::Bootstrap,
            Some(sign) => Coordination::NoCredentials(format!(
                "no credentials for the k3s API: {} does not exist, but k3s has joined a cluster on this machine ({} exists), so {host} does not switch outside the rollout lease; on a server, run `nk3-agent credentials {host}` and install the file it writes as services.nk3-agent.kubeconfig (README: agent-role nodes)",
                s.kubeconfig.display(),
                sign.display()
            )),
        })
    }

    /// Why these credentials cannot run a whole rollout, if they cannot: asked of the API
    /// before anything is done, since a refusal half-way would leave the node cordoned or
    /// holding the lease. Asked again when the kubeconfig or the rollout's shape changes.
    pub(crate) fn refused_access(
        &mut self,
        t: &Target,
        cluster: &dyn RolloutApi,
    ) -> anyhow::Result<Option<String>> {
        let kubeconfig = self.settings().kubeconfig.clone();
        let stamp = std::fs::metadata(&kubeconfig)
            .and_then(|m| m.modified())
            .ok();
        let ceph = t.rollout.ceph.as_ref().map(|c| c.namespace.clone());
        let max = t.rollout.max_unavailable;
        let key = format!("{}|{stamp:?}|{max}|{ceph:?}", kubeconfig.display());
        if self.access_checked.as_deref() == Some(key.as_str()) {
            return Ok(None);
        }
        let refusal = self.access_refusal(t, cluster)?;
        if refusal.is_none() {
            self.access_checked = Some(key);
        }
        Ok(refusal)
    }

    /// Why these credentials cannot run a whole rollout of `t`, asked of the API each time.
    pub(crate) fn access_refusal(
        &self,
        t: &Target,
        cluster: &dyn RolloutApi,
    ) -> anyhow::Result<Option<String>> {
        let kubeconfig = &self.settings().kubeconfig;
        let ceph = t.rollout.ceph.as_ref().map(|c| c.namespace.as_str());
        let lease = self.settings().lease.rollout_lease();
        let perms = access::permissions(&t.host, &lease, t.rollout.max_unavailable, ceph);
        let host = &t.host;
        let again = format!("on a server, run `nk3-agent credentials {host} --inventory inventory.yaml` and install the file it writes as services.nk3-agent.kubeconfig");
        Ok(match cluster.denied(&perms)? {
            None => None,
            Some(Denied::Kubelet { user }) => Some(format!(
                "no usable credentials for the k3s API: {} holds a kubelet's ({user}), which the API lets write Leases only in kube-node-lease, so {host} cannot take the rollout lease and does not switch; {again}",
                kubeconfig.display()
            )),
            Some(Denied::Missing { user, what }) => Some(format!(
                "no usable credentials for the k3s API: it does not let {user} ({}) {}, so {host} does not start a rollout it could not finish; {again}",
                kubeconfig.display(),
                what.join(", ")
            )),
        })
    }

    /// The inventory at `commit`, for the rollout settings of an apply resumed after a
    /// restart.
    pub(crate) fn inventory_at(
        &self,
        git: &dyn crate::effects::GitSource,
        commit: &str,
    ) -> anyhow::Result<Inventory> {
        let path = &self.settings().inventory_path;
        let bytes = git
            .read(commit, path)?
            .ok_or_else(|| anyhow::anyhow!("no {path} at commit {commit}"))?;
        inventory::load(path, &String::from_utf8_lossy(&bytes))
            .map_err(|d| anyhow::anyhow!("{}", d.lines().join("; ")))
    }
}
