//! Positional writes to a file or device, through O_DIRECT where the offset allows it.
//!
//! Restored data goes to the device without a page-cache copy and without a long flush at the
//! end (measured here: 1.7 GB/s direct vs 0.7 GB/s buffered + fsync). O_DIRECT needs aligned
//! offsets, lengths and buffer addresses: data already in an aligned buffer (restore's, see
//! `restore::write_all`) is written as it is; other data is copied into the thread's aligned
//! staging buffer first. Either way the aligned part goes direct, and an unaligned head or
//! tail (a range restore, the last bytes of an odd-sized disk, a qcow2 header) through the
//! buffered descriptor of the same file.
//!
//! A writer opened [`with a ring`](DirectWriter::new) sends the aligned parts of the pooled
//! buffers it is handed ([`DirectWriter::write_owned`]) through an io_uring [`WriteRing`]:
//! the restore thread goes back to decoding while several writes are in flight. Without
//! io_uring (or with `BLOCKVAULT_WRITER=pwrite`) they are written with `pwrite` on the spot.

use std::cell::RefCell;
use std::fs::{File, OpenOptions};
use std::ops::Range;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use nix::fcntl::FallocateFlags;

use crate::error::{IoContext, Result};
use crate::io::{AlignedBuf, Piece, PooledBuf, WriteRing};

/// Alignment of O_DIRECT writes: covers 512- and 4096-byte logical blocks. Restore decodes
/// into buffers aligned to it, so their writes need no staging copy.
pub const DIRECT_ALIGN: usize = 4096;

/// Writes in flight in a [`WriteRing`]. Each is at most a slot (1 MiB); more than a few
/// buys nothing on one device, and the pieces of a sparse slot are many small ones.
const RING_DEPTH: usize = 32;

thread_local! {
    /// Each restore thread's aligned staging buffer for O_DIRECT writes.
    static ALIGNED: RefCell<AlignedBuf> = RefCell::new(AlignedBuf::new(0, DIRECT_ALIGN));
}

/// A file or device open for positional writes.
pub(super) struct DirectWriter {
    /// Writes `write_owned`'s aligned pieces from a second O_DIRECT descriptor. First, so
    /// that it is dropped (its writes completed) before `file` closes: a device's exclusive
    /// claim lasts until nothing writes to it any more.
    ring: Option<WriteRing>,
    file: File,
    /// The same file opened with O_DIRECT, where the filesystem or device allows it.
    direct: Option<File>,
    /// For messages.
    name: String,
}

