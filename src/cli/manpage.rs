//! `blockvault manpage`: one manual page for the whole command, generated from the argument
//! definitions (clap_mangen). docs/blockvault.1 is this output, kept current by a test
//! (tests/cli.rs) that regenerates and compares it.
//!
//! The page holds the main command's sections (synopsis, description, the global and key
//! access options), then one section per command, nested commands included, with its
//! description, synopsis and own options, and last the environment and exit status: a reader
//! finds every option in one page.

use std::process::ExitCode;

use clap::CommandFactory;
use clap_mangen::Man;

use super::Cli;

/// Print the page.
pub fn run() -> anyhow::Result<ExitCode> {
    super::output::print(&render()?);
    Ok(ExitCode::SUCCESS)
}

/// The page, in roff.
pub fn render() -> std::io::Result<Vec<u8>> {
    let mut cmd = Cli::command().disable_help_subcommand(true);
    cmd.build();
    let man = Man::new(cmd.clone());
    let mut page = Vec::new();
    man.render_title(&mut page)?;
    man.render_name_section(&mut page)?;
    man.render_synopsis_section(&mut page)?;
    man.render_description_section(&mut page)?;
    man.render_options_section(&mut page)?;
    // Not clap_mangen's command list, which points at one page per command: the sections
    // below are those commands.
    for sub in cmd.get_subcommands() {
        command_section(sub, &mut page)?;
    }
    let mut extra = Vec::new();
    man.render_extra_section(&mut extra)?;
    page.extend_from_slice(&headings(&extra, |_| {
        ".SH \"ENVIRONMENT AND EXIT STATUS\"".into()
    }));
    Ok(page)
}

/// A section for `sub` (`.SH "BLOCKVAULT BACKUP"`) and its commands in turn. Its global
/// options are left out: the main sections list them once.
fn command_section(sub: &clap::Command, page: &mut Vec<u8>) -> std::io::Result<()> {
    let name = sub
        .get_display_name()
        .unwrap_or_else(|| sub.get_name())
        .replace('-', " ");
    page.extend_from_slice(format!(".SH \"{}\"\n", name.to_uppercase()).as_bytes());
    let own = sub
        .clone()
        .mut_args(|a| if a.is_global_set() { a.hide(true) } else { a });
    let man = Man::new(own.clone());
    let mut parts = Vec::new();
    man.render_description_section(&mut parts)?;
    man.render_synopsis_section(&mut parts)?;
    if own.get_arguments().any(|a| !a.is_hide_set()) {
        man.render_options_section(&mut parts)?;
    }
    // Its parts' headings become subsections of its own section.
    page.extend_from_slice(&headings(&parts, |h| format!(".SS {h}")));
    for nested in sub.get_subcommands() {
        command_section(nested, page)?;
    }
    Ok(())
}

/// `roff` with each section heading line (`.SH X`) replaced by `heading(X)`.
fn headings(roff: &[u8], heading: impl Fn(&str) -> String) -> Vec<u8> {
    let text = String::from_utf8_lossy(roff);
    text.lines()
        .map(|l| match l.strip_prefix(".SH ") {
            Some(h) => heading(h) + "\n",
            None => format!("{l}\n"),
        })
        .collect::<String>()
        .into_bytes()
}
