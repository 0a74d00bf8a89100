//! Snapshot manifests: `snapshots/<disk id>/<snapshot id>`, the commit point of a backup.
//! Written last, after every pack it references is durable.
//!
//! ```text
//! outer (60 bytes, plaintext, also the AAD):
//!   "BVSN" | u16 version (2; 1 is read too) | u16 0 | vault id [16] | disk id [16] | snapshot id [16] | u32 DEK generation
//! then nonce ‖ AES-256-GCM(manifest key, zstd(body)) ‖ tag
//! body: see docs/FORMAT.md ("Manifest body"); the slot table maps every slot to
//!   0 zero | 1 one extent | 2 a base (extent or zero) plus overlays (offset, length, extent or zero)
//! ```
//! Overlays are how an incremental stores only the changed blocks of a slot; restore applies
//! them in order over the base.

use super::codec::{Dec, Enc};
use super::frame::Binding;
use super::info::SnapshotInfo;
use super::pack::PackId;
use crate::crypto::{ExtentId, GenerationKeys, IdKey};
use crate::error::{Error, ErrorKind, Result};

pub(crate) const MAGIC: &[u8; 4] = b"BVSN";
/// The version this build writes: 2 adds the snapshot info (docs/FORMAT.md, "Manifest info").
const VERSION: u16 = 2;
/// The oldest version this build reads (version 1 has no snapshot info: it reads as empty).
const OLDEST_VERSION: u16 = 1;
/// Plaintext header length.
pub const OUTER_LEN: usize = 60;
/// Marks "zeros" where an extent index is expected.
pub const ZERO: u32 = u32::MAX;
/// The content id of an overlaid slot built from a change list without reading the whole
/// slot: its assembled content was never hashed. (A keyed BLAKE3 output of 32 zero bytes
/// does not occur in practice.)
pub const CONTENT_UNHASHED: ExtentId = ExtentId([0; 32]);
/// Smallest slot size.
pub const MIN_SLOT_SIZE: u32 = 64 << 10;
/// Largest slot size (also the largest extent).
pub const MAX_SLOT_SIZE: u32 = super::frame::MAX_PLAIN as u32;
/// Most slots a disk may have: the slot table is held in memory (up to 32 bytes a slot), so
/// this bounds a manifest's memory at 2 GiB: 64 TiB disks at 1 MiB slots, 256 TiB at 4 MiB.
pub const MAX_SLOTS: u64 = 1 << 26;
/// Largest decompressed manifest body a reader accepts: 1 GiB covers a 16 TiB disk of
/// 1 MiB slots with every slot a distinct extent.
const MAX_BODY: u64 = 1 << 30;

/// Bytes of the head's manifest digest in a rewritten manifest's name
/// ([`SnapshotId::rewritten_key`]).
pub const REWRITTEN_DIGEST_LEN: usize = 8;

/// A snapshot's id: 16 random bytes; people see the first 8 hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct SnapshotId(pub [u8; 16]);

impl SnapshotId {
    /// Full hex.
    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }
    /// First 8 hex digits.
    pub fn short(&self) -> String {
        self.hex()[..8].to_string()
    }
    /// Object key of the manifest.
    pub fn object_key(&self, disk_id: &[u8; 16]) -> String {
        format!("snapshots/{}/{}", hex::encode(disk_id), self.hex())
    }

    /// Object key of a manifest `prune` rewrote (its packs repacked): the original key, a dot
    /// and the first 16 hex digits of the digest the head lists for the new bytes. Manifests
    /// are written once, so a rewrite needs a new name; deriving it from the digest lets a
    /// reader find it from the head alone, with no new head field.
    pub fn rewritten_key(&self, disk_id: &[u8; 16], digest: &[u8; 32]) -> String {
        format!(
            "{}.{}",
            self.object_key(disk_id),
            hex::encode(&digest[..REWRITTEN_DIGEST_LEN])
        )
    }
}

