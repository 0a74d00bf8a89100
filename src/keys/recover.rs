//! `key recover`: regain access with the recovery key. Recovery adds; it never adopts.
//!
//! - **The keystore opens the vault** (a customer key's private half is lost): everything is
//!   opened and checked as usual, and recovery only replaces the lost key: every DEK is
//!   unwrapped through its recovery wrap and rewrapped under the new customer key (`--new-cmk`)
//!   and the recovery key.
//! - **The keystore is lost**: nothing in the vault can be trusted until it is authenticated,
//!   and the keys that authenticate it are gone. The recovery anchor (`recovery-anchor`) holds
//!   the vault's auth key wrapped to the recovery key; the recovery key's holder unwraps it and
//!   checks it against the fingerprint kept since `init` (anyone with the recovery *public* key
//!   could make an anchor for a forged vault: the fingerprint is what tells them apart). Then
//!   the config, the head and every descriptor and record are checked against that auth key
//!   and the head, before anything is written. Taking over needs `--take-over`; it makes a new
//!   keystore with a new auth key and a new platform KEK, so the keystore it replaces (named by
//!   its auth fingerprint) stops working wherever it still exists. A platform KEK version the
//!   head records as revoked stops it unless the recovery key's holder lifts the revocation
//!   (`--lift-revocation`): recovery must not be a way around a revocation.

use std::collections::BTreeSet;
use std::sync::Arc;

use crate::crypto::kek::{KekId, KekKind, KekState, PlatformKek, PlatformKeyVersion};
use crate::crypto::keyring::{KeyAccess, Keyring};
use crate::crypto::keystore::{KeyClass, Keystore, VaultKeys, Versioned};
use crate::crypto::rsa::{CmkKey, PemKek, PrivateKeyFile};
use crate::crypto::Secret32;
use crate::error::{Error, ErrorKind, Result};
use crate::vault::config::{self, Config};
use crate::vault::head::{self, DescriptorEntry, Head, KeyOp};
use crate::vault::store::{self, Store};
use crate::vault::{anchor, heads, infra_recovery, kekdesc, location, Vault};

/// How to recover.
pub struct RecoverOptions {
    /// The recovery key's private half.
    pub recovery_private: PrivateKeyFile,
    /// The private half of a separate infrastructure recovery key (`init
    /// --infra-recovery-key`), when the vault has one and its keystore is lost.
    pub infra_recovery_private: Option<PrivateKeyFile>,
    /// A new customer-managed key replacing a lost one (its version: see
    /// [`super::rotate::next_cmk_version`]).
    pub new_cmk: Option<CmkKey>,
    /// Make a new keystore for a vault whose keystore is lost.
    pub take_over: bool,
    /// The auth-key fingerprint printed at `init` (or by `key show`/`key rotate --auth`).
    pub anchor_fingerprint: Option<String>,
    /// Accept the recovery anchor without a fingerprint to check it against.
    pub unverified_anchor: bool,
    /// Recover even though the head records revoked platform KEK versions.
    pub lift_revocation: bool,
}

/// What recovery did.
#[derive(Debug)]
pub struct Recovered {
    /// Key records rewrapped.
    pub records_rewrapped: usize,
    /// The key file written or used.
    pub keystore_file: String,
    /// Taking over: the auth fingerprint of the keystore that was replaced.
    pub replaced_keystore: Option<String>,
    /// The auth fingerprint now (keep it with the recovery key).
    pub auth_fingerprint: String,
    /// The primary KEK now.
    pub kek: KekId,
}

