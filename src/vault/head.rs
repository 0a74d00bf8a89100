//! `head`: the vault's one authenticated, monotonic state, and the anchor of everything that
//! can change.
//!
//! Every object a vault may gain, replace or lose over time is bound to the head: key records,
//! KEK descriptors, escrow records, the recovery anchor and `infra-recovery` by the BLAKE3
//! digest of their bytes, committed snapshots by id, sequence and manifest digest. The head
//! itself is MAC'd with the keystore's auth key and carries an epoch that grows by one on every
//! update. So whoever holds the storage can delete objects (and deny service) but cannot plant,
//! replace, roll back or hide one: a planted object is not in the head, a replaced one does not
//! match its digest, a deleted one is missing from the inventory, an old head fails against the
//! newest epoch the keystore has seen, and a forged head fails its MAC.
//!
//! ```text
//! "BVHD" | u16 version=1 | u16 0 | vault id [16] | u64 epoch | u64 written | u32 auth version
//! | u8 primary kind | u32 primary version | u16 n × u32 revoked platform version
//! | u32 infra version | u32 previous infra version | key operation | [32] recovery anchor
//! | [32] infra-recovery | u16 n × descriptor | u32 n × disk | MAC [32]
//! ```
//! (docs/FORMAT.md, "Head", has every byte.) Updated only by compare-and-swap on the store
//! (`Store::put_if`), by any number of hosts: a writer that loses a race re-reads the head and
//! applies its change again, so no update is ever lost or overwritten.

use std::collections::{BTreeMap, BTreeSet};

use super::codec::{Dec, Enc};
use super::manifest::SnapshotId;
use crate::crypto::kek::{KekId, KekKind};
use crate::crypto::Secret32;
use crate::error::{Error, Result};

/// Object key of the head (outside the infrastructure layer: it is rewritten on every update,
/// and XTS would then reuse its tweaks; it holds no secret).
pub const KEY: &str = "head";
const MAGIC: &[u8; 4] = b"BVHD";
const VERSION: u16 = 1;
const MAC_CONTEXT: &str = "blockvault 2026-12-06 head mac v1";
const MAC_LEN: usize = 32;
/// Digest of an object's bytes, as the head records it.
pub type Digest = [u8; 32];
const NO_DIGEST: Digest = [0; 32];

/// The BLAKE3 digest by which the head binds an object.
pub fn digest(bytes: &[u8]) -> Digest {
    *blake3::hash(bytes).as_bytes()
}

/// The key that authenticates the head, derived from an auth key version.
pub fn mac_key(auth: &Secret32) -> Secret32 {
    Secret32::from_bytes(blake3::derive_key(MAC_CONTEXT, auth.expose()))
}

/// A key operation that holds the vault (rotation, recovery, destroy, upgrade): while it is
/// set, backups neither register disks nor start DEK generations, so none can be left wrapped
/// by a key the operation is replacing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyOperation {
    /// What runs.
    pub op: KeyOp,
    /// When it started (seconds since the epoch).
    pub started: u64,
    /// The auth-key fingerprint of the keystore that runs it.
    pub holder: [u8; 16],
    /// Its process id on its host.
    pub pid: u32,
}

/// Kinds of key operation. Stored as one byte; values never change meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum KeyOp {
    /// `key rotate` (any form).
    Rotate = 1,
    /// `key recover`.
    Recover = 2,
    /// `key destroy`.
    Destroy = 3,
    /// `upgrade`.
    Upgrade = 4,
    /// `key revoke` or `key enable`.
    Revoke = 5,
    /// `key import`.
    Import = 6,
}

impl KeyOp {
    fn from_u8(b: u8, d: &Dec) -> Result<Self> {
        Ok(match b {
            1 => KeyOp::Rotate,
            2 => KeyOp::Recover,
            3 => KeyOp::Destroy,
            4 => KeyOp::Upgrade,
            5 => KeyOp::Revoke,
            6 => KeyOp::Import,
            _ => return Err(d.error(format_args!("unknown key operation {b}"))),
        })
    }
}

impl std::fmt::Display for KeyOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KeyOp::Rotate => "key rotate",
            KeyOp::Recover => "key recover",
            KeyOp::Destroy => "key destroy",
            KeyOp::Upgrade => "upgrade",
            KeyOp::Revoke => "key revoke/enable",
            KeyOp::Import => "key import",
        })
    }
}