/// How the backup learned what changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
#[repr(u8)]
pub enum ChangeSource {
    /// No parent: every slot with data was read and stored.
    Full = 0,
    /// Every slot was read and its keyed hash compared with the parent's.
    HashCompare = 1,
    /// A dirty bitmap named the changed blocks.
    Bitmap = 2,
    /// A changed-range list named them.
    ChangedList = 3,
}

impl ChangeSource {
    fn from_u8(b: u8, d: &Dec) -> Result<Self> {
        Ok(match b {
            0 => ChangeSource::Full,
            1 => ChangeSource::HashCompare,
            2 => ChangeSource::Bitmap,
            3 => ChangeSource::ChangedList,
            _ => return Err(d.error(format_args!("unknown change source {b}"))),
        })
    }
}

/// Where a stored extent is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExtentLoc {
    /// Keyed hash of its plaintext.
    pub id: ExtentId,
    /// Index into the manifest's pack table.
    pub pack: u32,
    /// Frame offset in the pack.
    pub offset: u32,
    /// Frame length.
    pub len: u32,
    /// Plaintext length.
    pub plain_len: u32,
}

/// A piece laid over a slot's base.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Overlay {
    /// Byte offset within the slot.
    pub offset: u32,
    /// Bytes covered.
    pub len: u32,
    /// Extent index, or [`ZERO`].
    pub extent: u32,
}

/// A base (extent index or [`ZERO`]) with overlays applied in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverlaidSlot {
    /// Keyed id of the whole slot's content once assembled: an unchanged slot is then
    /// recognised by one hash, and restore checks the assembled slot against it.
    /// [`CONTENT_UNHASHED`] when it was built from a change list.
    pub content: ExtentId,
    /// The base.
    pub base: u32,
    /// Pieces over it.
    pub overlays: Vec<Overlay>,
}

impl Slot {
    /// An overlaid slot.
    pub fn overlaid(content: ExtentId, base: u32, overlays: Vec<Overlay>) -> Slot {
        Slot::Overlaid(Box::new(OverlaidSlot {
            content,
            base,
            overlays,
        }))
    }
}

const _: () = assert!(std::mem::size_of::<Slot>() == 16);

/// What one slot of the disk holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Slot {
    /// All zero.
    Zero,
    /// One extent, the slot's whole content.
    Extent(u32),
    /// A base with overlays, boxed: most slots are not overlaid, and a slot table of a
    /// 1 TiB disk holds a million entries (16 bytes each instead of 64).
    Overlaid(Box<OverlaidSlot>),
}

/// Figures of the backup that wrote the snapshot.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Stats {
    /// Bytes read from the source.
    pub bytes_read: u64,
    /// Bytes of new frames written to packs.
    pub bytes_stored: u64,
    /// Slots stored as new extents.
    pub slots_new: u64,
    /// Slots whose content was already in the vault.
    pub slots_reused: u64,
    /// All-zero slots and holes.
    pub slots_zero: u64,
    /// Wall time in milliseconds.
    pub duration_ms: u64,
}

/// A decoded manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// This snapshot.
    pub id: SnapshotId,
    /// DEK generation that sealed the manifest and the job's new extents.
    pub generation: u32,
    /// Seconds since the epoch.
    pub created: u64,
    /// Position among the disk's snapshots: one more than the newest existing one, assigned
    /// under the disk lock. Orders snapshots made within the same second.
    pub sequence: u64,
    /// Disk name.
    pub disk_name: String,
    /// Source as given.
    pub source: String,
    /// Parent snapshot, if any.
    pub parent: Option<SnapshotId>,
    /// Disk size in bytes.
    pub disk_size: u64,
    /// Slot size in bytes.
    pub slot_size: u32,
    /// How changes were found.
    pub change_source: ChangeSource,
    /// Bitmap name, range-list file, or empty.
    pub change_detail: String,
    /// Seals made with `generation` up to and including this job (nonce budget).
    pub seals_in_generation: u64,
    /// Figures.
    pub stats: Stats,
    /// Keyed digest over the slot table and extent ids.
    pub digest: [u8; 32],
    /// Packs referenced, with their sizes.
    pub packs: Vec<(PackId, u64)>,
    /// Extents referenced.
    pub extents: Vec<ExtentLoc>,
    /// One entry per slot.
    pub slots: Vec<Slot>,
    /// The disk's partition table and encrypted volumes as `inspect --json` prints them
    /// (JSON), or empty when not scanned.
    pub layout: String,
    /// How the snapshot was made beyond its slots: the source's bitmaps, warnings.
    pub info: SnapshotInfo,
}

