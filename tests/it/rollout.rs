//! Rollouts under the cluster's lease: the real agent on simulated nodes, against the real
//! Kubernetes control plane (`tests/controlplane`: kube-apiserver, kube-controller-manager,
//! kube-scheduler, etcd, and a kubelet stand-in per node heartbeating with the node's own
//! credentials) and real git repositories.

use std::time::{Duration, Instant};

use nk3_controlplane::{ControlPlane, Write};
use serde_json::{json, Value};

use crate::fixtures::{Node, Repo, Running};
use crate::support::{marked_template, root, run, stderr, stdout};

pub(crate) const HOST3: &str = "d6c27852-4d1c-5830-8e94-40b76fa2b5ec";
pub(crate) const HOST4: &str = "a9bcde5e-240d-54ad-8590-d8e18b7ee42f";
pub(crate) const HOST5: &str = "b0d1dcf2-588a-5740-b321-5c9ca8d6b9b0";

pub(crate) fn inventory(extra_cluster: &str) -> String {
    format!(
        "cluster:
  join_address: 172.30.190.3
  join_token: 2f909ce8-cae1-439a-86b3-da87b7ee9f55
  default_gateway: 172.30.190.1
{extra_cluster}  rollout:
    reboot: when-needed
    health_timeout: 3s
    drain_timeout: 2s
  nodes:
    172.30.190.3: {{ initiator: true, interface: enp3s0f0, boot_device: /dev/nvme0n1 }}
    172.30.190.4: {{ interface: enp3s0f0, boot_device: /dev/nvme0n1 }}
    172.30.190.5: {{ interface: enp3s0f0, boot_device: /dev/nvme0n1 }}
"
    )
}

/// Pushes the change most tests roll out: a new resolver for every node. The new head.
fn push_resolver(repo: &Repo) -> String {
    repo.commit(
        "inventory.yaml",
        &dns(&inventory(""), "9.9.9.9"),
        "resolver",
    )
}

pub(crate) fn dns(inv: &str, server: &str) -> String {
    inv.replace(
        "default_gateway: 172.30.190.1\n",
        &format!("default_gateway: 172.30.190.1\n  nameservers: [ {server} ]\n"),
    )
}

pub(crate) fn api() -> ControlPlane {
    let api = ControlPlane::start();
    for h in [HOST3, HOST4, HOST5] {
        api.add_node(h);
    }
    api
}

/// A node brought up before its k3s ran (nothing of k3s on it: it applied directly), then
/// k3s joined the cluster: its kubelet reports the machine's boot id and the kubelet's
/// certificate is in k3s's data directory. No credentials for nk3 yet.
pub(crate) fn joined(repo: &Repo, api: &ControlPlane, ip: &str, host: &str) -> Node {
    let node = Node::new(&repo.url(), ip);
    node.pass_ok();
    node.pass_ok();
    assert_eq!(node.state()["applied"], repo.head().as_str());
    let boot = node.root.join("boot_id");
    api.set_boot_id_file(host, &boot);
    let id = std::fs::read_to_string(&boot).unwrap().trim().to_string();
    assert!(api.wait_for(Duration::from_secs(20), |api| {
        api.node(host)
            .is_some_and(|n| n["status"]["nodeInfo"]["bootID"] == id.as_str())
    }));
    assert!(api.wait_ready(host, "True", Duration::from_secs(20)));
    node.k3s_joined();
    node.clear_calls();
    node
}

/// A server node of the cluster: [`joined`], with the kubeconfig k3s writes on servers.
pub(crate) fn member(repo: &Repo, api: &ControlPlane, ip: &str, host: &str) -> Node {
    let node = joined(repo, api, ip, host);
    let k = node.root.join("etc/rancher/k3s/k3s.yaml");
    std::fs::create_dir_all(k.parent().unwrap()).unwrap();
    std::fs::write(&k, api.kubeconfig(host)).unwrap();
    node
}

/// Replaces the rollout Lease with `l` (creating it if need be), as an admin would.
pub(crate) fn set_lease(api: &ControlPlane, mut l: Value) {
    let path = ControlPlane::path("leases", "kube-system", "nk3-rollout");
    l["metadata"]["name"] = json!("nk3-rollout");
    l["apiVersion"] = json!("coordination.k8s.io/v1");
    l["kind"] = json!("Lease");
    match api.get(&path) {
        Some(current) => {
            l["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"].clone();
            api.send(reqwest::Method::PUT, &path, "application/json", &l)
                .unwrap();
        }
        None => {
            api.create(
                "/apis/coordination.k8s.io/v1/namespaces/kube-system/leases",
                &l,
            )
            .unwrap();
        }
    }
}

/// The machine of `host` goes down, and the node-lifecycle controller has marked it.
fn machine_down(api: &ControlPlane, host: &str) {
    api.stop_kubelet(host);
    assert!(api.wait_ready(host, "Unknown", Duration::from_secs(30)));
}

/// Writes by the agents, in the order etcd committed them.
pub(crate) fn agent_writes(api: &ControlPlane) -> Vec<Write> {
    api.writes()
        .into_iter()
        .filter(|w| w.user_agent.starts_with("nk3-agent"))
        .collect()
}

pub(crate) fn lease(api: &ControlPlane) -> Value {
    api.get_object("leases", "kube-system", "nk3-rollout")
        .unwrap_or(Value::Null)
}

pub(crate) fn holder(api: &ControlPlane) -> Option<String> {
    lease(api)["spec"]["holderIdentity"]
        .as_str()
        .map(str::to_string)
}

