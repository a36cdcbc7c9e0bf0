//! Deterministic simulation of the rollout protocol, in the manner of FoundationDB's and
//! TigerBeetle's: N agents, each deciding with the real [`next_action`], over a simulated
//! clock, a simulated k3s API with optimistic concurrency (resourceVersion, 409 on a stale
//! write), and simulated machines. A seeded scheduler interleaves the agents' steps and
//! injects faults: a crash after any persisted step, lost and failed API replies, 409
//! storms, clock skew, a node that dies for good, commits that Nix refuses, generations
//! that are unhealthy (and, rarely, a rollback that is unhealthy too), and new commits in
//! the middle of a rollout. The safety invariants of DESIGN section 8 are checked after
//! every step; a failure names its seed, and `NK3_DST_SEED=<seed>` replays exactly it.
//!
//! `NK3_DST_SEEDS` sets how many simulated rollouts run (100,000 unless set), `NK3_DST_FROM`
//! the first seed (0 unless set).

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nk3_common::disruption::Blocker;
use nk3_common::inventory::RebootPolicy;
use nk3_common::rollout::{
    next_action, Action, Built, Claim, Confirmed, Coordination, Failed, Failure, Halt, Machine,
    Observation, Op, Plan, Settings,
};
use nk3_common::state::{Outcome, Phase, State};

/// splitmix64: small, fast, and the same everywhere.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    /// True once in `n`.
    fn one_in(&mut self, n: u64) -> bool {
        self.below(n) == 0
    }
}

#[derive(Clone)]
struct Commit {
    id: String,
    builds: bool,
    healthy: bool,
    kernel: bool,
}

fn system_of(commit: &str) -> String {
    format!("/nix/store/system-{commit}")
}

#[derive(Clone, Default)]
struct LeaseObj {
    holder: Option<String>,
    rv: u64,
}

#[derive(Clone, Default)]
struct NodeObj {
    cordoned: bool,
    by_nk3: bool,
}

/// A simulated machine and the agent on it.
struct Node {
    name: String,
    /// The system generations, newest last; the running one is `current`.
    generations: Vec<String>,
    current: String,
    /// Set by `nixos-rebuild boot`: what the next boot runs.
    next_boot: Option<String>,
    boot: u64,
    /// Down until then (rebooting), or for good.
    down_until: Option<SystemTime>,
    dead: bool,
    /// configuration.nix on disk: which commit's, and the saved previous one.
    disk: Option<String>,
    previous: Option<String>,
    /// What survives a crash.
    state: State,
    /// What does not: the pass under way.
    obs: Option<Observation>,
    /// Asleep until then (a wait, a sleep, the next poll).
    wake: SystemTime,
    /// This agent's clock runs off by this much (seconds, either way).
    skew: i64,
    /// When this agent saw each lease's record change (by its own clock).
    seen: BTreeMap<String, (u64, SystemTime)>,
    renewing: Option<String>,
    /// It went back a generation.
    rolled_back: bool,
    /// It was frozen once: its lease and cordon stay until a commit gets through on it.
    was_frozen: bool,
}

struct World {
    rng: Rng,
    now: SystemTime,
    commits: Vec<Commit>,
    head: usize,
    leases: Vec<LeaseObj>,
    nodes_api: BTreeMap<String, NodeObj>,
    halt: Option<Halt>,
    nodes: Vec<Node>,
    max: u32,
    reboot: RebootPolicy,
    lease_duration: Duration,
    /// The system every node ran before.
    base: String,
    old_unhealthy: bool,
    /// Fault rates (one in n).
    crash: u64,
    api_error: u64,
    steps: u64,
    log: Vec<String>,
    /// When each commit was first halted.
    halted_at: BTreeMap<String, u64>,
}

/// A step the agent could not get past (an API error): its pass ends, its disk stays.
struct PassError;

fn local(w: &World, n: &Node) -> SystemTime {
    if n.skew >= 0 {
        w.now + Duration::from_secs(n.skew as u64)
    } else {
        w.now - Duration::from_secs((-n.skew) as u64)
    }
}