/// Number of slots for a disk.
pub fn slot_count(disk_size: u64, slot_size: u32) -> u64 {
    disk_size.div_ceil(slot_size as u64)
}

impl Manifest {
    /// Length of slot `i` (the last may be short).
    pub fn slot_len(&self, i: u64) -> u32 {
        let start = i * self.slot_size as u64;
        (self.disk_size - start).min(self.slot_size as u64) as u32
    }

    /// The disk digest: keyed BLAKE3 over u64 disk size ‖ u32 slot size, then per slot
    /// u64 index ‖ u8 tag ‖ its pieces (base id, then u16 overlay count and per overlay u32
    /// offset ‖ u32 length ‖ id; 32 zero bytes stand for zeros).
    ///
    /// Together with extent ids (keyed hashes of plaintext, checked on every decrypt) it makes
    /// the restored disk a function of the ids alone: a restore that checks the digest and
    /// opens every extent against its id writes exactly the bytes the backup read. The digest
    /// guards the slot table itself (a table damaged or rebuilt by a bug, not by an attacker:
    /// the manifest is authenticated too).
    pub fn compute_digest(&self, key: &IdKey) -> [u8; 32] {
        let mut h = key.hasher();
        h.update(&self.disk_size.to_le_bytes());
        h.update(&self.slot_size.to_le_bytes());
        let id = |e: u32| -> [u8; 32] {
            if e == ZERO {
                [0; 32]
            } else {
                self.extents[e as usize].id.0
            }
        };
        for (i, s) in self.slots.iter().enumerate() {
            h.update(&(i as u64).to_le_bytes());
            match s {
                Slot::Zero => {
                    h.update(&[0]);
                }
                Slot::Extent(e) => {
                    h.update(&[1]);
                    h.update(&id(*e));
                }
                Slot::Overlaid(s) => {
                    h.update(&[2]);
                    h.update(&s.content.0);
                    h.update(&id(s.base));
                    h.update(&(s.overlays.len() as u16).to_le_bytes());
                    for o in &s.overlays {
                        h.update(&o.offset.to_le_bytes());
                        h.update(&o.len.to_le_bytes());
                        h.update(&id(o.extent));
                    }
                }
            }
        }
        *h.finalize().as_bytes()
    }

    fn outer(&self, binding: &Binding) -> Vec<u8> {
        let mut e = Enc::with_capacity(OUTER_LEN);
        e.bytes(MAGIC)
            .u16(VERSION)
            .u16(0)
            .bytes(&binding.vault_id)
            .bytes(&binding.disk_id)
            .bytes(&self.id.0)
            .u32(self.generation);
        e.finish()
    }

    fn body(&self) -> Vec<u8> {
        let mut e = Enc::with_capacity(256 + self.extents.len() * 48 + self.slots.len() * 5);
        e.u64(self.created)
            .u64(self.sequence)
            .str(&self.disk_name)
            .str(&self.source);
        match self.parent {
            Some(p) => e.u8(1).bytes(&p.0),
            None => e.u8(0).bytes(&[0; 16]),
        };
        e.u64(self.disk_size)
            .u32(self.slot_size)
            .u8(self.change_source as u8)
            .str(&self.change_detail);
        e.u64(self.seals_in_generation);
        let s = &self.stats;
        e.u64(s.bytes_read)
            .u64(s.bytes_stored)
            .u64(s.slots_new)
            .u64(s.slots_reused)
            .u64(s.slots_zero)
            .u64(s.duration_ms);
        e.bytes(&self.digest);
        e.u32(self.packs.len() as u32);
        for (p, size) in &self.packs {
            e.bytes(&p.0).u64(*size);
        }
        e.u32(self.extents.len() as u32);
        for x in &self.extents {
            e.bytes(&x.id.0)
                .u32(x.pack)
                .u32(x.offset)
                .u32(x.len)
                .u32(x.plain_len);
        }
        e.u64(self.slots.len() as u64);
        for s in &self.slots {
            match s {
                Slot::Zero => {
                    e.u8(0);
                }
                Slot::Extent(x) => {
                    e.u8(1).u32(*x);
                }
                Slot::Overlaid(s) => {
                    e.u8(2)
                        .bytes(&s.content.0)
                        .u32(s.base)
                        .u16(s.overlays.len() as u16);
                    for o in &s.overlays {
                        e.u32(o.offset).u32(o.len).u32(o.extent);
                    }
                }
            }
        }
        e.u32(self.layout.len() as u32)
            .bytes(self.layout.as_bytes());
        let info = self.info.to_json();
        e.u32(info.len() as u32).bytes(info.as_bytes());
        e.finish()
    }

