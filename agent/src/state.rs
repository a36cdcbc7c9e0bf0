//! What the agent remembers between passes and across crashes: `state.json` in the state
//! directory, and the lock that keeps a second agent away from it.
//!
//! The phase is written (atomically: temporary file, fsync, rename, fsync of the directory)
//! before each side effect, so that a kill at any point and a restart resume where the agent
//! was, without repeating a disruptive step blindly and without forgetting one.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::Context as _;
use fs2::FileExt;
use serde::{Deserialize, Serialize};

/// The state file's format version; a file of another version is set aside, not misread.
pub const VERSION: u32 = 1;

/// Where a node is in applying a commit.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "name", rename_all = "kebab-case")]
pub enum Phase {
    /// Nothing under way.
    #[default]
    Idle,
    /// The previous configuration.nix is saved; the new one is being written and built.
    /// Interrupted here, the previous file is put back and the pass starts over.
    Building {
        /// The commit being built.
        commit: String,
        /// Whether there was a configuration.nix before (else restoring removes the new one).
        had_previous: bool,
        /// Whether the build follows the channel (`--upgrade`).
        upgrade: bool,
    },
    /// The build succeeded; the system is being checked and, if it differs, switched to.
    Built {
        /// The commit built.
        commit: String,
        /// The built system's store path.
        system: String,
    },
    /// `nixos-rebuild switch` (or `boot`, before a reboot) is running.
    Switching {
        /// The commit being switched to.
        commit: String,
        /// The system being switched to.
        system: String,
        /// Whether the switch waits for a reboot (`nixos-rebuild boot` then reboot).
        reboot: bool,
    },
    /// A reboot was asked for; a new boot id means it happened.
    Rebooting {
        /// The commit the reboot brings up.
        commit: String,
        /// The system the reboot brings up.
        system: String,
        /// The boot id before the reboot.
        boot_id: String,
    },
}

impl Phase {
    /// A short name for logs and status.
    pub fn name(&self) -> &'static str {
        match self {
            Phase::Idle => "idle",
            Phase::Building { .. } => "building",
            Phase::Built { .. } => "built",
            Phase::Switching { .. } => "switching",
            Phase::Rebooting { .. } => "rebooting",
        }
    }

    /// The commit being applied, if any.
    pub fn commit(&self) -> Option<&str> {
        match self {
            Phase::Idle => None,
            Phase::Building { commit, .. }
            | Phase::Built { commit, .. }
            | Phase::Switching { commit, .. }
            | Phase::Rebooting { commit, .. } => Some(commit),
        }
    }
}

/// How a pass ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// The node already ran what the commit declares.
    NoChange,
    /// A new configuration was built and switched to.
    Applied,
    /// The machine is rebooting into the new configuration.
    Rebooting,
    /// The commit's configuration was refused (Nix error, or it would remove the agent).
    Rejected,
    /// The commit could not be used (bad inventory, refused head, bad signature).
    Refused,
    /// This machine is not a node of the inventory.
    NotANode,
    /// Something failed that a later pass may get past (repository unreachable, command
    /// failed).
    Failed,
}

/// The last pass's result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastResult {
    /// How it ended.
    pub outcome: Outcome,
    /// The commit it was about.
    pub commit: Option<String>,
    /// One line for people.
    pub message: String,
    /// When (RFC 3339).
    pub at: String,
}

/// A commit whose configuration Nix refused. It is not built again; a new commit is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejected {
    /// The commit.
    pub commit: String,
    /// The error's text (the end of the Nix output).
    pub error: String,
    /// When (RFC 3339).
    pub at: String,
}

/// Everything in `state.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct State {
    /// Format version.
    pub version: u32,
    /// The repository the commits come from.
    pub repository: Option<String>,
    /// This machine's node key and hostname, as last identified.
    pub node: Option<String>,
    /// The node's hostname.
    pub host: Option<String>,
    /// The newest commit accepted from the branch (the base for the fast-forward check).
    pub fetched: Option<String>,
    /// The commit whose configuration this node runs.
    pub applied: Option<String>,
    /// The system store path that commit built.
    pub applied_system: Option<String>,
    /// Where the node is in applying a commit.
    pub phase: Phase,
    /// The last pass's result.
    pub last: Option<LastResult>,
    /// The last commit Nix refused.
    pub rejected: Option<Rejected>,
    /// The current problem reaching the repository, reported once when it starts.
    pub source_problem: Option<String>,
    /// Why the branch's head is not taken (rewritten branch, bad signature), reported once.
    pub refused_head: Option<String>,
    /// The channel `nixos` was last set to.
    pub channel: Option<String>,
    /// When the last `--upgrade` build succeeded (RFC 3339).
    pub last_upgrade: Option<String>,
    /// When the next poll is due (RFC 3339).
    pub next_poll: Option<String>,
}

impl Default for State {
    fn default() -> Self {
        State {
            version: VERSION,
            repository: None,
            node: None,
            host: None,
            fetched: None,
            applied: None,
            applied_system: None,
            phase: Phase::Idle,
            last: None,
            rejected: None,
            source_problem: None,
            refused_head: None,
            channel: None,
            last_upgrade: None,
            next_poll: None,
        }
    }
}

/// The current time in RFC 3339, to the second.
pub fn now() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

/// The state file in `dir`.
pub fn path(dir: &Path) -> PathBuf {
    dir.join("state.json")
}

