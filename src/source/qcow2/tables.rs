//! The cluster map: the L1 table (loaded whole at open), L2 tables (one cluster each, read on
//! demand through a bounded cache) and the decoding of L2 entries.
//!
//! ```text
//! guest offset ─┬─ l1 index  = offset >> (cluster_bits + l2_bits)
//!               ├─ l2 index  = (offset >> cluster_bits) & (2^l2_bits - 1)
//!               └─ in-cluster offset
//! L1[l1 index] ─> L2 table ─> entry: unallocated | zero | data at host offset | compressed
//! ```
//! With extended L2 entries each entry is 128 bits: the usual 64-bit descriptor plus a
//! bitmap of 32 subclusters (allocated bits 0-31, reads-as-zero bits 32-63), so the unit of
//! allocation is a subcluster; otherwise it is the cluster. Unallocated units read from the
//! backing file (or as zeros without one).

use super::be::words;
use super::integrity;
use crate::error::Result;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Bits 9-55 of L1 entries and standard L2 entries: a cluster-aligned host offset.
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// L2 entry bit 62: the cluster is compressed.
const COMPRESSED: u64 = 1 << 62;
/// Standard descriptor bit 0: the cluster reads as zeros (not used with extended L2 entries).
const ZERO_FLAG: u64 = 1;
/// Compressed data is counted in 512-byte sectors.
const SECTOR: u64 = 512;
/// Memory the L2 cache of one image may hold (8 MiB of 64 KiB tables map 64 GiB)...
const L2_CACHE_BYTES: u64 = 8 << 20;
/// ... in at most this many tables, so that finding the least recently used one (a scan)
/// stays cheap with small clusters.
const L2_CACHE_TABLES: u64 = 1024;

/// The shape of an image's cluster map, fixed by its header.
#[derive(Debug, Clone, Copy)]
pub(super) struct Geometry {
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// 128-bit L2 entries with 32 subclusters.
    pub extended_l2: bool,
    /// Size of the image file at open: every host offset must lie below it.
    pub file_size: u64,
}

impl Geometry {
    /// Bytes per cluster.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// log2 of the number of entries in an L2 table.
    pub fn l2_bits(&self) -> u32 {
        self.cluster_bits - if self.extended_l2 { 4 } else { 3 }
    }

    /// log2 of the bytes of disk one L1 entry maps.
    pub fn l1_span_bits(&self) -> u32 {
        self.cluster_bits + self.l2_bits()
    }

    /// Entries of the L1 table needed to map a disk of `size` bytes.
    pub fn l1_entries_for(&self, size: u64) -> u64 {
        size.div_ceil(1 << self.l1_span_bits())
    }

    /// log2 of the unit of allocation: a subcluster (1/32 of a cluster) with extended L2
    /// entries, else the cluster.
    pub fn unit_bits(&self) -> u32 {
        if self.extended_l2 {
            self.cluster_bits - 5
        } else {
            self.cluster_bits
        }
    }

    /// 64-bit words per L2 entry.
    fn entry_words(&self) -> usize {
        if self.extended_l2 {
            2
        } else {
            1
        }
    }
}

/// What an L2 entry says about one guest cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Cluster {
    /// The whole cluster inflates from `len` bytes at host offset `host` (unaligned).
    Compressed { host: u64, len: u64 },
    /// A standard cluster at `host` (0: none), with one bit per allocation unit (one unit,
    /// or 32 subclusters) in `alloc` (data at `host` + unit offset) and `zero` (reads as
    /// zeros); a unit in neither is unallocated.
    Standard { host: u64, alloc: u32, zero: u32 },
}

/// The state of a run of allocation units in a standard cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Unit {
    /// Data in the image file, at the cluster's host offset plus the offset in the cluster.
    Data,
    /// Reads as zeros, whatever the backing file holds.
    Zero,
    /// Not in this image: read from the backing file, or zeros.
    Unallocated,
}

/// Call `f` for each run of units of one state within bytes `[from, to)` of a standard
/// cluster, with the run's byte range in the cluster (clipped to `[from, to)`).
pub(super) fn for_each_run(
    geo: &Geometry,
    alloc: u32,
    zero: u32,
    from: u64,
    to: u64,
    mut f: impl FnMut(std::ops::Range<u64>, Unit) -> Result<()>,
) -> Result<()> {
    let unit_bits = geo.unit_bits();
    let state = |i: u64| {
        let bit = 1u32 << (i & 31);
        if alloc & bit != 0 {
            Unit::Data
        } else if zero & bit != 0 {
            Unit::Zero
        } else {
            Unit::Unallocated
        }
    };
    let mut start = from;
    while start < to {
        let unit = state(start >> unit_bits);
        let mut end = ((start >> unit_bits) + 1) << unit_bits;
        while end < to && state(end >> unit_bits) == unit {
            end += 1 << unit_bits;
        }
        let end = end.min(to);
        f(start..end, unit)?;
        start = end;
    }
    Ok(())
}

