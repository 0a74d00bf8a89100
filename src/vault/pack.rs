//! Pack files: extent frames of one disk grouped into objects of about 32 MiB, so a vault of
//! millions of extents is thousands of objects, not millions.
//!
//! ```text
//! header (32): "BVPK" | u16 version=1 | u16 0 | disk id [16] | u32 DEK generation | u32 0
//! frames …     (see `frame`)
//! index:       nonce ‖ AES-256-GCM(pack-index key, u32 n | n × (extent id [32] | u32 offset | u32 length)) ‖ tag
//!              AAD = "blockvault pack index v1" ‖ vault id ‖ disk id ‖ the 32 header bytes
//! footer (16): u64 index offset | u32 index length | "BVPF"
//! ```
//! A pack's name is the BLAKE3 hash of its bytes (`packs/<2 hex>/<64 hex>`), so `verify
//! --read-data` can check a whole pack before decrypting anything. The index lets a lost
//! pack's frames be listed without any manifest (orphan accounting, salvage).

use super::codec::{Dec, Enc};
use super::frame::Binding;
use crate::crypto::{ExtentId, GenerationKeys};
use crate::error::{Error, Result};

const MAGIC: &[u8; 4] = b"BVPK";
const FOOTER_MAGIC: &[u8; 4] = b"BVPF";
const VERSION: u16 = 1;
/// Header bytes.
pub const HEADER_LEN: usize = 32;
/// Footer bytes.
pub const FOOTER_LEN: usize = 16;
const INDEX_AAD: &[u8] = b"blockvault pack index v1";
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

/// Builds one pack in memory.
pub struct PackWriter {
    buf: Vec<u8>,
    entries: Vec<IndexEntry>,
}

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
        }
    }

    /// Append a sealed frame; returns its offset.
    pub fn add(&mut self, id: ExtentId, frame: &[u8]) -> u32 {
        let offset = self.buf.len() as u32;
        self.buf.extend_from_slice(frame);
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
        let aad = index_aad(binding, &self.buf[..HEADER_LEN]);
        let sealed = keys.pack_index.seal_to_vec(&aad, &idx.0)?;
        let index_offset = self.buf.len() as u64;
        self.buf.extend_from_slice(&sealed);
        let mut f = Enc::with_capacity(FOOTER_LEN);
        f.u64(index_offset)
            .u32(sealed.len() as u32)
            .bytes(FOOTER_MAGIC);
        self.buf.extend_from_slice(&f.0);
        Ok((PackId(*blake3::hash(&self.buf).as_bytes()), self.buf))
    }
}

fn index_aad(binding: &Binding, header: &[u8]) -> Vec<u8> {
    [INDEX_AAD, &binding.vault_id, &binding.disk_id, header].concat()
}

/// Parse and decrypt a whole pack's index (used by `verify --read-data` and repair).
/// `keys_for` maps the header's DEK generation to its keys.
pub fn read_index(
    pack: &[u8],
    binding: &Binding,
    keys_for: &dyn Fn(u32) -> Result<std::sync::Arc<GenerationKeys>>,
    what: &str,
) -> Result<Vec<IndexEntry>> {
    let mut d = Dec::new(pack, what);
    d.prologue(MAGIC, VERSION, "pack")?;
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
    if pack.len() < HEADER_LEN + FOOTER_LEN {
        return Err(Error::integrity(format!(
            "{what}: {} bytes is too short for a pack",
            pack.len()
        )));
    }
    let mut f = Dec::new(&pack[pack.len() - FOOTER_LEN..], what);
    let index_offset = f.u64()?;
    let index_len = f.u32()? as u64;
    f.magic(FOOTER_MAGIC)?;
    let body_end = (pack.len() - FOOTER_LEN) as u64;
    if index_offset < HEADER_LEN as u64 || index_offset.checked_add(index_len) != Some(body_end) {
        return Err(Error::integrity(format!(
            "{what}: index at {index_offset}+{index_len} does not end where the footer starts"
        )));
    }
    let keys = keys_for(generation)?;
    let sealed = &pack[index_offset as usize..body_end as usize];
    let plain =
        keys.pack_index
            .open_vec(&index_aad(binding, &pack[..HEADER_LEN]), sealed, &|| {
                format!("{what}: index")
            })?;
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
