//! The descriptor of one customer-managed (or recovery) RSA key: what the vault stores so that
//! new DEKs can be wrapped with the public key alone, and so that an unwrap can check it talks
//! to the right private key.
//!
//! Stored layout (little-endian, written by [`CmkKey::encode`]):
//! ```text
//! "BVCK" | u16 format=1 | u16 0 | u8 KEK kind | u8 OAEP hash | u32 key version
//! | fingerprint [32] = SHA-256(SPKI DER) | u16 len | SPKI DER [len] | u16 len | source UTF-8 [len]
//! ```
//! The SPKI is stored in the canonical DER that aws-lc re-encodes, so a key given as PKCS#1
//! PEM, as SPKI PEM or read from a token has one fingerprint.

use aws_lc_rs::digest::{digest, SHA256};
use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rsa::{
    OaepAlgorithm, OaepPublicEncryptingKey, PublicEncryptingKey, PublicKeyComponents,
    OAEP_SHA1_MGF1SHA1, OAEP_SHA256_MGF1SHA256,
};

use crate::crypto::kek::{KekId, KekKind};
use crate::error::{Error, ErrorKind, Result};
use crate::vault::codec::{Dec, Enc};

/// Smallest accepted modulus: 3072 bits (NIST SP 800-57 pt. 1: 128-bit security).
pub const MIN_RSA_BITS: usize = 3072;
/// Largest modulus aws-lc accepts (8192 bits); it also keeps a wrap under the key record's
/// u16 length.
pub const MAX_RSA_BITS: usize = 8192;

pub(crate) const MAGIC: &[u8; 4] = b"BVCK";
const FORMAT: u16 = 1;
/// An SPKI of an 8192-bit key is about 1.1 KB; anything longer is not one.
const MAX_SPKI_LEN: usize = 2048;

/// The OAEP hash (and MGF1 hash, always the same) a key is used with. Stored as one byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum OaepHash {
    /// RSA-OAEP with SHA-1 and MGF1-SHA-1 ("RSA-OAEP" in Azure Key Vault): only when the
    /// operator chose it at enrolment (`--oaep sha1`), for tokens that support nothing else,
    /// such as SoftHSM 2.6. Never chosen automatically.
    Sha1 = 1,
    /// RSA-OAEP with SHA-256 and MGF1-SHA-256 ("RSA-OAEP-256"): the default.
    Sha256 = 2,
}

impl OaepHash {
    /// Parse the stored byte.
    pub fn from_u8(b: u8) -> Result<Self> {
        match b {
            1 => Ok(OaepHash::Sha1),
            2 => Ok(OaepHash::Sha256),
            other => Err(Error::new(
                ErrorKind::Unsupported,
                format!("unknown RSA-OAEP hash {other}"),
            )),
        }
    }

    /// The aws-lc algorithm for software encryption and decryption.
    pub(super) fn algorithm(self) -> &'static OaepAlgorithm {
        match self {
            OaepHash::Sha1 => &OAEP_SHA1_MGF1SHA1,
            OaepHash::Sha256 => &OAEP_SHA256_MGF1SHA256,
        }
    }
}

impl std::fmt::Display for OaepHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            OaepHash::Sha1 => "RSA-OAEP (SHA-1)",
            OaepHash::Sha256 => "RSA-OAEP-256",
        })
    }
}

/// One RSA key-encryption key as the vault knows it: kind, version, OAEP hash, public key and
/// where it came from. Holds no secret; built only through constructors that check the key.
pub struct CmkKey {
    kind: KekKind,
    version: u32,
    oaep: OaepHash,
    fingerprint: [u8; 32],
    spki: Vec<u8>,
    source: String,
    public: OaepPublicEncryptingKey,
}

impl std::fmt::Debug for CmkKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "CmkKey({}, {}, {}, sha256:{})",
            self.id(),
            self.oaep,
            self.source,
            hex::encode(self.fingerprint)
        )
    }
}

