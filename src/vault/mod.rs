//! The vault: immutable, encrypted objects in a [`store::Store`].
//!
//! ```text
//! config                          format version, vault id, encryption settings (MAC'd)
//! keys/<disk id>/<generation>     a DEK generation of a disk, wrapped by the KEK(s)
//! packs/<2 hex>/<pack id>         sealed extent frames + sealed index (≈32 MiB each)
//! snapshots/<disk id>/<snap id>   sealed manifest: geometry, parent, slot table, stats
//! locks/<disk id>                 local advisory lock while a backup of that disk runs
//! locks/init                      local advisory lock while a vault is created
//! ```
//! Commit protocol: packs are written (atomically, durably) before the manifest that names
//! them; the manifest is written last. A crash leaves at worst unreferenced packs, never a
//! manifest pointing at missing data, so earlier snapshots are never affected.
//!
//! Locking: a backup holds `locks/<disk id>` for its disk; backups of different disks run
//! at once. Readers (restore, verify, snapshots) take no lock: objects are immutable.

pub mod codec;
pub mod config;
pub mod escrow;
pub mod frame;
pub mod info;
pub mod infra_recovery;
pub mod kekdesc;
pub mod keyrecord;
pub mod manifest;
pub mod pack;
pub mod rotation;
pub mod store;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use crate::crypto::kek::{KekKind, KekProvider, PlatformKek};
use crate::crypto::keyring::{KeyAccess, Keyring, Versions};
use crate::crypto::keystore::{Keystore, VaultKeys};
use crate::crypto::rsa::{CmkKey, PemKek, Pkcs11Kek};
use crate::crypto::secret::random_bytes;
use crate::crypto::{GenerationKeys, IdentityKeys, Secret32};
use crate::error::{Error, ErrorKind, Result};

use config::Config;
use frame::Binding;
use keyrecord::KeyRecord;
use manifest::{Manifest, SnapshotId};
use store::Store;

/// An open vault with its keys.
pub struct Vault {
    store: Arc<dyn Store>,
    config: Config,
    keyring: Keyring,
    /// Authenticates key records (from the keystore's auth key).
    record_mac: Secret32,
    /// Authenticates KEK descriptors (likewise).
    descriptor_mac: Secret32,
    keystore_file: PathBuf,
}

/// A disk of the vault with its unwrapped keys.
pub struct Disk {
    /// Random id.
    pub id: [u8; 16],
    /// Name given at its first backup.
    pub name: String,
    /// Vault and disk ids for AAD.
    pub binding: Binding,
    /// Content-identity keys (from DEK generation 0).
    pub identity: Arc<IdentityKeys>,
    generations: BTreeMap<u32, Arc<GenerationKeys>>,
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

    /// The newest DEK generation.
    pub fn current_generation(&self) -> u32 {
        *self
            .generations
            .keys()
            .next_back()
            .expect("a disk has at least generation 0")
    }

    /// Hex id.
    pub fn id_hex(&self) -> String {
        hex::encode(self.id)
    }
}

/// A snapshot's place in a listing.
#[derive(Debug, Clone)]
pub struct SnapshotEntry {
    /// The decoded manifest.
    pub manifest: Manifest,
}

impl Vault {
    /// Create a vault at `url` with a platform KEK in `keystore`. Fails if a vault exists there.
    pub fn init(url: &str, keystore: &Keystore) -> Result<Vault> {
        Vault::init_with(url, keystore, &InitOptions::default())
    }

