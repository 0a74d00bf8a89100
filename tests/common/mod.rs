//! Shared helpers of the integration tests: a deterministic PRNG and image generators, a
//! harness that runs the real `blockvault` binary against a vault and keystore in a temp
//! folder, byte-exact comparisons, vault object helpers, and loop devices.
//!
//! Every test binary includes this module (`mod common;`) and uses a different subset of it;
//! the `allow(dead_code)` below covers the submodules too. The submodules hold the fixtures
//! made by external tools, imported by path where used (a glob re-export here would be an
//! unused import in every binary that needs none of them): [`tools`] (is a tool installed;
//! run one), [`qemu`] (the QEMU tools; a qemu-nbd server), [`vm`] (a running QEMU with
//! drives, no guest), [`keys`] (openssl PEM keys, SoftHSM2 tokens), [`layout_tools`] (sfdisk
//! tables, cryptsetup volumes, layout checks), [`secrets`] (scans for key material stored in
//! the clear), [`servers`] (Azurite and SeaweedFS object-storage servers), [`trust`] (what a
//! storage holder does to a vault; its head read through the library) and [`v1_fixtures`]
//! (the committed format 1 vaults).
#![allow(dead_code)]

pub mod keys;
pub mod layout_tools;
pub mod qemu;
pub mod secrets;
pub mod servers;
pub mod tools;
pub mod trust;
pub mod v1_fixtures;
pub mod vm;

use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;

use serde_json::Value;

/// One mebibyte.
pub const MIB: u64 = 1 << 20;
/// One kibibyte.
pub const KIB: u64 = 1 << 10;

// ---------------------------------------------------------------------------------------------
// Deterministic data
// ---------------------------------------------------------------------------------------------

/// xorshift64*: small, fast, deterministic; good enough to make incompressible test data.
#[derive(Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed` (any value, 0 included).
    pub fn new(seed: u64) -> Self {
        // splitmix64 of the seed, so nearby seeds give unrelated streams and 0 is fine.
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        Rng(if z == 0 { 0x2545_F491_4F6C_DD1D } else { z })
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0);
        self.next_u64() % n
    }

    /// Uniform in `lo..hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo)
    }

    /// Fill `buf` with random bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut chunks = buf.chunks_exact_mut(8);
        for c in &mut chunks {
            c.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        let rest = chunks.into_remainder();
        let last = self.next_u64().to_le_bytes();
        rest.copy_from_slice(&last[..rest.len()]);
    }
}

/// `len` incompressible bytes from `seed`.
pub fn random_data(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    Rng::new(seed).fill(&mut v);
    v
}

/// `len` bytes of compressible text (words from a small vocabulary, chosen by `seed`).
pub fn text_data(seed: u64, len: usize) -> Vec<u8> {
    const WORDS: &[&str] = &[
        "block", "vault", "backup", "restore", "snapshot", "extent", "slot", "manifest", "pack",
        "the", "a", "of", "disk", "image", "sector", "kernel", "uring", "cipher", "key", "zero",
    ];
    let mut rng = Rng::new(seed);
    let mut v = Vec::with_capacity(len + 16);
    while v.len() < len {
        v.extend_from_slice(WORDS[rng.below(WORDS.len() as u64) as usize].as_bytes());
        v.push(if rng.below(12) == 0 { b'\n' } else { b' ' });
    }
    v.truncate(len);
    v
}

/// Kinds of content a region of a generated image can have.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fill {
    /// Incompressible.
    Random,
    /// Compressible text.
    Text,
    /// Explicit zero bytes (written, not a hole).
    Zeros,
}

/// `len` bytes of `fill` content from `seed`.
pub fn content(fill: Fill, seed: u64, len: usize) -> Vec<u8> {
    match fill {
        Fill::Random => random_data(seed, len),
        Fill::Text => text_data(seed, len),
        Fill::Zeros => vec![0u8; len],
    }
}

