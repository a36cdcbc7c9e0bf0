//! Step 10: whether this node is healthy now, after a switch or a boot (fresh facts only),
//! and the optional Ceph check.

use std::time::{Duration, SystemTime};

use nk3_common::inventory::HealthCheck;
use nk3_common::lease;

use crate::cluster::*;
use crate::effects::Probes;

/// What makes "this node is healthy" a fact about now, not about before the switch.
#[derive(Debug, Clone)]
pub struct Fresh {
    /// This boot's id (`/proc/sys/kernel/random/boot_id`).
    pub boot_id: String,
    /// When the switch (or the boot) happened: the kubelet must have heartbeaten since.
    pub since: SystemTime,
}

impl Cluster {
    /// The optional Ceph check: `ceph status` in the rook-ceph tools deployment, judged with
    /// the inventory's tolerated warnings.
    pub fn ceph_healthy(
        &self,
        ceph: &nk3_common::inventory::Ceph,
        timeout: Duration,
    ) -> Result<(), String> {
        let mut cmd = std::process::Command::new(&self.kubectl);
        cmd.arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args([
                "-n",
                &ceph.namespace,
                "exec",
                &format!("deploy/{}", ceph.deployment),
            ])
            .args(["--", "ceph", "status", "--format", "json"]);
        let out = crate::command::run(
            cmd,
            timeout.clamp(Duration::from_secs(30), Duration::from_secs(60)),
        )
        .map_err(|e| format!("ceph status: {e}"))?;
        ceph.judge(&String::from_utf8_lossy(&out.stdout))
    }

    /// One health check of the node after a switch: k3s active (through `systemctl`), the
    /// API ready, this node Ready *now* (its Node reports this boot's id, and its kubelet
    /// renewed its heartbeat after `fresh.since`: a Ready condition from before the switch
    /// or the reboot proves nothing), every node that was Ready before still Ready and
    /// heartbeating, and the inventory's own checks. `Err` says what is not healthy yet.
    pub fn healthy(
        &self,
        ready_before: &[String],
        rollout: &nk3_common::inventory::Rollout,
        watch_namespaces: &[String],
        fresh: &Fresh,
        deadline: SystemTime,
        probes: &dyn Probes,
    ) -> Result<(), String> {
        // Every probe is bounded by what is left of the health timeout: a check that hangs
        // is stopped and counts as failed, never waited for.
        let left = || {
            deadline
                .duration_since(SystemTime::now())
                .unwrap_or_default()
                // Never less than a probe needs to answer at all: a verification resumed
                // after its deadline judges the node now, with probes that can finish.
                .max(Duration::from_secs(5))
        };
        let checks: &[HealthCheck] = &rollout.health_checks;
        if probes
            .active("k3s.service", left().min(Duration::from_secs(30)))
            .is_err()
        {
            return Err("k3s.service is not active".into());
        }
        if !self.kube.ready() {
            return Err("the API is not ready (/readyz)".into());
        }
        let nodes = self.kube.nodes().map_err(|e| e.to_string())?;
        let me = nodes
            .iter()
            .find(|n| name_of(n) == self.me)
            .ok_or_else(|| format!("node {} is not registered", self.me))?;
        let boot_id = me
            .status
            .as_ref()
            .and_then(|s| s.node_info.as_ref())
            .map(|i| i.boot_id.clone())
            .unwrap_or_default();
        if boot_id != fresh.boot_id {
            return Err(format!(
                "node {} has not reported this boot yet (its bootID is {:?}, this boot is {:?})",
                self.me, boot_id, fresh.boot_id
            ));
        }
        if !is_ready(me) {
            return Err(format!("node {} is not Ready", self.me));
        }
        let heartbeats = self.heartbeats().map_err(|e| e.to_string())?;
        match heartbeats.get(&self.me) {
            Some((renewed, _)) if *renewed >= fresh.since => {}
            _ => {
                return Err(format!(
                    "node {}'s kubelet has not renewed its heartbeat since the switch",
                    self.me
                ))
            }
        }
        let now = SystemTime::now();
        for n in ready_before.iter().filter(|n| **n != self.me) {
            let ready = nodes
                .iter()
                .any(|node| name_of(node) == *n && is_ready(node));
            let alive = heartbeats
                .get(n)
                .is_some_and(|(r, d)| lease::stale_heartbeat(*r, *d, now).is_none());
            if !ready || !alive {
                return Err(format!("node {n} was Ready before and is not now"));
            }
        }
        for ns in watch_namespaces {
            if let Some(why) = self.workloads_unhealthy(ns).map_err(|e| e.to_string())? {
                return Err(why);
            }
        }
        if let Some(c) = &rollout.ceph {
            self.ceph_healthy(c, left())?;
        }
        inventory_checks(checks, probes, &left)
    }
}

