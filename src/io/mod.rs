//! Reading a source by offset into pooled buffers (and, for restore, writing pooled buffers
//! out with io_uring: [`WriteRing`]).
//!
//! Model: the caller describes *what* to read as a stream of [`ReadRequest`]s (usually the
//! chunks of the source's data ranges); [`read_all`] fills one [`PooledBuf`] per request and
//! hands it to a `deliver` callback together with the request's tag. Two readers implement
//! the same contract:
//! - [`ReaderKind::Uring`] keeps up to `queue_depth` reads in flight with io_uring, which is
//!   what saturates NVMe and O_DIRECT block devices from a single thread;
//! - [`ReaderKind::Pread`] is a plain `pread` loop, for kernels or sandboxes without
//!   io_uring and as a reference implementation.
//!
//! Memory is bounded by the [`BufferPool`]: a reader waits for a free buffer before issuing
//! a read, so a consumer that drops buffers slowly slows reading down (backpressure).
//!
//! Every read is checked against the source's contract: offsets, lengths and buffer
//! addresses must honour [`Source::alignment`], and a read that hits end-of-file early means
//! the source shrank while being read ([`ErrorKind::SourceChanged`]).

pub mod buffer;
mod pread;
mod threaded;
mod uring;
mod write_ring;

pub use buffer::{AlignedBuf, BufferPool, PooledBuf};
pub use write_ring::{Piece, WriteRing};

use crate::error::{Error, ErrorKind, Result};
use crate::source::{Access, Source};
use std::sync::OnceLock;

/// Which reader [`read_all`] uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReaderKind {
    /// io_uring with many reads in flight.
    Uring,
    /// One synchronous `pread` at a time.
    Pread,
    /// A translated source's own reader (qcow2, NBD), called from `queue_depth` threads.
    Threads,
}

/// One read: `len` bytes at `offset`; `tag` is handed back with the data.
#[derive(Debug, Clone, Copy)]
pub struct ReadRequest {
    /// Opaque to the reader; identifies the request to the consumer.
    pub tag: u64,
    /// Byte offset in the source.
    pub offset: u64,
    /// Bytes to read (at most the pool's buffer capacity).
    pub len: usize,
}

/// What a [`read_all`] call delivered.
#[derive(Debug, Clone, Copy, Default)]
pub struct ReadStats {
    /// Bytes delivered (sum of delivered request lengths).
    pub bytes: u64,
    /// Requests delivered.
    pub requests: u64,
}

/// The environment variable that forces the pread reader (value `pread`).
pub const READER_ENV: &str = "BLOCKVAULT_READER";

/// The environment variable that makes restore write every byte with `pwrite`: no io_uring,
/// no zeroing of a device by the kernel (value `pwrite`).
pub const WRITER_ENV: &str = "BLOCKVAULT_WRITER";

/// Whether restore must write every byte with `pwrite` (`BLOCKVAULT_WRITER=pwrite`): no
/// [`WriteRing`], and a device's zeros not written by the kernel.
pub fn plain_writes_only() -> bool {
    env_says(WRITER_ENV, "pwrite")
}

/// Whether environment variable `name` is set to `value` (any case).
fn env_says(name: &str, value: &str) -> bool {
    std::env::var(name).is_ok_and(|v| v.eq_ignore_ascii_case(value))
}

/// Largest single kernel read or write. Linux caps a read at ~2 GiB anyway; a power of two keeps the
/// pieces of a split read aligned for O_DIRECT.
const MAX_OP: usize = 1 << 30;

/// Pick the reader: Pread if `force_pread` or env `BLOCKVAULT_READER=pread`; otherwise probe
/// io_uring once per process (a ring of 8 entries that supports `IORING_OP_READ`). If the
/// probe fails (ENOSYS, EPERM under seccomp, the `io_uring_disabled` sysctl, kernel < 5.6)
/// warn once and return Pread.
pub fn choose_reader(force_pread: bool) -> ReaderKind {
    let env_pread = env_says(READER_ENV, "pread");
    if force_pread || env_pread {
        return ReaderKind::Pread;
    }
    static PROBED: OnceLock<ReaderKind> = OnceLock::new();
    *PROBED.get_or_init(|| match uring::probe() {
        Ok(()) => ReaderKind::Uring,
        Err(e) => {
            tracing::warn!(error = %e, "io_uring unavailable, using pread reader");
            ReaderKind::Pread
        }
    })
}