/// An image file `name` in `bv`'s folder for backups that must still run when a test acts on
/// them: 96 MiB of random data (three 32 MiB packs, stored fast) then `text_mib` MiB of text
/// (slow under [`slow_backup`]'s `--zstd-level 19 --threads 1`). Returns its path and bytes.
pub fn slow_image(bv: &Bv, name: &str, seed: u64, text_mib: u64) -> (PathBuf, Vec<u8>) {
    let mut data = random_data(seed, 96 * MIB as usize);
    data.extend_from_slice(&text_data(seed + 1, (text_mib * MIB) as usize));
    let path = bv.path(name);
    write_file(&path, &data);
    (path, data)
}

/// `backup IMG --disk DISK --zstd-level 19 --threads 1`: slow over [`slow_image`]'s text.
pub fn slow_backup<'a>(img: &'a Path, disk: &'a str) -> Vec<&'a str> {
    vec![
        "backup",
        img.to_str().unwrap(),
        "--disk",
        disk,
        "--zstd-level",
        "19",
        "--threads",
        "1",
    ]
}

/// A mixed image of `len` bytes: text, random and zero regions of 256 KiB..4 MiB.
pub fn mixed_data(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let mut v = Vec::with_capacity(len);
    let mut i = 0u64;
    while v.len() < len {
        let n = (rng.range(256 * KIB, 4 * MIB) as usize).min(len - v.len());
        let fill = match i % 3 {
            0 => Fill::Text,
            1 => Fill::Random,
            _ => Fill::Zeros,
        };
        v.extend_from_slice(&content(fill, seed ^ (i << 32), n));
        i += 1;
    }
    v
}

// ---------------------------------------------------------------------------------------------
// Files
// ---------------------------------------------------------------------------------------------

