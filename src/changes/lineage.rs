//! Whether a dirty bitmap may drive an incremental: its lineage to the parent snapshot.
//!
//! A dirty bitmap names the writes made since it was created or last cleared, nothing
//! older. An incremental that reads only what bitmap X names and carries every other slot
//! over from parent P is complete only if X was already recording when P was read, and kept
//! recording, uncleared, ever since. Nothing in the bitmap itself says when it started, so
//! every snapshot records the bitmaps its source showed at the moment it was read
//! ([`record`], stored in [`SnapshotInfo::bitmaps`]), and X is trusted against P only when:
//!
//! | check | what it rules out |
//! |---|---|
//! | P recorded X | X added after P was read (writes in between unrecorded); P written by an older build that recorded no bitmaps |
//! | X was not in use then | a bitmap a crashed QEMU left stale |
//! | X was enabled then (qcow2; NBD does not say, so there presence is all) | writes made while it was disabled |
//! | same granularity, where both are known | X removed and re-added under the same name |
//! | X marks now at least the bytes it marked then | X cleared, or replaced by a younger bitmap of the same name (a bitmap only accumulates until cleared) |
//!
//! These are necessary, not sufficient: a bitmap disabled and re-enabled between backups, or
//! cleared and then dirtied beyond its old count, passes them. `--verify-unchanged` is the
//! second line (`engine::spotcheck`).

use crate::error::Result;
use crate::source::{BitmapInfo, Source};
use crate::vault::info::{BitmapRecord, SnapshotInfo};

impl From<BitmapInfo> for BitmapRecord {
    fn from(b: BitmapInfo) -> Self {
        BitmapRecord {
            name: b.name,
            granularity: b.granularity,
            enabled: b.enabled,
            in_use: b.in_use,
            dirty_bytes: b.dirty_bytes,
        }
    }
}

/// The dirty bitmaps `source` shows now, as a snapshot records them. Taken before the
/// source's data is read: a write after this moment is either in the snapshot or counted by
/// every bitmap recorded here as recording.
pub fn record(source: &dyn Source) -> Result<Vec<BitmapRecord>> {
    Ok(source.bitmaps()?.into_iter().map(Into::into).collect())
}

