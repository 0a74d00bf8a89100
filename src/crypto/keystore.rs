//! The platform keystore: a folder outside the vault with one file per vault, holding that
//! vault's platform KEK versions and its config-authentication key. A copy of the vault alone
//! reveals nothing; losing the keystore loses the backups (hence `key export` in a later
//! issue). Files are mode 0600 in a 0700 folder, written atomically.
//!
//! File layout (`<vault-id hex>.keys`, little-endian; byte-exact spec in docs/FORMAT.md):
//! ```text
//! "BVKS" | u16 version=2 | u16 0 | vault id [16] | auth key [32] | u16 n
//! n × ( u32 version | u8 state | 3×0 | u64 created | key [32] )
//! u8 infrastructure key present (0/1) | 3×0 | [64] the AES-256-XTS key, or zeros
//! BLAKE3 of all preceding bytes [32]
//! ```
//! Version 1 files (no infrastructure part) are still read.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

use super::kek::{KekState, PlatformKek, PlatformKeyVersion};
use super::secret::Secret32;
use crate::error::{Error, ErrorKind, IoContext, Result};
use crate::vault::store::xts::InfraKey;

const MAGIC: &[u8; 4] = b"BVKS";
const VERSION: u16 = 2;
const HEADER_LEN: usize = 4 + 2 + 2 + 16 + 32 + 2;
const ENTRY_LEN: usize = 4 + 1 + 3 + 8 + 32;
const INFRA_LEN: usize = 4 + 64;
const SUM_LEN: usize = 32;
/// Age past which a key-file temp copy is taken to be left by a killed save, not in flight
/// (a save takes milliseconds).
const STALE_TEMP: std::time::Duration = std::time::Duration::from_secs(600);

/// Where key files live.
pub struct Keystore {
    dir: PathBuf,
}

/// What one vault's key file holds.
pub struct VaultKeys {
    /// Key that authenticates the vault's config object.
    pub auth: Secret32,
    /// The platform KEK versions.
    pub kek: PlatformKek,
    /// The platform-managed key of the infrastructure encryption layer, for vaults that
    /// have one.
    pub infra: Option<InfraKey>,
}

impl Keystore {
    /// A keystore in `dir` (created on first write).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Keystore { dir: dir.into() }
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

    /// The folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The key file of a vault.
    pub fn path_for(&self, vault_id: &[u8; 16]) -> PathBuf {
        self.dir.join(format!("{}.keys", hex::encode(vault_id)))
    }

