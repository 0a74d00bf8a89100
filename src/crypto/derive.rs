//! Purpose subkeys, derived from a DEK with BLAKE3's `derive_key` (a KDF with a context string
//! per purpose), so no key is ever used for two purposes.

use super::aead::AeadKey;
use super::digest::IdKey;
use super::secret::Secret32;

/// Context strings: globally unique, hard-coded, and never to change (changing one makes every
/// existing vault unreadable).
mod context {
    pub const EXTENT_SEAL: &str = "blockvault 2026-11-28 extent seal v1";
    pub const MANIFEST_SEAL: &str = "blockvault 2026-11-28 manifest seal v1";
    pub const PACK_INDEX_SEAL: &str = "blockvault 2026-11-28 pack index seal v1";
    pub const DISK_META_SEAL: &str = "blockvault 2026-11-28 disk metadata seal v1";
    pub const CHECKPOINT_SEAL: &str = "blockvault 2026-12-07 checkpoint seal v1";
    pub const EXTENT_ID: &str = "blockvault 2026-11-28 extent id v1";
    pub const DISK_DIGEST: &str = "blockvault 2026-11-28 disk digest v1";
}

fn derive(context: &str, dek: &Secret32) -> Secret32 {
    Secret32::from_bytes(blake3::derive_key(context, dek.expose()))
}

/// Keys of one DEK generation: everything sealed while that generation is current.
pub struct GenerationKeys {
    /// Seals extent frames.
    pub extent: AeadKey,
    /// Seals snapshot manifests.
    pub manifest: AeadKey,
    /// Seals the index trailer of a pack.
    pub pack_index: AeadKey,
    /// Seals the disk's name in its key record.
    pub meta: AeadKey,
    /// Seals a backup run's checkpoint segments (what a resumed run may reuse).
    pub checkpoint: AeadKey,
}

impl GenerationKeys {
    /// Seals made with any of these keys so far (by this process): what a job adds to its
    /// generation's nonce budget.
    pub fn seals(&self) -> u64 {
        self.extent.seals()
            + self.manifest.seals()
            + self.pack_index.seals()
            + self.meta.seals()
            + self.checkpoint.seals()
    }

    /// Derive all sealing keys of a DEK generation.
    pub fn derive(dek: &Secret32) -> Self {
        GenerationKeys {
            extent: AeadKey::new(&derive(context::EXTENT_SEAL, dek)),
            manifest: AeadKey::new(&derive(context::MANIFEST_SEAL, dek)),
            pack_index: AeadKey::new(&derive(context::PACK_INDEX_SEAL, dek)),
            meta: AeadKey::new(&derive(context::DISK_META_SEAL, dek)),
            checkpoint: AeadKey::new(&derive(context::CHECKPOINT_SEAL, dek)),
        }
    }
}

/// Keys that identify content, derived from the DEK of the disk's *identity generation*: the
/// first generation, until `key rotate --new-dek` starts a new identity. Ids stay stable while
/// only the sealing keys change (a generation started for the nonce budget), so dedup and
/// change detection keep working; a new identity is the compromise response when a DEK leaked,
/// and dedup with earlier snapshots stops there.
pub struct IdentityKeys {
    /// Keyed hash of extent plaintext.
    pub extent_id: IdKey,
    /// Keyed hash over a snapshot's slot table (the end-to-end disk digest).
    pub digest: IdKey,
}

impl IdentityKeys {
    /// Derive from the identity generation's DEK.
    pub fn derive(dek0: &Secret32) -> Self {
        IdentityKeys {
            extent_id: IdKey::new(derive(context::EXTENT_ID, dek0)),
            digest: IdKey::new(derive(context::DISK_DIGEST, dek0)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn purposes_give_distinct_keys() {
        let dek = Secret32::from_bytes([9; 32]);
        let all = [
            context::EXTENT_SEAL,
            context::MANIFEST_SEAL,
            context::PACK_INDEX_SEAL,
            context::DISK_META_SEAL,
            context::CHECKPOINT_SEAL,
            context::EXTENT_ID,
            context::DISK_DIGEST,
        ];
        let keys: std::collections::HashSet<[u8; 32]> =
            all.iter().map(|c| *derive(c, &dek).expose()).collect();
        assert_eq!(keys.len(), all.len());
    }
}
