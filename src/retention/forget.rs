//! `forget`: apply a retention policy and remove the snapshots it does not keep.
//!
//! The policy runs over each disk's snapshots ([`Scope::AllDisks`], [`Scope::Disk`]) or over
//! one VM's groups ([`Scope::Vm`]: the disks `backup qmp://` took at one point in time). A
//! group is kept or dropped as a unit: with a disk scope, a member the policy would remove
//! is kept while another member of its group stays (reason `group VM@ID`), so a per-disk
//! cron job never leaves half a VM behind; `split_groups` lifts that (a disk leaving the VM
//! for good), and those groups become incomplete (restore `group:` refuses them, each
//! remaining member restores as a disk).
//!
//! One compare-and-swap of the head drops every removed snapshot, of every disk, from its
//! inventory (the commit point: from then on no listing, restore or `@latest` sees them, and
//! a group's members go together), then their manifests are deleted. Seal counts and
//! sequence numbers stay as they are (the nonce budget never goes down; sequences are never
//! reused). A run killed between the two steps leaves manifests the head no longer lists,
//! which nothing reads; `verify` reports them. Removing a snapshot never touches packs: a
//! kept snapshot's manifest names every extent it needs, its parent's included, so the data
//! a kept snapshot shares with a removed one stays referenced, and `prune` frees only the rest.

use std::collections::{BTreeMap, BTreeSet};

use super::policy::{self, Candidate, Policy, Reasons};
use crate::error::Result;
use crate::vault::manifest::{Manifest, SnapshotId};
use crate::vault::{Disk, Vault};
use crate::vm::group::{self, Group};

/// Which snapshots the policy runs over.
#[derive(Debug, Clone, Copy)]
pub enum Scope<'a> {
    /// Every disk, each on its own.
    AllDisks,
    /// One disk's snapshots.
    Disk(&'a str),
    /// The groups of one VM, by their points in time: a removed group's members all go.
    Vm(&'a str),
}

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

/// What became of one group whose members the run decided about.
#[derive(Debug, Clone)]
pub struct GroupOutcome {
    /// The VM's name.
    pub vm: String,
    /// The group's id (32 hex digits).
    pub id: String,
    /// Its point in time.
    pub time: u64,
    /// The rules that keep it (with a disk scope: `group member DISK@ID kept`); empty if
    /// every member of it the vault holds is removed.
    pub reasons: Reasons,
    /// Members removed although the group is kept (`split_groups`), as `disk@id`.
    pub split: Vec<String>,
}

/// What a `forget` run decided and did.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// Per disk, in the vault's disk order.
    pub disks: Vec<DiskOutcome>,
    /// The groups with a member among the snapshots decided about, oldest first.
    pub groups: Vec<GroupOutcome>,
}