impl DirectWriter {
    /// Writes to `file` (open for writing at `path`), and through a second O_DIRECT
    /// descriptor of `path` when one can be opened; with `ring`, through io_uring where it
    /// works.
    pub(super) fn new(path: &Path, file: File, name: &str, ring: bool) -> DirectWriter {
        let open_direct = || {
            OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_DIRECT)
                .open(path)
        };
        let direct = open_direct()
            .map_err(|e| tracing::debug!(target = %name, error = %e, "O_DIRECT unavailable; buffered writes"))
            .ok();
        let ring = (ring && direct.is_some() && !crate::io::plain_writes_only())
            .then(|| {
                open_direct()
                    .and_then(|f| WriteRing::new(f, RING_DEPTH, name))
                    .inspect(|_| tracing::debug!(target = %name, depth = RING_DEPTH, "writes through io_uring"))
                    .map_err(|e| tracing::debug!(target = %name, error = %e, "io_uring writes unavailable; pwrite"))
                    .ok()
            })
            .flatten();
        DirectWriter {
            ring,
            file,
            direct,
            name: name.to_owned(),
        }
    }

    /// Write each `(bytes of buf[part], offset)` piece, taking the buffer: the aligned part
    /// of a piece through the ring (asynchronously: [`finish`](Self::finish) waits for it,
    /// and a failure is returned by a later call or by `finish`), the rest with `pwrite`
    /// before this returns.
    pub(super) fn write_owned(
        &self,
        buf: PooledBuf,
        part: Range<usize>,
        pieces: impl IntoIterator<Item = (Range<usize>, u64)>,
    ) -> Result<()> {
        let pieces = pieces
            .into_iter()
            .map(|(r, offset)| (part.start + r.start..part.start + r.end, offset));
        let Some(ring) = &self.ring else {
            for (r, offset) in pieces {
                self.write(&buf[r], offset)?;
            }
            return Ok(());
        };
        let base = buf.as_ptr() as usize;
        let mut queued = Vec::new();
        for (r, offset) in pieces {
            let aligned = offset.is_multiple_of(DIRECT_ALIGN as u64)
                && (base + r.start).is_multiple_of(DIRECT_ALIGN);
            let whole = if aligned {
                r.len() / DIRECT_ALIGN * DIRECT_ALIGN
            } else {
                0
            };
            if whole > 0 {
                queued.push(Piece {
                    at: r.start,
                    len: whole,
                    offset,
                });
            }
            if whole < r.len() {
                self.write(&buf[r.start + whole..r.end], offset + whole as u64)?;
            }
        }
        ring.submit(buf, queued)
    }

    /// Allocate the blocks of `len` bytes at `offset` (the size unchanged), before any write
    /// goes there. ext4 runs a direct write that must allocate blocks under the inode's
    /// exclusive lock, one at a time, and one into allocated blocks under the shared lock:
    /// without this a restore's threads waited in `ext4_file_write_iter` for most of their
    /// time and the disk saw one write at once. Allocating just before each write does not
    /// help (`fallocate` waits for the direct writes in flight), so restore allocates
    /// everything first. Best effort: where the filesystem cannot, the writes allocate.
    pub(super) fn allocate(&self, offset: u64, len: u64) {
        self.fallocate(FallocateFlags::FALLOC_FL_KEEP_SIZE, offset, len);
    }

    /// Make `len` bytes at `offset` a hole again (they read as zeros either way); best effort.
    pub(super) fn punch(&self, offset: u64, len: u64) {
        self.fallocate(
            FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        );
    }

    fn fallocate(&self, mode: FallocateFlags, offset: u64, len: u64) {
        let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
            return;
        };
        if let Err(e) = nix::fcntl::fallocate(&self.file, mode, offset, len) {
            tracing::debug!(target = %self.name, ?mode, offset, len, error = %e, "fallocate failed");
        }
    }

    /// Write all of `data` at `offset`.
    pub(super) fn write(&self, data: &[u8], offset: u64) -> Result<()> {
        let direct = self
            .direct
            .as_ref()
            .filter(|_| offset.is_multiple_of(DIRECT_ALIGN as u64) && data.len() >= DIRECT_ALIGN);
        let Some(direct) = direct else {
            return self.buffered(data, offset);
        };
        let whole = data.len() / DIRECT_ALIGN * DIRECT_ALIGN;
        let what = || format!("writing {whole} bytes at offset {offset} of {}", self.name);
        if (data.as_ptr() as usize).is_multiple_of(DIRECT_ALIGN) {
            // Already aligned (restore's pooled buffers): written as it is.
            direct.write_all_at(&data[..whole], offset).ctx(what)?;
        } else {
            self.staged(direct, &data[..whole], offset).ctx(what)?;
        }
        if whole < data.len() {
            self.buffered(&data[whole..], offset + whole as u64)?;
        }
        Ok(())
    }

    /// Write aligned-length `data` at `offset` of `direct` through this thread's aligned
    /// staging buffer.
    fn staged(&self, direct: &File, data: &[u8], offset: u64) -> std::io::Result<()> {
        ALIGNED.with(|cell| {
            let mut buf = cell.borrow_mut();
            if buf.capacity() < data.len() {
                *buf = AlignedBuf::new(data.len(), DIRECT_ALIGN);
            }
            buf.set_len(data.len());
            buf.copy_from_slice(data);
            direct.write_all_at(&buf, offset)
        })
    }

    fn buffered(&self, data: &[u8], offset: u64) -> Result<()> {
        self.file.write_all_at(data, offset).ctx(|| {
            format!(
                "writing {} bytes at offset {offset} of {}",
                data.len(),
                self.name
            )
        })
    }

    /// The descriptor writes that are not data go through (`fallocate`, ioctls): the one
    /// the target was opened with.
    pub(super) fn file(&self) -> &File {
        &self.file
    }

    /// Wait for the ring's writes in flight; the first that failed, if one did.
    pub(super) fn drain(&self) -> Result<()> {
        self.ring.as_ref().map_or(Ok(()), WriteRing::drain)
    }

    /// After a failure: stop writing (writes in flight complete, queued ones are dropped).
    pub(super) fn stop(&self) {
        if let Some(ring) = &self.ring {
            ring.stop();
        }
    }

    /// Wait for the writes in flight, then flush to stable storage if `sync` (the end of a
    /// restore without `--no-sync`).
    pub(super) fn finish(&self, sync: bool) -> Result<()> {
        self.drain()?;
        if !sync {
            return Ok(());
        }
        self.file
            .sync_all()
            .ctx(|| format!("syncing {}", self.name))
    }
}