/// Read every request from `source` into buffers taken from `pool` and call
/// `deliver(tag, buf)` with `buf.len() == request.len`, fully filled, with up to
/// `queue_depth` reads in flight (io_uring; 0 counts as 1). Delivery order may differ from
/// request order.
///
/// Blocks when the pool is empty: the consumer returns buffers by dropping them. `deliver`
/// runs on this thread, so it must not hold on to every buffer itself (hand them to other
/// threads, or drop them) or reading waits forever.
///
/// Errors: a request longer than the pool's buffers, past the source's size, or violating
/// the source's alignment is [`ErrorKind::Usage`]; a read returning 0 before the request's end
/// is [`ErrorKind::SourceChanged`]; OS failures are [`ErrorKind::Io`] with name and offset;
/// an error from `deliver` stops reading and is returned as is. Short reads are continued and
/// EINTR/EAGAIN retried. With io_uring, reads already in flight are always reaped before
/// returning, so the kernel never writes into a freed buffer.
///
/// If an io_uring ring cannot be set up for this call (e.g. locked-memory limits) the pread
/// reader is used instead, with a warning.
pub fn read_all(
    source: &dyn Source,
    requests: impl Iterator<Item = ReadRequest> + Send,
    pool: &BufferPool,
    kind: ReaderKind,
    queue_depth: usize,
    deliver: impl FnMut(u64, PooledBuf) -> Result<()>,
) -> Result<ReadStats> {
    check_pool(source, pool)?;
    let fd = match source.access() {
        Access::Fd(fd) => fd,
        Access::Translated(reader) => {
            return threaded::read_all(source, reader, requests, pool, queue_depth, deliver)
        }
    };
    match kind {
        ReaderKind::Pread | ReaderKind::Threads => {
            pread::read_all(source, fd, requests, pool, deliver)
        }
        ReaderKind::Uring => match uring::UringReader::new(queue_depth) {
            Ok(mut reader) => reader.read_all(source, fd, requests, pool, deliver),
            Err(e) => {
                tracing::warn!(error = %e, source = source.name(),
                    "cannot set up io_uring, using pread reader");
                pread::read_all(source, fd, requests, pool, deliver)
            }
        },
    }
}

/// Read `buf.len()` bytes at `offset` with one call, whatever the source's access: for small
/// header reads (`inspect`) that need no buffer pool. `offset` and the length must honour
/// [`Source::alignment`] and `buf` must be aligned to it.
pub fn read_exact_at(source: &dyn Source, offset: u64, buf: &mut [u8]) -> Result<()> {
    match source.access() {
        Access::Translated(reader) => reader.read_at(offset, buf),
        Access::Fd(fd) => {
            let req = ReadRequest {
                tag: 0,
                offset,
                len: buf.len(),
            };
            let mut done = 0;
            while done < buf.len() {
                let at = libc::off_t::try_from(offset + done as u64).map_err(|_| {
                    read_failed(source, &req, done, nix::errno::Errno::EOVERFLOW as i32)
                })?;
                match nix::sys::uio::pread(fd, &mut buf[done..], at) {
                    Ok(0) => return Err(ended_early(source, &req, done)),
                    Ok(n) => done += n,
                    Err(nix::errno::Errno::EINTR) => {}
                    Err(e) => return Err(read_failed(source, &req, done, e as i32)),
                }
            }
            Ok(())
        }
    }
}

/// Read `buf.len()` bytes at any `offset`, whatever the source's alignment: an O_DIRECT
/// source is read in aligned sectors through a bounce buffer. For headers (`inspect`, the
/// layout a backup records), not for bulk data.
pub fn read_any(source: &dyn Source, offset: u64, buf: &mut [u8]) -> Result<()> {
    let align = source.alignment().max(1) as u64;
    if align == 1 {
        return read_exact_at(source, offset, buf);
    }
    let start = offset / align * align;
    let end = (offset + buf.len() as u64).div_ceil(align) * align;
    let mut bounce = AlignedBuf::new((end - start) as usize, align as usize);
    bounce.set_len((end - start) as usize);
    read_exact_at(source, start, &mut bounce)?;
    let at = (offset - start) as usize;
    buf.copy_from_slice(&bounce[at..at + buf.len()]);
    Ok(())
}

/// The pool's buffers must satisfy the source's address alignment (O_DIRECT).
fn check_pool(source: &dyn Source, pool: &BufferPool) -> Result<()> {
    let align = source.alignment().max(1);
    if !pool.align().is_multiple_of(align) {
        return Err(Error::usage(format!(
            "buffers aligned to {} bytes cannot be used to read source {}, which needs {align}-byte alignment",
            pool.align(),
            source.name()
        )));
    }
    Ok(())
}

