//! One served snapshot: the snapshot reader, and with `--writable` the copy-on-write overlay
//! laid over it. Reads prefer the overlay's blocks; block status reports them as data.

use std::ops::Range;

use super::overlay::Overlay;
use super::parts::Reply;
use crate::error::Result;
use crate::reader::{ExtentKind, SnapshotReader};
use crate::source::nbd::proto::{
    FLAG_CAN_MULTI_CONN, FLAG_HAS_FLAGS, FLAG_READ_ONLY, FLAG_SEND_DF, FLAG_SEND_FLUSH,
    FLAG_SEND_FUA, FLAG_SEND_TRIM, FLAG_SEND_WRITE_ZEROES, STATE_HOLE, STATE_ZERO,
};

/// A served snapshot.
pub struct Export<'a> {
    /// `DISK@ID`, the export's name.
    pub name: String,
    reader: SnapshotReader<'a>,
    overlay: Option<Overlay>,
}

impl<'a> Export<'a> {
    /// Serve `reader` as `name`, read-only or (with an overlay) copy-on-write.
    pub fn new(name: String, reader: SnapshotReader<'a>, overlay: Option<Overlay>) -> Self {
        Export {
            name,
            reader,
            overlay,
        }
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.reader.size()
    }

    /// Whether writes are accepted.
    pub fn writable(&self) -> bool {
        self.overlay.is_some()
    }

    /// The transmission flags. Multi-conn holds either way: read-only data cannot differ
    /// between connections, and every connection writes the one shared overlay.
    pub fn flags(&self) -> u16 {
        let common = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_DF | FLAG_CAN_MULTI_CONN;
        if self.writable() {
            common | FLAG_SEND_FUA | FLAG_SEND_WRITE_ZEROES | FLAG_SEND_TRIM
        } else {
            common | FLAG_READ_ONLY
        }
    }

    /// The `len` bytes at `offset` (within the export): the overlay's blocks read from its
    /// file, the rest handed out by the snapshot reader without a copy.
    pub fn read(&self, offset: u64, len: usize) -> Result<Reply> {
        let snapshot = |at: u64, n: usize| Ok(self.reader.pieces(at, n)?.into_iter().collect());
        let Some(ov) = &self.overlay else {
            return snapshot(offset, len);
        };
        let mut data = Reply::default();
        for (r, here) in ov.runs(offset, len as u64) {
            let n = (r.end - r.start) as usize;
            if here {
                let mut b = vec![0u8; n];
                ov.read(r.start, &mut b)?;
                data.push_owned(b);
            } else {
                data.append(snapshot(r.start, n)?);
            }
        }
        Ok(data)
    }

    /// Block status of `range` (within the export): (length, `NBD_STATE_*`) runs. Holes of
    /// the snapshot are `HOLE | ZERO`; overlay blocks and stored data are 0.
    pub fn status(&self, range: Range<u64>) -> Vec<(u64, u32)> {
        let mut out: Vec<(u64, u32)> = Vec::new();
        let mut push = |len: u64, flags: u32| match out.last_mut() {
            Some((l, f)) if *f == flags => *l += len,
            _ => out.push((len, flags)),
        };
        let runs = match &self.overlay {
            Some(ov) => ov.runs(range.start, range.end - range.start),
            None => vec![(range, false)],
        };
        for (r, here) in runs {
            if here {
                push(r.end - r.start, 0);
                continue;
            }
            for e in self.reader.extents(r) {
                let flags = match e.kind {
                    ExtentKind::Data => 0,
                    ExtentKind::Zero => STATE_HOLE | STATE_ZERO,
                };
                push(e.range.end - e.range.start, flags);
            }
        }
        out
    }

    /// The snapshot's holes and data for a read of `range`, as runs (hole or not); without
    /// an overlay only the snapshot's holes count, with one the overlay's blocks are data.
    pub fn read_runs(&self, range: Range<u64>) -> Vec<(Range<u64>, bool)> {
        let mut at = range.start;
        self.status(range)
            .into_iter()
            .map(|(len, flags)| {
                let r = at..at + len;
                at += len;
                (r, flags & STATE_ZERO != 0)
            })
            .collect()
    }

    /// Write `data` at `offset` into the overlay (the caller checked the export is writable).
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        match &self.overlay {
            Some(ov) => ov.write(offset, data, &|o, b| self.reader.read_at(o, b)),
            None => Err(crate::error::Error::usage(format!(
                "export {} is read-only",
                self.name
            ))),
        }
    }

    /// Make `len` bytes at `offset` read as zeros.
    pub fn zero(&self, offset: u64, len: u64) -> Result<()> {
        const STEP: u64 = 4 << 20;
        let zeros = vec![0u8; STEP.min(len) as usize];
        let mut at = offset;
        while at < offset + len {
            let n = STEP.min(offset + len - at);
            self.write(at, &zeros[..n as usize])?;
            at += n;
        }
        Ok(())
    }

    /// Make written data durable (nothing to do read-only).
    pub fn flush(&self) -> Result<()> {
        self.overlay.as_ref().map_or(Ok(()), Overlay::flush)
    }

    /// Blocks the overlay holds (0 read-only).
    pub fn blocks_written(&self) -> u64 {
        self.overlay.as_ref().map_or(0, Overlay::blocks_written)
    }
}
