//! `key export` / `key import`: a vault's key file sealed under a passphrase, to keep off the
//! host or to give another host the vault's keys.
//!
//! Export is refused while a platform KEK version is revoked: the file would carry the key
//! past its revocation. Import checks the keys against the vault they belong to before it
//! replaces anything: the auth key must authenticate its config and head, and every key
//! version the head needs (the current KEK, every KEK a listed record is wrapped by, the
//! infrastructure key) must be in the file; versions this keystore knows to be destroyed are
//! dropped from it; revocations recorded in the head keep holding.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;

use crate::crypto::export;
use crate::crypto::kek::{KekKind, KekState, PlatformKek};
use crate::crypto::keystore::{KeyClass, Keystore, VaultKeys};
use crate::error::{Error, ErrorKind, Result};
use crate::vault::config::{self, Config};
use crate::vault::head::{self, Head};
use crate::vault::keyrecord::{self, KeyRecord};
use crate::vault::store::{self, Store};
use crate::vault::{heads, Vault};

/// The key file of `vault`, sealed under `passphrase`.
pub fn export_keys(vault: &Vault, passphrase: &[u8]) -> Result<Vec<u8>> {
    let vault_id = vault.config().vault_id;
    let keys = vault.keystore().load(&vault_id)?;
    let head = vault.head()?;
    let revoked: BTreeSet<u32> = keys
        .kek
        .versions()
        .iter()
        .filter(|v| v.state == KekState::Revoked)
        .map(|v| v.version)
        .chain(head.revoked.iter().copied())
        .collect();
    if !revoked.is_empty() {
        return Err(Error::usage(format!(
            "platform KEK version(s) {revoked:?} are revoked: an export would carry them past the revocation; enable them (`key enable`) or destroy them (`key destroy`) first"
        )));
    }
    export::export(&keys.encode(&vault_id), &vault_id, passphrase)
}

/// What [`import_keys`] did.
pub struct Imported {
    /// The vault the keys belong to.
    pub vault_id: [u8; 16],
    /// The key file written.
    pub path: PathBuf,
    /// Versions left out because this keystore knows them to be destroyed.
    pub dropped: Vec<(KeyClass, u32)>,
}

/// Put the keys of export file `bytes` into `keystore`, after checking them against the vault
/// at `url`. An existing key file is replaced only with `force`.
pub fn import_keys(
    url: &str,
    keystore: &Keystore,
    bytes: &[u8],
    passphrase: &[u8],
    force: bool,
) -> Result<Imported> {
    let (vault_id, plain) = export::import(bytes, passphrase)?;
    let mut keys = VaultKeys::decode(&plain, &vault_id)?;
    let _lock = keystore.lock(&vault_id)?;
    if keystore.has(&vault_id) && !force {
        return Err(Error::new(
            ErrorKind::AlreadyExists,
            format!(
                "the keystore already holds keys for vault {} ({}); --force replaces them",
                hex::encode(vault_id),
                keystore.path_for(&vault_id).display()
            ),
        ));
    }
    // Versions destroyed here stay destroyed, whatever the (older) export holds.
    let mut dropped = Vec::new();
    if let Ok(existing) = keystore.load(&vault_id) {
        for gone in existing.destroyed {
            if drop_version(&mut keys, gone) {
                dropped.push(gone);
            }
            keys.destroyed.insert(gone);
        }
    }
    check_complete(url, keystore, &vault_id, &keys)?;
    let path = keystore.replace(&_lock, &vault_id, &keys)?;
    Ok(Imported {
        vault_id,
        path,
        dropped,
    })
}

/// Remove version `(class, version)` from `keys`; whether it was there.
fn drop_version(keys: &mut VaultKeys, (class, version): (KeyClass, u32)) -> bool {
    match class {
        KeyClass::Auth => {
            let n = keys.auth.len();
            keys.auth.retain(|a| a.version != version);
            n != keys.auth.len()
        }
        KeyClass::Infra => {
            let n = keys.infra.len();
            keys.infra.retain(|a| a.version != version);
            n != keys.infra.len()
        }
        KeyClass::Kek => {
            let versions =
                std::mem::replace(&mut keys.kek, PlatformKek::new(Vec::new())).into_versions();
            let n = versions.len();
            let kept: Vec<_> = versions
                .into_iter()
                .filter(|v| v.version != version)
                .collect();
            let dropped = n != kept.len();
            keys.kek = PlatformKek::new(kept);
            dropped
        }
    }
}

/// The keys must open the vault at `url` and hold every version its head needs.
fn check_complete(
    url: &str,
    keystore: &Keystore,
    vault_id: &[u8; 16],
    keys: &VaultKeys,
) -> Result<()> {
    let raw: Arc<dyn Store> = store::open(url)?.into();
    let config_bytes = raw.get(config::KEY)?;
    let config = Config::decode_unverified(&config_bytes)?;
    if &config.vault_id != vault_id {
        return Err(Error::usage(format!(
            "the export holds the keys of vault {}, but {url} is vault {}",
            hex::encode(vault_id),
            hex::encode(config.vault_id)
        )));
    }
    let incomplete = |e: Error| e.within("the export cannot be imported for this vault");
    Config::verify(
        &config_bytes,
        keys.auth(config.auth_version).map_err(incomplete)?,
    )?;
    if config.format_version < config::FORMAT_VERSION {
        // A format 1 vault has no head: the config's MAC is what its keys can be checked by
        // here, and `upgrade` (which needs them imported) checks every object.
        return Ok(());
    }
    let head_bytes = raw.get(head::KEY)?;
    let head: Head = heads::authenticate(&head_bytes, vault_id, keys).map_err(incomplete)?;
    // Judged against the newest head this host saw, so an old head cannot make an old export
    // look complete.
    let read = heads::ReadHead {
        digest: head::digest(&head_bytes),
        head,
        tag: store::Tag(String::new()),
    };
    heads::check_fresh(&keystore.state(vault_id)?, &read)?;
    let head = read.head;
    if head.infra_version != 0 {
        keys.infra(head.infra_version).map_err(incomplete)?;
    }
    if head.primary.kind != KekKind::Platform {
        return Ok(());
    }
    let have: BTreeSet<u32> = keys.kek.versions().iter().map(|v| v.version).collect();
    if !have.contains(&head.primary.version) {
        return Err(incomplete(
            keys.missing(KeyClass::Kek, head.primary.version),
        ));
    }
    let layered = crate::vault::layered(raw, &head, keys)?;
    for (disk_id, entry) in &head.disks {
        for (&g, ge) in &entry.generations {
            let key = keyrecord::object_key(disk_id, g, ge.rev);
            let rec = KeyRecord::decode(
                &crate::vault::get_bound(&*layered, &key, &ge.digest)?,
                &key,
                vault_id,
                disk_id,
            )?;
            for (id, _) in &rec.wraps {
                if id.kind == KekKind::Platform && !have.contains(&id.version) {
                    return Err(incomplete(
                        keys.missing(KeyClass::Kek, id.version)
                            .within(format!("{key} is wrapped by it")),
                    ));
                }
            }
        }
    }
    Ok(())
}
