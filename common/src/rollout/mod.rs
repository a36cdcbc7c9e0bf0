//! One node's rollout as one pure decision (DESIGN section 6).
//!
//! [`next_action`] reads the persisted [`State`] and what the agent has seen so far in this
//! pass (an [`Observation`]) and answers with one [`Step`]: the state to write first, what to
//! tell the operator, and the one [`Action`] to take. The agent's runner loops — observe,
//! decide, persist, act — and writes each action's result back into the observation. Every
//! transition, every resume after a crash, is in `decide.rs`; nothing else decides.
//!
//! The function reads no clock and no file: `now` is in the observation. It is total: a fact
//! it needs and does not have yet is asked for with a `Look…` action.

use std::time::{Duration, SystemTime};

use crate::disruption::Blocker;
use crate::inventory::RebootPolicy;
use crate::state::{Outcome, Rejected, State};

mod decide;

pub use decide::{next_action, short, VERIFY_EVERY};

/// A commit's rollout settings for this node, from that commit's inventory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// The node's hostname.
    pub host: String,
    /// When to reboot after a switch.
    pub reboot: RebootPolicy,
    /// How many nodes may be disrupted at once.
    pub max_unavailable: u32,
    /// How long a lease stays valid without renewal.
    pub lease_duration: Duration,
    /// How long a drain may take.
    pub drain_timeout: Duration,
    /// How long a switched node has to become healthy.
    pub health_timeout: Duration,
}

impl Settings {
    /// The settings of node `host` under an inventory's `rollout`.
    pub fn of(host: &str, r: &crate::inventory::Rollout) -> Settings {
        Settings {
            host: host.to_string(),
            reboot: r.reboot,
            max_unavailable: r.max_unavailable,
            lease_duration: r.lease_duration,
            drain_timeout: r.drain_timeout,
            health_timeout: r.health_timeout,
        }
    }
}

/// What the branch's head declares for this machine (steps 1 to 3), as the pass found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// No commit to work on yet: why.
    NoCommit(String),
    /// The inventory at `commit` is invalid: every problem, located.
    BadInventory {
        /// The commit.
        commit: String,
        /// `file:line: message` each.
        problems: Vec<String>,
    },
    /// This machine is not (exactly one) node of the inventory.
    NotANode {
        /// The commit.
        commit: String,
        /// Why.
        why: String,
    },
    /// Nix refused this commit before.
    AlreadyRejected {
        /// The head commit.
        commit: String,
        /// The refusal on record.
        rejected: Rejected,
    },
    /// The node runs what the commit declares.
    UpToDate {
        /// The commit.
        commit: String,
        /// Its settings.
        settings: Settings,
    },
    /// The configuration must be built, and switched to if the system differs.
    Apply {
        /// The commit.
        commit: String,
        /// Its settings.
        settings: Settings,
        /// The unified diff from the file on disk (secrets redacted), when it changed.
        diff: Option<String>,
        /// Why it is built.
        why: String,
        /// Whether the build follows the channel (`--upgrade`), and which.
        upgrade: Option<String>,
        /// Whether the file on disk is this commit's rendered one already.
        on_disk: bool,
        /// Whether a configuration.nix exists now, and its mode (to put it back with).
        existing: Option<u32>,
    },
}

impl Plan {
    /// The commit the plan is about.
    pub fn commit(&self) -> Option<&str> {
        match self {
            Plan::NoCommit(_) => None,
            Plan::BadInventory { commit, .. }
            | Plan::NotANode { commit, .. }
            | Plan::AlreadyRejected { commit, .. }
            | Plan::UpToDate { commit, .. }
            | Plan::Apply { commit, .. } => Some(commit),
        }
    }
}

/// The running machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Machine {
    /// This boot's id.
    pub boot_id: String,
    /// The running system's store path.
    pub current: Option<String>,
    /// Whether a previous configuration.nix is saved to put back.
    pub previous_saved: bool,
}

/// A built system.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Built {
    /// Its store path.
    pub system: String,
    /// Whether it still runs nk3-agent (a system without it would end nk3's care).
    pub has_agent: bool,
}

/// How an external command went wrong: three different things.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// It could not be started.
    NotStarted,
    /// It ran and exited non-zero: it refused.
    Exited,
    /// It ran out of its time and was stopped.
    TimedOut,
}

