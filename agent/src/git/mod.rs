//! The git source: a bare clone of the repository in the state directory, brought to the
//! branch's head on every poll.
//!
//! Only the files the agent needs are read, straight from the commit's tree, so there is no
//! work tree to get out of step. Everything here blocks; the daemon calls it from a blocking
//! thread.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use git2::{AutotagOption, Direction, FetchOptions, Oid, RemoteCallbacks, Repository};

mod http;
mod ssh;
mod transport;

pub use transport::register as register_transports;

/// Bounds libgit2's network waits to `timeout` (connecting, and each wait for the server
/// during a fetch, over git://; the agent's own transports take theirs from
/// [`Source::timeout`]), so a server that accepts a connection and then hangs cannot stall the
/// agent forever. Call before any other thread starts.
#[allow(unsafe_code)]
pub fn set_timeouts(timeout: std::time::Duration) {
    let ms = i32::try_from(timeout.as_millis())
        .unwrap_or(i32::MAX)
        .max(1);
    // SAFETY: these write libgit2 globals without synchronisation; main() calls this first,
    // before the runtime or any other thread exists.
    let result = unsafe {
        git2::opts::set_server_connect_timeout_in_milliseconds(ms)
            .and_then(|()| git2::opts::set_server_timeout_in_milliseconds(ms))
    };
    if let Err(e) = result {
        tracing::warn!("cannot bound git's network timeouts: {}", e.message());
    }
}

/// The largest file the agent reads from the repository (the inventory's own bound).
pub const MAX_FILE: usize = nk3_common::yaml::MAX_BYTES;

/// How to reach and trust the repository.
#[derive(Debug, Clone, Default)]
pub struct Access {
    /// SSH private key for ssh:// URLs.
    pub ssh_key_file: Option<PathBuf>,
    /// known_hosts file; when set, an SSH server's key must be listed in it (and only
    /// there); unset, ssh's own files (`~/.ssh/known_hosts`, `/etc/ssh/ssh_known_hosts`).
    pub known_hosts: Option<PathBuf>,
    /// File holding an HTTPS token.
    pub token_file: Option<PathBuf>,
    /// A password that was in the repository URL: used as the HTTPS credential, never kept
    /// in the clone's config (set by [`Source::new`]).
    pub url_password: Option<nk3_common::inventory::Secret>,
}

/// Who may sign the commits the agent applies.
#[derive(Debug, Clone, Default)]
pub struct Signers {
    /// SSH allowed-signers file.
    pub allowed_signers: Option<PathBuf>,
    /// GnuPG home with the allowed keys.
    pub gpg_home: Option<PathBuf>,
    /// The git program that verifies signatures.
    pub git: PathBuf,
}

impl Signers {
    /// Whether commits must be signed.
    pub fn required(&self) -> bool {
        self.allowed_signers.is_some() || self.gpg_home.is_some()
    }
}

/// The local clone of the repository.
#[derive(Debug, Clone)]
pub struct Source {
    url: String,
    branch: String,
    dir: PathBuf,
    access: Access,
    /// The longest a fetch may take as a whole.
    pub whole_fetch: Duration,
    /// The longest wait to connect, and for each answer.
    pub timeout: Duration,
    /// The ssh program, for ssh:// and host:path repositories.
    pub ssh: PathBuf,
}

/// What a poll found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    /// The branch's head commit on the remote.
    pub commit: String,
    /// Whether it had to be fetched (it was not in the clone yet).
    pub fetched: bool,
}

/// Why a head is not used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The branch was rewritten.
    #[error("branch {branch} was rewritten: {new} does not descend from {old}, which this node already took; refusing it (set --allow-force-push to follow rewrites)")]
    Rewritten {
        /// Branch name.
        branch: String,
        /// The commit taken before.
        old: String,
        /// The new head.
        new: String,
    },
    /// The head is not signed by an allowed key.
    #[error("commit {commit} is not signed by an allowed key: {detail}")]
    Unsigned {
        /// The commit.
        commit: String,
        /// What git said.
        detail: String,
    },
}

