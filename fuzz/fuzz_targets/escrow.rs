//! `escrow`: escrow records (`vault::escrow::Record`) and their payload parser
//! (`vault::escrow::decode_payload`), fixed vault and disk ids and object key.
//!
//! Each input is used four ways:
//! 1. as the raw record: `Record::decode` must agree with an independent parse of the
//!    documented header (FORMAT.md, "Escrow records"); a decoded record re-encodes to the same
//!    bytes, and `open` with the keys of its generation (0 and 1 exist) must not panic;
//! 2. with magic, version, reserved and a known generation spliced over its first 12 bytes, so
//!    the fuzzer reaches the length bounds and `open`;
//! 3. as an opened payload: `decode_payload` agrees with an independent parse;
//! 4. as a name and secret: `Record::seal` accepts exactly the documented bounds; a sealed
//!    record round-trips through `encode`, `decode` and `open`, and fails to open for another
//!    disk, another object key or another generation's keys.
#![no_main]

use blockvault::vault::escrow::{decode_payload, Record, MAX_NAME, MAX_SECRET};
use blockvault::ErrorKind;
use blockvault_fuzz::{
    binding, generation_keys, other_binding, outcome, short_bytes, short_string, write_seeds,
    Unstructured,
};
use libfuzzer_sys::fuzz_target;

const KEY: &str = "escrow/66757a7a2d6469736b2d69642d303032/\
                   00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
const OTHER_KEY: &str = "escrow/66757a7a2d6469736b2d69642d303032/\
                         ffeeddccbbaa99887766554433221100ffeeddccbbaa99887766554433221100";
const HEADER_LEN: usize = 20;
/// Nonce and tag around a payload of at least a 1-byte name and a 1-byte secret.
const MIN_SEALED: usize = 12 + 2 + 1 + 1 + 16;
const MAX_SEALED: usize = 12 + 2 + MAX_NAME + MAX_SECRET + 16;

/// The header as FORMAT.md states it: "BVES" | u16 1 | u16 0 | u32 generation | u64 created,
/// then a sealed part of `MIN_SEALED..=MAX_SEALED` bytes. Returns (generation, created).
fn reference_header(b: &[u8]) -> Option<(u32, u64)> {
    if b.len() < HEADER_LEN || &b[..4] != b"BVES" || b[4..8] != [1, 0, 0, 0] {
        return None;
    }
    if !(MIN_SEALED..=MAX_SEALED).contains(&(b.len() - HEADER_LEN)) {
        return None;
    }
    Some((
        u32::from_le_bytes(b[8..12].try_into().unwrap()),
        u64::from_le_bytes(b[12..20].try_into().unwrap()),
    ))
}

/// The payload as FORMAT.md states it: u16 n (1..=200) | UTF-8 name [n] | secret (1..=64 KiB).
fn reference_payload(b: &[u8]) -> Option<(&str, &[u8])> {
    let n = u16::from_le_bytes(b.get(..2)?.try_into().unwrap()) as usize;
    if n == 0 || n > MAX_NAME {
        return None;
    }
    let name = std::str::from_utf8(b.get(2..2 + n)?).ok()?;
    let secret = &b[2 + n..];
    if secret.is_empty() || secret.len() > MAX_SECRET {
        return None;
    }
    Some((name, secret))
}

fn exercise(label: &str, data: &[u8]) {
    let r = Record::decode(data, KEY);
    outcome(label, &r);
    assert_eq!(
        r.as_ref().ok().map(|rec| (rec.generation, rec.created)),
        reference_header(data),
        "Record::decode disagrees with the format"
    );
    let Ok(rec) = r else { return };
    assert_eq!(rec.encode(), data, "decoded record re-encodes differently");
    if let Ok(keys) = generation_keys(rec.generation) {
        let opened = rec.open(&binding(), &keys, KEY);
        outcome("open", &opened);
        match opened {
            // A seed (or a mutation of one that kept its tag valid).
            Ok(e) => assert!(!e.name.is_empty() && !e.secret.is_empty()),
            Err(e) => assert_eq!(e.kind(), ErrorKind::Integrity, "{e}"),
        }
    }
}

fn payload(data: &[u8]) {
    let r = decode_payload(data, "payload");
    outcome("decode_payload", &r);
    let got = r.as_ref().ok().map(|(n, s)| (n.as_str(), &s[..]));
    assert_eq!(
        got,
        reference_payload(data),
        "decode_payload disagrees with the format"
    );
}

fn round_trip(u: &mut Unstructured) -> Option<()> {
    let generation = u.int_in_range(0..=1u32).ok()?;
    let name = short_string(u, MAX_NAME + 8).ok()?;
    let secret = if u.arbitrary::<bool>().ok()? {
        vec![u.arbitrary::<u8>().ok()?; u.int_in_range(MAX_SECRET - 2..=MAX_SECRET + 2).ok()?]
    } else {
        short_bytes(u, 300).ok()?.to_vec()
    };
    let keys = generation_keys(generation).unwrap();
    let r = Record::seal(&binding(), &keys, generation, KEY, &name, &secret);
    let valid = (1..=MAX_NAME).contains(&name.len())
        && !name.chars().any(char::is_control)
        && (1..=MAX_SECRET).contains(&secret.len());
    let rec = match r {
        Ok(rec) => rec,
        Err(e) => {
            assert!(!valid, "a valid escrow was refused: {e}");
            assert_eq!(e.kind(), ErrorKind::Usage);
            return None;
        }
    };
    assert!(valid, "an invalid escrow was sealed");
    let back = Record::decode(&rec.encode(), KEY).expect("an encoded record decodes");
    assert_eq!((back.generation, back.created), (generation, rec.created));
    let e = back
        .open(&binding(), &keys, KEY)
        .expect("a sealed record opens");
    assert_eq!(
        (e.name.as_str(), &e.secret[..]),
        (name.as_str(), &secret[..])
    );
    assert!(back.open(&other_binding(), &keys, KEY).is_err());
    assert!(back.open(&binding(), &keys, OTHER_KEY).is_err());
    let other_keys = generation_keys(1 - generation).unwrap();
    assert!(back.open(&binding(), &other_keys, KEY).is_err());
    Some(())
}

fn seeds() -> Vec<Vec<u8>> {
    [
        (0u32, "bitlocker-C", &b"123456-654321"[..]),
        (1, "luks-root", b"hunter2"),
    ]
    .iter()
    .map(|&(g, name, secret)| {
        let keys = generation_keys(g).unwrap();
        Record::seal(&binding(), &keys, g, KEY, name, secret)
            .unwrap()
            .encode()
    })
    .collect()
}

fuzz_target!(
    init: { write_seeds(seeds) },
    |data: &[u8]| {
        // 1. Raw.
        exercise("decode(raw)", data);

        // 2. Prologue and a known generation spliced in.
        if data.len() >= 12 {
            let mut b = data.to_vec();
            b[..8].copy_from_slice(b"BVES\x01\x00\x00\x00");
            b[8..12].copy_from_slice(&u32::from(data[8] & 1).to_le_bytes());
            exercise("decode(prologue fixed)", &b);
        }

        // 3. Payload parser.
        payload(data);

        // 4. Round trip.
        round_trip(&mut Unstructured::new(data));
    }
);
