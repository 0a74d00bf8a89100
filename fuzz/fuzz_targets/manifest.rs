//! `manifest`: snapshot manifests (`vault::manifest::Manifest`): `peek` on the outer header and,
//! above all, `decode_body` on arbitrary bodies.
//!
//! The first input byte picks a mode (the rest of the input is `rest`):
//! - 0, 1 (half the runs): `rest` is a raw manifest body for `decode_body` (as manifest version
//!   1 for 0, version 2 for 1), and a raw object for `peek`. A body that decodes is then used
//!   the way restore uses it (`slot_len` of every slot, `compute_digest`) and must survive
//!   `encode` → `decode` unchanged. With `BLOCKVAULT_FUZZ_STRICT` set a version 2 body whose
//!   info JSON is in the writer's own form must also re-encode to exactly `rest`.
//! - 2: `rest` sealed as a manifest object by us (outer header ‖ nonce ‖ GCM(manifest key,
//!   body) ‖ tag, AAD = outer header, as in docs/FORMAT.md): its first byte says whether the
//!   remainder is zstd-compressed by us (then `decode` parses it as a body) or passed as is
//!   (then `decode` runs zstd on arbitrary bytes). This is the parser behind the AEAD.
//! - 3: a valid manifest built from `rest` (slot table, overlays, packs, extents):
//!   `decode(encode(m)) == m`, `peek` gives its id and generation, and another binding or
//!   another generation's keys are refused.
#![no_main]

use blockvault::crypto::ExtentId;
use blockvault::vault::frame::OVERHEAD;
use blockvault::vault::info::{
    BitmapRecord, Consistency, GroupMember, GroupRecord, SnapshotInfo, VmConfig,
};
use blockvault::vault::manifest::{
    slot_count, ChangeSource, ExtentLoc, Manifest, Overlay, Slot, SnapshotId, Stats, MAX_SLOT_SIZE,
    MIN_SLOT_SIZE, OUTER_LEN, ZERO,
};
use blockvault::vault::pack::PackId;
use blockvault_fuzz::{
    arbitrary, binding, generation_keys, identity, other_binding, outcome, short_string, strict,
    write_seeds, Unstructured, DISK_ID, VAULT_ID,
};
use libfuzzer_sys::fuzz_target;

const WHAT: &str = "snapshots/fuzz/fuzz";
const SNAP: SnapshotId = SnapshotId(*b"fuzz-snapshot-id");

fn outer(id: &SnapshotId, generation: u32) -> Vec<u8> {
    let mut o = Vec::with_capacity(OUTER_LEN);
    o.extend_from_slice(b"BVSN");
    o.extend_from_slice(&2u16.to_le_bytes());
    o.extend_from_slice(&0u16.to_le_bytes());
    o.extend_from_slice(&VAULT_ID);
    o.extend_from_slice(&DISK_ID);
    o.extend_from_slice(&id.0);
    o.extend_from_slice(&generation.to_le_bytes());
    o
}

/// A manifest object whose sealed payload is exactly `payload` (normally zstd of a body).
fn seal_payload(id: &SnapshotId, generation: u32, payload: &[u8]) -> Vec<u8> {
    let o = outer(id, generation);
    let sealed = generation_keys(generation.min(1))
        .unwrap()
        .manifest
        .seal_to_vec(&o, payload)
        .unwrap();
    [o, sealed].concat()
}

/// The plaintext body inside an encoded manifest (inverse of the sealing above).
fn body_of(enc: &[u8], generation: u32) -> Vec<u8> {
    let z = generation_keys(generation)
        .unwrap()
        .manifest
        .open_vec(&enc[..OUTER_LEN], &enc[OUTER_LEN..], &|| "body".into())
        .unwrap();
    zstd::stream::decode_all(&z[..]).unwrap()
}

