//! Which snapshots a retention policy keeps: restic's `forget` rules, applied to one disk's
//! snapshots at a time.
//!
//! Snapshots are taken newest first (by time, then by sequence). `--keep-within D` keeps every
//! snapshot newer than the newest one's time minus D. Each counted rule (`last`, `hourly`,
//! `daily`, `weekly`, `monthly`, `yearly`) has a budget of N and a bucket function of the time
//! (`last`: each snapshot its own bucket; `hourly`: year, month, day, hour; `weekly`: ISO year
//! and week; …): walking newest to oldest, a snapshot whose bucket differs from the last one
//! that rule kept is kept by it while its budget lasts. A snapshot is kept if any rule keeps it,
//! and every rule that keeps it is named. This is restic's algorithm
//! (`internal/restic/snapshot_policy.go`); where this differs from restic:
//! - buckets are computed in UTC, not the local time zone, so two hosts agree on them;
//! - `--keep-within` subtracts months with the day clamped to the month's end (chrono):
//!   31 March minus 1 month is 28 (or 29) February, where Go's `AddDate` gives 3 March;
//! - an empty policy is refused (restic keeps everything and says so);
//! - counts are 1 and up: restic's `-1` ("unlimited") is not accepted;
//! - there are no tags, hosts or paths: snapshots are grouped by disk.

use chrono::{DateTime, Datelike, Months, TimeDelta, Timelike, Utc};

use crate::error::{Error, Result};

/// A retention policy. `None` means the rule is not used.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    /// Keep the N newest snapshots.
    pub last: Option<u32>,
    /// Keep the newest snapshot of each of the N newest hours that have one.
    pub hourly: Option<u32>,
    /// … days.
    pub daily: Option<u32>,
    /// … ISO weeks.
    pub weekly: Option<u32>,
    /// … months.
    pub monthly: Option<u32>,
    /// … years.
    pub yearly: Option<u32>,
    /// Keep every snapshot within this span of the newest one.
    pub within: Option<Within>,
}

/// A `--keep-within` span: restic's `1y2m3d4h` form (years, months, days, hours; each part
/// optional, in that order).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Within {
    /// Years.
    pub years: u32,
    /// Months.
    pub months: u32,
    /// Days.
    pub days: u32,
    /// Hours.
    pub hours: u32,
}

impl std::str::FromStr for Within {
    type Err = Error;

    fn from_str(s: &str) -> Result<Within> {
        let bad = || {
            Error::usage(format!(
                "--keep-within {s:?}: expected a span like 2y5m7d3h (years, months, days, hours, in that order; each part optional)"
            ))
        };
        let mut w = Within::default();
        let mut rest = s;
        let mut order = 0;
        while !rest.is_empty() {
            let digits = rest.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
            if digits == 0 {
                return Err(bad());
            }
            let n: u32 = rest[..digits].parse().map_err(|_| bad())?;
            let unit = rest[digits..].chars().next().ok_or_else(bad)?;
            let (rank, field) = match unit {
                'y' => (1, &mut w.years),
                'm' => (2, &mut w.months),
                'd' => (3, &mut w.days),
                'h' => (4, &mut w.hours),
                _ => return Err(bad()),
            };
            if rank <= order {
                return Err(bad());
            }
            order = rank;
            *field = n;
            rest = &rest[digits + 1..];
        }
        if order == 0 {
            return Err(bad());
        }
        Ok(w)
    }
}

impl std::fmt::Display for Within {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (n, unit) in [
            (self.years, 'y'),
            (self.months, 'm'),
            (self.days, 'd'),
            (self.hours, 'h'),
        ] {
            if n > 0 {
                write!(f, "{n}{unit}")?;
            }
        }
        Ok(())
    }
}

impl Policy {
    /// Refuse a policy with no rule: it would keep nothing, and a forgotten option must not
    /// empty a vault.
    pub fn check(&self) -> Result<()> {
        if *self == Policy::default() {
            return Err(Error::usage(
                "no retention rule given: pass at least one of --keep-last, --keep-hourly, --keep-daily, --keep-weekly, --keep-monthly, --keep-yearly, --keep-within",
            ));
        }
        Ok(())
    }
}

/// A snapshot as the policy sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    /// Seconds since the Unix epoch.
    pub time: u64,
    /// Its sequence among the disk's snapshots (orders snapshots of the same second).
    pub sequence: u64,
}

/// Why a snapshot is kept: the rules that keep it, in the order `within`, `last`, `hourly`,
/// `daily`, `weekly`, `monthly`, `yearly` (e.g. `"daily"`, `"within 7d"`). Empty: removed.
pub type Reasons = Vec<String>;

