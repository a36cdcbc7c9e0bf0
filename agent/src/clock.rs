//! Time arithmetic that cannot overflow. Durations come from the inventory and the settings
//! (both bounded to a year when read, but never trusted twice): a deadline too far to
//! represent is the farthest one that is.

use std::time::{Duration, Instant, SystemTime};

/// The far future: later than any deadline nk3 sets.
const FAR: Duration = Duration::from_secs(10 * 366 * 24 * 3600);

/// `d` from now, on the monotonic clock.
pub fn deadline(d: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(d)
        .or_else(|| now.checked_add(FAR))
        .unwrap_or(now)
}

/// `d` from now, on the wall clock (for what is written down: state.json, messages).
pub fn wall(d: Duration) -> SystemTime {
    let now = SystemTime::now();
    now.checked_add(d)
        .or_else(|| now.checked_add(FAR))
        .unwrap_or(now)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_huge_duration_is_the_far_future_not_a_panic() {
        assert!(deadline(Duration::MAX) > Instant::now() + Duration::from_secs(3600));
        assert!(wall(Duration::MAX) > SystemTime::now() + Duration::from_secs(3600));
        let soon = wall(Duration::from_secs(5));
        assert!(soon > SystemTime::now() && soon < SystemTime::now() + Duration::from_secs(10));
    }
}
