//! The lease every backup holds while it runs, and the deletion plans it must respect: the
//! writer's half of the protocol that lets `prune` delete packs while other hosts back up
//! (docs/FORMAT.md, "Prune and concurrent backups").
//!
//! ```text
//!  backup: lease locks/backup-<id> ─▶ read head, parent ─▶ parent's packs in a pending plan?
//!          (created before anything        │ yes: no parent (everything read and stored anew)
//!           is read)                       ▼
//!          packs … ─▶ lease still held (with a margin)? ─no─▶ fail, nothing committed
//!                                    │ yes
//!                                    ▼
//!                               commit (head swap) ─▶ lease deleted
//! ```

use std::sync::Arc;
use std::time::Duration;

use super::plan;
use crate::crypto::secret::random_bytes;
use crate::error::Result;
use crate::vault::manifest::Manifest;
use crate::vault::store::lease::{Lease, DEFAULT_TTL};
use crate::vault::store::Store;
use crate::vault::Vault;

/// Prefix of backup lease names (`locks/backup-<16 hex>`).
pub const PREFIX: &str = "backup-";
/// The environment variable that sets a backup lease's time to live in milliseconds (tests
/// use a short one to suspend a backup past it; default 60 s).
pub const TTL_ENV: &str = "BLOCKVAULT_LEASE_TTL_MS";

/// Time to live of backup leases.
pub fn ttl() -> Duration {
    std::env::var(TTL_ENV)
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|ms| *ms >= 100)
        .map(Duration::from_millis)
        .unwrap_or(DEFAULT_TTL)
}

/// A running backup's lease.
pub struct BackupLease(Lease);

impl BackupLease {
    /// Take a new lease for one backup run (before it reads the head or any manifest).
    pub fn start(store: &Arc<dyn Store>) -> Result<BackupLease> {
        let name = format!("{PREFIX}{}", hex::encode(random_bytes::<8>()?));
        Ok(BackupLease(Lease::acquire(
            store.clone(),
            &name,
            Duration::ZERO,
            ttl(),
        )?))
    }

    /// Fail if the lease lapsed or would within a quarter of its time to live: a prune may
    /// then count this run as ended and delete packs it uses. Checked right before the
    /// commit.
    pub fn check_before_commit(&self) -> Result<()> {
        self.0
            .check_held(ttl() / 4)
            .map_err(|e| e.within("the backup did not commit"))
    }
}

/// Why `parent` cannot be an incremental's parent: some pack it references is in a pending
/// deletion plan (a prune is about to delete it unless a snapshot it waits for references
/// it). `None`: it can.
pub fn parent_blocked(vault: &Vault, parent: &Manifest) -> Result<Option<String>> {
    let pending = plan::pending(vault.raw_store().as_ref())?;
    let blocked = parent
        .packs
        .iter()
        .filter(|(id, _)| {
            !pending.unreadable.is_empty() || pending.packs.contains(&id.object_key())
        })
        .count();
    Ok((blocked > 0).then(|| {
        format!(
            "{blocked} packs of parent {} are in a pending prune's deletion plan: reading the whole disk and storing it anew",
            parent.id.short()
        )
    }))
}