/// Recover the vault at `url` as `opts` says; `access` reaches the new customer key's private
/// half (PKCS#11 module and PIN) where needed.
pub fn recover(
    url: &str,
    keystore: &Keystore,
    access: &KeyAccess,
    opts: &RecoverOptions,
) -> Result<Recovered> {
    let raw: Arc<dyn Store> = store::open(url)?.into();
    let config_bytes = raw
        .get(config::KEY)
        .map_err(|e| e.within(format!("vault {url}")))?;
    let config = Config::decode_unverified(&config_bytes)?;
    if config.format_version < config::FORMAT_VERSION {
        return Err(Error::new(
            ErrorKind::Unsupported,
            format!("vault {url} is in format version {}: it has no recovery anchor; run `blockvault upgrade` with its keystore first (a version 1 vault whose keystore is lost can only be recovered by the release that wrote it)", config.format_version),
        ));
    }
    let access = KeyAccess {
        recovery_private: Some(opts.recovery_private.clone()),
        ..access.clone()
    };
    if keystore.has(&config.vault_id) {
        if opts.take_over {
            return resume_take_over(url, raw, &config_bytes, config, keystore, &access, opts);
        }
        return replace_cmk(url, keystore, &access, opts);
    }
    if !opts.take_over {
        return Err(Error::new(
            ErrorKind::Key,
            format!("the keystore has no keys for vault {} (expected {}): to make a new keystore from the recovery key, run `key recover --take-over --anchor-fingerprint FP`; the keystore it replaces stops working wherever it still exists", hex::encode(config.vault_id), keystore.path_for(&config.vault_id).display()),
        ));
    }
    take_over(url, raw, config_bytes, config, keystore, &access, opts)
}

/// A keyring that unwraps through the recovery key alone.
fn recovery_ring(recovery: &CmkKey, private: &PrivateKeyFile) -> Result<Keyring> {
    Ok(Keyring::new(
        KekKind::Recovery,
        Box::new(PemKek::new(
            CmkKey::decode(&recovery.encode(), "recovery key")?,
            Some(private.clone()),
        )?),
        None,
    ))
}

fn recovery_descriptor(head: &Head, descriptors: &[CmkKey]) -> Result<CmkKey> {
    let id = head
        .wrapping_ids()
        .into_iter()
        .find(|k| k.kind == KekKind::Recovery)
        .ok_or_else(|| Error::new(ErrorKind::Key, "this vault has no recovery key"))?;
    let key = descriptors
        .iter()
        .find(|k| k.id() == id)
        .expect("the head's descriptors were loaded");
    CmkKey::decode(&key.encode(), "recovery key")
}

/// The keystore opens the vault; a customer key is lost: rewrap under `opts.new_cmk`.
fn replace_cmk(
    url: &str,
    keystore: &Keystore,
    access: &KeyAccess,
    opts: &RecoverOptions,
) -> Result<Recovered> {
    let vault = Vault::open_with(url, keystore, access)?;
    let Some(new_cmk) = &opts.new_cmk else {
        return Err(Error::usage(
            "the keystore opens this vault: there is nothing to recover (to replace a lost customer key, give the new one with --new-cmk)",
        ));
    };
    let head = vault.head()?;
    if head.primary.kind == KekKind::Platform {
        return Err(Error::usage("this vault uses the platform key: customer-managed keys are chosen at init and cannot be added by recovery"));
    }
    if new_cmk.id().kind != head.primary.kind {
        return Err(Error::usage(format!(
            "the new key is {} but the vault's keys are {}",
            new_cmk.id().kind,
            head.primary.kind
        )));
    }
    // Every key record the head lists is checked before anything is written: a recovery
    // refused over a replaced record leaves neither a new descriptor nor a head swap behind.
    vault.key_records()?;
    let guard = super::begin(&vault, KeyOp::Recover)?;
    let descriptors = vault.kek_descriptors()?;
    let from = recovery_ring(
        &recovery_descriptor(&head, &descriptors)?,
        &opts.recovery_private,
    )?;
    let bytes = kekdesc::encode(new_cmk);
    vault
        .store()
        .put(&kekdesc::object_key(new_cmk.id()), &bytes)?;
    let mut target_head = head.clone();
    target_head.primary = new_cmk.id();
    target_head.descriptors.push(DescriptorEntry {
        id: new_cmk.id(),
        digest: head::digest(&bytes),
    });
    let to = crate::vault::keyring_for(
        &target_head,
        PlatformKek::new(Vec::new()),
        crate::vault::load_descriptors(&**vault.store(), &target_head)?,
        access,
    )?;
    let target = new_cmk.id();
    let descriptors = target_head.descriptors.clone();
    let (_, switched) = super::rotate::switch_records(&vault, &from, &to, false, |h| {
        h.primary = target;
        h.descriptors = super::rotate::kept_descriptors(&descriptors, target);
        Ok(())
    })?;
    guard.finished();
    switched.delete_replaced(&vault)?;
    // The descriptors the new head no longer lists go from the store too.
    let kept = super::rotate::kept_descriptors(&head.descriptors, target);
    for d in head.descriptors.iter().filter(|d| !kept.contains(d)) {
        vault.store().delete(&kekdesc::object_key(d.id))?;
    }
    Ok(Recovered {
        records_rewrapped: switched.records_rewrapped,
        keystore_file: vault.keystore_file().display().to_string(),
        replaced_keystore: None,
        auth_fingerprint: anchor::fingerprint(&vault.keys().newest_auth().key),
        kek: target,
    })
}

