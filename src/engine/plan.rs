//! Which slots a backup must read: those that overlap a range the source says may hold data.
//! Slots entirely inside holes are recorded as zero without a single read.

use std::ops::Range;

use crate::io::ReadRequest;

/// The slots to read, as read requests tagged with their slot index.
pub fn slots_to_read(data: &[Range<u64>], disk_size: u64, slot_size: u32) -> Vec<ReadRequest> {
    let ss = slot_size as u64;
    let mut out: Vec<ReadRequest> = Vec::new();
    for r in data {
        let end = r.end.min(disk_size);
        if r.start >= end {
            continue;
        }
        for slot in r.start / ss..=(end - 1) / ss {
            if out.last().is_some_and(|l| l.tag >= slot) {
                continue;
            }
            let offset = slot * ss;
            out.push(ReadRequest {
                tag: slot,
                offset,
                len: (disk_size - offset).min(ss) as usize,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holes_are_skipped_and_tail_is_short() {
        let reqs = slots_to_read(&[0..10, 5000..5001, 9000..10_000], 10_000, 4096);
        let tags: Vec<u64> = reqs.iter().map(|r| r.tag).collect();
        assert_eq!(tags, vec![0, 1, 2]);
        assert_eq!(reqs[2].len, 10_000 - 8192);
        let reqs = slots_to_read(&[0..4096, 4096..4097], 8192, 4096);
        assert_eq!(reqs.len(), 2);
        assert!(slots_to_read(&[], 8192, 4096).is_empty());
    }
}
