//! The whole rollout of one node: every transition of DESIGN section 6, and every resume
//! after a crash, as one function of the persisted state and what the pass has seen.
//!
//! Reading order: [`next_action`] dispatches on the phase; each phase's function below
//! asks for the facts it lacks, one `Look…` at a time, and moves on once it has them.
//! Whatever is disruptive is preceded by the state that lets a restart finish or undo it;
//! whatever completes a phase (uncordon, release, record) is done before the state that
//! says it is done, so a crash in between repeats it (each is idempotent).

// The helpers' `Err` is not an error but the step that fetches a missing fact, returned at
// once: its size does not matter.
#![allow(clippy::result_large_err)]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::{
    Action, Annotate, Claim, Coordination, Event, Failed, Failure, Halt, Level, Log, Observation,
    Op, Plan, Settings, Step,
};
use crate::inventory::RebootPolicy;
use crate::state::{DrainBlocked, Hold, LastResult, Outcome, Phase, Rejected, State};

/// How often a failing health check is looked at again.
pub const VERIFY_EVERY: Duration = Duration::from_secs(1);

/// How recent the confirmation that the lease is this node's must be before a disruptive
/// action.
pub const CONFIRMED_WITHIN: Duration = Duration::from_secs(10);

/// A commit for people: its first 12 characters, or `none`.
pub fn short(commit: Option<&str>) -> &str {
    match commit {
        Some(c) => &c[..c.len().min(12)],
        None => "none",
    }
}

/// What to do next, given the state on disk and what this pass has seen.
pub fn next_action(s: &State, o: &Observation) -> Step {
    let d = Decide {
        s,
        o,
        now: o.now.unwrap_or(UNIX_EPOCH),
    };
    match &s.phase {
        Phase::Idle => d.planned(),
        Phase::Building {
            commit,
            had_previous,
            upgrade,
        } => d.building(commit, *had_previous, *upgrade),
        Phase::Built { commit, system } => d.built(commit, system),
        Phase::Draining {
            commit,
            system,
            hold,
        } => d.draining(commit, system, hold),
        Phase::Switching {
            commit,
            system,
            reboot,
            hold,
            rollback,
        } => match rollback {
            None => d.switching(commit, system, *reboot, hold.as_ref()),
            Some(why) => d.rolling_back(commit, system, hold.as_ref(), why),
        },
        Phase::Rebooting {
            commit,
            system,
            boot_id,
            hold,
            rollback,
        } => d.rebooting(commit, system, boot_id, hold.as_ref(), *rollback),
        Phase::Verifying {
            commit,
            system,
            hold,
            deadline,
            rollback,
            reason,
            since,
        } => {
            let rollback = rollback.then(|| reason.clone().unwrap_or_default());
            d.verifying(commit, system, hold, deadline, rollback, since.as_deref())
        }
        Phase::Frozen {
            commit,
            hold,
            reason,
        } => d.frozen(commit, hold, reason),
    }
}

impl Step {
    fn to(action: Action) -> Step {
        Step {
            state: None,
            logs: Vec::new(),
            event: None,
            annotate: None,
            action,
        }
    }

    fn save(mut self, state: State) -> Step {
        self.state = Some(Box::new(state));
        self
    }

    fn say(mut self, level: Level, message: impl Into<String>) -> Step {
        self.logs.push(Log {
            level,
            message: message.into(),
        });
        self
    }

    fn event(mut self, reason: &'static str, message: impl Into<String>, warning: bool) -> Step {
        self.event = Some(Event {
            reason,
            message: message.into(),
            warning,
        });
        self
    }

    fn annotate(mut self, commit: Option<&str>, phase: &'static str) -> Step {
        self.annotate = Some(Annotate {
            commit: commit.map(str::to_string),
            phase,
        });
        self
    }
}

fn finish(outcome: Outcome) -> Action {
    Action::Finish {
        outcome,
        lease_wait: false,
    }
}

struct Decide<'a> {
    s: &'a State,
    o: &'a Observation,
    now: SystemTime,
}

/// How many slots a lease name implies: `nk3-rollout-2` is the third.
fn slots_of(lease: &str) -> u32 {
    lease
        .rsplit('-')
        .next()
        .and_then(|n| n.parse::<u32>().ok())
        .map_or(1, |n| n.saturating_add(1))
}

