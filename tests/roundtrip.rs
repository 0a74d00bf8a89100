//! Round trips through the real binary: back up a generated image, restore it to a new file,
//! compare byte for byte; the figures of `--json`; restore target rules (`--force`).

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};

use common::*;

/// Back up `data` (already written at `src`) as `disk`, check the figures every backup must
/// satisfy, verify, restore to a new file and compare. Returns the backup document.
fn round_trip(
    bv: &Bv,
    src: &std::path::Path,
    disk: &str,
    data: &[u8],
    extra: &[&str],
) -> serde_json::Value {
    let doc = bv.backup(src, disk, extra);
    let size = data.len() as u64;
    let slot = num(&doc, "slot_size");
    assert_eq!(num(&doc, "disk_size"), size, "{doc}");
    assert_eq!(
        num(&doc, "slots_new") + num(&doc, "slots_reused") + num(&doc, "slots_zero"),
        slot_count(size, slot),
        "every slot is new, reused or zero: {doc}"
    );
    bv.verify_ok();
    bv.restore_and_compare(disk, data);
    bv.restore_and_compare(&format!("{disk}@{}", text(&doc, "short_id")), data);
    doc
}

/// Slots of `data` that hold only zeros.
fn zero_slots(data: &[u8], slot: usize) -> u64 {
    data.chunks(slot)
        .filter(|c| c.iter().all(|&b| b == 0))
        .count() as u64
}

#[test]
fn sparse_image_round_trip() {
    let bv = Bv::new();
    let size = 24 * MIB;
    let regions = vec![
        (4 * MIB + 8 * KIB, text_data(1, 4096)),
        (5 * MIB + 12 * KIB, random_data(2, 300 * KIB as usize)),
        // crosses the boundary between slots 16 and 17
        (17 * MIB - 8 * KIB, random_data(3, 16 * KIB as usize)),
        (size - 4096, random_data(4, 4096)),
    ];
    let src = bv.path("sparse.img");
    let data = make_sparse(&src, size, &regions);
    let touched = touched_slots(
        &regions
            .iter()
            .map(|(o, d)| (*o, d.len() as u64))
            .collect::<Vec<_>>(),
        MIB,
    );
    assert_eq!(touched, vec![4, 5, 16, 17, 23]);
    let doc = round_trip(&bv, &src, "sparse", &data, &[]);
    assert_eq!(num(&doc, "slots_new"), touched.len() as u64, "{doc}");
    assert_eq!(num(&doc, "slots_zero"), 24 - touched.len() as u64, "{doc}");
    assert_eq!(num(&doc, "slots_reused"), 0, "{doc}");
    if reports_holes(&src) {
        // Holes are never read: exactly the slots that overlap data are.
        let expect: u64 = touched.iter().map(|&i| slot_len(i, size, MIB)).sum();
        assert_eq!(
            num(&doc, "bytes_read"),
            expect,
            "only slots with data are read: {doc}"
        );
        // And the restored file is sparse where the slots are zero, and in the zero 4 KiB
        // runs of the stored slots too (restore allocates those slots up front, then punches
        // their zero runs back to holes).
        let out = bv.path("sparse.out");
        bv.restore("sparse", &out, &[]).ok();
        let allocated = std::fs::metadata(&out).expect("stat").blocks() * 512;
        let data_bytes: u64 = regions.iter().map(|(_, d)| d.len() as u64).sum();
        assert!(
            allocated <= data_bytes + 64 * KIB,
            "restored file should be sparse: {allocated} bytes allocated for {data_bytes} bytes of data in {} slots",
            touched.len()
        );
        assert_file_eq(&out, &data);
    } else {
        eprintln!("note: the temp file system reports no holes; bytes_read not checked exactly");
    }
}

#[test]
fn all_zero_images_round_trip() {
    let bv = Bv::new();
    // Zeros written out: every slot is read, none is stored.
    let size = 8 * MIB + 4096;
    let written = bv.path("zeros.img");
    let data = vec![0u8; size as usize];
    write_file(&written, &data);
    let doc = round_trip(&bv, &written, "zeros", &data, &[]);
    assert_eq!(num(&doc, "slots_zero"), 9, "{doc}");
    assert_eq!(num(&doc, "slots_new"), 0, "{doc}");
    assert_eq!(
        num(&doc, "bytes_stored"),
        0,
        "zero slots are never stored: {doc}"
    );
    assert_eq!(num(&doc, "bytes_read"), size, "{doc}");

    // Only a hole: nothing to read, nothing to store.
    let hole = bv.path("hole.img");
    let data = make_sparse(&hole, 16 * MIB, &[]);
    let doc = round_trip(&bv, &hole, "hole", &data, &[]);
    assert_eq!(num(&doc, "slots_zero"), 16, "{doc}");
    assert_eq!(num(&doc, "bytes_stored"), 0, "{doc}");
    if reports_holes(&hole) {
        assert_eq!(num(&doc, "bytes_read"), 0, "holes are never read: {doc}");
    }

    // And a zero-length image.
    let empty = bv.path("empty.img");
    write_file(&empty, &[]);
    let doc = round_trip(&bv, &empty, "empty", &[], &[]);
    assert_eq!(num(&doc, "disk_size"), 0, "{doc}");
}

