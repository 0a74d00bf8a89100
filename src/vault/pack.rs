//! Pack files: extent frames of one disk grouped into objects of about 32 MiB, so a vault of
//! millions of extents is thousands of objects, not millions.
//!
//! ```text
//! header (32): "BVPK" | u16 version=2 | u16 0 | disk id [16] | u32 DEK generation | u32 0
//! frames …     (see `frame`)
//! index:       nonce ‖ AES-256-GCM(pack-index key, u32 n | n × (extent id [32] | u32 offset | u32 length)) ‖ tag
//!              AAD = "blockvault pack index v2" ‖ vault id ‖ disk id ‖ the 32 header bytes
//!                    ‖ BLAKE3(header and frames, the bytes before the index)
//! footer (16): u64 index offset | u32 index length | "BVPF"
//! ```
//! A pack's name is the BLAKE3 hash of its bytes (`packs/<2 hex>/<64 hex>`), so `verify
//! --read-data` can check a whole pack before decrypting anything. The index lets a lost
//! pack's frames be listed without any manifest (orphan accounting, salvage).
//!
//! Why the index AAD covers the frames' hash (version 2): bound only to vault, disk and
//! header (version 1, still read), an index could be moved onto another pack of the same disk
//! and generation and still open, listing frames that pack does not hold. The writer hashes
//! as it appends, and the same running hash, continued over index and footer, is the pack's
//! name, so neither hash costs a second pass over the pack.

use super::codec::{Dec, Enc};
use super::frame::Binding;
use crate::crypto::{ExtentId, GenerationKeys};
use crate::error::{Error, Result};

pub(crate) const MAGIC: &[u8; 4] = b"BVPK";
const FOOTER_MAGIC: &[u8; 4] = b"BVPF";
/// The version [`PackWriter`] writes; [`read_index`] also reads version 1.
pub const VERSION: u16 = 2;
/// Header bytes.
pub const HEADER_LEN: usize = 32;
/// Footer bytes.
pub const FOOTER_LEN: usize = 16;
/// Index AAD prefix of version 1 packs: vault, disk and header only.
const INDEX_AAD_V1: &[u8] = b"blockvault pack index v1";
/// Index AAD prefix of version 2 packs, which also bind the bytes before the index.
const INDEX_AAD_V2: &[u8] = b"blockvault pack index v2";
/// A pack is closed once it reaches this size.
pub const TARGET_SIZE: usize = 32 << 20;

/// A pack's name: the BLAKE3 hash of its content.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PackId(pub [u8; 32]);

impl PackId {
    /// Object key of the pack.
    pub fn object_key(&self) -> String {
        let h = hex::encode(self.0);
        format!("packs/{}/{h}", &h[..2])
    }

    /// Parse an object key back into an id (for listing orphans).
    pub fn from_object_key(key: &str) -> Option<PackId> {
        let name = key.strip_prefix("packs/")?.split('/').nth(1)?;
        let mut id = [0u8; 32];
        hex::decode_to_slice(name, &mut id).ok()?;
        Some(PackId(id))
    }
}

impl std::fmt::Display for PackId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&hex::encode(&self.0[..8]))
    }
}

/// One frame's place in a pack.
#[derive(Debug, Clone, Copy)]
pub struct IndexEntry {
    /// The extent.
    pub id: ExtentId,
    /// Byte offset of the frame in the pack.
    pub offset: u32,
    /// Frame length.
    pub len: u32,
}

/// Builds one pack in memory, hashing it as it grows.
pub struct PackWriter {
    buf: Vec<u8>,
    entries: Vec<IndexEntry>,
    /// BLAKE3 of `buf[..hashed]`: finished, the frames' hash for the index AAD, then (continued
    /// over index and footer) the pack's name.
    hash: blake3::Hasher,
    hashed: usize,
}

/// The writer hashes appended bytes once this many are pending...
const HASH_BATCH: usize = 1 << 20;
/// ...up to a multiple of this offset. BLAKE3 reaches its SIMD width only on large inputs that
/// start on a chunk-tree boundary: hashing 4 KiB overlay frames one by one ran at a quarter of
/// the speed of 64 KiB-aligned runs (0.4–0.65 against 1.6–2.4 GiB/s, 32 MiB packs, this
/// machine under load), while a run of 1 MiB is still in cache when it is hashed.
const HASH_ALIGN: usize = 64 << 10;

impl PackWriter {
    /// Start a pack for a disk and DEK generation in `buf` (a recycled buffer, or empty).
    pub fn new(disk_id: &[u8; 16], generation: u32, mut buf: Vec<u8>) -> Self {
        buf.clear();
        buf.reserve(TARGET_SIZE + (4 << 20));
        let mut e = Enc(buf);
        e.bytes(MAGIC)
            .u16(VERSION)
            .u16(0)
            .bytes(disk_id)
            .u32(generation)
            .u32(0);
        debug_assert_eq!(e.0.len(), HEADER_LEN);
        PackWriter {
            buf: e.finish(),
            entries: Vec::new(),
            hash: blake3::Hasher::new(),
            hashed: 0,
        }
    }

