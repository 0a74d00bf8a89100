//! `infra-recovery`: the infrastructure layer's key wrapped by a recovery key, so that a lost
//! keystore does not lose a vault that has both. It sits beside `config`, outside the layer it
//! unlocks, and carries the recovery key's descriptor for the same reason.
//!
//! ```text
//! version 2: "BVIR" | u16 2 | u16 0 | u32 infra key version | u16 len | recovery key
//!            descriptor [len] (CmkKey encoding) | 2 × ( u16 len | wrap [len] )
//!            the two 32-byte halves of the XTS key, each wrapped by the recovery key with AAD
//!            "blockvault infra key v2" ‖ vault id ‖ u32 infra key version ‖ u8 half
//! version 1: no key version (it is 1); AAD "blockvault infra key v1" ‖ vault id ‖ u8 half
//! ```
//! Written at `init` and whenever the infrastructure key is rotated; its digest is in the vault
//! head. Which recovery key wraps it is the vault owner's choice at `init`: a separate
//! `--infra-recovery-key`, so that neither recovery key alone opens both layers, or (without
//! one) the DEK recovery key itself — which then opens both (docs/CRYPTO.md, "Custody").

use super::codec::{Dec, Enc};
use super::store::xts::InfraKey;
use crate::crypto::kek::KekProvider;
use crate::crypto::rsa::{CmkKey, PemKek, PrivateKeyFile};
use crate::crypto::Secret32;
use crate::error::Result;

/// Object key (outside the infrastructure layer).
pub const KEY: &str = "infra-recovery";
const MAGIC: &[u8; 4] = b"BVIR";
const VERSION: u16 = 2;

fn aad(vault_id: &[u8; 16], record_version: u16, key_version: u32, half: u8) -> Vec<u8> {
    if record_version == 1 {
        return [&b"blockvault infra key v1"[..], vault_id, &[half]].concat();
    }
    [
        &b"blockvault infra key v2"[..],
        vault_id,
        &key_version.to_le_bytes(),
        &[half],
    ]
    .concat()
}

/// The record of infrastructure key `infra` (version `key_version`) wrapped to `recovery`.
pub fn encode(
    vault_id: &[u8; 16],
    key_version: u32,
    recovery: &CmkKey,
    infra: &InfraKey,
) -> Result<Vec<u8>> {
    let desc = recovery.encode();
    let kek = PemKek::new(CmkKey::decode(&desc, "recovery key")?, None)?;
    let mut e = Enc::default();
    e.bytes(MAGIC)
        .u16(VERSION)
        .u16(0)
        .u32(key_version)
        .u16(desc.len() as u16)
        .bytes(&desc);
    for (half, bytes) in infra.expose().chunks_exact(32).enumerate() {
        let part = Secret32::from_slice(bytes)?;
        let w = kek.wrap(
            recovery.id(),
            &part,
            &aad(vault_id, VERSION, key_version, half as u8),
        )?;
        e.u16(w.len() as u16).bytes(&w);
    }
    Ok(e.finish())
}

/// Unwrap the infrastructure key (and its version) from the record bytes `b` with the
/// private half of the recovery key that wraps it.
pub fn open(
    b: &[u8],
    vault_id: &[u8; 16],
    private: Option<PrivateKeyFile>,
) -> Result<(u32, InfraKey)> {
    let mut d = Dec::new(b, KEY);
    let record_version = d.prologue_in(MAGIC, 1..=VERSION, "infrastructure key recovery record")?;
    let key_version = if record_version == 1 { 1 } else { d.u32()? };
    let len = d.u16()? as usize;
    let key = CmkKey::decode(d.take(len)?, KEY)?;
    let id = key.id();
    let kek = PemKek::new(key, private)?;
    let mut out = zeroize::Zeroizing::new([0u8; 64]);
    for half in 0..2u8 {
        let len = d.u16()? as usize;
        let part = kek.unwrap(
            id,
            d.take(len)?,
            &aad(vault_id, record_version, key_version, half),
        )?;
        let at = half as usize * 32;
        out[at..at + 32].copy_from_slice(part.expose());
    }
    d.end()?;
    Ok((key_version, InfraKey::from_bytes(*out)?))
}
