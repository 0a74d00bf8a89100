//! Sources: the disks being backed up, read by offset.
//!
//! Model: a [`Source`] is a fixed-size byte array fixed at open time, readable at any offset
//! (by the readers in [`crate::io`], see [`Access`]), plus a map of where data may be
//! ([`Source::data_ranges`]); everything outside that map reads as zeros and need not be
//! read at all. Sources that track changes also name their dirty bitmaps
//! ([`Source::bitmaps`], [`Source::dirty_ranges`]). Implementations:
//! - [`RawFile`]: a regular file (VM disk image), read through the page cache; holes come
//!   from `SEEK_DATA`/`SEEK_HOLE`, so sparse images cost only their allocated blocks;
//! - [`BlockDevice`]: a block device, read with O_DIRECT so a full-disk backup does not
//!   evict the host's page cache; the whole device counts as data;
//! - [`NbdSource`]: an NBD export (`nbd://`, `nbd+unix://`), read with pipelined requests;
//!   data ranges and dirty bitmaps come from NBD block status;
//! - [`Qcow2`]: a qcow2 image (and its backing chain), read natively through [`ReadAt`]; its
//!   L1/L2 map gives the data ranges and its persistent bitmaps the dirty ranges.
//!
//! [`open`] probes the path (or URL) and picks the implementation: an `nbd://` URL is an NBD
//! export, a regular file starting with the qcow2 magic a qcow2 image, any other regular file
//! a raw image.

pub mod blockdev;
mod lock;
pub mod nbd;
pub mod qcow2;
pub mod raw;

pub use blockdev::BlockDevice;
pub use nbd::{NbdOptions, NbdSource};
pub use qcow2::Qcow2;
pub use raw::RawFile;

use crate::changes::ChangeList;
use crate::error::{Error, ErrorKind, Result};
use std::fs::FileType;
use std::ops::Range;
use std::os::fd::BorrowedFd;
use std::os::unix::fs::FileTypeExt;

/// What kind of thing a source is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SourceKind {
    /// A regular file, e.g. a raw VM disk image.
    RawFile,
    /// A block device, e.g. `/dev/nvme0n1p2` or a logical volume.
    BlockDevice,
    /// A qcow2 image file, read natively.
    Qcow2,
    /// An NBD export (`nbd://` or `nbd+unix://`).
    Nbd,
}

impl std::fmt::Display for SourceKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SourceKind::RawFile => "raw image",
            SourceKind::BlockDevice => "block device",
            SourceKind::Qcow2 => "qcow2 image",
            SourceKind::Nbd => "NBD export",
        })
    }
}

/// How the readers reach a source's bytes.
pub enum Access<'a> {
    /// A descriptor whose offsets are the disk's offsets: read with io_uring or pread.
    Fd(BorrowedFd<'a>),
    /// A reader that translates disk offsets itself (qcow2 clusters, NBD requests); the
    /// readers call it from several threads at once to keep reads in flight.
    Translated(&'a dyn ReadAt),
}

/// Positional reads of a translated source.
pub trait ReadAt: Send + Sync {
    /// Fill all of `buf` with the disk's bytes at `offset`; the range lies within the
    /// source's size. Errors name the source and offset; a source that no longer holds the
    /// range is [`ErrorKind::SourceChanged`].
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()>;
}

/// A persistent dirty bitmap a source carries (qcow2 bitmaps, NBD `qemu:dirty-bitmap:`).
///
/// What a source cannot tell stays `None` rather than a guess: NBD carries neither a bitmap's
/// granularity nor whether it still records writes, and an incremental must not trust a
/// bitmap more than the source showed (see [`crate::changes::lineage`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct BitmapInfo {
    /// The bitmap's name.
    pub name: String,
    /// Bytes covered by one bit; `None` where the source does not say (NBD).
    pub granularity: Option<u64>,
    /// Whether QEMU records writes in it; `None` where the source does not say (NBD: an
    /// export offers a bitmap whether or not it is enabled).
    pub enabled: Option<bool>,
    /// Left in use by a QEMU that did not close it cleanly: stale, refused for backups.
    pub in_use: bool,
    /// Bytes it marks dirty (within the disk), where that is cheap to learn: qcow2 from its
    /// bitmap data, NBD from block status over a context negotiated at open.
    pub dirty_bytes: Option<u64>,
}

/// A disk to back up, read by offset. Contract: `size()` is fixed at open; bytes outside
/// `data_ranges()` read as zero.
pub trait Source: Send + Sync {
    /// Which implementation this is.
    fn kind(&self) -> SourceKind;
    /// The path as given, for messages.
    fn name(&self) -> &str;
    /// Size in bytes (fixed when opened).
    fn size(&self) -> u64;
    /// Logical sector size (BLKSSZGET for block devices, 512 for files).
    fn sector_size(&self) -> u32;
    /// Required alignment (bytes) of read offsets, lengths and buffer addresses: 1 for
    /// buffered files, the logical sector size for O_DIRECT block devices. A read whose end
    /// is the source's end may be shorter than aligned.
    fn alignment(&self) -> usize;
    /// Sorted, non-overlapping, non-empty byte ranges within `[0,size)` that may hold data;
    /// everything else is a hole and reads as zeros. Raw files: walked with lseek
    /// SEEK_DATA/SEEK_HOLE (if the filesystem does not support it, one range covering the
    /// file). Block devices: one range `[0,size)`.
    fn data_ranges(&self) -> Result<Vec<Range<u64>>>;
    /// How readers get the bytes.
    fn access(&self) -> Access<'_>;
    /// The dirty bitmaps the source carries; none for raw files and block devices.
    fn bitmaps(&self) -> Result<Vec<BitmapInfo>> {
        Ok(Vec::new())
    }
    /// What bitmap `name` marks as written since it was last cleared. Errors: no such
    /// bitmap, or one left in use (stale) -> [`ErrorKind::Usage`].
    fn dirty_ranges(&self, name: &str) -> Result<ChangeList> {
        Err(Error::usage(format!(
            "source {} has no dirty bitmap {name}: a {} carries no bitmaps (use a qcow2 image or an NBD export)",
            self.name(),
            self.kind()
        )))
    }
}

