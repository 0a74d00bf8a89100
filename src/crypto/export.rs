//! Passphrase-protected export of a vault's keystore file, so that the root of trust can be
//! kept somewhere other than the backup host (`key export`, `key import`).
//!
//! ```text
//! version 2 (written):  "BVKE" | u16 2 | u16 0 | vault id [16] | u32 memory KiB | u32 passes | u32 lanes | salt [16]   header, 52 B
//!                       key = Argon2id v1.3(passphrase, salt, memory, passes, lanes, 32 bytes)
//! version 1 (read):     "BVKE" | u16 1 | u16 0 | vault id [16] | u32 iterations | salt [16]                          header, 44 B
//!                       key = PBKDF2-HMAC-SHA256(passphrase, salt, iterations, 32 bytes)
//! both:                 header | nonce [12] ‖ AES-256-GCM(key, AAD = the header, keystore file bytes) ‖ tag [16]
//! ```
//! The keystore file travels as an opaque, already checksummed blob: export only checks its
//! magic and vault id (so an export cannot claim another vault), and whoever saves the
//! imported bytes loads them through the keystore's own decoder.
//!
//! Why these choices (docs/CRYPTO.md, "Keystore export"): a passphrase is the one secret an
//! operator can carry off the host, and the export holds every key of the vault, so each guess
//! must cost memory, not only time: Argon2id (RFC 9106) at 256 MiB and 3 passes. Version 1
//! files (PBKDF2, which GPUs guess cheaply) still import, so old exports restore. Every cost
//! parameter read from a file is bounded before anything is allocated: a crafted file can
//! neither make import allocate more than 1 GiB nor spend more than four times what an export
//! spends, nor open under costs below a floor. The header is the AAD, so none of it can be
//! edited without the open failing. Byte layout in docs/FORMAT.md ("Keystore export file").

use std::fs::File;
use std::io::Read;
use std::num::NonZeroU32;
use std::os::unix::ffi::OsStringExt;
use std::path::Path;

use argon2::{Algorithm, Argon2, Params, Version};
use ring::pbkdf2;
use zeroize::Zeroizing;

use super::aead::AeadKey;
use super::secret::{random_bytes, Secret32};
use super::{NONCE_LEN, TAG_LEN};
use crate::error::{Error, ErrorKind, IoContext, Result};
use crate::vault::codec::{Dec, Enc};

const MAGIC: &[u8; 4] = b"BVKE";
/// The version [`export`] writes (Argon2id); [`import`] also reads version 1 (PBKDF2).
pub const VERSION: u16 = 2;
const WHAT: &str = "keystore export";

/// Argon2id memory [`export`] uses, in KiB: 256 MiB (see docs/CRYPTO.md for the measured time).
pub const MEMORY_KIB: u32 = 256 * 1024;
/// Argon2id passes [`export`] uses.
pub const PASSES: u32 = 3;
/// Argon2id lanes [`export`] uses: 1, since the `argon2` crate fills lanes one after another
/// here, so more lanes would cost an attacker's parallel hardware less and us nothing less.
pub const LANES: u32 = 1;
/// Least Argon2id memory [`import`] accepts, in KiB (19 MiB: OWASP's smallest Argon2id setting).
pub const MIN_MEMORY_KIB: u32 = 19 * 1024;
/// Most Argon2id memory [`import`] accepts, in KiB (1 GiB): what a hostile file can allocate.
pub const MAX_MEMORY_KIB: u32 = 1024 * 1024;
/// Fewest Argon2id passes [`import`] accepts (OWASP's smallest setting has 2).
pub const MIN_PASSES: u32 = 2;
/// Most Argon2id passes [`import`] accepts.
pub const MAX_PASSES: u32 = 10;
/// Most Argon2id lanes [`import`] accepts.
pub const MAX_LANES: u32 = 8;
/// Most Argon2id work (memory KiB × passes) [`import`] accepts: four times what [`export`]
/// uses, so a hostile file cannot make import run for long.
pub const MAX_WORK: u64 = 4 * MEMORY_KIB as u64 * PASSES as u64;

