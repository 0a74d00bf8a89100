//! The backup pipeline.
//!
//! ```text
//!  source ──io_uring/pread──▶ slot buffers (bounded pool) ──▶ rayon workers
//!     zero check → keyed id → known to the parent? → changed in places? (overlay.rs: diff
//!     with the parent's slot, seal only changed 4 KiB runs) → else compress → AES-GCM frame
//!  ──bounded channel──▶ writer (one thread): packs, slot table ──▶ uploader thread ──▶ store
//!  all packs durable ──▶ manifest written last (the commit point)
//! ```
//! Memory is bounded by the buffer pool, the result channel and two packs, never by the disk
//! size: a 1 TiB disk uses the same buffers as a 1 GiB one (plus its slot table).

pub mod auto_bitmap;
pub mod claim;
pub mod gate;
pub mod identity;
pub mod known;
pub mod overlay;
pub mod pipeline;
pub mod plan;
pub mod progress;
pub mod resume;
pub mod spotcheck;
pub mod uncommitted;
pub mod worker;
pub mod writer;

use std::time::{Duration, Instant};

use crate::changes::ChangeList;
use crate::crypto::secret::random_bytes;
use crate::error::{Error, ErrorKind, Result};
use crate::io;
use crate::source::Source;
use crate::vault::checkpoint::Checkpoint;
use crate::vault::info::SnapshotInfo;
use crate::vault::manifest::{self, ChangeSource, Manifest, SnapshotId, Stats};
use crate::vault::pack::PackId;
use crate::vault::{Disk, Vault};
use known::Known;
use uncommitted::UncommittedPacks;

pub use progress::{NoProgress, Progress};
pub use worker::Compression;
use worker::{Recycler, WorkerContext};
use writer::Writer;

/// Default slot size.
pub const DEFAULT_SLOT_SIZE: u32 = 1 << 20;
/// Bytes of slot buffers in flight.
pub(crate) const BUFFER_BUDGET: usize = 32 << 20;

/// Which snapshot an incremental compares with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParentSpec {
    /// The disk's newest snapshot.
    Latest,
    /// None: read and store everything.
    None,
    /// A snapshot id or unique prefix.
    Id(String),
}

/// How to run a backup.
#[derive(Debug, Clone)]
pub struct BackupOptions {
    /// Disk name in the vault.
    pub disk: String,
    /// Parent snapshot.
    pub parent: ParentSpec,
    /// Slot size for a disk's first backup (64 KiB to 4 MiB, a power of two).
    pub slot_size: u32,
    /// zstd settings.
    pub compression: Compression,
    /// Use the pread reader even where io_uring works.
    pub force_pread: bool,
    /// Reads in flight.
    pub queue_depth: usize,
    /// Worker threads (0: one per core).
    pub threads: usize,
    /// What changed since the parent, when a dirty bitmap or range list says so; `None`
    /// compares every slot's keyed hash with the parent's.
    pub changes: Option<ChangeClaim>,
    /// Slots the change claim says are unchanged to re-read and compare with the parent
    /// before trusting it, at least (spotcheck.rs samples more for larger claims).
    pub verify_unchanged: usize,
    /// The new snapshot's id, when it must be known before reading (`--bitmap auto` names
    /// its bitmap after it); random otherwise.
    pub snapshot_id: Option<SnapshotId>,
    /// What to record besides what the backup learns itself: the bitmap it created, notes.
    pub info: SnapshotInfo,
    /// Back up a source whose partition table identity differs from the disk's latest
    /// snapshot ([`identity`]).
    pub force: bool,
    /// Waited on just before the manifest is written ([`gate`]: a group commits together).
    pub commit_gate: Option<std::sync::Arc<dyn gate::CommitGate>>,
}

/// A change source's claim, as the manifest will record it.
#[derive(Debug, Clone)]
pub struct ChangeClaim {
    /// [`ChangeSource::Bitmap`] or [`ChangeSource::ChangedList`].
    pub source: ChangeSource,
    /// The bitmap name or the list's file and shape.
    pub detail: String,
    /// The changed ranges.
    pub list: ChangeList,
    /// The dirty bitmap's name when the claim is one: trusted only with a lineage to the
    /// parent (`changes::lineage`).
    pub bitmap: Option<String>,
    /// Bytes from 0 the claim speaks for, if it says; a larger disk is refused.
    pub covers: Option<u64>,
}

