//! qcow2 images as restore targets, written natively (no qemu-img at run time).
//!
//! The restore threads write slots in any order and at once, so the image is built the way
//! it is read, cluster by cluster: a cluster holding a non-zero byte gets the next free host
//! cluster the first time any thread writes to it (under one lock: the map and the counter),
//! and its non-zero 4 KiB runs are written there at once; clusters of zeros are never
//! allocated, and zero runs inside a data cluster stay holes in the file. Only at the end
//! ([`Target::finish`]) do the L2 tables, the L1 table, the refcounts and the header follow
//! (their bytes: [`super::qcow2_format`]); until then the file has no valid header, so a
//! restore that stops half-way never leaves something that looks like a finished image.
//!
//! Memory: one 64 KiB L2 table per 512 MiB of the disk that holds data, created when that
//! region gets its first data cluster; a 1 TiB disk with a few MiB of data needs a few.

use std::collections::BTreeMap;
use std::fs::File;
use std::sync::{Mutex, MutexGuard};

use super::direct::DirectWriter;
use super::file::Place;
use super::qcow2_format::{self as format, Plan, CLUSTER, L2_ENTRIES};
use super::sparse::{data_runs, BLOCK};
use super::{Abandoned, Format, Target, TargetKind};
use crate::engine::worker::is_zero;
use crate::error::Result;

/// A qcow2 image being written into a fresh (or emptied) file.
pub(super) struct Qcow2Image {
    out: DirectWriter,
    place: Place,
    size: u64,
    map: Mutex<Map>,
}

/// Where the data clusters went.
struct Map {
    /// L2 tables by L1 index: host byte offset of each guest cluster, 0 = unallocated.
    tables: BTreeMap<u64, Box<[u64]>>,
    /// Next free host cluster (0 is the header's).
    next: u64,
}

impl Qcow2Image {
    /// A qcow2 image of a `size`-byte disk (which [`format::check_size`] accepted) in
    /// `file` (from [`super::file::open`]).
    pub(super) fn new(file: File, place: Place, size: u64) -> Qcow2Image {
        Qcow2Image {
            out: DirectWriter::new(&place.path, file, &place.name, false),
            place,
            size,
            map: Mutex::new(Map {
                tables: BTreeMap::new(),
                next: 1,
            }),
        }
    }

    fn map(&self) -> MutexGuard<'_, Map> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Host byte offsets of guest clusters `clusters`, allocating those that have none.
    fn hosts(&self, clusters: &[u64]) -> Vec<u64> {
        let mut m = self.map();
        let Map { tables, next } = &mut *m;
        clusters
            .iter()
            .map(|&c| {
                let table = tables
                    .entry(c / L2_ENTRIES)
                    .or_insert_with(|| vec![0; L2_ENTRIES as usize].into_boxed_slice());
                let entry = &mut table[(c % L2_ENTRIES) as usize];
                if *entry == 0 {
                    *entry = *next * CLUSTER;
                    *next += 1;
                }
                *entry
            })
            .collect()
    }
}

impl Target for Qcow2Image {
    fn name(&self) -> &str {
        &self.place.name
    }

    fn kind(&self) -> TargetKind {
        TargetKind::File
    }

    fn format(&self) -> Format {
        Format::Qcow2
    }

