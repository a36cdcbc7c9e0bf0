//! nk3-agent: the binary every nk3 node runs.

mod cli;
mod commands;
mod env_vars;
mod git;
mod logging;
mod machine;
mod reconcile;
mod state;
mod system;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    let result = match cli.command {
        cli::Command::Run(args) => commands::run::run(*args),
        cli::Command::Status(args) => commands::status::run(&args),
        cli::Command::Plan(args) => commands::plan::run(&args),
        cli::Command::Render(args) => commands::render::run(&args),
        cli::Command::Validate(args) => commands::validate::run(&args),
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