impl World {
    fn new(seed: u64) -> World {
        let mut rng = Rng(seed);
        let n = 2 + rng.below(3) as usize;
        let max = 1 + rng.below(2) as u32;
        let commits = (0..1 + rng.below(3))
            .map(|i| Commit {
                id: format!("{i:02}{:038x}", rng.next() as u128),
                builds: !rng.one_in(6),
                healthy: !rng.one_in(4),
                kernel: rng.one_in(2),
            })
            .collect();
        let base = "/nix/store/system-installed".to_string();
        let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let nodes = (0..n)
            .map(|i| Node {
                name: format!("node-{i}"),
                generations: vec![base.clone()],
                current: base.clone(),
                next_boot: None,
                boot: 1,
                down_until: None,
                dead: false,
                disk: None,
                previous: None,
                state: State {
                    applied: Some("installed".into()),
                    applied_system: Some(base.clone()),
                    ..State::default()
                },
                obs: None,
                wake: now,
                skew: rng.below(61) as i64 - 30,
                seen: BTreeMap::new(),
                renewing: None,
                rolled_back: false,
                was_frozen: false,
            })
            .collect::<Vec<_>>();
        let nodes_api = nodes
            .iter()
            .map(|n| (n.name.clone(), NodeObj::default()))
            .collect();
        World {
            crash: [8, 30, 200][rng.below(3) as usize],
            api_error: [10, 50, 1000][rng.below(3) as usize],
            old_unhealthy: rng.one_in(40),
            reboot: if rng.one_in(2) {
                RebootPolicy::Always
            } else {
                RebootPolicy::WhenNeeded
            },
            rng,
            now,
            commits,
            head: 0,
            leases: vec![LeaseObj::default(); max as usize],
            nodes_api,
            halt: None,
            nodes,
            max,
            lease_duration: Duration::from_secs(300),
            base,
            steps: 0,
            log: Vec::new(),
            halted_at: BTreeMap::new(),
        }
    }

    fn settings(&self, i: usize) -> Settings {
        Settings {
            host: self.nodes[i].name.clone(),
            reboot: self.reboot,
            max_unavailable: self.max,
            lease_duration: self.lease_duration,
            drain_timeout: Duration::from_secs(120),
            health_timeout: Duration::from_secs(60),
        }
    }

    /// A commit's place in the branch's history (a later one descends from each earlier).
    fn index(&self, id: &str) -> usize {
        self.commits.iter().position(|c| c.id == id).unwrap_or(0)
    }

    fn commit(&self, id: &str) -> Option<&Commit> {
        self.commits.iter().find(|c| c.id == id)
    }

    fn healthy_system(&self, system: &str) -> bool {
        if system == self.base {
            return true;
        }
        self.commits
            .iter()
            .find(|c| system_of(&c.id) == system)
            .is_none_or(|c| c.healthy)
    }

    /// Up, running and healthy: what a Ready Node with a fresh heartbeat says.
    fn ready(&self, i: usize) -> bool {
        let n = &self.nodes[i];
        // Rarely, the generation a node rolls back to is unhealthy too.
        let broken_rollback = self.old_unhealthy && n.rolled_back && n.current == self.base;
        !n.dead && n.down_until.is_none() && self.healthy_system(&n.current) && !broken_rollback
    }

    fn holder_of(&self, name: &str) -> Vec<usize> {
        (0..self.leases.len())
            .filter(|&s| self.leases[s].holder.as_deref() == Some(name))
            .collect()
    }

    fn fail(&self, seed: u64, what: &str) -> ! {
        let keep = if std::env::var_os("NK3_DST_SEED").is_some() {
            3000
        } else {
            40
        };
        let tail: Vec<&String> = self.log.iter().rev().take(keep).collect();
        let tail: Vec<String> = tail.into_iter().rev().cloned().collect();
        let nodes: Vec<String> = self
            .nodes
            .iter()
            .map(|n| {
                format!(
                    "{}: phase {}, runs {}, dead {}, cordoned by nk3 {}, last {:?}",
                    n.name,
                    n.state.phase.name(),
                    n.current,
                    n.dead,
                    self.nodes_api[&n.name].by_nk3,
                    n.state.last.as_ref().map(|l| &l.message)
                )
            })
            .collect();
        panic!(
            "seed {seed}: {what} (step {}; replay with NK3_DST_SEED={seed})\n{}\n{}",
            self.steps,
            tail.join("\n"),
            nodes.join("\n")
        )
    }

