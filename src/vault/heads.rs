//! Reading and updating the vault head ([`super::head`]): every read is authenticated and
//! checked against the newest head this host has seen (kept in the keystore's state file), and
//! every update is a compare-and-swap that re-reads and re-applies on a lost race.
//!
//! ```text
//!  read:    get_tagged(head) ─▶ MAC (auth version it names) ─▶ vault id ─▶ epoch ≥ seen ─▶ remember
//!  update:  read ─▶ change(copy) ─▶ epoch + 1, MAC ─▶ put_if(tag) ─┬─ ok: remember, done
//!                                                                  └─ conflict: read again
//! ```

use std::time::Duration;

use super::head::{self, Head};
use super::store::{Precondition, Store, Tag};
use super::Vault;
use crate::crypto::keystore::{Keystore, LocalState, SeenHead, VaultKeys};
use crate::error::{Error, ErrorKind, Result};

/// Compare-and-swap attempts before an update gives up (each lost race means another writer
/// made progress, so this bounds only pathological contention).
const CAS_ATTEMPTS: u32 = 64;

/// A head as read: decoded, its bytes' digest and the store's tag for the next swap.
pub(crate) struct ReadHead {
    pub head: Head,
    pub digest: head::Digest,
    pub tag: Tag,
}

/// Authenticate head bytes `b` of vault `vault_id` with `keys`.
pub(crate) fn authenticate(b: &[u8], vault_id: &[u8; 16], keys: &VaultKeys) -> Result<Head> {
    let (id, auth_version) = Head::peek(b)?;
    if &id != vault_id {
        return Err(Error::integrity(format!(
            "the vault head belongs to vault {}, not {}",
            hex::encode(id),
            hex::encode(vault_id)
        )));
    }
    let auth = keys.auth(auth_version).map_err(|e| {
        e.within("the vault head is authenticated by an auth key this keystore lacks")
    })?;
    Head::decode(b, auth)
}

/// Refuse `read` if it is older than what `state` remembers: a rollback (the storage holder
/// served an older copy), a fork (another head of the same epoch), or a return to an older auth
/// key (whose MACs a leaked key could forge).
pub(crate) fn check_fresh(state: &LocalState, read: &ReadHead) -> Result<()> {
    let Some(seen) = &state.head else {
        return Ok(());
    };
    let h = &read.head;
    let digest = hex::encode(read.digest);
    let rolled_back = h.epoch < seen.epoch
        || (h.epoch == seen.epoch && digest != seen.digest)
        || h.auth_version < seen.auth_version;
    if rolled_back {
        return Err(Error::integrity(format!(
            "the vault head is at epoch {} (auth key version {}), but this host saw epoch {} (auth key version {}) at {}: the vault was rolled back or replaced by an older copy; blockvault refuses to use it (restore the vault's newest copy, or see docs/CRYPTO.md, \"Rollback\")",
            h.epoch, h.auth_version, seen.epoch, seen.auth_version, seen.seen
        )));
    }
    Ok(())
}

/// Record `read` as the newest head seen (never moving backwards). `read` was checked against
/// what this host had seen before it was read; another process of this host may have read or
/// written a newer head since (one more swap is all it takes), which is no rollback: the newer
/// one is kept.
pub(crate) fn remember(keystore: &Keystore, vault_id: &[u8; 16], read: &ReadHead) -> Result<()> {
    keystore.update_state(vault_id, |state| {
        // Another process of this host may have recorded a newer head since `read` was checked
        // (or written by our own compare-and-swap): keep the newer one. Failing here would turn
        // a committed head swap into an error after the fact (a backup then removed the packs
        // of the snapshot it had just committed). A fork (same epoch, another digest) is still
        // refused below.
        if state
            .head
            .as_ref()
            .is_some_and(|s| s.epoch > read.head.epoch)
        {
            return Ok(());
        }
        // Checked again under the lock: the same epoch must be the same head.
        check_fresh(state, read)?;
        if state
            .head
            .as_ref()
            .is_some_and(|s| s.epoch == read.head.epoch)
        {
            return Ok(());
        }
        state.head = Some(SeenHead {
            epoch: read.head.epoch,
            digest: hex::encode(read.digest),
            auth_version: read.head.auth_version,
            seen: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        });
        Ok(())
    })
}

/// Read, authenticate and freshness-check the head of vault `vault_id` at `location`, and
/// remember it as the newest seen.
pub(crate) fn read_head(
    raw: &dyn Store,
    vault_id: &[u8; 16],
    keys: &VaultKeys,
    keystore: &Keystore,
    location: &str,
) -> Result<ReadHead> {
    // What this host had seen *before* the read: a head another process of this host swaps in
    // between the read and the check must not make the one read look rolled back.
    let seen = keystore.state(vault_id)?;
    let (bytes, tag) = raw.get_tagged(head::KEY).map_err(|e| match e.kind() {
        ErrorKind::NotFound => Error::integrity(format!(
            "vault {location} has a config but no head: the head was deleted (every snapshot and key record is bound to it; restore it from a copy of the vault)"
        )),
        _ => e,
    })?;
    let head = authenticate(&bytes, vault_id, keys)?;
    let read = ReadHead {
        digest: head::digest(&bytes),
        head,
        tag,
    };
    check_fresh(&seen, &read)?;
    remember(keystore, vault_id, &read)?;
    Ok(read)
}

impl Vault {
    /// Read, authenticate and freshness-check the head.
    pub(crate) fn read_head(&self) -> Result<ReadHead> {
        read_head(
            &*self.raw,
            &self.config.vault_id,
            &self.keys,
            &self.keystore,
            &self.location,
        )
    }

