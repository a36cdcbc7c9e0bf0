//! Every external command the agent runs, bounded by a timeout, with three typed outcomes: it
//! could not start, it exited unsuccessfully, or it ran out of time (and was killed, with all
//! it started: each command runs in a process group of its own). While one runs the agent
//! says it is making progress (see `progress`), for as long as the command is within its
//! bound.

use std::io::Read as _;
use std::os::unix::process::CommandExt as _;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// How a command did not succeed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// It could not be started (no such program, not executable).
    NotStarted,
    /// It exited unsuccessfully, or a signal ended it.
    Exited,
    /// It did not finish in time and was stopped.
    TimedOut,
}

/// A command that did not succeed, with the end of what it printed.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{command} failed ({status}): {tail}")]
pub struct CommandFailed {
    /// The command line, for people.
    pub command: String,
    /// Which way it failed.
    pub failure: Failure,
    /// How it ended, for people.
    pub status: String,
    /// Its last lines of output (error lines first).
    pub tail: String,
}

/// How many lines of a failing command's output are kept.
const TAIL_LINES: usize = 12;

/// Runs `cmd` for at most `timeout`; its output when it succeeds.
pub fn run(mut cmd: Command, timeout: Duration) -> Result<Output, CommandFailed> {
    let line = describe(&cmd);
    let failed = |failure, status: String, tail: String| CommandFailed {
        command: line.clone(),
        failure,
        status,
        tail,
    };
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = cmd
        .spawn()
        .map_err(|e| failed(Failure::NotStarted, "not started".into(), e.to_string()))?;
    // Read both pipes while waiting, so a chatty command never blocks on a full pipe.
    let pipe = |p: Option<Box<dyn std::io::Read + Send>>| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = p {
                let _ = p.read_to_end(&mut buf);
            }
            let _ = tx.send(buf);
        });
        rx
    };
    // What a pipe gave, waiting a moment at most: a process the command left behind may
    // hold it open (it was killed with the group, but only the kernel says when it is gone).
    let collect = |rx: std::sync::mpsc::Receiver<Vec<u8>>| {
        rx.recv_timeout(Duration::from_secs(2)).unwrap_or_default()
    };
    let pgid = nix::unistd::Pid::from_raw(child.id() as i32);
    // Nothing the command started outlives it: `sh -c 'sleep 3600 & exit 0'` would keep
    // its pipes, and the agent, waiting.
    let kill_group = || {
        let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
    };
    let out = pipe(child.stdout.take().map(|p| Box::new(p) as _));
    let err = pipe(child.stderr.take().map(|p| Box::new(p) as _));
    let start = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Some(s),
            Ok(None) if start.elapsed() >= timeout => break None,
            Ok(None) => {
                crate::progress::beat();
                std::thread::sleep(
                    Duration::from_millis(50).min(timeout / 4 + Duration::from_millis(1)),
                );
            }
            Err(e) => return Err(failed(Failure::Exited, "lost".into(), e.to_string())),
        }
    };
    kill_group();
    let Some(status) = status else {
        // The whole group went: nixos-rebuild's nix, a check's children.
        let _ = child.wait();
        let output = Output {
            status: std::os::unix::process::ExitStatusExt::from_raw(0),
            stdout: collect(out),
            stderr: collect(err),
        };
        return Err(failed(
            Failure::TimedOut,
            format!(
                "did not finish within {}; stopped",
                humantime::format_duration(timeout)
            ),
            tail(&output),
        ));
    };
    let output = Output {
        status,
        stdout: collect(out),
        stderr: collect(err),
    };
    if status.success() {
        Ok(output)
    } else {
        Err(failed(Failure::Exited, status.to_string(), tail(&output)))
    }
}

/// The lines that explain a failure: Nix's `error:` lines and what follows them, else the
/// last lines.
pub fn tail(out: &Output) -> String {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim_end)
        .filter(|l| !l.is_empty())
        .collect();
    let start = lines
        .iter()
        .position(|l| l.trim_start().starts_with("error:"))
        .unwrap_or(lines.len().saturating_sub(TAIL_LINES));
    let end = (start + TAIL_LINES).min(lines.len());
    lines[start..end].join(" | ")
}

/// The command line, for people.
pub fn describe(cmd: &Command) -> String {
    let mut s = std::path::Path::new(cmd.get_program())
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Command {
        let mut c = Command::new("sh");
        c.args(["-c", script]);
        c
    }

    #[test]
    fn three_outcomes_and_the_output() {
        let ok = run(sh("echo hi"), Duration::from_secs(10)).unwrap();
        assert_eq!(ok.stdout, b"hi\n");
        let e = run(sh("echo 'error: no' >&2; exit 3"), Duration::from_secs(10)).unwrap_err();
        assert_eq!(e.failure, Failure::Exited);
        assert_eq!(e.tail, "error: no");
        let e = run(
            Command::new("/nonexistent/nixos-rebuild"),
            Duration::from_secs(1),
        )
        .unwrap_err();
        assert_eq!(e.failure, Failure::NotStarted);
    }

    #[test]
    fn a_command_that_leaves_a_process_behind_does_not_keep_the_agent_waiting() {
        let started = Instant::now();
        let ok = run(sh("sleep 3600 & echo done"), Duration::from_secs(60)).unwrap();
        assert_eq!(ok.stdout, b"done\n");
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{:?}",
            started.elapsed()
        );
    }

    #[test]
    fn a_command_that_never_returns_is_stopped_with_what_it_started() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("pid");
        let started = Instant::now();
        let e = run(
            sh(&format!(
                "sleep 1000 & echo $! > {}; wait",
                pid_file.display()
            )),
            Duration::from_millis(500),
        )
        .unwrap_err();
        assert_eq!(e.failure, Failure::TimedOut);
        assert!(started.elapsed() < Duration::from_secs(10));
        assert!(e.to_string().contains("did not finish within 500ms"), "{e}");
        // The grandchild went with it.
        let pid: i32 = std::fs::read_to_string(&pid_file)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        std::thread::sleep(Duration::from_millis(200));
        // Gone, or a zombie nobody has reaped yet (in a container without an init).
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let state = stat.rsplit_once(") ").map(|(_, r)| r.chars().next());
        assert!(
            matches!(state, None | Some(Some('Z'))),
            "sleep {pid} still runs: {stat}"
        );
    }
}
