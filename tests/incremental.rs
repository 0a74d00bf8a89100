//! Incremental backups: only changed slots are stored, every snapshot restores exactly,
//! `--parent none` and explicit parents, and both readers (io_uring and pread).

mod common;

use common::*;

/// Apply `changes` (offset, bytes) to `data` and to the file at `path`.
fn change(path: &std::path::Path, data: &mut [u8], changes: &[(u64, Vec<u8>)]) -> Vec<u64> {
    for (off, bytes) in changes {
        write_at(path, *off, bytes);
        data[*off as usize..*off as usize + bytes.len()].copy_from_slice(bytes);
    }
    touched_slots(
        &changes
            .iter()
            .map(|(o, b)| (*o, b.len() as u64))
            .collect::<Vec<_>>(),
        MIB,
    )
}

#[test]
fn incremental_stores_only_the_changed_slots() {
    let bv = Bv::new();
    let size = 32 * MIB;
    let src = bv.path("disk.img");
    let v1 = random_data(100, size as usize);
    write_file(&src, &v1);
    let s1 = bv.backup(&src, "d", &[]);
    assert_eq!(num(&s1, "slots_new"), 32);

    // Change 1.5 MiB across slots 3-4, 4 KiB inside slot 20, exactly slot 27.
    let mut v2 = v1.clone();
    let touched = change(
        &src,
        &mut v2,
        &[
            (3 * MIB + 100 * KIB, random_data(101, 3 * MIB as usize / 2)),
            (20 * MIB + 5, random_data(102, 4096)),
            (27 * MIB, random_data(103, MIB as usize)),
        ],
    );
    assert_eq!(touched, vec![3, 4, 20, 27]);
    let changed = touched.len() as u64;
    let s2 = bv.backup(&src, "d", &[]);
    assert_eq!(s2["parent"], s1["snapshot"], "parent is the latest: {s2}");
    assert_eq!(s2["change_source"], "hash-compare", "{s2}");
    assert_eq!(
        num(&s2, "bytes_read"),
        size,
        "no change list: every slot is read"
    );
    assert_eq!(num(&s2, "slots_new"), changed, "{s2}");
    assert_eq!(num(&s2, "slots_reused"), 32 - changed, "{s2}");
    assert_eq!(num(&s2, "slots_zero"), 0, "{s2}");
    let stored = num(&s2, "bytes_stored");
    // Slots 3, 4 and 27 changed in more than half their bytes: stored whole. Slot 20 changed
    // in 4 KiB straddling two blocks: stored as an 8 KiB overlay on the parent's extent.
    let expected = 3 * MIB + 8 * KIB;
    assert!(
        stored >= expected && stored <= expected + 64 * KIB,
        "second snapshot should store about {expected} bytes, stored {stored}: {s2}"
    );

    // A third generation: one slot zeroed, one changed back to its v1 content.
    let mut v3 = v2.clone();
    let touched3 = change(
        &src,
        &mut v3,
        &[
            (10 * MIB, vec![0u8; MIB as usize]),
            (27 * MIB, v1[27 * MIB as usize..28 * MIB as usize].to_vec()),
        ],
    );
    assert_eq!(touched3, vec![10, 27]);
    let s3 = bv.backup(&src, "d", &[]);
    assert_eq!(
        s3["parent"], s2["snapshot"],
        "the default parent is the latest snapshot (s2 = {}): {s3}",
        s2["snapshot"]
    );
    assert_eq!(num(&s3, "slots_zero"), 1, "{s3}");
    // Slot 27 is back to content the parent does not have: it is stored again.
    assert!(num(&s3, "slots_new") <= 1, "{s3}");
    assert!(num(&s3, "bytes_stored") <= MIB + 64 * KIB, "{s3}");

    bv.verify_ok();
    bv.restore_and_compare(&format!("d@{}", text(&s1, "short_id")), &v1);
    bv.restore_and_compare(&format!("d@{}", text(&s2, "snapshot")), &v2);
    bv.restore_and_compare(&format!("d@{}", text(&s3, "short_id")), &v3);

    let snaps = bv.snapshots();
    let ids: Vec<&serde_json::Value> = snaps.iter().map(|s| &s["id"]).collect();
    assert_eq!(
        ids,
        vec![&s1["snapshot"], &s2["snapshot"], &s3["snapshot"]],
        "snapshots are listed oldest first"
    );
    assert_eq!(snaps[1]["parent"], s1["snapshot"]);
}

