//! Changed-block tracking end to end, through the `blockvault` binary and the real QEMU tools:
//! images made by `qemu-img create` / `convert -c` / backing files, dirty bitmaps added with
//! `qemu-img bitmap`, writes made by `qemu-io`, exports served by `qemu-nbd` over TCP and a
//! Unix socket. Every restore is compared with `qemu-img compare -f raw -F FMT restored IMAGE`
//! (plus its size, which `qemu-img compare` forgives when the extra bytes are zero).
//!
//! What must hold: a bitmap incremental reads about what was written and stores less than
//! twice that; chains of bitmap backups (a fresh bitmap per backup) restore every snapshot;
//! compressed images, backing chains and resized disks work; a bitmap left in use by a killed
//! QEMU is refused (exit 2, no snapshot); a bitmap that missed a write is caught by
//! `--verify-unchanged`; `inspect` reports bitmaps, a GPT and a LUKS2 volume, the manifest
//! records the same layout, and the volume's payload is stored without compression.
//!
//! Tools: qemu-img, qemu-io, qemu-nbd (Debian `qemu-utils`), sfdisk (`fdisk`), cryptsetup
//! (`cryptsetup-bin`). A missing tool prints `SKIP` and the test passes, except under
//! CI=true, where it fails.

mod common;

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::qemu::{assert_restores, qemu_io, Listen, QemuNbd, QEMU, QEMU_NBD};
use common::tools::{run_tool, tools};
use common::*;
use serde_json::{json, Value};

/// Slots re-read by `--verify-unchanged` in the backups whose reads are counted: bytes_read
/// may include them, so the bounds allow that many slots on top of the bitmap's ranges.
const SPOT: u64 = 2;
/// The default slot size of a disk's first backup.
const SLOT: u64 = MIB;

// ---------------------------------------------------------------------------------------------
// Tools
// ---------------------------------------------------------------------------------------------

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// A fresh vault for `test`, or `None` after a SKIP line when one of the `needed` tools is
/// missing (a failure under CI=true).
fn vault(test: &str, needed: &[(&str, &str)]) -> Option<Bv> {
    tools(test, needed).then(Bv::new)
}

/// Run `tool args...` with `input` on its stdin; panic with its output if it fails. Returns
/// stdout.
fn run_input(tool: &str, args: &[&str], input: &str) -> String {
    String::from_utf8_lossy(&run_tool(Command::new(tool).args(args), input)).into_owned()
}

fn run(tool: &str, args: &[&str]) -> String {
    run_input(tool, args, "")
}

/// `qemu-img bitmap --add --enable -g G IMG NAME`.
fn add_bitmap(img: &Path, name: &str, granularity: u64) {
    run(
        "qemu-img",
        &[
            "bitmap",
            "--add",
            "--enable",
            "-g",
            &granularity.to_string(),
            s(img),
            name,
        ],
    );
}

/// `qemu-img bitmap --remove IMG NAME`.
fn remove_bitmap(img: &Path, name: &str) {
    run("qemu-img", &["bitmap", "--remove", s(img), name]);
}

/// A qcow2 image `name` in `dir` converted from `data` (a raw file first), with `opts` given
/// to `qemu-img convert` (e.g. `-c` to compress every cluster).
fn qcow2_from(dir: &Path, name: &str, data: &[u8], opts: &[&str]) -> PathBuf {
    let raw = dir.join(format!("{name}.src.raw"));
    write_file(&raw, data);
    let img = dir.join(name);
    convert_qcow2(&raw, &img, opts);
    std::fs::remove_file(&raw).expect("remove raw");
    img
}

/// `qemu-img convert -f raw -O qcow2 OPTS RAW IMG`.
fn convert_qcow2(raw: &Path, img: &Path, opts: &[&str]) {
    let mut args = vec!["convert", "-f", "raw", "-O", "qcow2"];
    args.extend_from_slice(opts);
    args.extend_from_slice(&[s(raw), s(img)]);
    run("qemu-img", &args);
}

