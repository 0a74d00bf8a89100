//! `init`: create a vault, its keys and its first head.
//!
//! Order, so that a crash at any point leaves either no vault or a whole one:
//! keystore file → key descriptors, `infra-recovery`, `recovery-anchor` → head (create-only)
//! → config (create-only, last: a folder without a config holds no vault, and the next `init`
//! takes over what an interrupted one left) → this host's memory of the vault's URL.

use std::sync::Arc;

use crate::crypto::kek::{KekId, KekKind};
use crate::crypto::keyring::KeyAccess;
use crate::crypto::keystore::{Keystore, VaultKeys};
use crate::crypto::rsa::CmkKey;
use crate::crypto::secret::random_bytes;
use crate::error::{Error, ErrorKind, Result};
use crate::vault::config::{self, Config};
use crate::vault::head::{self, DescriptorEntry, Head};
use crate::vault::store::{self, Precondition, Store};
use crate::vault::{anchor, infra_recovery, kekdesc, location, Vault};

/// Encryption settings chosen when a vault is created.
#[derive(Default)]
pub struct InitOptions {
    /// The customer-managed key that wraps every DEK; `None`: the platform key.
    pub cmk: Option<CmkKey>,
    /// An offline RSA key that receives a second wrap of every DEK, and the vault's auth key
    /// (the recovery anchor).
    pub recovery: Option<CmkKey>,
    /// A second offline RSA key that alone can recover the infrastructure layer's key, so that
    /// neither recovery key opens both layers. Without it, `recovery` recovers that key too.
    pub infra_recovery: Option<CmkKey>,
    /// Add the infrastructure layer (AES-256-XTS with a platform-managed key); only with a
    /// customer-managed key.
    pub infrastructure: bool,
    /// Where this host reaches the customer key's private half.
    pub access: KeyAccess,
    /// A vault this host knew at the URL and that is gone: forget it and start over.
    pub forget_vault: Option<[u8; 16]>,
}

/// What `init` made.
pub struct Initialized {
    /// The new vault, open.
    pub vault: Vault,
    /// The fingerprint of the vault's auth key, to keep with the recovery key (recovery
    /// asks for it); `None` without a recovery key.
    pub recovery_fingerprint: Option<String>,
    /// The vault forgotten (`forget_vault`), if any.
    pub forgot: Option<[u8; 16]>,
}

/// Create a vault at `url` with the settings of `opts`, fixed for its lifetime. Fails if a
/// vault exists there, or if this host knew one there that vanished (unless `forget_vault`
/// names it).
pub fn init(url: &str, keystore: &Keystore, opts: &InitOptions) -> Result<Initialized> {
    if opts.infrastructure && opts.cmk.is_none() {
        return Err(Error::usage(
            "infrastructure encryption can be chosen only together with a customer-managed key (--cmk)",
        ));
    }
    if opts.infra_recovery.is_some() && !opts.infrastructure {
        return Err(Error::usage(
            "an infrastructure recovery key needs --infrastructure-encryption",
        ));
    }
    let location = location::canonical(url)?;
    let raw: Arc<dyn Store> = store::open(url)?.into();
    // One init at a time: an init takes over what an interrupted one left (below), which must
    // not be the objects of another init still at work.
    let _lock = raw.lock("init", std::time::Duration::from_secs(60))?;
    if raw.size(config::KEY).is_ok() {
        return Err(Error::new(
            ErrorKind::AlreadyExists,
            format!("a vault already exists at {url}: its encryption settings were fixed when it was created and cannot be changed (create a new vault for other settings)"),
        ));
    }
    let forgot = forget_known(keystore, &location, url, opts.forget_vault)?;
    take_over_interrupted_init(&*raw, url)?;

    let vault_id = random_bytes::<16>()?;
    let keys = VaultKeys::generate(opts.infrastructure)?;
    keystore.create(&vault_id, &keys)?;
    let auth = &keys.newest_auth().key;
    let infra_version = if opts.infrastructure { 1 } else { 0 };
    let primary = match &opts.cmk {
        Some(k) => k.id(),
        None => KekId {
            kind: KekKind::Platform,
            version: 1,
        },
    };
    let mut head = Head::new(vault_id, 1, primary, infra_version);
    let layered = crate::vault::layered(raw.clone(), &head, &keys)?;
    for key in opts.cmk.iter().chain(&opts.recovery) {
        let bytes = kekdesc::encode(key);
        layered.put_new(&kekdesc::object_key(key.id()), &bytes)?;
        head.descriptors.push(DescriptorEntry {
            id: key.id(),
            digest: head::digest(&bytes),
        });
    }
    if let Some(infra) = keys.infra.last() {
        if let Some(holder) = opts.infra_recovery.as_ref().or(opts.recovery.as_ref()) {
            let bytes = infra_recovery::encode(&vault_id, infra.version, holder, &infra.key)?;
            raw.put(infra_recovery::KEY, &bytes)?;
            head.infra_recovery = Some(head::digest(&bytes));
        }
    }
    let recovery_fingerprint = match &opts.recovery {
        Some(recovery) => {
            let bytes = anchor::encode(&vault_id, 1, auth, recovery)?;
            raw.put(anchor::KEY, &bytes)?;
            head.recovery_anchor = Some(head::digest(&bytes));
            Some(anchor::fingerprint(auth))
        }
        None => None,
    };
    raw.put_if(head::KEY, &head.encode(auth), &Precondition::Absent)?;
    let config = Config {
        format_version: config::FORMAT_VERSION,
        auth_version: 1,
        vault_id,
        created: crate::util::now_unix(),
        kek_kind: primary.kind,
        infrastructure: if opts.infrastructure {
            config::INFRA_AES_XTS
        } else {
            config::INFRA_NONE
        },
    };
    raw.put_new(config::KEY, &config.encode(auth))?;
    tracing::info!(vault = %url, keystore = %keystore.path_for(&vault_id).display(), "vault created");
    let vault = Vault::open_with(url, keystore, &opts.access)?;
    Ok(Initialized {
        vault,
        recovery_fingerprint,
        forgot,
    })
}

