//! `--bitmap auto`: blockvault rotates a qcow2 image's dirty bitmaps itself, so the bitmap
//! an incremental reads always started at its parent's point in time.
//!
//! ```text
//! probe: open the image (refused if another process holds it for writing), list its bitmaps,
//!        close it                               (the reader holds QEMU's shared locks)
//! lock:  <disk id>-bitmaps in the vault         (two auto runs of a disk never interleave)
//! clean: remove orphans: blockvault-<32 hex> bitmaps no snapshot of the disk created and
//!        that are not the parent's              (left by a killed run)
//! add:   blockvault-<new snapshot id>           (qemu-img bitmap --add --enable)
//! back up, reading the bitmap the parent created (info.bitmap_created); the new snapshot
//!        records the one just added         ──failure or interrupt──▶ remove the bitmap
//!                                                                     just added
//! commit ──▶ remove the parent's bitmap         (a failure is a warning)
//! ```
//! Every step before the commit leaves the chain as it was: the parent's bitmap stays until
//! a snapshot that no longer needs it is committed. A run killed between `add` and the
//! commit leaves its bitmap behind, recording uselessly; the next run removes it. The
//! bitmap's name carries the snapshot id, so every instance is unique and a name never
//! comes back after removal (the lineage check could not tell a re-added one apart
//! otherwise). One image, one vault disk: another vault's `--bitmap auto` bitmaps look like
//! orphans here.

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use super::{BackupOptions, BackupReport, ChangeClaim, ParentSpec, Progress};
use crate::changes::qemu_img;
use crate::crypto::secret::random_bytes;
use crate::error::{Error, Result};
use crate::source::{self, nbd, OpenOptions, SourceKind};
use crate::vault::manifest::{ChangeSource, Manifest, SnapshotId};
use crate::vault::Vault;

/// The prefix of the bitmaps `--bitmap auto` adds.
pub const PREFIX: &str = "blockvault-";

/// What an auto backup did to the image's bitmaps, besides the backup itself.
#[derive(Debug, Clone)]
pub struct AutoReport {
    /// The backup.
    pub backup: BackupReport,
    /// The bitmap added for the next backup (also in `backup.info.bitmap_created`).
    pub created: String,
    /// Bitmaps removed: orphans of killed runs, then the parent's.
    pub removed: Vec<String>,
}

/// The bitmap `--bitmap auto` adds for snapshot `id`.
pub fn name_for(id: &SnapshotId) -> String {
    format!("{PREFIX}{}", id.hex())
}

