//! Backing up a running VM through QMP (`backup qmp:///SOCKET --disk-map …`), against a real
//! QEMU (`tests/common/vm.rs`: `-machine none`, qcow2 drives, no guest OS; the "guest" writes
//! through FUSE exports of the drives). Each restore is compared byte for byte with what the
//! guest saw at the point in time: a `drive-backup sync=full` QEMU took in blockvault's own
//! transaction (`--qmp-actions`), or the drive itself when nothing wrote since.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;

use common::qemu::QEMU;
use common::tools::tools;
use common::vm::{qemu_system, Vm, Writer};
use common::{assert_files_eq, num, random_data, text, text_data, Bv, KIB, MIB};

/// QEMU and qemu-img, or a SKIP line.
fn qemu(test: &str) -> Option<String> {
    if !tools(test, QEMU) {
        return None;
    }
    qemu_system(test)
}

fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// `backup VM --disk-map MAP EXTRA… --json`, which must succeed.
fn backup(bv: &Bv, vm: &Vm, map: &str, extra: &[&str]) -> Value {
    let url = vm.url();
    let mut args = vec!["backup", url.as_str(), "--disk-map", map];
    args.extend(extra);
    bv.json(&args)
}

/// The blockvault bitmaps on `node`: (name, recording).
fn our_bitmaps(vm: &mut Vm, node: &str) -> Vec<(String, bool)> {
    vm.ctl
        .bitmaps(node)
        .into_iter()
        .filter(|b| b.0.starts_with("blockvault-"))
        .map(|b| (b.0, b.1))
        .collect()
}

/// After a successful run: nothing of blockvault's in QEMU but, on each drive, the one
/// bitmap the latest snapshot created, recording and persistent; no view files or NBD socket
/// left in `dir`.
fn assert_clean(vm: &mut Vm, docs: &[Value], dir: &Path) {
    assert_eq!(vm.ctl.blockvault_objects(), Vec::<String>::new());
    for (d, doc) in vm
        .drives
        .iter()
        .map(|d| d.node.clone())
        .collect::<Vec<_>>()
        .iter()
        .zip(docs)
    {
        let bitmaps: Vec<(String, bool, bool, u64)> = vm
            .ctl
            .bitmaps(d)
            .into_iter()
            .filter(|b| b.0.starts_with("blockvault-"))
            .collect();
        assert_eq!(bitmaps.len(), 1, "{d}: {bitmaps:?}");
        assert_eq!(bitmaps[0].0, text(doc, "bitmap_created"), "{d}");
        assert!(
            bitmaps[0].1 && bitmaps[0].2,
            "{d}: recording and persistent: {bitmaps:?}"
        );
    }
    let left: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("scratch")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.to_string_lossy().contains(".blockvault-"))
        .collect();
    assert_eq!(left, Vec::<PathBuf>::new(), "view files or NBD socket left");
}

/// Wait until process `pid` has spent `ticks` clock ticks of CPU time (/proc/PID/stat:
/// utime + stime) since the call: with its export up, that is reading and compressing its
/// source (a socket read does not show in /proc/PID/io, which counts read(2), not recv(2));
/// false if it ended first.
fn wait_working(pid: u32, ticks: u64) -> bool {
    let cpu = || -> Option<u64> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // Fields after the parenthesised name: state is field 3, utime 14, stime 15.
        let rest: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        if rest.first() == Some(&"Z") {
            return None;
        }
        Some(rest.get(11)?.parse::<u64>().ok()? + rest.get(12)?.parse::<u64>().ok()?)
    };
    let Some(start) = cpu() else { return false };
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        match cpu() {
            Some(now) if now >= start + ticks => return true,
            Some(_) => std::thread::sleep(Duration::from_millis(5)),
            None => return false,
        }
    }
    false
}

