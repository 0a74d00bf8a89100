//! A snapshot's slots read back from the vault: every piece (a whole extent, or an overlaid
//! slot's base and overlays) fetched with one ranged read and checked (frame CRC, GCM tag,
//! decompressed length, its length against the manifest, the keyed id of its plaintext), an
//! overlaid slot's assembly checked against its content id.
//!
//! Strictly ([`slot_content`], what the backup's parent diffs and a normal restore use) the
//! first failed check fails the slot. Best effort ([`read_slot`] with a damage list, for
//! `restore --skip-damaged`) a piece that fails reads as zeros and its bytes are listed as a
//! [`Damage`], so everything intact is still restored. Only stored data is forgiven this
//! way: a key that cannot unwrap, or a manifest that fails its checks, still fails.

use std::ops::Range;

use super::spans::Span;
use crate::error::{Error, ErrorKind, Result};
use crate::vault::frame;
use crate::vault::manifest::{Manifest, Overlay, Slot, CONTENT_UNHASHED, ZERO};
use crate::vault::{Disk, Vault};

/// Bytes of the disk that a best-effort restore wrote as zeros, and why.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Damage {
    /// Disk offset of the first byte.
    pub offset: u64,
    /// Bytes.
    pub length: u64,
    /// The object at fault: the pack holding the piece (its object key).
    pub pack: String,
    /// The piece's extent id (hex), or for a slot whose pieces assemble wrongly its content id.
    pub extent: String,
    /// The check that failed, or why the piece could not be read.
    pub error: String,
}

/// Read (from `span` when it holds it) and open extent `e` of `m` into `out`, which is as
/// long as the manifest says its plaintext is.
fn fetch_extent_into(
    vault: &Vault,
    disk: &Disk,
    m: &Manifest,
    e: u32,
    span: Option<&Span>,
    out: &mut [u8],
) -> Result<()> {
    let loc = &m.extents[e as usize];
    let (pack, _) = m.packs[loc.pack as usize];
    let key = pack.object_key();
    let (offset, len) = (u64::from(loc.offset), loc.len as usize);
    let raw = match span.and_then(|s| s.frame(&pack, offset, len)) {
        Some(bytes) => bytes.to_vec(),
        None => vault.store().get_range(&key, offset, len)?,
    };
    let what = || format!("extent {} in {key} at offset {}", loc.id, loc.offset);
    frame::Expect {
        binding: &disk.binding,
        generation_keys: &|g| disk.generation(g),
        identity: &*disk.identity_for(m)?,
        id: &loc.id,
        what: &what,
    }
    .open_into(raw, out)
}

/// The plaintext of slot `i`, or `None` for a zero slot; any failed check is an error.
pub fn slot_content(vault: &Vault, disk: &Disk, m: &Manifest, i: usize) -> Result<Option<Vec<u8>>> {
    read_slot(vault, disk, m, i, None)
}

/// As [`slot_content`]; with `damaged`, a piece whose data fails its checks (or is missing)
/// reads as zeros and its bytes are appended there instead.
pub fn read_slot(
    vault: &Vault,
    disk: &Disk,
    m: &Manifest,
    i: usize,
    damaged: Option<&mut Vec<Damage>>,
) -> Result<Option<Vec<u8>>> {
    if matches!(m.slots[i], Slot::Zero) {
        return Ok(None);
    }
    let mut buf = vec![0u8; m.slot_len(i as u64) as usize];
    read_slot_into(vault, disk, m, i, damaged, None, &mut buf)?;
    Ok(Some(buf))
}

/// As [`read_slot`], decoded into `out` (exactly the slot's length, any content): `false`
/// for a zero slot, `out` then untouched. What a restore uses, `out` being one of its
/// aligned write buffers, so nothing is copied between decompression and the write; frames
/// `span` holds are taken from it instead of read ([`super::spans`]).
pub fn read_slot_into(
    vault: &Vault,
    disk: &Disk,
    m: &Manifest,
    i: usize,
    damaged: Option<&mut Vec<Damage>>,
    span: Option<&Span>,
    out: &mut [u8],
) -> Result<bool> {
    let len = m.slot_len(i as u64) as usize;
    if out.len() != len {
        return Err(Error::usage(format!(
            "slot {i} is {len} bytes, not the {} of its buffer",
            out.len()
        )));
    }
    let mut r = SlotReader {
        vault,
        disk,
        m,
        i,
        len,
        damaged,
        span,
        found: false,
    };
    match &m.slots[i] {
        Slot::Zero => return Ok(false),
        Slot::Extent(e) => {
            let mismatch = r.mismatch("extent");
            r.fetch(*e, std::slice::from_ref(&(0..len)), out, |n| {
                (n == len).then_some(()).ok_or_else(|| mismatch(n))
            })?;
        }
        Slot::Overlaid(s) => r.overlaid(s.base, &s.overlays, s.content, out)?,
    }
    Ok(true)
}

/// One slot being read.
struct SlotReader<'a> {
    vault: &'a Vault,
    disk: &'a Disk,
    m: &'a Manifest,
    i: usize,
    len: usize,
    damaged: Option<&'a mut Vec<Damage>>,
    /// Bytes fetched ahead that may hold this slot's frames.
    span: Option<&'a Span>,
    /// A piece of this slot was damaged (best effort only).
    found: bool,
}

