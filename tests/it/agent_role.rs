//! Agent-role nodes, against the real control plane with RBAC and NodeRestriction on: k3s
//! writes no kubeconfig there, so a node is told from a fresh machine by what k3s left in
//! its data directory, and it rolls under the lease only with the least-privilege
//! credentials `nk3-agent credentials` makes on a server.

use std::path::{Path, PathBuf};

use nk3_controlplane::ControlPlane;
use serde_json::Value;

use crate::fixtures::{Node, Repo};
use crate::rollout::{api, dns, hold_lease, holder, joined, lease, set_lease, HOST3, HOST5};
use crate::support::{run, stderr, stdout};

/// The rollout tests' cluster with node .5 an agent.
fn inventory() -> String {
    crate::rollout::inventory("").replace(
        "172.30.190.5: { interface",
        "172.30.190.5: { role: agent, interface",
    )
}

fn push_change(repo: &Repo) -> String {
    repo.commit("inventory.yaml", &dns(&inventory(), "9.9.9.9"), "resolver")
}

/// The service account the agent of `host` runs as.
fn account(host: &str) -> String {
    format!("system:serviceaccount:kube-system:nk3-agent-{host}")
}

/// `nk3-agent credentials` as an operator runs it on a server, with the admin kubeconfig.
fn credentials(api: &ControlPlane, dir: &Path, args: &[&str]) -> std::process::Output {
    let admin = dir.join("k3s.yaml");
    std::fs::write(&admin, api.admin_kubeconfig()).unwrap();
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_nk3-agent"));
    c.arg("credentials")
        .args(args)
        .arg("--kubeconfig")
        .arg(&admin)
        .current_dir(dir)
        .env_remove("NK3_KUBECONFIG");
    run(&mut c)
}

