//! Persistent dirty bitmaps: what QEMU records as written since a bitmap was created or
//! cleared, for incremental backups.
//!
//! ```text
//! bitmaps extension -> bitmap directory (entries: table offset/size, flags, type,
//!                      granularity_bits, name)
//!                   -> bitmap table (u64 per cluster of bitmap data:
//!                      0 = all zeros, 1 = all ones, else the data cluster's offset)
//!                   -> data: bit i (LSB first in each byte) covers
//!                      [i * granularity, (i + 1) * granularity) of the disk
//! ```
//! A bitmap is only trusted when it is complete: one with `in_use` set was left open by a
//! QEMU that did not close it (crashed, or still running), one without `auto` no longer
//! records writes, and when the extension's autoclear bit is clear a program without bitmap
//! support wrote the image. All three are refused with a message saying why. Dirty ranges
//! are built run by run from each data cluster (a bounded buffer, no per-bit allocation).

use super::be::{words, Fields};
use super::header::{BitmapDirectory, Bitmaps};
use super::image::Image;
use super::{integrity, unsupported};
use crate::changes::ChangeList;
use crate::error::{Error, Result};
use crate::ranges::push;
use crate::source::BitmapInfo;
use std::ops::Range;

const IN_USE: u32 = 1 << 0;
const AUTO: u32 = 1 << 1;
const EXTRA_DATA_COMPATIBLE: u32 = 1 << 2;
const KNOWN_FLAGS: u32 = IN_USE | AUTO | EXTRA_DATA_COMPATIBLE;
const DIRTY_TRACKING: u8 = 1;
const ENTRY_FIXED: usize = 24;
/// Bitmap table entries: bits 9-55 a cluster-aligned offset, bit 0 "all ones" without one.
const TABLE_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const TABLE_ALL_ONES: u64 = 1;

/// One bitmap directory entry.
struct Bitmap {
    name: String,
    flags: u32,
    kind: u8,
    granularity_bits: u8,
    table_offset: u64,
    table_size: u32,
    extra_data_size: u32,
    /// File offset of the entry, for messages.
    entry_offset: u64,
}

impl Bitmap {
    /// What the directory says, and the bytes the bitmap's data marks dirty. A bitmap whose
    /// table cannot be read has no count (`None`): listing it must not fail a backup that
    /// does not use it, and one that does use it reports the damage from `dirty_ranges`.
    fn info(&self, image: &Image) -> BitmapInfo {
        let dirty_bytes = match ranges(image, self) {
            Ok(list) => Some(list.bytes()),
            Err(e) => {
                tracing::warn!(image = %image.path, bitmap = %self.name, error = %e, "cannot count the bytes a dirty bitmap marks");
                None
            }
        };
        BitmapInfo {
            name: self.name.clone(),
            granularity: 1u64.checked_shl(u32::from(self.granularity_bits)),
            enabled: Some(self.flags & AUTO != 0),
            in_use: self.flags & IN_USE != 0,
            dirty_bytes,
        }
    }
}

/// The bitmaps of the image (none when it has none or they cannot be trusted as a set).
pub(super) fn list(image: &Image) -> Result<Vec<BitmapInfo>> {
    Ok(directory(image)?.iter().map(|b| b.info(image)).collect())
}

/// The ranges bitmap `name` marks dirty, at its granularity.
pub(super) fn dirty_ranges(image: &Image, name: &str) -> Result<ChangeList> {
    let path = &image.path;
    if image.header.bitmaps == Bitmaps::Inconsistent {
        return Err(Error::usage(format!(
            "the bitmaps in image {path} cannot be trusted: a program without bitmap support \
             wrote to the image (autoclear bit 0 is clear), so bitmap {name} may miss writes; \
             back up without --bitmap once, then create a new bitmap"
        )));
    }
    let all = directory(image)?;
    let Some(b) = all.iter().find(|b| b.name == name) else {
        let names: Vec<&str> = all.iter().map(|b| b.name.as_str()).collect();
        let have = if names.is_empty() {
            "it has no bitmaps".to_string()
        } else {
            format!("its bitmaps: {}", names.join(", "))
        };
        return Err(Error::usage(format!(
            "image {path} has no bitmap {name}; {have}"
        )));
    };
    usable(image, b)?;
    ranges(image, b)
}

