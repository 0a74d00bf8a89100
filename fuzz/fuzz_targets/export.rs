//! `export`: the keystore export file (`crypto::export`).
//!
//! Everything `import` reads before it derives a key is fuzzed here: the header parser
//! (`Header::parse`) and the length bounds. Deriving the key (PBKDF2, at least 100 000
//! iterations) takes tens of milliseconds, so an input is passed to `import` or `export` only
//! when the format says it is refused before the derivation; the derivation itself and the
//! opened keystore bytes are covered by tests/escrow.rs.
//!
//! Each input is used three ways:
//! 1. as a raw export file: `Header::parse` agrees with an independent parse of the documented
//!    header (FORMAT.md, "Keystore export file"); where that parse refuses the file, `import`
//!    refuses it too, with the same structural error and without asking for the passphrase's key;
//! 2. with magic, version, reserved and an in-range iteration count spliced in, so the fuzzer
//!    reaches the vault id, salt and length bound;
//! 3. as keystore file bytes handed to `export`: refused (`Key`) unless they start with the
//!    keystore magic and carry the vault id.
#![no_main]

use blockvault::crypto::export::{self, Header, HEADER_LEN, MAX_ITERATIONS, MIN_ITERATIONS};
use blockvault::ErrorKind;
use blockvault_fuzz::{outcome, write_seeds, VAULT_ID};
use libfuzzer_sys::fuzz_target;

const PASS: &[u8] = b"fuzz passphrase";
/// Nonce, tag, and the keystore magic to vault id (24 bytes) at least.
const MIN_SEALED: usize = 12 + 24 + 16;

/// The header as FORMAT.md states it: "BVKE" | u16 1 | u16 0 | vault id [16] | u32 iterations
/// (100 000 ..= 10 000 000) | salt [16], then at least `MIN_SEALED` bytes.
fn reference(b: &[u8]) -> Option<([u8; 16], u32, [u8; 16], usize)> {
    if b.len() < HEADER_LEN + MIN_SEALED || &b[..4] != b"BVKE" || b[4..8] != [1, 0, 0, 0] {
        return None;
    }
    let iterations = u32::from_le_bytes(b[24..28].try_into().unwrap());
    if !(MIN_ITERATIONS..=MAX_ITERATIONS).contains(&iterations) {
        return None;
    }
    Some((
        b[8..24].try_into().unwrap(),
        iterations,
        b[28..44].try_into().unwrap(),
        b.len() - HEADER_LEN,
    ))
}

fn differential(label: &str, data: &[u8]) {
    let r = Header::parse(data);
    outcome(label, &r);
    let got = r
        .as_ref()
        .ok()
        .map(|(h, sealed)| (h.vault_id, h.iterations.get(), h.salt, sealed.len()));
    let want = reference(data);
    assert_eq!(got, want, "Header::parse disagrees with the format");
    if let Err(e) = r {
        let i = export::import(data, PASS).expect_err("import of a malformed export");
        assert_ne!(e.kind(), ErrorKind::Key, "a structural error: {e}");
        assert_eq!(i.to_string(), e.to_string());
    }
}

fn seeds() -> Vec<Vec<u8>> {
    let mut keystore = b"BVKS\x01\x00\x00\x00".to_vec();
    keystore.extend_from_slice(&VAULT_ID);
    keystore.extend_from_slice(&[0x11; 66]);
    let good = export::export(&keystore, &VAULT_ID, PASS).expect("export of the seed");
    let (id, back) = export::import(&good, PASS).expect("import of the seed");
    assert_eq!((id, &back[..]), (VAULT_ID, &keystore[..]));
    vec![good]
}

fuzz_target!(
    init: { write_seeds(seeds) },
    |data: &[u8]| {
        // 1. Raw.
        differential("parse(raw)", data);

        // 2. Prologue and iteration count fixed up.
        if data.len() >= 28 {
            let mut b = data.to_vec();
            b[..8].copy_from_slice(b"BVKE\x01\x00\x00\x00");
            let n = u32::from_le_bytes(data[24..28].try_into().unwrap());
            let n = MIN_ITERATIONS + n % (MAX_ITERATIONS - MIN_ITERATIONS + 1);
            b[24..28].copy_from_slice(&n.to_le_bytes());
            differential("parse(prologue fixed)", &b);
        }

        // 3. What export accepts, short of deriving a key.
        let is_keystore = data.len() >= 24 && &data[..4] == b"BVKS" && data[8..24] == VAULT_ID;
        if !is_keystore {
            let e = export::export(data, &VAULT_ID, PASS).expect_err("export of a non-keystore");
            assert_eq!(e.kind(), ErrorKind::Key);
        }
    }
);
