//! The agent's pass: observe, decide, persist, act, until the decision ends the pass.
//!
//! Nothing here decides what the node does next: that is
//! [`nk3_common::rollout::next_action`]. The runner only does what an action says, through
//! the side-effect traits of [`crate::effects`], and writes what it found back into the
//! observation. The k3s client is made once per pass.

use std::sync::Arc;

use anyhow::{anyhow, Context as _};
use nk3_common::inventory::Inventory;
use nk3_common::rollout::{
    self, next_action, Action, Built, Claim, Failed, Halt, Level, Machine, Observation, Op, Plan,
    Settings, Step,
};
use tracing::{debug, error, info, warn};

use crate::cluster::{Acquire, Renewer};
use crate::effects::{Clock, GitSource, RolloutApi};
use crate::reconcile::{short, Agent, Decision, Target};
use crate::state::{self, Outcome};

/// One pass under way: what it has looked at, and what it holds for the pass's length.
struct Pass {
    obs: Observation,
    repo: Option<Box<dyn GitSource>>,
    /// The cluster, once connected (`None` inside: there is no kubeconfig).
    cluster: Option<Option<Arc<dyn RolloutApi>>>,
    /// The node the plan found in the head commit's inventory.
    target: Option<Target>,
    /// The inventory of the phase's commit, read for a resume.
    inventory: Option<(String, Inventory)>,
    /// The lease renewed in the background until the pass ends.
    renewer: Option<Renewer>,
    /// The lease records seen before a restart are taken up once a pass.
    seeded: bool,
}

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
    /// One pass. Errors are for what the pass could not get past (the state is saved first).
    pub fn pass(&mut self) -> anyhow::Result<Outcome> {
        self.waiting_for_lease = false;
        let now = self.clock().now();
        let mut p = Pass {
            obs: Observation::pass(now, self.settings().poll_interval, self.report_idle),
            repo: None,
            cluster: None,
            target: None,
            inventory: None,
            renewer: None,
            seeded: false,
        };
        for steps in 0u64.. {
            p.obs.now = Some(self.clock().now());
            if p.obs.renewing {
                p.obs.lease_lost = crate::cluster::lease_lost();
            }
            let step = next_action(&self.state, &p.obs);
            // Each step's lines, and those of the code it runs, carry the node and the
            // commit it is about.
            let commit = self
                .state
                .phase
                .commit()
                .or(p.obs.plan.as_ref().and_then(Plan::commit))
                .or(self.state.fetched.as_deref());
            let span = tracing::info_span!(
                "rollout",
                host = %self.state.host.as_deref().unwrap_or("this machine"),
                commit = %short(commit),
            );
            let _entered = span.enter();
            if let Some(outcome) = self.take(&mut p, step)? {
                return Ok(outcome);
            }
            // Every step either learns a fact, changes the state or waits: a decision that
            // goes round without any of them is a bug, reported rather than spun on.
            if steps > 1_000_000 {
                anyhow::bail!(
                    "the rollout decision did not settle (phase {})",
                    self.state.phase.name()
                );
            }
        }
        unreachable!("the loop ends by returning")
    }

    /// Persists, tells, and acts on one step; `Some` ends the pass.
    fn take(&mut self, p: &mut Pass, step: Step) -> anyhow::Result<Option<Outcome>> {
        let Step {
            state,
            logs,
            event,
            annotate,
            action,
        } = step;
        if let Some(st) = state {
            let entered = st.phase.name() != self.state.phase.name();
            self.state = *st;
            self.save()?;
            if entered {
                p.obs.entered();
            }
        }
        for l in logs {
            match l.level {
                Level::Debug => debug!("{}", l.message),
                Level::Info => info!("{}", l.message),
                Level::Warn => warn!("{}", l.message),
                Level::Error => error!("{}", l.message),
            }
        }
        // What the Node says is told after the cluster changes it describes are made (an
        // API error between must not leave "idle" on a node still cordoned), before others
        // (the process does not outlive a reboot).
        let after = matches!(action, Action::Cluster(_));
        if !after {
            self.tell(p, event.as_ref(), annotate.as_ref())?;
        }
        let ended = self.act(p, action)?;
        if after {
            self.tell(p, event.as_ref(), annotate.as_ref())?;
        }
        Ok(ended)
    }

    /// Posts an Event and the annotations on this node's Node, best effort.
    fn tell(
        &self,
        p: &mut Pass,
        event: Option<&rollout::Event>,
        annotate: Option<&rollout::Annotate>,
    ) -> anyhow::Result<()> {
        if event.is_some() || annotate.is_some() {
            if let Some(c) = self.pass_cluster(p)? {
                if let Some(a) = annotate {
                    let _ = c.annotate(a.commit.as_deref(), a.phase);
                }
                if let Some(e) = event {
                    c.event(e.reason, &e.message, e.warning);
                }
            }
        }
        Ok(())
    }

    /// The cluster for this pass, connected the first time it is needed.
    fn pass_cluster(&self, p: &mut Pass) -> anyhow::Result<Option<Arc<dyn RolloutApi>>> {
        if p.cluster.is_none() {
            let host = self.state.host.clone().unwrap_or_default();
            p.cluster = Some(self.cluster(&host)?);
        }
        Ok(p.cluster.clone().flatten())
    }

    /// The cluster, which this step cannot do without.
    fn need_cluster(&self, p: &mut Pass) -> anyhow::Result<Arc<dyn RolloutApi>> {
        self.pass_cluster(p)?.ok_or_else(|| {
            anyhow!(
                "the kubeconfig {} is gone; cannot go on with the rollout",
                self.settings().kubeconfig.display()
            )
        })
    }

    fn repo<'p>(&mut self, p: &'p mut Pass) -> anyhow::Result<&'p dyn GitSource> {
        if p.repo.is_none() {
            let (repo, replaced) = self.open_source(true)?;
            if let Some(why) = replaced {
                warn!(
                    "the clone in {} was broken ({why}); cloned it again",
                    self.source().dir().display()
                );
            }
            p.repo = Some(repo);
        }
        Ok(p.repo.as_deref().expect("opened"))
    }

    /// The inventory of the phase's commit: the plan's when it is the same commit.
    fn phase_inventory(&mut self, p: &mut Pass) -> anyhow::Result<Inventory> {
        let commit = self
            .state
            .phase
            .commit()
            .ok_or_else(|| anyhow!("no rollout under way"))?
            .to_string();
        if let Some((c, inv)) = &p.inventory {
            if *c == commit {
                return Ok(inv.clone());
            }
        }
        let repo = self.repo(p)?;
        let inv = self.inventory_at(repo, &commit)?;
        p.inventory = Some((commit, inv.clone()));
        Ok(inv)
    }

    fn act(&mut self, p: &mut Pass, action: Action) -> anyhow::Result<Option<Outcome>> {
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
                    crate::cluster::lease_taken();
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
                // A halted commit this clone does not have is newer than what it has seen:
                // its halt stays the one on record, and this one joins the earlier ones.
                let newer_halted = match c.halt()? {
                    Some(h) if h.commit != commit => {
                        self.descends(p, &h.commit, &commit)?.unwrap_or(true)
                    }
                    _ => false,
                };
                c.set_halt(&commit, &reason, !newer_halted)?;
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

    /// Whether commit `a` descends from commit `b`, if the clone has both (`None`: it
    /// cannot tell).
    fn descends(&mut self, p: &mut Pass, a: &str, b: &str) -> anyhow::Result<Option<bool>> {
        Ok(self.repo(p)?.descends(a, b))
    }

    /// Steps 1 to 3: the head commit and what it declares for this machine.
    fn look_plan(&mut self, p: &mut Pass) -> anyhow::Result<()> {
        self.repo(p)?;
        let repo = p.repo.take().expect("opened");
        let result = self.plan_of(repo.as_ref());
        p.repo = Some(repo);
        let (plan, target) = result?;
        p.target = target;
        p.obs.plan = Some(plan);
        Ok(())
    }

    fn plan_of(&mut self, repo: &dyn GitSource) -> anyhow::Result<(Plan, Option<Target>)> {
        let Some(commit) = self.fetch(repo)? else {
            let msg = match &self.state.source_problem {
                Some(p) => format!("no commit fetched yet: {p}"),
                None => "no commit fetched yet".to_string(),
            };
            return Ok((Plan::NoCommit(msg), None));
        };
        let decision = self.decide(repo, &commit)?;
        if let Decision::UpToDate(t) | Decision::Apply { target: t, .. } = &decision {
            self.identified(t);
        }
        Ok(self.to_plan(&commit, decision))
    }

    /// What the decision sees of steps 2 and 3: the plan, and the node it is about.
    pub(crate) fn to_plan(&self, commit: &str, decision: Decision) -> (Plan, Option<Target>) {
        let commit = commit.to_string();
        match decision {
            Decision::BadInventory { problems } => (Plan::BadInventory { commit, problems }, None),
            Decision::NotANode(why) => (Plan::NotANode { commit, why }, None),
            Decision::AlreadyRejected(rejected) => {
                (Plan::AlreadyRejected { commit, rejected }, None)
            }
            Decision::UpToDate(t) => {
                let settings = t.settings();
                (Plan::UpToDate { commit, settings }, Some(t))
            }
            Decision::Apply {
                target,
                diff,
                why,
                upgrade,
            } => {
                let config = self.settings().nixos_dir.join("configuration.nix");
                let on_disk = std::fs::read_to_string(&config).ok();
                let existing = std::fs::metadata(&config)
                    .ok()
                    .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o7777);
                let plan = Plan::Apply {
                    commit,
                    settings: target.settings(),
                    diff,
                    why: why.to_string(),
                    upgrade: upgrade.then(|| target.channel.clone()).flatten(),
                    on_disk: on_disk.as_deref().map(nk3_common::render::body)
                        == Some(nk3_common::render::body(&target.rendered)),
                    existing,
                };
                (plan, Some(target))
            }
        }
    }

    /// Keeps the configuration.nix on disk as the previous one, to put back.
    fn save_previous(&mut self) -> anyhow::Result<()> {
        let config = self.settings().nixos_dir.join("configuration.nix");
        let previous =
            std::fs::read(&config).with_context(|| format!("cannot read {}", config.display()))?;
        state::write_atomic(&self.previous_path(), &previous, 0o600)
    }

    /// Writes the rendered configuration.nix.
    fn land(&self, t: &Target) -> anyhow::Result<()> {
        let config = self.settings().nixos_dir.join("configuration.nix");
        if let Some(dir) = config.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        state::write_atomic(&config, t.rendered.as_bytes(), 0o644)
    }

    /// The lease duration of the phase's commit.
    fn lease_duration(&mut self, p: &mut Pass) -> anyhow::Result<std::time::Duration> {
        Ok(match &p.target {
            Some(t) if Some(t.commit.as_str()) == self.state.phase.commit() => {
                t.rollout.lease_duration
            }
            _ => self.phase_inventory(p)?.rollout.lease_duration,
        })
    }

    fn clock(&self) -> &dyn Clock {
        self.effects.clock.as_ref()
    }
}

impl Target {
    /// The rollout settings of this node at this commit.
    pub(crate) fn settings(&self) -> Settings {
        Settings::of(&self.host, &self.rollout)
    }
}
