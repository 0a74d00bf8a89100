//! `keyrecord`: key records (`vault::keyrecord::KeyRecord`), fixed vault and disk ids: format
//! 2 (no MAC: the vault head binds it by digest) through `decode`, format 1 (MAC'd) through
//! `decode_v1`.
//!
//! Each input is used three ways:
//! 1. as the raw object, to `decode` and to `decode_v1` (as it is, and with a correct MAC
//!    appended): no panic; a record that decodes re-encodes (format 2) to the same bytes, the
//!    version field aside for format 1 (unless it held wraps by unknown KEK kinds, which
//!    decode skips), and `unwrap` (fixed platform KEK) and `name` (generation-0 keys) on it
//!    must not panic;
//! 2. with the fixed magic, version (1 or 2, by the input's first byte) and ids spliced over
//!    its first 40 bytes, so the fuzzer spends its time on the wrap list rather than on
//!    guessing 32 bytes of ids;
//! 3. as a record built from the input: `KeyRecord::create` (fixed DEK material and name from
//!    the input) plus extra junk wraps, `encode`, `decode` (and the same as format 1 with its
//!    MAC, `decode_v1`): the fields match, `unwrap` gives the DEK back and `name` the name.
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
const WHAT: &str = "keys/fuzz/00000000-00000001";

/// `body` as a format 1 record: its MAC appended.
fn with_mac(body: &[u8]) -> Vec<u8> {
    let mut b = body.to_vec();
    b.extend_from_slice(blake3::keyed_hash(record_mac().expose(), body).as_bytes());
    b
}

/// Format 2 bytes as format 1 (version field 1, MAC appended).
fn as_v1(v2: &[u8]) -> Vec<u8> {
    let mut body = v2.to_vec();
    body[4..6].copy_from_slice(&1u16.to_le_bytes());
    with_mac(&body)
}

/// Checks on a record decoded from `body` (its bytes without any MAC), `version` 1 or 2.
fn decoded(rec: &KeyRecord, body: &[u8], version: u16) {
    // Wraps by KEK kinds this build does not know are skipped on decode; otherwise a record
    // re-encodes to exactly its bytes (format 2: the version field aside for format 1).
    let stored_wraps = u16::from_le_bytes([body[52], body[53]]) as usize;
    if stored_wraps == rec.wraps.len() {
        let mut enc = rec.encode();
        if version == 1 {
            enc[4..6].copy_from_slice(&1u16.to_le_bytes());
        }
        assert_eq!(enc, body, "decoded key record re-encodes differently");
    }
    let _ = rec.unwrap(platform_kek());
    let _ = rec.name(&generation_keys(0).unwrap());
}

fn exercise(data: &[u8]) {
    let r = KeyRecord::decode(data, WHAT, &VAULT_ID, &DISK_ID);
    outcome("decode", &r);
    if let Ok(rec) = r {
        decoded(&rec, data, 2);
    }
    let _ = KeyRecord::decode_v1(data, WHAT, &VAULT_ID, &DISK_ID, &record_mac());
    let r = KeyRecord::decode_v1(&with_mac(data), WHAT, &VAULT_ID, &DISK_ID, &record_mac());
    outcome("decode_v1(mac fixed)", &r);
    if let Ok(rec) = r {
        decoded(&rec, data, 1);
    }
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
        let enc = rec.encode();
        out.push(as_v1(&enc)[..enc.len()].to_vec());
        out.push(enc);
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
    let enc = rec.encode();
    let v2 = KeyRecord::decode(&enc, WHAT, &VAULT_ID, &DISK_ID).expect("an encoded key record decodes");
    let v1 = KeyRecord::decode_v1(&as_v1(&enc), WHAT, &VAULT_ID, &DISK_ID, &record_mac())
        .expect("an encoded key record decodes as format 1 with its MAC");
    for back in [v2, v1] {
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
    }
    // Under another vault or disk id the record is refused; format 1 with another MAC key,
    // or format 2 read as format 1, too.
    assert!(KeyRecord::decode(&enc, WHAT, &DISK_ID, &DISK_ID).is_err());
    assert!(KeyRecord::decode(&enc, WHAT, &VAULT_ID, &VAULT_ID).is_err());
    let other = Secret32::from_bytes([0x24; 32]);
    assert!(KeyRecord::decode_v1(&as_v1(&enc), WHAT, &VAULT_ID, &DISK_ID, &other).is_err());
    assert!(KeyRecord::decode_v1(&with_mac(&enc), WHAT, &VAULT_ID, &DISK_ID, &record_mac()).is_err());
    assert!(KeyRecord::decode(&as_v1(&enc), WHAT, &VAULT_ID, &DISK_ID).is_err());
    Some(())
}

fuzz_target!(
    init: { write_seeds(seeds) },
    |data: &[u8]| {
        // 1. Raw.
        exercise(data);

        // 2. Fixed prefix spliced in (format 1 or 2 by the first byte).
        if data.len() >= PREFIX_LEN {
            let mut b = data.to_vec();
            let version = 1 + u16::from(data[0] & 1);
            b[0..4].copy_from_slice(b"BVKR");
            b[4..6].copy_from_slice(&version.to_le_bytes());
            b[8..24].copy_from_slice(&VAULT_ID);
            b[24..40].copy_from_slice(&DISK_ID);
            exercise(&b);
        }

        // 3. Round trip.
        round_trip(&mut Unstructured::new(data));
    }
);
