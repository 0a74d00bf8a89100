//! The vault's `config` object: format version, vault id and encryption settings, MAC'd with
//! the vault's auth key from the keystore so that settings cannot be downgraded by whoever
//! holds the storage. It is the one object read before the keys are known: its vault id names
//! the keystore file.
//!
//! ```text
//! version 2: "BVLT" | u16 2 | u16 0 | vault id [16] | u64 created | u8 KEK kind
//!            | u8 infrastructure layer (0 none) | u16 0 | u32 auth key version
//!            | MAC [32] = keyed BLAKE3(auth key of that version, preceding 40 bytes)
//! version 1: the same without the auth key version (the keystore's one auth key), 68 bytes
//! ```
//! Version 1 vaults are opened only by `upgrade`.

use super::codec::{Dec, Enc};
use crate::crypto::kek::KekKind;
use crate::crypto::Secret32;
use crate::error::{Error, ErrorKind, Result};

/// Object key of the config.
pub const KEY: &str = "config";
/// The vault format this build writes and the newest it reads. Never reuse a number.
pub const FORMAT_VERSION: u16 = 2;
const MAGIC: &[u8; 4] = b"BVLT";
const BODY_LEN: usize = 40;
const LEN: usize = BODY_LEN + 32;
const _: () = assert!(LEN == 72);
const V1_BODY_LEN: usize = 36;

/// No infrastructure encryption layer.
pub const INFRA_NONE: u8 = 0;
/// AES-256-XTS over every object but the config (see docs/CRYPTO.md).
pub const INFRA_AES_XTS: u8 = 1;

/// Settings fixed when the vault is made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The vault format version it was written in (1: only `upgrade` opens the vault).
    pub format_version: u16,
    /// The auth key version that MACs it.
    pub auth_version: u32,
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
            .u16(0)
            .u32(self.auth_version);
        e
    }

    /// Encode (always in the current format version) and MAC with `auth`, the key of version
    /// [`Config::auth_version`].
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
        let auth_version = if version >= 2 { d.u32()? } else { 1 };
        d.array::<32>()?;
        d.end()?;
        Ok(Config {
            format_version: version,
            auth_version,
            vault_id,
            created,
            kek_kind,
            infrastructure,
        })
    }

    /// Check the MAC of the encoded config `b` (of either format version; constant-time
    /// compare) with `auth`, the key of the version it names.
    pub fn verify(b: &[u8], auth: &Secret32) -> Result<()> {
        let body_len = match b.get(4..6) {
            Some([1, 0]) => V1_BODY_LEN,
            _ => BODY_LEN,
        };
        if b.len() != body_len + 32 {
            return Err(Error::integrity("vault config has the wrong length"));
        }
        let expect = blake3::keyed_hash(auth.expose(), &b[..body_len]);
        let got: [u8; 32] = b[body_len..].try_into().expect("length checked");
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
            format_version: FORMAT_VERSION,
            auth_version: 3,
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

    /// A version 1 config (68 bytes, no auth version) still decodes and verifies.
    #[test]
    fn version_1_reads() {
        let (auth, mut c) = sample();
        let mut v1 = c.body().finish();
        v1.truncate(V1_BODY_LEN);
        v1[4] = 1;
        let mac = blake3::keyed_hash(auth.expose(), &v1);
        v1.extend_from_slice(mac.as_bytes());
        c.format_version = 1;
        c.auth_version = 1;
        assert_eq!(Config::decode_unverified(&v1).unwrap(), c);
        Config::verify(&v1, &auth).unwrap();
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

    /// The worked example of docs/FORMAT.md §7, byte for byte.
    #[test]
    fn worked_example_of_the_format_document() {
        let c = Config {
            format_version: FORMAT_VERSION,
            auth_version: 1,
            vault_id: hex::decode("00112233445566778899aabbccddeeff")
                .unwrap()
                .try_into()
                .unwrap(),
            created: 1_767_225_600,
            kek_kind: KekKind::Platform,
            infrastructure: INFRA_NONE,
        };
        let auth = Secret32::from_bytes(std::array::from_fn(|i| i as u8));
        assert_eq!(
            hex::encode(c.encode(&auth)),
            "42564c540200000000112233445566778899aabbccddeeff00b955690000000001000000010000008404125adcedba9f362dd2b532ac71ec0ff32befbd22b9cd3b068c9e0ad41487"
        );
    }
}
