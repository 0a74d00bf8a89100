//! Regular files (raw VM disk images) as sources.
//!
//! Model: the file is opened read-only and read through the page cache — for images that is
//! the fast path (readahead; blocks the VM wrote recently may still be cached), and files
//! give no alignment guarantees O_DIRECT could rely on. The size is taken from `fstat` once,
//! at open. Holes are found with `lseek(SEEK_DATA/SEEK_HOLE)`, so a sparse 100 GiB image with
//! 3 GiB allocated costs 3 GiB of reading. An image another process holds open for writing
//! (QEMU's write lock: a running VM, qemu-nbd) is refused, and while it is open no QEMU
//! process can start writing it (`lock.rs`).

use super::lock::{lock_for_reading, ImageFormat};
use super::{not_a_disk, whole_range, Access, Source, SourceKind};
use crate::error::{Error, IoContext, Result};
use nix::errno::Errno;
use nix::unistd::{lseek, Whence};
use std::fs::File;
use std::ops::Range;
use std::os::fd::AsFd;

/// A regular file opened read-only, buffered.
#[derive(Debug)]
pub struct RawFile {
    file: File,
    name: String,
    size: u64,
}

impl RawFile {
    /// Open `path`, which must be a regular file (checked on the opened descriptor, so a
    /// path swapped after [`super::open`] probed it is still caught) that no QEMU process
    /// holds open for writing ([`crate::ErrorKind::Usage`] otherwise).
    pub fn open(path: &str) -> Result<Self> {
        let file = File::open(path).ctx(|| format!("cannot open source {path} for reading"))?;
        let meta = file
            .metadata()
            .ctx(|| format!("cannot inspect source {path}"))?;
        if !meta.is_file() {
            return Err(not_a_disk(path, meta.file_type()));
        }
        lock_for_reading(&file, path, ImageFormat::Raw)?;
        Ok(RawFile {
            file,
            name: path.to_owned(),
            size: meta.len(),
        })
    }
}

impl Source for RawFile {
    fn kind(&self) -> SourceKind {
        SourceKind::RawFile
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn sector_size(&self) -> u32 {
        512
    }

    fn alignment(&self) -> usize {
        1
    }

    fn data_ranges(&self) -> Result<Vec<Range<u64>>> {
        file_data_ranges(&self.file, &self.name, self.size)
    }

    fn access(&self) -> Access<'_> {
        Access::Fd(self.file.as_fd())
    }
}

/// The data extents of the first `size` bytes of `file` (named `name` in errors), by
/// SEEK_DATA/SEEK_HOLE; everything if the filesystem cannot tell. Also used for the host
/// extents of a qcow2 image file.
pub(crate) fn file_data_ranges(file: &File, name: &str, size: u64) -> Result<Vec<Range<u64>>> {
    // lseek moves the shared file offset, which no reader uses (they all read by offset),
    // and its return value is per call, so concurrent walks are fine.
    walk_data(name, size, |pos, whence| {
        let pos = i64::try_from(pos).map_err(|_| Errno::EOVERFLOW)?;
        let found = lseek(file.as_fd(), pos, whence)?;
        u64::try_from(found).map_err(|_| Errno::EOVERFLOW)
    })
}

