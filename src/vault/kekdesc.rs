//! `kek/<kind>-<version:08x>`: the public descriptor of a customer-managed or recovery RSA
//! key ([`CmkKey::encode`]), followed by a MAC so that whoever holds the storage cannot swap
//! in a public key of their own (new DEKs would then be wrapped to them).
//!
//! ```text
//! CmkKey encoding (docs/CRYPTO.md) | MAC [32] = keyed BLAKE3(derive_key(CONTEXT, auth key), preceding bytes)
//! ```
//! Written with `put_new` at `init`, rotation and recovery; never rewritten except by
//! recovery, which re-authenticates everything under a new keystore.

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

/// The key that authenticates descriptors, derived from the keystore's auth key.
pub fn mac_key(auth: &Secret32) -> Secret32 {
    Secret32::from_bytes(blake3::derive_key(MAC_CONTEXT, auth.expose()))
}

/// Serialise and authenticate.
pub fn encode(key: &CmkKey, mac: &Secret32) -> Vec<u8> {
    let mut b = key.encode();
    let tag = blake3::keyed_hash(mac.expose(), &b);
    b.extend_from_slice(tag.as_bytes());
    b
}

/// Parse `b`, found under `what`, checking its MAC (unless `mac` is `None`: recovery without
/// the keystore) and that it is the descriptor of the key its name says.
pub fn decode(b: &[u8], what: &str, mac: Option<&Secret32>) -> Result<CmkKey> {
    let Some(body_len) = b.len().checked_sub(MAC_LEN) else {
        return Err(Error::integrity(format!(
            "{what}: truncated key descriptor"
        )));
    };
    let (body, tag) = b.split_at(body_len);
    if let Some(mac) = mac {
        let tag: [u8; MAC_LEN] = tag.try_into().expect("split at MAC_LEN");
        if blake3::keyed_hash(mac.expose(), body) != blake3::Hash::from(tag) {
            return Err(Error::integrity(format!(
                "{what}: key descriptor failed authentication: it was altered or replaced"
            )));
        }
    }
    let key = CmkKey::decode(body, what)?;
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
