//! Infrastructure encryption: a store wrapper that encrypts every object with AES-256-XTS under
//! a platform-managed key, independent of the vault's own AES-GCM layer.
//!
//! Why a second layer: the inner layer's keys are wrapped by a KEK the vault owner may control
//! (customer-managed keys). This layer is keyed by the platform, so reading the stored bytes
//! needs *both* key custodies; a break of either one alone reveals nothing (defence in depth,
//! as in Azure's "infrastructure encryption"). XTS is length-preserving, so sizes, ranges and
//! pack offsets are unchanged and `get_range` stays cheap. It has no integrity of its own: a
//! changed ciphertext unit decrypts to garbage that the inner layer's GCM tags reject.
//!
//! Layout of an object of `n` bytes (`n ≥ 16`; docs/FORMAT.md, "Infrastructure encryption"):
//! ```text
//!  plaintext   | unit 0: 4096 | unit 1: 4096 | ... | last unit: n - 4096·k bytes          |
//!  stored      | XTS(T0)      | XTS(T1)      | ... | XTS(Tk), ciphertext stealing if the  |
//!                                                    length is not a multiple of 16       |
//!  the last unit is 16..=4096 bytes, or 4097..=4111 when a tail under 16 bytes is merged in
//!  T_i = BLAKE3-keyed(identity key, object key)[0..12] ‖ u32le(i)
//! ```
//! Every object key has its own 96-bit identity, so no two units of the vault share a tweak
//! (up to a 2^-96 collision per pair of object keys). Rewriting an object under the same key
//! would reuse its tweaks, as a disk sector rewrite does; the vault writes every object under
//! the layer once (a changed key record or escrow record is a new revision under a new name,
//! docs/FORMAT.md §1.2), and what is rewritten in place (config, head, recovery records) stays
//! outside the layer. The one exception, a leftover of a killed run that no head lists being
//! written again, shows only which 16-byte blocks of that unlisted object differ.
//!
//! **Key rotation** (`key rotate --infrastructure`, `keys::infra_rotation`) re-encrypts every
//! object under a new key, under the same name (the layer preserves lengths, so nothing above
//! it notices). While it runs, or after it was killed, objects are under either key: the store
//! is then in two-key mode ([`XtsStore::rotating_from`]) and tells them apart by their first
//! unit, which decrypts under the right key to the start of a vault object (magic, version,
//! reserved zeros: a wrong key gives random bytes, which pass with a chance of about 2^-56).
//! Objects only move from the previous key to the current one, so an answer "current" is
//! cached for the object, while "previous" is checked again at every read.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use aes::cipher::array::Array;
use aes::cipher::consts::{U32, U64};
use aes::cipher::KeyInit;
use aes::Aes256;
use zeroize::{Zeroize, ZeroizeOnDrop};

use super::xts_unit::Xts;
use super::{Precondition, Store, Tag, Unfinished};
use crate::crypto::secret::fill_random;
use crate::crypto::Secret32;
use crate::error::{Error, ErrorKind, Result};

/// Bytes per XTS data unit.
pub const UNIT_LEN: u64 = 4096;
/// The smallest object the layer stores: one AES block (XTS cannot encrypt less).
pub const MIN_OBJECT_LEN: u64 = 16;

/// Context of the object-identity subkey: fixed forever (changing it makes every
/// infrastructure-encrypted vault unreadable).
const IDENTITY_CONTEXT: &str = "blockvault 2026-11-28 infrastructure xts object identity v1";

/// The platform's 512-bit XTS key: AES-256 data key ‖ AES-256 tweak key. Zeroized on drop,
/// neither `Copy`, `Clone` nor `Debug`. The halves always differ (checked on construction):
/// XTS with equal halves loses its security proof (IEEE 1619-2018 requires distinct keys).
#[derive(Zeroize, ZeroizeOnDrop)]
pub struct InfraKey([u8; 64]);

impl InfraKey {
    /// A fresh key from the operating system's CSPRNG.
    pub fn generate() -> Result<Self> {
        let mut k = InfraKey([0; 64]);
        fill_random(&mut k.0)?;
        k.checked()
    }

