//! The io_uring writer: positional writes from pooled buffers, up to `depth` in flight,
//! issued by one thread on behalf of many producers (restore's decode threads).
//!
//! Why a thread of its own: a decode thread that writes with `pwrite` waits for the disk
//! after every slot. Here it hands the buffer over and goes on decoding while the ring keeps
//! several O_DIRECT writes in flight: the engine the backup reads with ([`super::uring`]),
//! turned around.
//!
//! Ownership (as in the reader): from [`WriteRing::submit`] on, a buffer belongs to the ring
//! thread, and only the completion of its last piece returns it to its pool. If the ring
//! itself fails so that completions can no longer be reaped, the buffers in flight are
//! leaked rather than freed while the kernel may still read them, and the pool may allocate
//! replacements ([`PooledBuf::leak`]), so no producer waits forever for one.
//!
//! Wake-up: the ring thread sleeps in `io_uring_enter` until a completion arrives. A
//! producer wakes it through an eventfd whose poll is armed in the same ring, so one wait
//! covers both new work and finished writes.
//!
//! Failure: the first failed write is kept, as its message and errno, so that every caller
//! gets the same error. Pieces not yet started are dropped; later submits and the drain
//! return that error.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender, TryRecvError};
use io_uring::{opcode, types, IoUring, Probe};
use nix::sys::eventfd::{EfdFlags, EventFd};

use super::{PooledBuf, MAX_OP};
use crate::error::{Error, ErrorKind, Result};
use crate::util::lock;

/// `user_data` of the eventfd poll; write ops use their slot index.
const WAKE: u64 = u64::MAX;

/// One write: `len` bytes from byte `at` of the buffer, to `offset` of the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    /// Where the bytes start in the buffer.
    pub at: usize,
    /// How many.
    pub len: usize,
    /// Where they go in the file.
    pub offset: u64,
}

/// Writes to one file through io_uring from a thread of its own (see the module doc).
pub struct WriteRing {
    tx: Sender<Msg>,
    wake: Arc<EventFd>,
    failure: Arc<Failure>,
    thread: Mutex<Option<JoinHandle<()>>>,
    name: String,
}

enum Msg {
    Write(PooledBuf, Vec<Piece>),
    /// Answered once every write sent before it has completed.
    Drain(Sender<()>),
}

