//! `blockvault key show|rotate|revoke|enable|destroy|recover|export|import|escrow`: parses and
//! prints; the rules are in the library's `keys` module.

use std::path::PathBuf;
use std::process::ExitCode;

use serde_json::json;

use blockvault::crypto::export;
use blockvault::crypto::kek::KekKind;
use blockvault::crypto::rsa::{PrivateKeyFile, SecretSource};
use blockvault::keys::{destroy, recover, rotate, show, state, transfer};
use blockvault::vault::kekdesc;
use blockvault::Error;

use super::init::{read_key_spec, EnrolArgs};
use super::Context;

/// Arguments of `key`.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    command: KeyCommand,
}

#[derive(clap::Subcommand, Debug)]
enum KeyCommand {
    /// Show the keys, their fingerprints and states, and which disks and snapshots depend on
    /// each.
    Show,
    /// Re-wrap every DEK under a new KEK version (platform) or a new customer key, without
    /// re-encrypting data; the old platform version is destroyed once nothing needs it.
    Rotate {
        /// The new customer-managed key (`rsa:PUBLIC.pem` or `pkcs11:URI`); required for a
        /// vault with a customer key, whose old private key must also be reachable.
        #[arg(long, value_name = "KEY")]
        new_cmk: Option<String>,
        /// Also start a new DEK generation with a new content identity on every disk: new data
        /// goes under new DEKs, and dedup with earlier snapshots stops there.
        #[arg(long)]
        new_dek: bool,
        /// Rotate the auth key (the key that authenticates the vault's state) instead: every
        /// other copy of the keystore stops working until it imports a new export.
        #[arg(long, conflicts_with_all = ["new_cmk", "new_dek"])]
        auth: bool,
        /// Rotate the infrastructure encryption layer's key: every object under the layer is
        /// re-encrypted (killed, run it again to finish); with --new-dek, after the KEK rotation.
        #[arg(long, conflicts_with = "auth")]
        infrastructure: bool,
        #[command(flatten)]
        enrol: EnrolArgs,
    },
    /// Revoke the platform KEK (every version, or one): backups, restores and verify
    /// --read-data fail until it is enabled again. An administrative lock: see `destroy`.
    Revoke {
        /// Only this version.
        #[arg(long)]
        version: Option<u32>,
    },
    /// Enable a revoked platform KEK again.
    Enable {
        /// Only this version.
        #[arg(long)]
        version: Option<u32>,
    },
    /// Destroy a platform KEK version for good (refused while any key record needs it).
    Destroy {
        /// The version.
        #[arg(long)]
        version: u32,
    },
    /// Regain access with the recovery key after losing the keystore or the customer key.
    Recover {
        /// The recovery key's PKCS#8 or PKCS#1 PEM private key.
        #[arg(long, value_name = "PEM")]
        recovery_private: PathBuf,
        /// File holding its passphrase if encrypted (or set BLOCKVAULT_RECOVERY_PASSPHRASE).
        #[arg(long, value_name = "FILE")]
        recovery_passphrase_file: Option<PathBuf>,
        /// The private key of a separate infrastructure recovery key (`init
        /// --infra-recovery-key`), for a vault with one whose keystore is lost.
        #[arg(long, value_name = "PEM")]
        infra_recovery_private: Option<PathBuf>,
        /// A new customer-managed key replacing a lost one.
        #[arg(long, value_name = "KEY")]
        new_cmk: Option<String>,
        /// The keystore is lost: make a new one from the recovery key (the keystore it
        /// replaces stops working wherever it still exists).
        #[arg(long)]
        take_over: bool,
        /// The auth-key fingerprint printed at init (or by `key show`), which proves the
        /// vault's recovery anchor was made by its keystore.
        #[arg(long, value_name = "FP")]
        anchor_fingerprint: Option<String>,
        /// Take over without a fingerprint to check the anchor against (a vault forged by
        /// whoever holds the storage would be accepted).
        #[arg(long, conflicts_with = "anchor_fingerprint")]
        unverified_anchor: bool,
        /// Recover although the vault records revoked platform KEK versions.
        #[arg(long)]
        lift_revocation: bool,
        #[command(flatten)]
        enrol: EnrolArgs,
    },
    /// Write the vault's keystore file, sealed under a passphrase, to FILE.
    Export {
        /// Where to write (mode 0600; refuses to overwrite).
        out: PathBuf,
        /// File holding the passphrase (or set BLOCKVAULT_EXPORT_PASSPHRASE).
        #[arg(long, value_name = "FILE")]
        passphrase_file: Option<PathBuf>,
    },
    /// Put an exported keystore file back into the keystore (checked against the vault).
    Import {
        /// The export file.
        file: PathBuf,
        /// File holding the passphrase (or set BLOCKVAULT_EXPORT_PASSPHRASE).
        #[arg(long, value_name = "FILE")]
        passphrase_file: Option<PathBuf>,
        /// Replace a key file already in the keystore.
        #[arg(long)]
        force: bool,
    },
    /// Keep a BitLocker recovery key or LUKS passphrase of DISK in the vault, sealed under
    /// the disk's key (`restore --with-escrow DIR` writes it back).
    Escrow {
        /// The disk it belongs to.
        disk: String,
        /// A name for it, e.g. `bitlocker-C` or `luks-root`.
        #[arg(long)]
        name: String,
        /// File holding the secret (never an argument).
        #[arg(long, value_name = "FILE")]
        secret_file: PathBuf,
    },
}

