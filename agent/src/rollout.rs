//! Steps 6 to 11 of DESIGN section 6 for a node of a running cluster: gate, lease, drain,
//! switch or reboot, verify, and then uncordon and release — or roll back, halt the commit
//! for everyone, and, if even the rollback is unhealthy, keep the lease so the rollout stays
//! frozen. Each step writes its phase to `state.json` before it acts.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use git2::Repository;
use nk3_common::inventory::{self, Inventory, RebootPolicy};
use tracing::{error, info, warn};

use crate::access::{self, Denied};
use crate::cluster::{Acquire, Cluster};
use crate::reconcile::{short, Agent, Target};
use crate::state::{self, Hold, Outcome, Phase};

/// What a verification is about.
#[derive(Debug)]
pub(crate) struct Verify {
    /// The commit applied (or rolled back from).
    pub commit: String,
    /// The node's hostname.
    pub host: String,
    /// The system that should run.
    pub system: String,
    /// The lease held and what to put back.
    pub hold: Hold,
    /// When the health timeout runs out.
    pub deadline: SystemTime,
    /// With a rollback: why the new generation was rolled back.
    pub rollback: Option<String>,
    /// Namespaces whose workloads must be healthy.
    pub watch: Vec<String>,
    /// When the switch or boot happened: health facts must be newer.
    pub since: SystemTime,
}

/// How a switch of this node is coordinated (see [`Agent::coordination`]).
pub(crate) enum Coordination {
    /// Under the rollout lease, with this cluster.
    Lease(Arc<Cluster>),
    /// Directly: k3s has not joined a cluster on this machine yet.
    Bootstrap,
    /// Not yet: a member without credentials for the API; why, for the operator.
    NoCredentials(String),
}

/// A verification to take up again after a restart or a reboot.
struct Resumed {
    commit: String,
    host: String,
    system: String,
    hold: Hold,
    /// None: a full health timeout from now.
    deadline: Option<SystemTime>,
    /// The reason of the rollback being checked, if it is one.
    rollback: Option<String>,
    /// When the switch or boot happened (None: now).
    since: Option<SystemTime>,
}

/// How often verification looks again.
const VERIFY_EVERY: Duration = Duration::from_secs(1);

