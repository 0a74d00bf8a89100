//! `forget`: restic's retention rules. The policy itself is checked against an independent
//! reference implementation written here (its own calendar arithmetic, bucket by bucket
//! rather than restic's single walk) over random snapshot times; the command through the
//! binary: the snapshots it removes leave the head (listing, restore) and their manifests
//! are deleted, `--json` names the rules that kept each, `--dry-run` changes nothing, the
//! remaining snapshots restore bit for bit, the vault verifies, seal counts and sequences
//! never go down, bad policies and unknown disks are refused.

mod common;

use std::collections::BTreeMap;

use blockvault::crypto::Keystore;
use blockvault::retention::policy::{self, Candidate, Policy, Within};
use blockvault::vault::Vault;
use common::*;
use proptest::prelude::*;
use serde_json::Value;

// ----- the reference ------------------------------------------------------------------------

/// (year, month, day) of a day count since 1970-01-01 (H. Hinnant's civil_from_days).
fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// Day count since 1970-01-01 of a date (days_from_civil).
fn days_of(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = i64::from((m + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn month_len(y: i64, m: u32) -> u32 {
    (days_of(if m == 12 { y + 1 } else { y }, m % 12 + 1, 1) - days_of(y, m, 1)) as u32
}

/// ISO (year, week) of a day count: the week's Thursday decides the year.
fn iso_week(days: i64) -> (i64, i64) {
    let weekday = (days + 3).rem_euclid(7); // 0 = Monday; 1970-01-01 was a Thursday
    let thursday = days - weekday + 3;
    let (y, _, _) = civil(thursday);
    (y, (thursday - days_of(y, 1, 1)) / 7 + 1)
}

fn bucket(rule: &str, t: u64) -> i64 {
    let days = (t / 86_400) as i64;
    let (y, m, d) = civil(days);
    let h = ((t % 86_400) / 3600) as i64;
    match rule {
        "hourly" => ((y * 100 + i64::from(m)) * 100 + i64::from(d)) * 100 + h,
        "daily" => (y * 100 + i64::from(m)) * 100 + i64::from(d),
        "weekly" => {
            let (wy, w) = iso_week(days);
            wy * 100 + w
        }
        "monthly" => y * 100 + i64::from(m),
        "yearly" => y,
        _ => unreachable!(),
    }
}

/// `newest - w`, months first with the day clamped to the month's end, then days and hours.
fn since(newest: u64, w: Within) -> i64 {
    let days = (newest / 86_400) as i64;
    let rest = (newest % 86_400) as i64;
    let (y, m, d) = civil(days);
    let months = y * 12 + i64::from(m) - 1 - i64::from(w.years) * 12 - i64::from(w.months);
    let (y2, m2) = (months.div_euclid(12), (months.rem_euclid(12) + 1) as u32);
    let d2 = d.min(month_len(y2, m2));
    (days_of(y2, m2, d2) - i64::from(w.days)) * 86_400 + rest - i64::from(w.hours) * 3600
}

/// The reasons each snapshot is kept, by the rules' definitions: for a counted rule, the
/// newest snapshot of each of its N newest buckets; for `within`, every snapshot after
/// `since`.
fn reference(p: &Policy, snaps: &[Candidate]) -> Vec<Vec<String>> {
    let mut order: Vec<usize> = (0..snaps.len()).collect();
    order.sort_by(|&a, &b| {
        (snaps[b].time, snaps[b].sequence).cmp(&(snaps[a].time, snaps[a].sequence))
    });
    let mut reasons = vec![Vec::new(); snaps.len()];
    if let (Some(w), Some(&newest)) = (p.within, order.first()) {
        let since = since(snaps[newest].time, w);
        for &i in &order {
            if snaps[i].time as i64 > since {
                reasons[i].push(format!("within {w}"));
            }
        }
    }
    if let Some(n) = p.last {
        for &i in order.iter().take(n as usize) {
            reasons[i].push("last".to_string());
        }
    }
    for (rule, n) in [
        ("hourly", p.hourly),
        ("daily", p.daily),
        ("weekly", p.weekly),
        ("monthly", p.monthly),
        ("yearly", p.yearly),
    ] {
        let Some(n) = n else { continue };
        // The newest snapshot of each bucket, buckets newest first.
        let mut newest_of: Vec<(i64, usize)> = Vec::new();
        for &i in &order {
            let b = bucket(rule, snaps[i].time);
            if !newest_of.iter().any(|(seen, _)| *seen == b) {
                newest_of.push((b, i));
            }
        }
        for (_, i) in newest_of.into_iter().take(n as usize) {
            reasons[i].push(rule.to_string());
        }
    }
    reasons
}

fn some_count() -> impl Strategy<Value = Option<u32>> {
    prop_oneof![Just(None), (1u32..6).prop_map(Some)]
}

fn some_within() -> impl Strategy<Value = Option<Within>> {
    prop_oneof![
        Just(None),
        (0u32..3, 0u32..14, 0u32..40, 0u32..50).prop_map(|(years, months, days, hours)| {
            let w = Within {
                years,
                months,
                days,
                hours,
            };
            (w != Within::default()).then_some(w)
        })
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn the_policy_keeps_what_the_reference_keeps(
        base in 946_684_800u64..2_208_988_800,
        // Clustered times (minutes to months apart) so that buckets hold several snapshots,
        // month ends and year and ISO-week boundaries are crossed.
        steps in proptest::collection::vec(
            prop_oneof![0u64..120, 0u64..7200, 0u64..200_000, 0u64..5_000_000, 0u64..80_000_000],
            0..40,
        ),
        shuffle in any::<u64>(),
        last in some_count(), hourly in some_count(), daily in some_count(),
        weekly in some_count(), monthly in some_count(), yearly in some_count(),
        within in some_within(),
    ) {
        let p = Policy { last, hourly, daily, weekly, monthly, yearly, within };
        prop_assume!(p != Policy::default());
        let mut t = base;
        let mut snaps: Vec<Candidate> = steps.iter().enumerate().map(|(i, s)| {
            t += s;
            Candidate { time: t, sequence: i as u64 }
        }).collect();
        // Commit order need not be time order (another host's clock): shuffle the sequences.
        let mut rng = common::Rng::new(shuffle);
        for i in (1..snaps.len()).rev() {
            let j = rng.below(i as u64 + 1) as usize;
            let s = snaps[i].sequence;
            snaps[i].sequence = snaps[j].sequence;
            snaps[j].sequence = s;
        }
        let got = policy::apply(&p, &snaps).unwrap();
        prop_assert_eq!(got, reference(&p, &snaps), "{:?} {:?}", p, snaps);
    }
}

#[test]
fn month_ends_clamp_and_weeks_are_iso() {
    // 2024-03-31 12:00 minus 1 month is 2024-02-29 12:00 (clamped), not 2 March.
    let newest = days_of(2024, 3, 31) as u64 * 86_400 + 12 * 3600;
    let feb29 = days_of(2024, 2, 29) as u64 * 86_400 + 12 * 3600;
    let snaps = [
        Candidate {
            time: newest,
            sequence: 2,
        },
        Candidate {
            time: feb29 + 1,
            sequence: 1,
        },
        Candidate {
            time: feb29,
            sequence: 0,
        },
    ];
    let p = Policy {
        within: Some("1m".parse().unwrap()),
        ..Policy::default()
    };
    let r = policy::apply(&p, &snaps).unwrap();
    assert_eq!(r, vec![vec!["within 1m"], vec!["within 1m"], vec![]]);
    // 2021-01-03 (a Sunday) is in ISO week 53 of 2020, 2021-01-04 starts week 1 of 2021.
    let sunday = days_of(2021, 1, 3) as u64 * 86_400;
    let monday = days_of(2021, 1, 4) as u64 * 86_400;
    let p = Policy {
        weekly: Some(5),
        ..Policy::default()
    };
    let snaps = [
        Candidate {
            time: monday,
            sequence: 1,
        },
        Candidate {
            time: sunday,
            sequence: 0,
        },
        Candidate {
            time: sunday - 3600,
            sequence: 2,
        },
    ];
    let r = policy::apply(&p, &snaps).unwrap();
    assert_eq!(r, vec![vec!["weekly"], vec!["weekly"], vec![]]);
    assert_eq!(iso_week(days_of(2021, 1, 3)), (2020, 53));
}

// ----- through the binary --------------------------------------------------------------------

/// A 3 MiB image changed in one slot before each of `n` backups of disk `disk`; the images'
/// bytes by snapshot id.
fn backups(bv: &Bv, disk: &str, n: u64, seed: u64) -> BTreeMap<String, Vec<u8>> {
    let img = bv.path(&format!("{disk}.img"));
    let mut data = random_data(seed, 3 << 20);
    let mut out = BTreeMap::new();
    for i in 0..n {
        let at = ((i % 3) << 20) as usize + 4096 * i as usize;
        data[at..at + 4096].copy_from_slice(&random_data(seed + 100 + i, 4096));
        write_file(&img, &data);
        let doc = bv.backup(&img, disk, &[]);
        out.insert(text(&doc, "snapshot"), data.clone());
    }
    out
}

/// The ids of `forget --json` kept/removed lists of disk `disk`, and each kept one's reasons.
fn decisions(doc: &Value, disk: &str) -> (Vec<(String, Vec<String>)>, Vec<String>) {
    let d = doc["disks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["disk"] == disk)
        .unwrap_or_else(|| panic!("no disk {disk} in {doc}"));
    let kept = d["kept"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| {
            let reasons = k["reasons"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r.as_str().unwrap().to_string())
                .collect();
            (text(k, "id"), reasons)
        })
        .collect();
    let removed = d["removed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| text(r, "id"))
        .collect();
    (kept, removed)
}

/// Snapshot ids of `disk` with their time and sequence (oldest first), as `snapshots --json`
/// lists them: the candidates the reference decides on.
fn candidates(bv: &Bv, disk: &str) -> Vec<(String, Candidate)> {
    bv.snapshots()
        .iter()
        .filter(|s| s["disk"] == disk)
        .enumerate()
        .map(|(i, s)| {
            let t = humantime::parse_rfc3339(s["time"].as_str().unwrap()).unwrap();
            let secs = t.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
            (
                text(s, "id"),
                Candidate {
                    time: secs,
                    sequence: i as u64,
                },
            )
        })
        .collect()
}

/// Sequence counter and seal counts of every disk in the head (read through the library).
fn head_counters(bv: &Bv) -> Vec<(u64, Vec<u64>)> {
    let vault = Vault::open(bv.vault.to_str().unwrap(), &Keystore::new(&bv.keystore)).unwrap();
    vault
        .head()
        .unwrap()
        .disks
        .values()
        .map(|d| {
            (
                d.next_sequence,
                d.generations.values().map(|g| g.seals).collect(),
            )
        })
        .collect()
}

#[test]
fn keep_last_removes_the_oldest_and_the_rest_restore() {
    let bv = Bv::new();
    let images = backups(&bv, "vm", 5, 1);
    let before = candidates(&bv, "vm");
    let counters = head_counters(&bv);
    let dry = bv.json(&["forget", "--keep-last", "2", "--dry-run"]);
    assert_eq!(dry["dry_run"], true);
    assert_eq!(
        candidates(&bv, "vm").len(),
        5,
        "a dry run removed something"
    );
    let doc = bv.json(&["forget", "--keep-last", "2"]);
    assert_eq!(
        decisions(&doc, "vm"),
        decisions(&dry, "vm"),
        "dry run and run differ"
    );
    let (kept, removed) = decisions(&doc, "vm");
    let ids: Vec<&String> = before.iter().map(|(id, _)| id).collect();
    assert_eq!(
        kept,
        vec![
            (ids[4].clone(), vec!["last".to_string()]),
            (ids[3].clone(), vec!["last".to_string()])
        ]
    );
    assert_eq!(
        removed,
        vec![ids[2].clone(), ids[1].clone(), ids[0].clone()]
    );
    assert_eq!((num(&doc, "kept"), num(&doc, "removed")), (2, 3));
    // Gone from the listing, from restore, and from the store; the rest restore exactly.
    let left: Vec<String> = candidates(&bv, "vm")
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert_eq!(left, vec![ids[3].clone(), ids[4].clone()]);
    let manifests: Vec<String> = bv
        .objects("snapshots")
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(manifests.len(), 2, "{manifests:?}");
    for id in &removed {
        assert!(!manifests.contains(id), "manifest {id} left");
        let target = bv.path("gone");
        bv.restore(&format!("vm@{}", &id[..12]), &target, &[])
            .code(1)
            .stderr_has(&["has no snapshot", &id[..12]]);
    }
    for id in &left {
        bv.restore_and_compare(&format!("vm@{id}"), &images[id]);
    }
    bv.restore_and_compare("vm@latest", &images[ids[4]]);
    bv.verify_ok();
    // The head's counters never go down; the next backup is an incremental of the latest.
    assert_eq!(
        head_counters(&bv),
        counters,
        "forget changed sequences or seal counts"
    );
    let img = bv.path("vm.img");
    let doc = bv.backup(&img, "vm", &[]);
    assert_eq!(text(&doc, "parent"), *ids[4]);
    bv.restore_and_compare("vm@latest", &images[ids[4]]);
}

#[test]
fn every_rule_matches_the_reference_on_real_snapshots() {
    let bv = Bv::new();
    backups(&bv, "a", 4, 2);
    let cands = candidates(&bv, "a");
    let snaps: Vec<Candidate> = cands.iter().map(|(_, c)| *c).collect();
    for (args, p) in [
        (
            vec!["--keep-within", "1h"],
            Policy {
                within: Some("1h".parse().unwrap()),
                ..Policy::default()
            },
        ),
        (
            vec!["--keep-hourly", "1", "--keep-monthly", "2"],
            Policy {
                hourly: Some(1),
                monthly: Some(2),
                ..Policy::default()
            },
        ),
        (
            vec![
                "--keep-daily",
                "2",
                "--keep-weekly",
                "1",
                "--keep-yearly",
                "3",
                "--keep-last",
                "1",
            ],
            Policy {
                daily: Some(2),
                weekly: Some(1),
                yearly: Some(3),
                last: Some(1),
                ..Policy::default()
            },
        ),
    ] {
        let mut all = vec!["forget", "--dry-run", "--disk", "a"];
        all.extend(args.iter());
        let doc = bv.json(&all);
        let want = reference(&p, &snaps);
        let mut kept: Vec<(String, Vec<String>)> = Vec::new();
        let mut removed = Vec::new();
        for ((id, _), reasons) in cands.iter().zip(want).rev() {
            if reasons.is_empty() {
                removed.push(id.clone());
            } else {
                kept.push((id.clone(), reasons));
            }
        }
        assert_eq!(decisions(&doc, "a"), (kept, removed), "{args:?}");
    }
}

#[test]
fn disks_are_forgotten_each_on_their_own() {
    let bv = Bv::new();
    let a = backups(&bv, "a", 3, 3);
    let b = backups(&bv, "b", 2, 4);
    let doc = bv.json(&["forget", "--disk", "a", "--keep-last", "1"]);
    assert_eq!(doc["disks"].as_array().unwrap().len(), 1);
    assert_eq!(candidates(&bv, "b").len(), 2, "disk b was touched");
    let text_out = bv.run(&["forget", "--keep-last", "1"]);
    text_out.ok().stdout_has(&[
        "disk a: keep 1, removed 0",
        "disk b: keep 1, removed 1",
        "last",
    ]);
    for (disk, images) in [("a", &a), ("b", &b)] {
        let left = candidates(&bv, disk);
        assert_eq!(left.len(), 1);
        bv.restore_and_compare(&format!("{disk}@latest"), &images[&left[0].0]);
    }
    bv.verify_ok();
}

#[test]
fn bad_policies_and_unknown_disks_are_refused() {
    let bv = Bv::new();
    backups(&bv, "a", 2, 5);
    bv.run(&["forget"])
        .code(2)
        .stderr_has(&["no retention rule given", "--keep-last"]);
    bv.run(&["forget", "--keep-last", "0"])
        .code(2)
        .stderr_has(&["--keep-last"]);
    bv.run(&["forget", "--keep-within", "3x"])
        .code(2)
        .stderr_has(&["--keep-within", "3x", "2y5m7d3h"]);
    bv.run(&["forget", "--keep-within", "1d2y"]).code(2);
    bv.run(&["forget", "--disk", "nosuch", "--keep-last", "1"])
        .code(1)
        .stderr_has(&["no disk named nosuch"]);
    assert_eq!(candidates(&bv, "a").len(), 2);
}
