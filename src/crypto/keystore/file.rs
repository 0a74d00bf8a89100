//! The key file of one vault, `<vault id>.keys`: every version of the vault's auth key,
//! platform KEK and infrastructure-layer key, and the versions destroyed for good.
//!
//! ```text
//! "BVKS" | u16 version=3 | u16 0 | vault id [16]
//! | u16 n × auth  ( u32 version | u64 created | key [32] )
//! | u16 n × KEK   ( u32 version | u8 state 1 enabled / 2 revoked | [3] 0 | u64 created | key [32] )
//! | u16 n × infra ( u32 version | u64 created | key [64] )
//! | u16 n × destroyed ( u8 class 1 KEK / 2 auth / 3 infra | u32 version )
//! | BLAKE3 of all preceding bytes [32]
//! ```
//! Versions 1 and 2 (one auth key, no infrastructure key versions) are read as auth version 1
//! and infrastructure version 1. docs/FORMAT.md has every byte. The checksum catches damage,
//! not tampering: whoever can write the keystore holds the keys anyway.

use std::collections::BTreeSet;

use zeroize::Zeroizing;

use crate::crypto::kek::{KekState, PlatformKek, PlatformKeyVersion};
use crate::crypto::Secret32;
use crate::error::{Error, ErrorKind, Result};
use crate::vault::store::xts::InfraKey;

const MAGIC: &[u8; 4] = b"BVKS";
const VERSION: u16 = 3;
const SUM_LEN: usize = 32;

/// One version of a key that is not a KEK (auth, infrastructure): no state, since a version
/// is either present (usable) or destroyed.
pub struct Versioned<K> {
    /// From 1, one more at each rotation.
    pub version: u32,
    /// Seconds since the epoch.
    pub created: u64,
    /// The key.
    pub key: K,
}

/// Which kind of key a destroyed version was. Stored as one byte; values never change meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u8)]
pub enum KeyClass {
    /// A platform KEK version.
    Kek = 1,
    /// An auth (MAC) key version.
    Auth = 2,
    /// An infrastructure-layer key version.
    Infra = 3,
}

impl std::fmt::Display for KeyClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KeyClass::Kek => "platform KEK",
            KeyClass::Auth => "auth key",
            KeyClass::Infra => "infrastructure key",
        })
    }
}

/// What one vault's key file holds.
pub struct VaultKeys {
    /// The auth key versions: each MACs the config and head that name it.
    pub auth: Vec<Versioned<Secret32>>,
    /// The platform KEK versions.
    pub kek: PlatformKek,
    /// The infrastructure-layer key versions (none for a vault without the layer).
    pub infra: Vec<Versioned<InfraKey>>,
    /// Versions destroyed for good: never accepted back (an older export still holds them).
    pub destroyed: BTreeSet<(KeyClass, u32)>,
}

impl VaultKeys {
    /// Fresh keys, in memory only: auth key version 1, platform KEK version 1, and
    /// infrastructure key version 1 if `infrastructure`.
    pub fn generate(infrastructure: bool) -> Result<VaultKeys> {
        let now = crate::util::now_unix();
        Ok(VaultKeys {
            auth: vec![Versioned {
                version: 1,
                created: now,
                key: Secret32::random()?,
            }],
            kek: PlatformKek::new(vec![PlatformKeyVersion {
                version: 1,
                state: KekState::Enabled,
                created: now,
                key: Secret32::random()?,
            }]),
            infra: if infrastructure {
                vec![Versioned {
                    version: 1,
                    created: now,
                    key: InfraKey::generate()?,
                }]
            } else {
                Vec::new()
            },
            destroyed: BTreeSet::new(),
        })
    }

    /// Auth key `version`; a missing one is a [`ErrorKind::Key`] error saying whether it was
    /// destroyed or never reached this keystore.
    pub fn auth(&self, version: u32) -> Result<&Secret32> {
        self.auth
            .iter()
            .find(|a| a.version == version)
            .map(|a| &a.key)
            .ok_or_else(|| self.missing(KeyClass::Auth, version))
    }

    /// The newest auth key version (what new MACs use).
    pub fn newest_auth(&self) -> &Versioned<Secret32> {
        self.auth
            .iter()
            .max_by_key(|a| a.version)
            .expect("a key file holds at least one auth key")
    }

