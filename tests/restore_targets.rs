//! Where a restore may write, and what it refuses: block devices that are mounted, held or
//! hold data (loop devices, real mounts; root), qcow2 images written natively (checked by
//! `qemu-img check` and `compare`), NBD exports (qemu-nbd over a Unix socket and TCP, nbdkit's
//! `memory` with and without WRITE_ZEROES), a best-effort restore over damaged packs, and a
//! restore stopped by SIGINT or SIGTERM, and one that fills its filesystem (io_uring and
//! `pwrite` writes). Every restore is compared byte for byte.
//!
//! Tools: qemu-utils, nbdkit, e2fsprogs, fdisk (sfdisk), util-linux (losetup, partx, mount),
//! dmsetup where the kernel has device-mapper. Without them the tests print SKIP (under
//! CI=true they fail).

mod common;

use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::qemu::{qemu_io, Listen, QemuNbd, QEMU, QEMU_NBD};
use common::tools::{run_tool, tools};
use common::*;
use serde_json::Value;

/// nbdkit, for [`tools`].
const NBDKIT: &[(&str, &str)] = &[("nbdkit", "nbdkit")];

/// Whether mkfs.ext4 runs (it has `-V`, not `--version`); else a SKIP line (a failure under
/// CI=true).
fn have_mkfs(test: &str) -> bool {
    let ok = Command::new("mkfs.ext4")
        .arg("-V")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    ok || skip(
        test,
        "mkfs.ext4 is not installed (apt-get install e2fsprogs)",
    )
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn run(tool: &str, args: &[&str]) -> String {
    String::from_utf8_lossy(&run_tool(Command::new(tool).args(args), "")).into_owned()
}

/// A vault holding disk `d`: `size` bytes, data in a few places and zero slots between.
fn vault_with_disk(size: u64, seed: u64) -> (Bv, Vec<u8>) {
    let bv = Bv::new();
    let src = bv.path("src.img");
    let data = make_sparse(
        &src,
        size,
        &[
            (0, text_data(seed, 3 * MIB as usize + 1000)),
            (size / 2 + 4096, random_data(seed + 1, 2 * MIB as usize)),
            (size - 8192, random_data(seed + 2, 8192)),
        ],
    );
    bv.backup(&src, "d", &[]);
    (bv, data)
}

/// `restore SPEC TARGET EXTRA...` with `--json`.
fn restore_json(bv: &Bv, spec: &str, target: &str, extra: &[&str]) -> Run {
    let mut args = vec!["--json", "restore", spec, target];
    args.extend(extra);
    bv.run(&args)
}

// ---------------------------------------------------------------------------------------------
// Block devices (root)
// ---------------------------------------------------------------------------------------------

/// A filesystem mounted on a temp folder, unmounted when dropped (also while a test unwinds).
struct Mount {
    point: tempfile::TempDir,
}

impl Mount {
    fn new(dev: &Path) -> Mount {
        let point = tempfile::Builder::new()
            .prefix("bv-mnt-")
            .tempdir()
            .expect("mount point");
        // no_prefetch_block_bitmaps: otherwise ext4 initialises the bitmaps of never-used
        // block groups in the background after the mount, changing the device's bytes under
        // a test that checks a refused restore left them alone (seen: a 1 KiB-block group
        // bitmap at 260 KiB differed between two reads 3 s apart).
        run(
            "mount",
            &["-o", "no_prefetch_block_bitmaps", s(dev), s(point.path())],
        );
        Mount { point }
    }

    fn path(&self) -> &str {
        s(self.point.path())
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.point.path()).status();
    }
}

/// ext4 on `dev`, written in full at once (no lazy init that a mount would finish later).
fn mkfs(dev: &Path) {
    run(
        "mkfs.ext4",
        &[
            "-q",
            "-F",
            "-E",
            "lazy_itable_init=0,lazy_journal_init=0",
            s(dev),
        ],
    );
}

