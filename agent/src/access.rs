//! What nk3 may do in the k3s API, written once: the permissions an agent uses, the RBAC
//! objects `nk3-agent credentials` makes from them for an agent-role node, and the check a
//! node makes with its own credentials before it disrupts itself.
//!
//! Servers use the kubeconfig k3s writes (`system:masters`). Agent-role nodes have no such
//! file, and their kubelet's credentials cannot stand in for one: the Node authorizer and
//! the NodeRestriction admission plugin keep a kubelet to Leases in `kube-node-lease` and to
//! its own node's objects. So an agent node gets a ServiceAccount bound to exactly these
//! permissions.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use crate::cluster::{RolloutLease, NODE_LEASES};
use crate::kube::{Kube, KubeError};

/// The name of the ClusterRole and of each Role (one per namespace) nk3 makes.
pub const ROLE: &str = "nk3-agent";
/// Where the agents' ServiceAccounts and their token Secrets live.
pub const ACCOUNTS: &str = "kube-system";
/// Namespace of the Events nk3 records about Nodes.
pub const EVENTS: &str = "default";

/// One rule: these verbs on a resource of an API group, cluster-wide (`namespace: None`) or
/// in one namespace, on any object or only the named ones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Permission {
    /// The verbs.
    pub verbs: Vec<&'static str>,
    /// The API group ("" for the core group).
    pub group: &'static str,
    /// The resource, with its subresource after a slash (`pods/eviction`).
    pub resource: &'static str,
    /// `None`: cluster-wide (a ClusterRole).
    pub namespace: Option<String>,
    /// Empty: any object.
    pub names: Vec<String>,
}

