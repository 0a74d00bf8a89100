//! The groups `snapshots` shows: the disks of one VM backed up at one point in time
//! (`backup qmp://`), each named by all its members.

use serde_json::{json, Value};

use blockvault::vault::manifest::Manifest;
use blockvault::vm::group::{self, Group};

use super::super::output::time;

/// The groups of `all` (every snapshot of the vault), or only those with a member on `disk`.
pub fn of(all: &[Manifest], disk: Option<&str>) -> Vec<Group> {
    group::from_manifests(all)
        .into_iter()
        .filter(|g| disk.is_none_or(|d| g.record.members.iter().any(|m| m.disk == d)))
        .collect()
}

/// `snapshots --json`'s `groups`.
pub fn json(groups: &[Group]) -> Value {
    groups
        .iter()
        .map(|g| {
            let r = &g.record;
            json!({
                "id": r.id,
                "vm": r.vm,
                "time": time(r.time),
                "consistency": r.consistency,
                "complete": g.complete(),
                "vm_config": r.vm_config.as_ref().map(|c| &c.name),
                "members": r.members.iter().zip(&g.members).map(|(m, found)| json!({
                    "disk": m.disk,
                    "node": m.node,
                    "snapshot": m.snapshot,
                    "present": found.is_some(),
                })).collect::<Vec<_>>(),
            })
        })
        .collect()
}

/// The human listing, after the snapshots: one line per group.
pub fn text(groups: &[Group]) -> String {
    if groups.is_empty() {
        return String::new();
    }
    let mut t = format!(
        "\n{:<9} {:<16} {:<21} {:<12} {}\n",
        "GROUP", "VM", "POINT IN TIME", "CONSISTENCY", "MEMBERS"
    );
    for g in groups {
        let r = &g.record;
        let members: Vec<String> = r
            .members
            .iter()
            .zip(&g.members)
            .map(|(m, found)| {
                let id = &m.snapshot[..m.snapshot.len().min(8)];
                match found {
                    Some(_) => format!("{}@{id}", m.disk),
                    None => format!("{}@{id} (missing)", m.disk),
                }
            })
            .collect();
        t += &format!(
            "{:<9} {:<16} {:<21} {:<12} {}{}{}\n",
            &r.id[..r.id.len().min(8)],
            r.vm,
            time(r.time),
            serde_json::to_value(r.consistency)
                .ok()
                .and_then(|c| c.as_str().map(String::from))
                .unwrap_or_default(),
            members.join(" "),
            match g.complete() {
                true => "",
                false => "  INCOMPLETE",
            },
            r.vm_config
                .as_ref()
                .map(|c| format!("  config {}", c.name))
                .unwrap_or_default(),
        );
    }
    t + &format!("{} groups\n", groups.len())
}
