//! Bitmap lineage end to end, through the `blockvault` binary and the real QEMU tools: a
//! bitmap incremental must never miss writes.
//!
//! What must hold: a `--bitmap X` incremental follows X only if its parent snapshot recorded
//! X as present and recording when it was read (qcow2: enabled, not in use, the same
//! granularity; NBD: present) and X marks at least the bytes it marked then; otherwise the
//! backup compares every slot by hash, warns, and records why (`change_detail`, `notes`), and
//! the restore is exact. The newcomer report's D1 is reproduced step by step. `--bitmap auto`
//! rotates a qcow2 image's bitmaps itself: each incremental reads exactly what the parent's
//! bitmap marks, old bitmaps are removed, a killed or failed run leaves the chain usable and
//! the next run removes what it left; images held for writing, NBD exports and raw files are
//! refused before anything changes. `--verify-unchanged` reports what it re-read.
//!
//! Tools: qemu-img, qemu-io, qemu-nbd (Debian `qemu-utils`). A missing tool prints `SKIP`
//! and the test passes, except under CI=true, where it fails.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::qemu::{assert_restores, qemu_io, Listen, QemuIoSession, QemuNbd, QEMU, QEMU_NBD};
use common::tools::{run_tool, tools};
use common::*;
use serde_json::{json, Value};

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// A fresh vault for `test`, or `None` after a SKIP line when a tool is missing.
fn vault(test: &str, needed: &[(&str, &str)]) -> Option<Bv> {
    tools(test, needed).then(Bv::new)
}

/// `qemu-img ARGS`, which must succeed; its output.
fn img(args: &[&str]) -> String {
    String::from_utf8_lossy(&run_tool(Command::new("qemu-img").args(args), "")).into_owned()
}

/// A qcow2 image of `size` bytes whose every byte is written: `write -P 0x21` over it all.
fn full_image(dir: &Path, name: &str, size: u64) -> PathBuf {
    let path = dir.join(name);
    img(&["create", "-q", "-f", "qcow2", s(&path), &size.to_string()]);
    qemu_io("qcow2", s(&path), &[format!("write -P 0x21 0 {size}")]);
    path
}

/// A qcow2 image converted from `data`.
fn image_of(dir: &Path, name: &str, data: &[u8]) -> PathBuf {
    let raw = dir.join(format!("{name}.raw"));
    write_file(&raw, data);
    let path = dir.join(name);
    img(&["convert", "-f", "raw", "-O", "qcow2", s(&raw), s(&path)]);
    std::fs::remove_file(&raw).expect("remove raw");
    path
}

/// Write pattern `p` at each `(offset, len)` of qcow2 image `path`.
fn write(path: &Path, p: u8, writes: &[(u64, u64)]) {
    let cmds: Vec<String> = writes
        .iter()
        .map(|(o, l)| format!("write -P {p} {o} {l}"))
        .collect();
    qemu_io("qcow2", s(path), &cmds);
}

/// `qemu-img bitmap OPS... IMG NAME`.
fn bitmap(path: &Path, ops: &[&str], name: &str) {
    let mut args = vec!["bitmap"];
    args.extend_from_slice(ops);
    args.extend_from_slice(&[s(path), name]);
    img(&args);
}

/// The names of the image's bitmaps as QEMU lists them (`qemu-img info -U`: also while
/// another process holds the image).
fn bitmaps(path: &Path) -> Vec<String> {
    let out = img(&["info", "-U", "-f", "qcow2", "--output=json", s(path)]);
    let doc: Value = serde_json::from_str(&out).expect("qemu-img info JSON");
    doc["format-specific"]["data"]["bitmaps"]
        .as_array()
        .map(|list| list.iter().map(|b| text(b, "name")).collect())
        .unwrap_or_default()
}

/// The image's bitmaps that `--bitmap auto` added.
fn ours(path: &Path) -> Vec<String> {
    bitmaps(path)
        .into_iter()
        .filter(|n| n.starts_with("blockvault-"))
        .collect()
}

/// `--json backup ARGS...`: the run (exit code checked by the caller).
fn backup_run(bv: &Bv, source: &str, disk: &str, extra: &[&str]) -> Run {
    let mut args = vec!["--json", "backup", source, "--disk", disk];
    args.extend_from_slice(extra);
    bv.run(&args)
}

