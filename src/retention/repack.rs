//! Repacking: the live frames of packs that are mostly dead (overlays and forgotten snapshots
//! leave old packs partly referenced) are copied into new packs, and the manifests that
//! reference them are rewritten to the new places; the old packs are then unreferenced, and
//! `prune` deletes them by its plan-and-lease protocol like any other unreferenced pack
//! (docs/FORMAT.md, "Repacking", has the argument why concurrent backups stay safe).
//!
//! ```text
//!  select: packs whose dead share of frame bytes exceeds --max-unused (footers only)
//!  ─▶ plan, per disk: the live frames of those packs, in order, cut into new packs
//!  ─▶ reserve the seals (one pack index per new pack, one per rewritten manifest): a head swap
//!  ─▶ per old pack: read it whole, BLAKE3 = its id (the manifest that names it is bound by the
//!     head, so this authenticates every frame without decrypting one) ─▶ frames copied as
//!     ciphertext (their AAD binds vault, disk and header, not the pack) ─▶ new packs put
//!  ─▶ manifests rewritten (same snapshot id, new pack table and extent places), put_new under
//!     `<id>.<digest>` ─▶ ONE head swap lists every new digest ─▶ old manifest objects deleted
//! ```
//! Killed anywhere before the swap, the head still lists the old manifests, which name the
//! old packs: nothing changed for any reader; the new packs and manifests are unreferenced and
//! the next prune removes them. Killed after it, the old packs are unreferenced: the next
//! prune deletes them.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::crypto::ExtentId;
use crate::error::{Error, ErrorKind, Result};
use crate::vault::frame;
use crate::vault::head::{self, Digest};
use crate::vault::manifest::{ExtentLoc, Manifest, SnapshotId, REWRITTEN_DIGEST_LEN};
use crate::vault::pack::{self, PackId, PackWriter};
use crate::vault::snapshots::GENERATION_SEAL_LIMIT;
use crate::vault::store::Store;
use crate::vault::{Disk, Vault};

/// restic's default: packs with more than 5 % of their frame bytes unreferenced are repacked.
pub const DEFAULT_MAX_UNUSED: f64 = 5.0;

/// One live pack: its referenced frames (offset, length) and its frame bytes (from its
/// footer: everything between header and index).
#[derive(Debug, Clone)]
pub struct PackUse {
    /// Referenced frames.
    pub frames: BTreeSet<(u32, u32)>,
    /// Bytes of frames the pack holds, referenced or not.
    pub frame_bytes: u64,
}

impl PackUse {
    /// Frame bytes no snapshot references.
    pub fn dead(&self) -> u64 {
        let used: u64 = self.frames.iter().map(|(_, len)| u64::from(*len)).sum();
        self.frame_bytes.saturating_sub(used)
    }

    /// Whether more than `max_unused` percent of its frame bytes are dead (never at 100).
    pub fn worth_repacking(&self, max_unused: f64) -> bool {
        self.frame_bytes > 0 && self.dead() as f64 * 100.0 > max_unused * self.frame_bytes as f64
    }
}

/// What a repack did.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct RepackReport {
    /// Old packs whose live frames were copied (they are unreferenced afterwards).
    pub packs_repacked: u64,
    /// New packs written.
    pub packs_written: u64,
    /// Frame bytes copied.
    pub bytes_repacked: u64,
    /// Manifests rewritten to the new places.
    pub manifests_rewritten: u64,
}

/// A frame to move: its old pack, offset and length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Move {
    pack: PackId,
    offset: u32,
    len: u32,
}

/// Where moved frames went: (old pack, old offset) → (new pack, its size, new offset).
type Moved = BTreeMap<(PackId, u32), (PackId, u64, u32)>;

/// Frames of one new pack, each with the extent id its header must name.
type NewPack = Vec<(Move, ExtentId)>;

/// One disk's share of the work.
struct DiskPlan {
    disk: Disk,
    /// Manifests referencing a doomed pack, with the digest the head lists them by.
    manifests: Vec<(Manifest, Digest)>,
    /// New packs, each a run of frames in (old pack, offset) order.
    new_packs: Vec<NewPack>,
}