/// A command that failed: how, and the message for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failed {
    /// How.
    pub failure: Failure,
    /// What it said (the end of its output), or why it could not run.
    pub message: String,
}

/// How this node's switch is coordinated with its cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Coordination {
    /// k3s has not joined a cluster on this machine: it switches directly (bootstrap).
    Bootstrap,
    /// A member without credentials the API accepts for a whole rollout: why.
    NoCredentials(String),
    /// A member with credentials for the whole rollout.
    Lease,
}

/// A commit halted for the cluster: the newest halt, with those before it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Halt {
    /// The commit.
    pub commit: String,
    /// Why.
    pub reason: String,
    /// The node that halted it.
    pub node: String,
    /// Commits halted before this one, newest first: still applied by nobody (a node whose
    /// git server is down may still have one as its head).
    pub earlier: Vec<Halt>,
}

impl Halt {
    /// The halt of `commit`, if it is halted: this one, or an earlier one.
    pub fn of(&self, commit: &str) -> Option<&Halt> {
        if self.commit == commit {
            return Some(self);
        }
        self.earlier.iter().find(|h| h.commit == commit)
    }
}

/// What trying to take a rollout lease found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// This node holds the named lease.
    Held(String),
    /// Every slot is held by someone else.
    Busy {
        /// The holder whose claim runs out first.
        holder: String,
        /// Their lease.
        lease: String,
        /// How long until that claim runs out unless renewed, as seen from here.
        left: Duration,
    },
}

/// A disruptive step, which the held lease is confirmed just before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disruption {
    /// Cordoning the node.
    Cordon,
    /// Evicting its pods.
    Drain,
    /// Switching (or booting) into the new system.
    Switch,
    /// Rebooting the machine.
    Reboot,
}

impl Disruption {
    /// The step, as log lines name it.
    pub fn doing(self) -> &'static str {
        match self {
            // The cordon is the start of the drain.
            Disruption::Cordon | Disruption::Drain => "draining",
            Disruption::Switch => "switching",
            Disruption::Reboot => "rebooting",
        }
    }
}

/// What a confirmation of the held lease found, just before something disruptive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Confirmed {
    /// When (this machine's clock).
    pub at: SystemTime,
    /// The step it was taken for: it permits that step only, however soon the next one
    /// comes (a drain of a few seconds may be all it takes for the lease to go).
    pub before: Disruption,
    /// Why the lease is no longer this node's, if it is not.
    pub lost: Option<String>,
    /// The halt on record then: a commit halted meanwhile is not switched to.
    pub halt: Option<Halt>,
}

