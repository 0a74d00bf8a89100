//! Holding a backup at its commit point until others are ready too.
//!
//! A group of disks backed up at one point in time (`crate::vm`) should appear whole or not
//! at all. Each member runs its own backup; a [`CommitGate`] is called by each one after its
//! last pack is durable and just before its manifest is written. The gate returns once every
//! member got there, and all commit; or it fails because one member failed, and the others
//! unwind like any failed backup (their packs removed, no snapshot). Only the manifest writes
//! themselves, a few milliseconds, can leave a group part-committed (a SIGKILL or an error
//! between them), which the group listing shows as incomplete.

use crate::error::Result;

/// Called by a backup at its commit point (see the module doc).
pub trait CommitGate: Send + Sync + std::fmt::Debug {
    /// Wait until the backup may write its manifest; an error abandons it.
    fn ready(&self) -> Result<()>;
}