    /// Compress, seal and frame.
    pub fn encode(&self, binding: &Binding, keys: &GenerationKeys) -> Result<Vec<u8>> {
        let outer = self.outer(binding);
        let body = zstd::bulk::compress(&self.body(), 3)
            .map_err(|e| Error::new(ErrorKind::Io, format!("compressing manifest: {e}")))?;
        let sealed = keys.manifest.seal_to_vec(&outer, &body)?;
        Ok([outer, sealed].concat())
    }

    /// Parse the plaintext outer header: (snapshot id, DEK generation). Checks that it names
    /// the vault and disk it was found under.
    pub fn peek(b: &[u8], binding: &Binding, what: &str) -> Result<(SnapshotId, u32)> {
        Self::peek_versioned(b, binding, what).map(|(id, generation, _)| (id, generation))
    }

    /// [`Manifest::peek`], also returning the manifest's version.
    fn peek_versioned(b: &[u8], binding: &Binding, what: &str) -> Result<(SnapshotId, u32, u16)> {
        let mut d = Dec::new(b, what);
        let version = d.prologue_in(MAGIC, OLDEST_VERSION..=VERSION, "manifest")?;
        let vault: [u8; 16] = d.array()?;
        let disk: [u8; 16] = d.array()?;
        if vault != binding.vault_id || disk != binding.disk_id {
            return Err(Error::integrity(format!(
                "{what}: manifest belongs to another vault or disk"
            )));
        }
        Ok((SnapshotId(d.array()?), d.u32()?, version))
    }

    /// Authenticate, decrypt and parse. `keys` must be those of the generation [`Manifest::peek`] returned.
    pub fn decode(
        b: &[u8],
        binding: &Binding,
        keys: &GenerationKeys,
        what: &str,
    ) -> Result<Manifest> {
        let (id, generation, version) = Self::peek_versioned(b, binding, what)?;
        let compressed = keys
            .manifest
            .open_vec(&b[..OUTER_LEN], &b[OUTER_LEN..], &|| what.to_string())?;
        let body = decompress_bounded(&compressed, what)?;
        Self::decode_body(&body, id, generation, version, what)
    }