const EXPORT_PASSPHRASE_ENV: &str = "BLOCKVAULT_EXPORT_PASSPHRASE";

/// Run a `key` subcommand.
pub fn run(ctx: &Context, a: Args) -> anyhow::Result<ExitCode> {
    match a.command {
        KeyCommand::Show => show_keys(ctx),
        KeyCommand::Rotate {
            new_cmk,
            new_dek,
            auth,
            infrastructure,
            enrol,
        } => rotate_keys(
            ctx,
            new_cmk.as_deref(),
            new_dek,
            auth,
            infrastructure,
            &enrol,
        ),
        KeyCommand::Revoke { version } => set_state(ctx, version, true),
        KeyCommand::Enable { version } => set_state(ctx, version, false),
        KeyCommand::Destroy { version } => destroy_key(ctx, version),
        KeyCommand::Recover {
            recovery_private,
            recovery_passphrase_file,
            infra_recovery_private,
            new_cmk,
            take_over,
            anchor_fingerprint,
            unverified_anchor,
            lift_revocation,
            enrol,
        } => {
            let private = |path: PathBuf| PrivateKeyFile {
                path,
                passphrase: Some(match &recovery_passphrase_file {
                    Some(f) => SecretSource::File(f.clone()),
                    None => SecretSource::Env("BLOCKVAULT_RECOVERY_PASSPHRASE".into()),
                }),
            };
            let opts = recover::RecoverOptions {
                recovery_private: private(recovery_private),
                infra_recovery_private: infra_recovery_private.map(private),
                new_cmk: new_cmk
                    .as_deref()
                    .map(|spec| read_key_spec(ctx, spec, false, next_cmk_version(ctx)?, &enrol))
                    .transpose()?,
                take_over,
                anchor_fingerprint,
                unverified_anchor,
                lift_revocation,
            };
            recover_keys(ctx, &opts)
        }
        KeyCommand::Export {
            out,
            passphrase_file,
        } => export_keys(ctx, out, passphrase_file),
        KeyCommand::Import {
            file,
            passphrase_file,
            force,
        } => import_keys(ctx, file, passphrase_file, force),
        KeyCommand::Escrow {
            disk,
            name,
            secret_file,
        } => escrow(ctx, &disk, &name, &secret_file),
    }
}

