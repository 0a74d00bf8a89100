//! How far the store's clock is from ours.
//!
//! Object ages ([`Store::modified`]) are the store's timestamps; a host deciding that an object
//! is old enough (retention, expired leases of other hosts) compares them with its own clock,
//! so it must know the offset. [`skew`] writes a probe object between two readings of the
//! local clock and compares the store's timestamp of it with their midpoint. HTTP dates have
//! whole seconds, so the result is good to about a second plus half the round trip.

use std::time::{Duration, SystemTime};

use super::Store;
use crate::crypto::secret::random_bytes;
use crate::error::Result;

/// The store's clock minus the local clock, and how precisely that is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Skew {
    /// Store time − local time, in milliseconds (positive: the store is ahead).
    pub offset_ms: i64,
    /// The measurement is good to ± this many milliseconds.
    pub uncertainty_ms: u64,
}

impl Skew {
    /// Whether the clocks may differ by more than `limit` (the offset beyond the limit even
    /// after the uncertainty is given the benefit of the doubt).
    pub fn exceeds(&self, limit: Duration) -> bool {
        self.offset_ms
            .unsigned_abs()
            .saturating_sub(self.uncertainty_ms)
            > limit.as_millis() as u64
    }
}

/// Measure the skew of `store`'s clock (one PUT, one HEAD, one DELETE of `probes/clock-*`).
pub fn skew(store: &dyn Store) -> Result<Skew> {
    let key = format!("probes/clock-{}", hex::encode(random_bytes::<8>()?));
    let before = SystemTime::now();
    store.put(&key, b"blockvault clock probe")?;
    let after = SystemTime::now();
    let stamped = store.modified(&key);
    let deleted = store.delete(&key);
    let stamped = stamped?;
    deleted?;
    let ms = |t: SystemTime| -> i128 {
        match t.duration_since(SystemTime::UNIX_EPOCH) {
            Ok(d) => d.as_millis() as i128,
            Err(e) => -(e.duration().as_millis() as i128),
        }
    };
    let (b, a, s) = (ms(before), ms(after), ms(stamped));
    let mid = (b + a) / 2;
    // Whole-second timestamps are truncated: the true write time is in [s, s + 1000).
    let half_round_trip = ((a - b) / 2) as u64;
    Ok(Skew {
        offset_ms: (s + 500 - mid).clamp(i64::MIN as i128, i64::MAX as i128) as i64,
        uncertainty_ms: half_round_trip + 500,
    })
}
