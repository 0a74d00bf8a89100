//! Keys and the primitives that use them.
//!
//! Model (details and rationale in docs/CRYPTO.md):
//! ```text
//!  keystore (outside the vault)          vault keys/<disk>/<gen>
//!  ┌───────────────────────┐  wraps   ┌──────────────────────────┐
//!  │ platform KEK v1..vN   │ ───────▶ │ DEK generation g (256 b) │
//!  │ vault auth key        │ AES-GCM  └────────────┬─────────────┘
//!  └───────────────────────┘                       │ BLAKE3 derive_key, one context per purpose
//!            │ MAC                  ┌──────────────┼───────────────┬─────────────┐
//!            ▼                      ▼              ▼               ▼             ▼
//!       vault config          extent seal     manifest seal   pack index    disk meta
//!                             (AES-256-GCM)   (AES-256-GCM)   (AES-256-GCM) (AES-256-GCM)
//!  DEK generation 0 also yields the extent-id key (keyed BLAKE3) and the disk-digest key,
//!  so equal content keeps one id across DEK generations and dedup survives a new DEK.
//! ```
//! Every key type here is neither `Copy` nor `Debug` and is zeroized on drop.

pub mod aead;
pub mod derive;
pub mod digest;
pub mod export;
pub mod kek;
pub mod keyring;
pub mod keystore;
pub mod rsa;
pub mod secret;

pub use aead::{AeadKey, Nonce, NONCE_LEN, TAG_LEN};
pub use derive::{GenerationKeys, IdentityKeys};
pub use digest::{ExtentId, IdKey};
pub use kek::{KekId, KekProvider, PlatformKek};
pub use keystore::Keystore;
pub use secret::Secret32;
