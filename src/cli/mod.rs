//! Command-line interface: one file per command, shared output and progress helpers.
//!
//! Exit codes: 0 success, 1 failure, 2 bad usage, 3 a data integrity problem was found.

mod backup;
mod completions;
mod forget;
mod init;
mod inspect;
mod key;
mod key_access;
mod manpage;
mod mount;
mod output;
mod prune;
mod restore;
mod serve;
mod snapshots;
mod upgrade;
mod usage;
mod verify;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use blockvault::crypto::keyring::KeyAccess;
use blockvault::crypto::rsa::{Pkcs11Options, PrivateKeyFile, SecretSource};
use blockvault::crypto::Keystore;
use blockvault::{Error, ErrorKind};

pub use output::Output;

/// blockvault: encrypted, incremental backups of block devices and VM disk images.
#[derive(Parser, Debug)]
#[command(
    name = "blockvault",
    version,
    about,
    long_about = None,
    after_long_help = usage::ENVIRONMENT_AND_EXIT_STATUS
)]
pub struct Cli {
    /// Vault location: a folder path, file://PATH, s3://BUCKET/PREFIX or
    /// az://CONTAINER/PREFIX (or set BLOCKVAULT_VAULT).
    #[arg(long, global = true, value_name = "URL", help_heading = usage::GLOBAL)]
    vault: Option<String>,
    /// Folder of the platform keystore (or set BLOCKVAULT_KEYSTORE; default:
    /// $XDG_DATA_HOME/blockvault/keystore, else ~/.local/share/blockvault/keystore).
    #[arg(long, global = true, value_name = "DIR", help_heading = usage::GLOBAL)]
    keystore: Option<PathBuf>,
    /// Print one JSON document with the command's figures instead of text (errors too).
    #[arg(long, global = true, help_heading = usage::GLOBAL)]
    json: bool,
    #[command(flatten)]
    keys: KeyArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create a vault: platform-managed keys, or a customer-managed RSA key (--cmk).
    Init(init::Args),
    /// Back up a disk image or block device (full the first time, then incremental).
    Backup(backup::Args),
    /// List snapshots.
    Snapshots(snapshots::Args),
    /// Restore a snapshot to a file (raw or qcow2), a block device or an NBD export.
    Restore(restore::Args),
    /// Mount snapshots as read-only raw image files (FUSE), one folder per disk.
    Mount(mount::Args),
    /// Serve snapshots as NBD exports (read-only, or copy-on-write into a local overlay).
    Serve(serve::Args),
    /// Check the vault's structure, or with --read-data every stored byte.
    Verify(verify::Args),
    /// Remove the snapshots a retention policy does not keep (restic's --keep-* rules).
    Forget(forget::Args),
    /// Delete the packs no snapshot references (safe while other hosts back up).
    Prune(prune::Args),
    /// Key management: show, rotate, revoke, enable, recover, export, import, escrow.
    Key(key::Args),
    /// Show what a backup of SOURCE would see: size, format, allocation, dirty bitmaps,
    /// partition table and encrypted volumes.
    Inspect(inspect::Args),
    /// Bring a vault of an older format to the current one, in place (needs its keys).
    Upgrade(upgrade::Args),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell) on stdout.
    Completions(completions::Args),
    /// Print the manual page (roff) on stdout.
    Manpage,
}

/// Where this host finds the private halves of customer-managed keys. Secrets (passphrases,
/// PINs) only ever come from files or the environment, never from arguments.
#[derive(clap::Args, Debug, Clone, Default)]
#[command(next_help_heading = usage::KEY_ACCESS)]
pub struct KeyArgs {
    /// PEM private key (PKCS#8 or PKCS#1) of a customer-managed RSA key, needed where DEKs
    /// are unwrapped (or set BLOCKVAULT_CMK_PRIVATE).
    #[arg(long, global = true, value_name = "PEM")]
    cmk_private: Option<PathBuf>,
    /// File holding the passphrase of an encrypted --cmk-private key (or set
    /// BLOCKVAULT_CMK_PASSPHRASE).
    #[arg(long, global = true, value_name = "FILE")]
    cmk_passphrase_file: Option<PathBuf>,
    /// File holding the user PIN of the PKCS#11 token (or set BLOCKVAULT_PKCS11_PIN).
    #[arg(long, global = true, value_name = "FILE")]
    pin_file: Option<PathBuf>,
    /// PKCS#11 module to load, an absolute path (default: BLOCKVAULT_PKCS11_MODULE, else the
    /// first installed of SoftHSM2's and OpenSC's; never a path stored in the vault).
    #[arg(long, global = true, value_name = "SO")]
    pkcs11_module: Option<PathBuf>,
}

impl KeyArgs {
    /// The library's view of these options.
    pub fn access(&self) -> KeyAccess {
        KeyAccess {
            cmk_private: self.cmk_private().map(|path| PrivateKeyFile {
                path,
                passphrase: Some(match &self.cmk_passphrase_file {
                    Some(f) => SecretSource::File(f.clone()),
                    None => SecretSource::Env("BLOCKVAULT_CMK_PASSPHRASE".into()),
                }),
            }),
            pkcs11: Pkcs11Options {
                module: self.pkcs11_module.clone(),
                pin: self.pin_file.clone().map(SecretSource::File),
            },
            recovery_private: None,
        }
    }