    /// Take ownership of stored key bytes; the caller's copy should be zeroized by the caller.
    /// Fails with [`ErrorKind::Key`] if the two halves are equal.
    pub fn from_bytes(bytes: [u8; 64]) -> Result<Self> {
        InfraKey(bytes).checked()
    }

    /// The key bytes, for storing in the keystore.
    pub fn expose(&self) -> &[u8; 64] {
        &self.0
    }

    fn checked(self) -> Result<Self> {
        let (data, tweak) = self.0.split_at(32);
        // No early exit: how far two halves agree says something about the key.
        let diff = data
            .iter()
            .zip(tweak)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        if diff == 0 {
            return Err(Error::new(
                ErrorKind::Key,
                "infrastructure key: its two AES-256 halves are equal; XTS needs distinct data \
                 and tweak keys",
            ));
        }
        Ok(self)
    }
}

/// How an object of `len` bytes divides into data units.
#[derive(Clone, Copy, Debug)]
struct Units {
    len: u64,
    /// Index of the last unit (the one that absorbs a tail under 16 bytes).
    last: u32,
}

impl Units {
    /// The units of an object, or why the layer cannot hold one of `len` bytes.
    fn of(len: u64) -> std::result::Result<Units, String> {
        if len < MIN_OBJECT_LEN {
            return Err(format!(
                "{len} bytes is under the layer's minimum of {MIN_OBJECT_LEN}"
            ));
        }
        let count = len / UNIT_LEN + u64::from(len % UNIT_LEN >= MIN_OBJECT_LEN);
        let last = u32::try_from(count - 1).map_err(|_| {
            format!("{len} bytes is over the layer's maximum of 2^32 units of {UNIT_LEN} bytes")
        })?;
        Ok(Units { len, last })
    }

    /// Byte range of unit `i`.
    fn span(self, i: u32) -> std::ops::Range<u64> {
        let start = u64::from(i) * UNIT_LEN;
        let end = if i == self.last {
            self.len
        } else {
            start + UNIT_LEN
        };
        start..end
    }

    /// The unit holding byte `pos` (`pos < len`).
    fn containing(self, pos: u64) -> u32 {
        u32::try_from(pos / UNIT_LEN).map_or(self.last, |i| i.min(self.last))
    }
}

/// The layer's transform of whole objects under the platform key: the kernel the store
/// applies, public for benchmarks and tools that hold stored bytes.
pub struct InfraCipher {
    xts: Xts,
    /// Keys the per-object identity half of each tweak.
    identity: Secret32,
}

impl InfraCipher {
    /// The cipher of `key` (consumed; the expanded AES keys are zeroized on drop).
    pub fn new(key: InfraKey) -> Self {
        let whole: &Array<u8, U64> = key.expose().into();
        let (data, tweak) = whole.split_ref::<U32>();
        InfraCipher {
            xts: Xts::new(Aes256::new(data), Aes256::new(tweak)),
            identity: Secret32::from_bytes(blake3::derive_key(IDENTITY_CONTEXT, key.expose())),
        }
    }

    /// Encrypt the whole object `key` in place. A `Usage` error, naming the key, for objects
    /// under 16 bytes or over 2^32 units.
    pub fn encrypt(&self, key: &str, object: &mut [u8]) -> Result<()> {
        let units = Units::of(object.len() as u64).map_err(|why| {
            Error::usage(format!(
                "object {key}: infrastructure encryption (AES-XTS) cannot store it: {why}"
            ))
        })?;
        self.apply(key, units, 0, object, true);
        Ok(())
    }

    /// Decrypt the whole stored object `key` in place. An `Integrity` error for a length the
    /// layer never writes.
    pub fn decrypt(&self, key: &str, object: &mut [u8]) -> Result<()> {
        let units = stored_units(key, object.len() as u64)?;
        self.apply(key, units, 0, object, false);
        Ok(())
    }

    /// The 96-bit identity of `key`: secret-keyed, so the storage holder cannot tell from
    /// tweaks which objects are which.
    fn identity(&self, key: &str) -> [u8; 12] {
        let h = blake3::keyed_hash(self.identity.expose(), key.as_bytes());
        let mut id = [0; 12];
        id.copy_from_slice(&h.as_bytes()[..12]);
        id
    }