    /// The DESIGN section 8 invariants that hold at every instant.
    fn check(&self, seed: u64) {
        let disrupted = self.nodes_api.values().filter(|n| n.by_nk3).count();
        if disrupted > self.max as usize {
            self.fail(
                seed,
                &format!(
                    "{disrupted} nodes cordoned by nk3 at once, max_unavailable {}",
                    self.max
                ),
            );
        }
        let holders: Vec<&String> = self
            .leases
            .iter()
            .filter_map(|l| l.holder.as_ref())
            .collect();
        for h in &holders {
            if holders.iter().filter(|x| x == &h).count() > 1 {
                self.fail(seed, &format!("{h} holds two lease slots"));
            }
        }
    }

    fn plan(&self, i: usize) -> Plan {
        let n = &self.nodes[i];
        let c = &self.commits[self.head];
        if let Some(r) = n.state.rejected.as_ref().filter(|r| r.commit == c.id) {
            return Plan::AlreadyRejected {
                commit: c.id.clone(),
                rejected: r.clone(),
            };
        }
        let settings = self.settings(i);
        let on_disk = n.disk.as_deref() == Some(c.id.as_str());
        let confirmed = n.state.phase == Phase::Idle
            && n.state.applied_system.as_deref() == Some(n.current.as_str());
        if on_disk && confirmed {
            return Plan::UpToDate {
                commit: c.id.clone(),
                settings,
            };
        }
        Plan::Apply {
            commit: c.id.clone(),
            settings,
            diff: (!on_disk).then(|| "-old\n+new\n".to_string()),
            why: "new commit".into(),
            upgrade: None,
            on_disk,
            existing: n.disk.as_ref().map(|_| 0o644),
        }
    }

    /// An API call: it may fail before or after it took effect (a lost reply).
    fn api<T>(&mut self, f: impl FnOnce(&mut World) -> T) -> Result<T, PassError> {
        if self.rng.one_in(self.api_error) {
            return Err(PassError);
        }
        let r = f(self);
        if self.rng.one_in(self.api_error) {
            return Err(PassError);
        }
        Ok(r)
    }

    fn acquire(&mut self, i: usize) -> Result<Claim, PassError> {
        let me = self.nodes[i].name.clone();
        let now = local(self, &self.nodes[i]);
        // A 409 storm: the writes of others keep winning for a while.
        if self.rng.one_in(self.api_error.max(20) / 4) {
            return Err(PassError);
        }
        let mut busiest: Option<(String, String, Duration)> = None;
        for s in 0..self.leases.len() {
            let name = format!("nk3-rollout-{s}");
            let l = self.leases[s].clone();
            let seen = self.nodes[i]
                .seen
                .entry(name.clone())
                .or_insert((l.rv, now));
            if seen.0 != l.rv {
                *seen = (l.rv, now);
            }
            let quiet = now.duration_since(seen.1).unwrap_or_default();
            let free = match &l.holder {
                None => true,
                Some(h) if *h == me => true,
                Some(_) => quiet >= self.lease_duration,
            };
            if free {
                // Another slot already ours: that one, not a second.
                if let Some(s2) = self.holder_of(&me).first().copied() {
                    return self.api(|w| {
                        w.leases[s2].rv += 1;
                        Claim::Held(format!("nk3-rollout-{s2}"))
                    });
                }
                return self.api(|w| {
                    w.leases[s].holder = Some(me.clone());
                    w.leases[s].rv += 1;
                    Claim::Held(name.clone())
                });
            }
            let left = self.lease_duration.saturating_sub(quiet);
            if busiest.as_ref().is_none_or(|b| left < b.2) {
                busiest = Some((l.holder.clone().unwrap_or_default(), name, left));
            }
        }
        let (holder, lease, left) = busiest.expect("a slot");
        Ok(Claim::Busy {
            holder,
            lease,
            left,
        })
    }

    fn slot(lease: &str) -> usize {
        lease
            .rsplit('-')
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    }

    fn renew(&mut self, i: usize) {
        let me = self.nodes[i].name.clone();
        if let Some(lease) = self.nodes[i].renewing.clone() {
            let s = World::slot(&lease);
            if self.leases[s].holder.as_deref() == Some(me.as_str()) {
                self.leases[s].rv += 1;
            } else if let Some(o) = self.nodes[i].obs.as_mut() {
                o.lease_lost = Some(format!(
                    "{} holds {lease} now",
                    self.leases[s]
                        .holder
                        .clone()
                        .unwrap_or_else(|| "nobody".into())
                ));
            }
        }
    }

    /// Ends this agent's pass (crash, error or the end): what is in memory is gone.
    fn end_pass(&mut self, i: usize, wake: SystemTime) {
        let n = &mut self.nodes[i];
        n.obs = None;
        n.renewing = None;
        n.wake = wake;
    }

