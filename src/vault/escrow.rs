//! Volume-key escrow: secrets that unlock encrypted volumes *inside* a backed-up disk (a
//! BitLocker recovery key, a LUKS passphrase), kept in the vault beside the disk so that a
//! restored disk can be opened. Like the disk's data they are sealed under the disk's DEK, so
//! whoever can restore the disk can read them and nobody else can.
//!
//! ```text
//! escrow/<disk id hex>/<name id hex>-<rev:08x>   one record per escrow name; escrowing the
//!                                                name again writes rev + 1 (never rewritten)
//!
//! "BVES" | u16 version=1 | u16 0 | u32 generation | u64 created
//! | sealed = nonce [12] ‖ AES-256-GCM( u16 name len ‖ name ‖ secret ) ‖ tag [16]
//! ```
//! - Key: the disk-metadata key of the DEK generation current when the record was written
//!   (the key that seals the disk name; a distinct AAD prefix keeps the two uses apart).
//! - AAD: "blockvault escrow v1" ‖ vault id ‖ disk id ‖ u32 generation ‖ u64 created ‖
//!   object key, so a record copied to another vault, disk or name id, or with its header
//!   edited, fails to open.
//! - Name id: keyed BLAKE3 of the name under a key derived from the disk's current identity
//!   keys: listings show no names, and escrowing a name again replaces its record. A rotation
//!   that starts a new identity generation re-seals every escrow record under it.
//! - The vault head lists each record (name id, revision, digest): a record planted, replaced
//!   by an older one of the same name, or deleted is noticed.
//!
//! Byte layout in docs/FORMAT.md ("Escrow records"), reasons in docs/CRYPTO.md.

use std::fmt;

use zeroize::{Zeroize, Zeroizing};

use super::codec::{Dec, Enc};
use super::frame::Binding;
use super::{Disk, Vault};
use crate::crypto::{GenerationKeys, IdKey, IdentityKeys, Secret32, NONCE_LEN, TAG_LEN};
use crate::error::{Error, Result};

pub(crate) const MAGIC: &[u8; 4] = b"BVES";
const VERSION: u16 = 1;
const AAD_PREFIX: &[u8] = b"blockvault escrow v1";
/// Input of the keyed hash (under the disk-digest key) that makes the name-id key. Fixed
/// forever: changing it orphans every escrow record. No disk digest input can equal it (see
/// docs/CRYPTO.md), so the derived key is never a value stored anywhere.
const NAME_ID_KEY_INPUT: &[u8] = b"blockvault 2026-11-28 escrow name id key v1";
/// Longest escrow name, in bytes.
pub const MAX_NAME: usize = 200;
/// Longest escrowed secret, in bytes.
pub const MAX_SECRET: usize = 64 << 10;
/// Bytes before the sealed payload.
pub const HEADER_LEN: usize = 4 + 2 + 2 + 4 + 8;
const MIN_SEALED: usize = NONCE_LEN + 2 + 1 + 1 + TAG_LEN;
const MAX_SEALED: usize = NONCE_LEN + 2 + MAX_NAME + MAX_SECRET + TAG_LEN;
const _: () = assert!(HEADER_LEN == 20);

/// An escrowed secret, opened. `Debug` shows the name and time only.
pub struct Escrow {
    /// What the secret unlocks, as given at escrow time (e.g. "bitlocker-C").
    pub name: String,
    /// The secret bytes; zeroized on drop.
    pub secret: Zeroizing<Vec<u8>>,
    /// Seconds since the epoch when it was escrowed.
    pub created: u64,
}

impl fmt::Debug for Escrow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Escrow")
            .field("name", &self.name)
            .field("secret", &"<redacted>")
            .field("created", &self.created)
            .finish()
    }
}

/// A stored escrow record, still sealed.
pub struct Record {
    /// DEK generation whose metadata key sealed it.
    pub generation: u32,
    /// Seconds since the epoch; authenticated through the AAD.
    pub created: u64,
    /// `nonce ‖ ciphertext ‖ tag` of the payload.
    pub sealed: Vec<u8>,
}

fn aad(binding: &Binding, generation: u32, created: u64, object_key: &str) -> Vec<u8> {
    let mut e = Enc::default();
    e.bytes(AAD_PREFIX)
        .bytes(&binding.vault_id)
        .bytes(&binding.disk_id)
        .u32(generation)
        .u64(created)
        .bytes(object_key.as_bytes());
    e.finish()
}