fn key_error(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::Key, msg)
}

impl CmkKey {
    /// A key from its X.509 SubjectPublicKeyInfo DER. Refuses a kind that is not an RSA kind,
    /// anything that is not an RSA public key, and moduli outside 3072..=8192 bits.
    pub fn from_spki(
        kind: KekKind,
        version: u32,
        oaep: OaepHash,
        spki: &[u8],
        source: impl Into<String>,
    ) -> Result<Self> {
        let source = source.into();
        let public = PublicEncryptingKey::from_der(spki).map_err(|e| {
            key_error(format!(
                "{source}: not a usable RSA public key (SubjectPublicKeyInfo): {e}"
            ))
        })?;
        Self::from_parsed(kind, version, oaep, public, source)
    }

    /// A key from its modulus and public exponent (big-endian; leading zero bytes allowed), as
    /// a PKCS#1 `RSAPublicKey` or a PKCS#11 token gives them.
    pub fn from_components(
        kind: KekKind,
        version: u32,
        oaep: OaepHash,
        n: &[u8],
        e: &[u8],
        source: impl Into<String>,
    ) -> Result<Self> {
        let source = source.into();
        let strip = |b: &[u8]| -> Vec<u8> {
            let first = b.iter().position(|&x| x != 0).unwrap_or(b.len());
            b[first..].to_vec()
        };
        let components = PublicKeyComponents {
            n: strip(n),
            e: strip(e),
        };
        if components.n.len() > MAX_RSA_BITS / 8 {
            return Err(key_error(format!(
                "{source}: RSA modulus of {} bits is over the {MAX_RSA_BITS}-bit maximum",
                components.n.len() * 8
            )));
        }
        let public: PublicEncryptingKey = components.try_into().map_err(|_| {
            key_error(format!(
                "{source}: modulus and exponent do not form a usable RSA public key"
            ))
        })?;
        Self::from_parsed(kind, version, oaep, public, source)
    }

    fn from_parsed(
        kind: KekKind,
        version: u32,
        oaep: OaepHash,
        public: PublicEncryptingKey,
        source: String,
    ) -> Result<Self> {
        if !matches!(
            kind,
            KekKind::CustomerRsa | KekKind::CustomerPkcs11 | KekKind::Recovery
        ) {
            return Err(Error::usage(format!(
                "{source}: KEK kind {kind} is not an RSA kind"
            )));
        }
        let bits = public.key_size_bits();
        if bits < MIN_RSA_BITS {
            return Err(key_error(format!(
                "{source}: RSA key of {bits} bits is too small; at least {MIN_RSA_BITS} bits are required"
            )));
        }
        let spki = public
            .as_der()
            .map_err(|_| key_error(format!("{source}: cannot encode the RSA public key")))?
            .as_ref()
            .to_vec();
        let fingerprint: [u8; 32] = digest(&SHA256, &spki)
            .as_ref()
            .try_into()
            .expect("SHA-256 is 32 bytes");
        let public = OaepPublicEncryptingKey::new(public)
            .map_err(|_| key_error(format!("{source}: RSA key refused for OAEP")))?;
        Ok(CmkKey {
            kind,
            version,
            oaep,
            fingerprint,
            spki,
            source,
            public,
        })
    }

    /// The id wraps by this key are stored under.
    pub fn id(&self) -> KekId {
        KekId {
            kind: self.kind,
            version: self.version,
        }
    }

    /// The OAEP hash this key is used with.
    pub fn oaep(&self) -> OaepHash {
        self.oaep
    }

    /// SHA-256 of the canonical SPKI DER: what names the key to a person and binds the private
    /// key found at unwrap time to this descriptor.
    pub fn fingerprint(&self) -> &[u8; 32] {
        &self.fingerprint
    }

    /// The canonical SubjectPublicKeyInfo DER.
    pub fn public_spki(&self) -> &[u8] {
        &self.spki
    }

