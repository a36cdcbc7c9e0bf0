//! Steps 10 and 11: the health checks, and what their answer leads to.

use super::*;

impl Decide<'_> {
    /// Steps 10 and 11: health checks until the deadline, then uncordon and release, or
    /// roll back (and halt the commit), or freeze the rollout.
    pub(super) fn verifying(
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
    pub(super) fn freeze(&self, commit: &str, hold: &Hold, what: &str) -> Step {
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
    pub(super) fn frozen(&self, commit: &str, hold: &Hold, reason: &str) -> Step {
        if !self.o.renewed {
            return Step::to(Action::Renew(hold.lease.clone()));
        }
        let Some(plan) = &self.o.plan else {
            return Step::to(Action::LookPlan);
        };
        match plan {
            // A newer commit to build: the frozen phase is kept on disk first, to go back
            // to if the build fails.
            Plan::Apply { commit: head, .. } if head != commit && self.s.frozen_left.is_none() => {
                let mut st = self.s.clone();
                st.frozen_left = Some(Box::new(self.s.phase.clone()));
                Step::to(Action::Continue).save(st)
            }
            _ => match plan.commit() {
                Some(head) if head != commit => self.planned(),
                _ => self.end(Outcome::Frozen, Some(commit), reason),
            },
        }
    }
}