/// The inventory's checks, in order, each bounded by what `left` says is left of the health
/// timeout (an HTTP check by at most 10 s): the first that fails is the answer.
pub fn inventory_checks(
    checks: &[HealthCheck],
    probes: &dyn Probes,
    left: &dyn Fn() -> Duration,
) -> Result<(), String> {
    use crate::command::Failure;
    for c in checks {
        match c {
            HealthCheck::Command { name, argv } => {
                if argv.is_empty() {
                    return Err(format!("health check {name} has no command"));
                }
                if let Err(e) = probes.command(argv, left()) {
                    return Err(match e.failure {
                        Failure::TimedOut => format!(
                            "health check {name} did not finish within the health timeout; it was stopped"
                        ),
                        Failure::NotStarted => {
                            format!("health check {name} could not start: {}", e.tail)
                        }
                        Failure::Exited => format!("health check {name} failed ({})", e.status),
                    });
                }
            }
            HealthCheck::Http { name, url } => {
                if let Err(why) = probes.http(url, left().min(Duration::from_secs(10))) {
                    return Err(format!("health check {name} ({url}) failed: {why}"));
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::{CommandFailed, Failure};
    use std::cell::RefCell;

    /// Probes that answer from a script and write down what they were asked.
    struct Scripted {
        asked: RefCell<Vec<(String, Duration)>>,
        command: Option<Failure>,
        http: Option<&'static str>,
    }

    impl Probes for Scripted {
        fn active(&self, _: &str, _: Duration) -> Result<(), CommandFailed> {
            Ok(())
        }
        fn command(&self, argv: &[String], timeout: Duration) -> Result<(), CommandFailed> {
            self.asked.borrow_mut().push((argv.join(" "), timeout));
            match self.command {
                None => Ok(()),
                Some(failure) => Err(CommandFailed {
                    command: argv.join(" "),
                    failure,
                    status: "exit status: 3".into(),
                    tail: "no such file".into(),
                }),
            }
        }
        fn http(&self, url: &str, timeout: Duration) -> Result<(), String> {
            self.asked.borrow_mut().push((url.to_string(), timeout));
            self.http.map_or(Ok(()), |why| Err(why.to_string()))
        }
    }

    fn checks() -> Vec<HealthCheck> {
        vec![
            HealthCheck::Command {
                name: "etcd".into(),
                argv: vec!["etcdctl".into(), "endpoint".into(), "health".into()],
            },
            HealthCheck::Http {
                name: "ingress".into(),
                url: "https://127.0.0.1/healthz".into(),
            },
        ]
    }

    fn probes(command: Option<Failure>, http: Option<&'static str>) -> Scripted {
        Scripted {
            asked: RefCell::new(Vec::new()),
            command,
            http,
        }
    }

    #[test]
    fn the_inventorys_checks_run_in_order_each_within_what_is_left() {
        let p = probes(None, None);
        let left = || Duration::from_secs(42);
        assert_eq!(inventory_checks(&checks(), &p, &left), Ok(()));
        assert_eq!(
            p.asked.into_inner(),
            [
                (
                    "etcdctl endpoint health".to_string(),
                    Duration::from_secs(42)
                ),
                // An HTTP check waits at most 10 s whatever is left.
                (
                    "https://127.0.0.1/healthz".to_string(),
                    Duration::from_secs(10)
                ),
            ]
        );
    }

    #[test]
    fn the_first_failing_check_is_the_answer_and_says_how_it_failed() {
        let left = || Duration::from_secs(5);
        for (failure, want) in [
            (
                Failure::TimedOut,
                "health check etcd did not finish within the health timeout; it was stopped",
            ),
            (
                Failure::NotStarted,
                "health check etcd could not start: no such file",
            ),
            (Failure::Exited, "health check etcd failed (exit status: 3)"),
        ] {
            let p = probes(Some(failure), None);
            assert_eq!(
                inventory_checks(&checks(), &p, &left),
                Err(want.to_string())
            );
            assert_eq!(p.asked.borrow().len(), 1, "the HTTP check is not asked");
        }
        let p = probes(None, Some("HTTP 503 Service Unavailable"));
        assert_eq!(
            inventory_checks(&checks(), &p, &left),
            Err("health check ingress (https://127.0.0.1/healthz) failed: HTTP 503 Service Unavailable".into())
        );
    }
}
