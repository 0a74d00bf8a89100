//! The KEKs of one vault, as the key records see them: a primary KEK (the platform key or the
//! customer's RSA key, chosen at `init`) that wraps every DEK, and optionally an offline
//! recovery key that receives a second wrap of every DEK.
//!
//! A key record holds one wrap per KEK; unwrapping dispatches each wrap to the provider of its
//! kind, so a record stays readable through the primary key or, with its private key given,
//! the recovery key.

use super::kek::{check_unwrap, KekId, KekKind, KekProvider};
use super::secret::Secret32;
use crate::error::{Error, ErrorKind, Result};

/// A vault's KEKs.
pub struct Keyring {
    primary_kind: KekKind,
    primary: Box<dyn KekProvider>,
    recovery: Option<Box<dyn KekProvider>>,
}

impl Keyring {
    /// A keyring whose primary KEK is of kind `primary_kind`.
    pub fn new(
        primary_kind: KekKind,
        primary: Box<dyn KekProvider>,
        recovery: Option<Box<dyn KekProvider>>,
    ) -> Self {
        Keyring {
            primary_kind,
            primary,
            recovery,
        }
    }

    /// The kind of the primary KEK.
    pub fn primary_kind(&self) -> KekKind {
        self.primary_kind
    }

    /// The KEKs a new DEK is wrapped with: the primary's current key, then the recovery key.
    pub fn wrapping_ids(&self) -> Result<Vec<KekId>> {
        let mut ids = vec![self.primary.current()?];
        if let Some(r) = &self.recovery {
            ids.push(r.current()?);
        }
        Ok(ids)
    }

    /// Prove that the primary KEK can unwrap what it wraps now (see [`check_unwrap`]).
    pub fn check_unwrap(&self) -> Result<()> {
        check_unwrap(&*self.primary, self.primary.current()?)
    }

    fn provider(&self, kind: KekKind) -> Result<&dyn KekProvider> {
        if kind == self.primary_kind {
            return Ok(&*self.primary);
        }
        match (kind, &self.recovery) {
            (KekKind::Recovery, Some(r)) => Ok(&**r),
            (KekKind::Recovery, None) => Err(Error::new(
                ErrorKind::Key,
                "this DEK wrap is for the recovery key, which this vault does not have",
            )),
            _ => Err(Error::new(
                ErrorKind::Key,
                format!(
                    "a DEK is wrapped by a {kind} key, but this vault's keys are {}",
                    self.primary_kind
                ),
            )),
        }
    }
}

impl KekProvider for Keyring {
    fn current(&self) -> Result<KekId> {
        self.primary.current()
    }

    fn wrap(&self, id: KekId, dek: &Secret32, aad: &[u8]) -> Result<Vec<u8>> {
        self.provider(id.kind)?.wrap(id, dek, aad)
    }

    fn unwrap(&self, id: KekId, wrapped: &[u8], aad: &[u8]) -> Result<Secret32> {
        self.provider(id.kind)?.unwrap(id, wrapped, aad)
    }

    fn handles(&self, kind: KekKind) -> bool {
        kind == self.primary_kind || (kind == KekKind::Recovery && self.recovery.is_some())
    }
}

/// Several versions of one customer key kind (rotation to a new RSA key adds a version):
/// the newest wraps, each unwraps its own.
pub struct Versions {
    versions: std::collections::BTreeMap<u32, Box<dyn KekProvider>>,
    /// The version that wraps new DEKs (the vault head's; `None`: the newest).
    current: Option<u32>,
}

impl Versions {
    /// From `(version, provider)` pairs.
    pub fn new(versions: impl IntoIterator<Item = (u32, Box<dyn KekProvider>)>) -> Self {
        Versions {
            versions: versions.into_iter().collect(),
            current: None,
        }
    }

    /// Wrap new DEKs with `version` (the one the vault head names), not the newest held.
    pub fn with_current(mut self, version: u32) -> Self {
        self.current = Some(version);
        self
    }

    fn get(&self, id: KekId) -> Result<&dyn KekProvider> {
        self.versions.get(&id.version).map(|p| &**p).ok_or_else(|| {
            Error::new(
                ErrorKind::Key,
                format!("{id} is not among this vault's keys (its descriptor is missing)"),
            )
        })
    }
}

impl KekProvider for Versions {
    fn current(&self) -> Result<KekId> {
        let provider = match self.current {
            Some(v) => self.versions.get(&v),
            None => self.versions.values().next_back(),
        };
        provider
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::Key,
                    "the vault holds no descriptor of its current customer key",
                )
            })?
            .current()
    }

    fn wrap(&self, id: KekId, dek: &Secret32, aad: &[u8]) -> Result<Vec<u8>> {
        self.get(id)?.wrap(id, dek, aad)
    }

    fn unwrap(&self, id: KekId, wrapped: &[u8], aad: &[u8]) -> Result<Secret32> {
        self.get(id)?.unwrap(id, wrapped, aad)
    }
}

/// Where this host finds the private halves of customer keys; none of it is stored.
#[derive(Debug, Clone, Default)]
pub struct KeyAccess {
    /// The private key of a PEM customer key (`--cmk-private`).
    pub cmk_private: Option<super::rsa::PrivateKeyFile>,
    /// Module and PIN of a PKCS#11 customer key (`--pin-file`, `--pkcs11-module`).
    pub pkcs11: super::rsa::Pkcs11Options,
    /// The private key of the recovery key (`key recover --recovery-private`).
    pub recovery_private: Option<super::rsa::PrivateKeyFile>,
}
