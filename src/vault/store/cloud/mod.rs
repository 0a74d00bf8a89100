//! A vault on object storage: Azure Blob (`az://`) and S3 and its compatibles (`s3://`),
//! through the `object_store` crate.
//!
//! How the [`Store`] contract maps onto object storage (docs/FORMAT.md §1.3–1.5):
//!
//! | contract | request |
//! |---|---|
//! | `put` (atomic, durable) | one PUT of the whole object (a 32 MiB pack too: single PUTs go up to 5 GiB, and only single PUTs can be conditional) |
//! | `put_new`, `put_if(Absent)` | PUT with `If-None-Match: *`; "already exists" (409/412) is checked by a GET before it counts: our own bytes there mean an earlier attempt landed; nothing there means S3's 409 for a concurrent conditional request, retried |
//! | `get_tagged`, `put_if(Matches)` | GET with its ETag; PUT with `If-Match: ETag` (412: Conflict) |
//! | `get_range` | ranged GET; a range past the end is an Integrity error (checked by HEAD) |
//! | `list` | paginated LIST under the prefix, sorted |
//! | `delete` | DELETE; a missing object is success |
//! | `size`, `modified` | HEAD (Content-Length, Last-Modified) |
//! | `lock` | a lease object, [`super::lease`] |
//!
//! Every request runs through [`runtime::block_on`]; `object_store` retries 5xx, 429 and
//! transport errors with jittered exponential backoff (10 tries within 3 minutes).

mod config;
mod errors;
pub mod probe;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures_util::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, UpdateVersion};

pub use config::{parse, CloudConfig, CloudUrl, Service, ALLOW_HTTP, CA_CERT};

use super::lease::{Lease, DEFAULT_TTL};
use super::names::check_key;
use super::runtime::block_on;
use super::{Precondition, Store, Tag, Unfinished};
use crate::error::{Error, ErrorKind, Result};
use errors::Op;

/// How often a create that met S3's 409 (a concurrent conditional request, nothing stored)
/// is tried again before it fails.
const CREATE_TRIES: u32 = 5;

/// Pack uploads a backup keeps in flight (`Store::puts_in_flight`).
const PUTS_IN_FLIGHT: usize = 3;

/// Requests made, by kind, for the debug log when the store is dropped.
#[derive(Default)]
struct Requests {
    put: AtomicU64,
    get: AtomicU64,
    head: AtomicU64,
    list: AtomicU64,
    delete: AtomicU64,
}

