//! `prune`: repack mostly dead packs and delete the packs no committed snapshot references,
//! safely while other hosts back up into the same vault (docs/FORMAT.md, "Prune and
//! concurrent backups" and "Repacking", have the argument).
//!
//! ```text
//!  lock prune (only prunes exclude each other) ─▶ clock skew ≤ 5 min? ─▶ remove plans of killed prunes
//!  ─▶ remove rewritten manifests the head does not list
//!  ─▶ repack packs whose dead share exceeds --max-unused (`repack`: new packs, manifests
//!     rewritten in one head swap; the old packs become unreferenced)
//!  ─▶ referenced = packs of every snapshot the head lists (manifests only, no pack data)
//!  ─▶ candidates = listed packs − referenced ─▶ write plan prune/plan-* (candidates)
//!  ─▶ list backup leases ─▶ wait until each has ended or lapsed
//!  ─▶ referenced again (head and manifests re-read) ─▶ delete candidates still unreferenced
//!  ─▶ delete lapsed leases, delete the plan
//! ```
//! Pack data is read only for the packs repacked; every other live pack is kept whole, and
//! the report says how many bytes such packs hold that no snapshot needs.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;

use super::repack::{self, PackUse, RepackReport};
use super::{lease, plan};
use crate::error::{Error, ErrorKind, Result};
use crate::vault::pack::{self, PackId};
use crate::vault::store::lease::{LeaseRecord, FOLDER as LOCKS};
use crate::vault::store::{clock, Store};
use crate::vault::Vault;

/// Clock skew between this host and the store beyond which prune refuses to run: it judges
/// other hosts' leases by the store's timestamps.
pub const MAX_SKEW: Duration = Duration::from_secs(300);
/// Longest pause between two looks at the leases prune waits for.
const MAX_POLL: Duration = Duration::from_secs(1);

/// What `prune` did (or, in a dry run, would do).
#[derive(Debug, Clone, Default, Serialize)]
pub struct PruneReport {
    /// Nothing was changed.
    pub dry_run: bool,
    /// Packs in the vault when prune started.
    pub packs: u64,
    /// Packs deleted (or that a dry run would delete, as of now).
    pub packs_deleted: u64,
    /// Their bytes.
    pub bytes_freed: u64,
    /// Packs no snapshot referenced when the plan was made that a backup running meanwhile
    /// committed, and which were therefore kept.
    pub packs_kept_for_backups: u64,
    /// Packs some snapshot references.
    pub live_packs: u64,
    /// Bytes of frames inside live packs that no snapshot references (left in packs whose
    /// dead share is within `--max-unused`).
    pub dead_bytes: u64,
    /// The `--max-unused` percentage the repack used.
    pub max_unused_percent: f64,
    /// What repacking did (a dry run: `packs_repacked` and `bytes_repacked` it would).
    #[serde(flatten)]
    pub repack: RepackReport,
    /// Rewritten manifests no head lists (a killed repack's, or a forgotten snapshot's),
    /// removed.
    pub stale_manifests_removed: u64,
    /// Backup leases prune waited for.
    pub leases_waited: u64,
    /// Lapsed leases of backups that will never commit, removed.
    pub leases_removed: u64,
    /// Deletion plans of killed prunes, removed.
    pub stale_plans_removed: u64,
    /// Measured offset of the store's clock from this host's, in milliseconds.
    pub clock_skew_ms: i64,
    /// Wall time.
    pub seconds: f64,
}

/// How to prune.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Change nothing; say what would be done.
    pub dry_run: bool,
    /// Repack live packs with more than this percentage of their frame bytes unreferenced
    /// (0 to 100; 100 never repacks).
    pub max_unused: f64,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            dry_run: false,
            max_unused: repack::DEFAULT_MAX_UNUSED,
        }
    }
}

/// Prune `vault` with the default `--max-unused` (what `forget --prune` runs).
pub fn prune(vault: &Vault, dry_run: bool) -> Result<PruneReport> {
    prune_with(
        vault,
        &Options {
            dry_run,
            ..Options::default()
        },
    )
}

