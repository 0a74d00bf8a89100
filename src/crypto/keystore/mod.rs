//! The platform keystore: a folder outside the vault with, per vault, its key file
//! (`<vault id>.keys`: auth keys, platform KEKs, infrastructure keys; [`file`]) and what this
//! host remembers of it (`<vault id>.state`: the URLs it lives at, the newest head seen;
//! [`state`]). A copy of the vault alone reveals nothing; losing the keystore loses the
//! backups unless a recovery key or a `key export` exists.
//!
//! Protection, as for ssh keys:
//! - files are created 0600 and written atomically (temp file, fsync, rename, fsync folder);
//!   a key file readable or writable by group or others, or owned by another user, is refused;
//! - a folder blockvault creates is 0700. A folder the user names (`--keystore DIR`) is never
//!   chmod'ed: if it already exists and is not private to this user, the keys go into a
//!   `blockvault` subfolder made 0700 inside it;
//! - every read-modify-write of a vault's files holds an exclusive `flock` on
//!   `.<vault id>.lock`, so a `key revoke` racing a `key rotate` cannot write back a key file
//!   without the new version.

pub mod file;
pub mod state;

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use zeroize::Zeroizing;

use crate::error::{Error, ErrorKind, IoContext, Result};

pub use file::{KeyClass, VaultKeys, Versioned};
pub use state::{LocalState, SeenHead};

/// Age past which a temp copy is taken to be left by a killed save, not in flight (a save
/// takes milliseconds).
const STALE_TEMP: Duration = Duration::from_secs(600);
/// How long a keystore update waits for another process's update of the same vault.
const LOCK_WAIT: Duration = Duration::from_secs(60);
/// The subfolder used inside a named folder that is not private to this user.
const SUBFOLDER: &str = "blockvault";

/// Where key files live.
#[derive(Clone)]
pub struct Keystore {
    requested: PathBuf,
}