/// Refuse names and secrets outside the documented bounds. The message names the escrow but
/// never shows the secret.
fn check_input(name: &str, secret: &[u8]) -> Result<()> {
    if name.is_empty() || name.len() > MAX_NAME || name.chars().any(char::is_control) {
        return Err(Error::usage(format!(
            "escrow name {name:?} must be 1 to {MAX_NAME} bytes of printable text"
        )));
    }
    if secret.is_empty() || secret.len() > MAX_SECRET {
        return Err(Error::usage(format!(
            "escrow {name:?}: the secret is {} bytes; it must be 1 to {MAX_SECRET}",
            secret.len()
        )));
    }
    Ok(())
}

/// Parse an opened payload: `u16 name len ‖ name ‖ secret`. `what` names the record.
/// Public so the fuzz target can reach it; the vault calls it only on authenticated bytes.
pub fn decode_payload(plain: &[u8], what: &str) -> Result<(String, Zeroizing<Vec<u8>>)> {
    let mut d = Dec::new(plain, what);
    let len = d.u16()? as usize;
    if len == 0 || len > MAX_NAME {
        return Err(d.error(format_args!(
            "escrow name length {len} is not 1 to {MAX_NAME}"
        )));
    }
    let name = std::str::from_utf8(d.take(len)?)
        .map_err(|_| d.error("escrow name is not UTF-8"))?
        .to_string();
    let secret_len = d.remaining();
    if secret_len == 0 || secret_len > MAX_SECRET {
        return Err(d.error(format_args!(
            "escrowed secret is {secret_len} bytes, not 1 to {MAX_SECRET}"
        )));
    }
    let secret = Zeroizing::new(d.take(secret_len)?.to_vec());
    Ok((name, secret))
}

impl Record {
    /// Seal `name` and `secret` for the object `object_key` of the bound disk, under the
    /// metadata key of `generation` (whose keys `keys` are).
    pub fn seal(
        binding: &Binding,
        keys: &GenerationKeys,
        generation: u32,
        object_key: &str,
        name: &str,
        secret: &[u8],
    ) -> Result<Record> {
        check_input(name, secret)?;
        let created = crate::util::now_unix();
        let mut plain = Zeroizing::new(Vec::with_capacity(2 + name.len() + secret.len()));
        plain.extend_from_slice(&(name.len() as u16).to_le_bytes());
        plain.extend_from_slice(name.as_bytes());
        plain.extend_from_slice(secret);
        let sealed = keys
            .meta
            .seal_to_vec(&aad(binding, generation, created, object_key), &plain)?;
        Ok(Record {
            generation,
            created,
            sealed,
        })
    }

    /// Serialise.
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Enc::with_capacity(HEADER_LEN + self.sealed.len());
        e.bytes(MAGIC)
            .u16(VERSION)
            .u16(0)
            .u32(self.generation)
            .u64(self.created)
            .bytes(&self.sealed);
        e.finish()
    }

    /// Parse the header and bound the sealed part; `what` (the object key) names errors.
    pub fn decode(b: &[u8], what: &str) -> Result<Record> {
        let mut d = Dec::new(b, what);
        d.prologue(MAGIC, VERSION, "escrow record")?;
        let generation = d.u32()?;
        let created = d.u64()?;
        let len = d.remaining();
        if !(MIN_SEALED..=MAX_SEALED).contains(&len) {
            return Err(d.error(format_args!(
                "sealed escrow payload is {len} bytes, not {MIN_SEALED} to {MAX_SEALED}"
            )));
        }
        Ok(Record {
            generation,
            created,
            sealed: d.take(len)?.to_vec(),
        })
    }

    /// Authenticate and decrypt with the keys of the record's generation; the record must
    /// have been sealed for exactly this vault, disk and `object_key`.
    pub fn open(
        &self,
        binding: &Binding,
        keys: &GenerationKeys,
        object_key: &str,
    ) -> Result<Escrow> {
        let what = || format!("escrow record {object_key}");
        let plain = Zeroizing::new(keys.meta.open_vec(
            &aad(binding, self.generation, self.created, object_key),
            &self.sealed,
            &what,
        )?);
        let (name, secret) = decode_payload(&plain, &what())?;
        Ok(Escrow {
            name,
            secret,
            created: self.created,
        })
    }
}

/// The name id: keyed BLAKE3 of the name under a key that is itself the keyed BLAKE3 of
/// [`NAME_ID_KEY_INPUT`] under the disk-digest key.
pub fn name_id(identity: &IdentityKeys, name: &str) -> [u8; 32] {
    let mut raw = identity.digest.id(NAME_ID_KEY_INPUT).0;
    let key = IdKey::new(Secret32::from_bytes(raw));
    raw.zeroize();
    key.id(name.as_bytes()).0
}

/// Object key of revision `rev` of the record of name id `id` of disk `disk_id`.
pub fn object_key(disk_id: &[u8; 16], id: &[u8; 32], rev: u32) -> String {
    format!(
        "escrow/{}/{}-{rev:08x}",
        hex::encode(disk_id),
        hex::encode(id)
    )
}