#[test]
fn random_image_round_trip() {
    let bv = Bv::new();
    let size = 16 * MIB;
    let src = bv.path("random.img");
    let data = random_data(10, size as usize);
    write_file(&src, &data);
    let doc = round_trip(&bv, &src, "random", &data, &[]);
    assert_eq!(num(&doc, "slots_new"), 16, "{doc}");
    assert_eq!(num(&doc, "slots_zero"), 0, "{doc}");
    assert_eq!(num(&doc, "bytes_read"), size, "{doc}");
    let stored = num(&doc, "bytes_stored");
    // Incompressible: stored as is, plus frame and pack overhead.
    assert!(
        stored >= size && stored <= size + 64 * KIB,
        "random data stores its size plus small overhead, got {stored}: {doc}"
    );
    // Compression switched off gives the same bytes back.
    let doc = bv.backup(&src, "random-raw", &["--no-compress"]);
    assert_eq!(num(&doc, "slots_new"), 16, "{doc}");
    bv.restore_and_compare("random-raw", &data);
}

#[test]
fn mixed_image_round_trip() {
    let bv = Bv::new();
    let size = 32 * MIB as usize;
    let src = bv.path("mixed.img");
    let data = mixed_data(20, size);
    write_file(&src, &data);
    let zeros = zero_slots(&data, MIB as usize);
    assert!(zeros >= 2, "the generator should give some all-zero slots");
    let doc = round_trip(&bv, &src, "mixed", &data, &[]);
    assert_eq!(num(&doc, "slots_zero"), zeros, "{doc}");
    assert_eq!(num(&doc, "slots_new"), 32 - zeros, "{doc}");
    let stored = num(&doc, "bytes_stored");
    let nonzero = (32 - zeros) * MIB;
    assert!(
        stored < nonzero,
        "text compresses: stored {stored} of {nonzero} non-zero bytes: {doc}"
    );
    // With compression off the data slots are stored whole.
    let doc = bv.backup(&src, "mixed-raw", &["--no-compress"]);
    assert!(num(&doc, "bytes_stored") >= nonzero, "{doc}");
    bv.restore_and_compare("mixed-raw", &data);
    // A high zstd level changes only the size stored.
    let doc = bv.backup(&src, "mixed-19", &["--zstd-level", "19"]);
    assert!(num(&doc, "bytes_stored") <= stored + 64 * KIB, "{doc}");
    bv.restore_and_compare("mixed-19", &data);
}

#[test]
fn size_not_a_multiple_of_the_slot_size() {
    let bv = Bv::new();
    let size = 5 * MIB as usize + 12345;
    let src = bv.path("odd.img");
    let data = random_data(30, size);
    write_file(&src, &data);
    let doc = round_trip(&bv, &src, "odd", &data, &[]);
    assert_eq!(num(&doc, "slot_size"), MIB, "default slot size: {doc}");
    assert_eq!(num(&doc, "slots_new"), 6, "{doc}");
    assert_eq!(num(&doc, "bytes_read"), size as u64, "{doc}");

    // A tail smaller than a sector and a disk smaller than one slot.
    for (disk, len) in [("tiny", 1usize), ("sub-slot", 700_001)] {
        let p = bv.path(disk);
        let d = random_data(len as u64, len);
        write_file(&p, &d);
        let doc = round_trip(&bv, &p, disk, &d, &[]);
        assert_eq!(num(&doc, "slots_new"), 1, "{doc}");
    }
}

