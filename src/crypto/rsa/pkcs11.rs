//! RSA keys inside a PKCS#11 token (`init --cmk pkcs11:URI`): the private key never leaves
//! the token, which decrypts each wrapping key W with RSA-OAEP (C_Decrypt).
//!
//! ```text
//!  wrap:    public key from the vault's CmkKey ──▶ RSA-OAEP(W) in software; no token needed
//!  unwrap:  login ──▶ find private key ──▶ check its fingerprint ──▶ C_Decrypt(W) … ──▶ logout
//!           └──────────── one TokenSession per job (Pkcs11Kek::login) ────────────┘
//! ```
//! Module: the URI's `module-path`, else `$BLOCKVAULT_PKCS11_MODULE`, else Debian's SoftHSM
//! (`/usr/lib/softhsm/libsofthsm2.so`); [`Pkcs11Options::module`] overrides all three, since a
//! restore host may keep the module elsewhere. PIN: [`Pkcs11Options::pin`] (`--pin-file`),
//! else the URI's `pin-source`, else `$BLOCKVAULT_PKCS11_PIN`; never an argument.
//!
//! A module is loaded and initialised once per process. PKCS#11 login state belongs to the
//! process, not the session (C_Logout logs every session out), so logins are counted per slot:
//! the first [`TokenSession`] logs in, the last one to end logs out. While a login is held, a
//! second job shares it without presenting the PIN again.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::rsa::{PkcsMgfType, PkcsOaepParams, PkcsOaepSource};
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::RawAuthPin;
use zeroize::Zeroizing;

use super::key::{CmkKey, OaepHash};
use super::secret_source::SecretSource;
use super::uri::Pkcs11Uri;
use super::wrap;
use crate::crypto::kek::{KekId, KekKind, KekProvider};
use crate::crypto::secret::Secret32;
use crate::error::{Error, ErrorKind, Result};

/// Debian's SoftHSM module, the default when neither the URI nor the environment names one.
pub const DEFAULT_MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
/// Environment variable naming the PKCS#11 module.
pub const MODULE_ENV: &str = "BLOCKVAULT_PKCS11_MODULE";
/// Environment variable holding the token's user PIN.
pub const PIN_ENV: &str = "BLOCKVAULT_PKCS11_PIN";

/// Host-specific settings that are not part of the stored key.
#[derive(Debug, Clone, Default)]
pub struct Pkcs11Options {
    /// The module to load, overriding the URI and the environment.
    pub module: Option<PathBuf>,
    /// Where the user PIN is read from (`--pin-file`), overriding the URI and the environment.
    pub pin: Option<SecretSource>,
}

/// One loaded module and the number of live logins per slot.
struct Module {
    ctx: Pkcs11,
    logins: BTreeMap<u64, usize>,
}

/// Every module this process loaded, by path.
static MODULES: Mutex<BTreeMap<PathBuf, Module>> = Mutex::new(BTreeMap::new());

fn modules() -> std::sync::MutexGuard<'static, BTreeMap<PathBuf, Module>> {
    MODULES.lock().unwrap_or_else(|p| p.into_inner())
}

/// The context of the module at `path`, loading and initialising it on first use.
fn context(path: &Path) -> Result<Pkcs11> {
    let mut all = modules();
    if let Some(m) = all.get(path) {
        return Ok(m.ctx.clone());
    }
    let unreachable = |e: CkError| {
        Error::new(
            ErrorKind::Key,
            format!(
                "PKCS#11 module {} cannot be loaded; the key is unreachable",
                path.display()
            ),
        )
        .with_source(e)
    };
    let ctx = Pkcs11::new(path).map_err(unreachable)?;
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => return Err(unreachable(e)),
    }
    all.insert(
        path.to_owned(),
        Module {
            ctx: ctx.clone(),
            logins: BTreeMap::new(),
        },
    );
    Ok(ctx)
}

