//! Target files: opening one (refusing to overwrite data without `--force`), removing it
//! again if the restore that created it fails, and the raw image written into it.
//!
//! A raw target is sized to the disk first (`set_len`: a file of holes), the stored slots'
//! bytes are allocated up front (so the parallel direct writes run in parallel in the
//! filesystem too: [`DirectWriter::allocate`]), then only the non-zero 4 KiB runs are
//! written, and the all-zero 4 KiB runs inside written slots are punched back to holes at
//! the end: the restored image is as sparse as the filesystem allows and zero slots cost
//! nothing.

use std::fs::{File, OpenOptions};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::direct::DirectWriter;
use super::sparse::{runs, BLOCK};
use super::{Abandoned, Format, Target, TargetKind};
use crate::error::{Error, ErrorKind, IoContext, Result};
use crate::io::PooledBuf;
use crate::util::lock;

/// Where a target file is, and whether this restore made it (and so removes it on failure).
pub(super) struct Place {
    pub(super) path: PathBuf,
    /// The path as given, for messages.
    pub(super) name: String,
    created: bool,
}

impl Place {
    /// What happens to the file when the restore fails: removed if this restore created
    /// it, else left partly written (it held something before; that is gone).
    pub(super) fn abandon(&self) -> Abandoned {
        if !self.created {
            return Abandoned::PartlyWritten;
        }
        match std::fs::remove_file(&self.path) {
            Ok(()) => Abandoned::Removed,
            Err(e) => {
                tracing::warn!(target = %self.name, error = %e, "cannot remove the target file");
                Abandoned::PartlyWritten
            }
        }
    }
}

/// Open the regular file at `path` for writing from scratch (emptied), creating it if it
/// does not exist. An existing non-empty file is refused unless `force`.
pub(super) fn open(path: &Path, force: bool) -> Result<(File, Place)> {
    let name = path.display().to_string();
    let place = |created| Place {
        path: path.to_owned(),
        name: name.clone(),
        created,
    };
    match std::fs::metadata(path) {
        Ok(md) if md.is_file() => {
            if md.len() > 0 && !force {
                return Err(Error::new(
                    ErrorKind::AlreadyExists,
                    format!("target {name} exists and is not empty; pass --force to overwrite it"),
                ));
            }
            let file = OpenOptions::new()
                .write(true)
                .truncate(true)
                .open(path)
                .ctx(|| format!("opening target {name}"))?;
            Ok((file, place(false)))
        }
        Ok(md) if md.is_dir() => Err(Error::usage(format!("target {name} is a directory"))),
        Ok(_) => Err(Error::usage(format!(
            "target {name} is neither a regular file nor a block device"
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(path)
                .ctx(|| format!("creating target {name}"))?;
            Ok((file, place(true)))
        }
        Err(e) => Err(Error::io(format!("stat target {name}"), e)),
    }
}

/// Zero runs held before they are punched: 64 Ki of them (1 MiB) at most, so memory stays
/// bounded however sparse the written slots are.
const PENDING_HOLES: usize = 1 << 16;

/// A raw image in a regular file.
pub(super) struct RawFile {
    out: DirectWriter,
    place: Place,
    /// All-zero runs inside written slots: allocated up front, holes again once punched.
    holes: Mutex<Vec<Range<u64>>>,
}

impl RawFile {
    /// Write a disk of `size` bytes into `file` (from [`open`]), sized at once (holes).
    pub(super) fn new(file: File, place: Place, size: u64) -> Result<RawFile> {
        if let Err(e) = file.set_len(size) {
            place.abandon();
            return Err(Error::io(
                format!(
                    "sizing target {} to {size} bytes (out of space?)",
                    place.name
                ),
                e,
            ));
        }
        Ok(RawFile {
            out: DirectWriter::new(&place.path, file, &place.name, true),
            place,
            holes: Mutex::new(Vec::new()),
        })
    }

    /// Note that `zeros` (runs inside a written slot, in order) are all zeros, under one
    /// lock per slot, punching the notes held once there are [`PENDING_HOLES`] (outside the
    /// lock: a punch waits for the direct writes in flight, and the other threads' notes
    /// need not).
    fn holes(&self, zeros: impl IntoIterator<Item = Range<u64>>) {
        let full = {
            let mut holes = lock(&self.holes);
            for run in zeros {
                match holes.last_mut() {
                    Some(last) if last.end == run.start => last.end = run.end,
                    _ => holes.push(run),
                }
            }
            (holes.len() >= PENDING_HOLES).then(|| std::mem::take(&mut *holes))
        };
        if let Some(holes) = full {
            self.punch(holes);
        }
    }

    /// The non-zero 4 KiB runs of `data` (to be written at `offset`), noting its zero runs
    /// as holes.
    fn runs(&self, offset: u64, data: &[u8]) -> Vec<Range<usize>> {
        let (zeros, data): (Vec<_>, Vec<_>) = runs(data, BLOCK).into_iter().partition(|r| r.1);
        let at = |r: Range<usize>| offset + r.start as u64..offset + r.end as u64;
        self.holes(zeros.into_iter().map(|(r, _)| at(r)));
        data.into_iter().map(|(r, _)| r).collect()
    }

    fn punch(&self, holes: Vec<Range<u64>>) {
        for h in holes {
            self.out.punch(h.start, h.end - h.start);
        }
    }
}

impl Target for RawFile {
    fn name(&self) -> &str {
        &self.place.name
    }

    fn kind(&self) -> TargetKind {
        TargetKind::File
    }

    fn format(&self) -> Format {
        Format::Raw
    }

    /// Only the non-zero 4 KiB runs; the zero runs between them are noted, to be punched.
    fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        for r in self.runs(offset, data) {
            self.out.write(&data[r.clone()], offset + r.start as u64)?;
        }
        Ok(())
    }

    fn write_buf(&self, offset: u64, buf: PooledBuf, part: Range<usize>) -> Result<()> {
        let runs = self.runs(offset, &buf[part.clone()]);
        let pieces = runs.into_iter().map(|r| {
            let at = offset + r.start as u64;
            (r, at)
        });
        self.out.write_owned(buf, part, pieces)
    }

    fn allocate(&self, offset: u64, len: u64) {
        self.out.allocate(offset, len);
    }

    /// Nothing: the file is holes until written.
    fn zero(&self, _offset: u64, _len: u64) -> Result<()> {
        Ok(())
    }

    fn finish(&self, sync: bool) -> Result<()> {
        self.out.drain()?;
        let holes = std::mem::take(&mut *lock(&self.holes));
        self.punch(holes);
        self.out.finish(sync)
    }

    fn abandon(&self) -> Abandoned {
        self.out.stop();
        self.place.abandon()
    }
}
