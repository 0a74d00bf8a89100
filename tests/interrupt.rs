//! Backups that stop before their commit: interrupted by SIGINT or SIGTERM (delivered to the
//! backup's process group, as a terminal delivers Ctrl-C), failed by a full vault, a
//! read-only vault or a source that fails with EIO mid-read, or killed by SIGKILL.
//!
//! A stop or a failure ends with a message saying what happened and what became of the
//! run's packs, exit 130/143 (signals) or 1, no snapshot, no temp files left behind, a vault
//! that verifies, and a next backup that succeeds and restores exactly. The packs of a signal
//! or a failing source are kept for the re-run to resume (tests/resume.rs), and what it does
//! not reuse prune collects; a full vault's are removed. A SIGKILL cleans up nothing: `verify`
//! reports its unreferenced packs and temp files, with their sizes, as harmless.
//!
//! The interrupted backups run with `--zstd-level 19 --threads 1` over an image whose last
//! 64 MiB are compressible text, so that whatever point a test waits for (observed in the
//! process's open files and in the vault), the backup is still running when the signal
//! comes. No test measures time.

mod common;

use std::collections::BTreeSet;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::tools::tools;
use common::*;

/// The image: 96 MiB of random data (three packs, stored fast), then 64 MiB of text (slow
/// at zstd level 19).
fn image(bv: &Bv, seed: u64) -> (PathBuf, Vec<u8>) {
    slow_image(bv, "disk.img", seed, 64)
}

/// `backup` arguments that keep a backup of [`image`] running long after its first packs.
fn slow_backup<'a>(img: &'a Path, disk: &'a str) -> Vec<&'a str> {
    let mut args = common::slow_backup(img, disk);
    args.extend(["--parent", "none"]);
    args
}

/// A backup started in a process group of its own, as a shell starts a foreground job.
struct Job {
    child: Child,
    what: String,
}

impl Job {
    fn start(bv: &Bv, args: &[&str]) -> Job {
        let mut c = bv.command();
        c.args(args)
            .process_group(0)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let child = c.spawn().expect("start blockvault");
        Job {
            child,
            what: format!("blockvault {}", args.join(" ")),
        }
    }

    /// Poll until `reached()` holds; panics if the backup ends first (it was to be stopped
    /// at that point, so the test's premise failed).
    fn wait_until(mut self, point: &str, reached: impl Fn(&Job) -> bool) -> Job {
        while !reached(&self) {
            if self.child.try_wait().expect("try_wait").is_some() {
                panic!("the backup ended before {point}:\n{:?}", self.wait());
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        self
    }

    /// Whether the backup has `path` open.
    fn has_open(&self, path: &Path) -> bool {
        let Ok(fds) = std::fs::read_dir(format!("/proc/{}/fd", self.child.id())) else {
            return false;
        };
        fds.filter_map(Result::ok)
            .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|target| target == path))
    }

    /// Deliver `signal` (`INT`, `TERM`) to the backup's process group, as a terminal does.
    fn signal_group(&self, signal: &str) {
        let group = format!("-{}", self.child.id());
        let ok = Command::new("kill")
            .args(["-s", signal, "--", &group])
            .status()
            .expect("run kill");
        assert!(ok.success(), "kill -s {signal} -- {group}");
    }

    fn wait(self) -> Run {
        Run::wait(self.child, self.what)
    }
}

/// The vault's pack files.
fn packs(bv: &Bv) -> BTreeSet<PathBuf> {
    bv.objects("packs").into_iter().collect()
}

/// Temp files of unfinished writes anywhere in the vault, with their sizes.
fn temp_files(bv: &Bv) -> Vec<(PathBuf, u64)> {
    fn walk(dir: &Path, out: &mut Vec<(PathBuf, u64)>) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let p = e.path();
            let Ok(meta) = e.metadata() else { continue };
            if meta.is_dir() {
                walk(&p, out);
            } else if e.file_name().to_string_lossy().starts_with(".tmp-") {
                out.push((p, meta.len()));
            }
        }
    }
    let mut out = Vec::new();
    walk(&bv.vault, &mut out);
    out.sort();
    out
}

