//! `key destroy --version N`: the cryptographic end of a platform KEK version.
//!
//! The version's key bytes are removed from the keystore for good and a tombstone keeps an
//! older export or keystore copy from bringing it back through `key import`. Refused while the
//! vault head names it current or any key record the head lists is wrapped by it (destroying it
//! then would lose those DEKs: rotate first). Copies of the keystore made earlier still hold it:
//! destroy those too.

use crate::crypto::kek::{KekId, KekKind, PlatformKek};
use crate::crypto::keyring::KeyAccess;
use crate::crypto::keystore::{KeyClass, Keystore};
use crate::error::{Error, ErrorKind, Result};
use crate::vault::head::KeyOp;
use crate::vault::Vault;

/// Destroy platform KEK `version` of the vault at `url`.
pub fn destroy(url: &str, keystore: &Keystore, access: &KeyAccess, version: u32) -> Result<()> {
    let vault = Vault::open_with(url, keystore, access)?;
    if vault.keyring().primary_kind() != KekKind::Platform {
        return Err(Error::usage(
            "this vault's DEKs are wrapped by a customer-managed key: destroy it where it lives (in the HSM, or the private key file)",
        ));
    }
    let guard = super::begin(&vault, KeyOp::Destroy)?;
    let head = vault.head()?;
    if head.primary.version == version {
        return Err(Error::usage(format!(
            "platform KEK version {version} is the vault's current key: rotate first (`blockvault key rotate`), then destroy it"
        )));
    }
    let id = KekId {
        kind: KekKind::Platform,
        version,
    };
    for (disk_id, entry) in &head.disks {
        for (&g, ge) in &entry.generations {
            let (key, rec) = vault.key_record(disk_id, g, ge)?;
            if rec.wraps.iter().any(|(w, _)| *w == id) {
                return Err(Error::usage(format!(
                    "platform KEK version {version} still wraps {key} (disk {} generation {g}): rotate first, so that nothing needs it",
                    hex::encode(disk_id)
                )));
            }
        }
    }
    // A destroy killed after the keystore update left the version in the head's revoked list
    // (which stops `key export`): running it again finishes that part.
    let unfinished = head.revoked.contains(&version);
    keystore.update(&vault.config().vault_id, |keys| {
        let versions =
            std::mem::replace(&mut keys.kek, PlatformKek::new(Vec::new())).into_versions();
        let before = versions.len();
        let kept: Vec<_> = versions
            .into_iter()
            .filter(|v| v.version != version)
            .collect();
        let found = kept.len() != before;
        keys.kek = PlatformKek::new(kept);
        if !found {
            let tombstoned = keys.destroyed.contains(&(KeyClass::Kek, version));
            if tombstoned && unfinished {
                return Ok(());
            }
            return Err(if tombstoned {
                Error::new(
                    ErrorKind::NotFound,
                    format!("platform KEK version {version} was destroyed already"),
                )
            } else {
                keys.missing(KeyClass::Kek, version)
            });
        }
        keys.destroyed.insert((KeyClass::Kek, version));
        Ok(())
    })?;
    guard.finish(|h| {
        h.revoked.remove(&version);
        Ok(())
    })?;
    Ok(())
}
