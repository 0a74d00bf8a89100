//! `upgrade`: bring a vault of format version 1 to version 2, in place, with its keys.
//!
//! Version 1 authenticated its key records and descriptors each with a MAC under the keystore's
//! one auth key and had no head. The upgrade checks every version 1 object with those MACs (and
//! decrypts every manifest and escrow record) before it writes anything, then writes the
//! version 2 objects beside them (new names), builds the head that binds them all, and only then
//! switches the config to version 2:
//! ```text
//!  every v1 object verified ─▶ keystore file → format 3 ─▶ v2 records, escrow records,
//!  recovery anchor ─▶ head ─▶ config v2 (the switch) ─▶ descriptors without their MAC
//!  ─▶ v1 leftovers deleted
//! ```
//! Killed before the switch, the vault is still version 1 (its version 1 objects are untouched
//! and the new ones are trusted by nothing) and the same command starts again; killed after it,
//! the same command finishes the descriptors and deletes the leftovers. Descriptors keep their
//! name in version 2, so they are rewritten only after the switch, each checked against the
//! digest the (authenticated) head lists: before it, a descriptor without a valid version 1 MAC
//! is never taken for one an earlier run rewrote (storage could plant its own key that way).
//! Nothing is adopted unchecked: an object that fails its version 1 check stops the upgrade,
//! naming it, with nothing written; a damaged manifest (already lost in version 1, where
//! listings skipped it) is left out and reported.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::crypto::kek::{KekId, KekKind};
use crate::crypto::keyring::KeyAccess;
use crate::crypto::keystore::Keystore;
use crate::crypto::GenerationKeys;
use crate::error::{Error, ErrorKind, Result};
use crate::vault::config::{self, Config};
use crate::vault::escrow::{self, Record};
use crate::vault::frame::Binding;
use crate::vault::head::{
    self, DescriptorEntry, DiskEntry, EscrowEntry, GenerationEntry, Head, SnapshotEntry,
};
use crate::vault::keyrecord::{self, KeyRecord};
use crate::vault::manifest::{Manifest, SnapshotId};
use crate::vault::store::{self, Store};
use crate::vault::{anchor, heads, infra_recovery, kekdesc, location, parse_id};

/// Version 1 counted seals short by up to the overlay factor (each overlay piece is a seal,
/// counted once per slot): its counts are scaled by this on the way into the head.
const V1_SEAL_FACTOR: u64 = 65;

/// What an upgrade did.
#[derive(Debug, Default)]
pub struct UpgradeReport {
    /// The vault was at version 2 already (only leftovers were removed, if any).
    pub already: bool,
    /// Disks carried over.
    pub disks: usize,
    /// Key records rewritten.
    pub records: usize,
    /// Snapshots listed in the new head.
    pub snapshots: usize,
    /// Escrow records re-sealed.
    pub escrows: usize,
    /// Manifests that failed to decrypt in version 1 and are left out, by object key.
    pub damaged_manifests: Vec<String>,
    /// Version 1 objects deleted after the switch.
    pub removed: usize,
    /// The auth fingerprint (keep it with the recovery key, if the vault has one).
    pub auth_fingerprint: String,
}

