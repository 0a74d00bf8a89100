//! Restore: every slot of a snapshot back to a file or device, bit for bit, in parallel.
//!
//! Each extent is checked on the way: frame CRC, GCM tag (bound to vault, disk and id),
//! decompression length, its length against the manifest, and the keyed hash of the plaintext
//! against its id. Before anything is written the manifest's disk digest is recomputed over
//! the slot table and ids. So a restore either produces exactly the backed-up disk or fails
//! loudly (and removes a target file it created).

pub mod subset;
pub mod target;
pub mod verify;

use std::ops::Range;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use rayon::prelude::*;

use crate::engine::Progress;
use crate::error::{Error, Result};
use crate::vault::frame;
use crate::vault::manifest::{Manifest, Slot, CONTENT_UNHASHED, ZERO};
use crate::vault::{Disk, Vault};

use target::Target;

/// What a restore did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RestoreReport {
    /// Disk size.
    pub bytes_total: u64,
    /// Bytes written from stored extents.
    pub bytes_written: u64,
    /// Bytes of stored frames read.
    pub bytes_fetched: u64,
    /// Zero slots (left sparse on files).
    pub slots_zero: u64,
    /// Seconds.
    pub seconds: f64,
}

/// Read and open one extent of `m`.
pub fn fetch_extent(vault: &Vault, disk: &Disk, m: &Manifest, e: u32) -> Result<Vec<u8>> {
    let loc = &m.extents[e as usize];
    let (pack, _) = m.packs[loc.pack as usize];
    let key = pack.object_key();
    let raw = vault
        .store()
        .get_range(&key, loc.offset as u64, loc.len as usize)?;
    let what = || format!("extent {} in {key} at offset {}", loc.id, loc.offset);
    let plain = frame::open(
        raw,
        &disk.binding,
        &|g| disk.generation(g),
        &*disk.identity_for(m)?,
        &loc.id,
        &what,
    )?;
    if plain.len() != loc.plain_len as usize {
        return Err(Error::integrity(format!(
            "{}: holds {} bytes, the manifest says {}",
            what(),
            plain.len(),
            loc.plain_len
        )));
    }
    Ok(plain)
}

/// The plaintext of slot `i`, or `None` for a zero slot.
pub fn slot_content(vault: &Vault, disk: &Disk, m: &Manifest, i: usize) -> Result<Option<Vec<u8>>> {
    let len = m.slot_len(i as u64) as usize;
    let check = |buf: &Vec<u8>, what: &str| -> Result<()> {
        if buf.len() > len {
            return Err(Error::integrity(format!(
                "snapshot {}: slot {i} {what} is {} bytes, the slot {len}",
                m.id.short(),
                buf.len()
            )));
        }
        Ok(())
    };
    match &m.slots[i] {
        Slot::Zero => Ok(None),
        Slot::Extent(e) => {
            let b = fetch_extent(vault, disk, m, *e)?;
            if b.len() != len {
                return Err(Error::integrity(format!(
                    "snapshot {}: slot {i} extent is {} bytes, the slot {len}",
                    m.id.short(),
                    b.len()
                )));
            }
            Ok(Some(b))
        }
        Slot::Overlaid(s) => {
            let mut buf = if s.base == ZERO {
                vec![0u8; len]
            } else {
                fetch_extent(vault, disk, m, s.base)?
            };
            check(&buf, "base")?;
            buf.resize(len, 0);
            for o in &s.overlays {
                let range = o.offset as usize..(o.offset + o.len) as usize;
                if range.end > len {
                    return Err(Error::integrity(format!(
                        "snapshot {}: slot {i} overlay runs past the disk end",
                        m.id.short()
                    )));
                }
                if o.extent == ZERO {
                    buf[range].fill(0);
                } else {
                    let piece = fetch_extent(vault, disk, m, o.extent)?;
                    if piece.len() != range.len() {
                        return Err(Error::integrity(format!(
                            "snapshot {}: slot {i} overlay at {} holds {} bytes, not {}",
                            m.id.short(),
                            o.offset,
                            piece.len(),
                            range.len()
                        )));
                    }
                    buf[range].copy_from_slice(&piece);
                }
            }
            // Every piece was checked against its id; this checks the assembly (slots made
            // from a change list have no assembled id: their pieces and the manifest's
            // digest are what is checked).
            if s.content != CONTENT_UNHASHED
                && disk.identity_for(m)?.extent_id.id(&buf) != s.content
            {
                return Err(Error::integrity(format!(
                    "snapshot {}: slot {i} assembled from its overlays does not match its content id",
                    m.id.short()
                )));
            }
            Ok(Some(buf))
        }
    }
}

/// Restore threads per core (see `restore`).
const IO_THREADS_PER_CORE: usize = 4;

/// How to restore.
#[derive(Debug, Clone)]
pub struct RestoreOptions {
    /// Overwrite a non-empty target file.
    pub force: bool,
    /// fsync the target before reporting success (default). Off, the data may still be in
    /// the page cache when the command returns, as with `cp` or restic.
    pub sync: bool,
    /// Only these bytes of the disk, written to the start of the target (`None`: all).
    pub range: Option<Range<u64>>,
}

