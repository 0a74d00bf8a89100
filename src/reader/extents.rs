//! Which bytes of a snapshot hold data and which read as zeros, answered from the manifest
//! alone: a zero slot stores nothing, and in an overlaid slot without a base only its
//! overlays hold data. Nothing is fetched, so a map of a 1 TiB sparse disk costs a walk over
//! its slot table.

use std::ops::Range;

use crate::ranges;
use crate::vault::manifest::{Manifest, Overlay, Slot, ZERO};

/// What a run of bytes is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ExtentKind {
    /// Stored data (which may still happen to be zeros).
    Data,
    /// Nothing stored: a hole that reads as zeros.
    Zero,
}

/// A run of bytes of one kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extent {
    /// Disk bytes.
    pub range: Range<u64>,
    /// What they are.
    pub kind: ExtentKind,
}

/// The runs of `m` covering `range` (clipped to the disk), adjacent runs of one kind merged.
pub fn extents(m: &Manifest, range: Range<u64>) -> Vec<Extent> {
    let range = range.start.min(m.disk_size)..range.end.min(m.disk_size);
    let mut out: Vec<Extent> = Vec::new();
    let mut push = |r: Range<u64>, kind: ExtentKind| {
        let r = r.start.max(range.start)..r.end.min(range.end);
        if r.is_empty() {
            return;
        }
        match out.last_mut() {
            Some(last) if last.kind == kind && last.range.end == r.start => last.range.end = r.end,
            _ => out.push(Extent { range: r, kind }),
        }
    };
    if range.is_empty() {
        return out;
    }
    let ss = u64::from(m.slot_size);
    for i in (range.start / ss) as usize..range.end.div_ceil(ss) as usize {
        let start = i as u64 * ss;
        let end = start + u64::from(m.slot_len(i as u64));
        match &m.slots[i] {
            Slot::Zero => push(start..end, ExtentKind::Zero),
            Slot::Extent(_) => push(start..end, ExtentKind::Data),
            Slot::Overlaid(o) if o.base != ZERO => push(start..end, ExtentKind::Data),
            Slot::Overlaid(o) => {
                let mut at = start;
                for r in overlay_data(&o.overlays) {
                    push(at..start + r.start, ExtentKind::Zero);
                    push(start + r.start..start + r.end, ExtentKind::Data);
                    at = start + r.end;
                }
                push(at..end, ExtentKind::Zero);
            }
        }
    }
    out
}

/// The bytes of a baseless slot (offsets within it) that its overlays leave holding data:
/// overlays apply in order, so a later zero overlay clears what an earlier one wrote.
fn overlay_data(overlays: &[Overlay]) -> Vec<Range<u64>> {
    let mut data: Vec<Range<u64>> = Vec::new();
    for ov in overlays {
        let span = u64::from(ov.offset)..u64::from(ov.offset) + u64::from(ov.len);
        data = data
            .into_iter()
            .flat_map(|r| ranges::subtract(r, std::slice::from_ref(&span)))
            .collect();
        if ov.extent != ZERO {
            data = ranges::union(&data, std::slice::from_ref(&span));
        }
    }
    data
}