    /// Encrypt (or decrypt) `buf`, which holds units `first..` of object `key` laid out as
    /// `units`, starting at the first byte of unit `first` and ending at a unit's end.
    fn apply(&self, key: &str, units: Units, first: u32, buf: &mut [u8], encrypt: bool) {
        let id = self.identity(key);
        let mut rest = buf;
        let mut i = first;
        while !rest.is_empty() {
            let span = units.span(i);
            let (unit, tail) = rest.split_at_mut((span.end - span.start) as usize);
            let mut tweak = [0u8; 16];
            tweak[..12].copy_from_slice(&id);
            tweak[12..].copy_from_slice(&i.to_le_bytes());
            if encrypt {
                self.xts.encrypt_unit(unit, tweak);
            } else {
                self.xts.decrypt_unit(unit, tweak);
            }
            rest = tail;
            i = i.wrapping_add(1);
        }
    }
}

/// The units of a stored object of `len` bytes, or an `Integrity` error: it was not written
/// through this layer, or it was cut.
fn stored_units(key: &str, len: u64) -> Result<Units> {
    Units::of(len).map_err(|why| {
        Error::integrity(format!(
            "object {key}: {why}, so it was not written by the infrastructure encryption \
             layer (AES-XTS) or is damaged"
        ))
    })
}

/// A store whose objects are AES-256-XTS encrypted on the way in and decrypted on the way out.
/// Listing, deleting, sizes and locks pass through unchanged.
pub struct XtsStore {
    inner: Arc<dyn Store>,
    /// The key every write uses.
    cipher: InfraCipher,
    /// During a key rotation: the key objects not yet re-encrypted are still under.
    rotation: Option<Rotation>,
}

/// The two-key mode of a rotation: the previous key, how to recognise a correctly decrypted
/// first unit, and the objects found under the current key already (they stay there).
struct Rotation {
    previous: InfraCipher,
    recognise: fn(&[u8]) -> bool,
    current: Mutex<HashSet<String>>,
}

/// Which key of a rotation an object is under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Under {
    Current,
    Previous,
}

/// What [`XtsStore::reencrypt`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reencrypted {
    /// The object was under the previous key and is now under the current one.
    Moved,
    /// It was under the current key already (a rotation that was killed got that far).
    Already,
    /// It no longer exists (deleted since it was listed).
    Gone,
}

/// How often [`XtsStore::reencrypt`] reads an object again after it changed between its read
/// and its compare-and-swap (objects are written once, so once is the most it should take).
const REENCRYPT_ATTEMPTS: u32 = 8;

impl XtsStore {
    /// Wrap `inner` with the platform key `key` (consumed, and zeroized with the ciphers).
    pub fn new(inner: Arc<dyn Store>, key: InfraKey) -> Self {
        XtsStore {
            inner,
            cipher: InfraCipher::new(key),
            rotation: None,
        }
    }

    /// Two-key mode, while a rotation from `previous` to this store's key is unfinished:
    /// writes use the new key; a read decrypts each object with the key its first unit shows
    /// it is under, `recognise` telling whether a decrypted first unit (up to 4111 bytes) is
    /// the start of an object the vault writes. An object under neither key is decrypted with
    /// the current one, so the inner layer reports it as damaged, as it would without a
    /// rotation.
    pub fn rotating_from(mut self, previous: InfraKey, recognise: fn(&[u8]) -> bool) -> Self {
        self.rotation = Some(Rotation {
            previous: InfraCipher::new(previous),
            recognise,
            current: Mutex::new(HashSet::new()),
        });
        self
    }

    /// Which key the stored object `key` (laid out as `units`, its first unit's stored bytes
    /// `unit0`) is under; `None` if neither key gives a recognised start. Without a rotation,
    /// always the current key.
    fn under(&self, key: &str, units: Units, unit0: &[u8]) -> Option<Under> {
        let Some(r) = &self.rotation else {
            return Some(Under::Current);
        };
        let known = r
            .current
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(key);
        if known {
            return Some(Under::Current);
        }
        for (under, cipher) in [
            (Under::Current, &self.cipher),
            (Under::Previous, &r.previous),
        ] {
            let mut trial = unit0.to_vec();
            cipher.apply(key, units, 0, &mut trial, false);
            if (r.recognise)(&trial) {
                if under == Under::Current {
                    r.current
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .insert(key.to_string());
                }
                return Some(under);
            }
        }
        None
    }

