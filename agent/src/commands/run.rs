//! `nk3-agent run`: the daemon. Polls the repository and reconciles the node, one pass at a
//! time, until stopped.

use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use tracing::{error, info};

use crate::cli::RunArgs;
use crate::reconcile::Agent;
use crate::state::{self, Loaded, Outcome};

/// Runs passes until SIGTERM or SIGINT (or one pass with `--once`).
pub fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
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
        return Ok(match outcome {
            Some(Outcome::NoChange | Outcome::Applied | Outcome::Rebooting) => ExitCode::SUCCESS,
            _ => ExitCode::FAILURE,
        });
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .enable_io()
        .build()?;
    let code = rt.block_on(daemon(agent));
    // A pass still running on its thread is abandoned, not awaited: state.json says where it
    // was, and the next start resumes from there.
    rt.shutdown_background();
    code
}

/// One pass; an error is logged (with the phase it left) rather than ending the daemon.
fn pass(agent: &mut Agent) -> Option<Outcome> {
    match agent.pass() {
        Ok(o) => Some(o),
        Err(e) => {
            let host = agent
                .state
                .host
                .clone()
                .unwrap_or_else(|| "this machine".into());
            error!(host = %host, commit = %crate::reconcile::short(agent.state.fetched.as_deref()), "pass failed in phase {}: {e:#}", agent.state.phase.name());
            None
        }
    }
}

async fn daemon(mut agent: Agent) -> anyhow::Result<ExitCode> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    info!(
        "nk3-agent {} following {} branch {} every {}",
        env!("CARGO_PKG_VERSION"),
        agent.state.repository.as_deref().unwrap_or("?"),
        agent.settings().branch,
        humantime::format_duration(agent.settings().poll_interval)
    );
    loop {
        // git2 and the commands block: each pass runs on a blocking thread, so the runtime
        // stays free for signals (and, later, the lease watch).
        let work = tokio::task::spawn_blocking(move || {
            pass(&mut agent);
            agent
        });
        tokio::select! {
            done = work => agent = done?,
            _ = term.recv() => return Ok(stopped("SIGTERM")),
            _ = int.recv() => return Ok(stopped("SIGINT")),
        }
        let wait = with_jitter(agent.settings().poll_interval);
        agent.state.next_poll =
            Some(humantime::format_rfc3339_seconds(SystemTime::now() + wait).to_string());
        if let Err(e) = state::save(&agent.settings().state_dir, &agent.state) {
            error!("{e:#}");
        }
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = term.recv() => return Ok(stopped("SIGTERM")),
            _ = int.recv() => return Ok(stopped("SIGINT")),
        }
    }
}

fn stopped(signal: &str) -> ExitCode {
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