fn rule(
    verbs: &[&'static str],
    group: &'static str,
    resource: &'static str,
    namespace: Option<&str>,
    names: &[String],
) -> Permission {
    Permission {
        verbs: verbs.to_vec(),
        group,
        resource,
        namespace: namespace.map(str::to_string),
        names: names.to_vec(),
    }
}

/// Everything the agent of `node` does in the API, for a rollout of `max_unavailable` and,
/// when the inventory has the Ceph check, the Ceph tools deployment's namespace.
pub fn permissions(
    node: &str,
    lease: &RolloutLease,
    max_unavailable: u32,
    ceph_namespace: Option<&str>,
) -> Vec<Permission> {
    let leases = lease.names(max_unavailable);
    let mut p = vec![
        // The gate (every node Ready) reads them all; cordon, uncordon and the nk3.io
        // annotations patch only this node (a role of its own: see `objects`).
        rule(&["get", "list"], "", "nodes", None, &[]),
        rule(&["patch"], "", "nodes", None, &[node.to_string()]),
        // The drain: this node's pods (by field selector), then each one until it is gone.
        rule(&["get", "list"], "", "pods", None, &[]),
        rule(&["create"], "", "pods/eviction", None, &[]),
        // Budgets are judged before cordoning; workloads of watch_namespaces before the lease.
        rule(&["list"], "policy", "poddisruptionbudgets", None, &[]),
        rule(&["list"], "apps", "daemonsets", None, &[]),
        rule(&["list"], "apps", "deployments", None, &[]),
        // The rollout Leases, by name; a Lease that does not exist yet must be created, and
        // RBAC cannot limit `create` by name.
        rule(
            &["get", "list", "watch", "update"],
            "coordination.k8s.io",
            "leases",
            Some(&lease.namespace),
            &leases,
        ),
        rule(
            &["create"],
            "coordination.k8s.io",
            "leases",
            Some(&lease.namespace),
            &[],
        ),
        // Every kubelet's heartbeat: is each other node alive now.
        rule(
            &["list"],
            "coordination.k8s.io",
            "leases",
            Some(NODE_LEASES),
            &[],
        ),
        // What `kubectl describe node` shows of a rollout.
        rule(&["create"], "", "events", Some(EVENTS), &[]),
    ];
    if let Some(ns) = ceph_namespace {
        // `kubectl exec deploy/…`: the deployment, its pods, and exec (a websocket upgrade
        // is a GET, authorised as `get` before Kubernetes 1.35 and `create` since).
        p.push(rule(&["get"], "apps", "deployments", Some(ns), &[]));
        p.push(rule(&["get", "list"], "", "pods", Some(ns), &[]));
        p.push(rule(&["get", "create"], "", "pods/exec", Some(ns), &[]));
    }
    p
}

/// Whether a rule is about one node's own objects (its Node): those go in a ClusterRole of
/// that node's, not in the roles every agent node shares.
fn own(p: &Permission) -> bool {
    p.namespace.is_none() && p.resource == "nodes" && !p.names.is_empty()
}

/// The RBAC rules of `perms` every agent node shares, by namespace (`None`: the
/// ClusterRole's).
pub fn rules(perms: &[Permission]) -> BTreeMap<Option<String>, Vec<Value>> {
    let mut by_ns: BTreeMap<Option<String>, Vec<Value>> = BTreeMap::new();
    for p in perms.iter().filter(|p| !own(p)) {
        by_ns
            .entry(p.namespace.clone())
            .or_default()
            .push(rule_json(p));
    }
    by_ns
}

/// One permission as an RBAC rule.
fn rule_json(p: &Permission) -> Value {
    let mut r = json!({
        "apiGroups": [p.group],
        "resources": [p.resource],
        "verbs": p.verbs,
    });
    if !p.names.is_empty() {
        r["resourceNames"] = json!(p.names);
    }
    r
}

/// The ServiceAccount of `node`'s agent.
pub fn account(node: &str) -> String {
    format!("nk3-agent-{node}")
}

/// The Secret holding the long-lived token of `node`'s ServiceAccount.
pub fn token_secret(node: &str) -> String {
    format!("nk3-agent-{node}-token")
}

/// One object `nk3-agent credentials` keeps as it should be.
#[derive(Debug, Clone)]
pub struct Object {
    /// Its collection (`/apis/rbac.authorization.k8s.io/v1/clusterroles`).
    pub collection: String,
    /// What `kubectl get` calls it (`clusterrole/nk3-agent`).
    pub describe: String,
    /// The whole object as it should be.
    pub body: Value,
}

impl Object {
    /// The object's own path.
    pub fn path(&self) -> String {
        format!(
            "{}/{}",
            self.collection,
            self.body["metadata"]["name"].as_str().unwrap_or_default()
        )
    }

    /// The fields nk3 owns (the rest is the API server's): where an existing object must
    /// match `body`.
    pub fn owned(v: &Value) -> Value {
        json!({ "rules": v["rules"], "roleRef": v["roleRef"], "subjects": v["subjects"] })
    }
}

fn meta(name: &str, namespace: Option<&str>) -> Value {
    let mut m = json!({
        "name": name,
        "labels": { "app.kubernetes.io/managed-by": "nk3" },
    });
    if let Some(ns) = namespace {
        m["namespace"] = json!(ns);
    }
    m
}

const RBAC: &str = "/apis/rbac.authorization.k8s.io/v1";

/// The roles (shared by every agent node), and `node`'s ServiceAccount and bindings, in the
/// order they are made. The token Secret is made after these (see `credentials`).
pub fn objects(node: &str, perms: &[Permission]) -> Vec<Object> {
    let sa = account(node);
    let subject = json!([{ "kind": "ServiceAccount", "name": sa, "namespace": ACCOUNTS }]);
    let mut out = vec![Object {
        collection: format!("/api/v1/namespaces/{ACCOUNTS}/serviceaccounts"),
        describe: format!("serviceaccount {ACCOUNTS}/{sa}"),
        body: json!({
            "apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": meta(&sa, Some(ACCOUNTS)),
        }),
    }];
    for (ns, rules) in rules(perms) {
        out.extend(role_and_binding(ns.as_deref(), ROLE, &sa, rules, &subject));
    }
    // The node's own: patch its Node, no other.
    let mine: Vec<Value> = perms.iter().filter(|p| own(p)).map(rule_json).collect();
    if !mine.is_empty() {
        let name = format!("{sa}-self");
        out.extend(role_and_binding(None, &name, &name, mine, &subject));
    }
    out
}

/// A Role (in `ns`) or ClusterRole (`None`) named `role` with `rules`, and the binding
/// named `binding` that gives it to `subject`.
fn role_and_binding(
    ns: Option<&str>,
    role: &str,
    binding: &str,
    rules: Vec<Value>,
    subject: &Value,
) -> [Object; 2] {
    let (kind, scope, at) = match ns {
        None => ("ClusterRole", String::new(), String::new()),
        Some(ns) => ("Role", format!("/namespaces/{ns}"), format!("{ns}/")),
    };
    let lower = kind.to_ascii_lowercase();
    [
        Object {
            collection: format!("{RBAC}{scope}/{lower}s"),
            describe: format!("{lower} {at}{role}"),
            body: json!({
                "apiVersion": "rbac.authorization.k8s.io/v1", "kind": kind,
                "metadata": meta(role, ns), "rules": rules,
            }),
        },
        Object {
            collection: format!("{RBAC}{scope}/{lower}bindings"),
            describe: format!("{lower}binding {at}{binding}"),
            body: json!({
                "apiVersion": "rbac.authorization.k8s.io/v1", "kind": format!("{kind}Binding"),
                "metadata": meta(binding, ns),
                "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": kind, "name": role },
                "subjects": subject,
            }),
        },
    ]
}