/// A backup that must succeed by comparing every slot by hash because bitmap `name` has no
/// lineage to the parent: it warns, and its detail and notes say `why`.
fn falls_back(bv: &Bv, source: &str, disk: &str, name: &str, why: &str) -> Value {
    let r = backup_run(
        bv,
        source,
        disk,
        &["--bitmap", name, "--verify-unchanged", "0"],
    );
    r.ok().stderr_has(&["not trusted", why]);
    let doc = r.json();
    assert_eq!(doc["change_source"], "hash-compare", "{doc}");
    let detail = text(&doc, "change_detail");
    assert!(
        detail.starts_with(&format!("bitmap {name} not trusted: ")) && detail.contains(why),
        "{detail}"
    );
    // Over NBD a second note may say the export's URL (its port) is not the parent's.
    assert_eq!(doc["notes"][0], json!(detail), "{doc}");
    let listed = bv.snapshots();
    let last = listed.last().expect("a snapshot");
    assert_eq!(text(last, "change_detail"), detail);
    assert_eq!(last["notes"][0], json!(detail), "{last}");
    doc
}

/// The recorded bitmap `name` of a `backup` or `snapshots` document.
fn recorded<'a>(doc: &'a Value, name: &str) -> &'a Value {
    doc["bitmaps"]
        .as_array()
        .and_then(|l| l.iter().find(|b| b["name"] == name))
        .unwrap_or_else(|| panic!("no bitmap {name} recorded in {doc}"))
}

// ---------------------------------------------------------------------------------------------
// Lineage of --bitmap NAME
// ---------------------------------------------------------------------------------------------

/// The newcomer report's D1, step by step: the rotation broken by a failed backup (the
/// wrapper removed bv-1 anyway) must not yield a snapshot missing the write only bv-1 saw.
#[test]
fn d1_a_rotation_broken_by_a_failed_backup_falls_back_and_restores_exactly() {
    let Some(bv) = vault(
        "d1_a_rotation_broken_by_a_failed_backup_falls_back_and_restores_exactly",
        QEMU,
    ) else {
        return;
    };
    let d = bv.path("d.qcow2");
    img(&["create", "-q", "-f", "qcow2", s(&d), "1G"]);
    qemu_io("qcow2", s(&d), &["write -P 1 0 256M"]);
    bitmap(&d, &["--add", "--enable"], "bv-1");
    let full = bv.backup(&d, "d", &[]);
    assert_eq!(full["change_source"], "full", "{full}");
    assert_eq!(
        *recorded(&full, "bv-1"),
        json!({"name": "bv-1", "granularity": 65536, "enabled": true, "in_use": false, "dirty_bytes": 0})
    );
    qemu_io("qcow2", s(&d), &["write -P 2 10M 1M"]);
    bitmap(&d, &["--add", "--enable"], "bv-2");
    // The backup with --bitmap bv-1 fails (here: a keystore without the vault's key) ...
    let empty = bv.path("empty-keystore");
    std::fs::create_dir(&empty).expect("keystore folder");
    bv.run_cmd(
        bv.command_with_keystore(&empty),
        &["backup", s(&d), "--disk", "d", "--bitmap", "bv-1"],
    )
    .failed();
    // ... and the wrapper removes bv-1 anyway.
    bitmap(&d, &["--remove"], "bv-1");
    qemu_io("qcow2", s(&d), &["write -P 3 20M 1M"]);
    let r = backup_run(&bv, s(&d), "d", &["--bitmap", "bv-2"]);
    r.ok().stderr_has(&["bitmap bv-2 not trusted"]);
    let doc = r.json();
    assert_eq!(doc["change_source"], "hash-compare", "{doc}");
    assert_eq!(
        text(&doc, "change_detail"),
        format!(
            "bitmap bv-2 not trusted: bitmap bv-2 did not exist when parent snapshot {} was \
             read: it was added later, so writes made before it was added are not in it; \
             compared every slot by hash instead",
            text(&full, "short_id")
        )
    );
    assert_restores(&bv, "d@latest", &d, "qcow2");
    // What each snapshot recorded, as `snapshots --json` shows it.
    let listed = bv.snapshots();
    assert_eq!(listed[0]["bitmaps"], full["bitmaps"]);
    assert_eq!(listed[1]["bitmaps"], doc["bitmaps"]);
    assert_eq!(recorded(&listed[1], "bv-2")["enabled"], true);
    assert_eq!(listed[1]["notes"], json!([text(&doc, "change_detail")]));
    bv.verify_ok();
}