    /// One step of agent `i`.
    fn step(&mut self, seed: u64, i: usize) {
        // A stall longer than the lease lasts (a hung disk, a paused VM): the agent lives
        // on, its renewals stop with it, and its lease may be another's when it wakes. (A
        // stall between a decision and its action is beyond any decision: the cordon is
        // what keeps the others away then.)
        if self.nodes[i].obs.is_some() && self.rng.one_in(self.crash.saturating_mul(4)) {
            self.log.push(format!("{}: stalls", self.nodes[i].name));
            self.nodes[i].wake = self.now + self.lease_duration + Duration::from_secs(60);
            return;
        }
        let now_local = local(self, &self.nodes[i]);
        if self.nodes[i].obs.is_none() {
            self.nodes[i].obs = Some(Observation::pass(now_local, Duration::from_secs(60), false));
        }
        self.renew(i);
        let n = &mut self.nodes[i];
        let obs = n.obs.as_mut().expect("a pass");
        obs.now = Some(now_local);
        let step = next_action(&n.state, obs);
        if matches!(n.state.phase, Phase::Frozen { .. }) {
            n.was_frozen = true;
        }
        if let Some(st) = step.state {
            let entered = st.phase.name() != n.state.phase.name();
            n.state = *st;
            if entered {
                obs.entered();
            }
            // A crash right after the state was written, before the action.
            if self.rng.one_in(self.crash) {
                self.log.push(format!(
                    "{}: crashed in {}",
                    self.nodes[i].name,
                    self.nodes[i].state.phase.name()
                ));
                let wake = self.now + Duration::from_secs(1 + self.rng.below(30));
                self.end_pass(i, wake);
                return;
            }
        }
        let name = self.nodes[i].name.clone();
        self.log.push(format!(
            "t={} {name} [{}] {:?}",
            self.now
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs()
                % 100_000,
            self.nodes[i].state.phase.name(),
            step.action
        ));
        if self.log.len() > 4000 {
            self.log.drain(..2000);
        }
        let holds = !self.holder_of(&name).is_empty();
        // (A rollback is not among them: it repairs a node already disrupted, and goes on
        // when the lease was lost meanwhile — only its reboot needs the lease.)
        let disruptive = matches!(
            step.action,
            Action::Cordon | Action::Drain(_) | Action::Switch | Action::Boot | Action::Reboot
        );
        if disruptive && !holds {
            self.fail(
                seed,
                &format!(
                    "{name} disrupts itself ({:?}) without holding a rollout lease",
                    step.action
                ),
            );
        }
        if matches!(step.action, Action::Switch | Action::Boot) && self.max == 1 {
            if let Some(c) = self.nodes[i].state.phase.commit() {
                if self.halted_at.contains_key(c) {
                    self.fail(
                        seed,
                        &format!("{name} switches to commit {c}, which was halted before"),
                    );
                }
            }
        }
        let ended = matches!(step.action, Action::Finish { .. } | Action::Reboot);
        if let Err(PassError) = self.act(i, step.action) {
            self.log.push(format!("{name}: API error, pass ends"));
            let wake = self.now + Duration::from_secs(1 + self.rng.below(10));
            self.end_pass(i, wake);
        } else if !ended && self.rng.one_in(self.crash) {
            // A crash right after the action, before what it found is written down.
            self.log.push(format!("{name}: crashed after the action"));
            let wake = self.now + Duration::from_secs(1 + self.rng.below(30));
            self.end_pass(i, wake);
        }
        self.check(seed);
    }

