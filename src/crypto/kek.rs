//! Key-encryption keys: what wraps a disk's DEKs.
//!
//! A [`KekProvider`] wraps and unwraps 256-bit DEKs with an AAD the caller binds to the vault,
//! disk and generation. The platform-managed KEK (the default) is an AES-256-GCM key kept in
//! the keystore, outside the vault; customer-managed RSA and PKCS#11 providers plug in here
//! with their own [`KekKind`] and id.

use super::aead::AeadKey;
use super::secret::Secret32;
use crate::error::{Error, ErrorKind, Result};

/// Which kind of key wrapped a DEK. Stored as one byte; values never change meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum KekKind {
    /// AES-256-GCM key in the platform keystore.
    Platform = 1,
    /// Customer-managed RSA key given as PEM files (`init --cmk rsa:PUBLIC.pem`).
    CustomerRsa = 2,
    /// Customer-managed RSA key inside a PKCS#11 token (`init --cmk pkcs11:URI`).
    CustomerPkcs11 = 3,
    /// Offline RSA recovery key, a second wrap next to the vault's KEK (`--recovery-key`).
    Recovery = 4,
}

impl KekKind {
    /// Parse the stored byte.
    pub fn from_u8(b: u8) -> Result<Self> {
        match b {
            1 => Ok(KekKind::Platform),
            2 => Ok(KekKind::CustomerRsa),
            3 => Ok(KekKind::CustomerPkcs11),
            4 => Ok(KekKind::Recovery),
            other => Err(Error::new(
                ErrorKind::Unsupported,
                format!("unknown key-encryption-key kind {other}"),
            )),
        }
    }
}

impl std::fmt::Display for KekKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KekKind::Platform => "platform",
            KekKind::CustomerRsa => "cmk-rsa",
            KekKind::CustomerPkcs11 => "cmk-pkcs11",
            KekKind::Recovery => "recovery",
        })
    }
}

/// Names one KEK: its kind and a version (rotation makes a new version).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KekId {
    /// The kind of key.
    pub kind: KekKind,
    /// Version within the kind; rotation makes a new version.
    pub version: u32,
}

impl std::fmt::Display for KekId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-v{}", self.kind, self.version)
    }
}

/// Wraps and unwraps DEKs. Contract: `unwrap(wrap(k, aad), aad) == k`; any other AAD, or any
/// change to the wrapped bytes, fails with [`ErrorKind::Key`] or [`ErrorKind::Integrity`];
/// a revoked or unreachable key fails with [`ErrorKind::Key`] and a message saying so.
pub trait KekProvider: Send + Sync {
    /// The key new DEKs are wrapped with.
    fn current(&self) -> Result<KekId>;
    /// Wrap `dek` with the key named by `id` (normally [`KekProvider::current`]).
    fn wrap(&self, id: KekId, dek: &Secret32, aad: &[u8]) -> Result<Vec<u8>>;
    /// Unwrap with the key named by `id`.
    fn unwrap(&self, id: KekId, wrapped: &[u8], aad: &[u8]) -> Result<Secret32>;
    /// Whether wraps by keys of `kind` are this provider's to open at all (a record's other
    /// wraps are skipped, so that an error names the key that should have opened it).
    fn handles(&self, kind: KekKind) -> bool {
        let _ = kind;
        true
    }
}

/// AAD of the round trip [`check_unwrap`] makes; never used for a stored wrap.
const CHECK_AAD: &[u8] = b"blockvault kek unwrap check v1";

/// Wrap a random value with `id` and unwrap it through `provider`, so that a backup never
/// starts with a KEK that cannot unwrap (revoked, private key deleted from the token, file
/// missing, PIN wrong): such a backup would wrap DEKs that nobody could unwrap.
pub fn check_unwrap(provider: &dyn KekProvider, id: KekId) -> Result<()> {
    let probe = Secret32::random()?;
    let wrapped = provider.wrap(id, &probe, CHECK_AAD)?;
    let back = provider.unwrap(id, &wrapped, CHECK_AAD)?;
    if back.expose() != probe.expose() {
        return Err(Error::new(
            ErrorKind::Key,
            format!("{id}: unwrap check returned another value; the private key does not match"),
        ));
    }
    Ok(())
}