/// Repack `doomed` (live packs of any disk): copy their referenced frames into new packs and
/// rewrite every manifest that references them, in one head swap. Returns what was done.
pub fn repack(vault: &Vault, doomed: &BTreeSet<PackId>) -> Result<RepackReport> {
    let mut report = RepackReport::default();
    if doomed.is_empty() {
        return Ok(report);
    }
    let head = vault.head()?;
    let mut plans = Vec::new();
    for (id, entry) in &head.disks {
        let disk = vault.load_disk(*id)?;
        let mut manifests = Vec::new();
        let mut moves: BTreeMap<Move, ExtentId> = BTreeMap::new();
        for (m, s) in vault.snapshots(&disk)?.into_iter().zip(&entry.snapshots) {
            let mut touched = false;
            for x in &m.extents {
                let (pack, _) = m.packs[x.pack as usize];
                if doomed.contains(&pack) {
                    touched = true;
                    moves.insert(
                        Move {
                            pack,
                            offset: x.offset,
                            len: x.len,
                        },
                        x.id,
                    );
                }
            }
            if touched {
                manifests.push((m, s.digest));
            }
        }
        if !manifests.is_empty() {
            plans.push(DiskPlan {
                disk,
                manifests,
                new_packs: cut(moves),
            });
        }
    }
    reserve_seals(vault, &plans)?;
    let store = vault.store().as_ref();
    let mut rewrites: BTreeMap<[u8; 16], BTreeMap<SnapshotId, (Digest, Digest)>> = BTreeMap::new();
    for plan in &plans {
        let moved = copy_frames(store, plan, &mut report)?;
        let disk = &plan.disk;
        let mut swaps = BTreeMap::new();
        for (m, old) in &plan.manifests {
            crate::interrupt::check()?;
            let new = relocate(m, &moved);
            let bytes = new.encode(&disk.binding, &*disk.generation(m.generation)?)?;
            let digest = head::digest(&bytes);
            store.put_new(&m.id.rewritten_key(&disk.id, &digest), &bytes)?;
            swaps.insert(m.id, (*old, digest));
        }
        rewrites.insert(disk.id, swaps);
    }
    // The commit point: every rewritten manifest listed at once. A snapshot forgotten (or
    // rewritten) meanwhile keeps what the head says; its new manifest is left unlisted.
    let (_, applied) = vault.update_head(|h| {
        let mut applied = Vec::new();
        for (disk, swaps) in &rewrites {
            let Ok(e) = h.disk_mut(disk) else { continue };
            for s in &mut e.snapshots {
                if let Some((old, new)) = swaps.get(&s.id) {
                    if s.digest == *old {
                        s.digest = *new;
                        applied.push((*disk, s.id, *old, *new));
                    }
                }
            }
        }
        Ok(applied)
    })?;
    report.manifests_rewritten = applied.len() as u64;
    for (disk, id, old, new) in &applied {
        // Neither is listed any more: the original object, or an earlier rewrite.
        for key in [id.object_key(disk), id.rewritten_key(disk, old)] {
            if let Err(e) = store.delete(&key) {
                tracing::warn!(object = %key, error = %e, "a replaced manifest could not be deleted: the head no longer lists it");
            }
        }
        tracing::debug!(snapshot = %id.short(), digest = %hex::encode(&new[..8]), "manifest rewritten");
    }
    for (disk, swaps) in &rewrites {
        for (id, (_, new)) in swaps {
            if !applied.iter().any(|(d, i, _, _)| d == disk && i == id) {
                store.delete(&id.rewritten_key(disk, new))?;
            }
        }
    }
    Ok(report)
}

