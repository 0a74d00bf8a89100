//! AES-256-GCM through `ring` (the fastest of the audited implementations measured here,
//! 6.9 GB/s on one core; see docs/ARCHITECTURE.md).
//!
//! Nonces are 96 bits from the OS CSPRNG, fresh for every seal. The number of seals per key is
//! bounded by the caller (DEK generations, see `vault::snapshots::GENERATION_SEAL_LIMIT`),
//! keeping the random-nonce collision probability far below NIST SP 800-38D's 2^-32 bound;
//! every key counts its seals ([`AeadKey::seals`]) so that the bound is checked against what
//! was really sealed.

use std::sync::atomic::{AtomicU64, Ordering};

use ring::aead::{Aad, LessSafeKey, Nonce as RingNonce, UnboundKey, AES_256_GCM};

use super::secret::{random_bytes, Secret32};
use crate::error::{Error, ErrorKind, Result};

/// Length of a GCM nonce.
pub const NONCE_LEN: usize = 12;
/// Length of a GCM tag.
pub const TAG_LEN: usize = 16;
/// A GCM nonce as stored next to its ciphertext.
pub type Nonce = [u8; NONCE_LEN];

/// An AES-256-GCM key. `ring` keeps the expanded key; it is dropped (and `ring` clears it) with
/// this value. Not `Clone` or `Debug`.
pub struct AeadKey {
    key: LessSafeKey,
    /// Seals made with this key object (each took a nonce, whether or not it was stored).
    seals: AtomicU64,
}

impl AeadKey {
    /// Expand a 256-bit secret into a GCM key.
    pub fn new(key: &Secret32) -> Self {
        // A 32-byte key is always valid for AES-256-GCM.
        let unbound = UnboundKey::new(&AES_256_GCM, key.expose()).expect("32-byte AES-256-GCM key");
        AeadKey {
            key: LessSafeKey::new(unbound),
            seals: AtomicU64::new(0),
        }
    }

    /// Seals made with this key object so far.
    pub fn seals(&self) -> u64 {
        self.seals.load(Ordering::Relaxed)
    }

    /// Encrypt `buf` in place under a fresh random nonce; returns the nonce and the tag.
    pub fn seal(&self, aad: &[u8], buf: &mut [u8]) -> Result<(Nonce, [u8; TAG_LEN])> {
        let nonce: Nonce = random_bytes()?;
        self.seals.fetch_add(1, Ordering::Relaxed);
        let tag = self
            .key
            .seal_in_place_separate_tag(
                RingNonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                buf,
            )
            .map_err(|_| Error::new(ErrorKind::Key, "AES-GCM seal failed"))?;
        let mut t = [0u8; TAG_LEN];
        t.copy_from_slice(tag.as_ref());
        Ok((nonce, t))
    }

    /// Encrypt a whole message: returns `nonce || ciphertext || tag`.
    pub fn seal_to_vec(&self, aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(NONCE_LEN + plaintext.len() + TAG_LEN);
        out.extend_from_slice(&[0u8; NONCE_LEN]);
        out.extend_from_slice(plaintext);
        let (nonce, tag) = self.seal(aad, &mut out[NONCE_LEN..])?;
        out[..NONCE_LEN].copy_from_slice(&nonce);
        out.extend_from_slice(&tag);
        Ok(out)
    }

    /// Authenticate and decrypt `ciphertext || tag` in place; returns the plaintext part.
    /// `what` names the object for the error message.
    pub fn open<'a>(
        &self,
        nonce: &Nonce,
        aad: &[u8],
        buf: &'a mut [u8],
        what: &dyn Fn() -> String,
    ) -> Result<&'a mut [u8]> {
        self.key
            .open_in_place(
                RingNonce::assume_unique_for_key(*nonce),
                Aad::from(aad),
                buf,
            )
            .map_err(|_| {
                Error::integrity(format!(
                    "{}: authentication failed (wrong key, or the data was altered)",
                    what()
                ))
            })
    }

    /// Inverse of [`AeadKey::seal_to_vec`].
    pub fn open_vec(
        &self,
        aad: &[u8],
        sealed: &[u8],
        what: &dyn Fn() -> String,
    ) -> Result<Vec<u8>> {
        if sealed.len() < NONCE_LEN + TAG_LEN {
            return Err(Error::integrity(format!(
                "{}: sealed data is {} bytes, shorter than nonce and tag",
                what(),
                sealed.len()
            )));
        }
        let nonce: Nonce = sealed[..NONCE_LEN].try_into().expect("length checked");
        let mut buf = sealed[NONCE_LEN..].to_vec();
        let n = self.open(&nonce, aad, &mut buf, what)?.len();
        buf.truncate(n);
        Ok(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key() -> AeadKey {
        AeadKey::new(&Secret32::from_bytes([7u8; 32]))
    }

    proptest! {
        #[test]
        fn seal_then_open_is_identity(data in proptest::collection::vec(any::<u8>(), 0..4096), aad in proptest::collection::vec(any::<u8>(), 0..64)) {
            let k = key();
            let sealed = k.seal_to_vec(&aad, &data).unwrap();
            prop_assert_eq!(k.open_vec(&aad, &sealed, &|| "t".into()).unwrap(), data);
        }

        #[test]
        fn any_bit_flip_is_rejected(data in proptest::collection::vec(any::<u8>(), 1..512), bit in any::<usize>()) {
            let k = key();
            let mut sealed = k.seal_to_vec(b"aad", &data).unwrap();
            let bit = bit % (sealed.len() * 8);
            sealed[bit / 8] ^= 1 << (bit % 8);
            let err = k.open_vec(b"aad", &sealed, &|| "obj".into()).unwrap_err();
            prop_assert_eq!(err.kind(), ErrorKind::Integrity);
        }
    }

    #[test]
    fn other_aad_is_rejected() {
        let k = key();
        let sealed = k.seal_to_vec(b"disk-a", b"hello").unwrap();
        assert!(k.open_vec(b"disk-b", &sealed, &|| "x".into()).is_err());
    }

    #[test]
    fn nonces_differ() {
        let k = key();
        let a = k.seal_to_vec(b"", b"same").unwrap();
        let b = k.seal_to_vec(b"", b"same").unwrap();
        assert_ne!(a[..NONCE_LEN], b[..NONCE_LEN]);
    }
}