    fn act(&mut self, i: usize, action: Action) -> Result<(), PassError> {
        let name = self.nodes[i].name.clone();
        let now = self.now;
        macro_rules! obs {
            () => {
                self.nodes[i].obs.as_mut().expect("a pass")
            };
        }
        match action {
            Action::Continue => {}
            Action::Finish {
                outcome,
                lease_wait,
            } => {
                let poll = if lease_wait {
                    Duration::from_secs(1)
                } else {
                    Duration::from_secs(30 + self.rng.below(60))
                };
                let _ = outcome;
                self.end_pass(i, now + poll);
            }
            Action::LookSettings => obs!().settings = Some(Ok(self.settings(i))),
            Action::LookPlan => {
                let plan = self.plan(i);
                obs!().plan = Some(plan);
            }
            Action::LookMachine => {
                let n = &self.nodes[i];
                let m = Machine {
                    boot_id: format!("boot-{}", n.boot),
                    current: Some(n.current.clone()),
                    previous_saved: n.previous.is_some(),
                };
                obs!().machine = Some(m);
            }
            Action::LookCoordination => obs!().coordination = Some(Coordination::Lease),
            Action::LookHalt => {
                let h = self.api(|w| w.halt.clone())?;
                obs!().halt = Some(h);
            }
            Action::LookHaltHeld => {
                let h = self.api(|w| w.halt.clone())?;
                obs!().halt_held = Some(h);
            }
            Action::LookHeadHeld => {
                let head = self.commits[self.head].id.clone();
                obs!().head_held = Some(head);
            }
            Action::Replan => {
                let t = local(self, &self.nodes[i]);
                self.nodes[i].obs = Some(Observation::pass(t, Duration::from_secs(60), false));
                self.nodes[i].renewing = None;
            }
            Action::LookBlocker => {
                let blocked = self.rng.one_in(50);
                let b = blocked.then(|| Blocker {
                    budget: "default/db".into(),
                    pod: "default/db-0".into(),
                    why: "0 disruptions allowed".into(),
                    never: false,
                });
                obs!().blocker = Some(b);
            }
            Action::Acquire => {
                let c = self.acquire(i)?;
                let o = obs!();
                o.claim = Some(c);
                // What was given back before is taken again.
                o.cluster_done = None;
            }
            Action::WaitForLease { wait, .. } => {
                let t = local(self, &self.nodes[i]);
                let o = obs!();
                o.claim = None;
                o.waiting_since.get_or_insert(t);
                self.nodes[i].wake = now + wait.min(Duration::from_secs(5));
            }
            Action::LookGate => {
                let others: Vec<usize> = (0..self.nodes.len()).filter(|&j| j != i).collect();
                let mut gate = Ok(self
                    .nodes
                    .iter()
                    .enumerate()
                    .filter(|(j, _)| self.ready(*j))
                    .map(|(_, n)| n.name.clone())
                    .collect::<Vec<_>>());
                for j in others {
                    let other = &self.nodes[j].name;
                    if !self.ready(j) {
                        gate = Err(format!("node {other} is NotReady"));
                    } else if self.nodes_api[other].by_nk3 {
                        gate = Err(format!("node {other} is cordoned by nk3"));
                    }
                }
                let g = self.api(|_| gate)?;
                obs!().gate = Some(g);
            }
            Action::LookRebootReasons(system) => {
                let kernel = self
                    .commits
                    .iter()
                    .any(|c| system_of(&c.id) == system && c.kernel);
                obs!().reboot_reasons = Some(if kernel {
                    vec!["kernel".into()]
                } else {
                    vec![]
                });
            }
            Action::Renew(lease) => {
                let s = World::slot(&lease);
                self.api(|w| {
                    if w.leases[s].holder.as_deref() == Some(name.as_str()) {
                        w.leases[s].rv += 1;
                    }
                })?;
                obs!().renewed = true;
            }
            Action::KeepRenewed { lease, .. } => {
                self.nodes[i].renewing = Some(lease);
                obs!().renewing = true;
            }
            Action::ConfirmLease { lease, before } => {
                let s = World::slot(&lease);
                let t = local(self, &self.nodes[i]);
                let c = self.api(|w| {
                    let lost = if w.leases[s].holder.as_deref() == Some(name.as_str()) {
                        w.leases[s].rv += 1;
                        None
                    } else {
                        let holder = w.leases[s].holder.clone();
                        Some(format!(
                            "{} holds it",
                            holder.unwrap_or_else(|| "nobody".into())
                        ))
                    };
                    Confirmed {
                        at: t,
                        before,
                        lost,
                        halt: w.halt.clone(),
                    }
                })?;
                obs!().lease_confirmed = Some(c);
            }
            Action::WriteToken => obs!().token_written = true,
            Action::SetChannel(_) => obs!().channel_set = Some(Ok(())),
            Action::SavePrevious => {
                let n = &mut self.nodes[i];
                n.previous = n.disk.clone();
                obs!().previous_saved = true;
            }
            Action::Land => {
                // The plan's file: the commit the phase is about.
                let commit = self.nodes[i].state.phase.commit().map(str::to_string);
                self.nodes[i].disk = commit;
                obs!().landed = true;
            }
            Action::Build { .. } => {
                let commit = self.nodes[i].state.phase.commit().unwrap_or("").to_string();
                let c = self.commit(&commit).cloned();
                self.now += Duration::from_secs(5 + self.rng.below(60));
                let built = match c {
                    Some(c) if c.builds => Ok(Built {
                        system: system_of(&c.id),
                        has_agent: true,
                    }),
                    _ => Err(Failed {
                        failure: Failure::Exited,
                        message: "error: undefined variable".into(),
                    }),
                };
                obs!().built = Some(built);
            }
            Action::Inspect(system) => {
                obs!().built = Some(Ok(Built {
                    system,
                    has_agent: true,
                }))
            }
            Action::Restore { had_previous } => {
                let n = &mut self.nodes[i];
                n.disk = if had_previous {
                    n.previous.clone()
                } else {
                    None
                };
                obs!().restored = true;
            }
            Action::Cordon => {
                let was = self.api(|w| {
                    let o = w.nodes_api.get_mut(&name).expect("node");
                    let was = o.cordoned && !o.by_nk3;
                    o.cordoned = true;
                    o.by_nk3 = !was;
                    was
                })?;
                obs!().cordoned = Some(was);
            }
            Action::Drain(_) => {
                self.now += Duration::from_secs(self.rng.below(20));
                let r = if self.rng.one_in(30) {
                    Err("drain timed out".to_string())
                } else {
                    Ok(())
                };
                obs!().drained = Some(r);
            }
            Action::Cluster(ops) => {
                for op in ops.clone() {
                    self.op(i, op)?;
                }
                obs!().cluster_done = Some(ops);
            }
            Action::Switch => {
                let commit = self.nodes[i].state.phase.commit().unwrap_or("").to_string();
                let system = system_of(&commit);
                let n = &mut self.nodes[i];
                n.generations.push(system.clone());
                n.current = system;
                obs!().switched = Some(Ok(()));
            }
            Action::Boot => {
                let commit = self.nodes[i].state.phase.commit().unwrap_or("").to_string();
                let system = system_of(&commit);
                let n = &mut self.nodes[i];
                n.generations.push(system.clone());
                n.next_boot = Some(system);
                obs!().switched = Some(Ok(()));
            }
            Action::Rollback => {
                let n = &mut self.nodes[i];
                n.rolled_back = true;
                if n.generations.len() > 1 {
                    n.generations.pop();
                }
                let back = n.generations.last().cloned().unwrap_or_default();
                n.current = back.clone();
                if n.next_boot.is_some() {
                    n.next_boot = Some(back);
                }
                obs!().rolled_back = Some(Ok(()));
            }
            Action::Reboot => {
                // The machine goes down; the agent with it.
                let n = &mut self.nodes[i];
                n.boot += 1;
                if let Some(s) = n.next_boot.take() {
                    n.current = s;
                }
                let back = now + Duration::from_secs(30 + self.rng.below(90));
                n.down_until = Some(back);
                self.log.push(format!("{name}: rebooting"));
                self.end_pass(i, back);
            }
            Action::CheckHealth { .. } => {
                self.now += Duration::from_secs(self.rng.below(3));
                let ok = self.ready(i);
                let r = if ok {
                    Ok(())
                } else {
                    Err("k3s.service is not active".to_string())
                };
                obs!().health = Some(r);
            }
            Action::Sleep(d) => {
                obs!().health = None;
                self.nodes[i].wake = now + d;
            }
            Action::RecordApplied => obs!().recorded = true,
        }
        Ok(())
    }

