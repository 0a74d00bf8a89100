//! `prune` and `forget --prune` through the binary, on a local folder: exactly the packs no
//! remaining snapshot references are deleted (computed here from the manifests, read through
//! the library), bytes freed and dead bytes are exact, every remaining snapshot restores bit
//! for bit and the vault verifies; a backup running during a prune keeps its packs; a backup
//! suspended (SIGSTOP) past its lease while a prune runs fails cleanly on SIGCONT and its
//! re-run succeeds; SIGKILL loops of prune and of backup followed by prune; on SeaweedFS,
//! writers of distinct disks while a forget/prune loop runs, then every snapshot restored.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use blockvault::crypto::Keystore;
use blockvault::vault::Vault;
use common::servers;
use common::*;

/// Pack file name -> size, of the packs in the vault folder.
fn pack_files(bv: &Bv) -> BTreeMap<String, u64> {
    bv.objects("packs")
        .iter()
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::metadata(p).unwrap().len(),
            )
        })
        .collect()
}

/// Pack file name -> referenced frames (offset, length), over every snapshot the head lists.
fn referenced(bv: &Bv) -> BTreeMap<String, BTreeSet<(u32, u32)>> {
    let vault = Vault::open(bv.vault.to_str().unwrap(), &Keystore::new(&bv.keystore)).unwrap();
    let mut out: BTreeMap<String, BTreeSet<(u32, u32)>> = BTreeMap::new();
    for disk in vault.disks().unwrap() {
        for m in vault.snapshots(&disk).unwrap() {
            for x in &m.extents {
                let (pack, _) = m.packs[x.pack as usize];
                out.entry(hex::encode(pack.0))
                    .or_default()
                    .insert((x.offset, x.len));
            }
        }
    }
    out
}

/// Frame bytes in `pack` that no snapshot references: the frames end where the footer (last 16
/// bytes: u64 index offset, u32 index length, "BVPF") says the index starts.
fn dead_in(bv: &Bv, pack: &str, frames: &BTreeSet<(u32, u32)>) -> u64 {
    let path = bv.vault.join("packs").join(&pack[..2]).join(pack);
    let bytes = std::fs::read(&path).unwrap();
    let footer = &bytes[bytes.len() - 16..];
    assert_eq!(&footer[12..], b"BVPF");
    let index_at = u64::from_le_bytes(footer[..8].try_into().unwrap());
    index_at - 32 - frames.iter().map(|(_, l)| u64::from(*l)).sum::<u64>()
}

/// A 4 MiB image of random data; before each of `n` backups, one slot is rewritten whole
/// and 8 KiB of another changed (an overlay that leaves the older pack partly live).
fn backups(bv: &Bv, disk: &str, n: u64, seed: u64) -> BTreeMap<String, Vec<u8>> {
    let img = bv.path(&format!("{disk}.img"));
    let mut data = random_data(seed, 4 << 20);
    let mut out = BTreeMap::new();
    for i in 0..n {
        let whole = ((i % 4) << 20) as usize;
        data[whole..whole + (1 << 20)].copy_from_slice(&random_data(seed * 1000 + i, 1 << 20));
        let part = (((i + 2) % 4) << 20) as usize + 8192 * (i as usize % 64);
        data[part..part + 8192].copy_from_slice(&random_data(seed * 1000 + 500 + i, 8192));
        write_file(&img, &data);
        let doc = bv.backup(&img, disk, &[]);
        out.insert(text(&doc, "snapshot"), data.clone());
    }
    out
}

/// Every snapshot the vault lists restores to the bytes it was made from.
fn all_restore(bv: &Bv, images: &BTreeMap<String, Vec<u8>>) {
    for s in bv.snapshots() {
        let id = text(&s, "id");
        let disk = text(&s, "disk");
        bv.restore_and_compare(&format!("{disk}@{id}"), &images[&id]);
    }
}

