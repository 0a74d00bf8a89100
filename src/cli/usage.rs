//! Parsing the command line: usage errors as JSON under `--json`, the help headings that keep
//! the options every command shares apart from each command's own, and the environment
//! variables that stand in for options.
//!
//! The variables are read here rather than through clap's `env`: clap counts an option filled
//! from the environment as given, so its usage line after an error would show
//! `--vault <URL> --keystore <DIR>` as if they were required.

use std::ffi::OsString;

use clap::error::ErrorKind as ClapKind;
use clap::Parser;

use super::Cli;

/// Help heading of the options every command takes: where the vault and keys are, `--json`.
pub const GLOBAL: &str = "Global options";
/// Help heading of the options that reach a customer-managed key's private half.
pub const KEY_ACCESS: &str = "Key access options";
/// The end of `blockvault --help` and of the manual page.
pub const ENVIRONMENT_AND_EXIT_STATUS: &str = "\
Environment: BLOCKVAULT_VAULT, BLOCKVAULT_KEYSTORE and BLOCKVAULT_CMK_PRIVATE stand for --vault, \
--keystore and --cmk-private. Secrets come from files or the environment, never from arguments: \
BLOCKVAULT_CMK_PASSPHRASE, BLOCKVAULT_PKCS11_PIN, BLOCKVAULT_EXPORT_PASSPHRASE, \
BLOCKVAULT_RECOVERY_PASSPHRASE. BLOCKVAULT_PKCS11_MODULE names a PKCS#11 module; \
BLOCKVAULT_READER=pread reads and BLOCKVAULT_WRITER=pwrite restores with plain pread and \
pwrite (no io_uring, no BLKZEROOUT). RUST_LOG=blockvault=debug traces each stage \
on stderr; NO_COLOR turns colour off.

Exit status: 0 success, 1 failure, 2 bad usage, 3 a data integrity problem was found (verify, \
or a restore that met damaged data), 130 and 143 stopped by SIGINT and SIGTERM.";

/// The arguments parsed, or the process ends: help and version on stdout (exit 0); a usage
/// error on stderr (exit 2), and with `--json` on the command line also as
/// `{"error", "kind": "Usage"}` on stdout, like every other failure.
pub fn parse() -> Cli {
    let e = match Cli::try_parse() {
        Ok(cli) => return cli,
        Err(e) => e,
    };
    if matches!(e.kind(), ClapKind::DisplayHelp | ClapKind::DisplayVersion) || !json_asked() {
        e.exit();
    }
    let doc = serde_json::json!({ "error": message(&e.render().to_string()), "kind": "Usage" });
    println!("{doc}");
    let _ = e.print();
    std::process::exit(2);
}

/// Whether `--json` is among the options (before a `--` that ends them).
fn json_asked() -> bool {
    std::env::args_os()
        .skip(1)
        .take_while(|a| a != "--")
        .any(|a| a == "--json")
}

/// The sentence of a rendered clap error: without the `error: ` prefix, the usage line and
/// the pointer to `--help`, its lines joined.
fn message(rendered: &str) -> String {
    let body = rendered.split("\n\nUsage:").next().unwrap_or(rendered);
    let body = body.strip_prefix("error: ").unwrap_or(body);
    body.split('\n')
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// A variable that stands in for an option; unset and empty are the same.
pub fn env(name: &str) -> Option<OsString> {
    std::env::var_os(name).filter(|v| !v.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_is_the_sentence_without_usage() {
        let rendered = "error: the following required arguments were not provided:\n  --disk <DISK>\n\nUsage: blockvault backup --disk <DISK> <SOURCE>\n\nFor more information, try '--help'.\n";
        assert_eq!(
            message(rendered),
            "the following required arguments were not provided: --disk <DISK>"
        );
        assert_eq!(
            message("error: unexpected argument '--x' found\n"),
            "unexpected argument '--x' found"
        );
    }
}
