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

    let dry = bv.json(&["prune", "--dry-run"]);
    assert_eq!(pack_files(&bv), before, "a dry run deleted something");
    let doc = bv.json(&["prune"]);
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
    assert_exactly_referenced(&bv);
    assert!(bv.objects("prune").is_empty(), "the deletion plan was left");
    all_restore(&bv, &images);
    let v = bv.verify_ok();
    assert_eq!(num(&v, "unreferenced_packs"), 0, "{v}");
    // Nothing more to do; the text form says what it did.
    bv.run(&["prune"])
        .ok()
        .stdout_has(&["deleted 0 of", "packs are not repacked"]);
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

/// 64 MiB of text: slow at zstd level 19 on one thread, so the backup is still running when
/// the test acts on it.
fn slow_image(bv: &Bv, seed: u64) -> (PathBuf, Vec<u8>) {
    let data = text_data(seed, 64 << 20);
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
    let ttl = [("BLOCKVAULT_LEASE_TTL_MS", "1500")];
    let mut child = start_backup(&bv, &img, "slow", &ttl);
    let lease = wait_for_lease(&bv, &mut child);
    signal(&child, "STOP");
    // The prune waits for the lease to lapse (two times to live by the store's clock), removes
    // it, and deletes what the stopped backup stored so far.
    let started = Instant::now();
    let doc = bv.json(&["prune"]);
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

/// Four writers back up their own disks into one SeaweedFS vault while `forget --keep-last 2
/// --prune` runs in a loop; then every remaining snapshot restores bit for bit, the vault
/// verifies and holds exactly the referenced packs.
#[test]
fn writers_and_a_forget_prune_loop_share_an_object_store_vault() {
    let Some(server) = servers::seaweed("writers_and_a_forget_prune_loop") else {
        return;
    };
    let mut bv = Bv::new();
    bv.vault = PathBuf::from(server.fresh_url());
    bv.env = server.env.clone();
    bv.json(&["init"]);
    let done = std::sync::atomic::AtomicUsize::new(0);
    let images = std::sync::Mutex::new(BTreeMap::new());
    let prunes = std::thread::scope(|scope| {
        for w in 0..4u64 {
            let (bv, done, images) = (&bv, &done, &images);
            scope.spawn(move || {
                let disk = format!("w{w}");
                let img = bv.path(&format!("{disk}.img"));
                let mut data = random_data(100 + w, 2 << 20);
                for i in 0..4u64 {
                    let at = ((i % 2) << 20) as usize + 4096 * i as usize;
                    data[at..at + 65536].copy_from_slice(&random_data(w * 100 + i, 65536));
                    write_file(&img, &data);
                    let doc = bv.backup(&img, &disk, &[]);
                    images
                        .lock()
                        .unwrap()
                        .insert(text(&doc, "snapshot"), data.clone());
                }
                done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            });
        }
        let mut prunes = 0;
        while done.load(std::sync::atomic::Ordering::SeqCst) < 4 {
            let doc = bv.json(&["forget", "--keep-last", "2", "--prune"]);
            assert!(doc["prune"]["packs"].is_u64(), "{doc}");
            prunes += 1;
        }
        prunes
    });
    assert!(prunes >= 1);
    bv.json(&["forget", "--keep-last", "2", "--prune"]);
    let images = images.into_inner().unwrap();
    let snaps = bv.snapshots();
    assert_eq!(snaps.len(), 8, "two per disk");
    all_restore(&bv, &images);
    let v = bv.verify_ok();
    assert_eq!(num(&v, "unreferenced_packs"), 0, "{v}");
    let again = bv.json(&["prune"]);
    assert_eq!(num(&again, "packs_deleted"), 0, "{again}");
}
