//! `keystore`: the platform keystore file decoder (`crypto::keystore`).
//!
//! The decoder is private, so this goes through `Keystore::load` on a key file written with the
//! input, in a folder of this process (`$BLOCKVAULT_FUZZ_TMP` if set, else the system temp
//! folder; /dev/shm when there is one, so `save`'s fsyncs cost nothing). A
//! `pub fn decode(bytes, vault_id)` in `crypto::keystore` would make this target ~10x faster.
//!
//! The first input byte picks a mode (the rest of the input is `rest`):
//! Modes 0-2 are differential: `load` must succeed exactly when an independent parse of the
//! documented format does, with the same keys.
//! - 0: `rest` is the whole file;
//! - 1: `rest` plus its BLAKE3 checksum, so the fuzzer is past the checksum;
//! - 2: "BVKS" | version 1 | 0 | the fixed vault id, then `rest`, then the checksum: the
//!   entry table and its length rules are what is fuzzed;
//! - 3: keys built from `rest`, `Keystore::save` then `load`: the same keys come back.
#![no_main]

use std::path::PathBuf;

use blockvault::crypto::kek::{KekState, PlatformKek, PlatformKeyVersion};
use blockvault::crypto::keystore::{Keystore, VaultKeys};
use blockvault::crypto::Secret32;
use blockvault::vault::store::xts::InfraKey;
use blockvault_fuzz::{arbitrary, outcome, write_seeds, Unstructured, VAULT_ID};
use libfuzzer_sys::fuzz_target;

fn dir() -> &'static PathBuf {
    blockvault_fuzz::scratch_dir("keystore")
}

fn keystore() -> Keystore {
    Keystore::new(dir())
}

fn load_file(bytes: &[u8]) -> blockvault::Result<VaultKeys> {
    let ks = keystore();
    std::fs::write(ks.path_for(&VAULT_ID), bytes).expect("writing the key file");
    ks.load(&VAULT_ID)
}

fn with_sum(body: &[u8]) -> Vec<u8> {
    let mut b = body.to_vec();
    b.extend_from_slice(blake3::hash(body).as_bytes());
    b
}

fn header() -> Vec<u8> {
    let mut h = b"BVKS".to_vec();
    h.extend_from_slice(&1u16.to_le_bytes());
    h.extend_from_slice(&0u16.to_le_bytes());
    h.extend_from_slice(&VAULT_ID);
    h
}

fn keys_from(u: &mut Unstructured) -> arbitrary::Result<VaultKeys> {
    let n = u.int_in_range(0..=6u8)?;
    let mut versions = Vec::new();
    for _ in 0..n {
        let version: u32 = u.arbitrary()?;
        // `save` writes duplicate versions but `load` refuses them (see fuzz/README.md):
        // only distinct versions here, so the round trip checks the rest.
        if versions
            .iter()
            .any(|v: &PlatformKeyVersion| v.version == version)
        {
            continue;
        }
        versions.push(PlatformKeyVersion {
            version,
            state: if u.arbitrary()? {
                KekState::Enabled
            } else {
                KekState::Revoked
            },
            created: u.arbitrary()?,
            key: Secret32::from_bytes(u.arbitrary()?),
        });
    }
    let infra: Option<[u8; 64]> = if u.arbitrary()? {
        Some(u.arbitrary()?)
    } else {
        None
    };
    Ok(VaultKeys {
        auth: Secret32::from_bytes(u.arbitrary()?),
        kek: PlatformKek::new(versions),
        // Keys with equal halves are refused by `InfraKey`: none then.
        infra: infra.and_then(|k| InfraKey::from_bytes(k).ok()),
    })
}

fn same(a: &VaultKeys, b: &VaultKeys) {
    assert_eq!(a.auth.expose(), b.auth.expose());
    assert_eq!(
        a.infra.as_ref().map(|k| *k.expose()),
        b.infra.as_ref().map(|k| *k.expose())
    );
    let (va, vb) = (a.kek.versions(), b.kek.versions());
    assert_eq!(va.len(), vb.len());
    for (x, y) in va.iter().zip(vb) {
        assert_eq!(x.version, y.version);
        assert_eq!(x.state, y.state);
        assert_eq!(x.created, y.created);
        assert_eq!(x.key.expose(), y.key.expose());
    }
}

type RefKeys = (
    [u8; 32],
    Vec<(u32, KekState, u64, [u8; 32])>,
    Option<[u8; 64]>,
);