/// Everything the agent has seen in this pass. `None` is "not looked at yet"; the runner
/// forgets the facts of a phase when the phase changes (see [`Observation::entered`]).
/// What the build found, and that this pass landed the file, stay for the pass: the phases
/// after a build are about its system.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observation {
    /// Now, by this machine's clock.
    pub now: Option<SystemTime>,
    /// The agent's poll interval.
    pub poll_interval: Duration,
    /// Whether every pass logs "No action needed" (`run --once`), not only the first.
    pub report_idle: bool,
    /// Whether the phase was read from disk (a resume) rather than entered in this pass.
    pub resumed: bool,
    /// The rollout settings of the phase's commit (for a resume), or why they cannot be read.
    pub settings: Option<Result<Settings, String>>,
    /// What the branch declares for this machine.
    pub plan: Option<Plan>,
    /// The machine.
    pub machine: Option<Machine>,
    /// The lease renewed once at the start of a frozen pass.
    pub renewed: bool,
    /// This pass renews the held lease in the background.
    pub renewing: bool,
    /// The last confirmation, in this phase, that the held lease is this node's.
    pub lease_confirmed: Option<Confirmed>,
    /// Why the held lease is no longer this node's, if the renewer saw it go.
    pub lease_lost: Option<String>,
    /// The join token was written.
    pub token_written: bool,
    /// The channel was set: how it went.
    pub channel_set: Option<Result<(), String>>,
    /// The previous configuration.nix was saved.
    pub previous_saved: bool,
    /// The rendered configuration.nix was written.
    pub landed: bool,
    /// The build, or the inspection of a system built before.
    pub built: Option<Result<Built, Failed>>,
    /// The previous configuration.nix was put back.
    pub restored: bool,
    /// How switching is coordinated.
    pub coordination: Option<Coordination>,
    /// The halt on record, if any.
    pub halt: Option<Option<Halt>>,
    /// The halt looked at again with the lease held.
    pub halt_held: Option<Option<Halt>>,
    /// A PodDisruptionBudget that stops the drain, if any.
    pub blocker: Option<Option<Blocker>>,
    /// The lease: taken, or whom it waits for.
    pub claim: Option<Claim>,
    /// When this pass began to wait for the lease (it waits one poll interval at most).
    pub waiting_since: Option<SystemTime>,
    /// The branch's head looked at again with the lease held.
    pub head_held: Option<String>,
    /// The gate: the inventory's nodes Ready now, or why not to disrupt.
    pub gate: Option<Result<Vec<String>, String>>,
    /// The node was cordoned; whether it was unschedulable before.
    pub cordoned: Option<bool>,
    /// The drain.
    pub drained: Option<Result<(), String>>,
    /// Why the system being switched to needs a reboot (empty: it does not).
    pub reboot_reasons: Option<Vec<String>>,
    /// `nixos-rebuild switch` or `boot`.
    pub switched: Option<Result<(), Failed>>,
    /// `nixos-rebuild switch --rollback`.
    pub rolled_back: Option<Result<(), Failed>>,
    /// The reboot was asked for.
    pub rebooted: Option<Result<(), Failed>>,
    /// One health check.
    pub health: Option<Result<(), String>>,
    /// The cluster changes made in this phase since the lease was last asked for (the
    /// decision asks for them again if it needs others).
    pub cluster_done: Option<Vec<Op>>,
    /// The running configuration.nix was recorded as applied.
    pub recorded: bool,
}

impl Observation {
    /// A pass begins at `now`: a resume of whatever phase the state holds.
    pub fn pass(now: SystemTime, poll_interval: Duration, report_idle: bool) -> Observation {
        Observation {
            now: Some(now),
            poll_interval,
            report_idle,
            resumed: true,
            ..Observation::default()
        }
    }

    /// A new phase was entered in this pass: the facts about the phase before are forgotten;
    /// what holds for the whole pass stays.
    pub fn entered(&mut self) {
        *self = Observation {
            now: self.now,
            poll_interval: self.poll_interval,
            report_idle: self.report_idle,
            resumed: false,
            settings: self.settings.take(),
            plan: self.plan.take(),
            built: self.built.take(),
            landed: self.landed,
            coordination: self.coordination.take(),
            renewing: self.renewing,
            lease_lost: self.lease_lost.take(),
            waiting_since: self.waiting_since,
            ..Observation::default()
        };
    }
}

/// How loud a log line is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// Only with debugging on.
    Debug,
    /// An event of the rollout.
    Info,
    /// Something a person may want to know.
    Warn,
    /// Something went wrong.
    Error,
}

/// A log line for the operator (the runner adds node and commit).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Log {
    /// How loud.
    pub level: Level,
    /// The line (a diff is one entry with its lines in it).
    pub message: String,
}

/// A Kubernetes Event on this node, for `kubectl describe node`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// The reason, CamelCase.
    pub reason: &'static str,
    /// What happened.
    pub message: String,
    /// A warning rather than normal.
    pub warning: bool,
}

/// A change of the cluster's objects, made in order by [`Action::Cluster`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Uncordons this node, unless it was unschedulable before nk3 cordoned it.
    Uncordon {
        /// It was unschedulable before.
        was_unschedulable: bool,
    },
    /// Gives the lease back.
    Release(String),
    /// Gives back whatever this node may still hold: its own cordon, any lease slot.
    LetGo {
        /// How many slots there are.
        max_unavailable: u32,
    },
    /// Halts a commit for everyone — unless the halt on record is of a newer commit (one
    /// that descends from it): an older commit's halt never replaces a newer one's, which
    /// nodes still behind must see.
    SetHalt {
        /// The commit.
        commit: String,
        /// Why.
        reason: String,
    },
    /// Marks the halt on record lifted if it is of an older commit (one this commit
    /// descends from): a newer commit got through. The halted commit stays halted, for a
    /// node behind too; an older commit finishing late lifts nothing.
    LiftOlderHalt(String),
}

