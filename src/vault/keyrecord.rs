//! Key records: one per DEK generation of a disk, holding that DEK wrapped by one or more
//! KEKs and the disk's name sealed under the DEK.
//!
//! ```text
//! "BVKR" | u16 version=2 | u16 0 | vault id [16] | disk id [16] | u32 generation | u64 created
//! | u16 n × ( u8 KEK kind | u32 KEK version | u16 len | wrapped [len] = nonce‖ct‖tag )
//! | u16 len | sealed name [len] = nonce‖ct‖tag
//! ```
//! Stored at `keys/<disk id>/<generation:08x>-<rev:08x>` and never rewritten: a rewrap
//! (rotation, recovery) writes revision rev + 1 and the vault head switches to it. A record is
//! authentic because the head lists its digest (an RSA public-key wrap proves nothing about who
//! made it: anyone holding the storage has the public key). Version 1 records
//! (`keys/<disk id>/<generation:08x>`, followed by a MAC under the keystore's auth key) are
//! read only by `upgrade`.
//! Wrap AAD: "blockvault dek wrap v1" ‖ vault id ‖ disk id ‖ u32 generation ‖ u64 created ‖
//! u8 kind ‖ u32 version, so a wrap cannot be moved to another vault, disk, generation, record
//! time or KEK.
//! Several wraps leave room for a recovery key and re-wrapping during rotation.

use super::codec::{Dec, Enc};
use crate::crypto::kek::{KekId, KekKind, KekProvider};
use crate::crypto::keyring::Keyring;
use crate::crypto::{GenerationKeys, Secret32};
use crate::error::{Error, ErrorKind, Result};

pub(crate) const MAGIC: &[u8; 4] = b"BVKR";
const VERSION: u16 = 2;
const VERSION_1: u16 = 1;
const WRAP_AAD: &[u8] = b"blockvault dek wrap v1";
const NAME_AAD: &[u8] = b"blockvault disk name v1";
const MAC_CONTEXT: &str = "blockvault 2026-11-28 key record mac v1";
const MAC_LEN: usize = 32;

/// The key that authenticated version 1 key records, derived from the keystore's auth key.
pub fn mac_key(auth: &Secret32) -> Secret32 {
    Secret32::from_bytes(blake3::derive_key(MAC_CONTEXT, auth.expose()))
}

/// A stored DEK generation of a disk.
pub struct KeyRecord {
    /// Vault the record belongs to.
    pub vault_id: [u8; 16],
    /// Disk the DEK belongs to.
    pub disk_id: [u8; 16],
    /// DEK generation, from 0.
    pub generation: u32,
    /// Seconds since the epoch.
    pub created: u64,
    /// The DEK wrapped by each KEK.
    pub wraps: Vec<(KekId, Vec<u8>)>,
    /// The disk name, sealed with the generation's metadata key.
    pub sealed_name: Vec<u8>,
}

/// Object key of revision `rev` of a record.
pub fn object_key(disk_id: &[u8; 16], generation: u32, rev: u32) -> String {
    format!("keys/{}/{generation:08x}-{rev:08x}", hex::encode(disk_id))
}

/// Object key of a version 1 record (one per generation, rewritten in place).
pub fn object_key_v1(disk_id: &[u8; 16], generation: u32) -> String {
    format!("keys/{}/{generation:08x}", hex::encode(disk_id))
}

