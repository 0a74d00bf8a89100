//! QEMU's image locks: refuse an image file that a running QEMU process may be writing.
//!
//! A QEMU process (a VM, `qemu-nbd`, `qemu-io`, `qemu-img` writing) writes an image while it
//! runs: the guest's writes land in a raw image at any moment, so a backup read meanwhile can
//! be torn (half old, half new); a qcow2 image's L2 tables and refcounts are also kept in
//! memory and written back later, so its metadata may not yet map data the guest already
//! wrote, and a native read of it can be silently stale. QEMU advertises what it does with an
//! image file, whatever its format, through open-file-description (OFD) byte locks: for each
//! permission it holds it takes a shared lock on byte 100 + the permission's bit, so byte 101
//! (`BLK_PERM_WRITE`) is locked exactly while some process may write the image. `qemu-img
//! convert` refuses such an image ("Failed to get shared "write" lock"); so do the raw and
//! qcow2 readers, with a message naming the way out.
//!
//! Like `qemu-img convert`, a reader then holds the locks of a consistent reader that
//! does not share write permission — shared locks on bytes 100 (`BLK_PERM_CONSISTENT_READ`)
//! and 201 (`RAW_LOCK_SHARED_BASE` + `BLK_PERM_WRITE`) — for as long as the image stays
//! open, so a VM or qemu-nbd started during a backup fails to open the image for writing
//! instead of changing it under the reader. The locks belong to the open file and go with it.
//!
//! Block devices are not checked: backing up a device in use (a mounted file system, a
//! running VM's LUN) is the ordinary crash-consistent case, and QEMU's byte locks on a
//! device node say nothing about the device's other writers.
//!
//! Limits: QEMU started with `locking=off`, or a file system without byte-range locks, leaves
//! no trace, and nothing can be detected then. Read-only users (`qemu-nbd -r`, a VM's
//! backing files, `qemu-img convert`) take no write lock and are not refused.

use crate::error::{Error, Result};
use std::fs::File;

/// QEMU's `RAW_LOCK_PERM_BASE` + bit 1 (`BLK_PERM_WRITE`): locked while a process may write.
const WRITE_PERM_BYTE: i64 = 101;
/// `RAW_LOCK_PERM_BASE` + bit 0 (`BLK_PERM_CONSISTENT_READ`): this reader needs a stable image.
const CONSISTENT_READ_BYTE: i64 = 100;
/// `RAW_LOCK_SHARED_BASE` + bit 1: locked while a process lets no one else write.
const UNSHARED_WRITE_BYTE: i64 = 201;

/// An image file format, for the refusal's message.
#[derive(Debug, Clone, Copy)]
pub(crate) enum ImageFormat {
    /// A raw image: read by offset, its bytes may change under the reader.
    Raw,
    /// A qcow2 image: its metadata may lag behind what was written.
    Qcow2,
}

impl ImageFormat {
    fn name(self) -> &'static str {
        match self {
            ImageFormat::Raw => "raw image",
            ImageFormat::Qcow2 => "qcow2 image",
        }
    }

    /// What reading it while another process writes it would give.
    fn risk(self) -> &'static str {
        match self {
            ImageFormat::Raw => {
                "its bytes may change while they are read, so a backup of the file could be \
                 torn (part old, part new)"
            }
            ImageFormat::Qcow2 => {
                "its metadata may not yet map what was written, so a backup of the file could \
                 be silently stale"
            }
        }
    }
}

/// Take QEMU's locks of a reader that lets no one write `file` (the `format` image at
/// `path`) while it stays open, then fail with [`crate::ErrorKind::Usage`] when another
/// process already holds the write-permission lock.
pub(crate) fn lock_for_reading(file: &File, path: &str, format: ImageFormat) -> Result<()> {
    // Best effort: without OFD locks (an old kernel, some network file systems) QEMU takes
    // none either, and there is nothing to coordinate with.
    for byte in [UNSHARED_WRITE_BYTE, CONSISTENT_READ_BYTE] {
        let lock = flock(libc::F_RDLCK, byte);
        let _ = nix::fcntl::fcntl(file, nix::fcntl::FcntlArg::F_OFD_SETLK(&lock));
    }
    if !write_locked(file) {
        return Ok(());
    }
    Err(Error::usage(format!(
        "{} {path} is open for writing by another process (it holds QEMU's write lock: a \
         running VM, qemu-nbd, qemu-io or qemu-img): {}; stop that process, or back up the \
         running VM's disk through an NBD export (nbd://...) instead",
        format.name(),
        format.risk()
    )))
}

/// Whether another open file description holds a lock on [`WRITE_PERM_BYTE`] of `file`. A
/// kernel or file system that cannot answer (no OFD locks) counts as unlocked: nothing can
/// be known, and QEMU then takes no locks either.
fn write_locked(file: &File) -> bool {
    // "Could an exclusive lock on the byte be taken?" F_GETLK answers with the conflicting
    // lock, or F_UNLCK.
    let mut probe = flock(libc::F_WRLCK, WRITE_PERM_BYTE);
    match nix::fcntl::fcntl(file, nix::fcntl::FcntlArg::F_OFD_GETLK(&mut probe)) {
        Ok(_) => probe.l_type != libc::F_UNLCK as libc::c_short,
        Err(_) => false,
    }
}

/// A lock of `kind` (F_RDLCK, F_WRLCK) on the single byte at `byte`.
fn flock(kind: libc::c_int, byte: i64) -> libc::flock {
    libc::flock {
        l_type: kind as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: byte,
        l_len: 1,
        // Must be 0 for OFD locks.
        l_pid: 0,
    }
}
