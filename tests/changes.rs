//! Change lists (`backup --changed FILE`): only the listed ranges are read, unlisted slots are
//! carried over unread, partially changed slots are stored as overlays, and every snapshot
//! restores exactly; a list that misses a write is caught by `--verify-unchanged`; the disk
//! may grow or shrink; hash comparison after a list-driven backup still works.

mod common;

use common::*;
use serde_json::json;
use std::path::Path;

/// Write 4 KiB of fresh data at each offset, to the file and to `data`; return the plain JSON
/// change list naming them.
fn scatter(path: &Path, data: &mut [u8], offsets: &[u64], seed: u64) -> serde_json::Value {
    let mut list = Vec::new();
    for (i, &off) in offsets.iter().enumerate() {
        let bytes = random_data(seed + i as u64, 4096);
        write_at(path, off, &bytes);
        data[off as usize..off as usize + 4096].copy_from_slice(&bytes);
        list.push(json!({"offset": off, "length": 4096}));
    }
    json!(list)
}

fn write_list(bv: &Bv, name: &str, list: &serde_json::Value) -> String {
    let p = bv.path(name);
    std::fs::write(&p, list.to_string()).expect("write list");
    p.to_str().expect("utf-8").to_string()
}

#[test]
fn change_list_reads_only_listed_blocks_and_restores_exactly() {
    let bv = Bv::new();
    let size = 16 * MIB;
    let src = bv.path("disk.img");
    let mut data = mixed_data(1, size as usize);
    write_file(&src, &data);
    bv.backup(&src, "d", &[]);

    let offsets: Vec<u64> = (0..12).map(|i| i * 1_300_000 / 4096 * 4096).collect();
    let list = scatter(&src, &mut data, &offsets, 50);
    let file = write_list(&bv, "changes.json", &list);
    let s2 = bv.backup(&src, "d", &["--changed", &file, "--verify-unchanged", "4"]);
    assert_eq!(s2["change_source"], "changed-list", "{s2}");
    assert!(text(&s2, "change_detail").contains("plain"), "{s2}");
    // The listed blocks plus the four re-read slots, nothing more.
    let listed = 12 * 4096;
    let read = num(&s2, "bytes_read");
    assert!(
        read >= listed && read <= listed + 4 * MIB,
        "read {read}: {s2}"
    );
    assert!(num(&s2, "bytes_stored") < 2 * listed, "{s2}");
    bv.restore_and_compare("d", &data);
    bv.verify_ok();

    // A hash comparison after it recognises every slot, overlaid ones included.
    let s3 = bv.backup(&src, "d", &[]);
    assert_eq!(s3["change_source"], "hash-compare");
    assert_eq!(num(&s3, "bytes_stored"), 0, "{s3}");
    bv.restore_and_compare("d", &data);
    // And a change after that, found by hashing, restores too.
    scatter(&src, &mut data, &[3 * MIB + 8192], 90);
    let s4 = bv.backup(&src, "d", &[]);
    assert!(num(&s4, "bytes_stored") < 64 * KIB, "{s4}");
    bv.restore_and_compare("d", &data);
}

#[test]
fn a_list_that_misses_a_write_is_caught_and_not_trusted() {
    let bv = Bv::new();
    let size = 8 * MIB;
    let src = bv.path("disk.img");
    let mut data = random_data(2, size as usize);
    write_file(&src, &data);
    bv.backup(&src, "d", &[]);
    // Two writes, but the list names only the first.
    scatter(&src, &mut data, &[MIB + 4096], 60);
    let list = json!([{"offset": MIB + 4096, "length": 4096}]);
    scatter(&src, &mut data, &[5 * MIB], 61);
    let file = write_list(&bv, "partial.json", &list);
    // Re-reading every unchanged slot finds the missed write.
    let run = bv.run(&[
        "--json",
        "backup",
        src.to_str().unwrap(),
        "--disk",
        "d",
        "--changed",
        &file,
        "--verify-unchanged",
        "100",
    ]);
    run.ok().stderr_has(&["differs from the parent"]);
    let s2 = run.json();
    assert_eq!(s2["change_source"], "hash-compare", "{s2}");
    assert!(
        text(&s2, "change_detail").contains("missed a change in slot 5"),
        "{s2}"
    );
    bv.restore_and_compare("d", &data);
}

#[test]
fn the_disk_may_grow_and_shrink_between_list_driven_backups() {
    let bv = Bv::new();
    let src = bv.path("disk.img");
    let mut data = random_data(3, (4 * MIB + 12_288) as usize);
    write_file(&src, &data);
    bv.backup(&src, "d", &[]);
    let empty = write_list(&bv, "empty.json", &json!([]));

    // Grow by 2.5 MiB: the new tail is read whole, the old partial slot too.
    let tail = random_data(4, (5 * MIB / 2) as usize);
    data.extend_from_slice(&tail);
    write_file(&src, &data);
    let s = bv.backup(&src, "d", &["--changed", &empty]);
    assert_eq!(num(&s, "disk_size"), data.len() as u64);
    bv.restore_and_compare("d", &data);

    // Shrink to 3 MiB + 512: the last slot changes length and is read whole.
    data.truncate((3 * MIB + 512) as usize);
    write_file(&src, &data);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&src)
        .unwrap()
        .set_len(data.len() as u64)
        .unwrap();
    let s = bv.backup(&src, "d", &["--changed", &empty]);
    assert_eq!(num(&s, "disk_size"), data.len() as u64);
    bv.restore_and_compare("d", &data);
    bv.verify_ok();
}

