//! `blockvault key show|rotate|revoke|enable|recover|export|import|escrow`

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use serde_json::{json, Value};

use blockvault::crypto::export;
use blockvault::crypto::kek::{KekId, KekKind, KekState, PlatformKek, PlatformKeyVersion};
use blockvault::crypto::keystore;
use blockvault::crypto::rsa::{PrivateKeyFile, SecretSource};
use blockvault::crypto::Secret32;
use blockvault::vault::frame::Binding;
use blockvault::vault::manifest::Manifest;
use blockvault::vault::{kekdesc, Vault};
use blockvault::{Error, ErrorKind};

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
    /// Show the KEKs, their fingerprints, and which disks and snapshots depend on each.
    Show,
    /// Re-wrap every DEK under a new KEK version (platform) or a new customer key, without
    /// re-encrypting data.
    Rotate {
        /// The new customer-managed key (`rsa:PUBLIC.pem` or `pkcs11:URI`); required for a
        /// vault with a customer key, whose old private key must also be reachable.
        #[arg(long, value_name = "KEY")]
        new_cmk: Option<String>,
        /// Also start a new DEK generation on every disk: new data goes under new DEKs.
        #[arg(long)]
        new_dek: bool,
        #[command(flatten)]
        enrol: EnrolArgs,
    },
    /// Revoke the platform KEK (every version, or one): backups, restores and verify
    /// --read-data fail until it is enabled again.
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
    /// Regain access with the recovery key after losing the keystore or the customer key.
    Recover {
        /// The recovery key's PKCS#8 PEM private key.
        #[arg(long, value_name = "PEM")]
        recovery_private: PathBuf,
        /// File holding its passphrase if encrypted (or set BLOCKVAULT_RECOVERY_PASSPHRASE).
        #[arg(long, value_name = "FILE")]
        recovery_passphrase_file: Option<PathBuf>,
        /// A new customer-managed key replacing a lost one.
        #[arg(long, value_name = "KEY")]
        new_cmk: Option<String>,
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
    /// Put an exported keystore file back into the keystore.
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
        KeyCommand::Show => show(ctx),
        KeyCommand::Rotate {
            new_cmk,
            new_dek,
            enrol,
        } => rotate(ctx, new_cmk.as_deref(), new_dek, &enrol),
        KeyCommand::Revoke { version } => set_state(ctx, version, KekState::Revoked),
        KeyCommand::Enable { version } => set_state(ctx, version, KekState::Enabled),
        KeyCommand::Recover {
            recovery_private,
            recovery_passphrase_file,
            new_cmk,
            enrol,
        } => recover(
            ctx,
            recovery_private,
            recovery_passphrase_file,
            new_cmk.as_deref(),
            &enrol,
        ),
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

/// Open the vault's config and keystore file without unwrapping anything: `show`, `revoke`
/// and `enable` must work with a revoked key.
fn platform_keys(ctx: &Context) -> anyhow::Result<(Vault, keystore::VaultKeys)> {
    let vault = ctx.open_vault()?;
    let keys = ctx.keystore()?.load(&vault.config().vault_id)?;
    Ok((vault, keys))
}

/// A short fingerprint of a platform KEK version that reveals nothing of the key.
fn platform_fingerprint(key: &Secret32) -> String {
    hex::encode(
        &blake3::derive_key(
            "blockvault 2026-11-28 platform kek fingerprint v1",
            key.expose(),
        )[..8],
    )
}

fn show(ctx: &Context) -> anyhow::Result<ExitCode> {
    let (vault, keys) = platform_keys(ctx)?;
    let mut keks: Vec<Value> = Vec::new();
    if vault.keyring().primary_kind() == KekKind::Platform {
        for v in keys.kek.versions() {
            keks.push(json!({
                "id": format!("platform-v{}", v.version),
                "kind": "platform",
                "version": v.version,
                "state": if v.state == KekState::Enabled { "enabled" } else { "revoked" },
                "created": super::output::time(v.created),
                "fingerprint": platform_fingerprint(&v.key),
            }));
        }
    }
    for key in vault.kek_descriptors()? {
        keks.push(json!({
            "id": key.id().to_string(),
            "kind": key.id().kind.to_string(),
            "version": key.id().version,
            "fingerprint_sha256": hex::encode(key.fingerprint()),
            "bits": key.bits(),
            "oaep": key.oaep().to_string(),
            "source": key.source(),
        }));
    }
    // Which disks' DEK generations each KEK wraps, and the snapshots sealed under them.
    let mut snapshots: BTreeMap<(String, u32), usize> = BTreeMap::new();
    for key in vault.store().list("snapshots")? {
        let disk = key.split('/').nth(1).unwrap_or_default().to_string();
        let mut disk_id = [0u8; 16];
        if hex::decode_to_slice(&disk, &mut disk_id).is_err() {
            continue;
        }
        let binding = Binding {
            vault_id: vault.config().vault_id,
            disk_id,
        };
        // The generation is in the manifest's clear header: no key needed to count.
        if let Ok((_, generation)) = vault
            .store()
            .get(&key)
            .and_then(|raw| Manifest::peek(&raw, &binding, &key))
        {
            *snapshots.entry((disk, generation)).or_default() += 1;
        }
    }
    // Disk names are sealed under the DEKs: without the key they stay ids, and the note says
    // why (the same sentence `snapshots` or `restore` would fail with).
    let (names, names_note): (BTreeMap<String, String>, Option<String>) =
        match super::key_access::require(&vault, &ctx.keys).and_then(|_| vault.disks()) {
            Ok(ds) => (ds.into_iter().map(|d| (d.id_hex(), d.name)).collect(), None),
            Err(e) => (BTreeMap::new(), Some(e.to_string())),
        };
    let mut records = Vec::new();
    for r in vault.key_records()? {
        let disk = hex::encode(r.record.disk_id);
        records.push(json!({
            "disk_id": disk,
            "disk": names.get(&disk),
            "generation": r.record.generation,
            "wrapped_by": r.record.wraps.iter().map(|w| w.0.to_string()).collect::<Vec<_>>(),
            "snapshots": snapshots.get(&(disk.clone(), r.record.generation)).copied().unwrap_or(0),
        }));
    }
    let doc = json!({
        "command": "key show",
        "kek_kind": vault.keyring().primary_kind().to_string(),
        "infrastructure_encryption": vault.config().infrastructure != 0,
        "keystore": vault.keystore_file().display().to_string(),
        "keks": keks,
        "dek_generations": records,
        "disk_names_unreadable": names_note,
    });
    ctx.out.result(doc.clone(), || {
        let mut t = format!(
            "vault keys: {}{}\n",
            doc["kek_kind"].as_str().unwrap_or_default(),
            if vault.config().infrastructure != 0 {
                ", infrastructure encryption AES-256-XTS"
            } else {
                ""
            }
        );
        for k in &keks {
            t += &format!(
                "  {:<16} {}\n",
                k["id"].as_str().unwrap_or_default(),
                describe(k)
            );
        }
        t += "DEK generations:\n";
        if let Some(note) = &names_note {
            t += &format!("  (disk names unreadable: {note})\n");
        }
        for r in &records {
            t += &format!(
                "  disk {} generation {}: wrapped by {}; {} snapshot(s)\n",
                r["disk"]
                    .as_str()
                    .unwrap_or_else(|| r["disk_id"].as_str().unwrap_or_default()),
                r["generation"],
                r["wrapped_by"]
                    .as_array()
                    .map(|a| a
                        .iter()
                        .filter_map(|v| v.as_str())
                        .collect::<Vec<_>>()
                        .join(", "))
                    .unwrap_or_default(),
                r["snapshots"],
            );
        }
        t
    });
    Ok(ExitCode::SUCCESS)
}

fn describe(k: &Value) -> String {
    match k["kind"].as_str() {
        Some("platform") => format!(
            "{} fingerprint {}",
            k["state"].as_str().unwrap_or_default(),
            k["fingerprint"].as_str().unwrap_or_default()
        ),
        _ => format!(
            "RSA-{} OAEP-{} sha256:{} ({})",
            k["bits"],
            k["oaep"].as_str().unwrap_or_default(),
            k["fingerprint_sha256"].as_str().unwrap_or_default(),
            k["source"].as_str().unwrap_or_default()
        ),
    }
}

/// Rotation: start DEK generations (`--new-dek`), unwrap every DEK with the current key, and
/// only then store the new key and re-wrap (see `vault::rotation`).
fn rotate(
    ctx: &Context,
    new_cmk: Option<&str>,
    new_dek: bool,
    enrol: &EnrolArgs,
) -> anyhow::Result<ExitCode> {
    let started = std::time::Instant::now();
    let (vault, mut keys) = platform_keys(ctx)?;
    let kind = vault.keyring().primary_kind();
    // The new key, read but not stored yet: `None` when a customer key names the newest
    // descriptor already (a rotation run again after an interruption).
    let (new_id, new_key) = match (kind, new_cmk) {
        (KekKind::Platform, Some(_)) => {
            return Err(Error::usage("this vault uses the platform key: a customer-managed key can only be chosen at init").into())
        }
        (KekKind::Platform, None) => {
            let version = keys.kek.versions().iter().map(|v| v.version).max().unwrap_or(0) + 1;
            (KekId { kind, version }, None)
        }
        (_, None) => {
            return Err(Error::usage("this vault uses a customer-managed key: give the new one with --new-cmk (the current private key must be reachable too)").into())
        }
        (kind, Some(spec)) => {
            let newest = vault.kek_descriptors()?.into_iter().filter(|k| k.id().kind == kind).max_by_key(|k| k.id().version);
            let version = newest.as_ref().map_or(0, |k| k.id().version) + 1;
            let key = read_key_spec(ctx, spec, false, version, enrol)?;
            if key.id().kind != kind {
                return Err(Error::usage(format!("the new key is {} but this vault's keys are {kind}", key.id().kind)).into());
            }
            match newest {
                Some(n) if n.fingerprint() == key.fingerprint() => (n.id(), None),
                _ => (key.id(), Some(key)),
            }
        }
    };
    let mut target = vault.keyring().wrapping_ids()?;
    target[0] = new_id;
    // The new customer key already stored, and records still to re-wrap: this resumes an
    // interrupted rotation (see `vault::rotation`), which started its new DEK generations
    // before storing the key. Starting more would need every disk read, and the records it
    // re-wrapped no longer open with the old private key.
    let resumed = new_key.is_none()
        && kind != KekKind::Platform
        && vault
            .key_records()?
            .iter()
            .any(|r| !r.record.is_wrapped_by(&target));
    let mut new_generations = 0;
    if new_dek && !resumed {
        // Every disk, or none: one that cannot be read stops the rotation here.
        for id in vault.disk_ids()? {
            vault.new_generation(&vault.load_disk(id)?)?;
            new_generations += 1;
        }
    }
    let pending = vault.unwrap_pending(&target)?;
    match new_key {
        Some(key) => vault.add_kek_descriptor(&key, &keys.auth)?,
        None if kind == KekKind::Platform => {
            let mut versions = keys.kek.into_versions();
            versions.push(PlatformKeyVersion {
                version: new_id.version,
                state: KekState::Enabled,
                created: blockvault::util::now_unix(),
                key: Secret32::random()?,
            });
            keys.kek = PlatformKek::new(versions);
            ctx.keystore()?.save(&vault.config().vault_id, &keys)?;
        }
        None => {}
    }
    // Reopen: the keyring now wraps with the new key.
    let rewrapped = ctx.open_vault()?.rewrap(pending)?;
    let secs = started.elapsed().as_secs_f64();
    ctx.out.result(
        json!({"command": "key rotate", "kek": new_id.to_string(), "records_rewrapped": rewrapped, "new_dek_generations": new_generations, "resumed": resumed, "seconds": super::output::seconds(secs)}),
        || format!("DEKs now wrapped by {new_id}: {rewrapped} key record(s) re-wrapped, {new_generations} new DEK generation(s){}, {secs:.2} s\n", if resumed { " (an interrupted rotation resumed)" } else { "" }),
    );
    Ok(ExitCode::SUCCESS)
}

fn set_state(ctx: &Context, version: Option<u32>, state: KekState) -> anyhow::Result<ExitCode> {
    let (vault, mut keys) = platform_keys(ctx)?;
    if vault.keyring().primary_kind() != KekKind::Platform {
        return Err(Error::usage(format!(
            "this vault's DEKs are wrapped by a customer-managed key ({}): revoke or enable it where it lives — disable it in the HSM, or withhold its private key",
            vault.keyring().primary_kind()
        ))
        .into());
    }
    let mut versions = keys.kek.into_versions();
    let mut changed = Vec::new();
    for v in versions
        .iter_mut()
        .filter(|v| version.is_none_or(|n| n == v.version))
    {
        v.state = state;
        changed.push(v.version);
    }
    if changed.is_empty() {
        return Err(Error::usage(format!(
            "the keystore has no platform KEK version {}",
            version.unwrap_or(0)
        ))
        .into());
    }
    keys.kek = PlatformKek::new(versions);
    ctx.keystore()?.save(&vault.config().vault_id, &keys)?;
    let what = if state == KekState::Enabled {
        "enabled"
    } else {
        "revoked"
    };
    ctx.out.result(json!({"command": format!("key {}", if state == KekState::Enabled { "enable" } else { "revoke" }), "versions": changed, "state": what}), || {
        format!("platform KEK version(s) {changed:?} {what}\n")
    });
    Ok(ExitCode::SUCCESS)
}

fn recover(
    ctx: &Context,
    private: PathBuf,
    passphrase: Option<PathBuf>,
    new_cmk: Option<&str>,
    enrol: &EnrolArgs,
) -> anyhow::Result<ExitCode> {
    let url = ctx.vault_url()?;
    let keystore = ctx.keystore()?;
    let mut access = ctx.key_access();
    access.recovery_private = Some(PrivateKeyFile {
        path: private,
        passphrase: Some(match passphrase {
            Some(f) => SecretSource::File(f),
            None => SecretSource::Env("BLOCKVAULT_RECOVERY_PASSPHRASE".into()),
        }),
    });
    let new_key = match new_cmk {
        Some(spec) => {
            // The version after the newest customer key's, from the descriptors' names
            // (`kek/<kind>-<version:08x>`; the recovery key's do not count).
            let raw = blockvault::vault::store::open(url)?;
            let recovery = format!("{}/{}-", kekdesc::PREFIX, KekKind::Recovery);
            let newest = raw
                .list(kekdesc::PREFIX)?
                .iter()
                .filter(|k| !k.starts_with(&recovery))
                .filter_map(|k| u32::from_str_radix(k.rsplit('-').next()?, 16).ok())
                .max()
                .unwrap_or(0);
            Some(read_key_spec(ctx, spec, false, newest + 1, enrol)?)
        }
        None => None,
    };
    let (vault, n) = Vault::recover(url, &keystore, &access, new_key)?;
    let ks = vault.keystore_file().display().to_string();
    ctx.out.result(
        json!({"command": "key recover", "records_rewrapped": n, "keystore": ks}),
        || format!("recovered: {n} key record(s) re-wrapped; keystore file {ks}\n"),
    );
    Ok(ExitCode::SUCCESS)
}

fn export_keys(
    ctx: &Context,
    out: PathBuf,
    passphrase: Option<PathBuf>,
) -> anyhow::Result<ExitCode> {
    let vault = ctx.open_vault()?;
    let vault_id = vault.config().vault_id;
    let file = zeroize::Zeroizing::new(
        std::fs::read(vault.keystore_file())
            .map_err(|e| Error::io(format!("reading {}", vault.keystore_file().display()), e))?,
    );
    let pass = export::read_passphrase(passphrase.as_deref(), EXPORT_PASSPHRASE_ENV)?;
    let sealed = export::export(&file, &vault_id, &pass)?;
    write_private(&out, &sealed)?;
    ctx.out.result(
        json!({"command": "key export", "file": out.display().to_string()}),
        || {
            format!(
                "keystore of vault {} exported to {}\n",
                hex::encode(vault_id),
                out.display()
            )
        },
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
    let (vault_id, plain) = export::import(&bytes, &pass)?;
    let keys = keystore::decode(&plain, &vault_id)?;
    let ks = ctx.keystore()?;
    if ks.path_for(&vault_id).exists() && !force {
        return Err(Error::new(
            ErrorKind::AlreadyExists,
            format!(
                "the keystore already holds keys for vault {} ({}); --force replaces them",
                hex::encode(vault_id),
                ks.path_for(&vault_id).display()
            ),
        )
        .into());
    }
    let path = ks.save(&vault_id, &keys)?;
    ctx.out.result(json!({"command": "key import", "vault_id": hex::encode(vault_id), "keystore": path.display().to_string()}), || {
        format!("keys of vault {} imported into {}\n", hex::encode(vault_id), path.display())
    });
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
