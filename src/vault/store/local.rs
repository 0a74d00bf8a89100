//! A vault in a local folder. Writes go to a hidden temporary file beside the target, are
//! fsynced, renamed into place, and the folder is fsynced: after a crash an object is either
//! whole or absent (hidden `.tmp-*` leftovers are ignored by `list` and reported by
//! `unfinished`).

use std::cell::RefCell;
use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use crate::crypto::secret::random_bytes;
use crate::error::{Error, ErrorKind, IoContext, Result};
use crate::io::AlignedBuf;

use super::names::check_key;
use super::{Precondition, Store, Tag, Unfinished};

/// The local tag of an object: the BLAKE3 of its bytes (an ETag that changes with content).
fn tag_of(bytes: &[u8]) -> Tag {
    Tag(blake3::hash(bytes).to_hex().to_string())
}

/// A store rooted at a folder.
pub struct LocalStore {
    root: PathBuf,
}

impl LocalStore {
    /// A store at `root` (the folder is created by the first write).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        LocalStore { root: root.into() }
    }

    fn path(&self, key: &str) -> Result<PathBuf> {
        check_key(key)?;
        self.refuse_links(key)?;
        Ok(self.root.join(key))
    }

    /// Refuse a symbolic link at any component of `key` below the root: whoever holds the
    /// vault folder could plant one (a `snapshots/<disk>` link to another folder made a backup
    /// write its manifest outside the vault). The root itself may be a link the user chose.
    /// This checks before each operation; a link planted between the check and the open is
    /// not seen (openat2's RESOLVE_NO_SYMLINKS would close that window).
    fn refuse_links(&self, key: &str) -> Result<()> {
        let mut at = self.root.clone();
        for part in key.split('/') {
            at.push(part);
            match fs::symlink_metadata(&at) {
                Ok(m) if m.file_type().is_symlink() => {
                    return Err(Error::integrity(format!(
                        "{} in vault {} is a symbolic link: blockvault follows no links inside a vault (one planted there could send reads and writes elsewhere)",
                        at.strip_prefix(&self.root).unwrap_or(&at).display(),
                        self.root.display()
                    )))
                }
                Ok(_) => {}
                // Nothing further down exists either.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(Error::io(format!("stat {}", at.display()), e)),
            }
        }
        Ok(())
    }

    /// Call `visit(key, entry)` for every file under `dir` (whose key is `rel`), hidden
    /// ones included; a missing folder holds nothing.
    fn walk(
        &self,
        dir: &Path,
        rel: &str,
        visit: &mut dyn FnMut(String, &fs::DirEntry) -> Result<()>,
    ) -> Result<()> {
        let rd = match fs::read_dir(dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(Error::io(format!("listing {}", dir.display()), e)),
        };
        for entry in rd {
            let entry = entry.ctx(|| format!("listing {}", dir.display()))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let key = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            if entry
                .file_type()
                .ctx(|| format!("stat {}", entry.path().display()))?
                .is_dir()
            {
                self.walk(&entry.path(), &key, visit)?;
            } else {
                visit(key, &entry)?;
            }
        }
        Ok(())
    }
}

/// Whether a file's key has a hidden component: a temp file (or a foreign one), never an
/// object, as object keys have none.
fn hidden(key: &str) -> bool {
    key.split('/').any(|name| name.starts_with('.'))
}

/// Whether a file's key names the temp file of a write (see [`TMP_PREFIX`]).
fn temp_file(key: &str) -> bool {
    key.rsplit('/')
        .next()
        .is_some_and(|name| name.starts_with(TMP_PREFIX))
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    // The parent of a bare relative name ("vault") is "": the current folder.
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    File::open(dir)?.sync_all()
}

