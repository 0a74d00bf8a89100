//! The infrastructure layer as the vault uses it: which objects go through it, the store that
//! applies it, and how a reader tells which key an object is under while the layer's key is
//! being rotated.
//!
//! ```text
//!  raw store (never under the layer)      config, head, recovery-anchor, infra-recovery,
//!                                         infra-recovery-next, locks/…
//!  layered store (every other object)     packs/, snapshots/, keys/, kek/, escrow/
//! ```
//! The raw objects must be readable before the layer's key is known (config, head, anchors)
//! or are rewritten in place (the head on every update: XTS would reuse its tweaks). Every
//! layered object starts with a magic and a version, which is what makes two-key reads
//! possible during a rotation ([`is_object_start`]).

use std::sync::Arc;

use super::head::Head;
use super::store::xts::{InfraKey, XtsStore};
use super::store::Store;
use super::{anchor, config, escrow, head, infra_recovery, keyrecord, manifest, pack};
use crate::crypto::keystore::VaultKeys;
use crate::crypto::rsa::key as cmk;
use crate::error::Result;

/// Objects outside the layer, by key.
pub const RAW_OBJECTS: [&str; 5] = [
    config::KEY,
    head::KEY,
    anchor::KEY,
    infra_recovery::KEY,
    infra_recovery::NEXT_KEY,
];
/// The folder of lock files (local stores), outside the layer.
pub const LOCKS: &str = "locks/";

/// Whether the object `key` is stored through the layer.
pub fn is_layered(key: &str) -> bool {
    !RAW_OBJECTS.contains(&key) && !key.starts_with(LOCKS)
}

/// Whether `b`, the first bytes of an object as the layer decrypted them, start like an object
/// the vault writes through the layer: a pack, manifest, key record, KEK descriptor or escrow
/// record begins with its magic, a u16 version (all under 256) and a u16 of reserved zeros.
/// Bytes decrypted under the wrong key are random and pass with a chance of 5 in 2^56.
pub fn is_object_start(b: &[u8]) -> bool {
    let magics = [
        pack::MAGIC,
        manifest::MAGIC,
        keyrecord::MAGIC,
        cmk::MAGIC,
        escrow::MAGIC,
    ];
    b.len() >= 8 && magics.iter().any(|m| b[..4] == m[..]) && b[5] == 0 && b[6..8] == [0, 0]
}

/// The store every object but the raw ones goes through: with the layer, each object is
/// AES-256-XTS encrypted on its way to the backend under the key version the head names; while
/// a rotation of that key is unfinished (the head names a previous version), in two-key mode.
pub(crate) fn layered(
    raw: Arc<dyn Store>,
    head: &Head,
    keys: &VaultKeys,
) -> Result<Arc<dyn Store>> {
    Ok(match xts_store(raw.clone(), head, keys)? {
        Some(store) => Arc::new(store),
        None => raw,
    })
}

/// The layer's store over `raw` as `head` names it (`None`: the vault has no layer). A key
/// rotation uses it directly, for [`XtsStore::reencrypt`].
pub(crate) fn xts_store(
    raw: Arc<dyn Store>,
    head: &Head,
    keys: &VaultKeys,
) -> Result<Option<XtsStore>> {
    if head.infra_version == 0 {
        return Ok(None);
    }
    let key = |version: u32, why: &str| -> Result<InfraKey> {
        let key = keys.infra(version).map_err(|e| e.within(why))?;
        InfraKey::from_bytes(*key.expose())
    };
    let current = key(
        head.infra_version,
        "the vault has an infrastructure encryption layer but its key is missing",
    )?;
    let store = XtsStore::new(raw, current);
    Ok(Some(match head.infra_previous {
        0 => store,
        previous => store.rotating_from(
            key(
                previous,
                &format!(
                    "an infrastructure key rotation from version {previous} to {} is unfinished (`key rotate --infrastructure` finishes it) and needs both keys",
                    head.infra_version
                ),
            )?,
            is_object_start,
        ),
    }))
}