    /// The cipher for an object under `under` (the current one when neither key fits).
    fn cipher(&self, under: Option<Under>) -> &InfraCipher {
        match (under, &self.rotation) {
            (Some(Under::Previous), Some(r)) => &r.previous,
            _ => &self.cipher,
        }
    }

    /// Decrypt a whole stored object `buf` with the key it is under.
    fn open(&self, key: &str, buf: &mut [u8]) -> Result<()> {
        let units = stored_units(key, buf.len() as u64)?;
        let first = units.span(0).end as usize;
        let under = self.under(key, units, &buf[..first]);
        self.cipher(under).apply(key, units, 0, buf, false);
        Ok(())
    }

    /// Which key `key` is under, read from its first unit (two-key mode only).
    fn probe(&self, key: &str, units: Units) -> Result<Option<Under>> {
        let first = units.span(0).end as usize;
        let unit0 = self.inner.get_range(key, 0, first)?;
        Ok(self.under(key, units, &unit0))
    }

    /// Re-encrypt `key` under the current key if it is under the previous one (two-key mode).
    /// The replacement is a compare-and-swap against the bytes read, so an object deleted or
    /// replaced meanwhile is never brought back: it is read again. An object under neither key
    /// is an `Integrity` error naming it.
    pub fn reencrypt(&self, key: &str) -> Result<Reencrypted> {
        let Some(r) = &self.rotation else {
            return Err(Error::usage(format!(
                "object {key}: no infrastructure key rotation to re-encrypt it for"
            )));
        };
        for _ in 0..REENCRYPT_ATTEMPTS {
            let (mut stored, tag) = match self.inner.get_tagged(key) {
                Ok(got) => got,
                Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Reencrypted::Gone),
                Err(e) => return Err(e),
            };
            let units = stored_units(key, stored.len() as u64)?;
            let first = units.span(0).end as usize;
            match self.under(key, units, &stored[..first]) {
                Some(Under::Current) => return Ok(Reencrypted::Already),
                Some(Under::Previous) => {
                    r.previous.apply(key, units, 0, &mut stored, false);
                    self.cipher.apply(key, units, 0, &mut stored, true);
                    match self.inner.put_if(key, &stored, &Precondition::Matches(tag)) {
                        Ok(_) => {
                            r.current
                                .lock()
                                .unwrap_or_else(PoisonError::into_inner)
                                .insert(key.to_string());
                            return Ok(Reencrypted::Moved);
                        }
                        // Changed or deleted since it was read: look at it again.
                        Err(e) if e.kind() == ErrorKind::Conflict => {}
                        Err(e) => return Err(e),
                    }
                }
                None => {
                    return Err(Error::integrity(format!(
                        "object {key}: decrypts to no vault object under either infrastructure key (the current or the previous one): damaged, or not written by blockvault"
                    )))
                }
            }
        }
        Err(Error::new(
            ErrorKind::Conflict,
            format!("object {key} changed under {REENCRYPT_ATTEMPTS} attempts to re-encrypt it"),
        ))
    }

    /// Encrypt `data` into the calling thread's scratch buffer and hand it to `write`. The
    /// buffer is kept between calls: a fresh 32 MiB allocation per pack costs more in page
    /// faults than the encryption itself.
    fn sealed(
        &self,
        key: &str,
        data: &[u8],
        write: impl FnOnce(&[u8]) -> Result<()>,
    ) -> Result<()> {
        thread_local! {
            static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        SCRATCH.with(|cell| {
            let mut buf = cell.borrow_mut();
            buf.clear();
            buf.extend_from_slice(data);
            self.cipher.encrypt(key, &mut buf)?;
            write(&buf)
        })
    }
}

impl Store for XtsStore {
    fn put(&self, key: &str, data: &[u8]) -> Result<()> {
        self.sealed(key, data, |b| self.inner.put(key, b))
    }

