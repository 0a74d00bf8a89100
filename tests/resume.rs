//! Resumed backups: a backup stopped after some packs are durable (SIGKILL) is re-run with the
//! same command and uploads only what is missing, the checkpoint segments it reads are
//! authenticated (a tampered one, or one moved to another disk's folder, is reported and not
//! used), a pack deleted meanwhile is stored again, and prune collects the packs of a run
//! nobody resumes. Local folder, SeaweedFS (S3) and Azurite (Azure Blob) alike.
//!
//! The backups run with `--zstd-level 19 --threads 1` over an image whose first 96 MiB are
//! random (three 32 MiB packs, stored fast) and whose last 24 MiB are text (slow at level 19),
//! so the backup is still running when a test has seen the segments it waits for. No test
//! measures time.

mod common;

use std::path::PathBuf;
use std::process::Child;
use std::time::Duration;

use blockvault::vault::store::cloud::CloudStore;
use blockvault::vault::store::Store;
use common::servers::{self, Server};
use common::*;

/// 96 MiB of random data, then 24 MiB of text.
fn image(bv: &Bv, seed: u64) -> (PathBuf, Vec<u8>) {
    slow_image(bv, &format!("disk-{seed}.img"), seed, 24)
}

/// Checkpoint segment keys of the vault, by whatever lists them.
type Segments<'a> = &'a dyn Fn() -> Vec<String>;