#[test]
fn slot_sizes_64k_and_4m() {
    for (arg, slot) in [("64K", 64 * KIB), ("4M", 4 * MIB)] {
        let bv = Bv::new();
        let size = 9 * MIB as usize + 777;
        let src = bv.path("img");
        let data = mixed_data(40 + slot, size);
        write_file(&src, &data);
        let doc = round_trip(&bv, &src, "d", &data, &["--slot-size", arg]);
        assert_eq!(num(&doc, "slot_size"), slot, "{doc}");
        assert_eq!(
            num(&doc, "slots_zero"),
            zero_slots(&data, slot as usize),
            "{doc}"
        );
        // The slot size is fixed by the disk's first backup.
        write_at(&src, 3 * MIB + 5, &random_data(41, 100));
        let mut changed = data.clone();
        changed[3 * MIB as usize + 5..3 * MIB as usize + 105]
            .copy_from_slice(&random_data(41, 100));
        let other = if slot == 4 * MIB { "64K" } else { "4M" };
        let doc2 = bv.backup(&src, "d", &["--slot-size", other]);
        assert_eq!(num(&doc2, "slot_size"), slot, "slot size kept: {doc2}");
        assert_eq!(num(&doc2, "slots_new"), 1, "one slot changed: {doc2}");
        bv.restore_and_compare(&format!("d@{}", text(&doc2, "short_id")), &changed);
        bv.restore_and_compare(&format!("d@{}", text(&doc, "short_id")), &data);
    }
    // Sizes outside 64K..4M or not a power of two are usage errors.
    let bv = Bv::new();
    let src = bv.path("img");
    write_file(&src, &random_data(1, 4096));
    for bad in ["32K", "8M", "3M", "100000"] {
        bv.run(&[
            "backup",
            src.to_str().unwrap(),
            "--disk",
            "d",
            "--slot-size",
            bad,
        ])
        .code(2)
        .stderr_has(&["slot size"]);
    }
}

#[test]
fn restore_refuses_a_non_empty_target_without_force() {
    let bv = Bv::new();
    let size = 5 * MIB;
    let src = bv.path("src.img");
    let data = make_sparse(
        &src,
        size,
        &[
            (0, random_data(50, 70_000)),
            (3 * MIB + 1, text_data(51, 200_000)),
        ],
    );
    bv.backup(&src, "d", &[]);

    // A bigger file full of 0xEE: refused, and left untouched.
    let target = bv.path("target.img");
    let old = vec![0xEEu8; 10 * MIB as usize];
    write_file(&target, &old);
    bv.restore("d", &target, &[])
        .code(1)
        .stderr_has(&["--force", target.to_str().unwrap()]);
    assert_file_eq(&target, &old);

    // With --force it is overwritten: same size as the disk, holes read as zeros.
    bv.restore("d", &target, &["--force"]).ok();
    assert_file_eq(&target, &data);

    // --no-sync gives the same bytes.
    let nosync = bv.path("nosync.img");
    bv.restore("d", &nosync, &["--no-sync"]).ok();
    assert_file_eq(&nosync, &data);

    // An existing empty file needs no --force.
    let empty = bv.path("empty.img");
    write_file(&empty, &[]);
    bv.restore("d", &empty, &[]).ok();
    assert_file_eq(&empty, &data);

    // A directory is not a target.
    let dir = bv.path("a-dir");
    std::fs::create_dir(&dir).unwrap();
    bv.restore("d", &dir, &[])
        .failed()
        .stderr_has(&["directory"]);

    // Unknown disk or snapshot: clear errors naming them.
    let t = bv.path("never");
    bv.restore("nosuchdisk", &t, &[])
        .code(1)
        .stderr_has(&["nosuchdisk"]);
    bv.restore("d@ffffffff", &t, &[])
        .code(1)
        .stderr_has(&["ffffffff"]);
    assert!(!t.exists(), "a failed restore leaves no target behind");
}

