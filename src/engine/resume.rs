//! Resuming an interrupted backup: the checkpoint segments a run wrote as its packs became
//! durable ([`crate::vault::checkpoint`]) are read back by the next run of the same disk, and
//! the extents of every pack still there are referenced instead of sealed and uploaded again.
//!
//! ```text
//! lease (Job::prepare) ─▶ reservation ─▶ list checkpoints/<disk>/ ─▶ open each (sealed)
//!   ─▶ same generation, slot size, identity? ─▶ pack in a pending deletion plan? skip
//!   ─▶ pack still there with its size? ─▶ Known::add_resumed
//! … backup … commit ─▶ clear(): every segment of the disk deleted
//! ```
//! The order matters for prune (docs/FORMAT.md §1.6): the lease exists before the plans are
//! read, and the plans are read before the packs are checked, so a pack a prune may delete
//! is either in a plan read here (not reused) or its prune waits for this run's lease.
//! Nothing a segment says is trusted unless it opens under the disk's checkpoint key; what
//! does not open is reported and ignored: at worst the run uploads more.

use crate::error::{ErrorKind, Result};
use crate::retention::plan;
use crate::util::human_bytes;
use crate::vault::checkpoint::{self, Checkpoint};
use crate::vault::{Disk, Vault};

use super::known::Known;
use crate::crypto::GenerationKeys;

/// What [`load`] found.
#[derive(Debug, Default)]
pub struct Resumed {
    /// Packs reused.
    pub packs: u64,
    /// Bytes of frames in them now known.
    pub bytes: u64,
    /// Why segments were not used, for the report.
    pub notes: Vec<String>,
}

/// Add to `known` what earlier runs of `disk` left in checkpoints and is still usable by a
/// run in the state `run` (generation, slot size, identity generation), sealed with `keys`.
pub fn load(
    vault: &Vault,
    disk: &Disk,
    keys: &GenerationKeys,
    run: &Checkpoint,
    known: &mut Known,
) -> Result<Resumed> {
    let store = vault.store();
    let mut out = Resumed::default();
    let segments = match store.list(&checkpoint::disk_folder(&disk.id)) {
        Ok(s) => s,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    if segments.is_empty() {
        return Ok(out);
    }
    let pending = plan::pending(vault.raw_store().as_ref())?;
    let mut skip = |key: &str, why: String| {
        tracing::warn!(checkpoint = key, "{why}");
        out.notes.push(format!("checkpoint {key} not used: {why}"));
    };
    let mut usable = Vec::new();
    for key in segments {
        let Some(pack) = checkpoint::pack_of_key(&disk.id, &key) else {
            skip(&key, "not a checkpoint segment's name".into());
            continue;
        };
        let opened = store.get(&key).and_then(|bytes| {
            let g = Checkpoint::peek_generation(&bytes, &key)?;
            if g != run.generation {
                return Ok(Err(format!(
                    "written under DEK generation {g}, this run seals with {}",
                    run.generation
                )));
            }
            Checkpoint::open(&bytes, &disk.binding, &pack, keys, &key).map(Ok)
        });
        let c = match opened {
            Ok(Ok(c)) => c,
            Ok(Err(why)) => {
                skip(&key, why);
                continue;
            }
            Err(e) if e.kind() == ErrorKind::NotFound => continue,
            Err(e) if e.kind() == ErrorKind::Io => return Err(e),
            Err(e) => {
                skip(
                    &key,
                    format!("{e} (ignored: the backup stores that data again)"),
                );
                continue;
            }
        };
        if (c.slot_size, c.identity_generation) != (run.slot_size, run.identity_generation) {
            skip(
                &key,
                format!(
                    "written with slot size {} and identity generation {}, this run uses {} and {}",
                    c.slot_size, c.identity_generation, run.slot_size, run.identity_generation
                ),
            );
            continue;
        }
        let pack_key = pack.object_key();
        if !pending.unreadable.is_empty() || pending.packs.contains(&pack_key) {
            skip(
                &key,
                format!("pack {pack_key} is in a pending prune's deletion plan"),
            );
            continue;
        }
        match store.size(&pack_key) {
            Ok(size) if size == c.pack_size => usable.push(c),
            Ok(size) => skip(
                &key,
                format!(
                    "pack {pack_key} holds {size} bytes, the checkpoint says {}",
                    c.pack_size
                ),
            ),
            Err(e) if e.kind() == ErrorKind::NotFound => {
                skip(&key, format!("pack {pack_key} is gone"))
            }
            Err(e) => return Err(e),
        }
    }
    for c in &usable {
        out.bytes += known.add_resumed(c);
        out.packs += 1;
    }
    if out.packs > 0 {
        let msg = format!(
            "resuming an interrupted backup: reusing {} packs ({}) it stored",
            out.packs,
            human_bytes(out.bytes)
        );
        tracing::info!("{msg}");
        out.notes.push(msg);
    }
    Ok(out)
}

/// Remove every checkpoint segment of `disk` once a snapshot is committed: their packs are
/// referenced now or unreferenced for prune to collect. A failure is only logged (a segment
/// left behind is ignored or reused by the next run, never trusted blindly).
pub fn clear(vault: &Vault, disk: &Disk) {
    let store = vault.store();
    let segments = match store.list(&checkpoint::disk_folder(&disk.id)) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot list the disk's checkpoints to remove them");
            return;
        }
    };
    for key in segments {
        if let Err(e) = store.delete(&key) {
            tracing::warn!(checkpoint = %key, error = %e, "cannot remove a checkpoint segment");
        }
    }
}