    /// Parse a decrypted body of manifest `version`, checking every index against the tables
    /// it points into.
    pub fn decode_body(
        body: &[u8],
        id: SnapshotId,
        generation: u32,
        version: u16,
        what: &str,
    ) -> Result<Manifest> {
        let mut d = Dec::new(body, what);
        let created = d.u64()?;
        let sequence = d.u64()?;
        let disk_name = d.str()?;
        let source = d.str()?;
        let parent = match (d.u8()?, d.array::<16>()?) {
            (1, p) => Some(SnapshotId(p)),
            (0, p) if p == [0; 16] => None,
            _ => return Err(d.error("parent field is neither none (0 + zeros) nor an id (1)")),
        };
        let disk_size = d.u64()?;
        let slot_size = d.u32()?;
        if !(MIN_SLOT_SIZE..=MAX_SLOT_SIZE).contains(&slot_size) || !slot_size.is_power_of_two() {
            return Err(d.error(format_args!("slot size {slot_size} out of range")));
        }
        let cs = d.u8()?;
        let change_source = ChangeSource::from_u8(cs, &d)?;
        let change_detail = d.str()?;
        let seals_in_generation = d.u64()?;
        let stats = Stats {
            bytes_read: d.u64()?,
            bytes_stored: d.u64()?,
            slots_new: d.u64()?,
            slots_reused: d.u64()?,
            slots_zero: d.u64()?,
            duration_ms: d.u64()?,
        };
        let digest = d.array()?;
        let np = d.u32()? as u64;
        let np = d.count(np, 40)?;
        let mut packs = Vec::with_capacity(np);
        for _ in 0..np {
            packs.push((PackId(d.array()?), d.u64()?));
        }
        let ne = d.u32()? as u64;
        let ne = d.count(ne, 48)?;
        let mut extents = Vec::with_capacity(ne);
        for _ in 0..ne {
            let x = ExtentLoc {
                id: ExtentId(d.array()?),
                pack: d.u32()?,
                offset: d.u32()?,
                len: d.u32()?,
                plain_len: d.u32()?,
            };
            if x.pack as usize >= packs.len() {
                return Err(d.error(format_args!(
                    "extent names pack {} of {}",
                    x.pack,
                    packs.len()
                )));
            }
            if x.plain_len > slot_size || x.plain_len == 0 {
                return Err(d.error(format_args!(
                    "extent of {} bytes is empty or exceeds the slot size",
                    x.plain_len
                )));
            }
            // A frame stores its payload raw or smaller, plus a fixed overhead.
            if x.len as u64 > x.plain_len as u64 + super::frame::OVERHEAD as u64
                || (x.len as usize) < super::frame::OVERHEAD
            {
                return Err(d.error(format_args!(
                    "frame of {} bytes cannot hold a {}-byte extent",
                    x.len, x.plain_len
                )));
            }
            extents.push(x);
        }
        let ns = d.u64()?;
        if ns > MAX_SLOTS {
            return Err(d.error(format_args!("{ns} slots exceed the supported {MAX_SLOTS}")));
        }
        if ns != slot_count(disk_size, slot_size) {
            return Err(d.error(format_args!(
                "{ns} slots for a {disk_size}-byte disk of {slot_size}-byte slots"
            )));
        }
        let ns = d.count(ns, 1)?;
        let check = |e: u32, d: &Dec| -> Result<()> {
            if e != ZERO && e as usize >= extents.len() {
                return Err(d.error(format_args!("slot names extent {e} of {}", extents.len())));
            }
            Ok(())
        };
        let mut slots = Vec::with_capacity(ns);
        for _ in 0..ns {
            slots.push(match d.u8()? {
                0 => Slot::Zero,
                1 => {
                    let e = d.u32()?;
                    if e == ZERO {
                        return Err(d.error("single-extent slot names zeros"));
                    }
                    check(e, &d)?;
                    Slot::Extent(e)
                }
                2 => {
                    let content = ExtentId(d.array()?);
                    let base = d.u32()?;
                    check(base, &d)?;
                    let n = d.u16()? as u64;
                    let n = d.count(n, 12)?;
                    let mut overlays = Vec::with_capacity(n);
                    for _ in 0..n {
                        let o = Overlay {
                            offset: d.u32()?,
                            len: d.u32()?,
                            extent: d.u32()?,
                        };
                        check(o.extent, &d)?;
                        if o.offset as u64 + o.len as u64 > slot_size as u64 {
                            return Err(d.error("overlay runs past its slot"));
                        }
                        if o.extent != ZERO && extents[o.extent as usize].plain_len != o.len {
                            return Err(d.error("overlay length differs from its extent's"));
                        }
                        overlays.push(o);
                    }
                    Slot::overlaid(content, base, overlays)
                }
                t => return Err(d.error(format_args!("unknown slot tag {t}"))),
            });
        }
        let layout_len = d.u32()? as usize;
        let layout = String::from_utf8(d.take(layout_len)?.to_vec())
            .map_err(|_| d.error("disk layout is not UTF-8"))?;
        let info = if version >= 2 {
            let len = d.u32()? as usize;
            let json = std::str::from_utf8(d.take(len)?)
                .map_err(|_| d.error("snapshot info is not UTF-8"))?;
            SnapshotInfo::from_json(json, what)?
        } else {
            SnapshotInfo::default()
        };
        d.end()?;
        Ok(Manifest {
            id,
            generation,
            created,
            sequence,
            disk_name,
            source,
            parent,
            disk_size,
            slot_size,
            change_source,
            change_detail,
            seals_in_generation,
            stats,
            digest,
            packs,
            extents,
            slots,
            layout,
            info,
        })
    }
}