/// Refuse a bitmap that cannot be trusted or understood.
fn usable(image: &Image, b: &Bitmap) -> Result<()> {
    let (path, name) = (&image.path, &b.name);
    if b.flags & IN_USE != 0 {
        return Err(Error::usage(format!(
            "bitmap {name} in image {path} is in use: QEMU did not close it cleanly (crashed or \
             still running), so it may miss writes; refusing it — back up without --bitmap \
             once, then create a new bitmap"
        )));
    }
    if b.flags & AUTO == 0 {
        return Err(Error::usage(format!(
            "bitmap {name} in image {path} is disabled: QEMU does not record writes in it, so \
             it may miss writes; refusing it — use an enabled bitmap, or back up without \
             --bitmap once and create a new bitmap"
        )));
    }
    let refuse =
        |what: std::fmt::Arguments| Err(unsupported(path, format_args!("{what} (bitmap {name})")));
    if b.flags & !KNOWN_FLAGS != 0 {
        return refuse(format_args!("bitmap flags {:#x}", b.flags & !KNOWN_FLAGS));
    }
    if b.kind != DIRTY_TRACKING {
        return refuse(format_args!("bitmap type {}", b.kind));
    }
    if b.extra_data_size != 0 && b.flags & EXTRA_DATA_COMPATIBLE == 0 {
        return refuse(format_args!("bitmap extra data"));
    }
    Ok(())
}

/// Parse the bitmap directory.
fn directory(image: &Image) -> Result<Vec<Bitmap>> {
    let BitmapDirectory {
        count,
        size,
        offset,
    } = match image.header.bitmaps {
        Bitmaps::Directory(d) => d,
        Bitmaps::None | Bitmaps::Inconsistent => return Ok(Vec::new()),
    };
    // The header checked that the directory is at most 64 MiB and within the file.
    let mut bytes = vec![0; size as usize];
    image.read_meta(offset, &mut bytes, "bitmap directory")?;
    let mut out = Vec::with_capacity(count as usize);
    let mut pos = 0usize;
    for i in 0..count {
        let what = format!("bitmap directory entry {i}");
        let f = Fields {
            bytes: bytes.get(pos..).unwrap_or_default(),
            base: offset + pos as u64,
            image: &image.path,
            what: &what,
        };
        let name_size = f.u16(18, "name_size")? as usize;
        let extra_data_size = f.u32(20, "extra_data_size")?;
        if name_size == 0 {
            return Err(f.error(18, "name_size", "0: a bitmap must have a name"));
        }
        let name_at = ENTRY_FIXED.saturating_add(extra_data_size as usize);
        let name = f.bytes(name_at, name_size, "name")?;
        out.push(Bitmap {
            name: String::from_utf8_lossy(name).into_owned(),
            table_offset: f.u64(0, "bitmap_table_offset")?,
            table_size: f.u32(8, "bitmap_table_size")?,
            flags: f.u32(12, "flags")?,
            kind: f.u8(16, "type")?,
            granularity_bits: f.u8(17, "granularity_bits")?,
            extra_data_size,
            entry_offset: f.base,
        });
        // The name fits in the directory, so this is at most the directory size plus 7.
        pos += (name_at + name_size).next_multiple_of(8);
    }
    if pos as u64 != size {
        return Err(integrity(
            &image.path,
            format_args!(
                "bitmap directory at offset {offset}: its {count} entries take {pos} bytes, but bitmap_directory_size is {size}"
            ),
        ));
    }
    Ok(out)
}