/// The exclusive lock on one vault's keystore files, held until dropped (the kernel releases
/// it if the process dies).
pub struct KeystoreLock(#[allow(dead_code)] fs::File);

impl Keystore {
    /// A keystore in `dir` (created 0700 on first write if missing).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Keystore {
            requested: dir.into(),
        }
    }

    /// The default location: `$BLOCKVAULT_KEYSTORE`, else `$XDG_DATA_HOME/blockvault/keystore`,
    /// else `$HOME/.local/share/blockvault/keystore`.
    pub fn default_dir() -> Result<PathBuf> {
        if let Some(d) = std::env::var_os("BLOCKVAULT_KEYSTORE") {
            return Ok(PathBuf::from(d));
        }
        if let Some(d) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
            return Ok(Path::new(&d).join("blockvault/keystore"));
        }
        let home = std::env::var_os("HOME").ok_or_else(|| {
            Error::usage(
                "cannot find a keystore location: set --keystore, BLOCKVAULT_KEYSTORE or HOME",
            )
        })?;
        Ok(Path::new(&home).join(".local/share/blockvault/keystore"))
    }

    /// The folder the files are in: the folder given if it is missing (it will be created
    /// 0700) or private to this user; otherwise its `blockvault` subfolder.
    pub fn dir(&self) -> PathBuf {
        match fs::metadata(&self.requested) {
            Ok(md) if md.is_dir() && !private_to_me(&md) => self.requested.join(SUBFOLDER),
            _ => self.requested.clone(),
        }
    }

    /// The key file of a vault.
    pub fn path_for(&self, vault_id: &[u8; 16]) -> PathBuf {
        self.dir().join(format!("{}.keys", hex::encode(vault_id)))
    }

    fn state_path(&self, vault_id: &[u8; 16]) -> PathBuf {
        self.dir().join(format!("{}.state", hex::encode(vault_id)))
    }

    /// Load a vault's keys. A missing file is [`ErrorKind::Key`] naming the expected path; a
    /// file others can read or write, or owned by another user, is refused.
    pub fn load(&self, vault_id: &[u8; 16]) -> Result<VaultKeys> {
        let path = self.path_for(vault_id);
        let bytes = read_private(&path).map_err(|e| match e.kind() {
            ErrorKind::NotFound => Error::new(
                ErrorKind::Key,
                format!(
                    "keystore has no key for vault {}: expected {} (wrong --keystore?)",
                    hex::encode(vault_id),
                    path.display()
                ),
            ),
            _ => e,
        })?;
        VaultKeys::decode(&bytes, vault_id)
            .map_err(|e| e.within(format!("keystore file {}", path.display())))
    }

    /// Whether the keystore holds a key file for `vault_id`.
    pub fn has(&self, vault_id: &[u8; 16]) -> bool {
        self.path_for(vault_id).exists()
    }

    /// Take the exclusive lock on a vault's files, waiting up to a minute for another
    /// process's update.
    pub fn lock(&self, vault_id: &[u8; 16]) -> Result<KeystoreLock> {
        let dir = self.ensure_dir()?;
        let path = dir.join(format!(".{}.lock", hex::encode(vault_id)));
        let f = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .ctx(|| format!("opening keystore lock {}", path.display()))?;
        let deadline = Instant::now() + LOCK_WAIT;
        loop {
            match f.try_lock() {
                Ok(()) => return Ok(KeystoreLock(f)),
                Err(fs::TryLockError::WouldBlock) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(fs::TryLockError::WouldBlock) => {
                    return Err(Error::new(
                        ErrorKind::AlreadyExists,
                        format!(
                            "the keystore of vault {} is locked by another blockvault process ({})",
                            hex::encode(vault_id),
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

    /// Read, change and write back a vault's keys under its lock: the way every change to a
    /// key file is made.
    pub fn update<T>(
        &self,
        vault_id: &[u8; 16],
        change: impl FnOnce(&mut VaultKeys) -> Result<T>,
    ) -> Result<T> {
        let _lock = self.lock(vault_id)?;
        let mut keys = self.load(vault_id)?;
        let out = change(&mut keys)?;
        self.write_keys(vault_id, &keys)?;
        Ok(out)
    }

    /// Store the keys of a new vault; fails if the keystore already holds keys for it.
    pub fn create(&self, vault_id: &[u8; 16], keys: &VaultKeys) -> Result<PathBuf> {
        let _lock = self.lock(vault_id)?;
        if self.has(vault_id) {
            return Err(Error::new(
                ErrorKind::AlreadyExists,
                format!(
                    "keystore already holds keys for vault {}",
                    hex::encode(vault_id)
                ),
            ));
        }
        self.write_keys(vault_id, keys)
    }

    /// Store `keys` for `vault_id`, replacing a key file already there (`key import --force`,
    /// recovery). The caller holds the lock (see [`Keystore::lock`]).
    pub fn replace(
        &self,
        _lock: &KeystoreLock,
        vault_id: &[u8; 16],
        keys: &VaultKeys,
    ) -> Result<PathBuf> {
        self.write_keys(vault_id, keys)
    }

    fn write_keys(&self, vault_id: &[u8; 16], keys: &VaultKeys) -> Result<PathBuf> {
        let path = self.path_for(vault_id);
        self.write_private(vault_id, &path, &keys.encode(vault_id))?;
        self.remove_stale_temps(vault_id);
        Ok(path)
    }

    /// What this host remembers of a vault (default when it never saw it).
    pub fn state(&self, vault_id: &[u8; 16]) -> Result<LocalState> {
        let path = self.state_path(vault_id);
        match read_private(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                Error::new(
                    ErrorKind::Integrity,
                    format!("keystore state file {} is damaged: {e}", path.display()),
                )
            }),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(LocalState::default()),
            Err(e) => Err(e),
        }
    }

    /// Read, change and write back what this host remembers of a vault, under its lock.
    pub fn update_state<T>(
        &self,
        vault_id: &[u8; 16],
        change: impl FnOnce(&mut LocalState) -> Result<T>,
    ) -> Result<T> {
        let _lock = self.lock(vault_id)?;
        let mut state = self.state(vault_id)?;
        let before = state.clone();
        let out = change(&mut state)?;
        if state != before {
            let json = serde_json::to_vec_pretty(&state).expect("state serialises");
            self.write_private(vault_id, &self.state_path(vault_id), &json)?;
        }
        Ok(out)
    }

    /// The vault this host last saw at `url` (a canonical vault URL), if any.
    pub fn vault_at(&self, url: &str) -> Result<Option<[u8; 16]>> {
        let dir = self.dir();
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(format!("listing keystore {}", dir.display()), e)),
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(id) = name.strip_suffix(".state").and_then(parse_vault_id) else {
                continue;
            };
            if self.state(&id)?.urls.iter().any(|u| u == url) {
                return Ok(Some(id));
            }
        }
        Ok(None)
    }

    /// The keystore folder, created 0700 if missing.
    fn ensure_dir(&self) -> Result<PathBuf> {
        let dir = self.dir();
        if !dir.exists() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)
                .ctx(|| format!("creating keystore folder {}", dir.display()))?;
        }
        Ok(dir)
    }

    /// Write `bytes` to `path` atomically, 0600: a fresh temp file created exclusively (never
    /// an old file with other permissions), fsync, rename, fsync of the folder.
    fn write_private(&self, vault_id: &[u8; 16], path: &Path, bytes: &[u8]) -> Result<()> {
        let dir = self.ensure_dir()?;
        let tmp = dir.join(format!(
            ".{}.tmp-{}",
            hex::encode(vault_id),
            hex::encode(super::secret::random_bytes::<8>()?)
        ));
        let write = || -> std::io::Result<()> {
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&tmp)?;
            f.write_all(bytes)?;
            f.sync_all()?;
            fs::rename(&tmp, path)?;
            fs::File::open(&dir)?.sync_all()
        };
        write().map_err(|e| {
            let _ = fs::remove_file(&tmp);
            Error::io(format!("writing keystore file {}", path.display()), e)
        })
    }

    /// Remove this vault's temp files left by saves that were killed before their rename:
    /// each is a copy of key material that nothing reads. Only those older than
    /// [`STALE_TEMP`], so that another process's save in flight keeps its file.
    fn remove_stale_temps(&self, vault_id: &[u8; 16]) {
        let prefix = format!(".{}.tmp-", hex::encode(vault_id));
        let Ok(entries) = fs::read_dir(self.dir()) else {
            return;
        };
        for entry in entries.flatten() {
            let stale = entry
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| t.elapsed().is_ok_and(|age| age > STALE_TEMP));
            if stale && entry.file_name().to_string_lossy().starts_with(&prefix) {
                tracing::info!(file = %entry.path().display(), "removing a keystore temp file left by an interrupted save");
                let _ = fs::remove_file(entry.path());
            }
        }
    }
}

