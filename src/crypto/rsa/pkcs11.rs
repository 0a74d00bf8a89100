//! RSA keys inside a PKCS#11 token (`init --cmk pkcs11:URI`): the private key never leaves
//! the token, which decrypts each wrapping key W with RSA-OAEP (C_Decrypt).
//!
//! ```text
//!  wrap:    public key from the vault's CmkKey ──▶ RSA-OAEP(W) in software; no token needed
//!  unwrap:  login ──▶ find private key ──▶ check its fingerprint ──▶ C_Decrypt(W) … ──▶ logout
//!           └──────────── one TokenSession per job (Pkcs11Kek::login) ────────────┘
//! ```
//! Module: [`Pkcs11Options::module`] (`--pkcs11-module`), else `$BLOCKVAULT_PKCS11_MODULE`,
//! else the first installed of the known system paths; the URI's `module-path` counts only at
//! enrolment and is never stored ([`super::module`]: the vault must not choose code to run).
//! PIN: [`Pkcs11Options::pin`] (`--pin-file`), else the URI's `pin-source`, else
//! `$BLOCKVAULT_PKCS11_PIN`; never an argument.
//!
//! Enrolment accepts only a private key that stays in its token (CKA_SENSITIVE and CKA_PRIVATE
//! true, CKA_EXTRACTABLE false) unless the operator allows otherwise, and only RSA-OAEP with
//! SHA-256 unless the operator chose SHA-1 ([`EnrolPolicy`]): neither is ever relaxed silently.
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
use super::module;
use super::secret_source::SecretSource;
use super::uri::Pkcs11Uri;
use super::wrap;
use crate::crypto::kek::{KekId, KekKind, KekProvider};
use crate::crypto::secret::Secret32;
use crate::error::{Error, ErrorKind, Result};

/// Environment variable holding the token's user PIN.
pub const PIN_ENV: &str = "BLOCKVAULT_PKCS11_PIN";

/// Host-specific settings that are not part of the stored key.
#[derive(Debug, Clone, Default)]
pub struct Pkcs11Options {
    /// The module to load (absolute path), overriding the URI and the environment.
    pub module: Option<PathBuf>,
    /// Where the user PIN is read from (`--pin-file`), overriding the URI and the environment.
    pub pin: Option<SecretSource>,
}

/// What enrolment may accept beyond its defaults. Each field loosens a rule, so each is the
/// operator's explicit choice (`--oaep sha1`, `--allow-extractable-key`), never a fallback.
#[derive(Debug, Clone, Copy)]
pub struct EnrolPolicy {
    /// The RSA-OAEP hash recorded for the key: SHA-256 unless the token refuses it and the
    /// operator chose SHA-1.
    pub oaep: OaepHash,
    /// Enrol a private key that can leave the token or be used without a login (see
    /// [`Pkcs11Kek::enroll`]), with a warning, instead of refusing it.
    pub allow_extractable: bool,
}

impl Default for EnrolPolicy {
    fn default() -> Self {
        EnrolPolicy {
            oaep: OaepHash::Sha256,
            allow_extractable: false,
        }
    }
}

/// The private key attributes that keep a key inside its token: each with the value it must
/// have and what the other value allows.
const CONTAINMENT: [(AttributeType, &str, bool, &str); 3] = [
    (
        AttributeType::Sensitive,
        "CKA_SENSITIVE",
        true,
        "its private exponent can be read out in the clear",
    ),
    (
        AttributeType::Extractable,
        "CKA_EXTRACTABLE",
        false,
        "it can be exported (wrapped) out of the token",
    ),
    (
        AttributeType::Private,
        "CKA_PRIVATE",
        true,
        "it can be used without logging in to the token",
    ),
];

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
                "PKCS#11 module {} cannot be loaded; the key is unreachable (choose the \
                 module with --pkcs11-module or {})",
                path.display(),
                module::MODULE_ENV
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

    /// What lets `private` leave the token or be used without a PIN: one description per
    /// attribute of [`CONTAINMENT`] that has the wrong value or that the token does not show
    /// (an unknown value is not a guarantee). Empty for a key that stays in the token.
    fn exposure(&self, private: ObjectHandle) -> Result<Vec<String>> {
        let types = CONTAINMENT.map(|(t, ..)| t);
        let attrs = self
            .session()
            .get_attributes(private, &types)
            .map_err(|e| token_error(e, &self.token, "reading the private key's attributes"))?;
        let value = |t: AttributeType| {
            attrs.iter().find_map(|a| match (t, a) {
                (AttributeType::Sensitive, Attribute::Sensitive(v))
                | (AttributeType::Extractable, Attribute::Extractable(v))
                | (AttributeType::Private, Attribute::Private(v)) => Some(*v),
                _ => None,
            })
        };
        Ok(CONTAINMENT
            .iter()
            .filter_map(|&(t, name, want, otherwise)| match value(t) {
                Some(v) if v == want => None,
                Some(v) => Some(format!("{name} = {v}: {otherwise}")),
                None => Some(format!("the token does not show {name}")),
            })
            .collect())
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
    warnings: Vec<String>,
}