fn check_round_trip(m: &Manifest) {
    let keys = generation_keys(m.generation.min(1)).unwrap();
    let enc = m.encode(&binding(), &keys).expect("encode");
    assert_eq!(
        Manifest::peek(&enc, &binding(), WHAT).expect("peek of an encoded manifest"),
        (m.id, m.generation)
    );
    let back =
        Manifest::decode(&enc, &binding(), &keys, WHAT).expect("an encoded manifest decodes");
    assert_eq!(&back, m);
    assert!(Manifest::decode(&enc, &other_binding(), &keys, WHAT).is_err());
    let wrong = generation_keys(1 - m.generation.min(1)).unwrap();
    assert!(Manifest::decode(&enc, &binding(), &wrong, WHAT).is_err());
}

/// What restore does with a decoded manifest must not panic either.
fn use_like_restore(m: &Manifest) {
    for i in 0..m.slots.len() as u64 {
        let len = m.slot_len(i);
        assert!(len > 0 && len <= m.slot_size, "slot {i} has length {len}");
    }
    let _ = m.compute_digest(&identity().digest);
}

fn raw(rest: &[u8], version: u16) {
    outcome("peek", &Manifest::peek(rest, &binding(), WHAT));
    let r = Manifest::decode_body(rest, SNAP, 0, version, WHAT);
    outcome("decode_body", &r);
    let Ok(m) = r else { return };
    use_like_restore(&m);
    check_round_trip(&m);
    if strict() && version == 2 && rest.ends_with(m.info.to_json().as_bytes()) {
        let enc = m.encode(&binding(), &generation_keys(0).unwrap()).unwrap();
        assert!(
            body_of(&enc, 0) == rest,
            "decoded body re-encodes differently"
        );
    }
}

fn sealed(rest: &[u8]) {
    let Some((&how, body)) = rest.split_first() else {
        return;
    };
    let generation = (how >> 1) as u32 % 3;
    let payload = if how & 1 == 1 {
        zstd::bulk::compress(body, 1).unwrap()
    } else {
        body.to_vec()
    };
    let obj = seal_payload(&SNAP, generation, &payload);
    let keys = generation_keys(generation.min(1)).unwrap();
    let r = Manifest::decode(&obj, &binding(), &keys, WHAT);
    outcome(
        if how & 1 == 1 {
            "decode(zstd by us)"
        } else {
            "decode(raw zstd)"
        },
        &r,
    );
    if let Ok(m) = r {
        assert_eq!((m.id, m.generation), (SNAP, generation));
        use_like_restore(&m);
        check_round_trip(&m);
    }
}

