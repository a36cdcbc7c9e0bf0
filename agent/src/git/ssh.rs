//! git over SSH through the system's `ssh`: the agent runs `ssh … git-upload-pack '<path>'`
//! and speaks git's protocol over its stdin and stdout, as `git fetch` does.
//!
//! OpenSSH does the host-key checking (known_hosts, hashed or not, `@revoked`,
//! `@cert-authority`), the key handling and the ciphers; nothing of it is in the agent, and
//! no SSH or crypto library is loaded into it.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::os::fd::AsFd as _;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use git2::transport::{Service, SmartSubtransport, SmartSubtransportStream};

use super::transport::{other, Settings};

/// Where an SSH repository URL points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The login name, when the URL names one.
    pub user: Option<String>,
    /// The host (an IPv6 address without its brackets).
    pub host: String,
    /// The port, when the URL names one.
    pub port: Option<u16>,
    /// The repository's path as the server's `git-upload-pack` takes it: absolute, or
    /// `~/…` and `~user/…` relative to a home directory.
    pub path: String,
}

/// Reads `ssh://[user@]host[:port]/path` (also `ssh+git://`, `git+ssh://`) and git's
/// scp-like `[user@]host:path`.
pub fn parse(url: &str) -> Result<Target, String> {
    let bad = |why: &str| format!("cannot use {url} as an SSH repository: {why}");
    let scheme = ["ssh://", "ssh+git://", "git+ssh://"]
        .iter()
        .find_map(|s| url.strip_prefix(s));
    let (authority, path) = match scheme {
        Some(rest) => {
            let (authority, path) = rest.split_at(rest.find('/').ok_or_else(|| bad("no path"))?);
            let path = percent_encoding::percent_decode_str(path)
                .decode_utf8()
                .map_err(|_| bad("the path is not UTF-8"))?;
            // `ssh://host/~/repo` names `~/repo`, as git reads it.
            let path = match path.strip_prefix("/~") {
                Some(rest) => format!("~{rest}"),
                None => path.into_owned(),
            };
            (authority, path)
        }
        None => {
            // scp-like: the host ends at the first ':' outside brackets, before any '/'.
            let end = if url.contains("@[") || url.starts_with('[') {
                url.find("]:").map(|i| i + 1)
            } else {
                url.find(':')
            }
            .filter(|&i| !url[..i].contains('/'))
            .ok_or_else(|| bad("not an ssh:// URL nor host:path"))?;
            (&url[..end], url[end + 1..].to_string())
        }
    };
    let (user, hostport) = match authority.rsplit_once('@') {
        Some((u, h)) => (
            Some(
                percent_encoding::percent_decode_str(u)
                    .decode_utf8_lossy()
                    .into_owned(),
            ),
            h,
        ),
        None => (None, authority),
    };
    let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
        let (host, rest) = v6.split_once(']').ok_or_else(|| bad("unclosed '['"))?;
        (host, rest.strip_prefix(':'))
    } else if scheme.is_some() {
        match hostport.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (hostport, None),
        }
    } else {
        (hostport, None)
    };
    let port = match port {
        Some(p) => Some(
            p.parse::<u16>()
                .map_err(|_| bad("the port is not a number"))?,
        ),
        None => None,
    };
    // A host or user starting with '-' would be read by ssh as an option.
    if host.is_empty() || host.starts_with('-') {
        return Err(bad("no host, or one starting with '-'"));
    }
    if user
        .as_deref()
        .is_some_and(|u| u.is_empty() || u.starts_with('-'))
    {
        return Err(bad("an empty user, or one starting with '-'"));
    }
    if path.is_empty() || path.contains('\0') {
        return Err(bad("no path"));
    }
    Ok(Target {
        user,
        host: host.to_string(),
        port,
        path,
    })
}

/// The arguments `ssh` is run with to fetch from `t`: no prompt ever (a daemon has no one
/// to ask), the host key must be known, and only the configured key is offered.
pub fn argv(settings: &Settings, t: &Target) -> Vec<OsString> {
    let mut a: Vec<OsString> = Vec::new();
    let mut opt = |o: String| {
        a.push("-o".into());
        a.push(o.into());
    };
    opt("BatchMode=yes".into());
    opt("StrictHostKeyChecking=yes".into());
    opt(format!(
        "ConnectTimeout={}",
        settings.timeout.as_secs().max(1)
    ));
    opt("LogLevel=ERROR".into());
    if let Some(known) = &settings.access.known_hosts {
        // ssh reads the value as a list of files, expanding `%` and `~`: one, quoted.
        opt(format!(
            "UserKnownHostsFile=\"{}\"",
            literal(&known.display().to_string())
        ));
        opt("GlobalKnownHostsFile=/dev/null".into());
    }
    if let Some(key) = &settings.access.ssh_key_file {
        opt("IdentitiesOnly=yes".into());
        a.push("-i".into());
        a.push(literal(&key.display().to_string()).into());
    }
    if let Some(port) = t.port {
        a.push("-p".into());
        a.push(port.to_string().into());
    }
    if let Some(user) = &t.user {
        a.push("-l".into());
        a.push(user.into());
    }
    a.push("--".into());
    a.push(t.host.clone().into());
    a.push(format!("git-upload-pack {}", quote(&t.path)).into());
    a
}

