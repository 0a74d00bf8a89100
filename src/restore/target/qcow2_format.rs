//! The bytes of the qcow2 images a restore writes: version 3, 64 KiB clusters, 16-bit
//! refcounts, no backing file, no extensions (QEMU's `docs/interop/qcow2.txt`; the fields
//! are listed in docs/ARCHITECTURE.md, "Restore targets"). Pure functions: the target
//! decides where data clusters go, this module where the metadata goes and what it says.
//!
//! ```text
//!  cluster 0             header (104 bytes, then the end-of-extensions marker)
//!  1 .. data_end         data clusters, in the order the restore threads allocated them
//!  l2_first ..           one L2 table per 512 MiB of the disk that holds data
//!  l1_first ..           the L1 table: 8 bytes per 512 MiB of the disk
//!  rt_first ..           the refcount table: 8 bytes per refcount block
//!  rb_first .. clusters  refcount blocks: 2 bytes per cluster of the file, 32768 a block
//! ```
//! Every cluster of the file is used exactly once, so every refcount is 1 and every L1 and
//! L2 entry carries `QCOW_OFLAG_COPIED` (bit 63), which `qemu-img check` requires of a
//! cluster whose refcount is 1. Clusters of zeros are not allocated: with no backing file
//! an unallocated cluster reads as zeros.

use crate::error::{Error, Result};

/// log2 of the cluster size.
pub(super) const CLUSTER_BITS: u32 = 16;
/// Cluster size, QEMU's default.
pub(super) const CLUSTER: u64 = 1 << CLUSTER_BITS;
/// Entries of an L2 table (one cluster of u64): it maps 512 MiB.
pub(super) const L2_ENTRIES: u64 = CLUSTER / 8;
/// QEMU counts the virtual size in 512-byte sectors: a disk must be a whole number of them.
pub(super) const SECTOR: u64 = 512;
/// The largest L1 table QEMU opens (32 MiB), so the largest disk: 2 PiB.
const MAX_L1_ENTRIES: u64 = (32 << 20) / 8;

const MAGIC: [u8; 4] = *b"QFI\xfb";
const VERSION: u32 = 3;
/// Refcounts of 2^4 = 16 bits, QEMU's default.
const REFCOUNT_ORDER: u32 = 4;
const REFCOUNTS_PER_BLOCK: u64 = (CLUSTER * 8) >> REFCOUNT_ORDER;
/// The version 3 header without optional fields.
const HEADER_LEN: usize = 104;
/// `QCOW_OFLAG_COPIED`: the cluster's refcount is 1, it may be written in place.
const COPIED: u64 = 1 << 63;

/// Where an image's metadata goes, in clusters, once its data clusters are written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Plan {
    /// Virtual disk size in bytes.
    size: u64,
    /// First L2 table.
    pub(super) l2_first: u64,
    /// L1 entries.
    l1_size: u64,
    /// First cluster of the L1 table.
    pub(super) l1_first: u64,
    /// First cluster of the refcount table.
    pub(super) rt_first: u64,
    /// Clusters of the refcount table.
    rt_clusters: u64,
    /// First refcount block.
    pub(super) rb_first: u64,
    /// Refcount blocks.
    pub(super) rb_count: u64,
    /// Clusters in the file.
    clusters: u64,
}

/// Whether a disk of `size` bytes fits a qcow2 image of this shape; Usage error if not.
pub(super) fn check_size(size: u64, name: &str) -> Result<()> {
    if !size.is_multiple_of(SECTOR) {
        return Err(Error::usage(format!(
            "cannot restore a {size}-byte disk as qcow2 image {name}: qcow2 images hold whole \
             {SECTOR}-byte sectors (restore it raw with --format raw)"
        )));
    }
    if size.div_ceil(CLUSTER * L2_ENTRIES) > MAX_L1_ENTRIES {
        return Err(Error::usage(format!(
            "cannot restore a {size}-byte disk as qcow2 image {name}: larger than a qcow2 \
             image of {CLUSTER}-byte clusters can be"
        )));
    }
    Ok(())
}

