//! Concurrent processes on one vault: backups of different disks at the same time both
//! succeed; backups of the same disk at the same time are serialised by the disk lock (one
//! fails with a "locked" message, or both succeed); the vault verifies afterwards. In an
//! object-store vault (SeaweedFS), many first backups register their new disks at once with no
//! shared lock, and racers for one new name end with one disk and one chain.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Child;

use blockvault::vault::store::cloud::CloudStore;
use blockvault::vault::store::{LocalStore, Store};
use common::servers::{self, Server};
use common::*;

/// Start `backup SRC --disk DISK --json` without waiting.
fn start(bv: &Bv, src: &Path, disk: &str) -> (Child, String) {
    bv.spawn(&["--json", "backup", src.to_str().unwrap(), "--disk", disk])
}

fn finish((child, what): (Child, String)) -> Run {
    Run::wait(child, what)
}

#[test]
fn two_backups_of_different_disks_at_the_same_time_both_succeed() {
    let bv = Bv::new();
    bv.json(&["init"]);
    let a = bv.path("a.img");
    let b = bv.path("b.img");
    // Three rounds: first backups of new disks, then incrementals of existing ones.
    let mut snaps: Vec<(String, Vec<u8>)> = Vec::new();
    for round in 0..3u64 {
        let da = mixed_data(700 + round, 24 * MIB as usize + 11);
        let db = random_data(800 + round, 20 * MIB as usize);
        write_file(&a, &da);
        write_file(&b, &db);
        let pa = start(&bv, &a, "disk-a");
        let pb = start(&bv, &b, "disk-b");
        let (ra, rb) = (finish(pa), finish(pb));
        ra.ok();
        rb.ok();
        snaps.push((format!("disk-a@{}", text(&ra.json(), "snapshot")), da));
        snaps.push((format!("disk-b@{}", text(&rb.json(), "snapshot")), db));
    }
    bv.verify_ok();
    for (spec, data) in &snaps {
        bv.restore_and_compare(spec, data);
    }
}

#[test]
fn first_backups_into_a_new_vault_at_the_same_time() {
    // Two `backup --init` race to create the vault. One may be refused with a clear message,
    // but whatever succeeds must be readable afterwards and the vault must verify.
    let start = |bv: &Bv, src: &Path, disk: &str| {
        bv.spawn(&[
            "--json",
            "backup",
            "--init",
            src.to_str().unwrap(),
            "--disk",
            disk,
        ])
    };
    for round in 0..4u64 {
        let bv = Bv::new();
        let a = bv.path("a.img");
        let b = bv.path("b.img");
        let da = random_data(900 + round, 2 * MIB as usize);
        let db = random_data(950 + round, 3 * MIB as usize);
        write_file(&a, &da);
        write_file(&b, &db);
        let pa = start(&bv, &a, "disk-a");
        let pb = start(&bv, &b, "disk-b");
        let (ra, rb) = (finish(pa), finish(pb));
        ra.no_panic();
        rb.no_panic();
        assert!(
            ra.code == 0 || rb.code == 0,
            "round {round}: at least one backup succeeds:\n{ra:?}\n{rb:?}"
        );
        bv.verify_ok();
        for (r, disk, data) in [(&ra, "disk-a", &da), (&rb, "disk-b", &db)] {
            if r.code == 0 {
                bv.restore_and_compare(&format!("{disk}@{}", text(&r.json(), "snapshot")), data);
            } else {
                r.failed();
            }
        }
    }
}

#[test]
fn two_first_backups_of_the_same_new_disk_make_one_disk() {
    let bv = Bv::new();
    bv.json(&["init"]);
    let a = bv.path("a.img");
    let b = bv.path("b.img");
    for round in 0..3u64 {
        let disk = format!("fresh{round}");
        let da = random_data(1300 + round, 8 * MIB as usize);
        let db = random_data(1400 + round, 8 * MIB as usize);
        write_file(&a, &da);
        write_file(&b, &db);
        let pa = start(&bv, &a, &disk);
        let pb = start(&bv, &b, &disk);
        let (ra, rb) = (finish(pa), finish(pb));
        for (r, data) in [(&ra, &da), (&rb, &db)] {
            if r.code == 0 {
                bv.restore_and_compare(&format!("{disk}@{}", text(&r.json(), "snapshot")), data);
            } else {
                r.code(1).stderr_has(&["locked"]);
            }
        }
        assert!(ra.code == 0 || rb.code == 0, "{ra:?}\n{rb:?}");
        // One disk with key records per name: the race did not register the name twice.
        let disks = key_record_disks(&LocalStore::new(&bv.vault)).len();
        assert_eq!(
            disks as u64,
            round + 1,
            "disk {disk} registered more than once"
        );
    }
    bv.verify_ok();
}

