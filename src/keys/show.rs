//! `key show`: what keys the vault has and what depends on each. Needs no unwrap (so it works
//! while a KEK is revoked): everything comes from the keystore and the vault head; only disk
//! names need the DEKs, and are left out where those cannot be unwrapped.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::crypto::kek::{KekKind, KekState};
use crate::error::Result;
use crate::vault::{anchor, Vault};

/// The report.
#[derive(Debug, Serialize)]
pub struct KeyReport {
    /// What wraps the DEKs: platform, cmk-rsa, cmk-pkcs11.
    pub kek_kind: String,
    /// The vault's primary KEK now (e.g. `platform-v2`).
    pub current_kek: String,
    /// Whether the infrastructure layer (AES-256-XTS) is on.
    pub infrastructure_encryption: bool,
    /// Its key version.
    pub infrastructure_key_version: Option<u32>,
    /// The key file.
    pub keystore: String,
    /// The auth key version and its fingerprint (keep it with the recovery key).
    pub auth_key_version: u32,
    /// Fingerprint of the auth key.
    pub auth_fingerprint: String,
    /// The head's epoch (how many times the vault's state changed).
    pub head_epoch: u64,
    /// A key operation that started and did not finish, if any.
    pub unfinished_key_operation: Option<String>,
    /// Every KEK.
    pub keks: Vec<KekInfo>,
    /// Versions destroyed for good.
    pub destroyed: Vec<String>,
    /// Every DEK generation of every disk.
    pub dek_generations: Vec<GenerationInfo>,
}

/// One KEK.
#[derive(Debug, Serialize)]
pub struct KekInfo {
    /// E.g. `platform-v1`, `cmk-rsa-v2`, `recovery-v1`.
    pub id: String,
    /// platform, cmk-rsa, cmk-pkcs11, recovery.
    pub kind: String,
    /// Version.
    pub version: u32,
    /// enabled or revoked (platform keys).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// When it was made (RFC 3339; platform keys).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
    /// Platform keys: a fingerprint derived from the key that reveals nothing of it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
    /// RSA keys: SHA-256 of the public key (SubjectPublicKeyInfo DER).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fingerprint_sha256: Option<String>,
    /// RSA keys: modulus size in bits.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bits: Option<usize>,
    /// RSA keys: the OAEP hash.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oaep: Option<String>,
    /// RSA keys: where the key lives (PEM file path or PKCS#11 URI).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

/// One DEK generation.
#[derive(Debug, Serialize)]
pub struct GenerationInfo {
    /// Disk id (hex).
    pub disk_id: String,
    /// Disk name, where its keys unwrap.
    pub disk: Option<String>,
    /// Generation number.
    pub generation: u32,
    /// Whether new data is sealed under it.
    pub current: bool,
    /// Whether it derives the disk's content identity.
    pub identity: bool,
    /// The KEKs its record is wrapped by.
    pub wrapped_by: Vec<String>,
    /// Committed snapshots sealed under it.
    pub snapshots: usize,
    /// Upper bound on the AES-GCM seals made with its keys (nonce budget).
    pub seals: u64,
}

fn rfc3339(secs: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs))
        .to_string()
}

/// Gather the report for `vault`.
pub fn show(vault: &Vault) -> Result<KeyReport> {
    let head = vault.head()?;
    let keys = vault.keystore().load(&vault.config().vault_id)?;
    let mut keks = Vec::new();
    if head.primary.kind == KekKind::Platform {
        for v in keys.kek.versions() {
            let revoked = v.state == KekState::Revoked || head.revoked.contains(&v.version);
            keks.push(KekInfo {
                id: format!("platform-v{}", v.version),
                kind: "platform".into(),
                version: v.version,
                state: Some(if revoked { "revoked" } else { "enabled" }.into()),
                created: Some(rfc3339(v.created)),
                fingerprint: Some(hex::encode(
                    &blake3::derive_key(
                        "blockvault 2026-11-28 platform kek fingerprint v1",
                        v.key.expose(),
                    )[..8],
                )),
                fingerprint_sha256: None,
                bits: None,
                oaep: None,
                source: None,
            });
        }
    }
    for key in vault.kek_descriptors()? {
        keks.push(KekInfo {
            id: key.id().to_string(),
            kind: key.id().kind.to_string(),
            version: key.id().version,
            state: None,
            created: None,
            fingerprint: None,
            fingerprint_sha256: Some(hex::encode(key.fingerprint())),
            bits: Some(key.bits()),
            oaep: Some(key.oaep().to_string()),
            source: Some(key.source().to_string()),
        });
    }
    let names: BTreeMap<[u8; 16], String> = vault
        .disks()
        .map(|ds| ds.into_iter().map(|d| (d.id, d.name)).collect())
        .unwrap_or_default();
    let mut dek_generations = Vec::new();
    for (disk_id, entry) in &head.disks {
        for (&g, ge) in &entry.generations {
            let wrapped_by = match vault.key_record(disk_id, g, ge) {
                Ok((_, rec)) => rec.wraps.iter().map(|w| w.0.to_string()).collect(),
                Err(e) => vec![format!("unreadable: {e}")],
            };
            // A snapshot is sealed under the generation current when it was made; the head
            // does not say which, so count by the manifests' clear headers.
            let snapshots = entry
                .snapshots
                .iter()
                .filter(|s| {
                    vault
                        .store()
                        .get_range(&s.id.object_key(disk_id), 56, 4)
                        .is_ok_and(|b| b == g.to_le_bytes())
                })
                .count();
            dek_generations.push(GenerationInfo {
                disk_id: hex::encode(disk_id),
                disk: names.get(disk_id).cloned(),
                generation: g,
                current: g == entry.current_generation,
                identity: g == entry.identity_generation,
                wrapped_by,
                snapshots,
                seals: ge.seals,
            });
        }
    }
    let auth = vault.keys().auth(head.auth_version)?;
    Ok(KeyReport {
        kek_kind: head.primary.kind.to_string(),
        current_kek: head.primary.to_string(),
        infrastructure_encryption: head.infra_version != 0,
        infrastructure_key_version: (head.infra_version != 0).then_some(head.infra_version),
        keystore: vault.keystore_file().display().to_string(),
        auth_key_version: head.auth_version,
        auth_fingerprint: anchor::fingerprint(auth),
        head_epoch: head.epoch,
        unfinished_key_operation: head.key_operation.map(|k| {
            format!(
                "{} started {} (process {})",
                k.op,
                rfc3339(k.started),
                k.pid
            )
        }),
        keks,
        destroyed: keys
            .destroyed
            .iter()
            .map(|(class, v)| format!("{class} version {v}"))
            .collect(),
        dek_generations,
    })
}
