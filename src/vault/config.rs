//! The vault's `config` object: format version, vault id and encryption settings, MAC'd with
//! the vault's auth key from the keystore so that settings cannot be downgraded by whoever
//! holds the storage.
//!
//! ```text
//! "BVLT" | u16 format version | u16 0 | vault id [16] | u64 created | u8 KEK kind
//! | u8 infrastructure layer (0 none) | u16 0 | MAC [32] = keyed BLAKE3(auth key, preceding 36 bytes)
//! ```

use super::codec::{Dec, Enc};
use crate::crypto::kek::KekKind;
use crate::crypto::Secret32;
use crate::error::{Error, ErrorKind, Result};

/// Object key of the config.
pub const KEY: &str = "config";
/// The vault format this build writes and the newest it reads. Never reuse a number.
pub const FORMAT_VERSION: u16 = 1;
const MAGIC: &[u8; 4] = b"BVLT";
const BODY_LEN: usize = 36;
const LEN: usize = BODY_LEN + 32;
const _: () = assert!(LEN == 68);

/// No infrastructure encryption layer.
pub const INFRA_NONE: u8 = 0;
/// AES-256-XTS over every object but the config (see docs/CRYPTO.md).
pub const INFRA_AES_XTS: u8 = 1;

/// Settings fixed when the vault is made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Random id binding every object and key record to this vault.
    pub vault_id: [u8; 16],
    /// Seconds since the epoch.
    pub created: u64,
    /// What wraps the DEKs.
    pub kek_kind: KekKind,
    /// Second encryption layer: [`INFRA_NONE`] or [`INFRA_AES_XTS`].
    pub infrastructure: u8,
}

impl Config {
    fn body(&self) -> Enc {
        let mut e = Enc::with_capacity(LEN);
        e.bytes(MAGIC)
            .u16(FORMAT_VERSION)
            .u16(0)
            .bytes(&self.vault_id)
            .u64(self.created)
            .u8(self.kek_kind as u8)
            .u8(self.infrastructure)
            .u16(0);
        e
    }

    /// Encode and MAC.
    pub fn encode(&self, auth: &Secret32) -> Vec<u8> {
        let mut e = self.body();
        let mac = blake3::keyed_hash(auth.expose(), &e.0);
        e.bytes(mac.as_bytes());
        e.finish()
    }

    /// Decode without checking the MAC (the MAC key is found through the vault id).
    /// A newer format version is [`ErrorKind::Unsupported`].
    pub fn decode_unverified(b: &[u8]) -> Result<Config> {
        let mut d = Dec::new(b, "vault config");
        d.magic(MAGIC)?;
        let version = d.u16()?;
        if version > FORMAT_VERSION || version == 0 {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!("vault format version {version} is not supported: this build reads version {FORMAT_VERSION} (upgrade blockvault)"),
            ));
        }
        d.reserved(2)?;
        let vault_id = d.array()?;
        let created = d.u64()?;
        let kek_kind = KekKind::from_u8(d.u8()?)?;
        if kek_kind == KekKind::Recovery {
            return Err(Error::integrity(
                "vault config: the recovery key cannot be a vault's primary key",
            ));
        }
        let infrastructure = d.u8()?;
        if infrastructure > INFRA_AES_XTS {
            return Err(Error::new(ErrorKind::Unsupported, format!("vault config: infrastructure encryption layer {infrastructure} is not supported by this build")));
        }
        d.reserved(2)?;
        d.array::<32>()?;
        d.end()?;
        Ok(Config {
            vault_id,
            created,
            kek_kind,
            infrastructure,
        })
    }

    /// Check the MAC of the encoded config `b` (constant-time compare).
    pub fn verify(b: &[u8], auth: &Secret32) -> Result<()> {
        if b.len() != LEN {
            return Err(Error::integrity("vault config has the wrong length"));
        }
        let expect = blake3::keyed_hash(auth.expose(), &b[..BODY_LEN]);
        let got: [u8; 32] = b[BODY_LEN..].try_into().expect("length checked");
        if expect != blake3::Hash::from(got) {
            return Err(Error::integrity("vault config failed authentication: it was altered, or the keystore belongs to another vault"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> (Secret32, Config) {
        let c = Config {
            vault_id: [2; 16],
            created: 5,
            kek_kind: KekKind::Platform,
            infrastructure: 0,
        };
        (Secret32::from_bytes([1; 32]), c)
    }

    #[test]
    fn round_trip_and_tamper() {
        let (auth, c) = sample();
        let mut b = c.encode(&auth);
        assert_eq!(Config::decode_unverified(&b).unwrap(), c);
        Config::verify(&b, &auth).unwrap();
        b[30] ^= 1;
        assert!(Config::verify(&b, &auth).is_err());
    }

    #[test]
    fn newer_version_is_refused() {
        let (auth, c) = sample();
        let mut b = c.encode(&auth);
        b[4] = 9;
        let e = Config::decode_unverified(&b).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unsupported);
        assert!(e.to_string().contains("version 9"));
    }
}