    fn put_owned(&self, key: &str, mut data: Vec<u8>) -> Result<Vec<u8>> {
        // Encrypted in place: the caller gave the buffer up, no scratch copy is needed.
        self.cipher.encrypt(key, &mut data)?;
        self.inner.put_owned(key, data)
    }

    fn puts_in_flight(&self) -> usize {
        self.inner.puts_in_flight()
    }

    fn put_new(&self, key: &str, data: &[u8]) -> Result<()> {
        self.sealed(key, data, |b| self.inner.put_new(key, b))
    }

    fn get(&self, key: &str) -> Result<Vec<u8>> {
        let mut buf = self.inner.get(key)?;
        self.open(key, &mut buf)?;
        Ok(buf)
    }

    fn get_tagged(&self, key: &str) -> Result<(Vec<u8>, Tag)> {
        let (mut buf, tag) = self.inner.get_tagged(key)?;
        self.open(key, &mut buf)?;
        Ok((buf, tag))
    }

    fn put_if(&self, key: &str, data: &[u8], pre: &Precondition) -> Result<Tag> {
        let mut tag = None;
        self.sealed(key, data, |b| {
            tag = Some(self.inner.put_if(key, b, pre)?);
            Ok(())
        })?;
        Ok(tag.expect("sealed calls its writer once or fails"))
    }

    /// Reads and decrypts only the units covering the range. The unit layout depends on the
    /// object's size, read first: an object replaced by one of another size between the two
    /// reads decrypts to bytes the inner layer rejects (vault objects are never replaced, and
    /// a rotation keeps their size). In two-key mode, a range that does not start at unit 0
    /// needs the first unit read too, to tell the key; if that says "previous", it is read
    /// again after the range, since a rotation may have re-encrypted the object in between
    /// (it never goes back, so two agreeing probes bracket a read under that key).
    fn get_range(&self, key: &str, offset: u64, len: usize) -> Result<Vec<u8>> {
        let size = self.inner.size(key)?;
        let end = offset
            .checked_add(len as u64)
            .filter(|&end| end <= size)
            .ok_or_else(|| {
                Error::integrity(format!(
                    "object {key} is truncated: {len} bytes at offset {offset} run past its end"
                ))
            })?;
        if len == 0 {
            return Ok(Vec::new());
        }
        let units = stored_units(key, size)?;
        let (first, last) = (units.containing(offset), units.containing(end - 1));
        let covered = units.span(first).start..units.span(last).end;
        let want = (covered.end - covered.start) as usize;
        let read = || -> Result<Vec<u8>> {
            let buf = self.inner.get_range(key, covered.start, want)?;
            if buf.len() != want {
                return Err(Error::integrity(format!(
                    "object {key}: the store returned {} bytes at offset {} instead of {want}",
                    buf.len(),
                    covered.start
                )));
            }
            Ok(buf)
        };
        let (mut buf, under) = if first == 0 {
            let buf = read()?;
            let under = self.under(key, units, &buf[..units.span(0).end as usize]);
            (buf, under)
        } else if self.rotation.is_none() {
            (read()?, Some(Under::Current))
        } else {
            let before = self.probe(key, units)?;
            let buf = read()?;
            match before {
                Some(Under::Previous) if self.probe(key, units)? != before => {
                    (read()?, Some(Under::Current))
                }
                _ => (buf, before),
            }
        };
        self.cipher(under).apply(key, units, first, &mut buf, false);
        let skip = (offset - covered.start) as usize;
        buf.copy_within(skip..skip + len, 0);
        buf.truncate(len);
        Ok(buf)
    }

    fn list(&self, prefix: &str) -> Result<Vec<String>> {
        self.inner.list(prefix)
    }

    fn delete(&self, key: &str) -> Result<()> {
        self.inner.delete(key)
    }

    fn size(&self, key: &str) -> Result<u64> {
        self.inner.size(key)
    }

    fn modified(&self, key: &str) -> Result<std::time::SystemTime> {
        self.inner.modified(key)
    }

    fn unfinished(&self) -> Result<Vec<Unfinished>> {
        // The layer preserves lengths: what the backend holds is what the writes left.
        self.inner.unfinished()
    }

