//! `nk3-agent run`: the daemon. Polls the repository and reconciles the node, one pass at a
//! time, until stopped. Under systemd it reports readiness and its status, and feeds the
//! watchdog (`Type=notify`, `WatchdogSec=`).
#![allow(clippy::print_stdout)]

use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sd_notify::NotifyState;
use tracing::{error, info, warn};

use crate::cli::{AgentArgs, RunArgs};
use crate::metrics;
use crate::reconcile::{short, Agent};
use crate::state::{self, Loaded, Outcome};

/// Runs passes until SIGTERM or SIGINT (or one pass with `--once`).
pub fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    if args.check {
        return check(&args);
    }
    let settings = args.agent;
    crate::logging::init(settings.log_level);
    // The lock is held for the life of the process: a second agent refuses to start.
    let _lock = state::Lock::take(&settings.state_dir)?;
    let loaded = state::load(&settings.state_dir)?;
    let st = match loaded {
        Loaded::Fresh(s) | Loaded::Read(s) => s,
        Loaded::SetAside(s, aside, why) => {
            error!(
                "state.json could not be read ({why}); it was moved to {} and the agent starts afresh",
                aside.display()
            );
            s
        }
    };
    let mut agent = Agent::new(settings, st)?;
    if args.once {
        agent.report_idle = true;
        let outcome = pass(&mut agent);
        // A refused head (force-push, unsigned) keeps the node on its commit: a failure.
        let refused = agent.state.refused_head.is_some();
        return Ok(match outcome {
            Some(Outcome::NoChange | Outcome::Applied | Outcome::Rebooting) if !refused => {
                ExitCode::SUCCESS
            }
            _ => ExitCode::FAILURE,
        });
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .enable_io()
        .build()?;
    let code = rt.block_on(daemon(agent, args.metrics_address));
    // A pass still running on its thread is abandoned, not awaited: state.json says where it
    // was, and the next start resumes from there.
    rt.shutdown_background();
    code
}

/// `run --check`: the settings as the agent understood them, as JSON.
fn check(args: &RunArgs) -> anyhow::Result<ExitCode> {
    let a: &AgentArgs = &args.agent;
    if a.repo.is_none() {
        anyhow::bail!("no repository: pass --repo URL or set NK3_REPO");
    }
    let path = |p: &Option<std::path::PathBuf>| p.as_ref().map(|p| p.display().to_string());
    let v = serde_json::json!({
        "repo": a.repo.as_deref().map(nk3_common::render::redact_url),
        "branch": a.branch,
        "inventory_path": a.inventory_path,
        "poll_interval": humantime::format_duration(a.poll_interval).to_string(),
        "git_timeout": humantime::format_duration(a.git_timeout).to_string(),
        "state_dir": a.state_dir.display().to_string(),
        "nixos_dir": a.nixos_dir.display().to_string(),
        "node": a.node,
        "kubeconfig": a.kubeconfig.display().to_string(),
        "k3s_data_dir": a.k3s_data_dir.display().to_string(),
        "nixos_rebuild": a.nixos_rebuild.display().to_string(),
        "build_timeout": humantime::format_duration(a.build_timeout).to_string(),
        "switch_timeout": humantime::format_duration(a.switch_timeout).to_string(),
        "systemctl": a.systemctl.display().to_string(),
        "nix_channel": a.nix_channel.display().to_string(),
        "git": a.git.display().to_string(),
        "kubectl": a.kubectl.display().to_string(),
        "current_system": a.current_system.display().to_string(),
        "booted_system": a.booted_system.display().to_string(),
        "boot_id_file": a.boot_id_file.display().to_string(),
        "ssh_key_file": path(&a.ssh_key_file),
        "known_hosts": path(&a.known_hosts),
        "repo_token_file": path(&a.repo_token_file),
        "allowed_signers": path(&a.allowed_signers),
        "gpg_home": path(&a.gpg_home),
        "allow_force_push": a.allow_force_push,
        "log_level": a.log_level.to_string().to_lowercase(),
        "metrics_address": args.metrics_address.map(|m| m.to_string()),
        "product_uuid_file": a.machine.product_uuid_file.display().to_string(),
        "route_table": a.machine.route_table.display().to_string(),
        "route6_table": a.machine.route6_table.display().to_string(),
    });
    println!("{}", serde_json::to_string_pretty(&v)?);
    Ok(ExitCode::SUCCESS)
}

/// One pass; an error is logged (with the phase it left) rather than ending the daemon.
fn pass(agent: &mut Agent) -> Option<Outcome> {
    crate::progress::pass_started();
    let result = agent.pass();
    crate::progress::pass_ended();
    crate::memory::give_back();
    match result {
        Ok(o) => Some(o),
        Err(e) => {
            let host = agent
                .state
                .host
                .clone()
                .unwrap_or_else(|| "this machine".into());
            error!(host = %host, commit = %short(agent.state.fetched.as_deref()), "pass failed in phase {}: {e:#}", agent.state.phase.name());
            None
        }
    }
}

/// Tells systemd something; outside systemd (no NOTIFY_SOCKET) this does nothing.
fn notify(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(false, states) {
        warn!("cannot notify systemd: {e}");
    }
}

