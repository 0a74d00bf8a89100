//! Random access to a snapshot's bytes: the one read path behind `restore`, `serve` (NBD),
//! `mount` (FUSE) and the backup's parent diffs.
//!
//! A snapshot is a table of fixed slots ([`Manifest::slots`]); byte `o` lives in slot
//! `o / slot_size`. A read locates its slots, fetches each slot's frames with one ranged read
//! per frame through the vault's `Store` (a restore fetches neighbouring frames together:
//! [`spans`]), authenticates, decompresses and lays overlays over
//! the base ([`slot`]), and copies the asked-for part out:
//!
//! ```text
//!  read_at(off, buf) ─► slots off/ss ..= (off+len-1)/ss ─► zero slot: zeros, nothing read
//!                                 │
//!                                 ├─ LRU cache hit (decrypted slots, CACHE_BYTES) ─► copy
//!                                 ├─ being decoded by another read ─► wait for it, then copy
//!                                 └─ miss ─► slot::read_slot_into (fetch, open, overlay, check)
//!                                            on a sequential read (it starts where the last
//!                                            ended): its slots and the next PREFETCH_SLOTS
//!                                            decoded in parallel into the cache
//! ```
//!
//! Which bytes hold data and which are holes comes from the manifest alone ([`extents`]).
//! A slot that fails a check fails the read that touches it, with an error naming the object
//! and the disk range; nothing of the failure is cached, and every other slot still reads.
//!
//! The reader borrows the vault, disk and manifest, opened by the caller the usual way
//! (`Vault::resolve_snapshot`), and is `Sync`: many threads (NBD connections and the requests
//! in flight on each, FUSE requests) share one reader and its cache. A slot is decoded once
//! however many reads miss it at the same moment: the first decodes, the others wait for the
//! result (a client's parallel 256 KiB reads of one 1 MiB slot would otherwise decode it four
//! times).

pub mod extents;
pub mod slot;
pub mod spans;

use std::collections::HashSet;
use std::num::NonZeroUsize;
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use lru::LruCache;
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::vault::manifest::{Manifest, Slot};
use crate::vault::{Disk, Vault};

pub use extents::{extents, Extent, ExtentKind};
pub use slot::{read_slot, read_slot_into, slot_content, slot_frames, Damage};

/// Memory for decrypted slots kept per reader (64 slots of the default 1 MiB): enough for
/// the read-ahead window and a guest's hot metadata, small beside a VM's own page cache.
pub const CACHE_BYTES: usize = 64 << 20;

/// Slots decoded ahead of a sequential reader, in parallel (8 MiB at the default slot size).
pub const PREFETCH_SLOTS: usize = 8;

/// A decrypted slot, shared between the cache and the reads copying from it.
pub type SlotBytes = Arc<Vec<u8>>;

/// A run of a snapshot's bytes as [`SnapshotReader::pieces`] hands it out.
#[derive(Debug)]
pub enum Piece {
    /// Part of a decrypted slot, held alive by this piece whatever the cache evicts.
    Slot {
        /// The whole slot.
        bytes: SlotBytes,
        /// The piece's bytes within it.
        range: Range<usize>,
    },
    /// This many zero bytes (a zero slot: nothing stored, nothing read).
    Zeros(usize),
}

impl Piece {
    /// Bytes in the piece.
    fn len(&self) -> usize {
        match self {
            Piece::Slot { range, .. } => range.len(),
            Piece::Zeros(n) => *n,
        }
    }
}

/// Check the manifest's slot table against its recorded disk digest: done once before a
/// snapshot is read (restored, served, mounted), since each slot is then checked only
/// against the ids this table holds.
pub fn check_digest(disk: &Disk, m: &Manifest) -> Result<()> {
    if m.compute_digest(&disk.identity_for(m)?.digest) != m.digest {
        return Err(Error::integrity(format!(
            "snapshot {}: slot table does not match its recorded disk digest",
            m.id.short()
        )));
    }
    Ok(())
}