/// A bitmap added only after the full backup misses the writes made in between; so it does
/// against that snapshot named with `--parent ID`, even once a later snapshot vouches for it.
#[test]
fn a_bitmap_added_after_the_full_backup_is_not_trusted() {
    let Some(bv) = vault("a_bitmap_added_after_the_full_backup_is_not_trusted", QEMU) else {
        return;
    };
    let d = full_image(bv.dir.path(), "late.qcow2", 32 * MIB);
    let full = bv.backup(&d, "late", &[]);
    write(&d, 0x31, &[(5 * MIB, 4 * KIB)]);
    bitmap(&d, &["--add", "--enable"], "b");
    write(&d, 0x32, &[(9 * MIB, 4 * KIB)]);
    falls_back(
        &bv,
        s(&d),
        "late",
        "b",
        "recorded no dirty bitmaps (its source had none when it was read",
    );
    assert_restores(&bv, "late", &d, "qcow2");

    // The latest snapshot recorded it: trusted against that one, not against the full.
    write(&d, 0x33, &[(13 * MIB, 4 * KIB)]);
    let doc = bv.backup(&d, "late", &["--bitmap", "b"]);
    assert_eq!(doc["change_source"], "bitmap", "{doc}");
    assert_restores(&bv, "late", &d, "qcow2");
    let id = text(&full, "snapshot");
    let r = backup_run(&bv, s(&d), "late", &["--bitmap", "b", "--parent", &id]);
    r.ok().stderr_has(&["bitmap b not trusted"]);
    let doc = r.json();
    assert_eq!(text(&doc, "parent"), id);
    assert_eq!(doc["change_source"], "hash-compare", "{doc}");
    assert_restores(&bv, "late", &d, "qcow2");
}

/// Between two backups a bitmap is cleared, then removed and re-added under its name, then
/// re-added with another granularity: each time a write made before is not in it, and each
/// time the backup notices (by `--verify-unchanged 0`, the lineage check alone).
#[test]
fn a_bitmap_cleared_or_re_added_between_backups_is_not_trusted() {
    let Some(bv) = vault(
        "a_bitmap_cleared_or_re_added_between_backups_is_not_trusted",
        QEMU,
    ) else {
        return;
    };
    let d = full_image(bv.dir.path(), "c.qcow2", 32 * MIB);
    let g64 = ["--add", "--enable", "-g", "64K"];
    bitmap(&d, &g64, "b");
    write(&d, 0x41, &[(MIB, 256 * KIB)]);
    let full = bv.backup(&d, "c", &[]);
    assert_eq!(num(recorded(&full, "b"), "dirty_bytes"), 256 * KIB);

    // Cleared: the write before the clear is gone from it.
    write(&d, 0x42, &[(5 * MIB, 4 * KIB)]);
    bitmap(&d, &["--clear"], "b");
    write(&d, 0x43, &[(9 * MIB, 128 * KIB)]);
    let doc = falls_back(&bv, s(&d), "c", "b", "cleared or replaced since");
    assert!(
        text(&doc, "change_detail").contains("marks 131072 bytes dirty now, fewer than the 262144"),
        "{doc}"
    );
    assert_restores(&bv, "c", &d, "qcow2");

    // Removed and added again under the same name and granularity.
    write(&d, 0x44, &[(13 * MIB, 4 * KIB)]);
    bitmap(&d, &["--remove"], "b");
    bitmap(&d, &g64, "b");
    write(&d, 0x45, &[(17 * MIB, 4 * KIB)]);
    falls_back(&bv, s(&d), "c", "b", "cleared or replaced since");
    assert_restores(&bv, "c", &d, "qcow2");

    // Removed and added again with another granularity, marking more than before.
    write(&d, 0x46, &[(21 * MIB, 4 * KIB)]);
    bitmap(&d, &["--remove"], "b");
    bitmap(&d, &["--add", "--enable", "-g", "4K"], "b");
    write(&d, 0x47, &[(24 * MIB, 2 * MIB)]);
    falls_back(
        &bv,
        s(&d),
        "c",
        "b",
        "had a granularity of 65536 bytes when parent snapshot",
    );
    assert_restores(&bv, "c", &d, "qcow2");

    // Recording since that snapshot: trusted again.
    write(&d, 0x48, &[(29 * MIB, 4 * KIB)]);
    let doc = bv.backup(&d, "c", &["--bitmap", "b", "--verify-unchanged", "0"]);
    assert_eq!(doc["change_source"], "bitmap", "{doc}");
    // Never cleared: it still marks the 2 MiB written before, two whole slots.
    assert_eq!(num(&doc, "bytes_read"), 2 * MIB + 4 * KIB, "{doc}");
    assert_restores(&bv, "c", &d, "qcow2");
    bv.verify_ok();
}

