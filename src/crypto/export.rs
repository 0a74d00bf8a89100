//! Passphrase-protected export of a vault's keystore file, so that the root of trust can be
//! kept somewhere other than the backup host (`key export`, `key import`).
//!
//! ```text
//! "BVKE" | u16 version=1 | u16 0 | vault id [16] | u32 iterations | salt [16]     header, 44 B
//! | nonce [12] ‖ AES-256-GCM(keystore file bytes) ‖ tag [16]
//! key = PBKDF2-HMAC-SHA256(passphrase, salt, iterations, 32 bytes); AAD = the 44-byte header
//! ```
//! The keystore file travels as an opaque, already checksummed blob: export only checks its
//! magic and vault id (so an export cannot claim another vault), and whoever saves the
//! imported bytes loads them through the keystore's own decoder.
//!
//! Why these choices (docs/CRYPTO.md, "Keystore export"): a passphrase is the one secret an
//! operator can carry off the host; PBKDF2-HMAC-SHA256 at 600 000 iterations is OWASP's 2023
//! figure and is in `ring`, already a dependency; the header is the AAD, so the vault id,
//! iteration count and salt cannot be edited without the passphrase check failing. Byte layout
//! in docs/FORMAT.md ("Keystore export file").

use std::fs::File;
use std::io::Read;
use std::num::NonZeroU32;
use std::os::unix::ffi::OsStringExt;
use std::path::Path;

use ring::pbkdf2;
use zeroize::Zeroizing;

use super::aead::AeadKey;
use super::secret::{random_bytes, Secret32};
use super::{NONCE_LEN, TAG_LEN};
use crate::error::{Error, ErrorKind, IoContext, Result};
use crate::vault::codec::{Dec, Enc};

const MAGIC: &[u8; 4] = b"BVKE";
const VERSION: u16 = 1;
const WHAT: &str = "keystore export";
/// Iterations written by [`export`] (OWASP Password Storage Cheat Sheet, 2023, for
/// PBKDF2-HMAC-SHA256).
pub const ITERATIONS: u32 = 600_000;
/// Fewest iterations [`import`] accepts: a file claiming fewer is refused rather than
/// letting an edited file weaken the passphrase's protection.
pub const MIN_ITERATIONS: u32 = 100_000;
/// Most iterations [`import`] accepts: bounds the time a hostile file can make it spend.
pub const MAX_ITERATIONS: u32 = 10_000_000;
/// Bytes of the header (the AAD).
pub const HEADER_LEN: usize = 4 + 2 + 2 + 16 + 4 + 16;
/// Longest passphrase [`read_passphrase`] accepts, in bytes.
pub const MAX_PASSPHRASE: usize = 4096;
const _: () = assert!(HEADER_LEN == 44);
/// Keystore file magic and vault id end here (`crypto::keystore`, FORMAT.md §3.6).
const KEYSTORE_ID_END: usize = 24;

/// The readable part of an export file: which vault it is for and how its key is derived.
pub struct Header {
    /// The vault whose keystore file is inside.
    pub vault_id: [u8; 16],
    /// PBKDF2 iterations, within [`MIN_ITERATIONS`]..=[`MAX_ITERATIONS`].
    pub iterations: NonZeroU32,
    /// PBKDF2 salt: random, fresh for every export.
    pub salt: [u8; 16],
}

impl Header {
    fn encode(&self) -> Vec<u8> {
        let mut e = Enc::with_capacity(HEADER_LEN);
        e.bytes(MAGIC)
            .u16(VERSION)
            .u16(0)
            .bytes(&self.vault_id)
            .u32(self.iterations.get())
            .bytes(&self.salt);
        e.finish()
    }