impl Plan {
    /// The layout after `data_end` clusters (the header and the data) with `l2_tables` L2
    /// tables, for a disk of `size` bytes (checked by [`check_size`]).
    pub(super) fn new(size: u64, data_end: u64, l2_tables: u64) -> Plan {
        let l1_size = size.div_ceil(CLUSTER * L2_ENTRIES);
        let l2_first = data_end;
        let l1_first = l2_first + l2_tables;
        let rt_first = l1_first + (l1_size * 8).div_ceil(CLUSTER);
        // The refcount blocks count themselves and the table that lists them: grow both
        // until they cover the whole file (a few rounds at most; both only grow).
        let (mut rt_clusters, mut rb_count) = (1, 1);
        loop {
            let clusters = rt_first + rt_clusters + rb_count;
            let rb = clusters.div_ceil(REFCOUNTS_PER_BLOCK);
            let rt = (rb * 8).div_ceil(CLUSTER);
            if (rt, rb) == (rt_clusters, rb_count) {
                break;
            }
            (rt_clusters, rb_count) = (rt, rb);
        }
        Plan {
            size,
            l2_first,
            l1_size,
            l1_first,
            rt_first,
            rt_clusters,
            rb_first: rt_first + rt_clusters,
            rb_count,
            clusters: rt_first + rt_clusters + rb_count,
        }
    }

    /// Bytes in the file: the data, then the metadata.
    pub(super) fn len(&self) -> u64 {
        self.clusters * CLUSTER
    }

    /// Cluster 0's bytes: the header and the end-of-extensions marker (the rest is zeros).
    pub(super) fn header(&self) -> Vec<u8> {
        let mut h = Vec::with_capacity(HEADER_LEN + 8);
        h.extend(MAGIC);
        h.extend(VERSION.to_be_bytes());
        h.extend(0u64.to_be_bytes()); // backing file offset
        h.extend(0u32.to_be_bytes()); // backing file name length
        h.extend(CLUSTER_BITS.to_be_bytes());
        h.extend(self.size.to_be_bytes());
        h.extend(0u32.to_be_bytes()); // no encryption
        h.extend((self.l1_size as u32).to_be_bytes());
        let l1_offset = if self.l1_size == 0 {
            0
        } else {
            self.l1_first * CLUSTER
        };
        h.extend(l1_offset.to_be_bytes());
        h.extend((self.rt_first * CLUSTER).to_be_bytes());
        h.extend((self.rt_clusters as u32).to_be_bytes());
        h.extend(0u32.to_be_bytes()); // snapshots
        h.extend(0u64.to_be_bytes()); // snapshot table offset
        h.extend(0u64.to_be_bytes()); // incompatible features
        h.extend(0u64.to_be_bytes()); // compatible features
        h.extend(0u64.to_be_bytes()); // autoclear features
        h.extend(REFCOUNT_ORDER.to_be_bytes());
        h.extend((HEADER_LEN as u32).to_be_bytes());
        debug_assert_eq!(h.len(), HEADER_LEN);
        h.extend([0u8; 8]); // extension type 0 (end), length 0
        h
    }

    /// The L1 table for L2 tables of `l1_indexes` (ascending), stored from `l2_first` on.
    pub(super) fn l1_table(&self, l1_indexes: impl Iterator<Item = u64>) -> Vec<u8> {
        let mut t = vec![0u8; (self.l1_size * 8) as usize];
        for (k, i) in l1_indexes.enumerate() {
            let entry = COPIED | ((self.l2_first + k as u64) * CLUSTER);
            t[i as usize * 8..i as usize * 8 + 8].copy_from_slice(&entry.to_be_bytes());
        }
        t
    }

    /// The refcount table: the offset of every refcount block.
    pub(super) fn refcount_table(&self) -> Vec<u8> {
        let mut t = vec![0u8; (self.rt_clusters * CLUSTER) as usize];
        for b in 0..self.rb_count {
            let at = b as usize * 8;
            t[at..at + 8].copy_from_slice(&((self.rb_first + b) * CLUSTER).to_be_bytes());
        }
        t
    }

