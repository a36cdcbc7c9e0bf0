//! The decision as a table: every phase against every kind of observation, and the
//! transitions that matter, one row each.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::*;
use crate::state::{Hold, Phase};

const C: &str = "c0ffee00c0ffee00c0ffee00c0ffee00c0ffee00";
const NEW: &str = "/nix/store/new-system";
const OLD: &str = "/nix/store/old-system";

fn t0() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_800_000_000)
}

fn settings() -> Settings {
    Settings {
        host: "node-1".into(),
        reboot: RebootPolicy::WhenNeeded,
        max_unavailable: 1,
        lease_duration: Duration::from_secs(900),
        drain_timeout: Duration::from_secs(600),
        health_timeout: Duration::from_secs(300),
    }
}

fn hold() -> Hold {
    Hold {
        lease: "nk3-rollout".into(),
        was_unschedulable: false,
        ready_before: vec!["node-1".into(), "node-2".into()],
        since: Some(humantime::format_rfc3339_seconds(t0()).to_string()),
    }
}

fn at(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// Every phase the state can hold, with and without a lease where both exist.
fn phases() -> Vec<Phase> {
    let c = C.to_string();
    vec![
        Phase::Idle,
        Phase::Building {
            commit: c.clone(),
            had_previous: true,
            upgrade: false,
        },
        Phase::Built {
            commit: c.clone(),
            system: NEW.into(),
        },
        Phase::Draining {
            commit: c.clone(),
            system: NEW.into(),
            hold: hold(),
        },
        Phase::Switching {
            commit: c.clone(),
            system: NEW.into(),
            reboot: false,
            hold: Some(hold()),
            rollback: None,
        },
        Phase::Switching {
            commit: c.clone(),
            system: NEW.into(),
            reboot: true,
            hold: None,
            rollback: None,
        },
        Phase::Switching {
            commit: c.clone(),
            system: OLD.into(),
            reboot: false,
            hold: Some(hold()),
            rollback: Some("k3s.service is not active".into()),
        },
        Phase::Rebooting {
            commit: c.clone(),
            system: NEW.into(),
            boot_id: "boot-1".into(),
            hold: Some(hold()),
            rollback: false,
        },
        Phase::Rebooting {
            commit: c.clone(),
            system: NEW.into(),
            boot_id: "boot-1".into(),
            hold: None,
            rollback: false,
        },
        Phase::Rebooting {
            commit: c.clone(),
            system: OLD.into(),
            boot_id: "boot-1".into(),
            hold: Some(hold()),
            rollback: true,
        },
        Phase::Verifying {
            commit: c.clone(),
            system: NEW.into(),
            hold: hold(),
            deadline: at(t0() + Duration::from_secs(300)),
            rollback: false,
            reason: None,
            since: Some(at(t0())),
        },
        Phase::Verifying {
            commit: c.clone(),
            system: OLD.into(),
            hold: hold(),
            deadline: at(t0() + Duration::from_secs(300)),
            rollback: true,
            reason: Some("k3s.service is not active".into()),
            since: Some(at(t0())),
        },
        Phase::Frozen {
            commit: c,
            hold: hold(),
            reason: "even the rollback is unhealthy".into(),
        },
    ]
}

fn apply_plan() -> Plan {
    Plan::Apply {
        commit: C.into(),
        settings: settings(),
        diff: Some("-a\n+b\n".into()),
        why: "new commit".into(),
        upgrade: None,
        on_disk: true,
        existing: Some(0o644),
    }
}

fn failed(failure: Failure) -> Failed {
    Failed {
        failure,
        message: "error: boom".into(),
    }
}

/// One observation per kind of fact, each in the shapes it comes in.
fn observations() -> Vec<(&'static str, Observation)> {
    let base = || Observation {
        now: Some(t0() + Duration::from_secs(10)),
        poll_interval: Duration::from_secs(60),
        ..Observation::default()
    };
    let machine = |boot: &str, current: &str| Machine {
        boot_id: boot.into(),
        current: Some(current.into()),
        previous_saved: true,
    };
    let mut out: Vec<(&'static str, Observation)> = vec![("nothing yet", base())];
    let mut add = |name: &'static str, f: &dyn Fn(&mut Observation)| {
        let mut o = base();
        o.plan = Some(apply_plan());
        o.settings = Some(Ok(settings()));
        f(&mut o);
        out.push((name, o));
    };
    add("plan: apply", &|_| {});
    add("plan: no commit", &|o| {
        o.plan = Some(Plan::NoCommit("unreachable".into()))
    });
    add("plan: bad inventory", &|o| {
        o.plan = Some(Plan::BadInventory {
            commit: C.into(),
            problems: vec!["inventory.yaml:3: bad".into()],
        })
    });
    add("plan: not a node", &|o| {
        o.plan = Some(Plan::NotANode {
            commit: C.into(),
            why: "no node has this address".into(),
        })
    });
    add("plan: up to date", &|o| {
        o.plan = Some(Plan::UpToDate {
            commit: C.into(),
            settings: settings(),
        });
        o.token_written = true;
    });
    add("plan: newer commit", &|o| {
        o.plan = Some(Plan::Apply {
            commit: "d00d".into(),
            settings: settings(),
            diff: None,
            why: "new commit".into(),
            upgrade: None,
            on_disk: false,
            existing: None,
        })
    });
    add("settings unreadable", &|o| {
        o.plan = None;
        o.settings = Some(Err("no inventory.yaml at commit".into()));
    });
    add("machine: same boot, new system", &|o| {
        o.machine = Some(machine("boot-1", NEW))
    });
    add("machine: new boot, new system", &|o| {
        o.machine = Some(machine("boot-2", NEW))
    });
    add("machine: new boot, old system", &|o| {
        o.machine = Some(machine("boot-2", OLD))
    });
    add("built ok", &|o| {
        o.landed = true;
        o.built = Some(Ok(Built {
            system: NEW.into(),
            has_agent: true,
        }))
    });
    add("built without the agent", &|o| {
        o.landed = true;
        o.built = Some(Ok(Built {
            system: NEW.into(),
            has_agent: false,
        }))
    });
    add("build refused", &|o| {
        o.landed = true;
        o.built = Some(Err(failed(Failure::Exited)))
    });
    add("build timed out", &|o| {
        o.landed = true;
        o.built = Some(Err(failed(Failure::TimedOut)))
    });
    add("bootstrap", &|o| {
        o.coordination = Some(Coordination::Bootstrap)
    });
    add("no credentials", &|o| {
        o.coordination = Some(Coordination::NoCredentials("no kubeconfig".into()))
    });
    add("halted", &|o| {
        o.coordination = Some(Coordination::Lease);
        o.halt = Some(Some(Halt {
            commit: C.into(),
            reason: "unhealthy".into(),
            node: "node-2".into(),
            earlier: vec![],
        }))
    });
    add("budget blocks", &|o| {
        o.coordination = Some(Coordination::Lease);
        o.halt = Some(None);
        o.blocker = Some(Some(crate::disruption::Blocker {
            budget: "db/pdb".into(),
            pod: "db/db-0".into(),
            why: "0 disruptions allowed".into(),
            never: false,
        }))
    });
    add("lease busy", &|o| {
        o.coordination = Some(Coordination::Lease);
        o.halt = Some(None);
        o.blocker = Some(None);
        o.claim = Some(Claim::Busy {
            holder: "node-2".into(),
            lease: "nk3-rollout".into(),
            left: Duration::from_secs(30),
        })
    });
    add("lease held, gate closed", &|o| {
        o.coordination = Some(Coordination::Lease);
        o.halt = Some(None);
        o.blocker = Some(None);
        o.claim = Some(Claim::Held("nk3-rollout".into()));
        o.halt_held = Some(None);
        o.head_held = Some(C.into());
        o.gate = Some(Err("node node-2 is NotReady".into()));
    });
    add("lease held, gate open", &|o| {
        o.coordination = Some(Coordination::Lease);
        o.halt = Some(None);
        o.blocker = Some(None);
        o.claim = Some(Claim::Held("nk3-rollout".into()));
        o.halt_held = Some(None);
        o.head_held = Some(C.into());
        o.gate = Some(Ok(vec!["node-2".into()]));
        o.renewing = true;
    });
    add("cordoned", &|o| o.cordoned = Some(false));
    add("drain timed out", &|o| {
        o.cordoned = Some(false);
        o.drained = Some(Err("drain timed out".into()))
    });
    add("drained, lease lost", &|o| {
        o.cordoned = Some(false);
        o.drained = Some(Ok(()));
        o.reboot_reasons = Some(vec![]);
        o.lease_lost = Some("node-2 holds it".into());
    });
    add("switched", &|o| {
        o.switched = Some(Ok(()));
        o.reboot_reasons = Some(vec!["kernel".into()]);
        o.machine = Some(machine("boot-1", NEW));
    });
    add("switch failed", &|o| {
        o.switched = Some(Err(failed(Failure::Exited)))
    });
    add("rolled back", &|o| {
        o.rolled_back = Some(Ok(()));
        o.reboot_reasons = Some(vec![]);
        o.machine = Some(machine("boot-1", OLD));
    });
    add("reboot asked", &|o| o.rebooted = Some(Ok(())));
    add("reboot failed", &|o| {
        o.rebooted = Some(Err(failed(Failure::NotStarted)))
    });
    add("healthy", &|o| {
        o.renewing = true;
        o.health = Some(Ok(()));
        o.machine = Some(machine("boot-2", OLD));
    });
    add("unhealthy, time left", &|o| {
        o.renewing = true;
        o.health = Some(Err("k3s.service is not active".into()))
    });
    add("unhealthy, deadline passed", &|o| {
        o.renewing = true;
        o.now = Some(t0() + Duration::from_secs(3600));
        o.health = Some(Err("k3s.service is not active".into()));
    });
    out
}

fn disruptive(a: &Action) -> bool {
    matches!(
        a,
        Action::Cordon
            | Action::Drain(_)
            | Action::Switch
            | Action::Boot
            | Action::Rollback
            | Action::Reboot
    )
}

/// Every phase × every kind of observation, resumed and not: the decision answers (it is
/// total), a disruptive action is only ever taken holding the lease or as a bootstrap, a
/// step that ends the pass records why, and what a step writes keeps or gives back the
/// lease explicitly.
#[test]
fn every_phase_against_every_observation() {
    for phase in phases() {
        for (name, obs) in observations() {
            for resumed in [true, false] {
                let state = State {
                    phase: phase.clone(),
                    host: Some("node-1".into()),
                    applied: Some("beef".into()),
                    applied_system: Some(OLD.into()),
                    ..State::default()
                };
                let o = Observation {
                    resumed,
                    ..obs.clone()
                };
                let step = next_action(&state, &o);
                let after = step.state.as_deref().unwrap_or(&state);
                let what = format!("{} / {name} / resumed={resumed}: {step:?}", phase.name());
                if disruptive(&step.action) {
                    let bootstrap = o.coordination == Some(Coordination::Bootstrap);
                    let held = after.phase.hold().is_some();
                    let bootstrap_phase = matches!(
                        after.phase,
                        Phase::Switching { hold: None, .. } | Phase::Rebooting { hold: None, .. }
                    );
                    assert!(
                        held || bootstrap || bootstrap_phase,
                        "disrupts without the lease: {what}"
                    );
                    assert_ne!(
                        after.phase.name(),
                        "idle",
                        "disrupts with nothing on disk to resume from: {what}"
                    );
                }
                if let Action::Finish { .. } = step.action {
                    if step.state.is_some() {
                        let last = after.last.as_ref().expect("a result");
                        assert!(!last.message.is_empty(), "{what}");
                    }
                }
                // A lease given up on disk is given up in the API first (or was lost).
                if state.phase.hold().is_some()
                    && after.phase.hold().is_none()
                    && !matches!(after.phase, Phase::Built { .. } | Phase::Idle)
                {
                    panic!("the hold vanished into {}: {what}", after.phase.name());
                }
            }
        }
    }
}

/// A confirmation of the lease at `at` for `before`: lost (why), and the halt it read.
fn confirmed(
    at: SystemTime,
    before: Disruption,
    lost: Option<&str>,
    halt: Option<&str>,
) -> Confirmed {
    Confirmed {
        at,
        before,
        lost: lost.map(str::to_string),
        halt: halt.map(|c| Halt {
            commit: c.into(),
            reason: "unhealthy".into(),
            node: "node-2".into(),
            earlier: vec![],
        }),
    }
}

fn state(phase: Phase) -> State {
    State {
        phase,
        host: Some("node-1".into()),
        applied: Some("beef".into()),
        applied_system: Some(OLD.into()),
        ..State::default()
    }
}

fn obs(f: impl FnOnce(&mut Observation)) -> Observation {
    let mut o = Observation::pass(
        t0() + Duration::from_secs(10),
        Duration::from_secs(60),
        false,
    );
    o.settings = Some(Ok(settings()));
    f(&mut o);
    o
}

fn machine(boot: &str, current: &str) -> Machine {
    Machine {
        boot_id: boot.into(),
        current: Some(current.into()),
        previous_saved: true,
    }
}

/// The bug: the phase written before the rollback switch had no direction, so a restart
/// verified the old system as the new commit, recorded the bad commit as applied, released
/// the lease and halted nothing.
#[test]
fn a_kill_right_after_switch_rollback_does_not_forget_the_rollback() {
    let s = state(Phase::Switching {
        commit: C.into(),
        system: OLD.into(),
        reboot: false,
        hold: Some(hold()),
        rollback: Some("k3s.service is not active".into()),
    });
    let step = next_action(&s, &obs(|o| o.machine = Some(machine("boot-1", OLD))));
    match step.state.map(|s| s.phase) {
        Some(Phase::Verifying {
            rollback: true,
            reason: Some(r),
            system,
            ..
        }) => {
            assert_eq!(r, "k3s.service is not active");
            assert_eq!(system, OLD);
        }
        other => panic!("{other:?}"),
    }
    // Neither generation runs: frozen, never a second `--rollback`.
    let step = next_action(
        &s,
        &obs(|o| o.machine = Some(machine("boot-1", "/nix/store/x"))),
    );
    assert!(matches!(
        step.state.map(|s| s.phase),
        Some(Phase::Frozen { .. })
    ));
}

/// The bug: the deadline was looked at only between probes.
#[test]
fn health_timeout_is_a_bound_not_a_hope() {
    let deadline = t0() + Duration::from_secs(3);
    let s = state(Phase::Verifying {
        commit: C.into(),
        system: NEW.into(),
        hold: hold(),
        deadline: at(deadline),
        rollback: false,
        reason: None,
        since: Some(at(t0())),
    });
    // The probe is given the deadline, so no probe runs past it.
    let step = next_action(&s, &obs(|o| o.renewing = true));
    assert_eq!(
        step.action,
        Action::CheckHealth {
            ready_before: hold().ready_before,
            since: t0(),
            deadline
        }
    );
    // A probe that came back after the deadline, failing, is the end: roll back.
    let step = next_action(
        &s,
        &obs(|o| {
            o.renewing = true;
            o.now = Some(t0() + Duration::from_secs(15));
            o.health = Some(Err("check `slow` timed out after 3s".into()));
        }),
    );
    assert_eq!(step.action, Action::Rollback);
    assert!(matches!(
        step.state.map(|s| s.phase),
        Some(Phase::Switching {
            rollback: Some(_),
            ..
        })
    ));
}

/// Found writing the decision down: a `nixos-rebuild boot` that failed under the lease
/// marked the commit rejected and left the node cordoned, holding the lease, for good.
#[test]
fn a_failed_boot_under_the_lease_gives_back_the_node_and_the_lease() {
    let s = state(Phase::Switching {
        commit: C.into(),
        system: NEW.into(),
        reboot: true,
        hold: Some(hold()),
        rollback: None,
    });
    let o = obs(|o| {
        o.resumed = false;
        o.switched = Some(Err(failed(Failure::Exited)));
    });
    let step = next_action(&s, &o);
    assert_eq!(
        step.action,
        Action::Cluster(vec![
            Op::Uncordon {
                was_unschedulable: false
            },
            Op::Release("nk3-rollout".into())
        ])
    );
    let step = next_action(
        &s,
        &Observation {
            cluster_done: Some(vec![
                Op::Uncordon {
                    was_unschedulable: false,
                },
                Op::Release("nk3-rollout".into()),
            ]),
            ..o
        },
    );
    let after = step.state.expect("state");
    assert_eq!(after.phase, Phase::Idle);
    assert_eq!(after.rejected.map(|r| r.commit).as_deref(), Some(C));
}

/// The rows a newcomer reads first: what each phase does when the pass has seen what it
/// needs.
#[test]
fn the_transitions_of_design_section_6() {
    let fwd = Phase::Verifying {
        commit: C.into(),
        system: NEW.into(),
        hold: hold(),
        deadline: at(t0() + Duration::from_secs(300)),
        rollback: false,
        reason: None,
        since: Some(at(t0())),
    };
    type Row = (
        &'static str,
        Phase,
        fn(&mut Observation),
        &'static str,
        &'static str,
    );
    let rows: Vec<Row> = vec![
        (
            "idle asks for the plan",
            Phase::Idle,
            |_| {},
            "LookPlan",
            "idle",
        ),
        (
            "an interrupted build is undone first",
            Phase::Building {
                commit: C.into(),
                had_previous: true,
                upgrade: false,
            },
            |_| {},
            "Restore",
            "building",
        ),
        (
            "a resumed drain goes through the steps again",
            Phase::Draining {
                commit: C.into(),
                system: NEW.into(),
                hold: hold(),
            },
            |_| {},
            "Continue",
            "built",
        ),
        (
            "a reboot not yet happened is asked again",
            Phase::Rebooting {
                commit: C.into(),
                system: NEW.into(),
                boot_id: "boot-1".into(),
                hold: Some(hold()),
                rollback: false,
            },
            |o| {
                o.machine = Some(machine("boot-1", OLD));
                o.lease_confirmed = Some(confirmed(
                    t0() + Duration::from_secs(10),
                    Disruption::Reboot,
                    None,
                    None,
                ));
            },
            "Reboot",
            "rebooting",
        ),
        (
            "a reboot not yet happened, the lease lost meanwhile: uncordon, start over",
            Phase::Rebooting {
                commit: C.into(),
                system: NEW.into(),
                boot_id: "boot-1".into(),
                hold: Some(hold()),
                rollback: false,
            },
            |o| {
                o.machine = Some(machine("boot-1", OLD));
                o.lease_confirmed = Some(confirmed(
                    t0(),
                    Disruption::Reboot,
                    Some("node-2 holds it"),
                    None,
                ));
            },
            "Cluster([Uncordon",
            "rebooting",
        ),
        (
            "back from the reboot, health is checked",
            Phase::Rebooting {
                commit: C.into(),
                system: NEW.into(),
                boot_id: "boot-1".into(),
                hold: Some(hold()),
                rollback: false,
            },
            |o| o.machine = Some(machine("boot-2", NEW)),
            "Continue",
            "verifying",
        ),
        (
            "healthy: uncordon, lift an older halt, release",
            fwd.clone(),
            |o| {
                o.renewing = true;
                o.health = Some(Ok(()));
                o.head_held = Some(C.into());
            },
            "Cluster([Uncordon { was_unschedulable: false }, LiftOlderHalt",
            "verifying",
        ),
        (
            "unhealthy with time left: look again",
            fwd.clone(),
            |o| {
                o.renewing = true;
                o.health = Some(Err("not ready".into()));
            },
            "Sleep",
            "verifying",
        ),
        (
            "a frozen node renews its lease",
            Phase::Frozen {
                commit: C.into(),
                hold: hold(),
                reason: "frozen".into(),
            },
            |_| {},
            "Renew",
            "frozen",
        ),
        (
            "a frozen node stays frozen on the same commit",
            Phase::Frozen {
                commit: C.into(),
                hold: hold(),
                reason: "frozen".into(),
            },
            |o| {
                o.renewed = true;
                o.plan = Some(apply_plan());
            },
            "Finish",
            "frozen",
        ),
    ];
    for (name, phase, f, action, after) in rows {
        let s = state(phase);
        let step = next_action(&s, &obs(f));
        let got = format!("{:?}", step.action);
        assert!(got.starts_with(action), "{name}: {got}");
        let phase = step.state.as_deref().unwrap_or(&s).phase.name();
        assert_eq!(phase, after, "{name}: {step:?}");
    }
}

/// The lease as the pass that got it left it: held, the gate and head looked at.
fn held(f: impl FnOnce(&mut Observation)) -> Observation {
    obs(|o| {
        o.resumed = false;
        o.plan = Some(apply_plan());
        o.built = Some(Ok(Built {
            system: NEW.into(),
            has_agent: true,
        }));
        o.machine = Some(machine("boot-1", OLD));
        o.coordination = Some(Coordination::Lease);
        o.halt = Some(None);
        o.blocker = Some(None);
        o.claim = Some(Claim::Held("nk3-rollout".into()));
        o.renewing = true;
        o.halt_held = Some(None);
        o.head_held = Some(C.into());
        o.gate = Some(Ok(vec!["node-2".into()]));
        f(o);
    })
}

fn built() -> State {
    state(Phase::Built {
        commit: C.into(),
        system: NEW.into(),
    })
}

/// Found by the simulation: a pass that took the lease and then failed (an API error)
/// left the slot held with nothing on disk saying so; the node then went idle on another
/// commit and the others waited out the whole lease duration.
#[test]
fn an_interrupted_pass_that_took_the_lease_gives_it_back() {
    let mut s = built();
    let step = next_action(&s, &held(|o| o.claim = None));
    assert_eq!(step.action, Action::Acquire);
    assert!(step
        .state
        .expect("the claim is written first")
        .lease_claimed
        .is_some());
    s.phase = Phase::Idle;
    s.lease_claimed = Some(1);
    let step = next_action(
        &s,
        &obs(|o| {
            o.plan = Some(Plan::UpToDate {
                commit: C.into(),
                settings: settings(),
            })
        }),
    );
    assert_eq!(
        step.action,
        Action::Cluster(vec![Op::LetGo { max_unavailable: 1 }])
    );
}

/// Found by the simulation: a node waited for the lease with the plan of an older commit;
/// meanwhile a newer one made it through on another node, which lifted the older one's
/// halt, and the waiting node applied the halted commit.
#[test]
fn a_stale_plan_is_not_applied_after_a_newer_commit_lifted_its_halt() {
    let step = next_action(&built(), &held(|o| o.head_held = Some("d00d".into())));
    assert_eq!(
        step.action,
        Action::Cluster(vec![Op::LetGo { max_unavailable: 1 }])
    );
    let step = next_action(
        &built(),
        &held(|o| {
            o.head_held = Some("d00d".into());
            o.cluster_done = Some(vec![Op::LetGo { max_unavailable: 1 }]);
        }),
    );
    assert_eq!(step.action, Action::Replan);
}

/// Found by the simulation: a node that rolled back an older commit halted it, replacing
/// the halt of the head another node had just set, and a third node applied the unhealthy
/// head; and a node that finished an older commit late lifted the head's halt. Which halt
/// wins is now the ops' own rule (by ancestry, `common/tests/dst.rs` checks it); the
/// decision always asks for both.
#[test]
fn rolling_back_halts_and_getting_through_lifts_only_older_halts() {
    let s = state(Phase::Verifying {
        commit: C.into(),
        system: OLD.into(),
        hold: hold(),
        deadline: at(t0() + Duration::from_secs(300)),
        rollback: true,
        reason: Some("k3s.service is not active".into()),
        since: Some(at(t0())),
    });
    let step = next_action(
        &s,
        &obs(|o| {
            o.renewing = true;
            o.health = Some(Ok(()));
            o.machine = Some(machine("boot-1", OLD));
        }),
    );
    assert!(
        matches!(&step.action, Action::Cluster(ops) if matches!(&ops[0], Op::SetHalt { commit, .. } if commit == C)),
        "{step:?}"
    );
}

/// Found by the simulation: a node whose gate was closed gave the lease back but stayed
/// cordoned from a drain an earlier pass did not finish.
#[test]
fn a_closed_gate_uncordons_what_an_interrupted_drain_left() {
    let step = next_action(
        &built(),
        &held(|o| o.gate = Some(Err("node node-2 is NotReady".into()))),
    );
    assert_eq!(
        step.action,
        Action::Cluster(vec![Op::LetGo { max_unavailable: 1 }])
    );
}

/// Found by the simulation: an agent that stalled (a hung disk, a paused VM) for longer
/// than the lease after its last look went on to cordon under a lease that was another
/// node's by then.
#[test]
fn a_stall_longer_than_the_lease_is_noticed_before_the_cordon() {
    let stale = confirmed(
        t0() - Duration::from_secs(400),
        Disruption::Cordon,
        None,
        None,
    );
    let step = next_action(&built(), &held(|o| o.lease_confirmed = Some(stale.clone())));
    assert_eq!(
        step.action,
        Action::ConfirmLease {
            lease: "nk3-rollout".into(),
            before: Disruption::Cordon
        }
    );
    let lost = confirmed(
        t0() + Duration::from_secs(10),
        Disruption::Cordon,
        Some("node-2 holds it"),
        None,
    );
    let step = next_action(&built(), &held(|o| o.lease_confirmed = Some(lost.clone())));
    assert!(
        matches!(
            step.action,
            Action::Finish {
                outcome: Outcome::Waiting,
                ..
            }
        ),
        "{step:?}"
    );
    // A commit halted meanwhile is refused, not cordoned for.
    let halted = confirmed(lost.at, Disruption::Cordon, None, Some(C));
    let step = next_action(&built(), &held(|o| o.lease_confirmed = Some(halted)));
    assert_eq!(
        step.action,
        Action::Cluster(vec![Op::LetGo { max_unavailable: 1 }])
    );
}

/// Found by the simulation: a rollback's reboot, given up because the lease was lost
/// while the agent was down, went back to the build with the previous system and
/// recorded it as the bad commit's. It now verifies the rollback, without the reboot.
#[test]
fn a_rollback_reboot_given_up_for_a_lost_lease_verifies_the_rollback() {
    let s = state(Phase::Rebooting {
        commit: C.into(),
        system: OLD.into(),
        boot_id: "boot-1".into(),
        hold: Some(hold()),
        rollback: true,
    });
    let step = next_action(
        &s,
        &obs(|o| {
            o.machine = Some(machine("boot-1", OLD));
            o.lease_confirmed = Some(confirmed(
                t0() + Duration::from_secs(10),
                Disruption::Reboot,
                Some("node-2 holds it"),
                None,
            ));
        }),
    );
    assert!(
        matches!(
            step.state.as_deref().map(|s| &s.phase),
            Some(Phase::Verifying { rollback: true, .. })
        ),
        "{step:?}"
    );
}

/// From the review: a commit halted while this node drained is refused once the node and
/// the lease are given back, without asking again for the lease it no longer holds (which
/// would take it for lost).
#[test]
fn a_commit_halted_during_the_drain_is_refused_after_giving_back_not_taken_for_a_lost_lease() {
    let s = state(Phase::Draining {
        commit: C.into(),
        system: NEW.into(),
        hold: hold(),
    });
    let halted = |at: SystemTime| confirmed(at, Disruption::Drain, None, Some(C));
    let give_back = vec![
        Op::Uncordon {
            was_unschedulable: false,
        },
        Op::Release("nk3-rollout".into()),
    ];
    let base = |o: &mut Observation| {
        o.resumed = false;
        o.plan = Some(apply_plan());
        o.renewing = true;
        o.cordoned = Some(false);
    };
    let step = next_action(
        &s,
        &obs(|o| {
            base(o);
            o.lease_confirmed = Some(halted(t0() + Duration::from_secs(10)));
        }),
    );
    assert_eq!(step.action, Action::Cluster(give_back.clone()));
    // Given back, and the confirmation long stale by now: no new one is asked for.
    let step = next_action(
        &s,
        &obs(|o| {
            base(o);
            o.lease_confirmed = Some(halted(t0() - Duration::from_secs(60)));
            o.cluster_done = Some(give_back.clone());
            o.machine = Some(machine("boot-1", OLD));
        }),
    );
    assert_eq!(
        step.action,
        Action::Restore { had_previous: true },
        "{step:?}"
    );
}

/// Found on the real control plane (`tests/it/confirm.rs`): the confirmation taken before a
/// drain of a few seconds still counted as fresh for the switch after it, so a lease taken
/// away, or the commit halted, during the drain went unseen and the node switched. A
/// confirmation now permits the one step it was taken for.
#[test]
fn a_lease_confirmed_before_the_drain_is_confirmed_again_before_the_switch() {
    let s = state(Phase::Draining {
        commit: C.into(),
        system: NEW.into(),
        hold: hold(),
    });
    let drained = |o: &mut Observation| {
        o.resumed = false;
        o.plan = Some(apply_plan());
        o.renewing = true;
        o.cordoned = Some(false);
        o.drained = Some(Ok(()));
        o.reboot_reasons = Some(vec![]);
        o.machine = Some(machine("boot-1", OLD));
    };
    // Confirmed for the drain three seconds ago: asked again, for the switch.
    let before_drain = confirmed(t0() + Duration::from_secs(7), Disruption::Drain, None, None);
    let step = next_action(
        &s,
        &obs(|o| {
            drained(o);
            o.lease_confirmed = Some(before_drain.clone());
        }),
    );
    assert_eq!(
        step.action,
        Action::ConfirmLease {
            lease: "nk3-rollout".into(),
            before: Disruption::Switch
        }
    );
    // What that finds decides: halted meanwhile, the node and the lease are given back.
    let halted = confirmed(
        t0() + Duration::from_secs(10),
        Disruption::Switch,
        None,
        Some(C),
    );
    let step = next_action(
        &s,
        &obs(|o| {
            drained(o);
            o.lease_confirmed = Some(halted);
        }),
    );
    assert_eq!(
        step.action,
        Action::Cluster(vec![
            Op::Uncordon {
                was_unschedulable: false
            },
            Op::Release("nk3-rollout".into()),
        ])
    );
    // Still this node's: the switch.
    let fresh = confirmed(
        t0() + Duration::from_secs(10),
        Disruption::Switch,
        None,
        None,
    );
    let step = next_action(
        &s,
        &obs(|o| {
            drained(o);
            o.lease_confirmed = Some(fresh);
        }),
    );
    assert!(
        matches!(
            step.state.as_deref().map(|s| &s.phase),
            Some(Phase::Switching { .. })
        ),
        "{step:?}"
    );
}

/// Only one halt was on record: once a second commit was halted, a node still on the first
/// (its git server down) found no halt of it and applied it. Earlier halts stay halted.
#[test]
fn a_commit_halted_before_a_newer_halt_is_still_refused() {
    let newer = Halt {
        commit: "d00d".into(),
        reason: "node-3 never got Ready".into(),
        node: "node-3".into(),
        earlier: vec![Halt {
            commit: C.into(),
            reason: "k3s never started".into(),
            node: "node-2".into(),
            earlier: vec![],
        }],
    };
    // What is held is given back and the file put back; then the commit is refused,
    // without asking for the lease (the driver knows no Acquire).
    let o = held(|o| {
        o.claim = None;
        o.halt = Some(Some(newer.clone()));
    });
    let no_build = Err(failed(Failure::NotStarted));
    let (s, said) = drive(built(), o, no_build, |_| false);
    assert!(
        said.iter()
            .any(|m| m.contains("halted for the cluster by node-2: k3s never started")),
        "{said:?}"
    );
    assert!(s.rejected.as_ref().is_some_and(|r| r.commit == C), "{s:?}");
}

/// Runs one pass from `s` with `o` as the world answers, filling in what each action
/// finds the simple way; the state it ends in and what it said.
fn drive(
    mut s: State,
    mut o: Observation,
    build: Result<Built, Failed>,
    until: fn(&State) -> bool,
) -> (State, Vec<String>) {
    let mut said = Vec::new();
    for _ in 0..50 {
        let step = next_action(&s, &o);
        said.extend(step.logs.iter().map(|l| l.message.clone()));
        if let Some(st) = step.state {
            if st.phase.name() != s.phase.name() {
                o.entered();
            }
            s = *st;
            if until(&s) {
                return (s, said);
            }
        }
        match step.action {
            Action::Finish { .. } => return (s, said),
            Action::Continue => {}
            Action::Renew(_) => o.renewed = true,
            Action::KeepRenewed { .. } => {
                said.push("(renewing the lease)".into());
                o.renewing = true
            }
            Action::WriteToken => o.token_written = true,
            Action::LookMachine => o.machine = Some(machine("boot-1", OLD)),
            Action::SavePrevious => o.previous_saved = true,
            Action::Land => o.landed = true,
            Action::Build { .. } => o.built = Some(build.clone()),
            Action::Restore { .. } => o.restored = true,
            Action::Cluster(ops) => o.cluster_done = Some(ops),
            other => panic!("not driven here: {other:?} in {}", s.phase.name()),
        }
    }
    panic!("the pass did not end: {s:?}")
}

/// A frozen node that tried a newer commit Nix refused came out of the frozen phase: idle,
/// the lease no longer renewed (the rollout went on once it ran out) and the node left
/// cordoned by nk3. It now goes back to the frozen phase, still holding the lease.
#[test]
fn a_frozen_node_whose_newer_commit_fails_to_build_stays_frozen() {
    let frozen = Phase::Frozen {
        commit: "bad0".into(),
        hold: hold(),
        reason: "even the rollback is unhealthy".into(),
    };
    let s = state(frozen.clone());
    let o = obs(|o| {
        o.plan = Some(apply_plan());
        o.machine = Some(machine("boot-1", OLD));
    });
    let refused = Err(Failed {
        failure: Failure::Exited,
        message: "error: undefined variable 'pkgs.k3ss'".into(),
    });
    let (after, said) = drive(s, o, refused, |_| false);
    assert_eq!(after.phase, frozen, "{said:?}");
    assert_eq!(after.frozen_left, None);
    assert_eq!(after.rejected.as_ref().map(|r| r.commit.as_str()), Some(C));
    assert!(
        said.iter().any(|m| m.contains("the rollout stays frozen")),
        "{said:?}"
    );
    assert!(
        said.iter().any(|m| m == "(renewing the lease)"),
        "renewed while building: {said:?}"
    );
    // The next pass renews the lease, and the refused commit is not tried again.
    let o = obs(|o| {
        o.plan = Some(Plan::AlreadyRejected {
            commit: C.into(),
            rejected: after.rejected.clone().unwrap(),
        });
    });
    let step = next_action(&after, &o);
    assert_eq!(step.action, Action::Renew("nk3-rollout".into()));

    // Built, the newer commit goes on from Built, under the lease the node holds.
    let o = obs(|o| {
        o.plan = Some(apply_plan());
        o.machine = Some(machine("boot-1", OLD));
    });
    let built = Ok(Built {
        system: NEW.into(),
        has_agent: true,
    });
    let (st, said) = drive(state(frozen.clone()), o, built, |s| {
        matches!(s.phase, Phase::Built { .. })
    });
    assert!(matches!(st.phase, Phase::Built { .. }), "{said:?} {st:?}");
    assert_eq!(st.frozen_left, None);
    // ... and what it holds is claimed: if the commit stops before the drain (here: its
    // system would not run the agent), the lease and the cordon are given back.
    assert_eq!(st.lease_claimed, Some(1));
    let o = obs(|o| {
        o.plan = Some(apply_plan());
        o.machine = Some(machine("boot-1", OLD));
    });
    let without_agent = Ok(Built {
        system: NEW.into(),
        has_agent: false,
    });
    let (after, said) = drive(state(frozen.clone()), o, without_agent, |_| false);
    assert_eq!(after.phase, Phase::Idle, "{said:?}");
    assert_eq!(after.lease_claimed, Some(1), "{said:?}");
    let o = obs(|o| o.plan = Some(apply_plan()));
    assert_eq!(
        next_action(&after, &o).action,
        Action::Cluster(vec![Op::LetGo { max_unavailable: 1 }])
    );
}