    /// Create a vault with the encryption settings of `opts`, fixed for its lifetime.
    pub fn init_with(url: &str, keystore: &Keystore, opts: &InitOptions) -> Result<Vault> {
        let store: Arc<dyn Store> = store::open(url)?.into();
        // One init at a time: an init takes over what an interrupted one left (below), which
        // must not be the objects of another init still at work.
        let _lock = store.lock("init", std::time::Duration::from_secs(60))?;
        if store.size(config::KEY).is_ok() {
            return Err(Error::new(
                ErrorKind::AlreadyExists,
                format!("a vault already exists at {url}: its encryption settings were fixed when it was created and cannot be changed (create a new vault for other settings)"),
            ));
        }
        if opts.infrastructure && opts.cmk.is_none() {
            return Err(Error::usage(
                "infrastructure encryption can be chosen only together with a customer-managed key (--cmk)",
            ));
        }
        take_over_interrupted_init(&*store, url)?;
        let vault_id = random_bytes::<16>()?;
        let (keys, keystore_file) = keystore.create(&vault_id, opts.infrastructure)?;
        let layered_store = layered(store.clone(), opts.infrastructure, &keys)?;
        // Descriptors first, config last: a vault without its config is no vault, so a
        // crash here leaves nothing anyone would use, and the next init takes it over.
        let mac = kekdesc::mac_key(&keys.auth);
        for key in opts.cmk.iter().chain(&opts.recovery) {
            layered_store.put_new(&kekdesc::object_key(key.id()), &kekdesc::encode(key, &mac))?;
        }
        if let (Some(recovery), Some(infra)) = (&opts.recovery, &keys.infra) {
            infra_recovery::write(&*store, &vault_id, recovery, infra)?;
        }
        let config = Config {
            vault_id,
            created: crate::util::now_unix(),
            kek_kind: opts.cmk.as_ref().map_or(KekKind::Platform, |k| k.id().kind),
            infrastructure: if opts.infrastructure {
                config::INFRA_AES_XTS
            } else {
                config::INFRA_NONE
            },
        };
        store.put_new(config::KEY, &config.encode(&keys.auth))?;
        tracing::info!(vault = %url, keystore = %keystore_file.display(), "vault created");
        Vault::assemble(layered_store, config, keys, keystore_file, &opts.access)
    }

    /// The vault's keyring: the primary KEK from the keystore (platform) or the stored
    /// descriptors (customer key), and the recovery key if the vault has one.
    fn assemble(
        store: Arc<dyn Store>,
        config: Config,
        keys: VaultKeys,
        keystore_file: PathBuf,
        access: &KeyAccess,
    ) -> Result<Vault> {
        let descriptor_mac = kekdesc::mac_key(&keys.auth);
        let descriptors = load_descriptors(&*store, Some(&descriptor_mac))?;
        let keyring = keyring_for(config.kek_kind, keys.kek, descriptors, access)?;
        Ok(Vault {
            store,
            config,
            keyring,
            descriptor_mac,
            record_mac: keyrecord::mac_key(&keys.auth),
            keystore_file,
        })
    }

    /// Open the vault at `url`; its keys come from `keystore`.
    pub fn open(url: &str, keystore: &Keystore) -> Result<Vault> {
        Vault::open_with(url, keystore, &KeyAccess::default())
    }

    /// Open the vault at `url`, reaching customer keys' private halves through `access`.
    pub fn open_with(url: &str, keystore: &Keystore, access: &KeyAccess) -> Result<Vault> {
        let store: Arc<dyn Store> = store::open(url)?.into();
        let raw = store.get(config::KEY).map_err(|e| match e.kind() {
            ErrorKind::NotFound => Error::new(
                ErrorKind::NotFound,
                format!("no vault at {url}: check the location, or create a vault there with `blockvault init` (any key) or `blockvault backup --init` (a platform-managed key, at the first backup)"),
            ),
            _ => e,
        })?;
        let config =
            Config::decode_unverified(&raw).map_err(|e| e.within(format!("vault {url}")))?;
        let keys = keystore.load(&config.vault_id)?;
        Config::verify(&raw, &keys.auth).map_err(|e| e.within(format!("vault {url}")))?;
        let keystore_file = keystore.path_for(&config.vault_id);
        let store = layered(store, config.infrastructure != config::INFRA_NONE, &keys)?;
        Vault::assemble(store, config, keys, keystore_file, access)
    }

