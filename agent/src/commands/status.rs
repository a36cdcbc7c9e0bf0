//! `nk3-agent status`: what this node is, what it runs, and how its last pass went, from
//! `state.json` (readable while the daemon runs) and the machine itself.
#![allow(clippy::print_stdout)]

use std::process::ExitCode;

use serde::Serialize;
use sysinfo::System;

use crate::cli::StatusArgs;
use crate::reconcile::short;
use crate::state::{self, State};

/// Facts about the machine.
#[derive(Debug, Serialize)]
struct HostFacts {
    hostname: Option<String>,
    kernel: Option<String>,
    os: Option<String>,
    uptime_seconds: u64,
    boot_time: String,
    memory_total_bytes: u64,
    memory_used_bytes: u64,
}

/// What `status --json` prints.
#[derive(Debug, Serialize)]
struct Report<'a> {
    state_dir: String,
    running: bool,
    state: Option<&'a State>,
    host: HostFacts,
    #[serde(skip_serializing_if = "Option::is_none")]
    cluster: Option<&'a crate::cluster::Overview>,
}

/// Prints the status; exit 1 when the last pass failed or a commit was refused.
pub fn run(args: &StatusArgs) -> anyhow::Result<ExitCode> {
    let dir = &args.agent.state_dir;
    let st = state::peek(dir)?;
    let running = state::Lock::held(dir);
    let host = host_facts();
    let cluster = if args.cluster {
        let me = st
            .as_ref()
            .and_then(|s| s.host.clone())
            .unwrap_or_else(|| host.hostname.clone().unwrap_or_default());
        let lease = args.agent.lease.rollout_lease();
        match crate::cluster::Cluster::connect(&args.agent.kubeconfig, &me)?
            .map(|c| c.with_lease(lease))
        {
            Some(c) => Some(c.overview(st.as_ref().and_then(|s| s.lease_slots).unwrap_or(1))?),
            None => anyhow::bail!(
                "no kubeconfig at {}: this node is not part of a cluster yet (or pass --kubeconfig)",
                args.agent.kubeconfig.display()
            ),
        }
    } else {
        None
    };
    if args.json {
        let report = Report {
            state_dir: dir.display().to_string(),
            running,
            state: st.as_ref(),
            host,
            cluster: cluster.as_ref(),
        };
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_human(dir, running, st.as_ref(), &host);
        if let Some(o) = &cluster {
            print_cluster(o);
        }
    }
    // A refused head (force-push, unsigned) leaves the node on its commit but is not fine.
    let refused = st.as_ref().is_some_and(|s| s.refused_head.is_some());
    let healthy = !refused
        && st.as_ref().and_then(|s| s.last.as_ref()).is_none_or(|l| {
            matches!(
                l.outcome,
                state::Outcome::NoChange | state::Outcome::Applied | state::Outcome::Rebooting
            )
        });
    Ok(if healthy {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn print_human(dir: &std::path::Path, running: bool, st: Option<&State>, host: &HostFacts) {
    let row = |k: &str, v: &str| println!("{k:<12} {v}");
    row(
        "agent",
        if running {
            "running"
        } else {
            "not running (no process holds the state lock)"
        },
    );
    match st {
        None => row(
            "state",
            &format!(
                "none yet in {}: the agent has not finished a pass",
                dir.display()
            ),
        ),
        Some(s) => {
            let node = match (&s.node, &s.host) {
                (Some(n), Some(h)) => format!("{n} ({h})"),
                _ => "not identified yet".to_string(),
            };
            row("node", &node);
            row("repository", s.repository.as_deref().unwrap_or("?"));
            row("fetched", s.fetched.as_deref().unwrap_or("none"));
            row("applied", s.applied.as_deref().unwrap_or("none"));
            let phase = match s.phase.commit() {
                Some(c) => format!("{} (commit {})", s.phase.name(), short(Some(c))),
                None => s.phase.name().to_string(),
            };
            row("phase", &phase);
            if let Some(l) = &s.last {
                row(
                    "last pass",
                    &format!("{} at {}: {}", outcome_word(l.outcome), l.at, l.message),
                );
            }
            if let Some(r) = &s.rejected {
                row(
                    "rejected",
                    &format!("commit {} at {}: {}", short(Some(&r.commit)), r.at, r.error),
                );
            }
            if let Some(p) = &s.source_problem {
                row("repository", &format!("problem: {p}"));
            }
            if let Some(p) = &s.refused_head {
                row("refused", p);
            }
            if let Some(c) = &s.channel {
                let when = s.last_upgrade.as_deref().unwrap_or("never");
                row("channel", &format!("{c} (last upgrade {when})"));
            }
            if let Some(n) = &s.next_poll {
                row("next poll", n);
            }
        }
    }
    row(
        "host",
        &format!(
            "{} · kernel {} · up {} (since {}) · memory {} of {} MiB used",
            host.hostname.as_deref().unwrap_or("?"),
            host.kernel.as_deref().unwrap_or("?"),
            humantime::format_duration(std::time::Duration::from_secs(host.uptime_seconds)),
            host.boot_time,
            host.memory_used_bytes / (1024 * 1024),
            host.memory_total_bytes / (1024 * 1024),
        ),
    );
}

fn print_cluster(o: &crate::cluster::Overview) {
    println!();
    println!(
        "{:<40} {:<9} {:<9} {:<13} phase",
        "node", "ready", "cordoned", "commit"
    );
    for n in &o.nodes {
        println!(
            "{:<40} {:<9} {:<9} {:<13} {}",
            n.name,
            if n.ready { "Ready" } else { "NotReady" },
            if n.cordoned { "yes" } else { "no" },
            short(n.applied_commit.as_deref()),
            n.phase.as_deref().unwrap_or("-")
        );
    }
    for (lease, holder) in &o.leases {
        println!("lease {lease}: {}", holder.as_deref().unwrap_or("free"));
    }
    if let Some((commit, node, reason)) = &o.halted {
        match &o.halt_lifted_by {
            None => println!("HALTED commit {} by {node}: {reason}", short(Some(commit))),
            Some(by) => println!(
                "halted commit {} by {node}: {reason} (lifted: the newer commit {} got through)",
                short(Some(commit)),
                short(Some(by))
            ),
        }
    }
    for e in &o.halted_earlier {
        println!(
            "halted earlier: commit {} by {}: {}",
            short(Some(&e.commit)),
            e.node,
            e.reason
        );
    }
}

fn outcome_word(o: state::Outcome) -> &'static str {
    use state::Outcome::*;
    match o {
        NoChange => "no change",
        Applied => "applied",
        Rebooting => "rebooting",
        Rejected => "rejected",
        Refused => "refused",
        NotANode => "not a node",
        Failed => "failed",
        Waiting => "waiting",
        RolledBack => "rolled back",
        Frozen => "FROZEN",
    }
}

fn host_facts() -> HostFacts {
    let mut sys = System::new();
    sys.refresh_memory();
    let boot = std::time::UNIX_EPOCH + std::time::Duration::from_secs(System::boot_time());
    HostFacts {
        hostname: System::host_name(),
        kernel: System::kernel_version(),
        os: System::long_os_version(),
        uptime_seconds: System::uptime(),
        boot_time: humantime::format_rfc3339_seconds(boot).to_string(),
        memory_total_bytes: sys.total_memory(),
        memory_used_bytes: sys.used_memory(),
    }
}
