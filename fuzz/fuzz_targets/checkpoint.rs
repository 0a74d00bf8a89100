//! `checkpoint`: a checkpoint segment (`vault::checkpoint::Checkpoint::open`), keys of
//! generations 0 and 1 derived from fixed DEKs.
//!
//! Each input is used three ways:
//! 1. as the raw segment: `open` must not panic;
//! 2. as a body sealed by us behind a valid header and tag (docs/FORMAT.md §3.11, rebuilt
//!    here: header ‖ nonce ‖ AES-256-GCM(checkpoint key, body) ‖ tag, AAD = "blockvault
//!    checkpoint v1" ‖ header), so the body parser sees arbitrary bytes; it must accept exactly
//!    what an independent parse of the format accepts, with the same entries;
//! 3. as a segment written with `Checkpoint::seal`: it opens to the same value, and is refused
//!    for another disk or another pack name.
#![no_main]

use blockvault::crypto::ExtentId;
use blockvault::vault::checkpoint::{Checkpoint, HEADER};
use blockvault::vault::manifest::{ExtentLoc, SnapshotId};
use blockvault::vault::pack::PackId;
use blockvault_fuzz::{
    binding, generation_keys, outcome, write_seeds, Unstructured, DISK_ID, VAULT_ID,
};
use libfuzzer_sys::fuzz_target;

const PACK: PackId = PackId([0x5a; 32]);

fn open(b: &[u8]) -> blockvault::Result<Checkpoint> {
    let keys = generation_keys(0).unwrap();
    Checkpoint::open(b, &binding(), &PACK, &keys, "checkpoints/fu/zz")
}

fn header() -> Vec<u8> {
    let mut h = Vec::with_capacity(HEADER);
    h.extend_from_slice(b"BVCP");
    h.extend_from_slice(&1u16.to_le_bytes());
    h.extend_from_slice(&0u16.to_le_bytes());
    h.extend_from_slice(&VAULT_ID);
    h.extend_from_slice(&DISK_ID);
    h.extend_from_slice(&PACK.0);
    h.extend_from_slice(&0u32.to_le_bytes());
    h
}

fn sealed(body: &[u8]) -> Vec<u8> {
    let h = header();
    let aad = [b"blockvault checkpoint v1".as_slice(), &h].concat();
    let s = generation_keys(0)
        .unwrap()
        .checkpoint
        .seal_to_vec(&aad, body)
        .unwrap();
    [h, s].concat()
}

/// The body, parsed independently: (pack size, entries) when well formed.
fn reference(b: &[u8]) -> Option<(u64, Vec<(u32, u32, u32)>)> {
    if b.len() < 36 {
        return None;
    }
    let pack_size = u64::from_le_bytes(b[24..32].try_into().unwrap());
    let n = u32::from_le_bytes(b[32..36].try_into().unwrap()) as usize;
    if b.len() - 36 != n.checked_mul(44)? {
        return None;
    }
    let mut out = Vec::new();
    for e in b[36..].chunks_exact(44) {
        let w = |i: usize| u32::from_le_bytes(e[i..i + 4].try_into().unwrap());
        let (offset, len, plain) = (w(32), w(36), w(40));
        if offset < 32
            || offset as u64 + len as u64 > pack_size.saturating_sub(16)
            || len < 80
            || plain > 4 << 20
        {
            return None;
        }
        out.push((offset, len, plain));
    }
    Some((pack_size, out))
}

fn round_trip(u: &mut Unstructured) -> Option<()> {
    let n = u.int_in_range(0..=8usize).ok()?;
    let mut extents = Vec::new();
    for _ in 0..n {
        extents.push(ExtentLoc {
            id: ExtentId(u.arbitrary().ok()?),
            pack: 0,
            offset: u.int_in_range(32..=1000u32).ok()?,
            len: u.int_in_range(80..=1000u32).ok()?,
            plain_len: u.int_in_range(0..=4096u32).ok()?,
        });
    }
    let c = Checkpoint {
        generation: 0,
        pack: PACK,
        pack_size: 4096,
        parent: u.arbitrary::<bool>().ok()?.then_some(SnapshotId([3; 16])),
        slot_size: 1 << 20,
        identity_generation: 0,
        extents,
    };
    let keys = generation_keys(0).unwrap();
    let bytes = c.seal(&binding(), &keys).unwrap();
    assert_eq!(open(&bytes).expect("a sealed segment opens"), c);
    let other = blockvault::vault::frame::Binding {
        vault_id: VAULT_ID,
        disk_id: [0; 16],
    };
    assert!(Checkpoint::open(&bytes, &other, &PACK, &keys, "c").is_err());
    assert!(Checkpoint::open(&bytes, &binding(), &PackId([1; 32]), &keys, "c").is_err());
    Some(())
}

fn seeds() -> Vec<Vec<u8>> {
    let mut body = vec![0u8; 24];
    body.extend_from_slice(&4096u64.to_le_bytes());
    body.extend_from_slice(&1u32.to_le_bytes());
    body.extend_from_slice(&[7; 32]);
    for v in [32u32, 100, 20] {
        body.extend_from_slice(&v.to_le_bytes());
    }
    vec![sealed(&body), [vec![0u8], body].concat()]
}

fuzz_target!(
    init: { write_seeds(seeds) },
    |data: &[u8]| {
        outcome("open(raw)", &open(data));
        let Some((&sel, rest)) = data.split_first() else { return };
        if sel & 1 == 0 {
            let r = open(&sealed(rest));
            outcome("open(sealed body)", &r);
            let got = r.ok().map(|c| {
                (c.pack_size, c.extents.iter().map(|e| (e.offset, e.len, e.plain_len)).collect())
            });
            assert_eq!(got, reference(rest));
        } else {
            round_trip(&mut Unstructured::new(rest));
        }
    }
);