/// Why a node's credentials may not run a rollout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denied {
    /// A kubelet's own credentials: NodeRestriction refuses Leases outside
    /// `kube-node-lease`, whatever RBAC says.
    Kubelet {
        /// `system:node:<name>`.
        user: String,
    },
    /// The API does not allow these (as `verb resource [name] [in namespace]`).
    Missing {
        /// Who the credentials are.
        user: String,
        /// What is not allowed.
        what: Vec<String>,
    },
}

/// Asks the API, as these credentials, whether they may do everything in `perms`
/// (SelfSubjectReview for who they are, SelfSubjectAccessReview for each verb). `Ok(None)`:
/// they may.
pub fn check(kube: &Kube, perms: &[Permission]) -> Result<Option<Denied>, KubeError> {
    let me = kube.post_json(
        "/apis/authentication.k8s.io/v1/selfsubjectreviews",
        &json!({ "apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview" }),
    );
    let (user, groups) = match me {
        Ok(v) => (
            v["status"]["userInfo"]["username"]
                .as_str()
                .unwrap_or("?")
                .to_string(),
            v["status"]["userInfo"]["groups"]
                .as_array()
                .map(|g| {
                    g.iter()
                        .filter_map(|g| g.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_else(Vec::new),
        ),
        // An API server without the review (before Kubernetes 1.28): the access reviews
        // below still tell.
        Err(e) if matches!(e.code(), Some(403 | 404)) => ("these credentials".into(), vec![]),
        Err(e) => return Err(e),
    };
    if groups.iter().any(|g| g == "system:masters") {
        return Ok(None);
    }
    if user.starts_with("system:node:") || groups.iter().any(|g| g == "system:nodes") {
        return Ok(Some(Denied::Kubelet { user }));
    }
    let mut missing = Vec::new();
    for p in perms {
        let (resource, sub) = p.resource.split_once('/').unwrap_or((p.resource, ""));
        let names: Vec<Option<&str>> = if p.names.is_empty() {
            vec![None]
        } else {
            p.names.iter().map(|n| Some(n.as_str())).collect()
        };
        for verb in &p.verbs {
            for name in &names {
                let mut attrs = json!({ "verb": verb, "group": p.group, "resource": resource });
                if !sub.is_empty() {
                    attrs["subresource"] = json!(sub);
                }
                if let Some(ns) = &p.namespace {
                    attrs["namespace"] = json!(ns);
                }
                if let Some(n) = name {
                    attrs["name"] = json!(n);
                }
                let review = kube.post_json(
                    "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews",
                    &json!({
                        "apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
                        "spec": { "resourceAttributes": attrs },
                    }),
                )?;
                if review["status"]["allowed"].as_bool() != Some(true) {
                    missing.push(format!(
                        "{verb} {}{}{}",
                        p.resource,
                        name.map(|n| format!(" {n}")).unwrap_or_default(),
                        p.namespace
                            .as_ref()
                            .map(|ns| format!(" in {ns}"))
                            .unwrap_or_default()
                    ));
                }
            }
        }
    }
    Ok((!missing.is_empty()).then_some(Denied::Missing {
        user,
        what: missing,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_are_granted_by_name_for_every_slot_and_the_first() {
        let l = RolloutLease::default();
        assert_eq!(l.names(1), vec!["nk3-rollout"]);
        assert_eq!(
            l.names(3),
            vec![
                "nk3-rollout",
                "nk3-rollout-0",
                "nk3-rollout-1",
                "nk3-rollout-2"
            ]
        );
        let r = rules(&permissions("n1", &l, 2, None));
        let ks = &r[&Some("kube-system".to_string())];
        assert_eq!(
            ks[0]["resourceNames"],
            json!(["nk3-rollout", "nk3-rollout-0", "nk3-rollout-1"])
        );
        assert_eq!(ks[1]["verbs"], json!(["create"]));
        assert!(ks[1].get("resourceNames").is_none());
    }

    #[test]
    fn the_roles_follow_the_lease_settings() {
        let l = RolloutLease {
            namespace: "nk3-system".into(),
            name: "fleet".into(),
        };
        let r = rules(&permissions("n1", &l, 2, None));
        assert!(!r.contains_key(&Some("kube-system".to_string())), "{r:?}");
        assert_eq!(
            r[&Some("nk3-system".to_string())][0]["resourceNames"],
            json!(["fleet", "fleet-0", "fleet-1"])
        );
    }

    #[test]
    fn nothing_is_granted_on_secrets_or_with_wildcards() {
        for p in permissions("n1", &RolloutLease::default(), 5, Some("rook-ceph")) {
            assert_ne!(p.resource, "secrets");
            assert!(!p.verbs.contains(&"*") && p.resource != "*" && p.group != "*");
            assert!(!p.verbs.contains(&"delete"), "{p:?}");
        }
    }

    #[test]
    fn objects_bind_one_account_per_node_to_shared_roles() {
        let objs = objects("n1", &permissions("n1", &RolloutLease::default(), 1, None));
        let kinds: Vec<String> = objs.iter().map(|o| o.describe.clone()).collect();
        assert_eq!(
            kinds,
            [
                "serviceaccount kube-system/nk3-agent-n1",
                "clusterrole nk3-agent",
                "clusterrolebinding nk3-agent-n1",
                "role default/nk3-agent",
                "rolebinding default/nk3-agent-n1",
                "role kube-node-lease/nk3-agent",
                "rolebinding kube-node-lease/nk3-agent-n1",
                "role kube-system/nk3-agent",
                "rolebinding kube-system/nk3-agent-n1",
                "clusterrole nk3-agent-n1-self",
                "clusterrolebinding nk3-agent-n1-self",
            ]
        );
        // Patching nodes: its own only.
        let own = &objs[9].body["rules"][0];
        assert_eq!(own["verbs"], json!(["patch"]));
        assert_eq!(own["resourceNames"], json!(["n1"]));
        let shared = &objs[1].body["rules"];
        assert!(shared
            .as_array()
            .unwrap()
            .iter()
            .all(|r| !r["verbs"].as_array().unwrap().contains(&json!("patch"))));
        let b = &objs[2].body;
        assert_eq!(b["subjects"][0]["name"], "nk3-agent-n1");
        assert_eq!(
            objs[2].path(),
            format!("{RBAC}/clusterrolebindings/nk3-agent-n1")
        );
    }
}
