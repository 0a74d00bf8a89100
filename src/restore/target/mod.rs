//! Where a restore writes: a [`Target`], opened by [`open`], which probes what TARGET names.
//!
//! | TARGET | implementation | zeros | on failure |
//! |---|---|---|---|
//! | `nbd://…`, `nbd+unix://…` (checked first: no path logic) | [`nbd::NbdExport`] | `NBD_CMD_WRITE_ZEROES` | partly written |
//! | a block device | [`device::Device`] (O_EXCL; not mounted or held; data needs `--force`) | written | partly written |
//! | a file, `--format qcow2` or named `*.qcow2` | [`qcow2::Qcow2Image`] | unallocated clusters | removed if created |
//! | any other file (created if missing) | [`file::RawFile`] | holes | removed if created |
//!
//! Contract of every target: `write` and `zero` are called from many threads at once, for
//! disjoint ranges in any order (a range may share a block or cluster with another when a
//! `--range` restore is not aligned); nothing is readable as a finished disk until `finish`
//! returned; after a failure `abandon` cleans up what can be and says what was left.

mod device;
mod direct;
mod file;
mod in_use;
mod nbd;
pub mod occupied;
mod qcow2;
mod qcow2_format;
mod sparse;

pub use direct::DIRECT_ALIGN;

use std::ops::Range;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use crate::error::{Error, Result};
use crate::io::PooledBuf;
use crate::source::nbd::is_nbd_url;
use crate::source::NbdOptions;

/// What a restore writes into a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Format {
    /// The disk's bytes as they are.
    Raw,
    /// A qcow2 image (v3, 64 KiB clusters), written natively.
    Qcow2,
}

/// What kind of thing a target is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum TargetKind {
    /// A regular file.
    File,
    /// A block device.
    Device,
    /// An NBD export.
    Nbd,
}

/// What became of a target after a failed restore.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Abandoned {
    /// This restore created it, and removed it again.
    Removed,
    /// It existed before (a device, an export, a file overwritten with `--force`) and now
    /// holds part of the disk.
    PartlyWritten,
}

/// How to open a target.
#[derive(Debug, Clone, Default)]
pub struct TargetOptions {
    /// Overwrite a non-empty file, or a device or export that holds data.
    pub force: bool,
    /// The file format; `None`: qcow2 for a name ending in `.qcow2`, else raw.
    pub format: Option<Format>,
    /// How to reach an NBD target.
    pub nbd: NbdOptions,
}

/// An open restore target (see the module doc for the contract).
pub trait Target: Send + Sync {
    /// The path or URL as given, for messages.
    fn name(&self) -> &str;
    /// What it is.
    fn kind(&self) -> TargetKind;
    /// What is written into it.
    fn format(&self) -> Format;
    /// Write `data` at `offset` of the disk being restored.
    fn write(&self, offset: u64, data: &[u8]) -> Result<()>;
    /// Write the bytes `part` of `buf` at `offset`, taking the buffer: a target that writes
    /// through io_uring keeps it until the write is done, and `finish` waits for that. A
    /// write failure may then be returned by a later call or by `finish`.
    fn write_buf(&self, offset: u64, buf: PooledBuf, part: Range<usize>) -> Result<()> {
        self.write(offset, &buf[part])
    }
    /// Make `len` bytes at `offset` read as zeros.
    fn zero(&self, offset: u64, len: u64) -> Result<()>;
    /// Before any write: `len` bytes at `offset` are about to be written. A raw file
    /// allocates them, a qcow2 image as many clusters (best effort); other targets ignore
    /// it.
    fn allocate(&self, _offset: u64, _len: u64) {}
    /// Complete the target after the last write (a qcow2 image's metadata) and, if `sync`,
    /// make it durable.
    fn finish(&self, sync: bool) -> Result<()>;
    /// After a failure: remove what this restore created, and say what is left.
    fn abandon(&self) -> Abandoned;
}

impl Abandoned {
    /// How a failure message says what became of `target`.
    pub fn describe(self, target: &dyn Target) -> String {
        let name = target.name();
        let what = match target.kind() {
            TargetKind::File => format!("target {name}"),
            TargetKind::Device => format!("target device {name}"),
            TargetKind::Nbd => format!("NBD export {name}"),
        };
        match self {
            Abandoned::Removed => format!("{what}, which this restore created, was removed"),
            Abandoned::PartlyWritten => {
                format!("{what} is partly written: the restore did not finish")
            }
        }
    }
}

/// Open `target` (a path or an NBD URL) for a disk of `size` bytes.
///
/// Errors: a directory, a `--format qcow2` on a device or export, a device in use or too
/// small, an export that is read-only or too small -> [`crate::ErrorKind::Usage`]; a
/// non-empty file, or a device or export holding data, without `force` ->
/// [`crate::ErrorKind::AlreadyExists`]; OS and network errors naming the target.
pub fn open(target: &Path, size: u64, opts: &TargetOptions) -> Result<Box<dyn Target>> {
    let name = target.display().to_string();
    let not_qcow2 = |what: &str| {
        if opts.format == Some(Format::Qcow2) {
            return Err(Error::usage(format!(
                "--format qcow2 writes a file, but {name} is {what}: its format is its own"
            )));
        }
        Ok(())
    };
    if let Some(url) = target.to_str().filter(|t| is_nbd_url(t)) {
        not_qcow2("an NBD export")?;
        return Ok(Box::new(nbd::NbdExport::open(
            url, size, opts.force, &opts.nbd,
        )?));
    }
    if let Ok(md) = std::fs::metadata(target) {
        if md.file_type().is_block_device() {
            not_qcow2("a block device")?;
            return Ok(Box::new(device::Device::open(
                target,
                md.rdev(),
                size,
                opts.force,
            )?));
        }
    }
    let format = opts.format.unwrap_or(
        if target
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("qcow2"))
        {
            Format::Qcow2
        } else {
            Format::Raw
        },
    );
    if format == Format::Qcow2 {
        // Before the file is opened: a size qcow2 cannot hold must not empty an old file.
        qcow2_format::check_size(size, &name)?;
    }
    let (file, place) = file::open(target, opts.force)?;
    Ok(match format {
        Format::Raw => Box::new(file::RawFile::new(file, place, size)?),
        Format::Qcow2 => Box::new(qcow2::Qcow2Image::new(file, place, size)),
    })
}