/// Options for opening a source.
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// Do not use O_DIRECT even on block devices.
    pub no_direct: bool,
    /// How to open an `nbd://` source (its timeout).
    pub nbd: NbdOptions,
}

/// Probe `path` and open the right implementation (symlinks are followed, so
/// `/dev/disk/by-id/...` works). An `nbd://` or `nbd+unix://` URL (any `nbd*://`, so that
/// TLS and vsock get a clear Unsupported error) opens an [`NbdSource`] with `opts.nbd`,
/// before any file is looked for.
///
/// Errors: path missing -> [`ErrorKind::NotFound`]; a directory or any other non-regular,
/// non-block file -> [`ErrorKind::Usage`]; permission and other OS errors -> [`ErrorKind::Io`]
/// naming the path; a damaged or unsupported qcow2 image -> see [`Qcow2::open`].
pub fn open(path: &str, opts: &OpenOptions) -> Result<Box<dyn Source>> {
    if nbd::is_nbd_url(path) {
        return Ok(Box::new(NbdSource::open(path, &opts.nbd)?));
    }
    let meta = match std::fs::metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(
                Error::new(ErrorKind::NotFound, format!("source {path} does not exist"))
                    .with_source(e),
            )
        }
        Err(e) => return Err(Error::io(format!("cannot inspect source {path}"), e)),
    };
    let file_type = meta.file_type();
    if file_type.is_dir() {
        return Err(Error::usage(format!(
            "source {path} is a directory, not a disk image or block device"
        )));
    }
    if file_type.is_block_device() {
        return Ok(Box::new(BlockDevice::open(path, opts)?));
    }
    if file_type.is_file() {
        if qcow2::is_qcow2(path)? {
            return Ok(Box::new(Qcow2::open(path)?));
        }
        return Ok(Box::new(RawFile::open(path)?));
    }
    Err(not_a_disk(path, file_type))
}

/// `[0,size)` as a data-range list, or nothing for an empty source.
pub(crate) fn whole_range(size: u64) -> Vec<Range<u64>> {
    // `vec![0..size]` reads like a Vec of every offset; spell out the single element.
    std::iter::once(0..size).filter(|r| !r.is_empty()).collect()
}

/// The Usage error for a path that is neither a regular file nor a block device.
pub(crate) fn not_a_disk(path: &str, file_type: FileType) -> Error {
    let what = if file_type.is_dir() {
        "a directory"
    } else if file_type.is_char_device() {
        "a character device"
    } else if file_type.is_fifo() {
        "a FIFO"
    } else if file_type.is_socket() {
        "a socket"
    } else if file_type.is_block_device() {
        "a block device"
    } else if file_type.is_file() {
        "a regular file"
    } else {
        "not a regular file"
    };
    Error::usage(format!(
        "source {path} is {what}, not a disk image or block device"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_path_is_not_found() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("nope.img");
        let path = path.to_str().expect("utf-8");
        let err = open(path, &OpenOptions::default()).err().expect("error");
        assert_eq!(err.kind(), ErrorKind::NotFound);
        assert_eq!(err.to_string(), format!("source {path} does not exist"));
    }

    #[test]
    fn directory_is_usage() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().to_str().expect("utf-8");
        let err = open(path, &OpenOptions::default()).err().expect("error");
        assert_eq!(err.kind(), ErrorKind::Usage);
        assert_eq!(
            err.to_string(),
            format!("source {path} is a directory, not a disk image or block device")
        );
    }

    #[test]
    fn char_device_is_usage() {
        let err = open("/dev/null", &OpenOptions::default())
            .err()
            .expect("error");
        assert_eq!(err.kind(), ErrorKind::Usage);
        assert!(err.to_string().contains("character device"), "{err}");
    }

    #[test]
    fn regular_file_opens_as_raw() {
        let mut f = tempfile::NamedTempFile::new().expect("temp");
        std::io::Write::write_all(&mut f, &[1u8; 1000]).expect("write");
        let path = f.path().to_str().expect("utf-8");
        let src = open(path, &OpenOptions::default()).expect("open");
        assert_eq!(src.kind(), SourceKind::RawFile);
        assert_eq!(src.name(), path);
        assert_eq!(src.size(), 1000);
        assert_eq!(src.sector_size(), 512);
        assert_eq!(src.alignment(), 1);
    }

    #[test]
    fn unreadable_file_is_io_with_path() {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } == 0 {
            eprintln!("SKIP unreadable_file_is_io_with_path: root can read anything");
            return;
        }
        use std::os::unix::fs::PermissionsExt;
        let f = tempfile::NamedTempFile::new().expect("temp");
        std::fs::set_permissions(f.path(), std::fs::Permissions::from_mode(0o000)).expect("chmod");
        let path = f.path().to_str().expect("utf-8");
        let err = open(path, &OpenOptions::default()).err().expect("error");
        assert_eq!(err.kind(), ErrorKind::Io);
        assert!(err.to_string().contains(path), "{err}");
    }
}