/// Walk the bitmap table of `b` (checked here against the disk and file sizes).
fn ranges(image: &Image, b: &Bitmap) -> Result<ChangeList> {
    let geo = &image.header.geo;
    let size = image.header.size;
    let cluster_size = geo.cluster_size();
    let bad = |field: &str, at: u64, problem: std::fmt::Arguments| {
        integrity(
            &image.path,
            format_args!(
                "bitmap {} field {field} (file offset {}): {problem}",
                b.name,
                b.entry_offset + at
            ),
        )
    };
    if b.granularity_bits > 63 {
        return Err(bad(
            "granularity_bits",
            17,
            format_args!("{} is over 63", b.granularity_bits),
        ));
    }
    let granularity = 1u64 << b.granularity_bits;
    let bits = size.div_ceil(granularity);
    let bits_per_cluster = cluster_size * 8;
    let expected = bits.div_ceil(bits_per_cluster);
    if u64::from(b.table_size) != expected {
        return Err(bad(
            "bitmap_table_size",
            8,
            format_args!(
                "{} entries, but a {size}-byte disk at granularity {granularity} needs {expected}",
                b.table_size
            ),
        ));
    }
    let table_bytes = u64::from(b.table_size) * 8;
    if !b.table_offset.is_multiple_of(cluster_size)
        || b.table_offset.saturating_add(table_bytes) > geo.file_size
    {
        return Err(bad(
            "bitmap_table_offset",
            0,
            format_args!(
                "{} is not cluster-aligned or the table ends past the end of the file ({} bytes)",
                b.table_offset, geo.file_size
            ),
        ));
    }
    let mut table = vec![0; table_bytes as usize];
    image.read_meta(b.table_offset, &mut table, "bitmap table")?;

    let mut out = Vec::new();
    let mut cluster = vec![0; cluster_size as usize];
    let to_bytes = |first_bit: u64, end_bit: u64| {
        first_bit.saturating_mul(granularity)..end_bit.saturating_mul(granularity).min(size)
    };
    for (i, entry) in words(&table).enumerate() {
        let first_bit = i as u64 * bits_per_cluster;
        let at = b.table_offset + 8 * i as u64;
        let data = entry & TABLE_OFFSET_MASK;
        if entry & !(TABLE_OFFSET_MASK | TABLE_ALL_ONES) != 0
            || (data != 0 && entry & TABLE_ALL_ONES != 0)
        {
            return Err(integrity(
                &image.path,
                format_args!(
                    "bitmap {} table entry {i} (file offset {at}): reserved bits set in {entry:#x}",
                    b.name
                ),
            ));
        }
        if data == 0 {
            if entry & TABLE_ALL_ONES != 0 {
                push(&mut out, to_bytes(first_bit, first_bit + bits_per_cluster));
            }
            continue;
        }
        if !data.is_multiple_of(cluster_size) || data.saturating_add(cluster_size) > geo.file_size {
            return Err(integrity(
                &image.path,
                format_args!(
                    "bitmap {} table entry {i} (file offset {at}): data cluster {data:#x} is not cluster-aligned or lies past the end of the file",
                    b.name
                ),
            ));
        }
        image.read_meta(data, &mut cluster, "bitmap data")?;
        set_runs(&cluster, first_bit, |bits| {
            push(&mut out, to_bytes(bits.start, bits.end))
        });
    }
    Ok(ChangeList::new(granularity, out))
}

/// Call `f` with each run of set bits in `data` (bit i is bit i % 8 of byte i / 8), numbered
/// from `first_bit`, in order.
fn set_runs(data: &[u8], first_bit: u64, mut f: impl FnMut(Range<u64>)) {
    let mut run: Option<Range<u64>> = None;
    for (w, chunk) in data.chunks_exact(8).enumerate() {
        let mut a = [0; 8];
        a.copy_from_slice(chunk);
        let mut word = u64::from_le_bytes(a);
        let base = first_bit + 64 * w as u64;
        while word != 0 {
            let start = word.trailing_zeros();
            let ones = (word >> start).trailing_ones();
            let bits = base + u64::from(start)..base + u64::from(start + ones);
            match &mut run {
                Some(r) if r.end == bits.start => r.end = bits.end,
                _ => {
                    if let Some(r) = run.replace(bits) {
                        f(r);
                    }
                }
            }
            word = word
                .checked_shr(start + ones)
                .map_or(0, |w| w << (start + ones));
        }
    }
    if let Some(r) = run {
        f(r);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runs(data: &[u8]) -> Vec<Range<u64>> {
        let mut v = Vec::new();
        set_runs(data, 1000, |r| v.push(r));
        v
    }

    #[test]
    fn runs_of_set_bits_cross_words() {
        let mut d = [0u8; 24];
        d[0] = 0b0000_0110; // bits 1-2
        d[7] = 0x80; // bit 63 ...
        d[8] = 0xff; // ... through bit 71
        d[23] = 0x80; // bit 191, the last
        assert_eq!(runs(&d), vec![1001..1003, 1063..1072, 1191..1192]);
        assert!(runs(&[0; 16]).is_empty());
        assert_eq!(runs(&[0xff; 16]), vec![1000..1128]);
    }
}