fn count(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// A vault in a bucket or container, under a prefix. A cheap handle: clones share the client
/// (a lease's renewer thread holds one).
#[derive(Clone)]
pub struct CloudStore(Arc<Bucket>);

/// What the handles share.
struct Bucket {
    client: Arc<dyn ObjectStore>,
    location: String,
    secrets: Vec<String>,
    requests: Requests,
}

impl CloudStore {
    /// Open the store `url` names with `config`, and probe that it enforces conditional
    /// writes ([`probe::conditional_writes`]): a store that ignores them is refused.
    pub fn open(url: &str, config: &CloudConfig) -> Result<CloudStore> {
        let store = Self::open_unprobed(url, config)?;
        let started = std::time::Instant::now();
        probe::conditional_writes(&store)?;
        tracing::debug!(vault = %store.0.location, ms = started.elapsed().as_secs_f64() * 1e3, "conditional writes enforced");
        Ok(store)
    }

    /// Open without the probe: for the probe's own tests and for measuring it.
    pub fn open_unprobed(url: &str, config: &CloudConfig) -> Result<CloudStore> {
        let parsed = parse(url)?;
        let client = config.build(&parsed)?;
        Ok(CloudStore(Arc::new(Bucket {
            client,
            location: parsed.canonical(),
            secrets: config.secrets(),
            requests: Requests::default(),
        })))
    }

    fn path(&self, key: &str) -> Result<Path> {
        check_key(key)?;
        Path::parse(key).map_err(|_| Error::usage(format!("invalid object key {key:?}")))
    }

    fn fail(
        &self,
        verb: &str,
        key: &str,
        replace: bool,
    ) -> impl FnOnce(object_store::Error) -> Error + '_ {
        let op_verb = verb.to_string();
        let key = key.to_string();
        move |e| {
            errors::map(
                e,
                &Op {
                    verb: &op_verb,
                    key: &key,
                    location: &self.0.location,
                    replace,
                },
                &self.0.secrets,
            )
        }
    }

    fn put_mode(&self, key: &str, data: &[u8], mode: PutMode) -> Result<Tag> {
        self.put_payload(key, Bytes::copy_from_slice(data), mode)
    }

    /// PUT `data` (shared with the request, not copied) under `key`.
    fn put_payload(&self, key: &str, data: Bytes, mode: PutMode) -> Result<Tag> {
        let path = self.path(key)?;
        let replace = matches!(mode, PutMode::Update(_));
        count(&self.0.requests.put);
        let payload = PutPayload::from(data);
        let result = block_on(
            self.0
                .client
                .put_opts(&path, payload, PutOptions::from(mode)),
        )?
        .map_err(self.fail("writing", key, replace))?;
        result.e_tag.map(Tag).ok_or_else(|| self.no_etag(key))
    }

    fn no_etag(&self, key: &str) -> Error {
        Error::new(
            ErrorKind::Unsupported,
            format!(
                "object {key} in vault {}: the store returned no ETag, which compare-and-swap needs",
                self.0.location
            ),
        )
    }

    /// Create `key` if absent; see the contract: an "already exists" answer is checked
    /// against what is stored before it counts.
    fn create(&self, key: &str, data: &[u8]) -> Result<Tag> {
        let mut tries = 0;
        loop {
            tries += 1;
            match self.put_mode(key, data, PutMode::Create) {
                Err(e) if e.kind() == ErrorKind::AlreadyExists => match self.get_tagged(key) {
                    Ok((stored, tag)) if stored == data => return Ok(tag),
                    Ok(_) => return Err(e),
                    // Nothing stored: S3's 409 ConditionalRequestConflict (another
                    // conditional request on the key was in flight). Try again.
                    Err(g) if g.kind() == ErrorKind::NotFound && tries < CREATE_TRIES => {
                        std::thread::sleep(Duration::from_millis(50 << tries));
                    }
                    Err(_) => return Err(e),
                },
                other => return other,
            }
        }
    }

    fn head(&self, key: &str) -> Result<object_store::ObjectMeta> {
        let path = self.path(key)?;
        count(&self.0.requests.head);
        block_on(self.0.client.head(&path))?.map_err(self.fail("stat", key, false))
    }

    fn past_end(&self, key: &str, offset: u64, len: usize) -> Error {
        Error::integrity(format!(
            "object {key} in vault {} is truncated: {len} bytes at offset {offset} run past its end",
            self.0.location
        ))
    }
}

impl Store for CloudStore {
    fn put(&self, key: &str, data: &[u8]) -> Result<()> {
        self.put_mode(key, data, PutMode::Overwrite).map(|_| ())
    }

    fn put_owned(&self, key: &str, data: Vec<u8>) -> Result<Vec<u8>> {
        let shared = Bytes::from(data);
        self.put_payload(key, shared.clone(), PutMode::Overwrite)?;
        // The request is done with it: the buffer is ours again unless the client kept a
        // reference (then the next pack allocates its own).
        Ok(shared.try_into_mut().map(Vec::from).unwrap_or_default())
    }

    fn puts_in_flight(&self) -> usize {
        PUTS_IN_FLIGHT
    }

    fn put_new(&self, key: &str, data: &[u8]) -> Result<()> {
        self.create(key, data).map(|_| ())
    }

    fn get(&self, key: &str) -> Result<Vec<u8>> {
        self.get_tagged(key).map(|(bytes, _)| bytes)
    }

    fn get_tagged(&self, key: &str) -> Result<(Vec<u8>, Tag)> {
        let path = self.path(key)?;
        count(&self.0.requests.get);
        let fail = self.fail("reading", key, false);
        let bytes_fail = self.fail("reading", key, false);
        block_on(async {
            let got = self.0.client.get(&path).await.map_err(fail)?;
            let tag = got.meta.e_tag.clone();
            let bytes = got.bytes().await.map_err(bytes_fail)?;
            Ok((bytes.to_vec(), tag))
        })?
        .and_then(|(bytes, tag)| Ok((bytes, tag.map(Tag).ok_or_else(|| self.no_etag(key))?)))
    }

