//! Extent frames: one stored piece of a disk, sealed with AES-256-GCM, inside a pack.
//!
//! ```text
//! off len
//!  0   4  frame length (whole frame, header included)
//!  4   4  CRC-32 (crc32fast, IEEE) of bytes [8, frame length): finds storage rot without keys
//!  8   1  flags: bit 0 = payload is zstd-compressed; other bits 0
//!  9   3  zero
//! 12   4  plaintext length
//! 16   4  DEK generation that sealed it
//! 20  32  extent id (keyed BLAKE3 of the plaintext)
//! 52  12  GCM nonce (random)
//! 64   …  ciphertext of the payload, then the 16-byte GCM tag
//! ```
//! AAD = "blockvault extent v1" ‖ vault id ‖ disk id ‖ bytes [8, 52) of the header: a frame
//! cannot be moved to another vault or disk, nor its flags, length, generation or id changed.

use crate::crypto::{ExtentId, GenerationKeys, IdentityKeys, Nonce, TAG_LEN};
use crate::error::{Error, Result};

/// Bytes before the ciphertext.
pub const HEADER_LEN: usize = 64;
/// Bytes a frame adds to its payload.
pub const OVERHEAD: usize = HEADER_LEN + TAG_LEN;
/// Largest plaintext a frame may hold (the largest slot size).
pub const MAX_PLAIN: usize = 4 << 20;
const FLAG_ZSTD: u8 = 1;
const AAD_PREFIX: &[u8] = b"blockvault extent v1";

/// Vault and disk a frame is bound to.
#[derive(Clone, Copy)]
pub struct Binding {
    /// The vault.
    pub vault_id: [u8; 16],
    /// The disk.
    pub disk_id: [u8; 16],
}

impl Binding {
    fn aad(&self, header: &[u8]) -> Vec<u8> {
        [AAD_PREFIX, &self.vault_id, &self.disk_id, &header[8..52]].concat()
    }
}

/// Seal a payload into a frame. `buf` holds [`HEADER_LEN`] bytes of room followed by the
/// payload (compressed or not); the tag is appended and the header filled in.
pub fn seal(
    mut buf: Vec<u8>,
    binding: &Binding,
    keys: &GenerationKeys,
    generation: u32,
    id: &ExtentId,
    plain_len: u32,
    compressed: bool,
) -> Result<Vec<u8>> {
    debug_assert!(buf.len() >= HEADER_LEN);
    let frame_len = buf.len() + TAG_LEN;
    let h = &mut buf[..HEADER_LEN];
    h[0..4].copy_from_slice(&(frame_len as u32).to_le_bytes());
    h[8] = if compressed { FLAG_ZSTD } else { 0 };
    h[9..12].fill(0);
    h[12..16].copy_from_slice(&plain_len.to_le_bytes());
    h[16..20].copy_from_slice(&generation.to_le_bytes());
    h[20..52].copy_from_slice(&id.0);
    let aad = binding.aad(&buf[..HEADER_LEN]);
    let (nonce, tag) = keys.extent.seal(&aad, &mut buf[HEADER_LEN..])?;
    buf[52..64].copy_from_slice(&nonce);
    buf.extend_from_slice(&tag);
    let crc = crc32fast::hash(&buf[8..]);
    buf[4..8].copy_from_slice(&crc.to_le_bytes());
    Ok(buf)
}

/// The header fields of a frame, after its CRC and length were checked.
pub struct Header {
    /// DEK generation.
    pub generation: u32,
    /// Extent id.
    pub id: ExtentId,
    /// Plaintext length.
    pub plain_len: usize,
    /// zstd payload.
    pub compressed: bool,
}

/// Check a frame's length and CRC and parse its header (no key needed: `verify` uses this to
/// find rot before any decryption).
pub fn check(frame: &[u8], what: &dyn Fn() -> String) -> Result<Header> {
    if frame.len() < OVERHEAD {
        return Err(Error::integrity(format!(
            "{}: frame of {} bytes is shorter than its header",
            what(),
            frame.len()
        )));
    }
    let len = u32::from_le_bytes(frame[0..4].try_into().expect("4 bytes")) as usize;
    if len != frame.len() {
        return Err(Error::integrity(format!(
            "{}: frame length field {len} but {} bytes stored",
            what(),
            frame.len()
        )));
    }
    let crc = u32::from_le_bytes(frame[4..8].try_into().expect("4 bytes"));
    if crc32fast::hash(&frame[8..]) != crc {
        return Err(Error::integrity(format!(
            "{}: CRC mismatch (storage damage)",
            what()
        )));
    }
    let flags = frame[8];
    if flags & !FLAG_ZSTD != 0 || frame[9..12] != [0; 3] {
        return Err(Error::integrity(format!(
            "{}: unknown frame flags {flags:#x}",
            what()
        )));
    }
    let plain_len = u32::from_le_bytes(frame[12..16].try_into().expect("4 bytes")) as usize;
    if plain_len > MAX_PLAIN {
        return Err(Error::integrity(format!(
            "{}: plaintext length {plain_len} exceeds {MAX_PLAIN}",
            what()
        )));
    }
    Ok(Header {
        generation: u32::from_le_bytes(frame[16..20].try_into().expect("4 bytes")),
        id: ExtentId(frame[20..52].try_into().expect("32 bytes")),
        plain_len,
        compressed: flags & FLAG_ZSTD != 0,
    })
}