    /// Append a sealed frame; returns its offset.
    pub fn add(&mut self, id: ExtentId, frame: &[u8]) -> u32 {
        let offset = self.buf.len() as u32;
        self.buf.extend_from_slice(frame);
        if self.buf.len() - self.hashed >= HASH_BATCH {
            let end = self.buf.len() & !(HASH_ALIGN - 1);
            self.hash.update(&self.buf[self.hashed..end]);
            self.hashed = end;
        }
        self.entries.push(IndexEntry {
            id,
            offset,
            len: frame.len() as u32,
        });
        offset
    }

    /// Frames so far.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Bytes so far.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// Seal the index, add the footer; returns the pack's id and bytes.
    pub fn finish(mut self, binding: &Binding, keys: &GenerationKeys) -> Result<(PackId, Vec<u8>)> {
        let mut idx = Enc::with_capacity(4 + self.entries.len() * 40);
        idx.u32(self.entries.len() as u32);
        for e in &self.entries {
            idx.bytes(&e.id.0).u32(e.offset).u32(e.len);
        }
        let frames = self.hash.update(&self.buf[self.hashed..]).finalize();
        let aad = index_aad(binding, &self.buf[..HEADER_LEN], Some(&frames));
        let sealed = keys.pack_index.seal_to_vec(&aad, &idx.0)?;
        let index_offset = self.buf.len() as u64;
        self.buf.extend_from_slice(&sealed);
        let mut f = Enc::with_capacity(FOOTER_LEN);
        f.u64(index_offset)
            .u32(sealed.len() as u32)
            .bytes(FOOTER_MAGIC);
        self.buf.extend_from_slice(&f.0);
        self.hash.update(&sealed).update(&f.0);
        Ok((PackId(*self.hash.finalize().as_bytes()), self.buf))
    }
}

/// The index AAD: version 1 (`frames` is `None`) binds vault, disk and header; version 2 also
/// the BLAKE3 hash of the bytes before the index.
fn index_aad(binding: &Binding, header: &[u8], frames: Option<&blake3::Hash>) -> Vec<u8> {
    match frames {
        None => [INDEX_AAD_V1, &binding.vault_id, &binding.disk_id, header].concat(),
        Some(h) => [
            INDEX_AAD_V2,
            &binding.vault_id,
            &binding.disk_id,
            header,
            h.as_bytes(),
        ]
        .concat(),
    }
}

/// Where the frames of a pack of `len` bytes end and its index starts, read from its last
/// [`FOOTER_LEN`] bytes, `footer` (prune reads only these to count a pack's frame bytes).
pub fn frames_end(footer: &[u8], len: u64, what: &str) -> Result<u64> {
    if len < (HEADER_LEN + FOOTER_LEN) as u64 || footer.len() != FOOTER_LEN {
        return Err(Error::integrity(format!(
            "{what}: {len} bytes is too short for a pack"
        )));
    }
    let mut f = Dec::new(footer, what);
    let index_offset = f.u64()?;
    let index_len = f.u32()? as u64;
    f.magic(FOOTER_MAGIC)?;
    let body_end = len - FOOTER_LEN as u64;
    if index_offset < HEADER_LEN as u64 || index_offset.checked_add(index_len) != Some(body_end) {
        return Err(Error::integrity(format!(
            "{what}: index at {index_offset}+{index_len} does not end where the footer starts"
        )));
    }
    Ok(index_offset)
}