/// zstd-decompress a manifest body, refusing more than [`MAX_BODY`] bytes.
fn decompress_bounded(compressed: &[u8], what: &str) -> Result<Vec<u8>> {
    use std::io::Read;
    let bad =
        |e: std::io::Error| Error::integrity(format!("{what}: body does not decompress: {e}"));
    let mut body = Vec::new();
    zstd::stream::read::Decoder::new(compressed)
        .map_err(bad)?
        .take(MAX_BODY + 1)
        .read_to_end(&mut body)
        .map_err(bad)?;
    if body.len() as u64 > MAX_BODY {
        return Err(Error::integrity(format!(
            "{what}: body exceeds {MAX_BODY} bytes"
        )));
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::Secret32;

    fn sample() -> Manifest {
        Manifest {
            id: SnapshotId([1; 16]),
            generation: 0,
            created: 10,
            sequence: 3,
            disk_name: "vm1".into(),
            source: "/dev/x".into(),
            parent: Some(SnapshotId([2; 16])),
            disk_size: 3 * 65536 + 100,
            slot_size: 65536,
            change_source: ChangeSource::HashCompare,
            change_detail: String::new(),
            seals_in_generation: 5,
            stats: Stats::default(),
            digest: [3; 32],
            packs: vec![(PackId([4; 32]), 1000)],
            extents: vec![ExtentLoc {
                id: ExtentId([5; 32]),
                pack: 0,
                offset: 32,
                len: 100,
                plain_len: 4096,
            }],
            slots: vec![
                Slot::Zero,
                Slot::Extent(0),
                Slot::overlaid(
                    ExtentId([9; 32]),
                    ZERO,
                    vec![Overlay {
                        offset: 4096,
                        len: 4096,
                        extent: 0,
                    }],
                ),
                Slot::Zero,
            ],
            layout: r#"{"disk_size":1}"#.into(),
            info: SnapshotInfo {
                bitmap_created: Some("bv-x".into()),
                ..SnapshotInfo::default()
            },
        }
    }

    #[test]
    fn round_trip_and_binding() {
        let keys = GenerationKeys::derive(&Secret32::from_bytes([8; 32]));
        let b = Binding {
            vault_id: [1; 16],
            disk_id: [2; 16],
        };
        let m = sample();
        let enc = m.encode(&b, &keys).unwrap();
        assert_eq!(Manifest::decode(&enc, &b, &keys, "m").unwrap(), m);
        let other = Binding {
            vault_id: [1; 16],
            disk_id: [3; 16],
        };
        assert!(Manifest::decode(&enc, &other, &keys, "m").is_err());
    }

    #[test]
    fn bad_indices_are_rejected() {
        let mut m = sample();
        m.slots[1] = Slot::Extent(7);
        assert!(Manifest::decode_body(&m.body(), m.id, 0, VERSION, "m").is_err());
    }

    #[test]
    fn version_1_body_has_no_info() {
        let mut m = sample();
        m.info = SnapshotInfo::default();
        let body = m.body();
        // A version 1 body is a version 2 body without the info at its end.
        let info_len = 4 + m.info.to_json().len();
        let v1 = &body[..body.len() - info_len];
        assert_eq!(Manifest::decode_body(v1, m.id, 0, 1, "m").unwrap(), m);
        assert!(Manifest::decode_body(v1, m.id, 0, 2, "m").is_err());
        assert!(Manifest::decode_body(&body, m.id, 0, 1, "m").is_err());
    }
}