/// Wait until blockvault's export shows in QEMU (the transaction is done, reading starts).
fn wait_export(vm: &mut Vm) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !vm
        .ctl
        .blockvault_objects()
        .iter()
        .any(|o| o.starts_with("export "))
    {
        assert!(
            Instant::now() < deadline,
            "no blockvault export after 120 s"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Start `backup VM --disk-map MAP` slowed down (zstd level 19 on one worker thread) and
/// return once it is reading its views: its export is up and it has worked 0.5 s of CPU.
fn spawn_slow_backup(bv: &Bv, vm: &mut Vm, map: &str) -> (std::process::Child, String) {
    let url = vm.url();
    let (child, what) = bv.spawn(&[
        "backup",
        &url,
        "--disk-map",
        map,
        "--zstd-level",
        "19",
        "--threads",
        "1",
    ]);
    wait_export(vm);
    assert!(
        wait_working(child.id(), 50),
        "{what} ended before working 0.5 s"
    );
    (child, what)
}

#[test]
fn a_two_disk_group_backed_up_under_writes_restores_its_point_in_time() {
    const T: &str = "a_two_disk_group_backed_up_under_writes_restores_its_point_in_time";
    let Some(bin) = qemu(T) else { return };
    let bv = Bv::new();
    let mut vm = Vm::start(
        &bin,
        bv.dir.path(),
        "vm1",
        &[("disk0", 64 * MIB), ("disk1", 48 * MIB)],
    );
    vm.write(0, 0, &text_data(1, 24 << 20));
    vm.write(1, 8 * MIB, &random_data(2, 16 << 20));
    let config = bv.path("vm1.xml");
    let xml = "<domain type='kvm'>\n  <name>vm1</name>\n</domain>\n";
    std::fs::write(&config, xml).expect("config");
    let map = "disk0=vm1-root,disk1=vm1-data";

    // A full backup and an incremental, each taken while the guest writes to both disks.
    let writer = Writer::start(&vm, 3);
    let mut docs = Vec::new();
    let mut refs = Vec::new();
    for extra in [vec!["--vm-config", s(&config)], vec![]] {
        while writer.writes() < 200 * (docs.len() as u64 + 1) {
            std::thread::sleep(Duration::from_millis(1));
        }
        let (actions, copies) = vm.reference_copies(bv.dir.path());
        let mut args = extra.clone();
        args.extend(["--qmp-actions", s(&actions)]);
        docs.push(backup(&bv, &vm, map, &args));
        refs.push(copies);
    }
    let writes = writer.stop();
    for (job, _) in refs.iter().flatten() {
        vm.ctl.wait_job(job);
    }
    assert!(writes >= 400, "the guest wrote {writes} times");

    for (doc, change) in docs.iter().zip(["full", "bitmap"]) {
        assert_eq!(doc["vm"], "vm1");
        assert_eq!(
            doc["consistency"], "crash",
            "no guest agent: crash-consistent"
        );
        assert!(doc["qemu"].as_str().is_some_and(|q| !q.is_empty()));
        let disks = doc["disks"].as_array().expect("disks");
        assert_eq!(disks.len(), 2);
        for (d, name) in disks.iter().zip(["vm1-root", "vm1-data"]) {
            assert_eq!(d["disk"], name);
            assert_eq!(d["change_source"], change, "{d}");
        }
    }
    assert_eq!(docs[0]["vm_config"], "vm1.xml");
    assert_eq!(docs[1]["vm_config"], Value::Null);
    // The second run removed the bitmaps the first created.
    let first: Vec<String> = docs[0]["disks"]
        .as_array()
        .expect("disks")
        .iter()
        .map(|d| text(d, "bitmap_created"))
        .collect();
    assert_eq!(docs[1]["bitmaps_removed"], serde_json::json!(first));
    let latest: Vec<Value> = docs[1]["disks"].as_array().expect("disks").clone();
    assert_clean(&mut vm, &latest, bv.dir.path());

    // Every member names its group; the groups are listed, complete.
    let snaps = bv.snapshots();
    assert_eq!(snaps.len(), 4);
    let listed = bv.json(&["snapshots"]);
    let groups = listed["groups"].as_array().expect("groups");
    assert_eq!(groups.len(), 2);
    // Listed by point in time (whole seconds), then id: two runs in one second may list in
    // either order, so each run's group is looked up by its id.
    for doc in &docs {
        let g = groups
            .iter()
            .find(|g| g["id"] == doc["group"])
            .unwrap_or_else(|| panic!("group {} not listed: {listed}", doc["group"]));
        assert_eq!(g["vm"], "vm1");
        assert_eq!(g["complete"], true);
        assert_eq!(g["consistency"], "crash");
        let members = g["members"].as_array().expect("members");
        for (m, d) in members.iter().zip(doc["disks"].as_array().expect("disks")) {
            assert_eq!(m["snapshot"], d["snapshot"]);
            assert_eq!(m["present"], true);
            let snap = snaps
                .iter()
                .find(|s| s["id"] == d["snapshot"])
                .expect("listed");
            assert_eq!(snap["group"], g["id"]);
        }
        assert_eq!(members[0]["node"], "disk0");
    }
    let human = bv.run(&["snapshots"]);
    human
        .ok()
        .stdout_has(&["GROUP", "vm1", "crash", "config vm1.xml", "2 groups"]);

    // Each group restores to its point in time: the drive-backup copies of the same
    // transaction, byte for byte; the first also its VM configuration.
    for (i, (doc, copies)) in docs.iter().zip(&refs).enumerate() {
        let folder = bv.path(&format!("restored-{i}"));
        let spec = format!("group:vm1@{}", &text(doc, "group")[..8]);
        bv.run(&["restore", &spec, s(&folder)]).ok();
        for (disk, (_, copy)) in ["vm1-root", "vm1-data"].iter().zip(copies) {
            assert_files_eq(&folder.join(format!("{disk}.raw")), copy);
        }
        match i {
            0 => assert_eq!(
                std::fs::read_to_string(folder.join("vm1.xml")).expect("config"),
                xml
            ),
            _ => assert!(!folder.join("vm1.xml").exists()),
        }
    }
    // The latest group to a list of targets, the configuration of the first to a file.
    let (a, b) = (bv.path("root.img"), bv.path("data.img"));
    let list = format!("vm1-root={},vm1-data={}", s(&a), s(&b));
    bv.run(&["restore", "group:vm1", &list]).ok();
    assert_files_eq(&a, &refs[1][0].1);
    assert_files_eq(&b, &refs[1][1].1);
    let cfg = bv.path("cfg/x.xml");
    let spec = format!("group:vm1@{}", &text(&docs[0], "group")[..8]);
    let list = format!("vm1-root={},vm1-data={}", s(&a), s(&b));
    bv.run(&["restore", &spec, &list, "--force", "--vm-config", s(&cfg)])
        .ok();
    assert_eq!(std::fs::read_to_string(&cfg).expect("config"), xml);
    assert_files_eq(&a, &refs[0][0].1);
    // A folder with --format qcow2 gets DISK.qcow2 images holding the same bytes.
    let folder = bv.path("restored-qcow2");
    bv.run(&["restore", "group:vm1", s(&folder), "--format", "qcow2"])
        .ok();
    for (disk, (_, copy)) in ["vm1-root", "vm1-data"].iter().zip(&refs[1]) {
        let raw = bv.path(&format!("{disk}-from-qcow2.raw"));
        let image = folder.join(format!("{disk}.qcow2"));
        let out = std::process::Command::new("qemu-img")
            .args(["convert", "-f", "qcow2", "-O", "raw", s(&image), s(&raw)])
            .output()
            .expect("qemu-img convert");
        assert!(out.status.success(), "{out:?}");
        assert_files_eq(&raw, copy);
    }
    // One disk's target is no folder: an NBD export or a file is refused, naming the form.
    for one in ["nbd+unix:///x?socket=/nonexistent.sock", s(&a)] {
        bv.run(&["restore", "group:vm1", one, "--force"])
            .code(2)
            .stderr_has(&[one, "a group restores to a folder", "DISK=TARGET"]);
    }
    // A list must name every member.
    let only = format!("vm1-root={}", s(&a));
    bv.run(&["restore", "group:vm1", &only, "--force"])
        .code(2)
        .stderr_has(&["names no target for vm1-data", "give every disk"]);
    bv.verify_ok();
}

#[test]
fn three_incrementals_read_exactly_what_blockvaults_bitmaps_mark() {
    const T: &str = "three_incrementals_read_exactly_what_blockvaults_bitmaps_mark";
    let Some(bin) = qemu(T) else { return };
    let bv = Bv::new();
    let mut vm = Vm::start(&bin, bv.dir.path(), "vm2", &[("d0", 96 * MIB)]);
    vm.write(0, 0, &text_data(10, 32 << 20));
    let full = backup(&bv, &vm, "d0=vm2", &["--verify-unchanged", "0"]);
    assert_eq!(full["change_source"], "full");
    let mut expect = vec![(text(&full, "snapshot"), vm.read(0))];
    let mut previous = text(&full, "bitmap_created");
    // Each round writes a few ranges; QEMU's bitmap (64 KiB granules) marks the granules
    // they touch, and the incremental reads exactly those.
    let rounds: [&[(u64, u64)]; 3] = [
        &[(5 * MIB, 4 * KIB), (40 * MIB + 12 * KIB, 100 * KIB)],
        &[(0, 64 * KIB), (64 * MIB, 3 * MIB), (95 * MIB, 8 * KIB)],
        &[(17 * MIB + 60 * KIB, 8 * KIB)],
    ];
    for (r, writes) in rounds.iter().enumerate() {
        let mut granules = std::collections::BTreeSet::new();
        for (i, &(off, len)) in writes.iter().enumerate() {
            vm.write(
                0,
                off,
                &random_data(100 + (r * 10 + i) as u64, len as usize),
            );
            granules.extend(off / (64 * KIB)..(off + len).div_ceil(64 * KIB));
        }
        let doc = backup(&bv, &vm, "d0=vm2", &["--verify-unchanged", "0"]);
        assert_eq!(doc["change_source"], "bitmap", "round {r}: {doc}");
        assert_eq!(
            text(&doc, "change_detail"),
            format!("bitmap {previous}"),
            "round {r}"
        );
        assert_eq!(
            num(&doc, "bytes_read"),
            granules.len() as u64 * 64 * KIB,
            "round {r}"
        );
        assert_eq!(doc["bitmaps_removed"], serde_json::json!([previous]));
        previous = text(&doc, "bitmap_created");
        assert_eq!(our_bitmaps(&mut vm, "d0"), vec![(previous.clone(), true)]);
        expect.push((text(&doc, "snapshot"), vm.read(0)));
    }
    assert_clean(
        &mut vm,
        &[bv.json(&["snapshots"])["snapshots"][3].clone()],
        bv.dir.path(),
    );
    for (id, content) in &expect {
        bv.restore_and_compare(&format!("vm2@{id}"), content);
    }
    bv.verify_ok();
}

#[test]
fn a_run_killed_mid_read_is_cleaned_up_by_the_next() {
    const T: &str = "a_run_killed_mid_read_is_cleaned_up_by_the_next";
    let Some(bin) = qemu(T) else { return };
    let bv = Bv::new();
    let mut vm = Vm::start(&bin, bv.dir.path(), "vm3", &[("d0", 160 * MIB)]);
    vm.write(0, 0, &text_data(20, 8 << 20));
    let full = backup(&bv, &vm, "d0=vm3", &[]);
    let x = text(&full, "bitmap_created");
    // 64 MiB of new text keep a single zstd-19 worker busy for a while.
    vm.write(0, 16 * MIB, &text_data(21, 64 << 20));
    let (child, what) = spawn_slow_backup(&bv, &mut vm, "d0=vm3");
    let mut child = child;
    child.kill().expect("SIGKILL");
    let killed = common::Run::wait(child, what);
    assert_eq!(killed.code, -1, "killed: {}", killed.stderr);

    // It left its view, job, export, NBD server and file, its new bitmap (an orphan), and
    // the parent's bitmap disabled.
    let left = vm.ctl.blockvault_objects();
    for kind in ["node ", "job ", "export "] {
        assert!(left.iter().any(|o| o.starts_with(kind)), "{kind}: {left:?}");
    }
    let bitmaps = our_bitmaps(&mut vm, "d0");
    assert_eq!(bitmaps.len(), 2, "{bitmaps:?}");
    assert!(bitmaps.contains(&(x.clone(), false)), "{bitmaps:?}");
    assert_eq!(bv.snapshots().len(), 1);

    // More writes, then the next run: it removes the leftovers, folds the orphan into the
    // parent's bitmap, trusts it, and its snapshot restores exactly.
    vm.write(0, 150 * MIB, &random_data(22, 1 << 20));
    let doc = backup(&bv, &vm, "d0=vm3", &["--verify-unchanged", "0"]);
    let cleaned: Vec<String> = doc["cleaned"]
        .as_array()
        .expect("cleaned")
        .iter()
        .map(|c| c.as_str().expect("text").to_string())
        .collect();
    for what in [
        "export blockvault-",
        "job blockvault-",
        "node blockvault-",
        "file ",
        "the NBD server on",
    ] {
        assert!(
            cleaned.iter().any(|c| c.starts_with(what)),
            "{what}: {cleaned:?}"
        );
    }
    assert!(
        cleaned
            .iter()
            .any(|c| c.starts_with("merged bitmap blockvault-")
                && c.contains(&format!("into {x} on node d0"))),
        "{cleaned:?}"
    );
    assert_eq!(doc["change_source"], "bitmap", "{doc}");
    assert_eq!(num(&doc, "bytes_read"), 65 * MIB, "both writes, read once");
    assert_clean(&mut vm, std::slice::from_ref(&doc), bv.dir.path());
    bv.restore_and_compare(&format!("vm3@{}", text(&doc, "snapshot")), &vm.read(0));
    let verified = bv.verify_ok();
    assert!(verified["unreferenced_packs"].as_u64().is_some());
}

#[test]
fn a_run_stopped_by_sigterm_leaves_qemu_as_it_found_it() {
    const T: &str = "a_run_stopped_by_sigterm_leaves_qemu_as_it_found_it";
    let Some(bin) = qemu(T) else { return };
    let bv = Bv::new();
    let mut vm = Vm::start(&bin, bv.dir.path(), "vm7", &[("d0", 160 * MIB)]);
    vm.write(0, 0, &text_data(60, 8 << 20));
    let full = backup(&bv, &vm, "d0=vm7", &[]);
    let x = text(&full, "bitmap_created");
    vm.write(0, 16 * MIB, &text_data(61, 64 << 20));
    let (child, what) = spawn_slow_backup(&bv, &mut vm, "d0=vm7");
    let pid = child.id().to_string();
    let sent = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(sent.success());
    common::Run::wait(child, what).code(143).stderr_has(&[
        "no snapshot of the group was committed",
        "interrupted by SIGTERM",
    ]);
    // QEMU as the run found it: nothing of the run's, the parent's bitmap recording again.
    assert_eq!(vm.ctl.blockvault_objects(), Vec::<String>::new());
    assert_eq!(our_bitmaps(&mut vm, "d0"), vec![(x, true)]);
    assert_eq!(bv.snapshots().len(), 1);
    // And it still covers every write since the full backup.
    vm.write(0, 150 * MIB, &random_data(62, 1 << 20));
    let doc = backup(&bv, &vm, "d0=vm7", &["--verify-unchanged", "0"]);
    assert_eq!(doc["change_source"], "bitmap", "{doc}");
    assert_eq!(num(&doc, "bytes_read"), 65 * MIB);
    assert_eq!(doc["cleaned"], serde_json::json!([]));
    bv.restore_and_compare(&format!("vm7@{}", text(&doc, "snapshot")), &vm.read(0));
    bv.verify_ok();
}

#[test]
fn qemu_killed_mid_backup_fails_clearly_and_writes_no_snapshot() {
    const T: &str = "qemu_killed_mid_backup_fails_clearly_and_writes_no_snapshot";
    let Some(bin) = qemu(T) else { return };
    let bv = Bv::new();
    let mut vm = Vm::start(&bin, bv.dir.path(), "vm4", &[("d0", 160 * MIB)]);
    vm.write(0, 0, &text_data(30, 64 << 20));
    let (child, what) = spawn_slow_backup(&bv, &mut vm, "d0=vm4");
    vm.kill();
    let r = common::Run::wait(child, what);
    r.code(1).stderr_has(&[
        "disk vm4 (node d0)",
        "no snapshot of the group was committed",
        "NBD export nbd+unix:///blockvault-",
    ]);
    assert_eq!(bv.snapshots().len(), 0);
    // Its view file and NBD socket are gone all the same.
    let left: Vec<PathBuf> = std::fs::read_dir(bv.dir.path())
        .expect("scratch")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.to_string_lossy().contains(".blockvault-"))
        .collect();
    assert_eq!(left, Vec::<PathBuf>::new());
    bv.verify_ok();
}

#[test]
fn without_a_guest_agent_the_group_is_crash_consistent_and_says_so() {
    const T: &str = "without_a_guest_agent_the_group_is_crash_consistent_and_says_so";
    let Some(bin) = qemu(T) else { return };
    let bv = Bv::new();
    let mut vm = Vm::start(
        &bin,
        bv.dir.path(),
        "vm5",
        &[("d0", 16 * MIB), ("d1", 16 * MIB)],
    );
    vm.write(0, 0, &random_data(40, 1 << 20));
    let agent = bv.path("qga.sock");
    let url = vm.url();
    let r = bv.run(&[
        "--json",
        "backup",
        &url,
        "--disk-map",
        "d0=a,d1=b",
        "--guest-agent",
        s(&agent),
    ]);
    r.ok()
        .stderr_has(&["warning: no guest agent", "qga.sock", "crash-consistent"]);
    let doc = r.json();
    assert_eq!(doc["consistency"], "crash");
    assert_eq!(doc["frozen_filesystems"], Value::Null);
    for snap in bv.snapshots() {
        let notes = snap["notes"].as_array().expect("notes");
        assert!(
            notes
                .iter()
                .any(|n| n.as_str().is_some_and(|n| n.contains("no guest agent"))),
            "{snap}"
        );
    }
    assert_clean(
        &mut vm,
        doc["disks"].as_array().expect("disks"),
        bv.dir.path(),
    );

    // Mistakes: refused before QEMU or the vault changes.
    let before: Vec<_> = ["d0", "d1"].iter().map(|n| vm.ctl.bitmaps(n)).collect();
    bv.run(&["backup", &url, "--disk-map", "d0=a,nosuch=c"])
        .code(1)
        .stderr_has(&[
            "has no block node or device nosuch",
            "it has: node d0, node d1",
        ]);
    bv.run(&["backup", &url, "--disk", "a"])
        .code(2)
        .stderr_has(&["--disk-map"]);
    bv.run(&["backup", &url, "--disk-map", "d0=a", "--bitmap", "x"])
        .code(2)
        .stderr_has(&["--bitmap and --changed do not apply"]);
    bv.run(&["backup", &url, "--disk-map", "d0=a,d1=a"])
        .code(2)
        .stderr_has(&["disk a is given to two nodes"]);
    let missing = format!("qmp://{}", s(&bv.path("none.qmp")));
    bv.run(&["backup", &missing, "--disk-map", "d0=a"])
        .code(1)
        .stderr_has(&["none.qmp"]);
    let after: Vec<_> = ["d0", "d1"].iter().map(|n| vm.ctl.bitmaps(n)).collect();
    assert_eq!(before, after);
    assert_eq!(bv.snapshots().len(), 2);
}

#[test]
fn a_group_missing_a_member_is_listed_incomplete_and_not_restored_as_one() {
    const T: &str = "a_group_missing_a_member_is_listed_incomplete_and_not_restored_as_one";
    let Some(bin) = qemu(T) else { return };
    let bv = Bv::new();
    let vm = Vm::start(
        &bin,
        bv.dir.path(),
        "vm6",
        &[("d0", 8 * MIB), ("d1", 8 * MIB)],
    );
    vm.write(1, 0, &random_data(50, 1 << 20));
    let doc = backup(&bv, &vm, "d0=a,d1=b", &[]);
    let gone = text(&doc["disks"][1], "snapshot");
    // Member b's snapshot goes the way the vault allows (a planted deletion is refused as
    // such): a later backup of disk b, then `forget --keep-last 1` on it.
    let b_image = bv.path("b.raw");
    std::fs::write(&b_image, vm.read(1)).expect("write b.raw");
    bv.backup(&b_image, "b", &[]);
    // A member stays while its group does, unless the group is split on purpose.
    let kept = bv.json(&["forget", "--disk", "b", "--keep-last", "1"]);
    assert_eq!(kept["removed"], 0, "{kept}");
    assert!(
        kept["disks"][0]["kept"][1]["reasons"][0]
            .as_str()
            .is_some_and(|r| r.starts_with("group vm6@")),
        "{kept}"
    );
    let split = bv.json(&[
        "forget",
        "--disk",
        "b",
        "--keep-last",
        "1",
        "--split-groups",
    ]);
    assert_eq!(split["removed"], 1, "{split}");
    assert_eq!(
        split["groups"][0]["split"][0],
        format!("b@{}", &gone[..8]),
        "{split}"
    );
    let listed = bv.json(&["snapshots"]);
    assert_eq!(listed["groups"][0]["complete"], false);
    assert_eq!(listed["groups"][0]["members"][1]["present"], false);
    bv.run(&["snapshots"])
        .ok()
        .stdout_has(&["(missing)", "INCOMPLETE"]);
    let spec = format!("group:vm6@{}", &text(&doc, "group")[..6]);
    bv.run(&["restore", &spec, s(&bv.path("out"))])
        .code(1)
        .stderr_has(&["is incomplete", &format!("b@{}", &gone[..8])]);
    bv.run(&["restore", "group:vm6", s(&bv.path("out"))])
        .code(1)
        .stderr_has(&["VM vm6 has no complete group"]);
    // Its other member is a snapshot like any other.
    let a = text(&doc["disks"][0], "snapshot");
    bv.restore_and_compare(&format!("a@{a}"), &vm.read(0));
}

#[test]
fn forget_keeps_and_drops_groups_as_units() {
    const T: &str = "forget_keeps_and_drops_groups_as_units";
    let Some(bin) = qemu(T) else { return };
    let bv = Bv::new();
    let vm = Vm::start(
        &bin,
        bv.dir.path(),
        "vm7",
        &[("d0", 8 * MIB), ("d1", 8 * MIB)],
    );
    let mut docs = Vec::new();
    for round in 0..3u64 {
        vm.write(0, round * MIB, &random_data(70 + round, 64 * KIB as usize));
        vm.write(1, round * MIB, &random_data(80 + round, 64 * KIB as usize));
        docs.push(backup(&bv, &vm, "d0=a,d1=b", &[]));
    }
    let newest = (vm.read(0), vm.read(1));
    // Disk scope: the policy would drop disk a's two older members, but disk b's stay, so
    // their groups do, and with them a's members.
    let kept = bv.json(&["forget", "--disk", "a", "--keep-last", "1"]);
    assert_eq!(kept["removed"], 0, "{kept}");
    assert_eq!(kept["kept"], 3, "{kept}");
    assert_eq!(kept["groups"].as_array().map(Vec::len), Some(3), "{kept}");
    // Every disk at once with the same rule: each group's members go together.
    let dry = bv.json(&["forget", "--keep-last", "2", "--dry-run"]);
    assert_eq!(dry["removed"], 2, "{dry}");
    assert_eq!(dry["groups"][0]["kept"], false, "{dry}");
    // The VM's groups, counted as groups: the two older go, both disks' members with them,
    // in one head swap.
    let gone = bv.json(&["forget", "--group", "vm7", "--keep-last", "1"]);
    assert_eq!(gone["removed"], 4, "{gone}");
    assert_eq!(gone["kept"], 2, "{gone}");
    let listed = bv.json(&["snapshots"]);
    let groups = listed["groups"].as_array().expect("groups");
    assert_eq!(groups.len(), 1, "{listed}");
    assert_eq!(groups[0]["complete"], true, "{listed}");
    assert_eq!(text(&groups[0], "id"), text(&docs[2], "group"));
    let out = bv.path("out");
    bv.json(&["restore", "group:vm7", s(&out)]);
    assert_eq!(std::fs::read(out.join("a.raw")).expect("a.raw"), newest.0);
    assert_eq!(std::fs::read(out.join("b.raw")).expect("b.raw"), newest.1);
    bv.run(&["forget", "--group", "nosuchvm", "--keep-last", "1"])
        .code(1)
        .stderr_has(&["no group of a VM named nosuchvm"]);
    bv.run(&[
        "forget",
        "--group",
        "vm7",
        "--disk",
        "a",
        "--keep-last",
        "1",
    ])
    .code(2);
    bv.json(&["verify", "--read-data"]);
}
