//! `nk3-agent plan`: what `run --once` would do now on this node, with the diff, changing
//! nothing on the node (it may fetch new commits into the agent's clone, which is not used
//! until a pass accepts them).
#![allow(clippy::print_stdout)]

use std::process::ExitCode;

use crate::cli::AgentArgs;
use crate::coordination::Coordination;
use crate::reconcile::{short, Agent, Decision};
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
    match agent.decide(&repo, &commit)? {
        Decision::BadInventory { problems } => {
            row(
                "plan",
                "nothing: the inventory has problems, so nothing would be applied",
            );
            for p in problems {
                println!("  {p}");
            }
            Ok(ExitCode::FAILURE)
        }
        Decision::NotANode(why) => {
            row("plan", &format!("nothing: {why}"));
            Ok(ExitCode::FAILURE)
        }
        Decision::AlreadyRejected(r) => {
            row(
                "plan",
                &format!(
                    "nothing: commit {} was rejected at {}: {}",
                    short(Some(&r.commit)),
                    r.at,
                    r.error
                ),
            );
            Ok(ExitCode::SUCCESS)
        }
        Decision::UpToDate(t) => {
            row(
                "node",
                &format!(
                    "{} ({}), recognised {}",
                    t.node,
                    t.host,
                    t.matched_by.describe()
                ),
            );
            row("plan", &format!("No action needed on {}", t.host));
            Ok(ExitCode::SUCCESS)
        }
        Decision::Apply {
            target,
            diff,
            why,
            upgrade,
        } => {
            row(
                "node",
                &format!(
                    "{} ({}), recognised {}",
                    target.node,
                    target.host,
                    target.matched_by.describe()
                ),
            );
            let build = if upgrade {
                "nixos-rebuild build --upgrade"
            } else {
                "nixos-rebuild build"
            };
            row(
                "plan",
                &format!(
                    "{why}: write configuration.nix, {build}, then switch (or reboot) if the system differs"
                ),
            );
            let how = match agent.coordination(&target.host)? {
                Coordination::Lease(cluster) => match agent.access_refusal(&target, &cluster) {
                    Ok(None) => "under the rollout lease: gate, drain, switch, verify".to_string(),
                    Ok(Some(why)) => format!("wait: {why}"),
                    Err(e) => format!("under the rollout lease, once the k3s API answers ({e})"),
                },
                Coordination::Bootstrap => format!(
                    "directly, without the rollout lease: k3s has not joined a cluster on {} yet (bootstrap)",
                    target.host
                ),
                Coordination::NoCredentials(why) => format!("wait: {why}"),
            };
            row("switch", &how);
            if let Some(d) = diff {
                println!("{} modified:", target.host);
                print!("{d}");
            }
            Ok(ExitCode::from(2))
        }
    }
}
