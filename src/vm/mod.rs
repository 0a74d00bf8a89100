//! Backing up a running VM through QEMU's QMP monitor: every disk at one point in time, with
//! dirty bitmaps blockvault manages, as one group.
//!
//! ```text
//! connect QMP ──▶ resolve --disk-map nodes ──▶ remove what killed runs left (fleece.rs) and
//! tidy each drive's bitmaps (bitmaps.rs): the parent's bitmap X is read only if trustworthy
//!   ──▶ create the fleecing views' nodes ──▶ guest agent: freeze ─┐
//!   transaction, all drives at once: blockdev-backup sync=none (the view), add bitmap Y per
//!   drive (named after its new snapshot), disable X                          ◀─ the point in time
//!   ──▶ thaw ──▶ NBD server + an export of each view (with X) ──▶ record the drives' bitmaps
//!   ──▶ back up each view over NBD (disk.rs) as a member of the group: each waits at its
//!       commit point until all are ready, then all commit (gate.rs)
//!   ──▶ teardown (always): exports, server, jobs, nodes, files
//!   ──▶ committed: remove X │ not committed: fold Y back into X, enable X, remove Y
//! ```
//!
//! Every member's manifest records the group ([`GroupRecord`]: id, VM, point in time,
//! consistency, members, the VM's configuration), the bitmap it created, and the drive's
//! bitmaps as QMP showed them after the transaction, so the next run's lineage check
//! (`changes::lineage`) sees exactly the bitmap it will read, recording since this point in
//! time. The QMP connection is held for the whole run: QEMU serves one client per monitor, so
//! a second run against the same VM waits and times out instead of interleaving.

pub mod bitmaps;
pub mod disk;
pub mod drives;
pub mod fleece;
pub mod gate;
pub mod group;
pub mod restore;
pub mod target;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::crypto::secret::random_bytes;
use crate::engine::{
    self, auto_bitmap, BackupOptions, BackupReport, ChangeClaim, ParentSpec, Progress,
};
use crate::error::{Error, ErrorKind, Result};
use crate::qmp::{agent::Agent, Qmp};
use crate::source::{NbdOptions, NbdSource, Source};
use crate::vault::info::{Consistency, GroupMember, GroupRecord, VmConfig};
use crate::vault::manifest::{ChangeSource, Manifest, SnapshotId};
use crate::vault::Vault;
use drives::Drive;
use fleece::Fleece;

pub use target::{is_qmp_url, parse_disk_map, socket_path, Mapping};

/// The oldest QEMU this works with: 7.1 exports a bitmap of another node (the drive's,
/// through the view) by `{node, name}`.
const MIN_QEMU: (u64, u64) = (7, 1);
/// The largest VM configuration kept with a group.
pub const MAX_VM_CONFIG: usize = 1 << 20;

/// What to back up and how.
#[derive(Debug, Clone)]
pub struct VmBackup {
    /// The QMP socket.
    pub qmp: PathBuf,
    /// Which drive goes to which vault disk.
    pub map: Vec<Mapping>,
    /// The VM's name in the group (default: QEMU's `-name`, else the socket's file name).
    pub vm_name: Option<String>,
    /// The VM's configuration, kept with the group.
    pub vm_config: Option<VmConfig>,
    /// The guest agent's socket: freeze the guest's filesystems around the point in time.
    pub agent: Option<PathBuf>,
    /// Where the views' files and the NBD socket go (default: the QMP socket's folder).
    pub scratch: Option<PathBuf>,
    /// How long to wait for QEMU and the guest agent at each step.
    pub timeout: Duration,
    /// How long to wait for QEMU's NBD server at each step.
    pub nbd_timeout: Duration,
    /// More transaction actions, applied at the same point in time (`--qmp-actions`).
    pub extra_actions: Vec<Value>,
    /// Options every member's backup shares (its disk, change claim, id and info are set
    /// here).
    pub options: BackupOptions,
}

/// What a VM backup did.
#[derive(Debug)]
pub struct VmReport {
    /// The group, as every member recorded it.
    pub group: GroupRecord,
    /// Each member's backup, in `--disk-map` order.
    pub members: Vec<BackupReport>,
    /// QEMU's version.
    pub qemu: String,
    /// How long QEMU took to apply the transaction (the guest's writes wait at most this).
    pub transaction_seconds: f64,
    /// Filesystems the guest agent froze, and for how long.
    pub frozen: Option<(u64, f64)>,
    /// What killed runs had left in QEMU, and was removed or folded back.
    pub cleaned: Vec<String>,
    /// The parents' bitmaps removed after the commit.
    pub bitmaps_removed: Vec<String>,
    /// Warnings (printed; also in every member's notes when known before the commit).
    pub warnings: Vec<String>,
}

