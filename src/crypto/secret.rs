//! A 256-bit secret that never leaves memory unprotected by accident.

use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::error::{Error, ErrorKind, Result};

/// 32 secret bytes: zeroized on drop, neither `Copy`, `Clone` nor `Debug`, so a key cannot be
/// duplicated or logged without an explicit call.
#[derive(Zeroize, ZeroizeOnDrop)]
pub struct Secret32([u8; 32]);

impl Secret32 {
    /// Fresh key material from the operating system's CSPRNG.
    pub fn random() -> Result<Self> {
        let mut k = Secret32([0u8; 32]);
        fill_random(&mut k.0)?;
        Ok(k)
    }

    /// Take ownership of bytes; the caller's copy should be zeroized by the caller.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Secret32(bytes)
    }

    /// Copy from a slice that must be exactly 32 bytes long.
    pub fn from_slice(bytes: &[u8]) -> Result<Self> {
        let arr: [u8; 32] = bytes.try_into().map_err(|_| {
            Error::new(
                ErrorKind::Key,
                format!("key is {} bytes, expected 32", bytes.len()),
            )
        })?;
        Ok(Secret32(arr))
    }

    /// The key bytes, for handing to a primitive.
    pub fn expose(&self) -> &[u8; 32] {
        &self.0
    }
}

/// Fill `buf` from getrandom; a failure here is fatal for the operation, never papered over.
pub fn fill_random(buf: &mut [u8]) -> Result<()> {
    getrandom::fill(buf).map_err(|e| {
        Error::new(
            ErrorKind::Io,
            format!("operating system random source failed: {e}"),
        )
    })
}

/// `N` random bytes (identifiers, nonces).
pub fn random_bytes<const N: usize>() -> Result<[u8; N]> {
    let mut b = [0u8; N];
    fill_random(&mut b)?;
    Ok(b)
}