/// Whether `name` has the shape of a bitmap `--bitmap auto` adds.
pub fn is_ours(name: &str) -> bool {
    name.strip_prefix(PREFIX).is_some_and(|hex| {
        hex.len() == 32
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// Check that `path` is a qcow2 image file that no other process holds for writing, and list
/// its bitmaps; the image is closed again on return. NBD exports, raw images and block
/// devices are usage errors: their bitmaps are not blockvault's to add.
pub fn probe(path: &str, open: &OpenOptions) -> Result<Vec<String>> {
    let rotation = "rotate bitmaps as README \"Change sources\" describes (add the next \
                    bitmap at the snapshot's point in time, back up with --bitmap PREVIOUS, \
                    remove the previous one after the backup succeeded)";
    if nbd::is_nbd_url(path) {
        return Err(Error::usage(format!(
            "--bitmap auto adds bitmaps to qcow2 image files; {path} is an NBD export, whose \
             bitmaps belong to the QEMU serving it: {rotation}"
        )));
    }
    let src = source::open(path, open)?;
    if src.kind() != SourceKind::Qcow2 {
        return Err(Error::usage(format!(
            "--bitmap auto adds bitmaps to qcow2 image files; {path} is a {}, which carries \
             no dirty bitmaps (convert it to qcow2, or export it over NBD and {rotation})",
            src.kind()
        )));
    }
    Ok(src.bitmaps()?.into_iter().map(|b| b.name).collect())
}

/// Back up the qcow2 image at `path` with `opts` (its change claim and snapshot id are set
/// here), rotating the image's blockvault bitmaps (module doc).
pub fn backup(
    vault: &Vault,
    path: &str,
    open: &OpenOptions,
    opts: &BackupOptions,
    progress: &dyn Progress,
) -> Result<AutoReport> {
    let present = probe(path, open)?;
    let image = Path::new(path);
    let disk = vault.find_disk(&opts.disk)?;
    let _lock = match &disk {
        Some(d) => Some(
            vault
                .store()
                .lock(&format!("{}-bitmaps", d.id_hex()), Duration::ZERO)
                .map_err(|e| e.within(format!("disk {}", opts.disk)))?,
        ),
        None => None,
    };
    let history = match &disk {
        Some(d) => vault.snapshots(d)?,
        None => Vec::new(),
    };
    let parent: Option<Manifest> = match (&opts.parent, &disk) {
        (ParentSpec::Latest, _) => history.last().cloned(),
        (ParentSpec::Id(id), Some(d)) => Some(vault.resolve_snapshot(d, id)?),
        (ParentSpec::None, _) | (ParentSpec::Id(_), None) => None,
    };
    let parents_bitmap = parent.as_ref().and_then(|p| p.info.bitmap_created.clone());

    let mut removed = remove_orphans(image, &present, &history, parents_bitmap.as_deref());
    let id = SnapshotId(random_bytes()?);
    let created = name_for(&id);
    qemu_img::add(image, &created)?;

    let mut o = opts.clone();
    o.snapshot_id = Some(id);
    o.info.bitmap_created = Some(created.clone());
    if let Some(p) = &parent {
        // The parent whose bitmap is read, whatever another process commits meanwhile.
        o.parent = ParentSpec::Id(p.id.hex());
    }
    let reading = match (&parent, &parents_bitmap) {
        (Some(_), Some(b)) if present.contains(b) => Some(b.as_str()),
        (Some(p), made) => {
            let why = match made {
                None => format!(
                    "parent snapshot {} was not made with --bitmap auto and created no bitmap",
                    p.id.short()
                ),
                Some(b) => format!(
                    "bitmap {b}, which parent snapshot {} created, is gone from {path}",
                    p.id.short()
                ),
            };
            let note = format!("--bitmap auto: {why}; compared every slot by hash");
            tracing::warn!(image = path, "{note}");
            o.info.notes.push(note);
            None
        }
        (None, _) => None,
    };
    let result = (|| {
        // Interrupted (SIGINT/SIGTERM) so far: unwind like any failure, removing the bitmap.
        crate::interrupt::check()?;
        let src = source::open(path, open)?;
        o.changes = match reading {
            Some(b) => Some(ChangeClaim {
                source: ChangeSource::Bitmap,
                detail: format!("bitmap {b}"),
                list: src.dirty_ranges(b)?,
                covers: None,
                bitmap: Some(b.to_owned()),
            }),
            None => None,
        };
        super::backup(vault, src.as_ref(), &o, progress)
        // The image is closed here, before qemu-img runs again.
    })();
    let report = match result {
        Ok(r) => r,
        Err(e) => {
            // No snapshot names the new bitmap: it would only record writes for nothing.
            if let Err(r) = qemu_img::remove(image, &created) {
                tracing::warn!(image = path, bitmap = %created, error = %r, "cannot remove the bitmap this failed backup added; the next --bitmap auto run removes it");
            }
            return Err(e);
        }
    };
    if let Some(b) = reading {
        match qemu_img::remove(image, b) {
            Ok(()) => removed.push(b.to_owned()),
            Err(e) => {
                tracing::warn!(image = path, bitmap = b, error = %e, "the snapshot is committed, but the parent's bitmap could not be removed (QEMU keeps recording into it); remove it with qemu-img bitmap --remove")
            }
        }
    }
    Ok(AutoReport {
        backup: report,
        created,
        removed,
    })
}

/// Remove the bitmaps among `present` that `--bitmap auto` added (by name) but that no
/// snapshot in `history` created and that are not `keep` (the parent's): left by runs killed
/// before their commit. Failures are warnings; returns what was removed.
fn remove_orphans(
    image: &Path,
    present: &[String],
    history: &[Manifest],
    keep: Option<&str>,
) -> Vec<String> {
    let created: HashSet<&str> = history
        .iter()
        .filter_map(|m| m.info.bitmap_created.as_deref())
        .collect();
    let mut removed = Vec::new();
    for name in present {
        if !is_ours(name) || created.contains(name.as_str()) || keep == Some(name.as_str()) {
            continue;
        }
        match qemu_img::remove(image, name) {
            Ok(()) => {
                tracing::info!(image = %image.display(), bitmap = %name, "removed a bitmap an interrupted --bitmap auto run left");
                removed.push(name.clone());
            }
            Err(e) => {
                tracing::warn!(image = %image.display(), bitmap = %name, error = %e, "cannot remove a bitmap an interrupted --bitmap auto run left")
            }
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_the_snapshot_id_after_the_prefix() {
        let name = name_for(&SnapshotId([0xab; 16]));
        assert_eq!(name, format!("blockvault-{}", "ab".repeat(16)));
        assert!(is_ours(&name));
        for other in [
            "blockvault-",
            "blockvault-ABABABABABABABABABABABABABABABAB",
            "blockvault-abababababababababababababababab0",
            "bv-1",
            "my-blockvault-abababababababababababababababab",
        ] {
            assert!(!is_ours(other), "{other}");
        }
    }
}
