//! The `blockvault` command: arguments, logging, and the exit code. Everything else lives in
//! the library; the commands are in `cli/`.

mod cli;

use std::process::ExitCode;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    cli::main()
}
