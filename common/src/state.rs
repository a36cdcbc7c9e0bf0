//! What an agent remembers about its node between passes and across crashes: the types of
//! `state.json`. Reading and writing it (atomically, under a lock) is the agent's job.

use serde::{Deserialize, Serialize};

/// The state file's format version; a file of another version is set aside, not misread.
pub const VERSION: u32 = 1;

/// What a node holds while it disrupts itself: the rollout lease, and what to put back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hold {
    /// The Lease this node holds.
    pub lease: String,
    /// Whether the node was unschedulable before nk3 cordoned it (then nk3 leaves it so).
    pub was_unschedulable: bool,
    /// The nodes that were Ready before the disruption; they must be Ready after.
    pub ready_before: Vec<String>,
    /// When the lease was taken (RFC 3339), for the rollout's duration.
    #[serde(default)]
    pub since: Option<String>,
}

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
    /// Holding the lease, the node is cordoned and its pods are being evicted.
    Draining {
        /// The commit being applied.
        commit: String,
        /// The system being switched to.
        system: String,
        /// The lease and what to restore.
        hold: Hold,
    },
    /// `nixos-rebuild switch` (or `boot`, before a reboot) is running.
    Switching {
        /// The commit being switched to.
        commit: String,
        /// The system being switched to.
        system: String,
        /// Whether the switch waits for a reboot (`nixos-rebuild boot` then reboot).
        reboot: bool,
        /// The lease held, for a node of a cluster.
        #[serde(default)]
        hold: Option<Hold>,
        /// A switch back (`nixos-rebuild switch --rollback`): why the new generation was
        /// rolled back. A restart then finishes the rollback, never a forward switch.
        #[serde(default)]
        rollback: Option<String>,
    },
    /// A reboot was asked for; a new boot id means it happened.
    Rebooting {
        /// The commit the reboot brings up.
        commit: String,
        /// The system the reboot brings up.
        system: String,
        /// The boot id before the reboot.
        boot_id: String,
        /// The lease held, for a node of a cluster.
        #[serde(default)]
        hold: Option<Hold>,
        /// Whether this reboot goes back to the previous generation.
        #[serde(default)]
        rollback: bool,
    },
    /// Switched; checking the node's health until `deadline`.
    Verifying {
        /// The commit applied (or, with `rollback`, the one being rolled back from).
        commit: String,
        /// The system that should run.
        system: String,
        /// The lease and what to restore.
        hold: Hold,
        /// When the health timeout runs out (RFC 3339).
        deadline: String,
        /// Whether this checks the rollback (the first check failed).
        rollback: bool,
        /// Why the new generation was rolled back, when it was.
        #[serde(default)]
        reason: Option<String>,
        /// When the switch or boot being verified happened (RFC 3339, microseconds): the
        /// node's heartbeat must be newer.
        #[serde(default)]
        since: Option<String>,
    },
    /// Even the rolled-back generation is unhealthy: the node keeps the lease so that no
    /// other node is disrupted, until a person acts or a new commit fixes it.
    Frozen {
        /// The commit that failed.
        commit: String,
        /// The lease kept.
        hold: Hold,
        /// What is wrong.
        reason: String,
    },
}