/// The keystore is lost: authenticate everything through the recovery anchor, then make a new
/// keystore and move the vault to it.
fn take_over(
    url: &str,
    raw: Arc<dyn Store>,
    config_bytes: Vec<u8>,
    config: Config,
    keystore: &Keystore,
    access: &KeyAccess,
    opts: &RecoverOptions,
) -> Result<Recovered> {
    let vault_id = config.vault_id;
    let expected = match (&opts.anchor_fingerprint, opts.unverified_anchor) {
        (Some(f), _) => Some(f.as_str()),
        (None, true) => {
            tracing::warn!("taking over with an unverified recovery anchor: a vault forged around the recovery public key would be accepted");
            None
        }
        (None, false) => {
            return Err(Error::usage(
                "taking over needs the auth-key fingerprint printed at init (--anchor-fingerprint FP): without it, a vault forged by whoever holds the storage cannot be told from this one (--unverified-anchor accepts that risk)",
            ))
        }
    };
    let anchor_bytes = raw.get(anchor::KEY).map_err(|e| {
        e.within("the vault has no recovery anchor (made by init with --recovery-key)")
    })?;
    let opened = anchor::open(
        &anchor_bytes,
        &vault_id,
        Some(opts.recovery_private.clone()),
        expected,
    )?;
    if opened.auth_version != config.auth_version {
        return Err(Error::integrity(format!(
            "{}: holds auth key version {}, the config names {}",
            anchor::KEY,
            opened.auth_version,
            config.auth_version
        )));
    }
    Config::verify(&config_bytes, &opened.auth)?;
    // What the vault's own auth key vouches for, and nothing else.
    let old_keys = VaultKeys {
        auth: vec![Versioned {
            version: opened.auth_version,
            created: 0,
            key: Secret32::from_bytes(*opened.auth.expose()),
        }],
        kek: PlatformKek::new(Vec::new()),
        infra: Vec::new(),
        destroyed: BTreeSet::new(),
    };
    let head = heads::authenticate(&raw.get(head::KEY)?, &vault_id, &old_keys)?;
    if head.recovery_anchor != Some(head::digest(&anchor_bytes)) {
        return Err(Error::integrity(format!(
            "{}: not the anchor the vault head lists",
            anchor::KEY
        )));
    }
    if head.primary.kind == KekKind::Platform && !head.revoked.is_empty() && !opts.lift_revocation {
        return Err(revoked(&head));
    }
    let infra = match head.infra_version {
        0 => None,
        version => {
            let digest = head.infra_recovery.ok_or_else(|| {
                Error::new(ErrorKind::Key, "the vault has an infrastructure layer but no infra-recovery record: its key cannot be recovered")
            })?;
            let bytes = infra_recovery::read_bound(&*raw, &digest)?;
            let private = opts
                .infra_recovery_private
                .clone()
                .unwrap_or_else(|| opts.recovery_private.clone());
            let (v, key) = infra_recovery::open(&bytes, &vault_id, Some(private))
                .map_err(|e| e.within("recovering the infrastructure key (a separate infrastructure recovery key goes in --infra-recovery-private)"))?;
            if v != version {
                return Err(Error::integrity(format!(
                    "{}: holds infrastructure key version {v}, the head names {version}",
                    infra_recovery::KEY
                )));
            }
            Some(Versioned {
                version,
                created: crate::util::now_unix(),
                key,
            })
        }
    };
    // The new keystore: the old auth key (to read the head it MACs) beside a new one, a new
    // platform KEK, the recovered infrastructure key.
    let old_auth = opened.auth_version;
    let new_auth = old_auth + 1;
    let new_platform = head.primary.version + 1;
    let mut keys = VaultKeys {
        auth: vec![
            Versioned {
                version: opened.auth_version,
                created: 0,
                key: opened.auth,
            },
            Versioned {
                version: new_auth,
                created: crate::util::now_unix(),
                key: Secret32::random()?,
            },
        ],
        kek: PlatformKek::new(Vec::new()),
        infra: infra.into_iter().collect(),
        destroyed: BTreeSet::new(),
    };
    if head.primary.kind == KekKind::Platform {
        keys.kek = PlatformKek::new(vec![PlatformKeyVersion {
            version: new_platform,
            state: KekState::Enabled,
            created: crate::util::now_unix(),
            key: Secret32::random()?,
        }]);
        for v in 1..new_platform {
            keys.destroyed.insert((KeyClass::Kek, v));
        }
    }
    // Everything the head binds (descriptors as the vault is assembled, then every key record)
    // is checked before the keystore file is written: a take-over refused over a replaced
    // object leaves no keystore behind, so the next attempt starts from the same place.
    let encoded = keys.encode(&vault_id);
    Vault::assemble(
        raw.clone(),
        config.clone(),
        keys,
        keystore,
        location::canonical(url)?,
        head.clone(),
        access,
    )?
    .key_records()?;
    keystore.create(&vault_id, &VaultKeys::decode(&encoded, &vault_id)?)?;
    let taking = TakingOver {
        head,
        old_auth,
        new_auth,
        new_platform,
        replaced: opened.fingerprint,
    };
    finish_take_over(url, raw, config, keystore, access, opts, taking)
}

