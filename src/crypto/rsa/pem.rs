//! RSA keys given as PEM files: the customer-managed key of `init --cmk rsa:PUBLIC.pem` and
//! the offline recovery key of `init --recovery-key rsa:PUB.pem`.
//!
//! Wrapping needs only the public key, which the vault stores in the key's [`CmkKey`]
//! descriptor. The private key file is read only when a DEK is unwrapped, on the first unwrap,
//! and checked against the descriptor's fingerprint so that a wrong file is named as such
//! rather than failing as "altered data". It may be PKCS#8 PEM, plain or passphrase-protected
//! (`openssl genpkey`), or plain PKCS#1 (`BEGIN RSA PRIVATE KEY`, `openssl genrsa
//! -traditional`); a PKCS#1 file encrypted the legacy OpenSSL way (`Proc-Type: 4,ENCRYPTED`,
//! MD5-derived key) is refused with the command that converts it. Every decoded form of the
//! private key lives only in zeroized buffers until aws-lc holds it.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use aws_lc_rs::rsa::{OaepPrivateDecryptingKey, PrivateDecryptingKey};
use pkcs8::der::asn1::{AnyRef, OctetStringRef, UintRef};
use pkcs8::der::{Document, Encode, Reader, SecretDocument, SliceReader};
use pkcs8::{
    AlgorithmIdentifierRef, EncryptedPrivateKeyInfoRef, ObjectIdentifier, PrivateKeyInfoRef,
};
use zeroize::Zeroizing;

use super::key::{CmkKey, OaepHash};
use super::secret_source::SecretSource;
use super::wrap;
use crate::crypto::kek::{KekId, KekKind, KekProvider};
use crate::crypto::secret::Secret32;
use crate::error::{Error, ErrorKind, Result};

/// PEM key files are a few KB; refuse to read anything much larger.
const MAX_PEM_LEN: u64 = 64 * 1024;
/// `rsaEncryption` (RFC 8017, appendix C): the algorithm of a PKCS#8-wrapped RSA key.
const RSA_ENCRYPTION: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.1");

fn key_error(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::Key, msg)
}

/// Read a whole (small) key file into memory that is zeroized when dropped.
fn read_pem_file(path: &Path, what: &str) -> Result<Zeroizing<String>> {
    let f = std::fs::File::open(path).map_err(|e| {
        let msg = if e.kind() == std::io::ErrorKind::NotFound {
            format!("{what} {} missing", path.display())
        } else {
            format!("cannot open {what} {}", path.display())
        };
        key_error(msg).with_source(e)
    })?;
    let mut bytes = Zeroizing::new(Vec::new());
    f.take(MAX_PEM_LEN + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| key_error(format!("cannot read {what} {}", path.display())).with_source(e))?;
    if bytes.len() as u64 > MAX_PEM_LEN {
        return Err(key_error(format!(
            "{what} {} is larger than {MAX_PEM_LEN} bytes; not a PEM key",
            path.display()
        )));
    }
    let text = std::str::from_utf8(&bytes)
        .map_err(|_| key_error(format!("{what} {} is not PEM text", path.display())))?;
    Ok(Zeroizing::new(text.to_owned()))
}

/// Read an RSA public key PEM file: `PUBLIC KEY` (X.509 SubjectPublicKeyInfo, what
/// `openssl pkey -pubout` writes) or `RSA PUBLIC KEY` (PKCS#1).
pub fn read_public_key(kind: KekKind, version: u32, oaep: OaepHash, path: &Path) -> Result<CmkKey> {
    let source = path.display().to_string();
    let text = read_pem_file(path, "public key file")?;
    let (label, doc) = Document::from_pem(&text)
        .map_err(|e| key_error(format!("{source}: not a PEM file: {e}")))?;
    match label {
        "PUBLIC KEY" => CmkKey::from_spki(kind, version, oaep, doc.as_bytes(), source),
        "RSA PUBLIC KEY" => {
            let parse = || -> pkcs8::der::Result<(Vec<u8>, Vec<u8>)> {
                let mut r = SliceReader::new(doc.as_bytes())?;
                let ne = r.sequence(|r| {
                    let n: UintRef = r.decode()?;
                    let e: UintRef = r.decode()?;
                    Ok::<_, pkcs8::der::Error>((n.as_bytes().to_vec(), e.as_bytes().to_vec()))
                })?;
                r.finish()?;
                Ok(ne)
            };
            let (n, e) = parse()
                .map_err(|e| key_error(format!("{source}: damaged PKCS#1 RSA public key: {e}")))?;
            CmkKey::from_components(kind, version, oaep, &n, &e, source)
        }
        "PRIVATE KEY" | "ENCRYPTED PRIVATE KEY" | "RSA PRIVATE KEY" => Err(Error::usage(format!(
            "{source} is a private key; give the public key (openssl pkey -pubout)"
        ))),
        other => Err(key_error(format!(
            "{source}: PEM label \"{other}\" is not an RSA public key"
        ))),
    }
}