/// Validate `req` against the source and pool; return how many bytes to ask the kernel for.
///
/// That is `req.len`, except for an unaligned tail on an aligned (O_DIRECT) source, where
/// the length is rounded up to the alignment and the kernel stops at the end of the source.
fn plan(source: &dyn Source, pool: &BufferPool, req: &ReadRequest) -> Result<usize> {
    let name = source.name();
    let (offset, len) = (req.offset, req.len);
    if len > pool.capacity() {
        return Err(Error::usage(format!(
            "read of {len} bytes at offset {offset} from source {name} exceeds the buffer size {}",
            pool.capacity()
        )));
    }
    let size = source.size();
    let end = offset.checked_add(len as u64);
    if end.is_none_or(|end| end > size) {
        return Err(Error::usage(format!(
            "read of {len} bytes at offset {offset} from source {name} extends past its size {size}"
        )));
    }
    let align = source.alignment().max(1);
    if align == 1 {
        return Ok(len);
    }
    let tail = end == Some(size);
    if !offset.is_multiple_of(align as u64) || (!len.is_multiple_of(align) && !tail) {
        return Err(Error::usage(format!(
            "read of {len} bytes at offset {offset} from source {name} is not aligned to its {align}-byte sectors"
        )));
    }
    let read_len = len.div_ceil(align).saturating_mul(align);
    if read_len > pool.capacity() {
        return Err(Error::usage(format!(
            "read of {len} bytes at offset {offset} from source {name} needs {read_len} bytes \
             of buffer for direct I/O but buffers hold {}",
            pool.capacity()
        )));
    }
    Ok(read_len)
}

/// A read returned 0 before the request was filled: the source is shorter than at open.
fn ended_early(source: &dyn Source, req: &ReadRequest, done: usize) -> Error {
    Error::new(
        ErrorKind::SourceChanged,
        format!(
            "source {} ended at offset {} while reading {} bytes at {} (expected size {})",
            source.name(),
            req.offset + done as u64,
            req.len,
            req.offset,
            source.size()
        ),
    )
}