fn utc(secs: u64) -> DateTime<Utc> {
    DateTime::from_timestamp(i64::try_from(secs).unwrap_or(i64::MAX), 0)
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

/// The rules that keep each of `snapshots` (same order as given). Errors: an empty policy.
pub fn apply(policy: &Policy, snapshots: &[Candidate]) -> Result<Vec<Reasons>> {
    policy.check()?;
    let mut order: Vec<usize> = (0..snapshots.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse((snapshots[i].time, snapshots[i].sequence)));
    let mut rules: Vec<Rule> = [
        ("last", policy.last, by_order as Bucket),
        ("hourly", policy.hourly, by_hour),
        ("daily", policy.daily, by_day),
        ("weekly", policy.weekly, by_iso_week),
        ("monthly", policy.monthly, by_month),
        ("yearly", policy.yearly, by_year),
    ]
    .into_iter()
    .filter_map(|(name, n, bucket)| {
        n.filter(|n| *n > 0).map(|budget| Rule {
            name,
            budget,
            bucket,
            last: None,
        })
    })
    .collect();
    let within_since = match (policy.within, order.first()) {
        (Some(w), Some(&newest)) => Some((w, since(utc(snapshots[newest].time), w))),
        _ => None,
    };
    let mut reasons = vec![Reasons::new(); snapshots.len()];
    for (nr, &i) in order.iter().enumerate() {
        let t = utc(snapshots[i].time);
        if let Some((w, since)) = within_since {
            if t > since {
                reasons[i].push(format!("within {w}"));
            }
        }
        for rule in rules.iter_mut().filter(|r| r.budget > 0) {
            let value = (rule.bucket)(t, nr);
            if rule.last != Some(value) {
                rule.last = Some(value);
                rule.budget -= 1;
                reasons[i].push(rule.name.to_string());
            }
        }
    }
    Ok(reasons)
}

/// A counted rule's bucket of a snapshot: its time, and its place newest first.
type Bucket = fn(DateTime<Utc>, usize) -> i64;

/// A counted rule as it walks the snapshots: what is left of its budget, the last bucket kept.
struct Rule {
    name: &'static str,
    budget: u32,
    bucket: Bucket,
    last: Option<i64>,
}

fn by_order(_: DateTime<Utc>, nr: usize) -> i64 {
    nr as i64
}

fn by_hour(t: DateTime<Utc>, _: usize) -> i64 {
    by_day(t, 0) * 100 + i64::from(t.hour())
}

fn by_day(t: DateTime<Utc>, _: usize) -> i64 {
    by_month(t, 0) * 100 + i64::from(t.day())
}

fn by_iso_week(t: DateTime<Utc>, _: usize) -> i64 {
    let w = t.iso_week();
    i64::from(w.year()) * 100 + i64::from(w.week())
}

fn by_month(t: DateTime<Utc>, _: usize) -> i64 {
    by_year(t, 0) * 100 + i64::from(t.month())
}

fn by_year(t: DateTime<Utc>, _: usize) -> i64 {
    i64::from(t.year())
}

/// The newest snapshot's time minus `w` (calendar arithmetic in UTC, months clamped to the
/// month's end).
fn since(newest: DateTime<Utc>, w: Within) -> DateTime<Utc> {
    newest
        .checked_sub_months(Months::new(
            w.years.saturating_mul(12).saturating_add(w.months),
        ))
        .and_then(|t| t.checked_sub_signed(TimeDelta::days(i64::from(w.days))))
        .and_then(|t| t.checked_sub_signed(TimeDelta::hours(i64::from(w.hours))))
        .unwrap_or(DateTime::<Utc>::MIN_UTC)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn within_spans_parse_in_restic_form() {
        let w: Within = "2y5m7d3h".parse().unwrap();
        assert_eq!(
            w,
            Within {
                years: 2,
                months: 5,
                days: 7,
                hours: 3
            }
        );
        assert_eq!(w.to_string(), "2y5m7d3h");
        assert_eq!("36h".parse::<Within>().unwrap().hours, 36);
        for bad in ["", "7", "d", "3h2d", "1w", "1d1d", "-1d", "1.5d"] {
            assert!(bad.parse::<Within>().is_err(), "{bad}");
        }
    }

    #[test]
    fn an_empty_policy_is_refused() {
        let e = apply(&Policy::default(), &[]).unwrap_err();
        assert_eq!(e.kind(), crate::error::ErrorKind::Usage);
    }
}
