//! blockvault: an encrypted, incremental backup engine for block devices and VM disk images.
//!
//! # Data model
//! A *vault* holds *disks*; a disk has *snapshots*. A snapshot divides the disk into fixed
//! *slots* (1 MiB by default, fixed at the disk's first backup); each slot is zero, one stored
//! *extent*, or a base plus overlays. Extents are named by a keyed hash of their plaintext,
//! sealed with AES-256-GCM under the disk's DEK, and grouped into *packs*. The snapshot's
//! *manifest*, written last, is the commit point.
//!
//! # Modules, in pipeline order
//! - [`source`]: what is backed up (raw images, block devices) and where its data lies;
//! - [`changes`]: what changed since the parent (dirty bitmaps, changed-range lists);
//! - [`layout`]: partition tables and encrypted volumes found in a disk's headers;
//! - [`io`]: io_uring (or pread) reads into a bounded pool of aligned buffers;
//! - [`engine`]: the backup pipeline (workers, writer, uploader);
//! - [`crypto`]: keys, derivation, AEAD, keyed ids, the platform keystore;
//! - [`vault`]: the on-disk format (config, key records, frames, packs, manifests) and stores;
//! - [`restore`]: restore and verify;
//! - [`retention`]: retention policies, `forget` and `prune`.
//! - [`qmp`] and [`vm`]: a running VM backed up through QEMU's QMP monitor, its disks as one
//!   group at one point in time.
//!
//! # Garbage and locks
//! | object | written by | removed by | lock held by the writer |
//! |---|---|---|---|
//! | config | init (create-only) | never | none: `put_new` refuses a second |
//! | packs | backup, before its manifest | the backup itself if it fails before its manifest; prune, once unreferenced ([`retention::prune`]) | disk lock; a backup lease that prune waits for |
//! | manifests | backup, last | forget, after the head swap that unlists them | disk lock (backup); forget takes none: its head swap decides |
//! | key records | first backup of a disk (no lock: the head swap that lists the disk decides, and a registration that finds the name taken meanwhile uses that disk, [`vault::Vault::register_disk`]); a new DEK generation (disk lock) | never once listed (replaced in place by `key rotate`/`key recover`); a registration that lost its name's race deletes its own, which no head lists | create-only, under a random disk id |
//! | `kek/` descriptors | `init`, `key rotate --new-cmk` | never (re-MAC'd by `key recover`) | create-only |
//! | `escrow/` records | `key escrow` | never (replaced by a new escrow of the same name) | none: last writer wins |
//! | `infra-recovery` | `init` (infrastructure layer + recovery key) | never | create-only |
//!
//! Readers take no lock: every object is immutable once written. A backup that fails or is
//! stopped by SIGINT/SIGTERM removes the packs it wrote ([`engine::uncommitted`]); a killed
//! one leaves unreferenced packs, which `prune` deletes, and hidden `.tmp-*` files, which
//! `verify` reports with their sizes and which are harmless.
//!
//! See docs/ARCHITECTURE.md, docs/FORMAT.md and docs/CRYPTO.md.

#![warn(missing_docs)]

pub mod changes;
pub mod crypto;
pub mod engine;
pub mod error;
pub mod interrupt;
pub mod io;
pub mod keys;
pub mod layout;
pub mod mount;
pub mod qmp;
mod ranges;
pub mod reader;
pub mod restore;
pub mod retention;
pub mod serve;
pub mod source;
pub mod util;
pub mod vault;
pub mod vm;

pub use error::{Error, ErrorKind, Result};