/// The version a replacement customer key gets, from the descriptors' names
/// (`kek/<kind>-<version:08x>`; the recovery key's do not count). Read without the keystore
/// (recovery may run without one): only a number is taken from it, and a number too high is
/// harmless.
fn next_cmk_version(ctx: &Context) -> anyhow::Result<u32> {
    let raw = blockvault::vault::store::open(ctx.vault_url()?)?;
    let recovery = format!("{}/{}-", kekdesc::PREFIX, KekKind::Recovery);
    let newest = raw
        .list(kekdesc::PREFIX)?
        .iter()
        .filter(|k| !k.starts_with(&recovery))
        .filter_map(|k| u32::from_str_radix(k.rsplit('-').next()?, 16).ok())
        .max()
        .unwrap_or(0);
    Ok(newest + 1)
}

fn show_keys(ctx: &Context) -> anyhow::Result<ExitCode> {
    let vault = ctx.open_vault()?;
    let r = show::show(&vault)?;
    // Disk names are sealed under the DEKs: without the key they stay ids, and the note says
    // why (the same sentence `snapshots` or `restore` would fail with).
    let names_note = super::key_access::require(&vault, &ctx.keys)
        .err()
        .map(|e| e.to_string());
    let mut doc = serde_json::to_value(&r)?;
    doc["command"] = "key show".into();
    doc["disk_names_unreadable"] = names_note.clone().into();
    ctx.out.result(doc, || {
        let mut t = format!(
            "vault keys: {} (current {}){}\nauth key v{} fingerprint {} (keep it with the recovery key)\nkeystore file {}\n",
            r.kek_kind,
            r.current_kek,
            match r.infrastructure_key_version {
                Some(v) => format!(", infrastructure encryption AES-256-XTS (key v{v})"),
                None => String::new(),
            },
            r.auth_key_version,
            r.auth_fingerprint,
            r.keystore
        );
        if let Some(op) = &r.unfinished_key_operation {
            t += &format!("unfinished: {op} — run it again to finish\n");
        }
        for k in &r.keks {
            t += &match (&k.fingerprint, &k.fingerprint_sha256) {
                (Some(fp), _) => format!(
                    "  {:<16} {} fingerprint {fp}\n",
                    k.id,
                    k.state.as_deref().unwrap_or_default()
                ),
                (None, Some(fp)) => format!(
                    "  {:<16} RSA-{} {} sha256:{fp} ({})\n",
                    k.id,
                    k.bits.unwrap_or_default(),
                    k.oaep.as_deref().unwrap_or_default(),
                    k.source.as_deref().unwrap_or_default()
                ),
                (None, None) => format!("  {}\n", k.id),
            };
        }
        for d in &r.destroyed {
            t += &format!("  destroyed: {d}\n");
        }
        t += "DEK generations:\n";
        if let Some(note) = &names_note {
            t += &format!("  (disk names unreadable: {note})\n");
        }
        for g in &r.dek_generations {
            t += &format!(
                "  disk {} generation {}{}{}: wrapped by {}; {} snapshot(s)\n",
                g.disk.as_deref().unwrap_or(&g.disk_id),
                g.generation,
                if g.current { " (current)" } else { "" },
                if g.identity { " (identity)" } else { "" },
                g.wrapped_by.join(", "),
                g.snapshots
            );
        }
        t
    });
    Ok(ExitCode::SUCCESS)
}