/// Map a token error to the library's error: a kind to act on and a message naming the token.
fn token_error(e: CkError, token: &str, doing: &str) -> Error {
    let (kind, msg) = match &e {
        CkError::Pkcs11(RvError::PinIncorrect, _) => {
            (ErrorKind::Key, format!("PIN incorrect for token '{token}'"))
        }
        CkError::Pkcs11(RvError::PinLocked | RvError::PinExpired, _) => (
            ErrorKind::Key,
            format!("the user PIN of token '{token}' is locked or expired"),
        ),
        CkError::Pkcs11(
            RvError::TokenNotPresent | RvError::DeviceRemoved | RvError::DeviceError,
            _,
        ) => (
            ErrorKind::Key,
            format!("token '{token}' is revoked or unreachable ({doing})"),
        ),
        CkError::Pkcs11(RvError::KeyHandleInvalid | RvError::ObjectHandleInvalid, _) => (
            ErrorKind::Key,
            format!("private key not found on token '{token}' any more (revoked or deleted)"),
        ),
        CkError::Pkcs11(RvError::KeyFunctionNotPermitted, _) => (
            ErrorKind::Key,
            format!("the private key on token '{token}' is not allowed to decrypt (CKA_DECRYPT)"),
        ),
        CkError::Pkcs11(
            RvError::MechanismInvalid | RvError::MechanismParamInvalid | RvError::ArgumentsBad,
            _,
        ) => (
            ErrorKind::Unsupported,
            format!("token '{token}' does not support {doing}"),
        ),
        CkError::Pkcs11(RvError::EncryptedDataInvalid | RvError::EncryptedDataLenRange, _) => (
            ErrorKind::Integrity,
            format!(
                "token '{token}' refused the RSA-OAEP ciphertext ({doing}): the wrap was altered"
            ),
        ),
        CkError::Pkcs11(rv, _) => (
            ErrorKind::Key,
            format!("token '{token}': {doing} failed ({rv:?})"),
        ),
        _ => (ErrorKind::Key, format!("token '{token}': {doing} failed")),
    };
    Error::new(kind, msg).with_source(e)
}

/// The PKCS#11 parameters of RSA-OAEP with `hash` (no label: not every token takes one).
fn mechanism(hash: OaepHash) -> Mechanism<'static> {
    let (h, mgf) = match hash {
        OaepHash::Sha1 => (MechanismType::SHA1, PkcsMgfType::MGF1_SHA1),
        OaepHash::Sha256 => (MechanismType::SHA256, PkcsMgfType::MGF1_SHA256),
    };
    Mechanism::RsaPkcsOaep(PkcsOaepParams::new(h, mgf, PkcsOaepSource::empty()))
}

/// The one slot whose token matches the URI's token attributes.
fn find_slot(ctx: &Pkcs11, uri: &Pkcs11Uri, module: &Path) -> Result<(Slot, String)> {
    let want = uri.token.as_deref().unwrap_or("(any)");
    let slots = ctx
        .get_slots_with_token()
        .map_err(|e| token_error(e, want, "listing slots"))?;
    let mut found = Vec::new();
    for slot in slots {
        let info = ctx
            .get_token_info(slot)
            .map_err(|e| token_error(e, want, "reading token information"))?;
        let matches = |attr: &Option<String>, actual: &str| {
            attr.as_deref().is_none_or(|a| a == actual.trim_end())
        };
        if matches(&uri.token, info.label())
            && matches(&uri.manufacturer, info.manufacturer_id())
            && matches(&uri.model, info.model())
            && matches(&uri.serial, info.serial_number())
        {
            found.push((slot, info.label().trim_end().to_owned()));
        }
    }
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => Err(Error::new(
            ErrorKind::Key,
            format!(
                "token '{want}' not found in PKCS#11 module {}; the key is revoked or unreachable",
                module.display()
            ),
        )),
        n => Err(Error::usage(format!(
            "{n} tokens match '{want}'; name one with token= or serial= in the URI"
        ))),
    }
}

