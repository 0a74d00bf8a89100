//! Customer-managed RSA key-encryption keys: PEM files and PKCS#11 tokens, and the offline
//! recovery key.
//!
//! ```text
//!   vault config: CmkKey { kind, version, OAEP hash, SHA-256 fingerprint, public SPKI, source }
//!        │ public key only                        private key only where DEKs are unwrapped
//!        ▼                                         ┌──────────────────────────────────────┐
//!   wrap: W ← random 256 bits                      │ PemKek: PKCS#8 file (maybe encrypted) │
//!         RSA-OAEP(W) ‖ AES-256-GCM(W, AAD, DEK)   │ Pkcs11Kek: C_Decrypt inside the token │
//!   unwrap: W ← private key ──▶ open GCM ◀─────────┴──────────────────────────────────────┘
//! ```
//! [`wrap`] holds the construction both providers share, [`key`] the descriptor the vault
//! stores, [`pem`] and [`pkcs11`] the two ways to reach a private key. Every provider has a
//! `check_unwrap` that a backup runs first, so a key whose private half is gone is found
//! before any DEK is wrapped with it. Nothing secret here is `Debug`; W, PINs, passphrases and
//! decrypted PKCS#8 DER are zeroized (aws-lc and the token keep the private keys).

pub mod key;
pub mod module;
pub mod pem;
pub mod pkcs11;
pub mod secret_source;
pub mod uri;
pub mod wrap;

pub use key::{CmkKey, OaepHash, MIN_RSA_BITS};
pub use pem::{private_key_from_pem, read_public_key, PemKek, PrivateKeyFile};
pub use pkcs11::{EnrolPolicy, Pkcs11Kek, Pkcs11Options, TokenSession};
pub use secret_source::SecretSource;
pub use uri::Pkcs11Uri;