impl Default for RestoreOptions {
    fn default() -> Self {
        RestoreOptions {
            force: false,
            sync: true,
            range: None,
        }
    }
}

/// Restore snapshot `m` of `disk` to `path`.
pub fn restore(
    vault: &Vault,
    disk: &Disk,
    m: &Manifest,
    path: &Path,
    opts: &RestoreOptions,
    progress: &dyn Progress,
) -> Result<RestoreReport> {
    let started = Instant::now();
    let span = tracing::info_span!("restore", disk = %disk.name, snapshot = %m.id.short());
    let _g = span.enter();
    if m.compute_digest(&disk.identity_for(m)?.digest) != m.digest {
        return Err(Error::integrity(format!(
            "snapshot {}: slot table does not match its recorded disk digest",
            m.id.short()
        )));
    }
    let range = opts.range.clone().unwrap_or(0..m.disk_size);
    if range.start > range.end || range.end > m.disk_size {
        return Err(Error::usage(format!(
            "range {}..{} lies outside the {}-byte disk",
            range.start, range.end, m.disk_size
        )));
    }
    let target = Target::open(path, range.end - range.start, opts.force)?;
    // Restore waits on I/O (ranged reads of packs, O_DIRECT writes), so it runs more threads
    // than cores to keep several writes in flight.
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get()) * IO_THREADS_PER_CORE;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("bv-restore-{i}"))
        .build()
        .map_err(|e| {
            Error::new(
                crate::ErrorKind::Io,
                format!("starting restore threads: {e}"),
            )
        })?;
    tracing::debug!(target = %path.display(), device = target.is_device, bytes = range.end - range.start, threads, "restore: target open, slots fetched and written in parallel");
    let result = pool.install(|| write_all(vault, disk, m, &range, &target, progress));
    let result = result.and_then(|r| {
        tracing::debug!(
            bytes_written = r.bytes_written,
            bytes_fetched = r.bytes_fetched,
            slots_zero = r.slots_zero,
            "restore: every slot written"
        );
        if opts.sync {
            tracing::debug!("restore: syncing the target");
            target.sync().map(|_| r)
        } else {
            Ok(r)
        }
    });
    match result {
        Ok(mut r) => {
            r.seconds = started.elapsed().as_secs_f64();
            Ok(r)
        }
        Err(e) => {
            if target.created {
                let _ = std::fs::remove_file(path);
            }
            Err(e)
        }
    }
}

fn write_all(
    vault: &Vault,
    disk: &Disk,
    m: &Manifest,
    range: &Range<u64>,
    target: &Target,
    progress: &dyn Progress,
) -> Result<RestoreReport> {
    let written = AtomicU64::new(0);
    let fetched = AtomicU64::new(0);
    let zero = AtomicU64::new(0);
    let ss = m.slot_size as u64;
    let slots = if range.is_empty() {
        0..0
    } else {
        (range.start / ss) as usize..range.end.div_ceil(ss) as usize
    };
    // The part of slot i inside the range, as offsets within the slot, and where it goes.
    let part = |i: usize| {
        let slot_start = i as u64 * ss;
        let from = range.start.saturating_sub(slot_start) as usize;
        let to = ((range.end - slot_start).min(m.slot_len(i as u64) as u64)) as usize;
        (from, to, slot_start + from as u64 - range.start)
    };
    // Progress counts what is written: zero slots only on a device (see engine::progress).
    let writes = |i: usize| target.is_device || !matches!(m.slots[i], Slot::Zero);
    let work = |i: usize| {
        let (from, to, _) = part(i);
        if writes(i) {
            (to - from) as u64
        } else {
            0
        }
    };
    progress.start(slots.clone().map(work).sum());
    slots.into_par_iter().try_for_each(|i| -> Result<()> {
        let (from, to, at) = part(i);
        match slot_content(vault, disk, m, i)? {
            None => {
                zero.fetch_add(1, Ordering::Relaxed);
                target.zero(at, to - from)?;
            }
            Some(buf) => {
                target.write_slot(&buf[from..to], at)?;
                written.fetch_add((to - from) as u64, Ordering::Relaxed);
            }
        }
        let f: u64 = slot_frames(m, i)
            .map(|e| m.extents[e as usize].len as u64)
            .sum();
        fetched.fetch_add(f, Ordering::Relaxed);
        progress.advance(work(i));
        Ok(())
    })?;
    Ok(RestoreReport {
        bytes_total: range.end - range.start,
        bytes_written: written.into_inner(),
        bytes_fetched: fetched.into_inner(),
        slots_zero: zero.into_inner(),
        seconds: 0.0,
    })
}

/// Extent indexes a slot references.
pub fn slot_frames(m: &Manifest, i: usize) -> impl Iterator<Item = u32> + '_ {
    let (base, overlays): (Option<u32>, &[crate::vault::manifest::Overlay]) = match &m.slots[i] {
        Slot::Zero => (None, &[]),
        Slot::Extent(e) => (Some(*e), &[]),
        Slot::Overlaid(o) => ((o.base != ZERO).then_some(o.base), o.overlays.as_slice()),
    };
    base.into_iter()
        .chain(overlays.iter().map(|o| o.extent).filter(|&e| e != ZERO))
}