/// A DEK generation of a disk: where its key record is and how many seals its keys made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GenerationEntry {
    /// Revision of the key record (`keys/<disk>/<gen>-<rev>`); a rewrap writes rev + 1.
    pub rev: u32,
    /// Digest of the key record.
    pub digest: Digest,
    /// Upper bound on the AES-GCM seals made with this generation's keys: jobs reserve their
    /// worst case before sealing and settle it at commit; a crashed job's reservation stays.
    pub seals: u64,
}

/// A committed snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotEntry {
    /// Its id.
    pub id: SnapshotId,
    /// Its place among the disk's snapshots (unique, increasing with commit order).
    pub sequence: u64,
    /// Digest of its manifest object.
    pub digest: Digest,
}

/// An escrow record of a disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EscrowEntry {
    /// Revision (`escrow/<disk>/<name id>-<rev>`); escrowing the name again writes rev + 1.
    pub rev: u32,
    /// Digest of the record.
    pub digest: Digest,
}

/// A disk as the head knows it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DiskEntry {
    /// Slot size fixed by the first snapshot (0 until one is committed).
    pub slot_size: u32,
    /// The generation new data is sealed under.
    pub current_generation: u32,
    /// The generation whose DEK derives the extent-id and digest keys (rotated by
    /// `key rotate --new-dek`; dedup with snapshots of another identity stops there).
    pub identity_generation: u32,
    /// Sequence the next reserved snapshot gets.
    pub next_sequence: u64,
    /// Every DEK generation, by number.
    pub generations: BTreeMap<u32, GenerationEntry>,
    /// Committed snapshots, by sequence.
    pub snapshots: Vec<SnapshotEntry>,
    /// Escrow records, by name id.
    pub escrows: BTreeMap<[u8; 32], EscrowEntry>,
}

/// A KEK descriptor in force (customer or recovery key).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DescriptorEntry {
    /// Which key.
    pub id: KekId,
    /// Digest of the descriptor object.
    pub digest: Digest,
}

/// The decoded head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    /// The vault.
    pub vault_id: [u8; 16],
    /// Grows by one on every update.
    pub epoch: u64,
    /// When this version was written (seconds since the epoch).
    pub written: u64,
    /// The auth key version that MACs this head.
    pub auth_version: u32,
    /// The primary KEK new DEKs are wrapped with: the platform KEK version, or the customer
    /// key's descriptor version.
    pub primary: KekId,
    /// Platform KEK versions revoked vault-wide: refused whatever a keystore says.
    pub revoked: BTreeSet<u32>,
    /// The infrastructure key version every object is under (0: no layer).
    pub infra_version: u32,
    /// During an infrastructure key rotation, the version objects not yet re-encrypted are
    /// still under (0: none in progress).
    pub infra_previous: u32,
    /// A key operation holding the vault.
    pub key_operation: Option<KeyOperation>,
    /// Digest of `recovery-anchor`, if the vault has a recovery key.
    pub recovery_anchor: Option<Digest>,
    /// Digest of `infra-recovery`, if the vault has one.
    pub infra_recovery: Option<Digest>,
    /// Customer and recovery key descriptors in force.
    pub descriptors: Vec<DescriptorEntry>,
    /// Every disk, by id.
    pub disks: BTreeMap<[u8; 16], DiskEntry>,
}

/// Most entries of any one table the reader accepts (a bound against damaged counts beyond
/// the remaining-bytes check).
const MAX_TABLE: u64 = 1 << 24;

impl Head {
    /// A new vault's first head (epoch 1).
    pub fn new(vault_id: [u8; 16], auth_version: u32, primary: KekId, infra_version: u32) -> Head {
        Head {
            vault_id,
            epoch: 1,
            written: crate::util::now_unix(),
            auth_version,
            primary,
            revoked: BTreeSet::new(),
            infra_version,
            infra_previous: 0,
            key_operation: None,
            recovery_anchor: None,
            infra_recovery: None,
            descriptors: Vec::new(),
            disks: BTreeMap::new(),
        }
    }

    /// The disk `id`, or an Integrity error naming it.
    pub fn disk(&self, id: &[u8; 16]) -> Result<&DiskEntry> {
        self.disks.get(id).ok_or_else(|| {
            Error::integrity(format!("the vault head lists no disk {}", hex::encode(id)))
        })
    }

    /// The disk `id` to change.
    pub fn disk_mut(&mut self, id: &[u8; 16]) -> Result<&mut DiskEntry> {
        self.disks.get_mut(id).ok_or_else(|| {
            Error::integrity(format!("the vault head lists no disk {}", hex::encode(id)))
        })
    }