impl Default for BackupOptions {
    fn default() -> Self {
        BackupOptions {
            disk: String::new(),
            parent: ParentSpec::Latest,
            slot_size: DEFAULT_SLOT_SIZE,
            compression: Compression { level: Some(1) },
            force_pread: false,
            queue_depth: 8,
            threads: 0,
            changes: None,
            verify_unchanged: 8,
            snapshot_id: None,
            info: SnapshotInfo::default(),
            force: false,
            commit_gate: None,
        }
    }
}

/// What a backup did.
#[derive(Debug, Clone)]
pub struct BackupReport {
    /// The new snapshot.
    pub snapshot: SnapshotId,
    /// Disk name.
    pub disk: String,
    /// Whether this backup registered the disk.
    pub new_disk: bool,
    /// Parent used.
    pub parent: Option<SnapshotId>,
    /// How changes were found.
    pub change_source: ChangeSource,
    /// Which bitmap or list, and whether it was trusted.
    pub change_detail: String,
    /// Disk size.
    pub disk_size: u64,
    /// Slot size.
    pub slot_size: u32,
    /// Reader used.
    pub reader: io::ReaderKind,
    /// Figures.
    pub stats: Stats,
    /// Bytes of frames this run uploaded: `stats.bytes_stored` less what it reused from the
    /// packs of an interrupted run it resumed.
    pub bytes_uploaded: u64,
    /// What `--verify-unchanged` re-read, when a change claim was checked.
    pub verify_unchanged: Option<spotcheck::Sampled>,
    /// What the snapshot records about how it was made (bitmaps, notes).
    pub info: SnapshotInfo,
    /// What differs from the disk's latest snapshot, also kept in the snapshot's notes.
    pub remarks: identity::Remarks,
    /// Notes on this backup, for people: why a change source was not trusted, what differs
    /// from the latest snapshot (the snapshot keeps them in its info, warnings marked).
    pub notes: Vec<String>,
}

fn check_slot_size(s: u32) -> Result<()> {
    if !(manifest::MIN_SLOT_SIZE..=manifest::MAX_SLOT_SIZE).contains(&s) || !s.is_power_of_two() {
        return Err(Error::usage(format!(
            "slot size {s} must be a power of two from 64 KiB to 4 MiB"
        )));
    }
    Ok(())
}

/// Everything a backup settles before planning: the disk and its lock, the parent and the
/// slot size.
struct Job {
    disk: Disk,
    new_disk: bool,
    _lock: Box<dyn Send>,
    /// Held from before the head is read to the end: prune waits for it (retention::lease).
    lease: crate::retention::lease::BackupLease,
    parent: Option<Manifest>,
    /// What the disk's latest snapshot recorded of its source.
    latest: Option<identity::Recorded>,
    slot_size: u32,
    /// Why the parent was not used for dedup, when it could not be.
    note: Option<String>,
}

impl Job {
    fn prepare(vault: &Vault, opts: &BackupOptions) -> Result<Job> {
        let lease = crate::retention::lease::BackupLease::start(vault.raw_store())?;
        // Optimistic, with no lock: any number of hosts register disks at once, and two
        // registering one name end with one disk (vault::disks, docs/FORMAT.md §1.2).
        let (disk, new_disk) = vault.register_disk(&opts.disk)?;
        let lock = vault
            .store()
            .lock(&disk.id_hex(), Duration::ZERO)
            .map_err(|e| e.within(format!("disk {}", opts.disk)))?;
        // A backup of this disk that held the lock until now may have committed meanwhile.
        vault.head()?;
        let latest = vault.latest_snapshot(&disk)?;
        let mut parent = match &opts.parent {
            ParentSpec::None => None,
            ParentSpec::Latest => latest.clone(),
            ParentSpec::Id(id) => Some(vault.resolve_snapshot(&disk, id)?),
        };
        let mut note = None;
        if let Some(p) = parent.take_if(|p| p.info.identity_generation != disk.identity_generation)
        {
            let why = format!(
                "the disk's content-identity key was rotated after parent {} (key rotate --new-dek): reading the whole disk, dedup with earlier snapshots stops here",
                p.id.short()
            );
            tracing::warn!(disk = %disk.name, "{why}");
            note = Some(why);
        }
        if let Some(why) = parent.as_ref().map_or(Ok(None), |p| {
            crate::retention::lease::parent_blocked(vault, p)
        })? {
            tracing::warn!(disk = %disk.name, "{why}");
            parent = None;
            note = Some(why);
        }
        // The slot size is fixed by the disk's first backup, so snapshots compare slot by slot.
        let slot_size = match vault.cached_head().disk(&disk.id)?.slot_size {
            0 => opts.slot_size,
            fixed => fixed,
        };
        Ok(Job {
            disk,
            new_disk,
            _lock: lock,
            lease,
            parent,
            latest: latest.as_ref().map(identity::Recorded::of),
            slot_size,
            note,
        })
    }
}