impl Phase {
    /// A short name for logs and status.
    pub fn name(&self) -> &'static str {
        match self {
            Phase::Idle => "idle",
            Phase::Building { .. } => "building",
            Phase::Built { .. } => "built",
            Phase::Draining { .. } => "draining",
            Phase::Switching { .. } => "switching",
            Phase::Rebooting { .. } => "rebooting",
            Phase::Verifying { .. } => "verifying",
            Phase::Frozen { .. } => "frozen",
        }
    }

    /// The commit being applied, if any.
    pub fn commit(&self) -> Option<&str> {
        match self {
            Phase::Idle => None,
            Phase::Building { commit, .. }
            | Phase::Built { commit, .. }
            | Phase::Draining { commit, .. }
            | Phase::Switching { commit, .. }
            | Phase::Rebooting { commit, .. }
            | Phase::Verifying { commit, .. }
            | Phase::Frozen { commit, .. } => Some(commit),
        }
    }

    /// The lease held in this phase, if any.
    pub fn hold(&self) -> Option<&Hold> {
        match self {
            Phase::Draining { hold, .. }
            | Phase::Verifying { hold, .. }
            | Phase::Frozen { hold, .. } => Some(hold),
            Phase::Switching { hold, .. } | Phase::Rebooting { hold, .. } => hold.as_ref(),
            _ => None,
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
    /// Waiting for the cluster: the gate, the lease, or a drain that timed out.
    Waiting,
    /// The new generation was unhealthy and rolled back; the commit is halted cluster-wide.
    RolledBack,
    /// Even the rollback is unhealthy; the node keeps the lease (the rollout is frozen).
    Frozen,
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
    /// How long this node's last disruption took, lease taken to lease released (seconds).
    pub last_rollout_seconds: Option<u64>,
    /// A PodDisruptionBudget that stopped this node's drain before it began; the commit is
    /// tried again after a back-off, not every pass.
    pub drain_blocked: Option<DrainBlocked>,
    /// Each rollout lease's holder record as this agent last saw it, and since when (RFC
    /// 3339, by this machine's clock): expiry is judged by how long it stayed unchanged,
    /// across restarts too.
    pub lease_seen: std::collections::BTreeMap<String, LeaseSeen>,
    /// The rollout's `max_unavailable` at the last commit this node worked on: which lease
    /// slots `status --cluster` reads (by name, as an agent node's credentials allow).
    pub lease_slots: Option<u32>,
    /// The `system.stateVersion` of the configuration.nix the agent first replaced (the
    /// installer's), rendered when the inventory sets none.
    pub state_version: Option<String>,
    /// The file mode of the configuration.nix saved as the previous one, put back with it.
    pub previous_mode: Option<u32>,
    /// A lease slot may be this node's in the API without a hold on disk: how many slots
    /// there were when it was asked for. Written before the lease is asked for, cleared
    /// once the hold is on disk or the slots given back. A pass interrupted in between
    /// gives them back before it does anything else. (Read from a `true`/`false` too, as
    /// development builds wrote it.)
    #[serde(deserialize_with = "claimed")]
    pub lease_claimed: Option<u32>,
    /// The frozen phase this node left to build a newer commit (still holding the lease and
    /// its cordon): a build that fails goes back to it, so the rollout stays frozen. Cleared
    /// once the newer commit is built.
    pub frozen_left: Option<Box<Phase>>,
}

/// `lease_claimed` as a slot count, or as the flag it once was.
fn claimed<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Claimed {
        Slots(u32),
        Flag(bool),
    }
    Ok(match Option::<Claimed>::deserialize(d)? {
        None | Some(Claimed::Flag(false)) => None,
        Some(Claimed::Flag(true)) => Some(1),
        Some(Claimed::Slots(n)) => Some(n),
    })
}

/// A rollout lease's holder record, as this agent saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseSeen {
    /// The record (holder, acquire and renew times, duration).
    pub record: String,
    /// When this agent first saw it so (RFC 3339, microseconds).
    pub since: String,
}

/// A drain that a PodDisruptionBudget stopped before the node was cordoned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrainBlocked {
    /// The commit waiting.
    pub commit: String,
    /// Which budget and why.
    pub reason: String,
    /// How many times in a row.
    pub tries: u32,
    /// When to look again (RFC 3339).
    pub next_try: String,
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
            last_rollout_seconds: None,
            drain_blocked: None,
            lease_seen: Default::default(),
            lease_slots: None,
            state_version: None,
            previous_mode: None,
            lease_claimed: None,
            frozen_left: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_claim_reads_as_a_slot_count_or_as_the_flag_it_was() {
        let read = |v: &str| {
            serde_json::from_str::<State>(&format!("{{\"version\":1,\"lease_claimed\":{v}}}"))
                .unwrap()
                .lease_claimed
        };
        assert_eq!(read("3"), Some(3));
        assert_eq!(read("true"), Some(1));
        assert_eq!(read("false"), None);
        assert_eq!(read("null"), None);
        let none: State = serde_json::from_str("{\"version\":1}").unwrap();
        assert_eq!(none.lease_claimed, None);
    }
}