/// Cut the frames to move (in old pack and offset order) into new packs of up to
/// [`pack::TARGET_SIZE`] bytes of frames.
fn cut(moves: BTreeMap<Move, ExtentId>) -> Vec<NewPack> {
    let mut out: Vec<NewPack> = Vec::new();
    let mut size = 0usize;
    for (m, id) in moves {
        if out.is_empty() || (size > 0 && size + m.len as usize > pack::TARGET_SIZE) {
            out.push(Vec::new());
            size = 0;
        }
        size += m.len as usize;
        out.last_mut().expect("pushed above").push((m, id));
    }
    out
}

/// Add the seals the repack will make to the nonce budget before making them (a killed
/// repack leaves them counted: the budget only ever overstates): each new pack's index under
/// the disk's current generation, each manifest under its own.
fn reserve_seals(vault: &Vault, plans: &[DiskPlan]) -> Result<()> {
    let mut want: BTreeMap<([u8; 16], u32), u64> = BTreeMap::new();
    for p in plans {
        *want
            .entry((p.disk.id, p.disk.current_generation()))
            .or_default() += p.new_packs.len() as u64;
        for (m, _) in &p.manifests {
            *want.entry((p.disk.id, m.generation)).or_default() += 1;
        }
    }
    vault.update_head(|h| {
        for ((disk, generation), n) in &want {
            let e = h.disk_mut(disk)?;
            let g = e.generations.get_mut(generation).ok_or_else(|| {
                Error::integrity(format!(
                    "disk {}: DEK generation {generation} left the vault head during the repack",
                    hex::encode(disk)
                ))
            })?;
            if g.seals.saturating_add(*n) >= GENERATION_SEAL_LIMIT {
                return Err(Error::new(
                    ErrorKind::Conflict,
                    format!("disk {}: the nonce budget of DEK generation {generation} is spent; a backup starts a new generation, then prune can repack", hex::encode(disk)),
                ));
            }
            g.seals += n;
        }
        Ok(())
    })?;
    Ok(())
}

/// Copy one disk's frames into its new packs; returns where each frame went.
fn copy_frames(store: &dyn Store, plan: &DiskPlan, report: &mut RepackReport) -> Result<Moved> {
    let disk = &plan.disk;
    let generation = disk.current_generation();
    let keys = disk.generation(generation)?;
    let mut moved = BTreeMap::new();
    let mut source: Option<(PackId, Vec<u8>)> = None;
    for frames in &plan.new_packs {
        let mut writer = PackWriter::new(&disk.id, generation, Vec::new());
        let mut placed = Vec::with_capacity(frames.len());
        for (m, id) in frames {
            crate::interrupt::check()?;
            if source.as_ref().is_none_or(|(p, _)| *p != m.pack) {
                source = Some((m.pack, read_authenticated(store, &m.pack)?));
                report.packs_repacked += 1;
            }
            let (_, bytes) = source.as_ref().expect("loaded above");
            let key = m.pack.object_key();
            let what = || format!("{key}: frame at {}+{}", m.offset, m.len);
            let range = m.offset as usize..m.offset as usize + m.len as usize;
            let Some(bytes) = bytes
                .get(range)
                .filter(|_| m.offset as usize >= pack::HEADER_LEN)
            else {
                return Err(Error::integrity(format!(
                    "{}: lies outside the pack",
                    what()
                )));
            };
            let header = frame::check(bytes, &what)?;
            if header.id != *id {
                return Err(Error::integrity(format!(
                    "{}: holds extent {} where {} was expected",
                    what(),
                    header.id,
                    id
                )));
            }
            placed.push((m, writer.add(*id, bytes)));
            report.bytes_repacked += u64::from(m.len);
        }
        let (new, bytes) = writer.finish(&disk.binding, &keys)?;
        store.put(&new.object_key(), &bytes)?;
        report.packs_written += 1;
        for (m, offset) in placed {
            moved.insert((m.pack, m.offset), (new, bytes.len() as u64, offset));
        }
    }
    Ok(moved)
}

