//! `nk3-agent plan`: what `run --once` would do now on this node, with the diff, changing
//! nothing on the node (it may fetch new commits into the agent's clone, which is not used
//! until a pass accepts them).
#![allow(clippy::print_stdout)]

use std::process::ExitCode;

use crate::cli::AgentArgs;
use crate::reconcile::{Agent, Decision};
use crate::state;

/// Prints the plan. Exit 0 when the node would be left as it is, 2 when a pass would
/// change it, 1 when it cannot tell (unreachable repository with nothing fetched, …).
pub fn run(settings: &AgentArgs) -> anyhow::Result<ExitCode> {
    let st = state::peek(&settings.state_dir)?.unwrap_or_default();
    let agent = Agent::new(settings.clone(), st)?;
    // A running agent owns the clone: plan reads it but leaves repairs to the agent. (With
    // the agent running, the remote URL the clone uses is the agent's.)
    let agent_running = state::Lock::held(&settings.state_dir);
    let (repo, _) = agent.source().open(!agent_running)?;
    let row = |k: &str, v: &str| println!("{k:<10} {v}");
    row(
        "repository",
        &format!(
            "{} (branch {})",
            agent.source().display_url(),
            settings.branch
        ),
    );
    let commit = match agent.source().poll(&repo) {
        Ok(head) => {
            let mut refused = None;
            if let (Some(old), false) = (&agent.state.fetched, settings.allow_force_push) {
                refused = agent
                    .source()
                    .check_fast_forward(&repo, old, &head.commit)
                    .err();
            }
            if refused.is_none() && agent.signers().required() {
                refused = agent
                    .source()
                    .check_signature(agent.signers(), &head.commit)
                    .err();
            }
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
    let decision = agent.decide(&repo, &commit)?;
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
    let walk = crate::runner::preview(&agent, &repo, plan, target.as_ref());
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
