//! Sub-slot incrementals: when a slot's content changed, compare it with the parent's content
//! of the same slot, 4 KiB block by block, and store only the changed runs as overlays on the
//! parent's pieces. A 4 KiB write then costs a 4 KiB frame, not a whole 1 MiB slot.
//!
//! ```text
//!  parent slot:  base ──── (+ its overlays)
//!  new content:  ▒▒▒▒▒▒▒▒▒▒▒█▒▒▒▒▒▒▒▒▒▒▒▒▒▒▒▒██▒▒▒▒
//!  new slot:     base, parent overlays, then overlays for █ (applied in order by restore)
//! ```
//! A slot is stored whole instead when the overlays would cost more than they save: more than
//! [`MAX_OVERLAYS`] pieces (so restore never follows a long chain), or more than half the
//! slot covered by overlays. Rewriting whole is what merges a chain.

use std::collections::HashMap;
use std::ops::Range;

use super::worker::{Outcome, WorkerContext};
use crate::crypto::ExtentId;
use crate::error::Result;
use crate::reader::slot_content;
use crate::vault::manifest::{Manifest, Slot, CONTENT_UNHASHED, ZERO};
use crate::vault::{Disk, Vault};

/// Granularity of change detection against the parent.
pub const BLOCK: usize = 4096;
/// Most overlays a slot carries; more and it is stored whole.
pub const MAX_OVERLAYS: usize = 64;

/// Whether a slot of `len` bytes is stored whole rather than as overlays that would number
/// `overlays` and cover `covered` bytes, the parent's counted in both: past [`MAX_OVERLAYS`],
/// or over half the slot. The rule of the hash comparison here and of change lists
/// (engine/plan.rs) alike: overlays that newer ones shadow would otherwise pile up, each
/// keeping a forgotten snapshot's pack alive for prune.
pub fn store_whole(len: u64, overlays: usize, covered: u64) -> bool {
    overlays > MAX_OVERLAYS || 2 * covered > len
}

/// Where a worker reads the parent's content.
pub struct ParentView<'a> {
    /// The vault.
    pub vault: &'a Vault,
    /// The disk, with its keys.
    pub disk: &'a Disk,
    /// The parent snapshot.
    pub manifest: &'a Manifest,
    /// Content id → index of the parent's overlaid slots, so that an unchanged overlaid slot
    /// is recognised by its hash alone.
    pub overlaid: HashMap<ExtentId, usize>,
}

impl<'a> ParentView<'a> {
    /// A view of `manifest`'s content.
    pub fn new(vault: &'a Vault, disk: &'a Disk, manifest: &'a Manifest) -> Self {
        let overlaid = manifest
            .slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| match s {
                Slot::Overlaid(o) if o.content != CONTENT_UNHASHED => Some((o.content, i)),
                _ => None,
            })
            .collect();
        ParentView {
            vault,
            disk,
            manifest,
            overlaid,
        }
    }
}

/// What one changed run holds.
pub enum Piece {
    /// All zeros: nothing stored.
    Zero,
    /// Content the parent already stores.
    Known(ExtentId),
    /// New content sealed into a frame.
    New {
        /// Its id.
        id: ExtentId,
        /// The sealed frame.
        frame: Vec<u8>,
    },
}

/// A parent overlay by id: (offset, length, extent or `None` for zeros).
pub type ParentOverlay = (u32, u32, Option<ExtentId>);

/// A changed run of a slot.
pub struct NewOverlay {
    /// Offset within the slot.
    pub offset: u32,
    /// Length.
    pub len: u32,
    /// Its content.
    pub piece: Piece,
}

/// A slot stored as the parent's pieces plus new overlays. Parent pieces are named by extent
/// id (`None` = zeros) so the writer can map them into the new snapshot's tables.
pub struct Overlaid {
    /// Keyed id of the whole slot's new content.
    pub content: ExtentId,
    /// The parent's base.
    pub base: Option<ExtentId>,
    /// The parent's overlays.
    pub parent_overlays: Vec<ParentOverlay>,
    /// The changed runs.
    pub new: Vec<NewOverlay>,
}

/// Runs of 4 KiB blocks where `new` differs from `old` (equal lengths), adjacent blocks merged.
pub fn changed_runs(old: &[u8], new: &[u8]) -> Vec<Range<usize>> {
    let mut runs: Vec<Range<usize>> = Vec::new();
    for (i, (a, b)) in old.chunks(BLOCK).zip(new.chunks(BLOCK)).enumerate() {
        if a == b {
            continue;
        }
        let (start, end) = (i * BLOCK, i * BLOCK + b.len());
        match runs.last_mut() {
            Some(r) if r.end == start => r.end = end,
            _ => runs.push(start..end),
        }
    }
    runs
}