/// The most AES-GCM seals a job that reads `slots` slots can make: a slot stored whole is at
/// most two frames (the compression trial's and the rest), a slot stored as overlays at most
/// [`overlay::MAX_OVERLAYS`] pieces; a pack holds at least one frame, so there are at most as
/// many pack indexes, and as many checkpoint segments, as frames; and the manifest. Reserved
/// in the head before anything is sealed, and settled to the seals really made at commit.
fn worst_case_seals(slots: u64) -> u64 {
    let per_slot = (overlay::MAX_OVERLAYS as u64).max(2);
    slots.saturating_mul(per_slot * 3).saturating_add(16)
}

/// Back up `source` into `vault` as a new snapshot of `opts.disk`. A run that fails or is
/// stopped by SIGINT/SIGTERM writes no snapshot and keeps the packs it stored for a re-run
/// to resume (removes them if the vault is full); its error says so ([`uncommitted`]).
pub fn backup(
    vault: &Vault,
    source: &dyn Source,
    opts: &BackupOptions,
    progress: &dyn Progress,
) -> Result<BackupReport> {
    let packs = UncommittedPacks::new(vault.store().clone());
    match write_snapshot(vault, source, opts, progress, &packs) {
        Ok(report) => Ok(report),
        Err(e) => {
            let settled = packs.settle(&e);
            Err(uncommitted::explain(e, &opts.disk, &settled))
        }
    }
}