/// Check, authenticate, decrypt and decompress a frame, and check that the plaintext's keyed
/// hash is the id the caller expects. `frame` is consumed as the decryption buffer.
pub fn open(
    mut frame: Vec<u8>,
    binding: &Binding,
    generation_keys: &dyn Fn(u32) -> Result<std::sync::Arc<GenerationKeys>>,
    identity: &IdentityKeys,
    expect: &ExtentId,
    what: &dyn Fn() -> String,
) -> Result<Vec<u8>> {
    let e = Expect {
        binding,
        generation_keys,
        identity,
        id: expect,
        what,
    };
    let h = e.decrypt(&mut frame)?;
    let payload = payload(&frame);
    let plain = if h.compressed {
        let out = decompress(payload, h.plain_len).map_err(|err| undecompressable(what, err))?;
        if out.len() != h.plain_len {
            return Err(decompressed_short(what, out.len(), h.plain_len));
        }
        out
    } else {
        check_stored_len(what, payload.len(), h.plain_len)?;
        let n = payload.len();
        frame.copy_within(HEADER_LEN..HEADER_LEN + n, 0);
        frame.truncate(n);
        frame
    };
    e.check_id(&plain)?;
    Ok(plain)
}

/// What a frame is opened against (the arguments of [`open`]): the vault and disk it is
/// bound to, the keys, the id the caller expects, and how errors name it.
pub struct Expect<'a> {
    /// The vault and disk.
    pub binding: &'a Binding,
    /// The keys of a DEK generation.
    pub generation_keys: &'a dyn Fn(u32) -> Result<std::sync::Arc<GenerationKeys>>,
    /// The keys of the content ids.
    pub identity: &'a IdentityKeys,
    /// The extent id the frame must hold, and its plaintext hash to.
    pub id: &'a ExtentId,
    /// The frame, for messages.
    pub what: &'a dyn Fn() -> String,
}

impl Expect<'_> {
    /// As [`open`], with the plaintext written into `out`, which must be exactly as long as
    /// it: a restore decompresses straight into its aligned write buffers, with no copy
    /// between decoding and an O_DIRECT write.
    pub fn open_into(&self, mut frame: Vec<u8>, out: &mut [u8]) -> Result<()> {
        let what = self.what;
        let h = self.decrypt(&mut frame)?;
        if h.plain_len != out.len() {
            return Err(Error::integrity(format!(
                "{}: holds {} bytes where {} are expected",
                what(),
                h.plain_len,
                out.len()
            )));
        }
        let payload = payload(&frame);
        if h.compressed {
            let n = decompress_into(payload, out).map_err(|e| undecompressable(what, e))?;
            if n != h.plain_len {
                return Err(decompressed_short(what, n, h.plain_len));
            }
        } else {
            check_stored_len(what, payload.len(), h.plain_len)?;
            out.copy_from_slice(payload);
        }
        self.check_id(out)
    }

    /// Check the frame (see [`check`]) and its id, and decrypt its payload in place.
    fn decrypt(&self, frame: &mut [u8]) -> Result<Header> {
        let h = check(frame, self.what)?;
        if &h.id != self.id {
            return Err(Error::integrity(format!(
                "{}: holds extent {} where {} was expected",
                (self.what)(),
                h.id,
                self.id
            )));
        }
        let keys = (self.generation_keys)(h.generation)?;
        let aad = self.binding.aad(&frame[..HEADER_LEN]);
        let nonce: Nonce = frame[52..64].try_into().expect("12 bytes");
        keys.extent
            .open(&nonce, &aad, &mut frame[HEADER_LEN..], self.what)?;
        Ok(h)
    }

    /// The plaintext's keyed hash is the expected id.
    fn check_id(&self, plain: &[u8]) -> Result<()> {
        if &self.identity.extent_id.id(plain) != self.id {
            return Err(Error::integrity(format!(
                "{}: content does not match its extent id",
                (self.what)()
            )));
        }
        Ok(())
    }
}

/// The payload of a frame [`decrypt`] opened: what lies between header and tag.
fn payload(frame: &[u8]) -> &[u8] {
    &frame[HEADER_LEN..frame.len() - TAG_LEN]
}

fn undecompressable(what: &dyn Fn() -> String, e: std::io::Error) -> Error {
    Error::integrity(format!("{}: zstd payload does not decompress: {e}", what()))
}

fn decompressed_short(what: &dyn Fn() -> String, got: usize, want: usize) -> Error {
    Error::integrity(format!(
        "{}: decompressed to {got} bytes, header says {want}",
        what()
    ))
}

fn check_stored_len(what: &dyn Fn() -> String, got: usize, want: usize) -> Result<()> {
    if got != want {
        return Err(Error::integrity(format!(
            "{}: payload is {got} bytes, header says {want}",
            what()
        )));
    }
    Ok(())
}