/// Parse and decrypt a whole pack's index (used by `verify --read-data` and repair), of
/// either version. `keys_for` maps the header's DEK generation to its keys.
pub fn read_index(
    pack: &[u8],
    binding: &Binding,
    keys_for: &dyn Fn(u32) -> Result<std::sync::Arc<GenerationKeys>>,
    what: &str,
) -> Result<Vec<IndexEntry>> {
    let mut d = Dec::new(pack, what);
    let version = d.prologue_in(MAGIC, 1..=VERSION, "pack")?;
    let disk: [u8; 16] = d.array()?;
    if disk != binding.disk_id {
        return Err(Error::integrity(format!(
            "{what}: pack belongs to disk {}, not {}",
            hex::encode(disk),
            hex::encode(binding.disk_id)
        )));
    }
    let generation = d.u32()?;
    d.reserved(4)?;
    let index_offset = frames_end(
        &pack[pack.len().saturating_sub(FOOTER_LEN)..],
        pack.len() as u64,
        what,
    )?;
    let body_end = (pack.len() - FOOTER_LEN) as u64;
    let keys = keys_for(generation)?;
    let before_index = &pack[..index_offset as usize];
    let frames = (version >= 2).then(|| blake3::hash(before_index));
    let aad = index_aad(binding, &pack[..HEADER_LEN], frames.as_ref());
    let sealed = &pack[index_offset as usize..body_end as usize];
    let plain = keys
        .pack_index
        .open_vec(&aad, sealed, &|| format!("{what}: index"))?;
    let label = format!("{what}: index");
    let mut d = Dec::new(&plain, &label);
    let n = d.u32()? as u64;
    let n = d.count(n, 40)?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let id = ExtentId(d.array()?);
        let offset = d.u32()?;
        let len = d.u32()?;
        if offset as u64 + len as u64 > index_offset || (offset as usize) < HEADER_LEN {
            return Err(d.error(format_args!(
                "frame at {offset}+{len} lies outside the frame area"
            )));
        }
        out.push(IndexEntry { id, offset, len });
    }
    d.end()?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::Secret32;
    use std::sync::Arc;

    const BINDING: Binding = Binding {
        vault_id: [1; 16],
        disk_id: [2; 16],
    };

    fn keys(_generation: u32) -> Result<Arc<GenerationKeys>> {
        Ok(Arc::new(GenerationKeys::derive(&Secret32::from_bytes(
            [7; 32],
        ))))
    }

    fn pack(frames: &[(&[u8], u8)]) -> (PackId, Vec<u8>) {
        let mut w = PackWriter::new(&BINDING.disk_id, 0, Vec::new());
        for (f, id) in frames {
            w.add(ExtentId([*id; 32]), f);
        }
        w.finish(&BINDING, &keys(0).unwrap()).unwrap()
    }

    fn ids(pack: &[u8]) -> Result<Vec<u8>> {
        read_index(pack, &BINDING, &keys, "p").map(|e| e.iter().map(|e| e.id.0[0]).collect())
    }

    #[test]
    fn the_running_hash_names_the_pack_and_the_index_reads_back() {
        let (id, bytes) = pack(&[(b"frame one", 1), (&[9; 5000], 2)]);
        assert_eq!(id.0, *blake3::hash(&bytes).as_bytes());
        assert_eq!(&bytes[4..6], &VERSION.to_le_bytes());
        assert_eq!(ids(&bytes).unwrap(), [1, 2]);
        // Past the hashing batch: 600 odd-sized frames (2.4 MiB), hashed in aligned runs.
        let frame: Vec<u8> = (0..4176u32).map(|i| i as u8).collect();
        let frames: Vec<(&[u8], u8)> = (0..600).map(|i| (&frame[..], i as u8)).collect();
        let (id, bytes) = pack(&frames);
        assert!(bytes.len() > 2 * HASH_BATCH);
        assert_eq!(id.0, *blake3::hash(&bytes).as_bytes());
        assert_eq!(ids(&bytes).unwrap().len(), 600);
    }

    #[test]
    fn an_index_moved_onto_another_pack_is_refused() {
        // Two packs of one disk and generation whose frame areas have the same length: the
        // footer's index offset fits both, so only the index AAD can tell them apart.
        let (_, a) = pack(&[(b"frame of pack a", 1)]);
        let (_, b) = pack(&[(b"frame of pack b", 2)]);
        let index_at = HEADER_LEN + 15;
        let mut moved = b[..index_at].to_vec();
        moved.extend_from_slice(&a[index_at..]);
        let err = ids(&moved).unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::Integrity, "{err}");
        assert!(err.to_string().contains("p: index"), "{err}");
    }

    #[test]
    fn version_1_packs_still_read_and_their_index_binds_no_frames() {
        // A version 1 pack as the previous writer made it: same layout, AAD without the hash.
        let v1 = |frame: &[u8], id: u8| {
            let mut b = Vec::new();
            b.extend_from_slice(MAGIC);
            b.extend_from_slice(&1u16.to_le_bytes());
            b.extend_from_slice(&[0; 2]);
            b.extend_from_slice(&BINDING.disk_id);
            b.extend_from_slice(&[0; 8]);
            b.extend_from_slice(frame);
            let mut idx = Enc::with_capacity(44);
            idx.u32(1)
                .bytes(&[id; 32])
                .u32(HEADER_LEN as u32)
                .u32(frame.len() as u32);
            let aad = index_aad(&BINDING, &b[..HEADER_LEN], None);
            let sealed = keys(0)
                .unwrap()
                .pack_index
                .seal_to_vec(&aad, &idx.0)
                .unwrap();
            let at = b.len() as u64;
            b.extend_from_slice(&sealed);
            let mut f = Enc::with_capacity(FOOTER_LEN);
            f.u64(at).u32(sealed.len() as u32).bytes(FOOTER_MAGIC);
            b.extend_from_slice(&f.0);
            b
        };
        let (a, b) = (v1(b"frame of pack a", 1), v1(b"frame of pack b", 2));
        assert_eq!(ids(&a).unwrap(), [1]);
        // The weakness version 2 removes: a's index on b's frames still opens.
        let at = HEADER_LEN + 15;
        let moved = [&b[..at], &a[at..]].concat();
        assert_eq!(ids(&moved).unwrap(), [1]);
        // Another version is refused, naming it.
        let mut v3 = a.clone();
        v3[4] = 3;
        let err = ids(&v3).unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::Unsupported);
        assert!(
            err.to_string()
                .contains("pack version 3, this build reads 1 to 2"),
            "{err}"
        );
    }
}
