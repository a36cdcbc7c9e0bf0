//! The rollout lease as a value: who holds it, and what a node should do about it (DESIGN
//! section 7). Pure: the time is passed in.
//!
//! Expiry is judged as client-go's leader election judges it: by how long *this* agent has
//! seen the holder's record unchanged, never by the holder's `renewTime` against the local
//! clock, so a node whose clock is off cannot take a live lease (nor keep a dead one).

use std::time::Duration;

/// What a Lease says, as far as the rollout cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    /// `spec.holderIdentity`; `None` or empty: free.
    pub holder: Option<String>,
    /// The holder's record as written (holder, acquire and renew times, duration): when it
    /// changes the holder is alive.
    pub record: String,
    /// `spec.leaseDurationSeconds`.
    pub duration: Duration,
}

/// What a node does about a lease it wants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// No such Lease: create it, held by me.
    Create,
    /// Free or expired: update it (with its resourceVersion) to be held by me. `takeover`:
    /// someone else held it and their time ran out (counts as a transition).
    Take {
        /// Whether another holder's claim expired.
        takeover: bool,
    },
    /// Already mine: renew it.
    Renew,
    /// Someone else holds it; unless they renew, it is theirs for `left` more.
    Wait {
        /// The holder.
        holder: String,
        /// How long until their claim runs out, as seen from here.
        left: Duration,
    },
}

impl Claim {
    /// Whether someone holds it.
    pub fn is_held(&self) -> bool {
        self.holder.as_deref().is_some_and(|h| !h.is_empty())
    }

    /// Whether the claim is held and still valid, this agent having seen its record
    /// unchanged for `unchanged_for`.
    pub fn is_current(&self, unchanged_for: Duration) -> bool {
        self.is_held() && unchanged_for < self.duration
    }
}

/// What `me` should do about `lease` (None: it does not exist), having seen its record
/// unchanged for `unchanged_for` (zero when it just changed, or on first sight).
pub fn decide(lease: Option<&Claim>, me: &str, unchanged_for: Duration) -> Decision {
    let Some(c) = lease else {
        return Decision::Create;
    };
    match c.holder.as_deref() {
        None | Some("") => Decision::Take { takeover: false },
        Some(h) if h == me => Decision::Renew,
        Some(h) => {
            if c.is_current(unchanged_for) {
                Decision::Wait {
                    holder: h.to_string(),
                    left: c.duration.saturating_sub(unchanged_for),
                }
            } else {
                Decision::Take { takeover: true }
            }
        }
    }
}

/// How old a node's heartbeat (its Lease in `kube-node-lease`, renewed by the kubelet every
/// quarter of its duration) may be for the node to count as alive: three quarters of the
/// duration, three renewals missed. A dead node keeps `Ready=True` until the node-lifecycle
/// controller's grace period (50 s by default) runs out; this notices it sooner. The
/// renewal time is the kubelet's clock against this agent's, so clocks must agree to
/// within this bound (NTP).
pub fn heartbeat_bound(duration: Duration) -> Duration {
    (duration * 3 / 4).max(Duration::from_secs(2))
}

/// The age of a heartbeat renewed at `renewed` when it is older than
/// [`heartbeat_bound`]; `None` when it is fresh (a renewal in the future, by clock skew,
/// is fresh).
pub fn stale_heartbeat(
    renewed: std::time::SystemTime,
    duration: Duration,
    now: std::time::SystemTime,
) -> Option<Duration> {
    let age = now.duration_since(renewed).unwrap_or_default();
    (age > heartbeat_bound(duration)).then_some(age)
}

/// The names of the rollout's leases: one for `max_unavailable: 1`, else one per slot.
pub fn names(base: &str, max_unavailable: u32) -> Vec<String> {
    if max_unavailable <= 1 {
        vec![base.to_string()]
    } else {
        (0..max_unavailable)
            .map(|i| format!("{base}-{i}"))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(holder: Option<&str>) -> Claim {
        Claim {
            holder: holder.map(str::to_string),
            record: "r1".into(),
            duration: Duration::from_secs(60),
        }
    }

    fn s(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn every_case_of_the_decision() {
        assert_eq!(decide(None, "a", s(0)), Decision::Create);
        assert_eq!(
            decide(Some(&claim(None)), "a", s(0)),
            Decision::Take { takeover: false }
        );
        assert_eq!(
            decide(Some(&claim(Some(""))), "a", s(0)),
            Decision::Take { takeover: false }
        );
        assert_eq!(
            decide(Some(&claim(Some("a"))), "a", s(500)),
            Decision::Renew,
            "mine, even expired"
        );
        assert_eq!(
            decide(Some(&claim(Some("b"))), "a", s(59)),
            Decision::Wait {
                holder: "b".into(),
                left: s(1)
            }
        );
        assert_eq!(
            decide(Some(&claim(Some("b"))), "a", s(60)),
            Decision::Take { takeover: true },
            "expired exactly at the end"
        );
    }

    #[test]
    fn expiry_is_by_how_long_the_record_stayed_unchanged() {
        // Only the observation counts (the claim holds no renewTime to misjudge); the
        // skewed-clock case itself is shown against the real API server in the agent's
        // cluster_tests.
        let c = claim(Some("b"));
        assert!(c.is_current(s(0)));
        assert!(!c.is_current(s(61)));
    }

    #[test]
    fn heartbeats_older_than_three_quarters_of_their_duration_are_stale() {
        let t0 = std::time::SystemTime::UNIX_EPOCH + s(1_000_000);
        let forty = s(40);
        assert_eq!(stale_heartbeat(t0, forty, t0 + s(30)), None);
        assert_eq!(stale_heartbeat(t0, forty, t0 + s(31)), Some(s(31)));
        assert_eq!(stale_heartbeat(t0 + s(5), forty, t0), None, "skewed ahead");
        assert_eq!(heartbeat_bound(s(1)), s(2), "never below two seconds");
    }

    #[test]
    fn slots() {
        assert_eq!(names("nk3-rollout", 1), ["nk3-rollout"]);
        assert_eq!(
            names("nk3-rollout", 3),
            ["nk3-rollout-0", "nk3-rollout-1", "nk3-rollout-2"]
        );
    }
}