impl WriteRing {
    /// A ring writing to `file` (named `name` in messages) with up to `depth` writes in
    /// flight. Fails where io_uring, `IORING_OP_WRITE` (Linux 5.6) or `IORING_OP_POLL_ADD`
    /// are unavailable, or a thread cannot be started: the caller writes with `pwrite`.
    pub fn new(file: File, depth: usize, name: &str) -> io::Result<WriteRing> {
        let depth = depth.clamp(1, 1024);
        // Room for `depth` writes and the poll, so the submission queue never overflows; the
        // completion queue is twice that by default.
        let entries = u32::try_from((depth + 1).next_power_of_two()).unwrap_or(2048);
        let ring = IoUring::new(entries)?;
        let mut probe = Probe::new();
        ring.submitter().register_probe(&mut probe)?;
        if !probe.is_supported(opcode::Write::CODE) || !probe.is_supported(opcode::PollAdd::CODE) {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "io_uring lacks IORING_OP_WRITE or IORING_OP_POLL_ADD (needs Linux 5.6)",
            ));
        }
        let wake = Arc::new(EventFd::from_flags(
            EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK,
        )?);
        let failure = Arc::new(Failure::default());
        let (tx, rx) = crossbeam_channel::unbounded();
        let worker = Worker {
            ring,
            file,
            wake: wake.clone(),
            rx,
            failure: failure.clone(),
            name: name.to_owned(),
            jobs: Vec::new(),
            free_jobs: Vec::new(),
            ops: (0..depth).map(|_| None).collect(),
            free_ops: (0..depth).rev().collect(),
            pending: VecDeque::new(),
            drains: Vec::new(),
        };
        let thread = std::thread::Builder::new()
            .name("bv-write-ring".into())
            .spawn(move || worker.run())?;
        Ok(WriteRing {
            tx,
            wake,
            failure,
            thread: Mutex::new(Some(thread)),
            name: name.to_owned(),
        })
    }

    /// Write `pieces` of `buf`, which the ring keeps until they are written. Returns before
    /// they are: [`drain`](Self::drain) waits for them. Errors: an earlier write failed (that
    /// error), a piece lies outside the buffer, or the ring has stopped.
    pub fn submit(&self, buf: PooledBuf, pieces: Vec<Piece>) -> Result<()> {
        if let Some(e) = self.failure.error() {
            return Err(e);
        }
        if let Some(p) = pieces
            .iter()
            .find(|p| p.at.checked_add(p.len).is_none_or(|end| end > buf.len()))
        {
            return Err(Error::usage(format!(
                "a write of {} bytes from byte {} of a {}-byte buffer to {} lies outside the buffer",
                p.len,
                p.at,
                buf.len(),
                self.name
            )));
        }
        if pieces.is_empty() {
            return Ok(());
        }
        self.tx
            .send(Msg::Write(buf, pieces))
            .map_err(|_| self.stopped())?;
        self.wake();
        Ok(())
    }

    /// Wait until every write submitted so far has completed; the first failure, if any.
    pub fn drain(&self) -> Result<()> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        if self.tx.send(Msg::Drain(tx)).is_ok() {
            self.wake();
            // An answer, or the thread ended (its sender dropped): either way nothing of
            // ours is in flight any more.
            let _ = rx.recv();
        }
        match self.failure.error() {
            Some(e) => Err(e),
            None if self.running() => Ok(()),
            None => Err(self.stopped()),
        }
    }

    /// Stop the ring: writes not yet started are dropped, those in flight completed (or
    /// leaked if the ring failed), and the thread joined. Idempotent.
    pub fn stop(&self) {
        let Some(thread) = lock(&self.thread).take() else {
            return;
        };
        self.failure.set(
            format!("writes to {} were stopped", self.name),
            libc::ECANCELED,
        );
        self.wake();
        if thread.join().is_err() {
            tracing::error!(target = %self.name, "the io_uring write thread panicked");
        }
    }

    fn running(&self) -> bool {
        lock(&self.thread)
            .as_ref()
            .is_some_and(|t| !t.is_finished())
    }

    fn wake(&self) {
        // Fails only when the counter would overflow, and then the thread is awake anyway.
        let _ = self.wake.write(1);
    }

    fn stopped(&self) -> Error {
        self.failure.error().unwrap_or_else(|| {
            Error::new(
                ErrorKind::Io,
                format!("the io_uring writer of {} has stopped", self.name),
            )
        })
    }
}

impl Drop for WriteRing {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The first failure: its message and errno, rebuilt into an [`Error`] for each caller.
#[derive(Default)]
struct Failure(Mutex<Option<(String, i32)>>);

impl Failure {
    /// Keep the first failure only.
    fn set(&self, context: String, errno: i32) {
        lock(&self.0).get_or_insert((context, errno));
    }

    fn is_set(&self) -> bool {
        lock(&self.0).is_some()
    }

    fn error(&self) -> Option<Error> {
        lock(&self.0)
            .as_ref()
            .map(|(c, errno)| Error::io(c.clone(), io::Error::from_raw_os_error(*errno)))
    }
}

/// A submitted buffer and how many of its pieces are not yet written.
struct Job {
    buf: PooledBuf,
    left: usize,
}

/// One piece in flight: owns nothing, its job owns the buffer.
struct Op {
    job: usize,
    piece: Piece,
    done: usize,
}

/// The ring thread's state.
struct Worker {
    ring: IoUring,
    /// Kept open for as long as writes to it may be in flight.
    file: File,
    wake: Arc<EventFd>,
    rx: Receiver<Msg>,
    failure: Arc<Failure>,
    name: String,
    jobs: Vec<Option<Job>>,
    free_jobs: Vec<usize>,
    /// Slot `i` is the op whose SQE has `user_data == i`.
    ops: Vec<Option<Op>>,
    free_ops: Vec<usize>,
    /// Pieces waiting for a free op slot.
    pending: VecDeque<(usize, Piece)>,
    drains: Vec<Sender<()>>,
}

impl Worker {
    fn run(mut self) {
        if let Err(e) = self.arm_wake() {
            self.fail_ring("arming the io_uring writer's wake-up", e);
            return;
        }
        loop {
            let disconnected = self.take_messages();
            let stopping = disconnected || self.failure.is_set();
            if stopping {
                self.drop_pending();
            }
            self.start_pending();
            let live = self.ops.len() - self.free_ops.len();
            if live == 0 && self.pending.is_empty() {
                for d in self.drains.drain(..) {
                    let _ = d.send(());
                }
                if stopping {
                    return;
                }
            }
            if let Err(e) = self.wait() {
                self.fail_ring("waiting for io_uring writes", e);
                return;
            }
        }
    }