/// Write fresh random bytes at each `(offset, len)` of `target` with one qemu-io run: `write
/// -s FILE` reads its bytes from the start of FILE, so each write gets a file of its own
/// (distinct content: no write can be stored as a duplicate of another).
fn write_random(dir: &Path, fmt: &str, target: &str, writes: &[(u64, u64)], seed: u64) {
    write_files(dir, fmt, target, writes, |i, len| {
        random_data(seed + i as u64, len)
    });
}

/// [`write_random`] with the bytes of each write from `content(index, len)`.
fn write_files(
    dir: &Path,
    fmt: &str,
    target: &str,
    writes: &[(u64, u64)],
    content: impl Fn(usize, usize) -> Vec<u8>,
) {
    let mut files = Vec::new();
    let mut cmds = Vec::new();
    for (i, &(off, len)) in writes.iter().enumerate() {
        let f = dir.join(format!("write-{}.bin", unique()));
        write_file(&f, &content(i, len as usize));
        cmds.push(format!("write -s {} {off} {len}", s(&f)));
        files.push(f);
    }
    qemu_io(fmt, target, &cmds);
    for f in files {
        std::fs::remove_file(f).expect("remove pattern file");
    }
}

/// Bytes a bitmap of `granularity` marks for `writes`, clipped to `size`: the writes rounded
/// out to whole granules, overlaps counted once.
fn dirtied(writes: &[(u64, u64)], granularity: u64, size: u64) -> u64 {
    let mut r: Vec<Range<u64>> = writes
        .iter()
        .map(|&(o, l)| {
            o / granularity * granularity..((o + l).div_ceil(granularity) * granularity).min(size)
        })
        .collect();
    r.sort_by_key(|r| r.start);
    let (mut total, mut end) = (0, 0);
    for x in r {
        let start = x.start.max(end);
        if x.end > start {
            total += x.end - start;
            end = x.end;
        }
    }
    total
}

/// `backup SOURCE --disk DISK --bitmap BITMAP --verify-unchanged SPOT`, which must succeed,
/// driven by the bitmap, and read between the `marked` bytes and that plus [`SPOT`] re-read
/// slots. Its document.
fn bitmap_backup(bv: &Bv, source: &str, disk: &str, bitmap: &str, marked: u64) -> Value {
    let spot = SPOT.to_string();
    let doc = bv.json(&[
        "backup",
        source,
        "--disk",
        disk,
        "--bitmap",
        bitmap,
        "--verify-unchanged",
        &spot,
    ]);
    assert_eq!(doc["change_source"], "bitmap", "{doc}");
    // The detail names the bitmap and what --verify-unchanged re-read.
    let detail = text(&doc, "change_detail");
    assert!(
        detail.starts_with(&format!("bitmap {bitmap}; re-read ")),
        "{detail}"
    );
    let read = num(&doc, "bytes_read");
    assert!(
        read >= marked && read <= marked + SPOT * SLOT,
        "read {read} for {marked} bytes the bitmap marks: {doc}"
    );
    doc
}

// ---------------------------------------------------------------------------------------------
// Bitmap incrementals of qcow2 files
// ---------------------------------------------------------------------------------------------

/// Scattered writes over a 64 MiB disk, each slot changed well under half: 4 KiB-aligned runs,
/// an unaligned one, one across a slot boundary, and the disk's last bytes.
fn scattered_writes(size: u64) -> Vec<(u64, u64)> {
    vec![
        (MIB + 8 * KIB, 4 * KIB),
        (3 * MIB + 100 * KIB, 48 * KIB),
        (7 * MIB + 100, 1000),
        (16 * MIB - 8 * KIB, 16 * KIB),
        (23 * MIB + 512 * KIB, 12 * KIB),
        (40 * MIB, 64 * KIB),
        (52 * MIB + 4 * KIB, 8 * KIB),
        (size - 3 * KIB, 3 * KIB),
    ]
}

