//! What the agent remembers between passes and across crashes: `state.json` in the state
//! directory, and the lock that keeps a second agent away from it.
//!
//! The phase is written (atomically: temporary file, fsync, rename, fsync of the directory)
//! before each side effect, so that a kill at any point and a restart resume where the agent
//! was, without repeating a disruptive step blindly and without forgetting one.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::DirBuilderExt as _;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::Context as _;
use fs2::FileExt;

pub use nk3_common::state::{LeaseSeen, Outcome, Phase, Rejected, State, VERSION};

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
    // A name no earlier copy has: two corrupt files within one second keep both.
    let stamp = humantime::format_rfc3339_seconds(SystemTime::now());
    let aside = (0..)
        .map(|n| match n {
            0 => dir.join(format!("state.json.unreadable-{stamp}")),
            n => dir.join(format!("state.json.unreadable-{stamp}.{n}")),
        })
        .find(|p| p.symlink_metadata().is_err())
        .expect("an unused name");
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
        // Made here (outside the module, which has systemd make it 0700), it is the
        // agent's alone too: the clone, the join token and the backups live in it.
        if !dir.exists() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .with_context(|| format!("cannot create state directory {}", dir.display()))?;
        }
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
            hold: Some(nk3_common::state::Hold {
                lease: "nk3-rollout".into(),
                was_unschedulable: true,
                ready_before: vec!["a".into(), "b".into()],
                since: Some("2026-11-23T10:00:00Z".into()),
            }),
            rollback: Some("k3s.service is not active".into()),
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
    fn two_corrupt_state_files_in_one_second_are_both_kept() {
        let dir = tempfile::tempdir().unwrap();
        let mut kept = Vec::new();
        for text in ["{ first", "{ second", "{ third"] {
            fs::write(path(dir.path()), text).unwrap();
            match load(dir.path()).unwrap() {
                Loaded::SetAside(_, aside, _) => kept.push(aside),
                other => panic!("{other:?}"),
            }
        }
        let texts: Vec<String> = kept
            .iter()
            .map(|p| fs::read_to_string(p).unwrap())
            .collect();
        assert_eq!(texts, ["{ first", "{ second", "{ third"]);
    }

    #[test]
    fn a_state_directory_the_agent_makes_is_its_own() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("var/lib/nk3-agent");
        let _lock = Lock::take(&state).unwrap();
        let mode = fs::metadata(&state).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
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