/// How many packs the failure message says were `verb` (kept, removed).
fn settled_packs(stderr: &str, verb: &str) -> u64 {
    if stderr.contains(&format!("{verb} the pack (")) {
        return 1;
    }
    stderr
        .split(&format!("{verb} the "))
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// The vault holds nothing of the runs that failed: no unreferenced pack, no temp file,
/// and both verify modes pass.
fn assert_clean(bv: &Bv) {
    assert_eq!(temp_files(bv), vec![], "temp files left behind");
    let doc = bv.verify_ok();
    for field in [
        "unreferenced_packs",
        "unreferenced_pack_bytes",
        "unfinished_writes",
        "unfinished_write_bytes",
    ] {
        assert_eq!(num(&doc, field), 0, "{field}: {doc}");
    }
}

/// Back up `img` (holding `data`) as disk `disk`; it must succeed and restore exactly.
fn next_backup_is_exact(bv: &Bv, img: &Path, disk: &str, data: &[u8]) {
    let doc = bv.backup(img, disk, &[]);
    bv.restore_and_compare(&format!("{disk}@{}", text(&doc, "short_id")), data);
}

/// Where in a backup the signal is sent.
#[derive(Debug, Clone, Copy)]
enum Point {
    /// The source is open: reading has begun, no pack is written yet.
    SourceOpen,
    /// The first pack is being written (its temp file is seen; or it was already published).
    FirstPackWriting,
    /// This many packs are published.
    PacksStored(usize),
}

#[test]
fn sigint_and_sigterm_stop_a_backup_cleanly_at_every_point() {
    let bv = Bv::new();
    bv.json(&["init"]);
    let (img, mut data) = image(&bv, 10);
    let points = [
        Point::SourceOpen,
        Point::FirstPackWriting,
        Point::PacksStored(1),
        Point::PacksStored(2),
    ];
    let mut trial = 0u64;
    for signal in ["INT", "TERM"] {
        for point in points {
            // New content at every trial: the next backup has something to store. The
            // first trial interrupts the first backup of the disk.
            let at = (trial * 9 % 150) * MIB;
            let change = random_data(100 + trial, 4 * MIB as usize);
            write_at(&img, at, &change);
            data[at as usize..(at + 4 * MIB) as usize].copy_from_slice(&change);
            trial += 1;

            let before = packs(&bv);
            let snapshots = bv.snapshots().len();
            let job = Job::start(&bv, &slow_backup(&img, "d"));
            let new_packs = || packs(&bv).difference(&before).count();
            let job = match point {
                Point::SourceOpen => job.wait_until("the source is open", |j| j.has_open(&img)),
                // Only a pack's temp file: the head and key records are written through temp
                // files too.
                Point::FirstPackWriting => job.wait_until("a pack is written", |_| {
                    new_packs() > 0
                        || temp_files(&bv)
                            .iter()
                            .any(|(p, _)| p.starts_with(bv.vault.join("packs")))
                }),
                Point::PacksStored(n) => job.wait_until("packs are stored", |_| new_packs() >= n),
            };
            let stored = packs(&bv).difference(&before).count() as u64;
            job.signal_group(signal);
            let run = job.wait();
            let (code, name) = if signal == "INT" {
                (130, "SIGINT")
            } else {
                (143, "SIGTERM")
            };
            run.code(code).stderr_has(&[&format!(
                "backup of disk d interrupted by {name}: no snapshot written, "
            )]);
            // A pack whose write had begun is finished, then kept with the others.
            let at_least = match point {
                Point::FirstPackWriting => stored.max(1),
                _ => stored,
            };
            let kept = settled_packs(&run.stderr, "kept");
            assert!(
                kept >= at_least,
                "{point:?}: {stored} packs were stored when the signal came:\n{}",
                run.stderr
            );
            assert_eq!(
                packs(&bv).difference(&before).count() as u64,
                kept,
                "{point:?}, {name}: {}",
                run.stderr
            );
            assert_eq!(bv.snapshots().len(), snapshots, "{point:?}, {name}");
            // The next backup resumes; prune collects the kept packs it had no use for
            // (content its parent already held).
            next_backup_is_exact(&bv, &img, "d", &data);
            bv.json(&["prune"]);
            assert_clean(&bv);
        }
    }
}

#[test]
fn sigkill_leftovers_are_reported_by_verify_with_their_sizes() {
    let bv = Bv::new();
    bv.json(&["init"]);
    let (img, data) = image(&bv, 20);
    // Kill the backup while a pack is being written, after one was stored: an unfinished
    // temp file and an unreferenced pack are left. The temp file exists for the time a
    // pack write takes, so a kill may miss it: try again (leftovers accumulate), at most
    // ten times.
    let mut with_temp = false;
    for attempt in 0..10 {
        let disk = format!("k{attempt}");
        let before = packs(&bv);
        let mut job = Job::start(&bv, &slow_backup(&img, &disk)).wait_until(
            "a second pack is being written",
            |_| {
                let new = packs(&bv).difference(&before).count();
                (new >= 1 && !temp_files(&bv).is_empty()) || new >= 3
            },
        );
        job.child.kill().expect("SIGKILL");
        let run = job.wait();
        assert_eq!(run.code, -1, "killed: {run:?}");
        if !temp_files(&bv).is_empty() {
            with_temp = true;
            break;
        }
    }
    assert!(with_temp, "no kill landed while a pack was being written");

    // Every pack is unreferenced (no backup committed) and every temp file unfinished.
    let expect = |bv: &Bv| {
        let packs = packs(bv);
        let pack_bytes: u64 = packs
            .iter()
            .map(|p| std::fs::metadata(p).unwrap().len())
            .sum();
        let temps = temp_files(bv);
        let temp_bytes: u64 = temps.iter().map(|(_, n)| n).sum();
        (
            packs.len() as u64,
            pack_bytes,
            temps.len() as u64,
            temp_bytes,
        )
    };
    let (npacks, pack_bytes, ntemps, temp_bytes) = expect(&bv);
    assert!(npacks >= 1, "a pack was stored before the kill");
    let check = |bv: &Bv| {
        let r = bv.verify(false);
        r.ok();
        let doc = r.json();
        assert_eq!(doc["ok"], true, "leftovers are no damage: {doc}");
        assert_eq!(num(&doc, "unreferenced_packs"), npacks, "{doc}");
        assert_eq!(num(&doc, "unreferenced_pack_bytes"), pack_bytes, "{doc}");
        assert_eq!(num(&doc, "unfinished_writes"), ntemps, "{doc}");
        assert_eq!(num(&doc, "unfinished_write_bytes"), temp_bytes, "{doc}");
        let human = bv.run(&["verify"]);
        human.ok().stdout_has(&[
            &format!("{npacks} unreferenced packs, "),
            &format!("{ntemps} unfinished writes, "),
            "harmless",
            "no problems found",
        ]);
    };
    check(&bv);
    // The leftovers stand in the way of nothing: a backup succeeds, restores exactly, and
    // the leftovers are still reported as they were.
    next_backup_is_exact(&bv, &img, "after", &data);
    check(&bv);
    bv.verify_ok();
}

/// A filesystem mounted for one test (root only), unmounted when dropped.
struct Mount(PathBuf);

impl Mount {
    /// `mount ARGS... TARGET`; `None` after a SKIP line when not root.
    fn new(test: &str, target: &Path, args: &[&str]) -> Option<Mount> {
        if !is_root() {
            skip(test, "needs root to mount a file system");
            return None;
        }
        std::fs::create_dir_all(target).unwrap();
        let out = Command::new("mount")
            .args(args)
            .arg(target)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "mount {args:?} {}: {}",
            target.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Some(Mount(target.to_path_buf()))
    }

    /// Make this bind mount read-only (`mount -o remount,bind,ro`).
    fn read_only(&self) {
        let ok = Command::new("mount")
            .args(["-o", "remount,bind,ro"])
            .arg(&self.0)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "remounting {} read-only", self.0.display());
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.0)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!("warning: could not unmount {}", self.0.display());
        }
    }
}