/// State of one platform KEK version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum KekState {
    /// Usable for wrapping and unwrapping.
    Enabled = 1,
    /// Kept, but refuses every use until enabled again.
    Revoked = 2,
}

/// One version of the platform KEK.
pub struct PlatformKeyVersion {
    /// Rotation number, from 1.
    pub version: u32,
    /// Enabled or revoked.
    pub state: KekState,
    /// Seconds since the epoch.
    pub created: u64,
    /// The key itself.
    pub key: Secret32,
}

/// The platform-managed KEK: all versions from the keystore; the vault's current one wraps.
pub struct PlatformKek {
    versions: Vec<PlatformKeyVersion>,
    /// The version the vault head names as current (`None`: the newest held).
    current: Option<u32>,
}

impl PlatformKek {
    /// Build from the versions a keystore holds.
    pub fn new(versions: Vec<PlatformKeyVersion>) -> Self {
        PlatformKek {
            versions,
            current: None,
        }
    }

    /// Apply the vault's own view (its head): `current` wraps new DEKs, and every version in
    /// `revoked` refuses use whatever the keystore says (a revocation holds even against a
    /// keystore restored from an export made before it).
    pub fn with_vault_state(
        mut self,
        current: u32,
        revoked: &std::collections::BTreeSet<u32>,
    ) -> Self {
        for v in &mut self.versions {
            if revoked.contains(&v.version) {
                v.state = KekState::Revoked;
            }
        }
        self.current = Some(current);
        self
    }

    /// The versions, for `key show` and rotation.
    pub fn versions(&self) -> &[PlatformKeyVersion] {
        &self.versions
    }

    /// The versions, to change and save (rotation, revoke, enable).
    pub fn into_versions(self) -> Vec<PlatformKeyVersion> {
        self.versions
    }

    fn enabled(&self, version: u32) -> Result<&PlatformKeyVersion> {
        let v = self
            .versions
            .iter()
            .find(|v| v.version == version)
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::Key,
                    format!("platform KEK version {version} is not in the keystore"),
                )
            })?;
        if v.state == KekState::Revoked {
            return Err(Error::new(
                ErrorKind::Key,
                format!("platform KEK version {version} is revoked; enable it with `blockvault key enable`"),
            ));
        }
        Ok(v)
    }
}

impl KekProvider for PlatformKek {
    fn current(&self) -> Result<KekId> {
        let version = match self.current {
            Some(v) => v,
            None => self
                .versions
                .iter()
                .map(|v| v.version)
                .max()
                .ok_or_else(|| Error::new(ErrorKind::Key, "the keystore holds no platform KEK"))?,
        };
        self.enabled(version)?;
        Ok(KekId {
            kind: KekKind::Platform,
            version,
        })
    }

    fn wrap(&self, id: KekId, dek: &Secret32, aad: &[u8]) -> Result<Vec<u8>> {
        let key = AeadKey::new(&self.enabled(id.version)?.key);
        key.seal_to_vec(aad, dek.expose())
    }

    fn unwrap(&self, id: KekId, wrapped: &[u8], aad: &[u8]) -> Result<Secret32> {
        let key = AeadKey::new(&self.enabled(id.version)?.key);
        let mut plain = key.open_vec(aad, wrapped, &|| format!("DEK wrapped by {id}"))?;
        let dek = Secret32::from_slice(&plain);
        zeroize::Zeroize::zeroize(&mut plain);
        dek
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kek(state: KekState) -> PlatformKek {
        PlatformKek::new(vec![PlatformKeyVersion {
            version: 1,
            state,
            created: 0,
            key: Secret32::from_bytes([5; 32]),
        }])
    }

    #[test]
    fn wrap_unwrap_round_trip_and_aad_binding() {
        let k = kek(KekState::Enabled);
        let dek = Secret32::from_bytes([1; 32]);
        let id = k.current().unwrap();
        let w = k.wrap(id, &dek, b"disk-a").unwrap();
        assert_eq!(k.unwrap(id, &w, b"disk-a").unwrap().expose(), dek.expose());
        assert!(k.unwrap(id, &w, b"disk-b").is_err());
    }

    #[test]
    fn revoked_refuses_with_clear_message() {
        let k = kek(KekState::Revoked);
        let err = k.current().unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Key);
        assert!(err.to_string().contains("revoked"));
    }
}