/// Random access to one snapshot's bytes (see the module doc).
pub struct SnapshotReader<'a> {
    vault: &'a Vault,
    disk: &'a Disk,
    m: &'a Manifest,
    state: Mutex<Cache>,
    /// Signalled when a slot's decode ends (in the cache, or failed and left out).
    decoded: Condvar,
    /// One past the last slot a read touched: a read starting there is sequential.
    next: AtomicUsize,
}

impl<'a> SnapshotReader<'a> {
    /// A reader of snapshot `m` of `disk` whose cache holds at most `cache_bytes` of slots
    /// (at least the read-ahead window plus one).
    pub fn new(vault: &'a Vault, disk: &'a Disk, m: &'a Manifest, cache_bytes: usize) -> Self {
        let slots = (cache_bytes / m.slot_size.max(1) as usize).max(PREFETCH_SLOTS + 1);
        SnapshotReader {
            vault,
            disk,
            m,
            state: Mutex::new(Cache {
                slots: LruCache::new(NonZeroUsize::new(slots).unwrap_or(NonZeroUsize::MIN)),
                decoding: HashSet::new(),
                spare: Vec::new(),
            }),
            decoded: Condvar::new(),
            next: AtomicUsize::new(usize::MAX),
        }
    }

    /// The snapshot read.
    pub fn manifest(&self) -> &'a Manifest {
        self.m
    }

    /// Disk size in bytes.
    pub fn size(&self) -> u64 {
        self.m.disk_size
    }

    /// Fill `buf` with the bytes at `offset`; the range must lie within the disk.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let mut at = 0;
        for p in self.pieces(offset, buf.len())? {
            let out = &mut buf[at..at + p.len()];
            match &p {
                Piece::Zeros(_) => out.fill(0),
                Piece::Slot { bytes, range } => out.copy_from_slice(&bytes[range.clone()]),
            }
            at += p.len();
        }
        Ok(())
    }

    /// The `len` bytes at `offset` (within the disk) as pieces of cached slots and runs of
    /// zeros, in order, copied nowhere: what `serve` sends straight from the cache.
    pub fn pieces(&self, offset: u64, len: usize) -> Result<Vec<Piece>> {
        let end = offset
            .checked_add(len as u64)
            .filter(|&e| e <= self.m.disk_size)
            .ok_or_else(|| {
                Error::usage(format!(
                    "read of {len} bytes at {offset} runs past the end of the {}-byte disk {}",
                    self.m.disk_size,
                    self.name()
                ))
            })?;
        if len == 0 {
            return Ok(Vec::new());
        }
        let ss = u64::from(self.m.slot_size);
        let slots = (offset / ss) as usize..end.div_ceil(ss) as usize;
        let sequential = self.next.swap(slots.end, Ordering::Relaxed) == slots.start;
        if sequential && self.missing(slots.clone()) {
            // One parallel batch for this read and the window after it, so a streaming
            // reader waits for a batch once per PREFETCH_SLOTS slots, not for each slot.
            self.prefetch(slots.start..(slots.end + PREFETCH_SLOTS).min(self.m.slots.len()));
        }
        slots
            .map(|i| {
                let start = i as u64 * ss;
                let (from, to) = (offset.max(start) - start, end.min(start + ss) - start);
                Ok(match self.slot(i)? {
                    None => Piece::Zeros((to - from) as usize),
                    Some(bytes) => Piece::Slot {
                        bytes,
                        range: from as usize..to as usize,
                    },
                })
            })
            .collect()
    }

    /// The runs of data and holes covering `range` (see [`extents`]).
    pub fn extents(&self, range: Range<u64>) -> Vec<Extent> {
        extents(self.m, range)
    }

    /// Slot `i` decoded (`None`: a zero slot), from the cache or the vault; a decode another
    /// read has under way is waited for, not repeated.
    fn slot(&self, i: usize) -> Result<Option<SlotBytes>> {
        if matches!(self.m.slots[i], Slot::Zero) {
            return Ok(None);
        }
        let mut state = self.lock();
        loop {
            if let Some(b) = state.slots.get(&i) {
                return Ok(Some(b.clone()));
            }
            if state.decoding.insert(i) {
                break;
            }
            // Another read decodes it: wait, then find it cached (or, when that decode
            // failed, decode it here and report the failure to this read too).
            state = self.decoded.wait(state).unwrap_or_else(|e| e.into_inner());
        }
        drop(state);
        let turn = Turn { r: self, i };
        let b = self.decode(i);
        turn.finish(b.as_ref().ok().cloned());
        b.map(Some)
    }

    /// Whether a stored slot of `slots` is neither cached nor being decoded.
    fn missing(&self, slots: Range<usize>) -> bool {
        let state = self.lock();
        slots.into_iter().any(|i| state.wanted(self.m, i))
    }

    /// Decode the stored slots of `slots` that are neither cached nor being decoded, in
    /// parallel, into the cache; failures are left for the read that reaches them to report.
    fn prefetch(&self, slots: Range<usize>) {
        let todo: Vec<usize> = {
            let mut state = self.lock();
            let todo: Vec<usize> = slots.filter(|&i| state.wanted(self.m, i)).collect();
            state.decoding.extend(&todo);
            todo
        };
        todo.into_par_iter().for_each(|i| {
            let turn = Turn { r: self, i };
            turn.finish(self.decode(i).ok());
        });
    }

    /// Slot `i` (stored) read and checked, its errors naming the disk range.
    fn decode(&self, i: usize) -> Result<SlotBytes> {
        let ss = u64::from(self.m.slot_size);
        let start = i as u64 * ss;
        let end = start + u64::from(self.m.slot_len(i as u64));
        // A buffer the cache evicted needs no zeroing: a decode writes every byte of it.
        let mut b = self.lock().spare.pop().unwrap_or_default();
        b.resize((end - start) as usize, 0);
        match read_slot_into(self.vault, self.disk, self.m, i, None, None, &mut b) {
            Ok(true) => Ok(Arc::new(b)),
            Ok(false) => {
                b.fill(0);
                Ok(Arc::new(b))
            }
            Err(e) => Err(e.within(format!("{} bytes {start}..{end}", self.name()))),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Cache> {
        crate::util::lock(&self.state)
    }

    /// `DISK@SHORT-ID`, as errors name the snapshot.
    pub fn name(&self) -> String {
        format!("{}@{}", self.disk.name, self.m.id.short())
    }
}

/// Decoded slots, the slots some read is decoding now, and evicted slots' buffers kept for
/// the next decodes (a fresh buffer is zeroed first: a tenth of a streaming read's CPU).
struct Cache {
    slots: LruCache<usize, SlotBytes>,
    decoding: HashSet<usize>,
    spare: Vec<Vec<u8>>,
}

impl Cache {
    /// Whether stored slot `i` of `m` needs a decode: not cached, not under way.
    fn wanted(&self, m: &Manifest, i: usize) -> bool {
        !matches!(m.slots[i], Slot::Zero) && !self.slots.contains(&i) && !self.decoding.contains(&i)
    }
}

/// One read's turn at decoding slot `i`: ending it (with the slot, or with nothing when the
/// decode failed or panicked) takes the slot off the decoding set and wakes the waiters, so
/// no read waits forever for a decode that will not come.
struct Turn<'r, 'a> {
    r: &'r SnapshotReader<'a>,
    i: usize,
}

impl Turn<'_, '_> {
    /// Cache `b` (a successful decode) and end the turn.
    fn finish(self, b: Option<SlotBytes>) {
        let Some(b) = b else { return };
        let mut state = self.r.lock();
        // An evicted slot no read still holds gives its buffer to a later decode.
        if let Some(old) = state
            .slots
            .push(self.i, b)
            .and_then(|(_, old)| Arc::into_inner(old))
        {
            if state.spare.len() < PREFETCH_SLOTS {
                state.spare.push(old);
            }
        }
    }
}

impl Drop for Turn<'_, '_> {
    fn drop(&mut self) {
        self.r.lock().decoding.remove(&self.i);
        self.r.decoded.notify_all();
    }
}
