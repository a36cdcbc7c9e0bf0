//! `nk3-agent plan`: what `run --once` would do now on this node, with the diff, changing
//! nothing on the node (it may fetch new commits into the agent's clone, which is not used
//! until a pass accepts them).
#![allow(clippy::print_stdout)]

use std::process::ExitCode;

use crate::effects::GitSource;
use anyhow::anyhow;
use nk3_common::rollout::{
    next_action, Action, Built, Coordination, Machine, Observation, Op, Plan, Settings,
};

use crate::cli::AgentArgs;
use crate::effects::Clock as _;
use crate::reconcile::{Agent, Decision, Target};
use crate::state::{self, Outcome};

/// Prints the plan. Exit 0 when the node would be left as it is, 2 when a pass would
/// change it, 1 when it cannot tell (unreachable repository with nothing fetched, …).
pub fn run(settings: &AgentArgs) -> anyhow::Result<ExitCode> {
    let st = state::peek(&settings.state_dir)?.unwrap_or_default();
    let agent = Agent::new(settings.clone(), st)?;
    // A running agent owns the clone: plan reads it but leaves repairs to the agent. (With
    // the agent running, the remote URL the clone uses is the agent's.)
    let agent_running = state::Lock::held(&settings.state_dir);
    let (repo, _) = agent.open_source(!agent_running)?;
    let row = |k: &str, v: &str| println!("{k:<10} {v}");
    row(
        "repository",
        &format!(
            "{} (branch {})",
            agent.source().display_url(),
            settings.branch
        ),
    );
    let commit = match repo.poll() {
        Ok(head) => {
            let refused = repo.refusal(
                agent.state.fetched.as_deref(),
                &head.commit,
                settings.allow_force_push,
            );
            match refused {
                None => {
                    row("head", &head.commit);
                    head.commit
                }
                Some(r) => {
                    row("head", &format!("{} would be refused: {r}", head.commit));
                    match &agent.state.fetched {
                        Some(c) => c.clone(),
                        None => return Ok(ExitCode::FAILURE),
                    }
                }
            }
        }
        Err(e) => match &agent.state.fetched {
            Some(c) => {
                row("head", &format!("{e:#}; planning with fetched commit {c}"));
                c.clone()
            }
            None => {
                row("head", &format!("{e:#}; nothing fetched yet"));
                return Ok(ExitCode::FAILURE);
            }
        },
    };
    let decision = agent.decide(repo.as_ref(), &commit)?;
    if let Decision::UpToDate(t) | Decision::Apply { target: t, .. } = &decision {
        row(
            "node",
            &format!(
                "{} ({}), recognised {}",
                t.node,
                t.host,
                t.matched_by.describe()
            ),
        );
    }
    let diff = match &decision {
        Decision::Apply { target, diff, .. } => diff.clone().map(|d| (target.host.clone(), d)),
        _ => None,
    };
    let problems = match &decision {
        Decision::BadInventory { problems } => problems.clone(),
        _ => Vec::new(),
    };
    let (plan, target) = agent.to_plan(&commit, decision);
    let walk = preview(&agent, repo.as_ref(), plan, target.as_ref());
    for (k, v) in &walk.rows {
        row(k, v);
    }
    for p in problems {
        println!("  {p}");
    }
    if let Some((host, d)) = diff {
        println!("{host} modified:");
        print!("{d}");
    }
    Ok(walk.exit)
}

