//! Running the pipeline threads of one backup: the reader on this thread, workers on a rayon
//! pool, the writer on its own thread, joined by bounded channels (see the module above).
//! Each checks [`crate::interrupt::check`] between units of work; after a failure the writer
//! keeps draining its channel, so a stop leaves no thread blocked.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};

use super::overlay::NewOverlay;
use super::plan::{Plan, Work};
use super::worker::{Outcome, WorkerContext};
use super::writer::Writer;
use super::{BackupOptions, Progress, BUFFER_BUDGET};
use crate::error::{Error, ErrorKind, Result};
use crate::io::{self, BufferPool, ReaderKind};
use crate::source::{Access, Source};
use crate::vault::manifest::Stats;

/// Read what `plan` names from `source`, process each read on the worker pool and feed the
/// outcomes, and the slots the plan carries over, to `writer`. Returns the writer (to be
/// finished) and the figures of the slots processed.
pub fn run<'a>(
    source: &dyn Source,
    plan: Plan,
    ctx: &WorkerContext<'_>,
    mut writer: Writer<'a>,
    opts: &BackupOptions,
    progress: &dyn Progress,
) -> Result<(Writer<'a>, Stats, ReaderKind)> {
    let mut local = Stats::default();
    let plan_carried = plan.carried.len();
    for &slot in &plan.carried {
        let parent = ctx.parent.as_ref().ok_or_else(|| {
            Error::new(
                ErrorKind::Io,
                "a slot carried over from a backup without a parent",
            )
        })?;
        apply(
            &mut writer,
            ctx,
            &mut local,
            slot,
            parent.carried(slot as usize),
        )?;
    }
    let Plan {
        work,
        reads,
        mut pieces,
        ..
    } = plan;
    let slot_size = reads.iter().map(|r| r.len).max().unwrap_or(4096);
    let threads = if opts.threads == 0 {
        std::thread::available_parallelism().map_or(2, |n| n.get())
    } else {
        opts.threads
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("bv-worker-{i}"))
        .build()
        .map_err(|e| Error::new(ErrorKind::Io, format!("starting worker threads: {e}")))?;
    let nbuf = (BUFFER_BUDGET / slot_size).clamp(2 * threads + opts.queue_depth, 128);
    let buffers = BufferPool::new(nbuf, slot_size, source.alignment().max(4096));
    let reader = match source.access() {
        Access::Translated(_) => ReaderKind::Threads,
        Access::Fd(_) => io::choose_reader(opts.force_pread),
    };

    tracing::debug!(
        reader = ?reader,
        threads,
        buffers = nbuf,
        buffer_size = slot_size,
        queue_depth = opts.queue_depth,
        reads = reads.len(),
        carried = plan_carried,
        "reader and workers start"
    );
    let (tx, rx) = crossbeam_channel::bounded::<Result<(u64, usize, Outcome)>>(nbuf);
    let abort = AtomicBool::new(false);
    let (read_result, write_result) = std::thread::scope(|ts| {
        let writer_thread = ts.spawn(|| -> Result<(Writer, Stats)> {
            // Pieces of slots read in parts, until each slot's last piece arrives.
            let mut partial: HashMap<u64, Vec<NewOverlay>> = HashMap::new();
            let mut failed: Option<Error> = None;
            for msg in rx.iter() {
                if failed.is_some() {
                    continue; // keep draining so no worker blocks on a full channel
                }
                // A stop asked for by a signal: apply nothing more, so no pack is flushed.
                let msg = crate::interrupt::check().and(msg);
                let applied = msg.and_then(|(slot, len, outcome)| {
                    local.bytes_read += len as u64;
                    progress.advance(len as u64);
                    let Outcome::Piece(piece) = outcome else {
                        return apply(&mut writer, ctx, &mut local, slot, outcome);
                    };
                    let got = partial.entry(slot).or_default();
                    got.push(piece);
                    if pieces.get(&slot).is_some_and(|&n| got.len() as u32 >= n) {
                        pieces.remove(&slot);
                        let new = partial.remove(&slot).unwrap_or_default();
                        let parent = ctx.parent.as_ref().ok_or_else(|| {
                            Error::new(ErrorKind::Io, "a slot read in pieces without a parent")
                        })?;
                        let o = Outcome::Overlaid(parent.overlay_on(slot as usize, new));
                        return apply(&mut writer, ctx, &mut local, slot, o);
                    }
                    Ok(())
                });
                if let Err(e) = applied {
                    abort.store(true, Ordering::Relaxed);
                    failed = Some(e);
                }
            }
            match failed {
                Some(e) => Err(e),
                None if !partial.is_empty() => Err(Error::new(
                    ErrorKind::Io,
                    "backup ended with slots missing some of their pieces",
                )),
                None => Ok((writer, local)),
            }
        });
        let work = &work;
        let read_result = pool.in_place_scope(|scope| {
            io::read_all(
                source,
                reads.into_iter(),
                &buffers,
                reader,
                opts.queue_depth,
                |tag, buf| {
                    crate::interrupt::check()?;
                    if abort.load(Ordering::Relaxed) {
                        return Err(Error::new(
                            ErrorKind::Io,
                            "backup stopped after a write error",
                        ));
                    }
                    let tx = tx.clone();
                    scope.spawn(move |_| {
                        let r = crate::interrupt::check()
                            .and_then(|()| process(ctx, work[tag as usize], &buf));
                        drop(buf);
                        let _ = tx.send(r);
                    });
                    Ok(())
                },
            )
        });
        drop(tx);
        let write_result = writer_thread
            .join()
            .unwrap_or_else(|_| Err(Error::new(ErrorKind::Io, "writer thread panicked")));
        (read_result, write_result)
    });
    // A write error is the cause of a reader stopped by `abort`: report it first.
    match (read_result, write_result) {
        (_, Err(e)) | (Err(e), _) => Err(e),
        (Ok(_), Ok((w, stats))) => {
            tracing::debug!(
                bytes_read = stats.bytes_read,
                slots_new = stats.slots_new,
                slots_reused = stats.slots_reused,
                slots_zero = stats.slots_zero,
                "reader and workers done"
            );
            Ok((w, stats, reader))
        }
    }
}