    fn lock(&self, name: &str, wait: Duration) -> Result<Box<dyn Send>> {
        self.inner.lock(name, wait)
    }

    fn location(&self) -> String {
        format!("{} (infrastructure encryption)", self.inner.location())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vault::store::LocalStore;

    /// Deterministic test bytes.
    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 8) as u8)
            .collect()
    }

    fn key(first: u8) -> InfraKey {
        let mut b = [0u8; 64];
        for (i, x) in b.iter_mut().enumerate() {
            *x = first.wrapping_add(i as u8);
        }
        InfraKey::from_bytes(b).unwrap()
    }

    /// An XTS store over a local store in a fresh folder, and that local store.
    fn stores(k: InfraKey) -> (tempfile::TempDir, XtsStore, Arc<dyn Store>) {
        let dir = tempfile::tempdir().unwrap();
        let inner: Arc<dyn Store> = Arc::new(LocalStore::new(dir.path().join("vault")));
        (dir, XtsStore::new(inner.clone(), k), inner)
    }

    const SIZES: [usize; 9] = [16, 17, 4095, 4096, 4097, 4111, 4112, 8191, (1 << 20) + 5];

    #[test]
    fn unit_layout() {
        let spans = |len| {
            let u = Units::of(len).unwrap();
            (0..=u.last).map(|i| u.span(i)).collect::<Vec<_>>()
        };
        assert_eq!(spans(16), vec![0..16]);
        assert_eq!(spans(4111), vec![0..4111]);
        assert_eq!(spans(4112), vec![0..4096, 4096..4112]);
        assert_eq!(spans(8192), vec![0..4096, 4096..8192]);
        assert_eq!(spans(8197), vec![0..4096, 4096..8197]);
        assert!(Units::of(15).unwrap_err().contains("15 bytes"));
        assert!(Units::of(0).is_err());
        // 2^32 units is the most a 32-bit unit number can name.
        assert_eq!(Units::of(UNIT_LEN << 32).unwrap().last, u32::MAX);
        assert_eq!(Units::of((UNIT_LEN << 32) + 15).unwrap().last, u32::MAX);
        assert!(Units::of((UNIT_LEN << 32) + 16)
            .unwrap_err()
            .contains("2^32 units"));
    }

    #[test]
    fn objects_round_trip_length_preserved_and_stored_encrypted() {
        let (_d, s, inner) = stores(key(1));
        for len in SIZES {
            let data = pattern(len, 7);
            s.put("packs/ab/obj", &data).unwrap();
            let stored = inner.get("packs/ab/obj").unwrap();
            assert_eq!(stored.len(), len);
            assert_ne!(stored, data, "{len} bytes stored in the clear");
            // Every unit is encrypted, the merged tail included.
            for unit in stored
                .chunks(UNIT_LEN as usize)
                .zip(data.chunks(UNIT_LEN as usize))
            {
                assert_ne!(unit.0, unit.1, "{len}");
            }
            assert_eq!(s.get("packs/ab/obj").unwrap(), data, "{len}");
            assert_eq!(s.size("packs/ab/obj").unwrap(), len as u64);
        }
    }

    #[test]
    fn ranges_at_unit_boundaries_and_across_the_merged_tail() {
        let (_d, s, _) = stores(key(2));
        for len in [16usize, 4111, 4112, 8191, 3 * 4096 + 5, 3 * 4096 + 16] {
            let data = pattern(len, 3);
            s.put("obj", &data).unwrap();
            let n = len as u64;
            let mut points: Vec<u64> = [0, 1, 15, 16, 17, 4095, 4096, 4097, 8191, 8192, 8193]
                .into_iter()
                .chain([n - 16, n - 15, n - 5, n - 1, n])
                .filter(|&p| p <= n)
                .collect();
            points.sort_unstable();
            points.dedup();
            for &a in &points {
                for &b in points.iter().filter(|&&b| b >= a) {
                    let got = s.get_range("obj", a, (b - a) as usize).unwrap();
                    assert_eq!(got, &data[a as usize..b as usize], "{len}: {a}..{b}");
                }
            }
            let e = s.get_range("obj", n - 1, 2).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Integrity, "{e:?}");
        }
    }

    #[test]
    fn ciphertext_depends_on_the_key_and_the_object_identity() {
        let data = pattern(3 * 4096 + 7, 9);
        let (_d1, a, a_inner) = stores(key(1));
        let (_d2, b, b_inner) = stores(key(2));
        a.put("packs/aa/x", &data).unwrap();
        b.put("packs/aa/x", &data).unwrap();
        a.put("packs/aa/y", &data).unwrap();
        let ax = a_inner.get("packs/aa/x").unwrap();
        let bx = b_inner.get("packs/aa/x").unwrap();
        let ay = a_inner.get("packs/aa/y").unwrap();
        for (what, other) in [("another key", &bx), ("another object key", &ay)] {
            // No 16-byte block agrees, so no unit shares a tweak and key with the other.
            for (i, (p, q)) in ax.chunks(16).zip(other.chunks(16)).enumerate() {
                assert_ne!(p, q, "{what}: block {i} equal");
            }
        }
        // Equal units at different positions of one object differ too (the unit number).
        let same = vec![0x5a; 2 * 4096];
        a.put("z", &same).unwrap();
        let z = a_inner.get("z").unwrap();
        assert_ne!(z[..4096], z[4096..]);
    }

    #[test]
    fn objects_under_one_block_are_refused_naming_the_key() {
        let (_d, s, inner) = stores(key(3));
        for len in [0, 1, 15] {
            for put in [XtsStore::put, XtsStore::put_new] {
                let e = put(&s, "keys/d/00000000", &pattern(len, 0)).unwrap_err();
                assert_eq!(e.kind(), ErrorKind::Usage, "{e:?}");
                assert!(e.to_string().contains("keys/d/00000000"), "{e}");
                assert!(e.to_string().contains(&format!("{len} bytes")), "{e}");
            }
        }
        assert!(inner.list("").unwrap().is_empty());
    }

    #[test]
    fn stored_objects_too_short_for_the_layer_are_integrity_errors() {
        let (_d, s, inner) = stores(key(4));
        inner.put("short", &[1; 15]).unwrap();
        for e in [
            s.get("short").unwrap_err(),
            s.get_range("short", 0, 1).unwrap_err(),
        ] {
            assert_eq!(e.kind(), ErrorKind::Integrity, "{e:?}");
            assert!(e.to_string().contains("short"), "{e}");
        }
        assert_eq!(s.get("missing").unwrap_err().kind(), ErrorKind::NotFound);
    }

    #[test]
    fn a_changed_unit_changes_only_that_unit() {
        // XTS has no integrity: a flipped bit garbles its 16-byte block (and the stolen block
        // of the tail), never the other units. The inner layer's tags are what catch it.
        let (_d, s, inner) = stores(key(5));
        let data = pattern(3 * 4096, 1);
        s.put("obj", &data).unwrap();
        let mut stored = inner.get("obj").unwrap();
        stored[4096 + 100] ^= 1;
        inner.put("obj", &stored).unwrap();
        let got = s.get("obj").unwrap();
        assert_eq!(got[..4096], data[..4096]);
        assert_ne!(got[4096 + 96..4096 + 112], data[4096 + 96..4096 + 112]);
        assert_eq!(got[4096 + 112..], data[4096 + 112..]);
    }

    #[test]
    fn key_halves_must_differ() {
        let e = InfraKey::from_bytes([7; 64]).err().expect("equal halves");
        assert_eq!(e.kind(), ErrorKind::Key);
        assert!(e.to_string().contains("halves"), "{e}");
        let mut b = [7; 64];
        b[63] = 8;
        assert_eq!(InfraKey::from_bytes(b).unwrap().expose(), &b);
        let (g1, g2) = (InfraKey::generate().unwrap(), InfraKey::generate().unwrap());
        assert_ne!(g1.expose(), g2.expose());
    }

    /// The test vector of docs/FORMAT.md. The expected bytes were computed independently with
    /// OpenSSL's AES-256-XTS (through Python `cryptography`), the 4101-byte merged tail with
    /// its ciphertext stealing included; the identity is this code's BLAKE3, pinned.
    #[test]
    fn known_answer() {
        let mut b = [0u8; 64];
        for (i, x) in b.iter_mut().enumerate() {
            *x = i as u8;
        }
        let (_d, s, inner) = stores(InfraKey::from_bytes(b).unwrap());
        let key = "packs/ab/example";
        assert_eq!(
            hex::encode(s.cipher.identity(key)),
            "8a4404ff5883ddb4e793b702"
        );
        let counting = |len: usize| (0..len).map(|i| i as u8).collect::<Vec<u8>>();
        s.put(key, &counting(40)).unwrap();
        assert_eq!(
            hex::encode(inner.get(key).unwrap()),
            "cc1d7225250ab5b3710428af087b6bc7a34b471f6e1910dd62ed53da4041364c4a332c78bfbb0409"
        );
        s.put(key, &counting(3 * 4096 + 5)).unwrap();
        let stored = inner.get(key).unwrap();
        assert_eq!(
            hex::encode(ring::digest::digest(&ring::digest::SHA256, &stored)),
            "8a6a8f28a4e93b200646130f453278ee214ad4b94a5ea5a2b0907d9691a7adfc"
        );
    }

    /// Test objects start like vault objects: magic, version 1, reserved zeros.
    fn object(len: usize, seed: u8) -> Vec<u8> {
        let mut b = pattern(len, seed);
        b[..8].copy_from_slice(b"BVPK\x01\0\0\0");
        b
    }

    fn starts_like_object(b: &[u8]) -> bool {
        b.len() >= 8 && b[..8] == *b"BVPK\x01\0\0\0"
    }

    /// Two-key mode: objects under the previous key and under the current one read back
    /// (whole and by range, also past unit 0); `reencrypt` moves the former, skips the latter
    /// and reports objects gone; the stored bytes then equal what the current key writes;
    /// an object under neither key is an Integrity error naming it.
    #[test]
    fn rotation_reads_both_keys_and_reencrypts() {
        let dir = tempfile::tempdir().unwrap();
        let inner: Arc<dyn Store> = Arc::new(LocalStore::new(dir.path().join("vault")));
        let old = XtsStore::new(inner.clone(), key(1));
        let new_only = XtsStore::new(inner.clone(), key(100));
        let rotating =
            XtsStore::new(inner.clone(), key(100)).rotating_from(key(1), starts_like_object);
        for (i, len) in SIZES.iter().enumerate() {
            let data = object(*len, i as u8);
            let (a, b) = (format!("packs/a{i}"), format!("packs/b{i}"));
            old.put(&a, &data).unwrap();
            rotating.put(&b, &data).unwrap();
            for name in [&a, &b] {
                assert_eq!(rotating.get(name).unwrap(), data, "{name}");
                assert_eq!(rotating.get_tagged(name).unwrap().0, data, "{name}");
                let at = len / 2;
                assert_eq!(
                    rotating.get_range(name, at as u64, len - at).unwrap(),
                    data[at..],
                    "{name}"
                );
            }
            assert_eq!(rotating.reencrypt(&a).unwrap(), Reencrypted::Moved);
            assert_eq!(rotating.reencrypt(&a).unwrap(), Reencrypted::Already);
            assert_eq!(rotating.reencrypt(&b).unwrap(), Reencrypted::Already);
            assert_eq!(new_only.get(&a).unwrap(), data);
            let mut expected = data.clone();
            new_only.cipher.encrypt(&a, &mut expected).unwrap();
            assert_eq!(
                inner.get(&a).unwrap(),
                expected,
                "{a}: not as the new key writes it"
            );
        }
        assert_eq!(rotating.reencrypt("packs/none").unwrap(), Reencrypted::Gone);
        XtsStore::new(inner.clone(), key(50))
            .put("packs/foreign", &object(5000, 9))
            .unwrap();
        let e = rotating.reencrypt("packs/foreign").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Integrity);
        assert!(e.to_string().contains("packs/foreign"), "{e}");
        assert!(
            new_only.reencrypt("packs/a0").is_err(),
            "one-key mode has nothing to do"
        );
    }
}
