//! The io_uring reader: up to `queue_depth` reads in flight from one thread.
//!
//! Ownership model (as in cloud-hypervisor's io_uring block engine): while the kernel may
//! write into a buffer, the [`PooledBuf`] is owned by the in-flight table, at the slot whose
//! index is the SQE's `user_data`. Only reaping that slot's completion gives the buffer back
//! (to be delivered, resubmitted for the rest of a short read, or dropped). The table's
//! `Drop` reaps everything still in flight — on errors, early returns and panics in
//! `deliver` alike — and if the ring itself fails so that completions can no longer be
//! reaped, it leaks those buffers rather than free memory the kernel might still write.

use super::MAX_OP;
use super::{ended_early, plan, read_failed, BufferPool, PooledBuf, ReadRequest, ReadStats};
use crate::error::{Error, Result};
use crate::source::Source;
use io_uring::{opcode, types, IoUring, Probe};
use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// Upper bound on reads in flight; more buys nothing and costs ring memory.
const MAX_DEPTH: usize = 4096;

/// Check that io_uring works here and supports `IORING_OP_READ` (Linux 5.6+).
pub(super) fn probe() -> io::Result<()> {
    let ring = IoUring::new(8)?;
    let mut probe = Probe::new();
    ring.submitter().register_probe(&mut probe)?;
    if !probe.is_supported(opcode::Read::CODE) {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "io_uring lacks IORING_OP_READ (needs Linux 5.6)",
        ));
    }
    Ok(())
}