#[test]
fn parent_none_reads_and_stores_everything_and_parent_id_is_honoured() {
    let bv = Bv::new();
    let size = 16 * MIB;
    let src = bv.path("disk.img");
    let mut data = random_data(200, size as usize);
    write_file(&src, &data);
    let s1 = bv.backup(&src, "d", &[]);

    let full = bv.backup(&src, "d", &["--parent", "none"]);
    assert_eq!(full["parent"], serde_json::Value::Null, "{full}");
    assert_eq!(full["change_source"], "full", "{full}");
    assert_eq!(num(&full, "bytes_read"), size);
    assert_eq!(num(&full, "slots_new"), 16, "{full}");
    assert_eq!(num(&full, "slots_reused"), 0, "{full}");
    assert!(num(&full, "bytes_stored") >= size, "{full}");

    // An explicit parent by id prefix.
    let v1 = data.clone();
    change(&src, &mut data, &[(5 * MIB, random_data(201, 100))]);
    let s3 = bv.backup(&src, "d", &["--parent", &text(&s1, "short_id")]);
    assert_eq!(s3["parent"], s1["snapshot"], "{s3}");
    assert_eq!(num(&s3, "slots_new"), 1, "{s3}");
    bv.restore_and_compare(&format!("d@{}", text(&full, "short_id")), &v1);
    bv.restore_and_compare(&format!("d@{}", text(&s3, "short_id")), &data);

    // A parent that does not exist is an error naming it; nothing is written.
    let before = bv.snapshots().len();
    bv.run(&[
        "backup",
        src.to_str().unwrap(),
        "--disk",
        "d",
        "--parent",
        "0123abcd",
    ])
    .code(1)
    .stderr_has(&["0123abcd"]);
    assert_eq!(bv.snapshots().len(), before);
    bv.verify_ok();
}

#[test]
fn unchanged_disk_stores_under_one_mib() {
    let bv = Bv::new();
    let src = bv.path("disk.img");
    let data = mixed_data(300, 24 * MIB as usize + 999);
    write_file(&src, &data);
    let s1 = bv.backup(&src, "d", &[]);
    let s2 = bv.backup(&src, "d", &[]);
    assert_eq!(s2["parent"], s1["snapshot"]);
    assert!(num(&s2, "bytes_stored") < MIB, "{s2}");
    assert_eq!(num(&s2, "slots_new"), 0, "{s2}");
    assert_eq!(num(&s2, "slots_reused"), num(&s1, "slots_new"), "{s2}");
    assert_eq!(num(&s2, "slots_zero"), num(&s1, "slots_zero"), "{s2}");
    bv.restore_and_compare("d", &data);
    bv.verify_ok();
}

#[test]
fn a_disk_that_grows_and_shrinks_between_backups() {
    let bv = Bv::new();
    let src = bv.path("disk.img");
    let small = random_data(400, 6 * MIB as usize + 3);
    write_file(&src, &small);
    let s1 = bv.backup(&src, "d", &[]);
    let mut big = small.clone();
    big.extend_from_slice(&random_data(401, 5 * MIB as usize));
    write_file(&src, &big);
    let s2 = bv.backup(&src, "d", &[]);
    assert_eq!(num(&s2, "disk_size"), big.len() as u64);
    // Slots 0-5 are unchanged; slot 6 (the old short tail) and the new ones are stored.
    assert_eq!(num(&s2, "slots_reused"), 6, "{s2}");
    let shrunk = big[..3 * MIB as usize + 17].to_vec();
    write_file(&src, &shrunk);
    let s3 = bv.backup(&src, "d", &[]);
    assert_eq!(num(&s3, "disk_size"), shrunk.len() as u64);
    assert_eq!(num(&s3, "slots_reused"), 3, "{s3}");
    bv.restore_and_compare(&format!("d@{}", text(&s1, "short_id")), &small);
    bv.restore_and_compare(&format!("d@{}", text(&s2, "short_id")), &big);
    bv.restore_and_compare(&format!("d@{}", text(&s3, "short_id")), &shrunk);
    bv.verify_ok();
}

#[test]
fn both_readers_restore_the_same_bytes() {
    let bv = Bv::new();
    let src = bv.path("disk.img");
    let size = 12 * MIB as usize + 4097;
    let data = make_sparse(
        &src,
        size as u64,
        &[
            (0, mixed_data(500, 5 * MIB as usize)),
            (7 * MIB + 3, random_data(501, 3 * MIB as usize)),
            (size as u64 - 4097, random_data(502, 4097)),
        ],
    );

    // Default reader: io_uring where the kernel allows it (required under CI).
    let d = bv.backup(&src, "default", &[]);
    let reader = text(&d, "reader");
    if reader != "uring" {
        skip(
            "both_readers_restore_the_same_bytes",
            &format!("io_uring unavailable, the default reader was {reader}"),
        );
    }
    // --pread flag.
    let p = bv.backup(&src, "flag", &["--pread"]);
    assert_eq!(text(&p, "reader"), "pread", "{p}");
    // BLOCKVAULT_READER=pread.
    let mut c = bv.command();
    c.env("BLOCKVAULT_READER", "pread");
    let r = bv.run_cmd(
        c,
        &["--json", "backup", src.to_str().unwrap(), "--disk", "env"],
    );
    r.ok();
    let e = r.json();
    assert_eq!(text(&e, "reader"), "pread", "{e}");
    // A shallow and a deep queue.
    let q1 = bv.backup(&src, "qd1", &["--queue-depth", "1", "--threads", "1"]);
    let q64 = bv.backup(&src, "qd64", &["--queue-depth", "64"]);

    for doc in [&d, &p, &e, &q1, &q64] {
        for f in ["bytes_read", "slots_new", "slots_zero", "bytes_stored"] {
            assert_eq!(
                num(doc, f),
                num(&d, f),
                "{f} differs between readers: {doc} vs {d}"
            );
        }
    }
    for disk in ["default", "flag", "env", "qd1", "qd64"] {
        bv.restore_and_compare(disk, &data);
    }
    bv.verify_ok();
}