#[test]
fn two_backups_of_the_same_disk_at_the_same_time() {
    let bv = Bv::new();
    let a = bv.path("a.img");
    let b = bv.path("b.img");
    let base = random_data(1000, 32 * MIB as usize);
    write_file(&a, &base);
    let s0 = bv.backup(&a, "d", &[]);
    let mut outcomes = Vec::new();
    for round in 0..3u64 {
        let da = random_data(1100 + round, 32 * MIB as usize);
        let db = random_data(1200 + round, 32 * MIB as usize);
        write_file(&a, &da);
        write_file(&b, &db);
        let pa = start(&bv, &a, "d");
        let pb = start(&bv, &b, "d");
        let (ra, rb) = (finish(pa), finish(pb));
        for (r, data) in [(&ra, &da), (&rb, &db)] {
            if r.code == 0 {
                let id = text(&r.json(), "snapshot");
                bv.restore_and_compare(&format!("d@{id}"), data);
            } else {
                r.code(1).stderr_has(&["locked"]);
            }
        }
        assert!(
            ra.code == 0 || rb.code == 0,
            "round {round}: one of the two must win:\n{ra:?}\n{rb:?}"
        );
        outcomes.push((ra.code, rb.code));
        bv.verify_ok();
    }
    eprintln!("same-disk rounds (exit codes): {outcomes:?}");
    bv.restore_and_compare(&format!("d@{}", text(&s0, "short_id")), &base);
}

/// The disk ids that have key records in `store`: one per registered disk, so a registration
/// that lost a race left none behind (on a folder vault its emptied folder stays, as every
/// deleted object's folder does, and lists nothing).
fn key_record_disks(store: &dyn Store) -> BTreeSet<String> {
    store
        .list("keys")
        .unwrap()
        .iter()
        .map(|k| {
            k.split('/')
                .nth(1)
                .expect("keys/<disk id>/<record>")
                .to_string()
        })
        .collect()
}

/// The object store behind `bv`'s vault on `server`.
fn cloud_store(bv: &Bv, server: &Server) -> CloudStore {
    CloudStore::open(&bv.vault.to_string_lossy(), &server.config()).unwrap()
}

#[test]
fn sixteen_first_backups_of_new_disks_into_seaweedfs_all_succeed() {
    let test = "sixteen_first_backups_of_new_disks_into_seaweedfs_all_succeed";
    let Some(server) = servers::seaweed(test) else {
        return;
    };
    let bv = server.bv();
    bv.json(&["init"]);
    let disks: Vec<(String, Vec<u8>)> = (0..16u64)
        .map(|i| {
            (
                format!("new{i}"),
                mixed_data(2000 + i, 2 * MIB as usize + 4096),
            )
        })
        .collect();
    for (disk, data) in &disks {
        write_file(&bv.path(&format!("{disk}.img")), data);
    }
    let runs: Vec<_> = disks
        .iter()
        .map(|(disk, _)| start(&bv, &bv.path(&format!("{disk}.img")), disk))
        .collect();
    let docs: Vec<_> = runs.into_iter().map(|r| finish(r).ok().json()).collect();
    for ((disk, data), doc) in disks.iter().zip(&docs) {
        assert_eq!(doc["new_disk"], true, "{doc}");
        bv.restore_and_compare(&format!("{disk}@{}", text(doc, "snapshot")), data);
    }
    assert_eq!(
        key_record_disks(&cloud_store(&bv, server)).len(),
        disks.len()
    );
    assert_eq!(bv.snapshots().len(), disks.len());
    bv.verify_ok();
}

#[test]
fn first_backups_racing_for_one_new_name_in_seaweedfs_make_one_disk_and_one_chain() {
    let test = "first_backups_racing_for_one_new_name_in_seaweedfs_make_one_disk_and_one_chain";
    let Some(server) = servers::seaweed(test) else {
        return;
    };
    let bv = server.bv();
    bv.json(&["init"]);
    let racers = 6u64;
    for round in 0..2u64 {
        let disk = format!("same{round}");
        let images: Vec<_> = (0..racers)
            .map(|i| {
                let img = bv.path(&format!("{disk}-{i}.img"));
                let data = random_data(3000 + round * 100 + i, 2 * MIB as usize);
                write_file(&img, &data);
                (img, data)
            })
            .collect();
        let runs: Vec<_> = images
            .iter()
            .map(|(img, _)| start(&bv, img, &disk))
            .collect();
        let mut committed = Vec::new();
        for (run, (_, data)) in runs.into_iter().zip(&images) {
            let r = finish(run);
            if r.code == 0 {
                committed.push((r.json(), data));
            } else {
                // The disk lock orders them: the others fail saying so.
                r.code(1).stderr_has(&["locked"]);
            }
        }
        assert!(!committed.is_empty(), "round {round}: no backup committed");
        assert_eq!(
            key_record_disks(&cloud_store(&bv, server)).len() as u64,
            round + 1,
            "disk {disk} registered more than once"
        );
        // One chain: the first snapshot has no parent, each later one a committed one.
        let ids: BTreeSet<String> = committed.iter().map(|(d, _)| text(d, "snapshot")).collect();
        let roots = committed
            .iter()
            .filter(|(d, _)| d["parent"].is_null())
            .count();
        assert_eq!(roots, 1, "one first snapshot among {ids:?}");
        for (doc, data) in &committed {
            if let Some(parent) = doc["parent"].as_str() {
                assert!(ids.contains(parent), "{doc}");
            }
            bv.restore_and_compare(&format!("{disk}@{}", text(doc, "snapshot")), data);
        }
        let listed = bv.json(&["snapshots", "--disk", &disk]);
        assert_eq!(
            listed["snapshots"].as_array().unwrap().len(),
            committed.len(),
            "{listed}"
        );
        bv.verify_ok();
    }
}