impl Vault {
    /// Escrow `secret` under `name` for `disk`, sealed under its current DEK generation.
    /// Escrowing a name again replaces its record (a new revision; the old one is deleted once
    /// the head no longer lists it). Names are 1 to 200 bytes of printable text, secrets
    /// 1 byte to 64 KiB (`Usage` otherwise). The secret is never logged.
    pub fn put_escrow(&self, disk: &Disk, name: &str, secret: &[u8]) -> Result<()> {
        let generation = disk.current_generation();
        let id = name_id(&disk.identity, name);
        let rev = self
            .cached_head()
            .disk(&disk.id)?
            .escrows
            .get(&id)
            .map_or(1, |e| e.rev + 1);
        let keys = disk.generation(generation)?;
        let first = rev;
        let (rev, bytes) = super::revisions::put_at_free_revision(&*self.store, first, |rev| {
            let key = object_key(&disk.id, &id, rev);
            let rec = Record::seal(&disk.binding, &keys, generation, &key, name, secret)?;
            Ok((key, rec.encode()))
        })?;
        let digest = super::head::digest(&bytes);
        let (_, old) = self.update_head(|h| {
            let e = h.disk_mut(&disk.id)?;
            let old = e.escrows.get(&id).copied();
            if old.is_some_and(|o| o.rev >= rev) {
                return Err(Error::new(
                    crate::error::ErrorKind::Conflict,
                    format!("escrow {name} of disk {} was escrowed again by another process meanwhile: run the command again", disk.name),
                ));
            }
            e.escrows.insert(id, super::head::EscrowEntry { rev, digest });
            // Each seal above (one per revision tried) spent a nonce of the generation's
            // metadata key.
            if let Some(g) = e.generations.get_mut(&generation) {
                g.seals = g.seals.saturating_add(u64::from(rev - first + 1));
            }
            Ok(old)
        })?;
        if let Some(old) = old {
            self.store.delete(&object_key(&disk.id, &id, old.rev))?;
        }
        tracing::info!(disk = %disk.name, escrow = name, generation, "secret escrowed");
        Ok(())
    }

    /// Every escrowed secret of `disk` the head lists, by name. A record that is missing,
    /// does not match the head, fails to open, or whose name does not hash to its id is an
    /// error naming the object key.
    pub fn escrows(&self, disk: &Disk) -> Result<Vec<Escrow>> {
        let mut all = Vec::new();
        for (id, entry) in &self.cached_head().disk(&disk.id)?.escrows {
            let key = object_key(&disk.id, id, entry.rev);
            let rec = Record::decode(&self.get_bound(&key, &entry.digest)?, &key)?;
            let keys = disk
                .generation(rec.generation)
                .map_err(|e| e.within(format!("escrow record {key}")))?;
            let escrow = rec.open(&disk.binding, &keys, &key)?;
            if &name_id(&disk.identity, &escrow.name) != id {
                return Err(Error::integrity(format!(
                    "escrow record {key}: holds another name's secret"
                )));
            }
            all.push(escrow);
        }
        all.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(all)
    }

    /// Re-seal every escrow record of `disk` under DEK generation `generation` (its keys
    /// `keys`, its identity keys `identity`): what a rotation that starts a new identity does,
    /// since name ids come from the identity keys. Returns the head entries of the new records;
    /// the old ones stay until the head no longer lists them.
    pub(crate) fn reseal_escrows(
        &self,
        disk: &Disk,
        generation: u32,
        keys: &GenerationKeys,
        identity: &IdentityKeys,
    ) -> Result<std::collections::BTreeMap<[u8; 32], super::head::EscrowEntry>> {
        let old = self.cached_head().disk(&disk.id)?.escrows.clone();
        let mut out = std::collections::BTreeMap::new();
        for escrow in self.escrows(disk)? {
            let id = name_id(identity, &escrow.name);
            let rev = old.get(&id).map_or(1, |e| e.rev + 1);
            let key = object_key(&disk.id, &id, rev);
            let rec = Record::seal(
                &disk.binding,
                keys,
                generation,
                &key,
                &escrow.name,
                &escrow.secret,
            )?;
            let bytes = rec.encode();
            self.store.put(&key, &bytes)?;
            out.insert(
                id,
                super::head::EscrowEntry {
                    rev,
                    digest: super::head::digest(&bytes),
                },
            );
        }
        Ok(out)
    }

    /// Names of the escrowed secrets of `disk`, sorted (each record is opened to read its
    /// name; the secrets are dropped and zeroized at once).
    pub fn escrow_names(&self, disk: &Disk) -> Result<Vec<String>> {
        Ok(self.escrows(disk)?.into_iter().map(|e| e.name).collect())
    }
}
