//! The agent fetching over SSH (the system's ssh against a real sshd) and HTTPS (rustls
//! against git's own http-backend): what a node does with a deploy key, a known_hosts file
//! and a token, and what it refuses.

use crate::fixtures::{Node, Repo};
use crate::git_servers::{HttpsServer, SshServer};

const INVENTORY: &str = "cluster:
  join_address: 172.30.190.3
  join_token: 2f909ce8-cae1-439a-86b3-da87b7ee9f55
  default_gateway: 172.30.190.1
  nodes:
    172.30.190.3:
      initiator: true
      interface: enp3s0f0
      boot_device: /dev/nvme0n1
";

/// A pass that could not fetch: the node took nothing, and its log says why.
fn refused(node: &Node) -> String {
    let before = node.config();
    let o = node.run_once();
    assert!(
        !o.status.success(),
        "a node that never fetched fails its pass"
    );
    assert_eq!(node.config(), before, "the configuration stays as it was");
    assert!(node.state()["applied"].is_null());
    crate::support::stderr(&o)
}

/// Sets (or replaces) one variable of the agent's environment.
fn set(node: &mut Node, key: &str, value: impl std::fmt::Display) {
    node.env.retain(|(k, _)| k != key);
    node.env.push((key.into(), value.to_string()));
}

fn ssh_node(server: &SshServer, repo: &Repo) -> Node {
    let mut node = Node::new(&server.url(repo), "172.30.190.3");
    set(&mut node, "NK3_SSH_KEY_FILE", server.client_key.display());
    set(&mut node, "NK3_KNOWN_HOSTS", server.known_hosts.display());
    set(&mut node, "NK3_GIT_TIMEOUT", "10s");
    node
}

#[test]
fn an_ssh_repository_is_fetched_with_the_deploy_key_and_the_listed_host_key() {
    let server = SshServer::start();
    let repo = Repo::with_inventory(INVENTORY);
    let node = ssh_node(&server, &repo);
    let log = node.pass_ok();
    assert!(
        node.config().contains(&repo.head()[..12]),
        "the configuration of the head: {log}"
    );
    // A new commit arrives over the same transport.
    let next = repo.commit(
        "inventory.yaml",
        &INVENTORY.replace("enp3s0f0", "enp4s0"),
        "new interface",
    );
    node.pass_ok();
    assert!(node.config().contains(&next[..12]));
    assert!(node.config().contains("enp4s0"));
}

#[test]
fn an_ssh_host_whose_key_is_not_listed_is_refused_and_nothing_changes() {
    let server = SshServer::start();
    let repo = Repo::with_inventory(INVENTORY);
    let mut node = ssh_node(&server, &repo);
    set(
        &mut node,
        "NK3_KNOWN_HOSTS",
        server.wrong_known_hosts().display(),
    );
    let log = refused(&node);
    assert!(log.contains("Host key verification failed"), "{log}");
    assert!(log.contains("ssh to 127.0.0.1 failed"), "{log}");
    assert!(!log.contains("@@@"), "only ssh's last lines: {log}");

    // A deploy key the server does not know: refused as well, with ssh's reason.
    let mut node = ssh_node(&server, &repo);
    set(
        &mut node,
        "NK3_SSH_KEY_FILE",
        server.stranger_key().display(),
    );
    let log = refused(&node);
    assert!(log.contains("Permission denied"), "{log}");
}

fn https_node(server: &HttpsServer, repo: &Repo, token: Option<&str>) -> (Node, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let mut node = Node::new(&server.url(repo), "172.30.190.3");
    // The agent trusts the system's roots; SSL_CERT_FILE points them at the test CA.
    set(&mut node, "SSL_CERT_FILE", server.ca_file.display());
    set(&mut node, "NK3_GIT_TIMEOUT", "10s");
    if let Some(token) = token {
        let file = dir.path().join("token");
        std::fs::write(&file, format!("{token}\n")).unwrap();
        set(&mut node, "NK3_REPO_TOKEN_FILE", file.display());
    }
    (node, dir)
}

