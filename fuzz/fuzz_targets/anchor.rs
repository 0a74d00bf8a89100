//! `anchor`: the recovery anchor (`vault::anchor`, "BVRA"), the auth key wrapped to the
//! recovery key, read by `key recover --take-over` from storage nobody vouches for yet.
//!
//! The first input byte picks a mode (the rest of the input is `rest`):
//! - 0: `rest` as the anchor: `open` with the wrong private key, with none, and with the right
//!   one and a wrong fingerprint must not panic; with the right key and no fingerprint, an
//!   anchor that opens has the fingerprint of the key it gives;
//! - 1: the same with "BVRA" | 1 | 0 | the fixed vault id spliced in front;
//! - 2: a real anchor (auth key and version from `rest`) with `rest` XORed over its bytes
//!   after the prologue: whatever changed, `open` does not panic, and gives the same auth key
//!   or an error (the wrap is authenticated);
//! - 3: round trip: `encode` then `open` with the right key and fingerprint gives the auth key
//!   and version back; with the wrong key, another vault id or another fingerprint, an error.
#![no_main]

use blockvault::crypto::Secret32;
use blockvault::vault::anchor;
use blockvault_fuzz::{
    outcome, recovery_keys, write_seeds, xor_after, RecoveryKeys, Unstructured, OTHER_ID, VAULT_ID,
};
use libfuzzer_sys::fuzz_target;

fn keys() -> &'static RecoveryKeys {
    recovery_keys("anchor")
}

fn prologue() -> Vec<u8> {
    let mut h = b"BVRA".to_vec();
    h.extend_from_slice(&1u16.to_le_bytes());
    h.extend_from_slice(&0u16.to_le_bytes());
    h.extend_from_slice(&VAULT_ID);
    h
}

fn exercise(b: &[u8]) {
    let k = keys();
    let r = anchor::open(b, &VAULT_ID, Some(k.wrong.clone()), None);
    outcome("open(wrong key)", &r);
    assert!(r.is_err(), "an anchor opened with the wrong private key");
    let _ = anchor::open(b, &VAULT_ID, None, None);
    let _ = anchor::open(b, &VAULT_ID, Some(k.private.clone()), Some("0000-0000"));
    if let Ok(o) = anchor::open(b, &VAULT_ID, Some(k.private.clone()), None) {
        assert_eq!(o.fingerprint, anchor::fingerprint(&o.auth));
    }
}

fn seeds() -> Vec<Vec<u8>> {
    let a = anchor::encode(&VAULT_ID, 3, &Secret32::from_bytes([7; 32]), &keys().key).unwrap();
    vec![
        [&[0u8][..], &a].concat(),
        [&[1u8][..], &a[24..]].concat(),
        [2u8, 0, 0, 0, 0, 1].to_vec(),
        [3u8; 40].to_vec(),
    ]
}

fuzz_target!(
    init: { write_seeds(seeds) },
    |data: &[u8]| {
        let Some((&sel, rest)) = data.split_first() else { return };
        match sel & 3 {
            0 => exercise(rest),
            1 => exercise(&[prologue().as_slice(), rest].concat()),
            2 => {
                let mut u = Unstructured::new(rest);
                let (Ok(version), Ok(auth)) = (u.arbitrary::<u32>(), u.arbitrary::<[u8; 32]>()) else {
                    return;
                };
                let k = keys();
                let mut a = anchor::encode(&VAULT_ID, version, &Secret32::from_bytes(auth), &k.key)
                    .expect("encode");
                xor_after(&mut a, 8, u.take_rest());
                let _ = anchor::open(&a, &VAULT_ID, Some(k.wrong.clone()), None);
                if let Ok(o) = anchor::open(&a, &VAULT_ID, Some(k.private.clone()), None) {
                    assert_eq!(o.auth.expose(), &auth, "a changed anchor gave another auth key");
                }
            }
            _ => {
                let mut u = Unstructured::new(rest);
                let (Ok(version), Ok(auth)) = (u.arbitrary::<u32>(), u.arbitrary::<[u8; 32]>()) else {
                    return;
                };
                let k = keys();
                let auth = Secret32::from_bytes(auth);
                let a = anchor::encode(&VAULT_ID, version, &auth, &k.key).expect("encode");
                let fp = anchor::fingerprint(&auth);
                let o = anchor::open(&a, &VAULT_ID, Some(k.private.clone()), Some(&fp))
                    .expect("an encoded anchor opens");
                assert_eq!(o.auth.expose(), auth.expose());
                assert_eq!(o.auth_version, version);
                assert_eq!(o.fingerprint, fp);
                assert!(anchor::open(&a, &VAULT_ID, Some(k.wrong.clone()), Some(&fp)).is_err());
                assert!(anchor::open(&a, &OTHER_ID, Some(k.private.clone()), Some(&fp)).is_err());
                let other = anchor::fingerprint(&Secret32::from_bytes([0x5c; 32]));
                if other != fp {
                    assert!(anchor::open(&a, &VAULT_ID, Some(k.private.clone()), Some(&other)).is_err());
                }
            }
        }
    }
);
