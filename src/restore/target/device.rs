//! Block devices as restore targets: a whole disk, a partition, a logical volume, a LUN.
//!
//! Three gates before the first write, in this order:
//! 1. in use: a device mounted (itself or a partition), held by device-mapper / md, or
//!    opened exclusively by another program is refused, `--force` or not ([`super::in_use`]
//!    names who, the O_EXCL open catches the rest). The device stays open with O_EXCL for
//!    the whole restore, so nothing can mount it meanwhile;
//! 2. size: it must hold the disk (bytes past the disk are left alone);
//! 3. content: one that holds data ([`super::occupied`]) needs `--force`.
//!
//! Every byte of the disk is written, zeros included: a device keeps its old data. Zero slots
//! are zeroed by the kernel (`BLKZEROOUT`: the device's WRITE ZEROES where it has one, else
//! zero pages the kernel writes itself), so a mostly empty disk costs neither a copy nor a
//! write from here; where the ioctl is refused, or with `BLOCKVAULT_WRITER=pwrite`, they are
//! written from a block of zeros.

use std::fs::{File, OpenOptions};
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::direct::DirectWriter;
use super::{in_use, occupied, Abandoned, Format, Target, TargetKind};
use crate::error::{Error, ErrorKind, IoContext, Result};
use crate::io::PooledBuf;
use crate::vault::frame::MAX_PLAIN;
use nix::errno::Errno;

/// `BLKZEROOUT` (`_IO(0x12, 127)`), kept private (the macro generates a `pub` function).
mod ioctl {
    nix::ioctl_write_ptr_bad!(blkzeroout, nix::request_code_none!(0x12, 127), [u64; 2]);
}

/// Zeroing by `BLKZEROOUT` goes in whole 4 KiB blocks (covers 512- and 4096-byte sectors).
const ZEROOUT_ALIGN: u64 = 4096;

/// A block device open for writing, exclusively.
pub(super) struct Device {
    out: DirectWriter,
    name: String,
    /// Whether `BLKZEROOUT` is worth trying: off once the device or kernel refused it, and
    /// with `BLOCKVAULT_WRITER=pwrite` (every byte written with `pwrite`, as before).
    zeroout: AtomicBool,
    /// Bytes the kernel zeroed, for the trace.
    zeroed: AtomicU64,
}

impl Device {
    /// Open the block device at `path` (`rdev` its device number) for a disk of `size` bytes.
    pub(super) fn open(path: &Path, rdev: u64, size: u64, force: bool) -> Result<Device> {
        let name = path.display().to_string();
        let busy = |users: &[String]| {
            Error::usage(format!(
                "target device {name} is in use: {}; stop using it first (--force does not \
                 override this)",
                users.join("; ")
            ))
        };
        let users = in_use::users(rdev, path);
        if !users.is_empty() {
            return Err(busy(&users));
        }
        let file = match OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_EXCL)
            .open(path)
        {
            Ok(f) => f,
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                // Mounted or claimed between the look and the open, or by something the look
                // cannot see.
                let mut users = in_use::users(rdev, path);
                if users.is_empty() {
                    users.push(
                        "another program holds it open exclusively (a mount in another \
                         namespace, a VM, LVM, RAID or swap)"
                            .into(),
                    );
                }
                return Err(busy(&users));
            }
            Err(e) => return Err(Error::io(format!("opening target device {name}"), e)),
        };
        let dev_size = device_size(&file).ctx(|| format!("reading the size of {name}"))?;
        if dev_size < size {
            return Err(Error::usage(format!(
                "target device {name} holds {dev_size} bytes, the disk needs {size}"
            )));
        }
        if !force {
            let read = |offset: u64, buf: &mut [u8]| {
                file.read_exact_at(buf, offset)
                    .ctx(|| format!("reading target device {name} at offset {offset}"))
            };
            if let Some(what) = occupied::holds_data(&read, dev_size)? {
                return Err(Error::new(
                    ErrorKind::AlreadyExists,
                    format!(
                        "target device {name} holds data ({what}); pass --force to overwrite it"
                    ),
                ));
            }
        }
        Ok(Device {
            out: DirectWriter::new(path, file, &name, true),
            name,
            zeroout: AtomicBool::new(!crate::io::plain_writes_only()),
            zeroed: AtomicU64::new(0),
        })
    }

    /// Have the kernel zero `len` bytes at `offset` (both multiples of [`ZEROOUT_ALIGN`]);
    /// whether it did. A refusal (no such ioctl, a device that cannot) turns it off for the
    /// rest of the restore; either way the caller writes the zeros itself after a `false`,
    /// so a real I/O error is reported by that write.
    fn zero_out(&self, offset: u64, len: u64) -> bool {
        if !self.zeroout.load(Ordering::Relaxed) {
            return false;
        }
        let range = [offset, len];
        // SAFETY: BLKZEROOUT reads two u64s (start, length) from the pointer, which points
        // at `range` for the duration of the call; the fd is the device's, open for writing.
        match unsafe { ioctl::blkzeroout(self.out.file().as_raw_fd(), &range) } {
            Ok(_) => {
                self.zeroed.fetch_add(len, Ordering::Relaxed);
                true
            }
            Err(e) => {
                if matches!(
                    e,
                    Errno::ENOTTY | Errno::EOPNOTSUPP | Errno::EINVAL | Errno::EPERM
                ) {
                    self.zeroout.store(false, Ordering::Relaxed);
                }
                tracing::debug!(target = %self.name, offset, len, error = %e, "BLKZEROOUT refused; writing zeros");
                false
            }
        }
    }
}

impl Target for Device {
    fn name(&self) -> &str {
        &self.name
    }

    fn kind(&self) -> TargetKind {
        TargetKind::Device
    }

    fn format(&self) -> Format {
        Format::Raw
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.out.write(data, offset)
    }

    fn write_buf(&self, offset: u64, buf: PooledBuf, part: Range<usize>) -> Result<()> {
        let len = part.len();
        self.out.write_owned(buf, part, [(0..len, offset)])
    }

    /// Zeroed by the kernel where it can ([`Device::zero_out`]), else written from one shared
    /// block of zeros (never written to, so it costs no memory).
    fn zero(&self, offset: u64, len: u64) -> Result<()> {
        if offset.is_multiple_of(ZEROOUT_ALIGN)
            && len.is_multiple_of(ZEROOUT_ALIGN)
            && self.zero_out(offset, len)
        {
            return Ok(());
        }
        static ZEROS: [u8; MAX_PLAIN] = [0; MAX_PLAIN];
        let mut pos = 0;
        while pos < len {
            let n = (len - pos).min(MAX_PLAIN as u64);
            self.out.write(&ZEROS[..n as usize], offset + pos)?;
            pos += n;
        }
        Ok(())
    }

    fn finish(&self, sync: bool) -> Result<()> {
        let zeroed = self.zeroed.load(Ordering::Relaxed);
        if zeroed > 0 {
            tracing::debug!(target = %self.name, bytes = zeroed, "BLKZEROOUT zeroed the zero slots");
        }
        self.out.finish(sync)
    }

    fn abandon(&self) -> Abandoned {
        self.out.stop();
        Abandoned::PartlyWritten
    }
}

fn device_size(f: &File) -> std::io::Result<u64> {
    use std::io::{Seek, SeekFrom};
    let mut f = f;
    let n = f.seek(SeekFrom::End(0))?;
    f.seek(SeekFrom::Start(0))?;
    Ok(n)
}