thread_local! {
    /// Each thread's zstd decompression context: creating one per frame showed up at about
    /// 1 % of a restore's CPU (it allocates and initialises some 160 KiB).
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// Decompress a payload of one or more zstd frames into a new buffer of at most `capacity`.
fn decompress(payload: &[u8], capacity: usize) -> std::io::Result<Vec<u8>> {
    with_decompressor(|d| d.decompress(payload, capacity))
}

/// Decompress a payload into `out`; the bytes written (more than fit is an error).
fn decompress_into(payload: &[u8], out: &mut [u8]) -> std::io::Result<usize> {
    with_decompressor(|d| d.decompress_to_buffer(payload, out))
}

fn with_decompressor<T>(
    f: impl FnOnce(&mut zstd::bulk::Decompressor<'static>) -> std::io::Result<T>,
) -> std::io::Result<T> {
    DECOMPRESSOR.with(|cell| {
        let mut cell = cell.borrow_mut();
        if cell.is_none() {
            *cell = Some(zstd::bulk::Decompressor::new()?);
        }
        f(cell.as_mut().expect("set above"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::Secret32;
    use std::sync::Arc;

    fn setup() -> (Arc<GenerationKeys>, IdentityKeys, Binding) {
        let dek = Secret32::from_bytes([6; 32]);
        (
            Arc::new(GenerationKeys::derive(&dek)),
            IdentityKeys::derive(&dek),
            Binding {
                vault_id: [1; 16],
                disk_id: [2; 16],
            },
        )
    }

    fn sealed(data: &[u8]) -> (Vec<u8>, ExtentId) {
        let (keys, identity, binding) = setup();
        let id = identity.extent_id.id(data);
        let mut buf = vec![0u8; HEADER_LEN];
        buf.extend_from_slice(data);
        (
            seal(buf, &binding, &keys, 0, &id, data.len() as u32, false).unwrap(),
            id,
        )
    }

    fn open_as(frame: Vec<u8>, binding: Binding, id: &ExtentId) -> Result<Vec<u8>> {
        let (keys, identity, _) = setup();
        open(
            frame,
            &binding,
            &|_| Ok(keys.clone()),
            &identity,
            id,
            &|| "frame".into(),
        )
    }

    /// `Expect::open_into` gives what `open` gives, compressed or stored, and refuses an `out` of
    /// another length than the frame's plaintext.
    #[test]
    fn open_into_equals_open() {
        let (keys, identity, home) = setup();
        let data: Vec<u8> = (0..70_000u32).map(|i| (i % 251) as u8).collect();
        let id = identity.extent_id.id(&data);
        let packed = zstd::bulk::compress(&data, 1).unwrap();
        let mut compressed = vec![0u8; HEADER_LEN];
        compressed.extend_from_slice(&packed);
        let compressed = seal(compressed, &home, &keys, 0, &id, data.len() as u32, true).unwrap();
        let (stored, _) = sealed(&data);
        for frame in [compressed, stored] {
            assert_eq!(open_as(frame.clone(), home, &id).unwrap(), data);
            let into = |len: usize| {
                let mut out = vec![7u8; len];
                Expect {
                    binding: &home,
                    generation_keys: &|_| Ok(keys.clone()),
                    identity: &identity,
                    id: &id,
                    what: &|| "frame".into(),
                }
                .open_into(frame.clone(), &mut out)
                .map(|()| out)
            };
            assert_eq!(into(data.len()).unwrap(), data);
            for len in [data.len() - 1, data.len() + 1] {
                let e = into(len).unwrap_err();
                assert_eq!(e.kind(), crate::ErrorKind::Integrity);
                assert!(e.to_string().contains("are expected"), "{e}");
            }
        }
    }

    #[test]
    fn a_frame_cannot_move_to_another_disk_or_vault() {
        let (frame, id) = sealed(b"guest data");
        let (_, _, home) = setup();
        assert_eq!(open_as(frame.clone(), home, &id).unwrap(), b"guest data");
        let other_disk = Binding {
            disk_id: [3; 16],
            ..home
        };
        let other_vault = Binding {
            vault_id: [9; 16],
            ..home
        };
        for b in [other_disk, other_vault] {
            assert_eq!(
                open_as(frame.clone(), b, &id).unwrap_err().kind(),
                crate::ErrorKind::Integrity
            );
        }
    }

    #[test]
    fn header_edits_are_caught_even_with_a_fixed_crc() {
        let (frame, id) = sealed(b"0123456789abcdef");
        let (_, _, home) = setup();
        // Claim a different plaintext length and recompute the CRC: GCM must still refuse.
        let mut f = frame.clone();
        f[12] ^= 1;
        let crc = crc32fast::hash(&f[8..]);
        f[4..8].copy_from_slice(&crc.to_le_bytes());
        assert!(open_as(f, home, &id)
            .unwrap_err()
            .to_string()
            .contains("authentication"));
        // Without fixing the CRC, rot is named as such before any key is used.
        let mut f = frame;
        let last = f.len() - 1;
        f[last] ^= 0x80;
        assert!(open_as(f, home, &id)
            .unwrap_err()
            .to_string()
            .contains("CRC"));
    }
}
