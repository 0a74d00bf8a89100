//! What a backup reads, decided from its change claim and its parent.
//!
//! ```text
//! claim + parent ──▶ covers the disk? (else Usage error)
//!                ──▶ a bitmap: lineage to the parent holds? (changes::lineage)  ──no──┐
//!                ──▶ Plan::changed ──▶ --verify-unchanged sample matches? ──no─────────┤
//!                ──▶ read what the claim names                                        ▼
//!                                          compare every slot by hash; say why (warning,
//!                                          change_detail, the snapshot's notes)
//! no claim: the whole disk (hash comparison with a parent, full without)
//! ```
//! A claim that cannot be trusted never fails the backup: hash comparison is always correct,
//! only slower.

use std::ops::Range;

use super::plan::Plan;
use super::spotcheck::{self, Sampled};
use super::{BackupOptions, ChangeClaim};
use crate::changes::lineage;
use crate::error::{Error, Result};
use crate::source::Source;
use crate::util::human_bytes;
use crate::vault::info::BitmapRecord;
use crate::vault::manifest::{ChangeSource, Manifest};
use crate::vault::{Disk, Vault};

/// What to read, how the snapshot will say its changes were found, and why.
#[derive(Debug)]
pub struct Decision {
    /// The reads.
    pub plan: Plan,
    /// How changes were found.
    pub change_source: ChangeSource,
    /// Which claim, what checked it, or why it was not trusted.
    pub change_detail: String,
    /// Warnings to keep with the snapshot.
    pub notes: Vec<String>,
    /// What `--verify-unchanged` re-read, when a claim was checked that way.
    pub verify_unchanged: Option<Sampled>,
}

/// Decide the reads of a backup of `source` (whose data lies in `data`) into `disk`, slots
/// of `slot_size`, given the parent and `bitmaps`, the source's bitmaps recorded before
/// reading.
#[allow(clippy::too_many_arguments)]
pub fn decide(
    vault: &Vault,
    disk: &Disk,
    parent: Option<&Manifest>,
    source: &dyn Source,
    opts: &BackupOptions,
    data: &[Range<u64>],
    bitmaps: &[BitmapRecord],
    slot_size: u32,
) -> Result<Decision> {
    let whole = |change_source| Decision {
        plan: Plan::whole(data, source.size(), slot_size),
        change_source,
        change_detail: String::new(),
        notes: Vec::new(),
        verify_unchanged: None,
    };
    match (&opts.changes, parent) {
        (Some(claim), Some(p)) => follow(vault, disk, p, source, claim, data, bitmaps, opts),
        (Some(claim), None) => {
            tracing::info!(change_source = %claim.detail, "no parent snapshot: reading the whole disk");
            Ok(whole(ChangeSource::Full))
        }
        (None, Some(_)) => Ok(whole(ChangeSource::HashCompare)),
        (None, None) => Ok(whole(ChangeSource::Full)),
    }
}

/// The plan an incremental that `claim` drives, after checking the claim: it must cover the
/// disk, a bitmap must have its lineage to `parent`, and the slots it calls unchanged that
/// `--verify-unchanged` re-reads must match the parent. A failed check falls back to hash
/// comparison of every slot.
#[allow(clippy::too_many_arguments)]
fn follow(
    vault: &Vault,
    disk: &Disk,
    parent: &Manifest,
    source: &dyn Source,
    claim: &ChangeClaim,
    data: &[Range<u64>],
    bitmaps: &[BitmapRecord],
    opts: &BackupOptions,
) -> Result<Decision> {
    let disk_size = source.size();
    if let Some(covers) = claim.covers.filter(|&c| c < disk_size) {
        return Err(Error::usage(format!(
            "{} speaks for the first {covers} bytes only, but {} holds {disk_size}",
            claim.detail,
            source.name()
        )));
    }
    let by_hash = |why: String, sampled: Option<Sampled>| {
        tracing::warn!(change_source = %claim.detail, "{why}");
        Decision {
            plan: Plan::whole(data, disk_size, parent.slot_size),
            change_source: ChangeSource::HashCompare,
            change_detail: why.clone(),
            notes: vec![why],
            verify_unchanged: sampled,
        }
    };
    if let Some(name) = &claim.bitmap {
        let mut now = bitmaps
            .iter()
            .find(|b| &b.name == name)
            .cloned()
            .unwrap_or_else(|| BitmapRecord {
                name: name.clone(),
                ..BitmapRecord::default()
            });
        // Counted the way the source counted it for the parent's record where it can (QMP's
        // count rounds a partial last granule up; block status clips it), else from the claim.
        now.dirty_bytes.get_or_insert(claim.list.bytes());
        if let Some(why) = lineage::broken(&parent.info, &parent.id.short(), &now) {
            return Ok(by_hash(
                format!("bitmap {name} not trusted: {why}; compared every slot by hash instead"),
                None,
            ));
        }
    }
    let plan = Plan::changed(&claim.list, parent, data, disk_size);
    let check = spotcheck::check(
        vault,
        disk,
        parent,
        source,
        &plan.carried,
        plan.slots_read(),
        data,
        opts.verify_unchanged,
    )?;
    let s = check.sampled;
    let sample = format!(
        "re-read {} of {} unchanged slots with data ({})",
        s.slots,
        s.candidates,
        human_bytes(s.bytes)
    );
    if let Some(slot) = check.differs {
        return Ok(by_hash(
            format!(
                "{} missed a change in slot {slot} ({sample}, this one differs from the \
                 parent): fell back to hash comparison",
                claim.detail
            ),
            Some(s),
        ));
    }
    let change_detail = if s.slots == 0 {
        claim.detail.clone()
    } else {
        format!("{}; {sample}, all as in the parent", claim.detail)
    };
    Ok(Decision {
        plan,
        change_source: claim.source,
        change_detail,
        notes: Vec::new(),
        verify_unchanged: Some(s),
    })
}
