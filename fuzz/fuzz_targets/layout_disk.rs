//! Shared by the `partition_table`, `luks` and `bitlocker` targets (included with `#[path]`,
//! not a target itself): a virtual disk over the fuzz input and the properties every
//! [`Layout`] must have, whatever the bytes.

use blockvault::layout::{self, Layout, PartitionTable};
use blockvault::{Error, Result};
use blockvault_fuzz::outcome;

/// Scan a disk of `size` bytes whose first bytes are `image` and the rest zeros (so a small
/// input can still describe a disk with structures megabytes in), then check [`properties`].
pub fn scan(image: &[u8], size: u64) -> Result<Layout> {
    let read = |off: u64, buf: &mut [u8]| -> Result<()> {
        assert!(
            off + buf.len() as u64 <= size,
            "the scan read bytes {off}..{} of a {size}-byte disk",
            off + buf.len() as u64
        );
        buf.fill(0);
        let start = (off as usize).min(image.len());
        let end = (off as usize).saturating_add(buf.len()).min(image.len());
        buf[..end - start].copy_from_slice(&image[start..end]);
        Ok(())
    };
    let r = layout::scan(&read, size);
    if let Ok(l) = &r {
        properties(l, size);
        // With BLOCKVAULT_FUZZ_OUTCOMES, the problems met show which checks a corpus reaches.
        for p in &l.problems {
            let e = Error::integrity(format!("{}: {}", p.structure, p.message));
            outcome("problem", &Err::<(), _>(e));
        }
        for v in &l.volumes {
            outcome(&format!("volume {:?}", v.format), &Ok(()));
        }
    }
    r
}

/// What holds for every layout: a JSON round trip gives it back; ciphertext ranges are
/// sorted, disjoint, non-empty and on the disk; volumes and payloads lie on the disk;
/// rendering works.
pub fn properties(l: &Layout, size: u64) {
    let json = serde_json::to_string(l).unwrap();
    assert_eq!(&serde_json::from_str::<Layout>(&json).unwrap(), l);
    let ranges = l.ciphertext_ranges();
    for r in &ranges {
        assert!(r.start < r.end && r.end <= size, "{ranges:?}");
    }
    for w in ranges.windows(2) {
        assert!(w[0].end < w[1].start, "{ranges:?}");
    }
    for v in &l.volumes {
        assert!(
            v.volume.start < v.volume.end && v.volume.end <= size,
            "{v:?}"
        );
        if let Some(p) = &v.payload {
            assert!(v.volume.start <= p.start && p.start <= p.end && p.end <= v.volume.end);
        }
    }
    if let PartitionTable::Gpt(t) = &l.table {
        assert!(t.sector_size == 512 || t.sector_size == 4096);
    }
    let _ = l.render();
}
