//! `nk3-agent validate FILE`: check an inventory and show the nodes it declares.
#![allow(clippy::print_stdout)]

use std::process::ExitCode;

use nk3_common::inventory::Layout;

use crate::cli::ValidateArgs;

/// Exit 0 and a summary when the inventory is valid; exit 1 with every problem otherwise.
pub fn run(args: &ValidateArgs) -> anyhow::Result<ExitCode> {
    let Some(inv) = super::load_inventory(&args.file)? else {
        return Ok(ExitCode::FAILURE);
    };
    let layout = match inv.layout {
        Layout::Seed => "`cluster:` layout",
        Layout::Flat => "flat layout",
    };
    println!(
        "{}: valid ({layout}), {} node{}",
        args.file.display(),
        inv.nodes.len(),
        if inv.nodes.len() == 1 { "" } else { "s" }
    );
    let width = inv.nodes.iter().map(|n| n.key.len()).max().unwrap_or(0);
    for n in &inv.nodes {
        let mut notes = vec![n.role.as_str()];
        if n.initiator {
            notes.push("initiator");
        }
        println!("  {:width$}  {}  {}", n.key, n.hostname, notes.join(", "));
    }
    if !inv.nodes.iter().any(|n| n.initiator) {
        println!(
            "note: no node is `initiator: true`: right for an inventory adopting a running cluster, but a new cluster never forms (the node at the join address {} would wait to join itself; its agent refuses such a commit)",
            inv.join_address
        );
    }
    let agents = inv
        .nodes
        .iter()
        .filter(|n| n.role == nk3_common::inventory::Role::Agent)
        .count();
    if agents > 0 {
        println!(
            "note: k3s writes no API credentials on agent-role nodes; each of the {agents} needs its own from `nk3-agent credentials <hostname> --inventory {}` on a server, or it builds every commit and waits instead of rolling (README: agent-role nodes)",
            args.file.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}