/// A logged-in session on a token, logged out when dropped (counted, see the module docs).
struct Login {
    module: PathBuf,
    slot: Slot,
    token: String,
    session: Mutex<Session>,
}

impl Login {
    /// Find the token the URI names, open a session and log in.
    fn open(module: &Path, uri: &Pkcs11Uri, pin: &SecretSource) -> Result<Self> {
        let ctx = context(module)?;
        let (slot, token) = find_slot(&ctx, uri, module)?;
        let session = ctx
            .open_ro_session(slot)
            .map_err(|e| token_error(e, &token, "opening a session"))?;
        let mut all = modules();
        let count = all
            .get_mut(module)
            .expect("context() registered the module")
            .logins
            .entry(slot.id())
            .or_insert(0);
        if *count == 0 {
            let pin = RawAuthPin::new(Box::new(
                pin.read(&format!("PIN of token '{token}'"))?.to_vec(),
            ));
            match session.login_with_raw(UserType::User, &pin) {
                Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
                Err(e) => return Err(token_error(e, &token, "logging in")),
            }
        }
        *count += 1;
        Ok(Login {
            module: module.to_owned(),
            slot,
            token,
            session: Mutex::new(session),
        })
    }

    fn session(&self) -> std::sync::MutexGuard<'_, Session> {
        self.session.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn template(class: ObjectClass, uri: &Pkcs11Uri) -> Vec<Attribute> {
        let mut t = vec![Attribute::Class(class), Attribute::KeyType(KeyType::RSA)];
        if let Some(label) = &uri.object {
            t.push(Attribute::Label(label.as_bytes().to_vec()));
        }
        if let Some(id) = &uri.id {
            t.push(Attribute::Id(id.clone()));
        }
        t
    }

    fn find_private(&self, uri: &Pkcs11Uri) -> Result<ObjectHandle> {
        let found = self
            .session()
            .find_objects(&Self::template(ObjectClass::PRIVATE_KEY, uri))
            .map_err(|e| token_error(e, &self.token, "searching for the private key"))?;
        match found[..] {
            [one] => Ok(one),
            [] => Err(Error::new(
                ErrorKind::Key,
                format!(
                    "private key not found on token '{}' ({}); the key is revoked or unreachable",
                    self.token,
                    uri.key_name()
                ),
            )),
            _ => Err(Error::usage(format!(
                "{} private keys on token '{}' match {}; make the URI name one",
                found.len(),
                self.token,
                uri.key_name()
            ))),
        }
    }

    /// Modulus and public exponent of `object`, if the token shows them.
    fn components(&self, object: ObjectHandle) -> Result<Option<(Vec<u8>, Vec<u8>)>> {
        let attrs = self
            .session()
            .get_attributes(
                object,
                &[AttributeType::Modulus, AttributeType::PublicExponent],
            )
            .map_err(|e| token_error(e, &self.token, "reading the key's public half"))?;
        let (mut n, mut e) = (None, None);
        for a in attrs {
            match a {
                Attribute::Modulus(v) => n = Some(v),
                Attribute::PublicExponent(v) => e = Some(v),
                _ => {}
            }
        }
        Ok(n.zip(e))
    }

    /// The public key the URI names: the public key object if the token has one, else the
    /// public half of the private key.
    fn public_components(
        &self,
        uri: &Pkcs11Uri,
        private: ObjectHandle,
    ) -> Result<(Vec<u8>, Vec<u8>)> {
        let public = self
            .session()
            .find_objects(&Self::template(ObjectClass::PUBLIC_KEY, uri))
            .map_err(|e| token_error(e, &self.token, "searching for the public key"))?;
        for object in public.into_iter().chain([private]) {
            if let Some(ne) = self.components(object)? {
                return Ok(ne);
            }
        }
        Err(Error::new(
            ErrorKind::Key,
            format!(
                "token '{}' shows no RSA public key for {}",
                self.token,
                uri.key_name()
            ),
        ))
    }