/// Walk the data extents of a file of `size` bytes with `seek` (an `lseek` returning the
/// offset found). Ranges are clipped to `size`: the file may have grown since open, and
/// bytes past the size fixed at open are not part of this backup.
fn walk_data(
    name: &str,
    size: u64,
    mut seek: impl FnMut(u64, Whence) -> nix::Result<u64>,
) -> Result<Vec<Range<u64>>> {
    let failed = |what: &str, pos: u64, e: Errno| {
        Error::io(
            format!("cannot find {what} in source {name} from offset {pos}"),
            std::io::Error::from(e),
        )
    };
    let mut ranges: Vec<Range<u64>> = Vec::new();
    let mut pos = 0;
    while pos < size {
        let start = match seek(pos, Whence::SeekData) {
            Ok(start) => start,
            // No data at or after `pos`: the rest is a hole (or the file shrank).
            Err(Errno::ENXIO) => break,
            // The filesystem cannot report holes: everything may be data.
            Err(Errno::EINVAL | Errno::EOPNOTSUPP) => return Ok(whole_range(size)),
            Err(e) => return Err(failed("data", pos, e)),
        };
        if start >= size {
            break;
        }
        let end = match seek(start, Whence::SeekHole) {
            Ok(end) => end.min(size),
            // `start` is now past the end: the file shrank between the two calls.
            Err(Errno::ENXIO) => break,
            Err(Errno::EINVAL | Errno::EOPNOTSUPP) => return Ok(whole_range(size)),
            Err(e) => return Err(failed("the next hole", start, e)),
        };
        if end <= start.max(pos) {
            // A filesystem answering nonsense must not make us loop forever.
            return Ok(whole_range(size));
        }
        ranges.push(start.max(pos)..end);
        pos = end;
    }
    Ok(ranges)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;
    use std::os::unix::fs::FileExt;

    const MIB: u64 = 1 << 20;

    fn covered(ranges: &[Range<u64>], r: Range<u64>) -> bool {
        ranges.iter().any(|x| x.start <= r.start && r.end <= x.end)
    }

    fn check_well_formed(ranges: &[Range<u64>], size: u64) {
        for r in ranges {
            assert!(r.start < r.end && r.end <= size, "{r:?} in {size}");
        }
        for w in ranges.windows(2) {
            assert!(w[0].end <= w[1].start, "sorted, disjoint: {ranges:?}");
        }
    }

    #[test]
    fn sparse_file_ranges_cover_data_and_skip_holes() {
        let f = tempfile::NamedTempFile::new().expect("temp");
        let size = 64 * MIB;
        f.as_file().set_len(size).expect("set_len");
        let writes = [(MIB, 1000u64), (20 * MIB + 17, 5000), (size - 100, 100)];
        for (at, len) in writes {
            f.as_file()
                .write_all_at(&vec![0xA5; len as usize], at)
                .expect("write");
        }
        let src = RawFile::open(f.path().to_str().expect("utf-8")).expect("open");
        assert_eq!(src.size(), size);
        let ranges = src.data_ranges().expect("ranges");
        check_well_formed(&ranges, size);
        for (at, len) in writes {
            assert!(covered(&ranges, at..at + len), "{at}+{len} in {ranges:?}");
        }
        // Filesystems round to blocks (4 KiB, sometimes more), never to megabytes; a
        // filesystem without hole support would return one range, so tolerate that loudly.
        if ranges == whole_range(size) {
            eprintln!("WARNING: filesystem reports no holes; hole exclusion not tested");
            return;
        }
        let hole = 2 * MIB..19 * MIB;
        assert!(
            ranges
                .iter()
                .all(|r| r.end <= hole.start || r.start >= hole.end),
            "{ranges:?} overlaps {hole:?}"
        );
    }

    #[test]
    fn dense_and_empty_files() {
        let f = tempfile::NamedTempFile::new().expect("temp");
        f.as_file().write_all_at(&[1; 10_000], 0).expect("write");
        let src = RawFile::open(f.path().to_str().expect("utf-8")).expect("open");
        assert_eq!(src.data_ranges().expect("ranges"), vec![0..10_000]);

        let e = tempfile::NamedTempFile::new().expect("temp");
        let src = RawFile::open(e.path().to_str().expect("utf-8")).expect("open");
        assert_eq!(src.size(), 0);
        assert!(src.data_ranges().expect("ranges").is_empty());
    }

    #[test]
    fn trailing_hole_is_excluded() {
        let f = tempfile::NamedTempFile::new().expect("temp");
        f.as_file().write_all_at(&[1; 4096], 0).expect("write");
        f.as_file().set_len(32 * MIB).expect("set_len");
        let src = RawFile::open(f.path().to_str().expect("utf-8")).expect("open");
        let ranges = src.data_ranges().expect("ranges");
        check_well_formed(&ranges, 32 * MIB);
        assert!(covered(&ranges, 0..4096));
        if ranges != whole_range(32 * MIB) {
            assert!(ranges.iter().all(|r| r.end <= MIB), "{ranges:?}");
        }
    }

    #[test]
    fn unsupported_seek_falls_back_to_whole_file() {
        for errno in [Errno::EINVAL, Errno::EOPNOTSUPP] {
            let r = walk_data("x", 1000, |_, _| Err(errno)).expect("fallback");
            assert_eq!(r, vec![0..1000]);
        }
        assert!(walk_data("x", 0, |_, _| Err(Errno::EINVAL))
            .expect("empty")
            .is_empty());
    }

    #[test]
    fn walk_clips_to_size_and_reports_errors() {
        // Data at [100,200) and [900, 5000) in a file that grew past the 1000 bytes at open.
        let seek = |pos: u64, whence: Whence| match whence {
            Whence::SeekData if pos <= 100 => Ok(100),
            Whence::SeekData if pos <= 900 => Ok(900),
            Whence::SeekData => Err(Errno::ENXIO),
            Whence::SeekHole if pos < 200 => Ok(200),
            _ => Ok(5000),
        };
        assert_eq!(
            walk_data("x", 1000, seek).expect("ranges"),
            vec![100..200, 900..1000]
        );
        let err = walk_data("img", 1000, |_, _| Err(Errno::EIO)).expect_err("EIO");
        assert_eq!(err.kind(), ErrorKind::Io);
        assert!(err.to_string().contains("img") && err.to_string().contains("offset 0"));
    }
}