/// A folder or file only this user can reach: owned by the effective user, no group or other
/// permission bits.
fn private_to_me(md: &fs::Metadata) -> bool {
    md.uid() == nix::unistd::geteuid().as_raw() && md.permissions().mode() & 0o077 == 0
}

/// Read a keystore file, refusing one that is not a regular file private to this user (as
/// ssh refuses a private key others can read), and never following a symlink to it.
fn read_private(path: &Path) -> Result<Zeroizing<Vec<u8>>> {
    let f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .ctx(|| format!("reading keystore file {}", path.display()))?;
    let md = f
        .metadata()
        .ctx(|| format!("stat keystore file {}", path.display()))?;
    if !md.is_file() || !private_to_me(&md) {
        return Err(Error::new(
            ErrorKind::Key,
            format!(
                "keystore file {} is not private to this user (mode {:04o}, owner uid {}): blockvault refuses key files others can read or write, as ssh does; fix it with `chmod 600` and `chown`",
                path.display(),
                md.permissions().mode() & 0o7777,
                md.uid()
            ),
        ));
    }
    // Sized from the file so the buffer is never reallocated (which would leave a copy of the
    // keys in freed memory).
    let mut bytes = Zeroizing::new(Vec::with_capacity(md.len() as usize + 1));
    std::io::Read::read_to_end(&mut &f, &mut bytes)
        .ctx(|| format!("reading keystore file {}", path.display()))?;
    Ok(bytes)
}

