//! Target files: opening one (refusing to overwrite data without `--force`), removing it
//! again if the restore that created it fails, and the raw image written into it.
//!
//! A raw target is sized to the disk first (`set_len`: a file of holes), then only the
//! non-zero 4 KiB runs are written, so the restored image is as sparse as the filesystem
//! allows and zero slots cost nothing.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use super::direct::DirectWriter;
use super::sparse::{data_runs, BLOCK};
use super::{Abandoned, Format, Target, TargetKind};
use crate::error::{Error, ErrorKind, IoContext, Result};

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

/// A raw image in a regular file.
pub(super) struct RawFile {
    out: DirectWriter,
    place: Place,
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
            out: DirectWriter::new(&place.path, file, &place.name),
            place,
        })
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

    /// Only the non-zero 4 KiB runs: the rest is already a hole.
    fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        data_runs(data, BLOCK)
            .try_for_each(|r| self.out.write(&data[r.clone()], offset + r.start as u64))
    }

    /// Nothing: the file is holes until written.
    fn zero(&self, _offset: u64, _len: u64) -> Result<()> {
        Ok(())
    }

    fn finish(&self, sync: bool) -> Result<()> {
        self.out.finish(sync)
    }

    fn abandon(&self) -> Abandoned {
        self.place.abandon()
    }
}
