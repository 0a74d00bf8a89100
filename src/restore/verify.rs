//! `verify`: check the vault's structure, and with `read_data` every stored byte.
//!
//! Structure: the config MAC (at open), every key record unwraps, every manifest decrypts and
//! matches its digest, every pack a snapshot names exists with the recorded size and holds
//! the frames' byte ranges. Read-data: additionally each referenced pack's content hash (its
//! name), its sealed index, and every referenced frame (CRC, GCM tag, length, keyed id).
//! Problems are collected, not thrown: the report names each damaged object, what is wrong,
//! and which snapshots depend on it.

use std::collections::{BTreeMap, BTreeSet};

use rayon::prelude::*;
use serde::Serialize;

pub use super::subset::ReadData;
use crate::engine::Progress;
use crate::error::Result;
use crate::vault::frame;
use crate::vault::manifest::Manifest;
use crate::vault::pack::{self, PackId};
use crate::vault::{Disk, Vault};

/// One damaged object.
#[derive(Debug, Clone, Serialize)]
pub struct Problem {
    /// Object key.
    pub object: String,
    /// What is wrong.
    pub problem: String,
    /// Snapshots that depend on it, as `disk@id`.
    pub snapshots: Vec<String>,
}

/// Result of a verify run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct VerifyReport {
    /// Whether stored bytes were read (all, or the subset below).
    pub read_data: bool,
    /// The subset of packs read (`n/m`, `p%`), or null when all or none were.
    pub read_data_subset: Option<String>,
    /// Packs read whole.
    pub packs_read: u64,
    /// Disks checked.
    pub disks: u64,
    /// Snapshots checked.
    pub snapshots: u64,
    /// Packs checked.
    pub packs: u64,
    /// Frames decrypted and checked (read-data only).
    pub extents_checked: u64,
    /// Bytes read from the vault (read-data only).
    pub bytes_read: u64,
    /// Packs no snapshot references: what backups killed before their commit left (a backup
    /// that fails or is interrupted removes its own). Harmless, reclaimable. Whole-vault
    /// runs only, like the two figures below.
    pub unreferenced_packs: u64,
    /// Their bytes.
    pub unreferenced_pack_bytes: u64,
    /// Temp files of writes that never finished (`Store::unfinished`): invisible to every
    /// other command, harmless, reclaimable.
    pub unfinished_writes: u64,
    /// Their bytes.
    pub unfinished_write_bytes: u64,
    /// Everything found wrong.
    pub problems: Vec<Problem>,
    /// Seconds.
    pub seconds: f64,
}

/// What verify must know about one referenced pack.
struct PackUse {
    size: u64,
    disk: usize,
    /// The identity generation of the snapshots using it (a pack is written by one job, and a
    /// new identity never carries a parent's packs over).
    identity_generation: u32,
    /// (offset, len, id) → extent, for frames snapshots reference.
    frames: BTreeMap<(u32, u32), crate::crypto::ExtentId>,
    snapshots: BTreeSet<String>,
}