#[test]
fn a_full_vault_fails_cleanly_and_the_next_backup_that_fits_succeeds() {
    let test = "a_full_vault_fails_cleanly_and_the_next_backup_that_fits_succeeds";
    let mut bv = Bv::new();
    let mnt = bv.path("small");
    let Some(_mount) = Mount::new(test, &mnt, &["-t", "tmpfs", "-o", "size=80M", "tmpfs"]) else {
        return;
    };
    bv.vault = mnt.join("vault");
    bv.json(&["init"]);
    let big = bv.path("big.img");
    let big_data = random_data(30, 128 * MIB as usize);
    write_file(&big, &big_data);
    let small = bv.path("small.img");
    let small_data = mixed_data(31, 16 * MIB as usize);
    write_file(&small, &small_data);
    // Twice: the first failure must not make the next one worse, nor the small backup fail.
    for round in 0..2 {
        let r = bv.run(&["backup", big.to_str().unwrap(), "--disk", "big"]);
        r.code(1).stderr_has(&[
            "backup of disk big failed, no snapshot written, removed the ",
            "No space left on device",
            bv.vault.to_str().unwrap(),
        ]);
        assert!(
            settled_packs(&r.stderr, "removed") >= 1,
            "round {round}: {}",
            r.stderr
        );
        assert_eq!(packs(&bv).len(), round, "round {round}: packs left behind");
        assert_clean(&bv);
        next_backup_is_exact(&bv, &small, &format!("small{round}"), &small_data);
    }
    assert_eq!(bv.snapshots().len(), 2);
}

