//! What a snapshot records about how it was made, beyond its slot table: the dirty bitmaps
//! its source carried when it was read, the bitmap the backup created for the next one, and
//! warnings worth keeping with the snapshot.
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
}

fn is_zero(n: &u32) -> bool {
    *n == 0
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
        };
        assert_eq!(SnapshotInfo::from_json(&info.to_json(), "m").unwrap(), info);
        // Unknown fields are ignored, missing ones default.
        let later = r#"{"bitmaps":[{"name":"x","in_use":false,"future":1}],"group":{}}"#;
        let read = SnapshotInfo::from_json(later, "m").unwrap();
        assert_eq!(read.bitmap("x").unwrap().enabled, None);
        assert_eq!(read.bitmap_created, None);
        assert!(SnapshotInfo::from_json("[1]", "m").is_err());
    }
}
