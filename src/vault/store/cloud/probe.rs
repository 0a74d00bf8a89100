//! Does the store really enforce conditional writes?
//!
//! The vault head is updated by compare-and-swap and config, key records and leases are
//! created only if absent. Some S3-compatible servers accept `If-None-Match` and `If-Match`
//! and ignore them: every write then succeeds, and two hosts silently overwrite each other's
//! head (a lost snapshot, a lost key rotation). So before a store is used, a probe object is
//! written the way the vault writes its head, and every answer that matters is checked:
//!
//! 1. create `probes/<random>` if absent: must succeed;
//! 2. create it again with other bytes: must fail (If-None-Match enforced);
//! 3. replace it naming a tag it never had: must fail (If-Match enforced);
//! 4. replace it naming the tag from step 1: must succeed, and read back as written;
//! 5. delete it.
//!
//! Five requests plus a read; the probe runs at every open (on loopback it costs a few
//! milliseconds, against a cloud region about the time of six small requests; see
//! docs/ARCHITECTURE.md for the measured figure).

use super::super::{Precondition, Store, Tag};
use crate::crypto::secret::random_bytes;
use crate::error::{Error, ErrorKind, Result};

/// Folder of the probe objects (each probe deletes its own).
pub const PROBE_FOLDER: &str = "probes";

/// Probe `store`; an error says which check failed and why that makes the store unsafe.
pub fn conditional_writes(store: &dyn Store) -> Result<()> {
    let key = format!(
        "{PROBE_FOLDER}/conditional-{}",
        hex::encode(random_bytes::<8>()?)
    );
    let refuse = |what: &str| {
        Error::new(
            ErrorKind::Unsupported,
            format!(
                "vault {}: the store does not enforce conditional writes ({what}, probe object \
                 {key}); two hosts could overwrite each other's vault head, so blockvault \
                 refuses to use it. Use a store that enforces If-None-Match and If-Match \
                 (AWS S3, Azure Blob Storage, a recent SeaweedFS)",
                store.location()
            ),
        )
    };
    let first = store.put_if(
        &key,
        b"blockvault probe: first create",
        &Precondition::Absent,
    )?;
    let result = (|| {
        match store.put_if(
            &key,
            b"blockvault probe: second create",
            &Precondition::Absent,
        ) {
            Err(e) if e.kind() == ErrorKind::Conflict => {}
            Err(e) => return Err(e),
            Ok(_) => {
                return Err(refuse(
                    "a second If-None-Match: * create of one key succeeded",
                ))
            }
        }
        let wrong = Tag(format!("\"{}\"", hex::encode(random_bytes::<16>()?)));
        match store.put_if(
            &key,
            b"blockvault probe: wrong tag",
            &Precondition::Matches(wrong),
        ) {
            Err(e) if e.kind() == ErrorKind::Conflict => {}
            Err(e) => return Err(e),
            Ok(_) => {
                return Err(refuse(
                    "a replace with If-Match naming a wrong ETag succeeded",
                ))
            }
        }
        let last = b"blockvault probe: swapped";
        store
            .put_if(&key, last, &Precondition::Matches(first))
            .map_err(|e| match e.kind() {
                ErrorKind::Conflict => {
                    refuse("a replace with If-Match naming the current ETag failed")
                }
                _ => e,
            })?;
        if store.get(&key)? != last {
            return Err(refuse(
                "the object read back is not the one the last replace wrote",
            ));
        }
        Ok(())
    })();
    let cleanup = store.delete(&key);
    result.and(cleanup)
}