#[test]
fn a_read_only_vault_fails_cleanly_and_still_restores() {
    let test = "a_read_only_vault_fails_cleanly_and_still_restores";
    let bv = Bv::new();
    let img = bv.path("img");
    let data = mixed_data(40, 8 * MIB as usize);
    write_file(&img, &data);
    let doc = bv.backup(&img, "d", &[]);
    let ro = bv.path("ro");
    let Some(bind) = Mount::new(test, &ro, &["--bind", bv.vault.to_str().unwrap()]) else {
        return;
    };
    bind.read_only();
    let mut reader = Bv::new();
    reader.keystore = bv.keystore.clone();
    reader.vault = ro.clone();
    write_file(&img, &random_data(41, 8 * MIB as usize));
    reader
        .run(&["backup", img.to_str().unwrap(), "--disk", "d"])
        .code(1)
        .stderr_has(&[ro.to_str().unwrap(), "Read-only file system"]);
    assert_eq!(reader.snapshots().len(), 1);
    reader.verify_ok();
    reader.restore_and_compare(&format!("d@{}", text(&doc, "short_id")), &data);
}

/// nbdkit serving a file whose bytes from `bad.start` to `bad.end` fail to read with EIO
/// (its `ddrescue` filter and a ddrescue map marking them unreadable), on a Unix socket in
/// `dir`; killed when dropped.
struct FailingExport {
    child: Child,
    url: String,
}

impl FailingExport {
    fn start(dir: &Path, file: &Path, size: u64, bad: std::ops::Range<u64>) -> FailingExport {
        let map = dir.join("bad.map");
        let map_text = format!(
            "# Mapfile. Created by GNU ddrescue version 1.27\n\
             0x00000000 + 1\n\
             0x{:08x} 0x{:08x} +\n0x{:08x} 0x{:08x} -\n0x{:08x} 0x{:08x} +\n",
            0,
            bad.start,
            bad.start,
            bad.end - bad.start,
            bad.end,
            size - bad.end
        );
        write_file(&map, map_text.as_bytes());
        let sock = dir.join("bad.sock");
        let child = Command::new("nbdkit")
            .args(["-f", "--exit-with-parent", "-U"])
            .arg(&sock)
            .args(["--filter=ddrescue", "file"])
            .arg(format!("file={}", file.display()))
            .arg(format!("ddrescue-mapfile={}", map.display()))
            .stdin(Stdio::null())
            .spawn()
            .expect("start nbdkit");
        let export = FailingExport {
            child,
            url: format!("nbd+unix:///?socket={}", sock.display()),
        };
        for _ in 0..1000 {
            if sock.exists() {
                return export;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("nbdkit did not create {}", sock.display());
    }
}

impl Drop for FailingExport {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_source_failing_with_eio_mid_read_keeps_what_the_backup_stored_for_the_re_run() {
    let test = "a_source_failing_with_eio_mid_read_keeps_what_the_backup_stored_for_the_re_run";
    if !tools(test, &[("nbdkit", "nbdkit")]) {
        return;
    }
    let bv = Bv::new();
    bv.json(&["init"]);
    let size = 160 * MIB;
    let file = bv.path("disk.img");
    let data = random_data(50, size as usize);
    write_file(&file, &data);
    // Reading reaches 128 MiB only once the first 96 MiB left the buffer pool (32 MiB), so at
    // least one 32 MiB pack was handed to the store before the failing read.
    let export = FailingExport::start(bv.dir.path(), &file, size, 128 * MIB..129 * MIB);
    let r = bv.run(&["backup", &export.url, "--disk", "d"]);
    r.code(1).stderr_has(&[
        "backup of disk d failed, no snapshot written, kept the ",
        "for a re-run of the same backup to resume",
        &export.url,
        "offset 134217728",
        "NBD_EIO",
    ]);
    let kept = settled_packs(&r.stderr, "kept");
    assert!(kept >= 1, "{}", r.stderr);
    assert_eq!(packs(&bv).len() as u64, kept, "{}", r.stderr);
    assert!(bv.snapshots().is_empty());
    drop(export);
    // The re-run reads the whole source again and uploads only what the first did not store;
    // every kept pack is its now.
    let doc = bv.backup(&file, "d", &[]);
    assert!(
        num(&doc, "bytes_uploaded") < num(&doc, "bytes_stored"),
        "{doc}"
    );
    bv.restore_and_compare(&format!("d@{}", text(&doc, "short_id")), &data);
    assert_clean(&bv);
}
