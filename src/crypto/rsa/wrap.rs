//! The wrap construction every RSA key shares (KEM-DEM).
//!
//! RSA-OAEP labels, which could carry our AAD, are not supported by every token, so the AAD
//! is bound by AES-256-GCM instead:
//! ```text
//!  W = 256 random bits (getrandom), fresh per wrap
//!  wrapped = u16 LE n | RSA-OAEP(public key, W, no label) [n = modulus bytes]
//!          | AES-256-GCM(W, AAD = caller's AAD, DEK) = nonce [12] ‖ ciphertext [32] ‖ tag [16]
//! ```
//! Unwrapping decrypts W with the private key (inside the token for PKCS#11), then opens the
//! GCM part with the caller's AAD. W is a [`Secret32`], zeroized when dropped.

use zeroize::Zeroizing;

use super::key::CmkKey;
use crate::crypto::aead::{AeadKey, NONCE_LEN, TAG_LEN};
use crate::crypto::secret::Secret32;
use crate::error::{Error, ErrorKind, Result};

/// Length of the GCM part: nonce, sealed 32-byte DEK, tag.
pub const SEALED_LEN: usize = NONCE_LEN + 32 + TAG_LEN;

/// The two parts of a wrapped DEK.
pub struct WrappedParts<'a> {
    /// RSA-OAEP ciphertext of the wrapping key W.
    pub rsa: &'a [u8],
    /// `nonce ‖ ciphertext ‖ tag` of the DEK under W.
    pub sealed: &'a [u8],
}

/// Split a wrapped DEK made for a key whose modulus is `modulus_len` bytes, checking every
/// length; `what` names the wrap in errors.
pub fn split<'a>(wrapped: &'a [u8], modulus_len: usize, what: &str) -> Result<WrappedParts<'a>> {
    let expect = 2 + modulus_len + SEALED_LEN;
    if wrapped.len() != expect {
        return Err(Error::integrity(format!(
            "{what}: wrapped DEK is {} bytes, expected {expect} for a {}-bit key",
            wrapped.len(),
            modulus_len * 8
        )));
    }
    let n = u16::from_le_bytes([wrapped[0], wrapped[1]]) as usize;
    if n != modulus_len {
        return Err(Error::integrity(format!(
            "{what}: RSA ciphertext length field is {n}, the key's modulus is {modulus_len} bytes"
        )));
    }
    let (rsa, sealed) = wrapped[2..].split_at(n);
    Ok(WrappedParts { rsa, sealed })
}

/// Wrap `dek` for `key` with the public key alone.
pub(super) fn seal(key: &CmkKey, dek: &Secret32, aad: &[u8]) -> Result<Vec<u8>> {
    let w = Secret32::random()?;
    let public = key.public();
    let n = public.ciphertext_size();
    let mut out = vec![0u8; 2 + n];
    out[..2].copy_from_slice(&(n as u16).to_le_bytes());
    let written = public
        .encrypt(key.oaep().algorithm(), w.expose(), &mut out[2..], None)
        .map_err(|_| {
            Error::new(
                ErrorKind::Key,
                format!("{}: RSA-OAEP encryption failed", key.id()),
            )
        })?
        .len();
    debug_assert_eq!(written, n, "RSA ciphertext is the modulus size");
    out.extend_from_slice(&AeadKey::new(&w).seal_to_vec(aad, dek.expose())?);
    Ok(out)
}

/// Unwrap a DEK wrapped for `key`: `decrypt` turns the RSA ciphertext back into W (in software
/// or inside a token) and must fail with a clear error of its own.
pub(super) fn open(
    key: &CmkKey,
    wrapped: &[u8],
    aad: &[u8],
    decrypt: impl FnOnce(&[u8]) -> Result<Zeroizing<Vec<u8>>>,
) -> Result<Secret32> {
    let what = format!("DEK wrapped by {}", key.id());
    let parts = split(wrapped, key.public().ciphertext_size(), &what)?;
    let w = decrypt(parts.rsa)?;
    let w = Secret32::from_slice(&w).map_err(|_| {
        Error::integrity(format!(
            "{what}: RSA-OAEP plaintext is {} bytes, not a 32-byte wrapping key",
            w.len()
        ))
    })?;
    let dek = Zeroizing::new(AeadKey::new(&w).open_vec(aad, parts.sealed, &|| what.clone())?);
    Secret32::from_slice(&dek)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::rsa::key::{tests::test_key, OaepHash};
    use proptest::prelude::*;

    #[test]
    fn seal_open_round_trip_and_binding() {
        let (key, private) = test_key(OaepHash::Sha256);
        let decrypt = |ct: &[u8]| {
            let mut out = Zeroizing::new(vec![0u8; private.min_output_size()]);
            let n = private
                .decrypt(key.oaep().algorithm(), ct, &mut out, None)
                .map_err(|_| Error::integrity("rsa"))?
                .len();
            out.truncate(n);
            Ok(out)
        };
        let dek = Secret32::from_bytes([7; 32]);
        let w = seal(key, &dek, b"aad").unwrap();
        assert_eq!(w.len(), 2 + 384 + SEALED_LEN);
        assert_eq!(
            open(key, &w, b"aad", decrypt).unwrap().expose(),
            dek.expose()
        );
        assert!(open(key, &w, b"other", decrypt).is_err());
        // W must be exactly 32 bytes: a decryption giving anything else is refused.
        let err = open(key, &w, b"aad", |_| Ok(Zeroizing::new(vec![1; 31])))
            .err()
            .unwrap();
        assert!(err.to_string().contains("31 bytes"), "{err}");
    }

    proptest! {
        #[test]
        fn split_never_panics_and_checks_lengths(
            data in proptest::collection::vec(any::<u8>(), 0..600),
            modulus in 0usize..600,
        ) {
            if let Ok(p) = split(&data, modulus, "w") {
                prop_assert_eq!(p.rsa.len(), modulus);
                prop_assert_eq!(p.sealed.len(), SEALED_LEN);
                prop_assert_eq!(2 + modulus + SEALED_LEN, data.len());
            }
        }
    }
}
