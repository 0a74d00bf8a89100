//! Key rotation and recovery: every DEK is re-wrapped under new KEKs without touching the
//! data it seals.
//!
//! - Rotation (`key rotate`): first every DEK is unwrapped with the old key
//!   ([`Vault::unwrap_pending`]), so a key that cannot unwrap fails before anything changes;
//!   then the platform keystore gains a new KEK version, or the vault a new customer-key
//!   descriptor, and each DEK is re-wrapped with the new key (and the recovery key) and its
//!   record replaced in place ([`Vault::rewrap`]). The old key's private half is needed only
//!   in step one and the new one's in neither. A crash midway leaves some records under the
//!   old key and some under the new; running the same rotation again (with a customer key:
//!   the same new key, which is then not added twice) skips the records already done. With
//!   `--new-dek`, the new DEK generations are written before the new key is stored, so a run
//!   that finds the new customer key stored and records left to re-wrap resumes an
//!   interrupted rotation and starts no generations (it could not: the records already
//!   re-wrapped no longer open with the old private key).
//! - Recovery (`key recover`): the keystore or the HSM is gone. The recovery key's private
//!   half unwraps every DEK; a fresh keystore (or a new customer key) then re-wraps and
//!   re-authenticates every record, descriptor and the config.

use std::sync::{Arc, Mutex, PoisonError};

use super::config::{self, Config};
use super::store::{self, Store};
use super::{kekdesc, keyrecord, load_descriptors, Vault};
use crate::crypto::kek::{KekId, KekKind};
use crate::crypto::keyring::{KeyAccess, Keyring};
use crate::crypto::keystore::{Keystore, VaultKeys};
use crate::crypto::rsa::{CmkKey, PemKek};
use crate::crypto::Secret32;
use crate::error::{Error, ErrorKind, Result};
use keyrecord::KeyRecord;

/// Key records [`Vault::rewrap`] writes at once. Each write waits for its own fsyncs (about
/// 10 ms on a local disk), so a rotation of many records is bound by sync latency, not CPU.
pub const REWRAP_WRITERS: usize = 16;

/// A key record whose DEK a rotation has unwrapped, waiting to be re-wrapped.
pub struct Unwrapped {
    key: String,
    record: KeyRecord,
    dek: Secret32,
}

/// One key record as stored, for `key show` and rotation.
pub struct StoredRecord {
    /// Its object key.
    pub key: String,
    /// The decoded record.
    pub record: KeyRecord,
}

impl Vault {
    /// Every key record, authenticated but not unwrapped (so it works with a revoked KEK).
    pub fn key_records(&self) -> Result<Vec<StoredRecord>> {
        records(&*self.store, &self.config, Some(&self.record_mac))
    }

    /// Step one of a rotation, run before the new KEK is stored: unwrap the DEK of every
    /// record not already wrapped by exactly `target` (those were done by an earlier,
    /// interrupted run). A DEK this vault's keys cannot unwrap (revoked key, private key
    /// missing or wrong) fails here, naming the record, before anything is changed; and the
    /// old key is not needed afterwards, which matters for a PEM key whose new private half
    /// is not on the host that rotates.
    pub fn unwrap_pending(&self, target: &[KekId]) -> Result<Vec<Unwrapped>> {
        let mut out = Vec::new();
        for StoredRecord { key, record } in self.key_records()? {
            if record.is_wrapped_by(target) {
                continue;
            }
            let dek = record.unwrap(&self.keyring)?;
            out.push(Unwrapped { key, record, dek });
        }
        Ok(out)
    }

    /// Step two: wrap each DEK from [`Vault::unwrap_pending`] with this vault's current KEKs
    /// (reopen the vault after storing the new KEK) and replace its record. Returns how many
    /// records were replaced. Records are written by [`REWRAP_WRITERS`] threads at once; on an
    /// error the writers stop taking new records and the first error is returned (records
    /// written so far stay valid: see the module docs).
    pub fn rewrap(&self, pending: Vec<Unwrapped>) -> Result<usize> {
        let n = pending.len();
        let queue = Mutex::new(pending.into_iter());
        let failed: Mutex<Option<Error>> = Mutex::new(None);
        std::thread::scope(|s| {
            for _ in 0..REWRAP_WRITERS.min(n) {
                s.spawn(|| loop {
                    if failed
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .is_some()
                    {
                        return;
                    }
                    let next = queue.lock().unwrap_or_else(PoisonError::into_inner).next();
                    let Some(Unwrapped {
                        key,
                        mut record,
                        dek,
                    }) = next
                    else {
                        return;
                    };
                    let done = record
                        .rewrap(&dek, &self.keyring)
                        .and_then(|()| self.store.put(&key, &record.encode(&self.record_mac)));
                    if let Err(e) = done {
                        failed
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .get_or_insert(e);
                        return;
                    }
                });
            }
        });
        match failed.into_inner().unwrap_or_else(PoisonError::into_inner) {
            Some(e) => Err(e),
            None => Ok(n),
        }
    }