fn build(u: &mut Unstructured) -> arbitrary::Result<Manifest> {
    let slot_size =
        1u32 << u.int_in_range(MIN_SLOT_SIZE.trailing_zeros()..=MAX_SLOT_SIZE.trailing_zeros())?;
    let nslots = u.int_in_range(0..=40u64)?;
    let disk_size = if nslots == 0 {
        0
    } else {
        (nslots - 1) * slot_size as u64 + u.int_in_range(1..=slot_size as u64)?
    };
    assert_eq!(slot_count(disk_size, slot_size), nslots);
    let np = u.int_in_range(0..=4u32)?;
    let packs = (0..np)
        .map(|_| Ok((PackId(u.arbitrary()?), u.arbitrary()?)))
        .collect::<arbitrary::Result<Vec<_>>>()?;
    let ne = if np == 0 {
        0
    } else {
        u.int_in_range(0..=12u32)?
    };
    let extents = (0..ne)
        .map(|_| {
            let plain_len = u.int_in_range(1..=slot_size)?;
            Ok(ExtentLoc {
                id: ExtentId(u.arbitrary()?),
                pack: u.int_in_range(0..=np - 1)?,
                offset: u.arbitrary()?,
                len: u.int_in_range(OVERHEAD as u32..=plain_len + OVERHEAD as u32)?,
                plain_len,
            })
        })
        .collect::<arbitrary::Result<Vec<_>>>()?;
    let pick = |u: &mut Unstructured, zero_ok: bool| -> arbitrary::Result<u32> {
        if ne == 0 || (zero_ok && u.arbitrary::<bool>()?) {
            Ok(ZERO)
        } else {
            u.int_in_range(0..=ne - 1)
        }
    };
    let mut slots = Vec::new();
    for _ in 0..nslots {
        slots.push(match u.int_in_range(0..=2u8)? {
            1 if ne > 0 => Slot::Extent(pick(u, false)?),
            2 => {
                let base = pick(u, true)?;
                let k = u.int_in_range(0..=4u8)?;
                let mut overlays = Vec::new();
                for _ in 0..k {
                    let extent = pick(u, true)?;
                    let len = if extent == ZERO {
                        u.int_in_range(0..=slot_size)?
                    } else {
                        extents[extent as usize].plain_len
                    };
                    let offset = u.int_in_range(0..=slot_size - len)?;
                    overlays.push(Overlay {
                        offset,
                        len,
                        extent,
                    });
                }
                Slot::overlaid(ExtentId(u.arbitrary()?), base, overlays)
            }
            _ => Slot::Zero,
        });
    }
    let change_source = match u.int_in_range(0..=3u8)? {
        0 => ChangeSource::Full,
        1 => ChangeSource::HashCompare,
        2 => ChangeSource::Bitmap,
        _ => ChangeSource::ChangedList,
    };
    Ok(Manifest {
        id: SnapshotId(u.arbitrary()?),
        generation: u.int_in_range(0..=1u32)?,
        created: u.arbitrary()?,
        sequence: u.arbitrary()?,
        disk_name: short_string(u, 300)?,
        source: short_string(u, 300)?,
        parent: if u.arbitrary()? {
            Some(SnapshotId(u.arbitrary()?))
        } else {
            None
        },
        disk_size,
        slot_size,
        change_source,
        change_detail: short_string(u, 300)?,
        seals_in_generation: u.arbitrary()?,
        stats: Stats {
            bytes_read: u.arbitrary()?,
            bytes_stored: u.arbitrary()?,
            slots_new: u.arbitrary()?,
            slots_reused: u.arbitrary()?,
            slots_zero: u.arbitrary()?,
            duration_ms: u.arbitrary()?,
        },
        digest: u.arbitrary()?,
        packs,
        extents,
        slots,
        layout: short_string(u, 300)?,
        info: SnapshotInfo {
            bitmaps: (0..u.int_in_range(0..=3u8)?)
                .map(|_| {
                    Ok(BitmapRecord {
                        name: short_string(u, 40)?,
                        granularity: u.arbitrary()?,
                        enabled: u.arbitrary()?,
                        in_use: u.arbitrary()?,
                        dirty_bytes: u.arbitrary()?,
                    })
                })
                .collect::<arbitrary::Result<_>>()?,
            bitmap_created: if u.arbitrary()? {
                Some(short_string(u, 40)?)
            } else {
                None
            },
            notes: vec![short_string(u, 100)?],
            identity_generation: u.arbitrary()?,
            group: if u.arbitrary()? {
                Some(GroupRecord {
                    id: short_string(u, 32)?,
                    vm: short_string(u, 20)?,
                    time: u.arbitrary()?,
                    consistency: if u.arbitrary()? {
                        Consistency::Application
                    } else {
                        Consistency::Crash
                    },
                    members: (0..u.int_in_range(0..=3u8)?)
                        .map(|_| {
                            Ok(GroupMember {
                                disk: short_string(u, 20)?,
                                node: short_string(u, 20)?,
                                snapshot: short_string(u, 32)?,
                            })
                        })
                        .collect::<arbitrary::Result<_>>()?,
                    vm_config: if u.arbitrary()? {
                        Some(VmConfig {
                            name: short_string(u, 20)?,
                            text: short_string(u, 200)?,
                        })
                    } else {
                        None
                    },
                })
            } else {
                None
            },
        },
    })
}

