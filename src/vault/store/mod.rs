//! Where vault objects live. One small trait, implemented by each backend; behaviour such as
//! retries or a second encryption layer is added by wrapping a store, not inside backends.
//!
//! Keys are `/`-separated relative names (`packs/ab/ab12…`, `snapshots/<disk>/<id>`).

pub mod local;
pub mod url;
pub mod xts;
mod xts_unit;

#[cfg(doc)]
use crate::error::ErrorKind;
use crate::error::Result;

pub use local::LocalStore;
pub use url::VaultUrl;

/// Object storage as the vault needs it.
///
/// Contract every backend keeps (the conformance tests in `tests/store.rs` check it):
/// - `put` is atomic and durable: when it returns, a reader sees the whole object and a crash
///   never leaves a partial object under `key`; writing an existing key replaces it atomically.
/// - `get`/`get_range` of a missing key fail with [`ErrorKind::NotFound`]; a range past the
///   end fails with [`ErrorKind::Integrity`] (a truncated object).
/// - `list(prefix)` returns every key under the folder `prefix`, recursively, sorted; names of
///   unfinished writes are never listed.
/// - `delete` of a missing key succeeds (idempotent).
/// - `unfinished` reports what writes that never completed (their process was killed) left
///   in the backend, in any folder: nothing `list` shows, `get` reads or the vault counts on,
///   yet it takes space until removed. A write still running may show up too (its process
///   is alive): callers report these, they do not delete them.
pub trait Store: Send + Sync {
    /// Write a whole object.
    fn put(&self, key: &str, data: &[u8]) -> Result<()>;
    /// Write a whole object that must not exist yet: fails with
    /// [`ErrorKind::AlreadyExists`] (and changes nothing) if it does. For objects that two
    /// writers could race to create (the config, key records).
    fn put_new(&self, key: &str, data: &[u8]) -> Result<()>;
    /// Read a whole object.
    fn get(&self, key: &str) -> Result<Vec<u8>>;
    /// Read `len` bytes at `offset`.
    fn get_range(&self, key: &str, offset: u64, len: usize) -> Result<Vec<u8>>;
    /// Keys under a folder.
    fn list(&self, prefix: &str) -> Result<Vec<String>>;
    /// Remove an object.
    fn delete(&self, key: &str) -> Result<()>;
    /// Size of an object.
    fn size(&self, key: &str) -> Result<u64>;
    /// Leftovers of unfinished writes (see the contract), sorted by name.
    fn unfinished(&self) -> Result<Vec<Unfinished>>;
    /// Take an exclusive lock named `name`, held until the guard drops, waiting up to `wait`
    /// for another holder; then fails with [`ErrorKind::AlreadyExists`]. A holder that dies
    /// releases its locks.
    fn lock(&self, name: &str, wait: std::time::Duration) -> Result<Box<dyn Send>>;
    /// Where the store is, for messages.
    fn location(&self) -> String;
}

/// What an unfinished write left behind: a local `.tmp-*` file, an abandoned multipart
/// upload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unfinished {
    /// Where it is, relative to the store's root (`packs/ab/.tmp-0123…`).
    pub name: String,
    /// Bytes it holds.
    pub size: u64,
}

/// Open a store from a vault URL (see [`VaultUrl`]): a path or `file://path`. Object
/// storage URLs are recognised and refused with a clear message until their backend lands;
/// other schemes and remote specs are refused as usage errors.
pub fn open(url: &str) -> Result<Box<dyn Store>> {
    match VaultUrl::parse(url)? {
        VaultUrl::Local(path) => Ok(Box::new(LocalStore::new(path))),
        VaultUrl::ObjectStorage(scheme) => Err(url::not_in_this_build(url, scheme)),
    }
}
