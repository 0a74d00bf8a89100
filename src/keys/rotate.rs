//! `key rotate`: a new KEK (platform version or customer key), optionally a new DEK generation
//! with a new content identity on every disk (`--new-dek`), and the auth key (`--auth`).
//!
//! KEK rotation, resumable at every step:
//! ```text
//!  new KEK stored (keystore version / create-only descriptor)
//!  ─▶ every record the head lists: unwrap (old KEK) ─▶ rewrap (new KEK + recovery)
//!     ─▶ written as revision rev + 1 (a new object: nothing is rewritten in place)
//!  ─▶ head swap: new revisions, new primary; records a backup added meanwhile are rewrapped
//!     and the swap tried again, so none is left under the old KEK
//!  ─▶ old revisions deleted; old platform versions destroyed (nothing needs them)
//!  ─▶ every record re-read and checked to be wrapped by the new KEKs
//! ```
//! Auth rotation: new auth version in the keystore ─▶ config and recovery anchor rewritten under
//! it ─▶ head swapped to it (MAC'd with it) ─▶ older auth versions destroyed. Every keystore
//! copy elsewhere then needs a fresh `key import`: that is the point (a leaked keystore stops
//! authenticating anything).
//!
//! `--infrastructure`: the infrastructure layer's key ([`super::infra_rotation`]); with
//! `--new-dek` (or `--new-cmk`), after the KEK rotation they ask for.

use std::collections::{BTreeMap, HashMap};

use crate::crypto::kek::{KekId, KekKind, KekState, PlatformKek, PlatformKeyVersion};
use crate::crypto::keyring::{KeyAccess, Keyring};
use crate::crypto::keystore::{KeyClass, Keystore, Versioned};
use crate::crypto::rsa::CmkKey;
use crate::crypto::{GenerationKeys, IdentityKeys, Secret32};
use crate::error::{Error, ErrorKind, Result};
use crate::vault::config::Config;
use crate::vault::head::{self, DescriptorEntry, EscrowEntry, GenerationEntry, Head, KeyOp};
use crate::vault::keyrecord::{self, KeyRecord};
use crate::vault::{anchor, kekdesc, Vault};

/// What to rotate.
#[derive(Default)]
pub struct RotateOptions {
    /// The new customer-managed key (required for, and only for, a customer-key vault); its
    /// version must be [`next_cmk_version`].
    pub new_cmk: Option<CmkKey>,
    /// Also start a new DEK generation with a new content identity on every disk.
    pub new_dek: bool,
    /// Rotate the auth key instead of the KEK.
    pub auth: bool,
    /// Rotate the infrastructure layer's key (alone, or after the KEK rotation `new_dek` or
    /// `new_cmk` asks for).
    pub infrastructure: bool,
}

/// What a rotation did.
#[derive(Debug, Default)]
pub struct RotateReport {
    /// The primary KEK now (KEK rotation).
    pub kek: Option<KekId>,
    /// Key records rewrapped.
    pub records_rewrapped: usize,
    /// DEK generations started (`--new-dek`).
    pub new_dek_generations: usize,
    /// Whether an interrupted rotation was finished.
    pub resumed: bool,
    /// Platform KEK versions destroyed because nothing needs them any more.
    pub retired: Vec<u32>,
    /// The new auth key's version and fingerprint (`--auth`).
    pub auth: Option<(u32, String)>,
    /// What the infrastructure key rotation did (`--infrastructure`).
    pub infrastructure: Option<super::infra_rotation::InfraRotation>,
}

/// The version a new customer key of the vault's kind gets (one more than any the head lists).
pub fn next_cmk_version(vault: &Vault) -> u32 {
    let head = vault.cached_head();
    head.descriptors
        .iter()
        .filter(|d| d.id.kind == head.primary.kind)
        .map(|d| d.id.version)
        .max()
        .unwrap_or(0)
        + 1
}