    fn op(&mut self, i: usize, op: Op) -> Result<(), PassError> {
        let name = self.nodes[i].name.clone();
        match op {
            Op::Uncordon { was_unschedulable } => self.api(|w| {
                let o = w.nodes_api.get_mut(&name).expect("node");
                o.by_nk3 = false;
                o.cordoned = was_unschedulable;
            }),
            Op::Release(lease) => {
                let s = World::slot(&lease);
                self.api(|w| {
                    if w.leases[s].holder.as_deref() == Some(name.as_str()) {
                        w.leases[s].holder = None;
                        w.leases[s].rv += 1;
                    }
                })
            }
            Op::LetGo { .. } => self.api(|w| {
                let o = w.nodes_api.get_mut(&name).expect("node");
                if o.by_nk3 {
                    o.by_nk3 = false;
                    o.cordoned = false;
                }
                for l in &mut w.leases {
                    if l.holder.as_deref() == Some(name.as_str()) {
                        l.holder = None;
                        l.rv += 1;
                    }
                }
            }),
            Op::SetHalt { commit, reason } => {
                let steps = self.steps;
                let newer = |w: &World, a: &str, b: &str| w.index(a) > w.index(b);
                self.api(|w| {
                    w.halted_at.entry(commit.clone()).or_insert(steps);
                    let this = Halt {
                        commit,
                        reason,
                        node: name.clone(),
                        earlier: vec![],
                    };
                    // As the agent keeps them: the newest halt, and those before it.
                    match w.halt.take() {
                        Some(mut h) if newer(w, &h.commit, &this.commit) => {
                            if h.of(&this.commit).is_none() {
                                h.earlier.insert(0, this);
                            }
                            w.halt = Some(h);
                        }
                        Some(mut h) if h.commit != this.commit => {
                            let mut earlier = std::mem::take(&mut h.earlier);
                            earlier.retain(|e| e.commit != this.commit);
                            earlier.insert(0, h);
                            w.halt = Some(Halt { earlier, ..this });
                        }
                        Some(h) => w.halt = Some(h),
                        None => w.halt = Some(this),
                    }
                })
            }
            // The halt stays on record, marked lifted: nothing for the decision changes.
            Op::LiftOlderHalt(_) => self.api(|_| ()),
        }
    }