impl Agent {
    /// The cluster this node belongs to, or `None` before its k3s ever ran (bootstrap: no
    /// kubeconfig yet), when it applies without the lease.
    pub(crate) fn cluster(&self, host: &str) -> anyhow::Result<Option<Arc<Cluster>>> {
        Ok(Cluster::connect(&self.settings().kubeconfig, host)?
            .map(|c| Arc::new(c.with_kubectl(&self.settings().kubectl))))
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
    fn refused_access(&mut self, t: &Target, cluster: &Cluster) -> anyhow::Result<Option<String>> {
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
        cluster: &Cluster,
    ) -> anyhow::Result<Option<String>> {
        let kubeconfig = &self.settings().kubeconfig;
        let ceph = t.rollout.ceph.as_ref().map(|c| c.namespace.as_str());
        let perms = access::permissions(&t.host, t.rollout.max_unavailable, ceph);
        let host = &t.host;
        let again = format!("on a server, run `nk3-agent credentials {host} --inventory inventory.yaml` and install the file it writes as services.nk3-agent.kubeconfig");
        Ok(match access::check(cluster.kube(), &perms)? {
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
        repo: &Repository,
        commit: &str,
    ) -> anyhow::Result<Inventory> {
        let path = &self.settings().inventory_path;
        let bytes = crate::git::Source::read(repo, commit, path)?
            .ok_or_else(|| anyhow::anyhow!("no {path} at commit {commit}"))?;
        inventory::load(path, &String::from_utf8_lossy(&bytes))
            .map_err(|d| anyhow::anyhow!("{}", d.lines().join("; ")))
    }

    /// Steps 6 to 9 with the cluster: the built `system` differs from the running one.
    pub(crate) fn coordinated(
        &mut self,
        t: &Target,
        system: String,
        cluster: Arc<Cluster>,
    ) -> anyhow::Result<Outcome> {
        let c = short(Some(&t.commit)).to_string();
        if let Some(msg) = self.refused_access(t, &cluster)? {
            self.problem(Some(&t.commit), &msg);
            return self.finish(Outcome::Waiting, Some(&t.commit), msg);
        }
        let r = &t.rollout;
        if let Some(h) = cluster.halt()? {
            if h.commit == t.commit {
                return self.halted(t, &h.node, &h.reason);
            }
        }
        // A budget that allows no eviction now: not even cordoning, and back off (doubling,
        // up to the drain timeout) before looking again for this commit.
        if let Some(b) = &self.state.drain_blocked {
            let due = humantime::parse_rfc3339(&b.next_try).is_ok_and(|t| SystemTime::now() >= t);
            if b.commit == t.commit && !due {
                let msg = b.reason.clone();
                info!(host = %t.host, commit = %c, "still not draining (back-off): {msg}");
                return self.finish(Outcome::Waiting, Some(&t.commit), msg);
            }
        }
        if let Some(b) = cluster.drain_blocker()? {
            let tries = match &self.state.drain_blocked {
                Some(d) if d.commit == t.commit => d.tries + 1,
                _ => 1,
            };
            let wait = (Duration::from_secs(30) * 2u32.saturating_pow(tries.min(10) - 1))
                .min(r.drain_timeout.max(Duration::from_secs(30)));
            let msg = format!(
                "not draining {}: PodDisruptionBudget {} allows no eviction of {} ({}){}; looking again in {}",
                t.host,
                b.budget,
                b.pod,
                b.why,
                if b.never { " — change the budget or the workload" } else { "" },
                humantime::format_duration(wait)
            );
            self.state.drain_blocked = Some(state::DrainBlocked {
                commit: t.commit.clone(),
                reason: msg.clone(),
                tries,
                next_try: humantime::format_rfc3339_seconds(crate::clock::wall(wait)).to_string(),
            });
            warn!(host = %t.host, commit = %c, "{msg}");
            cluster.event("DrainBlocked", &msg, true);
            return self.finish(Outcome::Waiting, Some(&t.commit), msg);
        }
        self.state.drain_blocked = None;
        // 7. The lease: wait for it (watching, not polling) up to one poll interval.
        crate::cluster::seed(&t.host, &self.state.lease_seen);
        let give_up = crate::clock::deadline(self.settings().poll_interval);
        let mut said = false;
        let lease = loop {
            match cluster.acquire(r.max_unavailable, r.lease_duration)? {
                Acquire::Held(name) => break name,
                Acquire::Busy {
                    holder,
                    lease,
                    left: expires_in,
                } => {
                    self.state.lease_seen = crate::cluster::seen(&t.host);
                    let left = give_up.saturating_duration_since(Instant::now());
                    let msg = format!("waiting for the rollout lease, held by {holder}");
                    if left.is_zero() {
                        self.waiting_for_lease = true;
                        return self.finish(Outcome::Waiting, Some(&t.commit), msg);
                    }
                    let again = self.state.last.as_ref().is_some_and(|l| l.message == msg);
                    if !said && !again {
                        info!(host = %t.host, commit = %c, "{msg}");
                    }
                    said = true;
                    // Woken by the holder's release, or when its claim may have run out.
                    let wait = left.min(expires_in + Duration::from_millis(200));
                    cluster.wait_for_change(&lease, &holder, wait)?;
                }
            }
        };
        // 6. The gate, checked (again) with the lease held so nobody else changes the picture:
        // the node that held it before may have halted this very commit.
        if let Some(h) = cluster.halt()? {
            if h.commit == t.commit {
                cluster.release(&lease)?;
                return self.halted(t, &h.node, &h.reason);
            }
        }
        if let Err(why) = cluster.gate(&t.members, &t.watch_namespaces, t.rollout.ceph.as_ref())? {
            cluster.release(&lease)?;
            let msg = format!("not disrupting {}: {why}", t.host);
            info!(host = %t.host, commit = %c, "{msg}");
            return self.finish(Outcome::Waiting, Some(&t.commit), msg);
        }
        // The inventory's nodes that are Ready now must still be Ready after this node's
        // disruption.
        let mut ready_before = cluster.ready_nodes()?;
        ready_before.retain(|n| t.members.contains(n));
        crate::cluster::lease_taken();
        let _renewing = cluster.keep_renewed(&lease, r.lease_duration);
        let mut hold = Hold {
            lease,
            was_unschedulable: false,
            ready_before,
            since: Some(state::now()),
        };
        // 8. Drain.
        self.state.phase = Phase::Draining {
            commit: t.commit.clone(),
            system: system.clone(),
            hold: hold.clone(),
        };
        self.save()?;
        let _ = cluster.annotate(None, "draining");
        info!(host = %t.host, commit = %c, "Draining {} (holding lease {})", t.host, hold.lease);
        cluster.event(
            "Draining",
            &format!("nk3 is draining the node to apply commit {c}"),
            false,
        );
        hold.was_unschedulable = cluster.cordon()?;
        self.state.phase = Phase::Draining {
            commit: t.commit.clone(),
            system: system.clone(),
            hold: hold.clone(),
        };
        self.save()?;
        if let Err(why) = cluster.drain(r.drain_timeout, &|| ()) {
            cluster.uncordon(hold.was_unschedulable)?;
            let _ = cluster.annotate(None, "idle");
            cluster.release(&hold.lease)?;
            self.state.phase = Phase::Built {
                commit: t.commit.clone(),
                system,
            };
            warn!(host = %t.host, commit = %c, "{why}; uncordoned {} and released the lease, will try again", t.host);
            cluster.event("DrainTimedOut", &why, true);
            return self.finish(Outcome::Waiting, Some(&t.commit), why);
        }
        // 9. Switch or reboot, holding the lease (renewed all through; `switch` does not
        // go on if it was lost meanwhile).
        self.switch(t, system, Some(hold))
    }

    /// Steps 10 and 11: checks health until the deadline, then uncordons and releases, or
    /// rolls back (and halts the commit), or freezes the rollout.
    pub(crate) fn verify(
        &mut self,
        v: Verify,
        rollout: &inventory::Rollout,
    ) -> anyhow::Result<Outcome> {
        let Verify {
            commit,
            host,
            system,
            hold,
            deadline,
            rollback,
            watch,
            since,
        } = v;
        let (commit, host) = (commit.as_str(), host.as_str());
        let c = short(Some(commit)).to_string();
        let Some(cluster) = self.cluster(host)? else {
            anyhow::bail!(
                "the kubeconfig {} is gone; cannot verify the node",
                self.settings().kubeconfig.display()
            );
        };
        self.state.phase = Phase::Verifying {
            commit: commit.to_string(),
            system: system.clone(),
            hold: hold.clone(),
            deadline: humantime::format_rfc3339_seconds(deadline).to_string(),
            rollback: rollback.is_some(),
            reason: rollback.clone(),
            since: Some(humantime::format_rfc3339_micros(since).to_string()),
        };
        self.save()?;
        let _renewing = cluster.keep_renewed(&hold.lease, rollout.lease_duration);
        let _ = cluster.annotate(None, "verifying");
        let systemctl = self.settings().systemctl.clone();
        let outcome = loop {
            // The boot id is read at each look: it is this boot's the kubelet must report.
            let fresh = crate::cluster::Fresh {
                boot_id: self.nixos().boot_id()?,
                since,
            };
            match cluster.healthy(
                &systemctl,
                &hold.ready_before,
                rollout,
                &watch,
                &fresh,
                deadline,
            ) {
                Ok(()) => break Ok(()),
                Err(why) if SystemTime::now() >= deadline => break Err(why),
                Err(_) => std::thread::sleep(VERIFY_EVERY),
            }
        };
        match (outcome, rollback) {
            (Ok(()), None) => {
                cluster.uncordon(hold.was_unschedulable)?;
                let _ = cluster.annotate(Some(commit), "idle");
                if cluster.halt()?.is_some_and(|h| h.commit != commit) {
                    // A newer commit made it through: the old halt no longer applies.
                    cluster.lift_halt()?;
                }
                cluster.release(&hold.lease)?;
                self.state.last_rollout_seconds = held_for(&hold);
                self.record_applied(commit, system)?;
                cluster.event(
                    "Ready",
                    &format!("nk3 applied commit {c}; the node is healthy"),
                    false,
                );
                info!(host = %host, commit = %c, "k8s is ready on {host}");
                self.finish(
                    Outcome::Applied,
                    Some(commit),
                    format!("applied commit {c}"),
                )
            }
            (Err(why), None) => {
                error!(host = %host, commit = %c, "{host} is unhealthy on commit {c}: {why}; rolling back");
                cluster.event(
                    "RollingBack",
                    &format!("commit {c} is unhealthy: {why}"),
                    true,
                );
                self.roll_back(commit, host, hold, rollout, why, watch)
            }
            (Ok(()), Some(reason)) => {
                let why = format!("{host} was unhealthy on it ({reason}) and rolled back");
                cluster.set_halt(commit, &why)?;
                cluster.uncordon(hold.was_unschedulable)?;
                let _ = cluster.annotate(self.state.applied.as_deref(), "idle");
                cluster.release(&hold.lease)?;
                self.state.last_rollout_seconds = held_for(&hold);
                let had_previous = self.previous_path().exists();
                self.restore(had_previous)?;
                let current = self.nixos().current();
                self.state.applied_system = current;
                self.mark_rejected(commit.to_string(), format!("halted: {why}"));
                cluster.event("Halted", &format!("commit {c} is halted: {why}"), true);
                error!(host = %host, commit = %c, "commit {c} halted for the whole cluster: {why}");
                self.finish(
                    Outcome::RolledBack,
                    Some(commit),
                    format!("commit {c} halted: {why}"),
                )
            }
            (Err(why), Some(reason)) => self.freeze(
                commit,
                host,
                hold,
                format!("even the rollback is unhealthy ({why}; the new generation failed with: {reason})"),
            ),
        }
    }

    /// Keeps the lease so no other node is disrupted, and says a person must look.
    fn freeze(
        &mut self,
        commit: &str,
        host: &str,
        hold: Hold,
        what: String,
    ) -> anyhow::Result<Outcome> {
        let c = short(Some(commit)).to_string();
        let msg = format!("{what}; keeping the rollout lease so no other node is disrupted — a person must look at {host}, or push a commit that fixes it");
        self.state.phase = Phase::Frozen {
            commit: commit.to_string(),
            hold,
            reason: msg.clone(),
        };
        if let Some(cluster) = self.cluster(host)? {
            cluster.event("RolloutFrozen", &msg, true);
            let _ = cluster.annotate(None, "frozen");
        }
        error!(host = %host, commit = %c, "ROLLOUT FROZEN: {msg}");
        self.finish(Outcome::Frozen, Some(commit), msg)
    }

    /// `nixos-rebuild switch --rollback`, a reboot if the policy or the kernel asks for one,
    /// and verification of the rolled-back generation.
    fn roll_back(
        &mut self,
        commit: &str,
        host: &str,
        hold: Hold,
        rollout: &inventory::Rollout,
        why: String,
        watch: Vec<String>,
    ) -> anyhow::Result<Outcome> {
        let c = short(Some(commit)).to_string();
        // What it goes back to: the system recorded as applied; a node never recorded one
        // (its first rollout) goes back one generation, and learns which from the rollback.
        let recorded = self.state.applied_system.clone().filter(|p| !p.is_empty());
        let mut previous = recorded.clone().unwrap_or_default();
        self.state.phase = Phase::Switching {
            commit: commit.to_string(),
            system: previous.clone(),
            reboot: false,
            hold: Some(hold.clone()),
            rollback: Some(why.clone()),
        };
        self.save()?;
        if let Err(e) = self.nixos().rollback() {
            error!(host = %host, commit = %c, "{e}");
        }
        if recorded.is_none() {
            previous = self.nixos().current().unwrap_or_default();
        }
        let reboot = rollout.reboot == RebootPolicy::Always
            || !self.nixos().reboot_reasons(&previous).is_empty();
        // Whoever holds the lease now may be down: switched back, this node does not reboot.
        let lost = crate::cluster::lease_lost();
        if let Some(why) = &lost {
            warn!(host = %host, commit = %c, "lost the rollout lease ({why}): rolled back without the reboot");
        }
        if reboot && lost.is_none() {
            let boot_id = self.nixos().boot_id()?;
            self.state.phase = Phase::Rebooting {
                commit: commit.to_string(),
                system: previous,
                boot_id,
                hold: Some(hold),
                rollback: true,
            };
            self.state.last = Some(state::LastResult {
                outcome: Outcome::Rebooting,
                commit: Some(commit.to_string()),
                message: format!("rolling back from commit {c}: {why}"),
                at: state::now(),
            });
            self.save()?;
            info!(host = %host, commit = %c, "Rebooting {host} into the previous generation");
            self.nixos().reboot()?;
            return Ok(Outcome::Rebooting);
        }
        let deadline = crate::clock::wall(rollout.health_timeout);
        let v = Verify {
            commit: commit.to_string(),
            host: host.to_string(),
            system: previous,
            hold,
            deadline,
            rollback: Some(why),
            watch,
            since: SystemTime::now(),
        };
        self.verify(v, rollout)
    }

    /// A commit another node found unhealthy: never applied here.
    fn halted(&mut self, t: &Target, node: &str, reason: &str) -> anyhow::Result<Outcome> {
        let c = short(Some(&t.commit)).to_string();
        let msg = format!(
            "commit {c} is halted for the cluster by {node}: {reason}; waiting for a newer commit"
        );
        let had_previous = self.previous_path().exists();
        self.restore(had_previous)?;
        self.mark_rejected(t.commit.clone(), msg.clone());
        warn!(host = %t.host, commit = %c, "{msg}");
        self.finish(Outcome::Refused, Some(&t.commit), msg)
    }

    /// Gives back what this node may still hold from an interrupted rollout (the lease, its
    /// own cordon) once it finds it runs the wanted system without anything left to do.
    pub(crate) fn let_go(&self, host: &str, max_unavailable: u32) -> anyhow::Result<()> {
        if let Some(cluster) = self.cluster(host)? {
            cluster.let_go(max_unavailable)?;
        }
        Ok(())
    }

    /// Verification taken up again after a restart or a reboot, with the rollout settings of
    /// the commit's inventory; no deadline yet: a full health timeout from now.
    fn verify_resumed(&mut self, repo: &Repository, r: Resumed) -> anyhow::Result<Outcome> {
        let inv = self.inventory_at(repo, &r.commit)?;
        let v = Verify {
            deadline: r
                .deadline
                .unwrap_or_else(|| crate::clock::wall(inv.rollout.health_timeout)),
            commit: r.commit,
            host: r.host,
            system: r.system,
            hold: r.hold,
            rollback: r.rollback,
            watch: inv.watch_namespaces.clone(),
            since: r.since.unwrap_or_else(SystemTime::now),
        };
        self.verify(v, &inv.rollout)
    }

    /// Resumes a phase that holds the lease, after a restart or a reboot. `Some` ends the
    /// pass.
    pub(crate) fn resume_held(&mut self, repo: &Repository) -> anyhow::Result<Option<Outcome>> {
        let phase = self.state.phase.clone();
        let host = self.state.host.clone().unwrap_or_default();
        match phase {
            Phase::Rebooting {
                commit,
                system,
                boot_id,
                hold: Some(hold),
                rollback,
            } => {
                if self.nixos().boot_id()? == boot_id {
                    info!(host = %host, commit = %short(Some(&commit)), "Rebooting {host} (asked again: the machine has not rebooted yet)");
                    self.nixos().reboot()?;
                    return Ok(Some(Outcome::Rebooting));
                }
                info!(host = %host, commit = %short(Some(&commit)), "{host} is back; checking its health");
                let reason = rollback.then(|| {
                    self.state
                        .last
                        .as_ref()
                        .map(|l| l.message.clone())
                        .unwrap_or_default()
                });
                let v = Resumed {
                    commit,
                    host,
                    system,
                    hold,
                    deadline: None,
                    rollback: reason,
                    since: None,
                };
                self.verify_resumed(repo, v).map(Some)
            }
            Phase::Verifying {
                commit,
                system,
                hold,
                deadline,
                rollback,
                reason,
                since,
            } => {
                let deadline = humantime::parse_rfc3339(&deadline).ok();
                let since = since.and_then(|s| humantime::parse_rfc3339(&s).ok());
                let reason = rollback.then(|| reason.unwrap_or_default());
                // A deadline that cannot be read has passed: judge the node now.
                let v = Resumed {
                    commit,
                    host,
                    system,
                    hold,
                    deadline: deadline.or(Some(SystemTime::now())),
                    rollback: reason,
                    since,
                };
                self.verify_resumed(repo, v).map(Some)
            }
            Phase::Switching {
                commit,
                system,
                hold: Some(hold),
                rollback: Some(why),
                ..
            } => {
                // Stopped in the middle of a rollback: if it happened, verify it as the
                // rollback it is (and halt); if not, freeze rather than guess.
                let inv = self.inventory_at(repo, &commit)?;
                if self.nixos().current().as_deref() == Some(system.as_str()) {
                    warn!(host = %host, commit = %short(Some(&commit)), "resuming the rollback from commit {}: checking the previous generation's health", short(Some(&commit)));
                    let r = Resumed {
                        commit,
                        host,
                        system,
                        hold,
                        deadline: None,
                        rollback: Some(why),
                        since: None,
                    };
                    return self.verify_resumed(repo, r).map(Some);
                }
                // `--rollback` steps back one generation from wherever the profile is: run
                // again after a rollback that moved the profile but did not finish, it would
                // go back two. The machine runs neither generation it should: a person looks.
                let _ = inv;
                self.freeze(&commit, &host, hold, format!("{why}; then the rollback was interrupted and {host} runs neither the new generation nor the previous one ({system})"))
                    .map(Some)
            }
            Phase::Switching {
                commit,
                system,
                hold: Some(hold),
                reboot: false,
                rollback: None,
            } if self.nixos().current().as_deref() == Some(system.as_str()) => {
                // The switch finished before the agent stopped: verify it, under the lease.
                self.verify_resumed(
                    repo,
                    Resumed {
                        commit,
                        host,
                        system,
                        hold,
                        deadline: None,
                        rollback: None,
                        since: None,
                    },
                )
                .map(Some)
            }
            Phase::Draining { .. } => {
                // Interrupted while draining: go through the steps again (the lease is still
                // ours and the node still cordoned by nk3, which the cordon step recognises).
                if let Phase::Draining { commit, system, .. } = phase {
                    self.state.phase = Phase::Built { commit, system };
                }
                Ok(None)
            }
            Phase::Frozen {
                commit,
                hold,
                reason,
            } => {
                // Keep the lease while frozen; a new commit may fix things.
                if let Some(cluster) = self.cluster(&host)? {
                    let inv = self.inventory_at(repo, &commit)?;
                    if let Err(e) = cluster.renew(&hold.lease, inv.rollout.lease_duration) {
                        warn!(host = %host, commit = %short(Some(&commit)), "cannot renew the lease while frozen: {e}");
                    }
                }
                let _ = reason;
                Ok(None)
            }
            _ => Ok(None),
        }
    }
}

/// How long the lease has been held.
fn held_for(hold: &Hold) -> Option<u64> {
    let since = humantime::parse_rfc3339(hold.since.as_deref()?).ok()?;
    SystemTime::now()
        .duration_since(since)
        .ok()
        .map(|d| d.as_secs())
}

/// Whether a frozen node should stay frozen for `head`.
pub(crate) fn still_frozen(phase: &Phase, head: &str) -> Option<String> {
    match phase {
        Phase::Frozen { commit, reason, .. } if commit == head => Some(reason.clone()),
        _ => None,
    }
}
