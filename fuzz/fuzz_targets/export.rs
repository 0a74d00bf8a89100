//! `export`: the keystore export file (`crypto::export`), both versions.
//!
//! Everything `import` reads before it derives a key is fuzzed here: the header parser
//! (`Header::parse`, version 1 with PBKDF2 and version 2 with Argon2id) and its bounds on every
//! cost a file claims. Deriving the key takes tens of milliseconds (PBKDF2, at least 100 000
//! iterations) to seconds (Argon2id, at least 19 MiB), so an input is passed to `import` or
//! `export` only when the format says it is refused before the derivation; the derivation
//! itself and the opened keystore bytes are covered by the unit tests' independent vectors and
//! by tests/escrow.rs.
//!
//! Each input is used three ways:
//! 1. as a raw export file: `Header::parse` agrees with an independent parse of the documented
//!    headers (FORMAT.md, "Keystore export file"); where that parse refuses the file, `import`
//!    refuses it too, with the same structural error and without deriving a key;
//! 2. with magic, version (1 or 2, from the input), reserved and in-range costs spliced in, so
//!    the fuzzer reaches the vault id, salt and length bound of both versions;
//! 3. as keystore file bytes handed to `export`: refused (`Key`) unless they start with the
//!    keystore magic and carry the vault id, and refused (`Usage`) for a short passphrase.
#![no_main]

use blockvault::crypto::export::{
    self, Header, Kdf, HEADER_LEN, HEADER_LEN_V1, MAX_ITERATIONS, MAX_LANES, MAX_MEMORY_KIB,
    MAX_PASSES, MAX_WORK, MIN_ITERATIONS, MIN_MEMORY_KIB, MIN_PASSES,
};
use blockvault::ErrorKind;
use blockvault_fuzz::{outcome, write_seeds, VAULT_ID};
use libfuzzer_sys::fuzz_target;

const PASS: &[u8] = b"fuzz passphrase";
/// Nonce, tag, and the keystore magic to vault id (24 bytes) at least.
const MIN_SEALED: usize = 12 + 24 + 16;

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

/// The headers as FORMAT.md states them, then at least `MIN_SEALED` bytes:
/// - "BVKE" | u16 1 | u16 0 | vault id [16] | u32 iterations (100 000 ..= 10 000 000) | salt [16];
/// - "BVKE" | u16 2 | u16 0 | vault id [16] | u32 memory KiB (19 MiB ..= 1 GiB) | u32 passes
///   (2 ..= 10) | u32 lanes (1 ..= 8) | salt [16], memory × passes ≤ 3 GiB.
fn reference(b: &[u8]) -> Option<([u8; 16], Kdf, [u8; 16], usize)> {
    if b.len() < 8 || &b[..4] != b"BVKE" || b[6..8] != [0, 0] {
        return None;
    }
    let (kdf, header_len) = match b[4..6] {
        [1, 0] if b.len() >= HEADER_LEN_V1 + MIN_SEALED => {
            let n = u32_at(b, 24);
            if !(MIN_ITERATIONS..=MAX_ITERATIONS).contains(&n) {
                return None;
            }
            let iterations = std::num::NonZeroU32::new(n)?;
            (Kdf::Pbkdf2 { iterations }, HEADER_LEN_V1)
        }
        [2, 0] if b.len() >= HEADER_LEN + MIN_SEALED => {
            let (m, t, p) = (u32_at(b, 24), u32_at(b, 28), u32_at(b, 32));
            let ok = (MIN_MEMORY_KIB..=MAX_MEMORY_KIB).contains(&m)
                && (MIN_PASSES..=MAX_PASSES).contains(&t)
                && (1..=MAX_LANES).contains(&p)
                && m as u64 * t as u64 <= MAX_WORK;
            if !ok {
                return None;
            }
            let kdf = Kdf::Argon2id {
                memory_kib: m,
                passes: t,
                lanes: p,
            };
            (kdf, HEADER_LEN)
        }
        _ => return None,
    };
    Some((
        b[8..24].try_into().unwrap(),
        kdf,
        b[header_len - 16..header_len].try_into().unwrap(),
        b.len() - header_len,
    ))
}

fn differential(label: &str, data: &[u8]) {
    let r = Header::parse(data);
    outcome(label, &r);
    let got = r
        .as_ref()
        .ok()
        .map(|(h, sealed)| (h.vault_id, h.kdf, h.salt, sealed.len()));
    let want = reference(data);
    assert_eq!(got, want, "Header::parse disagrees with the format");
    match r {
        Err(e) => {
            let i = export::import(data, PASS).expect_err("import of a malformed export");
            assert_ne!(e.kind(), ErrorKind::Key, "a structural error: {e}");
            assert_eq!(i.to_string(), e.to_string());
        }
        Ok((h, _)) => assert_eq!(h.size(), data.len() - got.expect("parsed").3),
    }
}

fn seeds() -> Vec<Vec<u8>> {
    let mut keystore = b"BVKS\x01\x00\x00\x00".to_vec();
    keystore.extend_from_slice(&VAULT_ID);
    keystore.extend_from_slice(&[0x11; 66]);
    let good = export::export(&keystore, &VAULT_ID, PASS).expect("export of the seed");
    let (id, back) = export::import(&good, PASS).expect("import of the seed");
    assert_eq!((id, &back[..]), (VAULT_ID, &keystore[..]));
    // A version 1 header of the same file, for the fuzzer to start from.
    let mut v1 = b"BVKE\x01\x00\x00\x00".to_vec();
    v1.extend_from_slice(&VAULT_ID);
    v1.extend_from_slice(&600_000u32.to_le_bytes());
    v1.extend_from_slice(&good[HEADER_LEN - 16..]);
    vec![good, v1]
}

fuzz_target!(
    init: { write_seeds(seeds) },
    |data: &[u8]| {
        // 1. Raw.
        differential("parse(raw)", data);

        // 2. Prologue and costs fixed up, for the version the input's bit 0 of byte 4 picks.
        if data.len() >= 36 {
            let mut b = data.to_vec();
            let v2 = data[4] & 1 == 0;
            b[..8].copy_from_slice(if v2 { b"BVKE\x02\x00\x00\x00" } else { b"BVKE\x01\x00\x00\x00" });
            let pick = |at: usize, lo: u32, hi: u32| lo + u32_at(data, at) % (hi - lo + 1);
            if v2 {
                let t = pick(28, MIN_PASSES, MAX_PASSES);
                let most = (MAX_WORK / t as u64).min(MAX_MEMORY_KIB as u64) as u32;
                b[24..28].copy_from_slice(&pick(24, MIN_MEMORY_KIB, most).to_le_bytes());
                b[28..32].copy_from_slice(&t.to_le_bytes());
                b[32..36].copy_from_slice(&pick(32, 1, MAX_LANES).to_le_bytes());
            } else {
                b[24..28].copy_from_slice(&pick(24, MIN_ITERATIONS, MAX_ITERATIONS).to_le_bytes());
            }
            differential("parse(prologue fixed)", &b);
        }

        // 3. What export accepts, short of deriving a key.
        let is_keystore = data.len() >= 24 && &data[..4] == b"BVKS" && data[8..24] == VAULT_ID;
        if !is_keystore {
            let e = export::export(data, &VAULT_ID, PASS).expect_err("export of a non-keystore");
            assert_eq!(e.kind(), ErrorKind::Key);
        } else {
            let e = export::export(data, &VAULT_ID, b"too short").expect_err("a short passphrase");
            assert_eq!(e.kind(), ErrorKind::Usage);
        }
    }
);
