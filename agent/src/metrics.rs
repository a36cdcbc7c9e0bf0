//! Prometheus metrics on a local address: what the agent's state says, in the text
//! exposition format, at `/metrics`.

use std::fmt::Write as _;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;

use crate::state::{Outcome, State};

/// Counters the state file does not keep.
#[derive(Debug, Default, Clone)]
pub struct Counters {
    /// Passes run since the agent started.
    pub passes: u64,
    /// Passes that ended in an error.
    pub failures: u64,
}

/// What the endpoint serves, updated after every pass.
#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    /// The agent's state after the last pass.
    pub state: State,
    /// Counters.
    pub counters: Counters,
}

/// Shared between the daemon loop and the endpoint.
pub type Shared = Arc<Mutex<Snapshot>>;

const PHASES: [&str; 8] = [
    "idle",
    "building",
    "built",
    "draining",
    "switching",
    "rebooting",
    "verifying",
    "frozen",
];
const OUTCOMES: [(Outcome, &str); 10] = [
    (Outcome::NoChange, "no-change"),
    (Outcome::Applied, "applied"),
    (Outcome::Rebooting, "rebooting"),
    (Outcome::Rejected, "rejected"),
    (Outcome::Refused, "refused"),
    (Outcome::NotANode, "not-a-node"),
    (Outcome::Failed, "failed"),
    (Outcome::Waiting, "waiting"),
    (Outcome::RolledBack, "rolled-back"),
    (Outcome::Frozen, "frozen"),
];

/// The metrics text for a snapshot.
pub fn render(s: &Snapshot) -> String {
    let mut out = String::new();
    let st = &s.state;
    let phase = st.phase.name();
    let _ = writeln!(out, "# HELP nk3_phase Where this node is in applying a commit (1: current phase).\n# TYPE nk3_phase gauge");
    for p in PHASES {
        let _ = writeln!(out, "nk3_phase{{phase=\"{p}\"}} {}", u8::from(p == phase));
    }
    let _ = writeln!(out, "# HELP nk3_applied_commit_info The commit whose configuration this node runs.\n# TYPE nk3_applied_commit_info gauge");
    if let Some(c) = &st.applied {
        let _ = writeln!(out, "nk3_applied_commit_info{{commit=\"{}\"}} 1", label(c));
    }
    let _ = writeln!(out, "# HELP nk3_fetched_commit_info The newest commit taken from the branch.\n# TYPE nk3_fetched_commit_info gauge");
    if let Some(c) = &st.fetched {
        let _ = writeln!(out, "nk3_fetched_commit_info{{commit=\"{}\"}} 1", label(c));
    }
    let _ = writeln!(out, "# HELP nk3_last_pass_outcome How the last pass ended (1: that outcome).\n# TYPE nk3_last_pass_outcome gauge");
    let last = st.last.as_ref().map(|l| l.outcome);
    for (o, name) in OUTCOMES {
        let _ = writeln!(
            out,
            "nk3_last_pass_outcome{{outcome=\"{name}\"}} {}",
            u8::from(last == Some(o))
        );
    }
    let _ = writeln!(out, "# HELP nk3_last_pass_timestamp_seconds When the last pass ended.\n# TYPE nk3_last_pass_timestamp_seconds gauge");
    if let Some(t) = st
        .last
        .as_ref()
        .and_then(|l| humantime::parse_rfc3339(&l.at).ok())
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
    {
        let _ = writeln!(out, "nk3_last_pass_timestamp_seconds {}", t.as_secs());
    }
    let _ = writeln!(out, "# HELP nk3_commit_rejected 1 while the branch's head is a commit this node rejected.\n# TYPE nk3_commit_rejected gauge");
    let rejected = st
        .rejected
        .as_ref()
        .is_some_and(|r| Some(&r.commit) == st.fetched.as_ref());
    let _ = writeln!(out, "nk3_commit_rejected {}", u8::from(rejected));
    let _ = writeln!(out, "# HELP nk3_repository_reachable 0 while the repository cannot be reached.\n# TYPE nk3_repository_reachable gauge");
    let _ = writeln!(
        out,
        "nk3_repository_reachable {}",
        u8::from(st.source_problem.is_none())
    );
    let _ = writeln!(
        out,
        "# HELP nk3_lease_held 1 while this node holds the rollout lease.\n# TYPE nk3_lease_held gauge"
    );
    let _ = writeln!(
        out,
        "nk3_lease_held {}",
        u8::from(st.phase.hold().is_some())
    );
    let _ = writeln!(
        out,
        "# HELP nk3_last_rollout_duration_seconds How long this node's last disruption held the lease.\n# TYPE nk3_last_rollout_duration_seconds gauge"
    );
    if let Some(secs) = st.last_rollout_seconds {
        let _ = writeln!(out, "nk3_last_rollout_duration_seconds {secs}");
    }
    let _ = writeln!(
        out,
        "# HELP nk3_passes_total Passes since the agent started.\n# TYPE nk3_passes_total counter"
    );
    let _ = writeln!(out, "nk3_passes_total {}", s.counters.passes);
    let _ = writeln!(out, "# HELP nk3_pass_errors_total Passes that ended in an error since the agent started.\n# TYPE nk3_pass_errors_total counter");
    let _ = writeln!(out, "nk3_pass_errors_total {}", s.counters.failures);
    out
}

fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Serves `/metrics` on `listener` until the runtime ends.
pub async fn serve(listener: TcpListener, shared: Shared) {
    loop {
        let Ok((mut conn, _)) = listener.accept().await else {
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let mut n = 0;
            // Read the request head (bounded); only the request line matters.
            while n < buf.len() {
                match tokio::time::timeout(
                    std::time::Duration::from_secs(5),
                    conn.read(&mut buf[n..]),
                )
                .await
                {
                    Ok(Ok(0)) | Err(_) | Ok(Err(_)) => break,
                    Ok(Ok(k)) => n += k,
                }
                if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
            let head = String::from_utf8_lossy(&buf[..n]);
            let response = match head.split_whitespace().take(2).collect::<Vec<_>>()[..] {
                ["GET", "/metrics"] => {
                    let snapshot = shared.lock().map(|s| s.clone()).unwrap_or_default();
                    let body = render(&snapshot);
                    format!("HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len())
                }
                _ => "HTTP/1.1 404 Not Found\r\nContent-Length: 24\r\nConnection: close\r\n\r\nmetrics are at /metrics\n".to_string(),
            };
            let _ = conn.write_all(response.as_bytes()).await;
            let _ = conn.shutdown().await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nk3_common::state::{LastResult, Phase};

    #[test]
    fn metrics_show_phase_commit_and_outcome() {
        let mut s = Snapshot::default();
        s.state.applied = Some("abc".into());
        s.state.fetched = Some("def".into());
        s.state.phase = Phase::Building {
            commit: "def".into(),
            had_previous: true,
            upgrade: false,
        };
        s.state.last = Some(LastResult {
            outcome: Outcome::Rejected,
            commit: Some("def".into()),
            message: "x".into(),
            at: "2026-11-23T10:00:00Z".into(),
        });
        s.counters.passes = 7;
        s.state.last_rollout_seconds = Some(42);
        let text = render(&s);
        for want in [
            "nk3_phase{phase=\"building\"} 1",
            "nk3_phase{phase=\"idle\"} 0",
            "nk3_applied_commit_info{commit=\"abc\"} 1",
            "nk3_last_pass_outcome{outcome=\"rejected\"} 1",
            "nk3_last_pass_outcome{outcome=\"applied\"} 0",
            "nk3_last_pass_timestamp_seconds 1795428000",
            "nk3_passes_total 7",
            "nk3_last_rollout_duration_seconds 42",
            "nk3_lease_held 0",
            "nk3_repository_reachable 1",
        ] {
            assert!(text.contains(want), "missing {want}:\n{text}");
        }
    }
}