    /// Infrastructure key `version`.
    pub fn infra(&self, version: u32) -> Result<&InfraKey> {
        self.infra
            .iter()
            .find(|a| a.version == version)
            .map(|a| &a.key)
            .ok_or_else(|| self.missing(KeyClass::Infra, version))
    }

    /// The number a new version of `class` gets: one past every version of it this keystore
    /// holds or has destroyed, so that no number is ever used for two keys.
    pub fn next_version(&self, class: KeyClass) -> u32 {
        let held = match class {
            KeyClass::Auth => self.auth.iter().map(|a| a.version).max(),
            KeyClass::Kek => self.kek.versions().iter().map(|v| v.version).max(),
            KeyClass::Infra => self.infra.iter().map(|i| i.version).max(),
        };
        let destroyed = self
            .destroyed
            .iter()
            .filter(|(c, _)| *c == class)
            .map(|(_, v)| *v)
            .max();
        held.max(destroyed).unwrap_or(0) + 1
    }

    /// The error for a version this keystore does not hold.
    pub fn missing(&self, class: KeyClass, version: u32) -> Error {
        let why = if self.destroyed.contains(&(class, version)) {
            "was destroyed (`blockvault key destroy` or the end of a rotation)"
        } else {
            "is not in this keystore (it was made by a rotation on another host: import a current `key export` of it)"
        };
        Error::new(ErrorKind::Key, format!("{class} version {version} {why}"))
    }

    /// Serialise with the checksum; the buffer is zeroized on drop.
    pub fn encode(&self, vault_id: &[u8; 16]) -> Zeroizing<Vec<u8>> {
        let kek = self.kek.versions();
        let len = 24
            + 2
            + self.auth.len() * 44
            + 2
            + kek.len() * 48
            + 2
            + self.infra.len() * 76
            + 2
            + self.destroyed.len() * 5
            + SUM_LEN;
        // Sized once: a reallocation would leave a copy of the keys behind in freed memory.
        let mut b = Zeroizing::new(Vec::with_capacity(len));
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&VERSION.to_le_bytes());
        b.extend_from_slice(&0u16.to_le_bytes());
        b.extend_from_slice(vault_id);
        b.extend_from_slice(&(self.auth.len() as u16).to_le_bytes());
        for a in &self.auth {
            b.extend_from_slice(&a.version.to_le_bytes());
            b.extend_from_slice(&a.created.to_le_bytes());
            b.extend_from_slice(a.key.expose());
        }
        b.extend_from_slice(&(kek.len() as u16).to_le_bytes());
        for v in kek {
            b.extend_from_slice(&v.version.to_le_bytes());
            b.push(v.state as u8);
            b.extend_from_slice(&[0; 3]);
            b.extend_from_slice(&v.created.to_le_bytes());
            b.extend_from_slice(v.key.expose());
        }
        b.extend_from_slice(&(self.infra.len() as u16).to_le_bytes());
        for i in &self.infra {
            b.extend_from_slice(&i.version.to_le_bytes());
            b.extend_from_slice(&i.created.to_le_bytes());
            b.extend_from_slice(i.key.expose());
        }
        b.extend_from_slice(&(self.destroyed.len() as u16).to_le_bytes());
        for (class, version) in &self.destroyed {
            b.push(*class as u8);
            b.extend_from_slice(&version.to_le_bytes());
        }
        let sum = blake3::hash(&b);
        b.extend_from_slice(sum.as_bytes());
        debug_assert_eq!(b.len(), len);
        b
    }

    /// Parse the bytes of a key file of vault `vault_id` (versions 1 to 3).
    pub fn decode(b: &[u8], vault_id: &[u8; 16]) -> Result<VaultKeys> {
        if b.len() < 24 + SUM_LEN || &b[..4] != MAGIC {
            return Err(damaged("not a blockvault keystore file"));
        }
        let (body, sum) = b.split_at(b.len() - SUM_LEN);
        if blake3::hash(body).as_bytes() != sum {
            return Err(damaged("checksum mismatch"));
        }
        let mut r = Reader { b: body, at: 4 };
        let version = r.u16()?;
        if !(1..=VERSION).contains(&version) {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!("keystore format version {version}, this build reads 1 to {VERSION}"),
            ));
        }
        if r.take(2)? != [0, 0] {
            return Err(damaged("reserved bytes are not zero"));
        }
        if r.take(16)? != vault_id {
            return Err(damaged("file belongs to another vault"));
        }
        let keys = if version < 3 {
            decode_v1_v2(&mut r, version)?
        } else {
            decode_v3(&mut r)?
        };
        if r.at != body.len() {
            return Err(damaged("length does not match its entry counts"));
        }
        Ok(keys)
    }
}

