//! `mount`: a vault's snapshots as read-only files over FUSE, for getting files out of a
//! backup without restoring the disk (`losetup -r -P` on a snapshot's file, then `mount -o ro`
//! its partition).
//!
//! ```text
//!  MOUNTPOINT/            inode 1
//!    DISK/                one folder per disk (inode 2 + disk index)
//!      TIME_ID.raw        one raw image per snapshot, named by its RFC 3339 time and short id
//! ```
//! Every read goes through the snapshot's [`SnapshotReader`] (built on first use, so a vault
//! of many snapshots costs nothing until one is read; each keeps up to `CACHE_BYTES` of
//! decrypted slots). A read that meets a damaged slot fails with EIO; its error, naming the
//! object and the range, goes to the log. The session ends when the mountpoint is unmounted
//! (`umount`, `fusermount3 -u`) or on SIGINT/SIGTERM, which unmount it.

use std::ffi::OsStr;
use std::path::Path;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    FileAttr, FileType, Filesystem, MountOption, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyXattr, Request, Session,
};

use crate::error::{Error, Result};
use crate::reader::{SnapshotReader, CACHE_BYTES};
use crate::vault::manifest::Manifest;
use crate::vault::{Disk, Vault};

/// Attributes never change while mounted: the kernel may keep them this long.
const TTL: Duration = Duration::from_secs(3600);
/// The first snapshot file's inode; folders are 1 (root) and 2.. (disks).
const FIRST_FILE: u64 = 1 << 32;

/// One disk folder and its snapshots.
pub struct MountedDisk<'a> {
    /// The disk.
    pub disk: &'a Disk,
    /// Its snapshots, oldest first.
    pub snapshots: &'a [Manifest],
}

/// A snapshot file's name: `2026-12-07T01:02:03Z_1a2b3c4d.raw`.
pub fn file_name(m: &Manifest) -> String {
    let t = humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(m.created));
    format!("{t}_{}.raw", m.id.short())
}

struct File<'a> {
    name: String,
    dir: u64,
    disk: &'a Disk,
    m: &'a Manifest,
    reader: OnceLock<SnapshotReader<'a>>,
}

struct Fs<'a> {
    vault: &'a Vault,
    dirs: Vec<String>,
    files: Vec<File<'a>>,
    mounted: SystemTime,
    /// Owner (uid, gid) of every entry: the mountpoint's.
    owner: (u32, u32),
}

impl<'a> Fs<'a> {
    fn dir_attr(&self, ino: u64) -> FileAttr {
        self.attr(ino, FileType::Directory, 0, 0o555, SystemTime::UNIX_EPOCH)
    }

    fn file_attr(&self, i: usize) -> FileAttr {
        let m = self.files[i].m;
        let t = UNIX_EPOCH + Duration::from_secs(m.created);
        self.attr(
            FIRST_FILE + i as u64,
            FileType::RegularFile,
            m.disk_size,
            0o444,
            t,
        )
    }

    fn attr(&self, ino: u64, kind: FileType, size: u64, perm: u16, t: SystemTime) -> FileAttr {
        let t = if kind == FileType::Directory {
            self.mounted
        } else {
            t
        };
        FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: t,
            mtime: t,
            ctime: t,
            crtime: t,
            kind,
            perm,
            nlink: if kind == FileType::Directory { 2 } else { 1 },
            uid: self.owner.0,
            gid: self.owner.1,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    fn file(&self, ino: u64) -> Option<usize> {
        ino.checked_sub(FIRST_FILE)
            .map(|i| i as usize)
            .filter(|&i| i < self.files.len())
    }

    fn is_dir(&self, ino: u64) -> bool {
        ino == fuser::FUSE_ROOT_ID || (2..2 + self.dirs.len() as u64).contains(&ino)
    }
}

impl Filesystem for Fs<'_> {
    /// Nothing is written, so nothing to flush.
    fn flush(&mut self, _req: &Request<'_>, _ino: u64, _fh: u64, _lock: u64, reply: ReplyEmpty) {
        reply.ok();
    }

    /// No extended attributes: ENOSYS tells the kernel not to ask again.
    fn getxattr(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        _name: &OsStr,
        _size: u32,
        reply: ReplyXattr,
    ) {
        reply.error(libc::ENOSYS);
    }

    /// As `getxattr`.
    fn listxattr(&mut self, _req: &Request<'_>, _ino: u64, _size: u32, reply: ReplyXattr) {
        reply.error(libc::ENOSYS);
    }

