//! The dirty bitmaps blockvault keeps on a running VM's drives: one per drive, named after
//! the snapshot whose point in time it starts at (`blockvault-<snapshot id>`, as
//! `--bitmap auto` names them), persistent in qcow2 images so a VM restart keeps them.
//!
//! ```text
//! before:  tidy — a bitmap of ours no snapshot created (a failed or killed run's new one,
//!          "orphan") is merged into the parent's and removed, and the parent's is enabled
//!          again (that run disabled it); one an older snapshot created ("stale") is removed
//!          decide — read the parent's bitmap X only if it is there, recording, consistent
//!          and idle; otherwise compare by hash, saying why
//! in the transaction (with the views): add Y = blockvault-<new id>; disable X (frozen at
//!          the point in time: exactly what changed since the parent, and QEMU exports only a
//!          disabled bitmap through a read-only view)
//! after the commit:  remove X
//! after a failure:   merge Y into X, enable X, remove Y (one transaction): X again covers
//!          every write since the parent, as before the run
//! ```
//! A run killed between the transaction and either ending leaves X disabled and Y an orphan:
//! the next run's tidy does what the failure path would have. One VM, one vault: another
//! vault's blockvault bitmaps on the same drives look like orphans here.

use std::collections::HashSet;

use serde_json::{json, Value};

use super::drives::Drive;
use crate::engine::auto_bitmap::is_ours;
use crate::error::Result;
use crate::qmp::Qmp;
use crate::vault::manifest::Manifest;

/// What a drive's bitmaps are for this run, decided before the transaction.
#[derive(Debug, Clone, Default)]
pub struct Decision {
    /// The parent's bitmap, to read: disabled in the transaction, exported with the view.
    pub read: Option<String>,
    /// The parent's bitmap if the drive has it: removed once the new snapshot is committed.
    pub old: Option<String>,
    /// Why the parent's bitmap is not read (for the snapshot's notes).
    pub notes: Vec<String>,
    /// What tidying did: orphans merged and removed, stale bitmaps removed.
    pub tidied: Vec<String>,
}

/// Tidy `drive`'s bitmaps of ours against the disk's `history`, keeping `parent`'s, and
/// decide whether that one can be read (module doc). `drive.bitmaps` is refreshed.
pub fn prepare(
    qmp: &mut Qmp,
    drive: &mut Drive,
    history: &[Manifest],
    parent: Option<&Manifest>,
) -> Result<Decision> {
    let keep = parent.and_then(|p| p.info.bitmap_created.clone());
    let created: HashSet<&str> = history
        .iter()
        .filter_map(|m| m.info.bitmap_created.as_deref())
        .collect();
    let keep_present = keep.as_deref().and_then(|k| drive.bitmap(k)).is_some();
    let mut actions = Vec::new();
    let mut tidied = Vec::new();
    for b in drive.bitmaps.iter().filter(|b| is_ours(&b.name)) {
        if Some(&b.name) == keep.as_ref() {
            continue;
        }
        if !created.contains(b.name.as_str()) && keep_present {
            let x = keep.as_deref().unwrap_or_default();
            actions.push(merge(&drive.node, x, &b.name));
            tidied.push(format!(
                "merged bitmap {} (left by an interrupted run) into {x} on node {}",
                b.name, drive.node
            ));
        } else {
            tidied.push(format!(
                "removed bitmap {} on node {} ({})",
                b.name,
                drive.node,
                if created.contains(b.name.as_str()) {
                    "an older snapshot's"
                } else {
                    "left by an interrupted run"
                }
            ));
        }
        actions.push(action("block-dirty-bitmap-remove", &drive.node, &b.name));
    }
    let merged = actions
        .iter()
        .any(|a| a["type"] == "block-dirty-bitmap-merge");
    if let Some(x) = keep.as_deref().filter(|_| merged) {
        if drive.bitmap(x).is_some_and(|b| !b.recording) {
            actions.push(action("block-dirty-bitmap-enable", &drive.node, x));
        }
    }
    if !actions.is_empty() {
        transaction(qmp, actions)?;
        drive.bitmaps = super::drives::bitmaps_in(&super::drives::nodes(qmp)?, &drive.node);
    }
    let mut d = Decision {
        tidied,
        ..Decision::default()
    };
    let Some(p) = parent else {
        return Ok(d);
    };
    let at = format!("on node {}", drive.node);
    let why = match (&keep, keep.as_deref().and_then(|k| drive.bitmap(k))) {
        (None, _) => Some(format!(
            "parent snapshot {} created no bitmap (it was not made from a running VM or by \
             --bitmap auto)",
            p.id.short()
        )),
        (Some(x), None) => Some(format!(
            "bitmap {x}, which parent snapshot {} created, is gone {at} (removed, or the VM \
             was restarted from an image that cannot store bitmaps)",
            p.id.short()
        )),
        (Some(x), Some(b)) => {
            d.old = Some(x.clone());
            if b.inconsistent {
                Some(format!(
                    "bitmap {x} {at} is inconsistent: QEMU did not close the image cleanly \
                     while it was recording, so it may miss writes"
                ))
            } else if !b.recording {
                Some(format!(
                    "bitmap {x} {at} is disabled and nothing of an interrupted run covers \
                     the writes since: writes may be missing from it"
                ))
            } else if b.busy {
                Some(format!(
                    "bitmap {x} {at} is in use by another QEMU operation"
                ))
            } else {
                d.read = Some(x.clone());
                None
            }
        }
    };
    if let Some(why) = why {
        d.notes
            .push(format!("{why}; compared every slot by hash instead"));
    }
    Ok(d)
}

/// The transaction actions of the point in time for one drive: add `new`, disable `read`.
pub fn actions(drive: &Drive, new: &str, read: Option<&str>) -> Vec<Value> {
    let mut add = action("block-dirty-bitmap-add", &drive.node, new);
    // Only a qcow2 image stores bitmaps; elsewhere the bitmap lives as long as the process.
    add["data"]["persistent"] = Value::Bool(drive.driver == "qcow2");
    let mut a = vec![add];
    a.extend(read.map(|x| action("block-dirty-bitmap-disable", &drive.node, x)));
    a
}

/// After a commit: remove the parent's bitmap `old`. Returns its name once removed.
pub fn retire(qmp: &mut Qmp, drive: &Drive, old: &str) -> Result<String> {
    transaction(
        qmp,
        vec![action("block-dirty-bitmap-remove", &drive.node, old)],
    )?;
    Ok(old.to_owned())
}

/// After a failure: fold the run's bitmap `new` back into `read` (if it was read, and so
/// disabled) and remove `new`, leaving the drive as the run found it.
pub fn restore(qmp: &mut Qmp, drive: &Drive, new: &str, read: Option<&str>) -> Result<()> {
    let mut a = Vec::new();
    if let Some(x) = read {
        a.push(merge(&drive.node, x, new));
        a.push(action("block-dirty-bitmap-enable", &drive.node, x));
    }
    a.push(action("block-dirty-bitmap-remove", &drive.node, new));
    transaction(qmp, a)
}

fn action(kind: &str, node: &str, name: &str) -> Value {
    json!({"type": kind, "data": {"node": node, "name": name}})
}

fn merge(node: &str, target: &str, source: &str) -> Value {
    json!({"type": "block-dirty-bitmap-merge", "data": {
        "node": node, "target": target, "bitmaps": [source],
    }})
}

fn transaction(qmp: &mut Qmp, actions: Vec<Value>) -> Result<()> {
    qmp.execute("transaction", json!({ "actions": actions }))
        .map(drop)
}
