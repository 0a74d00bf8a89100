//! Restore: every slot of a snapshot back to a file, a qcow2 image, a block device or an NBD
//! export ([`target`]), bit for bit, in parallel.
//!
//! Each extent is checked on the way ([`slot`]): frame CRC, GCM tag (bound to vault, disk and
//! id), decompression length, its length against the manifest, and the keyed hash of the
//! plaintext against its id. Before anything is written the manifest's disk digest is
//! recomputed over the slot table and ids. So a restore either produces exactly the
//! backed-up disk or fails loudly, and a target it created is removed again (one that
//! existed is reported as partly written). The one exception is asked for:
//! `skip_damaged` writes a piece that fails its checks as zeros, lists it, and goes on.
//!
//! ```text
//!  digest check ─► target::open (probe, refuse) ─► rayon: per batch of neighbouring slots
//!                                                     │  (reader::spans): one ranged read
//!                                                     │  of their frames, then per slot
//!                                                     │  aligned buffer from a BufferPool
//!                                                     │  reader::read_slot_into (take from
//!                                                     │    the span, check, decompress)
//!                                                     └► Target::write_buf / zero: the
//!                                                        buffer handed to an io_uring ring
//!                                                        (O_DIRECT, several in flight)
//!  ─► Target::finish (qcow2 metadata, fsync / NBD flush)      on error: Target::abandon
//! ```

pub mod subset;
pub mod target;
pub mod verify;

use std::ops::Range;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use rayon::prelude::*;

use crate::engine::Progress;
use crate::error::{Error, Result};
use crate::source::NbdOptions;
use crate::vault::manifest::{Manifest, Slot};
use crate::vault::{Disk, Vault};

use crate::io::BufferPool;
pub use crate::reader::Damage;
use crate::reader::{read_slot_into, slot_frames, spans};
use target::{Format, Target, TargetKind, TargetOptions, DIRECT_ALIGN};

/// What a restore did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RestoreReport {
    /// Disk size.
    pub bytes_total: u64,
    /// Bytes written from stored extents (not counting damaged ones written as zeros).
    pub bytes_written: u64,
    /// Bytes of stored frames read.
    pub bytes_fetched: u64,
    /// Zero slots (left sparse on files).
    pub slots_zero: u64,
    /// Seconds.
    pub seconds: f64,
    /// What the target is.
    pub target_kind: TargetKind,
    /// What was written into it.
    pub format: Format,
    /// With `skip_damaged`: the ranges written as zeros because their data failed its
    /// checks, by offset. Empty means the restore is exact.
    pub damaged: Vec<Damage>,
}

/// Restore threads per core (see `restore`).
const IO_THREADS_PER_CORE: usize = 4;

/// Decoded slots a target may hold while their writes are in flight (io_uring), beyond the
/// one each restore thread decodes into.
const WRITES_IN_FLIGHT: usize = 8;

/// How to restore.
#[derive(Debug, Clone)]
pub struct RestoreOptions {
    /// Overwrite a non-empty target file, or a device or NBD export holding data.
    pub force: bool,
    /// fsync the target (flush an NBD export) before reporting success (default). Off, the
    /// data may still be in the page cache when the command returns, as with `cp` or restic.
    pub sync: bool,
    /// Only these bytes of the disk, written to the start of the target (`None`: all).
    pub range: Option<Range<u64>>,
    /// The file format (`None`: qcow2 for a `.qcow2` name, else raw).
    pub format: Option<Format>,
    /// Best effort: write pieces that fail their checks as zeros and list them in the
    /// report, instead of failing.
    pub skip_damaged: bool,
    /// How to reach an NBD export target.
    pub nbd: NbdOptions,
}

impl Default for RestoreOptions {
    fn default() -> Self {
        RestoreOptions {
            force: false,
            sync: true,
            range: None,
            format: None,
            skip_damaged: false,
            nbd: NbdOptions::default(),
        }
    }
}

/// Restore snapshot `m` of `disk` to `path` (a file or device path, or an NBD URL).
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
    crate::reader::check_digest(disk, m)?;
    let range = opts.range.clone().unwrap_or(0..m.disk_size);
    if range.start > range.end || range.end > m.disk_size {
        return Err(Error::usage(format!(
            "range {}..{} lies outside the {}-byte disk",
            range.start, range.end, m.disk_size
        )));
    }
    let target = target::open(
        path,
        range.end - range.start,
        &TargetOptions {
            force: opts.force,
            format: opts.format,
            nbd: opts.nbd.clone(),
        },
    )?;
    // Restore waits on I/O (ranged reads of packs; O_DIRECT writes where io_uring is
    // unavailable), so it runs more threads than cores to keep several reads in flight.
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get()) * IO_THREADS_PER_CORE;
    let result = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("bv-restore-{i}"))
        .build()
        .map_err(|e| {
            Error::new(
                crate::ErrorKind::Io,
                format!("starting restore threads: {e}"),
            )
        })
        .and_then(|pool| {
            tracing::debug!(target = %target.name(), kind = ?target.kind(), format = ?target.format(), bytes = range.end - range.start, threads, "restore: target open, slots fetched and written in parallel");
            pool.install(|| {
                write_all(
                    vault,
                    disk,
                    m,
                    &range,
                    &*target,
                    opts.skip_damaged,
                    progress,
                )
            })
        })
        .and_then(|r| {
            tracing::debug!(
                bytes_written = r.bytes_written,
                bytes_fetched = r.bytes_fetched,
                slots_zero = r.slots_zero,
                damaged = r.damaged.len(),
                "restore: every slot written"
            );
            if opts.sync {
                tracing::debug!("restore: syncing the target");
            }
            target.finish(opts.sync).map(|()| r)
        });
    match result {
        Ok(mut r) => {
            r.seconds = started.elapsed().as_secs_f64();
            Ok(r)
        }
        Err(e) => {
            let left = target.abandon().describe(&*target);
            Err(e.within(format!("restore stopped; {left}")))
        }
    }
}

