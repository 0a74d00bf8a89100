//! What this host remembers about a vault, beside its key file: `<vault id>.state`.
//!
//! The vault lives on storage its holder controls; the keystore lives on this host. So the
//! keystore is where blockvault keeps what the storage holder must not be able to undo:
//! - the URLs this vault was opened at, so that another vault served at a known URL (vault B
//!   at A's address, on a host that holds both keystores) and a vault that vanished from its
//!   URL are both noticed instead of being taken for what is there now;
//! - the newest vault head this host has seen (epoch, digest, auth key version), so that a
//!   head rolled back below it is refused.
//!
//! JSON, mode 0600, replaced atomically under the keystore's lock of the vault. It holds no
//! secret: losing it loses only the rollback memory (the next open records the head as found).

use serde::{Deserialize, Serialize};

/// The state of one vault on this host.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct LocalState {
    /// Canonical URLs this vault was opened at (see `vault::url`).
    pub urls: Vec<String>,
    /// The newest head this host has seen.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub head: Option<SeenHead>,
}

/// A head as this host last saw it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SeenHead {
    /// Its epoch.
    pub epoch: u64,
    /// BLAKE3 of its bytes, hex.
    pub digest: String,
    /// The auth key version that MACs it: a later head never goes back to an older one.
    pub auth_version: u32,
    /// When this host saw it (RFC 3339).
    pub seen: String,
}
