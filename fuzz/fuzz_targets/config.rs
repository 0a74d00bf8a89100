//! `config`: the vault's config object (`vault::config::Config`).
//!
//! Each input is used three ways:
//! 1. as the raw object: `decode_unverified` and `verify` (fixed auth key) must not panic;
//! 2. with its MAC fixed up (first 36 bytes + keyed BLAKE3): `verify` must accept it, and a
//!    decoded config must re-encode to the same bytes when the reserved fields are zero;
//! 3. as a `Config` built from the bytes: `decode_unverified(encode(c)) == c`, `verify` accepts
//!    it with the right key and refuses it with another.
#![no_main]

use blockvault::crypto::kek::KekKind;
use blockvault::crypto::Secret32;
use blockvault::vault::config::Config;
use blockvault::ErrorKind;
use blockvault_fuzz::{auth, outcome, write_seeds, Unstructured, AUTH_KEY, VAULT_ID};
use libfuzzer_sys::fuzz_target;

const BODY_LEN: usize = 36;

fn seeds() -> Vec<Vec<u8>> {
    let c = Config {
        vault_id: VAULT_ID,
        created: 1_700_000_000,
        kek_kind: KekKind::Platform,
        infrastructure: 0,
    };
    let good = c.encode(&auth());
    let mut newer = good.clone();
    newer[4] = 2;
    vec![good, newer]
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
            assert_eq!(Config::decode_unverified(&again).expect("re-encoded config decodes"), *c);
            Config::verify(&again, &auth).expect("re-encoded config verifies");
        }

        // 2. MAC fixed up, so the body is what decides.
        if data.len() >= BODY_LEN {
            let mut b = data[..BODY_LEN].to_vec();
            let mac = blake3::keyed_hash(&AUTH_KEY, &b);
            b.extend_from_slice(mac.as_bytes());
            Config::verify(&b, &auth).expect("a config with a correct MAC verifies");
            let r = Config::decode_unverified(&b);
            outcome("decode(mac fixed)", &r);
            if let Ok(c) = r {
                if b[6..8] == [0, 0] && b[34..36] == [0, 0] {
                    assert_eq!(c.encode(&auth), b, "decoded config re-encodes differently");
                }
            }
        }

        // 3. Round trip of a config built from the input.
        let mut u = Unstructured::new(data);
        let (Ok(vault_id), Ok(created), Ok(infrastructure)) =
            (u.arbitrary::<[u8; 16]>(), u.arbitrary::<u64>(), u.arbitrary::<u8>())
        else {
            return;
        };
        let c = Config {
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
                infrastructure != 0 && e.kind() == ErrorKind::Unsupported,
                "encoded config does not decode: {e}"
            ),
        }
    }
);