/// The backup itself; every pack it stores is in `packs` until the manifest is written.
fn write_snapshot(
    vault: &Vault,
    source: &dyn Source,
    opts: &BackupOptions,
    progress: &dyn Progress,
    packs: &UncommittedPacks,
) -> Result<BackupReport> {
    let started = Instant::now();
    check_slot_size(opts.slot_size)?;
    let span = tracing::info_span!("backup", disk = %opts.disk, source = %source.name());
    let _g = span.enter();

    let disk_size = source.size();
    let job = Job::prepare(vault, opts)?;
    if manifest::slot_count(disk_size, job.slot_size) > manifest::MAX_SLOTS {
        return Err(Error::usage(format!(
            "a {disk_size}-byte disk has more than {} slots of {} bytes: choose a larger --slot-size for its first backup",
            manifest::MAX_SLOTS, job.slot_size
        )));
    }
    let Job {
        disk,
        new_disk,
        ref parent,
        slot_size,
        note,
        ..
    } = job;
    let nslots = manifest::slot_count(disk_size, slot_size);
    let layout = scan_layout(source);
    let remarks = identity::compare(job.latest.as_ref(), source, layout.as_ref(), opts.force)?;

    // The bitmaps as they are before any data is read (changes::lineage::record).
    let bitmaps = crate::changes::lineage::record(source)?;
    let data = source.data_ranges()?;
    let decided = claim::decide(
        vault,
        &disk,
        parent.as_ref(),
        source,
        opts,
        &data,
        &bitmaps,
        slot_size,
    )?;
    let plan = decided.plan;
    // Sequence and nonce budget, before anything is sealed (a new DEK generation may start).
    let (disk, reservation) = vault.reserve(disk, worst_case_seals(plan.slots_read()))?;
    let generation = reservation.generation;
    let keys = disk.generation(generation)?;
    let seals_before = keys.seals();

    // What this run can reference: its parent's extents, and those an interrupted run of this
    // disk made durable (read after the lease and the reservation: resume.rs).
    let mut known = Known::of_parent(parent.as_ref());
    let run = Checkpoint {
        generation,
        pack: PackId([0; 32]),
        pack_size: 0,
        parent: parent.as_ref().map(|p| p.id),
        slot_size,
        identity_generation: disk.identity_generation,
        extents: Vec::new(),
    };
    let resumed = resume::load(vault, &disk, &keys, &run, &mut known)?;
    let ctx = WorkerContext {
        binding: disk.binding,
        identity: &disk.identity,
        keys: &keys,
        generation,
        known: &known.extents,
        compression: opts.compression,
        buffers: Recycler::new(64),
        parent: parent
            .as_ref()
            .map(|manifest| overlay::ParentView::new(vault, &disk, manifest)),
        slot_size,
        ciphertext: layout
            .as_ref()
            .map(|l| l.ciphertext_ranges())
            .unwrap_or_default(),
    };
    let mut stats = Stats {
        slots_zero: nslots - plan.slots_read() - plan.carried.len() as u64,
        ..Stats::default()
    };
    tracing::debug!(disk_size, parent = ?parent.as_ref().map(|p| p.id.short()), slot_size, generation, change_source = ?decided.change_source, slots_read = plan.slots_read(), slots_carried = plan.carried.len(), bytes_to_read = plan.bytes_to_read(), "plan");
    progress.start(plan.bytes_to_read());

    crate::interrupt::check()?;
    let writer = Writer::new(
        packs,
        disk.binding,
        keys.clone(),
        nslots as usize,
        &known,
        run,
    )?;
    let (writer, local, reader) = pipeline::run(source, plan, &ctx, writer, opts, progress)?;
    let (bytes_stored, bytes_uploaded) = (writer.bytes_stored, writer.bytes_uploaded);
    let tables = writer.finish()?;
    stats.bytes_read = local.bytes_read;
    stats.bytes_stored = bytes_stored;
    stats.slots_new = local.slots_new;
    stats.slots_reused = local.slots_reused;
    stats.slots_zero += local.slots_zero;
    stats.duration_ms = started.elapsed().as_millis() as u64;

    let mut info = opts.info.clone();
    info.bitmaps = bitmaps;
    info.identity_generation = disk.identity_generation;
    let notes: Vec<String> = note
        .iter()
        .chain(&decided.notes)
        .chain(&remarks.notes)
        .chain(&resumed.notes)
        .cloned()
        .collect();
    info.notes.extend(note);
    info.notes.extend(decided.notes);
    info.notes.extend(remarks.recorded());
    let mut m = Manifest {
        id: match opts.snapshot_id {
            Some(id) => id,
            None => SnapshotId(random_bytes()?),
        },
        generation,
        created: crate::util::now_unix(),
        sequence: reservation.sequence,
        disk_name: disk.name.clone(),
        source: source.name().to_string(),
        parent: parent.as_ref().map(|p| p.id),
        disk_size,
        slot_size,
        change_source: decided.change_source,
        change_detail: decided.change_detail,
        // The frames and pack indexes this job sealed, and its manifest.
        seals_in_generation: keys.seals() - seals_before + 1,
        stats,
        digest: [0; 32],
        packs: tables.packs,
        extents: tables.extents,
        slots: tables.slots,
        layout: layout
            .as_ref()
            .and_then(|l| serde_json::to_string(l).ok())
            .unwrap_or_default(),
        info,
    };
    m.digest = m.compute_digest(&disk.identity.digest);
    tracing::debug!(
        packs = m.packs.len(),
        extents = m.extents.len(),
        "commit: writing the manifest"
    );
    // The last moment a stop asked for by a signal is honoured: after this, the backup is done.
    crate::interrupt::check()?;
    job.lease.check_before_commit()?;
    if let Some(gate) = &opts.commit_gate {
        gate.ready()?;
    }
    vault.commit_snapshot(&disk, &m, &reservation, seals_before)?;
    resume::clear(vault, &disk);
    tracing::info!(snapshot = %m.id.short(), bytes_read = stats.bytes_read, bytes_stored = stats.bytes_stored, "snapshot written");
    Ok(BackupReport {
        snapshot: m.id,
        disk: disk.name.clone(),
        new_disk,
        parent: m.parent,
        change_source: m.change_source,
        change_detail: m.change_detail.clone(),
        disk_size,
        slot_size,
        reader,
        stats,
        bytes_uploaded,
        verify_unchanged: decided.verify_unchanged,
        info: m.info,
        remarks,
        notes,
    })
}

/// The partition table and encrypted volumes of `source`, recorded in the manifest; their
/// ciphertext is stored without trying to compress it. A disk whose headers cannot be read is
/// backed up all the same (the reads that matter come later and report their own errors).
pub fn scan_layout(source: &dyn Source) -> Option<crate::layout::Layout> {
    let read = |offset: u64, buf: &mut [u8]| io::read_any(source, offset, buf);
    let opts = crate::layout::ScanOptions {
        mbr_sector_size: Some(source.sector_size()),
    };
    match crate::layout::scan_with(&read, source.size(), &opts) {
        Ok(layout) => Some(layout),
        Err(e) => {
            tracing::warn!(source = source.name(), error = %e, "cannot scan the disk's partition table and volumes");
            None
        }
    }
}

/// Shared with restore: find a disk by name or fail with a clear message.
pub fn require_disk(vault: &Vault, name: &str) -> Result<Disk> {
    vault.find_disk(name)?.ok_or_else(|| {
        Error::new(
            ErrorKind::NotFound,
            format!(
                "vault {} has no disk named {name}",
                vault.store().location()
            ),
        )
    })
}