#[test]
fn json_documents_have_the_documented_fields() {
    let bv = Bv::new();
    let src = bv.path("img");
    let size = 3 * MIB + 100;
    let data = mixed_data(60, size as usize);
    write_file(&src, &data);

    let init = bv.json(&["init"]);
    assert_eq!(init["command"], "init");
    let ks = text(&init, "keystore");
    assert!(ks.starts_with(bv.keystore.to_str().unwrap()), "{init}");

    let doc = bv.backup(&src, "d", &[]);
    for f in [
        "bytes_read",
        "bytes_stored",
        "slots_new",
        "slots_reused",
        "slots_zero",
    ] {
        num(&doc, f);
    }
    assert!(doc["seconds"].as_f64().is_some_and(|s| s >= 0.0), "{doc}");
    assert_eq!(doc["command"], "backup");
    assert_eq!(text(&doc, "disk"), "d");
    assert_eq!(num(&doc, "disk_size"), size);
    assert_eq!(num(&doc, "bytes_read"), size, "{doc}");
    assert!(text(&doc, "snapshot").starts_with(&text(&doc, "short_id")));
    assert_eq!(doc["parent"], serde_json::Value::Null);
    assert_eq!(doc["change_source"], "full");
    assert_eq!(doc["vault_created"], false, "init made the vault: {doc}");

    let snaps = bv.snapshots();
    assert_eq!(snaps.len(), 1);
    assert_eq!(snaps[0]["id"], doc["snapshot"]);
    assert_eq!(snaps[0]["disk"], "d");
    assert_eq!(num(&snaps[0], "disk_size"), size);

    let out = bv.path("out");
    let r = bv.run(&["--json", "restore", "d", out.to_str().unwrap()]);
    r.ok();
    let rdoc = r.json();
    assert_eq!(num(&rdoc, "bytes_total"), size, "{rdoc}");
    assert_eq!(rdoc["snapshot"], doc["snapshot"]);
    assert!(rdoc["seconds"].as_f64().is_some(), "{rdoc}");
    assert_file_eq(&out, &data);

    let v = bv.verify_ok();
    assert_eq!(num(&v, "snapshots"), 1, "{v}");
    assert_eq!(num(&v, "disks"), 1, "{v}");
    assert!(num(&v, "extents_checked") >= 1, "{v}");

    // Failures are one JSON document too, with the error and its kind.
    let r = bv.run(&["--json", "restore", "d", out.to_str().unwrap()]);
    r.code(1);
    let e = r.json();
    assert!(text(&e, "error").contains("--force"), "{e}");
    assert_eq!(e["kind"], "AlreadyExists");
}

#[test]
fn first_backup_with_init_creates_the_vault_and_says_where_the_key_is() {
    let bv = Bv::new();
    let src = bv.path("img");
    let data = random_data(70, MIB as usize + 1);
    write_file(&src, &data);
    let r = bv.run(&["backup", "--init", src.to_str().unwrap(), "--disk", "d"]);
    r.ok();
    let key = bv.key_file();
    r.stdout_has(&[
        "created vault",
        key.to_str().unwrap(),
        "blockvault key export",
    ]);
    let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "key file mode");
    let dmode = std::fs::metadata(&bv.keystore)
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(dmode, 0o700, "keystore folder mode");
    // The keys are outside the vault: no vault object holds the auth key or the KEK
    // (keystore layout: auth key at 24..56, the first KEK version's key at 74..106).
    let kbytes = read_file(&key);
    assert!(kbytes.len() >= 106, "key file is {} bytes", kbytes.len());
    for obj in bv.objects("") {
        let b = read_file(&obj);
        for secret in [&kbytes[24..56], &kbytes[74..106]] {
            assert!(
                !b.windows(32).any(|w| w == secret),
                "{} holds key material",
                obj.display()
            );
        }
    }
    // Environment variables work as the flags do.
    let mut c = std::process::Command::new(bin());
    c.env("BLOCKVAULT_VAULT", &bv.vault)
        .env("BLOCKVAULT_KEYSTORE", &bv.keystore)
        .args(["--json", "snapshots"]);
    let r = bv.run_cmd(c, &[] as &[&str]);
    r.ok();
    assert_eq!(r.json()["snapshots"].as_array().map(Vec::len), Some(1));
    bv.restore_and_compare("d", &data);
    // A second init on the same vault is refused.
    bv.run(&["init"]).code(1).stderr_has(&["already"]);
}

#[test]
fn restore_a_byte_range() {
    let bv = Bv::new();
    let size = 7 * MIB + 333;
    let src = bv.path("img");
    let data = make_sparse(
        &src,
        size,
        &[
            (0, mixed_data(80, 3 * MIB as usize)),
            (5 * MIB - 7, random_data(81, MIB as usize)),
            (size - 333, random_data(82, 333)),
        ],
    );
    bv.backup(&src, "d", &[]);
    let cases: Vec<(String, u64, u64)> = [
        (0, 10),
        (MIB - 5, 10),
        (3 * MIB - 100, 2 * MIB + 200),
        (3 * MIB + 10, 4096),
        (size - 100, 100),
        (0, size),
    ]
    .iter()
    .map(|&(o, l)| (format!("{o}:{l}"), o, l))
    .chain([("1M:64K".to_string(), MIB, 64 * KIB)])
    .collect();
    for (arg, off, len) in cases {
        let t = bv.path(&format!("range-{}", unique()));
        bv.restore("d", &t, &["--range", &arg]).ok();
        assert_file_eq(&t, &data[off as usize..(off + len) as usize]);
    }
    let t = bv.path("outside");
    bv.restore("d", &t, &["--range", &format!("{}:2", size - 1)])
        .code(2)
        .stderr_has(&["outside"]);
    assert!(!t.exists());
    bv.restore("d", &t, &["--range", "12"]).code(2);
}
