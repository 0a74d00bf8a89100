//! One qcow2 file of a chain: its header, its active L1 table, a cache of L2 tables and its
//! backing file. Opening reads only the first cluster and the L1 table; everything else is
//! read on demand.

use super::chain::{self, Backing};
use super::header::{self, Header, MAX_CLUSTER_BITS};
use super::tables::{self, L2Cache, L2Table};
use crate::error::{Error, IoContext, Result};
use crate::source::lock::{lock_for_reading, ImageFormat};
use std::fs::File;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::sync::Arc;

/// An open qcow2 file.
pub(super) struct Image {
    /// The path as given (or as resolved from the image above), for messages.
    pub path: String,
    pub file: File,
    pub header: Header,
    /// L2 table offset per L1 entry that maps the disk (0: no table).
    pub l1: Vec<u64>,
    l2_cache: L2Cache,
    /// What unallocated clusters read from.
    pub backing: Option<Backing>,
}

impl Image {
    /// Open `path`, `depth` images below the top of its chain, and its backing chain.
    pub fn open(path: &str, depth: usize) -> Result<Image> {
        let file = open_regular(path, "qcow2 image")?;
        lock_for_reading(&file, path, ImageFormat::Qcow2)?;
        let file_size = file
            .metadata()
            .ctx(|| format!("cannot inspect qcow2 image {path}"))?
            .len();
        let mut first = vec![0; file_size.min(1 << MAX_CLUSTER_BITS) as usize];
        file.read_exact_at(&mut first, 0)
            .ctx(|| format!("cannot read the header of qcow2 image {path}"))?;
        let header = header::parse(path, &first, file_size)?;
        drop(first);
        let geo = header.geo;
        // The header checked that the L1 table has at least this many entries.
        let needed = geo.l1_entries_for(header.size) as usize;
        let mut l1_bytes = vec![0; needed * 8];
        file.read_exact_at(&mut l1_bytes, header.l1_offset)
            .ctx(|| {
                format!(
                    "cannot read the L1 table of qcow2 image {path} at offset {}",
                    header.l1_offset
                )
            })?;
        let l1 = tables::l1_offsets(path, &geo, header.l1_offset, &l1_bytes)?;
        let backing = match &header.backing_file {
            None => None,
            Some(name) => Some(chain::open(
                path,
                name,
                header.backing_format.as_deref(),
                depth + 1,
            )?),
        };
        Ok(Image {
            path: path.to_owned(),
            file,
            l2_cache: L2Cache::new(&geo),
            header,
            l1,
            backing,
        })
    }

    /// The L2 table mapping guest offset `pos` (through the cache), or `None` where the L1
    /// entry is empty.
    pub fn l2_table_for(&self, pos: u64) -> Result<Option<Arc<L2Table>>> {
        let index = (pos >> self.header.geo.l1_span_bits()) as usize;
        match self.l1.get(index).copied() {
            None | Some(0) => Ok(None),
            Some(offset) => self.l2_cache.get(offset, || self.read_l2(offset)).map(Some),
        }
    }

    /// Read the L2 table at `offset` (checked when the L1 table was loaded), bypassing the
    /// cache.
    pub fn read_l2(&self, offset: u64) -> Result<L2Table> {
        let mut bytes = vec![0; self.header.geo.cluster_size() as usize];
        self.read_meta(offset, &mut bytes, "L2 table")?;
        Ok(L2Table::new(offset, &bytes))
    }

    /// Read metadata (`what`) that was bounds-checked against the file size at open.
    pub fn read_meta(&self, offset: u64, buf: &mut [u8], what: &str) -> Result<()> {
        self.file.read_exact_at(buf, offset).ctx(|| {
            format!(
                "cannot read the {what} of qcow2 image {} at offset {offset}",
                self.path
            )
        })
    }
}

/// Open `path` (a `what`, for messages) read-only, refusing anything but a regular file.
/// O_NONBLOCK keeps a FIFO named as a backing file from blocking the open; it changes
/// nothing for regular files.
pub(super) fn open_regular(path: &str, what: &str) -> Result<File> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .ctx(|| format!("cannot open {what} {path} for reading"))?;
    let meta = file
        .metadata()
        .ctx(|| format!("cannot inspect {what} {path}"))?;
    if !meta.is_file() {
        return Err(Error::usage(format!("{what} {path} is not a regular file")));
    }
    Ok(file)
}
