//! Little-endian encoding of the vault's binary objects.
//!
//! Every on-disk structure is written with [`Enc`] and read with [`Dec`], which never panics:
//! reading past the end, or a length that does not fit, is an [`ErrorKind::Integrity`] error
//! naming the object and the byte offset (these readers are the fuzz targets' entry points).

use crate::error::{Error, ErrorKind, Result};

/// Appends little-endian fields to a buffer.
#[derive(Default)]
pub struct Enc(pub Vec<u8>);

impl Enc {
    /// An encoder with room for `n` bytes.
    pub fn with_capacity(n: usize) -> Self {
        Enc(Vec::with_capacity(n))
    }
    /// One byte.
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    /// Two bytes.
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Four bytes.
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Eight bytes.
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Raw bytes, no length.
    pub fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.0.extend_from_slice(v);
        self
    }
    /// A u16 length then UTF-8 bytes (callers keep strings under 64 KiB; longer ones are cut
    /// at a character boundary rather than producing an unreadable object).
    pub fn str(&mut self, s: &str) -> &mut Self {
        let mut end = s.len().min(u16::MAX as usize);
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        self.u16(end as u16).bytes(&s.as_bytes()[..end])
    }
    /// The encoded bytes.
    pub fn finish(self) -> Vec<u8> {
        self.0
    }
}

/// Reads little-endian fields from a slice; every failure names `what` and the offset.
pub struct Dec<'a> {
    buf: &'a [u8],
    pos: usize,
    what: &'a str,
}

impl<'a> Dec<'a> {
    /// A decoder over `buf`, naming `what` in errors (an object key, "manifest body", ...).
    pub fn new(buf: &'a [u8], what: &'a str) -> Self {
        Dec { buf, pos: 0, what }
    }
    /// Current offset.
    pub fn pos(&self) -> usize {
        self.pos
    }
    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
    /// An integrity error at the current offset.
    pub fn error(&self, msg: impl std::fmt::Display) -> Error {
        Error::integrity(format!("{}: {msg} at byte {}", self.what, self.pos))
    }
    /// The next `n` bytes.
    pub fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(self.error(format_args!(
                "truncated: need {n} bytes, {} left",
                self.remaining()
            )));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    /// A fixed-size array.
    pub fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        Ok(self.take(N)?.try_into().expect("take returned N bytes"))
    }
    /// One byte.
    pub fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    /// Two bytes.
    pub fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    /// Four bytes.
    pub fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    /// Eight bytes.
    pub fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    /// A string written by [`Enc::str`].
    pub fn str(&mut self) -> Result<String> {
        let n = self.u16()? as usize;
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| self.error("string is not UTF-8"))
    }
    /// A count of items that each take at least `min_item` bytes: rejects counts the remaining
    /// bytes cannot hold, so a damaged count cannot make us allocate gigabytes.
    pub fn count(&mut self, n: u64, min_item: usize) -> Result<usize> {
        if n.saturating_mul(min_item.max(1) as u64) > self.remaining() as u64 {
            return Err(self.error(format_args!(
                "count {n} does not fit in the {} bytes left",
                self.remaining()
            )));
        }
        Ok(n as usize)
    }
    /// The prologue every versioned object starts with: magic, u16 version (exactly
    /// `version`: another one is [`ErrorKind::Unsupported`], naming `kind`), u16 reserved.
    pub fn prologue(&mut self, magic: &[u8; 4], version: u16, kind: &str) -> Result<()> {
        self.prologue_in(magic, version..=version, kind).map(|_| ())
    }

    /// [`Dec::prologue`] for an object this build reads in several versions: returns the
    /// version found, or fails with [`ErrorKind::Unsupported`] outside `versions`.
    pub fn prologue_in(
        &mut self,
        magic: &[u8; 4],
        versions: std::ops::RangeInclusive<u16>,
        kind: &str,
    ) -> Result<u16> {
        self.magic(magic)?;
        let v = self.u16()?;
        if !versions.contains(&v) {
            let reads = if versions.start() == versions.end() {
                versions.start().to_string()
            } else {
                format!("{} to {}", versions.start(), versions.end())
            };
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!(
                    "{}: {kind} version {v}, this build reads {reads}",
                    self.what
                ),
            ));
        }
        self.reserved(2)?;
        Ok(v)
    }

    /// Reserved bytes: must be zero, so that a future meaning cannot be misread by this build.
    pub fn reserved(&mut self, n: usize) -> Result<()> {
        let at = self.pos;
        if self.take(n)?.iter().any(|&b| b != 0) {
            return Err(Error::integrity(format!(
                "{}: reserved bytes at {at} are not zero",
                self.what
            )));
        }
        Ok(())
    }

    /// Fails unless every byte was read.
    pub fn end(&self) -> Result<()> {
        if self.remaining() != 0 {
            return Err(self.error(format_args!(
                "{} unexpected trailing bytes",
                self.remaining()
            )));
        }
        Ok(())
    }
    /// Check a magic value.
    pub fn magic(&mut self, expect: &[u8; 4]) -> Result<()> {
        let m = self.array::<4>()?;
        if &m != expect {
            return Err(Error::integrity(format!(
                "{}: bad magic {:?}, expected {:?}",
                self.what,
                String::from_utf8_lossy(&m),
                String::from_utf8_lossy(expect)
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn decoder_never_panics(data in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut d = Dec::new(&data, "fuzz");
            let _ = d.u32().and_then(|_| d.str()).and_then(|_| d.u64()).and_then(|n| d.count(n, 8));
        }

        #[test]
        fn round_trip(a in any::<u8>(), b in any::<u16>(), c in any::<u32>(), d in any::<u64>(), s in ".{0,40}") {
            let mut e = Enc::default();
            e.u8(a).u16(b).u32(c).u64(d).str(&s);
            let buf = e.finish();
            let mut r = Dec::new(&buf, "t");
            prop_assert_eq!((r.u8().unwrap(), r.u16().unwrap(), r.u32().unwrap(), r.u64().unwrap(), r.str().unwrap()), (a, b, c, d, s));
            prop_assert!(r.end().is_ok());
        }
    }
}
