//! Extents a backup may reference without storing them: its parent's, and those an
//! interrupted run of the same disk made durable ([`super::resume`]). One table for both, so
//! workers skip sealing either kind and the writer carries either into the new snapshot the
//! same way.
//!
//! ```text
//! packs:   [ parent's pack table … | resumed packs … ]
//! extents: id → (pack index into the table above, offset, length, plain length)
//! ```

use std::collections::HashMap;

use crate::crypto::ExtentId;
use crate::vault::checkpoint::Checkpoint;
use crate::vault::manifest::{ExtentLoc, Manifest};
use crate::vault::pack::PackId;

/// The extents and packs a run can reference.
#[derive(Default)]
pub struct Known {
    /// Extent id → where it is; `pack` indexes [`Known::packs`].
    pub extents: HashMap<ExtentId, ExtentLoc>,
    /// Packs and their sizes: the parent's first, in the parent's order, then resumed ones.
    pub packs: Vec<(PackId, u64)>,
    /// How many of `packs` are the parent's.
    parent_packs: usize,
}

impl Known {
    /// What `parent` stores (nothing without one).
    pub fn of_parent(parent: Option<&Manifest>) -> Known {
        let Some(p) = parent else {
            return Known::default();
        };
        Known {
            extents: p.extents.iter().map(|x| (x.id, *x)).collect(),
            packs: p.packs.clone(),
            parent_packs: p.packs.len(),
        }
    }

    /// Add the extents of a checkpoint's pack; content the table already has keeps its
    /// place (the parent's copy first). Returns the pack's bytes of extents added.
    pub fn add_resumed(&mut self, c: &Checkpoint) -> u64 {
        let pack = self.packs.len() as u32;
        self.packs.push((c.pack, c.pack_size));
        let mut added = 0;
        for e in &c.extents {
            self.extents.entry(e.id).or_insert_with(|| {
                added += e.len as u64;
                ExtentLoc { pack, ..*e }
            });
        }
        added
    }

    /// Whether pack index `pack` is a resumed pack (its frames are new to the snapshot).
    pub fn is_resumed(&self, pack: u32) -> bool {
        pack as usize >= self.parent_packs
    }
}
