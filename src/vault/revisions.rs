//! Objects named by a revision (`keys/<disk>/<gen>-<rev>`, `escrow/<disk>/<id>-<rev>`) are
//! written create-only, and the head lists the revision that counts. A name at a revision the
//! head does not list is either what a killed operation left (trusted by nothing) or what
//! another process wrote and is about to list (a backup starting a DEK generation while a
//! rotation starts one too). It is never overwritten, since that could change the bytes under
//! a digest another process is swapping into the head: the writer takes the next free revision
//! instead, and the leftover stays an orphan that `verify` reports.

use crate::error::{Error, ErrorKind, Result};
use crate::vault::store::Store;

/// How many taken revisions a writer steps over before giving up (each is a killed or
/// concurrent write of the same object).
const MAX_TAKEN: u32 = 1024;

/// Write `object(rev)` (its key and bytes: escrow records bind their key, so the bytes may
/// depend on the revision) create-only at the first free revision from `first`. Returns the
/// revision and the bytes written.
pub(crate) fn put_at_free_revision(
    store: &dyn Store,
    first: u32,
    mut object: impl FnMut(u32) -> Result<(String, Vec<u8>)>,
) -> Result<(u32, Vec<u8>)> {
    let mut rev = first;
    loop {
        let (key, bytes) = object(rev)?;
        match store.put_new(&key, &bytes) {
            Ok(()) => return Ok((rev, bytes)),
            Err(e) if e.kind() == ErrorKind::AlreadyExists && rev - first < MAX_TAKEN => {
                tracing::debug!(object = %key, "revision taken (a killed or concurrent write): trying the next");
                rev += 1;
            }
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                return Err(Error::new(
                    ErrorKind::AlreadyExists,
                    format!("{key}: {MAX_TAKEN} revisions in a row are taken by writes the vault head does not list"),
                ))
            }
            Err(e) => return Err(e),
        }
    }
}
