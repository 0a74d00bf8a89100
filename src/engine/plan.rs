//! What a backup reads, slot by slot.
//!
//! Without a change list every slot that overlaps a range the source says may hold data is
//! read whole; slots entirely inside holes are zero without a read. With a change list (a
//! dirty bitmap or `--changed`) and a parent:
//! - a slot with no changed byte is carried over from the parent, unread;
//! - a slot changed in a few places has just those ranges read (rounded out to 4 KiB), each
//!   becoming an overlay on the parent's slot;
//! - a slot whose overlays, the parent's included, would cover over half its length or
//!   exceed [`MAX_OVERLAYS`](super::overlay::MAX_OVERLAYS) ([`store_whole`]), or that the
//!   parent does not have at the same length (the disk grew or shrank) is read whole, as
//!   without a change list.

use std::collections::HashMap;
use std::ops::Range;

use super::overlay::{store_whole, BLOCK};
use crate::changes::ChangeList;
use crate::io::ReadRequest;
use crate::vault::manifest::{self, Manifest, Slot};

/// What one read is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Work {
    /// A whole slot.
    Slot(u64),
    /// A changed range of a slot, `offset` bytes into it.
    Piece {
        /// The slot.
        slot: u64,
        /// Offset within the slot.
        offset: u32,
    },
}

/// The reads of a backup and the slots it carries over.
#[derive(Debug, Default)]
pub struct Plan {
    /// What each read is for; a read's tag indexes this.
    pub work: Vec<Work>,
    /// The reads, tagged with their index in `work`, in disk order.
    pub reads: Vec<ReadRequest>,
    /// Slots carried over from the parent unread.
    pub carried: Vec<u64>,
    /// Slots read in pieces, with their number of pieces.
    pub pieces: HashMap<u64, u32>,
}

impl Plan {
    /// Read every slot that overlaps `data` (sorted ranges) whole.
    pub fn whole(data: &[Range<u64>], disk_size: u64, slot_size: u32) -> Plan {
        let ss = slot_size as u64;
        let mut plan = Plan::default();
        for r in data {
            let end = r.end.min(disk_size);
            if r.start >= end {
                continue;
            }
            for slot in r.start / ss..=(end - 1) / ss {
                if plan.work.last() == Some(&Work::Slot(slot)) {
                    continue;
                }
                plan.push_slot(slot, disk_size, ss);
            }
        }
        plan
    }

    /// Read only what `changes` names, carrying the rest over from `parent`. `data` bounds the
    /// slots read whole where the parent has no counterpart (a grown disk).
    pub fn changed(
        changes: &ChangeList,
        parent: &Manifest,
        data: &[Range<u64>],
        disk_size: u64,
    ) -> Plan {
        let ss = parent.slot_size as u64;
        let mut plan = Plan::default();
        let mut data = data.iter().peekable();
        for slot in 0..manifest::slot_count(disk_size, parent.slot_size) {
            let start = slot * ss;
            let len = (disk_size - start).min(ss);
            let same_shape =
                (slot as usize) < parent.slots.len() && parent.slot_len(slot) as u64 == len;
            if !same_shape {
                while data.next_if(|r| r.end <= start).is_some() {}
                if data.peek().is_some_and(|r| r.start < start + len) {
                    plan.push_slot(slot, disk_size, ss);
                }
                continue;
            }
            let ranges = blocks(changes.within(start, start + len), start, len);
            if ranges.is_empty() {
                plan.carried.push(slot);
                continue;
            }
            let changed: u64 = ranges.iter().map(|r| r.end - r.start).sum();
            let (parent_overlays, parent_covered) = match &parent.slots[slot as usize] {
                Slot::Overlaid(o) => (
                    o.overlays.len(),
                    o.overlays.iter().map(|o| u64::from(o.len)).sum(),
                ),
                _ => (0, 0),
            };
            if store_whole(
                len,
                parent_overlays + ranges.len(),
                changed + parent_covered,
            ) {
                plan.push_slot(slot, disk_size, ss);
                continue;
            }
            plan.pieces.insert(slot, ranges.len() as u32);
            for r in ranges {
                plan.reads.push(ReadRequest {
                    tag: plan.work.len() as u64,
                    offset: start + r.start,
                    len: (r.end - r.start) as usize,
                });
                plan.work.push(Work::Piece {
                    slot,
                    offset: r.start as u32,
                });
            }
        }
        plan
    }