/// After a prune, the packs left are exactly those referenced.
fn assert_exactly_referenced(bv: &Bv) {
    let left: BTreeSet<String> = pack_files(bv).into_keys().collect();
    let refd: BTreeSet<String> = referenced(bv).into_keys().collect();
    assert_eq!(left, refd, "packs left differ from the packs referenced");
}

#[test]
fn prune_frees_exactly_the_unreferenced_packs() {
    let bv = Bv::new();
    let mut images = backups(&bv, "a", 6, 1);
    images.extend(backups(&bv, "b", 3, 2));
    // A leftover no snapshot names (as a killed backup leaves).
    let orphan = "ff".repeat(32);
    let orphan_path = bv.vault.join("packs/ff").join(&orphan);
    std::fs::create_dir_all(orphan_path.parent().unwrap()).unwrap();
    write_file(&orphan_path, &random_data(9, 5000));
    bv.json(&["forget", "--disk", "a", "--keep-last", "2"]);
    let before = pack_files(&bv);
    let refd = referenced(&bv);
    let doomed: BTreeSet<&String> = before.keys().filter(|p| !refd.contains_key(*p)).collect();
    assert!(doomed.len() >= 2, "{doomed:?}");
    assert!(doomed.contains(&orphan));

    let dry = bv.json(&["prune", "--dry-run", "--max-unused", "100%"]);
    assert_eq!(pack_files(&bv), before, "a dry run deleted something");
    let doc = bv.json(&["prune", "--max-unused", "100%"]);
    for d in [&dry, &doc] {
        assert_eq!(num(d, "packs"), before.len() as u64, "{d}");
        assert_eq!(num(d, "packs_deleted"), doomed.len() as u64, "{d}");
        assert_eq!(
            num(d, "bytes_freed"),
            doomed.iter().map(|p| before[*p]).sum::<u64>(),
            "{d}"
        );
        assert_eq!(num(d, "live_packs"), refd.len() as u64, "{d}");
        let dead: u64 = refd.iter().map(|(p, f)| dead_in(&bv, p, f)).sum();
        assert!(
            dead > 0,
            "the overlays should leave dead frames in live packs"
        );
        assert_eq!(num(d, "dead_bytes"), dead, "{d}");
    }
    assert_eq!(doc["dry_run"], false);
    assert_eq!(num(&doc, "packs_repacked"), 0, "{doc}");
    assert_exactly_referenced(&bv);
    assert!(bv.objects("prune").is_empty(), "the deletion plan was left");
    all_restore(&bv, &images);
    let v = bv.verify_ok();
    assert_eq!(num(&v, "unreferenced_packs"), 0, "{v}");
    // Nothing more to do; the text form says what it did.
    bv.run(&["prune", "--max-unused", "100"])
        .ok()
        .stdout_has(&["deleted 0 of", "within --max-unused 100%"]);
    // forget --prune in one go, one JSON document.
    let doc = bv.json(&["forget", "--keep-last", "1", "--prune"]);
    assert!(num(&doc["prune"], "packs_deleted") > 0, "{doc}");
    assert_exactly_referenced(&bv);
    all_restore(&bv, &images);
}

/// A backup started in its own process, with `env` added.
fn start_backup(bv: &Bv, img: &Path, disk: &str, env: &[(&str, &str)]) -> Child {
    let mut c = bv.command();
    c.args(slow_backup(img, disk))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        c.env(k, v);
    }
    c.spawn().expect("start blockvault")
}

/// Wait (polling) until a backup lease exists in the vault; panics if `child` ends first.
fn wait_for_lease(bv: &Bv, child: &mut Child) -> PathBuf {
    loop {
        if let Some(l) = bv.objects("locks").into_iter().find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("backup-")
        }) {
            return l;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the backup ended ({status}) before its lease was seen");
        }
        std::thread::sleep(Duration::from_micros(300));
    }
}