    /// Take every message waiting; whether the producers are all gone.
    fn take_messages(&mut self) -> bool {
        loop {
            match self.rx.try_recv() {
                Ok(Msg::Write(buf, pieces)) => {
                    if self.failure.is_set() {
                        continue; // dropped: the buffer goes back to its pool
                    }
                    let job = Job {
                        buf,
                        left: pieces.len(),
                    };
                    let id = match self.free_jobs.pop() {
                        Some(id) => {
                            self.jobs[id] = Some(job);
                            id
                        }
                        None => {
                            self.jobs.push(Some(job));
                            self.jobs.len() - 1
                        }
                    };
                    self.pending.extend(pieces.into_iter().map(|p| (id, p)));
                }
                Ok(Msg::Drain(reply)) => self.drains.push(reply),
                Err(TryRecvError::Empty) => return false,
                Err(TryRecvError::Disconnected) => return true,
            }
        }
    }

    /// After a failure or at a stop: pieces not started are not written.
    fn drop_pending(&mut self) {
        while let Some((job, _)) = self.pending.pop_front() {
            self.piece_done(job);
        }
    }

    fn start_pending(&mut self) {
        while !self.free_ops.is_empty() {
            let Some((job, piece)) = self.pending.pop_front() else {
                return;
            };
            let Some(slot) = self.free_ops.pop() else {
                return;
            };
            self.ops[slot] = Some(Op {
                job,
                piece,
                done: 0,
            });
            if let Err(e) = self.queue(slot) {
                self.failure.set(
                    self.what(&piece, "queueing"),
                    e.raw_os_error().unwrap_or(libc::EIO),
                );
                self.finish_op(slot);
            }
        }
    }

    /// Queue the write of the rest of slot `slot`'s piece.
    fn queue(&mut self, slot: usize) -> io::Result<()> {
        // A live op always has its job (the job counts the op's piece as not yet written);
        // were one missing, the error has the caller free the slot rather than wait for it.
        let Some((op, job)) = self.ops.get(slot).and_then(Option::as_ref).and_then(|op| {
            let job = self.jobs.get(op.job).and_then(Option::as_ref)?;
            Some((op, job))
        }) else {
            return Err(io::Error::other("an io_uring write slot lost its buffer"));
        };
        let len = (op.piece.len - op.done).min(MAX_OP);
        // SAFETY: `submit` checked `at + len <= buf.len()` and `done < len`, so the pointer
        // stays inside the buffer.
        let ptr = unsafe { job.buf.as_ptr().add(op.piece.at + op.done) };
        let entry = opcode::Write::new(types::Fd(self.file.as_raw_fd()), ptr, len as u32)
            .offset(op.piece.offset + op.done as u64)
            .build()
            .user_data(slot as u64);
        // SAFETY: the SQE points at `len` bytes of the heap allocation of `job.buf`, which
        // does not move and stays owned by `self.jobs` until the completion of this op (its
        // job's last piece) is reaped, or is leaked by `fail_ring`; `self.file` is the fd's
        // owner and lives as long as the ring.
        self.push(&entry)
    }

    fn arm_wake(&mut self) -> io::Result<()> {
        let entry = opcode::PollAdd::new(types::Fd(self.wake.as_raw_fd()), libc::POLLIN as u32)
            .build()
            .user_data(WAKE);
        // SAFETY: a poll references no user memory; the eventfd lives as long as the ring.
        self.push(&entry)
    }

    /// Push `entry`, handing queued entries to the kernel first if the queue is full.
    ///
    /// # Safety (for callers)
    /// Whatever `entry` points at must stay valid until its completion is reaped.
    fn push(&mut self, entry: &io_uring::squeue::Entry) -> io::Result<()> {
        for _ in 0..2 {
            // SAFETY: see the callers.
            if unsafe { self.ring.submission().push(entry) }.is_ok() {
                return Ok(());
            }
            self.ring.submit()?;
        }
        Err(io::Error::other("io_uring submission queue stays full"))
    }