fn parse_vault_id(hexid: &str) -> Option<[u8; 16]> {
    let mut id = [0u8; 16];
    (hexid.len() == 32
        && hexid
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
    .then(|| hex::decode_to_slice(hexid, &mut id).ok())
    .flatten()
    .map(|_| id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::kek::KekProvider;

    #[test]
    fn a_save_removes_temp_copies_left_by_killed_saves_but_not_one_in_flight() {
        let dir = tempfile::tempdir().unwrap();
        let ks = Keystore::new(dir.path().join("ks"));
        let id = [5u8; 16];
        ks.create(&id, &VaultKeys::generate(false).unwrap())
            .unwrap();
        let temp = |vault: [u8; 16], name: &str, age: u64| {
            let p = ks.dir().join(format!(".{}.tmp-{name}", hex::encode(vault)));
            let f = fs::File::create(&p).unwrap();
            f.set_modified(std::time::SystemTime::now() - Duration::from_secs(age))
                .unwrap();
            p
        };
        let killed = temp(id, "killed", 3600);
        let in_flight = temp(id, "inflight", 1);
        let other_vault = temp([6; 16], "killed", 3600);
        ks.update(&id, |_| Ok(())).unwrap();
        assert!(
            !killed.exists(),
            "a temp file older than STALE_TEMP is removed"
        );
        assert!(
            in_flight.exists(),
            "a fresh temp file may be another save's"
        );
        assert!(
            other_vault.exists(),
            "another vault's files are not touched"
        );
    }

    #[test]
    fn create_load_round_trip_mode_0600_folder_0700() {
        let dir = tempfile::tempdir().unwrap();
        let ks = Keystore::new(dir.path().join("ks"));
        let id = [4u8; 16];
        let keys = VaultKeys::generate(true).unwrap();
        let path = ks.create(&id, &keys).unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(&ks.dir()), 0o700);
        let loaded = ks.load(&id).unwrap();
        assert_eq!(
            loaded.auth(1).unwrap().expose(),
            keys.auth(1).unwrap().expose()
        );
        assert_eq!(loaded.kek.current().unwrap(), keys.kek.current().unwrap());
        assert_eq!(
            loaded.infra(1).unwrap().expose(),
            keys.infra(1).unwrap().expose()
        );
        assert!(ks.create(&id, &keys).is_err(), "create never replaces");
    }

    #[test]
    fn a_named_folder_is_never_chmod_ed() {
        let dir = tempfile::tempdir().unwrap();
        let shared = dir.path().join("shared");
        fs::create_dir(&shared).unwrap();
        fs::set_permissions(&shared, fs::Permissions::from_mode(0o755)).unwrap();
        let ks = Keystore::new(&shared);
        assert_eq!(ks.dir(), shared.join(SUBFOLDER));
        ks.create(&[1; 16], &VaultKeys::generate(false).unwrap())
            .unwrap();
        assert_eq!(
            fs::metadata(&shared).unwrap().permissions().mode() & 0o777,
            0o755
        );
        assert_eq!(
            fs::metadata(shared.join(SUBFOLDER))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o700
        );
        ks.load(&[1; 16]).unwrap();
    }

    #[test]
    fn files_others_can_read_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let ks = Keystore::new(dir.path().join("ks"));
        let path = ks
            .create(&[1; 16], &VaultKeys::generate(false).unwrap())
            .unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let err = ks.load(&[1; 16]).err().unwrap();
        assert_eq!(err.kind(), ErrorKind::Key);
        assert!(err.to_string().contains("not private"), "{err}");
    }

    #[test]
    fn missing_and_damaged_files_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let ks = Keystore::new(dir.path().join("ks"));
        let err = ks.load(&[1; 16]).err().unwrap();
        assert_eq!(err.kind(), ErrorKind::Key);
        assert!(err.to_string().contains("expected"), "{err}");
        let p = ks
            .create(&[1; 16], &VaultKeys::generate(false).unwrap())
            .unwrap();
        let mut b = fs::read(&p).unwrap();
        b[30] ^= 1;
        fs::write(&p, b).unwrap();
        assert!(ks
            .load(&[1; 16])
            .err()
            .unwrap()
            .to_string()
            .contains("checksum"));
    }

    #[test]
    fn state_remembers_urls_and_finds_the_vault_at_one() {
        let dir = tempfile::tempdir().unwrap();
        let ks = Keystore::new(dir.path().join("ks"));
        assert_eq!(ks.state(&[1; 16]).unwrap(), LocalState::default());
        ks.update_state(&[1; 16], |s| {
            s.urls.push("/vaults/a".into());
            Ok(())
        })
        .unwrap();
        assert_eq!(ks.vault_at("/vaults/a").unwrap(), Some([1; 16]));
        assert_eq!(ks.vault_at("/vaults/b").unwrap(), None);
    }
}
