//! Checkpoint segments: what a backup run made durable, so that a re-run of an interrupted
//! backup can reference those packs' extents instead of uploading them again.
//!
//! ```text
//! checkpoints/<disk id>/<pack id>   one segment per durable pack, written right after the pack
//! header (76): "BVCP" | u16 version=1 | u16 0 | vault id [16] | disk id [16] | pack id [32]
//!              | u32 DEK generation
//! sealed:      nonce ‖ AES-256-GCM(checkpoint key, body) ‖ tag,  AAD = "blockvault checkpoint v1" ‖ header
//! body:        parent snapshot id [16] (zeros: none) | u32 slot size | u32 identity generation
//!              | u64 pack size | u32 n | n × (extent id [32] | u32 offset | u32 length | u32 plain length)
//! ```
//! One segment per pack keeps the cost bounded: each is written once (no rewriting of a
//! growing list), and its size is a small fraction of its pack's. The storage holder is an
//! adversary: the segment is sealed under the disk's checkpoint key with vault, disk, pack
//! and generation in its AAD, so a planted, altered or moved segment does not open, and one
//! replayed from an earlier run only names extents that run really sealed into that pack —
//! which a resumed run checks is still there, with its size, before referencing it.

use super::codec::{Dec, Enc};
use super::frame::{Binding, MAX_PLAIN, OVERHEAD};
use super::manifest::{ExtentLoc, SnapshotId};
use super::pack::{PackId, FOOTER_LEN, HEADER_LEN};
use crate::crypto::{ExtentId, GenerationKeys};
use crate::error::{Error, Result};

const MAGIC: &[u8; 4] = b"BVCP";
const VERSION: u16 = 1;
const AAD_PREFIX: &[u8] = b"blockvault checkpoint v1";
/// Bytes of the plaintext header, all of them in the AAD.
pub const HEADER: usize = 76;
/// Bytes of one extent entry in the body.
const ENTRY: usize = 44;
/// Folder of every checkpoint segment.
pub const FOLDER: &str = "checkpoints";

/// The folder of disk `disk_id`'s segments.
pub fn disk_folder(disk_id: &[u8; 16]) -> String {
    format!("{FOLDER}/{}", hex::encode(disk_id))
}

/// The object key of the segment for pack `pack` of disk `disk_id`.
pub fn object_key(disk_id: &[u8; 16], pack: &PackId) -> String {
    format!("{}/{}", disk_folder(disk_id), hex::encode(pack.0))
}

/// The pack a segment key names, if it is one.
pub fn pack_of_key(disk_id: &[u8; 16], key: &str) -> Option<PackId> {
    let name = key.strip_prefix(&disk_folder(disk_id))?.strip_prefix('/')?;
    let mut id = [0u8; 32];
    hex::decode_to_slice(name, &mut id).ok()?;
    Some(PackId(id))
}

/// What a run made durable in one pack, and the run's state when it did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// The DEK generation that sealed the pack's frames and this segment.
    pub generation: u32,
    /// The pack.
    pub pack: PackId,
    /// Its size in bytes, as stored.
    pub pack_size: u64,
    /// The run's parent snapshot.
    pub parent: Option<SnapshotId>,
    /// The disk's slot size for the run.
    pub slot_size: u32,
    /// The content-identity generation the extent ids are keyed with.
    pub identity_generation: u32,
    /// The pack's frames (`pack` is 0: the segment is about one pack).
    pub extents: Vec<ExtentLoc>,
}

impl Checkpoint {
    fn header(&self, binding: &Binding) -> Vec<u8> {
        let mut h = Enc::with_capacity(HEADER);
        h.bytes(MAGIC)
            .u16(VERSION)
            .u16(0)
            .bytes(&binding.vault_id)
            .bytes(&binding.disk_id)
            .bytes(&self.pack.0)
            .u32(self.generation);
        h.finish()
    }

    /// The sealed segment, under `keys` (the generation's).
    pub fn seal(&self, binding: &Binding, keys: &GenerationKeys) -> Result<Vec<u8>> {
        let header = self.header(binding);
        let mut body = Enc::with_capacity(36 + 4 + ENTRY * self.extents.len());
        body.bytes(&self.parent.map_or([0; 16], |p| p.0))
            .u32(self.slot_size)
            .u32(self.identity_generation)
            .u64(self.pack_size)
            .u32(self.extents.len() as u32);
        for e in &self.extents {
            body.bytes(&e.id.0)
                .u32(e.offset)
                .u32(e.len)
                .u32(e.plain_len);
        }
        let sealed = keys
            .checkpoint
            .seal_to_vec(&[AAD_PREFIX, &header].concat(), &body.0)?;
        Ok([header, sealed].concat())
    }

