//! Key rotation and recovery: every DEK is re-wrapped under new KEKs without touching the
//! data it seals.
//!
//! - Rotation (`key rotate`): the platform keystore gains a new KEK version, or the vault a
//!   new customer-key descriptor; then every key record is unwrapped with the old key and
//!   re-wrapped with the new one (and the recovery key), and replaced in place. A crash
//!   midway leaves some records under the old key and some under the new; both stay usable,
//!   and running the rotation again finishes it.
//! - Recovery (`key recover`): the keystore or the HSM is gone. The recovery key's private
//!   half unwraps every DEK; a fresh keystore (or a new customer key) then re-wraps and
//!   re-authenticates every record, descriptor and the config.

use std::sync::Arc;

use super::config::{self, Config};
use super::store::{self, Store};
use super::{kekdesc, keyrecord, load_descriptors, Vault};
use crate::crypto::kek::KekKind;
use crate::crypto::keyring::{KeyAccess, Keyring};
use crate::crypto::keystore::Keystore;
use crate::crypto::rsa::{CmkKey, PemKek};
use crate::error::{Error, ErrorKind, Result};
use keyrecord::KeyRecord;

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

    /// Re-wrap every DEK with the vault's current KEKs. Returns how many records changed.
    pub fn rewrap_all(&self) -> Result<usize> {
        let wanted = self.keyring.wrapping_ids()?;
        let mut changed = 0;
        for StoredRecord { key, mut record } in self.key_records()? {
            if record.wraps.iter().map(|w| w.0).eq(wanted.iter().copied()) {
                continue; // already under the current keys (a rotation run again)
            }
            let dek = record.unwrap(&self.keyring)?;
            record.rewrap(&dek, &self.keyring)?;
            self.store.put(&key, &record.encode(&self.record_mac))?;
            changed += 1;
        }
        Ok(changed)
    }

    /// Store the descriptor of a new customer key version (rotation to a new RSA key).
    pub fn add_kek_descriptor(&self, key: &CmkKey, auth: &crate::crypto::Secret32) -> Result<()> {
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
    pub fn recover(
        url: &str,
        keystore: &Keystore,
        access: &KeyAccess,
        new_cmk: Option<CmkKey>,
    ) -> Result<(Vault, usize)> {
        let raw: Arc<dyn Store> = store::open(url)?.into();
        let config_bytes = raw.get(config::KEY)?;
        let mut config = Config::decode_unverified(&config_bytes)?;
        let vault_id = config.vault_id;
        let infra = config.infrastructure != config::INFRA_NONE;
        // The recovery key's descriptor lies outside the infrastructure layer's reach only
        // through its own wrap of the layer's key; find the key first.
        let lost = !keystore.path_for(&vault_id).exists();
        let mut keys = if lost {
            keystore.create(&vault_id, false)?.0
        } else {
            keystore.load(&vault_id)?
        };
        let recovery_of = |store: &dyn Store| -> Result<(CmkKey, Keyring)> {
            let key = load_descriptors(store, None)?
                .into_iter()
                .find(|k| k.id().kind == KekKind::Recovery)
                .ok_or_else(|| Error::new(ErrorKind::Key, "this vault has no recovery key"))?;
            let kek = PemKek::new(
                CmkKey::decode(&key.encode(), "recovery key")?,
                access.recovery_private.clone(),
            )?;
            Ok((key, Keyring::new(KekKind::Recovery, Box::new(kek), None)))
        };
        if infra && keys.infra.is_none() {
            keys.infra = Some(super::infra_recovery::open(&*raw, &vault_id, access)?);
            keystore.save(&vault_id, &keys)?;
        }
        let store = super::layered(raw.clone(), infra, &keys)?;
        // Nothing stored can be authenticated without the lost keys: trust the vault's
        // contents, as whoever holds the recovery key does; the recovery wraps' AAD still
        // binds each DEK to its vault, disk and generation.
        let (recovery, old) = recovery_of(&*store)?;
        let mut descriptors: Vec<CmkKey> = load_descriptors(&*store, None)?
            .into_iter()
            .filter(|k| k.id().kind != KekKind::Recovery)
            .collect();
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
        // Re-authenticate descriptors and config under the keystore now in use.
        let desc_mac = kekdesc::mac_key(&keys.auth);
        for key in descriptors.iter().chain(std::iter::once(&recovery)) {
            store.put(
                &kekdesc::object_key(key.id()),
                &kekdesc::encode(key, &desc_mac),
            )?;
        }
        raw.put(config::KEY, &config.encode(&keys.auth))?;
        config = Config::decode_unverified(&raw.get(config::KEY)?)?;
        let keystore_file = keystore.path_for(&vault_id);
        let vault = Vault::assemble(store, config, keys, keystore_file, access)?;
        let mut changed = 0;
        for StoredRecord { key, mut record } in records(&*vault.store, &vault.config, None)? {
            let dek = record
                .unwrap(&old)
                .map_err(|e| e.within("unwrapping with the recovery key"))?;
            record.rewrap(&dek, &vault.keyring)?;
            vault.store.put(&key, &record.encode(&vault.record_mac))?;
            changed += 1;
        }
        Ok((vault, changed))
    }
}

/// The key records in `store`, checked with `mac` when given.
fn records(
    store: &dyn Store,
    config: &Config,
    mac: Option<&crate::crypto::Secret32>,
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