    /// Open, or create with a platform key when `url` holds no vault yet (`backup --init`).
    /// Returns whether it was created.
    pub fn open_or_init(url: &str, keystore: &Keystore) -> Result<(Vault, bool)> {
        Vault::open_or_init_with(url, keystore, &KeyAccess::default())
    }

    /// [`Vault::open_or_init`] with customer keys reached through `access`.
    pub fn open_or_init_with(
        url: &str,
        keystore: &Keystore,
        access: &KeyAccess,
    ) -> Result<(Vault, bool)> {
        match Vault::open_with(url, keystore, access) {
            Ok(v) => Ok((v, false)),
            // `open` reports NotFound only when the location holds no config object.
            Err(e) if e.kind() == ErrorKind::NotFound => Ok((Vault::init(url, keystore)?, true)),
            Err(e) => Err(e),
        }
    }

    /// The object store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Settings.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The customer and recovery key descriptors the vault holds.
    pub fn kek_descriptors(&self) -> Result<Vec<CmkKey>> {
        load_descriptors(&*self.store, Some(&self.descriptor_mac))
    }

    /// The KEKs.
    pub fn keyring(&self) -> &Keyring {
        &self.keyring
    }

    /// Check, before anything is written, that the vault's KEK can unwrap what it wraps: a
    /// revoked key, or a customer key whose private half is gone, fails here with a message
    /// saying so.
    pub fn check_keys(&self) -> Result<()> {
        self.keyring.check_unwrap().map_err(|e| {
            e.within(format!(
                "the {} key of vault {} cannot unwrap (revoked or unreachable)",
                self.keyring.primary_kind(),
                self.store.location()
            ))
        })
    }

    /// The key file this vault's keys came from.
    pub fn keystore_file(&self) -> &std::path::Path {
        &self.keystore_file
    }

    fn binding(&self, disk_id: [u8; 16]) -> Binding {
        Binding {
            vault_id: self.config.vault_id,
            disk_id,
        }
    }

    /// Ids of every disk with a key record.
    pub fn disk_ids(&self) -> Result<Vec<[u8; 16]>> {
        let mut ids: Vec<[u8; 16]> = Vec::new();
        for key in self.store.list("keys")? {
            let Some(hexid) = key.split('/').nth(1) else {
                continue;
            };
            if let Some(id) = parse_id::<16>(hexid) {
                ids.push(id);
            }
        }
        ids.dedup();
        Ok(ids)
    }