    /// The generation a segment read as `what` says sealed it (from its header, before
    /// anything is opened), to pick the keys for [`Checkpoint::open`].
    pub fn peek_generation(bytes: &[u8], what: &str) -> Result<u32> {
        let mut d = Dec::new(bytes, what);
        d.prologue(MAGIC, VERSION, "checkpoint")?;
        d.take(64)?;
        d.u32()
    }

    /// Open the segment `bytes`, stored for pack `pack` of the disk `binding` names, under
    /// `keys`; `what` names it in errors.
    pub fn open(
        bytes: &[u8],
        binding: &Binding,
        pack: &PackId,
        keys: &GenerationKeys,
        what: &str,
    ) -> Result<Checkpoint> {
        let mut d = Dec::new(bytes, what);
        d.prologue(MAGIC, VERSION, "checkpoint")?;
        let vault: [u8; 16] = d.array()?;
        let disk: [u8; 16] = d.array()?;
        let named: [u8; 32] = d.array()?;
        let generation = d.u32()?;
        if vault != binding.vault_id || disk != binding.disk_id || named != pack.0 {
            return Err(Error::integrity(format!(
                "{what}: written for vault {}, disk {}, pack {}, not this one",
                hex::encode(vault),
                hex::encode(disk),
                hex::encode(&named[..8])
            )));
        }
        let aad = [AAD_PREFIX, &bytes[..HEADER]].concat();
        let plain = keys
            .checkpoint
            .open_vec(&aad, &bytes[HEADER..], &|| what.to_string())?;
        let mut d = Dec::new(&plain, what);
        let parent: [u8; 16] = d.array()?;
        let slot_size = d.u32()?;
        let identity_generation = d.u32()?;
        let pack_size = d.u64()?;
        let n = d.u32()? as u64;
        let n = d.count(n, ENTRY)?;
        let frames_end = pack_size.saturating_sub(FOOTER_LEN as u64);
        let mut extents = Vec::with_capacity(n);
        for _ in 0..n {
            let id = ExtentId(d.array()?);
            let (offset, len, plain_len) = (d.u32()?, d.u32()?, d.u32()?);
            if (offset as usize) < HEADER_LEN
                || offset as u64 + len as u64 > frames_end
                || (len as usize) < OVERHEAD
                || plain_len as usize > MAX_PLAIN
            {
                return Err(d.error(format_args!(
                    "frame at {offset}+{len} ({plain_len} bytes plain) does not fit a {pack_size}-byte pack"
                )));
            }
            extents.push(ExtentLoc {
                id,
                pack: 0,
                offset,
                len,
                plain_len,
            });
        }
        d.end()?;
        Ok(Checkpoint {
            generation,
            pack: *pack,
            pack_size,
            parent: (parent != [0; 16]).then_some(SnapshotId(parent)),
            slot_size,
            identity_generation,
            extents,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::Secret32;

    fn sample() -> Checkpoint {
        Checkpoint {
            generation: 3,
            pack: PackId([7; 32]),
            pack_size: 1 << 20,
            parent: Some(SnapshotId([1; 16])),
            slot_size: 1 << 20,
            identity_generation: 0,
            extents: vec![ExtentLoc {
                id: ExtentId([9; 32]),
                pack: 0,
                offset: 32,
                len: 4096,
                plain_len: 4096,
            }],
        }
    }

    #[test]
    fn round_trip_and_bindings() {
        let keys = GenerationKeys::derive(&Secret32::from_bytes([5; 32]));
        let b = Binding {
            vault_id: [1; 16],
            disk_id: [2; 16],
        };
        let c = sample();
        let bytes = c.seal(&b, &keys).unwrap();
        assert_eq!(Checkpoint::peek_generation(&bytes, "t").unwrap(), 3);
        assert_eq!(
            Checkpoint::open(&bytes, &b, &c.pack, &keys, "t").unwrap(),
            c
        );
        // Another disk, another pack name, a flipped byte: refused.
        let other = Binding {
            disk_id: [3; 16],
            ..b
        };
        assert!(Checkpoint::open(&bytes, &other, &c.pack, &keys, "t").is_err());
        assert!(Checkpoint::open(&bytes, &b, &PackId([8; 32]), &keys, "t").is_err());
        let mut bad = bytes.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert!(Checkpoint::open(&bad, &b, &c.pack, &keys, "t").is_err());
    }

    #[test]
    fn keys_name_their_pack() {
        let p = PackId([0xab; 32]);
        let key = object_key(&[2; 16], &p);
        assert_eq!(pack_of_key(&[2; 16], &key), Some(p));
        assert_eq!(pack_of_key(&[3; 16], &key), None);
    }
}