/// Upgrade the vault at `url`, whose keys are in `keystore`.
pub fn upgrade(url: &str, keystore: &Keystore, access: &KeyAccess) -> Result<UpgradeReport> {
    let raw: Arc<dyn Store> = store::open(url)?.into();
    let _lock = raw.lock("keys", std::time::Duration::from_secs(30))?;
    let config_bytes = raw.get(config::KEY).map_err(|e| match e.kind() {
        ErrorKind::NotFound => Error::new(ErrorKind::NotFound, format!("no vault at {url}")),
        _ => e,
    })?;
    let config = Config::decode_unverified(&config_bytes)?;
    let keys = keystore.load(&config.vault_id)?;
    let mut report = UpgradeReport {
        auth_fingerprint: anchor::fingerprint(&keys.newest_auth().key),
        ..Default::default()
    };
    let auth = keys.auth(config.auth_version)?;
    Config::verify(&config_bytes, auth).map_err(|e| e.within(format!("vault {url}")))?;
    if config.format_version >= config::FORMAT_VERSION {
        report.already = true;
        report.removed = finish(url, &*raw, &config, keystore, access)?;
        return Ok(report);
    }
    let vault_id = config.vault_id;
    let infra_version = u32::from(config.infrastructure != config::INFRA_NONE);
    let mut head = Head::new(
        vault_id,
        1,
        KekId {
            kind: config.kek_kind,
            version: 1,
        },
        infra_version,
    );
    let layered = crate::vault::layered(raw.clone(), &head, &keys)?;
    // What the upgrade writes through the layered store, once everything is checked.
    let mut writes: Vec<(String, Vec<u8>)> = Vec::new();

    // Descriptors: MAC checked; the head lists the digest of each without it (rewritten so
    // after the switch).
    let mac = kekdesc::mac_key(auth);
    let mut descriptors = Vec::new();
    for key in layered.list(kekdesc::PREFIX)? {
        let desc = kekdesc::decode_v1(&layered.get(&key)?, &key, &mac)?;
        head.descriptors.push(DescriptorEntry {
            id: desc.id(),
            digest: head::digest(&kekdesc::encode(&desc)),
        });
        descriptors.push(desc);
    }
    // The primary is the newest customer key (version 1 picked it that way), or platform v1…
    if config.kek_kind != KekKind::Platform {
        head.primary = head
            .descriptors
            .iter()
            .filter(|d| d.id.kind == config.kek_kind)
            .map(|d| d.id)
            .max_by_key(|id| id.version)
            .ok_or_else(|| {
                Error::integrity(
                    "the vault's keys are customer-managed but it holds no descriptor of that key",
                )
            })?;
        // Older customer keys stay listed: records an interrupted version 1 rotation left
        // under them still unwrap, and the next `key rotate` drops them.
    } else {
        head.primary.version = keys
            .kek
            .versions()
            .iter()
            .map(|v| v.version)
            .max()
            .unwrap_or(1);
        head.revoked = keys
            .kek
            .versions()
            .iter()
            .filter(|v| v.state == crate::crypto::kek::KekState::Revoked)
            .map(|v| v.version)
            .collect();
    }
    // … and the keys to unwrap with are what the vault would have used.
    let platform = keystore.load(&vault_id)?.kek;
    let keyring = crate::vault::keyring_for(
        &head,
        platform,
        descriptors
            .iter()
            .map(|d| crate::crypto::rsa::CmkKey::decode(&d.encode(), "descriptor"))
            .collect::<Result<_>>()?,
        access,
    )?;

    // Key records: MAC checked, every DEK unwrapped (the upgrade needs them, and proves the
    // keys work), rewritten as revision 1.
    let rmac = keyrecord::mac_key(auth);
    let mut deks: BTreeMap<[u8; 16], BTreeMap<u32, GenerationKeys>> = BTreeMap::new();
    for key in layered.list("keys")? {
        let mut parts = key.split('/').skip(1);
        let (Some(disk_hex), Some(name)) = (parts.next(), parts.next()) else {
            continue;
        };
        let Some(disk_id) = parse_id::<16>(disk_hex) else {
            continue;
        };
        if keyrecord::parse_name(name).is_some() {
            // A version 2 record a killed upgrade wrote: made again below from the v1 one.
            continue;
        }
        let rec = KeyRecord::decode_v1(&layered.get(&key)?, &key, &vault_id, &disk_id, &rmac)?;
        if key != keyrecord::object_key_v1(&disk_id, rec.generation) {
            return Err(Error::integrity(format!(
                "{key}: holds DEK generation {}",
                rec.generation
            )));
        }
        let dek = rec.unwrap(&keyring)?;
        let bytes = rec.encode();
        let entry = head.disks.entry(disk_id).or_default();
        entry.generations.insert(
            rec.generation,
            GenerationEntry {
                rev: 1,
                digest: head::digest(&bytes),
                seals: 0,
            },
        );
        writes.push((keyrecord::object_key(&disk_id, rec.generation, 1), bytes));
        deks.entry(disk_id)
            .or_default()
            .insert(rec.generation, GenerationKeys::derive(&dek));
        report.records += 1;
    }
    for (disk_id, entry) in head.disks.iter_mut() {
        if !entry.generations.contains_key(&0) {
            return Err(Error::integrity(format!(
                "disk {}: key record of DEK generation 0 is missing",
                hex::encode(disk_id)
            )));
        }
        entry.current_generation = *entry.generations.keys().next_back().expect("generation 0");
        let binding = Binding {
            vault_id,
            disk_id: *disk_id,
        };
        let gens = &deks[disk_id];
        carry_snapshots(&*layered, &binding, gens, entry, &mut report)?;
        report.escrows += carry_escrows(&*layered, &binding, gens, entry, &mut writes)?;
    }
    report.disks = head.disks.len();

    // The recovery anchor (from the recovery key's public half), and the record of the
    // infrastructure key for recovery as it is.
    let recovery_anchor = match descriptors
        .iter()
        .find(|d| d.id().kind == KekKind::Recovery)
    {
        Some(recovery) => {
            let bytes = anchor::encode(&vault_id, 1, auth, recovery)?;
            head.recovery_anchor = Some(head::digest(&bytes));
            Some(bytes)
        }
        None => None,
    };
    match raw.get(infra_recovery::KEY) {
        Ok(bytes) => head.infra_recovery = Some(head::digest(&bytes)),
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }

    // Everything checked: the keystore file in format 3, the new objects, the head, the switch.
    keystore.update(&vault_id, |_| Ok(()))?;
    for (key, bytes) in &writes {
        layered.put(key, bytes)?;
    }
    if let Some(bytes) = &recovery_anchor {
        raw.put(anchor::KEY, bytes)?;
    }
    raw.put(head::KEY, &head.encode(auth))?;
    let v2 = Config {
        format_version: config::FORMAT_VERSION,
        ..config
    };
    raw.put(config::KEY, &v2.encode(auth))?;
    report.removed = finish(url, &*raw, &v2, keystore, access)?;
    Ok(report)
}

