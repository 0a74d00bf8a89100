//! Block devices as sources.
//!
//! Model: the device is opened read-only with O_DIRECT, so reading a whole disk neither
//! evicts the host's page cache nor pays for copying through it. O_DIRECT makes the logical
//! sector size the required alignment of offsets, lengths and buffer addresses, which the
//! readers in [`crate::io`] honour. If the device (or the filesystem behind a loop device)
//! refuses O_DIRECT, or the caller asks for buffered reads, it is read through the page cache
//! with alignment 1. Size and sector size come from the kernel (BLKGETSIZE64, BLKSSZGET) at
//! open. A block device has no holes the kernel will tell us about: all of it is data.

use super::{not_a_disk, whole_range, Access, OpenOptions, Source, SourceKind};
use crate::error::{Error, ErrorKind, IoContext, Result};
use std::fs::File;
use std::ops::Range;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};

/// The two ioctls, kept private (the macros generate `pub` functions).
mod ioctl {
    // BLKGETSIZE64 is defined as _IOR(0x12, 114, size_t) but always writes a u64: encode the
    // request number with size_t's size (as the kernel header does) and pass a u64.
    nix::ioctl_read_bad!(
        blkgetsize64,
        nix::request_code_read!(0x12, 114, std::mem::size_of::<libc::size_t>()),
        u64
    );
    // BLKSSZGET is _IO(0x12, 104) = 0x1268 and writes an int.
    nix::ioctl_read_bad!(blksszget, 0x1268, libc::c_int);
}

/// A block device opened read-only, with O_DIRECT unless that is unavailable or refused.
#[derive(Debug)]
pub struct BlockDevice {
    file: File,
    name: String,
    size: u64,
    sector_size: u32,
    direct: bool,
}

impl BlockDevice {
    /// Open the block device at `path` (checked on the opened descriptor).
    pub fn open(path: &str, opts: &OpenOptions) -> Result<Self> {
        let (file, direct) = open_file(path, !opts.no_direct)?;
        let meta = file
            .metadata()
            .ctx(|| format!("cannot inspect source {path}"))?;
        if !meta.file_type().is_block_device() {
            return Err(not_a_disk(path, meta.file_type()));
        }
        let size = device_size(&file, path)?;
        let sector_size = logical_sector_size(&file, path)?;
        Ok(BlockDevice {
            file,
            name: path.to_owned(),
            size,
            sector_size,
            direct,
        })
    }

    /// Whether reads bypass the page cache (O_DIRECT).
    pub fn is_direct(&self) -> bool {
        self.direct
    }
}

/// Open read-only, with O_DIRECT if `direct`; fall back to buffered if O_DIRECT is refused.
fn open_file(path: &str, direct: bool) -> Result<(File, bool)> {
    let open = |flags: libc::c_int| {
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(flags)
            .open(path)
    };
    if direct {
        match open(libc::O_DIRECT) {
            Ok(file) => return Ok((file, true)),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                tracing::warn!(source = path, error = %e,
                    "O_DIRECT refused, reading the block device through the page cache");
            }
            Err(e) => {
                return Err(Error::io(
                    format!("cannot open source {path} for reading"),
                    e,
                ))
            }
        }
    }
    let file = open(0).ctx(|| format!("cannot open source {path} for reading"))?;
    Ok((file, false))
}

fn device_size(file: &File, path: &str) -> Result<u64> {
    let mut size: u64 = 0;
    // SAFETY: the fd is open (owned by `file`, borrowed for the call) and refers to a block
    // device; BLKGETSIZE64 writes exactly one u64 through the pointer, which points to a live,
    // writable, properly aligned u64.
    unsafe { ioctl::blkgetsize64(file.as_raw_fd(), &mut size) }.map_err(|e| {
        Error::io(
            format!("cannot get the size of block device {path} (BLKGETSIZE64)"),
            e.into(),
        )
    })?;
    Ok(size)
}

