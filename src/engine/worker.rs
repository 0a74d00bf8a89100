//! What a rayon worker does with one slot read from the source:
//! zero check → keyed id → dedup lookup → compress (unless it will not shrink) → seal.
//! Each step is skipped as soon as an earlier one decides the slot's fate, so an unchanged
//! slot costs one hash and an all-zero slot one scan.

use std::cell::RefCell;
use std::collections::HashMap;

use super::overlay::Piece;
use crate::crypto::{ExtentId, GenerationKeys, IdentityKeys};
use crate::error::{Error, ErrorKind, Result};
use crate::vault::frame::{self, Binding};

/// Sample compressed first to decide whether a slot is worth compressing at all.
const TRIAL_LEN: usize = 64 << 10;
/// A payload that does not shrink by at least 1/32 is stored raw: decompressing it on restore
/// would cost more than the bytes saved.
const MIN_SAVING_DIVISOR: usize = 32;

/// Compression settings of a job.
#[derive(Debug, Clone, Copy)]
pub struct Compression {
    /// zstd level; `None` switches compression off.
    pub level: Option<i32>,
}

/// Everything a worker needs, shared by reference across the pool.
pub struct WorkerContext<'a> {
    /// Vault and disk binding for the AAD.
    pub binding: Binding,
    /// Content-identity keys.
    pub identity: &'a IdentityKeys,
    /// Sealing keys of the job's DEK generation.
    pub keys: &'a GenerationKeys,
    /// That generation's number.
    pub generation: u32,
    /// Extents the parent snapshot already holds.
    pub known: &'a HashMap<ExtentId, crate::vault::manifest::ExtentLoc>,
    /// Compression settings.
    pub compression: Compression,
    /// Where frame buffers come from.
    pub buffers: Recycler,
    /// The parent's content, for storing changed slots as overlays (`None`: whole slots).
    pub parent: Option<super::overlay::ParentView<'a>>,
    /// Slot size, to place slots on the disk.
    pub slot_size: u32,
    /// Byte ranges of encrypted volumes (LUKS, BitLocker payloads): slots inside them are
    /// ciphertext, stored without trying to compress.
    pub ciphertext: Vec<std::ops::Range<u64>>,
}

/// What became of a slot.
pub enum Outcome {
    /// Every byte is zero: nothing stored.
    Zero,
    /// The parent already stores this content.
    Known(ExtentId),
    /// New content, sealed into a frame for the pack writer.
    New {
        /// Its id.
        id: ExtentId,
        /// Plaintext length.
        len: u32,
        /// The sealed frame.
        frame: Vec<u8>,
    },
    /// Changed in places: the parent's pieces plus overlays for the changed runs.
    Overlaid(super::overlay::Overlaid),
    /// One changed range of a slot read on its own (a change list named it); the writer
    /// lays the slot's pieces over the parent's once all have arrived.
    Piece(super::overlay::NewOverlay),
}

/// True if every byte of `data` is zero. Folds 64-byte chunks with OR, which the compiler
/// vectorises (tens of GB/s), instead of a byte-by-byte early-exit loop.
pub fn is_zero(data: &[u8]) -> bool {
    let mut chunks = data.chunks_exact(64);
    for c in &mut chunks {
        let mut acc = 0u64;
        for w in c.chunks_exact(8) {
            acc |= u64::from_ne_bytes(w.try_into().expect("8 bytes"));
        }
        if acc != 0 {
            return false;
        }
    }
    chunks.remainder().iter().all(|&b| b == 0)
}

/// Frame buffers handed back by the writer once copied into a pack, so that in steady state
/// no worker allocates (and page-faults in) a fresh megabyte per slot.
#[derive(Clone)]
pub struct Recycler {
    tx: crossbeam_channel::Sender<Vec<u8>>,
    rx: crossbeam_channel::Receiver<Vec<u8>>,
}

impl Recycler {
    /// Keep up to `n` spare buffers.
    pub fn new(n: usize) -> Self {
        let (tx, rx) = crossbeam_channel::bounded(n);
        Recycler { tx, rx }
    }

    /// An empty buffer with room for at least `cap` bytes.
    pub fn take(&self, cap: usize) -> Vec<u8> {
        let mut v = self.rx.try_recv().unwrap_or_default();
        v.clear();
        v.reserve(cap);
        v
    }

    /// Hand a buffer back (dropped if enough are spare).
    pub fn give(&self, v: Vec<u8>) {
        let _ = self.tx.try_send(v);
    }
}

/// A worker thread's zstd context, reused across slots.
struct Zstd {
    level: i32,
    compressor: zstd::bulk::Compressor<'static>,
}

thread_local! {
    static ZSTD: RefCell<Option<Zstd>> = const { RefCell::new(None) };
}