    /// The KEKs every key record must be wrapped by now: the primary, then the recovery key
    /// if the vault has one.
    pub fn wrapping_ids(&self) -> Vec<KekId> {
        let recovery = self
            .descriptors
            .iter()
            .filter(|d| d.id.kind == KekKind::Recovery)
            .map(|d| d.id)
            .max_by_key(|id| id.version);
        std::iter::once(self.primary).chain(recovery).collect()
    }

    /// The descriptor entry of `id`, if the head lists it.
    pub fn descriptor(&self, id: KekId) -> Option<&DescriptorEntry> {
        self.descriptors.iter().find(|d| d.id == id)
    }

    /// Serialise and MAC under `auth` (the key of version [`Head::auth_version`]).
    pub fn encode(&self, auth: &Secret32) -> Vec<u8> {
        let mut e = Enc::with_capacity(256 + self.disks.len() * 128);
        e.bytes(MAGIC)
            .u16(VERSION)
            .u16(0)
            .bytes(&self.vault_id)
            .u64(self.epoch)
            .u64(self.written)
            .u32(self.auth_version)
            .u8(self.primary.kind as u8)
            .u32(self.primary.version);
        e.u16(self.revoked.len() as u16);
        for v in &self.revoked {
            e.u32(*v);
        }
        e.u32(self.infra_version).u32(self.infra_previous);
        match &self.key_operation {
            None => e.u8(0).u8(0).u64(0).bytes(&[0; 16]).u32(0),
            Some(k) => e
                .u8(1)
                .u8(k.op as u8)
                .u64(k.started)
                .bytes(&k.holder)
                .u32(k.pid),
        };
        e.bytes(&self.recovery_anchor.unwrap_or(NO_DIGEST))
            .bytes(&self.infra_recovery.unwrap_or(NO_DIGEST));
        e.u16(self.descriptors.len() as u16);
        for d in &self.descriptors {
            e.u8(d.id.kind as u8).u32(d.id.version).bytes(&d.digest);
        }
        e.u32(self.disks.len() as u32);
        for (id, d) in &self.disks {
            e.bytes(id)
                .u32(d.slot_size)
                .u32(d.current_generation)
                .u32(d.identity_generation)
                .u64(d.next_sequence);
            e.u16(d.generations.len() as u16);
            for (g, x) in &d.generations {
                e.u32(*g).u32(x.rev).bytes(&x.digest).u64(x.seals);
            }
            e.u32(d.snapshots.len() as u32);
            for s in &d.snapshots {
                e.bytes(&s.id.0).u64(s.sequence).bytes(&s.digest);
            }
            e.u16(d.escrows.len() as u16);
            for (name, x) in &d.escrows {
                e.bytes(name).u32(x.rev).bytes(&x.digest);
            }
        }
        let tag = blake3::keyed_hash(mac_key(auth).expose(), &e.0);
        e.bytes(tag.as_bytes());
        e.finish()
    }

    /// The auth key version and vault id named by an encoded head, read before its MAC can
    /// be checked (the version picks the key). Nothing else of an unauthenticated head is
    /// looked at.
    pub fn peek(b: &[u8]) -> Result<([u8; 16], u32)> {
        let mut d = Dec::new(b, KEY);
        d.prologue(MAGIC, VERSION, "vault head")?;
        let vault_id = d.array()?;
        d.u64()?;
        d.u64()?;
        Ok((vault_id, d.u32()?))
    }

    /// Check the MAC with `auth`, then parse, checking every table's order and every
    /// cross-reference.
    pub fn decode(b: &[u8], auth: &Secret32) -> Result<Head> {
        let Some(body_len) = b.len().checked_sub(MAC_LEN) else {
            return Err(Error::integrity("vault head: truncated"));
        };
        let (body, tag) = b.split_at(body_len);
        let tag: [u8; MAC_LEN] = tag.try_into().expect("split at MAC_LEN");
        if blake3::keyed_hash(mac_key(auth).expose(), body) != blake3::Hash::from(tag) {
            return Err(Error::integrity(
                "vault head failed authentication: it was altered, or the keystore holds another vault's keys",
            ));
        }
        Self::decode_body(body)
    }

