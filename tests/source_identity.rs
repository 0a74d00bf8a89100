//! Which source a backup reads, checked before anything is written.
//!
//! Another source under an existing disk name (src/engine/identity.rs): a new GPT disk GUID
//! (`sgdisk -G`), a new MBR disk signature (`sfdisk --disk-id`) or a table gone is refused
//! (exit 2, naming both values and the latest snapshot, nothing stored) unless `--force`,
//! which backs it up with a warning; a different size is warned about; another path to the
//! same disk is noted. Warnings and notes go to stderr, to the `warnings`/`notes` arrays of
//! `--json`, and into the snapshot's `info.notes` (read back through the library).
//!
//! Raw images in use (src/source/lock.rs): an image a writable `qemu-nbd` serves is refused
//! (exit 2) as a qcow2 one is, a read-only server's is not; while blockvault reads an image
//! no QEMU process can open it for writing; a block device in use is backed up (the
//! crash-consistent case).
//!
//! Without sgdisk, sfdisk or qemu-nbd the tests print SKIP (under CI=true they fail).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use blockvault::crypto::Keystore;
use blockvault::vault::Vault;
use common::layout_tools::{sfdisk, SFDISK};
use common::qemu::{assert_write_locked, Listen, QemuNbd, QEMU_NBD};
use common::tools::{run_tool, tools};
use common::*;
use serde_json::Value;

const SGDISK: (&str, &str) = ("sgdisk", "gdisk");

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// `info.notes` of the newest snapshot of `disk`, read through the library.
fn notes(bv: &Bv, disk: &str) -> Vec<String> {
    let vault = Vault::open(s(&bv.vault), &Keystore::new(&bv.keystore)).expect("open vault");
    let disk = vault.find_disk(disk).expect("disks").expect("the disk");
    let latest = vault
        .snapshots(&disk)
        .expect("snapshots")
        .pop()
        .expect("one");
    latest.info.notes
}

/// The strings of a JSON array field.
fn strings(doc: &Value, field: &str) -> Vec<String> {
    doc[field]
        .as_array()
        .unwrap_or_else(|| panic!("{field} should be an array: {doc}"))
        .iter()
        .map(|v| v.as_str().expect("a string").to_string())
        .collect()
}

/// The partition table identity field `inspect --json` reports for `img`.
fn table_field(bv: &Bv, img: &Path, field: &str) -> String {
    text(&bv.json(&["inspect", s(img)])["layout"]["table"], field)
}

/// An image of `size` bytes with a GPT of one partition and some data.
fn gpt_image(bv: &Bv, name: &str, size: u64, seed: u64) -> PathBuf {
    let img = bv.path(name);
    std::fs::File::create(&img).unwrap().set_len(size).unwrap();
    sgdisk(&img, &["-o", "-n", "1:2048:+4M"]);
    write_at(&img, 2 * MIB, &random_data(seed, MIB as usize));
    img
}

fn sgdisk(img: &Path, args: &[&str]) {
    run_tool(Command::new("sgdisk").args(args).arg(img), "");
}

/// A backup refused for its partition table identity: exit 2, naming `needles`, and
/// nothing stored.
fn refused(bv: &Bv, img: &Path, disk: &str, needles: &[&str]) {
    let packs = bv.objects("packs");
    let snapshots = bv.snapshots().len();
    bv.run(&["backup", s(img), "--disk", disk])
        .code(2)
        .stderr_has(needles)
        .stderr_has(&["--force", "another --disk name"]);
    assert_eq!(bv.objects("packs"), packs, "a refused backup stored packs");
    assert_eq!(bv.snapshots().len(), snapshots);
}