/// Where the private key is found on the host that unwraps.
#[derive(Debug, Clone)]
pub struct PrivateKeyFile {
    /// A PEM file: PKCS#8 (`PRIVATE KEY` or `ENCRYPTED PRIVATE KEY`) or PKCS#1
    /// (`RSA PRIVATE KEY`, unencrypted).
    pub path: PathBuf,
    /// The passphrase of an encrypted file.
    pub passphrase: Option<SecretSource>,
}

impl PrivateKeyFile {
    /// Load and decrypt the key; its DER only ever lives in zeroized buffers.
    fn load(&self) -> Result<PrivateDecryptingKey> {
        let text = read_pem_file(&self.path, "private key file")?;
        private_key_from_pem(
            &text,
            &self.path.display().to_string(),
            self.passphrase.as_ref(),
        )
    }
}

/// The RSA private key in `text`, the contents of a private key file (`name` in messages):
/// PKCS#8, plain or encrypted under the passphrase from `passphrase`, or plain PKCS#1. Public
/// for the fuzz target (`fuzz/fuzz_targets/cmk.rs`).
pub fn private_key_from_pem(
    text: &str,
    name: &str,
    passphrase: Option<&SecretSource>,
) -> Result<PrivateDecryptingKey> {
    if is_legacy_encrypted(text) {
        return Err(key_error(format!(
            "{name} is a PKCS#1 private key encrypted the legacy OpenSSL way \
             (Proc-Type: 4,ENCRYPTED), which blockvault does not read: convert it to \
             encrypted PKCS#8 with `openssl pkcs8 -topk8 -v2 aes-256-cbc -in {name} -out \
             NEW.pem` and give NEW.pem with its passphrase"
        )));
    }
    let (label, doc) = SecretDocument::from_pem(text)
        .map_err(|e| key_error(format!("{name}: not a PEM file: {e}")))?;
    let key = |pkcs8_der: &[u8]| {
        PrivateDecryptingKey::from_pkcs8(pkcs8_der)
            .map_err(|e| key_error(format!("{name}: not a usable RSA private key: {e}")))
    };
    match label {
        "PRIVATE KEY" => key(doc.as_bytes()),
        "ENCRYPTED PRIVATE KEY" => {
            let pass = passphrase.ok_or_else(|| {
                key_error(format!(
                    "private key file {name} is encrypted and no passphrase was given"
                ))
            })?;
            let pass = pass.read(&format!("passphrase of {name}"))?;
            let info = EncryptedPrivateKeyInfoRef::try_from(doc.as_bytes())
                .map_err(|e| key_error(format!("{name}: damaged encrypted PKCS#8: {e}")))?;
            let plain = info.decrypt(&pass[..]).map_err(|_| {
                key_error(format!(
                    "{name}: cannot decrypt the private key (passphrase incorrect, or an unsupported cipher)"
                ))
            })?;
            key(plain.as_bytes())
        }
        "RSA PRIVATE KEY" => key(&pkcs8_of_pkcs1(doc.as_bytes())
            .map_err(|e| key_error(format!("{name}: damaged PKCS#1 RSA private key: {e}")))?),
        other => Err(key_error(format!(
            "{name}: PEM label \"{other}\" is not an RSA private key"
        ))),
    }
}

/// Whether a PEM file carries RFC 1421 encryption headers (`Proc-Type: 4,ENCRYPTED` and
/// `DEK-Info`), as `openssl genrsa -aes256 -traditional` writes them.
fn is_legacy_encrypted(text: &str) -> bool {
    text.lines()
        .any(|l| l.starts_with("Proc-Type:") && l.contains("ENCRYPTED"))
}