#[test]
fn an_https_repository_is_fetched_with_the_token_and_the_token_stays_out_of_logs() {
    let repo = Repo::with_inventory(INVENTORY);
    let server = HttpsServer::serve(repo.bare.parent().unwrap(), Some("gh-s3cret-token"));
    let (node, _keep) = https_node(&server, &repo, Some("gh-s3cret-token"));
    let log = node.pass_ok();
    assert!(node.config().contains(&repo.head()[..12]), "{log}");
    let next = repo.commit(
        "inventory.yaml",
        &INVENTORY.replace("enp3s0f0", "enp4s0"),
        "new interface",
    );
    let log2 = node.pass_ok();
    assert!(node.config().contains(&next[..12]), "{log2}");
    let seen = server.log.lock().unwrap().clone();
    assert!(
        seen.iter()
            .any(|r| r == "POST /infra.git/git-upload-pack 200 with credentials"),
        "{seen:?}"
    );
    for text in [&log, &log2, &node.config()] {
        assert!(!text.contains("gh-s3cret-token"));
    }
    let clone_config =
        std::fs::read_to_string(node.root.join("var/lib/nk3-agent/repo/config")).unwrap();
    assert!(!clone_config.contains("gh-s3cret-token"));

    // Without the token the server's 401 is reported, and nothing changes.
    let (bare, _keep) = https_node(&server, &repo, None);
    let log = refused(&bare);
    assert!(log.contains("asks for credentials"), "{log}");
    // A wrong one is refused.
    let (wrong, _keep) = https_node(&server, &repo, Some("not-it"));
    let log = refused(&wrong);
    assert!(log.contains("refused the credentials"), "{log}");
}

#[test]
fn an_https_server_the_node_does_not_trust_is_refused() {
    let repo = Repo::with_inventory(INVENTORY);
    let server = HttpsServer::serve(repo.bare.parent().unwrap(), None);
    let (mut node, _keep) = https_node(&server, &repo, None);
    // The system's roots, which do not hold the test CA.
    node.env.retain(|(k, _)| k != "SSL_CERT_FILE");
    let log = refused(&node);
    assert!(log.contains("certificate"), "{log}");
    assert!(
        server.log.lock().unwrap().is_empty(),
        "no request got through"
    );
}

#[test]
fn the_token_is_not_sent_where_a_redirect_points() {
    let repo = Repo::with_inventory(INVENTORY);
    let elsewhere = HttpsServer::serve(repo.bare.parent().unwrap(), Some("gh-s3cret-token"));
    let front = HttpsServer::redirecting(&format!("https://127.0.0.1:{}", elsewhere.port));
    let (mut node, keep) = https_node(&front, &repo, Some("gh-s3cret-token"));
    // Both servers' certificates are trusted: only the origin keeps the token home.
    let both = keep.path().join("both.pem");
    let pem = |f: &std::path::Path| std::fs::read_to_string(f).unwrap();
    std::fs::write(&both, pem(&front.ca_file) + &pem(&elsewhere.ca_file)).unwrap();
    set(&mut node, "SSL_CERT_FILE", both.display());
    let log = refused(&node);
    assert!(
        log.contains(&format!(
            "nk3 sends its credentials only to https://127.0.0.1:{}",
            front.port
        )),
        "{log}"
    );
    let seen = elsewhere.log.lock().unwrap().clone();
    assert!(!seen.is_empty(), "the redirect was followed: {seen:?}");
    assert!(
        seen.iter().all(|r| !r.ends_with("with credentials")),
        "{seen:?}"
    );
}

#[test]
fn the_ssh_program_is_a_setting_and_one_that_cannot_run_is_named() {
    let server = SshServer::start();
    let repo = Repo::with_inventory(INVENTORY);
    let mut node = ssh_node(&server, &repo);
    set(&mut node, "NK3_SSH", "/nonexistent/ssh");
    let log = refused(&node);
    assert!(
        log.contains("cannot run /nonexistent/ssh to reach 127.0.0.1"),
        "{log}"
    );
}