#[test]
fn bitmap_incrementals_read_about_what_was_written_at_4k_and_64k() {
    let Some(bv) = vault(
        "bitmap_incrementals_read_about_what_was_written_at_4k_and_64k",
        QEMU,
    ) else {
        return;
    };
    let size = 64 * MIB + 64 * KIB;
    for granularity in [4 * KIB, 64 * KIB] {
        let img = qcow2_from(
            bv.dir.path(),
            &format!("g{granularity}.qcow2"),
            &mixed_data(granularity, size as usize),
            &[],
        );
        add_bitmap(&img, "b0", granularity);
        let disk = format!("g{granularity}");
        let full = bv.backup(&img, &disk, &[]);
        assert_eq!(full["change_source"], "full", "{full}");
        assert_restores(&bv, &disk, &img, "qcow2");

        let writes = scattered_writes(size);
        write_random(bv.dir.path(), "qcow2", s(&img), &writes, granularity);
        let marked = dirtied(&writes, granularity, size);
        let doc = bitmap_backup(&bv, s(&img), &disk, "b0", marked);
        let written: u64 = writes.iter().map(|w| w.1).sum();
        if granularity == 4 * KIB {
            // Only the unaligned write and the odd tail round out.
            assert!(
                marked <= written + 8 * KIB,
                "{marked} marked, {written} written"
            );
        }
        // Random bytes: stored about once, never a whole slot per write.
        let stored = num(&doc, "bytes_stored");
        assert!(
            stored >= written && stored < 2 * marked,
            "stored {stored} for {written} written ({marked} marked): {doc}"
        );
        assert_eq!(text(&doc, "parent"), text(&full, "snapshot"));
        assert_restores(&bv, &disk, &img, "qcow2");
    }
    bv.verify_ok();
}

#[test]
fn a_chain_of_bitmap_backups_restores_every_snapshot() {
    let Some(bv) = vault("a_chain_of_bitmap_backups_restores_every_snapshot", QEMU) else {
        return;
    };
    let dir = bv.dir.path();
    let size = 32 * MIB;
    let img = qcow2_from(dir, "vm.qcow2", &mixed_data(7, size as usize), &[]);
    // The bitmap exists before the backup reads: a write between the two is never missed.
    add_bitmap(&img, "b0", 4 * KIB);
    let full = bv.backup(&img, "vm", &[]);
    let keep = |i: usize| {
        let copy = dir.join(format!("state-{i}.qcow2"));
        std::fs::copy(&img, &copy).expect("copy image");
        copy
    };
    let mut states = vec![(text(&full, "short_id"), keep(0))];
    let mut parent = text(&full, "snapshot");
    for round in 1..=4u64 {
        // Each round writes into slots 0, 5 and 10 again, a little further in (overlays on
        // the overlays of earlier rounds), and into three slots of its own; round 2 also
        // zeroes a range.
        let writes: Vec<(u64, u64)> = (0..6u64)
            .map(|k| {
                let slot = if k < 3 { k * 5 } else { (k * 5 + round) % 32 };
                (slot * MIB + round * 20 * KIB, 8 * KIB * (k % 3 + 1))
            })
            .collect();
        write_random(dir, "qcow2", s(&img), &writes, 100 * round);
        let mut marked_writes = writes.clone();
        if round == 2 {
            qemu_io("qcow2", s(&img), &["write -z 9M 128k"]);
            marked_writes.push((9 * MIB, 128 * KIB));
        }
        // Rotate: the next bitmap starts now, the previous one covers exactly this round.
        let (prev, next) = (format!("b{}", round - 1), format!("b{round}"));
        add_bitmap(&img, &next, 4 * KIB);
        let marked = dirtied(&marked_writes, 4 * KIB, size);
        let doc = bitmap_backup(&bv, s(&img), "vm", &prev, marked);
        assert_eq!(text(&doc, "parent"), parent, "{doc}");
        remove_bitmap(&img, &prev);
        parent = text(&doc, "snapshot");
        states.push((text(&doc, "short_id"), keep(round as usize)));
    }
    let listed = bv.snapshots();
    assert_eq!(listed.len(), 5);
    for (i, snap) in listed.iter().enumerate().skip(1) {
        assert_eq!(snap["change_source"], "bitmap", "{snap}");
        let detail = text(snap, "change_detail");
        assert!(
            detail.starts_with(&format!("bitmap b{}; ", i - 1)),
            "{detail}"
        );
    }
    for (id, state) in &states {
        assert_restores(&bv, &format!("vm@{id}"), state, "qcow2");
    }
    bv.verify_ok();
}

