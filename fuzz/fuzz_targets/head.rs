//! `head`: the vault head (`vault::head::Head`), the one MAC'd object everything else is bound
//! to.
//!
//! The first input byte picks a mode (the rest of the input is `rest`):
//! - 0: `rest` as a stored head: `peek` and `decode` (fixed auth key) must not panic;
//! - 1: `rest` as a head *body* with a correct MAC appended, so the fuzzer is past the MAC and
//!   reaches every table check: a body that decodes must re-encode to exactly `rest` (the head
//!   has one encoding), and `decode` of the re-encoding gives the same head;
//! - 2, 3: a head built from `rest` (disks, generations, snapshots, escrows, descriptors):
//!   `decode(encode(h)) == h`; a flipped byte anywhere, or another auth key, is refused.
#![no_main]

use std::collections::{BTreeMap, BTreeSet};

use blockvault::crypto::kek::{KekId, KekKind};
use blockvault::vault::head::{
    self, DescriptorEntry, DiskEntry, EscrowEntry, GenerationEntry, Head, KeyOp, KeyOperation,
    SnapshotEntry,
};
use blockvault::vault::manifest::SnapshotId;
use blockvault_fuzz::{arbitrary, auth, outcome, write_seeds, Unstructured, VAULT_ID};
use libfuzzer_sys::fuzz_target;

fn build(u: &mut Unstructured) -> arbitrary::Result<Head> {
    let kind = match u.int_in_range(1..=3u8)? {
        1 => KekKind::Platform,
        2 => KekKind::CustomerRsa,
        _ => KekKind::CustomerPkcs11,
    };
    let primary = KekId {
        kind,
        version: u.int_in_range(1..=5)?,
    };
    let infra: u32 = u.int_in_range(0..=3)?;
    let mut h = Head::new(VAULT_ID, u.int_in_range(1..=3)?, primary, infra);
    h.epoch = u.arbitrary()?;
    h.written = u.arbitrary()?;
    h.revoked = (0..u.int_in_range(0..=3u8)?)
        .map(|_| u.arbitrary::<u32>())
        .collect::<arbitrary::Result<BTreeSet<_>>>()?;
    if infra > 1 && u.arbitrary()? {
        h.infra_previous = infra - 1;
    }
    if u.arbitrary()? {
        h.key_operation = Some(KeyOperation {
            op: [KeyOp::Rotate, KeyOp::Recover, KeyOp::Destroy, KeyOp::Upgrade][u.int_in_range(0..=3usize)?],
            started: u.arbitrary()?,
            holder: u.arbitrary()?,
            pid: u.arbitrary()?,
        });
    }
    // All zeros is how the head writes "none": not a digest it can list.
    let digest = |d: Option<[u8; 32]>| d.filter(|d| *d != [0; 32]);
    h.recovery_anchor = digest(u.arbitrary()?);
    h.infra_recovery = digest(u.arbitrary()?);
    if kind != KekKind::Platform {
        h.descriptors.push(DescriptorEntry {
            id: primary,
            digest: u.arbitrary()?,
        });
    }
    if u.arbitrary()? {
        h.descriptors.push(DescriptorEntry {
            id: KekId {
                kind: KekKind::Recovery,
                version: 1,
            },
            digest: u.arbitrary()?,
        });
    }
    for _ in 0..u.int_in_range(0..=4u8)? {
        let id: [u8; 16] = u.arbitrary()?;
        let current: u32 = u.int_in_range(0..=3)?;
        let mut generations = BTreeMap::new();
        for g in 0..=current {
            generations.insert(
                g,
                GenerationEntry {
                    rev: u.arbitrary()?,
                    digest: u.arbitrary()?,
                    seals: u.arbitrary()?,
                },
            );
        }
        let mut snapshots = Vec::new();
        let mut sequence = 0u64;
        for _ in 0..u.int_in_range(0..=5u8)? {
            sequence += u.int_in_range(0..=3u64)?;
            let id = SnapshotId(u.arbitrary()?);
            // Ids repeat once the input runs out (all zeros): a head never lists one twice.
            if snapshots.iter().any(|s: &SnapshotEntry| s.id == id) {
                continue;
            }
            snapshots.push(SnapshotEntry {
                id,
                sequence,
                digest: u.arbitrary()?,
            });
            sequence += 1;
        }
        let mut escrows = BTreeMap::new();
        for _ in 0..u.int_in_range(0..=2u8)? {
            escrows.insert(
                u.arbitrary::<[u8; 32]>()?,
                EscrowEntry {
                    rev: u.arbitrary()?,
                    digest: u.arbitrary()?,
                },
            );
        }
        h.disks.insert(
            id,
            DiskEntry {
                slot_size: if snapshots.is_empty() && u.arbitrary()? {
                    0
                } else {
                    1 << u.int_in_range(16..=22u32)?
                },
                current_generation: current,
                identity_generation: u.int_in_range(0..=current)?,
                next_sequence: sequence + u.int_in_range(0..=2u64)?,
                generations,
                snapshots,
                escrows,
            },
        );
    }
    Ok(h)
}

fn seeds() -> Vec<Vec<u8>> {
    let data = [7u8; 600];
    let h = build(&mut Unstructured::new(&data)).expect("seed head");
    let enc = h.encode(&auth());
    let body = enc[..enc.len() - 32].to_vec();
    vec![[&[0u8][..], &enc].concat(), [&[1u8][..], &body].concat()]
}

fuzz_target!(
    init: { write_seeds(seeds) },
    |data: &[u8]| {
        let Some((&sel, rest)) = data.split_first() else { return };
        let key = auth();
        match sel & 3 {
            0 => {
                outcome("peek", &Head::peek(rest));
                outcome("decode", &Head::decode(rest, &key));
            }
            1 => {
                let mac = blake3::keyed_hash(head::mac_key(&key).expose(), rest);
                let stored = [rest, mac.as_bytes()].concat();
                let r = Head::decode(&stored, &key);
                outcome("decode(mac fixed)", &r);
                if let Ok(h) = r {
                    let again = h.encode(&key);
                    assert_eq!(again, stored, "a decoded head re-encodes differently");
                    assert_eq!(Head::decode(&again, &key).expect("re-encoded head decodes"), h);
                }
            }
            _ => {
                let Ok(h) = build(&mut Unstructured::new(rest)) else { return };
                let enc = h.encode(&key);
                assert_eq!(Head::decode(&enc, &key).expect("an encoded head decodes"), h);
                assert_eq!(Head::peek(&enc).expect("peek"), (VAULT_ID, h.auth_version));
                let other = blockvault::crypto::Secret32::from_bytes([0x11; 32]);
                assert!(Head::decode(&enc, &other).is_err());
                let at = rest.first().map_or(0, |&b| b as usize) % enc.len();
                let mut flipped = enc.clone();
                flipped[at] ^= 0x40;
                assert!(Head::decode(&flipped, &key).is_err(), "flip at {at} accepted");
            }
        }
    }
);
