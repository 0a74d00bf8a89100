//! `keystore`: the platform keystore file decoder (`crypto::keystore::VaultKeys::decode`,
//! what `Keystore::load` runs on a key file's bytes), formats 1 to 3.
//!
//! The first input byte picks a mode (the rest of the input is `rest`):
//! Modes 0-2 are differential: `decode` must succeed exactly when an independent parse of the
//! documented format (docs/FORMAT.md §3.6) does, with the same keys.
//! - 0: `rest` is the whole file;
//! - 1: `rest` plus its BLAKE3 checksum, so the fuzzer is past the checksum;
//! - 2: "BVKS" | version (1 to 3, from the first byte of `rest`) | 0 | the fixed vault id,
//!   then the rest of `rest`, then the checksum: the entry tables and their rules are fuzzed;
//! - 3: keys built from `rest`, `encode` then `decode`: the same keys come back.
#![no_main]

use std::collections::BTreeSet;

use blockvault::crypto::kek::{KekState, PlatformKek, PlatformKeyVersion};
use blockvault::crypto::keystore::{KeyClass, VaultKeys, Versioned};
use blockvault::crypto::Secret32;
use blockvault::vault::store::xts::InfraKey;
use blockvault_fuzz::{arbitrary, outcome, write_seeds, Unstructured, VAULT_ID};
use libfuzzer_sys::fuzz_target;

fn with_sum(body: &[u8]) -> Vec<u8> {
    let mut b = body.to_vec();
    b.extend_from_slice(blake3::hash(body).as_bytes());
    b
}

fn header(version: u16) -> Vec<u8> {
    let mut h = b"BVKS".to_vec();
    h.extend_from_slice(&version.to_le_bytes());
    h.extend_from_slice(&0u16.to_le_bytes());
    h.extend_from_slice(&VAULT_ID);
    h
}

/// Distinct non-zero versions drawn from `u`, at most `max`.
fn versions(u: &mut Unstructured, max: u8) -> arbitrary::Result<Vec<u32>> {
    let n = u.int_in_range(0..=max)?;
    let mut out = Vec::new();
    for _ in 0..n {
        let v: u32 = u.arbitrary()?;
        if v != 0 && !out.contains(&v) {
            out.push(v);
        }
    }
    Ok(out)
}