/// Rotate the keys of the vault at `url` as `opts` says.
pub fn rotate(
    url: &str,
    keystore: &Keystore,
    access: &KeyAccess,
    opts: &RotateOptions,
) -> Result<RotateReport> {
    if opts.auth {
        if opts.new_cmk.is_some() || opts.new_dek {
            return Err(Error::usage(
                "rotate the auth key on its own: --auth does not combine with --new-cmk or --new-dek",
            ));
        }
        if opts.infrastructure {
            return Err(Error::usage(
                "rotate the auth key on its own: --auth does not combine with --infrastructure",
            ));
        }
        return rotate_auth(url, keystore, access);
    }
    if !opts.infrastructure {
        return rotate_kek(url, keystore, access, opts);
    }
    // The KEK first: its checks (a customer key's new key given, and so on) fail before the
    // long re-encryption starts.
    let mut report = if opts.new_dek || opts.new_cmk.is_some() {
        rotate_kek(url, keystore, access, opts)?
    } else {
        RotateReport::default()
    };
    report.infrastructure = Some(super::infra_rotation::rotate(url, keystore, access)?);
    Ok(report)
}

fn rotate_kek(
    url: &str,
    keystore: &Keystore,
    access: &KeyAccess,
    opts: &RotateOptions,
) -> Result<RotateReport> {
    let vault = Vault::open_with(url, keystore, access)?;
    check_before_writing(&vault, opts)?;
    let guard = super::begin(&vault, KeyOp::Rotate)?;
    let head = vault.head()?;
    let vault_id = vault.config().vault_id;
    let mut report = RotateReport::default();
    // The new primary KEK, stored before anything is wrapped by it.
    let target = match (head.primary.kind, &opts.new_cmk) {
        (KekKind::Platform, Some(_)) => return Err(Error::usage(NO_CMK_FOR_PLATFORM)),
        (KekKind::Platform, None) => {
            let (version, resumed) =
                new_platform_version(keystore, &vault_id, head.primary.version)?;
            report.resumed = resumed;
            KekId {
                kind: KekKind::Platform,
                version,
            }
        }
        (_, None) => return Err(Error::usage(NEW_CMK_NEEDED)),
        (kind, Some(key)) => {
            if key.id().kind != kind {
                return Err(Error::usage(format!(
                    "the new key is {} but this vault's keys are {kind}",
                    key.id().kind
                )));
            }
            report.resumed = store_descriptor(&vault, key)?;
            key.id()
        }
    };
    let mut target_head = head.clone();
    target_head.primary = target;
    if let Some(key) = &opts.new_cmk {
        let bytes = kekdesc::encode(key);
        target_head.descriptors.push(DescriptorEntry {
            id: key.id(),
            digest: head::digest(&bytes),
        });
    }
    let platform = keystore.load(&vault_id)?.kek;
    let target_ring = crate::vault::keyring_for(
        &target_head,
        platform,
        crate::vault::load_descriptors(&**vault.store(), &target_head)?,
        access,
    )?;
    let target_wraps = target_head.wrapping_ids();
    let descriptors = target_head.descriptors.clone();
    let (new_head, switched) =
        switch_records(&vault, vault.keyring(), &target_ring, opts.new_dek, |h| {
            h.primary = target;
            h.descriptors = kept_descriptors(&descriptors, target);
            Ok(())
        })?;
    report.records_rewrapped = switched.records_rewrapped;
    report.new_dek_generations = switched.new_generations;
    report.kek = Some(target);
    switched.delete_replaced(&vault)?;
    for d in &head.descriptors {
        if !new_head.descriptors.iter().any(|n| n.id == d.id) {
            vault.store().delete(&kekdesc::object_key(d.id))?;
        }
    }
    if target.kind == KekKind::Platform {
        report.retired = retire_platform_versions(keystore, &vault_id, target.version)?;
    }
    verify_wrapped(url, keystore, access, &target_wraps)?;
    guard.finished();
    Ok(report)
}

/// What [`switch_records`] did, and the objects the head no longer lists.
pub(crate) struct Switched {
    /// Records rewrapped.
    pub records_rewrapped: usize,
    /// DEK generations started.
    pub new_generations: usize,
    replaced_records: Vec<([u8; 16], u32, u32)>,
    replaced_escrows: BTreeMap<[u8; 16], BTreeMap<[u8; 32], EscrowEntry>>,
}

impl Switched {
    /// Delete the record revisions and escrow records the head stopped listing.
    pub(crate) fn delete_replaced(&self, vault: &Vault) -> Result<()> {
        for (disk_id, g, rev) in &self.replaced_records {
            vault
                .store()
                .delete(&keyrecord::object_key(disk_id, *g, *rev))?;
        }
        for (disk_id, old) in &self.replaced_escrows {
            for (id, e) in old {
                vault
                    .store()
                    .delete(&crate::vault::escrow::object_key(disk_id, id, e.rev))?;
            }
        }
        Ok(())
    }
}