/// A bitmap disabled when the parent was read did not record the writes made then.
#[test]
fn a_bitmap_disabled_at_the_parent_is_not_trusted() {
    let Some(bv) = vault("a_bitmap_disabled_at_the_parent_is_not_trusted", QEMU) else {
        return;
    };
    let d = full_image(bv.dir.path(), "off.qcow2", 32 * MIB);
    bitmap(&d, &["--add", "--disable"], "b");
    let full = bv.backup(&d, "off", &[]);
    assert_eq!(recorded(&full, "b")["enabled"], false, "{full}");
    write(&d, 0x51, &[(3 * MIB, 4 * KIB)]);
    bitmap(&d, &["--enable"], "b");
    write(&d, 0x52, &[(7 * MIB, 4 * KIB)]);
    falls_back(&bv, s(&d), "off", "b", "was disabled when parent snapshot");
    assert_restores(&bv, "off", &d, "qcow2");
}

/// Over NBD a bitmap's state is not reported (`inspect` says so, also of a disabled one), so
/// lineage is presence: a bitmap the parent's export offered is trusted, one it did not is
/// not.
#[test]
fn over_nbd_lineage_is_presence_at_the_parent() {
    let Some(bv) = vault("over_nbd_lineage_is_presence_at_the_parent", QEMU_NBD) else {
        return;
    };
    let dir = bv.dir.path();
    let d = full_image(dir, "n.qcow2", 32 * MIB);
    bitmap(&d, &["--add", "--enable"], "b0");
    bitmap(&d, &["--add", "--disable"], "off");
    let serve = |names: &[&'static str]| {
        let mut server = QemuNbd::serve(&d, "qcow2");
        for n in names {
            server = server.bitmap(n);
        }
        server.start(dir, Listen::Tcp)
    };

    let mut server = serve(&["b0", "off"]);
    let mut doc = bv.json(&["inspect", &server.url]);
    // In the order the server lists them.
    doc["bitmaps"]
        .as_array_mut()
        .expect("bitmaps")
        .sort_by_key(|b| text(b, "name"));
    let unknown = |name: &str| json!({"name": name, "granularity": null, "enabled": null, "in_use": false, "dirty_bytes": 0});
    assert_eq!(doc["bitmaps"], json!([unknown("b0"), unknown("off")]));
    let shown = bv.run(&["inspect", &server.url]);
    shown.ok().stdout_has(&[
        "dirty bitmap b0: present (enabled or disabled: not reported over NBD)",
        "dirty bitmap off: present (enabled or disabled: not reported over NBD)",
    ]);
    assert!(!shown.stdout.contains("enabled,"), "{}", shown.stdout);
    let full = bv.json(&["backup", &server.url, "--disk", "n"]);
    // Recorded without the members NBD does not report.
    assert_eq!(
        *recorded(&full, "b0"),
        json!({"name": "b0", "in_use": false, "dirty_bytes": 0})
    );
    server.stop("-TERM");

    // Offered at the parent: trusted by presence, reads what it marks.
    write(&d, 0x61, &[(2 * MIB, 4 * KIB), (11 * MIB, 64 * KIB)]);
    bitmap(&d, &["--add", "--enable"], "b1");
    let mut server = serve(&["b0", "b1"]);
    let doc = bv.json(&["backup", &server.url, "--disk", "n", "--bitmap", "b0"]);
    assert_eq!(doc["change_source"], "bitmap", "{doc}");
    assert_eq!(num(&doc, "bytes_read"), 2 * 64 * KIB, "{doc}");
    server.stop("-TERM");
    assert_restores(&bv, "n", &d, "qcow2");

    // Added after the parent was read: not trusted.
    write(&d, 0x62, &[(5 * MIB, 4 * KIB)]);
    bitmap(&d, &["--add", "--enable"], "b2");
    write(&d, 0x63, &[(20 * MIB, 4 * KIB)]);
    let mut server = serve(&["b1", "b2"]);
    falls_back(
        &bv,
        &server.url,
        "n",
        "b2",
        "did not exist when parent snapshot",
    );
    server.stop("-TERM");
    assert_restores(&bv, "n", &d, "qcow2");

    // b1 was offered at that parent too: trusted.
    write(&d, 0x64, &[(26 * MIB, 4 * KIB)]);
    let mut server = serve(&["b1", "b2"]);
    let doc = bv.json(&["backup", &server.url, "--disk", "n", "--bitmap", "b1"]);
    assert_eq!(doc["change_source"], "bitmap", "{doc}");
    server.stop("-TERM");
    assert_restores(&bv, "n", &d, "qcow2");
}

