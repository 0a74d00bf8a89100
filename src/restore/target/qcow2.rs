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
//!
//! Speed: as for a raw file (see `file.rs`), the host clusters the data may need are
//! allocated up front (restore announces its stored runs first, [`Target::allocate`]), so
//! the parallel O_DIRECT writes do not queue on the filesystem's allocation lock; what the
//! data did not use is freed again at the end. Data goes through the writer's io_uring
//! ring, and `finish` waits for it before the metadata is written.

use std::collections::BTreeMap;
use std::fs::File;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};

use super::direct::DirectWriter;
use super::file::Place;
use super::qcow2_format::{self as format, Plan, CLUSTER, L2_ENTRIES};
use super::sparse::{data_runs, BLOCK};
use super::{Abandoned, Format, Target, TargetKind};
use crate::engine::worker::is_zero;
use crate::error::{IoContext, Result};
use crate::io::PooledBuf;

/// A qcow2 image being written into a fresh (or emptied) file.
pub(super) struct Qcow2Image {
    out: DirectWriter,
    place: Place,
    size: u64,
    map: Mutex<Map>,
    /// Guest clusters restore announced it will write: at most that many data clusters.
    announced: AtomicU64,
    /// Where the host clusters allocated up front end (set at the first write).
    reserved: OnceLock<u64>,
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
            out: DirectWriter::new(&place.path, file, &place.name, true),
            place,
            size,
            map: Mutex::new(Map {
                tables: BTreeMap::new(),
                next: 1,
            }),
            announced: AtomicU64::new(0),
            reserved: OnceLock::new(),
        }
    }

    /// Before the first write (every run is announced by then): size the file to as many
    /// host clusters after the header as were announced, and allocate them. Both matter on
    /// ext4: a direct write past the end of the file, like one that must allocate, holds
    /// the inode's lock exclusively (measured: 15 % of a restore's samples waiting in
    /// `rwsem_down_write_slowpath` with the allocation alone).
    fn reserve(&self) {
        self.reserved.get_or_init(|| {
            let bytes = self.announced.load(Ordering::Relaxed).saturating_mul(CLUSTER);
            let end = CLUSTER.saturating_add(bytes);
            if let Err(e) = self.out.file().set_len(end) {
                tracing::debug!(target = %self.place.name, end, error = %e, "cannot size the image for its data");
            }
            if bytes > 0 {
                self.out.allocate(CLUSTER, bytes);
            }
            end
        });
    }

    /// Where the non-zero 4 KiB runs of `data` (guest bytes at `offset`) go: `(bytes of
    /// data, host offset)`, giving the clusters they touch a host cluster.
    fn pieces(&self, offset: u64, data: &[u8]) -> Vec<(Range<usize>, u64)> {
        let mut touched = Vec::new();
        let mut pos = 0;
        while pos < data.len() {
            let guest = offset + pos as u64;
            let n = ((CLUSTER - guest % CLUSTER) as usize).min(data.len() - pos);
            if !is_zero(&data[pos..pos + n]) {
                touched.push((guest / CLUSTER, pos..pos + n));
            }
            pos += n;
        }
        let clusters: Vec<u64> = touched.iter().map(|(c, _)| *c).collect();
        let mut pieces = Vec::new();
        for ((_, range), host) in touched.into_iter().zip(self.hosts(&clusters)) {
            let at = host + (offset + range.start as u64) % CLUSTER;
            for r in data_runs(&data[range.clone()], BLOCK) {
                pieces.push((
                    range.start + r.start..range.start + r.end,
                    at + r.start as u64,
                ));
            }
        }
        pieces
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
        self.reserve();
        for (r, at) in self.pieces(offset, data) {
            self.out.write(&data[r], at)?;
        }
        Ok(())
    }

    /// As `write`, through the writer's ring.
    fn write_buf(&self, offset: u64, buf: PooledBuf, part: Range<usize>) -> Result<()> {
        self.reserve();
        let pieces = self.pieces(offset, &buf[part.clone()]);
        self.out.write_owned(buf, part, pieces)
    }

    fn allocate(&self, offset: u64, len: u64) {
        let clusters = (offset + len).div_ceil(CLUSTER) - offset / CLUSTER;
        self.announced.fetch_add(clusters, Ordering::Relaxed);
    }

    /// Nothing: an unallocated cluster reads as zeros.
    fn zero(&self, _offset: u64, _len: u64) -> Result<()> {
        Ok(())
    }

    /// The metadata, after all the data: L2 tables, L1 table, refcounts, and the header last.
    fn finish(&self, sync: bool) -> Result<()> {
        self.out.drain()?;
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
        // Clusters allocated up front that the data did not need (all-zero clusters of
        // stored slots) lie past the metadata: cut off.
        if self.reserved.get().is_some_and(|&r| r > plan.len()) {
            self.out
                .file()
                .set_len(plan.len())
                .ctx(|| format!("cutting qcow2 image {} to its end", self.place.name))?;
        }
        self.out.finish(sync)
    }

    fn abandon(&self) -> Abandoned {
        self.out.stop();
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