#[test]
fn compressed_images_and_backing_chains_back_up_by_bitmap() {
    let Some(bv) = vault(
        "compressed_images_and_backing_chains_back_up_by_bitmap",
        QEMU,
    ) else {
        return;
    };
    let dir = bv.dir.path();
    let size = 24 * MIB;
    // Every cluster compressed; the writes land on compressed clusters (copy on write).
    let compressed = qcow2_from(dir, "c.qcow2", &mixed_data(11, size as usize), &["-c"]);
    // A compressed base under a top holding nothing yet: every read goes to the base.
    let base = qcow2_from(dir, "base.qcow2", &mixed_data(12, size as usize), &["-c"]);
    let top = dir.join("top.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            s(&base),
            "-F",
            "qcow2",
            s(&top),
            "24M",
        ],
    );
    for (disk, img) in [("compressed", &compressed), ("backed", &top)] {
        add_bitmap(img, "b0", 64 * KIB);
        bv.backup(img, disk, &[]);
        assert_restores(&bv, disk, img, "qcow2");
        let writes = [
            (100 * KIB, 4 * KIB),
            (5 * MIB + 3000, 70 * KIB),
            (17 * MIB, 64 * KIB),
            (size - 512, 512),
        ];
        write_random(dir, "qcow2", s(img), &writes, 40);
        bitmap_backup(&bv, s(img), disk, "b0", dirtied(&writes, 64 * KIB, size));
        assert_restores(&bv, disk, img, "qcow2");
    }
}

#[test]
fn disks_grown_and_shrunk_between_bitmap_backups_restore_exactly() {
    let Some(bv) = vault(
        "disks_grown_and_shrunk_between_bitmap_backups_restore_exactly",
        QEMU,
    ) else {
        return;
    };
    let dir = bv.dir.path();
    let img = qcow2_from(dir, "r.qcow2", &random_data(13, 16 * MIB as usize), &[]);
    add_bitmap(&img, "b0", 4 * KIB);
    bv.backup(&img, "r", &[]);

    // Grown to a size that is not a whole number of slots, written near the new end.
    let grown = 24 * MIB + 512;
    run("qemu-img", &["resize", "-q", s(&img), &grown.to_string()]);
    write_random(
        dir,
        "qcow2",
        s(&img),
        &[(2 * MIB, 4 * KIB), (grown - 2048, 2048)],
        50,
    );
    add_bitmap(&img, "b1", 4 * KIB);
    let doc = bv.backup(&img, "r", &["--bitmap", "b0"]);
    assert_eq!(num(&doc, "disk_size"), grown);
    assert_eq!(doc["change_source"], "bitmap", "{doc}");
    assert_restores(&bv, "r", &img, "qcow2");

    // Shrunk into the middle of a slot; the last slot changes length and is read whole.
    let shrunk = 10 * MIB + 4 * KIB + 512;
    run(
        "qemu-img",
        &["resize", "-q", "--shrink", s(&img), &shrunk.to_string()],
    );
    write_random(dir, "qcow2", s(&img), &[(3 * MIB, 8 * KIB)], 60);
    let doc = bv.backup(&img, "r", &["--bitmap", "b1"]);
    assert_eq!(num(&doc, "disk_size"), shrunk);
    assert_eq!(doc["change_source"], "bitmap", "{doc}");
    assert!(
        num(&doc, "bytes_read") <= 8 * KIB + 4 * KIB + 512 + SPOT * SLOT,
        "{doc}"
    );
    assert_restores(&bv, "r", &img, "qcow2");
    bv.verify_ok();
}

// ---------------------------------------------------------------------------------------------
// NBD exports
// ---------------------------------------------------------------------------------------------

