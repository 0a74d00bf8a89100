//! `pack_index`: a pack's header, footer and sealed index (`vault::pack::read_index`), keys of
//! generations 0 and 1 derived from fixed DEKs.
//!
//! Each input is used three ways:
//! 1. as the raw pack: `read_index` must not panic;
//! 2. as an index plaintext sealed by us in a pack of version 1 or 2 (the layout and AADs of
//!    docs/FORMAT.md, rebuilt here: `nonce ‖ AES-256-GCM(pack-index key, index) ‖ tag`, AAD =
//!    "blockvault pack index v1" ‖ vault id ‖ disk id ‖ header, or "blockvault pack index v2"
//!    ‖ vault id ‖ disk id ‖ header ‖ BLAKE3(header and frames)), so the index parser behind
//!    the tag sees arbitrary bytes; the result must be exactly what an independent parse of
//!    that format gives (entries inside the frame area, or an error);
//! 3. as a pack built with `PackWriter` from the input: `read_index` gives back exactly the
//!    entries written, the pack id is the BLAKE3 of the bytes, and the index moved onto a pack
//!    with other frames of the same length is refused.
#![no_main]

use blockvault::crypto::ExtentId;
use blockvault::vault::pack::{self, PackWriter, FOOTER_LEN, HEADER_LEN};
use blockvault_fuzz::{
    binding, generation_keys, outcome, short_bytes, write_seeds, Unstructured, DISK_ID, VAULT_ID,
};
use libfuzzer_sys::fuzz_target;

fn read(b: &[u8]) -> blockvault::Result<Vec<pack::IndexEntry>> {
    pack::read_index(b, &binding(), &generation_keys, "packs/fu/zz")
}

fn header(version: u16, generation: u32) -> Vec<u8> {
    let mut h = Vec::with_capacity(HEADER_LEN);
    h.extend_from_slice(b"BVPK");
    h.extend_from_slice(&version.to_le_bytes());
    h.extend_from_slice(&0u16.to_le_bytes());
    h.extend_from_slice(&DISK_ID);
    h.extend_from_slice(&generation.to_le_bytes());
    h.extend_from_slice(&0u32.to_le_bytes());
    h
}

/// A pack of `version` (1 or 2) whose frame area is `frames` and whose index plaintext is
/// `index`, sealed with the keys of `generation` (0 or 1).
fn pack_with_index(version: u16, generation: u32, frames: &[u8], index: &[u8]) -> Vec<u8> {
    let mut b = header(version, generation);
    b.extend_from_slice(frames);
    let aad = if version == 1 {
        [
            b"blockvault pack index v1".as_slice(),
            &VAULT_ID,
            &DISK_ID,
            &b[..HEADER_LEN],
        ]
        .concat()
    } else {
        [
            b"blockvault pack index v2".as_slice(),
            &VAULT_ID,
            &DISK_ID,
            &b[..HEADER_LEN],
            blake3::hash(&b).as_bytes(),
        ]
        .concat()
    };
    let sealed = generation_keys(generation.min(1))
        .unwrap()
        .pack_index
        .seal_to_vec(&aad, index)
        .unwrap();
    let index_offset = b.len() as u64;
    b.extend_from_slice(&sealed);
    b.extend_from_slice(&index_offset.to_le_bytes());
    b.extend_from_slice(&(sealed.len() as u32).to_le_bytes());
    b.extend_from_slice(b"BVPF");
    b
}

fn written_pack(
    generation: u32,
    frames: &[([u8; 32], &[u8])],
) -> (Vec<u8>, Vec<(ExtentId, u32, u32)>) {
    let mut w = PackWriter::new(&DISK_ID, generation, Vec::new());
    let mut expect = Vec::new();
    for (id, f) in frames {
        let off = w.add(ExtentId(*id), f);
        expect.push((ExtentId(*id), off, f.len() as u32));
    }
    let (pid, bytes) = w
        .finish(&binding(), &generation_keys(generation.min(1)).unwrap())
        .unwrap();
    assert_eq!(pid.0, *blake3::hash(&bytes).as_bytes());
    (bytes, expect)
}

fn seeds() -> Vec<Vec<u8>> {
    let (a, _) = written_pack(0, &[]);
    let (b, _) = written_pack(
        0,
        &[([1; 32], b"frame one"), ([2; 32], b"frame two, longer")],
    );
    let (c, _) = written_pack(1, &[([3; 32], &[0u8; 100])]);
    // The same index as `b`, as a plaintext for part 2 (selector 0 → generation 0).
    let mut idx = vec![0u8, 0];
    idx.extend_from_slice(&26u16.to_le_bytes());
    idx.extend_from_slice(&2u32.to_le_bytes());
    for (id, off, len) in [([1u8; 32], 32u32, 9u32), ([2; 32], 41, 17)] {
        idx.extend_from_slice(&id);
        idx.extend_from_slice(&off.to_le_bytes());
        idx.extend_from_slice(&len.to_le_bytes());
    }
    vec![a, b, c, idx]
}

