//! NBD exports as restore targets (`nbd://HOST:PORT/EXPORT`, `nbd+unix:///EXPORT?socket=P`):
//! the disk lands in whatever the server serves, in its format (a qcow2 or vmdk behind
//! qemu-nbd, a LUN, memory).
//!
//! Like a device, the export must be writable and large enough, and one holding data needs
//! `--force` ([`super::occupied`]). Zeros are not sent as data: runs of zero blocks (64 KiB,
//! or the server's minimum block if larger) go as `NBD_CMD_WRITE_ZEROES`, so a sparse image
//! behind the server stays sparse; the rest as writes. The wire work is the NBD client's
//! ([`NbdWriter`]).

use super::sparse::runs;
use super::{occupied, Abandoned, Format, Target, TargetKind};
use crate::error::{Error, ErrorKind, Result};
use crate::source::nbd::writer::NbdWriter;
use crate::source::NbdOptions;

/// Smallest run of zeros sent as a zeroing request rather than as data: one cluster of a
/// qcow2 image behind qemu-nbd, which it can then leave unallocated.
const ZERO_RUN: u64 = 64 << 10;

/// An NBD export open for writing.
pub(super) struct NbdExport {
    writer: NbdWriter,
    /// Granularity of zero runs: [`ZERO_RUN`] or the server's minimum block size.
    block: usize,
}

impl NbdExport {
    /// Connect to `url` for a disk of `size` bytes.
    pub(super) fn open(url: &str, size: u64, force: bool, opts: &NbdOptions) -> Result<NbdExport> {
        let writer = NbdWriter::open(url, opts)?;
        let have = writer.size();
        if have < size {
            return Err(Error::usage(format!(
                "NBD export {url} holds {have} bytes, the disk needs {size}"
            )));
        }
        if !force {
            let read = |offset: u64, buf: &mut [u8]| writer.read_at(offset, buf);
            if let Some(what) = occupied::holds_data(&read, have)? {
                return Err(Error::new(
                    ErrorKind::AlreadyExists,
                    format!("NBD export {url} holds data ({what}); pass --force to overwrite it"),
                ));
            }
        }
        let block = ZERO_RUN.max(writer.min_block()) as usize;
        Ok(NbdExport { writer, block })
    }
}

impl Target for NbdExport {
    fn name(&self) -> &str {
        self.writer.url()
    }

    fn kind(&self) -> TargetKind {
        TargetKind::Nbd
    }

    /// What the server stores is its business; what goes over the wire is the raw disk.
    fn format(&self) -> Format {
        Format::Raw
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        for (r, zero) in runs(data, self.block) {
            let at = offset + r.start as u64;
            if zero {
                self.writer.write_zeroes(at, r.len() as u64)?;
            } else {
                self.writer.write_at(at, &data[r])?;
            }
        }
        Ok(())
    }

    fn zero(&self, offset: u64, len: u64) -> Result<()> {
        self.writer.write_zeroes(offset, len)
    }

    fn finish(&self, sync: bool) -> Result<()> {
        if sync {
            self.writer.flush()?;
        }
        Ok(())
    }

    fn abandon(&self) -> Abandoned {
        Abandoned::PartlyWritten
    }
}
