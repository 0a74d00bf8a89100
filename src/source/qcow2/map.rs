//! The allocation map: which bytes of the disk may hold data, for `data_ranges`.
//!
//! One image's map comes from walking its L1 table and each L2 table once (read directly,
//! past the readers' cache) and sorting every allocation unit into one of three kinds, each
//! kept as merged runs: data (standard or compressed), zero (reads as zeros whatever lies
//! below) and unallocated (reads from the backing file). Standard data counts only where
//! the image file holds it (SEEK_DATA/SEEK_HOLE on the file, as `qemu-img map` does): a
//! preallocated cluster whose host bytes are a hole reads as zeros, and a 1 TiB image made
//! with `preallocation=metadata` must not cost a 1 TiB read. Over a chain:
//!
//! ```text
//! ranges(image) = data(image) ∪ (unallocated(image) ∩ ranges(backing))
//! ```
//! so memory grows with the number of runs, not with the disk: a 1 TiB image with a few
//! writes is a handful of ranges.

use super::image::Image;
use super::tables::{for_each_run, Cluster, Unit};
use crate::error::Result;
use crate::ranges::{intersect, push, push_mapped, union};
use crate::source::raw::file_data_ranges;
use std::ops::Range;

impl Image {
    /// Sorted, merged byte ranges that may hold data, within the virtual size.
    pub fn data_ranges(&self) -> Result<Vec<Range<u64>>> {
        let own = self.allocation()?;
        match &self.backing {
            None => Ok(own.data),
            Some(backing) => Ok(union(
                &own.data,
                &intersect(&own.unallocated, &backing.data_ranges()?),
            )),
        }
    }

    /// This image's own map.
    fn allocation(&self) -> Result<Allocation> {
        let geo = &self.header.geo;
        let size = self.header.size;
        let cluster_size = geo.cluster_size();
        // The file's own data extents, in host offsets (through the descriptor already open:
        // the same file whatever became of the path).
        let host = file_data_ranges(&self.file, &self.path, self.header.geo.file_size)?;
        let (mut data, mut unallocated) = (Vec::new(), Vec::new());
        for (l1_index, &l2_offset) in self.l1.iter().enumerate() {
            let base = (l1_index as u64) << geo.l1_span_bits();
            if l2_offset == 0 {
                push(
                    &mut unallocated,
                    base..(base + (1 << geo.l1_span_bits())).min(size),
                );
                continue;
            }
            let table = self.read_l2(l2_offset)?;
            for index in 0..1usize << geo.l2_bits() {
                let start = base + ((index as u64) << geo.cluster_bits);
                if start >= size {
                    break;
                }
                let len = cluster_size.min(size - start);
                match table.cluster(geo, index, &self.path)? {
                    Cluster::Compressed { .. } => push(&mut data, start..start + len),
                    Cluster::Standard {
                        host: cluster,
                        alloc,
                        zero,
                    } => {
                        for_each_run(geo, alloc, zero, 0, len, |run, unit| {
                            let at = cluster + run.start;
                            let run = start + run.start..start + run.end;
                            match unit {
                                Unit::Data => push_mapped(&mut data, run, at, &host),
                                Unit::Unallocated => push(&mut unallocated, run),
                                Unit::Zero => {}
                            }
                            Ok(())
                        })?;
                    }
                }
            }
        }
        Ok(Allocation { data, unallocated })
    }
}

/// One image's map, each list sorted and merged; zero ranges are in neither.
struct Allocation {
    /// Standard and compressed clusters (or subclusters) of this image.
    data: Vec<Range<u64>>,
    /// What reads from the backing file.
    unallocated: Vec<Range<u64>>,
}
