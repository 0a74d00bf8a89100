//! `--verify-unchanged N`: a dirty bitmap or range list is a claim about the disk. Before a
//! backup trusts it, re-read N random slots it says are unchanged and compare each with the
//! parent's slot. One difference and the claim is not trusted for any slot.

use std::collections::BTreeSet;

use super::worker::is_zero;
use crate::crypto::secret::random_bytes;
use crate::error::Result;
use crate::io::{self, AlignedBuf};
use crate::restore::slot_content;
use crate::source::Source;
use crate::vault::manifest::{Manifest, Slot, CONTENT_UNHASHED};
use crate::vault::{Disk, Vault};

/// Re-read up to `n` of the `carried` slots (chosen at random) and return the first whose
/// content differs from `parent`'s, or `None` if all match.
pub fn first_difference(
    vault: &Vault,
    disk: &Disk,
    parent: &Manifest,
    source: &dyn Source,
    carried: &[u64],
    n: usize,
) -> Result<Option<u64>> {
    let mut chosen = BTreeSet::new();
    let wanted = n.min(carried.len());
    while chosen.len() < wanted {
        let r = u64::from_le_bytes(random_bytes()?);
        chosen.insert(carried[(r % carried.len() as u64) as usize]);
    }
    let align = source.alignment().max(4096);
    let mut buf = AlignedBuf::new(parent.slot_size as usize, align);
    for slot in chosen {
        let len = parent.slot_len(slot) as usize;
        buf.set_len(len);
        io::read_exact_at(source, slot * parent.slot_size as u64, &mut buf)?;
        let id = || disk.identity.extent_id.id(&buf);
        let same = match &parent.slots[slot as usize] {
            Slot::Zero => is_zero(&buf),
            Slot::Extent(e) => parent
                .extents
                .get(*e as usize)
                .is_some_and(|x| x.id == id()),
            Slot::Overlaid(o) if o.content != CONTENT_UNHASHED => o.content == id(),
            Slot::Overlaid(_) => {
                slot_content(vault, disk, parent, slot as usize)?.as_deref() == Some(&buf[..])
            }
        };
        tracing::debug!(
            slot,
            same,
            "re-read a slot the change source says is unchanged"
        );
        if !same {
            return Ok(Some(slot));
        }
    }
    Ok(None)
}