fn rotate_keys(
    ctx: &Context,
    new_cmk: Option<&str>,
    new_dek: bool,
    auth: bool,
    infrastructure: bool,
    enrol: &EnrolArgs,
) -> anyhow::Result<ExitCode> {
    let started = std::time::Instant::now();
    let new_cmk = match new_cmk {
        Some(spec) => {
            let vault = ctx.open_vault()?;
            Some(read_key_spec(
                ctx,
                spec,
                false,
                rotate::next_cmk_version(&vault),
                enrol,
            )?)
        }
        None => None,
    };
    let r = rotate::rotate(
        ctx.vault_url()?,
        &ctx.keystore()?,
        &ctx.key_access(),
        &rotate::RotateOptions {
            new_cmk,
            new_dek,
            auth,
            infrastructure,
        },
    )?;
    let secs = started.elapsed().as_secs_f64();
    let doc = json!({
        "command": "key rotate",
        "kek": r.kek.map(|k| k.to_string()),
        "records_rewrapped": r.records_rewrapped,
        "new_dek_generations": r.new_dek_generations,
        "resumed": r.resumed,
        "retired_versions": r.retired,
        "auth_key_version": r.auth.as_ref().map(|a| a.0),
        "auth_fingerprint": r.auth.as_ref().map(|a| a.1.clone()),
        "infrastructure": r.infrastructure.as_ref().map(|i| json!({
            "key_version": i.version,
            "objects_reencrypted": i.reencrypted,
            "objects_already_under_it": i.already,
            "resumed": i.resumed,
            "retired_versions": i.retired,
        })),
        "seconds": super::output::seconds(secs),
    });
    ctx.out.result(doc, || infrastructure_line(r.infrastructure.as_ref(), secs) + &match (&r.kek, &r.auth) {
        (_, Some((v, fp))) => format!("auth key rotated to version {v}, fingerprint {fp} (keep it with the recovery key); other copies of the keystore need a new `key import`, {secs:.2} s\n"),
        (Some(k), None) => format!(
            "DEKs now wrapped by {k}: {} key record(s) re-wrapped, {} new DEK generation(s){}{}, {secs:.2} s\n",
            r.records_rewrapped,
            r.new_dek_generations,
            if r.new_dek_generations > 0 { " (dedup with earlier snapshots stops at them: the next backup of each disk stores it whole)" } else { "" },
            if r.retired.is_empty() { String::new() } else { format!("; platform KEK version(s) {:?} destroyed", r.retired) },
        ) + if r.resumed { "  (an interrupted rotation was finished)\n" } else { "" },
        (None, None) => String::new(),
    });
    Ok(ExitCode::SUCCESS)
}

/// The text line of an infrastructure key rotation (empty without one).
fn infrastructure_line(
    r: Option<&blockvault::keys::infra_rotation::InfraRotation>,
    secs: f64,
) -> String {
    let Some(r) = r else {
        return String::new();
    };
    format!(
        "infrastructure key rotated to version {}: {} object(s) re-encrypted{}{}, {secs:.2} s\n{}",
        r.version,
        r.reencrypted,
        if r.already > 0 {
            format!(", {} already under it", r.already)
        } else {
            String::new()
        },
        if r.retired.is_empty() {
            String::new()
        } else {
            format!("; version(s) {:?} destroyed", r.retired)
        },
        if r.resumed {
            "  (an interrupted rotation was finished)\n"
        } else {
            ""
        },
    )
}

fn set_state(ctx: &Context, version: Option<u32>, revoked: bool) -> anyhow::Result<ExitCode> {
    let changed = state::set_revoked(
        ctx.vault_url()?,
        &ctx.keystore()?,
        &ctx.key_access(),
        version,
        revoked,
    )?;
    let (verb, what) = if revoked {
        ("revoke", "revoked")
    } else {
        ("enable", "enabled")
    };
    ctx.out.result(
        json!({"command": format!("key {verb}"), "versions": changed, "state": what}),
        || format!("platform KEK version(s) {changed:?} {what}\n"),
    );
    Ok(ExitCode::SUCCESS)
}

fn destroy_key(ctx: &Context, version: u32) -> anyhow::Result<ExitCode> {
    destroy::destroy(
        ctx.vault_url()?,
        &ctx.keystore()?,
        &ctx.key_access(),
        version,
    )?;
    ctx.out.result(json!({"command": "key destroy", "version": version}), || {
        format!("platform KEK version {version} destroyed: gone from the keystore for good (destroy older `key export` files too: they still hold it)\n")
    });
    Ok(ExitCode::SUCCESS)
}

