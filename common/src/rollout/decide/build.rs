//! Steps 1 to 4: what the branch declares, landing the file and building it.

use super::*;

impl Decide<'_> {
    /// Idle (or a phase given up on): what the branch's head asks for.
    pub(super) fn planned(&self) -> Step {
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
    pub(super) fn apply(
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
    pub(super) fn building(&self, commit: &str, had_previous: bool, upgrade: bool) -> Step {
        let c = short(Some(commit));
        if self.o.resumed {
            // The new file may or may not have landed, and its build did not finish: put the
            // previous file back and start the pass over.
            if !self.o.restored {
                return Step::to(Action::Restore { had_previous });
            }
            return Step::to(Action::Continue)
                .save(self.refrozen(self.with(Phase::Idle)))
                .say(
                    Level::Warn,
                    format!("a build of commit {c} was interrupted; restored the previous configuration.nix and starting over"),
                );
        }
        if !self.o.landed {
            return Step::to(Action::Land);
        }
        // A frozen node building a newer commit keeps its lease renewed meanwhile: a build
        // can outlast the lease, and the frozen phase it may go back to holds it.
        if let Some(Phase::Frozen { hold, .. }) = self.s.frozen_left.as_deref() {
            if self.o.built.is_none() && !self.o.renewing {
                return Step::to(Action::KeepRenewed {
                    lease: hold.lease.clone(),
                    fresh: false,
                });
            }
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
                let msg = format!("{}; configuration.nix is back to what it was, and the next pass builds commit {c} again{}", f.message, self.still_frozen());
                let st = self.refrozen(self.with(Phase::Idle));
                Step::to(finish(Outcome::Failed))
                    .save(self.ended(st, Outcome::Failed, Some(commit), &msg))
                    .say(Level::Error, msg)
            }
            Some(Ok(b)) => {
                let mut st = self.with(Phase::Built {
                    commit: commit.to_string(),
                    system: b.system.clone(),
                });
                // Built: the newer commit goes on under the lease the frozen node holds, and
                // if it stops before the drain, that lease and cordon are given back.
                if st.frozen_left.take().is_some() {
                    st.lease_claimed = st.lease_claimed.max(Some(self.s.lease_slots.unwrap_or(1)));
                }
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
    pub(super) fn reject(&self, commit: &str, had_previous: bool, error: &str) -> Step {
        if !self.o.restored {
            return Step::to(Action::Restore { had_previous });
        }
        let host = self.host();
        let c = short(Some(commit));
        let frozen = self.still_frozen();
        let st = self.refrozen(self.rejected(commit, error));
        Step::to(finish(Outcome::Rejected))
            .save(self.ended(
                st,
                Outcome::Rejected,
                Some(commit),
                &format!("commit {c} rejected: {error}{frozen}"),
            ))
            .say(
                Level::Error,
                format!("commit {c} rejected on {host}: {error}{frozen}"),
            )
            .say(
                Level::Warn,
                format!("Changes reverted on {host}: configuration.nix is back to what it was"),
            )
    }

    /// `st`, back in the frozen phase the build left, if it left one.
    fn refrozen(&self, mut st: State) -> State {
        if let Some(frozen) = st.frozen_left.take() {
            st.phase = *frozen;
        }
        st
    }

    /// What a failed build of a frozen node adds to its message.
    fn still_frozen(&self) -> &'static str {
        if self.s.frozen_left.is_some() {
            "; the rollout stays frozen: this node still holds the lease"
        } else {
            ""
        }
    }

    /// The state with `commit` recorded as not to be tried again, and no phase under way.
    pub(super) fn rejected(&self, commit: &str, error: &str) -> State {
        let mut st = self.with(Phase::Idle);
        st.rejected = Some(Rejected {
            commit: commit.to_string(),
            error: error.to_string(),
            at: rfc3339(self.now),
        });
        st
    }
}