fn keys_from(u: &mut Unstructured) -> arbitrary::Result<VaultKeys> {
    let mut auth = Vec::new();
    for version in versions(u, 3)? {
        auth.push(Versioned {
            version,
            created: u.arbitrary()?,
            key: Secret32::from_bytes(u.arbitrary()?),
        });
    }
    if auth.is_empty() {
        auth.push(Versioned {
            version: 1,
            created: 0,
            key: Secret32::from_bytes(u.arbitrary()?),
        });
    }
    let mut kek = Vec::new();
    for version in versions(u, 6)? {
        kek.push(PlatformKeyVersion {
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
    let mut infra = Vec::new();
    for version in versions(u, 3)? {
        // Keys with equal halves are refused by `InfraKey`: left out.
        if let Ok(key) = InfraKey::from_bytes(u.arbitrary()?) {
            infra.push(Versioned {
                version,
                created: u.arbitrary()?,
                key,
            });
        }
    }
    let mut destroyed = BTreeSet::new();
    for (class, present) in [
        (KeyClass::Auth, auth.iter().map(|a| a.version).collect::<Vec<_>>()),
        (KeyClass::Kek, kek.iter().map(|k| k.version).collect()),
        (KeyClass::Infra, infra.iter().map(|i| i.version).collect()),
    ] {
        for v in versions(u, 3)? {
            if !present.contains(&v) {
                destroyed.insert((class, v));
            }
        }
    }
    Ok(VaultKeys {
        auth,
        kek: PlatformKek::new(kek),
        infra,
        destroyed,
    })
}

/// What a key file holds, as plain values: auth (version, created, key), KEK (version,
/// state, created, key), infra (version, created, key), destroyed (class, version).
type Plain = (
    Vec<(u32, u64, [u8; 32])>,
    Vec<(u32, KekState, u64, [u8; 32])>,
    Vec<(u32, u64, [u8; 64])>,
    BTreeSet<(u8, u32)>,
);

fn plain(k: &VaultKeys) -> Plain {
    (
        k.auth
            .iter()
            .map(|a| (a.version, a.created, *a.key.expose()))
            .collect(),
        k.kek
            .versions()
            .iter()
            .map(|v| (v.version, v.state, v.created, *v.key.expose()))
            .collect(),
        k.infra
            .iter()
            .map(|i| (i.version, i.created, *i.key.expose()))
            .collect(),
        k.destroyed.iter().map(|(c, v)| (*c as u8, *v)).collect(),
    )
}

/// Bounded little-endian reads for the reference parser.
struct R<'a>(&'a [u8]);

impl<'a> R<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes(self.take(2)?.try_into().unwrap()))
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    fn kek(&mut self) -> Option<(u32, KekState, u64, [u8; 32])> {
        let version = self.u32()?;
        let state = match self.take(4)? {
            [1, 0, 0, 0] => KekState::Enabled,
            [2, 0, 0, 0] => KekState::Revoked,
            _ => return None,
        };
        Some((version, state, self.u64()?, self.take(32)?.try_into().unwrap()))
    }
}

fn halves_differ(k: &[u8]) -> bool {
    k[..32] != k[32..]
}

/// The key file format, parsed independently (docs/FORMAT.md §3.6):
/// "BVKS" | u16 version 1..=3 | u16 0 | vault id [16] | body | BLAKE3 of the rest.
/// - version 3 body: u16 n × auth (u32 version | u64 created | key [32]) | u16 n × KEK (u32
///   version | u8 state 1|2 | [3] 0 | u64 created | key [32]) | u16 n × infra (u32 version |
///   u64 created | key [64], halves differ) | u16 n × destroyed (u8 class 1|2|3 | u32 version),
///   no destroyed entry twice;
/// - versions 1, 2: auth [32] (version 1) | u16 n × KEK | version 2: u8 0|1 | [3] 0 | infra
///   key [64] (zeros when 0; halves differ when 1: infrastructure version 1);
///
/// then, in every version: at least one auth key, versions non-zero and distinct within a
/// class, none both present and destroyed.
fn reference(b: &[u8]) -> Option<Plain> {
    let (body, sum) = b.split_at(b.len().checked_sub(32)?);
    if body.len() < 24 || &body[..4] != b"BVKS" || blake3::hash(body).as_bytes() != sum {
        return None;
    }
    let version = u16::from_le_bytes([body[4], body[5]]);
    if !(1..=3).contains(&version) || body[6..8] != [0, 0] || body[8..24] != VAULT_ID {
        return None;
    }
    let mut r = R(&body[24..]);
    let mut auth = Vec::new();
    let mut kek = Vec::new();
    let mut infra = Vec::new();
    let mut destroyed = BTreeSet::new();
    if version == 3 {
        for _ in 0..r.u16()? {
            auth.push((r.u32()?, r.u64()?, r.take(32)?.try_into().unwrap()));
        }
        for _ in 0..r.u16()? {
            kek.push(r.kek()?);
        }
        for _ in 0..r.u16()? {
            let (version, created, key) = (r.u32()?, r.u64()?, r.take(64)?);
            if !halves_differ(key) {
                return None;
            }
            infra.push((version, created, key.try_into().unwrap()));
        }
        for _ in 0..r.u16()? {
            let class = r.take(1)?[0];
            if !(1..=3).contains(&class) || !destroyed.insert((class, r.u32()?)) {
                return None;
            }
        }
    } else {
        auth.push((1, 0, r.take(32)?.try_into().unwrap()));
        for _ in 0..r.u16()? {
            kek.push(r.kek()?);
        }
        if version == 2 {
            let flag = r.take(4)?;
            let key = r.take(64)?;
            match flag {
                [0, 0, 0, 0] if key.iter().all(|&x| x == 0) => {}
                [1, 0, 0, 0] if halves_differ(key) => infra.push((1, 0, key.try_into().unwrap())),
                _ => return None,
            }
        }
    }
    if !r.0.is_empty() || auth.is_empty() {
        return None;
    }
    let classes: [(u8, Vec<u32>); 3] = [
        (2, auth.iter().map(|a| a.0).collect()),
        (1, kek.iter().map(|k| k.0).collect()),
        (3, infra.iter().map(|i| i.0).collect()),
    ];
    for (class, versions) in classes {
        let mut seen = BTreeSet::new();
        for v in versions {
            if v == 0 || !seen.insert(v) || destroyed.contains(&(class, v)) {
                return None;
            }
        }
    }
    Some((auth, kek, infra, destroyed))
}

/// Decode `file` and check the result against [`reference`].
fn differential(label: &str, file: &[u8]) {
    let r = VaultKeys::decode(file, &VAULT_ID);
    outcome(label, &r);
    let got = r.ok().map(|k| plain(&k));
    assert!(
        got == reference(file),
        "VaultKeys::decode disagrees with the format"
    );
}

fn seeds() -> Vec<Vec<u8>> {
    let keys = VaultKeys {
        auth: vec![
            Versioned {
                version: 1,
                created: 4,
                key: Secret32::from_bytes([1; 32]),
            },
            Versioned {
                version: 2,
                created: 7,
                key: Secret32::from_bytes([9; 32]),
            },
        ],
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
        infra: vec![Versioned {
            version: 2,
            created: 8,
            key: InfraKey::from_bytes(std::array::from_fn(|i| i as u8)).unwrap(),
        }],
        destroyed: [(KeyClass::Infra, 1), (KeyClass::Kek, 3)].into_iter().collect(),
    };
    let file = keys.encode(&VAULT_ID).to_vec();
    let body = &file[..file.len() - 32];
    // A version 2 file: auth, one KEK version, an infrastructure key.
    let mut v2 = header(2);
    v2.extend_from_slice(&[1; 32]);
    v2.extend_from_slice(&1u16.to_le_bytes());
    v2.extend_from_slice(&7u32.to_le_bytes());
    v2.extend_from_slice(&[1, 0, 0, 0]);
    v2.extend_from_slice(&5u64.to_le_bytes());
    v2.extend_from_slice(&[2; 32]);
    v2.extend_from_slice(&[1, 0, 0, 0]);
    v2.extend((0..64u8).map(|i| i.wrapping_mul(3)));
    vec![
        [&[0u8][..], &file].concat(),
        [&[1u8][..], body].concat(),
        [&[2u8, 2][..], &body[24..]].concat(),
        [&[0u8][..], &with_sum(&v2)].concat(),
        [&[2u8, 1][..], &v2[24..]].concat(),
    ]
}

fuzz_target!(
    init: { write_seeds(seeds) },
    |data: &[u8]| {
        let Some((&sel, rest)) = data.split_first() else { return };
        match sel & 3 {
            0 => differential("decode(raw)", rest),
            1 => differential("decode(sum fixed)", &with_sum(rest)),
            2 => {
                let Some((&v, rest)) = rest.split_first() else { return };
                let version = u16::from(v % 3 + 1);
                differential(
                    "decode(header+sum fixed)",
                    &with_sum(&[header(version).as_slice(), rest].concat()),
                )
            }
            _ => {
                let Ok(keys) = keys_from(&mut Unstructured::new(rest)) else { return };
                let back = VaultKeys::decode(&keys.encode(&VAULT_ID), &VAULT_ID)
                    .expect("encoded keys decode");
                assert!(plain(&back) == plain(&keys), "keys changed in a round trip");
            }
        }
    }
);