/// A take-over under way: the keystore it made holds the vault's auth key (`old_auth`) and
/// its own (`new_auth`), and, for a platform-key vault, the new platform KEK version.
struct TakingOver {
    /// The head as read (authenticated) before anything was written.
    head: Head,
    old_auth: u32,
    new_auth: u32,
    new_platform: u32,
    /// The auth fingerprint of the keystore replaced.
    replaced: String,
}

/// `--take-over` where the keystore already holds the vault's keys: a take-over killed after
/// it made the keystore (it holds two auth versions until it ends, the older one the vault's,
/// checked against the fingerprint when the keystore was made) is finished with that
/// keystore: the recovery anchor may already be under the new auth key, so starting over
/// could not work. Anything else has nothing to take over.
fn resume_take_over(
    url: &str,
    raw: Arc<dyn Store>,
    config_bytes: &[u8],
    config: Config,
    keystore: &Keystore,
    access: &KeyAccess,
    opts: &RecoverOptions,
) -> Result<Recovered> {
    let vault_id = config.vault_id;
    let keys = keystore.load(&vault_id)?;
    let nothing = || {
        Error::usage(format!(
            "the keystore holds the keys of vault {} ({}): there is nothing to take over",
            hex::encode(vault_id),
            keystore.path_for(&vault_id).display()
        ))
    };
    let (Some(old), Some(new)) = (
        keys.auth.iter().min_by_key(|a| a.version),
        keys.auth.iter().max_by_key(|a| a.version),
    ) else {
        return Err(nothing());
    };
    let replaced = anchor::fingerprint(&old.key);
    let same_anchor = opts
        .anchor_fingerprint
        .as_deref()
        .is_none_or(|fp| anchor::fingerprint_matches(&old.key, fp));
    if keys.auth.len() != 2 || !same_anchor {
        return Err(nothing());
    }
    tracing::warn!(keystore = %keystore.path_for(&vault_id).display(), "finishing a take-over that did not finish");
    Config::verify(config_bytes, keys.auth(config.auth_version)?)?;
    let head = heads::authenticate(&raw.get(head::KEY)?, &vault_id, &keys)?;
    if head.primary.kind == KekKind::Platform && !head.revoked.is_empty() && !opts.lift_revocation {
        return Err(revoked(&head));
    }
    let new_platform = keys
        .kek
        .versions()
        .iter()
        .map(|v| v.version)
        .max()
        .unwrap_or(head.primary.version + 1);
    let taking = TakingOver {
        head,
        old_auth: old.version,
        new_auth: new.version,
        new_platform,
        replaced,
    };
    finish_take_over(url, raw, config, keystore, access, opts, taking)
}

