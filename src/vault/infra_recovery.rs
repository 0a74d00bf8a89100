//! `infra-recovery`: the infrastructure layer's key wrapped by the recovery key, so that a
//! lost keystore does not lose a vault that has both. It sits beside `config`, outside the
//! layer it unlocks, and carries the recovery key's descriptor for the same reason.
//!
//! ```text
//! "BVIR" | u16 version=1 | u16 0 | u16 len | recovery key descriptor [len] (CmkKey encoding)
//! | 2 × ( u16 len | wrap [len] )      the two 32-byte halves of the XTS key, each wrapped by
//!                                     the recovery key with AAD "blockvault infra key v1" ‖
//!                                     vault id ‖ u8 half
//! ```
//! Written once at `init`; read only by `key recover`.

use super::codec::{Dec, Enc};
use super::store::xts::InfraKey;
use super::store::Store;
use crate::crypto::kek::KekProvider;
use crate::crypto::keyring::KeyAccess;
use crate::crypto::rsa::{CmkKey, PemKek};
use crate::crypto::Secret32;
use crate::error::Result;

/// Object key (outside the infrastructure layer).
pub const KEY: &str = "infra-recovery";
const MAGIC: &[u8; 4] = b"BVIR";
const VERSION: u16 = 1;
const AAD: &[u8] = b"blockvault infra key v1";

fn aad(vault_id: &[u8; 16], half: u8) -> Vec<u8> {
    [AAD, vault_id, &[half]].concat()
}

/// Wrap `infra` to `recovery` and store it in the raw store.
pub fn write(
    raw: &dyn Store,
    vault_id: &[u8; 16],
    recovery: &CmkKey,
    infra: &InfraKey,
) -> Result<()> {
    let desc = recovery.encode();
    let kek = PemKek::new(CmkKey::decode(&desc, "recovery key")?, None)?;
    let mut e = Enc::default();
    e.bytes(MAGIC)
        .u16(VERSION)
        .u16(0)
        .u16(desc.len() as u16)
        .bytes(&desc);
    for (half, bytes) in infra.expose().chunks_exact(32).enumerate() {
        let part = Secret32::from_slice(bytes)?;
        let w = kek.wrap(recovery.id(), &part, &aad(vault_id, half as u8))?;
        e.u16(w.len() as u16).bytes(&w);
    }
    raw.put_new(KEY, &e.finish())
}

/// Unwrap the infrastructure key with the recovery key's private half.
pub fn open(raw: &dyn Store, vault_id: &[u8; 16], access: &KeyAccess) -> Result<InfraKey> {
    let bytes = raw.get(KEY)?;
    let mut d = Dec::new(&bytes, KEY);
    d.prologue(MAGIC, VERSION, "infrastructure key recovery record")?;
    let len = d.u16()? as usize;
    let key = CmkKey::decode(d.take(len)?, KEY)?;
    let id = key.id();
    let kek = PemKek::new(key, access.recovery_private.clone())?;
    let mut out = zeroize::Zeroizing::new([0u8; 64]);
    for half in 0..2u8 {
        let len = d.u16()? as usize;
        let part = kek.unwrap(id, d.take(len)?, &aad(vault_id, half))?;
        let at = half as usize * 32;
        out[at..at + 32].copy_from_slice(part.expose());
    }
    d.end()?;
    InfraKey::from_bytes(*out)
}
