//! Is this source the disk it is backed up as? A backup compares its source with the disk's
//! latest snapshot before writing anything, so that another disk given under an existing
//! name does not silently become that disk's next snapshot.
//!
//! | what differs from the latest snapshot | outcome |
//! |---|---|
//! | the partition table's identity: GPT disk GUID, MBR disk signature (a table gone counts) | refused ([`ErrorKind::Usage`]) naming both values and the snapshot, unless `--force`; forced, a warning |
//! | the size | a warning: a disk may grow or shrink, but a size change is also what another disk looks like |
//! | only the source's path | a note (the same disk reached another way: a moved image, `/dev/disk/by-id/…`) |
//!
//! Warnings and notes are printed, reported, and kept in the new snapshot's
//! [`crate::vault::info::SnapshotInfo::notes`]. A disk whose latest snapshot recorded no
//! layout, no partition table or an MBR without a signature (0: Windows writes one when it
//! first sees the disk) has no identity to compare: a first partitioning is not refused.

use crate::error::{Error, Result};
use crate::layout::{Layout, PartitionTable};
use crate::source::Source;
use crate::util::human_bytes;
use crate::vault::manifest::Manifest;

/// What a disk's latest snapshot says about the source it was read from.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// `disk@shortid`, for messages.
    snapshot: String,
    /// The source's name when it was read.
    source: String,
    size: u64,
    /// The partition table identity; `None` when the snapshot recorded no readable layout.
    table: Option<Option<TableId>>,
}

impl Recorded {
    /// What `m` recorded.
    pub fn of(m: &Manifest) -> Recorded {
        let layout = serde_json::from_str::<Layout>(&m.layout).ok();
        Recorded {
            snapshot: format!("{}@{}", m.disk_name, m.id.short()),
            source: m.source.clone(),
            size: m.disk_size,
            table: layout.as_ref().map(TableId::of),
        }
    }
}

/// The identity a partition table gives its disk.
#[derive(Debug, Clone, PartialEq, Eq)]
enum TableId {
    Gpt(String),
    Mbr(String),
}

impl TableId {
    fn of(layout: &Layout) -> Option<TableId> {
        match &layout.table {
            PartitionTable::Gpt(t) => Some(TableId::Gpt(t.disk_guid.clone())),
            PartitionTable::Mbr(t) if !is_zero_signature(&t.disk_signature) => {
                Some(TableId::Mbr(t.disk_signature.clone()))
            }
            _ => None,
        }
    }
}

/// A signature of 0 is no signature (see the module doc).
fn is_zero_signature(signature: &str) -> bool {
    signature
        .strip_prefix("0x")
        .is_some_and(|hex| hex.bytes().all(|b| b == b'0'))
}

impl std::fmt::Display for TableId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TableId::Gpt(guid) => write!(f, "GPT disk GUID {guid}"),
            TableId::Mbr(signature) => write!(f, "MBR disk signature {signature}"),
        }
    }
}

/// How a table identity reads in a message, none included.
fn describe(id: Option<&TableId>) -> String {
    id.map_or_else(
        || "no partition table identity (no table, or an MBR without a disk signature)".into(),
        TableId::to_string,
    )
}

/// What a backup found worth saying about its source.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Remarks {
    /// Differences that may mean another disk.
    pub warnings: Vec<String>,
    /// Differences that are only worth knowing.
    pub notes: Vec<String>,
}

impl Remarks {
    /// The lines the snapshot keeps, as printed.
    pub fn recorded(&self) -> Vec<String> {
        let warnings = self.warnings.iter().map(|w| format!("warning: {w}"));
        warnings
            .chain(self.notes.iter().map(|n| format!("note: {n}")))
            .collect()
    }
}

/// Compare `source` (whose scan found `layout`, `None` if its headers could not be read)
/// with the disk's latest snapshot, if it has one. Errors: a different partition table
/// identity without `force` -> [`crate::ErrorKind::Usage`].
pub fn compare(
    latest: Option<&Recorded>,
    source: &dyn Source,
    layout: Option<&Layout>,
    force: bool,
) -> Result<Remarks> {
    let mut remarks = Remarks::default();
    let Some(latest) = latest else {
        return Ok(remarks);
    };
    let name = source.name();
    let now = layout.map(TableId::of);
    let mut same_identity = None;
    if let (Some(Some(was)), Some(now)) = (&latest.table, &now) {
        if Some(was) == now.as_ref() {
            same_identity = Some(was.clone());
        } else {
            let what = format!(
                "source {name} has {}, but the disk's latest snapshot {} (of {}) has {was}",
                describe(now.as_ref()),
                latest.snapshot,
                latest.source
            );
            if !force {
                return Err(Error::usage(format!(
                    "{what}: it looks like another disk; back it up under another --disk name, \
                     or pass --force if it is this disk with a new partition table"
                )));
            }
            remarks
                .warnings
                .push(format!("{what} (backed up anyway: --force)"));
        }
    }
    if source.size() != latest.size {
        remarks.warnings.push(format!(
            "source {name} is {} ({} bytes), but the disk's latest snapshot {} (of {}) is {} ({} bytes): is it the same disk?",
            human_bytes(source.size()),
            source.size(),
            latest.snapshot,
            latest.source,
            human_bytes(latest.size),
            latest.size
        ));
    }
    if name != latest.source {
        let identity = same_identity.map_or_else(String::new, |id| format!(", same {id}"));
        remarks.notes.push(format!(
            "source {name} is not the source of the disk's latest snapshot {} ({}{identity})",
            latest.snapshot, latest.source
        ));
    }
    // The caller prints them; at the default log level a warning here would print twice.
    for line in remarks.recorded() {
        tracing::info!(source = name, "{line}");
    }
    Ok(remarks)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_mbr_signatures_are_no_identity() {
        assert!(is_zero_signature("0x00000000"));
        assert!(!is_zero_signature("0x0000a1b2"));
        assert!(!is_zero_signature("garbage"));
    }

    #[test]
    fn remarks_are_recorded_as_printed() {
        let r = Remarks {
            warnings: vec!["size".into()],
            notes: vec!["path".into()],
        };
        assert_eq!(r.recorded(), vec!["warning: size", "note: path"]);
    }
}