    /// The clusters `data` touches that hold a non-zero byte get a host cluster; their
    /// non-zero 4 KiB runs are written into it.
    fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        let mut pieces = Vec::new();
        let mut pos = 0;
        while pos < data.len() {
            let guest = offset + pos as u64;
            let n = ((CLUSTER - guest % CLUSTER) as usize).min(data.len() - pos);
            if !is_zero(&data[pos..pos + n]) {
                pieces.push((guest / CLUSTER, pos..pos + n));
            }
            pos += n;
        }
        let clusters: Vec<u64> = pieces.iter().map(|(c, _)| *c).collect();
        for ((_, range), host) in pieces.into_iter().zip(self.hosts(&clusters)) {
            let at = host + (offset + range.start as u64) % CLUSTER;
            let piece = &data[range];
            for r in data_runs(piece, BLOCK) {
                self.out.write(&piece[r.clone()], at + r.start as u64)?;
            }
        }
        Ok(())
    }

    /// Nothing: an unallocated cluster reads as zeros.
    fn zero(&self, _offset: u64, _len: u64) -> Result<()> {
        Ok(())
    }

    /// The metadata, after all the data: L2 tables, L1 table, refcounts, and the header last.
    fn finish(&self, sync: bool) -> Result<()> {
        let m = self.map();
        let plan = Plan::new(self.size, m.next, m.tables.len() as u64);
        for (k, table) in m.tables.values().enumerate() {
            self.out.write(
                &format::l2_table(table),
                (plan.l2_first + k as u64) * CLUSTER,
            )?;
        }
        self.out.write(
            &plan.l1_table(m.tables.keys().copied()),
            plan.l1_first * CLUSTER,
        )?;
        self.out
            .write(&plan.refcount_table(), plan.rt_first * CLUSTER)?;
        for b in 0..plan.rb_count {
            self.out
                .write(&plan.refcount_block(b), (plan.rb_first + b) * CLUSTER)?;
        }
        self.out.write(&plan.header(), 0)?;
        self.out.finish(sync)
    }

    fn abandon(&self) -> Abandoned {
        self.place.abandon()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::{ReadAt, Source};

    /// Write `writes` (offset, bytes; not overlapping) into a new image of `size` bytes from
    /// as many threads, read each written region and 4 KiB around it back with the crate's
    /// own qcow2 reader and compare; returns the image's file length.
    fn round_trip(size: u64, writes: &[(u64, Vec<u8>)]) -> u64 {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.qcow2");
        let (file, place) = super::super::file::open(&path, false).unwrap();
        let img = Qcow2Image::new(file, place, size);
        std::thread::scope(|s| {
            for (off, data) in writes {
                let img = &img;
                s.spawn(move || img.write(*off, data).unwrap());
            }
        });
        img.finish(true).unwrap();
        let q = crate::source::Qcow2::open(path.to_str().unwrap()).unwrap();
        assert_eq!(q.size(), size);
        let expected = |pos: u64| {
            writes
                .iter()
                .find(|(off, d)| (*off..off + d.len() as u64).contains(&pos))
                .map_or(0, |(off, d)| d[(pos - off) as usize])
        };
        for (off, data) in writes {
            let from = off.saturating_sub(4096);
            let to = (off + data.len() as u64 + 4096).min(size);
            let mut got = vec![0u8; (to - from) as usize];
            q.read_at(from, &mut got).unwrap();
            let want: Vec<u8> = (from..to).map(expected).collect();
            assert!(got == want, "bytes {from}..{to} differ");
        }
        std::fs::metadata(&path).unwrap().len()
    }

    #[test]
    fn concurrent_writes_read_back_and_zeros_take_no_cluster() {
        let mut a = vec![0u8; 1 << 20];
        a[5] = 1;
        a[(1 << 20) - 1] = 2;
        let b: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8 + 1).collect();
        let zeros = vec![0u8; 4 << 20];
        // Two writes share a cluster (an unaligned range restore does that).
        let len = round_trip(
            64 << 20,
            &[
                (0, a),
                (3 << 20, b),
                (8 << 20, zeros),
                ((3 << 20) + 300_000, vec![7; 10]),
            ],
        );
        // Data clusters: 0 and 15 (a's two ends), 48..=52 (b and its neighbour); then one L2
        // table, the L1 table, the refcount table and block, and the header.
        assert_eq!(len, 12 * CLUSTER);
    }

    #[test]
    fn a_sparse_terabyte_needs_one_table_per_region_written() {
        let one = vec![9u8; 4096];
        let len = round_trip(1 << 40, &[(0, one.clone()), (700 << 30, one)]);
        // Header, 2 data, 2 L2 tables, a 16 KiB L1, refcount table and block.
        assert_eq!(len, 8 * CLUSTER);
    }
}