/// One member, as the run learns about it.
struct Member {
    mapping: Mapping,
    id: SnapshotId,
    parent: Option<Manifest>,
    decision: bitmaps::Decision,
    /// The bitmap this run adds (`blockvault-<id>`).
    new_bitmap: String,
}

/// Back up the VM `req` describes as one group (module doc).
pub fn backup(vault: &Vault, req: &VmBackup, progress: &dyn Progress) -> Result<VmReport> {
    if matches!(req.options.parent, ParentSpec::Id(_)) {
        return Err(Error::usage(
            "a running VM's disks are backed up as a group: --parent takes latest or none",
        ));
    }
    let mut qmp = Qmp::connect(&req.qmp, req.timeout)?;
    let version = qmp.version().clone();
    if (version.numbers.0, version.numbers.1) < MIN_QEMU {
        return Err(Error::new(
            ErrorKind::Unsupported,
            format!(
                "QEMU {version} at {}: a running VM's backup needs QEMU {}.{} or later \
                 (block-export-add of a bitmap by node and name)",
                req.qmp.display(),
                MIN_QEMU.0,
                MIN_QEMU.1
            ),
        ));
    }
    let scratch = match &req.scratch {
        Some(s) => s.clone(),
        None => req.qmp.parent().map(PathBuf::from).unwrap_or_default(),
    };
    let socket = fleece::nbd_socket(&req.qmp, &scratch)?;
    let given: Vec<String> = req.map.iter().map(|m| m.node.clone()).collect();
    let mut drives = drives::resolve(&mut qmp, &given)?;
    let vm = match &req.vm_name {
        Some(n) => n.clone(),
        None => vm_name(&mut qmp, &req.qmp)?,
    };

    let mut cleaned = fleece::clean_leftovers(&mut qmp, &scratch, &socket, req.timeout)?;
    let mut members = Vec::new();
    for (mapping, drive) in req.map.iter().zip(drives.iter_mut()) {
        let history = match vault.find_disk(&mapping.disk)? {
            Some(d) => vault.snapshots(&d)?,
            None => Vec::new(),
        };
        let parent = match req.options.parent {
            ParentSpec::None => None,
            _ => history.last().cloned(),
        };
        let decision = bitmaps::prepare(&mut qmp, drive, &history, parent.as_ref())?;
        cleaned.extend(decision.tidied.iter().cloned());
        let id = SnapshotId(random_bytes()?);
        members.push(Member {
            mapping: mapping.clone(),
            new_bitmap: auto_bitmap::name_for(&id),
            id,
            parent,
            decision,
        });
    }
    crate::interrupt::check()?;

    // From here on QEMU is changed: whatever happens, `finish` puts it back.
    let run = hex::encode(random_bytes::<4>()?);
    let mut fleece = Fleece::plan(&drives, &run, &req.qmp, &scratch, socket, req.timeout);
    let mut point = Point::default();
    let outcome = take_and_read(
        vault,
        req,
        &mut qmp,
        &drives,
        &members,
        &mut fleece,
        &mut point,
        &vm,
        progress,
    );
    let (committed, mut warnings) =
        finish(&mut qmp, &mut fleece, &drives, &members, &point, &outcome);
    warnings.splice(0..0, point.warnings.iter().cloned());
    let reports = match outcome {
        Ok(r) => r,
        Err(e) => {
            for w in &warnings {
                tracing::warn!(vm = %vm, "{w}");
            }
            return Err(e);
        }
    };
    Ok(VmReport {
        group: point.group.expect("a finished run has its group"),
        members: reports,
        qemu: format!("{version} {}", version.package).trim().to_owned(),
        transaction_seconds: point.transaction_seconds,
        frozen: point.frozen,
        cleaned,
        bitmaps_removed: committed,
        warnings,
    })
}

/// What the point in time left: whether the transaction applied, and what it recorded.
#[derive(Debug, Default)]
struct Point {
    applied: bool,
    group: Option<GroupRecord>,
    transaction_seconds: f64,
    frozen: Option<(u64, f64)>,
    warnings: Vec<String>,
    /// Which members committed.
    committed: Vec<bool>,
}