#[test]
fn a_mounted_device_is_refused_even_with_force_and_left_untouched() {
    let test = "a_mounted_device_is_refused_even_with_force_and_left_untouched";
    if !have_mkfs(test) {
        return;
    }
    let (bv, data) = vault_with_disk(24 * MIB, 1);
    let backing = bv.path("mounted.img");
    make_sparse(&backing, 64 * MIB, &[]);
    let Some(dev) = LoopDev::attach(&backing, test) else {
        return;
    };
    mkfs(&dev.path);
    let mount = Mount::new(&dev.path);
    let before = read_at(&dev.path, 0, (64 * MIB) as usize);
    for extra in [&[][..], &["--force"][..]] {
        bv.restore("d", &dev.path, extra).code(2).stderr_has(&[
            &format!("target device {} is in use", s(&dev.path)),
            &format!("mounted at {} (ext4", mount.path()),
            "--force does not override this",
        ]);
    }
    assert_bytes_eq(
        &read_at(&dev.path, 0, (64 * MIB) as usize),
        &before,
        "the mounted device",
    );
    drop(mount);
    run("e2fsck", &["-fn", s(&dev.path)]);
    // Unmounted, the filesystem is data: --force, and the disk is restored exactly.
    bv.restore("d", &dev.path, &[])
        .code(1)
        .stderr_has(&["holds data (an ext4 filesystem)", "--force"]);
    bv.restore("d", &dev.path, &["--force"]).ok();
    assert_bytes_eq(&read_at(&dev.path, 0, data.len()), &data, "restored device");
}

/// A filesystem too small for the disk: the restore fails on `No space left on device`
/// naming the target, removes the file it created, and the space is free again for a
/// restore that fits, with io_uring writes (the default) and with `pwrite`.
#[test]
fn a_restore_that_fills_its_filesystem_fails_naming_the_target_and_removes_it() {
    let test = "a_restore_that_fills_its_filesystem_fails_naming_the_target_and_removes_it";
    if !have_mkfs(test) {
        return;
    }
    let mut bv = Bv::new();
    let src = bv.path("src.img");
    let data = random_data(70, 40 * MIB as usize);
    write_file(&src, &data);
    bv.backup(&src, "d", &[]);
    let backing = bv.path("small-fs.img");
    make_sparse(&backing, 32 * MIB, &[]);
    let Some(dev) = LoopDev::attach(&backing, test) else {
        return;
    };
    mkfs(&dev.path);
    let mount = Mount::new(&dev.path);
    let target = Path::new(mount.path()).join("disk.raw");
    for writer in ["uring", "pwrite"] {
        bv.env = vec![
            ("BLOCKVAULT_WRITER".into(), writer.into()),
            ("RUST_LOG".into(), "blockvault=debug".into()),
        ];
        let r = bv.restore("d", &target, &[]);
        r.code(1).stderr_has(&[
            "No space left on device",
            &format!(
                "target {}, which this restore created, was removed",
                s(&target)
            ),
        ]);
        assert_eq!(
            r.stderr.contains("writes through io_uring"),
            writer == "uring",
            "{writer}: {}",
            r.stderr
        );
        assert!(
            !target.exists(),
            "{writer}: the failed restore's file is gone"
        );
        bv.restore("d", &target, &["--range", &format!("0:{}", 16 * MIB)])
            .ok();
        assert_bytes_eq(
            &std::fs::read(&target).expect("read the range"),
            &data[..16 * MIB as usize],
            "the range restored after the failure",
        );
        std::fs::remove_file(&target).expect("remove");
    }
}

#[test]
fn a_device_whose_partition_is_mounted_is_refused() {
    let test = "a_device_whose_partition_is_mounted_is_refused";
    if !have_mkfs(test) || !tools(test, &[("sfdisk", "fdisk")]) {
        return;
    }
    let (bv, _) = vault_with_disk(24 * MIB, 2);
    let backing = bv.path("partitioned.img");
    make_sparse(&backing, 64 * MIB, &[]);
    let Some(dev) = LoopDev::attach(&backing, test) else {
        return;
    };
    run_tool(
        Command::new("sfdisk").args(["-q", s(&dev.path)]),
        "label: gpt\nstart=2048, size=40M\n",
    );
    // A loop device scans no partitions unless asked: add them by hand.
    let _partitions = Partitions::add(&dev.path);
    let part = PathBuf::from(format!("{}p1", s(&dev.path)));
    mkfs(&part);
    let mount = Mount::new(&part);
    bv.restore("d", &dev.path, &["--force"])
        .code(2)
        .stderr_has(&[
            &format!("mounted at {} (ext4, {})", mount.path(), s(&part)),
            "--force does not override this",
        ]);
    drop(mount);
    bv.restore("d", &dev.path, &[])
        .code(1)
        .stderr_has(&["holds data (a GPT partition table with 1 partition)"]);
}

/// The partitions of a loop device made known to the kernel (`partx -a`), and forgotten
/// again when dropped, before the device is detached.
struct Partitions<'a>(&'a Path);