fn recover_keys(ctx: &Context, opts: &recover::RecoverOptions) -> anyhow::Result<ExitCode> {
    let r = recover::recover(ctx.vault_url()?, &ctx.keystore()?, &ctx.key_access(), opts)?;
    ctx.out.result(
        json!({
            "command": "key recover",
            "records_rewrapped": r.records_rewrapped,
            "keystore": r.keystore_file,
            "replaced_keystore_auth_fingerprint": r.replaced_keystore,
            "auth_fingerprint": r.auth_fingerprint,
            "kek": r.kek.to_string(),
        }),
        || {
            let mut t = format!(
                "recovered: {} key record(s) re-wrapped under {}; keystore file {}\n",
                r.records_rewrapped, r.kek, r.keystore_file
            );
            if let Some(old) = &r.replaced_keystore {
                t += &format!("took over from the keystore with auth fingerprint {old}: it no longer opens the vault\nnew auth fingerprint {} (keep it with the recovery key)\n", r.auth_fingerprint);
            }
            t
        },
    );
    Ok(ExitCode::SUCCESS)
}

fn export_keys(
    ctx: &Context,
    out: PathBuf,
    passphrase: Option<PathBuf>,
) -> anyhow::Result<ExitCode> {
    let vault = ctx.open_vault()?;
    let pass = export::read_passphrase(passphrase.as_deref(), EXPORT_PASSPHRASE_ENV)?;
    let sealed = transfer::export_keys(&vault, &pass)?;
    write_private(&out, &sealed)?;
    let id = hex::encode(vault.config().vault_id);
    ctx.out.result(
        json!({"command": "key export", "file": out.display().to_string(), "vault_id": id}),
        || format!("keystore of vault {id} exported to {}\n", out.display()),
    );
    Ok(ExitCode::SUCCESS)
}

/// Create `path` with mode 0600, refusing to overwrite.
fn write_private(path: &std::path::Path, bytes: &[u8]) -> Result<(), Error> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| Error::io(format!("creating {}", path.display()), e))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .map_err(|e| Error::io(format!("writing {}", path.display()), e))
}

fn import_keys(
    ctx: &Context,
    file: PathBuf,
    passphrase: Option<PathBuf>,
    force: bool,
) -> anyhow::Result<ExitCode> {
    let bytes =
        std::fs::read(&file).map_err(|e| Error::io(format!("reading {}", file.display()), e))?;
    let pass = export::read_passphrase(passphrase.as_deref(), EXPORT_PASSPHRASE_ENV)?;
    let r = transfer::import_keys(ctx.vault_url()?, &ctx.keystore()?, &bytes, &pass, force)?;
    let id = hex::encode(r.vault_id);
    let dropped: Vec<String> = r
        .dropped
        .iter()
        .map(|(c, v)| format!("{c} version {v}"))
        .collect();
    ctx.out.result(
        json!({"command": "key import", "vault_id": id, "keystore": r.path.display().to_string(), "dropped_destroyed": dropped}),
        || {
            let mut t = format!("keys of vault {id} imported into {}\n", r.path.display());
            if !dropped.is_empty() {
                t += &format!("left out (destroyed here): {}\n", dropped.join(", "));
            }
            t
        },
    );
    Ok(ExitCode::SUCCESS)
}

fn escrow(
    ctx: &Context,
    disk: &str,
    name: &str,
    secret_file: &std::path::Path,
) -> anyhow::Result<ExitCode> {
    let vault = ctx.open_vault()?;
    let disk = blockvault::engine::require_disk(&vault, disk)?;
    let secret = zeroize::Zeroizing::new(
        std::fs::read(secret_file)
            .map_err(|e| Error::io(format!("reading secret file {}", secret_file.display()), e))?,
    );
    vault.put_escrow(&disk, name, &secret)?;
    // The secret itself is never printed.
    ctx.out.result(
        json!({"command": "key escrow", "disk": disk.name, "name": name}),
        || format!("escrowed {name} for disk {}\n", disk.name),
    );
    Ok(ExitCode::SUCCESS)
}
