//! The copy-on-write overlay of a writable export: a local sparse file holding the 4 KiB
//! blocks clients wrote, so the vault is never written and a restart with the same file
//! carries on where the last one stopped.
//!
//! ```text
//!  0      4096                4096 + B (B: bitmap bytes rounded up to 4096)
//!  header │ bitmap, bit b set: block b was written │ block b at data + b * 4096 (sparse)
//! ```
//! The header (docs/FORMAT.md, "Serve overlay") names the vault, disk and snapshot it was
//! made for, the disk size and the block size; opening it for anything else is refused.
//! A block is written before its bit: a crash leaves at worst an unmarked block, which reads
//! from the snapshot as if that write never happened. `flush` syncs both. One overlay is
//! shared by every connection of the export, so `NBD_FLAG_CAN_MULTI_CONN` stays true.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock};

use crate::error::{Error, ErrorKind, Result};

/// First bytes of an overlay file. Never changes.
pub const MAGIC: [u8; 8] = *b"BVCOWOV1";
/// Format version.
pub const VERSION: u32 = 1;
/// Bytes per tracked block.
pub const BLOCK: u64 = 4096;
/// Header bytes (the bitmap starts here).
pub const HEADER_LEN: u64 = 4096;
/// Bytes of the header's fields; the rest of it is zeros.
const FIELDS_LEN: usize = 72;
const _: () = assert!(FIELDS_LEN as u64 <= HEADER_LEN);

/// What an overlay belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OverlayId {
    /// The vault's id.
    pub vault: [u8; 16],
    /// The disk's id.
    pub disk: [u8; 16],
    /// The snapshot's id.
    pub snapshot: [u8; 16],
    /// Disk size in bytes.
    pub size: u64,
}

impl OverlayId {
    fn encode(&self) -> [u8; FIELDS_LEN] {
        let mut b = [0u8; FIELDS_LEN];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&(BLOCK as u32).to_le_bytes());
        b[16..24].copy_from_slice(&self.size.to_le_bytes());
        b[24..40].copy_from_slice(&self.vault);
        b[40..56].copy_from_slice(&self.disk);
        b[56..72].copy_from_slice(&self.snapshot);
        b
    }

    /// Check a header read from `path` against `self`.
    pub fn check(&self, b: &[u8; FIELDS_LEN], path: &Path) -> Result<()> {
        let bad = |why: String| Error::usage(format!("overlay {}: {why}", path.display()));
        if b[0..8] != MAGIC {
            return Err(bad(
                "not a blockvault overlay (no BVCOWOV1 magic); give a new file name".into(),
            ));
        }
        let version = u32::from_le_bytes([b[8], b[9], b[10], b[11]]);
        if version != VERSION {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!(
                    "overlay {}: format version {version}, this build reads {VERSION}",
                    path.display()
                ),
            ));
        }
        let got = OverlayId {
            size: u64::from_le_bytes(b[16..24].try_into().unwrap_or_default()),
            vault: b[24..40].try_into().unwrap_or_default(),
            disk: b[40..56].try_into().unwrap_or_default(),
            snapshot: b[56..72].try_into().unwrap_or_default(),
        };
        let block = u32::from_le_bytes([b[12], b[13], b[14], b[15]]);
        let differs = [
            (
                got.vault != self.vault,
                "vault",
                hex::encode(got.vault),
                hex::encode(self.vault),
            ),
            (
                got.disk != self.disk,
                "disk",
                hex::encode(got.disk),
                hex::encode(self.disk),
            ),
            (
                got.snapshot != self.snapshot,
                "snapshot",
                hex::encode(got.snapshot),
                hex::encode(self.snapshot),
            ),
            (
                got.size != self.size,
                "disk size",
                got.size.to_string(),
                self.size.to_string(),
            ),
            (
                u64::from(block) != BLOCK,
                "block size",
                block.to_string(),
                BLOCK.to_string(),
            ),
        ];
        match differs.into_iter().find(|d| d.0) {
            None => Ok(()),
            Some((_, what, theirs, ours)) => Err(bad(format!(
                "made for {what} {theirs}, not {ours}: an overlay belongs to one snapshot; give a new file name"
            ))),
        }
    }
}

/// An open overlay.
pub struct Overlay {
    file: File,
    path: PathBuf,
    /// Bit b: block b holds written data. Readers take it shared.
    bits: RwLock<Vec<u8>>,
    /// Serialises writers: a partial block is read, merged and written as one step.
    write: Mutex<()>,
    data_start: u64,
    size: u64,
}