/// A path as ssh takes it literally: its `%` tokens escaped.
fn literal(path: &str) -> String {
    path.replace('%', "%%")
}

/// `s` as one word for the remote shell.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The SSH subtransport. Not stateless: git2 asks for a stream for the listing only, and
/// the fetch that follows goes on over it (one `ssh` process for both).
pub struct Ssh {
    settings: Settings,
}

impl Ssh {
    pub fn new(settings: Settings) -> Ssh {
        Ssh { settings }
    }
}

impl SmartSubtransport for Ssh {
    fn action(
        &self,
        url: &str,
        action: Service,
    ) -> Result<Box<dyn SmartSubtransportStream>, git2::Error> {
        match action {
            Service::UploadPackLs => {
                let target = parse(url).map_err(|e| git2::Error::from_str(&e))?;
                Ok(Box::new(Process::start(&self.settings, &target)?))
            }
            Service::UploadPack => Err(git2::Error::from_str(
                "ssh: a fetch without the listing's connection",
            )),
            Service::ReceivePackLs | Service::ReceivePack => {
                Err(git2::Error::from_str("nk3 only fetches; it never pushes"))
            }
        }
    }

    fn close(&self) -> Result<(), git2::Error> {
        Ok(())
    }
}

/// A running `ssh`: every read waits at most the git timeout, and dropping it kills it.
struct Process {
    child: Child,
    stdin: ChildStdin,
    stdout: ChildStdout,
    stderr: Arc<Mutex<Vec<u8>>>,
    /// Says when ssh's stderr has closed (all it said is in `stderr`).
    stderr_closed: std::sync::mpsc::Receiver<()>,
    host: String,
    timeout: Duration,
}

/// How much of ssh's stderr is kept for the error message.
const STDERR_KEPT: usize = 2048;

impl Process {
    fn start(settings: &Settings, t: &Target) -> Result<Process, git2::Error> {
        let mut cmd = Command::new(&settings.ssh);
        cmd.args(argv(settings, t))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // No askpass helper and no agent of whoever started the daemon.
            .env_remove("SSH_ASKPASS")
            .env_remove("SSH_AUTH_SOCK")
            .env_remove("DISPLAY");
        let mut child = cmd.spawn().map_err(|e| {
            git2::Error::from_str(&format!(
                "cannot run {} to reach {}: {e}",
                settings.ssh.display(),
                t.host
            ))
        })?;
        let (Some(stdin), Some(stdout), Some(mut err)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(git2::Error::from_str("ssh: no pipes"));
        };
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let kept = stderr.clone();
        let (closed, stderr_closed) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("ssh-stderr".into())
            .spawn(move || {
                let mut buf = [0u8; 512];
                while let Ok(n) = err.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    let mut k = kept.lock().unwrap_or_else(|e| e.into_inner());
                    k.extend_from_slice(&buf[..n]);
                    let over = k.len().saturating_sub(STDERR_KEPT);
                    k.drain(..over);
                }
                let _ = closed.send(());
            })
            .map_err(|e| {
                let _ = child.kill();
                let _ = child.wait();
                git2::Error::from_str(&format!("ssh: {e}"))
            })?;
        Ok(Process {
            child,
            stdin,
            stdout,
            stderr,
            stderr_closed,
            host: t.host.clone(),
            timeout: settings.timeout,
        })
    }

    /// Why ssh ended, once it has: its status and the last of what it printed.
    fn ended(&mut self) -> Option<String> {
        // ssh closes stdout and stderr as it exits; what it said may still be on the way.
        let _ = self.stderr_closed.recv_timeout(Duration::from_secs(2));
        let mut status = None;
        for _ in 0..200 {
            status = self.child.try_wait().ok().flatten();
            if status.is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let status = status?;
        if status.success() {
            return None;
        }
        let err = self.stderr.lock().unwrap_or_else(|e| e.into_inner());
        let said = last_lines(&String::from_utf8_lossy(&err));
        Some(format!(
            "ssh to {} failed ({status}){}{said}",
            self.host,
            if said.is_empty() { "" } else { ": " }
        ))
    }
}

/// The last lines ssh printed, where it says why (its banners and advice come before).
fn last_lines(text: &str) -> String {
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('@') && !l.starts_with("remove with"))
        .collect();
    lines[lines.len().saturating_sub(2)..].join(" | ")
}

