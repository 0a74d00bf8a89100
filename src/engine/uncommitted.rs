//! The packs a backup run has written and no manifest names yet.
//!
//! A backup stores packs first and its manifest last (the commit point). Until the manifest
//! is written the packs are the run's own: their names are content hashes of ciphertext
//! sealed under the disk's keys with fresh nonces, so no earlier snapshot names them, and a
//! disk has one writer at a time (its lock). A run that fails or is interrupted removes them,
//! so a full vault, a dead source or Ctrl-C leaves nothing to reclaim and the next backup
//! that fits succeeds. A run killed outright leaves them for `verify` to report (and prune,
//! later, to remove).
//!
//! ```text
//! uploader: begin(id) → store.put(pack) → stored(id, size)
//! backup:   … manifest written → commit()      (the packs now belong to the snapshot)
//!           … any failure       → discard()     (every pack begun is deleted)
//!           … a panic           → Drop          (the same, silently)
//! ```
//! The list is the run's one piece of state about what it wrote, kept apart from the writer
//! so that a later resumable run can keep it as a checkpoint instead of discarding it.

use std::sync::{Arc, Mutex};

use crate::error::{Error, ErrorKind, Result};
use crate::util::human_bytes;
use crate::vault::pack::PackId;
use crate::vault::store::Store;

/// One pack the run began writing.
#[derive(Debug, Clone, Copy)]
struct Written {
    id: PackId,
    /// Its size once `put` returned; `None` while writing, or if the write failed (a failed
    /// `put` may still have left the object: it is deleted all the same).
    stored: Option<u64>,
}

/// The record the uploader keeps of each pack it writes.
#[derive(Debug, Default)]
pub struct PackLog(Mutex<Vec<Written>>);

impl PackLog {
    fn packs(&self) -> std::sync::MutexGuard<'_, Vec<Written>> {
        // A panic elsewhere cannot leave the list half-updated: every change is one push or
        // one field store.
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Pack `id` is about to be written.
    pub fn begin(&self, id: PackId) {
        self.packs().push(Written { id, stored: None });
    }

    /// Pack `id`, of `size` bytes, is durable.
    pub fn stored(&self, id: PackId, size: u64) {
        if let Some(w) = self.packs().iter_mut().rev().find(|w| w.id == id) {
            w.stored = Some(size);
        }
    }
}

/// What [`UncommittedPacks::discard`] did, for the message of the failed run.
#[derive(Debug, Default)]
pub struct Discarded {
    /// Packs that had been stored and were removed.
    pub removed: u64,
    /// Their bytes.
    pub bytes: u64,
    /// The first removal that failed, and how many failed: those packs stay behind,
    /// unreferenced, for `verify` to report.
    pub failed: Option<(Error, u64)>,
}

impl std::fmt::Display for Discarded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let bytes = human_bytes(self.bytes);
        match self.removed {
            0 => f.write_str("nothing left behind")?,
            1 => write!(f, "removed the pack ({bytes}) it had stored")?,
            n => write!(f, "removed the {n} packs ({bytes}) it had stored")?,
        }
        if let Some((e, n)) = &self.failed {
            write!(
                f,
                "; {n} could not be removed ({e}) and stay behind, unreferenced \
                 (`blockvault verify` counts them)"
            )?;
        }
        Ok(())
    }
}

/// The error of a backup of `disk` that stopped with `e` before committing, saying that no
/// snapshot was written and what became of its packs. A usage error that left nothing
/// behind (a refused request) is returned as is.
pub fn explain(e: Error, disk: &str, discarded: &Discarded) -> Error {
    let nothing = discarded.removed == 0 && discarded.failed.is_none();
    match e.kind() {
        ErrorKind::Usage if nothing => e,
        ErrorKind::Interrupted => Error::new(
            ErrorKind::Interrupted,
            format!(
                "backup of disk {disk} {}: no snapshot written, {discarded}",
                e.context()
            ),
        ),
        _ => e.within(format!(
            "backup of disk {disk} failed, no snapshot written, {discarded}"
        )),
    }
}

/// The packs of a run not committed yet: deleted unless [`UncommittedPacks::commit`] is
/// called once the manifest naming them is written.
pub struct UncommittedPacks {
    store: Arc<dyn Store>,
    log: Arc<PackLog>,
    settled: bool,
}

impl UncommittedPacks {
    /// Nothing written yet, into `store`.
    pub fn new(store: Arc<dyn Store>) -> Self {
        UncommittedPacks {
            store,
            log: Arc::default(),
            settled: false,
        }
    }

    /// The store the packs go to.
    pub fn store(&self) -> Arc<dyn Store> {
        self.store.clone()
    }

    /// The log the uploader records each pack in.
    pub fn log(&self) -> Arc<PackLog> {
        self.log.clone()
    }

    /// The manifest naming the packs is written: they stay.
    pub fn commit(mut self) {
        self.settled = true;
    }

    /// Delete every pack the run began. Call only once the uploader has stopped (the writer
    /// finished or dropped), so no pack is written after its deletion.
    pub fn discard(mut self) -> Discarded {
        self.settled = true;
        self.delete_all()
    }

    fn delete_all(&self) -> Discarded {
        let mut done = Discarded::default();
        for w in self.log.packs().drain(..) {
            match self.store.delete(&w.id.object_key()) {
                Ok(()) => {
                    if let Some(size) = w.stored {
                        done.removed += 1;
                        done.bytes += size;
                    }
                }
                Err(e) => match &mut done.failed {
                    Some((_, n)) => *n += 1,
                    None => done.failed = Some((e, 1)),
                },
            }
        }
        if done.removed > 0 {
            tracing::info!(
                packs = done.removed,
                bytes = done.bytes,
                "removed the packs of a backup that did not commit"
            );
        }
        done
    }
}

impl Drop for UncommittedPacks {
    fn drop(&mut self) {
        if !self.settled {
            let _ = self.delete_all();
        }
    }
}

/// Run `store.put` of pack `id` under `log`'s record.
pub fn put_logged(store: &dyn Store, log: &PackLog, id: PackId, bytes: &[u8]) -> Result<()> {
    log.begin(id);
    store.put(&id.object_key(), bytes)?;
    log.stored(id, bytes.len() as u64);
    Ok(())
}