/// Makes `host`'s credentials and installs them on `node` as the module would name them.
fn install_credentials(api: &ControlPlane, node: &mut Node, host: &str) -> PathBuf {
    let file = node.root.join("var/lib/nk3-agent/kubeconfig");
    let o = credentials(
        api,
        &node.root,
        &[
            host,
            "--server",
            &api.url(),
            "--out",
            file.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    node.env
        .push(("NK3_KUBECONFIG".into(), file.display().to_string()));
    file
}

/// Every request of `user` the API answered 403.
fn forbidden(api: &ControlPlane, user: &str) -> Vec<String> {
    api.requests()
        .into_iter()
        .filter(|r| r.user == user && r.code == 403)
        .map(|r| format!("{} {} {}/{}", r.verb, r.resource, r.namespace, r.name))
        .collect()
}

#[test]
fn agent_node_without_a_kubeconfig_is_not_taken_for_a_fresh_machine() {
    let api = api();
    let repo = Repo::with_inventory(&inventory());
    let node = joined(&repo, &api, "172.30.190.5", HOST5);
    // Another node is mid-rollout: switching now would take a second node down.
    hold_lease(&api, HOST3, 600);
    push_change(&repo);
    let o = node.run_once();
    let log = stderr(&o);
    assert!(!o.status.success(), "{log}");
    assert!(log.contains("no credentials for the k3s API"), "{log}");
    assert!(log.contains("nk3-agent credentials"), "{log}");
    assert_eq!(
        node.calls("nixos-rebuild"),
        ["build -I nixos-config=$ROOT/etc/nixos/configuration.nix"],
        "built, and neither switched nor booted"
    );
    assert!(node
        .calls("systemctl")
        .iter()
        .all(|c| !c.contains("reboot")));
    assert_eq!(node.state()["phase"]["name"], "built");
    assert_eq!(holder(&api).as_deref(), Some(HOST3));
    // What the operator sees.
    let status = stdout(&run(&mut node.agent(&["status"])));
    assert!(
        status.contains("no credentials for the k3s API"),
        "{status}"
    );
    let plan = stdout(&run(&mut node.agent(&["plan"])));
    assert!(
        plan.contains("wait: no credentials for the k3s API"),
        "{plan}"
    );
    // A second pass builds nothing again and still waits.
    assert!(!node.run_once().status.success());
    assert_eq!(node.calls("nixos-rebuild").len(), 1);
}

#[test]
fn a_fresh_machine_applies_at_once_and_plan_says_so() {
    let repo = Repo::with_inventory(&inventory());
    let node = Node::new(&repo.url(), "172.30.190.5");
    let plan = stdout(&run(&mut node.agent(&["plan"])));
    assert!(
        plan.contains("directly, without the rollout lease"),
        "{plan}"
    );
    let log = node.pass_ok();
    assert!(
        log.contains("k3s has not joined a cluster on"),
        "the log says why no lease was taken:\n{log}"
    );
}

#[test]
fn agent_node_rolls_under_the_lease_with_only_nk3_credentials() {
    let api = api();
    let repo = Repo::with_inventory(&inventory());
    let mut node = joined(&repo, &api, "172.30.190.5", HOST5);
    install_credentials(&api, &mut node, HOST5);
    hold_lease(&api, HOST3, 600);
    let head = push_change(&repo);
    let plan = stdout(&run(&mut node.agent(&["plan"])));
    assert!(
        plan.contains("under the rollout lease: gate, drain, switch, verify"),
        "{plan}"
    );
    let o = node.run_once();
    let log = stderr(&o);
    assert!(
        log.contains(&format!("waiting for the rollout lease, held by {HOST3}")),
        "{log}"
    );
    assert!(node
        .calls("nixos-rebuild")
        .iter()
        .all(|c| c.starts_with("build")));
    // The holder is done: the agent node takes its turn.
    let mut l = lease(&api);
    l["spec"]["holderIdentity"] = Value::Null;
    set_lease(&api, l);
    let log = node.pass_ok();
    for want in [
        format!("Draining {HOST5}"),
        format!("k8s is ready on {HOST5}"),
    ] {
        assert!(log.contains(&want), "{want}:\n{log}");
    }
    assert_eq!(node.state()["applied"], head.as_str());
    assert_eq!(holder(&api), None, "released");
    let sa = account(HOST5);
    assert_eq!(
        forbidden(&api, &sa),
        Vec::<String>::new(),
        "no 403 in the run"
    );
    // It did the rollout as itself: took the lease, cordoned, uncordoned, told the cluster.
    let mine: Vec<_> = api.writes().into_iter().filter(|w| w.user == sa).collect();
    let did = |f: &dyn Fn(&nk3_controlplane::Write) -> bool| mine.iter().any(f);
    assert!(did(
        &|w| w.resource == "leases" && w.object["spec"]["holderIdentity"] == HOST5
    ));
    assert!(did(
        &|w| w.resource == "nodes" && w.object["spec"]["unschedulable"] == true
    ));
    assert!(did(
        &|w| w.resource == "events" && w.object["reason"] == "Ready"
    ));
    let n = api.node(HOST5).unwrap();
    assert!(n["spec"]["unschedulable"].is_null(), "uncordoned: {n}");
    assert_eq!(
        n["metadata"]["annotations"]["nk3.io/applied-commit"],
        head.as_str()
    );
    // And `status --cluster` works with these credentials too.
    let o = run(&mut node.agent(&["status", "--cluster"]));
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("lease nk3-rollout: free"),
        "{}",
        stdout(&o)
    );
    assert_eq!(forbidden(&api, &sa), Vec::<String>::new());
}

#[test]
fn kubelet_credentials_are_refused_before_anything_is_disrupted() {
    let api = api();
    let repo = Repo::with_inventory(&inventory());
    let mut node = joined(&repo, &api, "172.30.190.5", HOST5);
    let file = node.root.join("kubelet.kubeconfig");
    std::fs::write(&file, api.node_kubeconfig(HOST5)).unwrap();
    node.env
        .push(("NK3_KUBECONFIG".into(), file.display().to_string()));
    push_change(&repo);
    let o = node.run_once();
    let log = stderr(&o);
    assert!(!o.status.success(), "{log}");
    assert!(
        log.contains(&format!("a kubelet's (system:node:{HOST5})")),
        "{log}"
    );
    assert_eq!(node.calls("nixos-rebuild").len(), 1, "built only");
    let plan = stdout(&run(&mut node.agent(&["plan"])));
    assert!(
        plan.contains("wait: no usable credentials for the k3s API"),
        "{plan}"
    );
    let kubelet = format!("system:node:{HOST5}");
    let wrote: Vec<_> = api
        .requests()
        .into_iter()
        .filter(|r| r.user == kubelet && r.user_agent.starts_with("nk3-agent"))
        .filter(|r| !matches!(r.verb.as_str(), "get" | "list" | "watch"))
        .filter(|r| !r.resource.starts_with("self"))
        .map(|r| format!("{} {}", r.verb, r.resource))
        .collect();
    assert_eq!(wrote, Vec::<String>::new(), "the agent wrote nothing");
    assert!(api.node(HOST5).unwrap()["spec"]["unschedulable"].is_null());
    assert_eq!(holder(&api), None);
}

#[test]
fn credentials_are_idempotent_and_rotating_revokes_the_old_token() {
    let api = api();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("n.kubeconfig");
    let args = [
        HOST5,
        "--server",
        &api.url(),
        "--out",
        out.to_str().unwrap(),
    ];
    let first = credentials(&api, dir.path(), &args);
    assert!(first.status.success(), "{}", stderr(&first));
    let text = std::fs::read_to_string(&out).unwrap();
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&out).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let again = credentials(&api, dir.path(), &args);
    assert!(again.status.success(), "{}", stderr(&again));
    let said = stdout(&again);
    assert!(
        said.lines()
            .filter(|l| !l.starts_with("wrote")
                && !l.starts_with("copy")
                && !l.starts_with("revoke"))
            .all(|l| l.starts_with("unchanged")),
        "{said}"
    );
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        text,
        "the same token"
    );
    let old = token_of(&text);
    assert_eq!(whoami(&api, &old), 201);
    let mut rotate = args.to_vec();
    rotate.push("--rotate");
    let o = credentials(&api, dir.path(), &rotate);
    assert!(o.status.success(), "{}", stderr(&o));
    let new = token_of(&std::fs::read_to_string(&out).unwrap());
    assert_ne!(new, old);
    assert_eq!(whoami(&api, &new), 201);
    assert!(
        // The API server caches a token's authentication for a few seconds, and learns of
        // the deleted Secret through its informer.
        api.wait_for(std::time::Duration::from_secs(60), |api| whoami(api, &old)
            == 401),
        "the old token is refused"
    );
    // k3s.yaml names the server itself: the node could not reach that address.
    let o = credentials(&api, dir.path(), &[HOST5]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("pass --server"), "{}", stderr(&o));
    // A name Kubernetes would refuse is refused before anything is made.
    let o = credentials(&api, dir.path(), &["Node_1", "--server", &api.url()]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("not a Kubernetes node name"),
        "{}",
        stderr(&o)
    );
}

