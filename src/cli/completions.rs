//! `blockvault completions SHELL`: the shell's completion script, generated from the same
//! argument definitions the parser uses, so it cannot drift from them.

use std::process::ExitCode;

use clap::CommandFactory;
use clap_complete::Shell;

use super::Cli;

/// Arguments of `completions`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The shell: bash (source it, or install it as
    /// /usr/share/bash-completion/completions/blockvault), zsh (as _blockvault in a folder of
    /// $fpath), fish (as ~/.config/fish/completions/blockvault.fish), elvish, powershell.
    shell: Shell,
}

/// Print the script.
pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let mut script = Vec::new();
    clap_complete::generate(a.shell, &mut Cli::command(), "blockvault", &mut script);
    super::output::print(&script);
    Ok(ExitCode::SUCCESS)
}