impl ParentView<'_> {
    /// The parent's structure of slot `i` as ids.
    fn pieces(&self, i: usize) -> (Option<ExtentId>, Vec<ParentOverlay>) {
        let m = self.manifest;
        let id = |e: u32| (e != ZERO).then(|| m.extents[e as usize].id);
        match &m.slots[i] {
            Slot::Zero => (None, Vec::new()),
            Slot::Extent(e) => (id(*e), Vec::new()),
            Slot::Overlaid(o) => (
                id(o.base),
                o.overlays
                    .iter()
                    .map(|o| (o.offset, o.len, id(o.extent)))
                    .collect(),
            ),
        }
    }
}

impl ParentView<'_> {
    /// Slot `i` carried over unchanged from the parent (a change list says it did not change).
    pub fn carried(&self, i: usize) -> Outcome {
        let m = self.manifest;
        match &m.slots[i] {
            Slot::Zero => Outcome::Zero,
            Slot::Extent(e) => Outcome::Known(m.extents[*e as usize].id),
            Slot::Overlaid(o) => {
                let (base, parent_overlays) = self.pieces(i);
                Outcome::Overlaid(Overlaid {
                    content: o.content,
                    base,
                    parent_overlays,
                    new: Vec::new(),
                })
            }
        }
    }

    /// Slot `i` as the parent's pieces with `new` laid over them: the changed ranges a change
    /// list named, read on their own. The assembled content is not hashed (that would need
    /// the parent's bytes).
    pub fn overlay_on(&self, i: usize, mut new: Vec<NewOverlay>) -> Overlaid {
        new.sort_by_key(|n| n.offset);
        let (base, parent_overlays) = self.pieces(i);
        Overlaid {
            content: CONTENT_UNHASHED,
            base,
            parent_overlays,
            new,
        }
    }
}

impl WorkerContext<'_> {
    /// A parent slot stored as overlays whose assembled content has id `content`, carried
    /// over as it is.
    pub fn same_as_parent_overlaid(&self, content: ExtentId) -> Option<Overlaid> {
        let parent = self.parent.as_ref()?;
        let &i = parent.overlaid.get(&content)?;
        let (base, parent_overlays) = parent.pieces(i);
        Some(Overlaid {
            content,
            base,
            parent_overlays,
            new: Vec::new(),
        })
    }

    /// Try to store slot `slot` (content `data` with id `content`, which the parent does not
    /// hold) as overlays on the parent's slot. `None`: store it whole.
    pub fn try_overlay(
        &self,
        slot: u64,
        content: ExtentId,
        data: &[u8],
    ) -> Result<Option<Overlaid>> {
        let Some(parent) = &self.parent else {
            return Ok(None);
        };
        let i = slot as usize;
        let m = parent.manifest;
        if i >= m.slots.len() || m.slot_len(slot) as usize != data.len() {
            return Ok(None);
        }
        let (base, parent_overlays) = parent.pieces(i);
        let old = match slot_content(parent.vault, parent.disk, m, i) {
            Ok(Some(old)) => old,
            Ok(None) => vec![0u8; data.len()],
            Err(e) => {
                // A damaged parent must not stop new backups: store this slot whole.
                tracing::warn!(slot, error = %e, "cannot read the parent's slot; storing it whole");
                return Ok(None);
            }
        };
        let runs = changed_runs(&old, data);
        let covered: u64 = runs.iter().map(|r| r.len() as u64).sum::<u64>()
            + parent_overlays.iter().map(|o| u64::from(o.1)).sum::<u64>();
        if store_whole(
            data.len() as u64,
            parent_overlays.len() + runs.len(),
            covered,
        ) {
            return Ok(None);
        }
        let mut new = Vec::with_capacity(runs.len());
        for r in runs {
            new.push(NewOverlay {
                offset: r.start as u32,
                len: r.len() as u32,
                piece: self.piece(slot * self.slot_size as u64 + r.start as u64, &data[r])?,
            });
        }
        Ok(Some(Overlaid {
            content,
            base,
            parent_overlays,
            new,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_merge_adjacent_blocks_and_keep_a_short_tail() {
        let old = vec![0u8; 5 * BLOCK + 100];
        let mut new = old.clone();
        new[BLOCK + 1] = 1;
        new[2 * BLOCK + 7] = 1;
        new[5 * BLOCK + 99] = 1;
        assert_eq!(
            changed_runs(&old, &new),
            vec![BLOCK..3 * BLOCK, 5 * BLOCK..5 * BLOCK + 100]
        );
        assert!(changed_runs(&old, &old).is_empty());
    }
}
