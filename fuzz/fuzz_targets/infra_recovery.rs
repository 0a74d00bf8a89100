//! `infra_recovery`: the infrastructure key's recovery record (`vault::infra_recovery`,
//! "BVIR", formats 1 and 2), read by `key recover` (and by a key rotation, for its holder).
//!
//! The first input byte picks a mode (the rest of the input is `rest`):
//! - 0: `rest` as the record: `holder` must not panic and agree with `open` on the key
//!   version; `open` with the wrong private key fails, with none or the right one it does not
//!   panic;
//! - 1: the same with "BVIR" | 1 or 2 (by the next byte) | 0 spliced in front;
//! - 2: a real record (format 2, key version and key from `rest`) with the rest of `rest`
//!   XORed over its bytes after the prologue: `open` does not panic, and gives the same key
//!   and version or an error (the wraps are authenticated);
//! - 3: round trip: `encode` then `holder` names the version and recovery key, `open` with the
//!   right key gives the key back; with the wrong key or another vault id, an error.
#![no_main]

use blockvault::vault::infra_recovery;
use blockvault::vault::store::xts::InfraKey;
use blockvault_fuzz::{
    outcome, recovery_keys, write_seeds, xor_after, RecoveryKeys, Unstructured, OTHER_ID, VAULT_ID,
};
use libfuzzer_sys::fuzz_target;

fn keys() -> &'static RecoveryKeys {
    recovery_keys("infra_recovery")
}

fn exercise(b: &[u8]) {
    let k = keys();
    let held = infra_recovery::holder(b);
    outcome("holder", &held);
    assert!(
        infra_recovery::open(b, &VAULT_ID, Some(k.wrong.clone())).is_err(),
        "a record opened with the wrong private key"
    );
    let _ = infra_recovery::open(b, &VAULT_ID, None);
    if let Ok((version, _)) = infra_recovery::open(b, &VAULT_ID, Some(k.private.clone())) {
        let (v, holder) = held.expect("a record that opens parses");
        assert_eq!(v, version);
        assert_eq!(holder.id(), k.key.id());
    }
}

/// A record of a key built from `u` (`None`: not enough input or equal halves).
fn record(u: &mut Unstructured) -> Option<(u32, [u8; 64], Vec<u8>)> {
    let version: u32 = u.arbitrary().ok()?;
    let bytes: [u8; 64] = u.arbitrary().ok()?;
    let key = InfraKey::from_bytes(bytes).ok()?;
    let b = infra_recovery::encode(&VAULT_ID, version, &keys().key, &key).expect("encode");
    Some((version, bytes, b))
}

fn seeds() -> Vec<Vec<u8>> {
    let key = InfraKey::from_bytes(std::array::from_fn(|i| i as u8)).unwrap();
    let r = infra_recovery::encode(&VAULT_ID, 2, &keys().key, &key).unwrap();
    vec![
        [&[0u8][..], &r].concat(),
        [&[1u8, 2][..], &r[8..]].concat(),
        [2u8; 80].to_vec(),
        [3u8; 80].to_vec(),
    ]
}

fuzz_target!(
    init: { write_seeds(seeds) },
    |data: &[u8]| {
        let Some((&sel, rest)) = data.split_first() else { return };
        match sel & 3 {
            0 => exercise(rest),
            1 => {
                let Some((&v, rest)) = rest.split_first() else { return };
                let mut b = b"BVIR".to_vec();
                b.extend_from_slice(&(1 + u16::from(v & 1)).to_le_bytes());
                b.extend_from_slice(&0u16.to_le_bytes());
                b.extend_from_slice(rest);
                exercise(&b);
            }
            2 => {
                let mut u = Unstructured::new(rest);
                let Some((version, bytes, mut b)) = record(&mut u) else { return };
                xor_after(&mut b, 8, u.take_rest());
                let _ = infra_recovery::holder(&b);
                if let Ok((v, key)) = infra_recovery::open(&b, &VAULT_ID, Some(keys().private.clone())) {
                    assert_eq!((v, key.expose()), (version, &bytes), "a changed record gave another key");
                }
            }
            _ => {
                let Some((version, bytes, b)) = record(&mut Unstructured::new(rest)) else { return };
                let k = keys();
                let (v, holder) = infra_recovery::holder(&b).expect("an encoded record parses");
                assert_eq!(v, version);
                assert_eq!(holder.id(), k.key.id());
                let (v, key) = infra_recovery::open(&b, &VAULT_ID, Some(k.private.clone()))
                    .expect("an encoded record opens");
                assert_eq!((v, key.expose()), (version, &bytes));
                assert!(infra_recovery::open(&b, &VAULT_ID, Some(k.wrong.clone())).is_err());
                assert!(infra_recovery::open(&b, &OTHER_ID, Some(k.private.clone())).is_err());
            }
        }
    }
);