/// Open the vault at `url`, or create one with a platform-managed key if the location holds
/// none (`backup --init`). Returns whether it was created.
pub fn open_or_init(url: &str, keystore: &Keystore, access: &KeyAccess) -> Result<(Vault, bool)> {
    match Vault::open_with(url, keystore, access) {
        Ok(v) => Ok((v, false)),
        // `open` reports NotFound only when the location holds no config object (and this
        // host knew no vault there: that one is NotFound too, and `init` refuses it below).
        Err(e) if e.kind() == ErrorKind::NotFound => {
            let opts = InitOptions {
                access: access.clone(),
                ..InitOptions::default()
            };
            Ok((init(url, keystore, &opts)?.vault, true))
        }
        Err(e) => Err(e),
    }
}

/// If this host knew a vault at `location` (it vanished, since no config is there), refuse
/// unless the caller named it to forget; then drop the URL from its memory.
fn forget_known(
    keystore: &Keystore,
    location: &str,
    url: &str,
    forget: Option<[u8; 16]>,
) -> Result<Option<[u8; 16]>> {
    let Some(known) = keystore.vault_at(location)? else {
        return Ok(None);
    };
    if forget != Some(known) {
        return Err(Error::new(
            ErrorKind::AlreadyExists,
            format!("this host knew vault {} at {url}, and it is gone (deleted, wiped, or the storage is not mounted): blockvault will not silently put a new vault in its place. If it is lost for good, start over with `blockvault init --forget-vault {}`", hex::encode(known), hex::encode(known)),
        ));
    }
    keystore.update_state(&known, |s| {
        s.urls.retain(|u| u != location);
        Ok(())
    })?;
    tracing::warn!(vault = %hex::encode(known), url, "forgot a vault that vanished from this URL");
    Ok(Some(known))
}

/// Remove what an `init` killed before writing the config left behind: key descriptors, the
/// head, `infra-recovery` and `recovery-anchor`. They are authenticated (or encrypted) under a
/// keystore file that no config names, so nothing can use them, and left in place they would
/// make the next init fail (create-only writes). Run under the init lock, with no config
/// present. A folder holding key records or snapshots without a config is not what an init
/// leaves: it is refused, and nothing is removed.
fn take_over_interrupted_init(store: &dyn Store, url: &str) -> Result<()> {
    for prefix in ["keys", "snapshots"] {
        if let Some(key) = store.list(prefix)?.first() {
            return Err(Error::new(
                ErrorKind::AlreadyExists,
                format!("{url} holds {key} but no config: neither an empty folder nor what an interrupted init leaves; refusing to create a vault over it"),
            ));
        }
    }
    for key in store.list(kekdesc::PREFIX)? {
        tracing::info!(object = %key, "removing a key descriptor of an interrupted init");
        store.delete(&key)?;
    }
    for key in [head::KEY, infra_recovery::KEY, anchor::KEY] {
        store.delete(key)?;
    }
    Ok(())
}