/// The key file format, parsed independently (docs/FORMAT.md): "BVKS" | u16 1 or 2 | u16 0 |
/// vault id | auth [32] | u16 n | n × (u32 version | u8 state 1|2 | 3×0 | u64 created |
/// key [32]) | version 2: u8 0|1 | 3×0 | infra key [64] (zeros when 0; halves differ when 1)
/// | BLAKE3 of the rest; versions distinct.
fn reference(b: &[u8]) -> Option<RefKeys> {
    let (body, sum) = b.split_at(b.len().checked_sub(32)?);
    if body.len() < 58 || &body[..4] != b"BVKS" || blake3::hash(body).as_bytes() != sum {
        return None;
    }
    let v2 = match body[4..8] {
        [1, 0, 0, 0] => false,
        [2, 0, 0, 0] => true,
        _ => return None,
    };
    if body[8..24] != VAULT_ID {
        return None;
    }
    let auth: [u8; 32] = body[24..56].try_into().unwrap();
    let n = u16::from_le_bytes([body[56], body[57]]) as usize;
    let entries_end = 58 + n * 48;
    if body.len() != entries_end + if v2 { 68 } else { 0 } {
        return None;
    }
    let infra = match &body[entries_end..] {
        [] => None,
        [0, 0, 0, 0, rest @ ..] if rest.iter().all(|&x| x == 0) => None,
        [1, 0, 0, 0, key @ ..] if key[..32] != key[32..] => Some(key.try_into().unwrap()),
        _ => return None,
    };
    let mut versions: Vec<(u32, KekState, u64, [u8; 32])> = Vec::new();
    for e in body[58..entries_end].chunks_exact(48) {
        let version = u32::from_le_bytes(e[0..4].try_into().unwrap());
        let state = match e[4] {
            1 => KekState::Enabled,
            2 => KekState::Revoked,
            _ => return None,
        };
        if e[5..8] != [0; 3] || versions.iter().any(|v| v.0 == version) {
            return None;
        }
        let created = u64::from_le_bytes(e[8..16].try_into().unwrap());
        versions.push((version, state, created, e[16..48].try_into().unwrap()));
    }
    Some((auth, versions, infra))
}

/// Load `file` and check the result against [`reference`].
fn differential(label: &str, file: &[u8]) {
    let r = load_file(file);
    outcome(label, &r);
    let got = r.ok().map(|k| {
        let v = k.kek.versions().iter();
        let v = v.map(|v| (v.version, v.state, v.created, *v.key.expose()));
        (
            *k.auth.expose(),
            v.collect(),
            k.infra.as_ref().map(|i| *i.expose()),
        )
    });
    assert!(
        got == reference(file),
        "Keystore::load disagrees with the format"
    );
}

fn seeds() -> Vec<Vec<u8>> {
    let one = VaultKeys {
        auth: Secret32::from_bytes([1; 32]),
        kek: PlatformKek::new(vec![
            PlatformKeyVersion {
                version: 1,
                state: KekState::Revoked,
                created: 5,
                key: Secret32::from_bytes([2; 32]),
            },
            PlatformKeyVersion {
                version: 2,
                state: KekState::Enabled,
                created: 6,
                key: Secret32::from_bytes([3; 32]),
            },
        ]),
        infra: None,
    };
    let ks = keystore();
    let path = ks.save(&VAULT_ID, &one).expect("saving the seed keys");
    let file = std::fs::read(path).unwrap();
    let body = &file[..file.len() - 32];
    vec![
        [&[0u8][..], &file].concat(),
        [&[1u8][..], body].concat(),
        [&[2u8][..], &body[24..]].concat(),
    ]
}

fuzz_target!(
    init: { write_seeds(seeds) },
    |data: &[u8]| {
        let Some((&sel, rest)) = data.split_first() else { return };
        match sel & 3 {
            0 => differential("load(raw)", rest),
            1 => differential("load(sum fixed)", &with_sum(rest)),
            2 => differential(
                "load(header+sum fixed)",
                &with_sum(&[header().as_slice(), rest].concat()),
            ),
            _ => {
                let Ok(keys) = keys_from(&mut Unstructured::new(rest)) else { return };
                let ks = keystore();
                ks.save(&VAULT_ID, &keys).expect("save");
                same(&ks.load(&VAULT_ID).expect("load of saved keys"), &keys);
            }
        }
    }
);
