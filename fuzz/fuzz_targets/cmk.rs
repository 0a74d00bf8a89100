//! `cmk`: the parsers of customer-managed RSA keys (`crypto::rsa`).
//!
//! The first input byte picks what the rest (`rest`) is fed to:
//! - 0: `CmkKey::decode` (the descriptor the vault stores); a descriptor that decodes
//!   re-encodes to exactly its bytes;
//! - 1: the same with the fixed prologue "BVCK" | 1 | 0 spliced in front;
//! - 2: `Pkcs11Uri::parse` on `rest` (UTF-8, at most 1 KiB) after "pkcs11:"; a URI that parses prints
//!   (canonical form) to a URI that parses to the same value;
//! - 3: `wrap::split` of `rest` for moduli of 384 and 512 bytes: lengths add up.
//!
//! Seeds are descriptors of a fixed 3072-bit public key (modulus all ones, exponent 65537: a
//! valid RSA public key as far as any parser can tell, with no key generation at start-up).
#![no_main]

use blockvault::crypto::kek::KekKind;
use blockvault::crypto::rsa::wrap::{split, SEALED_LEN};
use blockvault::crypto::rsa::{CmkKey, OaepHash, Pkcs11Uri};
use blockvault_fuzz::{outcome, strict, write_seeds};
use libfuzzer_sys::fuzz_target;

fn seeds() -> Vec<Vec<u8>> {
    let n = [0xffu8; 384];
    let e = [0x01, 0x00, 0x01];
    let mut out = Vec::new();
    for (kind, oaep, source) in [
        (
            KekKind::CustomerRsa,
            OaepHash::Sha256,
            "/etc/blockvault/cmk.pub",
        ),
        (
            KekKind::CustomerPkcs11,
            OaepHash::Sha1,
            "pkcs11:token=bv;object=cmk;id=%01",
        ),
        (KekKind::Recovery, OaepHash::Sha256, "recovery.pem"),
    ] {
        let key = CmkKey::from_components(kind, 1, oaep, &n, &e, source).expect("seed key");
        let mut seed = vec![0u8];
        seed.extend_from_slice(&key.encode());
        out.push(seed);
    }
    out.push(b"\x02token=bv;object=cmk;id=%01?module-path=/usr/lib/x.so&pin-source=/p".to_vec());
    out
}

fn descriptor(b: &[u8]) {
    let r = CmkKey::decode(b, "fuzz cmk");
    outcome("decode", &r);
    if let Ok(key) = r {
        assert_eq!(key.encode(), b, "decoded descriptor re-encodes differently");
    }
}

fuzz_target!(
    init: { write_seeds(seeds) },
    |data: &[u8]| {
        let Some((&mode, rest)) = data.split_first() else { return };
        match mode % 4 {
            0 => descriptor(rest),
            1 => descriptor(&[&b"BVCK\x01\x00\x00\x00"[..], rest].concat()),
            2 => {
                // Percent-encoding can triple a URI, and parse refuses URIs over 4096 bytes:
                // keep inputs whose canonical form stays parseable.
                let Ok(s) = std::str::from_utf8(rest) else { return };
                if s.len() > 1024 {
                    return;
                }
                let r = Pkcs11Uri::parse(&format!("pkcs11:{s}"));
                outcome("uri", &r);
                if let Ok(uri) = r {
                    let again = Pkcs11Uri::parse(&uri.to_string()).expect("canonical URI parses");
                    assert_eq!(again, uri, "canonical URI parses to another value");
                    if strict() {
                        assert_eq!(again.to_string(), uri.to_string());
                    }
                }
            }
            _ => {
                for modulus in [384, 512] {
                    if let Ok(p) = split(rest, modulus, "fuzz wrap") {
                        assert_eq!(p.rsa.len(), modulus);
                        assert_eq!(p.sealed.len(), SEALED_LEN);
                        assert_eq!(rest.len(), 2 + modulus + SEALED_LEN);
                    }
                }
            }
        }
    }
);