    /// Refcount block `b`: 1 for every cluster of the file it covers, 0 past the end.
    pub(super) fn refcount_block(&self, b: u64) -> Vec<u8> {
        let mut t = vec![0u8; CLUSTER as usize];
        let first = b * REFCOUNTS_PER_BLOCK;
        let used = self.clusters.saturating_sub(first).min(REFCOUNTS_PER_BLOCK);
        for i in 0..used as usize {
            t[i * 2..i * 2 + 2].copy_from_slice(&1u16.to_be_bytes());
        }
        t
    }
}

/// An L2 table's bytes from its entries: host byte offsets of data clusters, 0 where the
/// cluster is unallocated.
pub(super) fn l2_table(entries: &[u64]) -> Vec<u8> {
    entries
        .iter()
        .flat_map(|&host| {
            let e = if host == 0 { 0 } else { COPIED | host };
            e.to_be_bytes()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_image_layout() {
        // 1 GiB disk, 3 data clusters in 2 L2 tables.
        let p = Plan::new(1 << 30, 4, 2);
        assert_eq!((p.l2_first, p.l1_first, p.rt_first), (4, 6, 7));
        assert_eq!(
            (p.rt_clusters, p.rb_first, p.rb_count, p.clusters),
            (1, 8, 1, 9)
        );
        let h = p.header();
        assert_eq!(&h[..4], b"QFI\xfb");
        assert_eq!(h.len(), HEADER_LEN + 8);
        let be32 = |at: usize| u32::from_be_bytes(h[at..at + 4].try_into().unwrap());
        let be64 = |at: usize| u64::from_be_bytes(h[at..at + 8].try_into().unwrap());
        assert_eq!((be32(4), be32(20), be64(24), be32(36)), (3, 16, 1 << 30, 2));
        assert_eq!((be64(40), be64(48), be32(56)), (6 << 16, 7 << 16, 1));
        assert_eq!((be32(96), be32(100)), (4, 104));
        let l1 = p.l1_table([1u64].into_iter());
        assert_eq!(l1.len(), 16);
        assert_eq!(&l1[..8], &[0; 8]);
        assert_eq!(
            u64::from_be_bytes(l1[8..16].try_into().unwrap()),
            COPIED | 4 << 16
        );
        let rb = p.refcount_block(0);
        assert!(rb[..18].chunks(2).all(|c| c == [0, 1]) && rb[18..].iter().all(|&b| b == 0));
        let rt = p.refcount_table();
        assert_eq!(u64::from_be_bytes(rt[..8].try_into().unwrap()), 8 << 16);
        assert_eq!(
            l2_table(&[0, 5 << 16]),
            [vec![0; 8], (COPIED | 5 << 16).to_be_bytes().to_vec()].concat()
        );
    }

    #[test]
    fn refcounts_cover_themselves() {
        // Just below and across the 32768 clusters one refcount block covers.
        for data_end in [32_760, 32_765, 32_766, 32_767, 100_000, 40_000_000] {
            let p = Plan::new(1 << 40, data_end, 3);
            assert!(p.rb_count * REFCOUNTS_PER_BLOCK >= p.clusters, "{p:?}");
            assert!((p.rb_count - 1) * REFCOUNTS_PER_BLOCK < p.clusters, "{p:?}");
            assert!(p.rt_clusters * (CLUSTER / 8) >= p.rb_count, "{p:?}");
            assert_eq!(p.clusters, p.rb_first + p.rb_count);
        }
        // An empty disk: no L1 table at all.
        let p = Plan::new(0, 1, 0);
        assert_eq!((p.l1_size, p.rt_first), (0, 1));
        assert_eq!(&p.header()[40..48], &[0; 8]);
    }

    #[test]
    fn sizes_qcow2_cannot_hold_are_refused() {
        assert!(check_size(1 << 40, "x").is_ok());
        let e = check_size(1000, "x.qcow2").unwrap_err();
        assert!(e.to_string().contains("whole 512-byte sectors"), "{e}");
        assert!(check_size(1 << 62, "x").is_err());
    }
}
