//! The whole rollout of one node: every transition of DESIGN section 6, and every resume
//! after a crash, as one function of the persisted state and what the pass has seen.
//!
//! Reading order: [`next_action`] here dispatches on the phase; each phase's function asks
//! for the facts it lacks, one `Look…` at a time, and moves on once it has them. In the
//! order of DESIGN section 6: `build.rs` (steps 1–4: plan, land, build), `cluster.rs`
//! (5–8: compare, gate, lease, drain), `switch.rs` (9: switch or reboot, and switching
//! back), `verify.rs` (10–11: health, then release, halt or freeze). The helpers every
//! phase shares are below.
//! Whatever is disruptive is preceded by the state that lets a restart finish or undo it;
//! whatever completes a phase (uncordon, release, record) is done before the state that
//! says it is done, so a crash in between repeats it (each is idempotent).

// The helpers' `Err` is not an error but the step that fetches a missing fact, returned at
// once: its size does not matter.
#![allow(clippy::result_large_err)]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::{
    Action, Annotate, Claim, Coordination, Disruption, Event, Failed, Failure, Halt, Level, Log,
    Observation, Op, Plan, Settings, Step,
};
use crate::inventory::RebootPolicy;
use crate::state::{DrainBlocked, Hold, LastResult, Outcome, Phase, Rejected, State};

mod build;
mod cluster;
mod switch;
mod verify;

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
        // A frozen node trying a new commit keeps the lease and its cordon: a build that
        // fails goes back to the frozen phase (`State::frozen_left`), a built one goes on
        // under the lease the node holds.
        let claimed = match &self.s.phase {
            Phase::Frozen { .. } => None,
            p => p
                .hold()
                .filter(|_| phase.hold().is_none())
                .map(|_| self.s.lease_slots.unwrap_or(1)),
        };
        State {
            phase,
            lease_claimed: self.s.lease_claimed.max(claimed),
            ..self.s.clone()
        }
    }

    /// The state that goes through the rollout of `commit`'s built `system` again, from the
    /// lease on (a hold it had becomes a claim: see [`Decide::with`]).
    fn back_to_built(&self, commit: &str, system: &str) -> State {
        self.with(Phase::Built {
            commit: commit.to_string(),
            system: system.to_string(),
        })
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

    /// Whether `lease` was confirmed this node's for `before`, within [`CONFIRMED_WITHIN`]:
    /// `Err(Some)` is the step that asks, `Err(None)` says it is lost ([`Decide::lost`]
    /// says why).
    fn confirmed(&self, lease: &str, before: Disruption) -> Result<(), Option<Step>> {
        match &self.o.lease_confirmed {
            Some(c) if c.lost.is_some() => Err(None),
            // A clock that stepped back makes it stale, not fresh.
            Some(c)
                if c.before == before
                    && self
                        .now
                        .duration_since(c.at)
                        .is_ok_and(|d| d <= CONFIRMED_WITHIN) =>
            {
                Ok(())
            }
            _ => Err(Some(Step::to(Action::ConfirmLease {
                lease: lease.to_string(),
                before,
            }))),
        }
    }

    /// The halt of `commit` the last confirmation found (set meanwhile by another node).
    fn halted_meanwhile(&self, commit: &str) -> Option<&Halt> {
        self.o
            .lease_confirmed
            .as_ref()
            .and_then(|c| c.halt.as_ref())
            .and_then(|h| h.of(commit))
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
        before: Disruption,
        halt_stops: bool,
    ) -> Option<Step> {
        let what = before.doing();
        let give_back = vec![
            Op::Uncordon {
                was_unschedulable: hold.was_unschedulable,
            },
            Op::Release(hold.lease.clone()),
        ];
        // Halted meanwhile and given back already: refused, without asking for the lease
        // that is no longer held.
        if let Some(h) = self.halted_meanwhile(commit).filter(|_| halt_stops) {
            if self.o.cluster_done.as_ref() == Some(&give_back) {
                return Some(self.halted_after_release(commit, &h.node, &h.reason));
            }
        }
        match self.confirmed(&hold.lease, before) {
            Ok(()) if self.o.lease_lost.is_none() => {
                self.halted_meanwhile(commit).filter(|_| halt_stops)?;
                let step = self.unless_done(give_back)?;
                return Some(step.annotate(None, "idle"));
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
        let back = self.back_to_built(commit, system);
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
}
