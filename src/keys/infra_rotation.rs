//! `key rotate --infrastructure`: a new key for the AES-256-XTS layer (docs/CRYPTO.md,
//! "Infrastructure encryption"), every object under the layer re-encrypted with it under the
//! same name. Resumable at every step:
//! ```text
//!  new infrastructure key version stored in the keystore (one a killed run stored is reused)
//!  ─▶ head swap: infra_version = new, infra_previous = old
//!     (from here every process writes under the new key and reads in two-key mode)
//!  ─▶ every object under the layer: under the old key ─▶ re-encrypted (compare-and-swap on
//!     the bytes read); under the new one already ─▶ skipped (a killed run got that far)
//!  ─▶ infra-recovery for the new version staged as infra-recovery-next
//!  ─▶ head swap: infra_previous = 0, infra_recovery = its digest, key operation cleared
//!  ─▶ infra-recovery-next copied over infra-recovery; older versions destroyed (tombstones)
//! ```
//! A run that finds the head's swap done but older versions still in the keystore only does
//! the last step. A process that opened the vault before the first swap cannot commit
//! anything afterwards (`Vault::update_head` refuses: what it wrote is under the old key and
//! may be missed by the listing), so nothing the head lists stays under the destroyed key.

use crate::crypto::keyring::KeyAccess;
use crate::crypto::keystore::{KeyClass, Keystore, Versioned};
use crate::error::{Error, ErrorKind, Result};
use crate::vault::head::{self, Head, KeyOp};
use crate::vault::store::xts::{InfraKey, Reencrypted};
use crate::vault::store::Store;
use crate::vault::{infra_recovery, layer, Vault};

/// What an infrastructure key rotation did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct InfraRotation {
    /// The version every object is under now.
    pub version: u32,
    /// Objects re-encrypted by this run.
    pub reencrypted: usize,
    /// Objects found under the new key already (a killed run re-encrypted them).
    pub already: usize,
    /// Whether an interrupted rotation was finished.
    pub resumed: bool,
    /// Infrastructure key versions destroyed.
    pub retired: Vec<u32>,
}

/// How many objects an error lists by name before it only counts.
const NAMED: usize = 5;

/// Rotate the infrastructure key of the vault at `url` (or finish a rotation that was killed).
pub fn rotate(url: &str, keystore: &Keystore, access: &KeyAccess) -> Result<InfraRotation> {
    let opened = Vault::open_with(url, keystore, access)?;
    if opened.cached_head().infra_version == 0 {
        return Err(Error::usage(format!(
            "vault {url} has no infrastructure encryption layer (it is chosen at init, with --infrastructure-encryption): there is no infrastructure key to rotate"
        )));
    }
    let guard = super::begin(&opened, KeyOp::Rotate)?;
    let vault_id = opened.config().vault_id;
    let head = opened.head()?;
    let mut report = InfraRotation {
        version: head.infra_version,
        ..InfraRotation::default()
    };
    let older_kept = keystore
        .load(&vault_id)?
        .infra
        .iter()
        .any(|k| k.version < head.infra_version);
    if head.infra_previous == 0 && older_kept {
        // Killed after its last head swap: only the clean-up is left.
        report.resumed = true;
        let (head, ()) = guard.finish(|_| Ok(()))?;
        settle_recovery_record(&**opened.raw_store(), &head)?;
        report.retired = retire_older(keystore, &vault_id, head.infra_version)?;
        return Ok(report);
    }
    let (from, to) = match head.infra_previous {
        0 => {
            let (to, resumed) = new_version(keystore, &vault_id, head.infra_version)?;
            report.resumed = resumed;
            let from = head.infra_version;
            opened.update_head(|h| {
                if h.infra_version != from || h.infra_previous != 0 {
                    return Err(Error::new(
                        ErrorKind::Conflict,
                        "the vault's infrastructure key changed while its rotation started: run `key rotate --infrastructure` again",
                    ));
                }
                h.infra_previous = from;
                h.infra_version = to;
                Ok(())
            })?;
            (from, to)
        }
        previous => {
            report.resumed = true;
            (previous, head.infra_version)
        }
    };
    report.version = to;
    // From here on the head names the new key: change it only through a vault that writes
    // under it.
    let vault = Vault::open_with(url, keystore, access)?;
    let guard = guard.reopened(&vault);
    let head = vault.head()?;
    let store =
        layer::xts_store(vault.raw_store().clone(), &head, vault.keys())?.ok_or_else(|| {
            Error::integrity("the vault head lost its infrastructure layer during its key rotation")
        })?;
    let mut unreadable = Vec::new();
    for key in vault.raw_store().list("")? {
        if !layer::is_layered(&key) {
            continue;
        }
        crate::interrupt::check()?;
        match store.reencrypt(&key) {
            Ok(Reencrypted::Moved) => report.reencrypted += 1,
            Ok(Reencrypted::Already) => report.already += 1,
            Ok(Reencrypted::Gone) => {}
            Err(e) if e.kind() == ErrorKind::Integrity => unreadable.push(key),
            Err(e) => return Err(e),
        }
    }
    if !unreadable.is_empty() {
        let named = unreadable.iter().take(NAMED).cloned().collect::<Vec<_>>();
        let more = unreadable.len().saturating_sub(NAMED);
        return Err(Error::integrity(format!(
            "{} object(s) decrypt under neither infrastructure key version {from} nor {to} (damaged, or not written by blockvault): {}{}; the rotation stays unfinished (everything else reads with either key): remove or restore them, then run `key rotate --infrastructure` again",
            unreadable.len(),
            named.join(", "),
            if more > 0 { format!(" and {more} more") } else { String::new() },
        )));
    }
    let staged = stage_recovery_record(&vault, &head, to)?;
    let (head, ()) = guard.finish(|h| {
        if h.infra_version != to || h.infra_previous != from {
            return Err(Error::new(
                ErrorKind::Conflict,
                format!("the vault's infrastructure key rotation from version {from} to {to} was changed by another process"),
            ));
        }
        h.infra_previous = 0;
        if let Some(digest) = staged {
            h.infra_recovery = Some(digest);
        }
        Ok(())
    })?;
    settle_recovery_record(&**vault.raw_store(), &head)?;
    report.retired = retire_older(keystore, &vault_id, to)?;
    Ok(report)
}

