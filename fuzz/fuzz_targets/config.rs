//! `config`: the vault's config object (`vault::config::Config`), format 2 (naming its auth
//! key version) and format 1 (which still decodes, for `upgrade`).
//!
//! Each input is used three ways:
//! 1. as the raw object: `decode_unverified` and `verify` (fixed auth key) must not panic; a
//!    decoded config re-encodes (always in format 2) to bytes that decode to it again;
//! 2. with its MAC fixed up (the body, 40 bytes in format 2 or 36 in format 1 as its version
//!    field says, + keyed BLAKE3): `verify` must accept it, and a decoded format 2 config must
//!    re-encode to the same bytes when the reserved fields are zero;
//! 3. as a `Config` built from the bytes: `decode_unverified(encode(c)) == c`, `verify` accepts
//!    it with the right key and refuses it with another.
#![no_main]

use blockvault::crypto::kek::KekKind;
use blockvault::crypto::Secret32;
use blockvault::vault::config::{Config, FORMAT_VERSION};
use blockvault::ErrorKind;
use blockvault_fuzz::{auth, outcome, write_seeds, Unstructured, AUTH_KEY, VAULT_ID};
use libfuzzer_sys::fuzz_target;

const BODY_LEN: usize = 40;
const V1_BODY_LEN: usize = 36;

fn seeds() -> Vec<Vec<u8>> {
    let c = Config {
        format_version: FORMAT_VERSION,
        auth_version: 3,
        vault_id: VAULT_ID,
        created: 1_700_000_000,
        kek_kind: KekKind::Platform,
        infrastructure: 1,
    };
    let good = c.encode(&auth());
    let mut newer = good.clone();
    newer[4] = 3;
    // Format 1: the same without the auth key version.
    let mut v1 = good[..V1_BODY_LEN].to_vec();
    v1[4] = 1;
    v1.extend_from_slice(blake3::keyed_hash(&AUTH_KEY, &v1).as_bytes());
    vec![good, newer, v1]
}

fuzz_target!(
    init: { write_seeds(seeds) },
    |data: &[u8]| {
        let auth = auth();

        // 1. Raw bytes as read from the store.
        let decoded = Config::decode_unverified(data);
        let _ = Config::verify(data, &auth);
        if let Ok(c) = &decoded {
            let again = c.encode(&auth);
            let back = Config::decode_unverified(&again).expect("re-encoded config decodes");
            assert_eq!(back, Config { format_version: FORMAT_VERSION, ..c.clone() });
            Config::verify(&again, &auth).expect("re-encoded config verifies");
        }

        // 2. MAC fixed up, so the body is what decides.
        let body_len = if data.get(4..6) == Some(&[1, 0][..]) { V1_BODY_LEN } else { BODY_LEN };
        if data.len() >= body_len {
            let mut b = data[..body_len].to_vec();
            let mac = blake3::keyed_hash(&AUTH_KEY, &b);
            b.extend_from_slice(mac.as_bytes());
            Config::verify(&b, &auth).expect("a config with a correct MAC verifies");
            let r = Config::decode_unverified(&b);
            outcome("decode(mac fixed)", &r);
            if let Ok(c) = r {
                assert!(c.auth_version == 1 || c.format_version == 2);
                if c.format_version == 2 && b[6..8] == [0, 0] && b[34..36] == [0, 0] {
                    assert_eq!(c.encode(&auth), b, "decoded config re-encodes differently");
                }
            }
        }

        // 3. Round trip of a config built from the input.
        let mut u = Unstructured::new(data);
        let (Ok(vault_id), Ok(created), Ok(infrastructure), Ok(auth_version)) = (
            u.arbitrary::<[u8; 16]>(),
            u.arbitrary::<u64>(),
            u.arbitrary::<u8>(),
            u.arbitrary::<u32>(),
        ) else {
            return;
        };
        let c = Config {
            format_version: FORMAT_VERSION,
            auth_version,
            vault_id,
            created,
            kek_kind: KekKind::Platform,
            infrastructure,
        };
        let b = c.encode(&auth);
        Config::verify(&b, &auth).expect("encoded config verifies");
        assert!(Config::verify(&b, &Secret32::from_bytes([0x01; 32])).is_err());
        match Config::decode_unverified(&b) {
            Ok(d) => assert_eq!(d, c),
            Err(e) => assert!(
                infrastructure > 1 && e.kind() == ErrorKind::Unsupported,
                "encoded config does not decode: {e}"
            ),
        }
    }
);