/// The point in time, the exports and the members' backups.
#[allow(clippy::too_many_arguments)]
fn take_and_read(
    vault: &Vault,
    req: &VmBackup,
    qmp: &mut Qmp,
    drives: &[Drive],
    members: &[Member],
    fleece: &mut Fleece,
    point: &mut Point,
    vm: &str,
    progress: &dyn Progress,
) -> Result<Vec<BackupReport>> {
    fleece.add_nodes(qmp, drives)?;
    let mut actions = fleece.actions();
    for (m, d) in members.iter().zip(drives) {
        actions.extend(bitmaps::actions(
            d,
            &m.new_bitmap,
            m.decision.read.as_deref(),
        ));
    }
    actions.extend(req.extra_actions.iter().cloned());
    crate::interrupt::check()?;

    let mut agent = req.agent.as_ref().and_then(|path| {
        Agent::connect(path, req.timeout)
            .map_err(|e| {
                point.warnings.push(format!(
                    "warning: no guest agent ({e}): the backup is crash-consistent"
                ))
            })
            .ok()
    });
    let freeze_started = Instant::now();
    let frozen = agent.as_mut().map(|a| a.freeze());
    let started = Instant::now();
    let applied = qmp.execute("transaction", json!({ "actions": actions }));
    point.transaction_seconds = started.elapsed().as_secs_f64();
    let consistency = match (frozen, agent.as_mut()) {
        (Some(frozen), Some(a)) => {
            // Thawed right away, whether the freeze or the transaction worked or not.
            let thawed = a.thaw();
            let held = freeze_started.elapsed().as_secs_f64();
            match (frozen, thawed) {
                (Ok(n), Ok(_)) if n > 0 => {
                    point.frozen = Some((n, held));
                    Consistency::Application
                }
                (Ok(_), Ok(_)) => {
                    point.warnings.push(
                        "warning: the guest agent froze no filesystem: the backup is \
                         crash-consistent"
                            .into(),
                    );
                    Consistency::Crash
                }
                (Err(e), _) => {
                    point.warnings.push(format!(
                        "warning: the guest agent could not freeze the guest's filesystems \
                         ({e}): the backup is crash-consistent"
                    ));
                    Consistency::Crash
                }
                (Ok(_), Err(e)) => {
                    point.warnings.push(format!(
                        "warning: the guest agent did not confirm the thaw ({e}): check the \
                         guest (guest-fsfreeze-status) and thaw it; the backup is \
                         crash-consistent"
                    ));
                    Consistency::Crash
                }
            }
        }
        _ => Consistency::Crash,
    };
    applied?;
    point.applied = true;
    fleece.started();
    let group = GroupRecord {
        id: hex::encode(random_bytes::<16>()?),
        vm: vm.to_owned(),
        time: crate::util::now_unix(),
        consistency,
        members: members
            .iter()
            .map(|m| GroupMember {
                disk: m.mapping.disk.clone(),
                node: m.mapping.node.clone(),
                snapshot: m.id.hex(),
            })
            .collect(),
        vm_config: req.vm_config.clone(),
    };
    point.group = Some(group.clone());

    let reads: Vec<Option<String>> = members.iter().map(|m| m.decision.read.clone()).collect();
    fleece.export(qmp, &reads)?;
    let nodes = drives::nodes(qmp)?;
    let mut sources = Vec::new();
    for (i, (m, d)) in members.iter().zip(drives).enumerate() {
        let nbd = NbdSource::open(
            &fleece.url(i),
            &NbdOptions {
                timeout: req.nbd_timeout,
                bitmap: m.decision.read.clone(),
            },
        )?;
        let name = format!(
            "{}{}?node={}",
            target::SCHEME,
            req.qmp.display(),
            m.mapping.node
        );
        let bitmaps = drives::bitmaps_in(&nodes, &d.node)
            .iter()
            .map(Into::into)
            .collect();
        sources.push(disk::VmDisk::new(nbd, name, bitmaps));
    }
    crate::interrupt::check()?;

    let gate = Arc::new(gate::GroupGate::new(members.len()));
    let results: Vec<Result<BackupReport>> = std::thread::scope(|s| {
        let handles: Vec<_> = members
            .iter()
            .zip(&sources)
            .map(|(m, src)| {
                let gate = gate.clone();
                let mut o = req.options.clone();
                o.disk = m.mapping.disk.clone();
                o.snapshot_id = Some(m.id);
                o.parent = match &m.parent {
                    Some(p) => ParentSpec::Id(p.id.hex()),
                    None => ParentSpec::None,
                };
                o.info.bitmap_created = Some(m.new_bitmap.clone());
                o.info.group = Some(group.clone());
                o.info.notes.extend(m.decision.notes.iter().cloned());
                o.info.notes.extend(point.warnings.iter().cloned());
                o.commit_gate = Some(gate.clone());
                let read = m.decision.read.clone();
                s.spawn(move || {
                    gate.take_turn()?;
                    let r = claim(src, read).and_then(|changes| {
                        o.changes = changes;
                        engine::backup(vault, src, &o, progress)
                    });
                    if let Err(e) = &r {
                        gate.fail(format!("disk {}: {e}", o.disk));
                    }
                    r
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(Error::new(
                        ErrorKind::Io,
                        "a member's backup thread panicked",
                    ))
                })
            })
            .collect()
    });
    drop(sources);
    point.committed = results.iter().map(Result::is_ok).collect();
    group_result(members, results)
}