    /// `--cmk-private`, else `BLOCKVAULT_CMK_PRIVATE`.
    fn cmk_private(&self) -> Option<PathBuf> {
        self.cmk_private
            .clone()
            .or_else(|| usage::env("BLOCKVAULT_CMK_PRIVATE").map(PathBuf::from))
    }
}

/// What every command needs.
pub struct Context {
    vault_url: Option<String>,
    keystore: Option<PathBuf>,
    keys: KeyArgs,
    /// Output mode.
    pub out: Output,
}

impl Context {
    /// The vault URL, required by every command.
    pub fn vault_url(&self) -> Result<&str, Error> {
        self.vault_url
            .as_deref()
            .ok_or_else(|| Error::usage("no vault given: pass --vault URL or set BLOCKVAULT_VAULT"))
    }

    /// The keystore to use.
    pub fn keystore(&self) -> Result<Keystore, Error> {
        Ok(Keystore::new(match &self.keystore {
            Some(p) => p.clone(),
            None => Keystore::default_dir()?,
        }))
    }

    /// Where customer keys' private halves are.
    pub fn key_access(&self) -> KeyAccess {
        self.keys.access()
    }

    /// Open the vault.
    pub fn open_vault(&self) -> Result<blockvault::vault::Vault, Error> {
        let vault = blockvault::vault::Vault::open_with(
            self.vault_url()?,
            &self.keystore()?,
            &self.key_access(),
        )?;
        opened(&vault);
        Ok(vault)
    }

    /// Open the vault for a command that unwraps DEKs: a customer key this host cannot use
    /// fails here, in one sentence naming the key and the options that provide it.
    pub fn open_vault_unwrapping(&self) -> Result<blockvault::vault::Vault, Error> {
        let vault = self.open_vault()?;
        key_access::require(&vault, &self.keys)?;
        Ok(vault)
    }
}

/// The debug log's line for an opened vault: where it is and which keys seal it.
pub fn opened(vault: &blockvault::vault::Vault) {
    tracing::debug!(
        vault = vault.store().location(),
        keystore = %vault.keystore_file().display(),
        kek = %vault.keyring().primary_kind(),
        "vault opened"
    );
}

/// Parse arguments, run the command, and map the outcome to an exit code.
pub fn main() -> ExitCode {
    let cli = usage::parse();
    if let Err(e) = blockvault::interrupt::install() {
        tracing::warn!(error = %e, "Ctrl-C will stop blockvault without cleaning up");
    }
    let ctx = Context {
        vault_url: cli
            .vault
            .or_else(|| usage::env("BLOCKVAULT_VAULT").map(|v| v.to_string_lossy().into_owned())),
        keystore: cli
            .keystore
            .or_else(|| usage::env("BLOCKVAULT_KEYSTORE").map(PathBuf::from)),
        keys: cli.keys,
        out: Output::new(cli.json),
    };
    let result = match cli.command {
        Command::Init(a) => init::run(&ctx, a),
        Command::Backup(a) => backup::run(&ctx, a),
        Command::Snapshots(a) => snapshots::run(&ctx, a),
        Command::Restore(a) => restore::run(&ctx, a),
        Command::Mount(a) => mount::run(&ctx, a),
        Command::Serve(a) => serve::run(&ctx, a),
        Command::Verify(a) => verify::run(&ctx, a),
        Command::Forget(a) => forget::run(&ctx, a),
        Command::Prune(a) => prune::run(&ctx, a),
        Command::Key(a) => key::run(&ctx, a),
        Command::Inspect(a) => inspect::run(&ctx, a),
        Command::Upgrade(a) => upgrade::run(&ctx, a),
        Command::Completions(a) => completions::run(a),
        Command::Manpage => manpage::run(),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            ctx.out.error(&e);
            exit_code(e.downcast_ref::<Error>().map(|e| e.kind()))
        }
    }
}

/// The exit code for a failure of `kind`: a stop asked for by a signal is 128 + its number,
/// as a shell reports a process the signal killed.
fn exit_code(kind: Option<ErrorKind>) -> ExitCode {
    match kind {
        Some(ErrorKind::Usage) => ExitCode::from(2),
        Some(ErrorKind::Integrity) => ExitCode::from(3),
        Some(ErrorKind::Interrupted) => {
            let signal = blockvault::interrupt::requested().unwrap_or(libc::SIGINT);
            ExitCode::from((128 + signal) as u8)
        }
        _ => ExitCode::from(1),
    }
}

/// A byte count with an optional K, M, G or T suffix (powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let (num, shift) = match s.as_bytes().last() {
        Some(b'K' | b'k') => (&s[..s.len() - 1], 10),
        Some(b'M' | b'm') => (&s[..s.len() - 1], 20),
        Some(b'G' | b'g') => (&s[..s.len() - 1], 30),
        Some(b'T' | b't') => (&s[..s.len() - 1], 40),
        _ => (s, 0),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size like 4096, 64K or 1M"))?;
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("{s} is too large"))
}

/// Exit code 3 when problems were found.
pub const INTEGRITY: u8 = 3;
