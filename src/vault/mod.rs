//! The vault: encrypted objects in a [`store::Store`], anchored by one authenticated head.
//!
//! ```text
//! config                                  format version, vault id, settings (MAC'd)
//! head                                    the authenticated, monotonic state (MAC'd): digests of
//!                                         every key record, descriptor and escrow record, every
//!                                         committed snapshot, DEK generations and seal counts
//! keys/<disk id>/<gen>-<rev>              a DEK generation of a disk, wrapped by the KEK(s)
//! kek/<kind>-<version>                    customer / recovery RSA key descriptors
//! escrow/<disk id>/<name id>-<rev>        escrowed volume keys
//! packs/<2 hex>/<pack id>                 sealed extent frames + sealed index (≈32 MiB each)
//! snapshots/<disk id>/<snap id>           sealed manifest: geometry, parent, slot table, stats
//! recovery-anchor, infra-recovery         the auth and infrastructure keys wrapped to recovery keys
//! locks/                                  local advisory locks (local folders only)
//! ```
//! Trust: whoever holds the storage may read, delete, replay or plant any object. Everything
//! that changes is bound to the head ([`head`]), the head is MAC'd with the keystore's auth key
//! and only ever grows (each host refuses a head older than the newest it has seen), so a
//! storage holder can deny service but cannot plant, replace, roll back or hide anything.
//!
//! Commit protocol: packs and the manifest are written (atomically, durably) first; a
//! compare-and-swap of the head that lists the snapshot is the commit point. A crash leaves at
//! worst objects no head lists (invisible, reported by `verify`), never a snapshot whose data
//! is missing.
//!
//! Locking: a backup holds `locks/<disk id>` for its disk on this host; across hosts the head's
//! compare-and-swap orders commits. Readers take no lock.

pub mod anchor;
pub mod checkpoint;
pub mod codec;
pub mod config;
pub mod disks;
pub mod escrow;
pub mod frame;
pub mod head;
pub mod heads;
pub mod info;
pub mod infra_recovery;
pub mod kekdesc;
pub mod keyrecord;
pub mod layer;
pub mod location;
pub mod manifest;
pub mod manifest_cache;
pub mod pack;
mod revisions;
pub mod snapshots;
pub mod store;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use crate::crypto::kek::{KekKind, KekProvider, PlatformKek};
use crate::crypto::keyring::{KeyAccess, Keyring, Versions};
use crate::crypto::keystore::{Keystore, VaultKeys};
use crate::crypto::rsa::{CmkKey, PemKek, Pkcs11Kek};
use crate::error::{Error, ErrorKind, Result};

use config::Config;
use head::Head;
use store::Store;

pub use disks::Disk;
pub(crate) use layer::layered;

/// An open vault with its keys.
pub struct Vault {
    /// The store without the infrastructure layer: config, head, anchors.
    pub(crate) raw: Arc<dyn Store>,
    /// The store every other object goes through (with the infrastructure layer, if any).
    pub(crate) store: Arc<dyn Store>,
    pub(crate) config: Config,
    /// The keystore's keys of this vault (auth keys for the head; the platform KEK versions
    /// live in the keyring).
    pub(crate) keys: VaultKeys,
    pub(crate) keystore: Keystore,
    pub(crate) keystore_file: PathBuf,
    /// Canonical URL.
    pub(crate) location: String,
    pub(crate) keyring: Keyring,
    /// The head as last read or written by this process.
    pub(crate) head: Mutex<Head>,
    /// The infrastructure key version `store` writes under (0: no layer): a head that names
    /// another one is not changed by this process (see `heads`).
    pub(crate) layer_version: u32,
}

impl Vault {
    /// Open the vault at `url`; its keys come from `keystore`.
    pub fn open(url: &str, keystore: &Keystore) -> Result<Vault> {
        Vault::open_with(url, keystore, &KeyAccess::default())
    }

