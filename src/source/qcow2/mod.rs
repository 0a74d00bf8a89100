//! qcow2 images, read natively and read-only: no QEMU process, no NBD hop.
//!
//! Model: a qcow2 file maps the virtual disk cluster by cluster (64 KiB by default) through a
//! two-level table; clusters it does not hold come from its backing file, itself raw or
//! qcow2. [`Qcow2`] opens the whole chain at once (header and L1 table of each image), then:
//! - [`Source::data_ranges`] walks the L1/L2 tables once per image and merges runs, so the
//!   map of a 1 TiB image with a few writes is a few ranges (`map.rs`);
//! - [`ReadAt::read_at`] translates each cluster of a request, from several reader threads
//!   at once; L2 tables come through a bounded per-image cache (`read.rs`, `tables.rs`);
//! - [`Source::dirty_ranges`] reads a persistent dirty bitmap (`bitmaps.rs`).
//!
//! ```text
//! top.qcow2 ── backing ──> mid.qcow2 ── backing ──> base.raw
//!   data ∪ (unallocated ∩ (data ∪ (unallocated ∩ holes-walk)))  = data_ranges
//! ```
//! Every offset, length and count read from a file is checked against the file's size (taken
//! at open) and against QEMU's own limits before it is used: a damaged image is an
//! [`ErrorKind::Integrity`] error naming the image, structure, field and file offset; a
//! feature this reader does not implement (encryption, external data files, unknown
//! incompatible bits) is [`ErrorKind::Unsupported`] ("unsupported qcow2 feature ...").
//! An image another process holds QEMU's write lock on (a running VM, qemu-nbd) is refused,
//! and an open image keeps writers out, as `qemu-img convert` does (`source/lock.rs`).
//! The byte layout is in docs/ARCHITECTURE.md, section "qcow2 source".

mod be;
mod bitmaps;
mod chain;
mod compress;
mod header;
mod image;
mod map;
mod read;
mod tables;

use super::{Access, BitmapInfo, ReadAt, Source, SourceKind};
use crate::changes::ChangeList;
use crate::error::{Error, ErrorKind, IoContext, Result};
use image::Image;
use std::ops::Range;
use std::os::unix::fs::FileExt;

/// A qcow2 image and its backing chain, opened read-only.
pub struct Qcow2 {
    image: Image,
}

impl Qcow2 {
    /// Open the qcow2 image at `path` and its backing files.
    ///
    /// Errors: not a regular file or no qcow2 magic -> [`ErrorKind::Usage`]; a backing file
    /// missing -> [`ErrorKind::NotFound`]; damaged metadata -> [`ErrorKind::Integrity`];
    /// features not implemented -> [`ErrorKind::Unsupported`]; OS errors ->
    /// [`ErrorKind::Io`]. Every message names the image concerned.
    pub fn open(path: &str) -> Result<Self> {
        Ok(Qcow2 {
            image: Image::open(path, 0)?,
        })
    }
}

impl std::fmt::Debug for Qcow2 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qcow2")
            .field("path", &self.image.path)
            .field("size", &self.image.header.size)
            .field("cluster_size", &self.image.header.geo.cluster_size())
            .finish_non_exhaustive()
    }
}

/// Whether the file at `path` starts with the qcow2 magic (`QFI\xfb`); shorter files do not.
pub fn is_qcow2(path: &str) -> Result<bool> {
    starts_with_magic(&image::open_regular(path, "file")?, path)
}

/// Whether `file` (at `path`, for messages) starts with the qcow2 magic.
fn starts_with_magic(file: &std::fs::File, path: &str) -> Result<bool> {
    let mut magic = [0; 4];
    let n = file
        .read_at(&mut magic, 0)
        .ctx(|| format!("cannot read the first bytes of {path}"))?;
    Ok(n == magic.len() && magic == header::MAGIC)
}

impl Source for Qcow2 {
    fn kind(&self) -> SourceKind {
        SourceKind::Qcow2
    }

    fn name(&self) -> &str {
        &self.image.path
    }

    fn size(&self) -> u64 {
        self.image.header.size
    }

    fn sector_size(&self) -> u32 {
        512
    }

    fn alignment(&self) -> usize {
        1
    }

    fn data_ranges(&self) -> Result<Vec<Range<u64>>> {
        self.image.data_ranges()
    }

    fn access(&self) -> Access<'_> {
        Access::Translated(self)
    }

    fn bitmaps(&self) -> Result<Vec<BitmapInfo>> {
        bitmaps::list(&self.image)
    }

    fn dirty_ranges(&self, name: &str) -> Result<ChangeList> {
        bitmaps::dirty_ranges(&self.image, name)
    }
}

impl ReadAt for Qcow2 {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let size = self.image.header.size;
        if offset
            .checked_add(buf.len() as u64)
            .is_none_or(|end| end > size)
        {
            return Err(Error::usage(format!(
                "read of {} bytes at offset {offset} is past the end of qcow2 image {} ({size} bytes)",
                buf.len(),
                self.image.path
            )));
        }
        self.image.read(offset, buf)
    }
}

/// A damaged-image error: "qcow2 image PATH: what".
fn integrity(image: &str, what: impl std::fmt::Display) -> Error {
    Error::integrity(format!("qcow2 image {image}: {what}"))
}

/// A not-implemented-feature error: "qcow2 image PATH: unsupported qcow2 feature: what".
fn unsupported(image: &str, feature: impl std::fmt::Display) -> Error {
    Error::new(
        ErrorKind::Unsupported,
        format!("qcow2 image {image}: unsupported qcow2 feature: {feature}"),
    )
}