/// Fewest PBKDF2 iterations a version 1 file may claim: a file claiming fewer is refused
/// rather than opened under a weaker derivation than any writer used.
pub const MIN_ITERATIONS: u32 = 100_000;
/// Most PBKDF2 iterations a version 1 file may claim: bounds the time a hostile file costs.
pub const MAX_ITERATIONS: u32 = 10_000_000;

/// Header bytes (the AAD) of a version 2 file.
pub const HEADER_LEN: usize = 4 + 2 + 2 + 16 + 4 + 4 + 4 + 16;
/// Header bytes (the AAD) of a version 1 file.
pub const HEADER_LEN_V1: usize = 4 + 2 + 2 + 16 + 4 + 16;
const _: () = assert!(HEADER_LEN == 52 && HEADER_LEN_V1 == 44);

/// Shortest passphrase [`export`] accepts, in characters: it is all that guards every key
/// of the vault once the file leaves the host.
pub const MIN_PASSPHRASE_CHARS: usize = 12;
/// Longest passphrase [`read_passphrase`] accepts, in bytes.
pub const MAX_PASSPHRASE: usize = 4096;
/// Keystore file magic and vault id end here (`crypto::keystore`, FORMAT.md §3.6).
const KEYSTORE_ID_END: usize = 24;

/// How the sealing key is derived from the passphrase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kdf {
    /// Version 1: PBKDF2-HMAC-SHA256 with this many iterations.
    Pbkdf2 {
        /// Within [`MIN_ITERATIONS`]..=[`MAX_ITERATIONS`].
        iterations: NonZeroU32,
    },
    /// Version 2: Argon2id (version 1.3), within the bounds of the `MIN_`/`MAX_` constants.
    Argon2id {
        /// Memory in KiB.
        memory_kib: u32,
        /// Passes over the memory (t).
        passes: u32,
        /// Lanes (p).
        lanes: u32,
    },
}

/// The readable part of an export file: which vault it is for and how its key is derived.
pub struct Header {
    /// The vault whose keystore file is inside.
    pub vault_id: [u8; 16],
    /// The key derivation and its costs.
    pub kdf: Kdf,
    /// KDF salt: random, fresh for every export.
    pub salt: [u8; 16],
}

/// Check Argon2id costs read from byte `at` of a file against the bounds [`import`] keeps.
fn argon2_bounds(memory_kib: u32, passes: u32, lanes: u32, at: usize) -> Result<()> {
    let outside = |what: &str, v: u64, lo: u64, hi: u64| {
        Error::integrity(format!(
            "{WHAT}: Argon2id {what} {v} (header bytes from {at}) is outside {lo} to {hi}"
        ))
    };
    let (m, t, p) = (memory_kib as u64, passes as u64, lanes as u64);
    if !(MIN_MEMORY_KIB..=MAX_MEMORY_KIB).contains(&memory_kib) {
        return Err(outside(
            "memory (KiB)",
            m,
            MIN_MEMORY_KIB.into(),
            MAX_MEMORY_KIB.into(),
        ));
    }
    if !(MIN_PASSES..=MAX_PASSES).contains(&passes) {
        return Err(outside("passes", t, MIN_PASSES.into(), MAX_PASSES.into()));
    }
    if !(1..=MAX_LANES).contains(&lanes) {
        return Err(outside("lanes", p, 1, MAX_LANES.into()));
    }
    if m * t > MAX_WORK {
        return Err(outside(
            "work (memory KiB × passes)",
            m * t,
            (MIN_MEMORY_KIB * MIN_PASSES).into(),
            MAX_WORK,
        ));
    }
    Ok(())
}

impl Header {
    /// Header bytes for this KDF's version.
    pub fn size(&self) -> usize {
        match self.kdf {
            Kdf::Pbkdf2 { .. } => HEADER_LEN_V1,
            Kdf::Argon2id { .. } => HEADER_LEN,
        }
    }

