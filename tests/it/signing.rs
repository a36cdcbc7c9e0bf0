//! Signed commits: with an allowed-signers file, only commits signed by a listed key are
//! applied (checked with `git verify-commit`; keys made by ssh-keygen at test time).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::fixtures::{Node, Repo};
use crate::support::stderr;

fn keygen(dir: &Path, name: &str) -> (PathBuf, String) {
    let key = dir.join(name);
    let o = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"])
        .arg(&key)
        .output()
        .expect("ssh-keygen is needed (openssh-client; the test command installs it)");
    assert!(o.status.success(), "{}", stderr(&o));
    let public = std::fs::read_to_string(key.with_extension("pub")).unwrap();
    (key, public.trim().to_string())
}

const INVENTORY: &str = "join_address: 172.30.190.3
join_token: 2f909ce8-cae1-439a-86b3-da87b7ee9f55
default_gateway: 172.30.190.1
rollout: { reboot: when-needed }
nodes:
  172.30.190.3: { initiator: true, interface: enp3s0f0, boot_device: /dev/nvme0n1 }
";

#[test]
fn only_commits_signed_by_an_allowed_key_are_applied() {
    let keys = tempfile::tempdir().unwrap();
    let (trusted, trusted_pub) = keygen(keys.path(), "trusted");
    let (stranger, _) = keygen(keys.path(), "stranger");
    let signers = keys.path().join("allowed_signers");
    std::fs::write(&signers, format!("ops@example.com {trusted_pub}\n")).unwrap();

    let repo = Repo::with_inventory("nodes: {}\n");
    let first = repo.commit_signed("inventory.yaml", INVENTORY, "signed", &trusted);
    let mut node = Node::new(&repo.url(), "172.30.190.3");
    node.env
        .push(("NK3_ALLOWED_SIGNERS".into(), signers.display().to_string()));
    node.pass_ok();
    node.pass_ok();
    assert_eq!(node.state()["applied"], first.as_str());

    type Push<'a> = Box<dyn Fn() -> String + 'a>;
    let pushes: [(&str, Push); 2] = [
        (
            "unsigned",
            Box::new(|| {
                repo.commit(
                    "inventory.yaml",
                    &INVENTORY.replace("enp3s0f0", "eno1"),
                    "unsigned",
                )
            }),
        ),
        (
            "signed by a stranger",
            Box::new(|| {
                repo.commit_signed(
                    "inventory.yaml",
                    &INVENTORY.replace("enp3s0f0", "eno2"),
                    "not ours",
                    &stranger,
                )
            }),
        ),
    ];
    for (what, push) in pushes {
        let commit = push();
        let log = stderr(&node.run_once());
        assert!(
            log.contains(&format!("commit {commit} is not signed by an allowed key")),
            "{what}: {log}"
        );
        assert_eq!(node.state()["applied"], first.as_str(), "{what}");
        assert!(node.config().contains("\"enp3s0f0\""), "{what}");
    }

    let good = repo.commit_signed(
        "inventory.yaml",
        &INVENTORY.replace("enp3s0f0", "eno3"),
        "signed again",
        &trusted,
    );
    node.pass_ok();
    assert_eq!(node.state()["applied"], good.as_str());
    assert!(node.config().contains("\"eno3\""));
}