fn damaged(what: &str) -> Error {
    Error::new(ErrorKind::Key, format!("damaged: {what}"))
}

/// Bounded reads over the checksummed body; every failure is "damaged".
struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let s = self
            .b
            .get(self.at..self.at.saturating_add(n))
            .ok_or_else(|| damaged("length does not match its entry counts"))?;
        self.at += n;
        Ok(s)
    }
    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().expect("2")))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4")))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8")))
    }
    fn secret(&mut self) -> Result<Secret32> {
        Secret32::from_slice(self.take(32)?)
    }
    fn infra_key(&mut self) -> Result<InfraKey> {
        let mut k = Zeroizing::new([0u8; 64]);
        k.copy_from_slice(self.take(64)?);
        InfraKey::from_bytes(*k)
    }
    fn kek_entry(&mut self) -> Result<PlatformKeyVersion> {
        let version = self.u32()?;
        let state = match self.take(4)? {
            [1, 0, 0, 0] => KekState::Enabled,
            [2, 0, 0, 0] => KekState::Revoked,
            [s, 0, 0, 0] => return Err(damaged(&format!("unknown KEK state {s}"))),
            _ => return Err(damaged("reserved bytes are not zero")),
        };
        Ok(PlatformKeyVersion {
            version,
            state,
            created: self.u64()?,
            key: self.secret()?,
        })
    }
}

/// Versions 1 and 2: `auth [32] | u16 n | n × KEK | (v2) u8 infra present | [3] 0 | [64]`.
fn decode_v1_v2(r: &mut Reader, version: u16) -> Result<VaultKeys> {
    let auth = r.secret()?;
    let n = r.u16()? as usize;
    let mut kek = Vec::with_capacity(n.min(1024));
    for _ in 0..n {
        kek.push(r.kek_entry()?);
    }
    let infra = if version == 1 {
        Vec::new()
    } else {
        match r.take(4)? {
            [0, 0, 0, 0] => {
                if r.take(64)?.iter().any(|&x| x != 0) {
                    return Err(damaged("infrastructure key part is malformed"));
                }
                Vec::new()
            }
            [1, 0, 0, 0] => vec![Versioned {
                version: 1,
                created: 0,
                key: r.infra_key()?,
            }],
            _ => return Err(damaged("infrastructure key part is malformed")),
        }
    };
    assemble(
        vec![Versioned {
            version: 1,
            created: 0,
            key: auth,
        }],
        kek,
        infra,
        BTreeSet::new(),
    )
}

fn decode_v3(r: &mut Reader) -> Result<VaultKeys> {
    let n = r.u16()? as usize;
    let mut auth = Vec::with_capacity(n.min(1024));
    for _ in 0..n {
        auth.push(Versioned {
            version: r.u32()?,
            created: r.u64()?,
            key: r.secret()?,
        });
    }
    let n = r.u16()? as usize;
    let mut kek = Vec::with_capacity(n.min(1024));
    for _ in 0..n {
        kek.push(r.kek_entry()?);
    }
    let n = r.u16()? as usize;
    let mut infra = Vec::with_capacity(n.min(1024));
    for _ in 0..n {
        infra.push(Versioned {
            version: r.u32()?,
            created: r.u64()?,
            key: r.infra_key()?,
        });
    }
    let n = r.u16()? as usize;
    let mut destroyed = BTreeSet::new();
    for _ in 0..n {
        let class = match r.take(1)?[0] {
            1 => KeyClass::Kek,
            2 => KeyClass::Auth,
            3 => KeyClass::Infra,
            c => return Err(damaged(&format!("unknown destroyed key class {c}"))),
        };
        if !destroyed.insert((class, r.u32()?)) {
            return Err(damaged("a destroyed version is listed twice"));
        }
    }
    assemble(auth, kek, infra, destroyed)
}