#[test]
fn a_member_applies_under_the_lease_and_leaves_the_cluster_as_it_found_it() {
    let api = api();
    let repo = Repo::with_inventory(&inventory(""));
    let node = member(&repo, &api, "172.30.190.3", HOST3);
    let head = push_resolver(&repo);
    let log = node.pass_ok();
    for want in [
        format!("Draining {HOST3}"),
        format!("k8s is ready on {HOST3}"),
    ] {
        assert!(log.contains(&want), "{want}:\n{log}");
    }
    assert_eq!(node.state()["applied"], head.as_str());
    assert!(
        node.state()["last_rollout_seconds"].is_u64(),
        "{}",
        node.state()
    );
    assert_eq!(holder(&api), None, "released");
    let n = api.node(HOST3).unwrap();
    assert!(n["spec"]["unschedulable"].is_null(), "uncordoned: {n}");
    assert_eq!(
        n["metadata"]["annotations"]["nk3.io/applied-commit"],
        head.as_str()
    );
    assert_eq!(n["metadata"]["annotations"]["nk3.io/phase"], "idle");
    // The order of what the agent wrote: take the lease, cordon, switch, uncordon, release.
    let w = agent_writes(&api);
    let pos = |f: &dyn Fn(&Write) -> bool| w.iter().position(f).unwrap();
    let took = pos(&|w| w.resource == "leases" && w.object["spec"]["holderIdentity"] == HOST3);
    let cordon = pos(&|w| w.resource == "nodes" && w.object["spec"]["unschedulable"] == true);
    let uncordon = cordon
        + w[cordon..]
            .iter()
            .position(|w| w.resource == "nodes" && w.object["spec"]["unschedulable"].is_null())
            .unwrap();
    let released = w
        .iter()
        .rposition(|w| w.resource == "leases" && w.object["spec"]["holderIdentity"].is_null())
        .unwrap();
    assert!(
        took < cordon && cordon < uncordon && uncordon < released,
        "{took} {cordon} {uncordon} {released}"
    );
    let reasons: Vec<&str> = w
        .iter()
        .filter(|w| w.resource == "events")
        .filter_map(|w| w.object["reason"].as_str())
        .collect();
    assert_eq!(reasons, ["Draining", "Switching", "Ready"]);
    assert_eq!(
        node.calls("nixos-rebuild"),
        [
            "build -I nixos-config=$ROOT/etc/nixos/configuration.nix",
            "switch -I nixos-config=$ROOT/etc/nixos/configuration.nix"
        ]
    );
}

