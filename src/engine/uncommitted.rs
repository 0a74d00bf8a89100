//! The packs a backup run has written and no manifest names yet.
//!
//! A backup stores packs first and its manifest last (the commit point). Until the manifest
//! is written the packs are the run's own: their names are content hashes of ciphertext
//! sealed under the disk's keys with fresh nonces, so no earlier snapshot names them, and a
//! disk has one writer at a time (its lock). Each durable pack is followed by its checkpoint
//! segment ([`crate::vault::checkpoint`]), so a run that fails, is interrupted or is killed
//! leaves packs the next run of the same disk reuses ([`super::resume`]) instead of
//! uploading them again; packs no run resumes are unreferenced, for prune to collect.
//!
//! One failure deletes instead: a full vault (no space, quota). Keeping its packs would keep
//! the vault full, so the next backup that fits could not run; the packs go, with their
//! segments, and the re-run stores them again once there is room.
//!
//! ```text
//! uploader: begin(id) → store.put(pack) → store.put(segment) → stored(id, size)
//! backup:   … manifest written → commit()      (the packs now belong to the snapshot)
//!           … the vault is full → discard()     (every pack begun and its segment deleted)
//!           … any other failure → keep()        (left for a re-run to resume)
//! ```

use std::sync::{Arc, Mutex};

use crate::error::{Error, ErrorKind, Result};
use crate::util::human_bytes;
use crate::vault::pack::PackId;
use crate::vault::store::Store;

/// One pack the run began writing.
#[derive(Debug, Clone)]
struct Written {
    id: PackId,
    /// The key of its checkpoint segment.
    segment: String,
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

    /// Pack `id` is about to be written, then its segment `segment`.
    pub fn begin(&self, id: PackId, segment: &str) {
        self.packs().push(Written {
            id,
            segment: segment.to_string(),
            stored: None,
        });
    }

    /// Pack `id`, of `size` bytes, is durable.
    pub fn stored(&self, id: PackId, size: u64) {
        if let Some(w) = self.packs().iter_mut().rev().find(|w| w.id == id) {
            w.stored = Some(size);
        }
    }
}

/// What became of the packs of a run that did not commit, for its error message.
#[derive(Debug, Default)]
pub struct Settled {
    /// Whether they were kept for a re-run to resume (else removed).
    pub kept: bool,
    /// Packs that had been stored.
    pub packs: u64,
    /// Their bytes.
    pub bytes: u64,
    /// The first removal that failed, and how many failed: those packs stay behind,
    /// unreferenced, for `verify` to report.
    pub failed: Option<(Error, u64)>,
}

impl std::fmt::Display for Settled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let bytes = human_bytes(self.bytes);
        let verb = if self.kept { "kept" } else { "removed" };
        match self.packs {
            0 => f.write_str("nothing left behind")?,
            1 => write!(f, "{verb} the pack ({bytes}) it had stored")?,
            n => write!(f, "{verb} the {n} packs ({bytes}) it had stored")?,
        }
        if self.kept && self.packs > 0 {
            f.write_str(
                " for a re-run of the same backup to resume (`blockvault prune` collects them if none does)",
            )?;
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
pub fn explain(e: Error, disk: &str, discarded: &Settled) -> Error {
    let nothing = discarded.packs == 0 && discarded.failed.is_none();
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

/// The packs of a run not committed yet: kept for a re-run to resume, unless the vault
/// is full.
pub struct UncommittedPacks {
    store: Arc<dyn Store>,
    log: Arc<PackLog>,
}

impl UncommittedPacks {
    /// Nothing written yet, into `store`.
    pub fn new(store: Arc<dyn Store>) -> Self {
        UncommittedPacks {
            store,
            log: Arc::default(),
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

    /// The run failed with `e` once the uploader stopped (the writer finished or dropped):
    /// keep its packs and checkpoint for a re-run, or delete them if `e` says the vault is
    /// full.
    pub fn settle(self, e: &Error) -> Settled {
        if vault_full(e) {
            return self.delete_all();
        }
        let packs = self.log.packs();
        let stored = packs.iter().filter_map(|w| w.stored);
        Settled {
            kept: true,
            packs: stored.clone().count() as u64,
            bytes: stored.sum(),
            failed: None,
        }
    }

    fn delete_all(&self) -> Settled {
        let mut done = Settled::default();
        for w in self.log.packs().drain(..) {
            // The segment first: a segment whose pack is gone is skipped by a resumed run,
            // but is better not left at all.
            let deleted = self
                .store
                .delete(&w.segment)
                .and_then(|()| self.store.delete(&w.id.object_key()));
            match deleted {
                Ok(()) => {
                    if let Some(size) = w.stored {
                        done.packs += 1;
                        done.bytes += size;
                    }
                }
                Err(e) => match &mut done.failed {
                    Some((_, n)) => *n += 1,
                    None => done.failed = Some((e, 1)),
                },
            }
        }
        if done.packs > 0 {
            tracing::info!(
                packs = done.packs,
                bytes = done.bytes,
                "removed the packs of a backup that did not commit: the vault is full"
            );
        }
        done
    }
}

/// Whether `e` comes from a store out of space (ENOSPC) or over its quota (EDQUOT).
fn vault_full(e: &Error) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cause {
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::StorageFull
                || io.kind() == std::io::ErrorKind::QuotaExceeded
                || matches!(io.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT))
            {
                return true;
            }
        }
        cause = c.source();
    }
    false
}

/// Run `store.put` of pack `id` under `log`'s record, then of its checkpoint segment
/// (`segment`: key and bytes), so that the segment exists only for a durable pack. The pack's
/// buffer comes back for the next pack ([`Store::put_owned`]).
pub fn put_logged(
    store: &dyn Store,
    log: &PackLog,
    id: PackId,
    bytes: Vec<u8>,
    segment: (&str, &[u8]),
) -> Result<Vec<u8>> {
    log.begin(id, segment.0);
    let size = bytes.len() as u64;
    let bytes = store.put_owned(&id.object_key(), bytes)?;
    store.put(segment.0, segment.1)?;
    log.stored(id, size);
    Ok(bytes)
}