impl Source {
    /// A source for `url`'s `branch`, cloned into `dir` (created on first use).
    pub fn new(url: &str, branch: &str, dir: &Path, mut access: Access) -> Source {
        // `https://user:password@host/…`: the clone's config (world-readable files in a
        // directory that may not be) keeps `https://user@host/…`; the password is given to
        // the server through the credential callback.
        let mut url = url.to_string();
        if let Ok(mut u) = reqwest::Url::parse(&url) {
            if let Some(password) = u.password() {
                let password = percent_encoding::percent_decode_str(password).decode_utf8_lossy();
                access.url_password = Some(nk3_common::inventory::Secret::new(password));
                if u.set_password(None).is_ok() {
                    url = u.to_string();
                }
            }
        }
        Source {
            url,
            branch: branch.to_string(),
            dir: dir.to_path_buf(),
            access,
            whole_fetch: Duration::from_secs(600),
            timeout: Duration::from_secs(60),
            ssh: PathBuf::from("ssh"),
        }
    }

    /// The clone's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Opens the clone, creating it, or re-creating it when it is broken and `repair` is
    /// set (only the agent that holds the state lock repairs). The second value says why an
    /// existing clone was replaced.
    pub fn open(&self, repair: bool) -> anyhow::Result<(Repository, Option<String>)> {
        let mut replaced = None;
        if self.dir.exists() {
            match Repository::open_bare(&self.dir).and_then(|r| check_health(&r).map(|()| r)) {
                Ok(repo) => {
                    if repair {
                        self.point_at_url(&repo)?;
                    }
                    return Ok((repo, None));
                }
                Err(e) if !repair => {
                    bail!(
                        "the clone in {} is broken ({}); the agent will clone again on its next pass",
                        self.dir.display(),
                        e.message()
                    )
                }
                Err(e) => {
                    replaced = Some(e.message().to_string());
                    std::fs::remove_dir_all(&self.dir).with_context(|| {
                        format!("cannot remove broken clone {}", self.dir.display())
                    })?;
                }
            }
        }
        let repo = Repository::init_bare(&self.dir)
            .with_context(|| format!("cannot create clone in {}", self.dir.display()))?;
        self.point_at_url(&repo)?;
        Ok((repo, replaced))
    }

    fn point_at_url(&self, repo: &Repository) -> anyhow::Result<()> {
        match repo.find_remote("origin") {
            Ok(r) if r.url() == Some(self.url.as_str()) => Ok(()),
            Ok(_) => repo
                .remote_set_url("origin", &self.url)
                .context("cannot set the clone's remote"),
            Err(_) => repo
                .remote("origin", &self.url)
                .map(|_| ())
                .context("cannot add the clone's remote"),
        }
    }

    fn tracking_ref(&self) -> String {
        format!("refs/remotes/origin/{}", self.branch)
    }

    /// Asks the remote for the branch's head and fetches it if the clone lacks it. A poll
    /// with nothing new transfers only the remote's list of refs.
    pub fn poll(&self, repo: &Repository) -> anyhow::Result<Head> {
        let wanted = format!("refs/heads/{}", self.branch);
        let mut remote = repo.find_remote("origin")?;
        let _scope = transport::scope(transport::Settings {
            access: self.access.clone(),
            timeout: self.timeout,
            ssh: self.ssh.clone(),
        });
        let head = {
            let conn = remote
                .connect_auth(Direction::Fetch, Some(self.callbacks()), None)
                .map_err(|e| self.failed("reach", &e))?;
            let list = conn.list().map_err(|e| self.failed("list", &e))?;
            list.iter()
                .find(|h| h.name() == wanted)
                .map(|h| h.oid())
                .ok_or_else(|| anyhow!("{} has no branch {}", self.display_url(), self.branch))?
        };
        if repo.find_commit(head).is_ok() {
            repo.reference(&self.tracking_ref(), head, true, "nk3: head already here")?;
            return Ok(Head {
                commit: head.to_string(),
                fetched: false,
            });
        }
        let mut opts = FetchOptions::new();
        // --git-timeout bounds each read; the fetch as a whole may take ten of them, so a
        // server trickling a byte at a time does not hold the pass forever.
        let mut cb = self.callbacks();
        let until = crate::clock::deadline(self.whole_fetch);
        cb.transfer_progress(move |_| {
            crate::progress::beat();
            std::time::Instant::now() < until
        });
        opts.remote_callbacks(cb);
        opts.download_tags(AutotagOption::None);
        let refspec = format!("+{wanted}:{}", self.tracking_ref());
        remote
            .fetch(&[refspec.as_str()], Some(&mut opts), Some("nk3: fetch"))
            .map_err(|e| self.failed("fetch", &e))?;
        let got = repo.refname_to_id(&self.tracking_ref())?;
        if got != head {
            bail!(
                "{} moved while fetching ({} then {}); will try again",
                self.display_url(),
                head,
                got
            );
        }
        Ok(Head {
            commit: head.to_string(),
            fetched: true,
        })
    }