    /// Load a vault's keys. A missing file is [`ErrorKind::Key`] naming the expected path.
    pub fn load(&self, vault_id: &[u8; 16]) -> Result<VaultKeys> {
        let path = self.path_for(vault_id);
        let bytes = match fs::read(&path) {
            Ok(b) => Zeroizing::new(b),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::new(
                    ErrorKind::Key,
                    format!(
                        "keystore has no key for vault {}: expected {} (wrong --keystore?)",
                        hex::encode(vault_id),
                        path.display()
                    ),
                ))
            }
            Err(e) => {
                return Err(Error::io(
                    format!("reading keystore file {}", path.display()),
                    e,
                ))
            }
        };
        decode(&bytes, vault_id).map_err(|e| e.within(format!("keystore file {}", path.display())))
    }

    /// Write a vault's keys atomically (temp file 0600, fsync, rename, fsync folder).
    pub fn save(&self, vault_id: &[u8; 16], keys: &VaultKeys) -> Result<PathBuf> {
        fs::create_dir_all(&self.dir)
            .ctx(|| format!("creating keystore folder {}", self.dir.display()))?;
        fs::set_permissions(&self.dir, fs::Permissions::from_mode(0o700))
            .ctx(|| format!("setting mode 0700 on {}", self.dir.display()))?;
        let path = self.path_for(vault_id);
        // A fresh random name, created exclusively: never an old file with other permissions.
        let tmp = self.dir.join(format!(
            ".{}.tmp-{}",
            hex::encode(vault_id),
            hex::encode(super::secret::random_bytes::<8>()?)
        ));
        let mut seen = std::collections::HashSet::new();
        if let Some(v) = keys.kek.versions().iter().find(|v| !seen.insert(v.version)) {
            // `load` would refuse such a file: never write one.
            return Err(Error::usage(format!(
                "KEK version {} appears twice",
                v.version
            )));
        }
        let bytes = encode(vault_id, keys);
        let write = || -> std::io::Result<()> {
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            fs::rename(&tmp, &path)?;
            fs::File::open(&self.dir)?.sync_all()
        };
        write().map_err(|e| {
            let _ = fs::remove_file(&tmp);
            Error::io(format!("writing keystore file {}", path.display()), e)
        })?;
        self.remove_stale_temps(vault_id);
        Ok(path)
    }

    /// Remove this vault's temp files left by saves that were killed before their rename:
    /// each is a copy of key material that nothing reads. Only those older than
    /// [`STALE_TEMP`], so that another process's save in flight keeps its file.
    fn remove_stale_temps(&self, vault_id: &[u8; 16]) {
        let prefix = format!(".{}.tmp-", hex::encode(vault_id));
        let Ok(entries) = fs::read_dir(&self.dir) else {
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

    /// Create the keys of a new vault: a fresh auth key and KEK version 1, and an
    /// infrastructure-layer key if `infrastructure`.
    pub fn create(
        &self,
        vault_id: &[u8; 16],
        infrastructure: bool,
    ) -> Result<(VaultKeys, PathBuf)> {
        if self.path_for(vault_id).exists() {
            return Err(Error::new(
                ErrorKind::AlreadyExists,
                format!(
                    "keystore already holds keys for vault {}",
                    hex::encode(vault_id)
                ),
            ));
        }
        let keys = VaultKeys::generate(infrastructure)?;
        let path = self.save(vault_id, &keys)?;
        Ok((keys, path))
    }
}

impl VaultKeys {
    /// Fresh keys, in memory only: a random auth key, platform KEK version 1, and an
    /// infrastructure-layer key if `infrastructure`.
    pub fn generate(infrastructure: bool) -> Result<VaultKeys> {
        Ok(VaultKeys {
            auth: Secret32::random()?,
            kek: PlatformKek::new(vec![PlatformKeyVersion {
                version: 1,
                state: KekState::Enabled,
                created: crate::util::now_unix(),
                key: Secret32::random()?,
            }]),
            infra: if infrastructure {
                Some(InfraKey::generate()?)
            } else {
                None
            },
        })
    }
}

fn encode(vault_id: &[u8; 16], keys: &VaultKeys) -> Zeroizing<Vec<u8>> {
    let versions = keys.kek.versions();
    let mut b = Zeroizing::new(Vec::with_capacity(
        HEADER_LEN + versions.len() * ENTRY_LEN + SUM_LEN,
    ));
    b.extend_from_slice(MAGIC);
    b.extend_from_slice(&VERSION.to_le_bytes());
    b.extend_from_slice(&0u16.to_le_bytes());
    b.extend_from_slice(vault_id);
    b.extend_from_slice(keys.auth.expose());
    b.extend_from_slice(&(versions.len() as u16).to_le_bytes());
    for v in versions {
        b.extend_from_slice(&v.version.to_le_bytes());
        b.push(v.state as u8);
        b.extend_from_slice(&[0; 3]);
        b.extend_from_slice(&v.created.to_le_bytes());
        b.extend_from_slice(v.key.expose());
    }
    b.push(keys.infra.is_some() as u8);
    b.extend_from_slice(&[0; 3]);
    match &keys.infra {
        Some(k) => b.extend_from_slice(k.expose()),
        None => b.extend_from_slice(&[0; 64]),
    }
    let sum = blake3::hash(&b);
    b.extend_from_slice(sum.as_bytes());
    b
}

/// Parse the bytes of a key file of vault `vault_id` (`key import`).
pub fn decode(b: &[u8], vault_id: &[u8; 16]) -> Result<VaultKeys> {
    let corrupt = |what: &str| Error::new(ErrorKind::Key, format!("damaged: {what}"));
    if b.len() < HEADER_LEN + SUM_LEN || &b[..4] != MAGIC {
        return Err(corrupt("not a blockvault keystore file"));
    }
    let (body, sum) = b.split_at(b.len() - SUM_LEN);
    if blake3::hash(body).as_bytes() != sum {
        return Err(corrupt("checksum mismatch"));
    }
    let version = u16::from_le_bytes([b[4], b[5]]);
    if version != 1 && version != VERSION {
        return Err(Error::new(
            ErrorKind::Unsupported,
            format!("keystore format version {version}, this build reads {VERSION}"),
        ));
    }
    if b[6..8] != [0, 0] {
        return Err(corrupt("reserved bytes are not zero"));
    }
    if &b[8..24] != vault_id {
        return Err(corrupt("file belongs to another vault"));
    }
    let auth = Secret32::from_slice(&b[24..56])?;
    let n = u16::from_le_bytes([b[56], b[57]]) as usize;
    let infra_len = if version == 1 { 0 } else { INFRA_LEN };
    if body.len() != HEADER_LEN + n * ENTRY_LEN + infra_len {
        return Err(corrupt("length does not match its entry count"));
    }
    let entries_end = HEADER_LEN + n * ENTRY_LEN;
    let infra = match &body[entries_end..] {
        [] => None,
        [0, 0, 0, 0, rest @ ..] if rest.iter().all(|&x| x == 0) => None,
        [1, 0, 0, 0, key @ ..] => Some(InfraKey::from_bytes(
            key.try_into()
                .map_err(|_| corrupt("infrastructure key length"))?,
        )?),
        _ => return Err(corrupt("infrastructure key part is malformed")),
    };
    let mut versions = Vec::with_capacity(n);
    let mut seen = std::collections::HashSet::with_capacity(n);
    for e in body[HEADER_LEN..entries_end].chunks_exact(ENTRY_LEN) {
        let state = match e[4] {
            1 => KekState::Enabled,
            2 => KekState::Revoked,
            s => return Err(corrupt(&format!("unknown KEK state {s}"))),
        };
        if e[5..8] != [0; 3] {
            return Err(corrupt("reserved bytes are not zero"));
        }
        let version = u32::from_le_bytes(e[0..4].try_into().expect("4 bytes"));
        if !seen.insert(version) {
            return Err(corrupt(&format!("KEK version {version} appears twice")));
        }
        versions.push(PlatformKeyVersion {
            version,
            state,
            created: u64::from_le_bytes(e[8..16].try_into().expect("8 bytes")),
            key: Secret32::from_slice(&e[16..48])?,
        });
    }
    Ok(VaultKeys {
        auth,
        kek: PlatformKek::new(versions),
        infra,
    })
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
        let (keys, _) = ks.create(&id, false).unwrap();
        let temp = |vault: [u8; 16], name: &str, age: u64| {
            let p = ks.dir().join(format!(".{}.tmp-{name}", hex::encode(vault)));
            let f = fs::File::create(&p).unwrap();
            f.set_modified(std::time::SystemTime::now() - std::time::Duration::from_secs(age))
                .unwrap();
            p
        };
        let killed = temp(id, "killed", 3600);
        let in_flight = temp(id, "inflight", 1);
        let other_vault = temp([6; 16], "killed", 3600);
        ks.save(&id, &keys).unwrap();
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
    fn create_load_round_trip_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let ks = Keystore::new(dir.path().join("ks"));
        let id = [4u8; 16];
        let (keys, path) = ks.create(&id, true).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let loaded = ks.load(&id).unwrap();
        assert_eq!(loaded.auth.expose(), keys.auth.expose());
        assert_eq!(loaded.kek.current().unwrap(), keys.kek.current().unwrap());
        assert_eq!(
            loaded.infra.as_ref().map(|k| *k.expose()),
            keys.infra.as_ref().map(|k| *k.expose())
        );
    }

    #[test]
    fn missing_and_damaged_files_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let ks = Keystore::new(dir.path());
        let err = ks.load(&[1; 16]).err().unwrap();
        assert_eq!(err.kind(), ErrorKind::Key);
        assert!(err.to_string().contains("expected"), "{err}");
        ks.create(&[1; 16], false).unwrap();
        let p = ks.path_for(&[1; 16]);
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
}