#[test]
fn the_lease_namespace_and_name_are_settings() {
    let api = api();
    api.create(
        "/api/v1/namespaces",
        &json!({ "apiVersion": "v1", "kind": "Namespace", "metadata": { "name": "nk3-system" } }),
    )
    .unwrap();
    let repo = Repo::with_inventory(&inventory(""));
    let mut node = member(&repo, &api, "172.30.190.3", HOST3);
    node.env
        .push(("NK3_LEASE_NAMESPACE".into(), "nk3-system".into()));
    node.env
        .push(("NK3_LEASE_NAME".into(), "fleet-rollout".into()));
    let head = push_resolver(&repo);
    let log = node.pass_ok();
    assert!(log.contains(&format!("k8s is ready on {HOST3}")), "{log}");
    assert_eq!(node.state()["applied"], head.as_str());
    let w = agent_writes(&api);
    let leases: Vec<(String, String)> = w
        .iter()
        .filter(|w| w.resource == "leases" && w.namespace != "kube-node-lease")
        .map(|w| (w.namespace.clone(), w.name.clone()))
        .collect();
    assert!(!leases.is_empty(), "no lease written");
    assert!(
        leases
            .iter()
            .all(|(ns, name)| ns == "nk3-system" && name == "fleet-rollout"),
        "{leases:?}"
    );
    assert!(api
        .get_object("leases", "kube-system", "nk3-rollout")
        .is_none());
    // status --cluster reads the lease where the settings say.
    let o = node.agent(&["status", "--cluster"]).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    // A name Kubernetes would refuse is refused before anything is done.
    let o = node
        .agent(&["run", "--once", "--lease-name", "Fleet_Rollout"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("not a Kubernetes name"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn a_live_holder_keeps_the_lease_and_the_node_waits_without_building_again() {
    let api = api();
    let repo = Repo::with_inventory(&inventory(""));
    let mut node = member(&repo, &api, "172.30.190.3", HOST3);
    node.env.push(("NK3_POLL_INTERVAL".into(), "1s".into()));
    // Node .4 holds the lease, renewed just now, as a live holder's is.
    hold_lease(&api, HOST4, 600);
    let head = push_resolver(&repo);
    let o = node.run_once();
    assert!(!o.status.success());
    let log = stderr(&o);
    assert!(
        log.contains(&format!("waiting for the rollout lease, held by {HOST4}")),
        "{log}"
    );
    assert_eq!(
        holder(&api),
        Some(HOST4.to_string()),
        "a live holder's lease is not taken"
    );
    assert!(
        api.node(HOST3).unwrap()["spec"]["unschedulable"].is_null(),
        "not cordoned while waiting"
    );
    assert_eq!(node.calls("nixos-rebuild").len(), 1, "built once");
    // The holder releases: the next pass goes on from the build.
    let mut l = lease(&api);
    l["spec"]["holderIdentity"] = Value::Null;
    set_lease(&api, l);
    node.pass_ok();
    assert_eq!(node.state()["applied"], head.as_str());
    let builds = node
        .calls("nixos-rebuild")
        .iter()
        .filter(|c| c.starts_with("build"))
        .count();
    assert_eq!(builds, 1, "{:?}", node.calls("nixos-rebuild"));
}

/// Puts the rollout Lease in the hands of `holder`, renewed just now, for `seconds` (as a
/// live holder — or one about to die — leaves it).
pub(crate) fn hold_lease(api: &ControlPlane, holder: &str, seconds: u64) {
    set_lease(
        api,
        json!({
            "metadata": {},
            "spec": { "holderIdentity": holder, "leaseDurationSeconds": seconds,
                      "renewTime": now_micro(), "acquireTime": now_micro(), "leaseTransitions": 0 },
        }),
    );
}

/// Now, as Kubernetes writes a MicroTime.
pub(crate) fn now_micro() -> String {
    humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string()
}

#[test]
fn a_notready_node_keeps_the_others_from_disrupting_themselves() {
    let api = api();
    let repo = Repo::with_inventory(&inventory(""));
    let node = member(&repo, &api, "172.30.190.3", HOST3);
    machine_down(&api, HOST5);
    push_resolver(&repo);
    let o = node.run_once();
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains(&format!("node {HOST5} is NotReady")),
        "{}",
        stderr(&o)
    );
    assert_eq!(holder(&api), None, "the lease is given back");
    assert!(api.node(HOST3).unwrap()["spec"]["unschedulable"].is_null());
    assert!(node
        .calls("nixos-rebuild")
        .iter()
        .all(|c| c.starts_with("build")));
    api.start_kubelet(HOST5);
    assert!(api.wait_ready(HOST5, "True", Duration::from_secs(30)));
    node.pass_ok();
}

/// The built-in template with a marker that makes the stand-in's k3s never start.
#[test]
fn an_unhealthy_generation_rolls_back_and_halts_the_commit_for_everyone() {
    let api = api();
    let repo = Repo::with_inventory(&inventory(""));
    let n3 = member(&repo, &api, "172.30.190.3", HOST3);
    let n4 = member(&repo, &api, "172.30.190.4", HOST4);
    let before3 = std::fs::read(n3.config_path()).unwrap();
    let system3 = n3.current_system();
    repo.commit("broken.nix.hbs", &marked_template("k3s-broken"), "template");
    let bad = repo.commit(
        "inventory.yaml",
        &inventory("  template: broken.nix.hbs\n"),
        "a generation whose k3s never starts",
    );
    let o = n3.run_once();
    assert!(!o.status.success());
    let log = stderr(&o);
    assert!(
        log.contains("k3s.service is not active; rolling back"),
        "{log}"
    );
    assert!(
        log.contains(&format!(
            "commit {} halted for the whole cluster",
            &bad[..12]
        )),
        "{log}"
    );
    assert!(n3
        .calls("nixos-rebuild")
        .contains(&"switch --rollback".to_string()));
    assert_eq!(
        n3.current_system(),
        system3,
        "back on the previous generation"
    );
    assert_eq!(
        std::fs::read(n3.config_path()).unwrap(),
        before3,
        "the file matches what runs"
    );
    assert_eq!(holder(&api), None);
    assert!(api.node(HOST3).unwrap()["spec"]["unschedulable"].is_null());
    let l = lease(&api);
    assert_eq!(
        l["metadata"]["annotations"]["nk3.io/halted-commit"],
        bad.as_str()
    );
    assert_eq!(l["metadata"]["annotations"]["nk3.io/halted-node"], HOST3);
    // Nobody else applies it.
    let before4 = std::fs::read(n4.config_path()).unwrap();
    let o = n4.run_once();
    assert!(
        stderr(&o).contains("is halted for the cluster by"),
        "{}",
        stderr(&o)
    );
    assert_eq!(std::fs::read(n4.config_path()).unwrap(), before4);
    assert!(!n4
        .calls("nixos-rebuild")
        .iter()
        .any(|c| c.starts_with("switch") || c.starts_with("boot")));
    // A newer commit lifts the halt: the rollout moves on, and the halted commit stays
    // halted (a node behind still refuses it).
    let fixed = repo.commit("inventory.yaml", &dns(&inventory(""), "9.9.9.9"), "fixed");
    n3.pass_ok();
    assert_eq!(n3.state()["applied"], fixed.as_str());
    let a = &lease(&api)["metadata"]["annotations"];
    assert_eq!(a["nk3.io/halted-commit"], bad.as_str());
    assert_eq!(a["nk3.io/halt-lifted-by"], fixed.as_str());
    let status = stdout(&run(&mut n3.agent(&["status", "--cluster"])));
    assert!(status.contains("lifted: the newer commit"), "{status}");
    n4.pass_ok();
    assert_eq!(n4.state()["applied"], fixed.as_str());
}

#[test]
fn a_kill_right_after_switch_rollback_does_not_forget_the_rollback() {
    let api = api();
    let repo = Repo::with_inventory(&inventory(""));
    let mut n3 = member(&repo, &api, "172.30.190.3", HOST3);
    let n4 = member(&repo, &api, "172.30.190.4", HOST4);
    let system3 = n3.current_system();
    repo.commit("broken.nix.hbs", &marked_template("k3s-broken"), "template");
    let bad = repo.commit(
        "inventory.yaml",
        &inventory("  template: broken.nix.hbs\n"),
        "a generation whose k3s never starts",
    );
    // Killed the moment `nixos-rebuild switch --rollback` is done.
    n3.env.push(("NK3_FAKE_KILL".into(), "rollback-end".into()));
    use std::os::unix::process::ExitStatusExt as _;
    assert_eq!(
        n3.run_once().status.signal(),
        Some(9),
        "killed at rollback-end"
    );
    n3.env.clear();
    let mut log = String::new();
    for _ in 0..3 {
        log.push_str(&stderr(&n3.run_once()));
        if n3.state()["phase"]["name"] == "idle" {
            break;
        }
    }
    assert_ne!(
        n3.state()["applied"],
        bad.as_str(),
        "the bad commit is not recorded as applied:\n{log}"
    );
    assert_eq!(n3.state()["rejected"]["commit"], bad.as_str(), "{log}");
    assert_eq!(
        n3.current_system(),
        system3,
        "it runs the previous generation"
    );
    assert_eq!(
        lease(&api)["metadata"]["annotations"]["nk3.io/halted-commit"],
        bad.as_str(),
        "the commit is halted for everyone:\n{log}"
    );
    assert_eq!(holder(&api), None, "released");
    // The next node does not apply it.
    let o = n4.run_once();
    assert!(
        stderr(&o).contains("is halted for the cluster"),
        "{}",
        stderr(&o)
    );
    assert!(n4
        .calls("nixos-rebuild")
        .iter()
        .all(|c| !c.starts_with("switch")));
}

#[test]
fn when_even_the_rollback_is_unhealthy_the_node_keeps_the_lease() {
    let api = api();
    let repo = Repo::with_inventory(&inventory(""));
    let node = member(&repo, &api, "172.30.190.3", HOST3);
    std::fs::create_dir_all(node.root.join("units")).unwrap();
    std::fs::write(node.root.join("units/k3s.service"), "failed").unwrap();
    push_resolver(&repo);
    let o = node.run_once();
    assert!(!o.status.success());
    assert!(stderr(&o).contains("ROLLOUT FROZEN"), "{}", stderr(&o));
    assert_eq!(holder(&api), Some(HOST3.to_string()), "the lease is kept");
    assert_eq!(node.state()["phase"]["name"], "frozen");
    let status = stdout(&run(&mut node.agent(&["status"])));
    assert!(status.contains("FROZEN"), "{status}");
    let renewed = lease(&api)["spec"]["renewTime"].clone();
    std::thread::sleep(Duration::from_millis(1100));
    let o = node.run_once();
    assert!(!o.status.success());
    assert_eq!(holder(&api), Some(HOST3.to_string()));
    assert_ne!(
        lease(&api)["spec"]["renewTime"],
        renewed,
        "renewed while frozen"
    );
    let reasons: Vec<String> = agent_writes(&api)
        .iter()
        .filter(|w| w.resource == "events")
        .filter_map(|w| w.object["reason"].as_str().map(str::to_string))
        .collect();
    assert!(
        reasons.contains(&"RolloutFrozen".to_string()),
        "{reasons:?}"
    );
    // A fixing commit that Nix refuses leaves the rollout frozen, the lease held and
    // renewed, the node cordoned; it used to go idle and let the lease run out.
    repo.commit(
        "refused.nix.hbs",
        &marked_template("fail-build"),
        "template",
    );
    let refused = repo.commit(
        "inventory.yaml",
        &dns(&inventory("  template: refused.nix.hbs\n"), "9.9.9.9"),
        "a fix Nix refuses",
    );
    let o = node.run_once();
    let log = stderr(&o);
    assert!(
        log.contains(&format!("commit {} rejected", &refused[..12])),
        "{log}"
    );
    assert!(log.contains("the rollout stays frozen"), "{log}");
    assert_eq!(node.state()["phase"]["name"], "frozen", "{log}");
    assert_eq!(holder(&api), Some(HOST3.to_string()));
    let n = api.node(HOST3).unwrap();
    assert_eq!(n["spec"]["unschedulable"], true, "still cordoned: {n}");
    let renewed = lease(&api)["spec"]["renewTime"].clone();
    std::thread::sleep(Duration::from_millis(1100));
    node.run_once();
    assert_eq!(node.state()["phase"]["name"], "frozen");
    assert_ne!(lease(&api)["spec"]["renewTime"], renewed, "still renewed");
}

#[test]
fn health_timeout_is_a_bound_a_check_slower_than_it_is_stopped_not_waited_for_and_judged_healthy() {
    let api = api();
    let repo = Repo::with_inventory(&inventory(""));
    let node = member(&repo, &api, "172.30.190.3", HOST3);
    // The commit brings a check that takes 15 s, under a health timeout of 3 s.
    let slow = dns(&inventory(""), "9.9.9.9").replace(
        "    health_timeout: 3s\n",
        "    health_timeout: 3s\n    health_checks:\n      - { name: slow, command: [sleep, \"15\"] }\n",
    );
    let head = repo.commit("inventory.yaml", &slow, "a slow check");
    let started = Instant::now();
    let o = node.run_once();
    let took = started.elapsed();
    let log = stderr(&o);
    assert!(!o.status.success(), "{log}");
    assert!(
        log.contains("health check slow did not finish within the health timeout"),
        "{log}"
    );
    assert_ne!(node.state()["applied"], head.as_str(), "not judged healthy");
    // Both verifications (the new generation's, the rollback's) ended at their timeout;
    // waiting for the check would take 30 s.
    assert!(took < Duration::from_secs(25), "{took:?}\n{log}");
    assert_eq!(node.state()["phase"]["name"], "frozen", "{log}");
}

/// Its client had no roots at all: an `http:` health check on an https:// URL failed on
/// every node, whatever the server's certificate, and rolled every commit back.
#[test]
fn an_https_health_check_trusts_the_systems_roots() {
    let api = api();
    let repo = Repo::with_inventory(&inventory(""));
    let served = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(served.path().join("status.git")).unwrap();
    crate::fixtures::git(served.path(), &["init", "-q", "--bare", "status.git"]);
    let server = crate::git_servers::HttpsServer::serve(served.path(), None);
    let mut node = member(&repo, &api, "172.30.190.3", HOST3);
    // The system's roots: SSL_CERT_FILE names the bundle, here the server's CA.
    node.env
        .push(("SSL_CERT_FILE".into(), server.ca_file.display().to_string()));
    let url = format!("https://127.0.0.1:{}/status.git/HEAD", server.port);
    let checked = dns(&inventory(""), "9.9.9.9").replace(
        "    health_timeout: 3s\n",
        &format!("    health_timeout: 3s\n    health_checks:\n      - {{ name: web, http: \"{url}\" }}\n"),
    );
    let head = repo.commit("inventory.yaml", &checked, "an https check");
    let log = node.pass_ok();
    assert_eq!(node.state()["applied"], head.as_str(), "{log}");
    assert!(
        server
            .log
            .lock()
            .unwrap()
            .iter()
            .any(|r| r == "GET /status.git/HEAD 200"),
        "the check asked the server"
    );
}

#[test]
fn unsatisfiable_pdbs_churn_forever_the_node_is_not_even_cordoned_and_the_commit_backs_off() {
    let api = api();
    let repo = Repo::with_inventory(&inventory(""));
    let node = member(&repo, &api, "172.30.190.3", HOST3);
    // One replica and a budget that wants one: no eviction will ever be allowed.
    api.add_pod("default", "db-0", HOST3, json!({"app": "db"}), 0);
    api.add_pdb("default", "db", json!({"app": "db"}), 1);
    assert!(api.wait_for(Duration::from_secs(30), |api| {
        api.get_object("poddisruptionbudgets", "default", "db")
            .is_some_and(|b| b["status"]["currentHealthy"] == 1)
    }));
    push_resolver(&repo);
    let o = node.run_once();
    assert!(!o.status.success());
    let log = stderr(&o);
    assert!(
        log.contains("PodDisruptionBudget default/db allows no eviction of default/db-0"),
        "{log}"
    );
    assert!(log.contains("change the budget or the workload"), "{log}");
    let status = stdout(&run(&mut node.agent(&["status"])));
    assert!(
        status.contains("PodDisruptionBudget default/db"),
        "{status}"
    );
    // Nothing was disrupted, nothing taken: no cordon, no lease.
    let w = agent_writes(&api);
    assert!(
        !w.iter()
            .any(|w| w.resource == "nodes" && w.object["spec"]["unschedulable"] == true),
        "cordoned"
    );
    assert!(!w.iter().any(|w| w.resource == "leases"), "took the lease");
    assert!(w
        .iter()
        .any(|w| w.resource == "events" && w.object["reason"] == "DrainBlocked"));
    // The next pass does not start over: it waits out the back-off.
    let before = api.requests().len();
    let o = node.run_once();
    assert!(stderr(&o).contains("looking again in"), "{}", stderr(&o));
    let asked = api.requests()[before..]
        .iter()
        .filter(|w| w.user_agent.starts_with("nk3-agent") && w.resource == "poddisruptionbudgets")
        .count();
    assert_eq!(asked, 0, "backed off");
    assert_eq!(node.state()["drain_blocked"]["tries"], 1);
}

#[test]
fn a_drain_that_times_out_uncordons_and_releases() {
    let api = api();
    let repo = Repo::with_inventory(&inventory(""));
    let node = member(&repo, &api, "172.30.190.3", HOST3);
    // A pod that takes half a minute to stop, longer than drain_timeout (2 s).
    api.add_pod("default", "slow", HOST3, json!({"app": "slow"}), 30);
    assert!(api.wait_for(Duration::from_secs(30), |api| {
        api.get_object("pods", "default", "slow")
            .is_some_and(|p| p["status"]["phase"] == "Running")
    }));
    push_resolver(&repo);
    let o = node.run_once();
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("drain timed out waiting for default/slow to terminate"),
        "{}",
        stderr(&o)
    );
    assert!(
        api.node(HOST3).unwrap()["spec"]["unschedulable"].is_null(),
        "uncordoned"
    );
    assert_eq!(holder(&api), None, "released");
    assert!(
        node.calls("nixos-rebuild")
            .iter()
            .all(|c| c.starts_with("build")),
        "not switched"
    );
}

#[test]
fn a_node_an_operator_cordoned_stays_cordoned() {
    let api = api();
    let repo = Repo::with_inventory(&inventory(""));
    let node = member(&repo, &api, "172.30.190.3", HOST3);
    api.patch(
        &format!("/api/v1/nodes/{HOST3}"),
        &json!({ "spec": { "unschedulable": true } }),
    )
    .unwrap();
    push_resolver(&repo);
    node.pass_ok();
    let n = api.node(HOST3).unwrap();
    assert_eq!(n["spec"]["unschedulable"], true, "{n}");
}

#[test]
fn a_reboot_keeps_the_lease_until_the_node_is_back_and_healthy() {
    let api = api();
    let repo = Repo::with_inventory(&inventory(""));
    let node = member(&repo, &api, "172.30.190.3", HOST3);
    let always = dns(&inventory(""), "9.9.9.9").replace("when-needed", "always");
    let head = repo.commit("inventory.yaml", &always, "reboot always");
    node.pass_ok();
    assert_eq!(node.calls("systemctl"), ["reboot"]);
    assert_eq!(
        holder(&api),
        Some(HOST3.to_string()),
        "held across the reboot"
    );
    assert_eq!(api.node(HOST3).unwrap()["spec"]["unschedulable"], true);
    let log = node.pass_ok();
    assert!(log.contains(&format!("k8s is ready on {HOST3}")), "{log}");
    assert_eq!(holder(&api), None);
    assert_eq!(node.state()["applied"], head.as_str());
}

/// Regression: two nodes the gate stopped (a third was down) woke on each other's release
/// of the lease and took and gave it back ten times a second (seen on the real control
/// plane). A node the gate stops waits for its next poll.
#[test]
fn a_node_the_gate_stops_does_not_wake_on_every_release_of_the_lease() {
    let api = api();
    let repo = Repo::with_inventory(&inventory(""));
    let nodes = [
        member(&repo, &api, "172.30.190.3", HOST3),
        member(&repo, &api, "172.30.190.4", HOST4),
    ];
    machine_down(&api, HOST5);
    push_resolver(&repo);
    let _daemons: Vec<Running> = nodes
        .iter()
        .map(|n| {
            Running(
                n.agent(&["run"])
                    .env("NK3_POLL_INTERVAL", "2s")
                    .stderr(std::process::Stdio::null())
                    .spawn()
                    .unwrap(),
            )
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !nodes.iter().all(|n| {
        n.state()["last"]["message"]
            .as_str()
            .is_some_and(|m| m.contains(&format!("node {HOST5} is NotReady")))
    }) {
        assert!(
            Instant::now() < deadline,
            "the gate never stopped both nodes"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let from = agent_writes(&api)
        .iter()
        .filter(|w| w.resource == "leases")
        .count();
    std::thread::sleep(Duration::from_secs(8));
    let took = agent_writes(&api)
        .iter()
        .filter(|w| w.resource == "leases")
        .count()
        - from;
    // Each node takes and gives back the lease about once a poll: some 16 writes in 8 s.
    assert!(took <= 30, "{took} lease writes in 8 s");
    assert!(nodes.iter().all(|n| n
        .calls("nixos-rebuild")
        .iter()
        .all(|c| c.starts_with("build"))));
}

#[test]
fn three_daemons_roll_one_node_at_a_time() {
    let api = api();
    let repo = Repo::with_inventory(&inventory(""));
    let nodes = [
        member(&repo, &api, "172.30.190.3", HOST3),
        member(&repo, &api, "172.30.190.4", HOST4),
        member(&repo, &api, "172.30.190.5", HOST5),
    ];
    let head = push_resolver(&repo);
    let _daemons: Vec<Running> = nodes
        .iter()
        .map(|n| {
            Running(
                n.agent(&["run"])
                    .env("NK3_POLL_INTERVAL", "300ms")
                    .stderr(std::process::Stdio::null())
                    .spawn()
                    .unwrap(),
            )
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(90);
    while !nodes.iter().all(|n| n.state()["applied"] == head.as_str()) {
        assert!(Instant::now() < deadline, "not every node applied {head}");
        std::thread::sleep(Duration::from_millis(100));
    }
    // From the API's write log: at no moment were two nodes cordoned by nk3.
    let mut cordoned = std::collections::BTreeSet::new();
    let mut most = 0;
    for w in agent_writes(&api).iter().filter(|w| w.resource == "nodes") {
        if w.object["metadata"]["annotations"]["nk3.io/cordoned"] == "true" {
            cordoned.insert(w.name.clone());
        } else {
            cordoned.remove(&w.name);
        }
        most = most.max(cordoned.len());
    }
    assert_eq!(most, 1, "max_unavailable is 1");
    assert!(cordoned.is_empty());
}

#[test]
fn status_cluster_shows_every_node_the_lease_and_a_halt() {
    let api = api();
    let repo = Repo::with_inventory(&inventory(""));
    let node = member(&repo, &api, "172.30.190.3", HOST3);
    let head = push_resolver(&repo);
    node.pass_ok();
    let o = run(&mut node.agent(&["status", "--cluster"]));
    let text = stdout(&o);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        text.contains(&format!("{HOST3:<40} Ready     no        {}", &head[..12])),
        "{text}"
    );
    assert!(text.contains(HOST4) && text.contains(HOST5), "{text}");
    assert!(text.contains("lease nk3-rollout: free"), "{text}");
    let j: Value =
        serde_json::from_slice(&run(&mut node.agent(&["status", "--json", "--cluster"])).stdout)
            .unwrap();
    assert_eq!(j["cluster"]["nodes"].as_array().unwrap().len(), 3);
    // Two commits halted in turn, as the agents write it: both are shown.
    api.patch(
        &ControlPlane::path("leases", "kube-system", "nk3-rollout"),
        &json!({"metadata": {"annotations": {
            "nk3.io/halted-commit": "2222222222222222222222222222222222222222",
            "nk3.io/halted-reason": "k3s did not become ready",
            "nk3.io/halted-node": "node-b",
            "nk3.io/halted-earlier": r#"[{"commit":"1111111111111111111111111111111111111111","node":"node-a","reason":"etcd lost quorum"}]"#,
        }}}),
    )
    .unwrap();
    let text = stdout(&run(&mut node.agent(&["status", "--cluster"])));
    assert!(
        text.contains("HALTED commit 222222222222 by node-b: k3s did not become ready"),
        "{text}"
    );
    assert!(
        text.contains("halted earlier: commit 111111111111 by node-a: etcd lost quorum"),
        "{text}"
    );
    let none = Node::new(&repo.url(), "172.30.190.4");
    let o = run(&mut none.agent(&["status", "--cluster"]));
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("not part of a cluster yet"),
        "{}",
        stderr(&o)
    );
}

/// The end of a rollout on one node, as the API and the node show it.
fn settled(api: &ControlPlane, node: &Node) -> (Value, Value, Option<String>, Value) {
    let n = api.node(HOST3).unwrap();
    (
        node.state()["applied"].clone(),
        node.state()["phase"]["name"].clone(),
        holder(api),
        n["spec"]["unschedulable"].clone(),
    )
}

fn killed_under_the_lease(point: &str, policy: &str, reboots: usize) {
    let api = api();
    let repo = Repo::with_inventory(&inventory(""));
    let mut node = member(&repo, &api, "172.30.190.3", HOST3);
    let change = dns(&inventory(""), "9.9.9.9").replace("when-needed", policy);
    let head = repo.commit("inventory.yaml", &change, "change");
    node.env.push(("NK3_FAKE_KILL".into(), point.into()));
    // Run until the kill point is reached (verification comes only after the reboot).
    use std::os::unix::process::ExitStatusExt as _;
    let killed = (0..3).any(|_| node.run_once().status.signal() == Some(9));
    assert!(killed, "{point}: never killed");
    node.env.clear();
    let mut logs = String::new();
    for _ in 0..4 {
        logs.push_str(&stderr(&node.run_once()));
        if node.state()["phase"]["name"] == "idle" && node.state()["applied"] == head.as_str() {
            break;
        }
    }
    assert_eq!(
        settled(&api, &node),
        (json!(head), json!("idle"), None, Value::Null),
        "{point}:\n{logs}"
    );
    let real_reboots = node
        .calls("systemctl")
        .iter()
        .filter(|c| *c == "reboot")
        .count()
        - usize::from(point == "reboot-start");
    assert_eq!(real_reboots, reboots, "{point}: reboots");
    let rollbacks = node
        .calls("nixos-rebuild")
        .iter()
        .filter(|c| c.contains("--rollback"))
        .count();
    assert_eq!(rollbacks, 0, "{point}: a kill is not a failed generation");
}

#[test]
fn killed_at_any_step_under_the_lease_it_ends_released_and_uncordoned() {
    for point in ["build-end", "switch-start", "switch-end", "is-active-start"] {
        killed_under_the_lease(point, "when-needed", 0);
    }
    for point in ["boot-start", "boot-end", "reboot-start", "is-active-start"] {
        killed_under_the_lease(point, "always", 1);
    }
}

#[test]
fn a_dead_holder_loses_the_lease_at_expiry_and_then_the_gate_waits_for_it() {
    let api = api();
    let repo = Repo::with_inventory(&inventory(""));
    let mut node = member(&repo, &api, "172.30.190.3", HOST3);
    node.env.push(("NK3_POLL_INTERVAL".into(), "1s".into()));
    // Node .4 took the lease and died: its claim runs out in 3 s, and it is NotReady.
    hold_lease(&api, HOST4, 3);
    api.stop_kubelet(HOST4);
    push_resolver(&repo);
    let log = stderr(&node.run_once());
    assert!(
        log.contains(&format!("held by {HOST4}")),
        "nobody takes a live holder's lease:\n{log}"
    );
    std::thread::sleep(Duration::from_secs(3));
    let log = stderr(&node.run_once());
    // Its Node may still say Ready (the controller's grace period): its heartbeat does not.
    assert!(
        log.contains(&format!("node {HOST4} is NotReady"))
            || log.contains(&format!("node {HOST4} has not renewed its heartbeat")),
        "{log}"
    );
    assert_eq!(
        lease(&api)["spec"]["leaseTransitions"],
        1,
        "taken over at expiry"
    );
    assert_eq!(holder(&api), None, "and given back: the gate says no");
    assert!(api.node(HOST3).unwrap()["spec"]["unschedulable"].is_null());
    // The dead node is taken out of the inventory: the rollout goes on.
    let without = dns(&inventory(""), "9.9.9.9").replace(
        "    172.30.190.4: { interface: enp3s0f0, boot_device: /dev/nvme0n1 }\n",
        "",
    );
    let head = repo.commit("inventory.yaml", &without, "remove the dead node");
    node.pass_ok();
    assert_eq!(node.state()["applied"], head.as_str());
}

#[test]
fn the_api_down_mid_rollout_changes_nothing_and_the_rollout_goes_on_when_it_is_back() {
    let api = api();
    let repo = Repo::with_inventory(&inventory(""));
    let node = member(&repo, &api, "172.30.190.3", HOST3);
    let head = push_resolver(&repo);
    api.set_unreachable(true);
    let o = node.run_once();
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("cannot reach the k3s API"),
        "{}",
        stderr(&o)
    );
    assert!(
        node.calls("nixos-rebuild")
            .iter()
            .all(|c| c.starts_with("build")),
        "not switched"
    );
    assert_eq!(node.state()["phase"]["name"], "built");
    api.set_unreachable(false);
    // The kubelets could not heartbeat while the API was down, so the node-lifecycle
    // controller may mark the others NotReady for a moment after it is back: the gate then
    // waits, as it should, and a later pass (the daemon's next poll) goes on.
    let mut log = String::new();
    for _ in 0..20 {
        log.push_str(&stderr(&node.run_once()));
        if node.state()["applied"] == head.as_str() {
            break;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    assert_eq!(node.state()["applied"], head.as_str(), "{log}");
    let builds = node
        .calls("nixos-rebuild")
        .iter()
        .filter(|c| c.starts_with("build"))
        .count();
    assert_eq!(builds, 1);
}

#[test]
fn a_nudge_makes_a_waiting_daemon_fetch_at_once() {
    let api = api();
    let repo = Repo::with_inventory(&inventory(""));
    let node = member(&repo, &api, "172.30.190.3", HOST3);
    let _daemon = Running(
        node.agent(&["run"])
            .env("NK3_POLL_INTERVAL", "10m")
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    // Let the first pass finish; the daemon then waits ten minutes for its next poll.
    let deadline = Instant::now() + Duration::from_secs(20);
    while node.state()["next_poll"].is_null() {
        assert!(Instant::now() < deadline, "the first pass never ended");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(300));
    let head = push_resolver(&repo);
    let o = run(node
        .agent(&["nudge", "--commit", &head])
        .env("NK3_KUBECONFIG", node.root.join("etc/rancher/k3s/k3s.yaml")));
    assert!(o.status.success(), "{}", stderr(&o));
    let deadline = Instant::now() + Duration::from_secs(30);
    while node.state()["applied"] != head.as_str() {
        assert!(Instant::now() < deadline, "the nudge was not picked up");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        lease(&api)["metadata"]["annotations"]["nk3.io/desired-commit"],
        head.as_str()
    );
}

/// Checks a Lease against the schema extracted from the Kubernetes OpenAPI spec
/// (`tests/data/kubernetes/lease.schema.json`): no property the API does not define, each
/// of the type it defines.
fn check_lease_shape(lease: &Value, schema: &Value) -> Result<(), String> {
    let props = |name: &str| schema[name]["properties"].as_object().unwrap().clone();
    for (k, _) in lease.as_object().ok_or("not an object")? {
        if !props("io.k8s.api.coordination.v1.Lease").contains_key(k) {
            return Err(format!("Lease has no property {k}"));
        }
    }
    let spec_props = props("io.k8s.api.coordination.v1.LeaseSpec");
    let micro_time = regex::Regex::new(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$").unwrap();
    for (k, v) in lease["spec"].as_object().ok_or("spec is not an object")? {
        let def = spec_props
            .get(k)
            .ok_or(format!("LeaseSpec has no property {k}"))?;
        let ok = if v.is_null() {
            true
        } else if def["$ref"] == "io.k8s.apimachinery.pkg.apis.meta.v1.MicroTime" {
            // RFC 3339 with microseconds, as the API server writes MicroTime.
            v.as_str().is_some_and(|s| micro_time.is_match(s))
        } else {
            match def["type"].as_str() {
                Some("string") => v.is_string(),
                Some("integer") => v.as_i64().is_some_and(|n| i32::try_from(n).is_ok()),
                _ => false,
            }
        };
        if !ok {
            return Err(format!("LeaseSpec.{k} = {v} does not fit {def}"));
        }
    }
    Ok(())
}

#[test]
fn every_lease_the_agents_write_has_the_shape_the_kubernetes_api_defines() {
    let schema: Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("tests/data/kubernetes/lease.schema.json")).unwrap(),
    )
    .unwrap();
    let api = api();
    let repo = Repo::with_inventory(&inventory(""));
    let node = member(&repo, &api, "172.30.190.3", HOST3);
    push_resolver(&repo);
    node.pass_ok();
    let leases: Vec<Value> = agent_writes(&api)
        .into_iter()
        .filter(|w| w.resource == "leases")
        .map(|w| w.object)
        .collect();
    assert!(leases.len() >= 2, "acquire and release at least");
    for l in &leases {
        check_lease_shape(l, &schema).unwrap_or_else(|e| panic!("{e}: {l}"));
    }
    // The checker is not blind.
    let mut wrong = leases[0].clone();
    wrong["spec"]["holder"] = json!("x");
    assert!(check_lease_shape(&wrong, &schema).is_err());
    wrong = leases[0].clone();
    wrong["spec"]["leaseDurationSeconds"] = json!("600");
    assert!(check_lease_shape(&wrong, &schema).is_err());
}

#[test]
fn ceph_must_be_healthy_but_for_the_warnings_the_inventory_tolerates() {
    let api = api();
    let with_ceph = inventory("").replace(
        "    drain_timeout: 2s\n",
        "    drain_timeout: 2s\n    ceph: { tolerate: [ OSDMAP_FLAGS ] }\n",
    );
    let repo = Repo::with_inventory(&with_ceph);
    let node = member(&repo, &api, "172.30.190.3", HOST3);
    std::fs::write(
        node.root.join("ceph-status.json"),
        r#"{"health":{"status":"HEALTH_WARN","checks":{"OSDMAP_FLAGS":{},"PG_DEGRADED":{}}}}"#,
    )
    .unwrap();
    let head = repo.commit("inventory.yaml", &dns(&with_ceph, "9.9.9.9"), "resolver");
    let o = node.run_once();
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("ceph is HEALTH_WARN: PG_DEGRADED"),
        "{}",
        stderr(&o)
    );
    assert_eq!(holder(&api), None);
    assert!(node.calls("kubectl")[0]
        .ends_with("-n rook-ceph exec deploy/rook-ceph-tools -- ceph status --format json"));
    std::fs::write(
        node.root.join("ceph-status.json"),
        r#"{"health":{"status":"HEALTH_WARN","checks":{"OSDMAP_FLAGS":{}}}}"#,
    )
    .unwrap();
    node.pass_ok();
    assert_eq!(node.state()["applied"], head.as_str());
}

#[test]
fn no_secret_reaches_a_log_line_or_status() {
    let api = api();
    let repo = Repo::with_inventory(&inventory(""));
    let node = member(&repo, &api, "172.30.190.3", HOST3);
    push_resolver(&repo);
    let mut seen = node.pass_ok();
    seen.push_str(&stdout(&run(&mut node.agent(&[
        "status",
        "--json",
        "--cluster",
    ]))));
    seen.push_str(
        &std::fs::read_to_string(node.root.join("var/lib/nk3-agent/state.json")).unwrap(),
    );
    seen.push_str(&node.config());
    let kubeconfig = std::fs::read_to_string(node.root.join("etc/rancher/k3s/k3s.yaml")).unwrap();
    let key = kubeconfig
        .lines()
        .find_map(|l| l.trim().strip_prefix("client-key-data: "))
        .unwrap();
    for secret in ["2f909ce8-cae1-439a-86b3-da87b7ee9f55", key, &key[..40]] {
        assert!(!seen.contains(secret), "a secret leaked");
    }
    for w in api.requests() {
        assert!(
            !w.object.to_string().contains("2f909ce8-cae1-439a"),
            "the join token reached the API"
        );
    }
}

/// Regression: a node that was waiting for the lease while its holder halted the very commit
/// it waited to apply took the lease and applied it anyway (found by nk3-sim --broken).
#[test]
fn a_node_waiting_while_the_holder_halts_the_commit_does_not_apply_it() {
    let api = api();
    let repo = Repo::with_inventory(&inventory(""));
    let mut node = member(&repo, &api, "172.30.190.3", HOST3);
    node.env.push(("NK3_POLL_INTERVAL".into(), "10s".into()));
    hold_lease(&api, HOST4, 600);
    let head = push_resolver(&repo);
    let waiting = std::thread::spawn(move || {
        let o = node.run_once();
        (node, o)
    });
    std::thread::sleep(Duration::from_millis(1500));
    // The holder found the commit unhealthy: it halts it and lets go.
    let mut l = lease(&api);
    l["spec"]["holderIdentity"] = Value::Null;
    l["metadata"]["annotations"] = json!({
        "nk3.io/halted-commit": head, "nk3.io/halted-reason": "k3s never started",
        "nk3.io/halted-node": HOST4,
    });
    set_lease(&api, l);
    let (node, o) = waiting.join().unwrap();
    let log = stderr(&o);
    assert!(log.contains("is halted for the cluster"), "{log}");
    assert!(
        !node
            .calls("nixos-rebuild")
            .iter()
            .any(|c| c.starts_with("switch") || c.starts_with("boot")),
        "{log}"
    );
    assert!(api.node(HOST3).unwrap()["spec"]["unschedulable"].is_null());
    assert_eq!(holder(&api), None);
}
