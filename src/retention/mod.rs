//! Retention: which snapshots a policy keeps ([`policy`]), and forgetting the others
//! ([`forget`]): each disk's snapshots leave the vault head in one compare-and-swap (the head
//! is the commit point), then their manifests are deleted. Packs are not touched there: their
//! space comes back with [`prune`], which deletes packs while other hosts back up, by the
//! protocol of [`lease`] (each backup's lease) and [`plan`] (a prune's deletion plan), after
//! [`repack`] has moved the live frames out of mostly dead packs.

pub mod forget;
pub mod lease;
pub mod plan;
pub mod policy;
pub mod prune;
pub mod repack;