    /// Open the vault at `url`, reaching customer keys' private halves through `access`.
    ///
    /// Checks, in order: a config exists (else: this host knew a vault there that vanished, or
    /// there is none); it is format version 2 (version 1: run `upgrade`); the keystore holds the
    /// vault's keys and they authenticate the config; this host did not know *another* vault at
    /// this URL; the head authenticates and is no older than the newest this host has seen.
    pub fn open_with(url: &str, keystore: &Keystore, access: &KeyAccess) -> Result<Vault> {
        let location = location::canonical(url)?;
        let raw: Arc<dyn Store> = store::open(url)?.into();
        let config_bytes = read_config(&*raw, keystore, &location, url)?;
        let config = Config::decode_unverified(&config_bytes)
            .map_err(|e| e.within(format!("vault {url}")))?;
        if config.format_version < config::FORMAT_VERSION {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!("vault {url} is in format version {}: run `blockvault upgrade` (with this vault's keys) to bring it to version {}; no other command opens it", config.format_version, config::FORMAT_VERSION),
            ));
        }
        let keys = keystore.load(&config.vault_id)?;
        Config::verify(&config_bytes, keys.auth(config.auth_version)?)
            .map_err(|e| e.within(format!("vault {url}")))?;
        pin(keystore, &location, &config.vault_id)?;
        let read = heads::read_head(&*raw, &config.vault_id, &keys, keystore, &location)?;
        Vault::assemble(raw, config, keys, keystore, location, read.head, access)
    }

    /// Put an opened vault together: the layered store and the keyring the head names.
    pub(crate) fn assemble(
        raw: Arc<dyn Store>,
        config: Config,
        mut keys: VaultKeys,
        keystore: &Keystore,
        location: String,
        head: Head,
        access: &KeyAccess,
    ) -> Result<Vault> {
        let store = layered(raw.clone(), &head, &keys)?;
        let descriptors = load_descriptors(&*store, &head)?;
        let platform = std::mem::replace(&mut keys.kek, PlatformKek::new(Vec::new()));
        let keyring = keyring_for(&head, platform, descriptors, access)?;
        Ok(Vault {
            raw,
            store,
            keystore_file: keystore.path_for(&config.vault_id),
            keystore: keystore.clone(),
            config,
            keys,
            location,
            keyring,
            layer_version: head.infra_version,
            head: Mutex::new(head),
        })
    }

    /// The object store (with the infrastructure layer, if the vault has one).
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The store without the infrastructure layer (config, head, anchors).
    pub fn raw_store(&self) -> &Arc<dyn Store> {
        &self.raw
    }

    /// Settings.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The canonical URL of the vault.
    pub fn location(&self) -> &str {
        &self.location
    }

    /// The customer and recovery key descriptors the head lists.
    pub fn kek_descriptors(&self) -> Result<Vec<CmkKey>> {
        load_descriptors(&*self.store, &self.cached_head())
    }

    /// The KEKs.
    pub fn keyring(&self) -> &Keyring {
        &self.keyring
    }

    /// The keystore this vault's keys came from.
    pub fn keystore(&self) -> &Keystore {
        &self.keystore
    }

    /// The keystore's keys of this vault (auth and infrastructure keys; platform KEK versions
    /// are in the keyring).
    pub fn keys(&self) -> &VaultKeys {
        &self.keys
    }

    /// Check, before anything is written, that the vault's KEK can unwrap what it wraps: a
    /// revoked key, or a customer key whose private half is gone, fails here with a message
    /// saying so.
    pub fn check_keys(&self) -> Result<()> {
        self.keyring.check_unwrap().map_err(|e| {
            e.within(format!(
                "the {} key of vault {} cannot unwrap (revoked or unreachable)",
                self.keyring.primary_kind(),
                self.location
            ))
        })
    }

    /// The key file this vault's keys came from.
    pub fn keystore_file(&self) -> &std::path::Path {
        &self.keystore_file
    }

    /// Read an object the head binds by `digest`, failing (naming it) if it is missing or
    /// does not match: replaced, rolled back, or damaged.
    pub fn get_bound(&self, key: &str, digest: &head::Digest) -> Result<Vec<u8>> {
        get_bound(&*self.store, key, digest)
    }
}

/// Read an object of `store` that the head binds by `digest`.
pub(crate) fn get_bound(store: &dyn Store, key: &str, digest: &head::Digest) -> Result<Vec<u8>> {
    let bytes = store.get(key).map_err(|e| match e.kind() {
        ErrorKind::NotFound => Error::integrity(format!(
            "{key} is missing: the vault head lists it (deleted from the vault)"
        )),
        _ => e,
    })?;
    if &head::digest(&bytes) != digest {
        return Err(Error::integrity(format!(
            "{key} does not match the digest the vault head lists for it: it was replaced, rolled back or damaged"
        )));
    }
    Ok(bytes)
}