fn logical_sector_size(file: &File, path: &str) -> Result<u32> {
    let mut sector: libc::c_int = 0;
    // SAFETY: as for `device_size`; BLKSSZGET writes one int through a pointer to a live,
    // writable, aligned c_int.
    unsafe { ioctl::blksszget(file.as_raw_fd(), &mut sector) }.map_err(|e| {
        Error::io(
            format!("cannot get the sector size of block device {path} (BLKSSZGET)"),
            e.into(),
        )
    })?;
    match u32::try_from(sector) {
        Ok(s) if s >= 512 && s.is_power_of_two() => Ok(s),
        _ => Err(Error::new(
            ErrorKind::Unsupported,
            format!("block device {path} reports an invalid logical sector size {sector}"),
        )),
    }
}

impl Source for BlockDevice {
    fn kind(&self) -> SourceKind {
        SourceKind::BlockDevice
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn sector_size(&self) -> u32 {
        self.sector_size
    }

    fn alignment(&self) -> usize {
        if self.direct {
            self.sector_size as usize
        } else {
            1
        }
    }

    fn data_ranges(&self) -> Result<Vec<Range<u64>>> {
        Ok(whole_range(self.size))
    }

    fn access(&self) -> Access<'_> {
        Access::Fd(self.file.as_fd())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::source::{open, OpenOptions};
    use std::os::unix::fs::FileExt;
    use std::process::Command;

    /// A loop device over a file, detached on drop.
    pub(crate) struct LoopDev {
        pub(crate) path: String,
    }

    impl LoopDev {
        /// Attach `file`, or say loudly why not (not root, no losetup, no loop support).
        pub(crate) fn attach(file: &std::path::Path, test: &str) -> Option<LoopDev> {
            // SAFETY: geteuid has no preconditions and cannot fail.
            if unsafe { libc::geteuid() } != 0 {
                eprintln!("SKIP {test}: needs root for a loop device");
                return None;
            }
            let out = match Command::new("losetup")
                .args(["-f", "--show"])
                .arg(file)
                .output()
            {
                Ok(out) => out,
                Err(e) => {
                    eprintln!("SKIP {test}: cannot run losetup: {e}");
                    return None;
                }
            };
            if !out.status.success() {
                eprintln!(
                    "SKIP {test}: losetup failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
                return None;
            }
            let path = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            Some(LoopDev { path })
        }
    }

    impl Drop for LoopDev {
        fn drop(&mut self) {
            let _ = Command::new("losetup").arg("-d").arg(&self.path).status();
        }
    }

    /// A temp file of `len` bytes of a recognisable pattern.
    pub(crate) fn pattern_file(len: usize) -> (tempfile::NamedTempFile, Vec<u8>) {
        let data: Vec<u8> = (0..len).map(|i| (i * 7 + i / 4096) as u8).collect();
        let f = tempfile::NamedTempFile::new().expect("temp");
        f.as_file().write_all_at(&data, 0).expect("write");
        f.as_file().sync_all().expect("sync");
        (f, data)
    }

    #[test]
    fn loop_device_opens_direct_with_kernel_geometry() {
        let (f, _) = pattern_file(3 << 20);
        let Some(dev) = LoopDev::attach(f.path(), "loop_device_opens_direct_with_kernel_geometry")
        else {
            return;
        };
        let src = open(&dev.path, &OpenOptions::default()).expect("open loop device");
        assert_eq!(src.kind(), SourceKind::BlockDevice);
        assert_eq!(src.name(), dev.path);
        assert_eq!(src.size(), 3 << 20);
        assert!(src.sector_size() >= 512 && src.sector_size().is_power_of_two());
        assert_eq!(
            src.alignment(),
            src.sector_size() as usize,
            "O_DIRECT expected"
        );
        assert_eq!(src.data_ranges().expect("ranges"), vec![0..3 << 20]);

        let buffered = open(
            &dev.path,
            &OpenOptions {
                no_direct: true,
                ..Default::default()
            },
        )
        .expect("open");
        assert_eq!(buffered.alignment(), 1);
    }

    #[test]
    fn blockdev_open_rejects_regular_file() {
        let f = tempfile::NamedTempFile::new().expect("temp");
        let err = BlockDevice::open(f.path().to_str().expect("utf-8"), &OpenOptions::default())
            .expect_err("not a block device");
        assert_eq!(err.kind(), ErrorKind::Usage);
        assert!(err.to_string().contains("regular file"), "{err}");
    }
}