    /// Load a disk's key records and unwrap every DEK generation.
    pub fn load_disk(&self, disk_id: [u8; 16]) -> Result<Disk> {
        let prefix = format!("keys/{}", hex::encode(disk_id));
        let mut generations = BTreeMap::new();
        let mut identity = None;
        let mut name = None;
        for key in self.store.list(&prefix)? {
            let rec = KeyRecord::decode(
                &self.store.get(&key)?,
                &key,
                &self.config.vault_id,
                &disk_id,
                Some(&self.record_mac),
            )?;
            if key != keyrecord::object_key(&disk_id, rec.generation) {
                return Err(Error::integrity(format!(
                    "{key}: holds DEK generation {}",
                    rec.generation
                )));
            }
            let dek = rec.unwrap(&self.keyring)?;
            let keys = GenerationKeys::derive(&dek);
            if rec.generation == 0 {
                identity = Some(Arc::new(IdentityKeys::derive(&dek)));
                name = Some(rec.name(&keys)?);
            }
            generations.insert(rec.generation, Arc::new(keys));
        }
        let (Some(identity), Some(name)) = (identity, name) else {
            return Err(Error::new(
                ErrorKind::Key,
                format!(
                    "disk {}: key record of DEK generation 0 is missing",
                    hex::encode(disk_id)
                ),
            ));
        };
        Ok(Disk {
            id: disk_id,
            name,
            binding: self.binding(disk_id),
            identity,
            generations,
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

    /// Register a new disk: fresh DEK, key record generation 0. Names are 1 to 200 bytes of
    /// printable text.
    pub fn create_disk(&self, name: &str) -> Result<Disk> {
        if name.is_empty() || name.len() > 200 || name.chars().any(char::is_control) {
            return Err(Error::usage(format!(
                "disk name {name:?} must be 1 to 200 bytes of printable text"
            )));
        }
        let disk_id = random_bytes::<16>()?;
        self.write_generation(disk_id, 0, name)?;
        self.load_disk(disk_id)
    }

    /// Start a new DEK generation for `disk` (the nonce budget of the current one is spent).
    pub fn new_generation(&self, disk: &Disk) -> Result<Disk> {
        self.write_generation(disk.id, disk.current_generation() + 1, &disk.name)?;
        self.load_disk(disk.id)
    }

    fn write_generation(&self, disk_id: [u8; 16], generation: u32, name: &str) -> Result<()> {
        let dek = Secret32::random()?;
        let rec = KeyRecord::create(
            self.config.vault_id,
            disk_id,
            generation,
            &dek,
            name,
            &self.keyring,
        )?;
        self.store.put_new(
            &keyrecord::object_key(&disk_id, generation),
            &rec.encode(&self.record_mac),
        )
    }

    /// Snapshot ids of a disk (unordered).
    pub fn snapshot_ids(&self, disk: &Disk) -> Result<Vec<SnapshotId>> {
        let prefix = format!("snapshots/{}", disk.id_hex());
        Ok(self
            .store
            .list(&prefix)?
            .iter()
            .filter_map(|k| parse_id(k.rsplit('/').next()?).map(SnapshotId))
            .collect())
    }

    /// Read and decrypt one manifest.
    pub fn load_manifest(&self, disk: &Disk, id: SnapshotId) -> Result<Manifest> {
        let key = id.object_key(&disk.id);
        let raw = self.store.get(&key)?;
        let (found, generation) = Manifest::peek(&raw, &disk.binding, &key)?;
        if found != id {
            return Err(Error::integrity(format!(
                "{key}: holds snapshot {}",
                found.hex()
            )));
        }
        Manifest::decode(&raw, &disk.binding, &*disk.generation(generation)?, &key)
    }

    /// Every snapshot of a disk, oldest first.
    pub fn snapshots(&self, disk: &Disk) -> Result<Vec<Manifest>> {
        let mut all = Vec::new();
        for id in self.snapshot_ids(disk)? {
            match self.load_manifest(disk, id) {
                Ok(m) => all.push(m),
                // A damaged (or vanished) manifest loses only its own snapshot: list the rest,
                // so the others restore and backups go on. `verify` reports it by name.
                Err(e) if matches!(e.kind(), ErrorKind::Integrity | ErrorKind::NotFound) => {
                    tracing::warn!(disk = %disk.name, snapshot = %id.short(), error = %e, "skipping unreadable snapshot");
                }
                Err(e) => return Err(e),
            }
        }
        all.sort_by_key(|m| (m.sequence, m.created, m.id));
        Ok(all)
    }

    /// A snapshot by `latest` or a unique id prefix.
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
        let matches: Vec<SnapshotId> = self
            .snapshot_ids(disk)?
            .into_iter()
            .filter(|id| id.hex().starts_with(&spec_lc))
            .collect();
        match matches.as_slice() {
            [one] => self.load_manifest(disk, *one),
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

    /// Write a sealed manifest: the commit point of a backup.
    pub fn put_manifest(&self, disk: &Disk, m: &Manifest) -> Result<()> {
        let keys = disk.generation(m.generation)?;
        self.store
            .put(&m.id.object_key(&disk.id), &m.encode(&disk.binding, &keys)?)
    }
}

/// Remove what an `init` killed before writing the config left behind: key descriptors and
/// `infra-recovery`. They are authenticated (or encrypted) under a keystore file that no
/// config names, so nothing can use them, and left in place they would make the next init
/// fail (`put_new`) or the vault it makes unreadable. Run under the init lock, with no config
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
    store.delete(infra_recovery::KEY)
}

/// The store every object but the config goes through: with the infrastructure layer, each
/// object is AES-256-XTS encrypted on its way to the backend. (The config stays outside it:
/// it names the vault whose keys decrypt the rest, and holds no secret.)
fn layered(raw: Arc<dyn Store>, infrastructure: bool, keys: &VaultKeys) -> Result<Arc<dyn Store>> {
    if !infrastructure {
        return Ok(raw);
    }
    let key = keys.infra.as_ref().ok_or_else(|| {
        Error::new(
            ErrorKind::Key,
            "the vault has an infrastructure encryption layer but the keystore holds no key for it",
        )
    })?;
    let key = store::xts::InfraKey::from_bytes(*key.expose())?;
    Ok(Arc::new(store::xts::XtsStore::new(raw, key)))
}

/// Every KEK descriptor under `kek/`, checked with `mac` (see [`kekdesc::decode`]).
fn load_descriptors(store: &dyn Store, mac: Option<&Secret32>) -> Result<Vec<CmkKey>> {
    let mut keys = Vec::new();
    for key in store.list(kekdesc::PREFIX)? {
        keys.push(kekdesc::decode(&store.get(&key)?, &key, mac)?);
    }
    Ok(keys)
}

/// The keyring of a vault whose primary KEK is of `kind`.
fn keyring_for(
    kind: KekKind,
    platform: PlatformKek,
    descriptors: Vec<CmkKey>,
    access: &KeyAccess,
) -> Result<Keyring> {
    let mut primary: Vec<(u32, Box<dyn KekProvider>)> = Vec::new();
    let mut recovery: Option<Box<dyn KekProvider>> = None;
    for key in descriptors {
        let id = key.id();
        match id.kind {
            KekKind::Recovery => {
                recovery = Some(Box::new(PemKek::new(key, access.recovery_private.clone())?))
            }
            KekKind::CustomerRsa if kind == KekKind::CustomerRsa => primary.push((
                id.version,
                Box::new(PemKek::new(key, access.cmk_private.clone())?),
            )),
            KekKind::CustomerPkcs11 if kind == KekKind::CustomerPkcs11 => primary.push((
                id.version,
                Box::new(Pkcs11Kek::open(key, access.pkcs11.clone())?),
            )),
            other => {
                return Err(Error::integrity(format!(
                    "the vault holds a {other} key descriptor but its keys are {kind}"
                )))
            }
        }
    }
    let primary: Box<dyn KekProvider> = match kind {
        KekKind::Platform => Box::new(platform),
        _ if primary.is_empty() => {
            return Err(Error::integrity(format!(
                "the vault's keys are {kind} but it holds no descriptor of that key"
            )))
        }
        _ => Box::new(Versions::new(primary)),
    };
    Ok(Keyring::new(kind, primary, recovery))
}

/// Encryption settings chosen when a vault is created.
#[derive(Default)]
pub struct InitOptions {
    /// The customer-managed key that wraps every DEK; `None`: the platform key.
    pub cmk: Option<CmkKey>,
    /// An offline RSA key that receives a second wrap of every DEK.
    pub recovery: Option<CmkKey>,
    /// Add the infrastructure layer (AES-256-XTS with a platform-managed key); only with a
    /// customer-managed key.
    pub infrastructure: bool,
    /// Where this host reaches the customer key's private half.
    pub access: KeyAccess,
}

/// One warning per disk whose key records could not be read, when the others go on.
fn warn_unreadable(unreadable: &[([u8; 16], Error)]) {
    for (id, e) in unreadable {
        tracing::warn!(disk = %hex::encode(id), error = %e, "cannot read a disk's key records");
    }
}

/// An id from an object name: exactly `2 * N` lowercase hex digits (names are written in
/// lowercase; anything else in a listing is not ours and is ignored).
fn parse_id<const N: usize>(name: &str) -> Option<[u8; N]> {
    if name.len() != 2 * N
        || !name
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return None;
    }
    let mut id = [0u8; N];
    hex::decode_to_slice(name, &mut id).ok()?;
    Some(id)
}