    fn encode(&self) -> Vec<u8> {
        let mut e = Enc::with_capacity(self.size());
        let version = match self.kdf {
            Kdf::Pbkdf2 { .. } => 1,
            Kdf::Argon2id { .. } => VERSION,
        };
        e.bytes(MAGIC).u16(version).u16(0).bytes(&self.vault_id);
        match self.kdf {
            Kdf::Pbkdf2 { iterations } => e.u32(iterations.get()),
            Kdf::Argon2id {
                memory_kib,
                passes,
                lanes,
            } => e.u32(memory_kib).u32(passes).u32(lanes),
        };
        e.bytes(&self.salt);
        e.finish()
    }

    /// Parse the header of an export file (either version) and return it with the sealed
    /// part. Needs no passphrase (e.g. to say which vault a file is for); nothing here is
    /// authenticated until [`import`] opens the sealed part, but every cost is bounded.
    pub fn parse(export: &[u8]) -> Result<(Header, &[u8])> {
        let mut d = Dec::new(export, WHAT);
        let version = d.prologue_in(MAGIC, 1..=VERSION, "format")?;
        let vault_id = d.array()?;
        let at = d.pos();
        let kdf = if version == 1 {
            let n = d.u32()?;
            let iterations = NonZeroU32::new(n)
                .filter(|n| (MIN_ITERATIONS..=MAX_ITERATIONS).contains(&n.get()))
                .ok_or_else(|| {
                    Error::integrity(format!(
                        "{WHAT}: PBKDF2 iteration count {n} at byte {at} is outside \
                         {MIN_ITERATIONS} to {MAX_ITERATIONS}"
                    ))
                })?;
            Kdf::Pbkdf2 { iterations }
        } else {
            let (memory_kib, passes, lanes) = (d.u32()?, d.u32()?, d.u32()?);
            argon2_bounds(memory_kib, passes, lanes, at)?;
            Kdf::Argon2id {
                memory_kib,
                passes,
                lanes,
            }
        };
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
                kdf,
                salt,
            },
            sealed,
        ))
    }

    /// The AES-256-GCM key for `passphrase`; the KDF output is zeroized once expanded.
    fn key(&self, passphrase: &[u8]) -> Result<AeadKey> {
        let mut raw = Zeroizing::new([0u8; 32]);
        match self.kdf {
            Kdf::Pbkdf2 { iterations } => pbkdf2::derive(
                pbkdf2::PBKDF2_HMAC_SHA256,
                iterations,
                &self.salt,
                passphrase,
                raw.as_mut(),
            ),
            Kdf::Argon2id {
                memory_kib,
                passes,
                lanes,
            } => {
                let failed = |e: argon2::Error| {
                    Error::new(ErrorKind::Key, format!("{WHAT}: Argon2id failed: {e}"))
                };
                let params =
                    Params::new(memory_kib, passes, lanes, Some(raw.len())).map_err(failed)?;
                Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
                    .hash_password_into(passphrase, &self.salt, raw.as_mut())
                    .map_err(failed)?;
            }
        }
        Ok(AeadKey::new(&Secret32::from_slice(raw.as_ref())?))
    }
}