fn sample() -> Manifest {
    Manifest {
        id: SNAP,
        generation: 0,
        created: 1_700_000_000,
        sequence: 7,
        disk_name: "vm1".into(),
        source: "/dev/vg0/vm1".into(),
        parent: Some(SnapshotId([2; 16])),
        disk_size: 3 * 65536 + 100,
        slot_size: 65536,
        change_source: ChangeSource::HashCompare,
        change_detail: String::new(),
        seals_in_generation: 5,
        stats: Stats::default(),
        digest: [3; 32],
        packs: vec![(PackId([4; 32]), 1000), (PackId([5; 32]), 2000)],
        extents: vec![
            ExtentLoc {
                id: ExtentId([5; 32]),
                pack: 0,
                offset: 32,
                len: 100,
                plain_len: 4096,
            },
            ExtentLoc {
                id: ExtentId([6; 32]),
                pack: 1,
                offset: 32,
                len: 65616,
                plain_len: 65536,
            },
        ],
        slots: vec![
            Slot::Zero,
            Slot::Extent(1),
            Slot::overlaid(
                ExtentId([0x0c; 32]),
                ZERO,
                vec![
                    Overlay {
                        offset: 4096,
                        len: 4096,
                        extent: 0,
                    },
                    Overlay {
                        offset: 0,
                        len: 512,
                        extent: ZERO,
                    },
                ],
            ),
            Slot::overlaid(ExtentId([0x0d; 32]), 1, vec![]),
        ],
        layout: String::new(),
        info: SnapshotInfo {
            bitmaps: vec![BitmapRecord {
                name: "bv-1".into(),
                granularity: Some(65536),
                enabled: Some(true),
                in_use: false,
                dirty_bytes: Some(1 << 20),
            }],
            bitmap_created: Some("bv-2".into()),
            notes: Vec::new(),
            identity_generation: 0,
            group: Some(GroupRecord {
                id: "ab".repeat(16),
                vm: "vm1".into(),
                time: 1_700_000_000,
                consistency: Consistency::Crash,
                members: vec![GroupMember {
                    disk: "d".into(),
                    node: "drive0".into(),
                    snapshot: "cd".repeat(16),
                }],
                vm_config: Some(VmConfig {
                    name: "vm1.xml".into(),
                    text: "<domain/>".into(),
                }),
            }),
        },
    }
}

fn seeds() -> Vec<Vec<u8>> {
    let m = sample();
    let enc = m.encode(&binding(), &generation_keys(0).unwrap()).unwrap();
    let body = body_of(&enc, 0);
    let mut empty = m.clone();
    empty.disk_size = 0;
    empty.slots.clear();
    empty.parent = None;
    let empty_body = body_of(
        &empty
            .encode(&binding(), &generation_keys(0).unwrap())
            .unwrap(),
        0,
    );
    vec![
        [&[0u8][..], &body].concat(),
        [&[0u8][..], &empty_body].concat(),
        [&[1u8][..], &enc].concat(),
        [&[2u8, 1][..], &body].concat(),
        [&[2u8, 0][..], &zstd::bulk::compress(&body, 3).unwrap()].concat(),
        [&[3u8][..], &[0x5a; 600][..]].concat(),
    ]
}

fuzz_target!(
    init: {
        // Check once that this file's rebuilt sealing (AAD = outer header) matches the library's.
        let m = sample();
        let body = body_of(&m.encode(&binding(), &generation_keys(0).unwrap()).unwrap(), 0);
        let obj = seal_payload(&m.id, 0, &zstd::bulk::compress(&body, 1).unwrap());
        let back = Manifest::decode(&obj, &binding(), &generation_keys(0).unwrap(), WHAT);
        assert_eq!(back.expect("rebuilt manifest sealing is wrong"), m);
        write_seeds(seeds)
    },
    |data: &[u8]| {
        let Some((&sel, rest)) = data.split_first() else { return };
        match sel & 3 {
            0 => raw(rest, 1),
            1 => raw(rest, 2),
            2 => sealed(rest),
            _ => {
                if let Ok(m) = build(&mut Unstructured::new(rest)) {
                    use_like_restore(&m);
                    check_round_trip(&m);
                }
            }
        }
    }
);