/// Prune `vault`. Errors: another prune running (`AlreadyExists`), a clock skew over
/// [`MAX_SKEW`], a disk whose keys or manifests cannot be read (prune must see every
/// reference before it deletes anything), a pack to repack whose bytes do not match its name,
/// a stop asked for by a signal (the plan is removed).
pub fn prune_with(vault: &Vault, opts: &Options) -> Result<PruneReport> {
    let started = Instant::now();
    let dry_run = opts.dry_run;
    if !(0.0..=100.0).contains(&opts.max_unused) {
        return Err(Error::usage(format!(
            "--max-unused {} is not a percentage from 0 to 100",
            opts.max_unused
        )));
    }
    // Packs are under the infrastructure layer, if any; leases, plans and locks (no secrets,
    // and some too short for it) are not.
    let store = vault.store().as_ref();
    let raw = vault.raw_store().as_ref();
    let _lock = raw
        .lock("prune", Duration::ZERO)
        .map_err(|e| e.within("another prune is running"))?;
    let skew = clock::skew(raw)?;
    if skew.exceeds(MAX_SKEW) {
        return Err(Error::new(
            ErrorKind::Unsupported,
            format!(
                "the clock of vault {} differs from this host's by {} s (± {} ms), more than {} s: prune judges other hosts' leases by the store's clock and refuses to run; fix this host's time (NTP)",
                store.location(),
                skew.offset_ms / 1000,
                skew.uncertainty_ms,
                MAX_SKEW.as_secs()
            ),
        ));
    }
    let mut report = PruneReport {
        dry_run,
        clock_skew_ms: skew.offset_ms,
        max_unused_percent: opts.max_unused,
        ..PruneReport::default()
    };
    if !dry_run {
        for key in plan::keys(raw)? {
            plan::remove(raw, &key)?;
            report.stale_plans_removed += 1;
        }
        report.stale_manifests_removed = repack::sweep_unlisted(vault)?;
    }
    let uses = pack_uses(store, &references(vault)?)?;
    let doomed: BTreeSet<PackId> = uses
        .iter()
        .filter(|(_, u)| u.worth_repacking(opts.max_unused))
        .map(|(id, _)| *id)
        .collect();
    if dry_run {
        report.repack.packs_repacked = doomed.len() as u64;
        report.repack.bytes_repacked = doomed
            .iter()
            .map(|p| {
                uses[p]
                    .frames
                    .iter()
                    .map(|(_, l)| u64::from(*l))
                    .sum::<u64>()
            })
            .sum();
    } else {
        report.repack = repack::repack(vault, &doomed)?;
    }
    let listed = list_packs(store)?;
    report.packs = listed.len() as u64;
    let referenced = references(vault)?;
    let candidates: BTreeSet<PackId> = listed
        .keys()
        .filter(|p| !referenced.contains_key(p))
        .copied()
        .collect();
    let deleted = if dry_run {
        candidates
    } else {
        let plan_key = plan::write(raw, &candidates)?;
        let outcome = wait_and_recheck(vault, &skew, &candidates, &mut report);
        let deletable = match outcome {
            Ok(d) => d,
            Err(e) => {
                plan::remove(raw, &plan_key)?;
                return Err(e);
            }
        };
        for p in &deletable {
            store.delete(&p.object_key())?;
        }
        plan::remove(raw, &plan_key)?;
        deletable
    };
    report.packs_deleted = deleted.len() as u64;
    report.bytes_freed = deleted.iter().map(|p| listed[p]).sum();
    let live = pack_uses(store, &references(vault)?)?;
    report.live_packs = live.len() as u64;
    report.dead_bytes = live.values().map(PackUse::dead).sum();
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// Wait for the backups running now, then return the candidates still unreferenced.
fn wait_and_recheck(
    vault: &Vault,
    skew: &clock::Skew,
    candidates: &BTreeSet<PackId>,
    report: &mut PruneReport,
) -> Result<BTreeSet<PackId>> {
    let raw = vault.raw_store().as_ref();
    let mut waiting = backup_leases(raw)?;
    report.leases_waited = waiting.len() as u64;
    let mut poll = Duration::from_millis(50);
    while !waiting.is_empty() {
        crate::interrupt::check()?;
        let mut still = Vec::new();
        for key in waiting {
            match lease_state(raw, &key, skew)? {
                LeaseState::Ended => {}
                LeaseState::Lapsed => {
                    // Its backup can no longer commit (it checks its lease first).
                    raw.delete(&key)?;
                    report.leases_removed += 1;
                }
                LeaseState::Live => still.push(key),
            }
        }
        waiting = still;
        if !waiting.is_empty() {
            std::thread::sleep(poll);
            poll = (poll * 2).min(MAX_POLL);
        }
    }
    let referenced = references(vault)?;
    let (kept, deletable): (BTreeSet<PackId>, BTreeSet<PackId>) =
        candidates.iter().partition(|p| referenced.contains_key(p));
    report.packs_kept_for_backups = kept.len() as u64;
    Ok(deletable)
}

enum LeaseState {
    /// Released: its backup committed or failed.
    Ended,
    /// Not renewed for two times to live by the store's clock, or its process (on this
    /// machine) exited.
    Lapsed,
    /// Held.
    Live,
}

fn backup_leases(store: &dyn Store) -> Result<Vec<String>> {
    let prefix = format!("{LOCKS}/{}", lease::PREFIX);
    Ok(store
        .list(LOCKS)?
        .into_iter()
        .filter(|k| k.starts_with(&prefix))
        .collect())
}

fn lease_state(store: &dyn Store, key: &str, skew: &clock::Skew) -> Result<LeaseState> {
    let gone = |e: &Error| e.kind() == ErrorKind::NotFound;
    let bytes = match store.get(key) {
        Ok(b) => b,
        Err(e) if gone(&e) => return Ok(LeaseState::Ended),
        Err(e) => return Err(e),
    };
    let written = match store.modified(key) {
        Ok(t) => t,
        Err(e) if gone(&e) => return Ok(LeaseState::Ended),
        Err(e) => return Err(e),
    };
    let Ok(record) = LeaseRecord::decode(&bytes, key) else {
        // An unreadable record names no holder to wait for; give it the default lifetime.
        return Ok(lapsed_after(written, lease::ttl(), skew));
    };
    if record.holder_exited() {
        return Ok(LeaseState::Lapsed);
    }
    Ok(lapsed_after(
        written,
        Duration::from_millis(u64::from(record.ttl_ms)),
        skew,
    ))
}

/// Lapsed if the store's clock (estimated from ours, given the benefit of the doubt) is past
/// two times to live after the record was last written: its holder stops trusting it after
/// one (less a margin), so a whole time to live separates the two.
fn lapsed_after(written: SystemTime, ttl: Duration, skew: &clock::Skew) -> LeaseState {
    let local_ms = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    let now_ms = local_ms + skew.offset_ms - skew.uncertainty_ms as i64;
    let written_ms = written
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    if now_ms > written_ms + 2 * ttl.as_millis() as i64 {
        LeaseState::Lapsed
    } else {
        LeaseState::Live
    }
}

/// Every pack in the store with its size.
fn list_packs(store: &dyn Store) -> Result<BTreeMap<PackId, u64>> {
    let mut out = BTreeMap::new();
    for key in store.list("packs")? {
        let Some(id) = PackId::from_object_key(&key) else {
            continue;
        };
        match store.size(&key) {
            Ok(size) => {
                out.insert(id, size);
            }
            // Removed since the listing (a failed backup cleaning up after itself).
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// What a pack's referenced frames are: (offset, length), and the pack's size.
type Frames = (BTreeSet<(u32, u32)>, u64);

/// The frames every snapshot the head lists references, by pack. Every disk must be readable:
/// a disk whose references prune cannot see would lose its data.
fn references(vault: &Vault) -> Result<BTreeMap<PackId, Frames>> {
    vault.head()?;
    let mut out: BTreeMap<PackId, Frames> = BTreeMap::new();
    for id in vault.disk_ids()? {
        let disk = vault.load_disk(id).map_err(|e| {
            e.within(format!(
                "prune needs every disk's snapshots, and disk {} cannot be read",
                hex::encode(id)
            ))
        })?;
        for m in vault.snapshots(&disk)? {
            for x in &m.extents {
                let (pack, size) = m.packs[x.pack as usize];
                let e = out.entry(pack).or_insert_with(|| (BTreeSet::new(), size));
                e.0.insert((x.offset, x.len));
            }
        }
    }
    Ok(out)
}

/// Each live pack's referenced frames and frame bytes: its footer (the only bytes read)
/// says where the index starts, so where the frames end.
fn pack_uses(
    store: &dyn Store,
    live: &BTreeMap<PackId, Frames>,
) -> Result<BTreeMap<PackId, PackUse>> {
    let mut out = BTreeMap::new();
    for (id, (frames, size)) in live {
        let key = id.object_key();
        let footer = store.get_range(
            &key,
            size.saturating_sub(pack::FOOTER_LEN as u64),
            pack::FOOTER_LEN,
        )?;
        let end = pack::frames_end(&footer, *size, &key)?;
        out.insert(
            *id,
            PackUse {
                frames: frames.clone(),
                frame_bytes: end - pack::HEADER_LEN as u64,
            },
        );
    }
    Ok(out)
}