/// An empty passphrase is refused everywhere; [`export`] also refuses one shorter than
/// [`MIN_PASSPHRASE_CHARS`] (counted in characters if it is UTF-8, else in bytes). Import
/// accepts shorter ones, so that exports made before the minimum still open.
fn check_passphrase(passphrase: &[u8], new_export: bool) -> Result<()> {
    if passphrase.is_empty() {
        return Err(Error::usage("the passphrase is empty"));
    }
    let chars = std::str::from_utf8(passphrase).map_or(passphrase.len(), |s| s.chars().count());
    if new_export && chars < MIN_PASSPHRASE_CHARS {
        return Err(Error::usage(format!(
            "the passphrase has {chars} characters; an export needs at least \
             {MIN_PASSPHRASE_CHARS}, since it alone guards every key of the vault (use a long \
             random one, e.g. five or more words from a diceware list)"
        )));
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

/// Seal the bytes of a vault's keystore file under `passphrase` (Argon2id with
/// [`MEMORY_KIB`], [`PASSES`], [`LANES`] and a fresh random salt). Returns the export file's
/// bytes (version [`VERSION`]).
pub fn export(
    keystore_file_bytes: &[u8],
    vault_id: &[u8; 16],
    passphrase: &[u8],
) -> Result<Vec<u8>> {
    check_passphrase(passphrase, true)?;
    check_keystore_file(keystore_file_bytes, vault_id, "the data to export")?;
    let header = Header {
        vault_id: *vault_id,
        kdf: Kdf::Argon2id {
            memory_kib: MEMORY_KIB,
            passes: PASSES,
            lanes: LANES,
        },
        salt: random_bytes()?,
    };
    let mut out = header.encode();
    let sealed = header
        .key(passphrase)?
        .seal_to_vec(&out, keystore_file_bytes)?;
    out.extend_from_slice(&sealed);
    Ok(out)
}

/// Open an export file of either version: returns the vault id and the keystore file bytes
/// to save (checked to be that vault's keystore file; its full decoding is the keystore's). A
/// wrong passphrase and an altered file give the same [`ErrorKind::Key`] error: GCM cannot
/// tell them apart.
pub fn import(export: &[u8], passphrase: &[u8]) -> Result<([u8; 16], Zeroizing<Vec<u8>>)> {
    check_passphrase(passphrase, false)?;
    let (header, sealed) = Header::parse(export)?;
    let plain = header
        .key(passphrase)?
        .open_vec(&export[..header.size()], sealed, &|| WHAT.to_string())
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

    fn sealed_tail(mut file: Vec<u8>) -> Vec<u8> {
        file.extend_from_slice(&[0; NONCE_LEN + KEYSTORE_ID_END + TAG_LEN]);
        file
    }

    #[test]
    fn version_1_header_round_trips_and_bounds_iterations() {
        let h = Header {
            vault_id: [3; 16],
            kdf: Kdf::Pbkdf2 {
                iterations: NonZeroU32::new(600_000).unwrap(),
            },
            salt: [9; 16],
        };
        let mut file = sealed_tail(h.encode());
        let (back, sealed) = Header::parse(&file).unwrap();
        assert_eq!(
            (back.vault_id, back.kdf, back.salt),
            ([3; 16], h.kdf, [9; 16])
        );
        assert_eq!(back.size(), HEADER_LEN_V1);
        assert_eq!(sealed.len(), NONCE_LEN + KEYSTORE_ID_END + TAG_LEN);
        for n in [0, MIN_ITERATIONS - 1, MAX_ITERATIONS + 1, u32::MAX] {
            file[24..28].copy_from_slice(&n.to_le_bytes());
            let err = Header::parse(&file).err().unwrap();
            assert_eq!(err.kind(), ErrorKind::Integrity);
            assert!(err.to_string().contains("at byte 24"), "{err}");
        }
    }

    #[test]
    fn version_2_header_round_trips_and_bounds_every_cost() {
        let h = Header {
            vault_id: [3; 16],
            kdf: Kdf::Argon2id {
                memory_kib: MEMORY_KIB,
                passes: PASSES,
                lanes: LANES,
            },
            salt: [9; 16],
        };
        let file = sealed_tail(h.encode());
        assert_eq!(&file[4..6], &2u16.to_le_bytes());
        let (back, _) = Header::parse(&file).unwrap();
        assert_eq!(
            (back.vault_id, back.kdf, back.salt),
            ([3; 16], h.kdf, [9; 16])
        );
        assert_eq!(back.size(), HEADER_LEN);
        // Memory at 24, passes at 28, lanes at 32: each bound, and memory × passes.
        for (m, t, p, says) in [
            (MIN_MEMORY_KIB - 1, 3, 1, "memory (KiB) 19455"),
            (MAX_MEMORY_KIB + 1, 3, 1, "memory (KiB) 1048577"),
            (u32::MAX, 3, 1, "memory (KiB)"),
            (MEMORY_KIB, MIN_PASSES - 1, 1, "passes 1"),
            (MEMORY_KIB, MAX_PASSES + 1, 1, "passes 11"),
            (MEMORY_KIB, 3, 0, "lanes 0"),
            (MEMORY_KIB, 3, MAX_LANES + 1, "lanes 9"),
            (
                MAX_MEMORY_KIB,
                MAX_PASSES,
                1,
                "work (memory KiB × passes) 10485760",
            ),
        ] {
            let mut bad = file.clone();
            bad[24..28].copy_from_slice(&m.to_le_bytes());
            bad[28..32].copy_from_slice(&t.to_le_bytes());
            bad[32..36].copy_from_slice(&p.to_le_bytes());
            let err = Header::parse(&bad).err().unwrap();
            assert_eq!(err.kind(), ErrorKind::Integrity);
            assert!(err.to_string().contains(says), "{says}: {err}");
            assert!(err.to_string().contains("from 24"), "{err}");
        }
        // The largest accepted work: exactly four times the export's.
        let mut edge = file.clone();
        edge[24..28].copy_from_slice(&(4 * MEMORY_KIB).to_le_bytes());
        assert!(Header::parse(&edge).is_ok());
        // An unknown version names the versions this build reads.
        let mut v3 = file;
        v3[4] = 3;
        let err = Header::parse(&v3).err().unwrap();
        assert_eq!(err.kind(), ErrorKind::Unsupported);
        assert!(err.to_string().contains("this build reads 1 to 2"), "{err}");
    }

    #[test]
    fn short_passphrases_are_refused_for_new_exports_only() {
        let keystore = [&b"BVKS\x02\0\0\0"[..], &[5; 16], b"keys"].concat();
        for short in [&b"eleven char"[..], "ünïcödé-pä".as_bytes()] {
            let err = export(&keystore, &[5; 16], short).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Usage);
            assert!(err.to_string().contains("at least 12"), "{err}");
        }
        // Twelve characters in 24 bytes pass the count (checked before any derivation).
        assert!(check_passphrase("ääääääääääää".as_bytes(), true).is_ok());
        assert!(check_passphrase(b"short", false).is_ok());
        assert!(check_passphrase(b"", false).is_err());
    }

    /// The vectors in docs/FORMAT.md ("Keystore export file"), made with Python: version 1
    /// with `hashlib` PBKDF2, version 2 with the reference Argon2 C library (Debian's
    /// libargon2, through ctypes), both sealed with `cryptography` AES-GCM. Exports written by
    /// another implementation of the documented layouts import here.
    #[test]
    fn independent_test_vectors_import() {
        let v1 = concat!(
            "42564b4501000000a0a1a2a3a4a5a6a7a8a9aaabacadaeafa0860100000102030405060708090a0b0c0d0e0f",
            "c0c1c2c3c4c5c6c7c8c9cacb081560b03355e425624786be0d7cfa962ccc3712a177a270a993cd95959823d0",
            "84ee6f2f3c3e91d6c884b49baba54d5b",
        );
        let v2 = concat!(
            "42564b4502000000a0a1a2a3a4a5a6a7a8a9aaabacadaeaf004c00000200000001000000",
            "000102030405060708090a0b0c0d0e0fc0c1c2c3c4c5c6c7c8c9cacb7c2c1484734efad9500546749484d71a",
            "5bb9fb7a3c18266c593bb87992e47c37a94be93465d7251d5fb54225b2248722",
        );
        let vault_id: [u8; 16] = std::array::from_fn(|i| 0xa0 + i as u8);
        for file in [v1, v2] {
            let (id, plain) =
                import(&hex::decode(file).unwrap(), b"correct horse battery staple").unwrap();
            assert_eq!(id, vault_id);
            assert_eq!(
                &plain[..],
                [&b"BVKS\x01\0\0\0"[..], &vault_id, b"keystore"].concat()
            );
        }
    }
}
