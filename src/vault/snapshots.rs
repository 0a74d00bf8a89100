//! Snapshots: the head's inventory of committed manifests, and the two compare-and-swaps a
//! backup makes.
//!
//! ```text
//!  reserve (before sealing): sequence number, and the job's worst-case seals added to its DEK
//!          generation's count (a new generation first if that would pass the budget)
//!  write:   packs, then the manifest (put_new; invisible until committed)
//!  commit:  the snapshot listed with its sequence and manifest digest; the reservation settled
//!           to the seals really made
//! ```
//! A job that dies between the two leaves its reservation counted (the nonce budget errs on the
//! safe side) and objects no head lists (reported by `verify`).

use super::head::{self, Head, SnapshotEntry};
use super::manifest::{Manifest, SnapshotId};
use super::manifest_cache::ManifestCache;
use super::store::url::VaultUrl;
use super::{Disk, Vault};
use crate::error::{Error, ErrorKind, Result};

/// Seals one DEK generation may make before a new generation starts. Random 96-bit nonces
/// stay far inside NIST SP 800-38D's 2^32 limit: at 2^30 seals the chance of any nonce
/// collision is below 2^-35.
pub const GENERATION_SEAL_LIMIT: u64 = 1 << 30;

/// What [`Vault::reserve`] set aside for one backup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reservation {
    /// The DEK generation the job seals under.
    pub generation: u32,
    /// The snapshot's sequence number.
    pub sequence: u64,
    /// Seals reserved (the job's worst case).
    pub seals: u64,
}

impl Vault {
    /// The committed snapshots of a disk, by sequence, as the cached head lists them.
    pub fn snapshot_entries(&self, disk: &Disk) -> Result<Vec<SnapshotEntry>> {
        Ok(self.cached_head().disk(&disk.id)?.snapshots.clone())
    }

    /// Snapshot ids of a disk, oldest first.
    pub fn snapshot_ids(&self, disk: &Disk) -> Result<Vec<SnapshotId>> {
        Ok(self.snapshot_entries(disk)?.iter().map(|s| s.id).collect())
    }

