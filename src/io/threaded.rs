//! The reader for translated sources (qcow2, NBD): `queue_depth` threads each take the next
//! request, fill a pooled buffer through [`ReadAt::read_at`] and pass it back to the calling
//! thread, which delivers it. The source keeps several reads in flight by being called from
//! several threads (an NBD client pipelines them on its connection; qcow2 reads are preads).
//!
//! Same contract as [`super::read_all`]: bounded by the pool, delivery on the calling thread,
//! the first error stops every thread and is returned.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use super::{plan, BufferPool, PooledBuf, ReadRequest, ReadStats};
use crate::error::{Error, Result};
use crate::source::{ReadAt, Source};

/// Read every request through `reader` on `queue_depth` threads (at least one).
pub(super) fn read_all(
    source: &dyn Source,
    reader: &dyn ReadAt,
    requests: impl Iterator<Item = ReadRequest> + Send,
    pool: &BufferPool,
    queue_depth: usize,
    mut deliver: impl FnMut(u64, PooledBuf) -> Result<()>,
) -> Result<ReadStats> {
    let requests = Mutex::new(requests);
    let stop = AtomicBool::new(false);
    let threads = queue_depth.max(1);
    // Each thread holds at most one buffer in the channel: the pool stays the bound.
    let (tx, rx) = crossbeam_channel::bounded::<Result<(u64, PooledBuf)>>(threads);
    std::thread::scope(|scope| {
        for i in 0..threads {
            let thread_tx = tx.clone();
            let (requests, stop) = (&requests, &stop);
            let spawned = std::thread::Builder::new()
                .name(format!("bv-read-{i}"))
                .spawn_scoped(scope, move || {
                    while !stop.load(Ordering::Relaxed) {
                        let Some(req) = requests.lock().ok().and_then(|mut it| it.next()) else {
                            return;
                        };
                        let r = read_one(source, reader, pool, &req).map(|buf| (req.tag, buf));
                        let failed = r.is_err();
                        if thread_tx.send(r).is_err() || failed {
                            return;
                        }
                    }
                });
            if let Err(e) = spawned {
                stop.store(true, Ordering::Relaxed);
                let _ = tx.send(Err(Error::io("starting a reader thread", e)));
                break;
            }
        }
        drop(tx);
        let mut stats = ReadStats::default();
        let mut first_error = None;
        for msg in rx.iter() {
            if first_error.is_some() {
                continue; // drain, so no thread blocks on a full channel
            }
            let delivered = msg.and_then(|(tag, buf)| {
                let len = buf.len() as u64;
                deliver(tag, buf)?;
                stats.requests += 1;
                stats.bytes += len;
                Ok(())
            });
            if let Err(e) = delivered {
                stop.store(true, Ordering::Relaxed);
                first_error = Some(e);
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(stats),
        }
    })
}

/// One request into one pooled buffer.
fn read_one(
    source: &dyn Source,
    reader: &dyn ReadAt,
    pool: &BufferPool,
    req: &ReadRequest,
) -> Result<PooledBuf> {
    plan(source, pool, req)?;
    let mut buf = pool.get();
    buf.set_len(req.len);
    // The contract of `read_at` has its errors name the source and offset already.
    reader.read_at(req.offset, &mut buf)?;
    Ok(buf)
}
