//! What each action of the decision does, and what it found, written into the observation.

use anyhow::anyhow;
use nk3_common::rollout::{
    self, Action, Built, Claim, Failed, Halt, Machine, Observation, Op, Settings,
};
use tracing::warn;

use super::Pass;
use crate::cluster::Acquire;
use crate::reconcile::Agent;
use crate::state::Outcome;

/// A command's failure as the decision sees it: how, and what the command was and said.
fn failed(e: &crate::command::CommandFailed) -> Failed {
    use crate::command::Failure as F;
    Failed {
        failure: match e.failure {
            F::NotStarted => rollout::Failure::NotStarted,
            F::Exited => rollout::Failure::Exited,
            F::TimedOut => rollout::Failure::TimedOut,
        },
        message: e.to_string(),
    }
}

/// A build's failure: when Nix refused the configuration, Nix's own `error:` lines are what
/// a person needs (they become the rejection on record).
fn build_failed(e: &crate::command::CommandFailed) -> Failed {
    let mut f = failed(e);
    if e.failure == crate::command::Failure::Exited && !e.tail.is_empty() {
        f.message = e.tail.clone();
    }
    f
}

impl Agent {
    /// Does what `action` says; `Some` ends the pass.
    pub(super) fn act(&mut self, p: &mut Pass, action: Action) -> anyhow::Result<Option<Outcome>> {
        let o = &mut p.obs;
        match action {
            Action::Continue => {}
            Action::Finish {
                outcome,
                lease_wait,
            } => {
                self.waiting_for_lease = lease_wait;
                return Ok(Some(outcome));
            }
            Action::LookSettings => {
                let host = self.state.host.clone().unwrap_or_default();
                let r = self
                    .phase_inventory(p)
                    .map(|inv| Settings::of(&host, &inv.rollout));
                p.obs.settings = Some(r.map_err(|e| format!("{e:#}")));
            }
            Action::LookPlan => self.look_plan(p)?,
            Action::LookMachine => {
                o.machine = Some(Machine {
                    boot_id: self.nixos().boot_id()?,
                    current: self.nixos().current(),
                    previous_saved: self.previous_path().exists(),
                });
            }
            Action::LookCoordination => {
                let t = p.target.as_ref().ok_or_else(|| anyhow!("no plan"))?;
                let (c, cluster) = self
                    .coordination(&t.host)?
                    .fact(|cluster| self.refused_access(t, cluster))?;
                if cluster.is_some() {
                    p.cluster = Some(cluster);
                }
                p.obs.coordination = Some(c);
            }
            Action::LookHalt | Action::LookHaltHeld => {
                let c = self.need_cluster(p)?;
                let h = c.halt()?.map(Halt::from);
                if action == Action::LookHalt {
                    p.obs.halt = Some(h);
                } else {
                    p.obs.halt_held = Some(h);
                }
            }
            Action::LookHeadHeld => {
                self.repo(p)?;
                let repo = p.repo.take().expect("opened");
                let head = self.fetch(repo.as_ref());
                p.repo = Some(repo);
                // A git server that is down does not stop a rollout under way: the head is
                // then the last commit taken (and a halt of it is still seen in the API).
                p.obs.head_held = Some(head?.ok_or_else(|| anyhow!("no commit fetched"))?);
            }
            Action::Replan => {
                let now = self.clock().now();
                p.obs = Observation::pass(now, self.settings().poll_interval, self.report_idle);
                p.target = None;
                p.renewer = None;
            }
            Action::LookBlocker => {
                let c = self.need_cluster(p)?;
                p.obs.blocker = Some(c.drain_blocker()?);
            }
            Action::Acquire => {
                let c = self.need_cluster(p)?;
                let host = self.state.host.clone().unwrap_or_default();
                if !p.seeded {
                    crate::cluster::seed(&host, &self.state.lease_seen);
                    p.seeded = true;
                }
                let t = p.target.as_ref().ok_or_else(|| anyhow!("no plan"))?;
                let claim = match c.acquire(t.rollout.max_unavailable, t.rollout.lease_duration)? {
                    Acquire::Held(name) => Claim::Held(name),
                    Acquire::Busy {
                        holder,
                        lease,
                        left,
                    } => {
                        self.state.lease_seen = crate::cluster::seen(&host);
                        Claim::Busy {
                            holder,
                            lease,
                            left,
                        }
                    }
                };
                p.obs.claim = Some(claim);
                // What was given back before is taken again.
                p.obs.cluster_done = None;
            }
            Action::WaitForLease {
                lease,
                holder,
                wait,
            } => {
                let c = self.need_cluster(p)?;
                p.obs.waiting_since.get_or_insert(self.clock().now());
                c.wait_for_change(&lease, &holder, wait)?;
                p.obs.claim = None;
            }
            Action::LookGate => {
                let c = self.need_cluster(p)?;
                let t = p.target.as_ref().ok_or_else(|| anyhow!("no plan"))?;
                let gate = match c.gate(&t.members, &t.watch_namespaces, t.rollout.ceph.as_ref())? {
                    Err(why) => Err(why),
                    Ok(()) => {
                        // The inventory's nodes that are Ready now must still be Ready after
                        // this node's disruption.
                        let mut ready = c.ready_nodes()?;
                        ready.retain(|n| t.members.contains(n));
                        Ok(ready)
                    }
                };
                p.obs.gate = Some(gate);
            }
            Action::LookRebootReasons(system) => {
                let reasons = self.nixos().reboot_reasons(&system);
                o.reboot_reasons = Some(reasons.into_iter().map(str::to_string).collect());
            }
            Action::Renew(lease) => {
                if let Some(c) = self.pass_cluster(p)? {
                    let r = self
                        .phase_inventory(p)
                        .and_then(|inv| Ok(c.renew(&lease, inv.rollout.lease_duration)?));
                    if let Err(e) = r {
                        warn!("cannot renew the lease while frozen: {e:#}");
                    }
                }
                p.obs.renewed = true;
            }
            Action::KeepRenewed { lease, fresh } => {
                let c = self.need_cluster(p)?;
                let duration = self.lease_duration(p)?;
                if fresh {
                    crate::cluster::lease_taken(self.state.host.as_deref().unwrap_or_default());
                }
                p.renewer = Some(c.keep_renewed(&lease, duration));
                p.obs.renewing = true;
            }
            Action::ConfirmLease { lease, before } => {
                let c = self.need_cluster(p)?;
                let duration = self.lease_duration(p)?;
                let lost = match c.renew(&lease, duration) {
                    Ok(()) => None,
                    Err(crate::kube::KubeError::Status {
                        reason, message, ..
                    }) if reason == "LeaseLost" => Some(message),
                    Err(e) => return Err(e.into()),
                };
                let halt = c.halt()?.map(Halt::from);
                p.obs.lease_confirmed = Some(rollout::Confirmed {
                    at: self.clock().now(),
                    before,
                    lost,
                    halt,
                });
            }
            Action::WriteToken => {
                let t = p.target.as_ref().ok_or_else(|| anyhow!("no plan"))?;
                self.write_token(t)?;
                o.token_written = true;
            }
            Action::SetChannel(channel) => {
                o.channel_set = Some(
                    self.nixos()
                        .set_channel(&channel)
                        .map_err(|e| e.to_string()),
                );
            }
            Action::SavePrevious => {
                self.save_previous()?;
                o.previous_saved = true;
            }
            Action::Land => {
                let t = p.target.as_ref().ok_or_else(|| anyhow!("no plan"))?;
                self.land(t)?;
                p.obs.landed = true;
            }
            Action::Build { upgrade } => {
                let built = self.nixos().build(upgrade).map(|system| Built {
                    has_agent: self.nixos().has_agent(&system),
                    system,
                });
                o.built = Some(built.map_err(|e| build_failed(&e)));
            }
            Action::Inspect(system) => {
                o.built = Some(Ok(Built {
                    has_agent: self.nixos().has_agent(&system),
                    system,
                }));
            }
            Action::Restore { had_previous } => {
                self.restore(had_previous)?;
                o.restored = true;
            }
            Action::Cordon => {
                let c = self.need_cluster(p)?;
                p.obs.cordoned = Some(c.cordon()?);
            }
            Action::Drain(timeout) => {
                let c = self.need_cluster(p)?;
                p.obs.drained = Some(c.drain(timeout));
            }
            Action::Cluster(ops) => {
                for op in ops.clone() {
                    self.op(p, op)?;
                }
                // A lease given back is renewed no more.
                if ops
                    .iter()
                    .any(|o| matches!(o, Op::Release(_) | Op::LetGo { .. }))
                {
                    p.renewer = None;
                    p.obs.renewing = false;
                }
                p.obs.cluster_done = Some(ops);
            }
            Action::Switch => o.switched = Some(self.nixos().switch().map_err(|e| failed(&e))),
            Action::Boot => o.switched = Some(self.nixos().boot().map_err(|e| failed(&e))),
            Action::Rollback => {
                o.rolled_back = Some(self.nixos().rollback().map_err(|e| failed(&e)));
            }
            Action::Reboot => o.rebooted = Some(self.nixos().reboot().map_err(|e| failed(&e))),
            Action::CheckHealth {
                ready_before,
                since,
                deadline,
            } => {
                let c = self.need_cluster(p)?;
                let inv = self.phase_inventory(p)?;
                let own = crate::effects::SystemProbes {
                    systemctl: self.settings().systemctl.clone(),
                };
                let probes: &dyn crate::effects::Probes = match &self.effects.probes {
                    Some(p) => p.as_ref(),
                    None => &own,
                };
                // The boot id is read at each look: it is this boot's the kubelet must
                // report.
                let fresh = crate::cluster::Fresh {
                    boot_id: self.nixos().boot_id()?,
                    since,
                };
                let health = c.healthy(
                    &ready_before,
                    &inv.rollout,
                    &inv.watch_namespaces,
                    &fresh,
                    deadline,
                    probes,
                );
                p.obs.health = Some(health);
            }
            Action::Sleep(d) => {
                self.clock().sleep(d);
                o.health = None;
            }
            Action::RecordApplied => {
                self.keep_applied_copy()?;
                o.recorded = true;
            }
        }
        Ok(None)
    }