/// What `plan` prints: the decision's answer, walked as far as it goes without changing
/// anything — facts are looked at (read only), a build is supposed to give a system that
/// differs, and the walk stops at the first step that would need the cluster or change
/// the node.
struct Preview {
    /// `(key, value)` rows.
    pub rows: Vec<(&'static str, String)>,
    /// 0: the node would be left as it is; 2: a pass would change it; 1: cannot tell.
    pub exit: std::process::ExitCode,
}

fn preview(agent: &Agent, repo: &dyn GitSource, plan: Plan, target: Option<&Target>) -> Preview {
    let mut st = agent.state.clone();
    let now = crate::effects::SYSTEM_CLOCK.now();
    let mut obs = Observation::pass(now, agent.settings().poll_interval, false);
    let why = match &plan {
        Plan::Apply { why, .. } => Some(why.clone()),
        _ => None,
    };
    obs.plan = Some(plan);
    let mut rows: Vec<(&'static str, String)> = Vec::new();
    let mut changes = false;
    let host = target.map(|t| t.host.clone()).unwrap_or_default();
    for _ in 0..200 {
        let step = next_action(&st, &obs);
        if let Some(new) = step.state {
            let entered = new.phase.name() != st.phase.name();
            st = *new;
            if entered {
                obs.entered();
            }
        }
        match step.action {
            Action::Finish { outcome, .. } => {
                let msg = st
                    .last
                    .as_ref()
                    .map(|l| l.message.clone())
                    .unwrap_or_default();
                let exit = match outcome {
                    Outcome::NoChange | Outcome::Rejected => ExitCode::SUCCESS,
                    _ if changes => ExitCode::from(2),
                    Outcome::Waiting | Outcome::Frozen => ExitCode::SUCCESS,
                    _ => ExitCode::FAILURE,
                };
                if changes {
                    rows.push(("switch", format!("wait: {msg}")));
                } else {
                    rows.push(("plan", msg));
                }
                return Preview { rows, exit };
            }
            Action::LookMachine => {
                obs.machine = Some(Machine {
                    boot_id: agent.nixos().boot_id().unwrap_or_default(),
                    current: agent.nixos().current(),
                    previous_saved: agent.previous_path().exists(),
                });
            }
            Action::LookSettings => {
                let r = st
                    .phase
                    .commit()
                    .ok_or_else(|| anyhow!("no rollout under way"))
                    .and_then(|c| agent.inventory_at(repo, c))
                    .map(|inv| Settings::of(st.host.as_deref().unwrap_or_default(), &inv.rollout));
                obs.settings = Some(r.map_err(|e| format!("{e:#}")));
            }
            Action::LookCoordination => {
                let Some(t) = target else { break };
                let c = match agent.coordination(&t.host) {
                    Err(e) => Coordination::NoCredentials(format!("{e:#}")),
                    Ok(c) => match c.fact(|cluster| agent.access_refusal(t, cluster)) {
                        Ok((c, _)) => c,
                        Err(e) => {
                            rows.push((
                                "switch",
                                format!("under the rollout lease, once the k3s API answers ({e})"),
                            ));
                            return Preview {
                                rows,
                                exit: ExitCode::from(2),
                            };
                        }
                    },
                };
                obs.coordination = Some(c);
            }
            Action::LookRebootReasons(system) => {
                obs.reboot_reasons = Some(
                    agent
                        .nixos()
                        .reboot_reasons(&system)
                        .into_iter()
                        .map(str::to_string)
                        .collect(),
                );
            }
            // What a pass would do to the node, supposed done.
            Action::WriteToken => obs.token_written = true,
            Action::SetChannel(_) => obs.channel_set = Some(Ok(())),
            Action::SavePrevious => obs.previous_saved = true,
            Action::Land => obs.landed = true,
            Action::Restore { .. } => obs.restored = true,
            Action::Continue => {}
            Action::Build { upgrade } => {
                changes = true;
                let build = if upgrade {
                    "nixos-rebuild build --upgrade"
                } else {
                    "nixos-rebuild build"
                };
                rows.push((
                    "plan",
                    format!(
                        "{}: write configuration.nix, {build}, then switch (or reboot) if the system differs",
                        why.clone().unwrap_or_default()
                    ),
                ));
                // Supposed to differ from what runs: a build is what would tell.
                obs.built = Some(Ok(Built {
                    system: "(the system the build gives)".into(),
                    has_agent: true,
                }));
            }
            Action::Inspect(system) => {
                changes = true;
                rows.push((
                    "plan",
                    format!(
                        "{}: built before, waiting to switch to {system}",
                        why.clone().unwrap_or_default()
                    ),
                ));
                obs.built = Some(Ok(Built {
                    has_agent: agent.nixos().has_agent(&system),
                    system,
                }));
            }
            Action::Cluster(ops) if ops.iter().all(|o| matches!(o, Op::LetGo { .. })) => {
                obs.cluster_done = Some(ops);
            }
            Action::RecordApplied => obs.recorded = true,
            Action::Renew(_) => obs.renewed = true,
            Action::Switch | Action::Boot => {
                rows.push((
                    "switch",
                    format!("directly, without the rollout lease: k3s has not joined a cluster on {host} yet (bootstrap)"),
                ));
                return Preview {
                    rows,
                    exit: ExitCode::from(2),
                };
            }
            Action::LookHalt | Action::LookBlocker | Action::Acquire => {
                rows.push((
                    "switch",
                    "under the rollout lease: gate, drain, switch, verify".to_string(),
                ));
                return Preview {
                    rows,
                    exit: ExitCode::from(2),
                };
            }
            other => {
                rows.push(("next", format!("{other:?} (phase {})", st.phase.name())));
                return Preview {
                    rows,
                    exit: ExitCode::from(2),
                };
            }
        }
    }
    rows.push(("plan", "cannot tell".into()));
    Preview {
        rows,
        exit: ExitCode::FAILURE,
    }
}
