//! The `blockvault` command: arguments, logging, and the exit code. Everything else lives in
//! the library; the commands are in `cli/`.

mod cli;

use std::io::IsTerminal;
use std::process::ExitCode;

fn main() -> ExitCode {
    // Every command may hold key material (keystore keys, DEKs, PINs, passphrases), so every
    // command, from its first instruction, is not dumpable: no core file, and no ptrace or
    // /proc/<pid>/mem read by another process of the same user (docs/CRYPTO.md, "Memory and
    // core dumps").
    let dumpable = nix::sys::prctl::set_dumpable(false);
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(colour_on_stderr())
        .init();
    if let Err(e) = dumpable {
        tracing::warn!(error = %e, "cannot disable core dumps; key material may reach one");
    }
    cli::main()
}

/// Colour only for a person at a terminal: never into a file or pipe (a log full of escape
/// codes), and never when `NO_COLOR` is set to anything (no-color.org).
fn colour_on_stderr() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}