    /// Whether `new` may follow `old` on the branch: same, or a descendant.
    pub fn check_fast_forward(
        &self,
        repo: &Repository,
        old: &str,
        new: &str,
    ) -> Result<(), Refusal> {
        if old == new {
            return Ok(());
        }
        let refused = || Refusal::Rewritten {
            branch: self.branch.clone(),
            old: old.to_string(),
            new: new.to_string(),
        };
        let (Ok(o), Ok(n)) = (Oid::from_str(old), Oid::from_str(new)) else {
            return Err(refused());
        };
        // A commit no longer in the clone (re-cloned since) is not on the branch any more:
        // the branch was rewritten.
        match repo.graph_descendant_of(n, o) {
            Ok(true) => Ok(()),
            _ => Err(refused()),
        }
    }

    /// Checks the commit's signature against the allowed signers with `git verify-commit`.
    pub fn check_signature(&self, signers: &Signers, commit: &str) -> Result<(), Refusal> {
        let mut cmd = Command::new(&signers.git);
        cmd.arg("--git-dir").arg(&self.dir);
        if let Some(f) = &signers.allowed_signers {
            cmd.arg("-c")
                .arg(format!("gpg.ssh.allowedSignersFile={}", f.display()));
        }
        if let Some(home) = &signers.gpg_home {
            cmd.env("GNUPGHOME", home);
        }
        cmd.args(["verify-commit", "--", commit]);
        let unsigned = |detail: String| Refusal::Unsigned {
            commit: commit.to_string(),
            detail,
        };
        match crate::command::run(cmd, Duration::from_secs(60)) {
            Ok(_) => Ok(()),
            Err(e) if e.failure == crate::command::Failure::Exited => Err(unsigned(
                e.tail
                    .rsplit(" | ")
                    .next()
                    .filter(|l| !l.is_empty())
                    .unwrap_or("no signature")
                    .to_string(),
            )),
            Err(e) => Err(unsigned(e.to_string())),
        }
    }

    /// A file of the commit's tree, or `None` when the commit has no such file.
    pub fn read(repo: &Repository, commit: &str, path: &str) -> anyhow::Result<Option<Vec<u8>>> {
        let oid = Oid::from_str(commit)?;
        let tree = repo.find_commit(oid)?.tree()?;
        let entry = match tree.get_path(Path::new(path)) {
            Ok(e) => e,
            Err(e) if e.code() == git2::ErrorCode::NotFound => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        if entry.kind() != Some(git2::ObjectType::Blob) {
            return Err(anyhow!("{path} is not a file at commit {commit}"));
        }
        // The size from the object's header, before anything is inflated: a highly
        // compressible blob of gigabytes is a few kilobytes in the pack.
        let (size, _) = repo.odb()?.read_header(entry.id())?;
        if size > MAX_FILE {
            return Err(anyhow!(
                "{path} at commit {} is {size} bytes; files nk3 reads (inventory, templates) may be at most {MAX_FILE} bytes",
                &commit[..commit.len().min(12)]
            ));
        }
        let blob = entry
            .to_object(repo)?
            .into_blob()
            .map_err(|_| anyhow!("{path} is not a file at commit {commit}"))?;
        Ok(Some(blob.content().to_vec()))
    }

    /// libgit2's message for a failed `what`, with any credentials of the URL taken out.
    fn failed(&self, what: &str, e: &git2::Error) -> anyhow::Error {
        let url = self.display_url();
        anyhow!(
            "cannot {what} {url}: {}",
            e.message().replace(&self.url, &url)
        )
    }

    /// The URL without credentials, for messages.
    pub fn display_url(&self) -> String {
        nk3_common::render::redact_url(&self.url)
    }

    fn callbacks(&self) -> RemoteCallbacks<'_> {
        let mut cb = RemoteCallbacks::new();
        cb.sideband_progress(|_| {
            crate::progress::beat();
            true
        });
        cb
    }
}