    /// Parse the header of an export file and return it with the sealed part. Needs no
    /// passphrase (e.g. to say which vault a file is for); nothing here is authenticated
    /// until [`import`] opens the sealed part.
    pub fn parse(export: &[u8]) -> Result<(Header, &[u8])> {
        let mut d = Dec::new(export, WHAT);
        d.prologue(MAGIC, VERSION, "format")?;
        let vault_id = d.array()?;
        let at = d.pos();
        let n = d.u32()?;
        let iterations = NonZeroU32::new(n)
            .filter(|n| (MIN_ITERATIONS..=MAX_ITERATIONS).contains(&n.get()))
            .ok_or_else(|| {
                Error::integrity(format!(
                    "{WHAT}: PBKDF2 iteration count {n} at byte {at} is outside \
                     {MIN_ITERATIONS} to {MAX_ITERATIONS}"
                ))
            })?;
        let salt = d.array()?;
        let sealed = d.take(d.remaining())?;
        if sealed.len() < NONCE_LEN + KEYSTORE_ID_END + TAG_LEN {
            return Err(d.error(format_args!(
                "truncated: sealed keystore is {} bytes, at least {} expected",
                sealed.len(),
                NONCE_LEN + KEYSTORE_ID_END + TAG_LEN
            )));
        }
        Ok((
            Header {
                vault_id,
                iterations,
                salt,
            },
            sealed,
        ))
    }

    /// The AES-256-GCM key for `passphrase`; the PBKDF2 output is zeroized once expanded.
    fn key(&self, passphrase: &[u8]) -> AeadKey {
        let mut raw = Zeroizing::new([0u8; 32]);
        pbkdf2::derive(
            pbkdf2::PBKDF2_HMAC_SHA256,
            self.iterations,
            &self.salt,
            passphrase,
            raw.as_mut(),
        );
        AeadKey::new(&Secret32::from_bytes(*raw))
    }
}

fn check_passphrase(passphrase: &[u8]) -> Result<()> {
    if passphrase.is_empty() {
        return Err(Error::usage("the passphrase is empty"));
    }
    Ok(())
}

/// The keystore file must name `vault_id`: a wrong file is refused at export, and at import
/// an authenticated plaintext that does not match its header is refused too.
fn check_keystore_file(bytes: &[u8], vault_id: &[u8; 16], what: &str) -> Result<()> {
    let ok = bytes.len() >= KEYSTORE_ID_END
        && &bytes[..4] == b"BVKS"
        && &bytes[8..KEYSTORE_ID_END] == vault_id;
    if ok {
        Ok(())
    } else {
        Err(Error::new(
            ErrorKind::Key,
            format!(
                "{what} is not a keystore file of vault {}",
                hex::encode(vault_id)
            ),
        ))
    }
}

/// Seal the bytes of a vault's keystore file under `passphrase` (PBKDF2 with [`ITERATIONS`]
/// and a fresh random salt). Returns the export file's bytes.
pub fn export(
    keystore_file_bytes: &[u8],
    vault_id: &[u8; 16],
    passphrase: &[u8],
) -> Result<Vec<u8>> {
    check_passphrase(passphrase)?;
    check_keystore_file(keystore_file_bytes, vault_id, "the data to export")?;
    let header = Header {
        vault_id: *vault_id,
        iterations: const { NonZeroU32::new(ITERATIONS).unwrap() },
        salt: random_bytes()?,
    };
    let mut out = header.encode();
    let sealed = header
        .key(passphrase)
        .seal_to_vec(&out, keystore_file_bytes)?;
    out.extend_from_slice(&sealed);
    Ok(out)
}

/// Open an export file: returns the vault id and the keystore file bytes to save (checked
/// to be that vault's keystore file; its full decoding is the keystore's). A wrong
/// passphrase and an altered file give the same [`ErrorKind::Key`] error: GCM cannot tell
/// them apart.
pub fn import(export: &[u8], passphrase: &[u8]) -> Result<([u8; 16], Zeroizing<Vec<u8>>)> {
    check_passphrase(passphrase)?;
    let (header, sealed) = Header::parse(export)?;
    let plain = header
        .key(passphrase)
        .open_vec(&export[..HEADER_LEN], sealed, &|| WHAT.to_string())
        .map(Zeroizing::new)
        .map_err(|_| Error::new(ErrorKind::Key, "wrong passphrase or damaged export file"))?;
    check_keystore_file(&plain, &header.vault_id, "the exported data")?;
    Ok((header.vault_id, plain))
}

