//! Steps 5 to 8: the built system against the running one, the gate, the lease, the drain.

use super::*;

impl Decide<'_> {
    /// Step 5 on: built (in this pass, or before and waiting for the cluster).
    pub(super) fn built(&self, commit: &str, system: &str) -> Step {
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
    pub(super) fn applied(&self, commit: &str, system: &str) -> State {
        let mut st = self.with(Phase::Idle);
        st.applied = Some(commit.to_string());
        st.applied_system = Some(system.to_string());
        st
    }

    /// Steps 6 and 7: the gate and the lease, then into the drain.
    pub(super) fn coordinated(
        &self,
        commit: &str,
        system: &str,
        settings: &Settings,
        c: &str,
    ) -> Step {
        let o = self.o;
        let host = &settings.host;
        let Some(halt) = &o.halt else {
            return Step::to(Action::LookHalt);
        };
        if let Some(h) = halt.as_ref().and_then(|h| h.of(commit)) {
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
        if let Some(h) = halt.as_ref().and_then(|h| h.of(commit)) {
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
        if let Some(h) = self.halted_meanwhile(commit) {
            return self.halted(commit, settings, &h.node, &h.reason);
        }
        match self.confirmed(lease, Disruption::Cordon) {
            Ok(()) if o.lease_lost.is_none() => {}
            Err(Some(step)) if o.lease_lost.is_none() => return step,
            _ => {
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

    /// A commit another node found unhealthy: never applied here.
    pub(super) fn halted(
        &self,
        commit: &str,
        settings: &Settings,
        node: &str,
        reason: &str,
    ) -> Step {
        if let Some(step) = self.let_go(settings) {
            return step;
        }
        self.halted_after_release(commit, node, reason)
    }

    /// The halted commit refused, what this node held given back.
    pub(super) fn halted_after_release(&self, commit: &str, node: &str, reason: &str) -> Step {
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
    pub(super) fn draining(&self, commit: &str, system: &str, hold: &Hold) -> Step {
        let o = self.o;
        if o.resumed {
            return Step::to(Action::Continue).save(self.back_to_built(commit, system));
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
            if let Some(step) = self.unless_lost(commit, system, hold, Disruption::Drain, true) {
                return step;
            }
        }
        let back = || self.back_to_built(commit, system);
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
        if let Some(step) = self.unless_lost(commit, system, hold, Disruption::Switch, true) {
            return step;
        }
        self.to_switch(commit, system, Some(hold), settings, reasons)
    }
}