/// Create `dir` and any missing parents, fsyncing each new folder's parent, so that a file
/// made durable inside a new folder cannot vanish with the folder after a power loss.
fn create_dirs_durable(dir: &Path) -> std::io::Result<()> {
    if dir.as_os_str().is_empty() || dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent() {
        create_dirs_durable(parent)?;
    }
    match fs::create_dir(dir) {
        Ok(()) => sync_dir(dir.parent().unwrap_or(Path::new("/"))),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

/// How the temporary file of a write in progress is named: hidden, so never listed.
const TMP_PREFIX: &str = ".tmp-";

/// Objects at least this large (packs) are written with O_DIRECT.
const DIRECT_MIN: usize = 1 << 20;
/// Alignment of O_DIRECT buffers, offsets and lengths (covers 512- and 4096-byte blocks).
const DIRECT_ALIGN: usize = 4096;

thread_local! {
    /// The writing thread's aligned staging buffer, kept between packs.
    static STAGING: RefCell<AlignedBuf> = RefCell::new(AlignedBuf::new(0, DIRECT_ALIGN));
}

/// Create `path` (which must not exist) holding `data`, durably. Large objects go through
/// O_DIRECT: the page-cache copy and the flush behind fsync cost more CPU than sealing the
/// data does on a virtual machine (a 4 GiB full backup spent 1 s of system time there);
/// the padded tail is cut with `set_len`. Filesystems without O_DIRECT (tmpfs) get the
/// buffered path.
fn write_new_file(path: &Path, data: &[u8]) -> std::io::Result<()> {
    if data.len() >= DIRECT_MIN {
        match File::options()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
        {
            Ok(f) => {
                let padded = data.len().next_multiple_of(DIRECT_ALIGN);
                STAGING.with(|cell| -> std::io::Result<()> {
                    let mut buf = cell.borrow_mut();
                    if buf.capacity() < padded {
                        *buf = AlignedBuf::new(padded, DIRECT_ALIGN);
                    }
                    buf.set_len(padded);
                    buf[..data.len()].copy_from_slice(data);
                    buf[data.len()..].fill(0);
                    f.write_all_at(&buf, 0)
                })?;
                f.set_len(data.len() as u64)?;
                return f.sync_all();
            }
            // The failed open may already have created the file.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                let _ = fs::remove_file(path);
            }
            Err(e) => return Err(e),
        }
    }
    let mut f = File::create_new(path)?;
    f.write_all(data)?;
    f.sync_all()
}

impl LocalStore {
    /// Write `data` to a temporary file beside `key` and fsync it; `publish` moves it into
    /// place; then the folder is fsynced. The temporary file is removed on any failure.
    fn write_then(
        &self,
        key: &str,
        data: &[u8],
        publish: impl Fn(&Path, &Path) -> std::io::Result<()>,
    ) -> Result<()> {
        let path = self.path(key)?;
        let dir = path
            .parent()
            .expect("keys have a parent folder under the root");
        let ctx = || format!("writing {} in vault {}", key, self.root.display());
        create_dirs_durable(dir).ctx(ctx)?;
        let tmp = dir.join(format!("{TMP_PREFIX}{}", hex::encode(random_bytes::<8>()?)));
        let write = || -> std::io::Result<()> {
            write_new_file(&tmp, data)?;
            publish(&tmp, &path)?;
            sync_dir(dir)
        };
        write().map_err(|e| {
            let _ = fs::remove_file(&tmp);
            Error::io(ctx(), e)
        })
    }
}

impl Store for LocalStore {
    fn put(&self, key: &str, data: &[u8]) -> Result<()> {
        self.write_then(key, data, |tmp, path| fs::rename(tmp, path))
    }

    fn put_new(&self, key: &str, data: &[u8]) -> Result<()> {
        // link(2) fails if the name exists: the no-replace publish rename cannot give portably.
        self.write_then(key, data, |tmp, path| {
            fs::hard_link(tmp, path)?;
            fs::remove_file(tmp)
        })
    }

    fn get(&self, key: &str) -> Result<Vec<u8>> {
        let path = self.path(key)?;
        fs::read(&path).ctx(|| format!("reading object {key} in vault {}", self.root.display()))
    }

    fn get_tagged(&self, key: &str) -> Result<(Vec<u8>, Tag)> {
        let bytes = self.get(key)?;
        let tag = tag_of(&bytes);
        Ok((bytes, tag))
    }

    /// Compare and swap under an exclusive `flock` on `locks/cas`, which every `put_if` of
    /// this folder takes (from any process on any host that mounts it with working locks):
    /// the comparison and the atomic rename cannot interleave with another writer's.
    fn put_if(&self, key: &str, data: &[u8], pre: &Precondition) -> Result<Tag> {
        let _lock = self.lock("cas", Duration::from_secs(60))?;
        let current = match self.get(key) {
            Ok(b) => Some(tag_of(&b)),
            Err(e) if e.kind() == ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        let holds = match (pre, &current) {
            (Precondition::Absent, None) => true,
            (Precondition::Matches(want), Some(have)) => want == have,
            _ => false,
        };
        if !holds {
            return Err(Error::new(
                ErrorKind::Conflict,
                format!(
                    "object {key} in vault {} changed since it was read",
                    self.root.display()
                ),
            ));
        }
        self.put(key, data)?;
        Ok(tag_of(data))
    }

    fn get_range(&self, key: &str, offset: u64, len: usize) -> Result<Vec<u8>> {
        let path = self.path(key)?;
        let f = File::open(&path).ctx(|| format!("opening object {key}"))?;
        let mut buf = vec![0u8; len];
        match f.read_exact_at(&mut buf, offset) {
            Ok(()) => Ok(buf),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                Err(Error::integrity(format!(
                    "object {key} is truncated: {len} bytes at offset {offset} run past its end"
                )))
            }
            Err(e) => Err(Error::io(
                format!("reading object {key} at offset {offset}"),
                e,
            )),
        }
    }

    fn list(&self, prefix: &str) -> Result<Vec<String>> {
        let mut out = Vec::new();
        let dir = if prefix.is_empty() {
            self.root.clone()
        } else {
            self.path(prefix)?
        };
        self.walk(&dir, prefix.trim_end_matches('/'), &mut |key, _| {
            if !hidden(&key) {
                out.push(key);
            }
            Ok(())
        })?;
        out.sort();
        Ok(out)
    }

    fn unfinished(&self) -> Result<Vec<Unfinished>> {
        let mut out = Vec::new();
        self.walk(&self.root, "", &mut |name, entry| {
            if temp_file(&name) {
                // A temp file renamed or removed since the listing is no leftover.
                match entry.metadata() {
                    Ok(m) => out.push(Unfinished {
                        name,
                        size: m.len(),
                    }),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(Error::io(format!("stat {}", entry.path().display()), e)),
                }
            }
            Ok(())
        })?;
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    fn delete(&self, key: &str) -> Result<()> {
        match fs::remove_file(self.path(key)?) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(Error::io(format!("deleting object {key}"), e))
            }
            _ => Ok(()),
        }
    }

    fn size(&self, key: &str) -> Result<u64> {
        Ok(fs::metadata(self.path(key)?)
            .ctx(|| format!("stat object {key}"))?
            .len())
    }

    fn modified(&self, key: &str) -> Result<SystemTime> {
        fs::metadata(self.path(key)?)
            .and_then(|m| m.modified())
            .ctx(|| format!("stat object {key}"))
    }

    fn lock(&self, name: &str, wait: Duration) -> Result<Box<dyn Send>> {
        let path = self.path(&format!("locks/{name}"))?;
        let dir = path.parent().expect("under locks/");
        fs::create_dir_all(dir).ctx(|| format!("creating {}", dir.display()))?;
        let f = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .ctx(|| format!("opening lock {}", path.display()))?;
        // flock: released by the kernel when the holder exits, even by SIGKILL, so a crashed
        // backup never leaves a stale lock behind.
        let deadline = Instant::now() + wait;
        loop {
            match f.try_lock() {
                Ok(()) => return Ok(Box::new(f)),
                Err(fs::TryLockError::WouldBlock) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(fs::TryLockError::WouldBlock) => {
                    return Err(Error::new(
                        ErrorKind::AlreadyExists,
                        format!(
                            "{name} is locked by another blockvault process ({})",
                            path.display()
                        ),
                    ))
                }
                Err(fs::TryLockError::Error(e)) => {
                    return Err(Error::io(format!("locking {}", path.display()), e))
                }
            }
        }
    }

    fn location(&self) -> String {
        self.root.display().to_string()
    }
}