/// Send SIG`name` to `child` with kill(1).
fn signal(child: &Child, name: &str) {
    let ok = std::process::Command::new("kill")
        .arg(format!("-{name}"))
        .arg(child.id().to_string())
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{name} failed");
}

fn finish(child: Child) -> Run {
    Run::from_output(
        "blockvault backup".into(),
        child.wait_with_output().unwrap(),
    )
}

/// 16 MiB of text: slow at zstd level 19 on one thread (seconds), so the backup is still
/// running when the test acts on it.
fn slow_image(bv: &Bv, seed: u64) -> (PathBuf, Vec<u8>) {
    let data = text_data(seed, 16 << 20);
    let img = bv.path("slow.img");
    write_file(&img, &data);
    (img, data)
}

#[test]
fn a_backup_running_during_a_prune_keeps_its_packs() {
    let bv = Bv::new();
    let images = backups(&bv, "a", 3, 3);
    bv.json(&["forget", "--keep-last", "1"]);
    let (img, data) = slow_image(&bv, 4);
    let mut child = start_backup(&bv, &img, "slow", &[]);
    wait_for_lease(&bv, &mut child);
    let doc = bv.json(&["prune"]);
    // The prune waited for the backup: it ended before the prune did.
    assert!(
        child.try_wait().unwrap().is_some(),
        "prune returned while the backup ran"
    );
    finish(child).ok();
    assert_eq!(num(&doc, "leases_waited"), 1, "{doc}");
    assert_exactly_referenced(&bv);
    let mut images = images;
    images.insert(text(bv.snapshots().last().unwrap(), "id"), data);
    all_restore(&bv, &images);
    bv.verify_ok();
}

#[test]
fn a_backup_suspended_past_its_lease_fails_cleanly_and_its_rerun_succeeds() {
    let bv = Bv::new();
    backups(&bv, "a", 2, 5);
    let (img, data) = slow_image(&bv, 6);
    // The prune runs as another host would, with its own copy of the keys: a suspended host
    // stops every process on it, so none of its own waits on what the stopped backup holds
    // (the keystore's lock, taken for moments while it records a head it swapped).
    let other_host = bv.path("keystore-of-another-host");
    common::trust::copy_tree(&bv.keystore, &other_host);
    let ttl = [("BLOCKVAULT_LEASE_TTL_MS", "1500")];
    let mut child = start_backup(&bv, &img, "slow", &ttl);
    let lease = wait_for_lease(&bv, &mut child);
    signal(&child, "STOP");
    // The prune waits for the lease to lapse (two times to live by the store's clock), removes
    // it, and deletes what the stopped backup stored so far.
    let started = Instant::now();
    let doc = bv
        .run_cmd(bv.command_with_keystore(&other_host), &["--json", "prune"])
        .ok()
        .json();
    assert_eq!(num(&doc, "leases_waited"), 1, "{doc}");
    assert_eq!(num(&doc, "leases_removed"), 1, "{doc}");
    assert!(!lease.exists(), "the lapsed lease is still there");
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "prune did not wait for the lease"
    );
    signal(&child, "CONT");
    finish(child)
        .code(1)
        .stderr_has(&["lapsed", "did not commit", "no snapshot"]);
    assert!(bv.snapshots().iter().all(|s| s["disk"] != "slow"));
    bv.verify_ok();
    // The re-run (normal lease) succeeds, resuming from the packs the failed run kept that
    // the prune left, and restores exactly; no pack is left unreferenced.
    let doc = bv.backup(&img, "slow", &[]);
    assert!(doc["parent"].is_null());
    assert_exactly_referenced(&bv);
    bv.restore_and_compare("slow@latest", &data);
    bv.verify_ok();
}

/// Kill `args` after `delay`; returns whether it had already ended.
fn run_and_kill(bv: &Bv, args: &[&str], delay: Duration) -> bool {
    let mut child = bv
        .command()
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(delay);
    let ended = child.try_wait().unwrap().is_some();
    let _ = child.kill();
    let _ = child.wait();
    ended
}