/// Decode one L2 entry (`bitmap` is the subcluster word, 0 without extended L2 entries);
/// errors are the problem, for the caller to locate.
pub(super) fn decode(geo: &Geometry, entry: u64, bitmap: u64) -> Result<Cluster, String> {
    if entry & COMPRESSED != 0 {
        // Compressed clusters have no subclusters: their second word is reserved (and
        // ignored, as QEMU ignores it).
        // Bits 0..x-1: host offset; bits x..61: additional 512-byte sectors.
        let x = 62 - (geo.cluster_bits - 8);
        let host = entry & ((1 << x) - 1);
        let sectors = ((entry >> x) & ((1 << (geo.cluster_bits - 8)) - 1)) + 1;
        let len = sectors * SECTOR - (host % SECTOR);
        if host >= geo.file_size {
            return Err(format!(
                "compressed data at host offset {host} lies past the end of the file ({} bytes)",
                geo.file_size
            ));
        }
        return Ok(Cluster::Compressed { host, len });
    }
    let host = entry & OFFSET_MASK;
    if !host.is_multiple_of(geo.cluster_size()) {
        return Err(format!(
            "host cluster offset {host:#x} is not aligned to the cluster size"
        ));
    }
    let (alloc, zero) = if geo.extended_l2 {
        let (alloc, zero) = (bitmap as u32, (bitmap >> 32) as u32);
        if alloc & zero != 0 {
            return Err(format!(
                "subclusters {:#x} are marked both allocated and zero",
                alloc & zero
            ));
        }
        if alloc != 0 && host == 0 {
            return Err("subclusters are allocated but the host offset is 0".to_string());
        }
        (alloc, zero)
    } else if entry & ZERO_FLAG != 0 {
        (0, 1)
    } else {
        (u32::from(host != 0), 0)
    };
    if alloc != 0 && host >= geo.file_size {
        return Err(format!(
            "host cluster {host} lies past the end of the file ({} bytes)",
            geo.file_size
        ));
    }
    Ok(Cluster::Standard { host, alloc, zero })
}

/// Check the entries of the active L1 table that map the virtual disk (`bytes`, read from
/// `l1_offset`) and reduce them to L2 table offsets (0: no L2 table).
pub(super) fn l1_offsets(
    image: &str,
    geo: &Geometry,
    l1_offset: u64,
    bytes: &[u8],
) -> Result<Vec<u64>> {
    words(bytes)
        .enumerate()
        .map(|(i, entry)| {
            let l2 = entry & OFFSET_MASK;
            let fits = l2.is_multiple_of(geo.cluster_size())
                && l2.saturating_add(geo.cluster_size()) <= geo.file_size;
            if l2 != 0 && !fits {
                return Err(integrity(
                    image,
                    format_args!(
                        "L1 entry {i} (file offset {}): L2 table offset {l2:#x} is not cluster-aligned or lies past the end of the file ({} bytes)",
                        l1_offset + 8 * i as u64,
                        geo.file_size
                    ),
                ));
            }
            Ok(l2)
        })
        .collect()
}

/// One L2 table, decoded to native words.
pub(super) struct L2Table {
    /// File offset of the table, for messages.
    offset: u64,
    words: Vec<u64>,
}

impl L2Table {
    /// A table from the cluster read at `offset`.
    pub fn new(offset: u64, bytes: &[u8]) -> Self {
        L2Table {
            offset,
            words: words(bytes).collect(),
        }
    }

    /// The cluster that entry `index` maps.
    pub fn cluster(&self, geo: &Geometry, index: usize, image: &str) -> Result<Cluster> {
        let at = index * geo.entry_words();
        let entry = self.words.get(at).copied();
        let bitmap = if geo.extended_l2 {
            self.words.get(at + 1).copied()
        } else {
            Some(0)
        };
        let located = |problem: &dyn std::fmt::Display| {
            integrity(
                image,
                format_args!(
                    "L2 table at {}, entry {index} (file offset {}): {problem}",
                    self.offset,
                    self.offset + 8 * at as u64
                ),
            )
        };
        match (entry, bitmap) {
            (Some(entry), Some(bitmap)) => {
                decode(geo, entry, bitmap).map_err(|problem| located(&problem))
            }
            _ => Err(located(&"beyond the end of the table")),
        }
    }
}

/// Recently used L2 tables of one image, shared by the reader threads; bounded to
/// [`L2_CACHE_BYTES`] and [`L2_CACHE_TABLES`] (at least two tables), least recently used out
/// first.
pub(super) struct L2Cache {
    capacity: usize,
    state: Mutex<CacheState>,
}