// ---------------------------------------------------------------------------------------------
// --bitmap auto
// ---------------------------------------------------------------------------------------------

/// `backup IMG --disk DISK --bitmap auto EXTRA... --json`, which must succeed: its document,
/// after checking that the bitmap it added is named after its snapshot and is the image's
/// only blockvault bitmap.
fn auto(bv: &Bv, d: &Path, disk: &str, extra: &[&str]) -> Value {
    let mut args = vec!["--bitmap", "auto"];
    args.extend_from_slice(extra);
    let doc = bv.backup(d, disk, &args);
    let created = text(&doc, "bitmap_created");
    assert_eq!(created, format!("blockvault-{}", text(&doc, "snapshot")));
    assert_eq!(ours(d), vec![created], "{doc}");
    doc
}

/// The bytes the image's bitmap `name` marks dirty now (`inspect`).
fn dirty(bv: &Bv, d: &Path, name: &str) -> u64 {
    num(recorded(&bv.json(&["inspect", s(d)]), name), "dirty_bytes")
}

/// An auto incremental after writes: driven by the parent's bitmap, reading exactly what it
/// marks, removing `removed` (orphans, then the parent's bitmap); restores exactly.
fn auto_incremental(bv: &Bv, d: &Path, disk: &str, parent: &Value, removed: &[String]) -> Value {
    let prev = text(parent, "bitmap_created");
    let marked = dirty(bv, d, &prev);
    let doc = auto(bv, d, disk, &[]);
    assert_eq!(doc["change_source"], "bitmap", "{doc}");
    assert_eq!(text(&doc, "parent"), text(parent, "snapshot"), "{doc}");
    assert!(
        text(&doc, "change_detail").starts_with(&format!("bitmap {prev}; re-read ")),
        "{doc}"
    );
    assert_eq!(num(&doc, "bytes_read"), marked, "{doc}");
    let mut all: Vec<String> = removed.to_vec();
    all.push(prev);
    assert_eq!(doc["bitmaps_removed"], json!(all), "{doc}");
    assert_restores(bv, disk, d, "qcow2");
    doc
}

#[test]
fn auto_rotates_the_bitmaps_of_a_chain_of_incrementals() {
    let Some(bv) = vault("auto_rotates_the_bitmaps_of_a_chain_of_incrementals", QEMU) else {
        return;
    };
    let dir = bv.dir.path();
    let d = image_of(dir, "a.qcow2", &mixed_data(3, 64 * MIB as usize));
    let full = auto(&bv, &d, "a", &[]);
    assert_eq!(full["change_source"], "full", "{full}");
    assert_eq!(full["bitmaps_removed"], json!([]), "{full}");
    let created = text(&full, "bitmap_created");
    // Added before the read, so recorded as present and recording, nothing dirty yet.
    assert_eq!(recorded(&full, &created)["enabled"], true, "{full}");
    assert_eq!(num(recorded(&full, &created), "dirty_bytes"), 0);
    assert_restores(&bv, "a", &d, "qcow2");

    let mut parent = full;
    let mut states = vec![(text(&parent, "short_id"), keep(&d, 0))];
    for round in 1..=3u64 {
        let writes: Vec<(u64, u64)> = (0..4)
            .map(|k| ((k * 13 + round * 5) % 64 * MIB + round * 4 * KIB, 4 * KIB))
            .collect();
        write(&d, 0x70 + round as u8, &writes);
        parent = auto_incremental(&bv, &d, "a", &parent, &[]);
        states.push((text(&parent, "short_id"), keep(&d, round)));
    }
    let listed = bv.snapshots();
    assert_eq!(listed.len(), 4);
    for snap in &listed {
        assert!(snap["bitmap_created"].is_string(), "{snap}");
    }
    for (id, state) in &states {
        assert_restores(&bv, &format!("a@{id}"), state, "qcow2");
    }
    bv.verify_ok();
}