impl Read for Process {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let mut fds = [nix::poll::PollFd::new(
            self.stdout.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        let wait =
            nix::poll::PollTimeout::try_from(self.timeout).unwrap_or(nix::poll::PollTimeout::MAX);
        let ready = loop {
            match nix::poll::poll(&mut fds, wait) {
                Err(nix::errno::Errno::EINTR) => continue,
                r => break r.map_err(std::io::Error::from)?,
            }
        };
        if ready == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "no answer from {} over ssh within {}",
                    self.host,
                    humantime::format_duration(self.timeout)
                ),
            ));
        }
        let n = self.stdout.read(buf)?;
        if n == 0 {
            if let Some(why) = self.ended() {
                return Err(other(why));
            }
        }
        Ok(n)
    }
}

impl Write for Process {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.stdin.write(buf).map_err(|e| match self.ended() {
            Some(why) => other(why),
            None => e,
        })
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.stdin.flush()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(user: Option<&str>, host: &str, port: Option<u16>, path: &str) -> Target {
        Target {
            user: user.map(str::to_string),
            host: host.into(),
            port,
            path: path.into(),
        }
    }

    #[test]
    fn ssh_urls_and_scp_like_paths() {
        let cases = [
            (
                "ssh://git@git.example.com/infra.git",
                t(Some("git"), "git.example.com", None, "/infra.git"),
            ),
            (
                "ssh://git@host:2222/srv/infra.git",
                t(Some("git"), "host", Some(2222), "/srv/infra.git"),
            ),
            (
                "ssh://[fd00::1]:2200/x",
                t(None, "fd00::1", Some(2200), "/x"),
            ),
            ("git+ssh://h/~/r.git", t(None, "h", None, "~/r.git")),
            ("ssh+git://h/~ops/r.git", t(None, "h", None, "~ops/r.git")),
            (
                "ssh://h/cluster%20a.git",
                t(None, "h", None, "/cluster a.git"),
            ),
            (
                "git@git.example.com:infra/cluster.git",
                t(Some("git"), "git.example.com", None, "infra/cluster.git"),
            ),
            ("host:/srv/r.git", t(None, "host", None, "/srv/r.git")),
            (
                "git@[fd00::1]:r.git",
                t(Some("git"), "fd00::1", None, "r.git"),
            ),
        ];
        for (url, want) in cases {
            assert_eq!(parse(url).as_ref(), Ok(&want), "{url}");
        }
        for bad in [
            "ssh://-oProxyCommand=x/r",
            "ssh://-oProxyCommand=x@h/r",
            "-oProxyCommand=x:r",
            "ssh://h",
            "ssh://h:99999/r",
            "ssh:///r",
            "./relative/path",
            "h:",
        ] {
            let e = parse(bad).unwrap_err();
            assert!(e.contains(bad), "{e}");
        }
    }

    fn settings(key: bool, known: bool) -> Settings {
        Settings {
            access: super::super::Access {
                ssh_key_file: key.then(|| "/etc/nk3/deploy key%h".into()),
                known_hosts: known.then(|| "/etc/nk3/known hosts".into()),
                ..Default::default()
            },
            timeout: Duration::from_secs(60),
            ssh: "ssh".into(),
        }
    }

    fn words(a: &[OsString]) -> Vec<String> {
        a.iter().map(|s| s.to_string_lossy().into_owned()).collect()
    }

    /// What every ssh the agent runs is told: never prompt, know the host, bound the wait.
    const ALWAYS: [&str; 8] = [
        "-o",
        "BatchMode=yes",
        "-o",
        "StrictHostKeyChecking=yes",
        "-o",
        "ConnectTimeout=60",
        "-o",
        "LogLevel=ERROR",
    ];

    #[test]
    fn ssh_is_run_without_prompts_and_with_the_configured_key_only() {
        let a = words(&argv(
            &settings(true, true),
            &t(Some("git"), "git.example.com", Some(2222), "/srv/it's.git"),
        ));
        let rest = [
            "-o",
            // One file, though its name has a space.
            "UserKnownHostsFile=\"/etc/nk3/known hosts\"",
            "-o",
            "GlobalKnownHostsFile=/dev/null",
            "-o",
            "IdentitiesOnly=yes",
            "-i",
            // `%h` is the key's name, not the host's.
            "/etc/nk3/deploy key%%h",
            "-p",
            "2222",
            "-l",
            "git",
            "--",
            "git.example.com",
            r"git-upload-pack '/srv/it'\''s.git'",
        ];
        assert_eq!(a, [&ALWAYS[..], &rest[..]].concat());
        // Without settings, ssh's own known_hosts files and keys, still never a prompt.
        let plain = words(&argv(&settings(false, false), &t(None, "h", None, "~/r")));
        let rest = ["--", "h", "git-upload-pack '~/r'"];
        assert_eq!(plain, [&ALWAYS[..], &rest[..]].concat());
    }
}