/// A PKCS#1 `RSAPrivateKey` as the PKCS#8 `PrivateKeyInfo` aws-lc reads (algorithm
/// `rsaEncryption` with NULL parameters, RFC 8017 appendix C), encoded into a zeroized
/// buffer of exactly its length (so it is never reallocated, leaving a copy behind).
fn pkcs8_of_pkcs1(pkcs1: &[u8]) -> pkcs8::der::Result<Zeroizing<Vec<u8>>> {
    let info = PrivateKeyInfoRef::new(
        AlgorithmIdentifierRef {
            oid: RSA_ENCRYPTION,
            parameters: Some(AnyRef::NULL),
        },
        OctetStringRef::new(pkcs1)?,
    );
    let mut der = Zeroizing::new(Vec::with_capacity(usize::try_from(info.encoded_len()?)?));
    info.encode_to_vec(&mut der)?;
    Ok(der)
}

/// A PEM RSA key as a [`KekProvider`]: kind [`KekKind::CustomerRsa`] or
/// [`KekKind::Recovery`].
pub struct PemKek {
    key: CmkKey,
    private: Option<PrivateKeyFile>,
    /// The private key once loaded (aws-lc clears it when freed).
    loaded: Mutex<Option<OaepPrivateDecryptingKey>>,
}

impl PemKek {
    /// A provider for a stored descriptor; `private` is needed only to unwrap.
    pub fn new(key: CmkKey, private: Option<PrivateKeyFile>) -> Result<Self> {
        if !matches!(key.id().kind, KekKind::CustomerRsa | KekKind::Recovery) {
            return Err(Error::usage(format!("{} is not a PEM key kind", key.id())));
        }
        Ok(PemKek {
            key,
            private,
            loaded: Mutex::new(None),
        })
    }

    /// The descriptor the vault stores.
    pub fn key(&self) -> &CmkKey {
        &self.key
    }

    /// Unwrap a random value through the private key: fails before a backup starts when the
    /// private key file is missing, wrong or cannot be decrypted.
    pub fn check_unwrap(&self) -> Result<()> {
        crate::crypto::kek::check_unwrap(self, self.key.id())
    }

    /// RSA-OAEP-decrypt `ct` with the private key, loading it on first use.
    fn decrypt(&self, ct: &[u8]) -> Result<Zeroizing<Vec<u8>>> {
        let id = self.key.id();
        let file = self.private.as_ref().ok_or_else(|| {
            key_error(format!(
                "{id}: private key file missing (none was given; it is needed to unwrap DEKs)"
            ))
        })?;
        let mut loaded = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        if loaded.is_none() {
            let private = file.load().map_err(|e| e.within(id))?;
            let public = CmkKey::from_spki(
                id.kind,
                id.version,
                self.key.oaep(),
                private_spki(&private, &file.path)?.as_ref(),
                file.path.display().to_string(),
            )?;
            self.key.expect_same_key(
                &public,
                &format!("private key file {}", file.path.display()),
            )?;
            *loaded = Some(
                OaepPrivateDecryptingKey::new(private)
                    .map_err(|_| key_error(format!("{id}: RSA key refused for OAEP")))?,
            );
        }
        let private = loaded.as_ref().expect("loaded above");
        let mut out = Zeroizing::new(vec![0u8; private.min_output_size()]);
        let n = private
            .decrypt(self.key.oaep().algorithm(), ct, &mut out, None)
            .map_err(|_| {
                Error::integrity(format!(
                    "DEK wrapped by {id}: RSA-OAEP decryption failed (the wrap was altered)"
                ))
            })?
            .len();
        out.truncate(n);
        Ok(out)
    }
}

/// The SPKI of a private key's public half.
fn private_spki(private: &PrivateDecryptingKey, path: &Path) -> Result<Vec<u8>> {
    use aws_lc_rs::encoding::AsDer;
    private
        .public_key()
        .as_der()
        .map(|d| d.as_ref().to_vec())
        .map_err(|_| key_error(format!("{}: cannot encode its public key", path.display())))
}

impl KekProvider for PemKek {
    fn current(&self) -> Result<KekId> {
        Ok(self.key.id())
    }

    fn wrap(&self, id: KekId, dek: &Secret32, aad: &[u8]) -> Result<Vec<u8>> {
        self.key.expect_id(id)?;
        wrap::seal(&self.key, dek, aad)
    }

    fn unwrap(&self, id: KekId, wrapped: &[u8], aad: &[u8]) -> Result<Secret32> {
        self.key.expect_id(id)?;
        wrap::open(&self.key, wrapped, aad, |ct| self.decrypt(ct))
    }
}