    /// RSA-OAEP-decrypt `ct` inside the token with `private`.
    fn decrypt(
        &self,
        private: ObjectHandle,
        hash: OaepHash,
        ct: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>> {
        self.session()
            .decrypt(&mechanism(hash), private, ct)
            .map(Zeroizing::new)
            .map_err(|e| token_error(e, &self.token, &format!("{hash} decryption")))
    }
}

impl Drop for Login {
    fn drop(&mut self) {
        let mut all = modules();
        let Some(count) = all
            .get_mut(&self.module)
            .and_then(|m| m.logins.get_mut(&self.slot.id()))
        else {
            return;
        };
        *count = count.saturating_sub(1);
        if *count == 0 {
            if let Err(e) = self.session().logout() {
                tracing::warn!(token = %self.token, error = %e, "PKCS#11 logout failed");
            }
        }
    }
}

/// A customer-managed RSA key in a PKCS#11 token, as a [`KekProvider`] of kind
/// [`KekKind::CustomerPkcs11`]. Each `unwrap` call logs in and out; a job that unwraps several
/// DEKs uses [`Pkcs11Kek::login`] instead.
pub struct Pkcs11Kek {
    key: CmkKey,
    uri: Pkcs11Uri,
    module: PathBuf,
    pin: SecretSource,
}

impl Pkcs11Kek {
    /// Enrol the key `uri` names (at `init`): read its public key from the token, check that
    /// the token supports RSA-OAEP, and choose the OAEP hash: `oaep` if given, else SHA-256,
    /// else (the token refusing SHA-256, as SoftHSM 2.6 does) SHA-1 with a warning. Ends with
    /// a full unwrap check through the token.
    pub fn enroll(
        uri: &str,
        version: u32,
        oaep: Option<OaepHash>,
        options: Pkcs11Options,
    ) -> Result<Self> {
        let parsed = Pkcs11Uri::parse(uri)?;
        let (module, pin) = resolve(&parsed, options)?;
        let (n, e) = {
            let token = Login::open(&module, &parsed, &pin)?;
            let private = token.find_private(&parsed)?;
            let info = context(&module)?
                .get_mechanism_info(token.slot, MechanismType::RSA_PKCS_OAEP)
                .map_err(|e| token_error(e, &token.token, "RSA-OAEP (CKM_RSA_PKCS_OAEP)"))?;
            if !info.decrypt() {
                return Err(Error::new(
                    ErrorKind::Unsupported,
                    format!(
                        "token '{}' does not decrypt with RSA-OAEP (CKM_RSA_PKCS_OAEP)",
                        token.token
                    ),
                ));
            }
            token.public_components(&parsed, private)?
        };
        let key = CmkKey::from_components(
            KekKind::CustomerPkcs11,
            version,
            oaep.unwrap_or(OaepHash::Sha256),
            &n,
            &e,
            parsed.to_string(),
        )?;
        let kek = Pkcs11Kek {
            key,
            uri: parsed,
            module,
            pin,
        };
        match kek.check_unwrap() {
            Ok(()) => Ok(kek),
            Err(e) if oaep.is_none() && e.kind() == ErrorKind::Unsupported => {
                tracing::warn!(
                    key = %kek.uri,
                    "token refuses RSA-OAEP with SHA-256; using RSA-OAEP with SHA-1 for this key"
                );
                let kek = Pkcs11Kek {
                    key: kek.key.with_oaep(OaepHash::Sha1),
                    ..kek
                };
                kek.check_unwrap()?;
                Ok(kek)
            }
            Err(e) => Err(e),
        }
    }

    /// A provider for a stored descriptor. Touches no token: wrapping needs only the stored
    /// public key; the token is opened by the first unwrap.
    pub fn open(key: CmkKey, options: Pkcs11Options) -> Result<Self> {
        if key.id().kind != KekKind::CustomerPkcs11 {
            return Err(Error::usage(format!("{} is not a PKCS#11 key", key.id())));
        }
        let uri = Pkcs11Uri::parse(key.source()).map_err(|e| e.within(key.id()))?;
        let (module, pin) = resolve(&uri, options)?;
        Ok(Pkcs11Kek {
            key,
            uri,
            module,
            pin,
        })
    }