/// The config bytes at `url`; when there are none, say whether this host knew a vault there.
fn read_config(raw: &dyn Store, keystore: &Keystore, location: &str, url: &str) -> Result<Vec<u8>> {
    match raw.get(config::KEY) {
        Ok(b) => Ok(b),
        Err(e) if e.kind() == ErrorKind::NotFound => Err(match keystore.vault_at(location)? {
            Some(id) => Error::new(
                ErrorKind::NotFound,
                format!("vault {} that lived at {url} is gone (its config is missing: deleted, wiped, or the storage is not mounted); blockvault will not treat the location as new. If the vault is lost for good, start over with `blockvault init --forget-vault {}`", hex::encode(id), hex::encode(id)),
            ),
            None => Error::new(
                ErrorKind::NotFound,
                format!("no vault at {url}: check the location, or create a vault there with `blockvault init` (any key) or `blockvault backup --init` (a platform-managed key, at the first backup)"),
            ),
        }),
        Err(e) => Err(e),
    }
}

/// Remember that vault `vault_id` lives at `location`, refusing if this host knew another
/// vault there (a storage holder serving vault B at vault A's address).
pub(crate) fn pin(keystore: &Keystore, location: &str, vault_id: &[u8; 16]) -> Result<()> {
    if let Some(other) = keystore.vault_at(location)? {
        if &other != vault_id {
            return Err(Error::new(
                ErrorKind::Integrity,
                format!("{location} holds vault {}, but this host knew vault {} there: another vault was put in its place; blockvault refuses it (if this is intended, forget the old one with `blockvault init --forget-vault {}` or use another keystore)", hex::encode(vault_id), hex::encode(other), hex::encode(other)),
            ));
        }
        return Ok(());
    }
    keystore.update_state(vault_id, |s| {
        if !s.urls.iter().any(|u| u == location) {
            s.urls.push(location.to_string());
        }
        Ok(())
    })
}

/// Every KEK descriptor the head lists, each checked against its digest.
pub(crate) fn load_descriptors(store: &dyn Store, head: &Head) -> Result<Vec<CmkKey>> {
    let mut keys = Vec::new();
    for d in &head.descriptors {
        let key = kekdesc::object_key(d.id);
        keys.push(kekdesc::decode(&get_bound(store, &key, &d.digest)?, &key)?);
    }
    Ok(keys)
}

/// The keyring of a vault: its primary KEK as the head names it, and the recovery key.
pub(crate) fn keyring_for(
    head: &Head,
    platform: PlatformKek,
    descriptors: Vec<CmkKey>,
    access: &KeyAccess,
) -> Result<Keyring> {
    let kind = head.primary.kind;
    let mut primary: Vec<(u32, Box<dyn KekProvider>)> = Vec::new();
    let mut recovery: Option<Box<dyn KekProvider>> = None;
    for key in descriptors {
        let id = key.id();
        match id.kind {
            KekKind::Recovery => {
                recovery = Some(Box::new(PemKek::new(key, access.recovery_private.clone())?))
            }
            KekKind::CustomerRsa if kind == KekKind::CustomerRsa => primary.push((
                id.version,
                Box::new(PemKek::new(key, access.cmk_private.clone())?),
            )),
            KekKind::CustomerPkcs11 if kind == KekKind::CustomerPkcs11 => primary.push((
                id.version,
                Box::new(Pkcs11Kek::open(key, access.pkcs11.clone())?),
            )),
            other => {
                return Err(Error::integrity(format!(
                    "the vault head lists a {other} key descriptor but its keys are {kind}"
                )))
            }
        }
    }
    let primary: Box<dyn KekProvider> = match kind {
        KekKind::Platform => {
            Box::new(platform.with_vault_state(head.primary.version, &head.revoked))
        }
        _ => Box::new(Versions::new(primary).with_current(head.primary.version)),
    };
    Ok(Keyring::new(kind, primary, recovery))
}

/// An id from an object name: exactly `2 * N` lowercase hex digits (names are written in
/// lowercase; anything else in a listing is not ours and is ignored).
pub(crate) fn parse_id<const N: usize>(name: &str) -> Option<[u8; N]> {
    if name.len() != 2 * N
        || !name
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return None;
    }
    let mut id = [0u8; N];
    hex::decode_to_slice(name, &mut id).ok()?;
    Some(id)
}
