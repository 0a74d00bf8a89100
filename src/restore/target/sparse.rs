//! Runs of zero and non-zero blocks in a buffer: what a sparse target skips (a file, a qcow2
//! image) or sends as zeroing requests (an NBD export) instead of writing the zeros.

use std::ops::Range;

use crate::engine::worker::is_zero;

/// Granularity of holes left in restored files (the usual filesystem block).
pub(super) const BLOCK: usize = 4096;

/// The maximal runs of `data` made of `block`-byte blocks (the last one may be shorter) that
/// are all zero (`true`) or not (`false`), in order, covering all of `data`.
pub(super) fn runs(data: &[u8], block: usize) -> Vec<(Range<usize>, bool)> {
    let mut out: Vec<(Range<usize>, bool)> = Vec::new();
    for (i, b) in data.chunks(block).enumerate() {
        let at = i * block;
        let zero = is_zero(b);
        match out.last_mut() {
            Some((run, z)) if *z == zero => run.end = at + b.len(),
            _ => out.push((at..at + b.len(), zero)),
        }
    }
    out
}

/// The non-zero runs of `data` (see [`runs`]).
pub(super) fn data_runs(data: &[u8], block: usize) -> impl Iterator<Item = Range<usize>> {
    runs(data, block)
        .into_iter()
        .filter_map(|(r, zero)| (!zero).then_some(r))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_cover_everything_and_alternate() {
        let mut d = vec![0u8; 5 * BLOCK + 100];
        d[BLOCK + 7] = 1;
        d[2 * BLOCK] = 1;
        d[5 * BLOCK + 99] = 1;
        assert_eq!(
            runs(&d, BLOCK),
            vec![
                (0..BLOCK, true),
                (BLOCK..3 * BLOCK, false),
                (3 * BLOCK..5 * BLOCK, true),
                (5 * BLOCK..5 * BLOCK + 100, false)
            ]
        );
        assert_eq!(
            data_runs(&d, BLOCK).collect::<Vec<_>>(),
            vec![BLOCK..3 * BLOCK, 5 * BLOCK..5 * BLOCK + 100]
        );
        assert!(runs(&[], BLOCK).is_empty());
        assert_eq!(runs(&[0; 10], BLOCK), vec![(0..10, true)]);
    }
}
