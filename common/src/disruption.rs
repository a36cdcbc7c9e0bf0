//! What a drain may evict and what a PodDisruptionBudget allows, judged from the API's
//! objects as JSON. Pure.
//!
//! kubectl drain's rules: a pod whose controller is a DaemonSet stays (its controller would
//! put it straight back), a mirror pod (a static pod's API shadow) stays, a pod that has
//! finished is no disruption. A budget that allows no disruption now blocks the drain; one
//! whose every expected pod must stay healthy never will.

use serde_json::Value;

/// Whether a drain evicts this pod.
pub fn evictable(pod: &Value) -> bool {
    let daemon = pod["metadata"]["ownerReferences"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|o| o["controller"] == true && o["kind"] == "DaemonSet");
    let mirror = pod["metadata"]["annotations"]
        .get("kubernetes.io/config.mirror")
        .is_some();
    let finished = matches!(
        pod["status"]["phase"].as_str(),
        Some("Succeeded" | "Failed")
    );
    !daemon && !mirror && !finished
}

/// Whether a label selector (`matchLabels`, `matchExpressions`) selects these labels. A
/// missing selector selects nothing; an empty one everything (policy/v1).
pub fn selects(selector: &Value, labels: &Value) -> bool {
    if selector.is_null() {
        return false;
    }
    let label = |k: &str| labels.get(k).and_then(Value::as_str);
    let by_labels = selector["matchLabels"]
        .as_object()
        .into_iter()
        .flatten()
        .all(|(k, v)| label(k) == v.as_str());
    let by_expressions = selector["matchExpressions"]
        .as_array()
        .into_iter()
        .flatten()
        .all(|e| {
            let key = e["key"].as_str().unwrap_or_default();
            let values: Vec<&str> = e["values"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            match e["operator"].as_str() {
                Some("In") => label(key).is_some_and(|v| values.contains(&v)),
                Some("NotIn") => label(key).is_none_or(|v| !values.contains(&v)),
                Some("Exists") => label(key).is_some(),
                Some("DoesNotExist") => label(key).is_none(),
                _ => false,
            }
        });
    by_labels && by_expressions
}

/// A budget that stops a drain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blocker {
    /// `namespace/name` of the PodDisruptionBudget.
    pub budget: String,
    /// A pod of this node it covers.
    pub pod: String,
    /// It can never allow a disruption as it is written (every expected pod must stay
    /// healthy: `minAvailable` equal to the replicas, `maxUnavailable: 0`): a person must
    /// change the budget or the workload.
    pub never: bool,
    /// What the budget's status says.
    pub why: String,
}

/// The first budget among `budgets` that allows no disruption of one of `pods` now.
pub fn blocker(budgets: &[Value], pods: &[Value]) -> Option<Blocker> {
    for pod in pods.iter().filter(|p| evictable(p)) {
        let ns = pod["metadata"]["namespace"].as_str().unwrap_or("default");
        let name = pod["metadata"]["name"].as_str().unwrap_or_default();
        for b in budgets {
            if b["metadata"]["namespace"].as_str() != Some(ns)
                || !selects(&b["spec"]["selector"], &pod["metadata"]["labels"])
            {
                continue;
            }
            let st = &b["status"];
            let allowed = st["disruptionsAllowed"].as_i64().unwrap_or(0);
            if allowed > 0 {
                continue;
            }
            let expected = st["expectedPods"].as_i64().unwrap_or(0);
            let desired = st["desiredHealthy"].as_i64().unwrap_or(0);
            let healthy = st["currentHealthy"].as_i64().unwrap_or(0);
            let computed = st["observedGeneration"].as_i64().is_some()
                && st["observedGeneration"] == b["metadata"]["generation"];
            let never = computed && expected > 0 && desired >= expected;
            let why = if never {
                format!(
                    "it wants {desired} of {expected} pods healthy at all times, so it never allows an eviction"
                )
            } else if !computed {
                "its status is not computed yet".to_string()
            } else {
                format!("{healthy} of {expected} pods are healthy and it wants {desired}")
            };
            return Some(Blocker {
                budget: format!(
                    "{ns}/{}",
                    b["metadata"]["name"].as_str().unwrap_or_default()
                ),
                pod: format!("{ns}/{name}"),
                never,
                why,
            });
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(name: &str, labels: Value, owner: Option<&str>) -> Value {
        let mut p =
            json!({ "metadata": { "name": name, "namespace": "default", "labels": labels } });
        if let Some(kind) = owner {
            p["metadata"]["ownerReferences"] =
                json!([{ "kind": kind, "name": "x", "controller": true, "uid": "u" }]);
        }
        p
    }

    #[test]
    fn drain_recognises_daemonset_pods_by_their_controller_reference() {
        assert!(!evictable(&pod("ds", json!({}), Some("DaemonSet"))));
        assert!(evictable(&pod("rs", json!({}), Some("ReplicaSet"))));
        // Owned by a DaemonSet but not controlled by it: evicted, as kubectl does.
        let mut p = pod("x", json!({}), None);
        p["metadata"]["ownerReferences"] =
            json!([{ "kind": "DaemonSet", "name": "d", "uid": "u" }]);
        assert!(evictable(&p));
        let mut m = pod("m", json!({}), None);
        m["metadata"]["annotations"] = json!({ "kubernetes.io/config.mirror": "abc" });
        assert!(!evictable(&m));
        let mut done = pod("d", json!({}), None);
        done["status"] = json!({ "phase": "Succeeded" });
        assert!(!evictable(&done));
    }

    #[test]
    fn selectors() {
        let l = json!({ "app": "db", "tier": "data" });
        assert!(selects(&json!({}), &l));
        assert!(!selects(&Value::Null, &l));
        assert!(selects(&json!({ "matchLabels": { "app": "db" } }), &l));
        assert!(!selects(&json!({ "matchLabels": { "app": "web" } }), &l));
        let e = |op: &str, vals: Value| json!({ "matchExpressions": [{ "key": "tier", "operator": op, "values": vals }] });
        assert!(selects(&e("In", json!(["data", "x"])), &l));
        assert!(!selects(&e("NotIn", json!(["data"])), &l));
        assert!(selects(&e("Exists", json!([])), &l));
        assert!(!selects(&e("DoesNotExist", json!([])), &l));
        assert!(!selects(&e("Bogus", json!([])), &l));
    }

    #[test]
    fn unsatisfiable_pdbs_are_told_from_ones_that_will_allow_later() {
        let pods = [pod("db-1", json!({ "app": "db" }), Some("ReplicaSet"))];
        let pdb = |allowed: i64, healthy: i64, desired: i64, expected: i64| {
            json!({
                "metadata": { "name": "db", "namespace": "default", "generation": 1 },
                "spec": { "selector": { "matchLabels": { "app": "db" } } },
                "status": { "observedGeneration": 1, "disruptionsAllowed": allowed,
                            "currentHealthy": healthy, "desiredHealthy": desired, "expectedPods": expected },
            })
        };
        assert_eq!(blocker(&[pdb(1, 2, 1, 2)], &pods), None);
        let never = blocker(&[pdb(0, 1, 1, 1)], &pods).unwrap();
        assert!(never.never, "{never:?}");
        assert_eq!(never.budget, "default/db");
        let later = blocker(&[pdb(0, 1, 2, 3)], &pods).unwrap();
        assert!(!later.never, "{later:?}");
        // Other namespaces' budgets do not count.
        let mut other = pdb(0, 1, 1, 1);
        other["metadata"]["namespace"] = json!("kube-system");
        assert_eq!(blocker(&[other], &pods), None);
    }
}
