//! The rollout lease as a value: who holds it until when, and what a node should do about it
//! (DESIGN section 7). Pure: the time is passed in.

use std::time::{Duration, SystemTime};

/// What a Lease says, as far as the rollout cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    /// `spec.holderIdentity`; `None` or empty: free.
    pub holder: Option<String>,
    /// `spec.renewTime` (or `acquireTime` when never renewed).
    pub renewed: Option<SystemTime>,
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
    /// Someone else holds it until `until`.
    Wait {
        /// The holder.
        holder: String,
        /// When their claim runs out unless renewed.
        until: SystemTime,
    },
}

impl Claim {
    /// Whether the claim is held by someone and still valid at `now`.
    pub fn is_current(&self, now: SystemTime) -> bool {
        self.holder.as_deref().is_some_and(|h| !h.is_empty())
            && self.expiry().is_some_and(|e| e > now)
    }

    /// When the claim runs out.
    pub fn expiry(&self) -> Option<SystemTime> {
        self.renewed.map(|r| r + self.duration)
    }
}

/// What `me` should do about `lease` (None: it does not exist) at `now`.
pub fn decide(lease: Option<&Claim>, me: &str, now: SystemTime) -> Decision {
    let Some(c) = lease else {
        return Decision::Create;
    };
    match c.holder.as_deref() {
        None | Some("") => Decision::Take { takeover: false },
        Some(h) if h == me => Decision::Renew,
        Some(h) => {
            if c.is_current(now) {
                Decision::Wait {
                    holder: h.to_string(),
                    until: c.expiry().unwrap_or(now),
                }
            } else {
                Decision::Take { takeover: true }
            }
        }
    }
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

    fn t(s: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 + s)
    }

    fn claim(holder: Option<&str>, renewed: u64) -> Claim {
        Claim {
            holder: holder.map(str::to_string),
            renewed: Some(t(renewed)),
            duration: Duration::from_secs(60),
        }
    }

    #[test]
    fn every_case_of_the_decision() {
        assert_eq!(decide(None, "a", t(0)), Decision::Create);
        assert_eq!(
            decide(Some(&claim(None, 0)), "a", t(0)),
            Decision::Take { takeover: false }
        );
        assert_eq!(
            decide(Some(&claim(Some(""), 0)), "a", t(0)),
            Decision::Take { takeover: false }
        );
        assert_eq!(
            decide(Some(&claim(Some("a"), 0)), "a", t(500)),
            Decision::Renew,
            "mine, even expired"
        );
        assert_eq!(
            decide(Some(&claim(Some("b"), 0)), "a", t(59)),
            Decision::Wait {
                holder: "b".into(),
                until: t(60)
            }
        );
        assert_eq!(
            decide(Some(&claim(Some("b"), 0)), "a", t(60)),
            Decision::Take { takeover: true },
            "expired exactly at the end"
        );
        let never_renewed = Claim {
            holder: Some("b".into()),
            renewed: None,
            duration: Duration::from_secs(60),
        };
        assert_eq!(
            decide(Some(&never_renewed), "a", t(0)),
            Decision::Take { takeover: true }
        );
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