/// The change claim of a member that reads bitmap `read`.
fn claim(src: &dyn Source, read: Option<String>) -> Result<Option<ChangeClaim>> {
    read.map(|b| {
        Ok(ChangeClaim {
            source: ChangeSource::Bitmap,
            detail: format!("bitmap {b}"),
            list: src.dirty_ranges(&b)?,
            covers: None,
            bitmap: Some(b),
        })
    })
    .transpose()
}

/// All reports, or the error of the member that failed first (not one abandoned because of
/// it), saying which members committed all the same.
fn group_result(
    members: &[Member],
    results: Vec<Result<BackupReport>>,
) -> Result<Vec<BackupReport>> {
    if results.iter().all(Result::is_ok) {
        return Ok(results.into_iter().map(|r| r.expect("all ok")).collect());
    }
    let committed: Vec<String> = members
        .iter()
        .zip(&results)
        .filter(|(_, r)| r.is_ok())
        .map(|(m, _)| format!("{}@{}", m.mapping.disk, m.id.short()))
        .collect();
    let mut errors: Vec<(&Member, Error)> = members
        .iter()
        .zip(results)
        .filter_map(|(m, r)| r.err().map(|e| (m, e)))
        .collect();
    let first = errors
        .iter()
        .position(|(_, e)| !e.to_string().contains("the group is abandoned"))
        .unwrap_or(0);
    let (m, e) = errors.swap_remove(first);
    let outcome = match committed.is_empty() {
        true => "no snapshot of the group was committed".to_owned(),
        false => format!(
            "committed before the failure: {} (the group is incomplete)",
            committed.join(", ")
        ),
    };
    Err(e
        .within(format!("disk {} (node {})", m.mapping.disk, m.mapping.node))
        .within(outcome))
}

/// Tear down the views and settle each drive's bitmaps: the committed members' parent
/// bitmaps are removed, the others' new bitmaps folded back. Returns the bitmaps removed and
/// warnings for what could not be done (the next run removes it).
fn finish(
    qmp: &mut Qmp,
    fleece: &mut Fleece,
    drives: &[Drive],
    members: &[Member],
    point: &Point,
    outcome: &Result<Vec<BackupReport>>,
) -> (Vec<String>, Vec<String>) {
    let mut warnings: Vec<String> = fleece
        .teardown(qmp)
        .into_iter()
        .map(|w| format!("warning: cannot remove {w} (the next backup of this VM removes it)"))
        .collect();
    let mut removed = Vec::new();
    if !point.applied {
        return (removed, warnings);
    }
    for (i, (m, d)) in members.iter().zip(drives).enumerate() {
        let committed = outcome.is_ok() || point.committed.get(i).copied().unwrap_or(false);
        let done = match (committed, &m.decision.old) {
            (true, Some(old)) => bitmaps::retire(qmp, d, old).map(|b| removed.push(b)),
            (true, None) => Ok(()),
            (false, _) => bitmaps::restore(qmp, d, &m.new_bitmap, m.decision.read.as_deref()),
        };
        if let Err(e) = done {
            warnings.push(format!(
                "warning: bitmaps of node {}: {e} (the next backup of this VM settles them)",
                d.node
            ));
        }
    }
    (removed, warnings)
}

/// QEMU's `-name`, else the QMP socket's file name without its extension.
fn vm_name(qmp: &mut Qmp, socket: &std::path::Path) -> Result<String> {
    let named = qmp.execute("query-name", json!({}))?;
    if let Some(n) = named["name"].as_str().filter(|n| !n.is_empty()) {
        return Ok(n.to_owned());
    }
    Ok(socket
        .file_stem()
        .map_or_else(|| "vm".into(), |s| s.to_string_lossy().into_owned()))
}