/// Wait until `segments()` lists at least `n`; panics if the backup ended first.
fn wait_for_segments(child: &mut Child, segments: Segments, n: usize) {
    while segments().len() < n {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the backup ended ({status}) before {n} checkpoint segments were written");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Wait until `segments()` lists at least `n`, then SIGKILL the backup.
fn kill_after_segments(mut child: Child, segments: Segments, n: usize) {
    wait_for_segments(&mut child, segments, n);
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert!(
        !status.success(),
        "the backup finished before it was killed"
    );
}

/// Checkpoint segments of a local vault, as object keys.
fn local_segments(bv: &Bv) -> Vec<String> {
    bv.objects("checkpoints")
        .iter()
        .map(|p| bv.key_of(p))
        .collect()
}

fn notes(doc: &serde_json::Value) -> Vec<String> {
    doc["notes"]
        .as_array()
        .expect("notes")
        .iter()
        .map(|n| n.as_str().unwrap().to_string())
        .collect()
}

/// The re-run reused at least `packs` whole packs of random data (32 MiB each) and uploaded
/// the rest; the checkpoint is gone; the snapshot restores exactly and verifies.
fn assert_resumed(bv: &Bv, doc: &serde_json::Value, packs: u64, data: &[u8], disk: &str) {
    let (stored, uploaded) = (num(doc, "bytes_stored"), num(doc, "bytes_uploaded"));
    assert!(uploaded < stored, "{doc}");
    assert!(
        stored - uploaded >= packs * 32 * MIB,
        "reused at least {packs} packs: {doc}"
    );
    assert!(
        notes(doc)
            .iter()
            .any(|n| n.starts_with("resuming an interrupted backup: reusing ")),
        "{doc}"
    );
    bv.restore_and_compare(&format!("{disk}@{}", text(doc, "short_id")), data);
    let r = bv.verify(true);
    r.ok();
    assert_eq!(r.json()["ok"], true, "{}", r.stdout);
}

#[test]
fn a_killed_backup_is_resumed_uploading_only_what_is_missing() {
    let bv = Bv::new();
    bv.json(&["init"]);
    let (img, data) = image(&bv, 1);
    let args = slow_backup(&img, "d");
    let (child, _) = bv.spawn(&args);
    kill_after_segments(child, &|| local_segments(&bv), 2);
    let doc = bv.json(&args);
    assert_resumed(&bv, &doc, 2, &data, "d");
    assert_eq!(local_segments(&bv), Vec::<String>::new(), "checkpoint left");
    // Nothing to resume: every byte stored is uploaded.
    let other = bv.path("other.img");
    let other_data = mixed_data(2, 8 * MIB as usize);
    write_file(&other, &other_data);
    let doc = bv.backup(&other, "e", &[]);
    assert!(num(&doc, "bytes_stored") > 0, "{doc}");
    assert_eq!(
        num(&doc, "bytes_uploaded"),
        num(&doc, "bytes_stored"),
        "{doc}"
    );
}

#[test]
fn tampered_swapped_and_dangling_checkpoints_are_not_used_and_backups_stay_exact() {
    let bv = Bv::new();
    bv.json(&["init"]);
    // Disk b exists, with a snapshot, so a segment can be planted in its folder.
    let small = bv.path("small.img");
    let small_data = mixed_data(3, 4 * MIB as usize);
    write_file(&small, &small_data);
    bv.backup(&small, "b", &[]);
    let b_id = bv.objects("snapshots")[0]
        .parent()
        .unwrap()
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();

    let (img, data) = image(&bv, 4);
    let args = slow_backup(&img, "a");
    let (child, _) = bv.spawn(&args);
    kill_after_segments(child, &|| local_segments(&bv), 3);
    let segs = local_segments(&bv);
    // One segment altered, the pack of another deleted, a third copied to disk b's folder.
    let tampered = &segs[0];
    flip_byte(&bv.vault.join(tampered), 100);
    let dangling = &segs[1];
    let pack_hex = dangling.rsplit('/').next().unwrap();
    std::fs::remove_file(
        bv.vault
            .join(format!("packs/{}/{pack_hex}", &pack_hex[..2])),
    )
    .unwrap();
    let moved = &segs[2];
    let planted = format!("checkpoints/{b_id}/{}", moved.rsplit('/').next().unwrap());
    std::fs::create_dir_all(bv.vault.join(format!("checkpoints/{b_id}"))).unwrap();
    std::fs::copy(bv.vault.join(moved), bv.vault.join(&planted)).unwrap();

    let doc = bv.json(&args);
    let n = notes(&doc);
    assert!(
        n.iter()
            .any(|x| x.starts_with(&format!("checkpoint {tampered} not used: "))),
        "{doc}"
    );
    assert!(
        n.iter().any(|x| x
            == &format!(
                "checkpoint {dangling} not used: pack packs/{}/{pack_hex} is gone",
                &pack_hex[..2]
            )),
        "{doc}"
    );
    assert_resumed(&bv, &doc, 1, &data, "a");

    // Disk b's next backup reports the planted segment and does not use it.
    write_file(&small, &mixed_data(5, 4 * MIB as usize));
    let small_data = read_file(&small);
    let doc = bv.backup(&small, "b", &[]);
    assert!(
        notes(&doc)
            .iter()
            .any(|x| x.starts_with(&format!("checkpoint {planted} not used: "))),
        "{doc}"
    );
    assert_eq!(
        num(&doc, "bytes_uploaded"),
        num(&doc, "bytes_stored"),
        "{doc}"
    );
    bv.restore_and_compare(&format!("b@{}", text(&doc, "short_id")), &small_data);
    assert_eq!(local_segments(&bv), Vec::<String>::new(), "checkpoint left");
    bv.verify_ok();
}

#[test]
fn prune_collects_the_packs_of_a_run_nobody_resumes() {
    let bv = Bv::new();
    bv.json(&["init"]);
    let (img, data) = image(&bv, 6);
    let args = slow_backup(&img, "d");
    let (child, _) = bv.spawn(&args);
    kill_after_segments(child, &|| local_segments(&bv), 1);
    let left = bv.objects("packs").len() as u64;
    assert!(left >= 1);
    // The killed run's lease is held by a process of this machine that is gone: lapsed.
    let doc = bv.json(&["prune"]);
    assert_eq!(num(&doc, "packs_deleted"), left, "{doc}");
    assert_eq!(bv.objects("packs"), Vec::<PathBuf>::new());
    // Its segments stay, naming packs that are gone: the next run stores everything again.
    let segs = local_segments(&bv);
    assert!(!segs.is_empty());
    let doc = bv.json(&args);
    assert_eq!(
        num(&doc, "bytes_uploaded"),
        num(&doc, "bytes_stored"),
        "{doc}"
    );
    for seg in &segs {
        assert!(
            notes(&doc).iter().any(
                |x| x.starts_with(&format!("checkpoint {seg} not used: pack "))
                    && x.ends_with(" is gone")
            ),
            "{seg}: {doc}"
        );
    }
    bv.restore_and_compare(&format!("d@{}", text(&doc, "short_id")), &data);
    bv.verify_ok();
}

/// A backup into `server` SIGKILLed after two packs are durable is resumed by the same
/// command: only the rest is uploaded, the checkpoint goes, the snapshot restores exactly.
fn a_killed_backup_into_an_object_store_is_resumed(server: &Server, seed: u64) {
    let bv = server.bv();
    bv.run(&["init"]).ok();
    let store = CloudStore::open(&bv.vault.to_string_lossy(), &server.config()).unwrap();
    let segments = || store.list("checkpoints").unwrap();
    let (img, data) = image(&bv, seed);
    let args = slow_backup(&img, "d");
    let (child, _) = bv.spawn(&args);
    kill_after_segments(child, &segments, 2);
    let doc = bv.json(&args);
    assert_resumed(&bv, &doc, 2, &data, "d");
    assert_eq!(segments(), Vec::<String>::new(), "checkpoint left");
}

#[test]
fn a_killed_backup_into_seaweedfs_is_resumed() {
    let Some(server) = servers::seaweed("a_killed_backup_into_seaweedfs_is_resumed") else {
        return;
    };
    a_killed_backup_into_an_object_store_is_resumed(server, 7);
}

#[test]
fn a_killed_backup_into_azurite_is_resumed() {
    let Some(server) = servers::azurite("a_killed_backup_into_azurite_is_resumed") else {
        return;
    };
    a_killed_backup_into_an_object_store_is_resumed(server, 9);
}

/// The object server is SIGKILLed under a running backup after two packs are durable: the
/// backup fails (once the client's retries give up) saying no snapshot was written and that
/// it kept its packs; the server restarts on its data, and the same command resumes.
#[test]
fn a_backup_whose_store_is_killed_and_restarted_is_resumed() {
    let test = "a_backup_whose_store_is_killed_and_restarted_is_resumed";
    let Some(mut own) = servers::own_seaweed(test) else {
        return;
    };
    let bv = own.server.bv();
    bv.run(&["init"]).ok();
    let store = CloudStore::open(&bv.vault.to_string_lossy(), &own.server.config()).unwrap();
    let (img, data) = image(&bv, 8);
    let args = slow_backup(&img, "d");
    let (mut child, _) = bv.spawn(&args);
    wait_for_segments(&mut child, &|| store.list("checkpoints").unwrap(), 2);
    own.kill();
    let out = child.wait_with_output().unwrap();
    let run = Run::from_output("backup with its store killed".into(), out);
    run.code(1).stderr_has(&[
        "backup of disk d failed, no snapshot written, kept the ",
        "for a re-run of the same backup to resume",
    ]);
    own.restart();
    let doc = bv.json(&args);
    assert_resumed(&bv, &doc, 2, &data, "d");
    assert_eq!(
        store.list("checkpoints").unwrap(),
        Vec::<String>::new(),
        "checkpoint left"
    );
}