/// A copy of the image as it is now, to restore an older snapshot against.
fn keep(d: &Path, i: u64) -> PathBuf {
    let copy = d.with_extension(format!("state-{i}.qcow2"));
    std::fs::copy(d, &copy).expect("copy image");
    copy
}

/// An auto run SIGKILLed while it reads leaves its bitmap behind and the parent's in place;
/// the next run removes the orphan, reads the parent's bitmap, and is exact.
#[test]
fn an_auto_run_killed_mid_read_leaves_the_chain_usable() {
    let Some(bv) = vault("an_auto_run_killed_mid_read_leaves_the_chain_usable", QEMU) else {
        return;
    };
    let dir = bv.dir.path();
    // Compressible text, so zstd level 19 on one thread makes a read of seconds.
    let d = image_of(dir, "k.qcow2", &text_data(9, 96 * MIB as usize));
    let full = auto(&bv, &d, "k", &[]);
    let kept = text(&full, "bitmap_created");
    write(&d, 0x81, &[(4 * MIB, 4 * KIB)]);

    let before = std::fs::metadata(&d)
        .expect("stat")
        .modified()
        .expect("mtime");
    let (mut child, what) = bv.spawn(&[
        "backup",
        s(&d),
        "--disk",
        "k",
        "--bitmap",
        "auto",
        "--parent",
        "none",
        "--zstd-level",
        "19",
        "--threads",
        "1",
    ]);
    // Once qemu-img has written its bitmap into the image, the run goes on to read it.
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::fs::metadata(&d)
        .expect("stat")
        .modified()
        .expect("mtime")
        == before
    {
        assert!(Instant::now() < deadline, "{what} added no bitmap");
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        child.try_wait().expect("try_wait").is_none(),
        "{what} ended before it could be killed"
    );
    child.kill().expect("SIGKILL");
    Run::wait(child, what);
    assert_eq!(bv.snapshots().len(), 1, "a killed run commits nothing");
    let left = ours(&d);
    assert_eq!(left.len(), 2, "{left:?}");
    assert!(left.contains(&kept), "{left:?}");
    let orphan: Vec<String> = left.into_iter().filter(|b| *b != kept).collect();

    write(&d, 0x82, &[(8 * MIB, 4 * KIB)]);
    auto_incremental(&bv, &d, "k", &full, &orphan);
    bv.verify_ok();
}

/// An auto run that fails after adding its bitmap (here: another process holds the disk's
/// lock) removes that bitmap again; the next run is exact.
#[test]
fn a_failed_auto_run_removes_its_bitmap() {
    let Some(bv) = vault("a_failed_auto_run_removes_its_bitmap", QEMU) else {
        return;
    };
    let d = full_image(bv.dir.path(), "f.qcow2", 32 * MIB);
    let full = auto(&bv, &d, "f", &[]);
    let kept = text(&full, "bitmap_created");
    write(&d, 0x91, &[(6 * MIB, 4 * KIB)]);
    let lock = std::fs::read_dir(bv.vault.join("locks"))
        .expect("locks folder")
        .map(|e| e.expect("entry").path())
        .find(|p| p.file_name().is_some_and(|n| n.len() == 32))
        .expect("the disk's lock file (named by the disk id)");
    let held = std::fs::File::options()
        .write(true)
        .open(&lock)
        .expect("open lock");
    held.try_lock().expect("hold the disk's lock");
    backup_run(&bv, s(&d), "f", &["--bitmap", "auto"])
        .code(1)
        .stderr_has(&["locked by another blockvault process"]);
    drop(held);
    assert_eq!(ours(&d), vec![kept]);
    assert_eq!(bv.snapshots().len(), 1);
    write(&d, 0x92, &[(12 * MIB, 4 * KIB)]);
    auto_incremental(&bv, &d, "f", &full, &[]);
}

