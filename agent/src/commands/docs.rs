//! Shell completions and the manual page, generated from the command-line definition so
//! they never drift from it. The package installs both.

use std::process::ExitCode;

use clap::CommandFactory as _;

use crate::cli::Cli;

/// `nk3-agent completions SHELL`.
pub fn completions(shell: clap_complete::Shell) -> anyhow::Result<ExitCode> {
    let mut cmd = Cli::command();
    clap_complete::generate(shell, &mut cmd, "nk3-agent", &mut std::io::stdout());
    Ok(ExitCode::SUCCESS)
}

/// `nk3-agent man`: nk3-agent(1), with a section per subcommand.
pub fn man() -> anyhow::Result<ExitCode> {
    let cmd = Cli::command();
    let mut out = std::io::stdout().lock();
    clap_mangen::Man::new(cmd.clone()).render(&mut out)?;
    // Each command's own options, under a section named after it.
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        use std::io::Write as _;
        let about = sub.get_about().map(ToString::to_string).unwrap_or_default();
        writeln!(
            out,
            ".SH \"NK3-AGENT {}\"\n{}",
            sub.get_name().to_uppercase(),
            about.replace('\\', "\\\\").replace('-', "\\-")
        )?;
        clap_mangen::Man::new(sub.clone()).render_options_section(&mut out)?;
    }
    Ok(ExitCode::SUCCESS)
}