    /// Submit what is queued, wait for a completion or a wake-up, and handle all that came.
    fn wait(&mut self) -> io::Result<()> {
        super::uring::submit_and_wait(&mut self.ring)?;
        let done: Vec<(u64, i32)> = self
            .ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        for (data, res) in done {
            if data == WAKE {
                let _ = self.wake.read(); // EAGAIN if already reset: fine
                self.arm_wake()?;
            } else if let Ok(slot) = usize::try_from(data) {
                self.complete(slot, res);
            }
        }
        Ok(())
    }

    /// The write of slot `slot` completed with kernel result `res`.
    fn complete(&mut self, slot: usize, res: i32) {
        let Some(op) = self.ops.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        let retry = matches!(-res, libc::EINTR | libc::EAGAIN);
        if res > 0 {
            op.done += res as usize;
        }
        let piece = op.piece;
        let unfinished = op.done < piece.len;
        if !self.failure.is_set() && unfinished && (res > 0 || retry) {
            if let Err(e) = self.queue(slot) {
                self.failure.set(
                    self.what(&piece, "queueing"),
                    e.raw_os_error().unwrap_or(libc::EIO),
                );
                self.finish_op(slot);
            }
            return;
        }
        if res < 0 && !retry {
            self.failure.set(self.what(&piece, "writing"), -res);
        } else if res == 0 && unfinished {
            self.failure.set(
                format!("{} (no bytes accepted)", self.what(&piece, "writing")),
                libc::EIO,
            );
        }
        self.finish_op(slot);
    }

    fn what(&self, piece: &Piece, doing: &str) -> String {
        format!(
            "{doing} {} bytes at offset {} of {}",
            piece.len, piece.offset, self.name
        )
    }

    /// Free slot `slot` (its write completed or was never queued) and count its piece done.
    fn finish_op(&mut self, slot: usize) {
        if let Some(op) = self.ops.get_mut(slot).and_then(Option::take) {
            self.free_ops.push(slot);
            self.piece_done(op.job);
        }
    }

    /// One piece of job `job` needs its buffer no more; the last returns it to its pool.
    fn piece_done(&mut self, job: usize) {
        let Some(j) = self.jobs.get_mut(job).and_then(Option::as_mut) else {
            return;
        };
        j.left -= 1;
        if j.left == 0 {
            self.jobs[job] = None;
            self.free_jobs.push(job);
        }
    }