impl<'a> Partitions<'a> {
    fn add(dev: &'a Path) -> Self {
        run("partx", &["-a", s(dev)]);
        Partitions(dev)
    }
}

impl Drop for Partitions<'_> {
    fn drop(&mut self) {
        let _ = Command::new("partx").args(["-d", s(self.0)]).status();
    }
}

#[test]
fn a_device_held_open_exclusively_is_refused() {
    let test = "a_device_held_open_exclusively_is_refused";
    let (bv, data) = vault_with_disk(8 * MIB, 3);
    let backing = bv.path("held.img");
    make_sparse(&backing, 16 * MIB, &[]);
    let Some(dev) = LoopDev::attach(&backing, test) else {
        return;
    };
    // What a VM, LVM or another restore does: hold it with O_EXCL.
    let holder = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_EXCL)
        .open(&dev.path)
        .expect("O_EXCL open");
    bv.restore("d", &dev.path, &["--force"])
        .code(2)
        .stderr_has(&[
            &format!("target device {} is in use", s(&dev.path)),
            "holds it open exclusively",
        ]);
    assert!(
        read_at(&dev.path, 0, (16 * MIB) as usize)
            .iter()
            .all(|&b| b == 0),
        "the held device must not be written"
    );
    drop(holder);
    // A device of zeros needs no --force.
    let r = restore_json(&bv, "d", s(&dev.path), &[]);
    r.ok();
    assert_eq!(r.json()["target_kind"], "device");
    assert_bytes_eq(&read_at(&dev.path, 0, data.len()), &data, "restored device");
}

#[test]
fn a_device_held_by_device_mapper_is_refused() {
    let test = "a_device_held_by_device_mapper_is_refused";
    if !tools(test, &[("dmsetup", "dmsetup")]) {
        return;
    }
    // The tool may be there without the kernel driver (containers, minimal kernels): that is
    // no missing package, so it is not a CI failure either.
    if !Command::new("dmsetup")
        .arg("version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
    {
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "SKIP {test}: the kernel has no device-mapper (dmsetup version fails)"
        );
        return;
    }
    let (bv, _) = vault_with_disk(8 * MIB, 4);
    let backing = bv.path("dm.img");
    make_sparse(&backing, 16 * MIB, &[]);
    let Some(dev) = LoopDev::attach(&backing, test) else {
        return;
    };
    let name = format!("bv-test-{}-{}", std::process::id(), unique());
    let table = format!("0 {} linear {} 0", 16 * MIB / 512, s(&dev.path));
    run("dmsetup", &["create", &name, "--table", &table]);
    let r = bv.restore("d", &dev.path, &["--force"]);
    run("dmsetup", &["remove", &name]);
    r.code(2).stderr_has(&[
        "is in use: held by dm-",
        &format!("(device-mapper device {name})"),
    ]);
}

#[test]
fn a_device_holding_data_needs_force_and_says_what_it_found() {
    let test = "a_device_holding_data_needs_force_and_says_what_it_found";
    if !have_mkfs(test) {
        return;
    }
    let (bv, data) = vault_with_disk(12 * MIB, 5);
    let backing = bv.path("data.img");
    let size = 16 * MIB;
    make_sparse(&backing, size, &[(size - 100, vec![0x5a; 10])]);
    let Some(dev) = LoopDev::attach(&backing, test) else {
        return;
    };
    let expect_refused = |what: &str| {
        let before = read_at(&dev.path, 0, size as usize);
        bv.restore("d", &dev.path, &[]).code(1).stderr_has(&[
            &format!("target device {} holds data ({what})", s(&dev.path)),
            "pass --force to overwrite it",
        ]);
        assert_bytes_eq(
            &read_at(&dev.path, 0, size as usize),
            &before,
            "refused device",
        );
    };
    expect_refused(&format!(
        "non-zero bytes in its last MiB, the first at offset {}",
        size - 100
    ));
    write_at(&dev.path, 3000, &[1]);
    expect_refused("non-zero bytes in its first MiB, the first at offset 3000");
    mkfs(&dev.path);
    expect_refused("an ext4 filesystem");
    bv.restore("d", &dev.path, &["--force"]).ok();
    assert_bytes_eq(&read_at(&dev.path, 0, data.len()), &data, "forced restore");
}

// ---------------------------------------------------------------------------------------------
// qcow2 targets
// ---------------------------------------------------------------------------------------------

