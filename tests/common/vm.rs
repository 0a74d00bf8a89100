//! A running QEMU for the QMP tests: `qemu-system-x86_64 -machine none` with qcow2 drives and
//! no guest OS. QMP, block jobs, the NBD server and FUSE exports all work without one; the
//! "guest" writes through a writable FUSE export of each drive (a regular file the test
//! writes with pwrite, its writes going through the drive's top node as a device's would),
//! so the single NBD server a QEMU has stays free for blockvault.
//!
//! The QEMU binary: `BLOCKVAULT_TEST_QEMU_SYSTEM` (e.g. Debian 12's 7.2 unpacked under
//! /opt/qemu-7.2 where installing it would replace a newer qemu-utils), else
//! `qemu-system-x86_64` on PATH (Debian package `qemu-system-x86`). The process is killed
//! when the [`Vm`] is dropped. The test talks to QEMU through a second QMP monitor of its own
//! ([`Control`], a few lines independent of blockvault's client), so it can watch and check
//! QEMU's state while blockvault holds the first one.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::qemu::run_in;
use super::tools::tools;
use super::{skip, unique, Rng};

/// The QEMU system emulator to run, if one runs here (else a SKIP line, a failure in CI).
pub fn qemu_system(test: &str) -> Option<String> {
    let bin = std::env::var("BLOCKVAULT_TEST_QEMU_SYSTEM")
        .unwrap_or_else(|_| "qemu-system-x86_64".to_string());
    // The package with qemu-utils: Debian 12's qemu-system-x86 needs its own version of it
    // (or set BLOCKVAULT_TEST_QEMU_SYSTEM to a QEMU unpacked elsewhere).
    if !tools(test, &[(&bin, "qemu-system-x86 qemu-utils")]) {
        return None;
    }
    if !Path::new("/dev/fuse").exists() {
        skip(
            test,
            "/dev/fuse is missing: the guest writes through FUSE exports",
        );
        return None;
    }
    Some(bin)
}

/// The test's own QMP connection.
pub struct Control {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Control {
    fn connect(path: &Path) -> Control {
        let deadline = Instant::now() + Duration::from_secs(20);
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("cannot connect to {}: {e}", path.display()),
            }
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .expect("timeout");
        let mut c = Control {
            reader: BufReader::new(stream.try_clone().expect("clone")),
            writer: stream,
        };
        c.message(); // the greeting
        c.ok("qmp_capabilities", json!({}));
        c
    }