    /// Runs the cluster: faults for a while, then none until it settles.
    fn run(&mut self, seed: u64) {
        let faulty_until = 400 + self.rng.below(800);
        let mut quiet_since = None;
        for step in 0..20_000u64 {
            self.steps = step;
            if step == faulty_until {
                self.crash = u64::MAX;
                self.api_error = u64::MAX;
            }
            if step < faulty_until {
                // A new commit mid-rollout.
                if self.head + 1 < self.commits.len() && self.rng.one_in(150) {
                    self.head += 1;
                    self.log.push(format!("pushed commit {}", self.head));
                }
                // A node that dies for good (at most one, only in clusters of three up).
                if self.nodes.len() >= 3
                    && self.rng.one_in(3000)
                    && self.nodes.iter().all(|n| !n.dead)
                {
                    let j = self.rng.below(self.nodes.len() as u64) as usize;
                    self.nodes[j].dead = true;
                    self.nodes[j].obs = None;
                    self.nodes[j].renewing = None;
                    self.log.push(format!("{} died", self.nodes[j].name));
                }
            } else if self.head + 1 < self.commits.len() {
                self.head = self.commits.len() - 1;
            }
            // Machines that finished rebooting come back.
            for n in &mut self.nodes {
                if n.down_until.is_some_and(|t| t <= self.now) {
                    n.down_until = None;
                }
            }
            // The next agent: one of those awake, at random; else time moves on.
            let awake: Vec<usize> = (0..self.nodes.len())
                .filter(|&j| {
                    let n = &self.nodes[j];
                    !n.dead && n.down_until.is_none() && n.wake <= self.now
                })
                .collect();
            if awake.is_empty() {
                let next = self
                    .nodes
                    .iter()
                    .filter(|n| !n.dead)
                    .map(|n| n.down_until.unwrap_or(n.wake).max(self.now))
                    .min();
                match next {
                    Some(t) => self.now = t.max(self.now + Duration::from_millis(1)),
                    None => break,
                }
                continue;
            }
            let i = awake[self.rng.below(awake.len() as u64) as usize];
            self.step(seed, i);
            self.now += Duration::from_millis(self.rng.below(500));
            if step > faulty_until {
                if self.settled() {
                    let since = *quiet_since.get_or_insert(step);
                    if step - since > 200 {
                        return self.converged(seed);
                    }
                } else {
                    quiet_since = None;
                }
            }
        }
        self.fail(seed, "the cluster did not settle within 20,000 steps");
    }

    /// A node dead, NotReady or frozen: the rollout waits for a person.
    fn stuck(&self) -> bool {
        (0..self.nodes.len()).any(|j| {
            let n = &self.nodes[j];
            !self.ready(j)
                || matches!(n.state.phase, Phase::Frozen { .. })
                // Frozen once, and a new commit did not get through on it yet.
                || (n.was_frozen && self.nodes_api[&n.name].by_nk3)
        })
    }

