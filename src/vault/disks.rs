//! Disks of a vault: their keys, found through the vault head.
//!
//! A disk is an entry of the head (DEK generations with their key records' revisions and
//! digests, the current and identity generations); its name is sealed in its key records, so
//! finding a disk by name unwraps every disk's keys.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use super::frame::Binding;
use super::head::{self, DiskEntry, GenerationEntry, Head};
use super::heads::Swap;
use super::keyrecord::{self, KeyRecord};
use super::Vault;
use crate::crypto::secret::random_bytes;
use crate::crypto::{GenerationKeys, IdentityKeys, Secret32};
use crate::error::{Error, ErrorKind, Result};

/// A disk of the vault with its unwrapped keys.
pub struct Disk {
    /// Random id.
    pub id: [u8; 16],
    /// Name given at its first backup.
    pub name: String,
    /// Vault and disk ids for AAD.
    pub binding: Binding,
    /// Content-identity keys new snapshots use (those of the identity generation).
    pub identity: Arc<IdentityKeys>,
    /// The DEK generation [`Disk::identity`] is derived from.
    pub identity_generation: u32,
    identities: BTreeMap<u32, Arc<IdentityKeys>>,
    generations: BTreeMap<u32, Arc<GenerationKeys>>,
    current: u32,
}

impl Disk {
    /// Keys of a DEK generation.
    pub fn generation(&self, generation: u32) -> Result<Arc<GenerationKeys>> {
        self.generations.get(&generation).cloned().ok_or_else(|| {
            Error::new(
                ErrorKind::Key,
                format!(
                    "disk {}: no key record for DEK generation {generation}",
                    self.name
                ),
            )
        })
    }

    /// The DEK generation new data is sealed under (the head's, not merely the newest).
    pub fn current_generation(&self) -> u32 {
        self.current
    }

    /// The content-identity keys derived from generation `generation` (what a snapshot of
    /// that identity generation was made with).
    pub fn identity_of(&self, generation: u32) -> Result<Arc<IdentityKeys>> {
        self.identities.get(&generation).cloned().ok_or_else(|| {
            Error::new(
                ErrorKind::Key,
                format!(
                    "disk {}: no key record for identity generation {generation}",
                    self.name
                ),
            )
        })
    }

    /// The content-identity keys snapshot `m` was made with.
    pub fn identity_for(&self, m: &super::manifest::Manifest) -> Result<Arc<IdentityKeys>> {
        self.identity_of(m.info.identity_generation)
    }

    /// Hex id.
    pub fn id_hex(&self) -> String {
        hex::encode(self.id)
    }
}

/// One key record as the head lists it, for `key show`, rotation and tests.
pub struct StoredRecord {
    /// Its object key.
    pub key: String,
    /// The decoded record.
    pub record: KeyRecord,
}

/// One warning per disk whose key records could not be read, when the others go on.
fn warn_unreadable(unreadable: &[([u8; 16], Error)]) {
    for (id, e) in unreadable {
        tracing::warn!(disk = %hex::encode(id), error = %e, "cannot read a disk's key records");
    }
}

/// Disk names are 1 to 200 bytes of printable text.
fn check_name(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > 200 || name.chars().any(char::is_control) {
        return Err(Error::usage(format!(
            "disk name {name:?} must be 1 to 200 bytes of printable text"
        )));
    }
    Ok(())
}

impl Vault {
    fn binding(&self, disk_id: [u8; 16]) -> Binding {
        Binding {
            vault_id: self.config.vault_id,
            disk_id,
        }
    }

    /// Ids of every disk the head lists.
    pub fn disk_ids(&self) -> Result<Vec<[u8; 16]>> {
        Ok(self.cached_head().disks.keys().copied().collect())
    }

    /// The key record of generation `g` of disk `disk_id` as `head` binds it, decoded.
    pub(crate) fn key_record(
        &self,
        disk_id: &[u8; 16],
        g: u32,
        entry: &GenerationEntry,
    ) -> Result<(String, KeyRecord)> {
        let key = keyrecord::object_key(disk_id, g, entry.rev);
        let bytes = self.get_bound(&key, &entry.digest)?;
        let rec = KeyRecord::decode(&bytes, &key, &self.config.vault_id, disk_id)?;
        if rec.generation != g {
            return Err(Error::integrity(format!(
                "{key}: holds DEK generation {}",
                rec.generation
            )));
        }
        Ok((key, rec))
    }