#[test]
fn nbd_exports_back_up_by_bitmap_over_tcp_and_a_unix_socket() {
    let Some(bv) = vault(
        "nbd_exports_back_up_by_bitmap_over_tcp_and_a_unix_socket",
        QEMU_NBD,
    ) else {
        return;
    };
    let dir = bv.dir.path();
    let size = 32 * MIB;
    let img = qcow2_from(dir, "n.qcow2", &mixed_data(21, size as usize), &[]);
    add_bitmap(&img, "b0", 64 * KIB);

    let mut server = QemuNbd::serve(&img, "qcow2")
        .bitmap("b0")
        .start(dir, Listen::Tcp);
    let url = server.url.clone();
    let full = bv.json(&["backup", &url, "--disk", "n"]);
    assert_eq!(full["change_source"], "full", "{full}");
    // What the export offers: its bitmap, without a granularity or a state (NBD says
    // neither), and what it marks.
    let inspect = bv.json(&["inspect", &url]);
    assert_eq!(inspect["format"], "nbd", "{inspect}");
    assert_eq!(num(&inspect, "size"), size);
    assert_eq!(
        inspect["bitmaps"],
        json!([{"name": "b0", "granularity": null, "enabled": null, "in_use": false, "dirty_bytes": 0}])
    );
    bv.run(&["inspect", &url]).ok().stdout_has(&[
        "NBD export",
        "dirty bitmap b0: present (enabled or disabled: not reported over NBD), 0 B dirty",
    ]);
    server.stop("-TERM");
    assert_restores(&bv, "n", &img, "qcow2");

    // Written while no server runs; served again (read-only, both bitmaps exported, so the
    // snapshot records b1 as present for the next backup).
    let writes = [(MIB + 4 * KIB, 8 * KIB), (20 * MIB + 1000, 100 * KIB)];
    write_random(dir, "qcow2", s(&img), &writes, 70);
    add_bitmap(&img, "b1", 64 * KIB);
    let mut server = QemuNbd::serve(&img, "qcow2")
        .bitmap("b0")
        .bitmap("b1")
        .start(dir, Listen::Tcp);
    bitmap_backup(
        &bv,
        &server.url,
        "n",
        "b0",
        dirtied(&writes, 64 * KIB, size),
    );
    server.stop("-TERM");
    assert_restores(&bv, "n", &img, "qcow2");

    // Over a Unix socket, with the bitmap started before the previous backup.
    let writes = [(9 * MIB, 4 * KIB), (size - 64 * KIB, 64 * KIB)];
    write_random(dir, "qcow2", s(&img), &writes, 80);
    let sock = dir.join("nbd.sock");
    let mut server = QemuNbd::serve(&img, "qcow2")
        .bitmap("b1")
        .start(dir, Listen::Unix(&sock));
    bitmap_backup(
        &bv,
        &server.url,
        "n",
        "b1",
        dirtied(&writes, 64 * KIB, size),
    );
    // An export without that bitmap: a usage error naming what it offers.
    bv.run(&["backup", &server.url, "--disk", "n", "--bitmap", "b0"])
        .code(2)
        .stderr_has(&["offers: b1"]);
    server.stop("-TERM");
    assert_restores(&bv, "n", &img, "qcow2");
    assert_eq!(bv.snapshots().len(), 3);
}

// ---------------------------------------------------------------------------------------------
// Bitmaps that cannot be trusted
// ---------------------------------------------------------------------------------------------

#[test]
fn a_bitmap_left_in_use_by_a_killed_qemu_nbd_is_refused() {
    let Some(bv) = vault(
        "a_bitmap_left_in_use_by_a_killed_qemu_nbd_is_refused",
        QEMU_NBD,
    ) else {
        return;
    };
    let dir = bv.dir.path();
    let img = qcow2_from(dir, "u.qcow2", &mixed_data(31, 16 * MIB as usize), &[]);
    add_bitmap(&img, "b0", 64 * KIB);
    bv.backup(&img, "u", &[]);

    // A writable export marks the bitmap in use when it opens the image; a write goes
    // through it, then the server dies without closing the image.
    let sock = dir.join("rw.sock");
    let mut server = QemuNbd::serve(&img, "qcow2")
        .writable()
        .start(dir, Listen::Unix(&sock));
    write_random(dir, "raw", &server.url, &[(2 * MIB, 64 * KIB)], 90);
    let refused = |when: &str| {
        bv.run(&["backup", s(&img), "--disk", "u", "--bitmap", "b0"])
            .code(2)
            .stderr_has(&["bitmap b0", "is in use", "back up without --bitmap"]);
        assert_eq!(bv.snapshots().len(), 1, "{when}: no snapshot may be added");
    };
    // While the server runs, the image itself is refused: QEMU holds its write lock.
    bv.run(&["backup", s(&img), "--disk", "u", "--bitmap", "b0"])
        .code(2)
        .stderr_has(&["u.qcow2 is open for writing by another process"]);
    assert_eq!(
        bv.snapshots().len(),
        1,
        "no snapshot may be added while qemu-nbd runs"
    );
    server.stop("-KILL");
    refused("after qemu-nbd was killed");
    let doc = bv.json(&["inspect", s(&img)]);
    assert_eq!(doc["bitmaps"][0]["name"], "b0", "{doc}");
    assert_eq!(doc["bitmaps"][0]["in_use"], true, "{doc}");
    bv.run(&["inspect", s(&img)])
        .ok()
        .stdout_has(&["dirty bitmap b0: enabled", "IN USE"]);

    // The way out the message gives: a fresh bitmap, then one backup without a bitmap.
    remove_bitmap(&img, "b0");
    add_bitmap(&img, "b1", 64 * KIB);
    let doc = bv.backup(&img, "u", &[]);
    assert_eq!(doc["change_source"], "hash-compare", "{doc}");
    assert_restores(&bv, "u", &img, "qcow2");
    write_random(dir, "qcow2", s(&img), &[(5 * MIB, 4 * KIB)], 91);
    let doc = bv.backup(&img, "u", &["--bitmap", "b1"]);
    assert_eq!(doc["change_source"], "bitmap", "{doc}");
    assert_restores(&bv, "u", &img, "qcow2");
}