/// Write `data` to a new file at `path` and fsync it.
pub fn write_file(path: &Path, data: &[u8]) {
    std::fs::write(path, data).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

/// Overwrite `data` at `offset` of an existing file.
pub fn write_at(path: &Path, offset: u64, data: &[u8]) {
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
    f.write_all_at(data, offset)
        .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

/// A sparse file of `size` bytes with `regions` (offset, bytes) written into it; the rest are
/// holes. Returns the full expected content.
pub fn make_sparse(path: &Path, size: u64, regions: &[(u64, Vec<u8>)]) -> Vec<u8> {
    let f = File::create(path).unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
    f.set_len(size).expect("set_len");
    let mut expect = vec![0u8; size as usize];
    for (off, data) in regions {
        f.write_all_at(data, *off).expect("write region");
        expect[*off as usize..*off as usize + data.len()].copy_from_slice(data);
    }
    expect
}

/// Whether the file system holding `path` reports holes (SEEK_HOLE before the end of a
/// sparse file that starts with a hole).
pub fn reports_holes(sparse_file: &Path) -> bool {
    use std::os::fd::AsRawFd;
    let f = File::open(sparse_file).expect("open");
    let size = f.metadata().expect("stat").len();
    // SAFETY: lseek on a descriptor we own; it has no memory effects.
    let first_data = unsafe { libc::lseek(f.as_raw_fd(), 0, libc::SEEK_DATA) };
    first_data > 0 || (first_data < 0 && size > 0)
}

/// Read a whole file.
pub fn read_file(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// Read `len` bytes at `offset` of a file or device.
pub fn read_at(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let f = File::open(path).unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, offset)
        .unwrap_or_else(|e| panic!("reading {} at {offset}: {e}", path.display()));
    buf
}

/// Assert that `actual` equals `expected` byte for byte; report the first difference.
pub fn assert_bytes_eq(actual: &[u8], expected: &[u8], what: &str) {
    if actual == expected {
        return;
    }
    let first = actual
        .iter()
        .zip(expected)
        .position(|(a, b)| a != b)
        .unwrap_or(actual.len().min(expected.len()));
    panic!(
        "{what}: differs from the expected content: {} bytes vs {} expected, first difference at offset {first}",
        actual.len(),
        expected.len()
    );
}

/// Assert that the file (or device prefix) at `path` holds exactly `expected`: same size (for
/// regular files) and same bytes.
pub fn assert_file_eq(path: &Path, expected: &[u8]) {
    let md = std::fs::metadata(path).unwrap_or_else(|e| panic!("stat {}: {e}", path.display()));
    if md.is_file() {
        assert_eq!(
            md.len(),
            expected.len() as u64,
            "{}: restored size differs from the source",
            path.display()
        );
    }
    let mut f = File::open(path).expect("open for compare");
    let mut buf = vec![0u8; MIB as usize];
    let mut off = 0usize;
    while off < expected.len() {
        let n = (expected.len() - off).min(buf.len());
        f.read_exact(&mut buf[..n])
            .unwrap_or_else(|e| panic!("{}: reading at {off}: {e}", path.display()));
        if buf[..n] != expected[off..off + n] {
            let i = buf[..n]
                .iter()
                .zip(&expected[off..off + n])
                .position(|(a, b)| a != b)
                .expect("some byte differs");
            panic!(
                "{}: byte at offset {} is {:#04x}, the source has {:#04x}",
                path.display(),
                off + i,
                buf[i],
                expected[off + i]
            );
        }
        off += n;
    }
}

/// Assert two files are identical (size and bytes).
pub fn assert_files_eq(actual: &Path, expected: &Path) {
    assert_file_eq(actual, &read_file(expected));
}

/// Number of slots of a disk.
pub fn slot_count(size: u64, slot: u64) -> u64 {
    size.div_ceil(slot)
}

/// Sorted indexes of the slots that `[off, off+len)` ranges touch.
pub fn touched_slots(ranges: &[(u64, u64)], slot: u64) -> Vec<u64> {
    let mut v: Vec<u64> = ranges
        .iter()
        .filter(|(_, len)| *len > 0)
        .flat_map(|&(off, len)| off / slot..=(off + len - 1) / slot)
        .collect();
    v.sort_unstable();
    v.dedup();
    v
}

/// How many bytes `ranges` (not overlapping) cover: the data a source's data ranges hold.
pub fn total_len(ranges: &[std::ops::Range<u64>]) -> u64 {
    ranges.iter().map(|r| r.end - r.start).sum()
}

/// Length of slot `i` of a disk of `size` bytes.
pub fn slot_len(i: u64, size: u64, slot: u64) -> u64 {
    (size - i * slot).min(slot)
}

// ---------------------------------------------------------------------------------------------
// Running the binary
// ---------------------------------------------------------------------------------------------

/// The outcome of one run of the binary.
#[derive(Debug)]
pub struct Run {
    /// What was run, for messages.
    pub what: String,
    /// Exit code (-1 when killed by a signal).
    pub code: i32,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl Run {
    /// Wait for a process started by [`Bv::spawn`] and collect what it printed.
    pub fn wait(child: std::process::Child, what: String) -> Run {
        Run::from_output(what, child.wait_with_output().expect("wait"))
    }

    /// What a finished process printed and how it ended.
    pub fn from_output(what: String, o: Output) -> Run {
        Run {
            what,
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }

    /// Assert the exit code, showing the output when it differs; also that nothing panicked.
    pub fn code(&self, expect: i32) -> &Self {
        assert_eq!(
            self.code, expect,
            "`{}` exited {} (expected {expect})\nstdout:\n{}\nstderr:\n{}",
            self.what, self.code, self.stdout, self.stderr
        );
        self.no_panic()
    }

    /// Assert success.
    pub fn ok(&self) -> &Self {
        self.code(0)
    }

    /// Assert a non-zero exit that is not a crash (1, 2 or 3) and no panic message.
    pub fn failed(&self) -> &Self {
        assert!(
            matches!(self.code, 1..=3),
            "`{}` should fail cleanly (exit 1-3) but exited {}\nstdout:\n{}\nstderr:\n{}",
            self.what,
            self.code,
            self.stdout,
            self.stderr
        );
        self.no_panic()
    }

    /// Assert nothing panicked.
    pub fn no_panic(&self) -> &Self {
        assert!(
            !self.stderr.contains("panicked") && !self.stdout.contains("panicked"),
            "`{}` panicked:\n{}",
            self.what,
            self.stderr
        );
        self
    }

    /// Assert stderr contains every one of `needles`.
    pub fn stderr_has(&self, needles: &[&str]) -> &Self {
        for n in needles {
            assert!(
                self.stderr.contains(n),
                "`{}`: stderr should mention {n:?}:\n{}",
                self.what,
                self.stderr
            );
        }
        self
    }

    /// Assert stdout contains every one of `needles`.
    pub fn stdout_has(&self, needles: &[&str]) -> &Self {
        for n in needles {
            assert!(
                self.stdout.contains(n),
                "`{}`: stdout should mention {n:?}:\n{}",
                self.what,
                self.stdout
            );
        }
        self
    }

    /// Stdout parsed as exactly one JSON document.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "`{}`: stdout is not one JSON document ({e}):\n{}\nstderr:\n{}",
                self.what, self.stdout, self.stderr
            )
        })
    }
}