/// A pack's bytes, checked against its name: a committed manifest (bound by the head) names
/// the pack by the BLAKE3 of its bytes, so equal bytes are the bytes its backup wrote.
fn read_authenticated(store: &dyn Store, id: &PackId) -> Result<Vec<u8>> {
    let key = id.object_key();
    let bytes = store.get(&key)?;
    if blake3::hash(&bytes).as_bytes() != &id.0 {
        return Err(Error::integrity(format!(
            "{key}: its bytes do not hash to its name (damaged or replaced): not repacked; run verify --read-data"
        )));
    }
    Ok(bytes)
}

/// `m` with every extent in a moved frame pointing at its new place, and a pack table of
/// exactly the packs its extents use (in order of first use).
fn relocate(m: &Manifest, moved: &Moved) -> Manifest {
    let mut out = m.clone();
    let mut table: Vec<(PackId, u64)> = Vec::new();
    let mut index: BTreeMap<PackId, u32> = BTreeMap::new();
    out.extents = m
        .extents
        .iter()
        .map(|x| {
            let (old, size) = m.packs[x.pack as usize];
            let ((pack, size), offset) = match moved.get(&(old, x.offset)) {
                Some((new, new_size, offset)) => ((*new, *new_size), *offset),
                None => ((old, size), x.offset),
            };
            let at = *index.entry(pack).or_insert_with(|| {
                table.push((pack, size));
                (table.len() - 1) as u32
            });
            ExtentLoc {
                pack: at,
                offset,
                ..*x
            }
        })
        .collect();
    out.packs = table;
    out
}

/// Rewritten manifests (`<id>.<16 hex>`) the head does not list: left by a killed repack, by
/// a later rewrite, or by `forget` (which deletes only the original key). Only a prune writes
/// such names, and the caller holds the prune lock, so none of them is about to be listed.
/// Returns how many were deleted.
pub fn sweep_unlisted(vault: &Vault) -> Result<u64> {
    let head = vault.head()?;
    let store = vault.store().as_ref();
    let mut removed = 0;
    for key in store.list("snapshots")? {
        let Some((disk, id, digest16)) = parse_rewritten(&key) else {
            continue;
        };
        let listed = head.disks.get(&disk).is_some_and(|d| {
            d.snapshots
                .iter()
                .any(|s| s.id == id && s.digest[..REWRITTEN_DIGEST_LEN] == digest16[..])
        });
        if !listed {
            store.delete(&key)?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// `snapshots/<disk>/<id>.<16 hex>` → (disk, id, digest prefix).
fn parse_rewritten(key: &str) -> Option<([u8; 16], SnapshotId, [u8; REWRITTEN_DIGEST_LEN])> {
    let mut parts = key.strip_prefix("snapshots/")?.split('/');
    let (disk, name) = (parts.next()?, parts.next()?);
    let (id, digest) = name.split_once('.')?;
    let mut d = [0u8; 16];
    let mut i = [0u8; 16];
    let mut g = [0u8; REWRITTEN_DIGEST_LEN];
    hex::decode_to_slice(disk, &mut d).ok()?;
    hex::decode_to_slice(id, &mut i).ok()?;
    hex::decode_to_slice(digest, &mut g).ok()?;
    Some((d, SnapshotId(i), g))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worth_repacking_follows_the_threshold_and_never_at_100() {
        let u = PackUse {
            frames: [(32, 900)].into(),
            frame_bytes: 1000,
        };
        assert_eq!(u.dead(), 100);
        assert!(u.worth_repacking(0.0));
        assert!(u.worth_repacking(9.9));
        assert!(!u.worth_repacking(10.0));
        assert!(!u.worth_repacking(100.0));
        let full = PackUse {
            frames: [(32, 1000)].into(),
            frame_bytes: 1000,
        };
        assert!(!full.worth_repacking(0.0));
    }

    #[test]
    fn rewritten_names_parse_back() {
        let id = SnapshotId([7; 16]);
        let key = id.rewritten_key(&[3; 16], &[9; 32]);
        let (d, i, g) = parse_rewritten(&key).unwrap();
        assert_eq!((d, i, g), ([3; 16], id, [9; REWRITTEN_DIGEST_LEN]));
        assert!(parse_rewritten(&id.object_key(&[3; 16])).is_none());
    }
}