#[test]
fn a_bitmap_that_missed_a_write_is_caught_by_verify_unchanged() {
    let Some(bv) = vault(
        "a_bitmap_that_missed_a_write_is_caught_by_verify_unchanged",
        QEMU,
    ) else {
        return;
    };
    let dir = bv.dir.path();
    let img = qcow2_from(dir, "w.qcow2", &mixed_data(41, 16 * MIB as usize), &[]);
    add_bitmap(&img, "b0", 4 * KIB);
    bv.backup(&img, "w", &[]);
    write_random(dir, "qcow2", s(&img), &[(MIB + 4 * KIB, 4 * KIB)], 100);
    // Disabled for one write: the bitmap misses it.
    run("qemu-img", &["bitmap", "--disable", s(&img), "b0"]);
    write_random(dir, "qcow2", s(&img), &[(9 * MIB + 8 * KIB, 4 * KIB)], 101);
    run("qemu-img", &["bitmap", "--enable", s(&img), "b0"]);

    // More re-reads than unchanged slots: every one is checked, the missed one included.
    let r = bv.run(&[
        "--json",
        "backup",
        s(&img),
        "--disk",
        "w",
        "--bitmap",
        "b0",
        "--verify-unchanged",
        "1000",
    ]);
    r.ok().stderr_has(&["differs from the parent"]);
    let doc = r.json();
    assert_eq!(doc["change_source"], "hash-compare", "{doc}");
    let detail = text(&doc, "change_detail");
    assert!(
        detail.contains("bitmap b0") && detail.contains("missed a change in slot 9"),
        "{detail}"
    );
    let listed = bv.snapshots();
    let last = listed.last().expect("snapshot");
    assert_eq!(last["change_source"], "hash-compare", "{last}");
    assert_eq!(text(last, "change_detail"), detail);
    assert_restores(&bv, "w", &img, "qcow2");
}

// ---------------------------------------------------------------------------------------------
// inspect, layout, ciphertext
// ---------------------------------------------------------------------------------------------

#[test]
fn inspect_lists_the_bitmaps_of_a_qcow2_image() {
    let Some(bv) = vault("inspect_lists_the_bitmaps_of_a_qcow2_image", QEMU) else {
        return;
    };
    let img = qcow2_from(
        bv.dir.path(),
        "i.qcow2",
        &mixed_data(51, 8 * MIB as usize),
        &[],
    );
    add_bitmap(&img, "b0", 4 * KIB);
    add_bitmap(&img, "off", 64 * KIB);
    run("qemu-img", &["bitmap", "--disable", s(&img), "off"]);
    let doc = bv.json(&["inspect", s(&img)]);
    assert_eq!(doc["format"], "qcow2", "{doc}");
    assert_eq!(num(&doc, "size"), 8 * MIB);
    assert_eq!(
        doc["bitmaps"],
        json!([
            {"name": "b0", "granularity": 4096, "enabled": true, "in_use": false, "dirty_bytes": 0},
            {"name": "off", "granularity": 65536, "enabled": false, "in_use": false, "dirty_bytes": 0},
        ])
    );
    bv.run(&["inspect", s(&img)]).ok().stdout_has(&[
        "qcow2 image",
        "dirty bitmap b0: enabled, granularity 4.0 KiB",
        "dirty bitmap off: disabled, granularity 64.0 KiB",
    ]);
}