/// What the bytes of one read become: the outcome of a whole slot, or a piece of one.
/// Returns the slot and the bytes read with it.
fn process(ctx: &WorkerContext<'_>, work: Work, data: &[u8]) -> Result<(u64, usize, Outcome)> {
    let len = data.len();
    match work {
        Work::Slot(slot) => ctx.process(slot, data).map(|o| (slot, len, o)),
        Work::Piece { slot, offset } => {
            let start = slot * ctx.slot_size as u64 + offset as u64;
            let piece = ctx.piece(start, data)?;
            let o = NewOverlay {
                offset,
                len: len as u32,
                piece,
            };
            Ok((slot, len, Outcome::Piece(o)))
        }
    }
}

/// Record what became of slot `slot` in the writer's tables and the job's figures.
fn apply(
    writer: &mut Writer<'_>,
    ctx: &WorkerContext<'_>,
    stats: &mut Stats,
    slot: u64,
    outcome: Outcome,
) -> Result<()> {
    match outcome {
        Outcome::Zero => {
            stats.slots_zero += 1;
            writer.zero(slot);
            Ok(())
        }
        Outcome::Known(id) => {
            stats.slots_reused += 1;
            writer.known(slot, &id)
        }
        Outcome::New { id, len, frame } => {
            stats.slots_new += 1;
            let r = writer.new_extent(slot, id, len, &frame);
            ctx.buffers.give(frame);
            r
        }
        Outcome::Overlaid(o) => {
            tracing::debug!(slot, pieces = o.new.len(), "slot stored as overlays");
            // No new piece: the parent's overlaid slot, unchanged.
            if o.new.is_empty() {
                stats.slots_reused += 1;
            } else {
                stats.slots_new += 1;
            }
            writer.overlaid(slot, o, &|frame| ctx.buffers.give(frame))
        }
        Outcome::Piece(_) => Err(Error::new(
            ErrorKind::Io,
            "a slot piece reached the writer on its own",
        )),
    }
}
