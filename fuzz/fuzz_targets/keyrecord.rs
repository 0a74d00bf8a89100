//! `keyrecord`: key records (`vault::keyrecord::KeyRecord`), fixed vault and disk ids.
//!
//! Each input is used three ways:
//! 1. as the raw object: `decode` must not panic; a record that decodes re-encodes to the same
//!    bytes (unless it held wraps by unknown KEK kinds, which decode skips), and `unwrap` (fixed platform KEK) and `name` (generation-0
//!    keys) on it must not panic;
//! 2. with the fixed magic, version and ids spliced over its first 40 bytes, so the fuzzer
//!    spends its time on the wrap list rather than on guessing 32 bytes of ids;
//! 3. as a record built from the input: `KeyRecord::create` (fixed DEK material and name from
//!    the input) plus extra junk wraps, `encode`, `decode`: the fields match, `unwrap` gives the
//!    DEK back and `name` the name.
#![no_main]

use blockvault::crypto::kek::{KekId, KekKind};
use blockvault::crypto::{GenerationKeys, Secret32};
use blockvault::vault::keyrecord::KeyRecord;
use blockvault_fuzz::{
    generation_keys, outcome, platform_kek, record_mac, short_bytes, short_string, wrapping_kek,
    write_seeds, Unstructured, DISK_ID, VAULT_ID,
};
use libfuzzer_sys::fuzz_target;

const PREFIX_LEN: usize = 4 + 2 + 2 + 16 + 16;

/// Parse without the MAC check, so the fuzzer reaches the parser behind it.
fn decode(b: &[u8]) -> blockvault::Result<KeyRecord> {
    KeyRecord::decode(b, "keys/fuzz/00000000", &VAULT_ID, &DISK_ID, None)
}

fn exercise(data: &[u8]) {
    let r = decode(data);
    outcome("decode", &r);
    let Ok(rec) = r else { return };
    // Wraps by KEK kinds this build does not know are skipped on decode; otherwise a record
    // re-encodes to exactly its bytes (up to the MAC, which decode did not check here).
    let stored_wraps = u16::from_le_bytes([data[52], data[53]]) as usize;
    if stored_wraps == rec.wraps.len() {
        let enc = rec.encode(&record_mac());
        assert_eq!(
            enc[..enc.len() - 32],
            data[..data.len() - 32],
            "decoded key record re-encodes differently"
        );
        let verified = KeyRecord::decode(data, "k", &VAULT_ID, &DISK_ID, Some(&record_mac()));
        assert_eq!(
            verified.is_ok(),
            enc == data,
            "MAC check disagrees with re-encoding"
        );
    }
    let _ = rec.unwrap(platform_kek());
    let _ = rec.name(&generation_keys(0).unwrap());
}

fn seeds() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for (g, name) in [(0u32, "vm1"), (1, "a longer disk name, ünïcödé")] {
        let rec = KeyRecord::create(
            VAULT_ID,
            DISK_ID,
            g,
            &Secret32::from_bytes([g as u8 + 1; 32]),
            name,
            wrapping_kek(),
        )
        .unwrap();
        out.push(rec.encode(&record_mac()));
    }
    out
}

fn round_trip(u: &mut Unstructured) -> Option<()> {
    let generation: u32 = u.arbitrary().ok()?;
    let dek_bytes: [u8; 32] = u.arbitrary().ok()?;
    let name = short_string(u, 1000).ok()?;
    let rec = KeyRecord::create(
        VAULT_ID,
        DISK_ID,
        generation,
        &Secret32::from_bytes(dek_bytes),
        &name,
        wrapping_kek(),
    )
    .expect("create");
    let mut rec = rec;
    // Junk wraps before and after the real one: unwrap must skip them.
    let extra = u.int_in_range(0..=3u8).ok()?;
    for _ in 0..extra {
        let version: u32 = u.arbitrary().ok()?;
        let bytes = short_bytes(u, 80).ok()?.to_vec();
        let at = u.int_in_range(0..=rec.wraps.len()).ok()?;
        rec.wraps.insert(
            at,
            (
                KekId {
                    kind: KekKind::Platform,
                    version,
                },
                bytes,
            ),
        );
    }
    let enc = rec.encode(&record_mac());
    let back = KeyRecord::decode(&enc, "k", &VAULT_ID, &DISK_ID, Some(&record_mac()))
        .expect("an encoded key record decodes");
    assert_eq!(back.vault_id, rec.vault_id);
    assert_eq!(back.disk_id, rec.disk_id);
    assert_eq!(back.generation, rec.generation);
    assert_eq!(back.created, rec.created);
    assert_eq!(back.wraps, rec.wraps);
    assert_eq!(back.sealed_name, rec.sealed_name);
    let dek = back
        .unwrap(platform_kek())
        .expect("unwrap finds the real wrap");
    assert_eq!(dek.expose(), &dek_bytes);
    let keys = GenerationKeys::derive(&dek);
    assert_eq!(back.name(&keys).expect("name opens"), name);
    // Under another vault or disk id the record is refused.
    assert!(KeyRecord::decode(&enc, "k", &DISK_ID, &DISK_ID, None).is_err());
    assert!(KeyRecord::decode(&enc, "k", &VAULT_ID, &VAULT_ID, None).is_err());
    Some(())
}

fuzz_target!(
    init: { write_seeds(seeds) },
    |data: &[u8]| {
        // 1. Raw.
        exercise(data);

        // 2. Fixed prefix spliced in.
        if data.len() >= PREFIX_LEN {
            let mut b = data.to_vec();
            b[0..4].copy_from_slice(b"BVKR");
            b[4..6].copy_from_slice(&1u16.to_le_bytes());
            b[8..24].copy_from_slice(&VAULT_ID);
            b[24..40].copy_from_slice(&DISK_ID);
            exercise(&b);
        }

        // 3. Round trip.
        round_trip(&mut Unstructured::new(data));
    }
);