    /// Every key record the current head lists, checked against its digest but not unwrapped
    /// (so it works with a revoked KEK).
    pub fn key_records(&self) -> Result<Vec<StoredRecord>> {
        let head = self.cached_head();
        let mut out = Vec::new();
        for (disk_id, entry) in &head.disks {
            for (&g, ge) in &entry.generations {
                let (key, record) = self.key_record(disk_id, g, ge)?;
                out.push(StoredRecord { key, record });
            }
        }
        Ok(out)
    }

    /// Load a disk's key records as the current head lists them and unwrap every DEK
    /// generation.
    pub fn load_disk(&self, disk_id: [u8; 16]) -> Result<Disk> {
        self.load_disk_in(&self.cached_head(), disk_id)
    }

    /// [`Vault::load_disk`] against `head`.
    pub(crate) fn load_disk_in(&self, head: &Head, disk_id: [u8; 16]) -> Result<Disk> {
        self.load_disk_with(head, disk_id, &self.keyring)
    }

    /// [`Vault::load_disk`] against `head`, unwrapping with `keyring` (recovery unwraps
    /// through the recovery key alone).
    pub(crate) fn load_disk_with(
        &self,
        head: &Head,
        disk_id: [u8; 16],
        keyring: &crate::crypto::keyring::Keyring,
    ) -> Result<Disk> {
        let entry = head.disk(&disk_id)?;
        let mut generations = BTreeMap::new();
        let mut identities = BTreeMap::new();
        let mut name = None;
        for (&g, ge) in &entry.generations {
            let (_, rec) = self.key_record(&disk_id, g, ge)?;
            let dek = rec.unwrap(keyring)?;
            let keys = GenerationKeys::derive(&dek);
            if name.is_none() {
                name = Some(rec.name(&keys)?);
            }
            identities.insert(g, Arc::new(IdentityKeys::derive(&dek)));
            generations.insert(g, Arc::new(keys));
        }
        let identity = identities
            .get(&entry.identity_generation)
            .cloned()
            .expect("the head's identity generation is among its generations (decode checks)");
        Ok(Disk {
            id: disk_id,
            name: name.expect("a disk has at least one generation (decode checks)"),
            binding: self.binding(disk_id),
            identity,
            identity_generation: entry.identity_generation,
            identities,
            generations,
            current: entry.current_generation,
        })
    }

    /// Every readable disk, keys unwrapped. Disks whose key records cannot be read are
    /// skipped with a warning (`verify` names them); if none can be read, the error is returned
    /// (a revoked or missing KEK must not look like an empty vault), and nothing is warned:
    /// the error says it once.
    pub fn disks(&self) -> Result<Vec<Disk>> {
        let mut disks = Vec::new();
        let mut unreadable = Vec::new();
        for id in self.disk_ids()? {
            match self.load_disk(id) {
                Ok(d) => disks.push(d),
                Err(e) => unreadable.push((id, e)),
            }
        }
        if disks.is_empty() && !unreadable.is_empty() {
            return Err(unreadable.swap_remove(0).1);
        }
        warn_unreadable(&unreadable);
        Ok(disks)
    }

    /// The disk called `name`, if any. A disk whose key records cannot be read does not hide
    /// the others; but if `name` is not among the readable ones, the failure is returned rather
    /// than "no such disk" (the unreadable one may be it, and a backup must not then register
    /// a second disk of that name).
    pub fn find_disk(&self, name: &str) -> Result<Option<Disk>> {
        let mut unreadable = Vec::new();
        for id in self.disk_ids()? {
            match self.load_disk(id) {
                Ok(d) if d.name == name => {
                    warn_unreadable(&unreadable);
                    return Ok(Some(d));
                }
                Ok(_) => {}
                Err(e) => unreadable.push((id, e)),
            }
        }
        match unreadable.into_iter().next() {
            None => Ok(None),
            Some((_, e)) => Err(e.within(format!(
                "disk {name} is not among the readable disks, and another disk could not be read"
            ))),
        }
    }

