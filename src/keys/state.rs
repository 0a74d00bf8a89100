//! `key revoke` / `key enable`: an administrative lock on platform KEK versions.
//!
//! A revoked version refuses every wrap and unwrap (backups, restores, `verify --read-data`
//! fail saying so) until it is enabled again. The revocation is recorded twice: in the keystore
//! (this host) and in the vault head (every host, and any keystore restored from an export made
//! before the revocation). It holds against export (refused while a version is revoked),
//! import (the head still says revoked) and recovery (refused unless the recovery key's holder
//! explicitly lifts it). It is a lock, not cryptography: whoever holds the keystore can enable
//! the version again. `key destroy` is the cryptographic end of a version.

use crate::crypto::kek::{KekKind, KekState, PlatformKek};
use crate::crypto::keyring::KeyAccess;
use crate::crypto::keystore::Keystore;
use crate::error::{Error, Result};
use crate::vault::head::KeyOp;
use crate::vault::Vault;

/// Revoke (`revoked`) or enable platform KEK `version` (`None`: every version the keystore
/// holds) of the vault at `url`. Returns the versions changed.
pub fn set_revoked(
    url: &str,
    keystore: &Keystore,
    access: &KeyAccess,
    version: Option<u32>,
    revoked: bool,
) -> Result<Vec<u32>> {
    let vault = Vault::open_with(url, keystore, access)?;
    if vault.keyring().primary_kind() != KekKind::Platform {
        return Err(Error::usage(format!(
            "this vault's DEKs are wrapped by a customer-managed key ({}): revoke or enable it where it lives — disable it in the HSM, or withhold its private key",
            vault.keyring().primary_kind()
        )));
    }
    check_made(&vault, version)?;
    let guard = super::begin(&vault, KeyOp::Revoke)?;
    let state = if revoked {
        KekState::Revoked
    } else {
        KekState::Enabled
    };
    let changed = keystore.update(&vault.config().vault_id, |keys| {
        let mut versions =
            std::mem::replace(&mut keys.kek, PlatformKek::new(Vec::new())).into_versions();
        let mut changed = Vec::new();
        for v in versions
            .iter_mut()
            .filter(|v| version.is_none_or(|n| n == v.version))
        {
            v.state = state;
            changed.push(v.version);
        }
        keys.kek = PlatformKek::new(versions);
        if changed.is_empty() {
            return Err(match version {
                Some(n) => keys.missing(crate::crypto::keystore::KeyClass::Kek, n),
                None => Error::usage("the keystore holds no platform KEK version"),
            });
        }
        Ok(changed)
    })?;
    guard.finish(|h| {
        for v in &changed {
            if revoked {
                h.revoked.insert(*v);
            } else {
                h.revoked.remove(v);
            }
        }
        Ok(())
    })?;
    Ok(changed)
}

/// Refuse a version above the head's current one that the keystore does not hold either (a
/// killed rotation's new version would be there): it was never made, so the number is mistyped
/// rather than the key missing.
fn check_made(vault: &Vault, version: Option<u32>) -> Result<()> {
    let current = vault.cached_head().primary.version;
    let Some(n) = version.filter(|n| *n > current) else {
        return Ok(());
    };
    let keys = vault.keystore().load(&vault.config().vault_id)?;
    if keys.kek.versions().iter().any(|v| v.version == n) {
        return Ok(());
    }
    Err(Error::usage(format!(
        "no platform KEK version {n}: the vault's current one is version {current}"
    )))
}