/// The GPT partition type of a LUKS volume.
const LUKS_TYPE: &str = "CA7D7CCB-63ED-4C53-861C-1742536059CC";

/// The tools [`gpt_with_luks2`] runs, and qemu-img to wrap its image in qcow2.
const GPT_LUKS2: &[(&str, &str)] = &[
    ("sfdisk", "fdisk"),
    ("cryptsetup", "cryptsetup-bin"),
    ("qemu-img", "qemu-utils"),
];

/// A 64 MiB GPT disk image: partition 1 (8 MiB), partition 2 (24 MiB) holding a fresh LUKS2
/// volume, partition 3 (16 MiB). Returns the image, the partitions' byte ranges as sfdisk
/// reports them, the volume's data offset as cryptsetup reports it, and its UUID.
fn gpt_with_luks2(dir: &Path) -> (PathBuf, Vec<Range<u64>>, u64, String) {
    let img = dir.join("disk.img");
    std::fs::File::create(&img)
        .and_then(|f| f.set_len(64 * MIB))
        .expect("image");
    run_input(
        "sfdisk",
        &["-q", "--no-reread", "--no-tell-kernel", s(&img)],
        &format!("label: gpt\nsize=8MiB\nsize=24MiB, type={LUKS_TYPE}\nsize=16MiB\n"),
    );
    let sf: Value = serde_json::from_str(&run("sfdisk", &["--json", s(&img)])).expect("JSON");
    let parts: Vec<Range<u64>> = sf["partitiontable"]["partitions"]
        .as_array()
        .expect("partitions")
        .iter()
        .map(|p| {
            let start = num(p, "start") * 512;
            start..start + num(p, "size") * 512
        })
        .collect();

    let luks = dir.join("luks.img");
    std::fs::File::create(&luks)
        .and_then(|f| f.set_len(parts[1].end - parts[1].start))
        .expect("volume file");
    let key = dir.join("luks.key");
    write_file(&key, b"a key file for the cbt tests, 32 bytes or more");
    run(
        "cryptsetup",
        &[
            "luksFormat",
            "-q",
            "--type",
            "luks2",
            "--key-file",
            s(&key),
            "--pbkdf",
            "pbkdf2",
            "--pbkdf-force-iterations",
            "1000",
            s(&luks),
        ],
    );
    let meta: Value = serde_json::from_str(&run(
        "cryptsetup",
        &["luksDump", "--dump-json-metadata", s(&luks)],
    ))
    .expect("luksDump JSON");
    let data_offset: u64 = meta["segments"]["0"]["offset"]
        .as_str()
        .and_then(|o| o.parse().ok())
        .expect("segment offset");
    let uuid = run("cryptsetup", &["luksUUID", s(&luks)])
        .trim()
        .to_string();
    write_at(&img, parts[1].start, &read_file(&luks));
    (img, parts, data_offset, uuid)
}

/// `len` bytes of compressible text, distinct per 1 MiB (no slot dedups against another).
fn text_slots(seed: u64, len: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(len as usize);
    for i in 0..len.div_ceil(MIB) {
        v.extend_from_slice(&text_data(seed * 1000 + i, MIB as usize));
    }
    v.truncate(len as usize);
    v
}

