//! `kek/<kind>-<version:08x>`: the public descriptor of a customer-managed or recovery RSA
//! key, exactly its [`CmkKey::encode`] bytes (docs/CRYPTO.md). Whoever holds the storage must
//! not be able to swap in a public key of their own (new DEKs would then be wrapped to them):
//! a descriptor counts only if the vault head lists its digest.
//!
//! Written with `put_new` at `init` and `key rotate --new-cmk`; never rewritten. Version 1
//! vaults followed the encoding with a MAC under the keystore's auth key
//! (`[32] = keyed BLAKE3(derive_key(CONTEXT, auth key), preceding bytes)`); `upgrade` reads
//! those with [`decode_v1`] and rewrites them without it.

use crate::crypto::kek::{KekId, KekKind};
use crate::crypto::rsa::CmkKey;
use crate::crypto::Secret32;
use crate::error::{Error, Result};

const MAC_CONTEXT: &str = "blockvault 2026-11-28 kek descriptor mac v1";
const MAC_LEN: usize = 32;

/// Folder of the descriptors.
pub const PREFIX: &str = "kek";

/// Object key of the descriptor of `id`.
pub fn object_key(id: KekId) -> String {
    format!("{PREFIX}/{}-{:08x}", id.kind, id.version)
}

/// The key that authenticated version 1 descriptors, derived from the keystore's auth key.
pub fn mac_key(auth: &Secret32) -> Secret32 {
    Secret32::from_bytes(blake3::derive_key(MAC_CONTEXT, auth.expose()))
}

/// Serialise.
pub fn encode(key: &CmkKey) -> Vec<u8> {
    key.encode()
}

/// Parse `b`, found under `what`: it must be the descriptor of the key its name says. Its
/// authenticity is the caller's to check (the digest the vault head lists).
pub fn decode(b: &[u8], what: &str) -> Result<CmkKey> {
    let key = CmkKey::decode(b, what)?;
    named(key, what)
}

/// Parse a version 1 descriptor (`upgrade`), checking its MAC with `mac` (from [`mac_key`]).
/// Bytes without a valid MAC are refused, the version 2 form included: in a version 1 vault
/// nothing else vouches for them (`upgrade` rewrites descriptors only after its switch).
pub fn decode_v1(b: &[u8], what: &str, mac: &Secret32) -> Result<CmkKey> {
    let Some(body_len) = b.len().checked_sub(MAC_LEN) else {
        return Err(Error::integrity(format!(
            "{what}: truncated key descriptor"
        )));
    };
    let (body, tag) = b.split_at(body_len);
    let tag: [u8; MAC_LEN] = tag.try_into().expect("split at MAC_LEN");
    if blake3::keyed_hash(mac.expose(), body) != blake3::Hash::from(tag) {
        return Err(Error::integrity(format!(
            "{what}: key descriptor failed authentication: it was altered or replaced"
        )));
    }
    named(CmkKey::decode(body, what)?, what)
}

fn named(key: CmkKey, what: &str) -> Result<CmkKey> {
    if object_key(key.id()) != what {
        return Err(Error::integrity(format!(
            "{what}: holds the descriptor of {}",
            key.id()
        )));
    }
    Ok(key)
}

/// Whether a descriptor of `kind` can stand for a vault's primary KEK.
pub fn is_customer(kind: KekKind) -> bool {
    matches!(kind, KekKind::CustomerRsa | KekKind::CustomerPkcs11)
}
