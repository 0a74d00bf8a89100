//! Bounded big-endian field reads. Every qcow2 number is big-endian, and every structure comes
//! from the image file, so a read past the bytes at hand is an error naming the structure, the
//! field and its file offset, never a panic.

use super::integrity;
use crate::error::{Error, Result};

/// Bytes of one on-disk structure, read from file offset `base` of image `image`.
pub(super) struct Fields<'a> {
    /// The structure's bytes (possibly fewer than it needs, when the file is short).
    pub bytes: &'a [u8],
    /// File offset of `bytes[0]`, for messages.
    pub base: u64,
    /// The image path, for messages.
    pub image: &'a str,
    /// What the structure is ("header", "bitmap directory entry 2"), for messages.
    pub what: &'a str,
}

impl<'a> Fields<'a> {
    /// `len` bytes at `at` (relative to `bytes`), or an error naming `field`.
    pub fn bytes(&self, at: usize, len: usize, field: &str) -> Result<&'a [u8]> {
        at.checked_add(len)
            .and_then(|end| self.bytes.get(at..end))
            .ok_or_else(|| {
                self.error(
                    at,
                    field,
                    format_args!(
                        "{len} bytes needed, but the {} ends after {} bytes",
                        self.what,
                        self.bytes.len()
                    ),
                )
            })
    }

    /// A big-endian u64 at `at`.
    pub fn u64(&self, at: usize, field: &str) -> Result<u64> {
        Ok(u64::from_be_bytes(self.array(at, field)?))
    }

    /// A big-endian u32 at `at`.
    pub fn u32(&self, at: usize, field: &str) -> Result<u32> {
        Ok(u32::from_be_bytes(self.array(at, field)?))
    }

    /// A big-endian u16 at `at`.
    pub fn u16(&self, at: usize, field: &str) -> Result<u16> {
        Ok(u16::from_be_bytes(self.array(at, field)?))
    }

    /// The byte at `at`.
    pub fn u8(&self, at: usize, field: &str) -> Result<u8> {
        Ok(u8::from_be_bytes(self.array(at, field)?))
    }

    fn array<const N: usize>(&self, at: usize, field: &str) -> Result<[u8; N]> {
        let mut a = [0; N];
        a.copy_from_slice(self.bytes(at, N, field)?);
        Ok(a)
    }

    /// An integrity error about `field` at `at`: "qcow2 image X: header field l1_size (file
    /// offset 36): problem".
    pub fn error(&self, at: usize, field: &str, problem: impl std::fmt::Display) -> Error {
        integrity(
            self.image,
            format_args!(
                "{} field {field} (file offset {}): {problem}",
                self.what,
                self.base.saturating_add(at as u64)
            ),
        )
    }
}

/// The big-endian u64 words of a table (L1, L2, bitmap table); a trailing partial word, which
/// callers never pass, is ignored.
pub(super) fn words(bytes: &[u8]) -> impl Iterator<Item = u64> + '_ {
    bytes.chunks_exact(8).map(|c| {
        let mut a = [0; 8];
        a.copy_from_slice(c);
        u64::from_be_bytes(a)
    })
}