/// An OS error while reading `req`, naming the source and the failing offset.
fn read_failed(source: &dyn Source, req: &ReadRequest, done: usize, errno: i32) -> Error {
    Error::io(
        format!(
            "reading {} bytes at offset {} from source {} failed at offset {}",
            req.len,
            req.offset,
            source.name(),
            req.offset + done as u64
        ),
        std::io::Error::from_raw_os_error(errno),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::{open, OpenOptions, SourceKind};
    use proptest::prelude::*;
    use std::collections::HashMap;
    use std::fs::File;
    use std::os::fd::AsFd;
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    /// Whether io_uring can be tested here; skips loudly, or fails when CI=true.
    pub(super) fn uring_ok(test: &str) -> bool {
        match uring::probe() {
            Ok(()) => true,
            Err(e) if std::env::var("CI").as_deref() == Ok("true") => {
                panic!("{test}: io_uring unavailable under CI=true: {e}")
            }
            Err(e) => {
                eprintln!("SKIP {test} (io_uring part): io_uring unavailable: {e}");
                false
            }
        }
    }

    fn kinds(test: &str) -> Vec<ReaderKind> {
        let mut kinds = vec![ReaderKind::Pread];
        if uring_ok(test) {
            kinds.push(ReaderKind::Uring);
        }
        kinds
    }

    fn temp_with(data: &[u8]) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().expect("temp");
        f.as_file().write_all_at(data, 0).expect("write");
        f
    }

    fn pattern(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    /// Read `reqs` and return each tag's bytes, checking each tag is delivered once.
    fn read_map(
        src: &dyn Source,
        reqs: &[ReadRequest],
        pool: &BufferPool,
        kind: ReaderKind,
        depth: usize,
    ) -> Result<HashMap<u64, Vec<u8>>> {
        let mut got = HashMap::new();
        let stats = read_all(src, reqs.iter().copied(), pool, kind, depth, |tag, buf| {
            assert!(got.insert(tag, buf.to_vec()).is_none(), "tag {tag} twice");
            Ok(())
        })?;
        assert_eq!(stats.requests, reqs.len() as u64);
        assert_eq!(stats.bytes, reqs.iter().map(|r| r.len as u64).sum::<u64>());
        Ok(got)
    }

    fn assert_matches(got: &HashMap<u64, Vec<u8>>, reqs: &[ReadRequest], data: &[u8]) {
        assert_eq!(got.len(), reqs.len());
        for r in reqs {
            let want = &data[r.offset as usize..r.offset as usize + r.len];
            assert!(got[&r.tag] == want, "request {r:?} differs");
        }
    }

    /// Consecutive `chunk`-sized requests covering `[0, end)`.
    fn chunks(end: u64, chunk: usize) -> Vec<ReadRequest> {
        (0..end)
            .step_by(chunk)
            .enumerate()
            .map(|(i, offset)| ReadRequest {
                tag: i as u64,
                offset,
                len: chunk.min((end - offset) as usize),
            })
            .collect()
    }

    fn arb_case() -> impl Strategy<Value = (Vec<u8>, Vec<ReadRequest>)> {
        (1usize..300_000, any::<u64>()).prop_flat_map(|(size, seed)| {
            let req = (0..size as u64, 0usize..=65_536)
                .prop_map(move |(offset, len)| (offset, len.min(size - offset as usize)));
            (
                Just(pattern(size, seed)),
                proptest::collection::vec(req, 0..40),
            )
                .prop_map(|(data, reqs)| {
                    let reqs = reqs
                        .into_iter()
                        .enumerate()
                        .map(|(tag, (offset, len))| ReadRequest {
                            tag: tag as u64,
                            offset,
                            len,
                        })
                        .collect();
                    (data, reqs)
                })
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn readers_return_the_file_bytes((data, reqs) in arb_case(), depth in 1usize..12, count in 1usize..5) {
            let f = temp_with(&data);
            let src = open(f.path().to_str().expect("utf-8"), &OpenOptions::default()).expect("open");
            let pool = BufferPool::new(count, 65_536, 1);
            for kind in kinds("readers_return_the_file_bytes") {
                let got = read_map(&*src, &reqs, &pool, kind, depth).expect("read");
                assert_matches(&got, &reqs, &data);
                prop_assert_eq!(pool.lent(), 0);
            }
        }
    }

    #[test]
    fn unaligned_tail_of_buffered_file() {
        let data = pattern(10_123, 5);
        let f = temp_with(&data);
        let src = open(f.path().to_str().expect("utf-8"), &OpenOptions::default()).expect("open");
        let reqs = chunks(data.len() as u64, 4096);
        let pool = BufferPool::new(2, 4096, 4096);
        for kind in kinds("unaligned_tail_of_buffered_file") {
            let got = read_map(&*src, &reqs, &pool, kind, 4).expect("read");
            assert_matches(&got, &reqs, &data);
        }
    }

    /// A regular file opened with O_DIRECT: exercises the aligned-tail path with a size that
    /// is not a multiple of the alignment, which real block devices never have.
    struct DirectFile {
        file: File,
        size: u64,
    }

    impl Source for DirectFile {
        fn kind(&self) -> SourceKind {
            SourceKind::RawFile
        }
        fn name(&self) -> &str {
            "direct-test-file"
        }
        fn size(&self) -> u64 {
            self.size
        }
        fn sector_size(&self) -> u32 {
            4096
        }
        fn alignment(&self) -> usize {
            4096
        }
        fn data_ranges(&self) -> Result<Vec<std::ops::Range<u64>>> {
            Ok(crate::source::whole_range(self.size))
        }
        fn access(&self) -> crate::source::Access<'_> {
            crate::source::Access::Fd(self.file.as_fd())
        }
    }

    #[test]
    fn direct_io_reads_unaligned_tail_by_rounding_up() {
        let data = pattern(3 * 65_536 + 4096 * 3 + 77, 9);
        let f = temp_with(&data);
        f.as_file().sync_all().expect("sync");
        let file = match std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(f.path())
        {
            Ok(file) => file,
            Err(e) => {
                eprintln!("SKIP direct_io_reads_unaligned_tail_by_rounding_up: no O_DIRECT on temp dir: {e}");
                return;
            }
        };
        let src = DirectFile {
            file,
            size: data.len() as u64,
        };
        let reqs = chunks(src.size, 65_536);
        let pool = BufferPool::new(3, 65_536, 4096);
        for kind in kinds("direct_io_reads_unaligned_tail_by_rounding_up") {
            let got = read_map(&src, &reqs, &pool, kind, 8).expect("read");
            assert_matches(&got, &reqs, &data);
        }
        // Alignment violations are usage errors, not EINVAL from the kernel.
        let bad = [
            ReadRequest {
                tag: 0,
                offset: 100,
                len: 4096,
            },
            ReadRequest {
                tag: 0,
                offset: 0,
                len: 1000,
            },
        ];
        for kind in kinds("direct_io_alignment_errors") {
            for req in bad {
                let err = read_all(&src, [req].into_iter(), &pool, kind, 2, |_, _| Ok(()))
                    .expect_err("misaligned");
                assert_eq!(err.kind(), ErrorKind::Usage);
                assert!(err.to_string().contains("not aligned"), "{err}");
            }
            let unaligned_pool = BufferPool::new(1, 65_536, 8);
            let err = read_all(
                &src,
                reqs.iter().copied(),
                &unaligned_pool,
                kind,
                2,
                |_, _| Ok(()),
            )
            .expect_err("pool alignment");
            assert_eq!(err.kind(), ErrorKind::Usage);
            // The tail needs a rounded-up buffer: a pool exactly as big as the tail is too small.
            let tail = *reqs.last().expect("tail");
            let small = BufferPool::new(1, tail.len, 4096);
            let err = read_all(&src, [tail].into_iter(), &small, kind, 2, |_, _| Ok(()))
                .expect_err("tail too big");
            assert!(err.to_string().contains("direct I/O"), "{err}");
        }
    }

    #[test]
    fn shrunk_source_is_source_changed_with_offset() {
        let data = pattern(1 << 20, 3);
        let f = temp_with(&data);
        let name = f.path().to_str().expect("utf-8").to_owned();
        for kind in kinds("shrunk_source_is_source_changed_with_offset") {
            f.as_file().write_all_at(&data, 0).expect("restore");
            let src = open(&name, &OpenOptions::default()).expect("open");
            f.as_file().set_len(300_000).expect("truncate");
            let pool = BufferPool::new(4, 65_536, 1);
            // Only the last request crosses the new end, so the failure is deterministic.
            let reqs = chunks(5 * 65_536, 65_536);
            let err = read_map(&*src, &reqs, &pool, kind, 8).expect_err("shrunk");
            assert_eq!(err.kind(), ErrorKind::SourceChanged, "{kind:?}");
            assert_eq!(
                err.to_string(),
                format!("source {name} ended at offset 300000 while reading 65536 bytes at 262144 (expected size 1048576)")
            );
            assert_eq!(pool.lent(), 0);
        }
    }

    #[test]
    fn deliver_error_stops_reading_and_returns_buffers() {
        let data = pattern(1 << 20, 4);
        let f = temp_with(&data);
        let src = open(f.path().to_str().expect("utf-8"), &OpenOptions::default()).expect("open");
        let reqs = chunks(data.len() as u64, 16_384);
        for kind in kinds("deliver_error_stops_reading_and_returns_buffers") {
            let pool = BufferPool::new(8, 16_384, 1);
            let mut calls = 0;
            let err = read_all(&*src, reqs.iter().copied(), &pool, kind, 8, |_, _| {
                calls += 1;
                if calls == 3 {
                    Err(Error::usage("consumer gave up"))
                } else {
                    Ok(())
                }
            })
            .expect_err("deliver error");
            assert_eq!(err.to_string(), "consumer gave up");
            assert_eq!(calls, 3, "{kind:?}: no delivery after the error");
            assert_eq!(
                pool.lent(),
                0,
                "{kind:?}: in-flight buffers reaped and returned"
            );
        }
    }

    #[test]
    fn panic_in_deliver_still_reaps_in_flight_reads() {
        let data = pattern(1 << 20, 8);
        let f = temp_with(&data);
        let src = open(f.path().to_str().expect("utf-8"), &OpenOptions::default()).expect("open");
        let reqs = chunks(data.len() as u64, 16_384);
        for kind in kinds("panic_in_deliver_still_reaps_in_flight_reads") {
            let pool = BufferPool::new(8, 16_384, 1);
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let mut calls = 0;
                read_all(&*src, reqs.iter().copied(), &pool, kind, 8, |_, _| {
                    calls += 1;
                    assert!(calls < 2, "deliberate panic in deliver");
                    Ok(())
                })
            }));
            assert!(result.is_err());
            assert_eq!(pool.lent(), 0, "{kind:?}: buffers returned after reaping");
        }
    }

    #[test]
    fn pool_bound_holds_with_slow_consumer() {
        let data = pattern(800 * 4096, 6);
        let f = temp_with(&data);
        let src = open(f.path().to_str().expect("utf-8"), &OpenOptions::default()).expect("open");
        let reqs = chunks(data.len() as u64, 4096);
        for kind in kinds("pool_bound_holds_with_slow_consumer") {
            let pool = BufferPool::new(3, 4096, 1);
            let max = Arc::new(AtomicUsize::new(0));
            let (tx, rx) = crossbeam_channel::unbounded::<(u64, PooledBuf)>();
            let consumer = {
                let (pool, max) = (pool.clone(), max.clone());
                let data = data.clone();
                std::thread::spawn(move || {
                    let mut seen = 0;
                    for (tag, buf) in rx {
                        max.fetch_max(pool.lent(), Ordering::SeqCst);
                        let at = tag as usize * 4096;
                        assert!(*buf == data[at..at + 4096]);
                        std::thread::sleep(std::time::Duration::from_micros(50));
                        seen += 1;
                    }
                    seen
                })
            };
            let stats = read_all(&*src, reqs.iter().copied(), &pool, kind, 16, |tag, buf| {
                max.fetch_max(pool.lent(), Ordering::SeqCst);
                tx.send((tag, buf))
                    .map_err(|_| Error::usage("consumer gone"))
            })
            .expect("read");
            drop(tx);
            assert_eq!(consumer.join().expect("consumer"), reqs.len());
            assert_eq!(stats.requests, reqs.len() as u64);
            assert!(max.load(Ordering::SeqCst) <= 3, "{kind:?}: {max:?}");
            assert!(pool.allocated() <= 3);
        }
    }

    #[test]
    fn bad_requests_are_usage_errors_and_empty_requests_deliver() {
        let data = pattern(10_000, 7);
        let f = temp_with(&data);
        let src = open(f.path().to_str().expect("utf-8"), &OpenOptions::default()).expect("open");
        let pool = BufferPool::new(2, 4096, 1);
        for kind in kinds("bad_requests_are_usage_errors") {
            for (req, msg) in [
                (
                    ReadRequest {
                        tag: 1,
                        offset: 9_000,
                        len: 2_000,
                    },
                    "past its size",
                ),
                (
                    ReadRequest {
                        tag: 1,
                        offset: 0,
                        len: 5_000,
                    },
                    "exceeds the buffer size",
                ),
                (
                    ReadRequest {
                        tag: 1,
                        offset: u64::MAX,
                        len: 10,
                    },
                    "past its size",
                ),
            ] {
                let err = read_all(&*src, [req].into_iter(), &pool, kind, 4, |_, _| Ok(()))
                    .expect_err("bad request");
                assert_eq!(err.kind(), ErrorKind::Usage);
                assert!(err.to_string().contains(msg), "{err}");
                assert!(err.to_string().contains(src.name()), "{err}");
            }
            let empty = [
                ReadRequest {
                    tag: 9,
                    offset: 10_000,
                    len: 0,
                },
                ReadRequest {
                    tag: 10,
                    offset: 0,
                    len: 10,
                },
            ];
            let got = read_map(&*src, &empty, &pool, kind, 4).expect("empty ok");
            assert_matches(&got, &empty, &data);
        }
    }

    #[test]
    fn loop_device_reads_match_with_both_readers() {
        let (f, data) = crate::source::blockdev::tests::pattern_file(4 << 20);
        let Some(dev) = crate::source::blockdev::tests::LoopDev::attach(
            f.path(),
            "loop_device_reads_match_with_both_readers",
        ) else {
            return;
        };
        let src = open(&dev.path, &OpenOptions::default()).expect("open");
        let ranges = src.data_ranges().expect("ranges");
        assert_eq!(ranges, vec![0..4 << 20]);
        let reqs = chunks(src.size(), 1 << 20);
        let pool = BufferPool::new(3, 1 << 20, src.alignment());
        for kind in kinds("loop_device_reads_match_with_both_readers") {
            let got = read_map(&*src, &reqs, &pool, kind, 8).expect("read");
            assert_matches(&got, &reqs, &data);
        }
    }

    #[test]
    fn choose_reader_honours_force_and_probe() {
        assert_eq!(choose_reader(true), ReaderKind::Pread);
        let probed = choose_reader(false);
        if std::env::var(READER_ENV).is_err() {
            assert_eq!(probed == ReaderKind::Uring, uring::probe().is_ok());
        }
        assert!(uring::UringReader::new(0).is_ok() || !uring_ok("choose_reader"));
        assert!(uring::UringReader::new(100_000).is_ok() || !uring_ok("choose_reader"));
    }
}