    fn put_if(&self, key: &str, data: &[u8], pre: &Precondition) -> Result<Tag> {
        let conflict = |e: Error| {
            if matches!(e.kind(), ErrorKind::AlreadyExists | ErrorKind::NotFound) {
                Error::new(
                    ErrorKind::Conflict,
                    format!(
                        "object {key} in vault {} changed since it was read",
                        self.0.location
                    ),
                )
            } else {
                e
            }
        };
        match pre {
            Precondition::Absent => self.create(key, data).map_err(conflict),
            Precondition::Matches(tag) => self
                .put_mode(
                    key,
                    data,
                    PutMode::Update(UpdateVersion {
                        e_tag: Some(tag.0.clone()),
                        version: None,
                    }),
                )
                .map_err(conflict),
        }
    }

    fn get_range(&self, key: &str, offset: u64, len: usize) -> Result<Vec<u8>> {
        let path = self.path(key)?;
        let Some(end) = offset.checked_add(len as u64) else {
            return Err(self.past_end(key, offset, len));
        };
        if len == 0 {
            // No ranged GET of nothing: the object must exist and reach `offset`.
            return if offset <= self.size(key)? {
                Ok(Vec::new())
            } else {
                Err(self.past_end(key, offset, len))
            };
        }
        count(&self.0.requests.get);
        match block_on(self.0.client.get_range(&path, offset..end))? {
            Ok(bytes) if bytes.len() == len => Ok(bytes.to_vec()),
            Ok(_) => Err(self.past_end(key, offset, len)),
            Err(e) => {
                let e = self.fail("reading", key, false)(e);
                if e.kind() == ErrorKind::NotFound {
                    return Err(e);
                }
                // A range the object does not cover (416, or a short answer the client
                // refused) is a truncated object; anything else is the error it was.
                match self.size(key) {
                    Ok(size) if end > size => Err(self.past_end(key, offset, len)),
                    Err(n) if n.kind() == ErrorKind::NotFound => Err(n),
                    _ => Err(e),
                }
            }
        }
    }

    fn list(&self, prefix: &str) -> Result<Vec<String>> {
        let folder = match prefix.trim_end_matches('/') {
            "" => None,
            p => Some(self.path(p)?),
        };
        count(&self.0.requests.list);
        let mut keys: Vec<String> = block_on(
            self.0
                .client
                .list(folder.as_ref())
                .map_ok(|meta| meta.location.to_string())
                .try_collect(),
        )?
        .map_err(self.fail("listing", prefix, false))?;
        keys.sort();
        Ok(keys)
    }

    fn delete(&self, key: &str) -> Result<()> {
        let path = self.path(key)?;
        count(&self.0.requests.delete);
        match block_on(self.0.client.delete(&path))? {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.fail("deleting", key, false)(e)),
        }
    }

    fn size(&self, key: &str) -> Result<u64> {
        Ok(self.head(key)?.size)
    }

    fn modified(&self, key: &str) -> Result<SystemTime> {
        Ok(self.head(key)?.last_modified.into())
    }

    fn unfinished(&self) -> Result<Vec<Unfinished>> {
        // Every object is one PUT (never a multipart upload): a write cut off midway leaves
        // nothing in the bucket.
        Ok(Vec::new())
    }

    fn lock(&self, name: &str, wait: Duration) -> Result<Box<dyn Send>> {
        let me: Arc<dyn Store> = Arc::new(self.clone());
        Ok(Box::new(Lease::acquire(me, name, wait, DEFAULT_TTL)?))
    }

    fn location(&self) -> String {
        self.0.location.clone()
    }
}

impl Drop for Bucket {
    fn drop(&mut self) {
        let r = &self.requests;
        tracing::debug!(
            vault = %self.location,
            put = r.put.load(Ordering::Relaxed),
            get = r.get.load(Ordering::Relaxed),
            head = r.head.load(Ordering::Relaxed),
            list = r.list.load(Ordering::Relaxed),
            delete = r.delete.load(Ordering::Relaxed),
            "object store requests"
        );
    }
}
