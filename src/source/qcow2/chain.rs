//! Backing files: what the clusters a qcow2 image leaves unallocated read from.
//!
//! The name in the header is resolved as QEMU does: absolute as is, relative to the folder of
//! the image that names it (not the working directory). Its format comes from the backing
//! format extension ("raw" or "qcow2"; others are unsupported) or, when absent, from probing
//! for the qcow2 magic. A backing file may be shorter than the image above it (the rest
//! reads as zeros) or longer (the rest is not part of the disk). A raw backing file may also
//! be a block device (an overlay on an LVM volume or a LUN), read buffered: the overlay's
//! requests are not sector-aligned. Chains are at most [`MAX_CHAIN`] images deep, which
//! also stops an image that names itself.

use super::image::{open_regular, Image};
use super::unsupported;
use crate::error::{Error, ErrorKind, IoContext, Result};
use crate::source::{Access, BlockDevice, OpenOptions, RawFile, Source};
use std::ops::Range;
use std::os::unix::fs::FileTypeExt;
use std::path::Path;

/// Most images a chain may hold, the top one included.
pub(super) const MAX_CHAIN: usize = 16;

/// An open backing file.
pub(super) enum Backing {
    /// A raw image, a file (holes from SEEK_DATA/SEEK_HOLE) or a block device: bytes at
    /// their offsets.
    Raw(Box<dyn Source>),
    /// A qcow2 image, with its own backing chain.
    Qcow2(Box<Image>),
}

/// Open the backing file `name` of `image`, which is `depth` images below the top.
pub(super) fn open(
    image: &str,
    name: &[u8],
    format: Option<&str>,
    depth: usize,
) -> Result<Backing> {
    let within = |e: Error| e.within(format_args!("backing file of qcow2 image {image}"));
    if depth >= MAX_CHAIN {
        return Err(unsupported(
            image,
            format_args!("a backing chain of more than {MAX_CHAIN} images (does it loop?)"),
        ));
    }
    let name = std::str::from_utf8(name).map_err(|_| {
        unsupported(
            image,
            format_args!(
                "a backing file name that is not UTF-8 ({})",
                String::from_utf8_lossy(name)
            ),
        )
    })?;
    // QEMU reads `proto:...` (a colon before any slash) as a protocol such as nbd: or json:.
    if name
        .split('/')
        .next()
        .is_some_and(|first| first.contains(':'))
    {
        return Err(unsupported(
            image,
            format_args!("a backing file that is not a local file ({name})"),
        ));
    }
    let path = Path::new(image)
        .parent()
        .unwrap_or(Path::new(""))
        .join(name);
    // `join` keeps an absolute name as is.
    let path = path.to_str().unwrap_or(name).to_owned();
    let device = is_block_device(&path);
    let format = match format {
        Some(f) => f.to_owned(),
        None if device && device_is_qcow2(&path).map_err(within)? => "qcow2".to_owned(),
        None if !device && super::is_qcow2(&path).map_err(within)? => "qcow2".to_owned(),
        None => "raw".to_owned(),
    };
    match format.as_str() {
        "qcow2" if device => Err(unsupported(
            image,
            format_args!("a qcow2 backing file on a block device ({path})"),
        )),
        "qcow2" => Ok(Backing::Qcow2(Box::new(
            Image::open(&path, depth).map_err(within)?,
        ))),
        "raw" if device => {
            let opts = OpenOptions {
                no_direct: true,
                ..Default::default()
            };
            Ok(Backing::Raw(Box::new(
                BlockDevice::open(&path, &opts).map_err(within)?,
            )))
        }
        "raw" => {
            // Checked first so that RawFile::open cannot block on a FIFO.
            open_regular(&path, "raw image").map_err(within)?;
            Ok(Backing::Raw(Box::new(
                RawFile::open(&path).map_err(within)?,
            )))
        }
        other => Err(unsupported(
            image,
            format_args!("a backing file of format {other} ({path}; only raw and qcow2 are read)"),
        )),
    }
}

/// Whether `path` is a block device (symlinks followed, as `/dev/vg/lv` is one); anything
/// else, a missing path included, is left to the regular-file checks and their messages.
fn is_block_device(path: &str) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device())
}

/// Whether the block device at `path` starts with the qcow2 magic (QEMU probes it too).
fn device_is_qcow2(path: &str) -> Result<bool> {
    let device = std::fs::File::open(path).ctx(|| format!("cannot open block device {path}"))?;
    super::starts_with_magic(&device, path)
}

impl Backing {
    /// Fill `buf` with the backing file's bytes at `offset`; past its end, zeros.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        match self {
            Backing::Qcow2(image) => image.read(offset, buf),
            Backing::Raw(raw) => {
                let inside = raw.size().saturating_sub(offset).min(buf.len() as u64) as usize;
                let (head, tail) = buf.split_at_mut(inside);
                tail.fill(0);
                if head.is_empty() {
                    return Ok(());
                }
                match raw.access() {
                    Access::Fd(fd) => pread_full(raw.name(), fd, offset, head),
                    Access::Translated(reader) => reader.read_at(offset, head),
                }
            }
        }
    }

    /// Where the backing file may hold data, within its own size.
    pub fn data_ranges(&self) -> Result<Vec<Range<u64>>> {
        match self {
            Backing::Qcow2(image) => image.data_ranges(),
            Backing::Raw(raw) => raw.data_ranges(),
        }
    }
}

/// Fill `buf` from `fd` at `offset`; a raw backing file that shrank since it was opened reads
/// as [`ErrorKind::SourceChanged`].
fn pread_full(
    name: &str,
    fd: std::os::fd::BorrowedFd<'_>,
    offset: u64,
    buf: &mut [u8],
) -> Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let at = offset + done as u64;
        let pos = i64::try_from(at).map_err(|_| {
            Error::new(
                ErrorKind::Usage,
                format!("offset {at} of backing file {name} is too large"),
            )
        })?;
        match nix::sys::uio::pread(fd, &mut buf[done..], pos) {
            Ok(0) => {
                return Err(Error::new(
                    ErrorKind::SourceChanged,
                    format!("backing file {name} ended at offset {at} while being read: it shrank"),
                ))
            }
            Ok(n) => done += n,
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => {
                return Err(Error::io(
                    format!("cannot read backing file {name} at offset {at}"),
                    std::io::Error::from(e),
                ))
            }
        }
    }
    Ok(())
}