/// The binary under test.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_blockvault")
}

/// A vault and a keystore in a fresh temp folder, and scratch space beside them.
pub struct Bv {
    /// Owns the folder.
    pub dir: tempfile::TempDir,
    /// The vault folder (created by `init`, which runs before the first backup if the test
    /// ran none: see [`Bv::run_cmd`]).
    pub vault: PathBuf,
    /// The keystore folder.
    pub keystore: PathBuf,
    /// Extra environment for every run.
    pub env: Vec<(String, String)>,
}

impl Default for Bv {
    fn default() -> Self {
        Self::new()
    }
}

impl Bv {
    /// A fresh temp folder with `vault/` and `keystore/` paths in it.
    pub fn new() -> Bv {
        let dir = tempfile::Builder::new()
            .prefix("bv-test-")
            .tempdir()
            .expect("tempdir");
        let vault = dir.path().join("vault");
        let keystore = dir.path().join("keystore");
        Bv {
            dir,
            vault,
            keystore,
            env: Vec::new(),
        }
    }

    /// A path in the scratch folder.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A command with the vault and keystore set and no inherited BLOCKVAULT_* variables.
    pub fn command(&self) -> Command {
        self.command_with_keystore(&self.keystore)
    }

    /// As [`Bv::command`] with another keystore folder.
    pub fn command_with_keystore(&self, keystore: &Path) -> Command {
        self.command_for(self.vault.as_os_str(), keystore)
    }