    /// The vault's current head (read now, authenticated and checked for freshness).
    pub fn head(&self) -> Result<Head> {
        let read = self.read_head()?;
        self.cache_head(&read.head);
        Ok(read.head)
    }

    /// The head as last read or written by this process (no I/O).
    pub fn cached_head(&self) -> Head {
        crate::util::lock(&self.head).clone()
    }

    /// Remember `h` as the head last read or written ([`Vault::cached_head`]).
    fn cache_head(&self, h: &Head) {
        *crate::util::lock(&self.head) = h.clone();
    }

    /// Refuse to change head `h` if it names another infrastructure key than the one this
    /// process writes under: an infrastructure key rotation started after the vault was opened,
    /// and whatever this process wrote under the old key is not in its list of objects to
    /// re-encrypt. Listing such an object would leave it under a key the rotation destroys.
    fn check_layer(&self, h: &Head) -> Result<()> {
        if h.infra_version != self.layer_version {
            return Err(Error::new(
                ErrorKind::Conflict,
                format!(
                    "vault {}: its infrastructure key changed (version {} to {}) since this command opened it; nothing it wrote is listed: run it again",
                    self.location, self.layer_version, h.infra_version
                ),
            ));
        }
        Ok(())
    }

    /// Change the head by compare-and-swap: `change` is applied to the newest head (as often
    /// as races are lost, so it must be a pure function of the head it is given plus what the
    /// caller already holds), the epoch grows by one, and the result is written only if no one
    /// else wrote meanwhile. Returns the head written and `change`'s value.
    pub fn update_head<T>(
        &self,
        mut change: impl FnMut(&mut Head) -> Result<T>,
    ) -> Result<(Head, T)> {
        self.update_head_unless(|h| change(h).map(Swap::Write))
    }

    /// [`Vault::update_head`] where `change` may find, in the newest head, that nothing is to
    /// be written ([`Swap::Keep`]: another writer already made the change this one wanted);
    /// then the head as read is returned and no swap is made.
    ///
    /// A lost race is followed by a sleep drawn uniformly from half to all of a backoff that
    /// doubles from 5 ms to 500 ms: many hosts that lost to the same winner spread out instead
    /// of colliding again in step. After [`CAS_ATTEMPTS`] lost races in a row it fails
    /// (`Conflict`), naming the vault.
    pub(crate) fn update_head_unless<T>(
        &self,
        mut change: impl FnMut(&mut Head) -> Result<Swap<T>>,
    ) -> Result<(Head, T)> {
        let mut backoff = Duration::from_millis(5);
        for _ in 0..CAS_ATTEMPTS {
            let read = self.read_head()?;
            self.check_layer(&read.head)?;
            let mut next = read.head.clone();
            let out = match change(&mut next)? {
                Swap::Write(out) => out,
                Swap::Keep(out) => {
                    self.cache_head(&read.head);
                    return Ok((read.head, out));
                }
            };
            next.epoch = read.head.epoch + 1;
            next.written = crate::util::now_unix();
            let bytes = next.encode(self.keys.auth(next.auth_version)?);
            match self
                .raw
                .put_if(head::KEY, &bytes, &Precondition::Matches(read.tag.clone()))
            {
                Ok(tag) => {
                    let written = ReadHead {
                        digest: head::digest(&bytes),
                        head: next,
                        tag,
                    };
                    remember(&self.keystore, &self.config.vault_id, &written)?;
                    self.cache_head(&written.head);
                    return Ok((written.head, out));
                }
                Err(e) if e.kind() == ErrorKind::Conflict => {
                    // Another writer won: back off (jittered), read again, re-apply.
                    let draw = u16::from_le_bytes(crate::crypto::secret::random_bytes::<2>()?);
                    let half = backoff / 2;
                    std::thread::sleep(half + half.mul_f64(f64::from(draw) / f64::from(u16::MAX)));
                    backoff = (backoff * 2).min(Duration::from_millis(500));
                }
                Err(e) => return Err(e),
            }
        }
        Err(Error::new(
            ErrorKind::Conflict,
            format!(
                "vault {}: the head changed under {CAS_ATTEMPTS} attempts in a row; too many writers at once",
                self.location
            ),
        ))
    }
}

/// What a change given to [`Vault::update_head_unless`] decided.
pub(crate) enum Swap<T> {
    /// Write the changed head.
    Write(T),
    /// Write nothing: the head as read already says what the caller wanted.
    Keep(T),
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Another process of this host swapping in a newer head between this one's read and its
    /// `remember` is no rollback: the newer head stays remembered. A head older than what was
    /// seen before it was read is still refused.
    #[test]
    fn a_newer_head_remembered_meanwhile_is_kept_not_a_rollback() {
        let dir = tempfile::tempdir().unwrap();
        let keystore = Keystore::new(dir.path().join("keystore"));
        let vault = crate::keys::init::init(
            dir.path().join("vault").to_str().unwrap(),
            &keystore,
            &crate::keys::init::InitOptions::default(),
        )
        .unwrap()
        .vault;
        let id = vault.config().vault_id;
        let old = vault.read_head().unwrap();
        // What the other process does: one swap, remembered.
        let (newer, ()) = vault.update_head(|_| Ok(())).unwrap();
        assert_eq!(newer.epoch, old.head.epoch + 1);
        remember(&keystore, &id, &old).unwrap();
        let seen = keystore.state(&id).unwrap();
        assert_eq!(seen.head.as_ref().unwrap().epoch, newer.epoch);
        let err = check_fresh(&seen, &old).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Integrity);
        assert!(err.to_string().contains("rolled back"), "{err}");
    }
}