impl SlotReader<'_> {
    /// Extent `e` into the start of `out`, its manifest length first checked by `check`;
    /// returns its length. If it failed and is recorded as damage over `ranges` (offsets
    /// within the slot), all of `out` is zeros and the length is 0.
    fn fetch(
        &mut self,
        e: u32,
        ranges: &[Range<usize>],
        out: &mut [u8],
        check: impl FnOnce(usize) -> Result<()>,
    ) -> Result<usize> {
        let n = self.m.extents[e as usize].plain_len as usize;
        let got = check(n).and_then(|()| {
            fetch_extent_into(self.vault, self.disk, self.m, e, self.span, &mut out[..n])
        });
        match got {
            Ok(()) => Ok(n),
            Err(err) => {
                let loc = &self.m.extents[e as usize];
                let pack = self.m.packs[loc.pack as usize].0.object_key();
                self.record(ranges, &pack, &hex::encode(loc.id.0), err)?;
                out.fill(0);
                Ok(0)
            }
        }
    }
    /// Record `err` as damage over `ranges` of the slot, or return it when reading strictly
    /// or when it is no damage to stored data (a key error, say).
    fn record(
        &mut self,
        ranges: &[Range<usize>],
        pack: &str,
        extent: &str,
        err: Error,
    ) -> Result<()> {
        let stored_data = matches!(
            err.kind(),
            ErrorKind::Integrity | ErrorKind::NotFound | ErrorKind::Io
        );
        let Some(list) = self.damaged.as_deref_mut().filter(|_| stored_data) else {
            return Err(err);
        };
        let slot_start = self.i as u64 * u64::from(self.m.slot_size);
        for r in ranges.iter().filter(|r| !r.is_empty()) {
            list.push(Damage {
                offset: slot_start + r.start as u64,
                length: r.len() as u64,
                pack: pack.to_owned(),
                extent: extent.to_owned(),
                error: err.to_string(),
            });
        }
        self.found = true;
        Ok(())
    }

    /// The Integrity error "snapshot S: slot I WHAT is N bytes, the slot L" for a piece of
    /// N bytes.
    fn mismatch(&self, what: &'static str) -> impl Fn(usize) -> Error {
        let (short, i, len) = (self.m.id.short(), self.i, self.len);
        move |got| {
            Error::integrity(format!(
                "snapshot {short}: slot {i} {what} is {got} bytes, the slot {len}"
            ))
        }
    }

    /// A base (or zeros) with overlays laid over it in `buf`, then the assembly's content id
    /// checked.
    fn overlaid(
        &mut self,
        base: u32,
        overlays: &[Overlay],
        content: crate::crypto::ExtentId,
        buf: &mut [u8],
    ) -> Result<()> {
        let (len, i, short) = (self.len, self.i, self.m.id.short());
        let spans: Vec<Range<u64>> = overlays
            .iter()
            .map(|o| u64::from(o.offset)..u64::from(o.offset) + u64::from(o.len))
            .collect();
        let based = if base == ZERO {
            0
        } else {
            // What the overlays do not cover is all a damaged base loses.
            let uncovered: Vec<Range<usize>> = crate::ranges::subtract(0..len as u64, &spans)
                .into_iter()
                .map(|r| r.start as usize..r.end as usize)
                .collect();
            let mismatch = self.mismatch("base");
            self.fetch(base, &uncovered, buf, |n| {
                (n <= len).then_some(()).ok_or_else(|| mismatch(n))
            })?
        };
        buf[based..].fill(0);
        for (o, span) in overlays.iter().zip(&spans) {
            let range = span.start as usize..span.end as usize;
            if range.end > len {
                return Err(Error::integrity(format!(
                    "snapshot {short}: slot {i} overlay runs past the disk end"
                )));
            }
            if o.extent == ZERO {
                buf[range].fill(0);
                continue;
            }
            let want = range.len();
            let at = o.offset;
            self.fetch(
                o.extent,
                std::slice::from_ref(&range),
                &mut buf[range.clone()],
                |n| {
                    if n == want {
                        return Ok(());
                    }
                    Err(Error::integrity(format!(
                        "snapshot {short}: slot {i} overlay at {at} holds {n} bytes, not {want}"
                    )))
                },
            )?;
        }
        // Every piece was checked against its id; this checks the assembly (slots made from
        // a change list have no assembled id: their pieces and the manifest's digest are
        // what is checked). With a damaged piece it cannot match, and need not.
        if !self.found
            && content != CONTENT_UNHASHED
            && self.disk.identity_for(self.m)?.extent_id.id(buf) != content
        {
            let err = Error::integrity(format!(
                "snapshot {short}: slot {i} assembled from its overlays does not match its content id"
            ));
            let pack = match base {
                ZERO => String::new(),
                b => {
                    let loc = &self.m.extents[b as usize];
                    self.m.packs[loc.pack as usize].0.object_key()
                }
            };
            self.record(
                std::slice::from_ref(&(0..len)),
                &pack,
                &hex::encode(content.0),
                err,
            )?;
            buf.fill(0);
        }
        Ok(())
    }
}

/// Extent indexes a slot references.
pub fn slot_frames(m: &Manifest, i: usize) -> impl Iterator<Item = u32> + '_ {
    let (base, overlays): (Option<u32>, &[Overlay]) = match &m.slots[i] {
        Slot::Zero => (None, &[]),
        Slot::Extent(e) => (Some(*e), &[]),
        Slot::Overlaid(o) => ((o.base != ZERO).then_some(o.base), o.overlays.as_slice()),
    };
    base.into_iter()
        .chain(overlays.iter().map(|o| o.extent).filter(|&e| e != ZERO))
}
