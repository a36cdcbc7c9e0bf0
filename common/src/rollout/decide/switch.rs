//! Step 9: the switch or the boot and reboot, a switch back, and their resumes.

use super::*;

impl Decide<'_> {
    /// Step 9 begins: the switch (or boot, for a reboot) is on disk before it runs.
    pub(super) fn to_switch(
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
    pub(super) fn switching(
        &self,
        commit: &str,
        system: &str,
        reboot: bool,
        hold: Option<&Hold>,
    ) -> Step {
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
            return Step::to(Action::Continue).save(self.back_to_built(commit, system));
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
                if let Some(step) = self.unless_lost(commit, system, h, Disruption::Reboot, false) {
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
    pub(super) fn switch_failed(&self, commit: &str, hold: Option<&Hold>, f: &Failed) -> Step {
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
    pub(super) fn to_verify(
        &self,
        commit: &str,
        system: &str,
        hold: &Hold,
        rollback: Option<&str>,
    ) -> Step {
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
    pub(super) fn rolling_back(
        &self,
        commit: &str,
        system: &str,
        hold: Option<&Hold>,
        why: &str,
    ) -> Step {
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
            if let Err(Some(step)) = self.confirmed(&hold.lease, Disruption::Reboot) {
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
    pub(super) fn rebooting(
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
                    match self.confirmed(&h.lease, Disruption::Reboot) {
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
                } else if let Some(step) =
                    self.unless_lost(commit, system, h, Disruption::Reboot, false)
                {
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
}
