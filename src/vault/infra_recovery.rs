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
//! head. A rotation cannot rewrite it in place in one step without losing, if killed, the only
//! trusted copy of the recovery key's descriptor (a separate infrastructure recovery key is
//! named nowhere else): it stages the new record as `infra-recovery-next`, switches the head's
//! digest to it, then copies it over `infra-recovery` (`keys::infra_rotation`); until the copy
//! is made, [`read_bound`] finds the record under either name. Which recovery key wraps it is
//! the vault owner's choice at `init`: a separate `--infra-recovery-key`, so that neither
//! recovery key alone opens both layers, or (without one) the DEK recovery key itself — which then opens both (docs/CRYPTO.md, "Custody").

use super::codec::{Dec, Enc};
use super::head::{self, Digest};
use super::store::xts::InfraKey;
use super::store::Store;
use crate::crypto::kek::KekProvider;
use crate::crypto::rsa::{CmkKey, PemKek, PrivateKeyFile};
use crate::crypto::Secret32;
use crate::error::{ErrorKind, Result};

/// Object key (outside the infrastructure layer).
pub const KEY: &str = "infra-recovery";
/// Where an infrastructure key rotation stages the new record before the head lists it.
pub const NEXT_KEY: &str = "infra-recovery-next";
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

/// The record the head lists (by `digest`): `infra-recovery`, or, when a rotation was killed
/// between listing its staged record and copying it into place, `infra-recovery-next`. An
/// `Integrity` error naming `infra-recovery` if neither matches.
pub fn read_bound(raw: &dyn Store, digest: &Digest) -> Result<Vec<u8>> {
    match raw.get(NEXT_KEY) {
        Ok(b) if head::digest(&b) == *digest => return Ok(b),
        Ok(_) => {}
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    crate::vault::get_bound(raw, KEY, digest)
}

/// A record parsed up to its wraps.
struct Parsed<'a> {
    record_version: u16,
    key_version: u32,
    holder: CmkKey,
    wraps: [&'a [u8]; 2],
}

fn parse(b: &[u8]) -> Result<Parsed<'_>> {
    let mut d = Dec::new(b, KEY);
    let record_version = d.prologue_in(MAGIC, 1..=VERSION, "infrastructure key recovery record")?;
    let key_version = if record_version == 1 { 1 } else { d.u32()? };
    let len = d.u16()? as usize;
    let holder = CmkKey::decode(d.take(len)?, KEY)?;
    let mut wraps = [&[][..]; 2];
    for w in &mut wraps {
        let len = d.u16()? as usize;
        *w = d.take(len)?;
    }
    d.end()?;
    Ok(Parsed {
        record_version,
        key_version,
        holder,
        wraps,
    })
}

/// The infrastructure key version the record bytes `b` hold and the recovery key that wraps
/// it (nothing is unwrapped). Only as trustworthy as the bytes: the caller checks them against
/// the head's digest first.
pub fn holder(b: &[u8]) -> Result<(u32, CmkKey)> {
    let p = parse(b)?;
    Ok((p.key_version, p.holder))
}

/// Unwrap the infrastructure key (and its version) from the record bytes `b` with the
/// private half of the recovery key that wraps it.
pub fn open(
    b: &[u8],
    vault_id: &[u8; 16],
    private: Option<PrivateKeyFile>,
) -> Result<(u32, InfraKey)> {
    let p = parse(b)?;
    let id = p.holder.id();
    let kek = PemKek::new(p.holder, private)?;
    let mut out = zeroize::Zeroizing::new([0u8; 64]);
    for (half, wrap) in p.wraps.into_iter().enumerate() {
        let part = kek.unwrap(
            id,
            wrap,
            &aad(vault_id, p.record_version, p.key_version, half as u8),
        )?;
        let at = half * 32;
        out[at..at + 32].copy_from_slice(part.expose());
    }
    Ok((p.key_version, InfraKey::from_bytes(*out)?))
}
