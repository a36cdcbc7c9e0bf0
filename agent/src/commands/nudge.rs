//! `nk3-agent nudge`: tells every agent of the cluster to fetch now. The agents watch the
//! rollout Lease between polls; this sets its `nk3.io/desired-commit` annotation. An
//! inventory repository's CI can do the same with kubectl after a push:
//! `kubectl -n kube-system annotate lease nk3-rollout nk3.io/desired-commit=$SHA --overwrite`.
#![allow(clippy::print_stdout)]

use std::process::ExitCode;

use crate::cli::NudgeArgs;
use crate::cluster::Cluster;

/// Sets the annotation.
pub fn run(args: &NudgeArgs) -> anyhow::Result<ExitCode> {
    let Some(cluster) = Cluster::connect(&args.kubeconfig, "nk3-nudge")?
        .map(|c| c.with_lease(args.lease.rollout_lease()))
    else {
        anyhow::bail!(
            "no kubeconfig at {} (pass --kubeconfig or set NK3_KUBECONFIG)",
            args.kubeconfig.display()
        );
    };
    let value = args
        .commit
        .clone()
        .unwrap_or_else(|| format!("nudged-{}", crate::state::now()));
    cluster.nudge(&value)?;
    println!("asked every nk3-agent to fetch now ({value})");
    Ok(ExitCode::SUCCESS)
}
