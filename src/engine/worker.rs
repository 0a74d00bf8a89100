//! What a rayon worker does with one slot read from the source:
//! zero check → keyed id → dedup lookup → compress (unless it will not shrink) → seal.
//! Each step is skipped as soon as an earlier one decides the slot's fate, so an unchanged
//! slot costs one hash and an all-zero slot one scan.

use std::cell::RefCell;
use std::collections::HashMap;

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
        /// The sealed frame.
        frame: Vec<u8>,
    },
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

thread_local! {
    static COMPRESSOR: RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> = const { RefCell::new(None) };
}

/// Compress `data` into `out[frame::HEADER_LEN..]`, returning the payload length if it saves
/// enough to be worth it.
fn compress_into(level: i32, data: &[u8], out: &mut [u8]) -> Result<Option<usize>> {
    COMPRESSOR.with(|cell| {
        let mut cell = cell.borrow_mut();
        if cell.as_ref().map(|(l, _)| *l) != Some(level) {
            let c = zstd::bulk::Compressor::new(level)
                .map_err(|e| Error::new(ErrorKind::Usage, format!("zstd level {level}: {e}")))?;
            *cell = Some((level, c));
        }
        let (_, c) = cell.as_mut().expect("set above");
        let limit = data.len() - data.len() / MIN_SAVING_DIVISOR;
        if data.len() > 2 * TRIAL_LEN {
            let n = c
                .compress_to_buffer(&data[..TRIAL_LEN], &mut out[frame::HEADER_LEN..])
                .map_err(|e| Error::new(ErrorKind::Io, format!("zstd: {e}")))?;
            if n > TRIAL_LEN - TRIAL_LEN / MIN_SAVING_DIVISOR {
                return Ok(None);
            }
        }
        match c.compress_to_buffer(data, &mut out[frame::HEADER_LEN..frame::HEADER_LEN + limit]) {
            Ok(n) => Ok(Some(n)),
            // The destination is cut to `limit`: "too small" means it did not save enough.
            Err(_) => Ok(None),
        }
    })
}

impl WorkerContext<'_> {
    /// Process one slot's bytes.
    pub fn process(&self, data: &[u8]) -> Result<Outcome> {
        if is_zero(data) {
            return Ok(Outcome::Zero);
        }
        let id = self.identity.extent_id.id(data);
        if self.known.contains_key(&id) {
            return Ok(Outcome::Known(id));
        }
        self.seal_new(id, data)
            .map(|frame| Outcome::New { id, frame })
    }

    /// Compress if worthwhile, then seal `data` into a frame.
    pub fn seal_new(&self, id: ExtentId, data: &[u8]) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; frame::HEADER_LEN + data.len()];
        let compressed = match self.compression.level {
            Some(level) => compress_into(level, data, &mut buf)?,
            None => None,
        };
        match compressed {
            Some(n) => buf.truncate(frame::HEADER_LEN + n),
            None => buf[frame::HEADER_LEN..].copy_from_slice(data),
        }
        frame::seal(
            buf,
            &self.binding,
            self.keys,
            self.generation,
            &id,
            data.len() as u32,
            compressed.is_some(),
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
            };
            for data in [&compressible, &random] {
                let Outcome::New { id, frame } = ctx.process(data).unwrap() else {
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