/// `d` after `t`, or the farthest time there is (durations are bounded when read, but a
/// decision never panics on one).
fn after(t: SystemTime, d: Duration) -> SystemTime {
    t.checked_add(d)
        .or_else(|| t.checked_add(Duration::from_secs(10 * 366 * 24 * 3600)))
        .unwrap_or(t)
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

fn rfc3339_micros(t: SystemTime) -> String {
    humantime::format_rfc3339_micros(t).to_string()
}

impl Decide<'_> {
    fn host(&self) -> String {
        self.s
            .host
            .clone()
            .unwrap_or_else(|| "this machine".to_string())
    }

    /// The state with the pass's result recorded.
    fn ended(&self, mut st: State, outcome: Outcome, commit: Option<&str>, msg: &str) -> State {
        let gave_back = self.o.cluster_done.as_ref().is_some_and(|ops| {
            ops.iter()
                .any(|op| matches!(op, Op::Release(_) | Op::LetGo { .. } | Op::Uncordon { .. }))
        });
        if gave_back && st.phase.hold().is_none() {
            // Whatever was claimed is given back (or was lost).
            st.lease_claimed = None;
        }
        st.last = Some(LastResult {
            outcome,
            commit: commit.map(str::to_string),
            message: msg.to_string(),
            at: rfc3339(self.now),
        });
        st
    }

    /// Ends the pass with `outcome` and nothing else changed.
    fn end(&self, outcome: Outcome, commit: Option<&str>, msg: &str) -> Step {
        Step::to(finish(outcome)).save(self.ended(self.s.clone(), outcome, commit, msg))
    }

    /// Whether `msg` is news: problems are said once, again only when they change.
    fn news(&self, msg: &str) -> bool {
        self.s.last.as_ref().map(|l| l.message.as_str()) != Some(msg)
    }

    /// The state with `phase`. A hold that leaves the disk without having been given back
    /// becomes a claim: the next pass that does not roll out gives the lease and the cordon
    /// back.
    fn with(&self, phase: Phase) -> State {
        // A frozen node trying a new commit keeps the lease and its cordon until that
        // commit is through (or the lease runs out): the rollout stays stopped meanwhile.
        let claimed = match &self.s.phase {
            Phase::Frozen { .. } => None,
            p => p
                .hold()
                .filter(|_| phase.hold().is_none())
                .map(|h| slots_of(&h.lease)),
        };
        State {
            phase,
            lease_claimed: self.s.lease_claimed.max(claimed),
            ..self.s.clone()
        }
    }

    /// The settings of `commit`: the plan's when it is about that commit, else read.
    fn settings(&self, commit: &str) -> Result<&Settings, Step> {
        match &self.o.plan {
            Some(Plan::Apply {
                commit: c,
                settings,
                ..
            })
            | Some(Plan::UpToDate {
                commit: c,
                settings,
            }) if c == commit => return Ok(settings),
            _ => {}
        }
        match &self.o.settings {
            Some(Ok(s)) => Ok(s),
            Some(Err(e)) => Err(self.end(Outcome::Failed, Some(commit), e)),
            None => Err(Step::to(Action::LookSettings)),
        }
    }

    fn machine(&self) -> Result<&super::Machine, Step> {
        self.o
            .machine
            .as_ref()
            .ok_or_else(|| Step::to(Action::LookMachine))
    }

    /// Idle (or a phase given up on): what the branch's head asks for.
    fn planned(&self) -> Step {
        let Some(plan) = &self.o.plan else {
            return Step::to(Action::LookPlan);
        };
        if let (Some(claimed), None) = (self.s.lease_claimed, self.s.phase.hold()) {
            // An interrupted pass may have taken a lease slot: give it back first (every
            // slot there was then, or is now).
            let max = match plan {
                Plan::Apply { settings, .. } | Plan::UpToDate { settings, .. } => {
                    settings.max_unavailable
                }
                _ => self.s.lease_slots.unwrap_or(1),
            }
            .max(claimed);
            if let Some(step) = self.unless_done(vec![Op::LetGo {
                max_unavailable: max,
            }]) {
                return step;
            }
            let mut st = self.s.clone();
            st.lease_claimed = None;
            return Step::to(Action::Continue).save(st);
        }
        match plan {
            Plan::NoCommit(why) => self.end(Outcome::Failed, None, why),
            Plan::BadInventory { commit, problems } => {
                let msg = format!(
                    "the inventory at commit {} has {} problem{}; nothing was applied, the node keeps running commit {}",
                    short(Some(commit)),
                    problems.len(),
                    if problems.len() == 1 { "" } else { "s" },
                    short(self.s.applied.as_deref()),
                );
                let mut step = self.end(Outcome::Refused, Some(commit), &msg);
                if self.news(&msg) {
                    for p in problems {
                        step = step.say(Level::Error, p);
                    }
                    step = step.say(Level::Warn, &msg);
                }
                step
            }
            Plan::NotANode { commit, why } => {
                let msg = format!("{why}; idle until the inventory names this machine");
                let step = self.end(Outcome::NotANode, Some(commit), &msg);
                if self.news(&msg) {
                    step.say(Level::Warn, &msg)
                } else {
                    step
                }
            }
            Plan::AlreadyRejected { commit, rejected } => {
                let msg = format!(
                    "commit {} was rejected at {}; waiting for a new commit: {}",
                    short(Some(&rejected.commit)),
                    rejected.at,
                    rejected.error
                );
                self.end(Outcome::Rejected, Some(commit), &msg)
            }
            Plan::UpToDate { commit, settings } => {
                if !self.o.token_written {
                    return Step::to(Action::WriteToken);
                }
                let first = self.s.applied.as_deref() != Some(commit.as_str())
                    || self.s.last.as_ref().map(|l| l.outcome) != Some(Outcome::NoChange);
                let level = if first || self.o.report_idle {
                    Level::Info
                } else {
                    Level::Debug
                };
                let msg = format!("No action needed on {}", settings.host);
                let mut st = self.s.clone();
                st.applied = Some(commit.clone());
                Step::to(finish(Outcome::NoChange))
                    .save(self.ended(st, Outcome::NoChange, Some(commit), &msg))
                    .say(level, msg)
            }
            Plan::Apply {
                commit,
                settings,
                diff,
                why,
                upgrade,
                existing,
                ..
            } => self.apply(commit, settings, diff.as_deref(), why, upgrade, *existing),
        }
    }

    /// Steps 3 (land) and 4 (build), from the start.
    fn apply(
        &self,
        commit: &str,
        settings: &Settings,
        diff: Option<&str>,
        why: &str,
        upgrade: &Option<String>,
        existing: Option<u32>,
    ) -> Step {
        let host = &settings.host;
        if !self.o.token_written {
            let say = match diff {
                Some(d) => format!("{host} modified: ({why})\n{}", d.trim_end()),
                None => format!("{host}: building the configuration again ({why})"),
            };
            return Step::to(Action::WriteToken).say(Level::Info, say);
        }
        if let Some(channel) = upgrade {
            match &self.o.channel_set {
                None => {
                    return Step::to(Action::SetChannel(channel.clone())).say(
                        Level::Info,
                        format!("following channel {channel} on {host}"),
                    )
                }
                Some(Err(e)) => {
                    return self
                        .end(Outcome::Failed, Some(commit), e)
                        .say(Level::Error, e)
                }
                Some(Ok(())) => {}
            }
        }
        if existing.is_some() && !self.o.previous_saved {
            return Step::to(Action::SavePrevious);
        }
        let mut st = self.with(Phase::Building {
            commit: commit.to_string(),
            had_previous: existing.is_some(),
            upgrade: upgrade.is_some(),
        });
        if existing.is_some() {
            st.previous_mode = existing;
        }
        Step::to(Action::Land)
            .save(st)
            .say(Level::Info, format!("Rebuilding NixOS on {host}"))
    }

    /// Step 4 under way, or interrupted.
    fn building(&self, commit: &str, had_previous: bool, upgrade: bool) -> Step {
        let c = short(Some(commit));
        if self.o.resumed {
            // The new file may or may not have landed, and its build did not finish: put the
            // previous file back and start the pass over.
            if !self.o.restored {
                return Step::to(Action::Restore { had_previous });
            }
            return Step::to(Action::Continue).save(self.with(Phase::Idle)).say(
                Level::Warn,
                format!("a build of commit {c} was interrupted; restored the previous configuration.nix and starting over"),
            );
        }
        if !self.o.landed {
            return Step::to(Action::Land);
        }
        match &self.o.built {
            None => Step::to(Action::Build { upgrade }),
            // Nix refused the configuration: this commit is not tried again.
            Some(Err(f)) if f.failure == Failure::Exited => {
                self.reject(commit, had_previous, &f.message)
            }
            // The build hung or could not start: nothing is known about the commit, so the
            // next pass tries it again (the node keeps what it runs meanwhile).
            Some(Err(f)) => {
                if !self.o.restored {
                    return Step::to(Action::Restore { had_previous });
                }
                let msg = format!("{}; configuration.nix is back to what it was, and the next pass builds commit {c} again", f.message);
                Step::to(finish(Outcome::Failed))
                    .save(self.ended(self.with(Phase::Idle), Outcome::Failed, Some(commit), &msg))
                    .say(Level::Error, msg)
            }
            Some(Ok(b)) => {
                let mut st = self.with(Phase::Built {
                    commit: commit.to_string(),
                    system: b.system.clone(),
                });
                if let Some(Plan::Apply {
                    upgrade: Some(channel),
                    ..
                }) = &self.o.plan
                {
                    st.channel = Some(channel.clone());
                    st.last_upgrade = Some(rfc3339(self.now));
                }
                Step::to(Action::Continue).save(st)
            }
        }
    }

    /// A commit's configuration refused (by Nix, or because it would remove the agent): the
    /// previous file goes back, byte for byte, and the commit is not tried again.
    fn reject(&self, commit: &str, had_previous: bool, error: &str) -> Step {
        if !self.o.restored {
            return Step::to(Action::Restore { had_previous });
        }
        let host = self.host();
        let c = short(Some(commit));
        let st = self.rejected(commit, error);
        Step::to(finish(Outcome::Rejected))
            .save(self.ended(
                st,
                Outcome::Rejected,
                Some(commit),
                &format!("commit {c} rejected: {error}"),
            ))
            .say(
                Level::Error,
                format!("commit {c} rejected on {host}: {error}"),
            )
            .say(
                Level::Warn,
                format!("Changes reverted on {host}: configuration.nix is back to what it was"),
            )
    }

    /// The state with `commit` recorded as not to be tried again, and no phase under way.
    fn rejected(&self, commit: &str, error: &str) -> State {
        let mut st = self.with(Phase::Idle);
        st.rejected = Some(Rejected {
            commit: commit.to_string(),
            error: error.to_string(),
            at: rfc3339(self.now),
        });
        st
    }

    /// Step 5 on: built (in this pass, or before and waiting for the cluster).
    fn built(&self, commit: &str, system: &str) -> Step {
        let Some(plan) = &self.o.plan else {
            return Step::to(Action::LookPlan);
        };
        let settings = match plan {
            Plan::Apply {
                commit: c,
                on_disk,
                settings,
                ..
            } if c == commit && (*on_disk || self.o.landed) => settings,
            // Another commit, or the file changed since: start from the plan.
            _ => return self.planned(),
        };
        let host = &settings.host;
        let c = short(Some(commit));
        let Some(built) = &self.o.built else {
            return Step::to(Action::Inspect(system.to_string()));
        };
        let machine = match self.machine() {
            Ok(m) => m,
            Err(step) => return step,
        };
        match built {
            Ok(b) if !b.has_agent => {
                return self.reject(commit, machine.previous_saved, &format!("the new system {system} has no nk3-agent.service: it would stop nk3 from managing this node (does configuration.nix still import ./nk3.nix?)"))
            }
            Ok(_) => {}
            Err(f) => return self.reject(commit, machine.previous_saved, &f.message),
        }
        if machine.current.as_deref() == Some(system) {
            if let Some(step) = self.unless_done(vec![Op::LetGo {
                max_unavailable: settings.max_unavailable,
            }]) {
                return step;
            }
            if !self.o.recorded {
                return Step::to(Action::RecordApplied);
            }
            let msg = format!("No action needed on {host}");
            return Step::to(finish(Outcome::NoChange))
                .save(self.ended(
                    self.applied(commit, system),
                    Outcome::NoChange,
                    Some(commit),
                    &msg,
                ))
                .say(
                    Level::Info,
                    format!("No action needed on {host}: it already runs this system"),
                );
        }
        // A node of a running cluster takes the rollout lease, checks the cluster's health
        // and drains itself first (steps 6 to 8). Only a machine where k3s never joined a
        // cluster (bootstrap) switches directly.
        match &self.o.coordination {
            None => Step::to(Action::LookCoordination),
            Some(Coordination::Bootstrap) => {
                let Some(reasons) = &self.o.reboot_reasons else {
                    return Step::to(Action::LookRebootReasons(system.to_string()));
                };
                self.to_switch(commit, system, None, settings, reasons)
                    .say(Level::Info, format!("k3s has not joined a cluster on {host} yet: switching without the rollout lease (bootstrap)"))
            }
            Some(Coordination::NoCredentials(msg)) => {
                let step = self.end(Outcome::Waiting, Some(commit), msg);
                if self.news(msg) {
                    step.say(Level::Warn, msg)
                } else {
                    step
                }
            }
            Some(Coordination::Lease) => self.coordinated(commit, system, settings, c),
        }
    }

    /// The state with `commit`'s `system` recorded as what runs.
    fn applied(&self, commit: &str, system: &str) -> State {
        let mut st = self.with(Phase::Idle);
        st.applied = Some(commit.to_string());
        st.applied_system = Some(system.to_string());
        st
    }

    /// Steps 6 and 7: the gate and the lease, then into the drain.
    fn coordinated(&self, commit: &str, system: &str, settings: &Settings, c: &str) -> Step {
        let o = self.o;
        let host = &settings.host;
        let Some(halt) = &o.halt else {
            return Step::to(Action::LookHalt);
        };
        if let Some(h) = halt.as_ref().filter(|h| h.commit == commit) {
            return self.halted(commit, settings, &h.node, &h.reason);
        }
        // A budget that allows no eviction now: not even cordoning, and back off (doubling,
        // up to the drain timeout) before looking again for this commit.
        if let Some(b) = &self.s.drain_blocked {
            let due = humantime::parse_rfc3339(&b.next_try).is_ok_and(|t| self.now >= t);
            if b.commit == commit && !due {
                if let Some(step) = self.let_go(settings) {
                    return step;
                }
                return self.end(Outcome::Waiting, Some(commit), &b.reason).say(
                    Level::Info,
                    format!("still not draining (back-off): {}", b.reason),
                );
            }
        }
        let Some(blocker) = &o.blocker else {
            return Step::to(Action::LookBlocker);
        };
        if let Some(b) = blocker {
            if let Some(step) = self.let_go(settings) {
                return step;
            }
            let tries = match &self.s.drain_blocked {
                Some(d) if d.commit == commit => d.tries + 1,
                _ => 1,
            };
            let wait = (Duration::from_secs(30) * 2u32.saturating_pow(tries.min(10) - 1))
                .min(settings.drain_timeout.max(Duration::from_secs(30)));
            let msg = format!(
                "not draining {host}: PodDisruptionBudget {} allows no eviction of {} ({}){}; looking again in {}",
                b.budget,
                b.pod,
                b.why,
                if b.never { " — change the budget or the workload" } else { "" },
                humantime::format_duration(wait)
            );
            let mut st = self.s.clone();
            st.drain_blocked = Some(DrainBlocked {
                commit: commit.to_string(),
                reason: msg.clone(),
                tries,
                next_try: rfc3339(after(self.now, wait)),
            });
            return Step::to(finish(Outcome::Waiting))
                .save(self.ended(st, Outcome::Waiting, Some(commit), &msg))
                .say(Level::Warn, &msg)
                .event("DrainBlocked", msg, true);
        }
        if self.s.drain_blocked.is_some() {
            let mut st = self.s.clone();
            st.drain_blocked = None;
            return Step::to(Action::Continue).save(st);
        }
        // 7. The lease: wait for it (watching, not polling) up to one poll interval.
        let lease = match &o.claim {
            None if self.s.lease_claimed < Some(settings.max_unavailable) => {
                let mut st = self.s.clone();
                st.lease_claimed = Some(settings.max_unavailable);
                return Step::to(Action::Acquire).save(st);
            }
            None => return Step::to(Action::Acquire),
            Some(Claim::Busy {
                holder,
                lease,
                left,
            }) => {
                let give_up = after(o.waiting_since.unwrap_or(self.now), o.poll_interval);
                let remaining = give_up.duration_since(self.now).unwrap_or_default();
                let msg = format!("waiting for the rollout lease, held by {holder}");
                if remaining.is_zero() {
                    let mut step = self.end(Outcome::Waiting, Some(commit), &msg);
                    step.action = Action::Finish {
                        outcome: Outcome::Waiting,
                        lease_wait: true,
                    };
                    return step;
                }
                let step = Step::to(Action::WaitForLease {
                    lease: lease.clone(),
                    holder: holder.clone(),
                    // Woken by the holder's release, or when its claim may have run out.
                    wait: remaining.min(*left + Duration::from_millis(200)),
                });
                return if o.waiting_since.is_none() && self.news(&msg) {
                    step.say(Level::Info, msg)
                } else {
                    step
                };
            }
            Some(Claim::Held(lease)) => lease,
        };
        // Renewed from the moment it is held: what follows (a fetch, the gate) may take a
        // while.
        if !o.renewing {
            return Step::to(Action::KeepRenewed {
                lease: lease.clone(),
                fresh: true,
            });
        }
        // 6. The gate, checked (again) with the lease held so nobody else changes the
        // picture: the node that held it before may have halted this very commit.
        let Some(halt) = &o.halt_held else {
            return Step::to(Action::LookHaltHeld);
        };
        if let Some(h) = halt.as_ref().filter(|h| h.commit == commit) {
            return self.halted(commit, settings, &h.node, &h.reason);
        }
        // The commit is still the one to apply: while this node waited for the lease, a
        // newer one may have come, made it through on another node and lifted the halt of
        // this one.
        let Some(head) = &o.head_held else {
            return Step::to(Action::LookHeadHeld);
        };
        if head != commit {
            if let Some(step) = self.let_go(settings) {
                return step;
            }
            return Step::to(Action::Replan).say(
                Level::Info,
                format!(
                    "commit {c} is no longer the head of the branch ({} is): starting over with it",
                    short(Some(head))
                ),
            );
        }
        let ready = match &o.gate {
            None => return Step::to(Action::LookGate),
            Some(Err(why)) => {
                // The lease back, and a cordon an interrupted pass left.
                if let Some(step) = self.let_go(settings) {
                    return step;
                }
                let msg = format!("not disrupting {host}: {why}");
                return self
                    .end(Outcome::Waiting, Some(commit), &msg)
                    .say(Level::Info, msg);
            }
            Some(Ok(ready)) => ready,
        };
        // Still this node's, and the commit not halted meanwhile, just before the cordon.
        match self.confirmed(lease) {
            Ok(()) => {
                if let Some(h) = self.halted_meanwhile(commit) {
                    return self.halted(commit, settings, &h.node, &h.reason);
                }
            }
            Err(Some(step)) => return step,
            Err(None) => {
                let why = self.lost().unwrap_or_default();
                let msg = format!("lost the rollout lease before draining ({why}); will try again");
                return self
                    .end(Outcome::Waiting, Some(commit), &msg)
                    .say(Level::Warn, msg);
            }
        }
        // 8. Into the drain: the hold is on disk before the cordon.
        let hold = Hold {
            lease: lease.clone(),
            was_unschedulable: false,
            ready_before: ready.clone(),
            since: Some(rfc3339(self.now)),
        };
        let mut st = self.with(Phase::Draining {
            commit: commit.to_string(),
            system: system.to_string(),
            hold,
        });
        st.lease_claimed = None;
        Step::to(Action::Cordon)
            .save(st)
            .say(
                Level::Info,
                format!("Draining {host} (holding lease {lease})"),
            )
            .event(
                "Draining",
                format!("nk3 is draining the node to apply commit {c}"),
                false,
            )
            .annotate(None, "draining")
    }

    /// Before a pass of a node without a hold on disk ends waiting: whatever an earlier,
    /// interrupted pass may have left in the API (a lease slot taken, its own cordon) is
    /// given back, so nobody waits for a node that is not rolling out.
    fn let_go(&self, settings: &Settings) -> Option<Step> {
        self.unless_done(vec![Op::LetGo {
            max_unavailable: settings.max_unavailable,
        }])
    }

    /// The step that makes these cluster changes, unless this phase made exactly them.
    fn unless_done(&self, ops: Vec<Op>) -> Option<Step> {
        (self.o.cluster_done.as_ref() != Some(&ops)).then(|| Step::to(Action::Cluster(ops)))
    }

    /// Whether `lease` was confirmed this node's within [`CONFIRMED_WITHIN`]: `Err(Some)`
    /// is the step that asks, `Err(None)` says it is lost ([`Decide::lost`] says why).
    fn confirmed(&self, lease: &str) -> Result<(), Option<Step>> {
        match &self.o.lease_confirmed {
            Some(c) if c.lost.is_some() => Err(None),
            Some(c) if self.now.duration_since(c.at).unwrap_or_default() <= CONFIRMED_WITHIN => {
                Ok(())
            }
            _ => Err(Some(Step::to(Action::ConfirmLease(lease.to_string())))),
        }
    }

    /// The halt of `commit` the last confirmation found (set meanwhile by another node).
    fn halted_meanwhile(&self, commit: &str) -> Option<&Halt> {
        self.o
            .lease_confirmed
            .as_ref()
            .and_then(|c| c.halt.as_ref())
            .filter(|h| h.commit == commit)
    }

    /// Before `what` under `hold`: the step that confirms the lease; or, if it is lost, the
    /// steps that uncordon and go back to the build, to go through the rollout again; or,
    /// with `halt_stops`, if the commit was halted meanwhile, the steps that uncordon,
    /// release and refuse it. `None` when the node may go on.
    fn unless_lost(
        &self,
        commit: &str,
        system: &str,
        hold: &Hold,
        what: &str,
        halt_stops: bool,
    ) -> Option<Step> {
        match self.confirmed(&hold.lease) {
            Ok(()) if self.o.lease_lost.is_none() => {
                let h = self.halted_meanwhile(commit).filter(|_| halt_stops)?;
                if let Some(step) = self.unless_done(vec![
                    Op::Uncordon {
                        was_unschedulable: hold.was_unschedulable,
                    },
                    Op::Release(hold.lease.clone()),
                ]) {
                    return Some(step.annotate(None, "idle"));
                }
                return Some(self.halted_after_release(commit, &h.node, &h.reason));
            }
            Err(Some(step)) if self.o.lease_lost.is_none() => return Some(step),
            _ => {}
        }
        if let Some(step) = self.unless_done(vec![Op::Uncordon {
            was_unschedulable: hold.was_unschedulable,
        }]) {
            return Some(step.annotate(None, "idle"));
        }
        let why = self.lost().unwrap_or_default();
        let host = self.host();
        let msg = format!("lost the rollout lease before {what} ({why}); uncordoned {host} without it, will go through the rollout again");
        let back = self.with(Phase::Built {
            commit: commit.to_string(),
            system: system.to_string(),
        });
        Some(
            Step::to(finish(Outcome::Waiting))
                .save(self.ended(back, Outcome::Waiting, Some(commit), &msg))
                .say(Level::Warn, msg),
        )
    }

    /// Why the held lease is no longer this node's, if the renewer or a confirmation saw it.
    fn lost(&self) -> Option<String> {
        self.o
            .lease_lost
            .clone()
            .or_else(|| self.o.lease_confirmed.as_ref().and_then(|c| c.lost.clone()))
    }

    /// A commit another node found unhealthy: never applied here.
    fn halted(&self, commit: &str, settings: &Settings, node: &str, reason: &str) -> Step {
        if let Some(step) = self.let_go(settings) {
            return step;
        }
        self.halted_after_release(commit, node, reason)
    }

    /// The halted commit refused, what this node held given back.
    fn halted_after_release(&self, commit: &str, node: &str, reason: &str) -> Step {
        let Some(m) = &self.o.machine else {
            return Step::to(Action::LookMachine);
        };
        if !self.o.restored {
            return Step::to(Action::Restore {
                had_previous: m.previous_saved,
            });
        }
        let c = short(Some(commit));
        let msg = format!(
            "commit {c} is halted for the cluster by {node}: {reason}; waiting for a newer commit"
        );
        let st = self.rejected(commit, &msg);
        Step::to(finish(Outcome::Refused))
            .save(self.ended(st, Outcome::Refused, Some(commit), &msg))
            .say(Level::Warn, msg)
    }

    /// Step 8 under way (or interrupted: then the steps are gone through again, the lease
    /// being still this node's and the cordon recognised as nk3's).
    fn draining(&self, commit: &str, system: &str, hold: &Hold) -> Step {
        let o = self.o;
        if o.resumed {
            return Step::to(Action::Continue).save(self.with(Phase::Built {
                commit: commit.to_string(),
                system: system.to_string(),
            }));
        }
        let settings = match self.settings(commit) {
            Ok(s) => s,
            Err(step) => return step,
        };
        let host = &settings.host;
        let Some(was) = o.cordoned else {
            return Step::to(Action::Cordon);
        };
        if hold.was_unschedulable != was {
            let hold = Hold {
                was_unschedulable: was,
                ..hold.clone()
            };
            return Step::to(Action::Continue).save(self.with(Phase::Draining {
                commit: commit.to_string(),
                system: system.to_string(),
                hold,
            }));
        }
        // Pods are evicted only under the lease, confirmed just before.
        if o.drained.is_none() {
            if let Some(step) = self.unless_lost(commit, system, hold, "draining", true) {
                return step;
            }
        }
        let back = || {
            self.with(Phase::Built {
                commit: commit.to_string(),
                system: system.to_string(),
            })
        };
        match &o.drained {
            None => return Step::to(Action::Drain(settings.drain_timeout)),
            Some(Err(why)) => {
                if let Some(step) = self.unless_done(vec![
                    Op::Uncordon {
                        was_unschedulable: was,
                    },
                    Op::Release(hold.lease.clone()),
                ]) {
                    return step.annotate(None, "idle");
                }
                return Step::to(finish(Outcome::Waiting))
                    .save(self.ended(back(), Outcome::Waiting, Some(commit), why))
                    .say(
                        Level::Warn,
                        format!("{why}; uncordoned {host} and released the lease, will try again"),
                    )
                    .event("DrainTimedOut", why, true);
            }
            Some(Ok(())) => {}
        }
        let Some(reasons) = &o.reboot_reasons else {
            return Step::to(Action::LookRebootReasons(system.to_string()));
        };
        // The lease lost while the node was being drained: whoever holds it now may be
        // disrupting itself; this node does not switch.
        if let Some(step) = self.unless_lost(commit, system, hold, "switching", true) {
            return step;
        }
        self.to_switch(commit, system, Some(hold), settings, reasons)
    }

    /// Step 9 begins: the switch (or boot, for a reboot) is on disk before it runs.
    fn to_switch(
        &self,
        commit: &str,
        system: &str,
        hold: Option<&Hold>,
        settings: &Settings,
        reasons: &[String],
    ) -> Step {
        let c = short(Some(commit));
        let reboot = settings.reboot == RebootPolicy::Always || !reasons.is_empty();
        let step = Step::to(if reboot { Action::Boot } else { Action::Switch }).save(self.with(
            Phase::Switching {
                commit: commit.to_string(),
                system: system.to_string(),
                reboot,
                hold: hold.cloned(),
                rollback: None,
            },
        ));
        match (hold, reboot) {
            (None, _) => step,
            (Some(_), true) => step.annotate(None, "rebooting").event(
                "Rebooting",
                format!("nk3 is rebooting the node into commit {c}"),
                false,
            ),
            (Some(_), false) => step.annotate(None, "switching").event(
                "Switching",
                format!("nk3 is switching the node to commit {c}"),
                false,
            ),
        }
    }

    /// Step 9: a forward switch (or boot) under way, or interrupted.
    fn switching(&self, commit: &str, system: &str, reboot: bool, hold: Option<&Hold>) -> Step {
        let o = self.o;
        let c = short(Some(commit));
        if o.resumed {
            let machine = match self.machine() {
                Ok(m) => m,
                Err(step) => return step,
            };
            if let (Some(hold), false) = (hold, reboot) {
                if machine.current.as_deref() == Some(system) {
                    // The switch finished before the agent stopped: verify it, under the
                    // lease.
                    return self.to_verify(commit, system, hold, None);
                }
            }
            // Not known to have happened: from the build on again (the lease, if held, is
            // still this node's; the cordon is recognised as nk3's).
            return Step::to(Action::Continue).save(self.with(Phase::Built {
                commit: commit.to_string(),
                system: system.to_string(),
            }));
        }
        let settings = match self.settings(commit) {
            Ok(s) => s,
            Err(step) => return step,
        };
        let host = &settings.host;
        let Some(switched) = &o.switched else {
            return Step::to(if reboot { Action::Boot } else { Action::Switch });
        };
        match (switched, hold) {
            (Err(f), None) => return self.switch_failed(commit, None, f),
            (Err(f), Some(h)) if reboot => return self.switch_failed(commit, Some(h), f),
            _ => {}
        }
        if reboot {
            let Some(reasons) = &o.reboot_reasons else {
                return Step::to(Action::LookRebootReasons(system.to_string()));
            };
            let machine = match self.machine() {
                Ok(m) => m,
                Err(step) => return step,
            };
            let why = if reasons.is_empty() {
                "reboot: always".to_string()
            } else {
                format!("{} changed", reasons.join(", "))
            };
            if let Some(h) = hold {
                if let Some(step) = self.unless_lost(commit, system, h, "rebooting", false) {
                    return step;
                }
            }
            let st = self.with(Phase::Rebooting {
                commit: commit.to_string(),
                system: system.to_string(),
                boot_id: machine.boot_id.clone(),
                hold: hold.cloned(),
                rollback: false,
            });
            let msg = format!("rebooting into commit {c} ({why})");
            return Step::to(Action::Reboot)
                .save(self.ended(st, Outcome::Rebooting, Some(commit), &msg))
                .say(Level::Info, format!("Rebooting {host} ({why})"));
        }
        match hold {
            Some(hold) => {
                // Under the lease a failed activation is judged by the health checks, which
                // roll it back if the node is not healthy.
                let step = self.to_verify(commit, system, hold, None);
                match switched {
                    Err(f) => step.say(Level::Error, &f.message),
                    Ok(()) => step,
                }
            }
            None => {
                if !o.recorded {
                    return Step::to(Action::RecordApplied);
                }
                let msg = format!("applied commit {c}");
                Step::to(finish(Outcome::Applied))
                    .save(self.ended(
                        self.applied(commit, system),
                        Outcome::Applied,
                        Some(commit),
                        &msg,
                    ))
                    .say(Level::Info, format!("{host} switched to commit {c}"))
            }
        }
    }

    /// A switch (or boot) that failed: activation may have gone part of the way, so the file
    /// stays, and the commit is not tried again until a new one arrives. Under the lease the
    /// node is uncordoned and the lease given back first.
    fn switch_failed(&self, commit: &str, hold: Option<&Hold>, f: &Failed) -> Step {
        if let Some(h) = hold {
            if let Some(step) = self.unless_done(vec![
                Op::Uncordon {
                    was_unschedulable: h.was_unschedulable,
                },
                Op::Release(h.lease.clone()),
            ]) {
                return step.annotate(None, "idle");
            }
        }
        let c = short(Some(commit));
        let host = self.host();
        let msg = &f.message;
        Step::to(finish(Outcome::Rejected))
            .save(self.ended(
                self.rejected(commit, msg),
                Outcome::Rejected,
                Some(commit),
                msg,
            ))
            .say(
                Level::Error,
                format!(
                    "switching {host} to commit {c} failed; not trying this commit again: {msg}"
                ),
            )
    }

    /// Into step 10: verification of `system` with a full health timeout from now.
    fn to_verify(&self, commit: &str, system: &str, hold: &Hold, rollback: Option<&str>) -> Step {
        let settings = match self.settings(commit) {
            Ok(s) => s,
            Err(step) => return step,
        };
        Step::to(Action::Continue)
            .save(self.with(Phase::Verifying {
                commit: commit.to_string(),
                system: system.to_string(),
                hold: hold.clone(),
                deadline: rfc3339(after(self.now, settings.health_timeout)),
                rollback: rollback.is_some(),
                reason: rollback.map(str::to_string),
                since: Some(rfc3339_micros(self.now)),
            }))
            .annotate(None, "verifying")
    }

    /// `nixos-rebuild switch --rollback` under way, or interrupted.
    fn rolling_back(&self, commit: &str, system: &str, hold: Option<&Hold>, why: &str) -> Step {
        let o = self.o;
        let c = short(Some(commit));
        let Some(hold) = hold else {
            // A rollback is only ever made under the lease; a state saying otherwise is
            // not this agent's: start over.
            return Step::to(Action::Continue).save(self.with(Phase::Idle));
        };
        let machine = match self.machine() {
            Ok(m) => m,
            Err(step) => return step,
        };
        let settings = match self.settings(commit) {
            Ok(s) => s,
            Err(step) => return step,
        };
        let host = &settings.host;
        if o.resumed {
            // Stopped in the middle of a rollback: if it happened, verify it as the rollback
            // it is (and halt); if not, freeze rather than guess: `--rollback` steps back
            // one generation from wherever the profile is, and run again after one that
            // moved the profile but did not finish, it would go back two.
            if !system.is_empty() && machine.current.as_deref() == Some(system) {
                return self
                    .to_verify(commit, system, hold, Some(why))
                    .say(Level::Warn, format!("resuming the rollback from commit {c}: checking the previous generation's health"));
            }
            return self.freeze(commit, hold, &format!("{why}; then the rollback was interrupted and {host} runs neither the new generation nor the previous one ({system})"));
        }
        let Some(result) = &o.rolled_back else {
            return Step::to(Action::Rollback);
        };
        // What it went back to: the system recorded as applied; a node that never recorded
        // one (its first rollout) went back one generation, and learns which from it.
        let previous = if system.is_empty() {
            machine.current.clone().unwrap_or_default()
        } else {
            system.to_string()
        };
        let Some(reasons) = &o.reboot_reasons else {
            return Step::to(Action::LookRebootReasons(previous));
        };
        let reboot = settings.reboot == RebootPolicy::Always || !reasons.is_empty();
        let mut logs = Vec::new();
        if let Err(f) = result {
            logs.push(Log {
                level: Level::Error,
                message: f.message.clone(),
            });
        }
        // Whoever holds the lease now may be down: switched back, this node does not reboot.
        if reboot && o.lease_lost.is_none() {
            if let Err(Some(step)) = self.confirmed(&hold.lease) {
                return step;
            }
        }
        let lost = self.lost();
        if let Some(lost) = &lost {
            logs.push(Log {
                level: Level::Warn,
                message: format!("lost the rollout lease ({lost}): rolled back without the reboot"),
            });
        }
        let mut step = if reboot && lost.is_none() {
            let st = self.with(Phase::Rebooting {
                commit: commit.to_string(),
                system: previous,
                boot_id: machine.boot_id.clone(),
                hold: Some(hold.clone()),
                rollback: true,
            });
            let msg = format!("rolling back from commit {c}: {why}");
            Step::to(Action::Reboot)
                .save(self.ended(st, Outcome::Rebooting, Some(commit), &msg))
                .say(
                    Level::Info,
                    format!("Rebooting {host} into the previous generation"),
                )
        } else {
            self.to_verify(commit, &previous, hold, Some(why))
        };
        logs.append(&mut step.logs);
        step.logs = logs;
        step
    }

    /// A reboot asked for; a new boot id says it happened.
    fn rebooting(
        &self,
        commit: &str,
        system: &str,
        boot_id: &str,
        hold: Option<&Hold>,
        rollback: bool,
    ) -> Step {
        let o = self.o;
        let c = short(Some(commit));
        let host = self.host();
        if let Some(r) = &o.rebooted {
            return match r {
                // Staying in the rebooting phase: the next pass asks again.
                Err(f) => {
                    let mut st = self.s.clone();
                    st.last = self
                        .ended(self.s.clone(), Outcome::Failed, Some(commit), &f.message)
                        .last;
                    Step::to(finish(Outcome::Failed))
                        .save(st)
                        .say(Level::Error, &f.message)
                }
                Ok(()) => Step::to(finish(Outcome::Rebooting)),
            };
        }
        if !o.resumed {
            return Step::to(Action::Reboot);
        }
        let machine = match self.machine() {
            Ok(m) => m,
            Err(step) => return step,
        };
        if machine.boot_id == boot_id {
            // The reboot asked for has not happened (the agent was stopped before it): asked
            // again, if the lease is still this node's after the outage.
            if let Some(h) = hold {
                if rollback {
                    // Rolled back already (the switch activated it): without the lease the
                    // reboot is left out and the rollback verified as it runs.
                    match self.confirmed(&h.lease) {
                        Err(Some(step)) if o.lease_lost.is_none() => return step,
                        Ok(()) if o.lease_lost.is_none() => {}
                        _ => {
                            let lost = self.lost().unwrap_or_default();
                            let reason = self.s.last.as_ref().map(|l| l.message.clone());
                            return self
                                .to_verify(commit, system, h, Some(&reason.unwrap_or_default()))
                                .say(
                                    Level::Warn,
                                    format!("lost the rollout lease ({lost}): rolled back without the reboot"),
                                );
                        }
                    }
                } else if let Some(step) = self.unless_lost(commit, system, h, "rebooting", false) {
                    return step;
                }
            }
            return Step::to(Action::Reboot).say(
                Level::Info,
                format!("Rebooting {host} (asked again: the machine has not rebooted yet)"),
            );
        }
        let Some(hold) = hold else {
            if machine.current.as_deref() == Some(system) {
                if !o.recorded {
                    return Step::to(Action::RecordApplied);
                }
                let msg = format!("applied commit {c} (after a reboot)");
                return Step::to(Action::Continue)
                    .save(self.ended(
                        self.applied(commit, system),
                        Outcome::Applied,
                        Some(commit),
                        &msg,
                    ))
                    .say(Level::Info, format!("{host} is up on commit {c}"));
            }
            // The machine came back on another generation (the boot loader did not take
            // the new one, or someone chose another at boot). Put the previous file back so
            // the disk matches what runs, and do not try this commit again: a reboot loop
            // is worse than a stale node.
            if !o.restored {
                return Step::to(Action::Restore {
                    had_previous: machine.previous_saved,
                });
            }
            let msg = format!(
                "{host} rebooted but runs {}, not the system commit {c} built ({system})",
                machine
                    .current
                    .clone()
                    .unwrap_or_else(|| "an unknown system".into()),
            );
            return Step::to(Action::Continue)
                .save(self.ended(
                    self.rejected(commit, &msg),
                    Outcome::Rejected,
                    Some(commit),
                    &msg,
                ))
                .say(Level::Error, msg);
        };
        let reason = rollback.then(|| {
            self.s
                .last
                .as_ref()
                .map(|l| l.message.clone())
                .unwrap_or_default()
        });
        self.to_verify(commit, system, hold, reason.as_deref())
            .say(Level::Info, format!("{host} is back; checking its health"))
    }

    /// Steps 10 and 11: health checks until the deadline, then uncordon and release, or
    /// roll back (and halt the commit), or freeze the rollout.
    fn verifying(
        &self,
        commit: &str,
        system: &str,
        hold: &Hold,
        deadline: &str,
        rollback: Option<String>,
        since: Option<&str>,
    ) -> Step {
        let o = self.o;
        let c = short(Some(commit));
        let settings = match self.settings(commit) {
            Ok(s) => s,
            Err(step) => return step,
        };
        let host = &settings.host;
        if !o.renewing {
            return Step::to(Action::KeepRenewed {
                lease: hold.lease.clone(),
                fresh: false,
            });
        }
        // A deadline that cannot be read has passed: judge the node now.
        let deadline = humantime::parse_rfc3339(deadline).unwrap_or(self.now);
        let since = since
            .and_then(|s| humantime::parse_rfc3339(s).ok())
            .unwrap_or(self.now);
        let healthy = match &o.health {
            None => {
                return Step::to(Action::CheckHealth {
                    ready_before: hold.ready_before.clone(),
                    since,
                    deadline,
                })
            }
            Some(Err(_)) if self.now < deadline => return Step::to(Action::Sleep(VERIFY_EVERY)),
            Some(h) => h,
        };
        let held_for = hold
            .since
            .as_deref()
            .and_then(|t| humantime::parse_rfc3339(t).ok())
            .and_then(|t| self.now.duration_since(t).ok())
            .map(|d| d.as_secs());
        let uncordon = Op::Uncordon {
            was_unschedulable: hold.was_unschedulable,
        };
        match (healthy, rollback) {
            (Ok(()), None) => {
                if let Some(step) = self.unless_done(vec![
                    uncordon,
                    Op::LiftOlderHalt(commit.to_string()),
                    Op::Release(hold.lease.clone()),
                ]) {
                    return step.annotate(Some(commit), "idle");
                }
                if !o.recorded {
                    return Step::to(Action::RecordApplied);
                }
                let mut st = self.applied(commit, system);
                st.last_rollout_seconds = held_for;
                let msg = format!("applied commit {c}");
                Step::to(finish(Outcome::Applied))
                    .save(self.ended(st, Outcome::Applied, Some(commit), &msg))
                    .say(Level::Info, format!("k8s is ready on {host}"))
                    .event(
                        "Ready",
                        format!("nk3 applied commit {c}; the node is healthy"),
                        false,
                    )
            }
            (Err(why), None) => {
                let previous = self.s.applied_system.clone().unwrap_or_default();
                Step::to(Action::Rollback)
                    .save(self.with(Phase::Switching {
                        commit: commit.to_string(),
                        system: previous,
                        reboot: false,
                        hold: Some(hold.clone()),
                        rollback: Some(why.clone()),
                    }))
                    .say(
                        Level::Error,
                        format!("{host} is unhealthy on commit {c}: {why}; rolling back"),
                    )
                    .event("RollingBack", format!("commit {c} is unhealthy: {why}"), true)
            }
            (Ok(()), Some(reason)) => {
                let why = format!("{host} was unhealthy on it ({reason}) and rolled back");
                let machine = match self.machine() {
                    Ok(m) => m,
                    Err(step) => return step,
                };
                // Halted for everyone (unless a newer commit is halted already: see
                // `Op::SetHalt`).
                let ops = vec![
                    Op::SetHalt {
                        commit: commit.to_string(),
                        reason: why.clone(),
                    },
                    uncordon,
                    Op::Release(hold.lease.clone()),
                ];
                if let Some(step) = self.unless_done(ops) {
                    return step.annotate(self.s.applied.as_deref(), "idle");
                }
                if !o.restored {
                    return Step::to(Action::Restore {
                        had_previous: machine.previous_saved,
                    });
                }
                let mut st = self.rejected(commit, &format!("halted: {why}"));
                st.applied_system = machine.current.clone();
                st.last_rollout_seconds = held_for;
                let msg = format!("commit {c} halted: {why}");
                Step::to(finish(Outcome::RolledBack))
                    .save(self.ended(st, Outcome::RolledBack, Some(commit), &msg))
                    .say(
                        Level::Error,
                        format!("commit {c} halted for the whole cluster: {why}"),
                    )
                    .event("Halted", format!("commit {c} is halted: {why}"), true)
            }
            (Err(why), Some(reason)) => self.freeze(
                commit,
                hold,
                &format!("even the rollback is unhealthy ({why}; the new generation failed with: {reason})"),
            ),
        }
    }

    /// Keeps the lease so no other node is disrupted, and says a person must look.
    fn freeze(&self, commit: &str, hold: &Hold, what: &str) -> Step {
        let host = self.host();
        let msg = format!("{what}; keeping the rollout lease so no other node is disrupted — a person must look at {host}, or push a commit that fixes it");
        let st = self.with(Phase::Frozen {
            commit: commit.to_string(),
            hold: hold.clone(),
            reason: msg.clone(),
        });
        Step::to(finish(Outcome::Frozen))
            .save(self.ended(st, Outcome::Frozen, Some(commit), &msg))
            .say(Level::Error, format!("ROLLOUT FROZEN: {msg}"))
            .event("RolloutFrozen", &msg, true)
            .annotate(None, "frozen")
    }

    /// Frozen: the lease is kept (renewed once a pass) until a new commit comes.
    fn frozen(&self, commit: &str, hold: &Hold, reason: &str) -> Step {
        if !self.o.renewed {
            return Step::to(Action::Renew(hold.lease.clone()));
        }
        let Some(plan) = &self.o.plan else {
            return Step::to(Action::LookPlan);
        };
        match plan.commit() {
            Some(head) if head != commit => self.planned(),
            _ => self.end(Outcome::Frozen, Some(commit), reason),
        }
    }
}