/// `(generation, rev)` from the last component of a version 2 record's name, if it is one.
pub fn parse_name(name: &str) -> Option<(u32, u32)> {
    let (g, r) = name.split_once('-')?;
    let hex8 = |s: &str| {
        (s.len() == 8
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
        .then(|| u32::from_str_radix(s, 16).ok())
        .flatten()
    };
    Some((hex8(g)?, hex8(r)?))
}

fn wrap_aad(
    vault_id: &[u8; 16],
    disk_id: &[u8; 16],
    generation: u32,
    created: u64,
    kek: KekId,
) -> Vec<u8> {
    let mut e = Enc::default();
    e.bytes(WRAP_AAD)
        .bytes(vault_id)
        .bytes(disk_id)
        .u32(generation)
        .u64(created)
        .u8(kek.kind as u8)
        .u32(kek.version);
    e.finish()
}

fn name_aad(vault_id: &[u8; 16], disk_id: &[u8; 16]) -> Vec<u8> {
    [NAME_AAD, vault_id, disk_id].concat()
}

impl KeyRecord {
    /// Wrap `dek` with every KEK of `keyring` and seal `name`.
    pub fn create(
        vault_id: [u8; 16],
        disk_id: [u8; 16],
        generation: u32,
        dek: &Secret32,
        name: &str,
        keyring: &Keyring,
    ) -> Result<Self> {
        let keys = GenerationKeys::derive(dek);
        let sealed_name = keys
            .meta
            .seal_to_vec(&name_aad(&vault_id, &disk_id), name.as_bytes())?;
        let mut rec = KeyRecord {
            vault_id,
            disk_id,
            generation,
            created: crate::util::now_unix(),
            wraps: Vec::new(),
            sealed_name,
        };
        rec.rewrap(dek, keyring)?;
        Ok(rec)
    }

    /// Replace the wraps with fresh ones of `dek` by every KEK of `keyring` (rotation,
    /// recovery): the data sealed under the DEK is untouched.
    pub fn rewrap(&mut self, dek: &Secret32, keyring: &Keyring) -> Result<()> {
        let mut wraps = Vec::new();
        for id in keyring.wrapping_ids()? {
            let aad = wrap_aad(
                &self.vault_id,
                &self.disk_id,
                self.generation,
                self.created,
                id,
            );
            wraps.push((id, keyring.wrap(id, dek, &aad)?));
        }
        self.wraps = wraps;
        Ok(())
    }

    /// Whether the record holds exactly one wrap by each of `keks`, in that order: what a
    /// rotation to `keks` leaves.
    pub fn is_wrapped_by(&self, keks: &[KekId]) -> bool {
        self.wraps.iter().map(|w| w.0).eq(keks.iter().copied())
    }

    /// Unwrap the DEK with the first wrap `kek` can open. Errors say which key failed and why
    /// (the first wrap of a kind `kek` handles: the vault's primary KEK, else the recovery key).
    pub fn unwrap(&self, kek: &dyn KekProvider) -> Result<Secret32> {
        let mut first = None;
        for (id, wrapped) in self.wraps.iter().filter(|(id, _)| kek.handles(id.kind)) {
            match kek.unwrap(
                *id,
                wrapped,
                &wrap_aad(
                    &self.vault_id,
                    &self.disk_id,
                    self.generation,
                    self.created,
                    *id,
                ),
            ) {
                Ok(k) => return Ok(k),
                Err(e) => {
                    first.get_or_insert(e);
                }
            }
        }
        Err(first
            .unwrap_or_else(|| {
                let by: Vec<String> = self.wraps.iter().map(|(id, _)| id.to_string()).collect();
                Error::new(
                    ErrorKind::Key,
                    format!("no wrap by a key at hand (wrapped by {})", by.join(", ")),
                )
            })
            .within(format!(
                "key record of disk {} generation {}",
                hex::encode(self.disk_id),
                self.generation
            )))
    }

    /// Open the sealed disk name.
    pub fn name(&self, keys: &GenerationKeys) -> Result<String> {
        let what = || {
            format!(
                "disk name in the key record of disk {} generation {}",
                hex::encode(self.disk_id),
                self.generation
            )
        };
        let b = keys.meta.open_vec(
            &name_aad(&self.vault_id, &self.disk_id),
            &self.sealed_name,
            &what,
        )?;
        String::from_utf8(b).map_err(|_| Error::integrity(format!("{}: not UTF-8", what())))
    }

    /// Serialise (version 2: the vault head binds it by digest).
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Enc::default();
        e.bytes(MAGIC)
            .u16(VERSION)
            .u16(0)
            .bytes(&self.vault_id)
            .bytes(&self.disk_id)
            .u32(self.generation)
            .u64(self.created);
        e.u16(self.wraps.len() as u16);
        for (id, w) in &self.wraps {
            e.u8(id.kind as u8)
                .u32(id.version)
                .u16(w.len() as u16)
                .bytes(w);
        }
        e.u16(self.sealed_name.len() as u16)
            .bytes(&self.sealed_name);
        e.finish()
    }

    /// Parse a version 2 record found under `what`, checking that it names the vault and
    /// disk it was found under. Its authenticity is the caller's to check: the digest the
    /// vault head lists for it.
    pub fn decode(b: &[u8], what: &str, vault_id: &[u8; 16], disk_id: &[u8; 16]) -> Result<Self> {
        let mut d = Dec::new(b, what);
        d.prologue(MAGIC, VERSION, "key record")?;
        let rec = Self::decode_fields(&mut d, what, vault_id, disk_id)?;
        d.end()?;
        Ok(rec)
    }

    /// Parse a version 1 record (`upgrade`), checking its MAC with `mac` (from [`mac_key`])
    /// and that it names the vault and disk it was found under.
    pub fn decode_v1(
        b: &[u8],
        what: &str,
        vault_id: &[u8; 16],
        disk_id: &[u8; 16],
        mac: &Secret32,
    ) -> Result<Self> {
        let Some(body_len) = b.len().checked_sub(MAC_LEN) else {
            return Err(Error::integrity(format!("{what}: truncated key record")));
        };
        let (body, tag) = b.split_at(body_len);
        let tag: [u8; MAC_LEN] = tag.try_into().expect("split at MAC_LEN");
        if blake3::keyed_hash(mac.expose(), body) != blake3::Hash::from(tag) {
            return Err(Error::integrity(format!(
                "{what}: key record failed authentication: it was altered or forged, or the keystore belongs to another vault"
            )));
        }
        let mut d = Dec::new(body, what);
        d.prologue(MAGIC, VERSION_1, "key record")?;
        let rec = Self::decode_fields(&mut d, what, vault_id, disk_id)?;
        d.end()?;
        Ok(rec)
    }

    /// The fields after the prologue, identical in versions 1 and 2.
    fn decode_fields(
        d: &mut Dec,
        what: &str,
        vault_id: &[u8; 16],
        disk_id: &[u8; 16],
    ) -> Result<Self> {
        let rec_vault: [u8; 16] = d.array()?;
        let rec_disk: [u8; 16] = d.array()?;
        if &rec_vault != vault_id {
            return Err(Error::integrity(format!(
                "{what}: record belongs to another vault ({})",
                hex::encode(rec_vault)
            )));
        }
        if &rec_disk != disk_id {
            return Err(Error::integrity(format!(
                "{what}: record belongs to another disk ({})",
                hex::encode(rec_disk)
            )));
        }
        let generation = d.u32()?;
        let created = d.u64()?;
        let n = d.u16()? as u64;
        let n = d.count(n, 7)?;
        let mut wraps = Vec::with_capacity(n);
        for _ in 0..n {
            let kind = d.u8()?;
            let version = d.u32()?;
            let len = d.u16()? as usize;
            let wrapped = d.take(len)?.to_vec();
            // A wrap by a KEK kind this build does not know (added by a newer build, e.g. a
            // recovery key) is skipped, not fatal: the record stays readable through the others.
            match KekKind::from_u8(kind) {
                Ok(kind) => wraps.push((KekId { kind, version }, wrapped)),
                Err(_) => {
                    tracing::debug!(record = what, kind, "skipping wrap by an unknown KEK kind")
                }
            }
        }
        let len = d.u16()? as usize;
        let sealed_name = d.take(len)?.to_vec();
        Ok(KeyRecord {
            vault_id: rec_vault,
            disk_id: rec_disk,
            generation,
            created,
            wraps,
            sealed_name,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::kek::{KekState, PlatformKek, PlatformKeyVersion};

    fn kek() -> Keyring {
        let platform = PlatformKek::new(vec![PlatformKeyVersion {
            version: 1,
            state: KekState::Enabled,
            created: 0,
            key: Secret32::from_bytes([4; 32]),
        }]);
        Keyring::new(KekKind::Platform, Box::new(platform), None)
    }

    #[test]
    fn records_cannot_be_swapped_between_disks_generations_or_vaults() {
        let k = kek();
        let dek = Secret32::from_bytes([8; 32]);
        let rec = KeyRecord::create([1; 16], [2; 16], 0, &dek, "vm1", &k).unwrap();
        assert_eq!(rec.unwrap(&k).unwrap().expose(), dek.expose());
        let bytes = rec.encode();
        let back = KeyRecord::decode(&bytes, "r", &[1; 16], &[2; 16]).unwrap();
        assert_eq!(back.name(&GenerationKeys::derive(&dek)).unwrap(), "vm1");
        // Found under another disk or vault: refused by the header check.
        assert!(KeyRecord::decode(&bytes, "r", &[1; 16], &[3; 16]).is_err());
        assert!(KeyRecord::decode(&bytes, "r", &[7; 16], &[2; 16]).is_err());
        // Header rewritten to claim another disk or generation: the wrap's AAD refuses.
        for edit in [
            |r: &mut KeyRecord| r.disk_id = [3; 16],
            |r: &mut KeyRecord| r.generation = 1,
            |r: &mut KeyRecord| r.created += 1,
        ] {
            let mut forged = KeyRecord::decode(&bytes, "r", &[1; 16], &[2; 16]).unwrap();
            edit(&mut forged);
            assert!(forged.unwrap(&k).is_err());
        }
    }

    /// A version 1 record (as the previous build wrote it: the same fields with version 1,
    /// then a MAC) reads through `decode_v1` only, and only with its MAC key.
    #[test]
    fn version_1_records_need_their_mac() {
        let k = kek();
        let dek = Secret32::from_bytes([8; 32]);
        let rec = KeyRecord::create([1; 16], [2; 16], 0, &dek, "vm1", &k).unwrap();
        let mut v1 = rec.encode();
        v1[4..6].copy_from_slice(&1u16.to_le_bytes());
        let mac = mac_key(&Secret32::from_bytes([9; 32]));
        let tag = blake3::keyed_hash(mac.expose(), &v1);
        v1.extend_from_slice(tag.as_bytes());
        let back = KeyRecord::decode_v1(&v1, "r", &[1; 16], &[2; 16], &mac).unwrap();
        assert_eq!(back.unwrap(&k).unwrap().expose(), dek.expose());
        let other = mac_key(&Secret32::from_bytes([10; 32]));
        let Err(e) = KeyRecord::decode_v1(&v1, "r", &[1; 16], &[2; 16], &other) else {
            panic!("a record under another MAC key must be refused")
        };
        assert!(e.to_string().contains("failed authentication"), "{e}");
        assert!(KeyRecord::decode(&v1, "r", &[1; 16], &[2; 16]).is_err());
        assert_eq!(parse_name("00000001-0000000a"), Some((1, 10)));
        assert_eq!(parse_name("00000001"), None);
    }
}