    /// As [`Bv::command`] with any `--vault` argument and keystore folder.
    pub fn command_for(&self, vault: &OsStr, keystore: &Path) -> Command {
        let mut c = Command::new(bin());
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("BLOCKVAULT_") {
                c.env_remove(k);
            }
        }
        c.env_remove("RUST_LOG");
        c.arg("--vault").arg(vault).arg("--keystore").arg(keystore);
        for (k, v) in &self.env {
            c.env(k, v);
        }
        c.stdin(Stdio::null());
        c
    }

    /// Run with `args` and wait.
    pub fn run<S: AsRef<OsStr>>(&self, args: &[S]) -> Run {
        self.run_cmd(self.command(), args)
    }

    /// Run a prepared command with `args` and wait.
    pub fn run_cmd<S: AsRef<OsStr>>(&self, mut c: Command, args: &[S]) -> Run {
        self.init_before_backup(args);
        c.args(args);
        let what = describe(args);
        let out = c
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", bin()));
        Run::from_output(what, out)
    }

    /// Start with `args` without waiting (stdout and stderr piped).
    pub fn spawn<S: AsRef<OsStr>>(&self, args: &[S]) -> (Child, String) {
        self.init_before_backup(args);
        let mut c = self.command();
        c.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
        let child = c
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin()));
        (child, describe(args))
    }

    /// Only `init` and `backup --init` create a vault. Before a `backup` without `--init`
    /// into this folder's vault while it has none, run `init` (a platform-key vault), as a
    /// user would; tests of another kind of vault run their own `init` first. A run that
    /// must meet no vault goes through [`Bv::command`] and `Command::output` instead.
    fn init_before_backup<S: AsRef<OsStr>>(&self, args: &[S]) {
        let has = |word: &str| args.iter().any(|a| a.as_ref() == word);
        // (An object-storage vault, `s3://…`, is created by its test's own `init`.)
        let local = !self.vault.to_string_lossy().contains("://");
        if has("backup") && !has("--init") && local && !self.vault.join("config").exists() {
            let init = self.command().arg("init").output().expect("run init");
            assert!(
                init.status.success(),
                "init before the first backup failed: {}",
                String::from_utf8_lossy(&init.stderr)
            );
        }
    }

    /// `--json` run that must succeed; its document.
    pub fn json<S: AsRef<OsStr>>(&self, args: &[S]) -> Value {
        let mut all: Vec<&OsStr> = vec![OsStr::new("--json")];
        all.extend(args.iter().map(|a| a.as_ref()));
        let r = self.run(&all);
        r.ok();
        r.json()
    }

    /// `backup SRC --disk DISK EXTRA... --json`, which must succeed; its document.
    pub fn backup(&self, src: &Path, disk: &str, extra: &[&str]) -> Value {
        let mut args: Vec<&OsStr> = vec![
            OsStr::new("backup"),
            src.as_os_str(),
            OsStr::new("--disk"),
            OsStr::new(disk),
        ];
        args.extend(extra.iter().map(OsStr::new));
        self.json(&args)
    }

    /// `restore SPEC TARGET EXTRA...` (not checked).
    pub fn restore(&self, spec: &str, target: &Path, extra: &[&str]) -> Run {
        let mut args: Vec<&OsStr> =
            vec![OsStr::new("restore"), OsStr::new(spec), target.as_os_str()];
        args.extend(extra.iter().map(OsStr::new));
        self.run(&args)
    }

    /// Restore `spec` to a new file in the scratch folder and assert it equals `expected`.
    pub fn restore_and_compare(&self, spec: &str, expected: &[u8]) {
        let target = self.path(&format!(
            "restored-{}-{}",
            spec.replace(['@', '/'], "_"),
            unique()
        ));
        self.restore(spec, &target, &[]).ok();
        assert_file_eq(&target, expected);
        std::fs::remove_file(&target).expect("remove restored file");
    }

    /// `verify [--read-data]`: the run, with the exit code checked by the caller.
    pub fn verify(&self, read_data: bool) -> Run {
        if read_data {
            self.run(&["--json", "verify", "--read-data"])
        } else {
            self.run(&["--json", "verify"])
        }
    }

    /// Both verify modes must pass; returns the read-data document.
    pub fn verify_ok(&self) -> Value {
        let r = self.verify(false);
        r.ok();
        assert_eq!(r.json()["ok"], true, "{}", r.stdout);
        let r = self.verify(true);
        r.ok();
        let doc = r.json();
        assert_eq!(doc["ok"], true, "{}", r.stdout);
        assert_eq!(doc["problems"].as_array().map(Vec::len), Some(0));
        doc
    }

    /// Snapshot documents of `snapshots --json`, oldest first.
    pub fn snapshots(&self) -> Vec<Value> {
        let doc = self.json(&["snapshots"]);
        doc["snapshots"]
            .as_array()
            .expect("snapshots array")
            .to_vec()
    }

    // ----- vault objects ---------------------------------------------------------------------

    /// Every object file under `vault/<prefix>` (hidden temp files excluded), sorted.
    pub fn objects(&self, prefix: &str) -> Vec<PathBuf> {
        let mut out = Vec::new();
        walk(&self.vault.join(prefix), &mut out);
        out.sort();
        out
    }

    /// The object key of a vault file path.
    pub fn key_of(&self, p: &Path) -> String {
        p.strip_prefix(&self.vault)
            .expect("inside the vault")
            .to_string_lossy()
            .into_owned()
    }

    /// The keystore's key file (exactly one is expected).
    pub fn key_file(&self) -> PathBuf {
        let files: Vec<PathBuf> = std::fs::read_dir(&self.keystore)
            .expect("keystore folder")
            .map(|e| e.expect("entry").path())
            .filter(|p| p.extension().is_some_and(|x| x == "keys"))
            .collect();
        assert_eq!(files.len(), 1, "one key file expected: {files:?}");
        files.into_iter().next().expect("one")
    }
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd {
        let e = e.expect("dir entry");
        if e.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        let p = e.path();
        if e.file_type().expect("file type").is_dir() {
            walk(&p, out);
        } else {
            out.push(p);
        }
    }
}