    /// Every live node idle or frozen, and nothing held that should not be.
    fn settled(&self) -> bool {
        // With a node dead or NotReady (its rollback unhealthy too) or frozen (keeping its
        // lease), the others wait: that is settled too, until a person acts.
        let dead = self.stuck();
        self.nodes.iter().all(|n| {
            n.dead
                || matches!(n.state.phase, Phase::Frozen { .. })
                || (dead
                    && matches!(n.state.phase, Phase::Built { .. })
                    && n.state
                        .last
                        .as_ref()
                        .is_some_and(|l| l.outcome == Outcome::Waiting))
                || (n.state.phase == Phase::Idle
                    && n.state.last.as_ref().is_some_and(|l| {
                        matches!(
                            l.outcome,
                            Outcome::NoChange
                                | Outcome::Rejected
                                | Outcome::Refused
                                | Outcome::Waiting
                        )
                    }))
        })
    }

    /// The end state: each live node runs the head commit, or a refused or halted one's
    /// predecessor; a frozen node keeps its lease; nobody else holds one or a cordon.
    fn converged(&self, seed: u64) {
        let head = &self.commits[self.head];
        let frozen = self
            .nodes
            .iter()
            .any(|n| matches!(n.state.phase, Phase::Frozen { .. }));
        let dead = self.stuck();
        for n in &self.nodes {
            if n.dead || matches!(n.state.phase, Phase::Frozen { .. }) {
                continue;
            }
            let applied = n.state.applied.as_deref() == Some(head.id.as_str());
            let refused = n
                .state
                .rejected
                .as_ref()
                .is_some_and(|r| r.commit == head.id);
            if !applied && !refused && !frozen && !dead {
                self.fail(
                    seed,
                    &format!(
                        "{} settled neither on the head commit nor refusing it: {:?}",
                        n.name, n.state.last
                    ),
                );
            }
            if applied && n.current != system_of(&head.id) {
                self.fail(
                    seed,
                    &format!(
                        "{} records the head as applied but runs {}",
                        n.name, n.current
                    ),
                );
            }
            if !applied && n.current == system_of(&head.id) && !head.healthy {
                self.fail(seed, &format!("{} runs the unhealthy head commit", n.name));
            }
            // What is held is judged between passes, not halfway through one; a node that
            // was frozen keeps what it held until a commit gets through on it.
            if n.obs.is_some() || n.was_frozen {
                continue;
            }
            if self.nodes_api[&n.name].by_nk3 {
                self.fail(seed, &format!("{} is left cordoned by nk3", n.name));
            }
            if !self.holder_of(&n.name).is_empty() {
                self.fail(
                    seed,
                    &format!("{} is idle but holds a rollout lease", n.name),
                );
            }
            if n.state
                .rejected
                .as_ref()
                .is_some_and(|r| r.commit == head.id)
                && head.builds
                && head.healthy
                && !frozen
                && !dead
            {
                self.fail(
                    seed,
                    &format!("{} refused a good commit: {:?}", n.name, n.state.rejected),
                );
            }
            if !head.builds && n.disk.as_deref() == Some(head.id.as_str()) {
                self.fail(
                    seed,
                    &format!("{} kept the configuration Nix refused on disk", n.name),
                );
            }
        }
    }
}

#[test]
#[allow(clippy::print_stderr)] // the seed count and throughput, for the README
fn the_rollout_protocol_holds_under_faults() {
    let one = std::env::var("NK3_DST_SEED")
        .ok()
        .and_then(|s| s.parse().ok());
    let count: u64 = std::env::var("NK3_DST_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100_000);
    let from: u64 = std::env::var("NK3_DST_FROM")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let seeds: Vec<u64> = match one {
        Some(s) => vec![s],
        None => (from..from + count).collect(),
    };
    let started = std::time::Instant::now();
    // The seeds are independent: spread over the machine's cores.
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let steps: u64 = std::thread::scope(|scope| {
        let handles: Vec<_> = seeds
            .chunks(seeds.len().div_ceil(threads).max(1))
            .map(|chunk| {
                scope.spawn(move || {
                    chunk
                        .iter()
                        .map(|&seed| {
                            let mut w = World::new(seed);
                            w.run(seed);
                            w.steps
                        })
                        .sum::<u64>()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
            .sum()
    });
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "deterministic simulation: {} rollouts, {steps} agent steps in {secs:.1} s ({:.0} rollouts/s)",
        seeds.len(),
        seeds.len() as f64 / secs.max(1e-9)
    );
}