/// An image another process holds for writing is refused before anything changes; NBD
/// exports and raw files are usage errors pointing at the NBD rotation.
#[test]
fn auto_refuses_held_images_nbd_exports_and_raw_files() {
    let Some(bv) = vault(
        "auto_refuses_held_images_nbd_exports_and_raw_files",
        QEMU_NBD,
    ) else {
        return;
    };
    let dir = bv.dir.path();
    let d = full_image(dir, "h.qcow2", 16 * MIB);
    bitmap(&d, &["--add", "--enable"], "mine");
    let writer = QemuIoSession::start(dir, &["-f", "qcow2", "h.qcow2"], "write -P 5 0 4k", "wrote");
    let before = bitmaps(&d);
    backup_run(&bv, s(&d), "h", &["--bitmap", "auto"])
        .code(2)
        .stderr_has(&["h.qcow2 is open for writing by another process"]);
    assert_eq!(bitmaps(&d), before);
    assert!(!bv.vault.join("keys").exists(), "no disk may be registered");
    writer.kill();

    let raw = bv.path("r.raw");
    write_file(&raw, &random_data(1, MIB as usize));
    backup_run(&bv, s(&raw), "r", &["--bitmap", "auto"])
        .code(2)
        .stderr_has(&[
            "r.raw is a raw image",
            "carries no dirty bitmaps",
            "Change sources",
        ]);

    let server = QemuNbd::serve(&raw, "raw").start(dir, Listen::Tcp);
    backup_run(&bv, &server.url, "n", &["--bitmap", "auto"])
        .code(2)
        .stderr_has(&["is an NBD export", "Change sources"]);
    assert!(!bv.vault.join("keys").exists(), "no disk may be registered");
}

// ---------------------------------------------------------------------------------------------
// --verify-unchanged
// ---------------------------------------------------------------------------------------------

/// What `--verify-unchanged` re-read is reported and kept: at least 32 MiB of slots for a
/// claim of three changed slots, drawn only from slots holding data.
#[test]
fn verify_unchanged_reports_what_it_re_read() {
    let Some(bv) = vault("verify_unchanged_reports_what_it_re_read", QEMU) else {
        return;
    };
    let d = full_image(bv.dir.path(), "v.qcow2", 64 * MIB);
    // A second disk, 64 MiB of which only 4 slots hold data.
    let sparse = bv.path("sp.qcow2");
    img(&["create", "-q", "-f", "qcow2", s(&sparse), "64M"]);
    write(
        &sparse,
        0x11,
        &[(0, 2 * MIB), (30 * MIB, MIB), (63 * MIB, MIB)],
    );
    for p in [&d, &sparse] {
        bitmap(p, &["--add", "--enable"], "b");
    }
    bv.backup(&d, "v", &[]);
    bv.backup(&sparse, "sp", &[]);
    let writes = [(MIB, 4 * KIB), (20 * MIB, 4 * KIB), (40 * MIB, 4 * KIB)];
    write(&d, 0x12, &writes);
    write(&sparse, 0x12, &[(MIB, 4 * KIB)]);

    let r = bv.run(&["backup", s(&d), "--disk", "v", "--bitmap", "b"]);
    r.ok().stdout_has(&[
        "changes from bitmap b; re-read 32 of 61 unchanged slots with data (32.0 MiB), all as in the parent",
    ]);
    write(&d, 0x13, &writes);
    let doc = bv.backup(&d, "v", &["--bitmap", "b", "--verify-unchanged", "50"]);
    assert_eq!(
        doc["verify_unchanged"],
        json!({"slots": 50, "bytes": 50 * MIB, "candidates": 61})
    );
    assert_eq!(
        text(&doc, "change_detail"),
        "bitmap b; re-read 50 of 61 unchanged slots with data (50.0 MiB), all as in the parent"
    );
    let doc = bv.backup(&d, "v", &["--bitmap", "b", "--verify-unchanged", "0"]);
    assert_eq!(
        doc["verify_unchanged"],
        json!({"slots": 0, "bytes": 0, "candidates": 61})
    );
    assert_eq!(text(&doc, "change_detail"), "bitmap b");

    // Only the 3 unchanged slots that hold data could differ: all are re-read.
    let doc = bv.backup(&sparse, "sp", &["--bitmap", "b"]);
    assert_eq!(
        doc["verify_unchanged"],
        json!({"slots": 3, "bytes": 3 * MIB, "candidates": 3})
    );
    assert_restores(&bv, "v", &d, "qcow2");
    assert_restores(&bv, "sp", &sparse, "qcow2");
}
