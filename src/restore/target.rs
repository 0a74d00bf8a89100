//! Where a restore writes: a regular file (created sparse) or a block device (must be large
//! enough; zero slots are written as zeros since a device keeps old data).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::Path;

use crate::engine::worker::is_zero;
use crate::error::{Error, ErrorKind, IoContext, Result};

/// Granularity of holes left in restored files (the usual filesystem block).
const SPARSE_BLOCK: usize = 4096;

/// An open restore target.
pub struct Target {
    file: File,
    /// True for a block device.
    pub is_device: bool,
    /// True if this restore created the file (removed again if the restore fails).
    pub created: bool,
    name: String,
}

impl Target {
    /// Open `path` for a disk of `size` bytes. An existing non-empty regular file is refused
    /// unless `force`; a block device smaller than `size` is always refused.
    pub fn open(path: &Path, size: u64, force: bool) -> Result<Target> {
        let name = path.display().to_string();
        match std::fs::metadata(path) {
            Ok(md) if md.file_type().is_block_device() => {
                let file = OpenOptions::new()
                    .write(true)
                    .open(path)
                    .ctx(|| format!("opening target device {name}"))?;
                let dev_size = device_size(&file).ctx(|| format!("reading the size of {name}"))?;
                if dev_size < size {
                    return Err(Error::usage(format!(
                        "target device {name} holds {dev_size} bytes, the disk needs {size}"
                    )));
                }
                Ok(Target {
                    file,
                    is_device: true,
                    created: false,
                    name,
                })
            }
            Ok(md) if md.is_dir() => Err(Error::usage(format!("target {name} is a directory"))),
            Ok(md) => {
                if md.len() > 0 && !force {
                    return Err(Error::new(
                        ErrorKind::AlreadyExists,
                        format!(
                            "target {name} exists and is not empty; pass --force to overwrite it"
                        ),
                    ));
                }
                let file = OpenOptions::new()
                    .write(true)
                    .truncate(true)
                    .open(path)
                    .ctx(|| format!("opening target {name}"))?;
                file.set_len(size)
                    .ctx(|| format!("sizing target {name} to {size} bytes (out of space?)"))?;
                Ok(Target {
                    file,
                    is_device: false,
                    created: false,
                    name,
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let file = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(path)
                    .ctx(|| format!("creating target {name}"))?;
                file.set_len(size)
                    .ctx(|| format!("sizing target {name} to {size} bytes (out of space?)"))?;
                Ok(Target {
                    file,
                    is_device: false,
                    created: true,
                    name,
                })
            }
            Err(e) => Err(Error::io(format!("stat target {name}"), e)),
        }
    }

    /// Write slot content at `offset`. On a file (sparse zeros after `set_len`) runs of
    /// all-zero 4 KiB blocks are skipped: less I/O, and the restored image stays sparse.
    pub fn write_slot(&self, data: &[u8], offset: u64) -> Result<()> {
        if self.is_device {
            return self.write_at(data, offset);
        }
        let mut run: Option<usize> = None;
        for (i, block) in data.chunks(SPARSE_BLOCK).enumerate() {
            let at = i * SPARSE_BLOCK;
            match (is_zero(block), run) {
                (false, None) => run = Some(at),
                (true, Some(start)) => {
                    self.write_at(&data[start..at], offset + start as u64)?;
                    run = None;
                }
                _ => {}
            }
        }
        if let Some(start) = run {
            self.write_at(&data[start..], offset + start as u64)?;
        }
        Ok(())
    }

    /// Write `data` at `offset`.
    pub fn write_at(&self, data: &[u8], offset: u64) -> Result<()> {
        self.file.write_all_at(data, offset).ctx(|| {
            format!(
                "writing {} bytes at offset {offset} of {}",
                data.len(),
                self.name
            )
        })
    }

    /// Make `len` bytes at `offset` read as zero. Files are already sparse zeros after
    /// `set_len`; devices get explicit zeros.
    pub fn zero(&self, offset: u64, len: usize) -> Result<()> {
        if !self.is_device {
            return Ok(());
        }
        self.write_at(&vec![0u8; len], offset)
    }

    /// Flush to stable storage.
    pub fn sync(&self) -> Result<()> {
        self.file
            .sync_all()
            .ctx(|| format!("syncing {}", self.name))
    }
}

fn device_size(f: &File) -> std::io::Result<u64> {
    use std::io::{Seek, SeekFrom};
    let mut f = f;
    let n = f.seek(SeekFrom::End(0))?;
    f.seek(SeekFrom::Start(0))?;
    Ok(n)
}