/// Compress `data` and append the result to `out` if it saves enough to be worth it; returns
/// whether it did (if not, `out` is as it was). A trial on the first 64 KiB rejects
/// incompressible data (ciphertext, media) at a fraction of the cost of compressing the whole
/// slot; when it passes, the trial's output is kept as the payload's first zstd frame and the
/// rest of the slot becomes a second one, so no byte is compressed twice. Both frames are
/// written straight into `out`, the frame buffer: no copy.
fn compress_onto(level: i32, data: &[u8], out: &mut Vec<u8>) -> Result<bool> {
    ZSTD.with(|cell| {
        let mut cell = cell.borrow_mut();
        if cell.as_ref().map(|z| z.level) != Some(level) {
            let compressor = zstd::bulk::Compressor::new(level)
                .map_err(|e| Error::new(ErrorKind::Usage, format!("zstd level {level}: {e}")))?;
            *cell = Some(Zstd { level, compressor });
        }
        let z = cell.as_mut().expect("set above");
        let base = out.len();
        let (trial, rest) = if data.len() > 2 * TRIAL_LEN {
            data.split_at(TRIAL_LEN)
        } else {
            (data, &[][..])
        };
        let bound = |n: usize| zstd::zstd_safe::compress_bound(n);
        out.reserve(bound(trial.len()) + bound(rest.len()));
        // Append one frame at the end of `out`, in its spare capacity.
        let mut append = |out: &mut Vec<u8>, src: &[u8]| -> Result<usize> {
            let mut at_end = std::io::Cursor::new(out);
            at_end.set_position(at_end.get_ref().len() as u64);
            z.compressor
                .compress_to_buffer(src, &mut at_end)
                .map_err(|e| Error::new(ErrorKind::Io, format!("zstd: {e}")))
        };
        let n = append(out, trial)?;
        if !rest.is_empty() {
            if n > TRIAL_LEN - TRIAL_LEN / MIN_SAVING_DIVISOR {
                out.truncate(base);
                return Ok(false);
            }
            append(out, rest)?;
        }
        if out.len() - base > data.len() - data.len() / MIN_SAVING_DIVISOR {
            out.truncate(base);
            return Ok(false);
        }
        Ok(true)
    })
}

impl WorkerContext<'_> {
    /// Process the bytes of slot `slot`.
    pub fn process(&self, slot: u64, data: &[u8]) -> Result<Outcome> {
        if is_zero(data) {
            return Ok(Outcome::Zero);
        }
        let id = self.identity.extent_id.id(data);
        if self.known.contains_key(&id) {
            return Ok(Outcome::Known(id));
        }
        if let Some(o) = self.same_as_parent_overlaid(id) {
            return Ok(Outcome::Overlaid(o));
        }
        if let Some(o) = self.try_overlay(slot, id, data)? {
            return Ok(Outcome::Overlaid(o));
        }
        let len = data.len() as u32;
        let start = slot * self.slot_size as u64;
        self.seal(id, data, !self.is_ciphertext(start, data.len()))
            .map(|frame| Outcome::New { id, len, frame })
    }

    /// Whether `[start, start+len)` of the disk lies inside an encrypted volume's ciphertext,
    /// which cannot shrink: compressing it would only cost time.
    fn is_ciphertext(&self, start: u64, len: usize) -> bool {
        self.ciphertext
            .iter()
            .any(|r| r.start <= start && start + len as u64 <= r.end)
    }

    /// What the changed range at disk offset `start` becomes: zeros, content the parent
    /// holds, or a new sealed frame.
    pub fn piece(&self, start: u64, data: &[u8]) -> Result<Piece> {
        if is_zero(data) {
            return Ok(Piece::Zero);
        }
        let id = self.identity.extent_id.id(data);
        if self.known.contains_key(&id) {
            return Ok(Piece::Known(id));
        }
        Ok(Piece::New {
            id,
            frame: self.seal(id, data, !self.is_ciphertext(start, data.len()))?,
        })
    }

    /// Compress if asked and worthwhile, then seal `data` into a frame (in a recycled buffer).
    pub fn seal(&self, id: ExtentId, data: &[u8], try_compress: bool) -> Result<Vec<u8>> {
        // Room for the worst case of two zstd frames, so compressing never reallocates.
        let bound = zstd::zstd_safe::compress_bound(TRIAL_LEN)
            + zstd::zstd_safe::compress_bound(data.len());
        let mut buf = self.buffers.take(frame::OVERHEAD + bound.max(data.len()));
        buf.extend_from_slice(&[0u8; frame::HEADER_LEN]);
        let compressed = match self.compression.level {
            Some(level) if try_compress => compress_onto(level, data, &mut buf)?,
            _ => false,
        };
        if !compressed {
            buf.extend_from_slice(data);
        }
        frame::seal(
            buf,
            &self.binding,
            self.keys,
            self.generation,
            &id,
            data.len() as u32,
            compressed,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::Secret32;
    use std::sync::Arc;

    #[test]
    fn zero_check() {
        assert!(is_zero(&[0; 1000]));
        for i in [0, 63, 64, 999] {
            let mut v = vec![0u8; 1000];
            v[i] = 1;
            assert!(!is_zero(&v), "byte {i}");
        }
    }

    #[test]
    fn sealed_frames_open_to_the_input() {
        let dek = Secret32::from_bytes([1; 32]);
        let identity = IdentityKeys::derive(&dek);
        let keys = Arc::new(GenerationKeys::derive(&dek));
        let known = HashMap::new();
        let binding = Binding {
            vault_id: [1; 16],
            disk_id: [2; 16],
        };
        let compressible: Vec<u8> = (0..300_000u32).map(|i| (i / 1000) as u8).collect();
        let random: Vec<u8> = (0..300_000u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        for level in [Some(1), None] {
            let ctx = WorkerContext {
                binding,
                identity: &identity,
                keys: &keys,
                generation: 0,
                known: &known,
                compression: Compression { level },
                buffers: Recycler::new(2),
                parent: None,
                slot_size: 1 << 20,
                ciphertext: Vec::new(),
            };
            for data in [&compressible, &random] {
                let Outcome::New { id, frame, .. } = ctx.process(0, data).unwrap() else {
                    panic!("new")
                };
                if level.is_some() && data == &compressible {
                    assert!(frame.len() < data.len() / 4);
                }
                let k2 = keys.clone();
                let plain = frame::open(
                    frame,
                    &binding,
                    &|_| Ok(k2.clone()),
                    &identity,
                    &id,
                    &|| "t".into(),
                )
                .unwrap();
                assert_eq!(&plain, data);
            }
        }
    }
}