/// The index format, parsed independently: u32 n | n × (id [32] | u32 offset | u32 length),
/// every frame inside [HEADER_LEN, index_offset).
fn reference_index(index: &[u8], index_offset: u64) -> Option<Vec<([u8; 32], u32, u32)>> {
    let n = u32::from_le_bytes(index.get(..4)?.try_into().unwrap()) as usize;
    if index.len() - 4 != n.checked_mul(40)? {
        return None;
    }
    let mut out = Vec::new();
    for e in index[4..].chunks_exact(40) {
        let id: [u8; 32] = e[..32].try_into().unwrap();
        let offset = u32::from_le_bytes(e[32..36].try_into().unwrap());
        let len = u32::from_le_bytes(e[36..40].try_into().unwrap());
        if (offset as usize) < HEADER_LEN || offset as u64 + len as u64 > index_offset {
            return None;
        }
        out.push((id, offset, len));
    }
    Some(out)
}

/// `b`: u8 generation (mod 3) and version (1 + (b / 3) mod 2) | u16 frame-area length
/// (mod 513) | index plaintext.
fn sealed_index(b: &[u8]) -> Option<()> {
    if b.len() < 3 {
        return None;
    }
    let generation = (b[0] % 3) as u32;
    let version = 1 + (b[0] / 3 % 2) as u16;
    let frame_len = u16::from_le_bytes([b[1], b[2]]) as usize % 513;
    let frames: Vec<u8> = (0..frame_len).map(|i| b[i % b.len()]).collect();
    let index = &b[3..];
    let p = pack_with_index(version, generation, &frames, index);
    let index_offset = (HEADER_LEN + frame_len) as u64;
    let r = read(&p);
    outcome("read_index(sealed index)", &r);
    if generation == 2 {
        assert!(r.is_err(), "a pack of a generation without keys was read");
    } else {
        // Differential: the library accepts exactly the well-formed indexes, with the same entries.
        let got = r
            .ok()
            .map(|v| v.iter().map(|e| (e.id.0, e.offset, e.len)).collect());
        assert_eq!(got, reference_index(index, index_offset));
    }
    Some(())
}

fn round_trip(u: &mut Unstructured) -> Option<()> {
    let generation = u.int_in_range(0..=1u32).ok()?;
    let n = u.int_in_range(0..=12usize).ok()?;
    let mut frames = Vec::new();
    for _ in 0..n {
        let id: [u8; 32] = u.arbitrary().ok()?;
        frames.push((id, short_bytes(u, 300).ok()?));
    }
    let (bytes, expect) = written_pack(generation, &frames);
    let got = read(&bytes).expect("a written pack's index reads back");
    let got: Vec<_> = got.iter().map(|e| (e.id, e.offset, e.len)).collect();
    assert_eq!(got, expect);
    // A pack of this disk read as another disk's is refused.
    let other = blockvault::vault::frame::Binding {
        vault_id: VAULT_ID,
        disk_id: [0; 16],
    };
    assert!(pack::read_index(&bytes, &other, &generation_keys, "p").is_err());
    // Truncating the footer away is refused, never a panic.
    assert!(read(&bytes[..bytes.len() - FOOTER_LEN]).is_err());
    // The index moved onto a pack whose frames differ but fill the same length: refused.
    if !frames.is_empty() {
        let footer = &bytes[bytes.len() - FOOTER_LEN..];
        let index_offset = u64::from_le_bytes(footer[..8].try_into().unwrap()) as usize;
        let mut moved = bytes.clone();
        moved[index_offset - 1] ^= 1;
        assert!(
            read(&moved).is_err(),
            "an index moved onto other frames was read"
        );
    }
    Some(())
}

fuzz_target!(
    init: {
        // Check once that this file's rebuilt index AADs match the library's.
        for version in [1, 2] {
            let p = pack_with_index(version, 0, b"frames", &[0, 0, 0, 0]);
            assert!(read(&p).expect("rebuilt pack index AAD is wrong").is_empty());
        }
        write_seeds(seeds)
    },
    |data: &[u8]| {
        // 1. Raw.
        outcome("read_index(raw)", &read(data));
        let Some((&sel, rest)) = data.split_first() else { return };
        if sel & 1 == 0 {
            // 2. Arbitrary index plaintext behind a valid tag.
            sealed_index(rest);
        } else {
            // 3. Round trip through PackWriter.
            round_trip(&mut Unstructured::new(rest));
        }
    }
);