/// Submit what is queued and wait for at least one completion. Interrupted, or the kernel
/// short of memory or with completions to hand back first, it returns as if one came:
/// reaping then makes progress, and the caller waits again.
pub(super) fn submit_and_wait(ring: &mut IoUring) -> io::Result<()> {
    match ring.submit_and_wait(1) {
        Ok(_) => Ok(()),
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
            ) =>
        {
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// A ring sized for a queue depth, used for one [`super::read_all`] call.
pub(super) struct UringReader {
    ring: IoUring,
    depth: usize,
}

impl UringReader {
    /// Set up a ring for `queue_depth` reads in flight (clamped to 1..=4096).
    pub(super) fn new(queue_depth: usize) -> io::Result<Self> {
        let depth = queue_depth.clamp(1, MAX_DEPTH);
        // Depth is at most 4096, so this always fits; the completion queue gets twice as many
        // entries by default, so it cannot overflow with at most `depth` reads in flight.
        let entries = u32::try_from(depth.next_power_of_two()).unwrap_or(MAX_DEPTH as u32);
        Ok(UringReader {
            ring: IoUring::new(entries)?,
            depth,
        })
    }

    /// The io_uring implementation of [`super::read_all`].
    pub(super) fn read_all(
        &mut self,
        source: &dyn Source,
        fd: BorrowedFd<'_>,
        mut requests: impl Iterator<Item = ReadRequest>,
        pool: &BufferPool,
        mut deliver: impl FnMut(u64, PooledBuf) -> Result<()>,
    ) -> Result<ReadStats> {
        let mut table = InFlight::new(&mut self.ring, source, fd, self.depth);
        let mut done = Outcome::default();
        // A request already planned that found no free buffer while reads were in flight.
        let mut waiting: Option<(ReadRequest, usize)> = None;
        loop {
            while done.failure.is_none() && !table.is_full() {
                let (req, read_len) = match waiting.take() {
                    Some(w) => w,
                    None => match requests.next() {
                        None => break,
                        Some(req) => match plan(source, pool, &req) {
                            Ok(read_len) => (req, read_len),
                            Err(e) => {
                                done.fail(e);
                                break;
                            }
                        },
                    },
                };
                // Block for a buffer only when nothing is in flight: otherwise the buffer we
                // would wait for may be one only we can free, by reaping.
                let buf = if table.live == 0 {
                    pool.get()
                } else if let Some(buf) = pool.try_get() {
                    buf
                } else {
                    waiting = Some((req, read_len));
                    break;
                };
                if req.len == 0 {
                    done.deliver(req, buf, &mut deliver);
                    continue;
                }
                let op = Op {
                    req,
                    read_len,
                    done: 0,
                    buf,
                };
                if let Err(e) = table.start(op) {
                    done.fail(queue_failed(source, &req, e));
                }
            }
            if table.live == 0 {
                // Requests exhausted, or failed with nothing left to reap.
                break;
            }
            if let Err(e) = table.wait() {
                done.fail(Error::io(
                    format!("waiting for io_uring reads from source {}", source.name()),
                    e,
                ));
                break; // `table`'s Drop reaps what it can and leaks the rest.
            }
            // Pop before handling: if `deliver` panics, `Drop` must not wait for this one.
            while let Some((slot, res)) = table.reaped.pop_front() {
                table.complete(slot, res, &mut done, &mut deliver);
            }
        }
        drop(table);
        match done.failure {
            Some(e) => Err(e),
            None => Ok(done.stats),
        }
    }
}

/// What has been delivered so far, and the first failure (after which nothing is delivered
/// or submitted, and in-flight reads are only reaped).
#[derive(Default)]
struct Outcome {
    stats: ReadStats,
    failure: Option<Error>,
}

impl Outcome {
    fn fail(&mut self, e: Error) {
        self.failure.get_or_insert(e);
    }

    fn deliver(
        &mut self,
        req: ReadRequest,
        buf: PooledBuf,
        deliver: &mut impl FnMut(u64, PooledBuf) -> Result<()>,
    ) {
        if self.failure.is_some() {
            return;
        }
        match deliver(req.tag, buf) {
            Ok(()) => {
                self.stats.requests += 1;
                self.stats.bytes += req.len as u64;
            }
            Err(e) => self.failure = Some(e),
        }
    }
}

fn queue_failed(source: &dyn Source, req: &ReadRequest, e: io::Error) -> Error {
    Error::io(
        format!(
            "queueing io_uring read of {} bytes at offset {} from source {}",
            req.len,
            req.offset,
            source.name()
        ),
        e,
    )
}

/// One request being read: owns its buffer until its completion is reaped.
struct Op {
    req: ReadRequest,
    /// Bytes asked of the kernel: `req.len`, or rounded up for an O_DIRECT tail.
    read_len: usize,
    /// Bytes already read into `buf`.
    done: usize,
    buf: PooledBuf,
}

/// The in-flight table: slot `i` holds the op whose SQE has `user_data == i`.
///
/// Completions taken off the ring wait in `reaped` until handled, so that `Drop` knows
/// which ops the kernel is already done with even if handling was cut short by a panic.
struct InFlight<'a> {
    ring: &'a mut IoUring,
    source: &'a dyn Source,
    fd: types::Fd,
    ops: Vec<Option<Op>>,
    free: Vec<usize>,
    live: usize,
    reaped: VecDeque<(usize, i32)>,
}

impl<'a> InFlight<'a> {
    fn new(
        ring: &'a mut IoUring,
        source: &'a dyn Source,
        fd: BorrowedFd<'a>,
        depth: usize,
    ) -> Self {
        InFlight {
            ring,
            source,
            fd: types::Fd(fd.as_raw_fd()),
            ops: (0..depth).map(|_| None).collect(),
            free: (0..depth).rev().collect(),
            live: 0,
            reaped: VecDeque::with_capacity(depth),
        }
    }

    fn is_full(&self) -> bool {
        self.free.is_empty()
    }

    /// Put `op` in a free slot and queue its read.
    fn start(&mut self, op: Op) -> io::Result<()> {
        let Some(slot) = self.free.pop() else {
            return Err(io::Error::other("no free io_uring slot"));
        };
        self.ops[slot] = Some(op);
        self.live += 1;
        self.queue(slot)
    }

    /// Queue the read of the rest of slot `slot`'s request. If it cannot be queued, the op
    /// is dropped (safe: the kernel never saw it).
    fn queue(&mut self, slot: usize) -> io::Result<()> {
        let Some(op) = self.ops.get_mut(slot).and_then(Option::as_mut) else {
            return Ok(());
        };
        let len = (op.read_len - op.done).min(MAX_OP);
        // SAFETY: `done < read_len <= buf.capacity()` (`plan` checked the capacity, and an op
        // is only queued while unfinished), so the offset stays inside the allocation.
        let ptr = unsafe { op.buf.as_mut_ptr().add(op.done) };
        let entry = opcode::Read::new(self.fd, ptr, len as u32)
            .offset(op.req.offset + op.done as u64)
            .build()
            .user_data(slot as u64);
        for _ in 0..2 {
            // SAFETY: the SQE points at `len` bytes inside the heap allocation of `op.buf`,
            // which does not move when the `PooledBuf` moves and stays owned by
            // `self.ops[slot]` until this SQE's completion is reaped (`complete`, or `Drop`,
            // which leaks it if reaping becomes impossible). The fd belongs to `self.source`,
            // borrowed for as long as this table lives.
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                return Ok(());
            }
            // The submission queue is full of unsubmitted entries: hand them to the kernel.
            if let Err(e) = self.ring.submit() {
                drop(self.take(slot));
                return Err(e);
            }
        }
        drop(self.take(slot));
        Err(io::Error::other("io_uring submission queue stays full"))
    }

    /// Remove slot `slot`'s op; only once its read is completed or was never queued.
    fn take(&mut self, slot: usize) -> Option<Op> {
        let op = self.ops.get_mut(slot)?.take()?;
        self.live -= 1;
        self.free.push(slot);
        Some(op)
    }

    /// Submit queued reads, wait for at least one completion, move all available ones to
    /// `reaped`.
    fn wait(&mut self) -> io::Result<()> {
        submit_and_wait(self.ring)?;
        self.reaped.extend(self.ring.completion().map(|c| {
            let slot = usize::try_from(c.user_data()).unwrap_or(usize::MAX);
            (slot, c.result())
        }));
        Ok(())
    }

    /// Handle the completion of slot `slot` with kernel result `res`.
    fn complete(
        &mut self,
        slot: usize,
        res: i32,
        out: &mut Outcome,
        deliver: &mut impl FnMut(u64, PooledBuf) -> Result<()>,
    ) {
        let source = self.source;
        let Some(op) = self.ops.get_mut(slot).and_then(Option::as_mut) else {
            return; // not ours; cannot happen with this ring
        };
        let retry = matches!(-res, libc::EINTR | libc::EAGAIN);
        if res > 0 {
            op.done += res as usize;
        }
        let unfinished = op.done < op.req.len;
        if out.failure.is_none() && unfinished && (res > 0 || retry) {
            let req = op.req;
            if let Err(e) = self.queue(slot) {
                out.fail(queue_failed(source, &req, e));
            }
            return;
        }
        let Some(mut op) = self.take(slot) else {
            return;
        };
        if res < 0 && !retry {
            out.fail(read_failed(source, &op.req, op.done, -res));
        } else if res == 0 && unfinished {
            out.fail(ended_early(source, &op.req, op.done));
        } else if !unfinished {
            op.buf.set_len(op.req.len);
            out.deliver(op.req, op.buf, deliver);
        }
        // Otherwise: unfinished after a failure elsewhere; the buffer is simply returned.
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let mut idle_rounds = 0;
        loop {
            while let Some((slot, _)) = self.reaped.pop_front() {
                drop(self.take(slot));
            }
            if self.live == 0 {
                return;
            }
            let mut res = self.wait();
            if res.is_ok() && self.reaped.is_empty() {
                // Retryable interruptions only; give up rather than spin forever.
                idle_rounds += 1;
                if idle_rounds > 1000 {
                    res = Err(io::Error::other("no completions after 1000 waits"));
                }
            }
            if let Err(e) = res {
                tracing::error!(error = %e, in_flight = self.live, source = self.source.name(),
                    "cannot reap io_uring reads; leaking their buffers");
                for op in self.ops.iter_mut().filter_map(Option::take) {
                    op.buf.leak();
                }
                self.live = 0;
                return;
            }
        }
    }
}
