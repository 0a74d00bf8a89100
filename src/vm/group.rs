//! Groups as the vault holds them: not objects of their own, but the record every member's
//! manifest carries ([`GroupRecord`]). A group is found through any member; it is complete
//! when every member it names is there (a member missing means its manifest was never
//! written: the run was killed between two manifest writes, or one of them failed).

use std::collections::BTreeMap;

use crate::error::{Error, ErrorKind, Result};
use crate::vault::info::{GroupMember, GroupRecord};
use crate::vault::manifest::Manifest;
use crate::vault::Vault;

/// A group, with its members as found in the vault.
#[derive(Debug, Clone)]
pub struct Group {
    /// The record (from the first member found).
    pub record: GroupRecord,
    /// Each member of the record, in its order: its snapshot when present.
    pub members: Vec<Option<Manifest>>,
}

impl Group {
    /// Whether every member's snapshot is in the vault.
    pub fn complete(&self) -> bool {
        self.members.iter().all(Option::is_some)
    }

    /// Every member with its snapshot, in the record's order; an incomplete group is an
    /// error naming what is missing, since restoring or serving part of it as the VM would
    /// give a point in time the VM never had.
    pub fn require_complete(&self) -> Result<Vec<(&GroupMember, &Manifest)>> {
        if !self.complete() {
            return Err(Error::new(
                ErrorKind::NotFound,
                format!(
                    "group {} of VM {} is incomplete: {} never committed (that run was killed \
                     or failed between its manifest writes); name its other disks one by one \
                     with DISK@ID",
                    self.record.id,
                    self.record.vm,
                    self.missing().join(", ")
                ),
            ));
        }
        Ok(self
            .record
            .members
            .iter()
            .zip(self.members.iter().flatten())
            .collect())
    }

    /// The highest sequence number among the members present: orders groups taken in the
    /// same second.
    pub fn newest_sequence(&self) -> u64 {
        self.members
            .iter()
            .flatten()
            .map(|m| m.sequence)
            .max()
            .unwrap_or(0)
    }

    /// The members not in the vault, as `disk@id`.
    pub fn missing(&self) -> Vec<String> {
        self.record
            .members
            .iter()
            .zip(&self.members)
            .filter(|(_, found)| found.is_none())
            .map(|(m, _)| format!("{}@{}", m.disk, &m.snapshot[..m.snapshot.len().min(8)]))
            .collect()
    }
}

/// Every group with a member in the vault, oldest point in time first.
pub fn groups(vault: &Vault) -> Result<Vec<Group>> {
    let mut all = Vec::new();
    for disk in vault.disks()? {
        all.extend(vault.snapshots(&disk)?);
    }
    Ok(from_manifests(&all))
}

/// The groups of `manifests` (every snapshot of the vault, for completeness to be right),
/// oldest point in time first.
pub fn from_manifests(manifests: &[Manifest]) -> Vec<Group> {
    let mut by_id: BTreeMap<&str, (&GroupRecord, Vec<&Manifest>)> = BTreeMap::new();
    for m in manifests {
        if let Some(g) = &m.info.group {
            by_id
                .entry(&g.id)
                .or_insert_with(|| (g, Vec::new()))
                .1
                .push(m);
        }
    }
    let mut out: Vec<Group> = by_id
        .into_values()
        .map(|(record, found)| {
            let members = record
                .members
                .iter()
                .map(|member| {
                    found
                        .iter()
                        .find(|m| m.disk_name == member.disk && m.id.hex() == member.snapshot)
                        .map(|m| (*m).clone())
                })
                .collect();
            Group {
                record: record.clone(),
                members,
            }
        })
        .collect();
    // Points in time are whole seconds: groups of one second are ordered by their members'
    // sequence numbers (each disk's count of snapshots, which only grows), then by id.
    out.sort_by_cached_key(|g| (g.record.time, g.newest_sequence(), g.record.id.clone()));
    out
}

/// The groups of `all` that are `vm`'s; none is an error (`NotFound`) naming the vault.
pub fn of_vm(vault: &Vault, all: Vec<Group>, vm: &str) -> Result<Vec<Group>> {
    let of_vm: Vec<Group> = all.into_iter().filter(|g| g.record.vm == vm).collect();
    if of_vm.is_empty() {
        return Err(Error::new(
            ErrorKind::NotFound,
            format!(
                "vault {} has no group of a VM named {vm}",
                vault.store().location()
            ),
        ));
    }
    Ok(of_vm)
}

/// The group `spec` names: `VM` or `VM@latest` (its newest complete group) or `VM@ID` (a
/// group id or unique prefix of one, of that VM).
pub fn resolve(vault: &Vault, spec: &str) -> Result<Group> {
    let (vm, id) = spec.split_once('@').unwrap_or((spec, "latest"));
    let of_vm = of_vm(vault, groups(vault)?, vm)?;
    if id == "latest" {
        return of_vm
            .into_iter()
            .rev()
            .find(Group::complete)
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::NotFound,
                    format!("VM {vm} has no complete group: name one with {vm}@ID"),
                )
            });
    }
    let mut found: Vec<Group> = of_vm
        .into_iter()
        .filter(|g| g.record.id.starts_with(id))
        .collect();
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => Err(Error::new(
            ErrorKind::NotFound,
            format!("VM {vm} has no group {id}"),
        )),
        _ => Err(Error::usage(format!(
            "group id {id} of VM {vm} is ambiguous: give more digits"
        ))),
    }
}
