//! `mount`: snapshots as files over FUSE, and the file-level restore a user does with them
//! (`losetup -r -P` on a snapshot's file, `mount -o ro` its partition, copy a file out).
//! Root, /dev/fuse and loop devices: SKIP outside CI without them, a failure under CI=true.

mod common;

use std::ffi::OsStr;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};

use common::tools::{run_tool, tools};
use common::*;

const MIB: u64 = 1 << 20;

/// A running `mount`, unmounted and waited for when dropped.
struct Mounted {
    child: Option<Child>,
    at: PathBuf,
}

impl Mounted {
    fn start(bv: &Bv, at: &Path) -> Mounted {
        std::fs::create_dir_all(at).unwrap();
        let (mut child, what) =
            bv.spawn(&[OsStr::new("--json"), OsStr::new("mount"), at.as_os_str()]);
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(line.contains("\"ready\""), "{what}: no ready event: {line}");
        Mounted {
            child: Some(child),
            at: at.to_owned(),
        }
    }

    /// SIGTERM: it unmounts and exits 0.
    fn stop(&mut self) {
        let child = self.child.take().unwrap();
        Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!is_mounted(&self.at), "{} still mounted", self.at.display());
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("umount").arg("-l").arg(&self.at).status();
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn is_mounted(p: &Path) -> bool {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(p.to_str().unwrap()))
}

/// Root, /dev/fuse, fusermount3, losetup and the image tools; else SKIP.
fn can_run(test: &str) -> bool {
    if !is_root() {
        return skip(test, "needs root (loop devices, mount)");
    }
    if !Path::new("/dev/fuse").exists() {
        return skip(test, "no /dev/fuse");
    }
    if !Path::new("/dev/loop-control").exists() {
        return skip(test, "no loop device support");
    }
    if !tools(
        test,
        &[
            ("fusermount3", "fuse3"),
            ("sgdisk", "gdisk"),
            ("losetup", "mount"),
        ],
    ) {
        return false;
    }
    let mkfs = Command::new("mkfs.ext4").arg("-V").output();
    mkfs.is_ok_and(|o| o.status.success())
        || skip(
            test,
            "mkfs.ext4 is not installed (apt-get install e2fsprogs)",
        )
}

/// The one snapshot file of disk `disk` under the mountpoint, once it appears.
fn snapshot_file(at: &Path, disk: &str) -> PathBuf {
    let dir = at.join(disk);
    let files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    files[0].clone()
}

#[test]
fn a_file_comes_out_of_a_mounted_snapshot_through_losetup_and_mount() {
    if !can_run("mount_file_level_restore") {
        return;
    }
    let bv = Bv::new();
    // A GPT disk with one ext4 partition filled by mkfs.ext4 -d (no mount needed).
    let content = bv.path("content");
    std::fs::create_dir_all(content.join("etc")).unwrap();
    let wanted = text_data(9, 700_000);
    write_file(&content.join("etc/report.txt"), &wanted);
    let part = bv.path("part.img");
    run_tool(Command::new("truncate").args(["-s", "30M"]).arg(&part), "");
    run_tool(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-d"])
            .arg(&content)
            .arg(&part),
        "",
    );
    let img = bv.path("disk.raw");
    run_tool(Command::new("truncate").args(["-s", "32M"]).arg(&img), "");
    run_tool(
        Command::new("sgdisk").args(["-n", "1:2048:+30M"]).arg(&img),
        "",
    );
    write_at(&img, MIB, &read_file(&part));
    bv.backup(&img, "vm", &[]);

    let at = bv.path("mnt");
    let mut m = Mounted::start(&bv, &at);
    let file = snapshot_file(&at, "vm");
    let name = file.file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        name.ends_with(".raw") && name.contains('T') && name.contains('_'),
        "{name}"
    );
    assert_eq!(std::fs::metadata(&file).unwrap().len(), 32 * MIB);
    assert_file_eq(&file, &read_file(&img));

    let out = run_tool(
        Command::new("losetup")
            .args(["-r", "-P", "-f", "--show"])
            .arg(&file),
        "",
    );
    let dev = String::from_utf8(out).unwrap().trim().to_owned();
    let fsdir = bv.path("fs");
    std::fs::create_dir_all(&fsdir).unwrap();
    let p1 = format!("{dev}p1");
    // Without udev (containers) -P may leave no partition node: ask as partx does.
    if !Path::new(&p1).exists() {
        let _ = Command::new("partx").args(["-a", &dev]).status();
    }
    let mounted = Command::new("mount")
        .args(["-o", "ro", &p1])
        .arg(&fsdir)
        .status()
        .unwrap();
    let got = mounted
        .success()
        .then(|| std::fs::read(fsdir.join("etc/report.txt")));
    let _ = Command::new("umount").arg(&fsdir).status();
    let _ = Command::new("partx").args(["-d", &dev]).status();
    let _ = Command::new("losetup").args(["-d", &dev]).status();
    assert!(mounted.success(), "mount -o ro {p1}");
    assert_bytes_eq(
        &got.unwrap().unwrap(),
        &wanted,
        "the file read through mount + losetup + mount",
    );
    m.stop();
}

#[test]
fn a_damaged_slot_reads_eio_through_fuse_and_the_rest_reads() {
    if !can_run("mount_damaged_slot") {
        return;
    }
    let bv = Bv::new();
    let img = bv.path("disk.raw");
    let data = make_sparse(&img, 4 * MIB, &[(0, random_data(1, (3 * MIB) as usize))]);
    bv.backup(&img, "vm", &[]);
    let pack = &bv.objects("packs")[0];
    let flen = u32::from_le_bytes(read_at(pack, 32, 4).try_into().unwrap()) as u64;
    flip_byte(pack, 32 + flen / 2);
    let at = bv.path("mnt");
    let mut m = Mounted::start(&bv, &at);
    let f = std::fs::File::open(snapshot_file(&at, "vm")).unwrap();
    let mut failed = 0;
    for slot in 0..4u64 {
        let mut buf = vec![0u8; 4096];
        match f.read_exact_at(&mut buf, slot * MIB + 100) {
            Ok(()) => assert_bytes_eq(
                &buf,
                &data[(slot * MIB + 100) as usize..(slot * MIB + 4196) as usize],
                "intact slot",
            ),
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
                failed += 1;
            }
        }
    }
    assert_eq!(failed, 1, "exactly the damaged slot fails");
    drop(f);
    m.stop();
}