#[test]
fn gpt_and_luks2_are_inspected_recorded_and_the_payload_stored_uncompressed() {
    let test = "gpt_and_luks2_are_inspected_recorded_and_the_payload_stored_uncompressed";
    let Some(bv) = vault(test, GPT_LUKS2) else {
        return;
    };
    let dir = bv.dir.path();
    let (img, parts, data_offset, uuid) = gpt_with_luks2(dir);
    let payload = parts[1].start + data_offset..parts[1].end;

    let doc = bv.json(&["inspect", s(&img)]);
    let layout = &doc["layout"];
    assert_eq!(layout["table"]["scheme"], "gpt", "{layout}");
    assert_eq!(layout["table"]["sector_size"], 512);
    let found: Vec<Range<u64>> = layout["table"]["partitions"]
        .as_array()
        .expect("partitions")
        .iter()
        .map(|p| num(p, "first_byte")..num(p, "last_byte") + 1)
        .collect();
    assert_eq!(found, parts, "{layout}");
    let volumes = layout["volumes"].as_array().expect("volumes");
    assert_eq!(volumes.len(), 1, "{layout}");
    let v = &volumes[0];
    assert_eq!(v["format"]["type"], "luks2", "{v}");
    assert_eq!(v["location"], json!({"at": "partition", "index": 2}));
    assert_eq!(
        v["volume"],
        json!({"start": parts[1].start, "end": parts[1].end})
    );
    assert_eq!(
        v["payload"],
        json!({"start": payload.start, "end": payload.end})
    );
    assert_eq!(v["uuid"], uuid.as_str());
    assert_eq!(layout["problems"], json!([]));
    bv.run(&["inspect", s(&img)])
        .ok()
        .stdout_has(&["GPT", "partition 2", "LUKS2", "xts-plain64"]);
    // The same disk wrapped in qcow2 shows the same layout.
    let wrapped = dir.join("disk.qcow2");
    convert_qcow2(&img, &wrapped, &[]);
    assert_eq!(&bv.json(&["inspect", s(&wrapped)])["layout"], layout);

    // The manifest records the layout inspect printed.
    bv.backup(&img, "disk", &[]);
    assert_eq!(&bv.snapshots()[0]["layout"], layout);

    // Compressible bytes (as if the volume's ciphertext were) in the payload: stored whole.
    let len = payload.end - payload.start;
    write_at(&img, payload.start, &text_slots(1, len));
    let doc = bv.backup(&img, "disk", &[]);
    let stored = num(&doc, "bytes_stored");
    assert!(
        stored >= len && stored < len + 64 * KIB,
        "payload of {len} bytes stored in {stored}: {doc}"
    );
    // The same kind of bytes outside the volume compress.
    write_at(&img, parts[2].start, &text_slots(2, len));
    let doc = bv.backup(&img, "disk", &[]);
    let stored = num(&doc, "bytes_stored");
    assert!(
        stored < len / 2,
        "{len} bytes of text stored in {stored}: {doc}"
    );
    bv.restore_and_compare("disk", &read_file(&img));
    for snap in bv.snapshots() {
        assert_eq!(&snap["layout"], layout, "{snap}");
    }
}

#[test]
fn bitmap_pieces_inside_a_luks2_payload_are_stored_uncompressed() {
    let test = "bitmap_pieces_inside_a_luks2_payload_are_stored_uncompressed";
    let Some(bv) = vault(test, &[GPT_LUKS2, &[("qemu-io", "qemu-utils")]].concat()) else {
        return;
    };
    let dir = bv.dir.path();
    let (raw, parts, data_offset, _) = gpt_with_luks2(dir);
    let img = dir.join("disk.qcow2");
    convert_qcow2(&raw, &img, &[]);
    add_bitmap(&img, "b0", 4 * KIB);
    bv.backup(&img, "disk", &[]);
    // 16 KiB of text into each of four payload slots: read as pieces, stored as overlays.
    let start = parts[1].start + data_offset;
    let writes: Vec<(u64, u64)> = (0..4)
        .map(|i| (start + i * MIB + 64 * KIB, 16 * KIB))
        .collect();
    write_files(dir, "qcow2", s(&img), &writes, |i, len| {
        text_data(200 + i as u64, len)
    });
    let doc = bv.backup(&img, "disk", &["--bitmap", "b0"]);
    assert_eq!(doc["change_source"], "bitmap", "{doc}");
    let written: u64 = writes.iter().map(|w| w.1).sum();
    let stored = num(&doc, "bytes_stored");
    assert!(
        stored >= written,
        "{written} bytes written into the payload stored in {stored}: {doc}"
    );
    assert_restores(&bv, "disk", &img, "qcow2");
}
