//! Key lifecycle: everything that creates, changes or removes a vault's keys — `init`,
//! rotation, revocation, destruction, recovery, export and import, and the format upgrade. The
//! command line only parses and prints; every rule lives here.
//!
//! # Model
//! The keystore (this host, [`crate::crypto::keystore`]) holds the secrets: auth keys (MAC the
//! vault's config and head), platform KEK versions, infrastructure keys. The vault holds what
//! they protect, and its head ([`crate::vault::head`]) records which versions are current, which
//! are revoked, and the digest of every key record and descriptor. A change of keys is always:
//! new secret stored in the keystore → new objects written under new names → one head
//! compare-and-swap that switches to them → old objects deleted and old secrets destroyed.
//! Killed anywhere, the vault still opens with what the head names, and the same command run
//! again finishes the job.
//!
//! # Locks
//! | lock | held by | excludes |
//! |---|---|---|
//! | keystore `.<vault id>.lock` (flock) | every read-modify-write of a key or state file | a revoke writing back a key file a rotation just extended |
//! | vault `locks/keys` (the store's lock: a flock on a local folder) | every operation here but init/export/show | two key operations at once (rotate vs revoke vs destroy vs recover vs upgrade) |
//! | head compare-and-swap | every head change | lost updates; a disk or DEK generation registered during a rotation under the old KEK (the swap that finishes the rotation re-lists the records) |
//!
//! The head also records a running key operation (its kind, start, the keystore and process
//! that runs it): a killed one stays recorded until the next key operation, which takes over
//! (`key show` reports it). Backups take none of the key-operation locks: a rotation's final swap re-lists the head's
//! records and rewraps any a backup added meanwhile, and a backup's swap refuses a record
//! wrapped by KEKs the head no longer names.

pub mod destroy;
pub mod infra_rotation;
pub mod init;
pub mod recover;
pub mod rotate;
pub mod show;
pub mod state;
pub mod transfer;
pub mod upgrade;

use std::time::Duration;

use crate::error::Result;
use crate::vault::anchor;
use crate::vault::head::{Head, KeyOp, KeyOperation};
use crate::vault::Vault;

/// A key operation holding the vault: the store's `keys` lock and the head's record of it.
/// Ends (record cleared) with [`KeyOperationGuard::finish`]; dropped unfinished, it clears the
/// record on a best-effort basis (a killed process leaves it, and the next key operation, once
/// it holds the lock, takes over).
pub struct KeyOperationGuard<'a> {
    vault: &'a Vault,
    _lock: Box<dyn Send>,
    finished: bool,
}

/// Start key operation `op` on `vault`.
pub fn begin(vault: &Vault, op: KeyOp) -> Result<KeyOperationGuard<'_>> {
    let lock = vault
        .store()
        .lock("keys", Duration::from_secs(30))
        .map_err(|e| e.within(format!("{op}: another key operation runs on this host")))?;
    let me = anchor::fingerprint_bytes(&vault.keys().newest_auth().key);
    let now = crate::util::now_unix();
    vault.update_head(|h| {
        // Holding the lock means whoever recorded an operation is no longer running it.
        if let Some(k) = h.key_operation {
            tracing::warn!(op = %k.op, started = k.started, "taking over a key operation that did not finish");
        }
        h.key_operation = Some(KeyOperation {
            op,
            started: now,
            holder: me,
            pid: std::process::id(),
        });
        Ok(())
    })?;
    Ok(KeyOperationGuard {
        vault,
        _lock: lock,
        finished: false,
    })
}

impl KeyOperationGuard<'_> {
    /// The last head swap of the operation: apply `change` and clear the record together.
    pub fn finish<T>(
        mut self,
        mut change: impl FnMut(&mut Head) -> Result<T>,
    ) -> Result<(Head, T)> {
        let out = self.vault.update_head(|h| {
            let t = change(h)?;
            h.key_operation = None;
            Ok(t)
        })?;
        self.finished = true;
        Ok(out)
    }

    /// Mark the operation finished by a head swap the caller made itself (which cleared the
    /// record).
    pub fn finished(mut self) {
        self.finished = true;
    }

    /// The same operation (lock and record) continued through `vault`, the same vault opened
    /// again: an infrastructure key rotation must change the head through a vault that writes
    /// under the new key (see `Vault::update_head`).
    pub fn reopened(mut self, vault: &Vault) -> KeyOperationGuard<'_> {
        self.finished = true;
        KeyOperationGuard {
            vault,
            _lock: std::mem::replace(&mut self._lock, Box::new(())),
            finished: false,
        }
    }
}

impl Drop for KeyOperationGuard<'_> {
    fn drop(&mut self) {
        if !self.finished {
            if let Err(e) = self.vault.update_head(|h| {
                h.key_operation = None;
                Ok(())
            }) {
                tracing::warn!(error = %e, "could not clear the key-operation flag; the next key operation takes it over");
            }
        }
    }
}
