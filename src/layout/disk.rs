//! The disk as the scanners see it, and the field accessors they read headers with.
//!
//! Every read goes through [`Disk::bytes`], which refuses ranges past the end of the disk
//! (answering `None`, so a parser reports a structure as missing rather than failing) and
//! counts bytes against [`READ_BUDGET`]: the scan reads headers only, and no sequence of
//! hostile partition entries can make it read more than that.

use crate::error::{Error, ErrorKind, Result};
use std::cell::Cell;

/// Reads `buf.len()` bytes of the disk at an offset; see [`super::scan`].
pub type ReadAt<'a> = dyn Fn(u64, &mut [u8]) -> Result<()> + 'a;

/// Most bytes one scan may read. The largest legitimate reads are the two copies of a 4 MiB
/// LUKS2 header per volume and 1 MiB GPT entry arrays; 64 MiB leaves room for several such
/// volumes.
pub const READ_BUDGET: u64 = 64 << 20;

/// A bounded, counted reader over the caller's `read`.
pub struct Disk<'a> {
    read: &'a ReadAt<'a>,
    size: u64,
    spent: Cell<u64>,
}

impl<'a> Disk<'a> {
    /// A disk of `size` bytes read through `read`.
    pub fn new(read: &'a ReadAt<'a>, size: u64) -> Self {
        Disk {
            read,
            size,
            spent: Cell::new(0),
        }
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// `len` bytes at `offset`, or `None` if they would run past the end of the disk.
    /// Errors: the caller's read error, with `what` and the offset prefixed; the read budget
    /// exhausted ([`ErrorKind::Integrity`]: the disk's structures ask for too much).
    pub fn bytes(&self, offset: u64, len: usize, what: &str) -> Result<Option<Vec<u8>>> {
        let end = match offset.checked_add(len as u64) {
            Some(end) if end <= self.size => end,
            _ => return Ok(None),
        };
        let spent = self.spent.get() + len as u64;
        if spent > READ_BUDGET {
            return Err(Error::new(
                ErrorKind::Integrity,
                format!(
                    "{what} at offset {offset}: the disk's headers ask for more than {} MiB of \
                     reads; stopping",
                    READ_BUDGET >> 20
                ),
            ));
        }
        self.spent.set(spent);
        let mut buf = vec![0u8; len];
        (self.read)(offset, &mut buf)
            .map_err(|e| e.within(format!("reading {what} at bytes {offset}..{end}")))?;
        Ok(Some(buf))
    }
}

// Field accessors. Parsers read whole fixed-size headers first and then take fields at
// constant offsets inside them, so a field is always in range; the `get` (rather than
// indexing) only guarantees that a slip can never panic on a disk's bytes.

/// Little-endian u16 at `at`.
pub fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(array(b, at))
}

/// Little-endian u32 at `at`.
pub fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(array(b, at))
}

/// Little-endian u64 at `at`.
pub fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(array(b, at))
}

/// Big-endian u16 at `at`.
pub fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes(array(b, at))
}

/// Big-endian u32 at `at`.
pub fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(array(b, at))
}

/// Big-endian u64 at `at`.
pub fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(array(b, at))
}

/// `N` bytes at `at` (zeros if out of range; see above).
pub fn array<const N: usize>(b: &[u8], at: usize) -> [u8; N] {
    let mut out = [0u8; N];
    if let Some(s) = b.get(at..at.saturating_add(N)) {
        out.copy_from_slice(s);
    }
    out
}

/// The bytes `at..at+len` (empty if out of range).
pub fn field(b: &[u8], at: usize, len: usize) -> &[u8] {
    b.get(at..at.saturating_add(len)).unwrap_or(&[])
}

/// A GUID stored as Microsoft/UEFI lay it out (first three groups little-endian), in the
/// usual upper-case text form.
pub fn guid(b: &[u8], at: usize) -> String {
    let g: [u8; 16] = array(b, at);
    format!(
        "{:08X}-{:04X}-{:04X}-{:02X}{:02X}-{}",
        u32::from_le_bytes([g[0], g[1], g[2], g[3]]),
        u16::from_le_bytes([g[4], g[5]]),
        u16::from_le_bytes([g[6], g[7]]),
        g[8],
        g[9],
        g[10..]
            .iter()
            .map(|x| format!("{x:02X}"))
            .collect::<String>()
    )
}

/// A NUL-padded ASCII field as text, or `None` if it holds anything but printable ASCII
/// before the first NUL (a damaged header must not smuggle control characters into output).
pub fn ascii(b: &[u8], at: usize, len: usize) -> Option<String> {
    let f = field(b, at, len);
    let text = f.split(|&c| c == 0).next().unwrap_or(&[]);
    if text.iter().all(|c| (0x20..0x7f).contains(c)) {
        Some(String::from_utf8_lossy(text).into_owned())
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_stop_at_the_disk_end_and_the_budget() {
        let data = vec![7u8; 4096];
        let read = |off: u64, buf: &mut [u8]| -> Result<()> {
            buf.copy_from_slice(&data[off as usize..off as usize + buf.len()]);
            Ok(())
        };
        let disk = Disk::new(&read, 4096);
        assert_eq!(disk.bytes(4000, 96, "x").unwrap(), Some(vec![7u8; 96]));
        assert_eq!(disk.bytes(4000, 97, "x").unwrap(), None);
        assert_eq!(disk.bytes(u64::MAX, 2, "x").unwrap(), None);

        let zeros = |_: u64, buf: &mut [u8]| -> Result<()> {
            buf.fill(0);
            Ok(())
        };
        let big = Disk::new(&zeros, u64::MAX);
        for _ in 0..READ_BUDGET >> 20 {
            big.bytes(0, 1 << 20, "chunk").unwrap();
        }
        let e = big.bytes(0, 1, "one more").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Integrity);
        assert!(e.to_string().contains("one more at offset 0"), "{e}");
    }

    #[test]
    fn read_errors_name_what_and_where() {
        let failing = |_: u64, _: &mut [u8]| -> Result<()> { Err(Error::usage("boom")) };
        let disk = Disk::new(&failing, 1 << 20);
        let e = disk.bytes(512, 512, "GPT header").unwrap_err();
        assert_eq!(e.to_string(), "reading GPT header at bytes 512..1024: boom");
    }

    #[test]
    fn fields() {
        let b = [
            0x3b, 0xd6, 0x67, 0x49, 0x29, 0x2e, 0xd8, 0x4a, 0x83, 0x99, 0xf6, 0xa3, 0x39, 0xe3,
            0xd0, 0x01,
        ];
        assert_eq!(guid(&b, 0), "4967D63B-2E29-4AD8-8399-F6A339E3D001");
        assert_eq!(le32(&b, 14), 0);
        assert_eq!(be16(&b, 0), 0x3bd6);
        assert_eq!(ascii(b"aes\0\0junk", 0, 9).as_deref(), Some("aes"));
        assert_eq!(ascii(b"a\x01s", 0, 3), None);
        assert_eq!(field(&b, 10, 100), &[] as &[u8]);
    }
}
