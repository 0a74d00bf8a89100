//! What a snapshot records about how it was made, beyond its slot table: the dirty bitmaps
//! its source carried when it was read, the bitmap the backup created for the next one,
//! warnings worth keeping with the snapshot, and the group of disks it was taken with.
//!
//! Stored in the manifest (version 2 on) as one JSON object, inside the manifest's seal, so
//! it is as authentic as the slot table. JSON because these records grow with the sources and
//! change tracking blockvault learns (QMP groups, consistency): a field this build does not
//! know is ignored, a field it knows but is missing takes its default. Every field a later
//! build adds must keep that reading safe (an older build that ignores it must not trust a
//! change source more than the fields it knows allow).

use serde::{Deserialize, Serialize};

/// The record (docs/FORMAT.md, "Manifest info").
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SnapshotInfo {
    /// The dirty bitmaps of the source at the moment it was read, in the order it listed
    /// them. An incremental trusts a bitmap only if its parent recorded it here as present
    /// and recording.
    pub bitmaps: Vec<BitmapRecord>,
    /// The bitmap this backup added to its source before reading it (`--bitmap auto`): it
    /// records every write after this snapshot's point in time, so the next backup reads it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bitmap_created: Option<String>,
    /// Warnings about this snapshot, as printed when it was made (another source under the
    /// disk's name, a change source not trusted, ...).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
    /// The DEK generation whose keys made this snapshot's extent ids and digest (0 until
    /// `key rotate --new-dek` starts a new identity).
    #[serde(skip_serializing_if = "is_zero")]
    pub identity_generation: u32,
    /// The disks of one VM backed up at one point in time (`backup qmp://`): every member
    /// carries the whole record, so any one of them names the others.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<GroupRecord>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// A group: the snapshots of a VM's disks taken at one point in time (docs/FORMAT.md,
/// "Manifest info"). Every member's manifest holds the same record, sealed under its own
/// disk's key, so the group and the VM's configuration survive the loss of any member.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct GroupRecord {
    /// 32 hex digits, random.
    pub id: String,
    /// The VM's name (QEMU's `-name`, or as given).
    pub vm: String,
    /// The point in time: Unix seconds when QEMU applied the transaction.
    pub time: u64,
    /// Whether the guest's filesystems were frozen at the point in time.
    pub consistency: Consistency,
    /// Every disk of the group, in the order of `--disk-map`.
    pub members: Vec<GroupMember>,
    /// The VM's configuration as given with `--vm-config`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vm_config: Option<VmConfig>,
}

/// What a group's point in time is consistent with.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Consistency {
    /// As if the VM lost power at that moment (no guest agent, or its freeze failed). The
    /// default: a record that does not say never claims more.
    #[default]
    Crash,
    /// The guest agent froze the guest's filesystems (`guest-fsfreeze-freeze`) around it.
    Application,
}

/// One disk of a group.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct GroupMember {
    /// The vault disk.
    pub disk: String,
    /// The QEMU block node (or device) it was read from.
    pub node: String,
    /// Its snapshot's id, 32 hex digits.
    pub snapshot: String,
}

/// A VM's configuration file kept with its group (libvirt domain XML, a QEMU command line).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct VmConfig {
    /// The file's name when it was given (no folder), the name it is restored under.
    pub name: String,
    /// Its content (UTF-8 text).
    pub text: String,
}

/// A dirty bitmap as the source showed it when read.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct BitmapRecord {
    /// Its name.
    pub name: String,
    /// Bytes per bit, where the source says (qcow2); `None` over NBD.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub granularity: Option<u64>,
    /// Whether it was recording writes, where the source says (qcow2); `None` over NBD,
    /// which does not carry the state.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// Left in use by a QEMU that did not close it cleanly.
    pub in_use: bool,
    /// Bytes it marked dirty at that moment, where known: a bitmap only accumulates until
    /// cleared, so fewer dirty bytes later means it was cleared or replaced in between.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dirty_bytes: Option<u64>,
}

impl SnapshotInfo {
    /// The bitmap called `name`, if the source had one when this snapshot was read.
    pub fn bitmap(&self, name: &str) -> Option<&BitmapRecord> {
        self.bitmaps.iter().find(|b| b.name == name)
    }

    /// The JSON stored in the manifest.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("snapshot info serialises")
    }

    /// Parse the stored JSON; `what` names the manifest for the error.
    pub fn from_json(json: &str, what: &str) -> crate::Result<SnapshotInfo> {
        serde_json::from_str(json)
            .map_err(|e| crate::Error::integrity(format!("{what}: snapshot info: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_tolerance() {
        let info = SnapshotInfo {
            bitmaps: vec![BitmapRecord {
                name: "bv-1".into(),
                granularity: Some(65536),
                enabled: Some(true),
                in_use: false,
                dirty_bytes: Some(4096),
            }],
            bitmap_created: Some("bv-2".into()),
            notes: vec!["a note".into()],
            identity_generation: 2,
            group: Some(GroupRecord {
                id: "ab".repeat(16),
                vm: "vm1".into(),
                time: 1_700_000_000,
                consistency: Consistency::Application,
                members: vec![GroupMember {
                    disk: "vm1-a".into(),
                    node: "drive0".into(),
                    snapshot: "cd".repeat(16),
                }],
                vm_config: Some(VmConfig {
                    name: "vm1.xml".into(),
                    text: "<domain/>".into(),
                }),
            }),
        };
        assert_eq!(SnapshotInfo::from_json(&info.to_json(), "m").unwrap(), info);
        // Unknown fields are ignored, missing ones default.
        let later = r#"{"bitmaps":[{"name":"x","in_use":false,"future":1}],"later":{}}"#;
        let read = SnapshotInfo::from_json(later, "m").unwrap();
        assert_eq!(read.bitmap("x").unwrap().enabled, None);
        assert_eq!(read.bitmap_created, None);
        assert!(SnapshotInfo::from_json("[1]", "m").is_err());
        // A group record without its consistency claims no more than a crash-consistent one.
        let bare = r#"{"group":{"id":"x","members":[{"disk":"a"}]}}"#;
        let g = SnapshotInfo::from_json(bare, "m").unwrap().group.unwrap();
        assert_eq!(g.consistency, Consistency::Crash);
        assert_eq!(g.members[0].snapshot, "");
    }
}