/// `qemu-img check IMG` finds nothing: no errors, no leaks.
fn assert_qcow2_clean(img: &Path) {
    let out = Command::new("qemu-img")
        .args(["check", "-f", "qcow2", s(img)])
        .output()
        .expect("qemu-img check");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && text.contains("No errors were found on the image."),
        "qemu-img check {}: {}\n{text}",
        img.display(),
        out.status
    );
    // Nothing past the image's last cluster: the clusters allocated up front for data that
    // turned out to be zeros were cut off.
    let end: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("Image end offset: "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no image end offset in: {text}"));
    assert_eq!(
        std::fs::metadata(img).expect("stat").len(),
        end,
        "{} ends where its last cluster does",
        img.display()
    );
}

/// `qemu-img compare` finds `img` (qcow2) identical to `source` of format `fmt`.
fn assert_identical(img: &Path, source: &Path, fmt: &str) {
    let out = Command::new("qemu-img")
        .args(["compare", "-f", "qcow2", "-F", fmt, s(img), s(source)])
        .output()
        .expect("qemu-img compare");
    assert!(
        out.status.success()
            && String::from_utf8_lossy(&out.stdout).contains("Images are identical."),
        "qemu-img compare {} {}: {}\n{}{}",
        img.display(),
        source.display(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// What `qemu-img info` says of an image: (format, virtual size).
fn image_info(img: &Path) -> (String, u64) {
    let v: Value = serde_json::from_str(&run("qemu-img", &["info", "--output=json", s(img)]))
        .expect("qemu-img info JSON");
    (text(&v, "format"), num(&v, "virtual-size"))
}

/// Bytes a file occupies on disk.
fn allocated(p: &Path) -> u64 {
    std::fs::metadata(p).expect("stat").blocks() * 512
}

/// Bytes of `data` in 4 KiB blocks that hold a non-zero byte.
fn nonzero_blocks(data: &[u8]) -> u64 {
    data.chunks(4096)
        .filter(|b| b.iter().any(|&x| x != 0))
        .map(|b| b.len() as u64)
        .sum()
}

#[test]
fn qcow2_targets_pass_qemu_img_check_and_compare() {
    let test = "qcow2_targets_pass_qemu_img_check_and_compare";
    if !tools(test, QEMU) {
        return;
    }
    // A sparse disk: text, random and a last block, zero slots between.
    let (bv, data) = vault_with_disk(256 * MIB, 6);
    let src = bv.path("src.img");
    let img = bv.path("sparse.qcow2");
    let r = restore_json(&bv, "d", s(&img), &[]);
    r.ok();
    let doc = r.json();
    assert_eq!(
        (doc["format"].as_str(), doc["target_kind"].as_str()),
        (Some("qcow2"), Some("file"))
    );
    assert_eq!(image_info(&img), ("qcow2".into(), 256 * MIB));
    assert_qcow2_clean(&img);
    assert_identical(&img, &src, "raw");
    if reports_holes(&src) {
        // Only the non-zero 4 KiB blocks and a few metadata clusters take room.
        let (used, want) = (allocated(&img), nonzero_blocks(&data));
        assert!(
            used >= want && used <= want + 512 * KIB,
            "{used} bytes allocated for {want} bytes of data"
        );
    }

    // A disk of random data, to a name without .qcow2: --format says so.
    let rnd = bv.path("random.img");
    write_file(&rnd, &random_data(7, 40 * MIB as usize));
    bv.backup(&rnd, "rnd", &[]);
    let img = bv.path("random-disk.img");
    bv.restore("rnd", &img, &["--format", "qcow2"]).ok();
    assert_qcow2_clean(&img);
    assert_identical(&img, &rnd, "raw");
    // And --format raw wins over the name.
    let raw = bv.path("raw-after-all.qcow2");
    bv.restore("rnd", &raw, &["--format", "raw"]).ok();
    assert_files_eq(&raw, &rnd);

    // Over an existing image: --force, and it is a qcow2 image again.
    let existing = bv.path("sparse.qcow2");
    bv.restore("rnd", &existing, &[])
        .code(1)
        .stderr_has(&["exists and is not empty", "--force"]);
    bv.restore("rnd", &existing, &["--force"]).ok();
    assert_qcow2_clean(&existing);
    assert_identical(&existing, &rnd, "raw");

    // --range: the bytes of the range, at the start of a smaller image (not cluster-aligned).
    let part = bv.path("range.qcow2");
    let (off, len) = (MIB + 4096 + 512, 3 * MIB);
    bv.restore("d", &part, &["--range", &format!("{off}:{len}")])
        .ok();
    assert_qcow2_clean(&part);
    let slice = bv.path("range.raw");
    write_file(&slice, &data[off as usize..(off + len) as usize]);
    assert_identical(&part, &slice, "raw");
}

#[test]
fn qcow2_refuses_a_disk_of_partial_sectors_and_leaves_nothing() {
    let bv = Bv::new();
    let src = bv.path("odd.img");
    write_file(&src, &random_data(8, (MIB + 100) as usize));
    bv.backup(&src, "odd", &[]);
    let img = bv.path("odd.qcow2");
    bv.restore("odd", &img, &[])
        .code(2)
        .stderr_has(&["qcow2 images hold whole 512-byte sectors", "--format raw"]);
    assert!(!img.exists(), "nothing is created for a refused restore");
    bv.restore("odd", &img, &["--format", "raw"]).ok();
    assert_files_eq(&img, &src);
}

#[test]
fn a_sparse_terabyte_restores_into_a_small_qcow2() {
    let test = "a_sparse_terabyte_restores_into_a_small_qcow2";
    if !tools(test, QEMU) {
        return;
    }
    let bv = Bv::new();
    let src = bv.path("tera.qcow2");
    run("qemu-img", &["create", "-f", "qcow2", s(&src), "1T"]);
    qemu_io(
        "qcow2",
        s(&src),
        &[
            "write -P 0x61 0 1M",
            "write -P 0x62 600G 64k",
            "write -P 0x63 1048575M 1M",
        ],
    );
    bv.backup(&src, "tera", &[]);
    let img = bv.path("tera-restored.qcow2");
    bv.restore("tera", &img, &[]).ok();
    assert_qcow2_clean(&img);
    assert_identical(&img, &src, "qcow2");
    // 2 MiB + 64 KiB of data, three L2 tables, a 16 KiB L1 table, refcounts, the header.
    let len = std::fs::metadata(&img).expect("stat").len();
    assert!(len < 4 * MIB, "a sparse 1 TiB image takes {len} bytes");
}

// ---------------------------------------------------------------------------------------------
// NBD targets
// ---------------------------------------------------------------------------------------------

/// An nbdkit server on a Unix socket, killed when dropped.
struct Nbdkit {
    pid: String,
    url: String,
}

impl Nbdkit {
    /// Start it; it forks into the background once listening, and the child writes the pid
    /// file just after, so wait (at most 10 s) for a whole line there.
    fn start(dir: &Path, args: &[&str]) -> Nbdkit {
        let n = unique();
        let sock = dir.join(format!("nbdkit-{n}.sock"));
        let pid_file = dir.join(format!("nbdkit-{n}.pid"));
        run_tool(
            Command::new("nbdkit")
                .args(["-U", s(&sock), "-P", s(&pid_file)])
                .args(args),
            "",
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        let pid = loop {
            match std::fs::read_to_string(&pid_file) {
                Ok(p) if p.ends_with('\n') => break p.trim().to_owned(),
                _ if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
                r => panic!("nbdkit {args:?} wrote no pid file: {r:?}"),
            }
        };
        Nbdkit {
            pid,
            url: format!("nbd+unix:///?socket={}", s(&sock)),
        }
    }
}

impl Drop for Nbdkit {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-KILL", &self.pid]).status();
    }
}

/// What an NBD export holds, through `qemu-img convert`.
fn export_bytes(dir: &Path, url: &str) -> Vec<u8> {
    let out = dir.join(format!("export-{}.raw", unique()));
    run(
        "qemu-img",
        &["convert", "-f", "raw", "-O", "raw", url, s(&out)],
    );
    read_file(&out)
}

#[test]
fn qemu_nbd_exports_over_a_socket_and_tcp_receive_the_disk() {
    let test = "qemu_nbd_exports_over_a_socket_and_tcp_receive_the_disk";
    if !tools(test, QEMU_NBD) {
        return;
    }
    let (bv, data) = vault_with_disk(96 * MIB, 9);
    let src = bv.path("src.img");
    for (i, tcp) in [false, true].into_iter().enumerate() {
        let img = bv.path(&format!("served-{i}.qcow2"));
        run("qemu-img", &["create", "-f", "qcow2", s(&img), "96M"]);
        let sock = bv.path(&format!("qemu-nbd-{i}.sock"));
        let at = if tcp {
            Listen::Tcp
        } else {
            Listen::Unix(&sock)
        };
        let mut server = QemuNbd::serve(&img, "qcow2")
            .writable()
            .start(bv.dir.path(), at);
        let r = restore_json(&bv, "d", &server.url, &[]);
        r.ok();
        let doc = r.json();
        assert_eq!(doc["target_kind"], "nbd", "{doc}");
        assert_eq!(num(&doc, "bytes_total"), data.len() as u64);
        server.stop("-TERM");
        assert_qcow2_clean(&img);
        assert_identical(&img, &src, "raw");
        if reports_holes(&src) {
            // Zeros went as WRITE_ZEROES: qemu-nbd left those clusters unallocated.
            let (used, want) = (allocated(&img), nonzero_blocks(&data));
            assert!(
                used <= want + 2 * MIB,
                "{used} bytes allocated behind qemu-nbd for {want} bytes of data"
            );
        }
    }
}

#[test]
fn nbdkit_memory_exports_with_and_without_write_zeroes() {
    let test = "nbdkit_memory_exports_with_and_without_write_zeroes";
    if !tools(test, NBDKIT) || !tools(test, QEMU) {
        return;
    }
    let (bv, data) = vault_with_disk(24 * MIB, 10);
    // `nozero` hides NBD_CMD_WRITE_ZEROES: zeros then go as data.
    for filters in [&[][..], &["--filter=nozero"][..]] {
        let mut args = filters.to_vec();
        args.extend(["memory", "32M"]);
        let server = Nbdkit::start(bv.dir.path(), &args);
        // Old data everywhere, so that zero slots must really be written.
        qemu_io("raw", &server.url, &["write -P 0xee 0 32M"]);
        bv.restore("d", Path::new(&server.url), &[])
            .code(1)
            .stderr_has(&[&format!("NBD export {} holds data", server.url), "--force"]);
        bv.restore("d", Path::new(&server.url), &["--force"]).ok();
        let got = export_bytes(bv.dir.path(), &server.url);
        assert_bytes_eq(&got[..data.len()], &data, "the export's first 24 MiB");
        assert!(
            got[data.len()..].iter().all(|&b| b == 0xee),
            "bytes past the disk are left alone ({filters:?})"
        );
    }
}

#[test]
fn read_only_and_too_small_exports_are_refused() {
    let test = "read_only_and_too_small_exports_are_refused";
    if !tools(test, QEMU_NBD) || !tools(test, NBDKIT) {
        return;
    }
    let (bv, _) = vault_with_disk(8 * MIB, 11);
    let img = bv.path("ro.qcow2");
    run("qemu-img", &["create", "-f", "qcow2", s(&img), "8M"]);
    let ro = QemuNbd::serve(&img, "qcow2").start(bv.dir.path(), Listen::Tcp);
    bv.restore("d", Path::new(&ro.url), &["--force"])
        .code(2)
        .stderr_has(&[&format!("NBD export {} is read-only", ro.url)]);
    let small = Nbdkit::start(bv.dir.path(), &["memory", "4M"]);
    bv.restore("d", Path::new(&small.url), &[])
        .code(2)
        .stderr_has(&[&format!(
            "NBD export {} holds {} bytes, the disk needs {}",
            small.url,
            4 * MIB,
            8 * MIB
        )]);
    // A URL is never taken for a path, whatever the server.
    let r = bv.restore(
        "d",
        Path::new("nbd+unix:///?socket=/nonexistent/bv.sock"),
        &[],
    );
    r.failed()
        .stderr_has(&["cannot connect to /nonexistent/bv.sock"]);
    assert!(!r.stderr.contains("creating target"), "{}", r.stderr);
    // Only files have a format of our choosing.
    bv.restore("d", Path::new(&small.url), &["--format", "qcow2"])
        .code(2)
        .stderr_has(&["--format qcow2 writes a file"]);
}

// ---------------------------------------------------------------------------------------------
// Best effort over damaged packs
// ---------------------------------------------------------------------------------------------

/// Flip a byte inside the first frame of `pack` (frames follow a 32-byte header).
fn damage_first_frame(pack: &Path) {
    let flen = u32::from_le_bytes(read_at(pack, 32, 4).try_into().expect("4 bytes")) as u64;
    flip_byte(pack, 32 + flen / 2);
}

/// Check a best-effort restore of `expected` into `target`: every listed range reads as
/// zeros, every other byte is exact. Returns the ranges as (offset, length).
fn assert_best_effort(
    doc: &Value,
    target: &Path,
    expected: &[u8],
    pack_key: &str,
) -> Vec<(u64, u64)> {
    let damaged = doc["damaged"].as_array().expect("damaged list");
    assert!(!damaged.is_empty(), "{doc}");
    let got = read_file(target);
    assert_eq!(got.len(), expected.len());
    let mut want = expected.to_vec();
    let mut ranges = Vec::new();
    for d in damaged {
        let (off, len) = (num(d, "offset"), num(d, "length"));
        assert_eq!(text(d, "pack"), pack_key, "{d}");
        assert_eq!(text(d, "extent").len(), 64, "{d}");
        assert!(text(d, "error").contains("CRC mismatch"), "{d}");
        want[off as usize..(off + len) as usize].fill(0);
        ranges.push((off, len));
    }
    assert_bytes_eq(&got, &want, "best-effort restore");
    ranges
}

#[test]
fn skip_damaged_restores_everything_else_and_lists_the_damage() {
    let bv = Bv::new();
    let src = bv.path("v.img");
    let v1 = random_data(12, 6 * MIB as usize);
    write_file(&src, &v1);
    bv.backup(&src, "d", &[]);
    let first = bv.objects("packs");
    assert_eq!(first.len(), 1, "{first:?}");
    // An incremental that changes 8 KiB inside slot 2: stored as one overlay, in a new pack.
    let mut v2 = v1.clone();
    let patch = random_data(13, 8192);
    let at = 2 * MIB + 64 * KIB;
    v2[at as usize..at as usize + 8192].copy_from_slice(&patch);
    write_at(&src, at, &patch);
    let s2 = bv.backup(&src, "d", &[]);
    let second: Vec<PathBuf> = bv
        .objects("packs")
        .into_iter()
        .filter(|p| !first.contains(p))
        .collect();
    assert_eq!(second.len(), 1, "{second:?}");

    // The overlay's pack damaged: exactly its 8 KiB are lost.
    damage_first_frame(&second[0]);
    let target = bv.path("best-effort.raw");
    let r = restore_json(&bv, "d", s(&target), &["--skip-damaged"]);
    r.code(3);
    let doc = r.json();
    let key = bv.key_of(&second[0]);
    assert_eq!(assert_best_effort(&doc, &target, &v2, &key), [(at, 8192)]);
    assert_eq!(num(&doc, "bytes_written"), v2.len() as u64 - 8192, "{doc}");
    // The human report lists it too.
    let human = bv.path("best-effort-human.raw");
    bv.restore("d", &human, &["--skip-damaged"])
        .code(3)
        .stdout_has(&[
            "DAMAGED: 1 range(s)",
            &format!("disk offset {at}, 8192 bytes: pack {key}"),
        ]);
    // The first snapshot does not use that pack: exact, exit 0.
    bv.restore_and_compare(&format!("d@{}", text(&bv.snapshots()[0], "short_id")), &v1);

    // The base pack damaged as well: one slot lost, less the overlay that lies over it if
    // it is slot 2; the snapshot's other slots exact.
    damage_first_frame(&first[0]);
    let target = bv.path("best-effort-2.raw");
    let r = restore_json(
        &bv,
        &format!("d@{}", text(&s2, "short_id")),
        s(&target),
        &["--skip-damaged"],
    );
    r.code(3);
    let doc = r.json();
    let all: Vec<Value> = doc["damaged"].as_array().expect("list").clone();
    let base_key = bv.key_of(&first[0]);
    let from_base: Vec<Value> = all
        .iter()
        .filter(|d| d["pack"] == base_key.as_str())
        .cloned()
        .collect();
    let lost: u64 = from_base.iter().map(|d| num(d, "length")).sum();
    assert!(lost == MIB || lost == MIB - 8192, "{doc}");
    let mut want = v2.clone();
    for d in &all {
        let (off, len) = (num(d, "offset") as usize, num(d, "length") as usize);
        want[off..off + len].fill(0);
    }
    assert_bytes_eq(&read_file(&target), &want, "restore over two damaged packs");

    // Without --skip-damaged: exit 3, and the target it created is gone.
    let strict = bv.path("strict.raw");
    bv.restore("d", &strict, &[])
        .code(3)
        .stderr_has(&["CRC mismatch", "which this restore created, was removed"]);
    assert!(
        !strict.exists(),
        "a failed restore removes the file it created"
    );

    // A damaged manifest leaves nothing to trust: refused, best effort or not.
    let id = text(&s2, "snapshot");
    let manifest = bv
        .objects("snapshots")
        .into_iter()
        .find(|p| p.ends_with(&id))
        .expect("the manifest of the second snapshot");
    flip_byte(
        &manifest,
        std::fs::metadata(&manifest).expect("stat").len() / 2,
    );
    let refused = bv.path("refused.raw");
    bv.restore(
        &format!("d@{}", text(&s2, "short_id")),
        &refused,
        &["--skip-damaged"],
    )
    .code(3)
    .stderr_has(&[&bv.key_of(&manifest)]);
    assert!(
        !refused.exists(),
        "nothing is written from a damaged manifest"
    );
}

// ---------------------------------------------------------------------------------------------
// Signals
// ---------------------------------------------------------------------------------------------

/// `restore ARGS` in a process group of its own (as a shell runs a job), stdout and stderr
/// piped; returns the child and its command line.
fn spawn_restore(bv: &Bv, args: &[&str]) -> (std::process::Child, String) {
    let mut c = bv.command();
    c.arg("restore")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let child = c.spawn().expect("start the restore");
    (child, format!("blockvault restore {}", args.join(" ")))
}

/// Send `signal` to the process group of `child`.
fn signal_group(child: &std::process::Child, signal: i32) {
    // SAFETY: kill(2) with a negative pid signals that process group; no memory is involved.
    let rc = unsafe { libc::kill(-(child.id() as i32), signal) };
    assert_eq!(rc, 0, "kill -{signal} -{}", child.id());
}

/// Wait (at most 60 s) until `ready` holds or the child has exited; false if it exited.
fn wait_for(child: &mut std::process::Child, ready: impl Fn() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if ready() {
            return true;
        }
        if child.try_wait().expect("status").is_some() {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    panic!("neither ready nor finished after 60 s");
}

#[test]
fn sigint_mid_restore_removes_the_file_it_created() {
    let bv = Bv::new();
    let src = bv.path("big.img");
    let data = random_data(14, 256 * MIB as usize);
    write_file(&src, &data);
    bv.backup(&src, "big", &["--no-compress"]);
    drop(data);
    // A restore can finish before the signal lands; then try again.
    let mut interrupted = 0;
    for attempt in 0..5 {
        let target = bv.path(&format!("interrupted-{attempt}.raw"));
        let (mut child, what) = spawn_restore(&bv, &["big", s(&target)]);
        // Once data is being written, Ctrl-C.
        let writing = wait_for(&mut child, || {
            std::fs::metadata(&target).is_ok_and(|m| m.blocks() > 0)
        });
        if writing {
            signal_group(&child, libc::SIGINT);
        }
        let r = Run::wait(child, what);
        if r.code == 0 {
            assert_files_eq(&target, &src);
            continue;
        }
        r.code(130).stderr_has(&[
            &format!(
                "target {}, which this restore created, was removed",
                s(&target)
            ),
            "interrupted by SIGINT",
        ]);
        assert!(
            !target.exists(),
            "an interrupted restore removes the file it created"
        );
        interrupted += 1;
        break;
    }
    assert_eq!(interrupted, 1, "no restore was interrupted in 5 attempts");
}

#[test]
fn sigterm_mid_restore_reports_an_nbd_export_partly_written() {
    let test = "sigterm_mid_restore_reports_an_nbd_export_partly_written";
    if !tools(test, NBDKIT) {
        return;
    }
    let (bv, _) = vault_with_disk(32 * MIB, 15);
    let log = bv.path("nbdkit-requests.log");
    // Every write and zeroing waits 100 ms; the log says when the first write arrived.
    let logfile = format!("logfile={}", s(&log));
    let server = Nbdkit::start(
        bv.dir.path(),
        &[
            "--filter=log",
            "--filter=delay",
            "memory",
            "32M",
            "delay-write=100ms",
            "delay-zero=100ms",
            &logfile,
        ],
    );
    let (mut child, what) = spawn_restore(&bv, &["d", &server.url]);
    let writing = wait_for(&mut child, || {
        std::fs::read_to_string(&log).is_ok_and(|l| l.contains("Write"))
    });
    assert!(
        writing,
        "the restore ended before its first write reached the server"
    );
    signal_group(&child, libc::SIGTERM);
    Run::wait(child, what).code(143).stderr_has(&[
        &format!(
            "NBD export {} is partly written: the restore did not finish",
            server.url
        ),
        "interrupted by SIGTERM",
    ]);
}
