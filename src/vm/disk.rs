//! One drive of a running VM as a backup source: its fleecing view read over QEMU's NBD
//! server, with the drive's bitmaps as QMP showed them at the point in time.
//!
//! Reads, data ranges and the dirty bitmap being read go to the NBD export. The bitmaps the
//! snapshot records come from QMP instead of NBD, because QMP says what NBD cannot: the
//! granularity, whether each bitmap records, whether it is consistent, and its count. That
//! is what lets the next backup check the lineage of the bitmap this one created (it is not
//! exported: only a disabled bitmap can be, and it records from now on).

use std::ops::Range;

use crate::changes::ChangeList;
use crate::error::Result;
use crate::source::{Access, BitmapInfo, NbdSource, ReadAt, Source, SourceKind};

/// A VM drive being backed up.
pub struct VmDisk {
    nbd: NbdSource,
    name: String,
    bitmaps: Vec<BitmapInfo>,
}

impl VmDisk {
    /// The view served at `nbd`, named `name` (stable across runs: the snapshot records it as
    /// its source), whose drive had `bitmaps` at the point in time.
    pub fn new(nbd: NbdSource, name: String, bitmaps: Vec<BitmapInfo>) -> VmDisk {
        VmDisk { nbd, name, bitmaps }
    }
}

impl Source for VmDisk {
    fn kind(&self) -> SourceKind {
        SourceKind::Nbd
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn size(&self) -> u64 {
        self.nbd.size()
    }

    fn sector_size(&self) -> u32 {
        self.nbd.sector_size()
    }

    fn alignment(&self) -> usize {
        self.nbd.alignment()
    }

    fn data_ranges(&self) -> Result<Vec<Range<u64>>> {
        self.nbd.data_ranges()
    }

    fn access(&self) -> Access<'_> {
        Access::Translated(self)
    }

    fn bitmaps(&self) -> Result<Vec<BitmapInfo>> {
        Ok(self.bitmaps.clone())
    }

    fn dirty_ranges(&self, name: &str) -> Result<ChangeList> {
        self.nbd.dirty_ranges(name)
    }
}

impl ReadAt for VmDisk {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.nbd.read_at(offset, buf)
    }
}