    /// Parse an authenticated head body (everything before the MAC).
    pub fn decode_body(body: &[u8]) -> Result<Head> {
        let mut d = Dec::new(body, KEY);
        d.prologue(MAGIC, VERSION, "vault head")?;
        let vault_id = d.array()?;
        let epoch = d.u64()?;
        let written = d.u64()?;
        let auth_version = d.u32()?;
        let primary = KekId {
            kind: KekKind::from_u8(d.u8()?).map_err(|e| d.error(e))?,
            version: d.u32()?,
        };
        if primary.kind == KekKind::Recovery {
            return Err(d.error("the recovery key cannot be the primary KEK"));
        }
        let n = d.u16()? as u64;
        let n = d.count(n, 4)?;
        let mut revoked = BTreeSet::new();
        for _ in 0..n {
            let v = d.u32()?;
            if !revoked.insert(v) || revoked.iter().next_back() != Some(&v) {
                return Err(d.error("revoked versions are not strictly increasing"));
            }
        }
        let infra_version = d.u32()?;
        let infra_previous = d.u32()?;
        if infra_previous != 0 && (infra_version == 0 || infra_previous >= infra_version) {
            return Err(d.error("infrastructure key versions are inconsistent"));
        }
        let key_operation = match d.u8()? {
            0 => {
                d.reserved(1 + 8 + 16 + 4)?;
                None
            }
            1 => Some(KeyOperation {
                op: KeyOp::from_u8(d.u8()?, &d)?,
                started: d.u64()?,
                holder: d.array()?,
                pid: d.u32()?,
            }),
            b => return Err(d.error(format_args!("key operation flag {b}"))),
        };
        let some = |x: Digest| (x != NO_DIGEST).then_some(x);
        let recovery_anchor = some(d.array()?);
        let infra_recovery = some(d.array()?);
        let n = d.u16()? as u64;
        let n = d.count(n, 37)?;
        let mut descriptors: Vec<DescriptorEntry> = Vec::with_capacity(n);
        for _ in 0..n {
            let id = KekId {
                kind: KekKind::from_u8(d.u8()?).map_err(|e| d.error(e))?,
                version: d.u32()?,
            };
            if id.kind == KekKind::Platform {
                return Err(d.error("a platform key has no descriptor"));
            }
            if descriptors.iter().any(|x| x.id == id) {
                return Err(d.error(format_args!("descriptor {id} listed twice")));
            }
            descriptors.push(DescriptorEntry {
                id,
                digest: d.array()?,
            });
        }
        if primary.kind != KekKind::Platform && !descriptors.iter().any(|x| x.id == primary) {
            return Err(d.error(format_args!("the primary key {primary} has no descriptor")));
        }
        let n = d.u32()? as u64;
        let n = d.count(n.min(MAX_TABLE + 1), 38)?;
        if n as u64 > MAX_TABLE {
            return Err(d.error("too many disks"));
        }
        let mut disks = BTreeMap::new();
        let mut last: Option<[u8; 16]> = None;
        for _ in 0..n {
            let id: [u8; 16] = d.array()?;
            if last.is_some_and(|l| l >= id) {
                return Err(d.error("disks are not sorted by id"));
            }
            last = Some(id);
            disks.insert(id, decode_disk(&mut d)?);
        }
        d.end()?;
        Ok(Head {
            vault_id,
            epoch,
            written,
            auth_version,
            primary,
            revoked,
            infra_version,
            infra_previous,
            key_operation,
            recovery_anchor,
            infra_recovery,
            descriptors,
            disks,
        })
    }
}

