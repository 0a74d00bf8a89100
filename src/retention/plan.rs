//! Deletion plans: `prune/plan-<16 hex>`, the packs a running prune is about to delete.
//!
//! A plan is written before the prune lists the backups' leases and is deleted when the prune
//! ends. While one exists, a backup that starts does not reuse any pack it lists (the pack may
//! be gone by the time the backup commits); docs/FORMAT.md, "Deletion plan", has the bytes:
//! `"BVPP" | u16 1 | u16 0 | u32 n | n × pack id [32]` (strictly increasing).
//!
//! Plans are not authenticated: a planted plan only makes backups store data anew (and a
//! party able to delete a plan can delete the packs themselves).

use std::collections::BTreeSet;

use crate::crypto::secret::random_bytes;
use crate::error::{Error, Result};
use crate::vault::codec::{Dec, Enc};
use crate::vault::pack::PackId;
use crate::vault::store::Store;

/// Folder of deletion plans.
pub const FOLDER: &str = "prune";
const MAGIC: &[u8; 4] = b"BVPP";
const VERSION: u16 = 1;

/// Encode a plan listing `packs`.
pub fn encode(packs: &BTreeSet<PackId>) -> Vec<u8> {
    let mut e = Enc::with_capacity(12 + 32 * packs.len());
    e.bytes(MAGIC).u16(VERSION).u16(0).u32(packs.len() as u32);
    for p in packs {
        e.bytes(&p.0);
    }
    e.finish()
}

/// Decode a plan (`what` names it in errors).
pub fn decode(bytes: &[u8], what: &str) -> Result<BTreeSet<PackId>> {
    let mut d = Dec::new(bytes, what);
    d.prologue(MAGIC, VERSION, "deletion plan")?;
    let n = d.u32()? as usize;
    if n.checked_mul(32) != Some(d.remaining()) {
        return Err(d.error(format_args!(
            "{n} pack ids do not fit in {} bytes",
            d.remaining()
        )));
    }
    let mut packs = BTreeSet::new();
    for _ in 0..n {
        let id = PackId(d.array()?);
        // Strictly increasing, as `encode` writes them: one encoding per plan.
        if packs.last().is_some_and(|last| *last >= id) {
            return Err(d.error("pack ids not in strictly increasing order"));
        }
        packs.insert(id);
    }
    d.end()?;
    Ok(packs)
}

/// Write a new plan; returns its key.
pub fn write(store: &dyn Store, packs: &BTreeSet<PackId>) -> Result<String> {
    let key = format!("{FOLDER}/plan-{}", hex::encode(random_bytes::<8>()?));
    store.put_new(&key, &encode(packs))?;
    Ok(key)
}

/// The plans in the store now.
pub fn keys(store: &dyn Store) -> Result<Vec<String>> {
    store.list(FOLDER)
}

/// What pending plans hold.
#[derive(Debug, Default)]
pub struct Pending {
    /// Object keys of every pack some plan lists.
    pub packs: BTreeSet<String>,
    /// Plans that could not be read (a backup then reuses no pack at all).
    pub unreadable: Vec<String>,
}

/// Read every pending plan. A plan removed while being read (its prune ended) is skipped.
pub fn pending(store: &dyn Store) -> Result<Pending> {
    let mut out = Pending::default();
    for key in keys(store)? {
        let bytes = match store.get(&key) {
            Ok(b) => b,
            Err(e) if e.kind() == crate::error::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        match decode(&bytes, &key) {
            Ok(packs) => out.packs.extend(packs.iter().map(PackId::object_key)),
            Err(e) => {
                tracing::warn!(plan = %key, error = %e, "unreadable deletion plan: reusing no pack while it exists");
                out.unreadable.push(key);
            }
        }
    }
    Ok(out)
}

/// Remove a plan (its prune ended or a later prune found it left by a killed one).
pub fn remove(store: &dyn Store, key: &str) -> Result<()> {
    store
        .delete(key)
        .map_err(|e: Error| e.within(format!("removing deletion plan {key}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_round_trip_and_refuse_damage() {
        let packs: BTreeSet<PackId> = [PackId([1; 32]), PackId([2; 32])].into();
        let b = encode(&packs);
        assert_eq!(decode(&b, "p").unwrap(), packs);
        for cut in 0..b.len() {
            assert!(decode(&b[..cut], "p").is_err(), "{cut}");
        }
        let mut long = b.clone();
        long.push(0);
        assert!(decode(&long, "p").is_err());
        let mut huge = b.clone();
        huge[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode(&huge, "p").is_err());
        let mut swapped = b;
        swapped[12..44].copy_from_slice(&[2; 32]);
        swapped[44..76].copy_from_slice(&[1; 32]);
        assert!(decode(&swapped, "p").is_err());
    }
}
