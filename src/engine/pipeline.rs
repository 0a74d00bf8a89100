//! Running the pipeline threads of one backup: the reader on this thread, workers on a rayon
//! pool, the writer on its own thread, joined by bounded channels (see the module above).

use std::sync::atomic::{AtomicBool, Ordering};

use super::worker::{Outcome, WorkerContext};
use super::writer::Writer;
use super::{BackupOptions, Progress, BUFFER_BUDGET};
use crate::error::{Error, ErrorKind, Result};
use crate::io::{self, BufferPool, ReadRequest, ReaderKind};
use crate::source::{Access, Source};
use crate::vault::manifest::Stats;

/// Read `requests` from `source`, process each slot on the worker pool and feed the outcomes
/// to `writer`. Returns the writer (to be finished) and the figures of the slots processed.
pub fn run<'a>(
    source: &dyn Source,
    requests: Vec<ReadRequest>,
    ctx: &WorkerContext<'_>,
    mut writer: Writer<'a>,
    opts: &BackupOptions,
    progress: &dyn Progress,
) -> Result<(Writer<'a>, Stats, ReaderKind)> {
    let slot_size = requests.iter().map(|r| r.len).max().unwrap_or(4096);
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

    let (tx, rx) = crossbeam_channel::bounded::<Result<(u64, usize, Outcome)>>(nbuf);
    let abort = AtomicBool::new(false);
    let (read_result, write_result) = std::thread::scope(|ts| {
        let writer_thread = ts.spawn(|| -> Result<(Writer, Stats)> {
            let mut local = Stats::default();
            let mut failed: Option<Error> = None;
            for msg in rx.iter() {
                if failed.is_some() {
                    continue; // keep draining so no worker blocks on a full channel
                }
                let applied = msg.and_then(|(slot, len, outcome)| {
                    local.bytes_read += len as u64;
                    progress.advance(len as u64);
                    match outcome {
                        Outcome::Zero => {
                            local.slots_zero += 1;
                            writer.zero(slot);
                            Ok(())
                        }
                        Outcome::Known(id) => {
                            local.slots_reused += 1;
                            writer.known(slot, &id)
                        }
                        Outcome::New { id, frame } => {
                            local.slots_new += 1;
                            let r = writer.new_extent(slot, id, len as u32, &frame);
                            ctx.buffers.give(frame);
                            r
                        }
                        Outcome::Overlaid(o) => {
                            tracing::debug!(slot, pieces = o.new.len(), "slot stored as overlays");
                            // No new piece: the parent's overlaid slot, unchanged.
                            if o.new.is_empty() {
                                local.slots_reused += 1;
                            } else {
                                local.slots_new += 1;
                            }
                            writer.overlaid(slot, o, &|frame| ctx.buffers.give(frame))
                        }
                    }
                });
                if let Err(e) = applied {
                    abort.store(true, Ordering::Relaxed);
                    failed = Some(e);
                }
            }
            match failed {
                Some(e) => Err(e),
                None => Ok((writer, local)),
            }
        });
        let read_result = pool.in_place_scope(|scope| {
            io::read_all(
                source,
                requests.into_iter(),
                &buffers,
                reader,
                opts.queue_depth,
                |slot, buf| {
                    if abort.load(Ordering::Relaxed) {
                        return Err(Error::new(
                            ErrorKind::Io,
                            "backup stopped after a write error",
                        ));
                    }
                    let tx = tx.clone();
                    scope.spawn(move |_| {
                        let len = buf.len();
                        let r = ctx.process(slot, &buf).map(|o| (slot, len, o));
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
        (Ok(_), Ok((w, stats))) => Ok((w, stats, reader)),
    }
}
