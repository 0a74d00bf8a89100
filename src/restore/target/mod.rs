//! Where a restore writes: a regular file (created sparse) or a block device (must be large
//! enough; zero slots are written as zeros since a device keeps old data).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::Path;

use std::cell::RefCell;
use std::os::unix::fs::OpenOptionsExt;

use crate::engine::worker::is_zero;
use crate::error::{Error, ErrorKind, IoContext, Result};
use crate::io::AlignedBuf;

/// Granularity of holes left in restored files (the usual filesystem block).
const SPARSE_BLOCK: usize = 4096;
/// Alignment of O_DIRECT writes: covers 512- and 4096-byte logical blocks.
const DIRECT_ALIGN: usize = 4096;

thread_local! {
    /// Each restore thread's aligned staging buffer for O_DIRECT writes.
    static ALIGNED: RefCell<AlignedBuf> = RefCell::new(AlignedBuf::new(0, DIRECT_ALIGN));
}

/// An open restore target.
pub struct Target {
    file: File,
    /// The same file opened with O_DIRECT, where the filesystem allows it: restored data goes
    /// to the device without a page-cache copy and without a long flush at the end (measured
    /// here: 1.7 GB/s direct vs 0.7 GB/s buffered + fsync).
    direct: Option<File>,
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
                Ok(Target::with_direct(path, file, true, false, name))
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
                Ok(Target::with_direct(path, file, false, false, name))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let file = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(path)
                    .ctx(|| format!("creating target {name}"))?;
                file.set_len(size)
                    .ctx(|| format!("sizing target {name} to {size} bytes (out of space?)"))?;
                Ok(Target::with_direct(path, file, false, true, name))
            }
            Err(e) => Err(Error::io(format!("stat target {name}"), e)),
        }
    }

    fn with_direct(
        path: &Path,
        file: File,
        is_device: bool,
        created: bool,
        name: String,
    ) -> Target {
        let direct = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .map_err(|e| tracing::debug!(target = %name, error = %e, "O_DIRECT unavailable; buffered writes"))
            .ok();
        Target {
            file,
            direct,
            is_device,
            created,
            name,
        }
    }

    /// Write slot content at `offset`. On a file (sparse zeros after `set_len`) runs of
    /// all-zero 4 KiB blocks are skipped: less I/O, and the restored image stays sparse.
    pub fn write_slot(&self, data: &[u8], offset: u64) -> Result<()> {
        let direct = self
            .direct
            .as_ref()
            .filter(|_| offset.is_multiple_of(DIRECT_ALIGN as u64));
        let Some(direct) = direct else {
            return self.write_runs(data, offset, &|run, at| self.write_at(run, at));
        };
        ALIGNED.with(|cell| {
            let mut buf = cell.borrow_mut();
            if buf.capacity() < data.len() {
                *buf = AlignedBuf::new(data.len(), DIRECT_ALIGN);
            }
            buf.set_len(data.len());
            buf.copy_from_slice(data);
            self.write_runs(&buf, offset, &|run, at| {
                // O_DIRECT needs whole aligned blocks: an unaligned tail (only at the disk's
                // end) goes through the buffered descriptor.
                let whole = run.len() / DIRECT_ALIGN * DIRECT_ALIGN;
                direct
                    .write_all_at(&run[..whole], at)
                    .ctx(|| format!("writing {whole} bytes at offset {at} of {}", self.name))?;
                if whole < run.len() {
                    self.write_at(&run[whole..], at + whole as u64)?;
                }
                Ok(())
            })
        })
    }

    /// Call `write` for each run to store: all of `data` on a device, the non-zero 4 KiB
    /// runs on a file.
    fn write_runs(
        &self,
        data: &[u8],
        offset: u64,
        write: &dyn Fn(&[u8], u64) -> Result<()>,
    ) -> Result<()> {
        if self.is_device {
            return write(data, offset);
        }
        let mut run: Option<usize> = None;
        for (i, block) in data.chunks(SPARSE_BLOCK).enumerate() {
            let at = i * SPARSE_BLOCK;
            match (is_zero(block), run) {
                (false, None) => run = Some(at),
                (true, Some(start)) => {
                    write(&data[start..at], offset + start as u64)?;
                    run = None;
                }
                _ => {}
            }
        }
        if let Some(start) = run {
            write(&data[start..], offset + start as u64)?;
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
        // One shared block of zeros (never written, so it costs no memory), through the same
        // O_DIRECT path as data.
        static ZEROS: [u8; crate::vault::frame::MAX_PLAIN] = [0; crate::vault::frame::MAX_PLAIN];
        self.write_slot(&ZEROS[..len], offset)
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