/// The passphrase, from `file` if given (at most [`MAX_PASSPHRASE`] bytes, one trailing
/// newline stripped), else from the environment variable `env`. Never from a command-line
/// argument, which other users can read in the process list. An empty passphrase is refused.
pub fn read_passphrase(file: Option<&Path>, env: &str) -> Result<Zeroizing<Vec<u8>>> {
    let pass = match file {
        Some(path) => {
            // Read up to the limit plus a CR LF, so that a longer file is seen as such, into a
            // buffer with room to spare: it never reallocates (which would leave copies).
            let mut buf = Zeroizing::new(Vec::with_capacity(MAX_PASSPHRASE + 3));
            File::open(path)
                .and_then(|f| f.take(MAX_PASSPHRASE as u64 + 2).read_to_end(&mut buf))
                .ctx(|| format!("reading passphrase file {}", path.display()))?;
            if buf.ends_with(b"\n") {
                buf.pop();
                if buf.ends_with(b"\r") {
                    buf.pop();
                }
            }
            buf
        }
        None => match std::env::var_os(env) {
            Some(v) => Zeroizing::new(v.into_vec()),
            None => {
                return Err(Error::usage(format!(
                    "no passphrase: give a passphrase file or set {env}"
                )))
            }
        },
    };
    let from = || match file {
        Some(p) => format!("passphrase file {}", p.display()),
        None => format!("passphrase in {env}"),
    };
    if pass.is_empty() {
        return Err(Error::usage(format!("{} is empty", from())));
    }
    if pass.len() > MAX_PASSPHRASE {
        return Err(Error::usage(format!(
            "{} is longer than {MAX_PASSPHRASE} bytes",
            from()
        )));
    }
    Ok(pass)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_and_bounds_iterations() {
        let h = Header {
            vault_id: [3; 16],
            iterations: NonZeroU32::new(ITERATIONS).unwrap(),
            salt: [9; 16],
        };
        let mut file = h.encode();
        file.extend_from_slice(&[0; NONCE_LEN + KEYSTORE_ID_END + TAG_LEN]);
        let (back, sealed) = Header::parse(&file).unwrap();
        assert_eq!(
            (back.vault_id, back.iterations, back.salt),
            ([3; 16], h.iterations, [9; 16])
        );
        assert_eq!(sealed.len(), NONCE_LEN + KEYSTORE_ID_END + TAG_LEN);
        for n in [0, MIN_ITERATIONS - 1, MAX_ITERATIONS + 1, u32::MAX] {
            file[24..28].copy_from_slice(&n.to_le_bytes());
            let err = Header::parse(&file).err().unwrap();
            assert_eq!(err.kind(), ErrorKind::Integrity);
            assert!(err.to_string().contains("at byte 24"), "{err}");
        }
    }

    /// The vector in docs/FORMAT.md ("Keystore export file"), made with Python's `hashlib`
    /// PBKDF2 and `cryptography` AES-GCM: an export written by another implementation of the
    /// documented layout imports here.
    #[test]
    fn independent_test_vector_imports() {
        let file = hex::decode(concat!(
            "42564b4501000000a0a1a2a3a4a5a6a7a8a9aaabacadaeafa0860100000102030405060708090a0b0c0d0e0f",
            "c0c1c2c3c4c5c6c7c8c9cacb081560b03355e425624786be0d7cfa962ccc3712a177a270a993cd95959823d0",
            "84ee6f2f3c3e91d6c884b49baba54d5b",
        ))
        .unwrap();
        let (id, plain) = import(&file, b"correct horse battery staple").unwrap();
        let vault_id: [u8; 16] = std::array::from_fn(|i| 0xa0 + i as u8);
        assert_eq!(id, vault_id);
        assert_eq!(
            &plain[..],
            [&b"BVKS\x01\0\0\0"[..], &vault_id, b"keystore"].concat()
        );
    }
}
