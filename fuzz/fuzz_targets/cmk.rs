//! `cmk`: the parsers of customer-managed RSA keys (`crypto::rsa`).
//!
//! The first input byte picks what the rest (`rest`) is fed to:
//! - 0: `CmkKey::decode` (the descriptor the vault stores); a descriptor that decodes
//!   re-encodes to exactly its bytes;
//! - 1: the same with the fixed prologue "BVCK" | 1 | 0 spliced in front;
//! - 2: `Pkcs11Uri::parse` on `rest` (UTF-8, at most 1 KiB) after "pkcs11:"; a URI that parses prints
//!   (canonical form) to a URI that parses to the same value;
//! - 3: `wrap::split` of `rest` for moduli of 384 and 512 bytes: lengths add up;
//! - 4: `private_key_from_pem` on `rest` as text (a `--cmk-private` file: PKCS#8, PKCS#1,
//!   legacy-encrypted PKCS#1 refused);
//! - 5: `rest` as the DER of a PKCS#1 `RSAPrivateKey` in an `RSA PRIVATE KEY` PEM: a key that
//!   parses gives, as PKCS#8 (`PRIVATE KEY`), a key with the same public half.
//!
//! Seeds are descriptors of a fixed 3072-bit public key (modulus all ones, exponent 65537: a
//! valid RSA public key as far as any parser can tell, with no key generation at start-up),
//! and, for modes 4 and 5, one RSA-3072 private key generated when the seeds are written.
#![no_main]

use blockvault::crypto::kek::KekKind;
use blockvault::crypto::rsa::wrap::{split, SEALED_LEN};
use blockvault::crypto::rsa::{private_key_from_pem, CmkKey, OaepHash, Pkcs11Uri};
use blockvault_fuzz::{outcome, strict, write_seeds};
use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rsa::{KeySize, PrivateDecryptingKey};
use base64ct::Encoding;
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
    let pkcs8 = PrivateDecryptingKey::generate(KeySize::Rsa3072)
        .and_then(|k| k.as_der())
        .expect("seed private key");
    let pkcs8 = pkcs8.as_ref();
    // aws-lc's PKCS#8 of an RSA key: a 26-byte prologue (SEQUENCE, version 0, rsaEncryption
    // with NULL, OCTET STRING header of two length bytes), then the PKCS#1 RSAPrivateKey.
    assert_eq!(&pkcs8[22..24], &[0x04, 0x82], "PKCS#8 layout of the seed key");
    let pkcs1 = &pkcs8[26..];
    out.push([&[4u8][..], pem("RSA PRIVATE KEY", pkcs1).as_bytes()].concat());
    out.push([&[4u8][..], pem("PRIVATE KEY", pkcs8).as_bytes()].concat());
    let legacy = pem("RSA PRIVATE KEY", pkcs1).replacen(
        "KEY-----\n",
        "KEY-----\nProc-Type: 4,ENCRYPTED\nDEK-Info: AES-256-CBC,00112233445566778899AABBCCDDEEFF\n\n",
        1,
    );
    out.push([&[4u8][..], legacy.as_bytes()].concat());
    out.push([&[5u8][..], pkcs1].concat());
    out
}

/// `der` as PEM text with `label`, 64 base64 characters a line.
fn pem(label: &str, der: &[u8]) -> String {
    let b64 = base64ct::Base64::encode_string(der);
    let mut text = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        text += std::str::from_utf8(line).expect("base64 is ASCII");
        text.push('\n');
    }
    text + &format!("-----END {label}-----\n")
}

/// The public half of a private key, as SPKI DER.
fn public_der(key: &PrivateDecryptingKey) -> Vec<u8> {
    key.public_key().as_der().expect("public key DER").as_ref().to_vec()
}

fn private_keys(mode: u8, rest: &[u8]) {
    if mode == 4 {
        let Ok(text) = std::str::from_utf8(rest) else { return };
        outcome("private key", &private_key_from_pem(text, "fuzz.pem", None));
        return;
    }
    let r = private_key_from_pem(&pem("RSA PRIVATE KEY", rest), "fuzz.pem", None);
    outcome("pkcs1", &r);
    if let Ok(key) = r {
        let pkcs8 = key.as_der().expect("PKCS#8 of a parsed key");
        let again = private_key_from_pem(&pem("PRIVATE KEY", pkcs8.as_ref()), "fuzz.pem", None)
            .expect("the PKCS#8 form of a parsed PKCS#1 key parses");
        assert_eq!(public_der(&again), public_der(&key), "PKCS#1 and PKCS#8 disagree");
    }
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
        match mode % 6 {
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
            m @ (4 | 5) => private_keys(m, rest),
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
