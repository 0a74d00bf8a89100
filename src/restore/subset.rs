//! Which packs `verify` reads whole: none, all, or a subset (`--read-data-subset`, as restic
//! has it), since reading every byte of a cloud vault every day costs money.
//!
//! `n/m` takes the packs whose id, read as a big-endian number, is n − 1 modulo m: ids are
//! BLAKE3 hashes, so the m slices are about equal and running n = 1, 2, … m (a day each, say)
//! reads every pack exactly once. `P%` takes a random P percent of the packs (at least one),
//! different on every run.

use std::collections::BTreeSet;

use crate::crypto::secret::random_bytes;
use crate::error::{Error, Result};
use crate::vault::pack::PackId;

/// Which packs to read.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ReadData {
    /// None: structure only.
    None,
    /// Every referenced pack.
    All,
    /// Slice `n` of `m` (1 ≤ n ≤ m).
    Slice {
        /// Which slice.
        n: u64,
        /// Of how many.
        m: u64,
    },
    /// A random share, in percent (0 < p ≤ 100).
    Percent(f64),
}

impl std::str::FromStr for ReadData {
    type Err = Error;

    fn from_str(s: &str) -> Result<ReadData> {
        let bad = || {
            Error::usage(format!(
                "--read-data-subset {s:?}: expected N/M (1 <= N <= M, e.g. 3/7) or a percentage (e.g. 10%)"
            ))
        };
        if let Some(p) = s.strip_suffix('%') {
            let p: f64 = p.parse().map_err(|_| bad())?;
            return if p > 0.0 && p <= 100.0 {
                Ok(ReadData::Percent(p))
            } else {
                Err(bad())
            };
        }
        let (n, m) = s.split_once('/').ok_or_else(bad)?;
        let (n, m): (u64, u64) = (n.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
        if n == 0 || n > m {
            return Err(bad());
        }
        Ok(ReadData::Slice { n, m })
    }
}

impl std::fmt::Display for ReadData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadData::None => f.write_str("none"),
            ReadData::All => f.write_str("all"),
            ReadData::Slice { n, m } => write!(f, "{n}/{m}"),
            ReadData::Percent(p) => write!(f, "{p}%"),
        }
    }
}

impl ReadData {
    /// The packs of `all` to read.
    pub fn select(&self, all: &BTreeSet<PackId>) -> Result<BTreeSet<PackId>> {
        Ok(match *self {
            ReadData::None => BTreeSet::new(),
            ReadData::All => all.clone(),
            ReadData::Slice { n, m } => all
                .iter()
                .filter(|id| slice_of(id, m) == n - 1)
                .copied()
                .collect(),
            ReadData::Percent(p) => {
                let want = ((all.len() as f64 * p / 100.0).ceil() as usize).min(all.len());
                let salt = random_bytes::<32>()?;
                let mut ranked: Vec<(blake3::Hash, PackId)> = all
                    .iter()
                    .map(|id| (blake3::keyed_hash(&salt, &id.0), *id))
                    .collect();
                ranked.sort_by_key(|(h, _)| *h.as_bytes());
                ranked
                    .into_iter()
                    .take(want.max(1))
                    .map(|(_, id)| id)
                    .collect()
            }
        })
    }
}

/// The pack id as a 256-bit big-endian number, modulo `m`.
fn slice_of(id: &PackId, m: u64) -> u64 {
    id.0.iter()
        .fold(0u128, |acc, b| (acc * 256 + u128::from(*b)) % u128::from(m)) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_cover_every_pack_once() {
        let all: BTreeSet<PackId> = (0..200u8)
            .map(|i| PackId(*blake3::hash(&[i]).as_bytes()))
            .collect();
        let mut seen = BTreeSet::new();
        for n in 1..=7 {
            let s = ReadData::Slice { n, m: 7 }.select(&all).unwrap();
            assert!(s.len() > 10, "{n}: {}", s.len());
            assert!(seen.is_disjoint(&s));
            seen.extend(s);
        }
        assert_eq!(seen, all);
        assert_eq!(ReadData::Percent(10.0).select(&all).unwrap().len(), 20);
        assert_eq!(ReadData::Percent(0.1).select(&all).unwrap().len(), 1);
    }

    #[test]
    fn subsets_parse() {
        assert_eq!(
            "3/7".parse::<ReadData>().unwrap(),
            ReadData::Slice { n: 3, m: 7 }
        );
        assert_eq!("2.5%".parse::<ReadData>().unwrap(), ReadData::Percent(2.5));
        for bad in ["0/3", "4/3", "1/0", "x", "0%", "101%", "1/", "/2", "-1%"] {
            assert!(bad.parse::<ReadData>().is_err(), "{bad}");
        }
    }
}