/// An open clone, with who may sign: the agent's [`crate::effects::GitSource`].
pub struct OpenClone {
    source: Source,
    signers: Signers,
    repo: Repository,
}

impl std::fmt::Debug for OpenClone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenClone")
            .field("url", &self.source.display_url())
            .field("dir", &self.source.dir)
            .finish()
    }
}

impl OpenClone {
    /// Opens `source`'s clone (see [`Source::open`]); the second value says why a broken
    /// clone was replaced.
    pub fn open(
        source: &Source,
        signers: &Signers,
        repair: bool,
    ) -> anyhow::Result<(OpenClone, Option<String>)> {
        let (repo, replaced) = source.open(repair)?;
        Ok((
            OpenClone {
                source: source.clone(),
                signers: signers.clone(),
                repo,
            },
            replaced,
        ))
    }
}

impl crate::effects::GitSource for OpenClone {
    fn poll(&self) -> anyhow::Result<Head> {
        self.source.poll(&self.repo)
    }

    fn refusal(&self, old: Option<&str>, new: &str, allow_force_push: bool) -> Option<Refusal> {
        let rewritten = match old {
            Some(old) if !allow_force_push => {
                self.source.check_fast_forward(&self.repo, old, new).err()
            }
            _ => None,
        };
        rewritten.or_else(|| {
            self.signers
                .required()
                .then(|| self.source.check_signature(&self.signers, new).err())
                .flatten()
        })
    }

    fn read(&self, commit: &str, path: &str) -> anyhow::Result<Option<Vec<u8>>> {
        Source::read(&self.repo, commit, path)
    }

    fn descends(&self, a: &str, b: &str) -> Option<bool> {
        let (Ok(a), Ok(b)) = (Oid::from_str(a), Oid::from_str(b)) else {
            return None;
        };
        if self.repo.find_commit(a).is_err() || self.repo.find_commit(b).is_err() {
            return None;
        }
        self.repo.graph_descendant_of(a, b).ok()
    }

    fn display_url(&self) -> String {
        self.source.display_url()
    }
}

/// Checks that the object database answers for the branch refs it has.
fn check_health(repo: &Repository) -> Result<(), git2::Error> {
    for r in repo.references()? {
        let r = r?;
        if let Some(oid) = r.target() {
            repo.find_commit(oid)?.tree()?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_password_in_the_url_stays_out_of_the_clone() {
        let dir = tempfile::tempdir().unwrap();
        let src = Source::new(
            "https://ci:s3cret@git.example.com/infra.git",
            "main",
            &dir.path().join("repo"),
            Access::default(),
        );
        let (repo, _) = src.open(true).unwrap();
        let config = std::fs::read_to_string(repo.path().join("config")).unwrap();
        assert!(!config.contains("s3cret"), "{config}");
        assert!(
            config.contains("https://ci@git.example.com/infra.git"),
            "{config}"
        );
        assert_eq!(
            src.access.url_password.as_ref().map(|p| p.expose()),
            Some("s3cret"),
            "given to the server as the credential"
        );
        let encoded = Source::new(
            "https://ci:p%40ss%2Fw@git.example.com/infra.git",
            "main",
            &dir.path().join("other"),
            Access::default(),
        );
        assert_eq!(
            encoded.access.url_password.as_ref().map(|p| p.expose()),
            Some("p@ss/w"),
            "percent-decoded"
        );
        assert!(!format!("{src:?}").contains("s3cret"));
    }
}