    fn push_slot(&mut self, slot: u64, disk_size: u64, ss: u64) {
        let offset = slot * ss;
        self.reads.push(ReadRequest {
            tag: self.work.len() as u64,
            offset,
            len: (disk_size - offset).min(ss) as usize,
        });
        self.work.push(Work::Slot(slot));
    }

    /// Slots read, whole or in pieces.
    pub fn slots_read(&self) -> u64 {
        let whole = self
            .work
            .iter()
            .filter(|w| matches!(w, Work::Slot(_)))
            .count();
        (whole + self.pieces.len()) as u64
    }

    /// Bytes the reads cover.
    pub fn bytes_to_read(&self) -> u64 {
        self.reads.iter().map(|r| r.len as u64).sum()
    }
}

/// `ranges` (absolute, sorted) as offsets within the slot at `start` of `len` bytes, rounded
/// out to [`BLOCK`] and merged.
fn blocks(ranges: impl Iterator<Item = Range<u64>>, start: u64, len: u64) -> Vec<Range<u64>> {
    let b = BLOCK as u64;
    let mut out: Vec<Range<u64>> = Vec::new();
    for r in ranges {
        let (s, e) = (
            (r.start - start) / b * b,
            ((r.end - start).div_ceil(b) * b).min(len),
        );
        match out.last_mut() {
            Some(last) if s <= last.end => last.end = last.end.max(e),
            _ => out.push(s..e),
        }
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::vault::manifest::ChangeSource;

    fn slots(plan: &Plan) -> Vec<u64> {
        plan.work
            .iter()
            .map(|w| match w {
                Work::Slot(s) | Work::Piece { slot: s, .. } => *s,
            })
            .collect()
    }

    #[test]
    fn holes_are_skipped_and_tail_is_short() {
        let plan = Plan::whole(&[0..10, 5000..5001, 9000..10_000], 10_000, 4096);
        assert_eq!(slots(&plan), vec![0, 1, 2]);
        assert_eq!(plan.reads[2].len, 10_000 - 8192);
        assert_eq!(
            Plan::whole(&[0..4096, 4096..4097], 8192, 4096).reads.len(),
            2
        );
        assert!(Plan::whole(&[], 8192, 4096).reads.is_empty());
    }

    /// A parent of all-zero slots.
    pub(crate) fn parent(disk_size: u64, slot_size: u32) -> Manifest {
        let n = manifest::slot_count(disk_size, slot_size) as usize;
        Manifest {
            id: manifest::SnapshotId([0; 16]),
            generation: 0,
            created: 0,
            sequence: 0,
            disk_name: "d".into(),
            source: "s".into(),
            parent: None,
            disk_size,
            slot_size,
            change_source: ChangeSource::Full,
            change_detail: String::new(),
            seals_in_generation: 0,
            stats: Default::default(),
            digest: [0; 32],
            packs: Vec::new(),
            extents: Vec::new(),
            slots: vec![Slot::Zero; n],
            layout: String::new(),
            info: Default::default(),
        }
    }

    #[test]
    fn change_list_reads_pieces_carries_the_rest_and_reads_grown_slots_whole() {
        let ss = 1u32 << 16;
        let p = parent(4 * ss as u64, ss);
        let changes = ChangeList::new(
            1,
            [10..20, 4096..4100, (ss as u64 + 100)..(2 * ss as u64 - 100)],
        );
        // The disk grew by a slot and a bit: slots 4 and 5 are new.
        let size = 5 * ss as u64 + 100;
        let plan = Plan::changed(&changes, &p, std::slice::from_ref(&(0..size)), size);
        assert_eq!(plan.carried, vec![2, 3]);
        assert_eq!(plan.pieces.get(&0), Some(&1));
        assert_eq!(plan.reads[0].offset, 0);
        assert_eq!(
            plan.reads[0].len, 8192,
            "10..20 and 4096..4100 round to one 8 KiB piece"
        );
        // Slot 1 changed almost entirely: read whole. The new slots are read whole.
        assert_eq!(slots(&plan), vec![0, 1, 4, 5]);
        assert!(matches!(plan.work[1], Work::Slot(1)));
        assert_eq!(plan.reads.last().unwrap().len, 100);
        // Shrunk to half a slot: slot 0 changed shape and is read whole.
        let plan = Plan::changed(
            &ChangeList::default(),
            &p,
            std::slice::from_ref(&(0..100)),
            100,
        );
        assert_eq!(plan.work, vec![Work::Slot(0)]);
    }
}