    /// Store the descriptor of a new customer key version (rotation to a new RSA key).
    pub fn add_kek_descriptor(&self, key: &CmkKey, auth: &Secret32) -> Result<()> {
        let mac = kekdesc::mac_key(auth);
        self.store
            .put_new(&kekdesc::object_key(key.id()), &kekdesc::encode(key, &mac))
    }

    /// Recover access to the vault at `url` with the recovery key's private half
    /// (`access.recovery_private`): its keystore file in `keystore` is lost (a fresh one is
    /// made) or its customer key is (`new_cmk` replaces it). Every DEK is unwrapped through
    /// its recovery wrap and re-wrapped; records, descriptors and the config are
    /// re-authenticated with the keystore's auth key. Returns the recovered vault and the
    /// number of records re-wrapped.
    ///
    /// Everything that can fail for want of the right key (the infrastructure key, every
    /// DEK) is unwrapped before anything is written: a wrong recovery key leaves the vault and
    /// the keystore folder as they were, so the real keystore file, if found later, still
    /// opens the vault.
    pub fn recover(
        url: &str,
        keystore: &Keystore,
        access: &KeyAccess,
        new_cmk: Option<CmkKey>,
    ) -> Result<(Vault, usize)> {
        let raw: Arc<dyn Store> = store::open(url)?.into();
        let config = Config::decode_unverified(&raw.get(config::KEY)?)?;
        let vault_id = config.vault_id;
        let infra = config.infrastructure != config::INFRA_NONE;
        let lost = !keystore.has(&vault_id);
        let mut keys = if lost {
            VaultKeys::generate(false)?
        } else {
            keystore.load(&vault_id)?
        };
        // The layer's key comes first: the descriptors and records lie inside the layer.
        let save_keys = lost || (infra && keys.infra.is_empty());
        if infra && keys.infra.is_empty() {
            keys.infra.push(crate::crypto::keystore::Versioned {
                version: 1,
                created: crate::util::now_unix(),
                key: super::infra_recovery::open(&*raw, &vault_id, access)?,
            });
        }
        let store = super::layered(raw.clone(), infra, &keys)?;
        // Nothing stored can be authenticated without the lost keys: trust the vault's
        // contents, as whoever holds the recovery key does; the recovery wraps' AAD still
        // binds each DEK to its vault, disk and generation.
        let mut descriptors = load_descriptors(&*store, None)?;
        let recovery = descriptors
            .iter()
            .position(|k| k.id().kind == KekKind::Recovery)
            .map(|i| descriptors.remove(i))
            .ok_or_else(|| Error::new(ErrorKind::Key, "this vault has no recovery key"))?;
        let old = Keyring::new(
            KekKind::Recovery,
            Box::new(PemKek::new(
                CmkKey::decode(&recovery.encode(), "recovery key")?,
                access.recovery_private.clone(),
            )?),
            None,
        );
        if let Some(cmk) = &new_cmk {
            if config.kek_kind == KekKind::Platform {
                return Err(Error::usage("this vault uses the platform key: customer-managed keys are chosen at init and cannot be added by recovery"));
            }
            if cmk.id().kind != config.kek_kind {
                return Err(Error::usage(format!(
                    "the new key is {} but the vault's keys are {}",
                    cmk.id().kind,
                    config.kek_kind
                )));
            }
            descriptors.push(CmkKey::decode(&cmk.encode(), "new key")?);
        }
        let mut pending = Vec::new();
        for StoredRecord { key, mut record } in records(&*store, &config, None)? {
            // Only the recovery wraps: the others' errors ("wrapped by a platform key") would
            // hide why the recovery key failed.
            record.wraps.retain(|w| w.0.kind == KekKind::Recovery);
            let dek = record
                .unwrap(&old)
                .map_err(|e| e.within("unwrapping with the recovery key"))?;
            pending.push(Unwrapped { key, record, dek });
        }
        // Every key is in hand: write the keystore file, then re-authenticate descriptors and
        // config under it, then re-wrap.
        if save_keys {
            let lock = keystore.lock(&vault_id)?;
            keystore.replace(&lock, &vault_id, &keys)?;
        }
        let desc_mac = kekdesc::mac_key(&keys.newest_auth().key);
        for key in descriptors.iter().chain(std::iter::once(&recovery)) {
            store.put(
                &kekdesc::object_key(key.id()),
                &kekdesc::encode(key, &desc_mac),
            )?;
        }
        raw.put(config::KEY, &config.encode(&keys.newest_auth().key))?;
        let keystore_file = keystore.path_for(&vault_id);
        let vault = Vault::assemble(store, config, keys, keystore_file, access)?;
        let changed = vault.rewrap(pending)?;
        Ok((vault, changed))
    }
}

/// The key records in `store`, checked with `mac` when given.
fn records(
    store: &dyn Store,
    config: &Config,
    mac: Option<&Secret32>,
) -> Result<Vec<StoredRecord>> {
    let mut out = Vec::new();
    for key in store.list("keys")? {
        let Some(disk) = key.split('/').nth(1).and_then(super::parse_id::<16>) else {
            continue;
        };
        let record = KeyRecord::decode(&store.get(&key)?, &key, &config.vault_id, &disk, mac)?;
        out.push(StoredRecord { key, record });
    }
    Ok(out)
}
