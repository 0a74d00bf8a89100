//! Change sources: what an incremental backup is told has changed since its parent.
//!
//! A [`ChangeList`] is a claim, from a dirty bitmap ([`crate::source::Source::dirty_ranges`])
//! or a changed-range file ([`file::load`]): byte ranges written since the parent, at some
//! granularity. The engine reads only those ranges and carries every other slot over from the
//! parent without reading it; `--verify-unchanged` spot-checks the claim. A bitmap is
//! trusted only with a lineage to the parent ([`lineage`]); `--bitmap auto` adds and removes
//! a qcow2 image's bitmaps itself through [`qemu_img`].

pub mod file;
pub mod lineage;
pub mod qemu_img;

use std::ops::Range;

/// Sorted, merged, non-empty byte ranges that changed, and the granularity they were
/// recorded at (4 KiB for a fine bitmap; 512 KiB for EBS; 1 for an exact list).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ChangeList {
    /// Bytes per unit of the change source (a power of two, or 1 when unknown/exact).
    pub granularity: u64,
    /// The changed ranges: sorted, non-overlapping, non-adjacent, non-empty.
    pub ranges: Vec<Range<u64>>,
}

impl ChangeList {
    /// Build from ranges in any order, overlapping or not; empty ranges are dropped.
    pub fn new(granularity: u64, ranges: impl IntoIterator<Item = Range<u64>>) -> Self {
        let mut ranges: Vec<Range<u64>> = ranges.into_iter().filter(|r| r.start < r.end).collect();
        ranges.sort_by_key(|r| r.start);
        let mut merged: Vec<Range<u64>> = Vec::with_capacity(ranges.len());
        for r in ranges {
            match merged.last_mut() {
                Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
                _ => merged.push(r),
            }
        }
        ChangeList {
            granularity: granularity.max(1),
            ranges: merged,
        }
    }

    /// The ranges clipped to a disk of `size` bytes.
    pub fn clipped(&self, size: u64) -> Vec<Range<u64>> {
        self.ranges
            .iter()
            .map(|r| r.start..r.end.min(size))
            .filter(|r| r.start < r.end)
            .collect()
    }

    /// Total bytes claimed changed.
    pub fn bytes(&self) -> u64 {
        self.ranges.iter().map(|r| r.end - r.start).sum()
    }

    /// The changed ranges that intersect `[start, end)`, clipped to it.
    pub fn within(&self, start: u64, end: u64) -> impl Iterator<Item = Range<u64>> + '_ {
        let first = self.ranges.partition_point(|r| r.end <= start);
        self.ranges[first..]
            .iter()
            .take_while(move |r| r.start < end)
            .map(move |r| r.start.max(start)..r.end.min(end))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges_sorts_and_drops_empty() {
        let c = ChangeList::new(4096, [8192..12288, 0..4096, 4096..4096, 4000..5000, 20..30]);
        assert_eq!(c.ranges, vec![0..5000, 8192..12288]);
        assert_eq!(c.bytes(), 5000 + 4096);
        assert_eq!(
            c.within(4500, 9000).collect::<Vec<_>>(),
            vec![4500..5000, 8192..9000]
        );
        assert_eq!(c.within(5000, 8192).count(), 0);
        assert_eq!(c.clipped(10_000), vec![0..5000, 8192..10_000]);
        assert_eq!(ChangeList::new(0, []).granularity, 1);
    }
}