/// The version to rotate to: one a killed rotation stored before its first head swap (newer
/// than the head's), or a fresh one, numbered past every version this keystore ever held.
fn new_version(keystore: &Keystore, vault_id: &[u8; 16], current: u32) -> Result<(u32, bool)> {
    keystore.update(vault_id, |keys| {
        let newest = keys.infra.iter().map(|k| k.version).max().unwrap_or(0);
        if newest > current {
            return Ok((newest, true));
        }
        let version = keys.next_version(KeyClass::Infra);
        keys.infra.push(Versioned {
            version,
            created: crate::util::now_unix(),
            key: InfraKey::generate()?,
        });
        Ok((version, false))
    })
}

/// Write the recovery record of infrastructure key `to`, wrapped to the recovery key of the
/// record the head lists now, as `infra-recovery-next`; its digest (`None`: the vault has no
/// record).
fn stage_recovery_record(vault: &Vault, head: &Head, to: u32) -> Result<Option<head::Digest>> {
    let Some(digest) = head.infra_recovery else {
        return Ok(None);
    };
    let (_, holder) =
        infra_recovery::holder(&infra_recovery::read_bound(&**vault.raw_store(), &digest)?)?;
    let bytes = infra_recovery::encode(
        &vault.config().vault_id,
        to,
        &holder,
        vault.keys().infra(to)?,
    )?;
    vault.raw_store().put(infra_recovery::NEXT_KEY, &bytes)?;
    Ok(Some(head::digest(&bytes)))
}

/// Once no rotation is running: put the record the head lists under `infra-recovery` (a
/// rotation staged it as `infra-recovery-next`) and remove the staged copy, listed or not.
fn settle_recovery_record(raw: &dyn Store, head: &Head) -> Result<()> {
    let staged = match raw.get(infra_recovery::NEXT_KEY) {
        Ok(b) => b,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if head.infra_recovery == Some(head::digest(&staged)) {
        raw.put(infra_recovery::KEY, &staged)?;
    }
    raw.delete(infra_recovery::NEXT_KEY)
}

/// Destroy every infrastructure key version older than `current` (tombstones keep them from
/// coming back through an older export). Returns the versions destroyed.
fn retire_older(keystore: &Keystore, vault_id: &[u8; 16], current: u32) -> Result<Vec<u32>> {
    keystore.update(vault_id, |keys| {
        let retired: Vec<u32> = keys
            .infra
            .iter()
            .map(|k| k.version)
            .filter(|v| *v < current)
            .collect();
        keys.infra.retain(|k| k.version >= current);
        for v in &retired {
            keys.destroyed.insert((KeyClass::Infra, *v));
        }
        Ok(retired)
    })
}