    /// Write a new key record (revision 1) of generation `generation` of `disk_id`, wrapped by
    /// the KEKs of `keyring`; returns its head entry and the DEK.
    pub(crate) fn write_generation(
        &self,
        disk_id: [u8; 16],
        generation: u32,
        name: &str,
        keyring: &crate::crypto::keyring::Keyring,
    ) -> Result<(GenerationEntry, Secret32)> {
        let dek = Secret32::random()?;
        let rec = KeyRecord::create(
            self.config.vault_id,
            disk_id,
            generation,
            &dek,
            name,
            keyring,
        )?;
        let (rev, bytes) = super::revisions::put_at_free_revision(&*self.store, 1, |rev| {
            Ok((
                keyrecord::object_key(&disk_id, generation, rev),
                rec.encode(),
            ))
        })?;
        let entry = GenerationEntry {
            rev,
            digest: head::digest(&bytes),
            // The disk name sealed under the new generation's metadata key.
            seals: 1,
        };
        Ok((entry, dek))
    }

    /// The disk called `name`, registered first if the head (read now) lists none: fresh DEK,
    /// key record generation 0, listed in the head by compare-and-swap. Returns the disk and
    /// whether this call registered it. Names are 1 to 200 bytes of printable text.
    ///
    /// No lock is taken, so any number of hosts register disks at once: a lost swap reads the
    /// head again and re-applies, with jittered backoff, up to 64 times. If the head then lists a disk
    /// of the same name (another process registered it meanwhile), that disk is used and this
    /// call's key record is deleted: it lies under a disk id no head lists, so nothing would
    /// ever read it anyway (docs/FORMAT.md §1.2, "Registering a disk").
    pub fn register_disk(&self, name: &str) -> Result<(Disk, bool)> {
        check_name(name)?;
        self.head()?;
        if let Some(disk) = self.find_disk(name)? {
            return Ok((disk, false));
        }
        // Disks whose names were read and differ from `name`: each is loaded once, however
        // many races are lost.
        let mut others: BTreeSet<[u8; 16]> = self.cached_head().disks.keys().copied().collect();
        let disk_id = random_bytes::<16>()?;
        let (entry, _) = self.write_generation(disk_id, 0, name, &self.keyring)?;
        let wraps = self.keyring.wrapping_ids()?;
        let (head, listed) = self
            .update_head_unless(|h| {
                // A swap of ours that landed although its answer was lost.
                if h.disks.contains_key(&disk_id) {
                    return Ok(Swap::Keep(disk_id));
                }
                let unread: Vec<[u8; 16]> = h
                    .disks
                    .keys()
                    .filter(|id| !others.contains(*id))
                    .copied()
                    .collect();
                for id in unread {
                    if self.load_disk_in(h, id)?.name == name {
                        return Ok(Swap::Keep(id));
                    }
                    others.insert(id);
                }
                self.check_wrapping(h, &wraps)?;
                let mut d = DiskEntry::default();
                d.generations.insert(0, entry);
                h.disks.insert(disk_id, d);
                Ok(Swap::Write(disk_id))
            })
            .map_err(|e| e.within(format!("registering disk {name}")))?;
        if listed != disk_id {
            // The head that named the other disk did not list ours; nothing is swapped after
            // it was read, and every swap tried before was conditional on an older head's tag,
            // so none can land now.
            let key = keyrecord::object_key(&disk_id, 0, entry.rev);
            tracing::debug!(disk = name, other = %hex::encode(listed), "registered meanwhile by another process: using that disk");
            if let Err(e) = self.store.delete(&key) {
                tracing::warn!(object = %key, error = %e, "cannot delete the key record of a registration that lost a race (no head lists it: harmless)");
            }
        }
        Ok((self.load_disk_in(&head, listed)?, listed == disk_id))
    }

    /// Refuse to list a record wrapped by `wraps` in head `h` unless those are the KEKs the
    /// head names now: a key rotation that finished after this process opened the vault would
    /// otherwise miss the record.
    pub(crate) fn check_wrapping(&self, h: &Head, wraps: &[crate::crypto::KekId]) -> Result<()> {
        if h.wrapping_ids() != wraps {
            return Err(Error::new(
                ErrorKind::Conflict,
                format!(
                    "the vault's key-encryption keys changed since this command started (now {}): run it again",
                    h.wrapping_ids().iter().map(|k| k.to_string()).collect::<Vec<_>>().join(", ")
                ),
            ));
        }
        Ok(())
    }
}