fn token_of(kubeconfig: &str) -> String {
    kubeconfig
        .lines()
        .find_map(|l| l.trim().strip_prefix("token: "))
        .unwrap()
        .to_string()
}

/// The status of a SelfSubjectReview with `token`: 201 when the API takes it.
fn whoami(api: &ControlPlane, token: &str) -> u16 {
    let ca = reqwest::Certificate::from_pem(api.ca_pem().as_bytes()).unwrap();
    let http = reqwest::blocking::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(ca)
        .build()
        .unwrap();
    http.post(format!(
        "{}/apis/authentication.k8s.io/v1/selfsubjectreviews",
        api.url()
    ))
    .bearer_auth(token)
    .json(
        &serde_json::json!({"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}),
    )
    .send()
    .unwrap()
    .status()
    .as_u16()
}

#[test]
fn credentials_from_the_inventory_name_the_node_and_the_join_address_and_never_narrow_the_roles() {
    let api = api();
    let dir = tempfile::tempdir().unwrap();
    let inv = dir.path().join("inventory.yaml");
    std::fs::write(&inv, inventory()).unwrap();
    let out = dir.path().join("n.kubeconfig");
    // The node by its address; three lease slots.
    let o = credentials(
        &api,
        dir.path(),
        &[
            "172.30.190.5",
            "--inventory",
            inv.to_str().unwrap(),
            "--max-unavailable",
            "3",
            "--out",
            out.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains(&format!("serviceaccount kube-system/nk3-agent-{HOST5}")),
        "{}",
        stdout(&o)
    );
    let text = std::fs::read_to_string(&out).unwrap();
    assert!(
        text.contains("server: \"https://172.30.190.3:6443\""),
        "the join address:\n{text}"
    );
    let names = |api: &ControlPlane| {
        let role = api
            .get("/apis/rbac.authorization.k8s.io/v1/namespaces/kube-system/roles/nk3-agent")
            .unwrap();
        role["rules"][0]["resourceNames"].clone()
    };
    let slots = serde_json::json!([
        "nk3-rollout",
        "nk3-rollout-0",
        "nk3-rollout-1",
        "nk3-rollout-2"
    ]);
    assert_eq!(names(&api), slots);
    // Another node's credentials, made without the inventory, leave the slots granted.
    let o = credentials(
        &api,
        dir.path(),
        &[
            HOST3,
            "--server",
            &api.url(),
            "--out",
            out.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(names(&api), slots, "not narrowed");
    // An address the inventory does not have is refused by name.
    let o = credentials(
        &api,
        dir.path(),
        &["172.30.190.9", "--inventory", inv.to_str().unwrap()],
    );
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("no node 172.30.190.9"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn validate_says_agent_nodes_need_credentials_of_their_own() {
    let dir = tempfile::tempdir().unwrap();
    let inv = dir.path().join("inventory.yaml");
    std::fs::write(&inv, inventory()).unwrap();
    let o = run(crate::support::nk3().arg("validate").arg(&inv));
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains(
            "each of the 1 needs its own from `nk3-agent credentials <hostname> --inventory"
        ),
        "{}",
        stdout(&o)
    );
    std::fs::write(&inv, crate::rollout::inventory("")).unwrap();
    let o = run(crate::support::nk3().arg("validate").arg(&inv));
    assert!(
        !stdout(&o).contains("credentials"),
        "no agent node, no note:\n{}",
        stdout(&o)
    );
}