#[derive(Default)]
struct CacheState {
    /// Table by file offset, with the tick of its last use.
    tables: HashMap<u64, (Arc<L2Table>, u64)>,
    tick: u64,
}

impl L2Cache {
    /// An empty cache for tables of one cluster.
    pub fn new(geo: &Geometry) -> Self {
        L2Cache {
            capacity: (L2_CACHE_BYTES >> geo.cluster_bits).clamp(2, L2_CACHE_TABLES) as usize,
            state: Mutex::new(CacheState::default()),
        }
    }

    /// The table at `offset`, loaded with `load` on a miss. Two threads missing the same
    /// table both load it; the lock is never held during I/O.
    pub fn get(&self, offset: u64, load: impl FnOnce() -> Result<L2Table>) -> Result<Arc<L2Table>> {
        {
            let mut s = self.lock();
            s.tick += 1;
            let tick = s.tick;
            if let Some((table, used)) = s.tables.get_mut(&offset) {
                *used = tick;
                return Ok(table.clone());
            }
        }
        let table = Arc::new(load()?);
        let mut s = self.lock();
        if s.tables.len() >= self.capacity {
            let oldest = s
                .tables
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(&k, _)| k);
            if let Some(k) = oldest {
                s.tables.remove(&k);
            }
        }
        let tick = s.tick;
        s.tables.insert(offset, (table.clone(), tick));
        Ok(table)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CacheState> {
        // No code panics while holding the lock, and the map stays valid if one did.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GEO: Geometry = Geometry {
        cluster_bits: 16,
        extended_l2: false,
        file_size: 1 << 30,
    };
    const EXT: Geometry = Geometry {
        extended_l2: true,
        ..GEO
    };

    #[test]
    fn standard_entries() {
        let copied = 1 << 63;
        assert_eq!(
            decode(&GEO, 0, 0),
            Ok(Cluster::Standard {
                host: 0,
                alloc: 0,
                zero: 0
            })
        );
        assert_eq!(
            decode(&GEO, copied | 0x5_0000, 0),
            Ok(Cluster::Standard {
                host: 0x5_0000,
                alloc: 1,
                zero: 0
            })
        );
        // A preallocated zero cluster reads as zeros.
        assert_eq!(
            decode(&GEO, 0x5_0000 | ZERO_FLAG, 0),
            Ok(Cluster::Standard {
                host: 0x5_0000,
                alloc: 0,
                zero: 1
            })
        );
        assert!(decode(&GEO, 0x5_0200, 0).unwrap_err().contains("aligned"));
        assert!(decode(&GEO, 1 << 40, 0)
            .unwrap_err()
            .contains("past the end"));
    }

    #[test]
    fn compressed_descriptor() {
        // 64 KiB clusters: x = 62 - 8 = 54; 3 additional sectors; offset 1000.
        let entry = COMPRESSED | (3 << 54) | 1000;
        assert_eq!(
            decode(&GEO, entry, 0),
            Ok(Cluster::Compressed {
                host: 1000,
                len: 4 * 512 - 1000 % 512
            })
        );
        assert_eq!(decode(&EXT, entry, 1), decode(&GEO, entry, 0));
    }

    #[test]
    fn subcluster_entries_and_runs() {
        // Subclusters 0-1 data, 2 zero, 3.. unallocated.
        let c = decode(&EXT, 0x10_0000, 0b11 | (0b100 << 32)).expect("decode");
        let Cluster::Standard { host, alloc, zero } = c else {
            panic!("{c:?}")
        };
        assert_eq!(host, 0x10_0000);
        let mut runs = Vec::new();
        for_each_run(&EXT, alloc, zero, 100, 1 << 16, |r, u| {
            runs.push((r, u));
            Ok(())
        })
        .expect("runs");
        assert_eq!(
            runs,
            vec![
                (100..4096, Unit::Data),
                (4096..6144, Unit::Zero),
                (6144..65536, Unit::Unallocated)
            ]
        );
        assert!(decode(&EXT, 0x10_0000, 1 | (1 << 32)).is_err());
        assert!(decode(&EXT, 0, 1).is_err());
    }

    #[test]
    fn cache_is_bounded_and_keeps_recent_tables() {
        let geo = Geometry {
            cluster_bits: 21,
            ..GEO
        };
        let cache = L2Cache::new(&geo);
        assert_eq!(cache.capacity, 4);
        let load = |o| move || Ok(L2Table::new(o, &[0; 8]));
        for o in 0..4 {
            cache.get(o, load(o)).expect("load");
        }
        cache.get(0, || panic!("0 is cached")).expect("hit");
        cache.get(9, load(9)).expect("load");
        // 1 was the least recently used.
        assert_eq!(cache.lock().tables.len(), 4);
        assert!(!cache.lock().tables.contains_key(&1));
        cache.get(0, || panic!("0 is still cached")).expect("hit");
    }
}
