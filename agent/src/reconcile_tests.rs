//! Steps 1 to 3 over a git source made of fakes: which head is taken, what a refused or
//! unreachable one leaves, and what the commit's inventory declares for this machine.

use std::cell::RefCell;

use crate::fakes::{agent, FakeGit as Fake, C1, C2, INVENTORY};
use crate::reconcile::Decision;

#[test]
fn a_refused_head_keeps_the_commit_taken_before_and_a_good_one_clears_the_refusal() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = agent(dir.path());
    let git = Fake {
        heads: RefCell::new(vec![Ok(C1), Ok(C2), Ok(C1)]),
        refused: vec![C2],
        ..Fake::default()
    };
    assert_eq!(a.fetch(&git).unwrap().as_deref(), Some(C1));
    assert_eq!(a.fetch(&git).unwrap().as_deref(), Some(C1), "C2 refused");
    let refused = a.state.refused_head.clone().unwrap();
    assert!(refused.contains("was rewritten"), "{refused}");
    assert_eq!(a.fetch(&git).unwrap().as_deref(), Some(C1));
    assert_eq!(a.state.refused_head, None);
}

#[test]
fn an_unreachable_source_is_recorded_once_and_the_last_commit_kept() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = agent(dir.path());
    let git = Fake {
        heads: RefCell::new(vec![
            Ok(C1),
            Err("cannot reach it"),
            Err("cannot reach it"),
            Ok(C2),
        ]),
        ..Fake::default()
    };
    assert_eq!(a.fetch(&git).unwrap().as_deref(), Some(C1));
    assert_eq!(a.fetch(&git).unwrap().as_deref(), Some(C1));
    let problem = a.state.source_problem.clone().unwrap();
    assert!(
        problem.starts_with("cannot reach it; keeping commit"),
        "{problem}"
    );
    assert_eq!(a.fetch(&git).unwrap().as_deref(), Some(C1));
    assert_eq!(a.state.source_problem.as_deref(), Some(problem.as_str()));
    // On disk too: `status` reads it from there.
    let saved = crate::state::peek(&dir.path().join("state"))
        .unwrap()
        .unwrap();
    assert_eq!(saved.source_problem.as_deref(), Some(problem.as_str()));
    assert_eq!(a.fetch(&git).unwrap().as_deref(), Some(C2));
    assert_eq!(a.state.source_problem, None);
}

#[test]
fn the_plan_is_read_from_the_commits_own_files() {
    let dir = tempfile::tempdir().unwrap();
    let a = agent(dir.path());
    let mut git = Fake::default();
    git.files.insert((C1, "inventory.yaml"), INVENTORY.into());
    match a.decide(&git, C1).unwrap() {
        Decision::Apply { target, .. } => {
            assert_eq!(target.commit, C1);
            assert!(target.rendered.contains(&format!("at commit {C1}")));
            assert!(target.rendered.contains("enp3s0f0"));
        }
        other => panic!("{other:?}"),
    }
    // Another commit's inventory is not this one's.
    match a.decide(&git, C2).unwrap() {
        Decision::BadInventory { problems } => {
            assert!(problems[0].contains("no such file"), "{problems:?}");
        }
        other => panic!("{other:?}"),
    }
    // A node's own template, from the same commit.
    git.files.insert(
        (C2, "inventory.yaml"),
        INVENTORY.replace(
            "boot_device: /dev/nvme0n1 }",
            "boot_device: /dev/nvme0n1, template: node.nix.hbs }",
        ),
    );
    git.files.insert(
        (C2, "node.nix.hbs"),
        "{ ... }: { networking.hostName = \"{{node.hostname}}\"; system.stateVersion = \"24.05\"; }\n".into(),
    );
    match a.decide(&git, C2).unwrap() {
        Decision::Apply { target, .. } => {
            assert!(
                target.rendered.contains("networking.hostName"),
                "{}",
                target.rendered
            );
        }
        other => panic!("{other:?}"),
    }
}
