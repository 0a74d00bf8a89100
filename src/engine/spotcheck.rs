//! `--verify-unchanged N`: a dirty bitmap or range list is a claim about the disk. Before a
//! backup trusts it, re-read a random sample of the slots it says are unchanged and compare
//! each with the parent's slot. One difference and the claim is not trusted for any slot.
//!
//! What is sampled, and why (docs/ARCHITECTURE.md, "Checking a change claim"):
//! - only slots that can differ: a slot the parent holds as zero and the source holds as a
//!   hole reads as zeros whatever the claim says, so re-reading it proves nothing;
//! - at least N, at least as many as the claim marks changed, and at least
//!   [`FLOOR_BYTES`] of slots: a claim of a few scattered changes is exactly the one whose
//!   missing write is hardest to notice, and re-reading a few dozen MiB costs tens of
//!   milliseconds on local storage;
//! - at most [`CAP_BYTES`] of slots beyond N, so a claim of many changes (each read in
//!   4 KiB pieces) is not re-read whole slot by whole slot.

use super::worker::is_zero;
use crate::crypto::secret::random_bytes;
use crate::error::Result;
use crate::io::{self, AlignedBuf};
use crate::reader::slot_content;
use crate::source::Source;
use crate::vault::manifest::{Manifest, Slot, CONTENT_UNHASHED};
use crate::vault::{Disk, Vault};
use std::ops::Range;

/// Bytes of slots re-read however little the claim marks (unless N is 0).
pub const FLOOR_BYTES: u64 = 32 << 20;
/// Bytes of slots the claim's size can add to N.
pub const CAP_BYTES: u64 = 256 << 20;

/// What `--verify-unchanged` re-read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Sampled {
    /// Slots re-read.
    pub slots: u64,
    /// Bytes re-read.
    pub bytes: u64,
    /// Slots the claim calls unchanged that could differ from the parent (the pool the
    /// sample was drawn from).
    pub candidates: u64,
}

/// The outcome of a spot check.
#[derive(Debug, Clone, Copy)]
pub struct SpotCheck {
    /// What was re-read.
    pub sampled: Sampled,
    /// The first slot found to differ from the parent; the check stops there.
    pub differs: Option<u64>,
}

/// How many of `candidates` slots to re-read for `--verify-unchanged n` when the claim marks
/// `changed` slots, with slots of `slot_size` bytes.
pub fn sample_size(n: usize, changed: u64, candidates: usize, slot_size: u32) -> usize {
    if n == 0 {
        return 0;
    }
    let ss = u64::from(slot_size);
    let scaled = changed.max(FLOOR_BYTES / ss).min(CAP_BYTES / ss);
    (n as u64).max(scaled).min(candidates as u64) as usize
}

/// The `carried` slots (sorted) that could differ from `parent`: those holding data in the
/// parent, or overlapping the source's `data` ranges (sorted).
pub fn candidates(parent: &Manifest, carried: &[u64], data: &[Range<u64>]) -> Vec<u64> {
    let ss = u64::from(parent.slot_size);
    let mut data = data.iter().peekable();
    carried
        .iter()
        .copied()
        .filter(|&slot| {
            let (start, end) = (slot * ss, slot * ss + u64::from(parent.slot_len(slot)));
            while data.next_if(|r| r.end <= start).is_some() {}
            let source_data = data.peek().is_some_and(|r| r.start < end);
            source_data || !matches!(parent.slots.get(slot as usize), Some(Slot::Zero))
        })
        .collect()
}

/// Re-read a random sample of the `carried` slots (sized by [`sample_size`], drawn from
/// [`candidates`]) and compare each with `parent`; stops at the first that differs.
#[allow(clippy::too_many_arguments)]
pub fn check(
    vault: &Vault,
    disk: &Disk,
    parent: &Manifest,
    source: &dyn Source,
    carried: &[u64],
    changed: u64,
    data: &[Range<u64>],
    n: usize,
) -> Result<SpotCheck> {
    let mut pool = candidates(parent, carried, data);
    let mut sampled = Sampled {
        candidates: pool.len() as u64,
        ..Sampled::default()
    };
    let wanted = sample_size(n, changed, pool.len(), parent.slot_size);
    // A partial Fisher-Yates shuffle: `wanted` distinct slots, uniformly.
    for i in 0..wanted {
        let r = u64::from_le_bytes(random_bytes()?);
        let j = i + (r % (pool.len() - i) as u64) as usize;
        pool.swap(i, j);
    }
    pool.truncate(wanted);
    pool.sort_unstable();
    let align = source.alignment().max(4096);
    let mut buf = AlignedBuf::new(parent.slot_size as usize, align);
    for slot in pool {
        let len = parent.slot_len(slot) as usize;
        buf.set_len(len);
        io::read_exact_at(source, slot * parent.slot_size as u64, &mut buf)?;
        sampled.slots += 1;
        sampled.bytes += len as u64;
        let same = same_as_parent(vault, disk, parent, slot, &buf)?;
        tracing::debug!(
            slot,
            same,
            "re-read a slot the change source says is unchanged"
        );
        if !same {
            return Ok(SpotCheck {
                sampled,
                differs: Some(slot),
            });
        }
    }
    Ok(SpotCheck {
        sampled,
        differs: None,
    })
}

/// Whether `buf`, slot `slot` as read now, equals the parent's slot.
fn same_as_parent(
    vault: &Vault,
    disk: &Disk,
    parent: &Manifest,
    slot: u64,
    buf: &[u8],
) -> Result<bool> {
    let id = || disk.identity.extent_id.id(buf);
    Ok(match &parent.slots[slot as usize] {
        Slot::Zero => is_zero(buf),
        Slot::Extent(e) => parent
            .extents
            .get(*e as usize)
            .is_some_and(|x| x.id == id()),
        Slot::Overlaid(o) if o.content != CONTENT_UNHASHED => o.content == id(),
        Slot::Overlaid(_) => {
            slot_content(vault, disk, parent, slot as usize)?.as_deref() == Some(buf)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sample_grows_with_the_claim_within_its_bounds() {
        let mib = 1u32 << 20;
        // Off when asked.
        assert_eq!(sample_size(0, 500, 1000, mib), 0);
        // A claim of one changed slot still re-reads 32 MiB of slots.
        assert_eq!(sample_size(8, 1, 1000, mib), 32);
        // As many as the claim marks changed...
        assert_eq!(sample_size(8, 100, 1000, mib), 100);
        // ... up to 256 MiB of slots; an explicit N above that is honoured.
        assert_eq!(sample_size(8, 5000, 10_000, mib), 256);
        assert_eq!(sample_size(1000, 5000, 10_000, mib), 1000);
        // Never more than there are candidates.
        assert_eq!(sample_size(8, 1, 5, mib), 5);
        // Smaller slots, more of them for the same bytes.
        assert_eq!(sample_size(8, 1, 10_000, 64 << 10), 512);
    }

    #[test]
    fn only_slots_that_can_differ_are_candidates() {
        let ss = 1u64 << 16;
        let mut p = crate::engine::plan::tests::parent(6 * ss, ss as u32);
        p.slots[1] = Slot::Extent(0);
        // Slot 1 holds data in the parent; the source holds two bytes across the boundary of
        // slots 2 and 3, and data past the carried slots; slots 0 and 4 are zero in both.
        let data = [3 * ss - 1..3 * ss + 1, 6 * ss..7 * ss];
        assert_eq!(candidates(&p, &[0, 1, 2, 3, 4], &data), vec![1, 2, 3]);
        assert_eq!(candidates(&p, &[0, 4], &data), Vec::<u64>::new());
    }
}
