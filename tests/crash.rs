//! Crash safety: backups SIGKILLed at random points never damage the vault. After every kill
//! `verify` and `verify --read-data` pass (unreferenced packs are allowed) and committed
//! snapshots restore byte for byte; at the end every snapshot is restored.
//!
//! Alone in its own test binary so that its timing is not disturbed by other tests.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::*;

const TRIALS: usize = 24;
const SIZE: usize = 64 << 20;

/// One change to the image, replayable.
#[derive(Clone, Copy, Debug)]
struct Mutation {
    off: usize,
    len: usize,
    fill: Fill,
    seed: u64,
}

/// The image's history: a base plus mutations; state `k` is the base with the first `k`.
struct Image {
    base: Vec<u8>,
    mutations: Vec<Mutation>,
}

impl Image {
    fn state(&self, k: usize) -> Vec<u8> {
        let mut v = self.base.clone();
        for m in &self.mutations[..k] {
            v[m.off..m.off + m.len].copy_from_slice(&content(m.fill, m.seed, m.len));
        }
        v
    }
}

/// What a committed snapshot holds.
#[derive(Clone, Debug)]
struct Known {
    disk: String,
    state: usize,
}

#[test]
fn sigkill_at_random_points_never_damages_the_vault() {
    let started = Instant::now();
    let seed: u64 = std::env::var("BLOCKVAULT_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5EED_C0DE);
    eprintln!("crash test seed {seed} (set BLOCKVAULT_TEST_SEED to change)");
    let mut rng = Rng::new(seed);
    let bv = Bv::new();
    let src = bv.path("disk.img");
    let mut img = Image {
        base: mixed_data(seed, SIZE),
        mutations: Vec::new(),
    };
    write_file(&src, &img.base);

    // The first, complete backup: the earlier snapshot every trial must leave intact, and the
    // time a full backup takes, which bounds the random kill delay.
    let t0 = Instant::now();
    let first = bv.backup(&src, "main", &[]);
    let full_time = t0.elapsed();
    let t0 = Instant::now();
    bv.backup(&src, "main", &["--parent", "none"]);
    let full_time = full_time.max(t0.elapsed());
    eprintln!("a full backup of {} MiB takes {full_time:?}", SIZE >> 20);

    let mut known: BTreeMap<String, Known> = BTreeMap::new();
    for s in bv.snapshots() {
        known.insert(
            text(&s, "id"),
            Known {
                disk: "main".into(),
                state: 0,
            },
        );
    }
    assert_eq!(known.len(), 2);
    let mut latest_main = text(&first, "snapshot");
    let (mut killed, mut completed, mut left_packs) = (0, 0, 0u64);
    let mut unreferenced = 0u64;

    for trial in 0..TRIALS {
        // Vary the content: 1-4 regions of random, text or zero data, up to 4 MiB each.
        for _ in 0..rng.range(1, 5) {
            let len = rng.range(4096, 4 << 20) as usize;
            let m = Mutation {
                off: rng.below((SIZE - len) as u64) as usize,
                len,
                fill: [Fill::Random, Fill::Text, Fill::Zeros][rng.below(3) as usize],
                seed: rng.next_u64(),
            };
            write_at(&src, m.off as u64, &content(m.fill, m.seed, m.len));
            img.mutations.push(m);
        }
        let state = img.mutations.len();
        let disk = if trial % 6 == 5 {
            format!("new{trial}")
        } else {
            "main".to_string()
        };
        let mut args = vec![
            "backup".to_string(),
            src.to_str().unwrap().to_string(),
            "--disk".into(),
            disk.clone(),
        ];
        if trial % 4 == 3 {
            args.extend(["--parent".into(), "none".into()]);
        }
        if trial % 5 == 2 {
            args.extend(["--threads".into(), "1".into()]);
        }
        args.insert(0, "--json".into());

        let delay = Duration::from_micros(rng.below(full_time.as_micros() as u64 + 1));
        let (mut child, what) = bv.spawn(&args);
        std::thread::sleep(delay);
        let finished = child.try_wait().expect("try_wait");
        if finished.is_none() {
            child.kill().expect("SIGKILL the backup");
        }
        let out = child.wait_with_output().expect("wait");
        let run = Run {
            what,
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        };
        let done_id = if finished.is_some() {
            run.ok();
            completed += 1;
            Some(text(&run.json(), "snapshot"))
        } else {
            killed += 1;
            None
        };

        // Whatever happened, the vault verifies.
        let v = bv.verify(false);
        v.ok();
        let r = bv.verify(true);
        r.ok();
        let doc = r.json();
        assert_eq!(doc["ok"], true, "trial {trial}: {doc}");
        let now_unref = num(&doc, "unreferenced_packs");
        if now_unref > unreferenced {
            left_packs += 1;
        }
        unreferenced = now_unref;

        // At most one new snapshot, and it is this trial's content.
        let new: Vec<String> = bv
            .snapshots()
            .iter()
            .map(|s| text(s, "id"))
            .filter(|id| !known.contains_key(id))
            .collect();
        assert!(new.len() <= 1, "trial {trial}: {new:?}");
        if let Some(id) = &done_id {
            assert_eq!(new, vec![id.clone()], "trial {trial}");
        }
        for id in new {
            known.insert(
                id.clone(),
                Known {
                    disk: disk.clone(),
                    state,
                },
            );
            if disk == "main" {
                latest_main = id;
            }
        }

        // The newest committed snapshot of the main disk, and a random earlier one, restore.
        let k = &known[&latest_main];
        bv.restore_and_compare(&format!("main@{latest_main}"), &img.state(k.state));
        let ids: Vec<&String> = known.keys().collect();
        let pick = ids[rng.below(ids.len() as u64) as usize].clone();
        let k = &known[&pick];
        bv.restore_and_compare(&format!("{}@{pick}", k.disk), &img.state(k.state));
    }

    // Every snapshot, once more.
    for (id, k) in &known {
        bv.restore_and_compare(&format!("{}@{id}", k.disk), &img.state(k.state));
    }
    bv.verify_ok();
    eprintln!(
        "{TRIALS} trials in {:?}: {killed} killed before they finished, {completed} completed, \
         {left_packs} kills left unreferenced packs; {} snapshots restored",
        started.elapsed(),
        known.len()
    );
    // The kills must really interrupt backups, or this test proves nothing.
    assert!(
        killed >= TRIALS / 3,
        "only {killed} of {TRIALS} backups were interrupted"
    );
}
