//! Block devices through loop devices (needs root and losetup; under CI=true their absence is
//! a failure, elsewhere the tests skip loudly): a loop device as the backup SOURCE (O_DIRECT
//! with io_uring, pread, buffered) and as the restore TARGET (one holding data needs
//! `--force`), and a target that is too small. tests/restore_targets.rs has the devices a
//! restore refuses: mounted, held, holding data.

mod common;

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;

use common::*;

#[test]
fn loop_device_as_backup_source() {
    let test = "loop_device_as_backup_source";
    let bv = Bv::new();
    let file = bv.path("backing.img");
    // Not a multiple of the slot size (but of the sector size: loop devices round down).
    let size = 5 * MIB + 3 * 512;
    let data = make_sparse(
        &file,
        size,
        &[
            (0, text_data(1, 300 * KIB as usize)),
            (2 * MIB - 512, random_data(2, MIB as usize)),
            (size - 1024, random_data(3, 1024)),
        ],
    );
    let Some(dev) = LoopDev::attach(&file, test) else {
        return;
    };
    let devp = dev.path.to_str().unwrap();

    let default = bv.backup(&dev.path, "dev", &[]);
    assert_eq!(
        num(&default, "disk_size"),
        size,
        "BLKGETSIZE64 size: {default}"
    );
    // A block device has no holes to skip: all of it is read.
    assert_eq!(num(&default, "bytes_read"), size, "{default}");
    assert_eq!(
        num(&default, "slots_zero"),
        2,
        "slots 3 and 4 are zeros: {default}"
    );
    let pread = bv.backup(&dev.path, "dev-pread", &["--pread"]);
    assert_eq!(text(&pread, "reader"), "pread");
    let buffered = bv.backup(
        &dev.path,
        "dev-buffered",
        &["--no-direct", "--queue-depth", "3"],
    );
    for d in [&pread, &buffered] {
        assert_eq!(num(d, "slots_new"), num(&default, "slots_new"), "{d}");
        assert_eq!(num(d, "bytes_stored"), num(&default, "bytes_stored"), "{d}");
    }
    bv.verify_ok();
    for disk in ["dev", "dev-pread", "dev-buffered"] {
        bv.restore_and_compare(disk, &data);
    }
    let snaps = bv.snapshots();
    assert!(
        snaps.iter().all(|s| s["source"] == devp),
        "the source is recorded as the device: {snaps:?}"
    );

    // Change the device through the device itself, then an incremental backup of it.
    let mut v2 = data.clone();
    let patch = random_data(4, 64 * KIB as usize);
    {
        let f = OpenOptions::new().write(true).open(&dev.path).unwrap();
        f.write_all_at(&patch, 4 * MIB + 4096).unwrap();
        f.sync_all().unwrap();
    }
    v2[(4 * MIB + 4096) as usize..(4 * MIB + 4096) as usize + patch.len()].copy_from_slice(&patch);
    let inc = bv.backup(&dev.path, "dev", &[]);
    assert_eq!(inc["parent"], default["snapshot"], "{inc}");
    assert_eq!(num(&inc, "slots_new"), 1, "only slot 4 changed: {inc}");
    bv.restore_and_compare(&format!("dev@{}", text(&inc, "short_id")), &v2);
    bv.restore_and_compare(&format!("dev@{}", text(&default, "short_id")), &data);
}

#[test]
fn loop_device_as_restore_target() {
    let test = "loop_device_as_restore_target";
    let bv = Bv::new();
    let src = bv.path("src.img");
    let size = 6 * MIB + 512;
    // Zero slots in the middle: a device keeps old data, so restore must write the zeros.
    let data = make_sparse(
        &src,
        size,
        &[
            (0, random_data(10, MIB as usize)),
            (4 * MIB + 100, text_data(11, 200_000)),
            (size - 512, random_data(12, 512)),
        ],
    );
    let snap = bv.backup(&src, "d", &[]);
    assert!(num(&snap, "slots_zero") >= 2, "{snap}");

    // A device larger than the disk, full of 0xAA.
    let backing = bv.path("target-backing.img");
    let dev_size = 8 * MIB;
    write_file(&backing, &vec![0xAAu8; dev_size as usize]);
    let Some(dev) = LoopDev::attach(&backing, test) else {
        return;
    };
    // A device holding data needs --force, as a non-empty file does, and is left alone.
    bv.restore("d", &dev.path, &[]).code(1).stderr_has(&[
        "holds data (non-zero bytes in its first MiB, the first at offset 0)",
        "--force",
    ]);
    assert!(
        read_at(&dev.path, 0, dev_size as usize)
            .iter()
            .all(|&b| b == 0xAA),
        "a refused restore writes nothing"
    );
    // Zero slots zeroed by the kernel (BLKZEROOUT: loop devices take it), and with
    // BLOCKVAULT_WRITER=pwrite written as zeros; each time over a device full of 0xAA.
    let mut bv = bv;
    for writer in ["default", "pwrite"] {
        if writer == "pwrite" {
            let dev_file = std::fs::OpenOptions::new()
                .write(true)
                .open(&dev.path)
                .expect("open the device");
            dev_file
                .write_all_at(&vec![0xAAu8; size as usize], 0)
                .expect("refill the device");
            dev_file.sync_all().expect("sync the device");
        }
        bv.env = vec![
            ("BLOCKVAULT_WRITER".into(), writer.into()),
            ("RUST_LOG".into(), "blockvault=debug".into()),
        ];
        let r = bv.run(&[
            "--json",
            "restore",
            "d",
            dev.path.to_str().unwrap(),
            "--force",
        ]);
        r.ok();
        assert_eq!(
            r.stderr.contains("BLKZEROOUT zeroed the zero slots"),
            writer == "default",
            "{writer}: {}",
            r.stderr
        );
        assert_eq!(num(&r.json(), "bytes_total"), size);
        // The disk's bytes, then the rest of the device untouched.
        assert_bytes_eq(
            &read_at(&dev.path, 0, size as usize),
            &data,
            &format!("restored device ({writer})"),
        );
        assert!(
            read_at(&dev.path, size, (dev_size - size) as usize)
                .iter()
                .all(|&b| b == 0xAA),
            "bytes past the disk's end must be left alone"
        );
    }
    drop(dev);
    // The backing file holds the same after the device is gone.
    let back = read_file(&backing);
    assert_bytes_eq(
        &back[..size as usize],
        &data,
        "backing file of the restored device",
    );
}

#[test]
fn restore_target_device_too_small_is_refused() {
    let test = "restore_target_device_too_small_is_refused";
    let bv = Bv::new();
    let src = bv.path("src.img");
    let data = random_data(20, 4 * MIB as usize);
    write_file(&src, &data);
    bv.backup(&src, "d", &[]);
    let backing = bv.path("small-backing.img");
    let old = vec![0x5Au8; 2 * MIB as usize];
    write_file(&backing, &old);
    let Some(dev) = LoopDev::attach(&backing, test) else {
        return;
    };
    let devp = dev.path.to_str().unwrap();
    bv.restore("d", &dev.path, &[]).code(2).stderr_has(&[
        devp,
        &(2 * MIB).to_string(),
        &(4 * MIB).to_string(),
    ]);
    bv.restore("d", &dev.path, &["--force"]).code(2);
    // Nothing was written to it.
    assert_bytes_eq(&read_at(&dev.path, 0, old.len()), &old, "too-small device");
    assert!(dev.path.exists(), "a device is never removed");
}