/// Rewrap every key record the head lists: unwrap with `from`, wrap with `to`, write as the
/// next revision; with `new_dek`, also start a new DEK generation (and content identity) on
/// every disk, wrapped by `to`. Then one head swap lists the new revisions, applies `finish`
/// and clears the key-operation record. Records (or generations) a backup added meanwhile make
/// the swap fail and are rewrapped before the next try, so none is left out.
pub(crate) fn switch_records(
    vault: &Vault,
    from: &Keyring,
    to: &Keyring,
    new_dek: bool,
    mut finish: impl FnMut(&mut Head) -> Result<()>,
) -> Result<(Head, Switched)> {
    let mut done: HashMap<([u8; 16], u32), (u32, GenerationEntry)> = HashMap::new();
    let mut fresh = FreshGenerations::default();
    let mut rewrapped = 0;
    let new_head = loop {
        let h = vault.head()?;
        // A generation number another job took meanwhile: that disk's new generation is
        // written again with the next number.
        fresh.started.retain(|id, g| {
            h.disks
                .get(id)
                .is_some_and(|d| d.current_generation + 1 == g.generation)
        });
        for (disk_id, entry) in &h.disks {
            for (&g, ge) in &entry.generations {
                if done
                    .get(&(*disk_id, g))
                    .is_some_and(|(from, _)| *from == ge.rev)
                {
                    continue;
                }
                let (_, mut rec) = vault.key_record(disk_id, g, ge)?;
                let dek = rec.unwrap(from)?;
                rec.rewrap(&dek, to)?;
                let next = write_revision(vault, disk_id, g, ge.rev + 1, &rec)?;
                done.insert((*disk_id, g), (ge.rev, next));
                rewrapped += 1;
            }
            if new_dek && !fresh.started.contains_key(disk_id) {
                fresh.start(vault, &h, *disk_id, from, to)?;
            }
        }
        let mut pending = false;
        let attempt = vault.update_head(|h| {
            pending = false;
            for (disk_id, entry) in h.disks.iter_mut() {
                for (g, ge) in entry.generations.iter_mut() {
                    match done.get(&(*disk_id, *g)) {
                        Some((from, next)) if *from == ge.rev => *ge = *next,
                        _ => pending = true,
                    }
                }
                match fresh.started.get(disk_id) {
                    Some(gen) if entry.current_generation + 1 == gen.generation => {
                        entry.generations.insert(gen.generation, gen.entry);
                        entry.current_generation = gen.generation;
                        entry.identity_generation = gen.generation;
                        entry.escrows = gen.escrows.clone();
                    }
                    None if !new_dek => {}
                    _ => pending = true,
                }
            }
            if pending {
                return Err(Error::new(ErrorKind::Conflict, "records added meanwhile"));
            }
            finish(h)?;
            h.key_operation = None;
            Ok(())
        });
        match attempt {
            Ok((h, ())) => break h,
            // A record or generation appeared (or a generation number was taken) meanwhile:
            // go round again.
            Err(e) if e.kind() == ErrorKind::Conflict && pending => {}
            Err(e) => return Err(e),
        }
    };
    let replaced_records = done
        .iter()
        .map(|((disk_id, g), (from, _))| (*disk_id, *g, *from))
        .collect();
    Ok((
        new_head,
        Switched {
            records_rewrapped: rewrapped,
            new_generations: fresh.started.len(),
            replaced_records,
            replaced_escrows: fresh.replaced_escrows,
        },
    ))
}

/// The platform KEK version to rotate to: one a killed rotation stored and never finished
/// (newer than the head's current), or a fresh one added now.
fn new_platform_version(
    keystore: &Keystore,
    vault_id: &[u8; 16],
    current: u32,
) -> Result<(u32, bool)> {
    keystore.update(vault_id, |keys| {
        let newest = keys
            .kek
            .versions()
            .iter()
            .map(|v| v.version)
            .max()
            .unwrap_or(0);
        if newest > current {
            return Ok((newest, true));
        }
        let version = keys.next_version(KeyClass::Kek);
        let mut versions =
            std::mem::replace(&mut keys.kek, PlatformKek::new(Vec::new())).into_versions();
        versions.push(PlatformKeyVersion {
            version,
            state: KekState::Enabled,
            created: crate::util::now_unix(),
            key: Secret32::random()?,
        });
        keys.kek = PlatformKek::new(versions);
        Ok((version, false))
    })
}