    fn message(&mut self) -> Value {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).expect("read from QMP");
        assert!(n > 0, "QEMU closed the test's QMP socket");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("QMP said {line:?}: {e}"))
    }

    /// Run a command; its reply (`{"return"}` or `{"error"}`).
    pub fn call(&mut self, command: &str, args: Value) -> Value {
        let msg = json!({"execute": command, "arguments": args});
        writeln!(self.writer, "{msg}").expect("write to QMP");
        loop {
            let m = self.message();
            if m.get("event").is_none() {
                return m;
            }
        }
    }

    /// Run a command that must succeed; what it returned.
    pub fn ok(&mut self, command: &str, args: Value) -> Value {
        let r = self.call(command, args.clone());
        assert!(r.get("error").is_none(), "QMP {command} {args} failed: {r}");
        r["return"].clone()
    }

    /// Every block node (`query-named-block-nodes`).
    pub fn nodes(&mut self) -> Vec<Value> {
        self.ok("query-named-block-nodes", json!({"flat": true}))
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// The named dirty bitmaps of `node`: (name, recording, persistent, count).
    pub fn bitmaps(&mut self, node: &str) -> Vec<(String, bool, bool, u64)> {
        let nodes = self.nodes();
        let n = nodes
            .iter()
            .find(|n| n["node-name"] == node)
            .unwrap_or_else(|| panic!("no node {node}"));
        n["dirty-bitmaps"]
            .as_array()
            .map(|l| {
                l.iter()
                    .filter_map(|b| {
                        Some((
                            b["name"].as_str()?.to_string(),
                            b["recording"].as_bool()?,
                            b["persistent"].as_bool()?,
                            b["count"].as_u64()?,
                        ))
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Names of blockvault's objects in QEMU: node names, job ids, export ids starting with
    /// `blockvault-` (bitmaps not included).
    pub fn blockvault_objects(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        for n in self.nodes() {
            if let Some(name) = n["node-name"]
                .as_str()
                .filter(|s| s.starts_with("blockvault-"))
            {
                out.push(format!("node {name}"));
            }
        }
        for (query, what) in [("query-jobs", "job"), ("query-block-exports", "export")] {
            if let Value::Array(list) = self.ok(query, json!({})) {
                for x in list {
                    if let Some(id) = x["id"].as_str().filter(|s| s.starts_with("blockvault-")) {
                        out.push(format!("{what} {id}"));
                    }
                }
            }
        }
        out
    }

    /// Wait until job `id` is gone (a `drive-backup` the test started has finished).
    pub fn wait_job(&mut self, id: &str) {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let jobs = self.ok("query-jobs", json!({}));
            let job = jobs
                .as_array()
                .and_then(|l| l.iter().find(|j| j["id"] == id).cloned());
            match job {
                None => return,
                Some(j) if j["status"] == "concluded" => {
                    assert!(j.get("error").is_none(), "job {id} failed: {j}");
                    self.ok("job-dismiss", json!({"id": id}));
                }
                Some(_) => {}
            }
            assert!(Instant::now() < deadline, "job {id} still runs after 120 s");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A drive of the VM.
pub struct Drive {
    /// Its node name.
    pub node: String,
    /// Its qcow2 image.
    pub image: PathBuf,
    /// The file its writable FUSE export shows: what the guest sees and writes.
    pub guest: PathBuf,
    /// Its size.
    pub size: u64,
}

/// A running QEMU, killed when dropped.
pub struct Vm {
    child: Option<Child>,
    /// The QMP socket blockvault gets (`qmp:///…`).
    pub qmp: PathBuf,
    /// The test's own monitor.
    pub ctl: Control,
    /// The drives, in the order given.
    pub drives: Vec<Drive>,
}

impl Vm {
    /// Start QEMU (`bin`, from [`qemu_system`]) named `name` in `dir` with one empty qcow2
    /// drive per `(node, size)` and a writable FUSE export of each.
    pub fn start(bin: &str, dir: &Path, name: &str, drives: &[(&str, u64)]) -> Vm {
        let mut args: Vec<String> = [
            "-machine",
            "none",
            "-nodefaults",
            "-display",
            "none",
            "-name",
            name,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let tag = unique();
        let qmp = dir.join(format!("vm{tag}.qmp"));
        let ctl = dir.join(format!("vm{tag}.ctl"));
        for s in [&qmp, &ctl] {
            args.push("-qmp".into());
            args.push(format!("unix:{},server=on,wait=off", s.display()));
        }
        let mut list = Vec::new();
        for (node, size) in drives {
            let image = dir.join(format!("{node}-{tag}.qcow2"));
            run_in(
                dir,
                "qemu-img",
                &[
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    image.to_str().expect("utf-8"),
                    &size.to_string(),
                ],
            );
            args.push("-blockdev".into());
            args.push(format!(
                "driver=qcow2,node-name={node},file.driver=file,file.filename={}",
                image.display()
            ));
            let guest = dir.join(format!("{node}-{tag}.guest"));
            std::fs::File::create(&guest).expect("FUSE mount point");
            list.push(Drive {
                node: node.to_string(),
                image,
                guest,
                size: *size,
            });
        }
        let child = Command::new(bin)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {bin}: {e}"));
        let mut vm = Vm {
            child: Some(child),
            qmp,
            ctl: Control::connect(&ctl),
            drives: list,
        };
        for d in &vm.drives {
            vm.ctl.ok(
                "block-export-add",
                json!({"type": "fuse", "id": format!("guest-{}", d.node), "node-name": d.node,
                       "mountpoint": d.guest, "writable": true}),
            );
        }
        vm
    }

    /// `qmp:///PATH` for blockvault.
    pub fn url(&self) -> String {
        format!("qmp://{}", self.qmp.display())
    }

    /// The guest writes `data` at `offset` of drive `i`.
    pub fn write(&self, i: usize, offset: u64, data: &[u8]) {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&self.drives[i].guest)
            .expect("open the guest file");
        f.write_all_at(data, offset).expect("guest write");
    }

    /// What the guest sees on drive `i` now.
    pub fn read(&self, i: usize) -> Vec<u8> {
        std::fs::read(&self.drives[i].guest).expect("read the guest file")
    }

    /// The process id, to signal it.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// SIGKILL QEMU and reap it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
            // A killed QEMU leaves its FUSE exports mounted (dead, "transport endpoint is not
            // connected"): detach them, or every run leaves mounts behind in /tmp.
            for d in &self.drives {
                let _ = Command::new("umount")
                    .arg("--lazy")
                    .arg(&d.guest)
                    .stderr(Stdio::null())
                    .status();
            }
        }
    }

    /// `--qmp-actions` that take a `drive-backup sync=full` of every drive into `dir` in
    /// blockvault's transaction: the point-in-time copies the restores are compared with.
    /// Returns the actions file, and per drive its job id and copy.
    pub fn reference_copies(&self, dir: &Path) -> (PathBuf, Vec<(String, PathBuf)>) {
        let tag = unique();
        let mut actions = Vec::new();
        let mut refs = Vec::new();
        for d in &self.drives {
            let job = format!("ref-{}-{tag}", d.node);
            let copy = dir.join(format!("ref-{}-{tag}.raw", d.node));
            actions.push(json!({"type": "drive-backup", "data": {
                "job-id": job, "device": d.node, "target": copy, "format": "raw", "sync": "full",
            }}));
            refs.push((job, copy));
        }
        let file = dir.join(format!("ref-actions-{tag}.json"));
        std::fs::write(&file, serde_json::to_vec(&actions).expect("JSON")).expect("write actions");
        (file, refs)
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A "guest" writing random 4 KiB–64 KiB blocks at random 4 KiB-aligned offsets of every
/// drive's FUSE file, from its own thread, until stopped.
pub struct Writer {
    stop: Arc<AtomicBool>,
    writes: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Writer {
    /// Start writing to `vm`'s drives (seeded by `seed`).
    pub fn start(vm: &Vm, seed: u64) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let writes = Arc::new(AtomicU64::new(0));
        let files: Vec<(std::fs::File, u64)> = vm
            .drives
            .iter()
            .map(|d| {
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(&d.guest)
                    .expect("open the guest file");
                (f, d.size)
            })
            .collect();
        let (s, w) = (stop.clone(), writes.clone());
        let thread = std::thread::spawn(move || {
            let mut rng = Rng::new(seed);
            let mut buf = vec![0u8; 64 << 10];
            while !s.load(Ordering::Relaxed) {
                let (f, size) = &files[rng.below(files.len() as u64) as usize];
                let len = rng.range(1, 17) * 4096;
                let off = rng.below((size - len) / 4096 + 1) * 4096;
                rng.fill(&mut buf[..len as usize]);
                f.write_all_at(&buf[..len as usize], off)
                    .expect("guest write");
                w.fetch_add(1, Ordering::Relaxed);
            }
        });
        Writer {
            stop,
            writes,
            thread: Some(thread),
        }
    }

    /// Writes so far.
    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }

    /// Stop and join; the number of writes made.
    pub fn stop(mut self) -> u64 {
        self.halt();
        self.writes()
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().expect("writer thread");
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.halt();
    }
}