    /// Where the key came from: the public key file or the PKCS#11 URI (never a PIN).
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Modulus size in bits.
    pub fn bits(&self) -> usize {
        self.public.key_size_bits()
    }

    /// The parsed public key, for the wrap construction.
    pub(super) fn public(&self) -> &OaepPublicEncryptingKey {
        &self.public
    }

    /// `Key` error unless `id` names this key.
    pub(super) fn expect_id(&self, id: KekId) -> Result<()> {
        if id != self.id() {
            return Err(key_error(format!(
                "{id} is not the loaded key {} ({})",
                self.id(),
                self.source
            )));
        }
        Ok(())
    }

    /// `Key` error unless `other` (a private key's public half) is this key.
    pub(super) fn expect_same_key(&self, other: &CmkKey, place: &str) -> Result<()> {
        if other.fingerprint != self.fingerprint {
            return Err(key_error(format!(
                "{place} holds key sha256:{}, but {} is sha256:{}",
                hex::encode(other.fingerprint),
                self.id(),
                hex::encode(self.fingerprint)
            )));
        }
        Ok(())
    }

    /// Serialise (layout in the module docs).
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Enc::with_capacity(4 + 2 + 2 + 1 + 1 + 4 + 32 + 2 + self.spki.len() + 2);
        e.bytes(MAGIC)
            .u16(FORMAT)
            .u16(0)
            .u8(self.kind as u8)
            .u8(self.oaep as u8)
            .u32(self.version)
            .bytes(&self.fingerprint)
            .u16(self.spki.len() as u16)
            .bytes(&self.spki)
            .str(&self.source);
        e.finish()
    }

    /// Parse a stored descriptor; `what` names it in errors. The public key is parsed and
    /// checked again, and the stored fingerprint must be the SHA-256 of the stored SPKI.
    pub fn decode(b: &[u8], what: &str) -> Result<Self> {
        let mut d = Dec::new(b, what);
        d.prologue(MAGIC, FORMAT, "customer-managed key")?;
        let kind = KekKind::from_u8(d.u8()?).map_err(|e| e.within(what))?;
        let oaep = OaepHash::from_u8(d.u8()?).map_err(|e| e.within(what))?;
        let version = d.u32()?;
        let fingerprint: [u8; 32] = d.array()?;
        let len = d.u16()? as usize;
        if len > MAX_SPKI_LEN {
            return Err(d.error(format_args!(
                "public key length {len} is over {MAX_SPKI_LEN}"
            )));
        }
        let spki = d.take(len)?;
        let source = d.str()?;
        d.end()?;
        let key = CmkKey::from_spki(kind, version, oaep, spki, source)
            .map_err(|e| Error::integrity(format!("{what}: {}", e.context())))?;
        if key.spki != spki || key.fingerprint != fingerprint {
            return Err(Error::integrity(format!(
                "{what}: stored fingerprint or public key encoding does not match the public key"
            )));
        }
        Ok(key)
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use aws_lc_rs::rsa::{KeySize, OaepPrivateDecryptingKey, PrivateDecryptingKey};
    use proptest::prelude::*;
    use std::sync::OnceLock;

    /// One 3072-bit key pair per test binary, as a descriptor and its private key.
    pub(in crate::crypto::rsa) fn test_key(
        oaep: OaepHash,
    ) -> (&'static CmkKey, &'static OaepPrivateDecryptingKey) {
        static K: OnceLock<(CmkKey, CmkKey, OaepPrivateDecryptingKey)> = OnceLock::new();
        let (sha1, sha256, private) = K.get_or_init(|| {
            let private = PrivateDecryptingKey::generate(KeySize::Rsa3072).unwrap();
            let spki = private.public_key().as_der().unwrap();
            let key =
                |h| CmkKey::from_spki(KekKind::CustomerRsa, 1, h, spki.as_ref(), "test").unwrap();
            (
                key(OaepHash::Sha1),
                key(OaepHash::Sha256),
                OaepPrivateDecryptingKey::new(private).unwrap(),
            )
        });
        match oaep {
            OaepHash::Sha1 => (sha1, private),
            OaepHash::Sha256 => (sha256, private),
        }
    }

    #[test]
    fn descriptor_round_trip_and_refusals() {
        let (key, _) = test_key(OaepHash::Sha1);
        let b = key.encode();
        let back = CmkKey::decode(&b, "cmk").unwrap();
        assert_eq!(back.encode(), b);
        assert_eq!(back.oaep(), OaepHash::Sha1);
        assert_eq!(back.bits(), 3072);
        // Unknown OAEP hash and KEK kind bytes, a platform kind, an over-long SPKI length.
        for (at, v, says) in [
            (9usize, 9u8, "unknown RSA-OAEP hash"),
            (8, 99, "unknown key-encryption-key kind"),
            (8, 1, "not an RSA kind"),
        ] {
            let mut bad = b.clone();
            bad[at] = v;
            let err = CmkKey::decode(&bad, "cmk").unwrap_err();
            assert!(err.to_string().contains(says), "{err}");
        }
        let mut bad = b.clone();
        bad[46..48].copy_from_slice(&u16::MAX.to_le_bytes());
        let err = CmkKey::decode(&bad, "cmk").unwrap_err();
        assert!(err.to_string().contains("public key length"), "{err}");
    }

    /// Modulus and exponent of an SPKI, read with the `der` crate as a token would show them.
    fn components(spki: &[u8]) -> (Vec<u8>, Vec<u8>) {
        use pkcs8::der::asn1::UintRef;
        use pkcs8::der::{Decode, Reader, SliceReader};
        let info = pkcs8::SubjectPublicKeyInfoRef::from_der(spki).unwrap();
        let pkcs1 = info.subject_public_key.raw_bytes();
        let mut r = SliceReader::new(pkcs1).unwrap();
        r.sequence(|r| {
            let n: UintRef = r.decode()?;
            let e: UintRef = r.decode()?;
            Ok::<_, pkcs8::der::Error>((n.as_bytes().to_vec(), e.as_bytes().to_vec()))
        })
        .unwrap()
    }

    #[test]
    fn components_with_leading_zeros_give_the_same_key() {
        let (key, _) = test_key(OaepHash::Sha256);
        let (n, e) = components(key.public_spki());
        let padded = [&[0u8, 0][..], &n].concat();
        let again =
            CmkKey::from_components(KekKind::Recovery, 2, OaepHash::Sha256, &padded, &e, "x")
                .unwrap();
        assert_eq!(again.fingerprint(), key.fingerprint());
        assert_eq!(again.public_spki(), key.public_spki());
        assert_eq!(again.id().to_string(), "recovery-v2");
        // A modulus of 2048 bits is refused, and so is one over 8192 bits, and no modulus.
        let err =
            CmkKey::from_components(KekKind::Recovery, 2, OaepHash::Sha256, &n[..256], &e, "x")
                .unwrap_err();
        assert!(err.to_string().contains("2048 bits is too small"), "{err}");
        let big = vec![0xffu8; 1025];
        assert!(
            CmkKey::from_components(KekKind::Recovery, 2, OaepHash::Sha256, &big, &e, "x")
                .unwrap_err()
                .to_string()
                .contains("maximum")
        );
        assert!(
            CmkKey::from_components(KekKind::Recovery, 2, OaepHash::Sha256, &[0], &e, "x").is_err()
        );
    }

    proptest! {
        #[test]
        fn decode_never_panics(data in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = CmkKey::decode(&data, "fuzz");
            let mut b = b"BVCK\x01\x00\x00\x00".to_vec();
            b.extend_from_slice(&data);
            let _ = CmkKey::decode(&b, "fuzz");
        }
    }
}