fn write_all(
    vault: &Vault,
    disk: &Disk,
    m: &Manifest,
    range: &Range<u64>,
    target: &dyn Target,
    skip_damaged: bool,
    progress: &dyn Progress,
) -> Result<RestoreReport> {
    let written = AtomicU64::new(0);
    let fetched = AtomicU64::new(0);
    let zero = AtomicU64::new(0);
    let damaged = Mutex::new(Vec::new());
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
    // Progress counts what is written: zero slots only on a device (see engine::progress);
    // files and qcow2 images keep them as holes, NBD exports get one zeroing request.
    let device = target.kind() == TargetKind::Device;
    let writes = |i: usize| device || !matches!(m.slots[i], Slot::Zero);
    let work = |i: usize| {
        let (from, to, _) = part(i);
        if writes(i) {
            (to - from) as u64
        } else {
            0
        }
    };
    progress.start(slots.clone().map(work).sum());
    // One aligned buffer per restore thread and per write the target may keep in flight,
    // taken for a slot and back when it is written: memory stays (threads + writes) x slot
    // size whatever the disk, and each slot is decompressed straight into the buffer an
    // O_DIRECT write sends (no staging copy).
    let pool = BufferPool::new(
        rayon::current_num_threads() + WRITES_IN_FLIGHT,
        m.slot_size as usize,
        DIRECT_ALIGN,
    );
    // Every byte to be written is announced first: a raw file allocates them up front, so
    // the parallel O_DIRECT writes below do not queue on the filesystem's allocation lock.
    for run in written_runs(m, slots.clone(), &part) {
        target.allocate(run.start, run.end - run.start);
    }
    // Neighbouring slots whose frames lie together in a pack are fetched with one ranged
    // read per batch (object storage: a request per frame is what a restore waits on); the
    // batches run in parallel, so their fetches overlap.
    let batches = spans::batches(m, slots);
    tracing::debug!(
        batches = batches.len(),
        spans = batches.iter().filter(|b| b.read.is_some()).count(),
        "restore: slots grouped into ranged reads"
    );
    batches
        .into_par_iter()
        .try_for_each(|batch| -> Result<()> {
            crate::interrupt::check()?;
            let span = batch.fetch(vault);
            for i in batch.slots {
                crate::interrupt::check()?;
                let (from, to, at) = part(i);
                let mut found = Vec::new();
                let mut buf = pool.get();
                buf.set_len(m.slot_len(i as u64) as usize);
                let stored = read_slot_into(
                    vault,
                    disk,
                    m,
                    i,
                    skip_damaged.then_some(&mut found),
                    span.as_ref(),
                    &mut buf,
                )?;
                let found: Vec<Damage> = found.into_iter().filter_map(|d| clip(d, range)).collect();
                if stored {
                    target.write_buf(at, buf, from..to)?;
                    let lost: u64 = found.iter().map(|d| d.length).sum();
                    written.fetch_add((to - from) as u64 - lost, Ordering::Relaxed);
                } else {
                    drop(buf);
                    zero.fetch_add(1, Ordering::Relaxed);
                    target.zero(at, (to - from) as u64)?;
                }
                if !found.is_empty() {
                    damaged
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .extend(found);
                }
                let f: u64 = slot_frames(m, i)
                    .map(|e| m.extents[e as usize].len as u64)
                    .sum();
                fetched.fetch_add(f, Ordering::Relaxed);
                progress.advance(work(i));
            }
            Ok(())
        })?;
    let mut damaged = damaged.into_inner().unwrap_or_else(|e| e.into_inner());
    damaged.sort_by_key(|d| d.offset);
    Ok(RestoreReport {
        bytes_total: range.end - range.start,
        bytes_written: written.into_inner(),
        bytes_fetched: fetched.into_inner(),
        slots_zero: zero.into_inner(),
        seconds: 0.0,
        target_kind: target.kind(),
        format: target.format(),
        damaged,
    })
}

/// Where the stored (non-zero) slots of `slots` go in the target, as runs of consecutive
/// bytes; `part` maps a slot to its bytes within the slot and its target offset.
fn written_runs(
    m: &Manifest,
    slots: Range<usize>,
    part: &impl Fn(usize) -> (usize, usize, u64),
) -> Vec<Range<u64>> {
    let mut runs: Vec<Range<u64>> = Vec::new();
    for i in slots.filter(|&i| !matches!(m.slots[i], Slot::Zero)) {
        let (from, to, at) = part(i);
        let next = at..at + (to - from) as u64;
        match runs.last_mut() {
            Some(last) if last.end == next.start => last.end = next.end,
            _ => runs.push(next),
        }
    }
    runs
}

/// The part of `d` inside the restored `range` of the disk, if any.
fn clip(mut d: Damage, range: &Range<u64>) -> Option<Damage> {
    let start = d.offset.max(range.start);
    let end = (d.offset + d.length).min(range.end);
    (start < end).then(|| {
        (d.offset, d.length) = (start, end - start);
        d
    })
}