#[test]
fn prune_killed_at_any_point_loses_nothing() {
    let bv = Bv::new();
    let mut images = backups(&bv, "a", 2, 7);
    let img = bv.path("a.img");
    let seed = unique();
    let mut rng = Rng::new(seed);
    eprintln!("seed {seed}");
    // How long one prune takes here, to spread the kills over it.
    let t = Instant::now();
    bv.json(&["prune"]);
    let took = t.elapsed().as_micros() as u64 + 2000;
    for trial in 0..20u64 {
        let mut data = std::fs::read(&img).unwrap();
        let at = ((trial % 4) as usize) << 20;
        data[at..at + (1 << 20)].copy_from_slice(&random_data(seed + trial, 1 << 20));
        write_file(&img, &data);
        images.insert(text(&bv.backup(&img, "a", &[]), "snapshot"), data);
        bv.json(&["forget", "--keep-last", "2"]);
        let delay = Duration::from_micros(rng.below(took));
        let ended = run_and_kill(&bv, &["prune"], delay);
        eprintln!("trial {trial}: killed after {delay:?} (already ended: {ended})");
        all_restore(&bv, &images);
        let v = bv.verify(false);
        v.ok();
        assert_eq!(v.json()["ok"], true, "{}", v.stdout);
    }
    bv.json(&["prune"]);
    assert_exactly_referenced(&bv);
    assert!(bv.objects("prune").is_empty());
    bv.verify_ok();
}

#[test]
fn backups_killed_at_any_point_are_collected_by_prune() {
    let bv = Bv::new();
    let mut images = backups(&bv, "a", 1, 8);
    let img = bv.path("a.img");
    let seed = unique();
    let mut rng = Rng::new(seed);
    eprintln!("seed {seed}");
    let t = Instant::now();
    let mut data = std::fs::read(&img).unwrap();
    data[..4096].copy_from_slice(&random_data(seed, 4096));
    write_file(&img, &data);
    images.insert(
        text(&bv.backup(&img, "a", &["--parent", "none"]), "snapshot"),
        data.clone(),
    );
    let took = t.elapsed().as_micros() as u64 + 2000;
    for trial in 0..20u64 {
        let at = ((trial % 4) as usize) << 20;
        data[at..at + (1 << 20)].copy_from_slice(&random_data(seed + 1 + trial, 1 << 20));
        write_file(&img, &data);
        let delay = Duration::from_micros(rng.below(took));
        let ended = run_and_kill(
            &bv,
            &[
                "backup",
                img.to_str().unwrap(),
                "--disk",
                "a",
                "--parent",
                "none",
            ],
            delay,
        );
        eprintln!("trial {trial}: killed after {delay:?} (already ended: {ended})");
        // A committed run's snapshot must restore too.
        if let Some(last) = bv.snapshots().last() {
            let id = text(last, "id");
            images.entry(id).or_insert_with(|| data.clone());
        }
        let doc = bv.json(&["prune"]);
        assert_eq!(doc["leases_waited"], doc["leases_removed"], "{doc}");
        assert_exactly_referenced(&bv);
        all_restore(&bv, &images);
    }
    let v = bv.verify_ok();
    assert_eq!(num(&v, "unreferenced_packs"), 0, "{v}");
    assert!(bv.objects("locks").iter().all(|p| !p
        .file_name()
        .unwrap()
        .to_string_lossy()
        .starts_with("backup-")));
}

