//! The agent's own transports for `https://`, `http://` and `ssh://` (and scp-like
//! `host:path`), in place of libgit2's, which would load OpenSSL and libssh2 into the daemon.
//! libgit2 still speaks git's protocol; these only carry its bytes. `git://` and local
//! paths stay libgit2's.

use std::cell::RefCell;
use std::path::PathBuf;
use std::time::Duration;

use git2::transport::Transport;

use super::Access;

/// What a fetch's transport needs: credentials, the bound on each wait, the ssh program.
#[derive(Debug, Clone)]
pub struct Settings {
    /// How to reach and trust the repository.
    pub access: Access,
    /// The longest wait to connect, and for each answer.
    pub timeout: Duration,
    /// The ssh program.
    pub ssh: PathBuf,
}

thread_local! {
    /// The settings of the fetch running on this thread: libgit2 makes its transports
    /// through a process-wide factory, and calls it on the thread doing the fetch.
    static CURRENT: RefCell<Option<Settings>> = const { RefCell::new(None) };
}

/// The settings transports made on this thread use, until the value is dropped.
#[derive(Debug)]
pub struct Scope(());

impl Drop for Scope {
    fn drop(&mut self) {
        CURRENT.with(|c| c.borrow_mut().take());
    }
}

/// Sets the settings for transports made on this thread while the returned scope lives.
pub fn scope(settings: Settings) -> Scope {
    CURRENT.with(|c| *c.borrow_mut() = Some(settings));
    Scope(())
}

fn current() -> Result<Settings, git2::Error> {
    CURRENT
        .with(|c| c.borrow().clone())
        .ok_or_else(|| git2::Error::from_str("no git settings for this fetch"))
}

/// An I/O error carrying `msg`, which libgit2 reports as the fetch's error.
pub fn other(msg: String) -> std::io::Error {
    std::io::Error::other(msg)
}

/// Registers the transports with libgit2, once per process. Call before any other thread
/// starts.
#[allow(unsafe_code)]
pub fn register() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        for scheme in ["https", "http"] {
            // SAFETY: registration writes libgit2's transport list without synchronisation;
            // main() calls this first, before any other thread exists, and Once makes it
            // happen once.
            let r = unsafe {
                git2::transport::register(scheme, |remote| {
                    Transport::smart(remote, true, super::http::Http::new(current()?)?)
                })
            };
            if let Err(e) = r {
                tracing::warn!("cannot set up git over {scheme}: {}", e.message());
            }
        }
        for scheme in ["ssh", "ssh+git", "git+ssh"] {
            // SAFETY: as above.
            let r = unsafe {
                git2::transport::register(scheme, |remote| {
                    Transport::smart(remote, false, super::ssh::Ssh::new(current()?))
                })
            };
            if let Err(e) = r {
                tracing::warn!("cannot set up git over {scheme}: {}", e.message());
            }
        }
    });
}