    fn lookup(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEntry) {
        let name = name.to_string_lossy();
        if parent == fuser::FUSE_ROOT_ID {
            match self.dirs.iter().position(|d| *d == name) {
                Some(d) => reply.entry(&TTL, &self.dir_attr(2 + d as u64), 0),
                None => reply.error(libc::ENOENT),
            }
            return;
        }
        match self
            .files
            .iter()
            .position(|f| f.dir == parent && f.name == name)
        {
            Some(i) => reply.entry(&TTL, &self.file_attr(i), 0),
            None => reply.error(libc::ENOENT),
        }
    }

    fn getattr(&mut self, _req: &Request<'_>, ino: u64, _fh: Option<u64>, reply: ReplyAttr) {
        if self.is_dir(ino) {
            reply.attr(&TTL, &self.dir_attr(ino));
        } else if let Some(i) = self.file(ino) {
            reply.attr(&TTL, &self.file_attr(i));
        } else {
            reply.error(libc::ENOENT);
        }
    }

    fn readdir(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        mut reply: ReplyDirectory,
    ) {
        if !self.is_dir(ino) {
            return reply.error(libc::ENOTDIR);
        }
        let mut entries: Vec<(u64, FileType, String)> = vec![
            (ino, FileType::Directory, ".".into()),
            (fuser::FUSE_ROOT_ID, FileType::Directory, "..".into()),
        ];
        if ino == fuser::FUSE_ROOT_ID {
            entries.extend(
                self.dirs
                    .iter()
                    .enumerate()
                    .map(|(d, n)| (2 + d as u64, FileType::Directory, n.clone())),
            );
        } else {
            entries.extend(
                self.files
                    .iter()
                    .enumerate()
                    .filter(|(_, f)| f.dir == ino)
                    .map(|(i, f)| (FIRST_FILE + i as u64, FileType::RegularFile, f.name.clone())),
            );
        }
        for (n, (ino, kind, name)) in entries.into_iter().enumerate().skip(offset.max(0) as usize) {
            if reply.add(ino, n as i64 + 1, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn read(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        size: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyData,
    ) {
        let Some(i) = self.file(ino) else {
            return reply.error(libc::ENOENT);
        };
        let f = &self.files[i];
        let reader = f
            .reader
            .get_or_init(|| SnapshotReader::new(self.vault, f.disk, f.m, CACHE_BYTES));
        let offset = (offset.max(0) as u64).min(reader.size());
        let end = (offset + u64::from(size)).min(reader.size());
        let mut buf = vec![0u8; end.saturating_sub(offset) as usize];
        match reader.read_at(offset, &mut buf) {
            Ok(()) => reply.data(&buf),
            Err(e) => {
                tracing::warn!(file = %f.name, offset, size, error = %e, "mount: read failed");
                reply.error(libc::EIO);
            }
        }
    }
}

/// Mount `disks` read-only at `mountpoint` and serve until it is unmounted or SIGINT/SIGTERM
/// unmounts it; `ready` is called once the mount is in place.
pub fn mount(
    vault: &Vault,
    disks: &[MountedDisk<'_>],
    mountpoint: &Path,
    ready: impl FnOnce(),
) -> Result<()> {
    let mut fs = Fs {
        vault,
        dirs: Vec::new(),
        files: Vec::new(),
        mounted: SystemTime::now(),
        owner: std::fs::metadata(mountpoint)
            .map(|md| {
                (
                    std::os::unix::fs::MetadataExt::uid(&md),
                    std::os::unix::fs::MetadataExt::gid(&md),
                )
            })
            .map_err(|e| Error::io(format!("reading mountpoint {}", mountpoint.display()), e))?,
    };
    for (d, md) in disks.iter().enumerate() {
        fs.dirs.push(md.disk.name.clone());
        for m in md.snapshots {
            crate::reader::check_digest(md.disk, m)?;
            fs.files.push(File {
                name: file_name(m),
                dir: 2 + d as u64,
                disk: md.disk,
                m,
                reader: OnceLock::new(),
            });
        }
    }
    let options = [
        MountOption::RO,
        MountOption::FSName("blockvault".into()),
        MountOption::Subtype("blockvault".into()),
        MountOption::DefaultPermissions,
    ];
    let mut session = Session::new(fs, mountpoint, &options)
        .map_err(|e| Error::io(format!("mounting {}", mountpoint.display()), e))?;
    let mut unmounter = session.unmount_callable();
    ready();
    std::thread::scope(|scope| {
        let running = scope.spawn(move || session.run());
        while !running.is_finished() {
            if crate::interrupt::requested().is_some() {
                let _ = unmounter.unmount();
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        match running.join() {
            Ok(r) => r.map_err(|e| Error::io(format!("serving {}", mountpoint.display()), e)),
            Err(_) => Err(Error::io(
                format!("serving {}", mountpoint.display()),
                std::io::Error::other("the FUSE session thread panicked"),
            )),
        }
    })
}