/// A number from the environment (tools/soak.sh raises them), else `default`.
fn knob(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Writer processes back up their own disks (16 by default; `BLOCKVAULT_SOAK_WRITERS`, 64 in
/// tools/soak.sh) into one vault on a SeaweedFS cluster (master, three volume servers, filer,
/// S3 gateway) while `forget --keep-last 1 --prune` (which repacks at the default 5 %) runs in
/// a loop; then every remaining snapshot restores bit for bit, the vault verifies and holds
/// no unreferenced pack. Every backup and every prune must succeed.
#[test]
fn many_writers_and_a_forget_prune_loop_share_a_seaweedfs_cluster() {
    let Some(server) = servers::seaweed_cluster("many_writers_and_a_forget_prune_loop") else {
        return;
    };
    let writers = knob("BLOCKVAULT_SOAK_WRITERS", 16);
    let rounds = knob("BLOCKVAULT_SOAK_ROUNDS", 3);
    let started = Instant::now();
    let mut bv = server.bv();
    // Short enough that a lapsed lease would show within the run; long enough that a loaded
    // machine renews in time (a third of it).
    bv.env
        .push(("BLOCKVAULT_LEASE_TTL_MS".into(), "10000".into()));
    bv.json(&["init"]);
    let stored = std::sync::atomic::AtomicU64::new(0);
    let images = std::sync::Mutex::new(BTreeMap::new());
    let (prunes, freed, repacked) = std::thread::scope(|scope| {
        let mut handles = Vec::new();
        for w in 0..writers {
            let (bv, images, stored) = (&bv, &images, &stored);
            handles.push(scope.spawn(move || {
                let disk = format!("w{w}");
                let img = bv.path(&format!("{disk}.img"));
                let mut data = random_data(100 + w, 2 << 20);
                for i in 0..rounds {
                    // A slot rewritten whole and 128 KiB of the other (an overlay the next
                    // round's rewrite kills): each pack ends some 11 % dead, over 5 %.
                    let whole = ((i % 2) << 20) as usize;
                    data[whole..whole + (1 << 20)]
                        .copy_from_slice(&random_data(w * 1000 + i, 1 << 20));
                    let part = ((((i + 1) % 2) << 20) + (128 << 10) * (i % 8)) as usize;
                    data[part..part + (128 << 10)]
                        .copy_from_slice(&random_data(w * 1000 + 500 + i, 128 << 10));
                    write_file(&img, &data);
                    let doc = bv.backup(&img, &disk, &[]);
                    stored.fetch_add(
                        num(&doc, "bytes_stored"),
                        std::sync::atomic::Ordering::SeqCst,
                    );
                    images
                        .lock()
                        .unwrap()
                        .insert(text(&doc, "snapshot"), data.clone());
                }
            }));
        }
        let (mut prunes, mut freed, mut repacked) = (0u64, 0u64, 0u64);
        // Until every writer has ended, a failed one included (the scope re-raises its panic).
        while !handles.iter().all(|h| h.is_finished()) {
            let doc = bv.json(&["forget", "--keep-last", "1", "--prune"]);
            freed += num(&doc["prune"], "bytes_freed");
            repacked += num(&doc["prune"], "packs_repacked");
            prunes += 1;
        }
        (prunes, freed, repacked)
    });
    assert!(prunes >= 1);
    let last = bv.json(&["forget", "--keep-last", "1", "--prune"]);
    let images = images.into_inner().unwrap();
    let snaps = bv.snapshots();
    assert_eq!(snaps.len() as u64, writers, "one per disk");
    assert!(
        repacked + num(&last["prune"], "packs_repacked") > 0,
        "nothing was repacked: {last}"
    );
    all_restore(&bv, &images);
    let v = bv.verify_ok();
    assert_eq!(num(&v, "unreferenced_packs"), 0, "{v}");
    let again = bv.json(&["prune"]);
    assert_eq!(num(&again, "packs_deleted"), 0, "{again}");
    eprintln!(
        "soak figures: writers {writers}, backup runs {}, snapshots kept {}, prunes {}, bytes stored {}, bytes freed {}, packs repacked {}, failures 0, {:.0} s",
        writers * rounds,
        snaps.len(),
        prunes + 2,
        stored.into_inner(),
        freed + num(&last["prune"], "bytes_freed"),
        repacked + num(&last["prune"], "packs_repacked"),
        started.elapsed().as_secs_f64()
    );
}

/// Each live pack's frame bytes (between header and index) and dead bytes.
fn pack_shares(bv: &Bv) -> BTreeMap<String, (u64, u64)> {
    referenced(bv)
        .iter()
        .map(|(p, f)| {
            let used: u64 = f.iter().map(|(_, l)| u64::from(*l)).sum();
            let dead = dead_in(bv, p, f);
            (p.clone(), (used + dead, dead))
        })
        .collect()
}

/// Back up `disk` after rewriting `whole` slots (1 MiB each) of `data` and, if given, the
/// 8 KiB at the start of slot `part` (stored as an overlay); returns the snapshot id.
fn step(
    bv: &Bv,
    disk: &str,
    data: &mut [u8],
    whole: &[usize],
    part: Option<usize>,
    seed: u64,
) -> String {
    for (k, slot) in whole.iter().enumerate() {
        let at = slot << 20;
        data[at..at + (1 << 20)].copy_from_slice(&random_data(seed * 100 + k as u64, 1 << 20));
    }
    if let Some(slot) = part {
        let at = (slot << 20) + 4096;
        data[at..at + 8192].copy_from_slice(&random_data(seed * 100 + 99, 8192));
    }
    let img = bv.path(&format!("{disk}.img"));
    write_file(&img, data);
    text(&bv.backup(&img, disk, &[]), "snapshot")
}

/// A 5 MiB disk whose packs are, once all but its newest snapshot are forgotten, 80 % dead
/// (the full backup's, one slot live), 33 % dead (three slots, one rewritten since), under 1 %
/// dead (a slot and an overlay on a slot rewritten whole since) and not dead.
fn mostly_dead(bv: &Bv, disk: &str, seed: u64) -> BTreeMap<String, Vec<u8>> {
    let mut data = random_data(seed, 5 << 20);
    let mut images = BTreeMap::new();
    let mut keep = |id: String, data: &[u8]| images.insert(id, data.to_vec());
    keep(step(bv, disk, &mut data, &[], None, seed), &data);
    keep(step(bv, disk, &mut data, &[0, 1, 2], None, seed + 1), &data);
    keep(step(bv, disk, &mut data, &[0], Some(3), seed + 2), &data);
    keep(step(bv, disk, &mut data, &[3], None, seed + 3), &data);
    images
}

/// Manifest objects in the vault folder: one per snapshot the head lists, none left over.
fn assert_one_manifest_per_snapshot(bv: &Bv) {
    assert_eq!(
        bv.objects("snapshots").len(),
        bv.snapshots().len(),
        "manifest objects left beside the listed ones: {:?}",
        bv.objects("snapshots")
    );
}

#[test]
fn prune_repacks_packs_overlays_left_mostly_dead() {
    let bv = Bv::new();
    let mut images = mostly_dead(&bv, "a", 11);
    images.extend(backups(&bv, "b", 2, 12));
    bv.json(&["forget", "--disk", "a", "--keep-last", "1"]);
    // Never repacks at 100 %: only unreferenced packs go.
    let doc = bv.json(&["prune", "--max-unused", "100%"]);
    assert_eq!(num(&doc, "packs_repacked"), 0, "{doc}");
    assert_eq!(num(&doc, "manifests_rewritten"), 0, "{doc}");
    assert_exactly_referenced(&bv);
    let shares = pack_shares(&bv);
    let over = |pct: u64| -> BTreeSet<String> {
        shares
            .iter()
            .filter(|(_, (frames, dead))| dead * 100 > pct * frames)
            .map(|(p, _)| p.clone())
            .collect()
    };
    let (over10, over0) = (over(10), over(0));
    assert!(
        !over10.is_empty(),
        "the overlays should leave packs >10 % dead: {shares:?}"
    );
    assert!(
        over0.len() > over10.len(),
        "some packs should be 0–10 % dead: {shares:?}"
    );
    let before = pack_files(&bv);
    // The dry run says what 10 % would repack and changes nothing.
    let dry = bv.json(&["prune", "--dry-run", "--max-unused", "10%"]);
    assert_eq!(num(&dry, "packs_repacked"), over10.len() as u64, "{dry}");
    let live_over10: u64 = over10.iter().map(|p| shares[p].0 - shares[p].1).sum();
    assert_eq!(num(&dry, "bytes_repacked"), live_over10, "{dry}");
    assert_eq!(pack_files(&bv), before, "a dry run changed packs");

    let doc = bv.json(&["prune", "--max-unused", "10%"]);
    assert_eq!(num(&doc, "packs_repacked"), over10.len() as u64, "{doc}");
    assert_eq!(num(&doc, "bytes_repacked"), live_over10, "{doc}");
    assert!(num(&doc, "packs_written") >= 1, "{doc}");
    assert!(num(&doc, "manifests_rewritten") >= 1, "{doc}");
    let after = pack_files(&bv);
    for p in &over10 {
        assert!(!after.contains_key(p), "repacked pack {p} is still there");
    }
    let freed: u64 = before
        .iter()
        .filter(|(p, _)| !after.contains_key(*p))
        .map(|(_, s)| s)
        .sum();
    assert_eq!(num(&doc, "bytes_freed"), freed, "{doc}");
    assert_eq!(
        num(&doc, "packs_deleted"),
        before.keys().filter(|p| !after.contains_key(*p)).count() as u64,
        "{doc}"
    );
    // What stays dead is exactly the dead bytes of packs within 10 %.
    let left: u64 = shares
        .iter()
        .filter(|(p, _)| !over10.contains(*p))
        .map(|(_, (_, d))| d)
        .sum();
    assert_eq!(num(&doc, "dead_bytes"), left, "{doc}");
    assert_exactly_referenced(&bv);
    assert_one_manifest_per_snapshot(&bv);
    assert!(pack_shares(&bv)
        .values()
        .all(|(frames, dead)| dead * 10 <= *frames));
    all_restore(&bv, &images);
    bv.verify_ok();

    // 0 %: every dead byte goes; the text says what was repacked.
    bv.run(&["prune", "--max-unused", "0"]).ok().stdout_has(&[
        "repacked",
        "into",
        "manifests rewritten",
    ]);
    assert!(pack_shares(&bv).values().all(|(_, dead)| *dead == 0));
    assert_exactly_referenced(&bv);
    assert_one_manifest_per_snapshot(&bv);
    all_restore(&bv, &images);
    bv.verify_ok();

    // A backup whose parent manifest was rewritten: an incremental on it, then forget the
    // rest and repack again; everything restores.
    images.extend(backups(&bv, "a", 2, 13));
    let doc = bv.json(&["forget", "--keep-last", "1", "--prune"]);
    assert_eq!(doc["prune"]["max_unused_percent"], 5.0, "{doc}");
    assert_exactly_referenced(&bv);
    assert_one_manifest_per_snapshot(&bv);
    all_restore(&bv, &images);
    bv.verify_ok();
    let again = bv.json(&["prune", "--max-unused", "0"]);
    assert_eq!(num(&again, "packs_deleted"), 0, "{again}");
    assert_eq!(num(&again, "dead_bytes"), 0, "{again}");
    // Bad percentages are refused before anything is read.
    for bad in ["101", "150%", "ten", "5%%"] {
        bv.run(&["prune", "--max-unused", bad])
            .code(2)
            .stderr_has(&["--max-unused"]);
    }
}

#[test]
fn a_repack_killed_at_any_point_leaves_every_snapshot_restorable() {
    let bv = Bv::new();
    let mut images = mostly_dead(&bv, "a", 21);
    bv.json(&["forget", "--keep-last", "1"]);
    let seed = unique();
    let mut rng = Rng::new(seed);
    eprintln!("seed {seed}");
    // How long one repack takes here, to spread the kills over it.
    let t = Instant::now();
    let doc = bv.json(&["prune", "--max-unused", "0"]);
    assert!(num(&doc, "packs_repacked") > 0, "{doc}");
    let took = t.elapsed().as_micros() as u64 + 2000;
    for trial in 0..6u64 {
        // Three slots rewritten whole: older packs partly dead again.
        let mut data = std::fs::read(bv.path("a.img")).unwrap();
        let t = trial as usize;
        let slots = [t % 4, (t + 1) % 4, (t + 2) % 4];
        let id = step(&bv, "a", &mut data, &slots, None, seed + trial);
        images.insert(id, data);
        bv.json(&["forget", "--keep-last", "1"]);
        let delay = Duration::from_micros(rng.below(took));
        let ended = run_and_kill(&bv, &["prune", "--max-unused", "0"], delay);
        eprintln!("trial {trial}: killed after {delay:?} (already ended: {ended})");
        all_restore(&bv, &images);
        bv.verify_ok();
    }
    let doc = bv.json(&["prune", "--max-unused", "0"]);
    assert_eq!(num(&doc, "dead_bytes"), 0, "{doc}");
    assert_exactly_referenced(&bv);
    assert_one_manifest_per_snapshot(&bv);
    assert!(bv.objects("prune").is_empty());
    all_restore(&bv, &images);
    let v = bv.verify_ok();
    assert_eq!(num(&v, "unreferenced_packs"), 0, "{v}");
}

#[test]
fn prune_repacks_on_an_object_store_vault() {
    let Some(server) = servers::seaweed("prune_repacks_on_an_object_store_vault") else {
        return;
    };
    let bv = server.bv();
    bv.json(&["init"]);
    let mut images = mostly_dead(&bv, "a", 41);
    bv.json(&["forget", "--keep-last", "1"]);
    let doc = bv.json(&["prune", "--max-unused", "0"]);
    assert!(num(&doc, "packs_repacked") >= 1, "{doc}");
    assert!(num(&doc, "manifests_rewritten") >= 1, "{doc}");
    assert!(num(&doc, "bytes_freed") > 0, "{doc}");
    assert_eq!(num(&doc, "dead_bytes"), 0, "{doc}");
    all_restore(&bv, &images);
    bv.verify_ok();
    images.extend(backups(&bv, "a", 1, 42));
    all_restore(&bv, &images);
    let again = bv.json(&["prune", "--max-unused", "0"]);
    assert_eq!(num(&again, "stale_manifests_removed"), 0, "{again}");
    bv.verify_ok();
}

/// A store whose clock runs 10 minutes ahead (Azurite with libfaketime preloaded into it, the
/// host's clock untouched): backups work, prune refuses, saying by how much the clocks differ
/// and what to fix, and changes nothing; `forget --prune` refuses the same way.
#[test]
fn prune_refuses_a_store_whose_clock_is_off_by_more_than_five_minutes() {
    let test = "prune_refuses_a_store_whose_clock_is_off_by_more_than_five_minutes";
    let Some(server) = servers::azurite_skewed(test, "+10m") else {
        return;
    };
    let bv = server.bv();
    bv.json(&["init"]);
    let images = mostly_dead(&bv, "a", 51);
    bv.json(&["forget", "--keep-last", "1"]);
    let before = bv.verify_ok();
    for args in [
        &["prune"][..],
        &["prune", "--dry-run"],
        &["forget", "--keep-last", "1", "--prune"],
    ] {
        let run = bv.run(args);
        run.code(1).no_panic().stderr_has(&[
            "differs from this host's by",
            "more than 300 s",
            "refuses to run",
            "NTP",
        ]);
    }
    all_restore(&bv, &images);
    // Nothing was deleted or repacked: the forgotten snapshots' packs are all still there.
    let v = bv.verify_ok();
    for field in ["packs", "unreferenced_packs", "unreferenced_pack_bytes"] {
        assert_eq!(v[field], before[field], "{field}: {v}");
    }
}