/// Store the new customer key's descriptor (create-only); `true` if a killed rotation had
/// stored the same key already.
fn store_descriptor(vault: &Vault, key: &CmkKey) -> Result<bool> {
    let name = kekdesc::object_key(key.id());
    let bytes = kekdesc::encode(key);
    match vault.store().put_new(&name, &bytes) {
        Ok(()) => Ok(false),
        Err(e) if e.kind() == ErrorKind::AlreadyExists => {
            if vault.store().get(&name)? == bytes {
                Ok(true)
            } else {
                // Not listed by the head (rotation never finished), so never trusted: replace.
                vault.store().put(&name, &bytes)?;
                Ok(false)
            }
        }
        Err(e) => Err(e),
    }
}

/// Write revision `rev` of a record (a killed rotation may have left one: it was never listed,
/// so it is replaced).
fn write_revision(
    vault: &Vault,
    disk_id: &[u8; 16],
    g: u32,
    rev: u32,
    rec: &KeyRecord,
) -> Result<GenerationEntry> {
    let bytes = rec.encode();
    vault
        .store()
        .put(&keyrecord::object_key(disk_id, g, rev), &bytes)?;
    let seals = vault
        .cached_head()
        .disk(disk_id)?
        .generations
        .get(&g)
        .map_or(0, |e| e.seals);
    Ok(GenerationEntry {
        rev,
        digest: head::digest(&bytes),
        seals,
    })
}

/// New DEK generations (`--new-dek`), each with a new content identity and the disk's escrow
/// records re-sealed under it.
#[derive(Default)]
struct FreshGenerations {
    started: BTreeMap<[u8; 16], Fresh>,
    /// Escrow entries the new ones replace, per disk (deleted once the head switched).
    replaced_escrows: BTreeMap<[u8; 16], BTreeMap<[u8; 32], EscrowEntry>>,
}

struct Fresh {
    generation: u32,
    entry: GenerationEntry,
    escrows: BTreeMap<[u8; 32], EscrowEntry>,
}

impl FreshGenerations {
    fn start(
        &mut self,
        vault: &Vault,
        h: &Head,
        disk_id: [u8; 16],
        from: &Keyring,
        ring: &Keyring,
    ) -> Result<()> {
        let disk = vault.load_disk_with(h, disk_id, from)?;
        let generation = h.disk(&disk_id)?.current_generation + 1;
        let (entry, dek) = vault.write_generation(disk_id, generation, &disk.name, ring)?;
        let keys = GenerationKeys::derive(&dek);
        let identity = IdentityKeys::derive(&dek);
        let escrows = vault.reseal_escrows(&disk, generation, &keys, &identity)?;
        let entry = GenerationEntry {
            seals: entry.seals + escrows.len() as u64,
            ..entry
        };
        self.replaced_escrows
            .insert(disk_id, h.disk(&disk_id)?.escrows.clone());
        self.started.insert(
            disk_id,
            Fresh {
                generation,
                entry,
                escrows,
            },
        );
        Ok(())
    }
}

/// Destroy every platform KEK version but `current`: after a finished rotation no record is
/// wrapped by them. Returns the versions destroyed.
fn retire_platform_versions(
    keystore: &Keystore,
    vault_id: &[u8; 16],
    current: u32,
) -> Result<Vec<u32>> {
    keystore.update(vault_id, |keys| {
        let versions =
            std::mem::replace(&mut keys.kek, PlatformKek::new(Vec::new())).into_versions();
        let (keep, retire): (Vec<_>, Vec<_>) =
            versions.into_iter().partition(|v| v.version == current);
        let retired: Vec<u32> = retire.iter().map(|v| v.version).collect();
        for v in &retired {
            keys.destroyed.insert((KeyClass::Kek, *v));
        }
        keys.kek = PlatformKek::new(keep);
        Ok(retired)
    })
}