async fn daemon(
    mut agent: Agent,
    metrics_address: Option<std::net::SocketAddr>,
) -> anyhow::Result<ExitCode> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let shared: metrics::Shared = Arc::new(Mutex::new(metrics::Snapshot {
        state: agent.state.clone(),
        counters: metrics::Counters::default(),
    }));
    if let Some(addr) = metrics_address {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| anyhow::anyhow!("cannot serve metrics on {addr}: {e}"))?;
        info!("metrics at http://{addr}/metrics");
        tokio::spawn(metrics::serve(listener, shared.clone()));
    }
    // Feed systemd's watchdog at half its interval, but only while the pass gets on (see
    // `progress`): a pass stalled where no timeout reaches stops the feeding, and systemd
    // restarts the agent, which resumes from state.json.
    let mut usec = 0;
    if sd_notify::watchdog_enabled(false, &mut usec) && usec > 0 {
        let every = Duration::from_micros(usec / 2);
        // Stop feeding only when the stall nears the whole WatchdogSec: slow but working
        // steps (a git server taking its time to answer) are not stalls.
        let limit = Duration::from_micros(usec / 4 * 3);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            let mut told = false;
            loop {
                tick.tick().await;
                match crate::progress::stalled_for() {
                    Some(d) if d >= limit => {
                        if !told {
                            error!("the pass has made no progress for {}; no longer feeding systemd's watchdog, which restarts the agent (state.json says where it was)", humantime::format_duration(d));
                            told = true;
                        }
                    }
                    _ => {
                        told = false;
                        notify(&[NotifyState::Watchdog]);
                    }
                }
            }
        });
    }
    info!(
        "nk3-agent {} following {} branch {} every {}",
        env!("CARGO_PKG_VERSION"),
        agent.state.repository.as_deref().unwrap_or("?"),
        agent.settings().branch,
        humantime::format_duration(agent.settings().poll_interval)
    );
    notify(&[
        NotifyState::Ready,
        NotifyState::Status(&status_line(&agent)),
    ]);
    loop {
        // git2 and the commands block: each pass runs on a blocking thread, so the runtime
        // stays free for signals, the watchdog and the metrics endpoint.
        let work = tokio::task::spawn_blocking(move || {
            let outcome = pass(&mut agent);
            (agent, outcome)
        });
        let outcome;
        tokio::select! {
            done = work => (agent, outcome) = done?,
            _ = term.recv() => return Ok(stopped("SIGTERM")),
            _ = int.recv() => return Ok(stopped("SIGINT")),
        }
        let wait = with_jitter(agent.settings().poll_interval);
        agent.state.next_poll =
            Some(humantime::format_rfc3339_seconds(crate::clock::wall(wait)).to_string());
        if let Err(e) = state::save(&agent.settings().state_dir, &agent.state) {
            error!("{e:#}");
        }
        if let Ok(mut s) = shared.lock() {
            s.state = agent.state.clone();
            s.counters.passes += 1;
            if outcome.is_none() {
                s.counters.failures += 1;
            }
        }
        notify(&[NotifyState::Status(&status_line(&agent))]);
        // Until the next poll, watch the rollout Lease for a nudge (when this node is part
        // of a cluster), so that a push announced with `nk3-agent nudge` is fetched at once.
        let kubeconfig = agent.settings().kubeconfig.clone();
        let host = agent
            .state
            .host
            .clone()
            .unwrap_or_else(|| "nk3-agent".into());
        // A node waiting for its turn also wakes when the lease is released, so the next
        // node starts within moments of the last one finishing.
        // Only a node waiting for the lease itself: one the gate stopped waits for its
        // next poll, or waiting nodes would hand the lease back and forth at once.
        let waiting = agent.waiting_for_lease;
        let lease = agent.settings().lease.rollout_lease();
        let nudge = tokio::task::spawn_blocking(move || {
            match crate::cluster::Cluster::connect(&kubeconfig, &host)
                .map(|c| c.map(|c| c.with_lease(lease)))
            {
                Ok(Some(c)) => c.wait_for_nudge(wait, waiting).ok().flatten(),
                _ => None,
            }
        });
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            Ok(Some(why)) = nudge => info!("{why}: going on now"),
            _ = term.recv() => return Ok(stopped("SIGTERM")),
            _ = int.recv() => return Ok(stopped("SIGINT")),
        }
    }
}

/// The line `systemctl status nk3-agent` shows.
fn status_line(agent: &Agent) -> String {
    let st = &agent.state;
    let mut line = format!(
        "{}, applied {}",
        st.phase.name(),
        short(st.applied.as_deref())
    );
    if let Some(l) = &st.last {
        line.push_str(&format!("; last pass: {}", l.message));
    }
    line.chars().filter(|c| *c != '\n').take(200).collect()
}

fn stopped(signal: &str) -> ExitCode {
    notify(&[NotifyState::Stopping]);
    info!("stopping on {signal}; state.json records where the node is");
    ExitCode::SUCCESS
}

/// The poll interval plus a random part of up to a tenth of it, so that the nodes of a
/// cluster do not all poll the repository at the same moment.
fn with_jitter(interval: Duration) -> Duration {
    use std::hash::{BuildHasher as _, Hasher as _};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    let fraction = (h.finish() % 1000) as f64 / 10_000.0;
    interval + interval.mul_f64(fraction)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_within_a_tenth() {
        let base = Duration::from_secs(60);
        let waits: Vec<Duration> = (0..50).map(|_| with_jitter(base)).collect();
        assert!(waits.iter().all(|w| *w >= base && *w < base + base / 10));
        assert!(waits.iter().any(|w| *w != waits[0]), "jitter varies");
    }
}