impl Pkcs11Kek {
    /// Enrol the key `uri` names (at `init` and for `--new-cmk`): check that the private key
    /// stays in its token (CKA_SENSITIVE = true, CKA_EXTRACTABLE = false, CKA_PRIVATE = true;
    /// otherwise a `Key` error naming the attribute, unless `policy.allow_extractable`, which
    /// enrols it with [`Pkcs11Kek::warnings`]), that the token decrypts with RSA-OAEP, read the
    /// public key, and end with a full unwrap check through the token with `policy.oaep`. A
    /// token that refuses SHA-256 fails with an `Unsupported` error naming `--oaep sha1`.
    ///
    /// The stored URI is `uri` without its `module-path` ([`super::module`]).
    pub fn enroll(
        uri: &str,
        version: u32,
        policy: EnrolPolicy,
        options: Pkcs11Options,
    ) -> Result<Self> {
        let parsed = Pkcs11Uri::parse(uri)?;
        let module = module::resolve(options.module, parsed.module_path.as_deref())?;
        let pin = resolve_pin(&parsed, options.pin)?;
        let stored = Pkcs11Uri {
            module_path: None,
            ..parsed
        };
        let (n, e, warnings) = {
            let token = Login::open(&module, &stored, &pin)?;
            let private = token.find_private(&stored)?;
            let exposure = token.exposure(private)?;
            let warnings = contained(exposure, &token.token, &stored, policy)?;
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
            let (n, e) = token.public_components(&stored, private)?;
            (n, e, warnings)
        };
        let key = CmkKey::from_components(
            KekKind::CustomerPkcs11,
            version,
            policy.oaep,
            &n,
            &e,
            stored.to_string(),
        )?;
        let kek = Pkcs11Kek {
            key,
            uri: stored,
            module,
            pin,
            warnings,
        };
        match kek.check_unwrap() {
            Err(e) if e.kind() == ErrorKind::Unsupported && policy.oaep == OaepHash::Sha256 => {
                Err(Error::new(
                    ErrorKind::Unsupported,
                    format!(
                        "{}: the token refuses RSA-OAEP with SHA-256, which blockvault uses \
                         unless told otherwise; enrol with --oaep sha1 to use RSA-OAEP with \
                         SHA-1 (MGF1-SHA-1) for this key: still sound for wrapping keys, since \
                         OAEP does not rest on SHA-1's collision resistance, but the older hash, \
                         recorded with the key for its life",
                        kek.uri.key_name()
                    ),
                )
                .with_source(e))
            }
            Err(e) => Err(e),
            Ok(()) => Ok(kek),
        }
    }

    /// A provider for a stored descriptor. Touches no token: wrapping needs only the stored
    /// public key; the token is opened by the first unwrap. A `module-path` in the stored URI
    /// is ignored: the vault never chooses the module ([`super::module`]).
    pub fn open(key: CmkKey, options: Pkcs11Options) -> Result<Self> {
        if key.id().kind != KekKind::CustomerPkcs11 {
            return Err(Error::usage(format!("{} is not a PKCS#11 key", key.id())));
        }
        let mut uri = Pkcs11Uri::parse(key.source()).map_err(|e| e.within(key.id()))?;
        if let Some(ignored) = uri.module_path.take() {
            tracing::debug!(key = %key.id(), module = %ignored.display(), "module-path of a stored key ignored");
        }
        let module = module::resolve(options.module, None)?;
        let pin = resolve_pin(&uri, options.pin)?;
        Ok(Pkcs11Kek {
            key,
            uri,
            module,
            pin,
            warnings: Vec::new(),
        })
    }

    /// The descriptor the vault stores.
    pub fn key(&self) -> &CmkKey {
        &self.key
    }

    /// What enrolment accepted only because [`EnrolPolicy::allow_extractable`] allowed it, as
    /// sentences to show the operator; empty for a key that stays in its token, and for a key
    /// opened from the vault.
    pub fn warnings(&self) -> &[String] {
        &self.warnings
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

/// Enrolment's verdict on a private key's [`Login::exposure`]: no warnings for a key that
/// stays in its token; the exposure as warnings when the policy allows it; else a `Key` error
/// naming every attribute at fault.
fn contained(
    exposure: Vec<String>,
    token: &str,
    uri: &Pkcs11Uri,
    policy: EnrolPolicy,
) -> Result<Vec<String>> {
    if exposure.is_empty() {
        return Ok(exposure);
    }
    let what = format!(
        "the private key {} on token '{token}' does not stay in the token: {}",
        uri.key_name(),
        exposure.join("; ")
    );
    if policy.allow_extractable {
        return Ok(vec![format!(
            "{what}. Enrolled anyway (--allow-extractable-key): whoever gets the key out of \
             the token can unwrap every DEK it wraps"
        )]);
    }
    Err(Error::new(
        ErrorKind::Key,
        format!(
            "{what}. Enrol a key made with CKA_SENSITIVE = true, CKA_EXTRACTABLE = false and \
             CKA_PRIVATE = true, or give --allow-extractable-key to accept this one"
        ),
    ))
}

/// The PIN's source: the caller's, else the URI's `pin-source`, else the environment.
fn resolve_pin(uri: &Pkcs11Uri, pin: Option<SecretSource>) -> Result<SecretSource> {
    pin.or_else(|| uri.pin_source.clone().map(SecretSource::File))
        .or_else(|| std::env::var_os(PIN_ENV).map(|_| SecretSource::Env(PIN_ENV.to_owned())))
        .ok_or_else(|| {
            Error::usage(format!(
                "no PIN for the PKCS#11 token: give --pin-file, pin-source= in the URI, or set {PIN_ENV}"
            ))
        })
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