#[test]
fn a_new_gpt_disk_guid_is_refused_without_force() {
    if !tools("a_new_gpt_disk_guid_is_refused_without_force", &[SGDISK]) {
        return;
    }
    let bv = Bv::new();
    let img = gpt_image(&bv, "gpt.img", 32 * MIB, 1);
    let first = bv.backup(&img, "g", &[]);
    assert_eq!(strings(&first, "warnings"), Vec::<String>::new());
    assert_eq!(strings(&first, "notes"), Vec::<String>::new());
    let old = table_field(&bv, &img, "disk_guid");

    sgdisk(&img, &["-G"]);
    let new = table_field(&bv, &img, "disk_guid");
    assert_ne!(old, new, "sgdisk -G made a new GUID");
    let parent = format!("g@{}", text(&first, "short_id"));
    refused(
        &bv,
        &img,
        "g",
        &[
            &format!("source {} has GPT disk GUID {new}", s(&img)),
            &format!(
                "latest snapshot {parent} (of {}) has GPT disk GUID {old}",
                s(&img)
            ),
        ],
    );

    let r = bv.run(&["--json", "backup", s(&img), "--disk", "g", "--force"]);
    r.ok();
    let doc = r.json();
    let warnings = strings(&doc, "warnings");
    assert_eq!(warnings.len(), 1, "{doc}");
    for needle in [&new, &old, &parent, &"--force".to_string()] {
        assert!(warnings[0].contains(needle.as_str()), "{needle}: {doc}");
    }
    r.stderr_has(&[&format!("warning: {}", warnings[0])]);
    assert_eq!(notes(&bv, "g"), vec![format!("warning: {}", warnings[0])]);
    let data = read_file(&img);
    bv.restore_and_compare(&format!("g@{}", text(&doc, "short_id")), &data);

    // The forced snapshot is the disk's latest: its GUID is the one compared from now on.
    let next = bv.backup(&img, "g", &[]);
    assert_eq!(strings(&next, "warnings"), Vec::<String>::new());
    assert!(notes(&bv, "g").is_empty());
}

