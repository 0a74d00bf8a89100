//! `forget`: apply a retention policy to each disk and remove the snapshots it does not keep.
//!
//! Per disk, one compare-and-swap of the head drops the removed snapshots from its inventory
//! (the commit point: from then on no listing, restore or `@latest` sees them), then their
//! manifests are deleted. Seal counts and sequence numbers stay as they are (the nonce budget
//! never goes down; sequences are never reused). A run killed between the two steps leaves
//! manifests the head no longer lists, which nothing reads; `verify` reports them and a
//! later `forget` or `prune` does not need them. Removing a snapshot never touches packs: a
//! kept snapshot's manifest names every extent it needs, its parent's included, so the data a
//! kept snapshot shares with a removed one stays referenced, and `prune` frees only the rest.

use std::collections::BTreeSet;

use super::policy::{self, Candidate, Policy, Reasons};
use crate::error::Result;
use crate::vault::manifest::{Manifest, SnapshotId};
use crate::vault::{Disk, Vault};

/// One snapshot and what the policy decided.
#[derive(Debug, Clone)]
pub struct Decision {
    /// The snapshot.
    pub id: SnapshotId,
    /// Its time (seconds since the epoch).
    pub time: u64,
    /// The rules that keep it; empty if it is removed.
    pub reasons: Reasons,
}

/// What `forget` decided (and, unless a dry run, did) for one disk.
#[derive(Debug, Clone)]
pub struct DiskOutcome {
    /// The disk's name.
    pub disk: String,
    /// Kept snapshots, newest first.
    pub kept: Vec<Decision>,
    /// Removed snapshots, newest first.
    pub removed: Vec<Decision>,
    /// Manifests that could not be deleted after the head swap (left unlisted, harmless).
    pub manifests_left: Vec<String>,
}

/// Apply `policy` to the snapshots of `only_disk` (every readable disk if `None`) and, unless
/// `dry_run`, remove those it does not keep. Errors: an empty policy (`Usage`) or an unknown
/// disk (`NotFound`); a snapshot whose manifest cannot be read
/// (the listing fails as `snapshots` does, naming it: nothing is removed on a partial view).
pub fn forget(
    vault: &Vault,
    only_disk: Option<&str>,
    policy: &Policy,
    dry_run: bool,
) -> Result<Vec<DiskOutcome>> {
    policy.check()?;
    let disks = match only_disk {
        Some(name) => vec![crate::engine::require_disk(vault, name)?],
        None => vault.disks()?,
    };
    disks
        .iter()
        .map(|disk| forget_disk(vault, disk, policy, dry_run))
        .collect()
}

fn forget_disk(vault: &Vault, disk: &Disk, policy: &Policy, dry_run: bool) -> Result<DiskOutcome> {
    crate::interrupt::check()?;
    let manifests = vault.snapshots(disk)?;
    let (kept, removed) = decide(policy, &manifests)?;
    let mut outcome = DiskOutcome {
        disk: disk.name.clone(),
        kept,
        removed,
        manifests_left: Vec::new(),
    };
    if dry_run || outcome.removed.is_empty() {
        return Ok(outcome);
    }
    let gone: BTreeSet<SnapshotId> = outcome.removed.iter().map(|d| d.id).collect();
    vault.update_head(|h| {
        h.disk_mut(&disk.id)?
            .snapshots
            .retain(|s| !gone.contains(&s.id));
        Ok(())
    })?;
    for id in &gone {
        let key = id.object_key(&disk.id);
        if let Err(e) = vault.store().delete(&key) {
            tracing::warn!(object = %key, error = %e, "a forgotten snapshot's manifest could not be deleted: the head no longer lists it, so nothing reads it");
            outcome.manifests_left.push(key);
        }
    }
    Ok(outcome)
}

/// Split `manifests` into kept and removed, each newest first.
fn decide(policy: &Policy, manifests: &[Manifest]) -> Result<(Vec<Decision>, Vec<Decision>)> {
    let candidates: Vec<Candidate> = manifests
        .iter()
        .map(|m| Candidate {
            time: m.created,
            sequence: m.sequence,
        })
        .collect();
    let reasons = policy::apply(policy, &candidates)?;
    let mut all: Vec<(u64, Decision)> = manifests
        .iter()
        .zip(reasons)
        .map(|(m, reasons)| {
            (
                m.sequence,
                Decision {
                    id: m.id,
                    time: m.created,
                    reasons,
                },
            )
        })
        .collect();
    all.sort_by_key(|(sequence, d)| std::cmp::Reverse((d.time, *sequence)));
    let (kept, removed) = all
        .into_iter()
        .map(|(_, d)| d)
        .partition(|d| !d.reasons.is_empty());
    Ok((kept, removed))
}