    fn op(&mut self, p: &mut Pass, op: Op) -> anyhow::Result<()> {
        match op {
            Op::LetGo { max_unavailable } => {
                if let Some(c) = self.pass_cluster(p)? {
                    c.let_go(max_unavailable)?;
                }
            }
            Op::Uncordon { was_unschedulable } => {
                self.need_cluster(p)?.uncordon(was_unschedulable)?;
            }
            Op::Release(lease) => self.need_cluster(p)?.release(&lease)?,
            Op::SetHalt { commit, reason } => {
                let c = self.need_cluster(p)?;
                let repo = self.repo(p)?;
                // Whether the halt on record is of a newer commit: then it stays the one on
                // record, and this one joins the earlier ones. A halted commit this clone
                // does not have is newer than what it has seen. Judged on what the write
                // replaces, again after each conflict.
                let newer = |halted: &str| repo.descends(halted, &commit).unwrap_or(true);
                c.set_halt(&commit, &reason, &newer)?;
            }
            Op::LiftOlderHalt(commit) => {
                let c = self.need_cluster(p)?;
                if let Some(h) = c.halt()? {
                    let newer = h.commit != commit
                        && h.lifted_by.is_none()
                        && self.descends(p, &commit, &h.commit)? == Some(true);
                    if newer {
                        // A newer commit made it through: the rollout has moved on (the
                        // halted commit stays halted).
                        c.lift_halt(&commit)?;
                    }
                }
            }
        }
        Ok(())
    }
}