    /// The descriptor the vault stores.
    pub fn key(&self) -> &CmkKey {
        &self.key
    }

    /// Log in for a job: the returned session unwraps without logging in again and logs out
    /// when dropped. Fails if the token, the PIN or the private key is wrong or missing, or if
    /// the private key is not the one the descriptor's fingerprint names.
    pub fn login(&self) -> Result<TokenSession<'_>> {
        let token =
            Login::open(&self.module, &self.uri, &self.pin).map_err(|e| e.within(self.key.id()))?;
        let private = token
            .find_private(&self.uri)
            .map_err(|e| e.within(self.key.id()))?;
        if let Some((n, e)) = token.components(private)? {
            let found = CmkKey::from_components(
                self.key.id().kind,
                self.key.id().version,
                self.key.oaep(),
                &n,
                &e,
                self.key.source(),
            )?;
            self.key.expect_same_key(
                &found,
                &format!("token '{}' ({})", token.token, self.uri.key_name()),
            )?;
        }
        Ok(TokenSession {
            kek: self,
            token,
            private,
        })
    }

    /// Unwrap a random value inside the token: fails before a backup starts when the private
    /// key was deleted (even if its public key remains), the PIN is wrong or the token is gone.
    pub fn check_unwrap(&self) -> Result<()> {
        crate::crypto::kek::check_unwrap(&self.login()?, self.key.id())
    }
}

/// Module path and PIN source, from the options, the URI, the environment or the default.
fn resolve(uri: &Pkcs11Uri, options: Pkcs11Options) -> Result<(PathBuf, SecretSource)> {
    let module = options
        .module
        .or_else(|| uri.module_path.clone())
        .or_else(|| std::env::var_os(MODULE_ENV).map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_MODULE));
    let pin = options
        .pin
        .or_else(|| uri.pin_source.clone().map(SecretSource::File))
        .or_else(|| std::env::var_os(PIN_ENV).map(|_| SecretSource::Env(PIN_ENV.to_owned())))
        .ok_or_else(|| {
            Error::usage(format!(
                "no PIN for the PKCS#11 token: give --pin-file, pin-source= in the URI, or set {PIN_ENV}"
            ))
        })?;
    Ok((module, pin))
}

impl KekProvider for Pkcs11Kek {
    fn current(&self) -> Result<KekId> {
        Ok(self.key.id())
    }

    fn wrap(&self, id: KekId, dek: &Secret32, aad: &[u8]) -> Result<Vec<u8>> {
        self.key.expect_id(id)?;
        wrap::seal(&self.key, dek, aad)
    }

    fn unwrap(&self, id: KekId, wrapped: &[u8], aad: &[u8]) -> Result<Secret32> {
        self.key.expect_id(id)?;
        self.login()?.unwrap(id, wrapped, aad)
    }
}

/// A job's login on the token: a [`KekProvider`] whose unwraps run inside the token without
/// logging in again. Logs out when dropped (unless another job still holds the login).
pub struct TokenSession<'a> {
    kek: &'a Pkcs11Kek,
    token: Login,
    private: ObjectHandle,
}

impl KekProvider for TokenSession<'_> {
    fn current(&self) -> Result<KekId> {
        self.kek.current()
    }

    fn wrap(&self, id: KekId, dek: &Secret32, aad: &[u8]) -> Result<Vec<u8>> {
        self.kek.wrap(id, dek, aad)
    }

    fn unwrap(&self, id: KekId, wrapped: &[u8], aad: &[u8]) -> Result<Secret32> {
        let key = &self.kek.key;
        key.expect_id(id)?;
        wrap::open(key, wrapped, aad, |ct| {
            self.token
                .decrypt(self.private, key.oaep(), ct)
                .map_err(|e| e.within(id))
        })
    }
}