    /// Read, authenticate and decrypt one committed manifest. A snapshot the head does not
    /// list is NotFound; one it lists whose manifest is missing, replaced or damaged is an
    /// Integrity error naming the object.
    pub fn load_manifest(&self, disk: &Disk, id: SnapshotId) -> Result<Manifest> {
        let entry = self
            .snapshot_entries(disk)?
            .into_iter()
            .find(|s| s.id == id)
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::NotFound,
                    format!("disk {} has no snapshot {}", disk.name, id.short()),
                )
            })?;
        self.load_entry(disk, &entry)
    }

    fn load_entry(&self, disk: &Disk, entry: &SnapshotEntry) -> Result<Manifest> {
        let (key, raw) = self.manifest_bytes(disk, entry)?;
        self.decode_entry(disk, entry, &key, &raw)
    }

    /// As [`Vault::load_entry`], through the manifest cache when there is one: the cached
    /// bytes are used only if their digest is the head's, and are then authenticated and
    /// decrypted as fetched ones are.
    fn load_entry_cached(
        &self,
        disk: &Disk,
        entry: &SnapshotEntry,
        cache: &ManifestCache,
    ) -> Result<Manifest> {
        let (key, raw) = match cache.get(&entry.digest) {
            Some(raw) => (entry.id.object_key(&disk.id), raw),
            None => {
                let (key, raw) = self.manifest_bytes(disk, entry)?;
                cache.put(&entry.digest, &raw);
                (key, raw)
            }
        };
        self.decode_entry(disk, entry, &key, &raw)
    }

    /// The manifest cache, for a vault on object storage (a local folder is read as fast as
    /// a cache would be).
    fn manifest_cache(&self) -> Option<ManifestCache> {
        matches!(
            VaultUrl::parse(&self.location),
            Ok(VaultUrl::ObjectStorage(_))
        )
        .then(|| ManifestCache::new(&self.keystore, &self.config.vault_id))
    }

    fn decode_entry(
        &self,
        disk: &Disk,
        entry: &SnapshotEntry,
        key: &str,
        raw: &[u8],
    ) -> Result<Manifest> {
        let (found, generation) = Manifest::peek(raw, &disk.binding, key)?;
        if found != entry.id {
            return Err(Error::integrity(format!(
                "{key}: holds snapshot {}",
                found.hex()
            )));
        }
        let m = Manifest::decode(raw, &disk.binding, &*disk.generation(generation)?, key)?;
        if m.sequence != entry.sequence {
            return Err(Error::integrity(format!(
                "{key}: has sequence {}, the vault head {}",
                m.sequence, entry.sequence
            )));
        }
        Ok(m)
    }

    /// The manifest object of `entry` and its bytes, checked against the head's digest: at
    /// its own key, or (a manifest `prune` rewrote when it repacked) at
    /// [`SnapshotId::rewritten_key`]. The rewritten key is tried only when the original is
    /// missing or holds other bytes, and a failure names the original key.
    pub(crate) fn manifest_bytes(
        &self,
        disk: &Disk,
        entry: &SnapshotEntry,
    ) -> Result<(String, Vec<u8>)> {
        let key = entry.id.object_key(&disk.id);
        match self.get_bound(&key, &entry.digest) {
            Ok(raw) => Ok((key, raw)),
            Err(e) if e.kind() == ErrorKind::Integrity => {
                let rewritten = entry.id.rewritten_key(&disk.id, &entry.digest);
                match self.store.get(&rewritten) {
                    Ok(raw) if head::digest(&raw) == entry.digest => Ok((rewritten, raw)),
                    Ok(_) => Err(e),
                    Err(r) if r.kind() == ErrorKind::NotFound => Err(e),
                    Err(r) => Err(r),
                }
            }
            Err(e) => Err(e),
        }
    }

    /// Every committed snapshot of a disk, oldest first. Any that is missing, replaced or
    /// damaged fails the whole listing, naming it: a listing (and `@latest`) that skipped it
    /// would silently stand an older snapshot in for a newer one. On object storage the
    /// manifests come through the local cache ([`super::manifest_cache`]); `verify` reads
    /// each from the store ([`Vault::load_manifest`]).
    pub fn snapshots(&self, disk: &Disk) -> Result<Vec<Manifest>> {
        let entries = self.snapshot_entries(disk)?;
        let Some(cache) = self.manifest_cache() else {
            return entries.iter().map(|e| self.load_entry(disk, e)).collect();
        };
        let all = entries
            .iter()
            .map(|e| self.load_entry_cached(disk, e, &cache))
            .collect();
        cache.trim();
        all
    }

    /// The newest committed snapshot of a disk, if any.
    pub fn latest_snapshot(&self, disk: &Disk) -> Result<Option<Manifest>> {
        match self.snapshot_entries(disk)?.last() {
            Some(e) => self.load_entry(disk, e).map(Some),
            None => Ok(None),
        }
    }

    /// A snapshot by `latest` or a unique id prefix. `latest` checks every snapshot of the
    /// disk (see [`Vault::snapshots`]).
    pub fn resolve_snapshot(&self, disk: &Disk, spec: &str) -> Result<Manifest> {
        if spec == "latest" {
            return self.snapshots(disk)?.pop().ok_or_else(|| {
                Error::new(
                    ErrorKind::NotFound,
                    format!("disk {} has no snapshots", disk.name),
                )
            });
        }
        let spec_lc = spec.to_ascii_lowercase();
        let matches: Vec<SnapshotEntry> = self
            .snapshot_entries(disk)?
            .into_iter()
            .filter(|e| e.id.hex().starts_with(&spec_lc))
            .collect();
        match matches.as_slice() {
            [one] => self.load_entry(disk, one),
            [] => Err(Error::new(
                ErrorKind::NotFound,
                format!("disk {} has no snapshot {spec}", disk.name),
            )),
            _ => Err(Error::usage(format!(
                "snapshot id {spec} is ambiguous for disk {}: give more digits",
                disk.name
            ))),
        }
    }

    /// Reserve a sequence number and `worst_case` seals for a backup of `disk`, starting a new
    /// DEK generation first if its nonce budget would be passed. Returns the disk (reloaded if
    /// its generation changed) and the reservation.
    pub fn reserve(&self, disk: Disk, worst_case: u64) -> Result<(Disk, Reservation)> {
        let wraps = self.keyring.wrapping_ids()?;
        let head = self.head()?;
        let entry = head.disk(&disk.id)?;
        let current = entry.current_generation;
        let spent = entry.generations[&current].seals;
        // A new generation's record is written before the swap that lists it; a lost race to
        // another job that started one too leaves this record unlisted (harmless).
        let fresh = if spent.saturating_add(worst_case) >= GENERATION_SEAL_LIMIT {
            tracing::info!(disk = %disk.name, generation = current + 1, "nonce budget of the DEK generation spent: starting a new DEK generation");
            Some(
                self.write_generation(disk.id, current + 1, &disk.name, &self.keyring)?
                    .0,
            )
        } else {
            None
        };
        let (head, reservation) = self.update_head(|h| {
            if fresh.is_some() {
                self.check_wrapping(h, &wraps)?;
            }
            let e = h.disk_mut(&disk.id)?;
            if let Some(entry) = fresh {
                if e.current_generation == current {
                    e.generations.insert(current + 1, entry);
                    e.current_generation = current + 1;
                }
            }
            let generation = e.current_generation;
            let g = e.generations.get_mut(&generation).expect("current is listed");
            if g.seals.saturating_add(worst_case) >= GENERATION_SEAL_LIMIT {
                return Err(Error::new(
                    ErrorKind::Conflict,
                    format!("disk {}: the nonce budget of DEK generation {generation} was spent by another backup meanwhile: run the backup again", disk.name),
                ));
            }
            g.seals += worst_case;
            let sequence = e.next_sequence;
            e.next_sequence += 1;
            Ok(Reservation {
                generation,
                sequence,
                seals: worst_case,
            })
        })?;
        let disk = if reservation.generation != disk.current_generation() {
            self.load_disk_in(&head, disk.id)?
        } else {
            disk
        };
        Ok((disk, reservation))
    }

    /// Commit a backup: write its manifest (never replacing an object) and list it in the
    /// head, settling the reservation to the seals really made since the generation's keys
    /// counted `seals_before` (the manifest's own included). The head swap is the commit point.
    pub fn commit_snapshot(
        &self,
        disk: &Disk,
        m: &Manifest,
        reservation: &Reservation,
        seals_before: u64,
    ) -> Result<Head> {
        if m.sequence != reservation.sequence || m.generation != reservation.generation {
            return Err(Error::usage(
                "the manifest does not carry the sequence and generation reserved for it",
            ));
        }
        let key = m.id.object_key(&disk.id);
        let keys = disk.generation(m.generation)?;
        let bytes = m.encode(&disk.binding, &keys)?;
        let seals = keys.seals() - seals_before;
        self.store.put_new(&key, &bytes)?;
        let digest = head::digest(&bytes);
        let (head, ()) = self.update_head(|h| {
            let e = h.disk_mut(&disk.id)?;
            if e.slot_size == 0 {
                e.slot_size = m.slot_size;
            } else if e.slot_size != m.slot_size {
                return Err(Error::integrity(format!(
                    "disk {}: snapshot of {}-byte slots, the disk's are {}",
                    disk.name, m.slot_size, e.slot_size
                )));
            }
            let g = e.generations.get_mut(&m.generation).ok_or_else(|| {
                Error::integrity(format!(
                    "disk {}: DEK generation {} left the vault head during the backup",
                    disk.name, m.generation
                ))
            })?;
            g.seals = g
                .seals
                .saturating_sub(reservation.seals)
                .saturating_add(seals);
            let at = e.snapshots.partition_point(|s| s.sequence < m.sequence);
            e.snapshots.insert(
                at,
                SnapshotEntry {
                    id: m.id,
                    sequence: m.sequence,
                    digest,
                },
            );
            Ok(())
        })?;
        Ok(head)
    }
}
