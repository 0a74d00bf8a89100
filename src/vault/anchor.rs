//! `recovery-anchor`: the vault's auth key wrapped to the recovery key, so that recovery after
//! a lost keystore can authenticate the vault before trusting anything in it.
//!
//! Without it, nothing in the vault can be checked once the keystore (and its auth key) is
//! gone, and recovery would have to adopt whatever the storage holder left there. With it, the
//! recovery key's holder unwraps the auth key, and every MAC and digest is then checked as
//! usual. The anchor itself is only as good as the auth key it holds: anyone with the recovery
//! *public* key can wrap an auth key of their own and forge a whole vault around it. So the
//! anchor's auth key is also named by a short [`fingerprint`] printed at `init` (and by
//! `key show`, and again after `key rotate --auth`), which recovery asks for.
//!
//! ```text
//! "BVRA" | u16 version=1 | u16 0 | vault id [16] | u32 auth version
//! | u16 len | recovery key descriptor [len] (CmkKey encoding)
//! | u16 len | wrap [len]     the auth key wrapped by the recovery key (KEM-DEM), AAD
//!                           "blockvault recovery anchor v1" ‖ vault id ‖ u32 auth version
//! ```
//! Lives beside `config`, outside the infrastructure layer (it must open without the
//! keystore). Its digest is in the vault head.

use super::codec::{Dec, Enc};
use crate::crypto::kek::KekProvider;
use crate::crypto::rsa::{CmkKey, PemKek, PrivateKeyFile};
use crate::crypto::Secret32;
use crate::error::{Error, ErrorKind, Result};

/// Object key (outside the infrastructure layer).
pub const KEY: &str = "recovery-anchor";
const MAGIC: &[u8; 4] = b"BVRA";
const VERSION: u16 = 1;
const AAD: &[u8] = b"blockvault recovery anchor v1";
const FINGERPRINT_CONTEXT: &str = "blockvault 2026-12-06 auth fingerprint v1";

fn aad(vault_id: &[u8; 16], auth_version: u32) -> Vec<u8> {
    [AAD, vault_id, &auth_version.to_le_bytes()].concat()
}

/// A short, stable name of an auth key that reveals nothing of it: 128 bits as 32 hex digits
/// in groups of four, for people to keep and compare.
pub fn fingerprint(auth: &Secret32) -> String {
    let raw = blake3::derive_key(FINGERPRINT_CONTEXT, auth.expose());
    hex::encode(&raw[..16])
        .as_bytes()
        .chunks(4)
        .map(|c| std::str::from_utf8(c).expect("hex"))
        .collect::<Vec<_>>()
        .join("-")
}

/// Whether `given` (as a person typed it: any case, any separators) is the fingerprint of
/// `auth`.
pub fn fingerprint_matches(auth: &Secret32, given: &str) -> bool {
    let norm = |s: &str| {
        s.chars()
            .filter(char::is_ascii_hexdigit)
            .collect::<String>()
            .to_ascii_lowercase()
    };
    norm(given) == norm(&fingerprint(auth))
}

/// The raw 16 bytes of an auth key's fingerprint (the vault head names a key operation's
/// holder by them).
pub fn fingerprint_bytes(auth: &Secret32) -> [u8; 16] {
    blake3::derive_key(FINGERPRINT_CONTEXT, auth.expose())[..16]
        .try_into()
        .expect("16 bytes")
}

/// The anchor object of auth key `auth` (version `auth_version`) for `recovery`.
pub fn encode(
    vault_id: &[u8; 16],
    auth_version: u32,
    auth: &Secret32,
    recovery: &CmkKey,
) -> Result<Vec<u8>> {
    let desc = recovery.encode();
    let kek = PemKek::new(CmkKey::decode(&desc, "recovery key")?, None)?;
    let wrap = kek.wrap(recovery.id(), auth, &aad(vault_id, auth_version))?;
    let mut e = Enc::default();
    e.bytes(MAGIC)
        .u16(VERSION)
        .u16(0)
        .bytes(vault_id)
        .u32(auth_version)
        .u16(desc.len() as u16)
        .bytes(&desc)
        .u16(wrap.len() as u16)
        .bytes(&wrap);
    Ok(e.finish())
}

/// What [`open`] recovers: the auth key, its version and fingerprint.
pub struct Opened {
    /// The auth key version.
    pub auth_version: u32,
    /// The auth key.
    pub auth: Secret32,
    /// Its fingerprint.
    pub fingerprint: String,
}

/// Unwrap the auth key from the anchor bytes `b` of vault `vault_id` with the recovery key's
/// private half, and check it against the fingerprint the user kept (`expected`; `None` only
/// when the user explicitly accepts an unverified anchor).
pub fn open(
    b: &[u8],
    vault_id: &[u8; 16],
    recovery_private: Option<PrivateKeyFile>,
    expected: Option<&str>,
) -> Result<Opened> {
    let mut d = Dec::new(b, KEY);
    d.prologue(MAGIC, VERSION, "recovery anchor")?;
    let id: [u8; 16] = d.array()?;
    if &id != vault_id {
        return Err(Error::integrity(format!(
            "{KEY}: belongs to vault {}, not {}",
            hex::encode(id),
            hex::encode(vault_id)
        )));
    }
    let auth_version = d.u32()?;
    let len = d.u16()? as usize;
    let key = CmkKey::decode(d.take(len)?, KEY)?;
    let kek_id = key.id();
    let len = d.u16()? as usize;
    let wrap = d.take(len)?;
    d.end()?;
    let kek = PemKek::new(key, recovery_private)?;
    let auth = kek
        .unwrap(kek_id, wrap, &aad(vault_id, auth_version))
        .map_err(|e| {
            e.within(format!(
                "{KEY}: unwrapping the auth key with the recovery key"
            ))
        })?;
    let fingerprint = fingerprint(&auth);
    if let Some(want) = expected {
        if !fingerprint_matches(&auth, want) {
            return Err(Error::new(
                ErrorKind::Integrity,
                format!("{KEY}: the auth key it holds has fingerprint {fingerprint}, not {want}: this anchor was not made by the vault's keystore (planted, or from another vault); nothing was changed"),
            ));
        }
    }
    Ok(Opened {
        auth_version,
        auth,
        fingerprint,
    })
}