/// What reading the state file found.
#[derive(Debug)]
pub enum Loaded {
    /// No state file: a new node.
    Fresh(State),
    /// The file as written.
    Read(State),
    /// The file could not be read as state; it was moved to the path given, and the agent
    /// starts fresh. (Fresh is safe: the running system is never touched without a build.)
    SetAside(State, PathBuf, String),
}

/// Reads the state; unreadable state is moved aside (never deleted) and reported.
pub fn load(dir: &Path) -> anyhow::Result<Loaded> {
    let file = path(dir);
    let text = match fs::read(&file) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Ok(Loaded::Fresh(State::default()))
        }
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", file.display())),
    };
    let problem = match serde_json::from_slice::<State>(&text) {
        Ok(s) if s.version == VERSION => return Ok(Loaded::Read(s)),
        Ok(s) => format!(
            "it is of format version {}, this agent reads {VERSION}",
            s.version
        ),
        Err(e) => e.to_string(),
    };
    let aside = dir.join(format!(
        "state.json.unreadable-{}",
        humantime::format_rfc3339_seconds(SystemTime::now())
    ));
    fs::rename(&file, &aside)
        .with_context(|| format!("cannot move unreadable {} aside", file.display()))?;
    Ok(Loaded::SetAside(State::default(), aside, problem))
}

/// Reads the state without moving anything (for `status` and `plan`).
pub fn peek(dir: &Path) -> anyhow::Result<Option<State>> {
    let file = path(dir);
    match fs::read(&file) {
        Ok(t) => serde_json::from_slice(&t)
            .map(Some)
            .with_context(|| format!("{} is not readable state", file.display())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", file.display())),
    }
}

/// Writes the state durably: temporary file, fsync, rename over the old one, fsync of the
/// directory. A crash leaves either the old or the new state, never a mix.
pub fn save(dir: &Path, state: &State) -> anyhow::Result<()> {
    let mut text = serde_json::to_vec_pretty(state).context("cannot serialise state")?;
    text.push(b'\n');
    write_atomic(&path(dir), &text, 0o600)
}

/// Replaces `file` with `bytes` atomically and durably, with the given mode.
pub fn write_atomic(file: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let dir = file.parent().unwrap_or(Path::new("."));
    let name = file.file_name().map(|n| n.to_string_lossy().into_owned());
    let tmp = dir.join(format!(".{}.nk3-tmp", name.unwrap_or_default()));
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    // The mode given to open() is filtered by the umask; set it exactly.
    fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(mode))
        .with_context(|| format!("cannot set the mode of {}", tmp.display()))?;
    fs::rename(&tmp, file).with_context(|| format!("cannot replace {}", file.display()))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot sync {}", dir.display()))?;
    Ok(())
}

/// The lock that makes an agent the only one working on a state directory. Held until
/// dropped (or the process dies: the kernel releases it, so a kill -9 leaves no stale lock).
#[derive(Debug)]
pub struct Lock {
    _file: File,
}

impl Lock {
    /// Takes the lock, or says which process holds it.
    pub fn take(dir: &Path) -> anyhow::Result<Lock> {
        fs::create_dir_all(dir)
            .with_context(|| format!("cannot create state directory {}", dir.display()))?;
        let file_path = dir.join("lock");
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&file_path)
            .with_context(|| format!("cannot open {}", file_path.display()))?;
        if FileExt::try_lock_exclusive(&file).is_err() {
            let holder = fs::read_to_string(&file_path).unwrap_or_default();
            anyhow::bail!(
                "another nk3-agent (pid {}) is already working on {}; only one may run",
                holder.trim(),
                dir.display()
            );
        }
        file.set_len(0)
            .and_then(|()| writeln!(file, "{}", std::process::id()))
            .with_context(|| format!("cannot write {}", file_path.display()))?;
        Ok(Lock { _file: file })
    }

    /// Whether some process holds the lock on `dir` now (for `status`).
    pub fn held(dir: &Path) -> bool {
        match File::open(dir.join("lock")) {
            Ok(f) => match FileExt::try_lock_shared(&f) {
                Ok(()) => {
                    let _ = FileExt::unlock(&f);
                    false
                }
                Err(_) => true,
            },
            Err(_) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips_and_survives_a_rewrite() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(load(dir.path()).unwrap(), Loaded::Fresh(_)));
        let mut s = State {
            applied: Some("abc".into()),
            ..State::default()
        };
        s.phase = Phase::Switching {
            commit: "abc".into(),
            system: "/nix/store/x".into(),
            reboot: true,
        };
        save(dir.path(), &s).unwrap();
        match load(dir.path()).unwrap() {
            Loaded::Read(r) => assert_eq!(r, s),
            other => panic!("{other:?}"),
        }
        let mode = fs::metadata(path(dir.path())).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
    }

    #[test]
    fn unreadable_state_is_set_aside_not_lost() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(path(dir.path()), "{ truncated").unwrap();
        match load(dir.path()).unwrap() {
            Loaded::SetAside(s, aside, why) => {
                assert_eq!(s, State::default());
                assert_eq!(fs::read_to_string(aside).unwrap(), "{ truncated");
                assert!(!why.is_empty());
            }
            other => panic!("{other:?}"),
        }
        assert!(!path(dir.path()).exists());
    }

    #[test]
    fn a_second_lock_is_refused_with_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let _first = Lock::take(dir.path()).unwrap();
        let err = Lock::take(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains(&format!("pid {}", std::process::id())),
            "{err}"
        );
    }
}
