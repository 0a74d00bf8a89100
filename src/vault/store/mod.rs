//! Where vault objects live. One small trait, implemented by each backend; behaviour such as
//! retries or a second encryption layer is added by wrapping a store, not inside backends.
//!
//! Keys are `/`-separated relative names (`packs/ab/ab12…`, `snapshots/<disk>/<id>`).
//!
//! ```text
//!  store::open(URL)
//!    ├─ path, file://PATH ──► LocalStore (folder; flock locks)
//!    └─ s3://, az:// ───────► CloudStore (object_store client; probe of conditional writes;
//!                              runtime::block_on is the one sync→async bridge;
//!                              locks are lease objects, lease.rs)
//!  XtsStore wraps either one (infrastructure encryption)
//! ```

pub mod clock;
pub mod cloud;
pub mod lease;
pub mod local;
mod names;
mod runtime;
pub mod url;
pub mod xts;
mod xts_unit;

use std::time::SystemTime;

use crate::error::Result;

pub use cloud::CloudStore;
pub use local::LocalStore;
pub use url::VaultUrl;

/// Object storage as the vault needs it.
///
/// Contract every backend keeps (the conformance tests in `tests/store.rs` check it):
/// - `put` is atomic and durable: when it returns, a reader sees the whole object and a crash
///   never leaves a partial object under `key`; writing an existing key replaces it atomically.
/// - `get`/`get_range` of a missing key fail with [`ErrorKind::NotFound`](crate::error::ErrorKind::NotFound); a range past the
///   end fails with [`ErrorKind::Integrity`](crate::error::ErrorKind::Integrity) (a truncated object).
/// - `list(prefix)` returns every key under the folder `prefix`, recursively, sorted; names of
///   unfinished writes are never listed.
/// - `delete` of a missing key succeeds (idempotent).
/// - `get_tagged` returns the object with its [`Tag`]; `put_if` replaces (or creates) it only
///   if the stored object is still the one `Precondition` names, atomically with respect to
///   every other `put_if` of the key, from any process or host: of two writers that read the
///   same tag, exactly one succeeds and the other gets [`ErrorKind::Conflict`](crate::error::ErrorKind::Conflict) and changes
///   nothing. This is how the vault head is updated by many hosts with no lock.
/// - A create (`put_new`, `put_if` with [`Precondition::Absent`]) that finds the key taken
///   compares the stored bytes with its own before it fails: equal bytes count as success,
///   since on object storage a create retried after a lost response finds its own first
///   attempt. Callers whose creates must not be confused with another writer's make the bytes
///   unique (vault ids, random nonces). A replace (`Precondition::Matches`) never does this:
///   two writers making the same change must not both believe they applied it.
/// - `modified` is the time the *store* recorded for the object's last write, by the store's
///   clock (an object store's Last-Modified, to the second; a folder's mtime). Ages for
///   retention are measured against it, and the store's offset from the local clock is
///   measured with [`clock::skew`].
/// - `lock` is exclusive across every process that opens the store at the same place, and a
///   holder that dies or vanishes releases it: a `flock` in a folder, a lease object renewed
///   while held on object storage ([`lease`]).
/// - `unfinished` reports what writes that never completed (their process was killed) left
///   in the backend, in any folder: nothing `list` shows, `get` reads or the vault counts on,
///   yet it takes space until removed. A write still running may show up too (its process
///   is alive): callers report these, they do not delete them.
pub trait Store: Send + Sync {
    /// Write a whole object.
    fn put(&self, key: &str, data: &[u8]) -> Result<()>;
    /// Write a whole object from a buffer the caller gives up, and return the buffer for
    /// reuse (its content unspecified). As `put`; for packs: a backend whose client must own
    /// what it sends (object storage) takes the buffer instead of copying 32 MiB.
    fn put_owned(&self, key: &str, data: Vec<u8>) -> Result<Vec<u8>> {
        self.put(key, &data).map(|()| data)
    }
    /// How many pack writes a backup keeps in flight at once: object storage gains from
    /// overlapping requests that wait on the network; a local folder's writes are bound by
    /// the same CPU and disk, and one overlapping the next pack's filling is enough.
    /// Each costs a pack buffer ([`TARGET_SIZE`](crate::vault::pack::TARGET_SIZE)) of memory.
    fn puts_in_flight(&self) -> usize {
        1
    }
    /// Write a whole object that must not exist yet: fails with
    /// [`ErrorKind::AlreadyExists`](crate::error::ErrorKind::AlreadyExists) (and changes nothing) if it does. For objects that two
    /// writers could race to create (the config, key records).
    fn put_new(&self, key: &str, data: &[u8]) -> Result<()>;
    /// Read a whole object.
    fn get(&self, key: &str) -> Result<Vec<u8>>;
    /// Read a whole object and the tag that names this version of it.
    fn get_tagged(&self, key: &str) -> Result<(Vec<u8>, Tag)>;
    /// Write a whole object if `pre` holds for what is stored now (compare-and-swap); returns
    /// the new object's tag. Fails with [`ErrorKind::Conflict`](crate::error::ErrorKind::Conflict), changing nothing, if not.
    fn put_if(&self, key: &str, data: &[u8], pre: &Precondition) -> Result<Tag>;
    /// Read `len` bytes at `offset`.
    fn get_range(&self, key: &str, offset: u64, len: usize) -> Result<Vec<u8>>;
    /// Keys under a folder.
    fn list(&self, prefix: &str) -> Result<Vec<String>>;
    /// Remove an object.
    fn delete(&self, key: &str) -> Result<()>;
    /// Size of an object.
    fn size(&self, key: &str) -> Result<u64>;
    /// When the object was last written, by the store's clock.
    fn modified(&self, key: &str) -> Result<SystemTime>;
    /// Leftovers of unfinished writes (see the contract), sorted by name.
    fn unfinished(&self) -> Result<Vec<Unfinished>>;
    /// Take an exclusive lock named `name`, held until the guard drops, waiting up to `wait`
    /// for another holder; then fails with [`ErrorKind::AlreadyExists`](crate::error::ErrorKind::AlreadyExists) and a message saying
    /// "locked" and by whom. A holder that dies releases its locks.
    fn lock(&self, name: &str, wait: std::time::Duration) -> Result<Box<dyn Send>>;
    /// Where the store is, for messages.
    fn location(&self) -> String;
}

/// The version of an object as its store names it: an ETag on object storage, the BLAKE3 of
/// the bytes in a local folder. Opaque: only compared for equality.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tag(pub String);

/// What [`Store::put_if`] requires of the object stored under the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Precondition {
    /// No object exists (create).
    Absent,
    /// The object is exactly the version read with this tag (replace).
    Matches(Tag),
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

/// Open a store from a vault URL (see [`VaultUrl`]): a path or `file://path` (a folder),
/// `s3://BUCKET/PREFIX` (S3 and compatibles) or `az://CONTAINER/PREFIX` (Azure Blob),
/// configured from the environment ([`cloud::CloudConfig::from_env`]). An object store is
/// probed before it is returned: one that does not enforce conditional writes is refused
/// ([`cloud::probe`]). Other schemes and remote specs are refused as usage errors.
pub fn open(url: &str) -> Result<Box<dyn Store>> {
    match VaultUrl::parse(url)? {
        VaultUrl::Local(path) => Ok(Box::new(LocalStore::new(path))),
        VaultUrl::ObjectStorage(_) => Ok(Box::new(CloudStore::open(
            url,
            &cloud::CloudConfig::from_env(),
        )?)),
    }
}
