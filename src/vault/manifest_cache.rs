//! A local cache of the manifest objects of a vault on object storage, so that listing
//! thousands of snapshots does not download every manifest each time.
//!
//! A committed manifest never changes and the vault head binds it by digest, so a local copy
//! whose digest equals the head's entry is the very object a GET would return: it is used
//! without one. The cache is keyed by that digest and checked against it at every use, so an
//! entry that is damaged, truncated or planted (the folder is local, but nothing is taken on
//! trust) is never used: it is removed and the manifest fetched and checked as without a
//! cache. The entries are the stored (sealed) manifest bytes, decrypted and authenticated by
//! the caller as every manifest is: the cache holds no plaintext and no key.
//!
//! It lives beside the keystore's files of the vault (`<vault id>.manifests/`, 0700, entries
//! 0600) and is bounded by [`CACHE_BOUND`] bytes: past it, the oldest entries (by write time)
//! go first. Every failure to read or write it is only logged: the cache is an optimisation,
//! never a reason for a listing to fail.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

use super::head::{self, Digest};
use crate::crypto::keystore::Keystore;

/// Bytes the cache of one vault may hold before its oldest entries are removed.
pub const CACHE_BOUND: u64 = 256 << 20;

/// The manifest cache of one vault.
pub struct ManifestCache {
    dir: PathBuf,
    /// Whether this handle wrote an entry: only then can the cache have outgrown its bound,
    /// so only then does [`ManifestCache::trim`] list the folder.
    grown: AtomicBool,
}

impl ManifestCache {
    /// The cache of vault `vault_id` in `keystore`'s folder.
    pub fn new(keystore: &Keystore, vault_id: &[u8; 16]) -> ManifestCache {
        ManifestCache {
            dir: keystore
                .dir()
                .join(format!("{}.manifests", hex::encode(vault_id))),
            grown: AtomicBool::new(false),
        }
    }

    fn path(&self, digest: &Digest) -> PathBuf {
        self.dir.join(hex::encode(digest))
    }

    /// The cached object with this digest, if there is one that really has it. An entry that
    /// does not is removed.
    pub fn get(&self, digest: &Digest) -> Option<Vec<u8>> {
        let path = self.path(digest);
        let bytes = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .and_then(|mut f| {
                let mut v = Vec::new();
                std::io::Read::read_to_end(&mut f, &mut v).map(|_| v)
            })
            .ok()?;
        if &head::digest(&bytes) == digest {
            return Some(bytes);
        }
        tracing::warn!(file = %path.display(), "manifest cache entry does not match its digest: ignoring and removing it");
        let _ = fs::remove_file(&path);
        None
    }

    /// Keep `bytes` (whose digest the caller checked) under `digest`: a temp file renamed into
    /// place, so a reader never meets half an entry.
    pub fn put(&self, digest: &Digest, bytes: &[u8]) {
        let path = self.path(digest);
        let tmp = self.dir.join(format!(
            ".{}.tmp-{}",
            hex::encode(digest),
            std::process::id()
        ));
        let write = || -> std::io::Result<()> {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&self.dir)?;
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&tmp)?;
            f.write_all(bytes)?;
            fs::rename(&tmp, &path)
        };
        match write() {
            Ok(()) => self.grown.store(true, Ordering::Relaxed),
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                tracing::debug!(file = %path.display(), error = %e, "cannot write a manifest cache entry");
            }
        }
    }

    /// Remove the oldest entries while the cache holds more than [`CACHE_BOUND`] bytes; a
    /// listing that wrote nothing cannot have grown it, and leaves the folder unread.
    pub fn trim(&self) {
        if !self.grown.swap(false, Ordering::Relaxed) {
            return;
        }
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return;
        };
        let mut files: Vec<_> = entries
            .flatten()
            .filter_map(|e| {
                let md = e.metadata().ok()?;
                Some((md.modified().ok()?, md.len(), e.path()))
            })
            .collect();
        let mut total: u64 = files.iter().map(|f| f.1).sum();
        files.sort();
        for (_, len, path) in files {
            if total <= CACHE_BOUND {
                break;
            }
            let _ = fs::remove_file(&path);
            total -= len;
        }
    }
}