/// The checks every version's content must pass: at least one auth key, versions distinct
/// and non-zero within each class, none both present and destroyed.
fn assemble(
    auth: Vec<Versioned<Secret32>>,
    kek: Vec<PlatformKeyVersion>,
    infra: Vec<Versioned<InfraKey>>,
    destroyed: BTreeSet<(KeyClass, u32)>,
) -> Result<VaultKeys> {
    if auth.is_empty() {
        return Err(damaged("no auth key"));
    }
    let classes = [
        (
            KeyClass::Auth,
            auth.iter().map(|a| a.version).collect::<Vec<_>>(),
        ),
        (KeyClass::Kek, kek.iter().map(|k| k.version).collect()),
        (KeyClass::Infra, infra.iter().map(|i| i.version).collect()),
    ];
    for (class, versions) in classes {
        let mut seen = BTreeSet::new();
        for v in versions {
            if v == 0 || !seen.insert(v) {
                return Err(damaged(&format!(
                    "{class} version {v} is zero or appears twice"
                )));
            }
            if destroyed.contains(&(class, v)) {
                return Err(damaged(&format!(
                    "{class} version {v} is both present and destroyed"
                )));
            }
        }
    }
    Ok(VaultKeys {
        auth,
        kek: PlatformKek::new(kek),
        infra,
        destroyed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> VaultKeys {
        let mut k = VaultKeys::generate(true).unwrap();
        k.auth.push(Versioned {
            version: 2,
            created: 9,
            key: Secret32::from_bytes([7; 32]),
        });
        k.destroyed.insert((KeyClass::Kek, 5));
        k
    }

    #[test]
    fn round_trip() {
        let k = sample();
        let b = k.encode(&[3; 16]);
        let back = VaultKeys::decode(&b, &[3; 16]).unwrap();
        assert_eq!(back.encode(&[3; 16]), b);
        assert_eq!(back.newest_auth().version, 2);
        assert_eq!(back.auth(1).unwrap().expose(), k.auth(1).unwrap().expose());
        assert!(back
            .auth(3)
            .err()
            .unwrap()
            .to_string()
            .contains("not in this keystore"));
        assert!(VaultKeys::decode(&b, &[4; 16]).is_err());
    }

    #[test]
    fn destroyed_versions_stay_out() {
        let mut k = sample();
        k.destroyed.insert((KeyClass::Auth, 2));
        let err = VaultKeys::decode(&k.encode(&[3; 16]), &[3; 16])
            .err()
            .unwrap();
        assert!(
            err.to_string().contains("both present and destroyed"),
            "{err}"
        );
        let k = sample();
        assert!(k
            .missing(KeyClass::Kek, 5)
            .to_string()
            .contains("destroyed"));
    }

    /// A version 2 file as the previous build wrote it still reads.
    #[test]
    fn version_2_reads() {
        let mut b = b"BVKS".to_vec();
        b.extend_from_slice(&2u16.to_le_bytes());
        b.extend_from_slice(&[0, 0]);
        b.extend_from_slice(&[3; 16]);
        b.extend_from_slice(&[1; 32]);
        b.extend_from_slice(&1u16.to_le_bytes());
        b.extend_from_slice(&1u32.to_le_bytes());
        b.extend_from_slice(&[2, 0, 0, 0]);
        b.extend_from_slice(&5u64.to_le_bytes());
        b.extend_from_slice(&[9; 32]);
        b.extend_from_slice(&[1, 0, 0, 0]);
        b.extend_from_slice(&[[4u8; 32], [5u8; 32]].concat());
        let sum = blake3::hash(&b);
        b.extend_from_slice(sum.as_bytes());
        let k = VaultKeys::decode(&b, &[3; 16]).unwrap();
        assert_eq!(k.auth(1).unwrap().expose(), &[1; 32]);
        assert_eq!(k.kek.versions()[0].state, KekState::Revoked);
        assert_eq!(k.infra(1).unwrap().expose()[0], 4);
    }
}