/// After a rotation: every record the head lists must be wrapped by exactly `wraps`.
fn verify_wrapped(
    url: &str,
    keystore: &Keystore,
    access: &KeyAccess,
    wraps: &[KekId],
) -> Result<()> {
    let vault = Vault::open_with(url, keystore, access)?;
    let head = vault.head()?;
    for (disk_id, entry) in &head.disks {
        for (&g, ge) in &entry.generations {
            let (key, rec) = vault.key_record(disk_id, g, ge)?;
            if !rec.is_wrapped_by(wraps) {
                return Err(Error::new(
                    ErrorKind::Key,
                    format!(
                        "{key} is not wrapped by {} after the rotation: run `blockvault key rotate` again",
                        wraps.iter().map(|k| k.to_string()).collect::<Vec<_>>().join(", ")
                    ),
                ));
            }
        }
    }
    Ok(())
}

fn rotate_auth(url: &str, keystore: &Keystore, access: &KeyAccess) -> Result<RotateReport> {
    let vault = Vault::open_with(url, keystore, access)?;
    let guard = super::begin(&vault, KeyOp::Rotate)?;
    let vault_id = vault.config().vault_id;
    let current = vault.head()?.auth_version;
    let version = keystore.update(&vault_id, |keys| {
        let newest = keys.newest_auth().version;
        if newest > current {
            // A killed auth rotation stored it: finish with that one.
            return Ok(newest);
        }
        let version = keys.next_version(KeyClass::Auth);
        keys.auth.push(Versioned {
            version,
            created: crate::util::now_unix(),
            key: Secret32::random()?,
        });
        Ok(version)
    })?;
    // Reopen with the keystore that now holds both versions.
    let vault = Vault::open_with(url, keystore, access)?;
    let auth = vault.keys().auth(version)?;
    let fingerprint = anchor::fingerprint(auth);
    let head = vault.head()?;
    let anchor_digest = match head.recovery_anchor {
        None => None,
        Some(_) => {
            let recovery = vault
                .kek_descriptors()?
                .into_iter()
                .filter(|k| k.id().kind == KekKind::Recovery)
                .max_by_key(|k| k.id().version)
                .ok_or_else(|| {
                    Error::integrity("the vault head lists a recovery anchor but no recovery key")
                })?;
            let bytes = anchor::encode(&vault_id, version, auth, &recovery)?;
            vault.raw_store().put(anchor::KEY, &bytes)?;
            Some(head::digest(&bytes))
        }
    };
    let config = Config {
        auth_version: version,
        ..vault.config().clone()
    };
    vault
        .raw_store()
        .put(crate::vault::config::KEY, &config.encode(auth))?;
    vault.update_head(|h| {
        h.auth_version = version;
        h.recovery_anchor = anchor_digest;
        h.key_operation = None;
        Ok(())
    })?;
    keystore.update(&vault_id, |keys| {
        let old: Vec<u32> = keys
            .auth
            .iter()
            .map(|a| a.version)
            .filter(|v| *v != version)
            .collect();
        keys.auth.retain(|a| a.version == version);
        for v in old {
            keys.destroyed.insert((KeyClass::Auth, v));
        }
        Ok(())
    })?;
    guard.finished();
    Ok(RotateReport {
        auth: Some((version, fingerprint)),
        ..RotateReport::default()
    })
}

const NO_CMK_FOR_PLATFORM: &str =
    "this vault uses the platform key: a customer-managed key can only be chosen at init";
const NEW_CMK_NEEDED: &str = "this vault uses a customer-managed key: give the new one with --new-cmk (the current private key must be reachable too)";

/// Refuse a KEK rotation that cannot succeed before anything is written (not even the head's
/// key-operation record or the new key): a new customer key for a platform vault or none for a
/// customer-key vault, or a current KEK that cannot unwrap (revoked, or the private key given
/// is not the vault's). The same checks run again under the lock.
fn check_before_writing(vault: &Vault, opts: &RotateOptions) -> Result<()> {
    let kind = vault.cached_head().primary.kind;
    if (kind == KekKind::Platform) != opts.new_cmk.is_none() {
        return Err(Error::usage(if kind == KekKind::Platform {
            NO_CMK_FOR_PLATFORM
        } else {
            NEW_CMK_NEEDED
        }));
    }
    vault.check_keys()
}

/// The descriptors a head keeps once `primary` is the vault's KEK: the recovery keys' and
/// `primary`'s own; any other customer key it listed is dropped (rotation, recovery and
/// take-over share this rule).
pub(super) fn kept_descriptors(
    descriptors: &[DescriptorEntry],
    primary: KekId,
) -> Vec<DescriptorEntry> {
    descriptors
        .iter()
        .filter(|d| d.id.kind == KekKind::Recovery || d.id == primary)
        .copied()
        .collect()
}