#[test]
fn a_new_mbr_signature_or_a_table_gone_is_refused_without_force() {
    let test = "a_new_mbr_signature_or_a_table_gone_is_refused_without_force";
    if !tools(test, &[SFDISK]) {
        return;
    }
    let bv = Bv::new();
    let img = bv.path("mbr.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(16 * MIB)
        .unwrap();
    sfdisk(
        &img,
        "label: dos\nlabel-id: 0x11111111\nstart=2048, size=8192\n",
    );
    let first = bv.backup(&img, "m", &[]);
    let parent = format!("m@{}", text(&first, "short_id"));

    run_tool(
        Command::new("sfdisk").args(["--disk-id", s(&img), "0x22222222"]),
        "",
    );
    refused(
        &bv,
        &img,
        "m",
        &[
            "has MBR disk signature 0x22222222",
            &format!(
                "latest snapshot {parent} (of {}) has MBR disk signature 0x11111111",
                s(&img)
            ),
        ],
    );
    // The table wiped: no identity where the latest snapshot had one.
    let saved = read_at(&img, 0, 512);
    write_at(&img, 0, &[0; 512]);
    refused(
        &bv,
        &img,
        "m",
        &[
            "has no partition table identity",
            "has MBR disk signature 0x11111111",
        ],
    );
    let forced = bv.backup(&img, "m", &["--force"]);
    assert_eq!(strings(&forced, "warnings").len(), 1, "{forced}");
    // Partitioning a disk whose latest snapshot had no table is no other disk.
    write_at(&img, 0, &saved);
    let again = bv.backup(&img, "m", &[]);
    assert_eq!(strings(&again, "warnings"), Vec::<String>::new(), "{again}");
}

#[test]
fn a_size_change_is_warned_and_recorded() {
    let bv = Bv::new();
    let big = bv.path("big.img");
    write_file(&big, &mixed_data(2, 32 * MIB as usize));
    let first = bv.backup(&big, "s", &[]);
    let small = bv.path("small.img");
    let data = random_data(3, 16 * MIB as usize);
    write_file(&small, &data);
    let r = bv.run(&["--json", "backup", s(&small), "--disk", "s"]);
    r.ok();
    let doc = r.json();
    let parent = format!("s@{}", text(&first, "short_id"));
    let warning = format!(
        "source {} is 16.0 MiB (16777216 bytes), but the disk's latest snapshot {parent} (of {}) is 32.0 MiB (33554432 bytes): is it the same disk?",
        s(&small),
        s(&big)
    );
    assert_eq!(strings(&doc, "warnings"), vec![warning.clone()]);
    let note = format!(
        "source {} is not the source of the disk's latest snapshot {parent} ({})",
        s(&small),
        s(&big)
    );
    assert_eq!(strings(&doc, "notes"), vec![note.clone()]);
    r.stderr_has(&[&format!("warning: {warning}"), &format!("note: {note}")]);
    assert_eq!(
        notes(&bv, "s"),
        vec![format!("warning: {warning}"), format!("note: {note}")]
    );
    bv.restore_and_compare(&format!("s@{}", text(&doc, "short_id")), &data);
    // The human output warns on stderr too.
    write_file(&big, &mixed_data(4, 32 * MIB as usize));
    bv.run(&["backup", s(&big), "--disk", "s"])
        .ok()
        .stderr_has(&["warning: source", "is 32.0 MiB (33554432 bytes)"]);
}

#[test]
fn another_path_to_the_same_disk_is_only_noted() {
    if !tools("another_path_to_the_same_disk_is_only_noted", &[SGDISK]) {
        return;
    }
    let bv = Bv::new();
    let img = gpt_image(&bv, "a.img", 24 * MIB, 5);
    let first = bv.backup(&img, "p", &[]);
    let moved = bv.path("moved.img");
    std::fs::rename(&img, &moved).unwrap();
    let guid = table_field(&bv, &moved, "disk_guid");
    let r = bv.run(&["--json", "backup", s(&moved), "--disk", "p"]);
    r.ok();
    let doc = r.json();
    assert_eq!(strings(&doc, "warnings"), Vec::<String>::new(), "{doc}");
    let note = format!(
        "source {} is not the source of the disk's latest snapshot p@{} ({}, same GPT disk GUID {guid})",
        s(&moved),
        text(&first, "short_id"),
        s(&img)
    );
    assert_eq!(strings(&doc, "notes"), vec![note.clone()]);
    r.stderr_has(&[&format!("note: {note}")]);
    assert_eq!(notes(&bv, "p"), vec![format!("note: {note}")]);
}

/// A qemu-nbd serving the raw image `img` (writable or `-r`) on a Unix socket in `bv`'s folder.
fn serve_raw(bv: &Bv, img: &Path, writable: bool) -> QemuNbd {
    let sock = bv.path(&format!("nbd-{}.sock", unique()));
    let serve = QemuNbd::serve(img, "raw");
    let serve = if writable { serve.writable() } else { serve };
    serve.start(bv.dir.path(), Listen::Unix(&sock))
}

#[test]
fn a_raw_image_held_writable_is_refused_as_a_qcow2_one_is() {
    if !tools(
        "a_raw_image_held_writable_is_refused_as_a_qcow2_one_is",
        QEMU_NBD,
    ) {
        return;
    }
    let bv = Bv::new();
    let img = bv.path("live.raw");
    let data = mixed_data(6, 8 * MIB as usize);
    write_file(&img, &data);
    let mut server = serve_raw(&bv, &img, true);
    for args in [
        vec!["backup", s(&img), "--disk", "live"],
        vec!["inspect", s(&img)],
    ] {
        bv.run(&args).code(2).stderr_has(&[
            &format!(
                "raw image {} is open for writing by another process",
                s(&img)
            ),
            "QEMU's write lock",
            "torn",
            "nbd://",
        ]);
    }
    assert!(bv.snapshots().is_empty());
    server.stop("-TERM");

    // A read-only server takes no write lock: the image backs up.
    let mut reader = serve_raw(&bv, &img, false);
    let doc = bv.backup(&img, "live", &[]);
    reader.stop("-TERM");
    bv.restore_and_compare(&format!("live@{}", text(&doc, "short_id")), &data);

    // While blockvault has the image open, no QEMU process may open it for writing; once
    // it is closed, one may.
    let open = blockvault::source::RawFile::open(s(&img)).expect("open");
    assert_write_locked("raw", &img);
    drop(open);
    common::qemu::qemu_io("raw", s(&img), &["write -P 0x5a 0 512"]);
}

#[test]
fn a_block_device_in_use_is_backed_up() {
    let test = "a_block_device_in_use_is_backed_up";
    if !tools(test, QEMU_NBD) {
        return;
    }
    let bv = Bv::new();
    let file = bv.path("backing.img");
    let data = random_data(7, 4 * MIB as usize);
    write_file(&file, &data);
    let Some(dev) = LoopDev::attach(&file, test) else {
        return;
    };
    // qemu-nbd holds QEMU's write lock on the device node: not a reason to refuse a device.
    let server = serve_raw(&bv, &dev.path, true);
    let doc = bv.backup(&dev.path, "dev", &[]);
    drop(server);
    bv.restore_and_compare(&format!("dev@{}", text(&doc, "short_id")), &data);
}