impl Overlay {
    /// Open `path` for `id`, creating it (sparse) when it does not exist.
    pub fn open(path: &Path, id: &OverlayId) -> Result<Overlay> {
        let io = |what: &str| {
            let what = format!("{what} overlay {}", path.display());
            move |e| Error::io(what, e)
        };
        let blocks = id.size.div_ceil(BLOCK);
        let bitmap_len = blocks.div_ceil(8);
        let data_start = HEADER_LEN + bitmap_len.div_ceil(BLOCK) * BLOCK;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(io("opening"))?;
        let len = file.metadata().map_err(io("reading"))?.len();
        if len == 0 {
            file.write_all_at(&id.encode(), 0).map_err(io("writing"))?;
            file.set_len(data_start + blocks * BLOCK)
                .map_err(io("sizing"))?;
            file.sync_all().map_err(io("syncing"))?;
        } else {
            let mut b = [0u8; FIELDS_LEN];
            file.read_exact_at(&mut b, 0)
                .map_err(io("reading the header of"))?;
            id.check(&b, path)?;
        }
        let mut bits = vec![0u8; bitmap_len as usize];
        file.read_exact_at(&mut bits, HEADER_LEN)
            .map_err(io("reading the bitmap of"))?;
        Ok(Overlay {
            file,
            path: path.to_owned(),
            bits: RwLock::new(bits),
            write: Mutex::new(()),
            data_start,
            size: id.size,
        })
    }

    /// Blocks written so far.
    pub fn blocks_written(&self) -> u64 {
        self.bits().iter().map(|b| u64::from(b.count_ones())).sum()
    }

    fn bits(&self) -> std::sync::RwLockReadGuard<'_, Vec<u8>> {
        self.bits.read().unwrap_or_else(|e| e.into_inner())
    }

    fn has(bits: &[u8], b: u64) -> bool {
        bits[(b / 8) as usize] & (1 << (b % 8)) != 0
    }

    /// The runs of `offset..offset+len` as (run, held here), block-aligned inside.
    pub fn runs(&self, offset: u64, len: u64) -> Vec<(std::ops::Range<u64>, bool)> {
        let bits = self.bits();
        let end = offset + len;
        let mut out: Vec<(std::ops::Range<u64>, bool)> = Vec::new();
        let mut at = offset;
        while at < end {
            let b = at / BLOCK;
            let to = ((b + 1) * BLOCK).min(end);
            let here = Self::has(&bits, b);
            match out.last_mut() {
                Some((r, h)) if *h == here => r.end = to,
                _ => out.push((at..to, here)),
            }
            at = to;
        }
        out
    }

    /// Read bytes held here (every block of the range must be marked written).
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.file
            .read_exact_at(buf, self.data_start + offset)
            .map_err(|e| {
                Error::io(
                    format!("reading overlay {} at {offset}", self.path.display()),
                    e,
                )
            })
    }

    /// Write `data` at `offset`; `base` fills the unwritten rest of a partly written block
    /// (it reads the snapshot).
    pub fn write(
        &self,
        offset: u64,
        data: &[u8],
        base: &dyn Fn(u64, &mut [u8]) -> Result<()>,
    ) -> Result<()> {
        let _w = self.write.lock().unwrap_or_else(|e| e.into_inner());
        let end = offset + data.len() as u64;
        let first = offset / BLOCK;
        let last = end.div_ceil(BLOCK);
        let span = first * BLOCK..(last * BLOCK).min(self.size);
        let mut buf = vec![0u8; (span.end - span.start) as usize];
        // Only the first and last blocks can be partial: fill them from what is there now.
        for b in [first, last - 1] {
            let r = b * BLOCK..((b + 1) * BLOCK).min(self.size);
            if offset <= r.start && end >= r.end {
                continue;
            }
            let dst = &mut buf[(r.start - span.start) as usize..(r.end - span.start) as usize];
            if Self::has(&self.bits(), b) {
                self.read(r.start, dst)?;
            } else {
                base(r.start, dst)?;
            }
        }
        buf[(offset - span.start) as usize..(end - span.start) as usize].copy_from_slice(data);
        let io = |e| {
            Error::io(
                format!("writing overlay {} at {offset}", self.path.display()),
                e,
            )
        };
        self.file
            .write_all_at(&buf, self.data_start + span.start)
            .map_err(io)?;
        let mut bits = self.bits.write().unwrap_or_else(|e| e.into_inner());
        for b in first..last {
            bits[(b / 8) as usize] |= 1 << (b % 8);
        }
        let bytes = (first / 8) as usize..((last - 1) / 8) as usize + 1;
        self.file
            .write_all_at(&bits[bytes.clone()], HEADER_LEN + bytes.start as u64)
            .map_err(io)
    }

    /// Make every write so far durable.
    pub fn flush(&self) -> Result<()> {
        self.file
            .sync_data()
            .map_err(|e| Error::io(format!("syncing overlay {}", self.path.display()), e))
    }
}