/// Verify the vault (or one disk of it), reading the packs `read_data` selects.
pub fn verify(
    vault: &Vault,
    only_disk: Option<&str>,
    read_data: ReadData,
    progress: &dyn Progress,
) -> Result<VerifyReport> {
    let started = std::time::Instant::now();
    let mut report = VerifyReport {
        read_data: read_data != ReadData::None,
        read_data_subset: matches!(read_data, ReadData::Slice { .. } | ReadData::Percent(_))
            .then(|| read_data.to_string()),
        ..Default::default()
    };
    let mut disks: Vec<Disk> = Vec::new();
    for id in vault.disk_ids()? {
        match vault.load_disk(id) {
            Ok(d) if only_disk.is_none_or(|n| n == d.name) => disks.push(d),
            Ok(_) => {}
            // A revoked or unreachable KEK is not damage: say so, do not report exit 3.
            Err(e) if e.kind() == crate::error::ErrorKind::Key => return Err(e),
            Err(e) => report.problems.push(Problem {
                object: format!("keys/{}", hex::encode(id)),
                problem: e.to_string(),
                snapshots: vec![],
            }),
        }
    }
    // Verifying one disk that was found: other disks' unreadable key records are not its
    // problem. Not found: they may be it, so they stay reported.
    if only_disk.is_some() && !disks.is_empty() {
        report.problems.clear();
    }
    report.disks = disks.len() as u64;
    // Escrowed volume keys are opened (and dropped) only to prove they still open.
    for disk in &disks {
        if let Err(e) = vault.escrows(disk) {
            report.problems.push(Problem {
                object: format!("escrow/{}", disk.id_hex()),
                problem: e.to_string(),
                snapshots: vec![],
            });
        }
    }

    let mut packs: BTreeMap<PackId, PackUse> = BTreeMap::new();
    for (di, disk) in disks.iter().enumerate() {
        for sid in vault.snapshot_ids(disk)? {
            let key = sid.object_key(&disk.id);
            let m = match vault.load_manifest(disk, sid) {
                Ok(m) => m,
                Err(e) => {
                    report.problems.push(Problem {
                        object: key,
                        problem: e.to_string(),
                        snapshots: vec![format!("{}@{}", disk.name, sid.short())],
                    });
                    continue;
                }
            };
            report.snapshots += 1;
            let label = format!("{}@{}", disk.name, m.id.short());
            if m.compute_digest(&disk.identity_for(&m)?.digest) != m.digest {
                report.problems.push(Problem {
                    object: key,
                    problem: "slot table does not match the disk digest".into(),
                    snapshots: vec![label.clone()],
                });
            }
            collect_packs(&m, di, &label, &mut packs);
        }
    }
    report.packs = packs.len() as u64;

    for (id, u) in &packs {
        let key = id.object_key();
        let mut fail = |problem: String| {
            report.problems.push(Problem {
                object: key.clone(),
                problem,
                snapshots: u.snapshots.iter().cloned().collect(),
            });
        };
        match vault.store().size(&key) {
            Err(e) => fail(e.to_string()),
            Ok(s) if s != u.size => fail(format!("pack is {s} bytes, snapshots expect {}", u.size)),
            Ok(_) => {
                if let Some(((o, l), _)) = u.frames.iter().find(|((o, l), _)| {
                    *o as u64 + *l as u64 > u.size || (*o as usize) < pack::HEADER_LEN
                }) {
                    fail(format!("frame at {o}+{l} lies outside the pack"));
                }
            }
        }
    }

    if only_disk.is_none() {
        count_leftovers(vault, &packs, &mut report)?;
    }

    if read_data != ReadData::None {
        let damaged: BTreeSet<String> = report.problems.iter().map(|p| p.object.clone()).collect();
        let chosen = read_data.select(&packs.keys().copied().collect())?;
        let packs: BTreeMap<&PackId, &PackUse> = packs
            .iter()
            .filter(|(id, _)| chosen.contains(*id))
            .collect();
        report.packs_read = packs.len() as u64;
        progress.start(packs.values().map(|u| u.size).sum());
        let checked: Vec<_> = packs
            .par_iter()
            .filter(|(id, _)| !damaged.contains(&id.object_key()))
            .map(|(id, u)| {
                let r = check_pack_data(vault, &disks[u.disk], **id, u);
                progress.advance(u.size);
                r
            })
            .collect();
        for (problems, frames, bytes) in checked {
            report.extents_checked += frames;
            report.bytes_read += bytes;
            report.problems.extend(problems);
        }
    }
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// What killed backups left: packs no snapshot references, and unfinished writes.
fn count_leftovers(
    vault: &Vault,
    packs: &BTreeMap<PackId, PackUse>,
    report: &mut VerifyReport,
) -> Result<()> {
    let store = vault.store();
    let referenced: BTreeSet<String> = packs.keys().map(|p| p.object_key()).collect();
    for key in store.list("packs")? {
        if referenced.contains(&key) {
            continue;
        }
        match store.size(&key) {
            Ok(size) => {
                report.unreferenced_packs += 1;
                report.unreferenced_pack_bytes += size;
            }
            // Removed since the listing (a backup that failed cleaning up after itself).
            Err(e) if e.kind() == crate::error::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    for temp in store.unfinished()? {
        report.unfinished_writes += 1;
        report.unfinished_write_bytes += temp.size;
    }
    Ok(())
}

fn collect_packs(m: &Manifest, disk: usize, label: &str, packs: &mut BTreeMap<PackId, PackUse>) {
    for x in &m.extents {
        let (pid, size) = m.packs[x.pack as usize];
        let u = packs.entry(pid).or_insert_with(|| PackUse {
            size,
            disk,
            identity_generation: m.info.identity_generation,
            frames: BTreeMap::new(),
            snapshots: BTreeSet::new(),
        });
        u.frames.insert((x.offset, x.len), x.id);
        u.snapshots.insert(label.to_string());
    }
}

fn check_pack_data(
    vault: &Vault,
    disk: &Disk,
    id: PackId,
    u: &PackUse,
) -> (Vec<Problem>, u64, u64) {
    let key = id.object_key();
    let snaps: Vec<String> = u.snapshots.iter().cloned().collect();
    let problem = |p: String| Problem {
        object: key.clone(),
        problem: p,
        snapshots: snaps.clone(),
    };
    let bytes = match vault.store().get(&key) {
        Ok(b) => b,
        Err(e) => return (vec![problem(e.to_string())], 0, 0),
    };
    let n = bytes.len() as u64;
    let mut problems = Vec::new();
    if blake3::hash(&bytes).as_bytes() != &id.0 {
        problems.push(problem(
            "content does not match the pack's name (hash): the pack is damaged".into(),
        ));
    }
    if let Err(e) = pack::read_index(&bytes, &disk.binding, &|g| disk.generation(g), &key) {
        problems.push(problem(format!("pack index: {e}")));
    }
    let identity = match disk.identity_of(u.identity_generation) {
        Ok(i) => i,
        Err(e) => return (vec![problem(e.to_string())], 0, n),
    };
    let mut checked = 0;
    for (&(o, l), xid) in &u.frames {
        let Some(raw) = bytes.get(o as usize..o as usize + l as usize) else {
            continue;
        };
        let what = || format!("extent {xid} at offset {o}");
        checked += 1;
        if let Err(e) = frame::open(
            raw.to_vec(),
            &disk.binding,
            &|g| disk.generation(g),
            &identity,
            xid,
            &what,
        ) {
            problems.push(problem(e.to_string()));
        }
    }
    (problems, checked, n)
}