#[test]
fn overlay_chains_stay_bounded_over_many_list_driven_backups() {
    let bv = Bv::new();
    let src = bv.path("disk.img");
    let mut data = random_data(5, 2 * MIB as usize);
    write_file(&src, &data);
    bv.backup(&src, "d", &[]);
    // 40 backups of 3 scattered 4 KiB writes each, all in slot 0: its overlays would pass
    // MAX_OVERLAYS (64) without merging.
    for round in 0..40u64 {
        let offs: Vec<u64> = (0..3)
            .map(|k| ((round * 7 + k * 61) % 256) * 4096)
            .collect();
        let list = scatter(&src, &mut data, &offs, 1000 + round * 10);
        let file = write_list(&bv, "round.json", &list);
        bv.backup(&src, "d", &["--changed", &file, "--verify-unchanged", "0"]);
    }
    bv.restore_and_compare("d", &data);
    bv.verify(true).ok();
}

/// List-driven overlays count the parent's too: a slot whose overlays would cover more than
/// half of it is read and stored whole, so the packs of the overlays it replaces become
/// unreferenced once their snapshots are forgotten, and prune frees them. (Counting only each
/// run's changes let shadowed overlays pile up to 64 per slot: tools/bench_prune.sh forgot 900
/// of 1000 such snapshots and prune freed nothing.)
#[test]
fn list_driven_overlays_over_half_a_slot_store_it_whole_and_prune_frees_the_old_ones() {
    let bv = Bv::new();
    let src = bv.path("disk.img");
    let mut data = random_data(7, MIB as usize);
    write_file(&src, &data);
    bv.backup(&src, "d", &[]);
    let mut read = Vec::new();
    for round in 0..12u64 {
        let off = round * 65536;
        let bytes = random_data(100 + round, 65536);
        write_at(&src, off, &bytes);
        data[off as usize..off as usize + 65536].copy_from_slice(&bytes);
        let file = write_list(
            &bv,
            "round.json",
            &json!([{"offset": off, "length": 65536}]),
        );
        let doc = bv.backup(&src, "d", &["--changed", &file, "--verify-unchanged", "0"]);
        read.push(num(&doc, "bytes_read"));
    }
    // Eight 64 KiB overlays cover exactly half the slot; the ninth would pass it: read whole,
    // then overlays again on the new base.
    assert_eq!(read[..8], [65536; 8], "{read:?}");
    assert_eq!(read[8], MIB, "{read:?}");
    assert_eq!(read[9..], [65536; 3], "{read:?}");
    bv.json(&["forget", "--keep-last", "1"]);
    let doc = bv.json(&["prune"]);
    // The full backup's pack and the first eight overlays' are no longer needed.
    assert_eq!(num(&doc, "packs_deleted"), 9, "{doc}");
    bv.restore_and_compare("d", &data);
    bv.verify(true).ok();
}

#[test]
fn change_list_errors_are_clear() {
    let bv = Bv::new();
    let src = bv.path("disk.img");
    write_file(&src, &random_data(6, MIB as usize));
    let s = src.to_str().unwrap();
    let bad = write_list(&bv, "bad.json", &json!({"what": 1}));
    bv.run(&["backup", s, "--disk", "d", "--changed", &bad])
        .code(2)
        .stderr_has(&["not a recognised shape"]);
    let missing = bv.path("missing.json");
    bv.run(&[
        "backup",
        s,
        "--disk",
        "d",
        "--changed",
        missing.to_str().unwrap(),
    ])
    .failed()
    .stderr_has(&["missing.json"]);
    bv.run(&[
        "backup",
        s,
        "--disk",
        "d",
        "--parent",
        "none",
        "--changed",
        &bad,
    ])
    .code(2)
    .stderr_has(&["--parent none"]);
    bv.run(&["backup", s, "--disk", "d", "--bitmap", "b0"])
        .code(2)
        .stderr_has(&["carries no bitmaps"]);
    // VMware areas that stop short of the disk are refused once there is a parent.
    bv.backup(&src, "d", &[]);
    let short = write_list(
        &bv,
        "short.json",
        &json!({"startOffset": 0, "length": 4096, "changedArea": []}),
    );
    bv.run(&["backup", s, "--disk", "d", "--changed", &short])
        .code(2)
        .stderr_has(&["speaks for the first 4096 bytes"]);
}