/// What the node's annotations say (`nk3.io/phase`, and `nk3.io/applied-commit` when given).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Annotate {
    /// The applied commit to record, if it changes.
    pub commit: Option<String>,
    /// The phase.
    pub phase: &'static str,
}

/// The one thing to do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Decide again at once (the step only wrote state).
    Continue,
    /// Ends the pass.
    Finish {
        /// How.
        outcome: Outcome,
        /// Whether it ended waiting for the lease itself (it then wakes on its release).
        lease_wait: bool,
    },
    /// Reads the settings of the phase's commit.
    LookSettings,
    /// Fetches, identifies, renders and compares (steps 1 to 3).
    LookPlan,
    /// Reads the boot id and running system.
    LookMachine,
    /// How a switch is coordinated (membership, credentials).
    LookCoordination,
    /// Reads the halt.
    LookHalt,
    /// Reads it again with the lease held.
    LookHaltHeld,
    /// Fetches the branch's head again, with the lease held.
    LookHeadHeld,
    /// Starts the pass over: what it saw is forgotten (the head moved on).
    Replan,
    /// Looks for a PodDisruptionBudget that stops the drain.
    LookBlocker,
    /// Checks the cluster's health: every other node Ready, none cordoned by nk3.
    LookGate,
    /// Asks why `system` needs a reboot.
    LookRebootReasons(String),
    /// Renews the held lease once.
    Renew(String),
    /// Renews the held lease in the background for the rest of the pass.
    KeepRenewed {
        /// The lease.
        lease: String,
        /// Just taken: a loss an earlier hold saw is forgotten.
        fresh: bool,
    },
    /// Renews the held lease now and says whether it is still this node's, and reads the
    /// halt: the last look before something disruptive.
    ConfirmLease {
        /// The lease.
        lease: String,
        /// The step it is for.
        before: Disruption,
    },
    /// Writes the k3s join token file.
    WriteToken,
    /// Points the `nixos` channel at this one.
    SetChannel(String),
    /// Saves the configuration.nix on disk as the previous one.
    SavePrevious,
    /// Writes the rendered configuration.nix.
    Land,
    /// `nixos-rebuild build`.
    Build {
        /// With `--upgrade`.
        upgrade: bool,
    },
    /// Inspects a system built before.
    Inspect(String),
    /// Puts the previous configuration.nix back (or removes the new one).
    Restore {
        /// Whether there was one.
        had_previous: bool,
    },
    /// Tries to take a lease slot.
    Acquire,
    /// Waits for the holder's lease to change, at most `wait`.
    WaitForLease {
        /// The lease.
        lease: String,
        /// Its holder.
        holder: String,
        /// At most.
        wait: Duration,
    },
    /// Cordons this node.
    Cordon,
    /// Evicts its pods, bounded.
    Drain(Duration),
    /// Changes cluster objects, in order.
    Cluster(Vec<Op>),
    /// `nixos-rebuild switch`.
    Switch,
    /// `nixos-rebuild boot`.
    Boot,
    /// `nixos-rebuild switch --rollback`.
    Rollback,
    /// Reboots the machine.
    Reboot,
    /// Checks the node's health once.
    CheckHealth {
        /// The nodes that must still be Ready.
        ready_before: Vec<String>,
        /// Health facts must be newer.
        since: SystemTime,
        /// No probe runs past it.
        deadline: SystemTime,
    },
    /// Waits before looking again.
    Sleep(Duration),
    /// Keeps a copy of configuration.nix as the one the running system was built from.
    RecordApplied,
}

/// The answer of [`next_action`]: write `state` (when given), say `logs`, post `event` and
/// `annotate` (best effort), then take `action`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// The state to write before acting; `None` leaves it as it is.
    pub state: Option<Box<State>>,
    /// What to tell the operator.
    pub logs: Vec<Log>,
    /// An Event on the Node.
    pub event: Option<Event>,
    /// The Node's annotations.
    pub annotate: Option<Annotate>,
    /// What to do.
    pub action: Action,
}

#[cfg(test)]
mod tests;