/// Why bitmap `now` (as the source shows it now, its dirty bytes counted from the claim)
/// cannot name every write since parent snapshot `parent_id` was read, given what that
/// parent recorded; `None` when its lineage holds. A parent written by an older build
/// (manifest version 1) reads with an empty record and never vouches.
pub fn broken(parent: &SnapshotInfo, parent_id: &str, now: &BitmapRecord) -> Option<String> {
    let name = &now.name;
    let Some(then) = parent.bitmap(name) else {
        return Some(if parent.bitmaps.is_empty() {
            format!(
                "parent snapshot {parent_id} recorded no dirty bitmaps (its source had none \
                 when it was read, or an older blockvault made it), so nothing shows bitmap \
                 {name} was recording then"
            )
        } else {
            format!(
                "bitmap {name} did not exist when parent snapshot {parent_id} was read: it was \
                 added later, so writes made before it was added are not in it"
            )
        });
    };
    if then.in_use {
        return Some(format!(
            "bitmap {name} was in use (left stale by a QEMU that did not close it) when parent \
             snapshot {parent_id} was read"
        ));
    }
    if then.enabled == Some(false) {
        return Some(format!(
            "bitmap {name} was disabled when parent snapshot {parent_id} was read: writes made \
             while it was disabled are not in it"
        ));
    }
    if let (Some(was), Some(is)) = (then.granularity, now.granularity) {
        if was != is {
            return Some(format!(
                "bitmap {name} had a granularity of {was} bytes when parent snapshot \
                 {parent_id} was read and has {is} now: it was removed and added again"
            ));
        }
    }
    if let (Some(was), Some(is)) = (then.dirty_bytes, now.dirty_bytes) {
        if is < was {
            return Some(format!(
                "bitmap {name} marks {is} bytes dirty now, fewer than the {was} it marked when \
                 parent snapshot {parent_id} was read: it was cleared or replaced since"
            ));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qcow2(name: &str, granularity: u64, enabled: bool, dirty: u64) -> BitmapRecord {
        BitmapRecord {
            name: name.into(),
            granularity: Some(granularity),
            enabled: Some(enabled),
            in_use: false,
            dirty_bytes: Some(dirty),
        }
    }

    fn nbd(name: &str, dirty: u64) -> BitmapRecord {
        BitmapRecord {
            name: name.into(),
            granularity: None,
            enabled: None,
            in_use: false,
            dirty_bytes: Some(dirty),
        }
    }

    fn parent(bitmaps: Vec<BitmapRecord>) -> SnapshotInfo {
        SnapshotInfo {
            bitmaps,
            ..SnapshotInfo::default()
        }
    }

    fn why(parent: &SnapshotInfo, now: &BitmapRecord) -> String {
        broken(parent, "0123abcd", now).expect("lineage should be broken")
    }

    #[test]
    fn a_bitmap_recording_since_the_parent_and_grown_is_trusted() {
        let p = parent(vec![
            qcow2("a", 65536, true, 0),
            qcow2("b", 4096, true, 8192),
        ]);
        assert_eq!(broken(&p, "p", &qcow2("b", 4096, true, 8192)), None);
        assert_eq!(broken(&p, "p", &qcow2("b", 4096, true, 1 << 20)), None);
        assert_eq!(broken(&p, "p", &qcow2("a", 65536, true, 0)), None);
    }

    #[test]
    fn over_nbd_presence_is_enough() {
        // NBD shows neither state nor granularity, at the parent or now.
        let p = parent(vec![nbd("a", 4096)]);
        assert_eq!(broken(&p, "p", &nbd("a", 4096)), None);
        // A parent read from the qcow2 file itself, the incremental over NBD.
        let p = parent(vec![qcow2("a", 65536, true, 0)]);
        assert_eq!(broken(&p, "p", &nbd("a", 65536)), None);
        // An NBD parent vouches for presence only; fewer dirty bytes still break it.
        let p = parent(vec![nbd("a", 65536)]);
        assert!(why(&p, &qcow2("a", 65536, true, 0)).contains("cleared or replaced"));
    }

    #[test]
    fn a_bitmap_the_parent_did_not_record_is_not_trusted() {
        let p = parent(vec![qcow2("a", 65536, true, 0)]);
        let w = why(&p, &qcow2("b", 65536, true, 0));
        assert!(
            w.contains("bitmap b did not exist when parent snapshot 0123abcd was read"),
            "{w}"
        );
    }

    #[test]
    fn a_parent_from_an_older_build_never_vouches() {
        // A version 1 manifest reads with the default (empty) info.
        let w = why(&SnapshotInfo::default(), &qcow2("a", 65536, true, 0));
        assert!(w.contains("recorded no dirty bitmaps"), "{w}");
        assert!(w.contains("older blockvault"), "{w}");
    }

    #[test]
    fn a_bitmap_disabled_or_in_use_at_the_parent_is_not_trusted() {
        let p = parent(vec![qcow2("a", 65536, false, 0)]);
        assert!(why(&p, &qcow2("a", 65536, true, 0)).contains("was disabled when parent"));
        let mut stale = qcow2("a", 65536, true, 0);
        stale.in_use = true;
        let p = parent(vec![stale]);
        assert!(why(&p, &qcow2("a", 65536, true, 0)).contains("was in use"));
    }

    #[test]
    fn a_bitmap_re_added_with_another_granularity_is_not_trusted() {
        let p = parent(vec![qcow2("a", 65536, true, 0)]);
        let w = why(&p, &qcow2("a", 4096, true, 1 << 20));
        assert!(w.contains("granularity of 65536 bytes"), "{w}");
        assert!(w.contains("has 4096 now"), "{w}");
    }

    #[test]
    fn a_bitmap_marking_fewer_bytes_than_at_the_parent_is_not_trusted() {
        let p = parent(vec![qcow2("a", 65536, true, 3 << 16)]);
        let w = why(&p, &qcow2("a", 65536, true, 1 << 16));
        assert!(
            w.contains("marks 65536 bytes dirty now, fewer than the 196608"),
            "{w}"
        );
        // Unknown counts on either side cannot be compared: presence decides.
        let mut unknown = qcow2("a", 65536, true, 0);
        unknown.dirty_bytes = None;
        assert_eq!(broken(&p, "p", &unknown), None);
    }
}
