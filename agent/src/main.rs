//! nk3-agent: the binary every nk3 node runs.

mod access;
mod api;
mod cli;
mod clock;
mod cluster;
#[cfg(test)]
mod cluster_tests;
mod command;
mod commands;
mod coordination;
mod drain;
mod effects;
mod env_vars;
#[cfg(test)]
mod fakes;
mod git;
mod halts;
mod health;
mod kube;
mod leases;
mod logging;
mod machine;
mod memory;
mod metrics;
mod progress;
mod reconcile;
#[cfg(test)]
mod reconcile_tests;
mod redact;
mod runner;
#[cfg(test)]
mod runner_tests;
mod state;
mod system;
mod token;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    // Parsing the command line starts no thread, so libgit2's globals can still be set.
    let git_timeout = match &cli.command {
        cli::Command::Run(a) if !a.check => Some(a.agent.git_timeout),
        cli::Command::Plan(a) => Some(a.git_timeout),
        _ => None,
    };
    if let Some(t) = git_timeout {
        git::set_timeouts(t);
        git::register_transports();
    }
    if matches!(&cli.command, cli::Command::Run(_)) {
        memory::one_arena();
    }
    let result = match cli.command {
        cli::Command::Run(args) => commands::run::run(*args),
        cli::Command::Status(args) => commands::status::run(&args),
        cli::Command::Plan(args) => commands::plan::run(&args),
        cli::Command::Render(args) => commands::render::run(&args),
        cli::Command::Validate(args) => commands::validate::run(&args),
        cli::Command::Nudge(args) => commands::nudge::run(&args),
        cli::Command::Credentials(args) => commands::credentials::run(&args),
        cli::Command::Completions { shell } => commands::docs::completions(shell),
        cli::Command::Man => commands::docs::man(),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            report(&e);
            ExitCode::FAILURE
        }
    }
}

/// Prints an error and its causes on one line each, for people: no backtrace.
#[allow(clippy::print_stderr)]
fn report(e: &anyhow::Error) {
    eprintln!("nk3-agent: {e}");
    for cause in e.chain().skip(1) {
        eprintln!("  caused by: {cause}");
    }
}
