//! Sorted, merged lists of byte ranges, built run by run: how a qcow2 allocation map and
//! dirty bitmaps stay compact (one range per run of clusters or bits, never one entry per
//! cluster), and how a layout's ciphertext is listed.

use std::ops::Range;

/// Append `r` (starting at or after the start of the last range) to a sorted, merged list,
/// extending the last range when they touch or overlap; empty ranges are dropped.
pub(crate) fn push(list: &mut Vec<Range<u64>>, r: Range<u64>) {
    if r.is_empty() {
        return;
    }
    match list.last_mut() {
        Some(last) if last.end >= r.start => last.end = last.end.max(r.end),
        _ => list.push(r),
    }
}

/// The union of two sorted, merged lists, sorted and merged.
pub(crate) fn union(a: &[Range<u64>], b: &[Range<u64>]) -> Vec<Range<u64>> {
    let mut out = Vec::with_capacity(a.len() + b.len());
    let (mut i, mut j) = (0, 0);
    while let Some(r) = match (a.get(i), b.get(j)) {
        (Some(x), Some(y)) if x.start <= y.start => {
            i += 1;
            Some(x)
        }
        (_, Some(y)) => {
            j += 1;
            Some(y)
        }
        (Some(x), None) => {
            i += 1;
            Some(x)
        }
        (None, None) => None,
    } {
        push(&mut out, r.clone());
    }
    out
}

/// The intersection of two sorted, merged lists.
pub(crate) fn intersect(a: &[Range<u64>], b: &[Range<u64>]) -> Vec<Range<u64>> {
    let mut out = Vec::new();
    let (mut i, mut j) = (0, 0);
    while let (Some(x), Some(y)) = (a.get(i), b.get(j)) {
        push(&mut out, x.start.max(y.start)..x.end.min(y.end));
        if x.end <= y.end {
            i += 1;
        } else {
            j += 1;
        }
    }
    out
}

/// `ranges` in any order, possibly overlapping, as a sorted, merged list.
pub(crate) fn merged(mut ranges: Vec<Range<u64>>) -> Vec<Range<u64>> {
    ranges.sort_by_key(|r| r.start);
    let mut out = Vec::with_capacity(ranges.len());
    for r in ranges {
        push(&mut out, r);
    }
    out
}

/// `range` without the bytes of `holes` (any order, possibly overlapping), sorted.
pub(crate) fn subtract(range: Range<u64>, holes: &[Range<u64>]) -> Vec<Range<u64>> {
    let mut out = Vec::new();
    let mut at = range.start;
    for h in merged(holes.to_vec()) {
        push(&mut out, at..h.start.min(range.end));
        at = at.max(h.end);
    }
    push(&mut out, at..range.end);
    out
}

/// Push the parts of guest range `guest`, stored from host offset `host_start` on, that lie
/// in the host extents `host` (sorted, merged): each mapped back to its guest offsets.
pub(crate) fn push_mapped(
    list: &mut Vec<Range<u64>>,
    guest: Range<u64>,
    host_start: u64,
    host: &[Range<u64>],
) {
    let host_end = host_start + (guest.end - guest.start);
    let first = host.partition_point(|e| e.end <= host_start);
    for e in host[first..].iter().take_while(|e| e.start < host_end) {
        let (from, to) = (e.start.max(host_start), e.end.min(host_end));
        push(
            list,
            guest.start + (from - host_start)..guest.start + (to - host_start),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn push_merges_touching_runs() {
        let mut v = Vec::new();
        for r in [0..10, 10..20, 20..20, 30..40, 35..50] {
            push(&mut v, r);
        }
        assert_eq!(v, vec![0..20, 30..50]);
    }

    #[test]
    fn union_and_intersection() {
        let a = [0..10, 20..30, 50..60];
        let b = [5..25, 30..35, 70..80];
        assert_eq!(union(&a, &b), vec![0..35, 50..60, 70..80]);
        assert_eq!(intersect(&a, &b), vec![5..10, 20..25]);
        assert_eq!(union(&a, &[]), a.to_vec());
        assert!(intersect(&a, &[]).is_empty());
    }

    #[test]
    fn merged_and_subtract() {
        assert_eq!(
            merged(vec![5..9, 0..2, 1..3, 9..9, 8..12]),
            vec![0..3, 5..12]
        );
        // Holes in any order, overlapping, and reaching outside the range.
        assert_eq!(
            subtract(10..100, &[60..70, 0..20, 65..80, 95..200]),
            vec![20..60, 80..95]
        );
        assert_eq!(subtract(10..100, &[]), vec![10..100]);
        assert!(subtract(10..100, &[0..50, 40..200]).is_empty());
    }

    #[test]
    fn mapped_runs_keep_only_what_the_host_holds() {
        let host = [0..100, 200..300, 1000..1100];
        let mut v = Vec::new();
        // Guest 5000..5400 stored at host 50..450: host data 50..100 and 200..300.
        push_mapped(&mut v, 5000..5400, 50, &host);
        assert_eq!(v, vec![5000..5050, 5150..5250]);
        // Stored in a hole: nothing. Stored inside one extent: all of it.
        push_mapped(&mut v, 6000..6050, 400, &host);
        push_mapped(&mut v, 7000..7050, 1010, &host);
        assert_eq!(v, vec![5000..5050, 5150..5250, 7000..7050]);
        // A run ending exactly where an extent starts takes nothing from it.
        let mut w = Vec::new();
        push_mapped(&mut w, 0..100, 100, &host);
        assert!(w.is_empty(), "{w:?}");
    }
}