#[test]
fn snapshots_taken_within_one_second_keep_their_order() {
    // Backups of a small disk follow each other within milliseconds: "latest" (the default
    // parent and `DISK@latest`) and the listing order must still follow creation order.
    let bv = Bv::new();
    let src = bv.path("disk.img");
    let mut docs = Vec::new();
    let mut contents = Vec::new();
    for i in 0..6u64 {
        let data = random_data(600 + i, 256 * KIB as usize);
        write_file(&src, &data);
        docs.push(bv.backup(&src, "d", &[]));
        contents.push(data);
    }
    let listed: Vec<String> = bv.snapshots().iter().map(|s| text(s, "id")).collect();
    let made: Vec<String> = docs.iter().map(|d| text(d, "snapshot")).collect();
    assert_eq!(listed, made, "snapshots are listed oldest first");
    for w in docs.windows(2) {
        assert_eq!(
            w[1]["parent"], w[0]["snapshot"],
            "the default parent is the latest snapshot"
        );
    }
    bv.restore_and_compare("d@latest", &contents[5]);
    bv.restore_and_compare("d", &contents[5]);
    for (d, c) in docs.iter().zip(&contents) {
        bv.restore_and_compare(&format!("d@{}", text(d, "short_id")), c);
    }
}

/// Scattered 4 KiB writes, as a guest makes them, cost about what they wrote: each changed run
/// is stored as an overlay on the parent's slot, generation after generation, and every
/// snapshot still restores exactly. Slots that collect too many overlays are rewritten whole,
/// so restore never follows a long chain.
#[test]
fn scattered_small_writes_are_stored_as_overlays_across_generations() {
    let bv = Bv::new();
    let size = 16 * MIB;
    let src = bv.path("disk.img");
    // Half random, half zeros: overlays over stored extents and over zero slots.
    let mut data = random_data(300, (size / 2) as usize);
    data.resize(size as usize, 0);
    write_file(&src, &data);
    bv.backup(&src, "d", &[]);
    let mut versions = vec![data.clone()];
    let mut rng = Rng::new(301);
    for generation in 0..12 {
        // 40 random 4 KiB blocks per generation, a quarter of them zeroed.
        let mut written = 0u64;
        for _ in 0..40 {
            let block = rng.below(size / 4096);
            let bytes = if rng.below(4) == 0 {
                vec![0u8; 4096]
            } else {
                random_data(rng.next_u64(), 4096)
            };
            let off = (block * 4096) as usize;
            data[off..off + 4096].copy_from_slice(&bytes);
            write_at(&src, block * 4096, &bytes);
            written += 4096;
        }
        let s = bv.backup(&src, "d", &[]);
        let stored = num(&s, "bytes_stored");
        // Each run costs its bytes plus an 80-byte frame; a slot pushed past the overlay bound
        // is rewritten whole (at most a few per generation here).
        assert!(
            stored <= written + 40 * 80 + 2 * MIB,
            "generation {generation}: wrote {written}, stored {stored}: {s}"
        );
        versions.push(data.clone());
    }
    // Unchanged again: overlaid slots are recognised by their content id, nothing is stored.
    let again = bv.backup(&src, "d", &[]);
    assert_eq!(num(&again, "bytes_stored"), 0, "{again}");
    assert_eq!(num(&again, "slots_new"), 0, "{again}");
    versions.push(data.clone());
    // The first incrementals store no whole slot at all.
    let snaps = bv.snapshots();
    assert!(
        num(&snaps[1]["stats"], "bytes_stored") <= 40 * (4096 + 80),
        "{}",
        snaps[1]
    );
    for (s, v) in snaps.iter().zip(&versions) {
        bv.restore_and_compare(&format!("d@{}", text(s, "id")), v);
    }
    bv.verify_ok();
}