/// Apply `policy` to the snapshots `scope` names and, unless `dry_run`, remove those it does
/// not keep. `split_groups` (disk scopes only) lets a member go while its group stays.
/// Errors: an empty policy (`Usage`), an unknown disk or VM (`NotFound`); a snapshot whose
/// manifest cannot be read (the listing fails as `snapshots` does, naming it: nothing is
/// removed on a partial view).
pub fn forget(
    vault: &Vault,
    scope: Scope<'_>,
    policy: &Policy,
    dry_run: bool,
    split_groups: bool,
) -> Result<Outcome> {
    policy.check()?;
    let in_scope = match scope {
        Scope::Disk(name) => vec![crate::engine::require_disk(vault, name)?],
        Scope::AllDisks | Scope::Vm(_) => vault.disks()?,
    };
    let mut listed = Vec::new();
    for disk in in_scope {
        crate::interrupt::check()?;
        let manifests = vault.snapshots(&disk)?;
        listed.push((disk, manifests));
    }
    let mut outcome = match scope {
        Scope::Vm(vm) => by_groups(vault, &listed, vm, policy)?,
        Scope::AllDisks | Scope::Disk(_) => {
            let mut outcome = Outcome::default();
            for (disk, manifests) in &listed {
                let (kept, removed) = decide(policy, manifests)?;
                outcome.disks.push(DiskOutcome {
                    disk: disk.name.clone(),
                    kept,
                    removed,
                    manifests_left: Vec::new(),
                });
            }
            keep_groups_whole(vault, &listed, &mut outcome, split_groups)?;
            outcome
        }
    };
    if !dry_run {
        let disks: Vec<&Disk> = listed.iter().map(|(d, _)| d).collect();
        remove(vault, &disks, &mut outcome.disks)?;
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
    let all: Vec<Decision> = manifests
        .iter()
        .zip(reasons)
        .map(|(m, reasons)| Decision {
            id: m.id,
            time: m.created,
            reasons,
        })
        .collect();
    Ok(split(all, manifests))
}

/// `decisions` (one per manifest, same order) as kept and removed, each newest first.
fn split(decisions: Vec<Decision>, manifests: &[Manifest]) -> (Vec<Decision>, Vec<Decision>) {
    let mut all: Vec<(u64, Decision)> = manifests
        .iter()
        .map(|m| m.sequence)
        .zip(decisions)
        .collect();
    all.sort_by_key(|(sequence, d)| std::cmp::Reverse((d.time, *sequence)));
    all.into_iter()
        .map(|(_, d)| d)
        .partition(|d| !d.reasons.is_empty())
}

/// Every group with a member in `listed`, from the snapshots of every disk (a group's other
/// members may be on disks outside the scope).
fn groups_touching(vault: &Vault, listed: &[(Disk, Vec<Manifest>)]) -> Result<Vec<Group>> {
    let has_member = |ms: &[Manifest]| ms.iter().any(|m| m.info.group.is_some());
    if !listed.iter().any(|(_, ms)| has_member(ms)) {
        return Ok(Vec::new());
    }
    let mut all: Vec<Manifest> = Vec::new();
    for disk in vault.disks()? {
        match listed.iter().find(|(d, _)| d.id == disk.id) {
            Some((_, ms)) => all.extend(ms.iter().cloned()),
            None => all.extend(vault.snapshots(&disk)?),
        }
    }
    let touched: BTreeSet<&str> = listed
        .iter()
        .flat_map(|(_, ms)| ms.iter().filter_map(|m| m.info.group.as_ref()))
        .map(|g| g.id.as_str())
        .collect();
    Ok(group::from_manifests(&all)
        .into_iter()
        .filter(|g| touched.contains(g.record.id.as_str()))
        .collect())
}

/// `disk@id8` of a present member.
fn member_name(m: &Manifest) -> String {
    format!("{}@{}", m.disk_name, m.id.short())
}

/// With a disk scope: a member the policy removes is kept while another member of its group
/// stays (unless `split_groups`), so a group goes only as a whole.
fn keep_groups_whole(
    vault: &Vault,
    listed: &[(Disk, Vec<Manifest>)],
    outcome: &mut Outcome,
    split_groups: bool,
) -> Result<()> {
    for g in groups_touching(vault, listed)? {
        let present: Vec<&Manifest> = g.members.iter().flatten().collect();
        let removed = |m: &Manifest| {
            outcome
                .disks
                .iter()
                .find(|o| o.disk == m.disk_name)
                .is_some_and(|o| o.removed.iter().any(|d| d.id == m.id))
        };
        let staying: Vec<String> = present
            .iter()
            .filter(|m| !removed(m))
            .map(|m| member_name(m))
            .collect();
        let going: Vec<&Manifest> = present.iter().copied().filter(|m| removed(m)).collect();
        let mut result = GroupOutcome {
            vm: g.record.vm.clone(),
            id: g.record.id.clone(),
            time: g.record.time,
            reasons: staying.iter().map(|s| format!("member {s} kept")).collect(),
            split: Vec::new(),
        };
        if !staying.is_empty() && !going.is_empty() {
            if split_groups {
                result.split = going.iter().map(|m| member_name(m)).collect();
            } else {
                let reason = format!("group {}@{}", g.record.vm, short(&g.record.id));
                for o in &mut outcome.disks {
                    let (back, still): (Vec<Decision>, Vec<Decision>) =
                        std::mem::take(&mut o.removed).into_iter().partition(|d| {
                            going.iter().any(|m| m.disk_name == o.disk && m.id == d.id)
                        });
                    o.removed = still;
                    for mut d in back {
                        d.reasons.push(reason.clone());
                        o.kept.push(d);
                    }
                    o.kept.sort_by_key(|d| std::cmp::Reverse(d.time));
                }
            }
        }
        outcome.groups.push(result);
    }
    Ok(())
}

/// A group id as listings show it.
fn short(id: &str) -> &str {
    &id[..id.len().min(8)]
}

/// With [`Scope::Vm`]: the policy over `vm`'s groups (their points in time); every member of
/// a removed group is removed, every member of a kept one kept. Other snapshots of the
/// members' disks are not decided about.
fn by_groups(
    vault: &Vault,
    listed: &[(Disk, Vec<Manifest>)],
    vm: &str,
    policy: &Policy,
) -> Result<Outcome> {
    let groups = group::of_vm(vault, groups_touching(vault, listed)?, vm)?;
    let candidates: Vec<Candidate> = groups
        .iter()
        .enumerate()
        .map(|(i, g)| Candidate {
            time: g.record.time,
            sequence: i as u64,
        })
        .collect();
    let reasons = policy::apply(policy, &candidates)?;
    let mut per_disk: BTreeMap<&str, Vec<(Manifest, Reasons)>> = BTreeMap::new();
    let mut outcome = Outcome::default();
    for (g, reasons) in groups.iter().zip(reasons) {
        for m in g.members.iter().flatten() {
            per_disk
                .entry(m.disk_name.as_str())
                .or_default()
                .push((m.clone(), reasons.clone()));
        }
        outcome.groups.push(GroupOutcome {
            vm: g.record.vm.clone(),
            id: g.record.id.clone(),
            time: g.record.time,
            reasons,
            split: Vec::new(),
        });
    }
    for (disk, _) in listed {
        let Some(members) = per_disk.remove(disk.name.as_str()) else {
            continue;
        };
        let (manifests, decisions): (Vec<Manifest>, Vec<Decision>) = members
            .into_iter()
            .map(|(m, reasons)| {
                let d = Decision {
                    id: m.id,
                    time: m.created,
                    reasons,
                };
                (m, d)
            })
            .unzip();
        let (kept, removed) = split(decisions, &manifests);
        outcome.disks.push(DiskOutcome {
            disk: disk.name.clone(),
            kept,
            removed,
            manifests_left: Vec::new(),
        });
    }
    Ok(outcome)
}

/// Drop every removed snapshot from the head in one swap, then delete their manifests.
fn remove(vault: &Vault, disks: &[&Disk], outcomes: &mut [DiskOutcome]) -> Result<()> {
    let gone: Vec<(&Disk, BTreeSet<SnapshotId>)> = disks
        .iter()
        .filter_map(|disk| {
            let o = outcomes.iter().find(|o| o.disk == disk.name)?;
            let ids: BTreeSet<SnapshotId> = o.removed.iter().map(|d| d.id).collect();
            (!ids.is_empty()).then_some((*disk, ids))
        })
        .collect();
    if gone.is_empty() {
        return Ok(());
    }
    crate::interrupt::check()?;
    vault.update_head(|h| {
        for (disk, ids) in &gone {
            h.disk_mut(&disk.id)?
                .snapshots
                .retain(|s| !ids.contains(&s.id));
        }
        Ok(())
    })?;
    for (disk, ids) in &gone {
        let Some(outcome) = outcomes.iter_mut().find(|o| o.disk == disk.name) else {
            continue;
        };
        for id in ids {
            let key = id.object_key(&disk.id);
            if let Err(e) = vault.store().delete(&key) {
                tracing::warn!(object = %key, error = %e, "a forgotten snapshot's manifest could not be deleted: the head no longer lists it, so nothing reads it");
                outcome.manifests_left.push(key);
            }
        }
    }
    Ok(())
}