fn describe<S: AsRef<OsStr>>(args: &[S]) -> String {
    let mut s = String::from("blockvault");
    for a in args {
        s.push(' ');
        s.push_str(&a.as_ref().to_string_lossy());
    }
    s
}

/// A number unique within this process.
pub fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// A u64 field of a JSON document.
pub fn num(doc: &Value, field: &str) -> u64 {
    doc[field]
        .as_u64()
        .unwrap_or_else(|| panic!("field {field} should be an unsigned number in {doc}"))
}

/// A string field of a JSON document.
pub fn text(doc: &Value, field: &str) -> String {
    doc[field]
        .as_str()
        .unwrap_or_else(|| panic!("field {field} should be a string in {doc}"))
        .to_string()
}

/// Flip one bit of the byte at `offset` of `path`.
pub fn flip_byte(path: &Path, offset: u64) {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("open to flip");
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, offset).expect("read byte");
    b[0] ^= 0x10;
    f.write_all_at(&b, offset).expect("write byte");
}

/// Whether the current test runs under CI (`CI=true`), where a missing tool is a failure.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// Outside CI: print a loud SKIP line and return false. Under CI: fail the test.
pub fn skip(test: &str, why: &str) -> bool {
    if in_ci() {
        panic!("{test}: {why} (CI=true: a missing tool is a failure)");
    }
    // Straight to the process's stderr: the test harness captures `eprintln!` of passing
    // tests, and a skip must be seen.
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIP {test}: {why}");
    false
}

/// Whether we are root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

// ---------------------------------------------------------------------------------------------
// Loop devices
// ---------------------------------------------------------------------------------------------

/// A loop device over a file, detached when dropped (also during a panic's unwinding).
pub struct LoopDev {
    /// `/dev/loopN`.
    pub path: PathBuf,
}

/// Serialises `losetup -f` within one test binary (tests run on several threads).
static LOSETUP: Mutex<()> = Mutex::new(());

impl LoopDev {
    /// Attach `file` to a free loop device. `None` (after a SKIP line) when not root or there
    /// is no losetup or loop support; under CI=true that is a test failure instead.
    pub fn attach(file: &Path, test: &str) -> Option<LoopDev> {
        if !is_root() {
            skip(test, "needs root to set up a loop device");
            return None;
        }
        let out = {
            let _g = LOSETUP.lock().unwrap_or_else(|e| e.into_inner());
            Command::new("losetup")
                .args(["-f", "--show"])
                .arg(file)
                .output()
        };
        let out = match out {
            Ok(o) => o,
            Err(e) => {
                skip(
                    test,
                    &format!("cannot run losetup (apt-get install util-linux): {e}"),
                );
                return None;
            }
        };
        if !out.status.success() {
            skip(
                test,
                &format!(
                    "losetup -f --show {} failed: {}",
                    file.display(),
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            );
            return None;
        }
        let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        assert!(
            path.to_string_lossy().starts_with("/dev/loop"),
            "losetup printed {path:?}"
        );
        Some(LoopDev { path })
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        let ok = Command::new("losetup")
            .arg("-d")
            .arg(&self.path)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!("warning: could not detach {}", self.path.display());
        }
    }
}
