//! Whether the pass is getting on. systemd's watchdog is fed from this, not from a timer
//! alone: a pass that stalls where no timeout reaches (a git server trickling a byte at a
//! time through the ref listing, a hung read) stops the feeding, and systemd restarts the
//! agent, which resumes from `state.json`. Every bounded wait beats while within its bound:
//! commands, the drain, verification, watches, git transfers, each saved phase.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

static LAST: AtomicU64 = AtomicU64::new(0);
static IN_PASS: AtomicBool = AtomicBool::new(false);

thread_local! {
    /// Whether this thread runs the pass: only its progress counts (the lease renewer's
    /// requests go on whatever the pass does).
    static PASS_THREAD: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Milliseconds since the epoch.
fn now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The pass got on (from any other thread: nothing).
pub fn beat() {
    if PASS_THREAD.with(std::cell::Cell::get) {
        LAST.store(now(), Ordering::Relaxed);
    }
}

/// A pass begins, on this thread.
pub fn pass_started() {
    PASS_THREAD.with(|p| p.set(true));
    beat();
    IN_PASS.store(true, Ordering::Relaxed);
}

/// The pass ended: waiting between passes is not a stall.
pub fn pass_ended() {
    IN_PASS.store(false, Ordering::Relaxed);
    beat();
}

/// Whether a pass is running.
pub fn in_pass() -> bool {
    IN_PASS.load(Ordering::Relaxed)
}

/// How long the running pass has gone without a beat; `None` between passes.
pub fn stalled_for() -> Option<Duration> {
    IN_PASS
        .load(Ordering::Relaxed)
        .then(|| Duration::from_millis(now().saturating_sub(LAST.load(Ordering::Relaxed))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_running_pass_can_stall() {
        pass_ended();
        assert_eq!(stalled_for(), None);
        pass_started();
        assert!(stalled_for().is_some_and(|d| d < Duration::from_secs(2)));
        LAST.store(now() - 600_000, Ordering::Relaxed);
        assert!(stalled_for().is_some_and(|d| d >= Duration::from_secs(600)));
        // Another thread's work (the lease renewer) is not the pass's progress.
        std::thread::spawn(beat).join().unwrap();
        assert!(stalled_for().is_some_and(|d| d >= Duration::from_secs(600)));
        beat();
        assert!(stalled_for().is_some_and(|d| d < Duration::from_secs(2)));
        pass_ended();
    }
}