/// After the switch: pin the URL, rewrite each descriptor the head lists without its version 1
/// MAC (when what is stored, less its last 32 bytes, is what the authenticated head lists),
/// then open the vault as every command does and delete the version 1 leftovers. Returns how
/// many objects were deleted.
fn finish(
    url: &str,
    raw: &dyn Store,
    config: &Config,
    keystore: &Keystore,
    access: &KeyAccess,
) -> Result<usize> {
    let location = location::canonical(url)?;
    crate::vault::pin(keystore, &location, &config.vault_id)?;
    let keys = keystore.load(&config.vault_id)?;
    let head = heads::read_head(raw, &config.vault_id, &keys, keystore, &location)?.head;
    let layered = crate::vault::layered(store::open(url)?.into(), &head, &keys)?;
    for d in &head.descriptors {
        let key = kekdesc::object_key(d.id);
        let stored = layered.get(&key)?;
        if head::digest(&stored) == d.digest {
            continue;
        }
        let Some(body) = stored.len().checked_sub(32).map(|n| &stored[..n]) else {
            continue;
        };
        if let Ok(desc) = kekdesc::decode(body, &key) {
            let bytes = kekdesc::encode(&desc);
            if head::digest(&bytes) == d.digest {
                layered.put(&key, &bytes)?;
            }
        }
        // Anything else is left for opening the vault to name (it fails its digest).
    }
    let vault = crate::vault::Vault::open_with(url, keystore, access)?;
    remove_v1_leftovers(&**vault.store())
}