    /// The ring cannot be waited on any more: record why, and leak the buffers of writes in
    /// flight (the kernel may still read them) rather than return them to their pool.
    fn fail_ring(&mut self, doing: &str, e: io::Error) {
        tracing::error!(target = %self.name, error = %e, "{doing}; leaking the buffers in flight");
        self.failure.set(
            format!("{doing} to {}", self.name),
            e.raw_os_error().unwrap_or(libc::EIO),
        );
        let in_flight: Vec<usize> = self.ops.iter().flatten().map(|op| op.job).collect();
        for job in in_flight {
            if let Some(j) = self.jobs.get_mut(job).and_then(Option::take) {
                j.buf.leak();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::tests::uring_ok;
    use crate::io::BufferPool;
    use crate::ErrorKind;
    use std::os::unix::fs::FileExt;

    const CHUNK: usize = 64 << 10;

    fn ring_on(f: &tempfile::NamedTempFile, depth: usize, read_only: bool) -> WriteRing {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(f.path())
            .expect("open");
        WriteRing::new(file, depth, "test-target").expect("ring")
    }

    fn byte(i: usize) -> u8 {
        (i * 7 + i / 4099) as u8
    }

    #[test]
    fn pieces_from_many_threads_land_where_they_belong_and_buffers_come_back() {
        if !uring_ok("pieces_from_many_threads_land_where_they_belong") {
            return;
        }
        let size = 8 << 20;
        let want: Vec<u8> = (0..size).map(byte).collect();
        let f = tempfile::NamedTempFile::new().expect("temp");
        f.as_file().set_len(size as u64).expect("size");
        let ring = ring_on(&f, 3, false);
        let pool = BufferPool::new(5, 2 * CHUNK, 4096);
        std::thread::scope(|s| {
            for t in 0..4 {
                let (ring, pool, want) = (&ring, &pool, &want);
                s.spawn(move || {
                    // Each buffer carries two chunks of the file, the later one first, so
                    // pieces land out of order and from one buffer in two places.
                    for c in (t..size / CHUNK).step_by(8) {
                        let (a, b) = (c * CHUNK, (c + 4) * CHUNK);
                        let mut buf = pool.get();
                        buf.set_len(2 * CHUNK);
                        buf[..CHUNK].copy_from_slice(&want[b..b + CHUNK]);
                        buf[CHUNK..].copy_from_slice(&want[a..a + CHUNK]);
                        let pieces = vec![
                            Piece {
                                at: 0,
                                len: CHUNK,
                                offset: b as u64,
                            },
                            Piece {
                                at: CHUNK,
                                len: CHUNK,
                                offset: a as u64,
                            },
                        ];
                        ring.submit(buf, pieces).expect("submit");
                    }
                });
            }
        });
        ring.drain().expect("drain");
        assert_eq!(pool.lent(), 0, "every buffer back after the drain");
        let mut got = vec![0; size];
        f.as_file().read_exact_at(&mut got, 0).expect("read back");
        assert!(got == want, "the file holds every piece at its offset");
    }

    #[test]
    fn a_failed_write_is_every_callers_error_and_its_buffer_comes_back() {
        if !uring_ok("a_failed_write_is_every_callers_error") {
            return;
        }
        let f = tempfile::NamedTempFile::new().expect("temp");
        let ring = ring_on(&f, 2, true); // read-only: writes fail with EBADF
        let pool = BufferPool::new(3, CHUNK, 4096);
        let mut buf = pool.get();
        buf.set_len(CHUNK);
        let piece = Piece {
            at: 4096,
            len: 8192,
            offset: 1 << 20,
        };
        ring.submit(buf, vec![piece]).expect("queued");
        let err = ring.drain().expect_err("the write fails");
        assert_eq!(err.kind(), ErrorKind::Io);
        let text = format!("{err:#}");
        assert!(
            text.contains("writing 8192 bytes at offset 1048576 of test-target"),
            "{text}"
        );
        assert_eq!(pool.lent(), 0);
        // Later submits get the same error and their buffers back at once.
        let mut buf = pool.get();
        buf.set_len(CHUNK);
        let again = ring.submit(buf, vec![piece]).expect_err("failed before");
        assert_eq!(format!("{again:#}"), text);
        assert_eq!(pool.lent(), 0);
    }

    #[test]
    fn pieces_outside_the_buffer_are_refused() {
        if !uring_ok("pieces_outside_the_buffer_are_refused") {
            return;
        }
        let f = tempfile::NamedTempFile::new().expect("temp");
        let ring = ring_on(&f, 2, false);
        let pool = BufferPool::new(1, CHUNK, 4096);
        for piece in [
            Piece {
                at: 0,
                len: CHUNK + 1,
                offset: 0,
            },
            Piece {
                at: usize::MAX,
                len: 2,
                offset: 0,
            },
        ] {
            let mut buf = pool.get();
            buf.set_len(CHUNK);
            let err = ring.submit(buf, vec![piece]).expect_err("outside");
            assert_eq!(err.kind(), ErrorKind::Usage);
            assert!(err.to_string().contains("lies outside the buffer"), "{err}");
        }
        assert_eq!(pool.lent(), 0);
        ring.drain().expect("nothing was written, nothing failed");
    }

    #[test]
    fn stop_drops_queued_writes_returns_every_buffer_and_refuses_more() {
        if !uring_ok("stop_drops_queued_writes") {
            return;
        }
        let f = tempfile::NamedTempFile::new().expect("temp");
        let ring = ring_on(&f, 1, false);
        let pool = BufferPool::new(64, CHUNK, 4096);
        for i in 0..64 {
            let mut buf = pool.get();
            buf.set_len(CHUNK);
            let piece = Piece {
                at: 0,
                len: CHUNK,
                offset: (i * CHUNK) as u64,
            };
            ring.submit(buf, vec![piece]).expect("submit");
        }
        ring.stop();
        assert_eq!(pool.lent(), 0, "queued and written buffers all returned");
        let mut buf = pool.get();
        buf.set_len(CHUNK);
        let err = ring
            .submit(
                buf,
                vec![Piece {
                    at: 0,
                    len: CHUNK,
                    offset: 0,
                }],
            )
            .expect_err("stopped");
        assert!(err.to_string().contains("were stopped"), "{err}");
        assert!(ring.drain().is_err());
        ring.stop(); // idempotent
    }
}