fn decode_disk(d: &mut Dec) -> Result<DiskEntry> {
    let slot_size = d.u32()?;
    if slot_size != 0
        && (!slot_size.is_power_of_two()
            || !(super::manifest::MIN_SLOT_SIZE..=super::manifest::MAX_SLOT_SIZE)
                .contains(&slot_size))
    {
        return Err(d.error(format_args!("slot size {slot_size} out of range")));
    }
    let current_generation = d.u32()?;
    let identity_generation = d.u32()?;
    let next_sequence = d.u64()?;
    let n = d.u16()? as u64;
    let n = d.count(n, 48)?;
    let mut generations = BTreeMap::new();
    for _ in 0..n {
        let g = d.u32()?;
        if generations.keys().next_back().is_some_and(|&l| l >= g) {
            return Err(d.error("generations are not sorted"));
        }
        generations.insert(
            g,
            GenerationEntry {
                rev: d.u32()?,
                digest: d.array()?,
                seals: d.u64()?,
            },
        );
    }
    if !generations.contains_key(&current_generation)
        || !generations.contains_key(&identity_generation)
        || identity_generation > current_generation
        || generations.keys().next_back() != Some(&current_generation)
    {
        return Err(d.error(format_args!(
            "current generation {current_generation} or identity generation {identity_generation} is not among the disk's generations"
        )));
    }
    let n = d.u32()? as u64;
    let n = d.count(n, 56)?;
    let mut snapshots: Vec<SnapshotEntry> = Vec::with_capacity(n);
    let mut ids = std::collections::HashSet::with_capacity(n);
    for _ in 0..n {
        let s = SnapshotEntry {
            id: SnapshotId(d.array()?),
            sequence: d.u64()?,
            digest: d.array()?,
        };
        if snapshots.last().is_some_and(|l| l.sequence >= s.sequence)
            || s.sequence >= next_sequence
            || !ids.insert(s.id)
        {
            return Err(d.error(
                "snapshots are not in increasing sequence below the next one, or repeat an id",
            ));
        }
        snapshots.push(s);
    }
    if !snapshots.is_empty() && slot_size == 0 {
        return Err(d.error("a disk with snapshots has no slot size"));
    }
    let n = d.u16()? as u64;
    let n = d.count(n, 68)?;
    let mut escrows = BTreeMap::new();
    for _ in 0..n {
        let name: [u8; 32] = d.array()?;
        if escrows.keys().next_back().is_some_and(|l| *l >= name) {
            return Err(d.error("escrow records are not sorted"));
        }
        escrows.insert(
            name,
            EscrowEntry {
                rev: d.u32()?,
                digest: d.array()?,
            },
        );
    }
    Ok(DiskEntry {
        slot_size,
        current_generation,
        identity_generation,
        next_sequence,
        generations,
        snapshots,
        escrows,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> Head {
        let mut h = Head::new(
            [1; 16],
            1,
            KekId {
                kind: KekKind::CustomerRsa,
                version: 2,
            },
            1,
        );
        h.epoch = 7;
        h.revoked.insert(3);
        h.descriptors.push(DescriptorEntry {
            id: KekId {
                kind: KekKind::CustomerRsa,
                version: 2,
            },
            digest: [9; 32],
        });
        h.recovery_anchor = Some([4; 32]);
        h.key_operation = Some(KeyOperation {
            op: KeyOp::Rotate,
            started: 5,
            holder: [6; 16],
            pid: 42,
        });
        let mut disk = DiskEntry {
            slot_size: 1 << 20,
            current_generation: 1,
            identity_generation: 0,
            next_sequence: 3,
            ..Default::default()
        };
        for g in 0..2 {
            disk.generations.insert(
                g,
                GenerationEntry {
                    rev: 1,
                    digest: [g as u8; 32],
                    seals: 100,
                },
            );
        }
        disk.snapshots.push(SnapshotEntry {
            id: SnapshotId([7; 16]),
            sequence: 0,
            digest: [8; 32],
        });
        disk.snapshots.push(SnapshotEntry {
            id: SnapshotId([5; 16]),
            sequence: 2,
            digest: [8; 32],
        });
        disk.escrows.insert(
            [3; 32],
            EscrowEntry {
                rev: 2,
                digest: [1; 32],
            },
        );
        h.disks.insert([2; 16], disk);
        h
    }

    #[test]
    fn round_trip_mac_and_peek() {
        let auth = Secret32::from_bytes([3; 32]);
        let h = sample();
        let b = h.encode(&auth);
        assert_eq!(Head::decode(&b, &auth).unwrap(), h);
        assert_eq!(Head::peek(&b).unwrap(), ([1; 16], 1));
        let other = Secret32::from_bytes([4; 32]);
        assert!(Head::decode(&b, &other)
            .unwrap_err()
            .to_string()
            .contains("failed authentication"));
        for i in [0, 20, b.len() / 2, b.len() - 1] {
            let mut bad = b.clone();
            bad[i] ^= 1;
            assert!(Head::decode(&bad, &auth).is_err(), "flip at {i}");
        }
    }

    #[test]
    fn inconsistent_tables_are_refused() {
        type Change = Box<dyn Fn(&mut Head)>;
        let cases: Vec<Change> = vec![
            Box::new(|h| h.disks.get_mut(&[2; 16]).unwrap().current_generation = 5),
            Box::new(|h| h.disks.get_mut(&[2; 16]).unwrap().identity_generation = 7),
            Box::new(|h| h.disks.get_mut(&[2; 16]).unwrap().next_sequence = 2),
            Box::new(|h| h.disks.get_mut(&[2; 16]).unwrap().snapshots[1].sequence = 0),
            Box::new(|h| h.disks.get_mut(&[2; 16]).unwrap().snapshots[1].id = SnapshotId([7; 16])),
            Box::new(|h| h.disks.get_mut(&[2; 16]).unwrap().slot_size = 12345),
            Box::new(|h| h.descriptors.clear()),
            Box::new(|h| h.infra_previous = 1),
        ];
        let auth = Secret32::from_bytes([3; 32]);
        for (i, change) in cases.iter().enumerate() {
            let mut h = sample();
            change(&mut h);
            assert!(Head::decode(&h.encode(&auth), &auth).is_err(), "case {i}");
        }
    }
}