/// Everything a take-over does once its keystore exists: the vault opened with it, every
/// record rewrapped from the recovery key to the new KEK and the recovery key, the anchor and
/// the config under the new auth key, then the head; last, the vault's old auth key dropped
/// from the keystore. Run again after a kill, it does the same (each step is idempotent).
fn finish_take_over(
    url: &str,
    raw: Arc<dyn Store>,
    config: Config,
    keystore: &Keystore,
    access: &KeyAccess,
    opts: &RecoverOptions,
    taking: TakingOver,
) -> Result<Recovered> {
    let TakingOver {
        head,
        old_auth,
        new_auth,
        new_platform,
        replaced,
    } = taking;
    let vault_id = config.vault_id;
    let keystore_file = keystore.path_for(&vault_id);
    let location = location::canonical(url)?;
    crate::vault::pin(keystore, &location, &vault_id)?;
    // Everything the head binds is checked as the vault is assembled and its disks loaded.
    let vault = Vault::assemble(
        raw.clone(),
        config.clone(),
        keystore.load(&vault_id)?,
        keystore,
        location,
        head.clone(),
        access,
    )?;
    vault.key_records()?;
    let guard = super::begin(&vault, KeyOp::Recover)?;
    let descriptors = vault.kek_descriptors()?;
    let recovery = recovery_descriptor(&head, &descriptors)?;
    let from = recovery_ring(&recovery, &opts.recovery_private)?;
    let target = match (head.primary.kind, &opts.new_cmk) {
        (KekKind::Platform, Some(_)) => {
            return Err(Error::usage("this vault uses the platform key: customer-managed keys are chosen at init and cannot be added by recovery"))
        }
        (KekKind::Platform, None) => KekId {
            kind: KekKind::Platform,
            version: new_platform,
        },
        (_, Some(cmk)) => {
            let bytes = kekdesc::encode(cmk);
            vault.store().put(&kekdesc::object_key(cmk.id()), &bytes)?;
            cmk.id()
        }
        (_, None) => head.primary,
    };
    let mut target_head = head.clone();
    target_head.primary = target;
    if let Some(cmk) = &opts.new_cmk {
        target_head.descriptors.push(DescriptorEntry {
            id: cmk.id(),
            digest: head::digest(&kekdesc::encode(cmk)),
        });
    }
    let to = crate::vault::keyring_for(
        &target_head,
        keystore.load(&vault_id)?.kek,
        crate::vault::load_descriptors(&**vault.store(), &target_head)?,
        access,
    )?;
    // The new auth key, in the anchor and the config before the head switches to it.
    let new_auth_key = vault.keys().auth(new_auth)?;
    let anchor_bytes = anchor::encode(&vault_id, new_auth, new_auth_key, &recovery)?;
    raw.put(anchor::KEY, &anchor_bytes)?;
    let new_config = Config {
        auth_version: new_auth,
        ..config
    };
    raw.put(config::KEY, &new_config.encode(new_auth_key))?;
    let descriptors = target_head.descriptors.clone();
    let anchor_digest = head::digest(&anchor_bytes);
    let (_, switched) = super::rotate::switch_records(&vault, &from, &to, false, |h| {
        h.primary = target;
        h.auth_version = new_auth;
        h.recovery_anchor = Some(anchor_digest);
        h.revoked.clear();
        h.descriptors = super::rotate::kept_descriptors(&descriptors, target);
        Ok(())
    })?;
    guard.finished();
    switched.delete_replaced(&vault)?;
    keystore.update(&vault_id, |keys| {
        keys.auth.retain(|a| a.version == new_auth);
        keys.destroyed.insert((KeyClass::Auth, old_auth));
        Ok(())
    })?;
    Ok(Recovered {
        records_rewrapped: switched.records_rewrapped,
        keystore_file: keystore_file.display().to_string(),
        replaced_keystore: Some(replaced),
        auth_fingerprint: anchor::fingerprint(new_auth_key),
        kek: target,
    })
}

/// Recovery refused while the head records revoked platform versions.
fn revoked(head: &Head) -> Error {
    Error::new(
        ErrorKind::Key,
        format!("the vault records platform KEK version(s) {:?} as revoked: recovery will not route around a revocation; if you mean to lift it, add --lift-revocation", head.revoked),
    )
}