/// List the disk's version 1 manifests in its head entry (sequence, digest), with the slot
/// size, next sequence and seal counts they imply.
fn carry_snapshots(
    store: &dyn Store,
    binding: &Binding,
    gens: &BTreeMap<u32, GenerationKeys>,
    entry: &mut DiskEntry,
    report: &mut UpgradeReport,
) -> Result<()> {
    let prefix = format!("snapshots/{}", hex::encode(binding.disk_id));
    let mut found: Vec<(Manifest, head::Digest)> = Vec::new();
    for key in store.list(&prefix)? {
        let Some(id) = key.rsplit('/').next().and_then(parse_id::<16>) else {
            continue;
        };
        let bytes = store.get(&key)?;
        let decoded = Manifest::peek(&bytes, binding, &key).and_then(|(found, g)| {
            if found != SnapshotId(id) {
                return Err(Error::integrity(format!(
                    "{key}: holds snapshot {}",
                    found.hex()
                )));
            }
            let keys = gens.get(&g).ok_or_else(|| {
                Error::integrity(format!(
                    "{key}: sealed under DEK generation {g}, which has no key record"
                ))
            })?;
            Manifest::decode(&bytes, binding, keys, &key)
        });
        match decoded {
            Ok(m) => found.push((m, head::digest(&bytes))),
            Err(e) if e.kind() == ErrorKind::Integrity => {
                tracing::warn!(manifest = %key, error = %e, "left out of the upgraded vault: it does not decrypt");
                report.damaged_manifests.push(key);
            }
            Err(e) => return Err(e),
        }
    }
    found.sort_by_key(|(m, _)| (m.sequence, m.created, m.id));
    for (m, digest) in &found {
        if entry
            .snapshots
            .last()
            .is_some_and(|s| s.sequence >= m.sequence)
        {
            return Err(Error::integrity(format!(
                "{}: two snapshots of disk {} share sequence {}; the upgrade cannot order them",
                m.id.object_key(&binding.disk_id),
                hex::encode(binding.disk_id),
                m.sequence
            )));
        }
        entry.snapshots.push(SnapshotEntry {
            id: m.id,
            sequence: m.sequence,
            digest: *digest,
        });
        if let Some(g) = entry.generations.get_mut(&m.generation) {
            g.seals = g
                .seals
                .max(m.seals_in_generation.saturating_mul(V1_SEAL_FACTOR));
        }
    }
    entry.slot_size = found.first().map_or(0, |(m, _)| m.slot_size);
    entry.next_sequence = found.last().map_or(0, |(m, _)| m.sequence + 1);
    report.snapshots += found.len();
    Ok(())
}

/// Re-seal the disk's version 1 escrow records (`escrow/<disk>/<name id>`) under their
/// version 2 names (`-<rev>`: the object key is in each record's AAD), adding each to `writes`.
/// Returns how many.
fn carry_escrows(
    store: &dyn Store,
    binding: &Binding,
    gens: &BTreeMap<u32, GenerationKeys>,
    entry: &mut DiskEntry,
    writes: &mut Vec<(String, Vec<u8>)>,
) -> Result<usize> {
    let prefix = format!("escrow/{}", hex::encode(binding.disk_id));
    let mut n = 0;
    for key in store.list(&prefix)? {
        let Some(id) = key.rsplit('/').next().and_then(parse_id::<32>) else {
            continue;
        };
        let rec = Record::decode(&store.get(&key)?, &key)?;
        let keys = gens.get(&rec.generation).ok_or_else(|| {
            Error::integrity(format!(
                "{key}: sealed under DEK generation {}, which has no key record",
                rec.generation
            ))
        })?;
        let e = rec.open(binding, keys, &key)?;
        let new_key = escrow::object_key(&binding.disk_id, &id, 1);
        let sealed = Record::seal(binding, keys, rec.generation, &new_key, &e.name, &e.secret)?;
        let bytes = sealed.encode();
        entry.escrows.insert(
            id,
            EscrowEntry {
                rev: 1,
                digest: head::digest(&bytes),
            },
        );
        writes.push((new_key, bytes));
        n += 1;
    }
    Ok(n)
}

/// Delete the version 1 key records and escrow records a finished upgrade left.
fn remove_v1_leftovers(store: &dyn Store) -> Result<usize> {
    let mut n = 0;
    for key in store.list("keys")?.into_iter().chain(store.list("escrow")?) {
        let last = key.rsplit('/').next().unwrap_or_default();
        let v1 =
            (key.starts_with("keys/") && last.len() == 8 && keyrecord::parse_name(last).is_none())
                || (key.starts_with("escrow/") && parse_id::<32>(last).is_some());
        if v1 {
            store.delete(&key)?;
            n += 1;
        }
    }
    Ok(n)
}
