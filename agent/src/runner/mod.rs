//! The agent's pass: observe, decide, persist, act, until the decision ends the pass.
//!
//! Nothing here decides what the node does next: that is
//! [`nk3_common::rollout::next_action`]. The runner only does what an action says, through
//! the side-effect traits of [`crate::effects`], and writes what it found back into the
//! observation. The k3s client is made once per pass. What each action does is in
//! [`act`].

use std::sync::Arc;

use anyhow::{anyhow, Context as _};
use nk3_common::inventory::Inventory;
use nk3_common::rollout::{self, next_action, Action, Level, Observation, Plan, Settings, Step};
use tracing::{debug, error, info, warn};

use crate::cluster::Renewer;
use crate::effects::{Clock, GitSource, RolloutApi};
use crate::reconcile::{short, Agent, Decision, Target};
use crate::state::{self, Outcome};

mod act;

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
                p.obs.lease_lost =
                    crate::cluster::lease_lost(self.state.host.as_deref().unwrap_or_default());
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
                phase = %self.state.phase.name(),
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
