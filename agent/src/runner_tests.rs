//! The runner over fakes of every side effect: the order in which a pass touches the
//! cluster and the machine, and what it does when the cluster changes under it.

use std::cell::RefCell;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use crate::effects::{GitSource, RolloutApi};
use crate::fakes::{agent, FakeApi, FakeClock, FakeGit, FakeNixos, Shared, World, C1, INVENTORY};
use crate::reconcile::Agent;
use crate::state::Outcome;

/// An agent whose commit C1 brings a new resolver, over a fake machine and cluster.
fn rig(dir: &std::path::Path) -> (Agent, Shared) {
    let inventory = INVENTORY.replace(
        "  nodes:",
        "  nameservers: [ 9.9.9.9 ]\n  rollout: { reboot: when-needed, health_timeout: 30s }\n  nodes:",
    );
    let world: Shared = Arc::new(Mutex::new(World {
        current: "/nix/store/0-initial".into(),
        ..World::default()
    }));
    let mut a = agent(dir);
    a.effects.nixos = Box::new(FakeNixos(world.clone()));
    let w = world.clone();
    a.effects.api = Some(Box::new(move |host| {
        let api = FakeApi {
            me: host.into(),
            world: w.clone(),
        };
        Ok(Some(Arc::new(api) as Arc<dyn RolloutApi>))
    }));
    a.effects.git = Some(Box::new(move || {
        let mut git = FakeGit {
            heads: RefCell::new(vec![Ok(C1)]),
            ..FakeGit::default()
        };
        git.files.insert((C1, "inventory.yaml"), inventory.clone());
        Ok(Box::new(git) as Box<dyn GitSource>)
    }));
    a.effects.clock = Box::new(FakeClock(Mutex::new(SystemTime::now())));
    (a, world)
}

/// Where `call` first comes in the calls, if it does.
fn at(calls: &[String], call: &str) -> Option<usize> {
    calls.iter().position(|c| c == call)
}

#[test]
fn a_pass_takes_the_lease_before_it_disrupts_and_gives_everything_back_after() {
    let dir = tempfile::tempdir().unwrap();
    let (mut a, world) = rig(dir.path());
    assert_eq!(a.pass().unwrap(), Outcome::Applied);
    let w = world.lock().unwrap();
    let c = &w.calls;
    let order: Vec<usize> = [
        "nixos build",
        "api acquire",
        "api cordon",
        "api drain",
        "nixos switch",
        "api healthy",
        "api uncordon",
        "api release",
    ]
    .iter()
    .map(|call| at(c, call).unwrap_or_else(|| panic!("no {call}: {c:?}")))
    .collect();
    assert!(order.windows(2).all(|p| p[0] < p[1]), "{c:?}");
    // Confirmed just before each disruption: between the last renewal before the cordon,
    // the drain or the switch and that step, nothing else disruptive happened.
    let disruptive = ["api cordon", "api drain", "nixos switch"];
    for step in disruptive {
        let i = at(c, step).unwrap();
        let renewed = c[..i].iter().rposition(|x| x == "api renew");
        let since = renewed.map(|r| &c[r + 1..i]);
        assert!(
            since.is_some_and(|s| s.iter().all(|x| !disruptive.contains(&x.as_str()))),
            "no renewal right before {step}: {c:?}"
        );
    }
    assert_eq!((w.holder.as_deref(), w.cordoned), (None, false));
    assert_eq!(a.state.applied.as_deref(), Some(C1));
}

#[test]
fn a_lease_lost_during_the_drain_stops_the_pass_before_the_switch() {
    let dir = tempfile::tempdir().unwrap();
    let (mut a, world) = rig(dir.path());
    world.lock().unwrap().steal_during_drain = true;
    assert_eq!(a.pass().unwrap(), Outcome::Waiting);
    let w = world.lock().unwrap();
    assert_eq!(at(&w.calls, "nixos switch"), None, "{:?}", w.calls);
    assert!(!w.cordoned, "uncordoned: {:?}", w.calls);
    assert_eq!(w.holder.as_deref(), Some("someone-else"));
    assert_ne!(a.state.applied.as_deref(), Some(C1));
}

#[test]
fn an_unhealthy_generation_is_rolled_back_and_its_commit_halted() {
    let dir = tempfile::tempdir().unwrap();
    let (mut a, world) = rig(dir.path());
    world.lock().unwrap().unhealthy = vec!["/nix/store/1-new".into()];
    let outcome = a.pass().unwrap();
    let w = world.lock().unwrap();
    let c = &w.calls;
    assert_eq!(outcome, Outcome::RolledBack, "{c:?}");
    let (rollback, halt, release) = (
        at(c, "nixos rollback").expect("rolled back"),
        at(c, &format!("api halt {C1}")).expect("halted"),
        at(c, "api release").expect("released"),
    );
    assert!(rollback < halt && halt < release, "{c:?}");
    assert_eq!(w.current, "/nix/store/0-initial");
    assert_eq!((w.holder.as_deref(), w.cordoned), (None, false));
    assert_eq!(
        a.state.rejected.as_ref().map(|r| r.commit.as_str()),
        Some(C1)
    );
}

#[test]
fn a_commit_halted_by_another_node_during_the_drain_is_given_back_not_switched_to() {
    let dir = tempfile::tempdir().unwrap();
    let (mut a, world) = rig(dir.path());
    world.lock().unwrap().halt_during_drain = Some(C1.into());
    a.pass().unwrap();
    let w = world.lock().unwrap();
    let c = &w.calls;
    assert_eq!(at(c, "nixos switch"), None, "{c:?}");
    // The halt was read again after the drain, before the switch would have been.
    let drain = at(c, "api drain").unwrap();
    assert!(c[drain..].iter().any(|x| x == "api read halt"), "{c:?}");
    assert_eq!((w.holder.as_deref(), w.cordoned), (None, false), "{c:?}");
    assert_eq!(
        a.state.rejected.as_ref().map(|r| r.commit.as_str()),
        Some(C1)
    );
    assert_ne!(a.state.applied.as_deref(), Some(C1));
}
