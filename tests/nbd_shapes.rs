//! The NBD source against servers and exports tests/nbd.rs does not see: qemu-nbd without
//! `--persistent` (one connection, then it exits), odd export sizes, named exports, two
//! bitmaps of different granularities over a backing chain; nbdkit (Debian `nbdkit`), another
//! server implementation, with its `data`, `memory`, `file` and `sparse-random` plugins and the
//! `truncate`, `error` and `delay` filters and `--no-sr`; servers killed with SIGKILL in the
//! middle of a backup; and a hand-written hostile server for the block-status replies no real
//! server sends. Each backup is restored and compared with the export's content.
//!
//! Without qemu-nbd or nbdkit the tests print SKIP (under CI=true they fail).

mod common;

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::qemu::{converted, qemu_io, QEMU_NBD};
use common::tools::{run_tool, tools};
use common::*;

use blockvault::source::{Access, NbdOptions, NbdSource, Source};

/// nbdkit, for [`tools`]: its plugins and filters come in the same package.
const NBDKIT: &[(&str, &str)] = &[("nbdkit", "nbdkit")];

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn run(tool: &str, args: &[&str]) {
    run_tool(Command::new(tool).args(args), "");
}

/// A vault, or `None` after a SKIP line when a tool is missing.
fn vault(test: &str, needed: &[(&str, &str)]) -> Option<Bv> {
    tools(test, needed).then(Bv::new)
}

/// An NBD server running in the foreground as our child; killed (SIGKILL) and reaped when
/// dropped.
struct Server {
    child: Child,
    url: String,
}

/// When a server just started is ready.
enum Ready<'a> {
    /// Its Unix socket exists. Nothing connects to find out: a qemu-nbd without
    /// `--persistent` serves one client only.
    Socket(&'a Path),
    /// It accepts TCP connections on this port of 127.0.0.1.
    Port(u16),
}

impl Server {
    /// Start `cmd`, its stderr in `log`, and wait until it is `ready` (at most 10 s).
    fn start(mut cmd: Command, log: &Path, ready: Ready, url: String) -> Server {
        let err = std::fs::File::create(log).expect("server log");
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        let deadline = Instant::now() + Duration::from_secs(10);
        let is_ready = || match ready {
            Ready::Socket(p) => p.exists(),
            Ready::Port(port) => std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(),
        };
        while !is_ready() {
            let exited = child.try_wait().expect("server status");
            assert!(
                exited.is_none() && Instant::now() < deadline,
                "{cmd:?} did not start ({exited:?}): {}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        Server { child, url }
    }

    /// On a Unix socket: `nbd+unix:///?socket=SOCK`.
    fn on_socket(cmd: Command, sock: &Path) -> Server {
        let url = format!("nbd+unix:///?socket={}", s(sock));
        Server::start(cmd, &sock.with_extension("log"), Ready::Socket(sock), url)
    }

    /// nbdkit with `args` (filters, plugin, its parameters) on `sock`.
    fn nbdkit(sock: &Path, args: &[&str]) -> Server {
        let mut c = Command::new("nbdkit");
        c.args(["-f", "--exit-with-parent", "-U", s(sock)])
            .args(args);
        Server::on_socket(c, sock)
    }

    /// qemu-nbd, read-only, without `--persistent`: it exits when its one client leaves.
    fn qemu_nbd_once(sock: &Path, image: &Path, fmt: &str, args: &[&str]) -> Server {
        let mut c = Command::new("qemu-nbd");
        c.args(["-r", "-f", fmt, "-k", s(sock)])
            .args(args)
            .arg(image);
        Server::on_socket(c, sock)
    }

    fn signal(&self, signal: &str) {
        run("kill", &[signal, &self.child.id().to_string()]);
    }

    /// Bytes the server has read from files so far (`rchar` of /proc/PID/io).
    fn bytes_read(&self) -> u64 {
        let io =
            std::fs::read_to_string(format!("/proc/{}/io", self.child.id())).unwrap_or_default();
        io.lines()
            .find_map(|l| l.strip_prefix("rchar: "))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0)
    }

    /// SIGKILL, and wait until it is gone.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The size the export has: `inspect --json`'s.
fn export_size(bv: &Bv, url: &str) -> u64 {
    num(&bv.json(&["inspect", url]), "size")
}

/// `backup URL --disk DISK EXTRA...`, which must succeed; its document.
fn backup(bv: &Bv, url: &str, disk: &str, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["backup", url, "--disk", disk];
    args.extend(extra);
    bv.json(&args)
}

// ---------------------------------------------------------------------------------------------
// qemu-nbd
// ---------------------------------------------------------------------------------------------

/// qemu-nbd's default mode serves one connection and exits when the client leaves. A bitmap
/// backup read the bitmap over a second connection, which found no server ("connection reset
/// while we awaited the greeting"): every listed bitmap is now selected at the handshake.
/// Two bitmaps (512 B and 2 MiB granules) of a qcow2 overlay on a backing file.
#[test]
fn bitmap_backups_through_a_qemu_nbd_that_serves_one_connection() {
    let Some(bv) = vault(
        "bitmap_backups_through_a_qemu_nbd_that_serves_one_connection",
        QEMU_NBD,
    ) else {
        return;
    };
    let dir = bv.dir.path();
    let base = dir.join("base.qcow2");
    let top = dir.join("top.qcow2");
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", s(&base), "24M"],
    );
    qemu_io(
        "qcow2",
        s(&base),
        &["write -P 0x11 0 6M", "write -P 0x12 20M 1M"],
    );
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
        ],
    );
    qemu_io("qcow2", s(&top), &["write -P 0x21 1M 1M", "write -z 3M 1M"]);
    for (name, granularity) in [("fine", "512"), ("coarse", "2M")] {
        run(
            "qemu-img",
            &["bitmap", "--add", "-g", granularity, s(&top), name],
        );
    }
    bv.backup(&top, "d", &[]);
    let writes = [
        "write -P 0x31 1000 10",
        "write -P 0x32 9M 3000",
        "write -z 20M 4k",
    ];
    qemu_io("qcow2", s(&top), &writes);
    let sock = dir.join("once.sock");
    for (i, bitmap) in ["fine", "coarse"].into_iter().enumerate() {
        let server = Server::qemu_nbd_once(&sock, &top, "qcow2", &["-B", "fine", "-B", "coarse"]);
        let doc = backup(
            &bv,
            &server.url,
            "d",
            &["--bitmap", bitmap, "--verify-unchanged", "0"],
        );
        assert_eq!(doc["change_source"], "bitmap", "{doc}");
        // Three writes: a few KiB (reads are whole 4 KiB blocks); then four 2 MiB granules.
        let read = num(&doc, "bytes_read");
        let bound = [16 * KIB, 8 * MIB][i];
        assert!(read > 0 && read <= bound, "{bitmap}: read {read}: {doc}");
        bv.restore_and_compare("d", &converted(dir, &top, "qcow2"));
        drop(server);
        std::fs::remove_file(&sock).ok();
        qemu_io("qcow2", s(&top), &[format!("write -P 0x4{i} 15M 512")]);
    }
    bv.verify_ok();
}

/// A raw file of odd size exported under a name, over TCP, with `--shared`,
/// `--allocation-depth` and `-r`: the export is the file (qemu-nbd pads it to whole sectors
/// with zeros); a wrong export name is a clear NotFound naming it and the names offered.
#[test]
fn odd_sized_named_export_over_tcp() {
    let Some(bv) = vault("odd_sized_named_export_over_tcp", QEMU_NBD) else {
        return;
    };
    let file = bv.path("odd.raw");
    let data = mixed_data(5, 3_000_001);
    write_file(&file, &data);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let mut c = Command::new("qemu-nbd");
    c.args(["-t", "--shared=2", "--allocation-depth", "-r", "-f", "raw"])
        .args(["-x", "odd disk", "-b", "127.0.0.1", "-p", &port.to_string()])
        .arg(&file);
    let url = format!("nbd://127.0.0.1:{port}/odd%20disk");
    let _server = Server::start(c, &bv.path("qemu-nbd.log"), Ready::Port(port), url.clone());
    let size = export_size(&bv, &url);
    assert!(
        size >= data.len() as u64 && size < data.len() as u64 + 512,
        "{size}"
    );
    let mut expect = data.clone();
    expect.resize(size as usize, 0);
    backup(&bv, &url, "odd", &[]);
    bv.restore_and_compare("odd", &expect);
    let wrong = format!("nbd://127.0.0.1:{port}/odd");
    bv.run(&["backup", &wrong, "--disk", "odd"])
        .failed()
        .no_panic()
        .stderr_has(&[&wrong, "no export \"odd\"", "it offers: \"odd disk\""]);
    assert_eq!(bv.snapshots().len(), 1);
}

// ---------------------------------------------------------------------------------------------
// nbdkit
// ---------------------------------------------------------------------------------------------

/// What nbdkit's `data` plugin makes of `DATA_EXPR`, built by hand.
const DATA_EXPR: &str =
    "(0x55 0xAA)*1000 @1048576 \"hello\" @^4096 (1 2 3)*33333 @3145728 (0xff)*5000";
const DATA_SIZE: usize = 5_000_001;

fn data_expected() -> Vec<u8> {
    let mut v = vec![0u8; DATA_SIZE];
    for (i, b) in v[..2000].iter_mut().enumerate() {
        *b = [0x55, 0xaa][i % 2];
    }
    v[1_048_576..1_048_581].copy_from_slice(b"hello");
    // "@^4096" aligns the position up to 4096.
    let at = 1_048_581usize.div_ceil(4096) * 4096;
    for (i, b) in v[at..at + 99_999].iter_mut().enumerate() {
        *b = [1, 2, 3][i % 3];
    }
    v[3_145_728..3_145_728 + 5000].fill(0xff);
    v
}

/// Back up `url` as `disk`, restore it and compare with `expect`; `inspect` sees its size and
/// at most all of it allocated. Returns the backup's document.
fn round_trip(bv: &Bv, url: &str, disk: &str, expect: &[u8]) -> serde_json::Value {
    let inspect = bv.json(&["inspect", url]);
    assert_eq!(inspect["format"], "nbd", "{inspect}");
    assert_eq!(num(&inspect, "size"), expect.len() as u64, "{inspect}");
    assert!(num(&inspect, "allocated_bytes") <= expect.len() as u64);
    let doc = backup(bv, url, disk, &[]);
    bv.restore_and_compare(disk, expect);
    doc
}

/// nbdkit's plugins: a `data` pattern of odd size, `memory` written through NBD by qemu-io, a
/// `file` cut to an odd size by the `truncate` filter, and `sparse-random` with holes that
/// block status reports (backed up without reading them).
#[test]
fn nbdkit_plugins_back_up_and_restore_exactly() {
    let Some(bv) = vault(
        "nbdkit_plugins_back_up_and_restore_exactly",
        &[NBDKIT, QEMU_NBD].concat(),
    ) else {
        return;
    };
    let sock = |n: &str| bv.path(&format!("{n}.sock"));
    let size = format!("size={DATA_SIZE}");
    let data = Server::nbdkit(&sock("data"), &["data", DATA_EXPR, &size]);
    round_trip(&bv, &data.url, "data", &data_expected());

    let memory = Server::nbdkit(&sock("memory"), &["memory", "8M"]);
    qemu_io(
        "raw",
        &memory.url,
        &["write -P 0x61 1M 64k", "write -P 0x62 7340033 1000"],
    );
    let mut expect = vec![0u8; 8 * MIB as usize];
    expect[MIB as usize..(MIB + 64 * KIB) as usize].fill(0x61);
    expect[7_340_033..7_341_033].fill(0x62);
    round_trip(&bv, &memory.url, "memory", &expect);

    let file = bv.path("file.raw");
    let content = mixed_data(9, 6 * MIB as usize);
    write_file(&file, &content);
    let path = format!("file={}", s(&file));
    let cut = Server::nbdkit(
        &sock("file"),
        &["--filter=truncate", "file", &path, "truncate=5000001"],
    );
    round_trip(&bv, &cut.url, "file", &content[..5_000_001]);

    let sparse = Server::nbdkit(
        &sock("sparse"),
        &[
            "sparse-random",
            "32M",
            "seed=5",
            "percent=25",
            "runlength=1048576",
        ],
    );
    let expect = {
        let out = bv.path("sparse.raw");
        run(
            "qemu-img",
            &["convert", "-f", "raw", "-O", "raw", &sparse.url, s(&out)],
        );
        read_file(&out)
    };
    let allocated = num(&bv.json(&["inspect", &sparse.url]), "allocated_bytes");
    assert!(allocated > 0 && allocated < 16 * MIB, "{allocated}");
    let doc = round_trip(&bv, &sparse.url, "sparse", &expect);
    assert!(num(&doc, "bytes_read") < 16 * MIB, "{doc}");
    bv.verify_ok();
}

/// `--no-sr`: nbdkit refuses structured replies, so no block status either. The backup reads
/// everything with simple replies; a bitmap backup is refused saying why.
#[test]
fn nbdkit_without_structured_replies_reads_with_simple_replies() {
    let Some(bv) = vault(
        "nbdkit_without_structured_replies_reads_with_simple_replies",
        NBDKIT,
    ) else {
        return;
    };
    let file = bv.path("disk.raw");
    let content = mixed_data(11, 12 * MIB as usize);
    write_file(&file, &content);
    let path = format!("file={}", s(&file));
    let server = Server::nbdkit(&bv.path("nosr.sock"), &["--no-sr", "file", &path]);
    let inspect = bv.json(&["inspect", &server.url]);
    assert_eq!(num(&inspect, "allocated_bytes"), 12 * MIB, "{inspect}");
    let doc = backup(&bv, &server.url, "d", &[]);
    assert_eq!(num(&doc, "bytes_read"), 12 * MIB, "{doc}");
    bv.restore_and_compare("d", &content);
    bv.run(&["backup", &server.url, "--disk", "d", "--bitmap", "b"])
        .code(2)
        .stderr_has(&["refused structured replies"]);
    assert_eq!(bv.snapshots().len(), 1);
}

/// nbdkit's `error` filter fails reads, then block status, while a trigger file exists: the
/// backup fails naming the export, the error and the offset; the vault keeps only the complete
/// snapshot, which still restores, and verify passes.
#[test]
fn injected_server_errors_fail_the_backup_and_keep_the_vault_whole() {
    let Some(bv) = vault(
        "injected_server_errors_fail_the_backup_and_keep_the_vault_whole",
        NBDKIT,
    ) else {
        return;
    };
    let file = bv.path("disk.raw");
    let first = mixed_data(12, 8 * MIB as usize);
    write_file(&file, &first);
    let (reads, extents) = (bv.path("fail-reads"), bv.path("fail-extents"));
    let args = [
        "--filter=error".to_string(),
        "file".into(),
        format!("file={}", s(&file)),
        "error=EIO".into(),
        "error-pread-rate=1".into(),
        format!("error-pread-file={}", s(&reads)),
        "error-extents-rate=1".into(),
        format!("error-extents-file={}", s(&extents)),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let server = Server::nbdkit(&bv.path("error.sock"), &args);
    backup(&bv, &server.url, "d", &[]);
    write_at(&file, 3 * MIB, &random_data(13, MIB as usize));
    for (trigger, what) in [
        (&reads, "the read at offset"),
        (&extents, "the block status at offset"),
    ] {
        write_file(trigger, b"");
        bv.run(&["backup", &server.url, "--disk", "d"])
            .failed()
            .stderr_has(&[&server.url, "server failed", what, "NBD_EIO"]);
        std::fs::remove_file(trigger).expect("remove trigger");
    }
    assert_eq!(bv.snapshots().len(), 1);
    bv.verify_ok();
    bv.restore_and_compare("d", &first);
}

/// nbdkit's `delay` filter: a server slower than the timeout fails the open, the block status
/// or the read within about the timeout, with an error that says so.
#[test]
fn a_server_slower_than_the_timeout_fails_in_time() {
    if !tools("a_server_slower_than_the_timeout_fails_in_time", NBDKIT) {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("disk.raw");
    write_file(&file, &random_data(14, MIB as usize));
    let path = format!("file={}", s(&file));
    let opts = NbdOptions {
        timeout: Duration::from_secs(1),
        bitmap: None,
    };
    let within = |t: Instant| {
        let took = t.elapsed();
        assert!(took < Duration::from_secs(4), "took {took:?}");
    };
    let slow = |n: &str, delay: &str| {
        Server::nbdkit(
            &dir.path().join(format!("{n}.sock")),
            &["--filter=delay", "file", &path, delay],
        )
    };

    let open = slow("open", "delay-open=20");
    let t = Instant::now();
    let e = NbdSource::open(&open.url, &opts)
        .err()
        .expect("open too slow");
    within(t);
    assert!(e.to_string().contains("timed out"), "{e}");

    let status = slow("status", "delay-extents=20");
    let src = NbdSource::open(&status.url, &opts).expect("open");
    let t = Instant::now();
    let e = src.data_ranges().unwrap_err();
    within(t);
    assert!(
        e.to_string()
            .contains("no reply within 1 s to the block status"),
        "{e}"
    );

    let read = slow("read", "delay-read=20");
    let src = NbdSource::open(&read.url, &opts).expect("open");
    let Access::Translated(r) = src.access() else {
        panic!("an NBD source reads through ReadAt");
    };
    let t = Instant::now();
    let e = r.read_at(0, &mut [0u8; 4096]).unwrap_err();
    within(t);
    assert!(
        e.to_string()
            .contains("no reply within 1 s to the read at offset 0"),
        "{e}"
    );

    // The same timeout from the command line, and nothing stored.
    let bv = Bv::new();
    let t = Instant::now();
    bv.run(&["backup", &read.url, "--disk", "d", "--nbd-timeout", "1"])
        .failed()
        .stderr_has(&["no reply within 1 s"]);
    within(t);
    assert!(bv.snapshots().is_empty());
}

// ---------------------------------------------------------------------------------------------
// Servers killed mid-backup
// ---------------------------------------------------------------------------------------------

/// Start a backup of `server`, stop the server (SIGSTOP) once it has read `past` more bytes of
/// its file, then SIGKILL it: the backup fails soon after, saying the connection was lost.
fn kill_mid_backup(bv: &Bv, server: &mut Server, disk: &str, past: u64) {
    let start = server.bytes_read();
    let (child, what) = bv.spawn(&["backup", &server.url, "--disk", disk]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.bytes_read() < start + past {
        assert!(Instant::now() < deadline, "{what}: the server read nothing");
        std::thread::sleep(Duration::from_millis(1));
    }
    server.signal("-STOP");
    let killed = Instant::now();
    server.kill();
    let out = child.wait_with_output().expect("backup");
    let took = killed.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{what}: {stderr}");
    assert!(!stderr.contains("panicked"), "{what}: {stderr}");
    assert!(stderr.contains("connection lost"), "{what}: {stderr}");
    assert!(
        took < Duration::from_secs(5),
        "{what}: failed {took:?} after the kill"
    );
}

/// qemu-nbd and nbdkit killed with SIGKILL in the middle of a backup: a clear error at once,
/// no partial snapshot, the earlier snapshots restore and verify passes.
#[test]
fn servers_killed_mid_backup_leave_the_vault_whole() {
    let Some(bv) = vault(
        "servers_killed_mid_backup_leave_the_vault_whole",
        &[NBDKIT, QEMU_NBD].concat(),
    ) else {
        return;
    };
    let file = bv.path("disk.raw");
    let first = random_data(15, 48 * MIB as usize);
    write_file(&file, &first);
    bv.backup(&file, "d", &[]);
    write_at(&file, 5 * MIB, &random_data(16, MIB as usize));

    let sock = bv.path("q.sock");
    let mut qemu = Server::qemu_nbd_once(&sock, &file, "raw", &[]);
    kill_mid_backup(&bv, &mut qemu, "d", 4 * MIB);

    let path = format!("file={}", s(&file));
    let mut nbdkit = Server::nbdkit(
        &bv.path("k.sock"),
        &["--filter=delay", "file", &path, "delay-read=50ms"],
    );
    kill_mid_backup(&bv, &mut nbdkit, "d", 2 * MIB);

    assert_eq!(bv.snapshots().len(), 1);
    bv.verify_ok();
    bv.restore_and_compare("d", &first);
}

// ---------------------------------------------------------------------------------------------
// A hostile server
// ---------------------------------------------------------------------------------------------

/// How the hostile server answers block status.
#[derive(Clone, Copy)]
enum Status {
    /// Truthfully, in 512-byte extents (data and zeros in turn), the last one running 1 MiB
    /// past the request and the export: many extents in one chunk.
    Many,
    /// With an extent of length 0.
    ZeroLength,
    /// Under a cookie no request carries.
    WrongCookie,
    /// With extents for a context that was never negotiated, and none for ours.
    OtherContext,
    /// Never.
    Silent,
}

/// The hostile server's export: 512-byte blocks of data and of zeros in turn.
const HOSTILE_SIZE: u64 = 16 * MIB;

fn hostile_content() -> Vec<u8> {
    let mut v = vec![0u8; HOSTILE_SIZE as usize];
    for (i, block) in v.chunks_mut(512).enumerate().step_by(2) {
        block.fill((i % 251) as u8 + 1);
    }
    v
}

/// A hand-written NBD server on a Unix socket, for the replies no real server can be made to
/// send: fixed newstyle, structured replies, `base:allocation` as context 1; each read
/// answered by two data chunks, the second half first; block status as `status` says. Each
/// connection is served by a thread of its own. Returns the URL.
fn hostile(sock: &Path, status: Status) -> String {
    let listener = UnixListener::bind(sock).expect("bind the hostile server");
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            // A client that hangs up ends its connection's thread: nothing to report.
            std::thread::spawn(move || serve(conn, status));
        }
    });
    format!("nbd+unix:///?socket={}", s(sock))
}

fn be(b: &[u8]) -> u64 {
    b.iter().fold(0, |a, &x| a << 8 | u64::from(x))
}

fn option_reply(c: &mut UnixStream, option: u32, reply: u32, data: &[u8]) -> std::io::Result<()> {
    let mut b = 0x0003_e889_0455_65a9u64.to_be_bytes().to_vec();
    b.extend(option.to_be_bytes());
    b.extend(reply.to_be_bytes());
    b.extend((data.len() as u32).to_be_bytes());
    b.extend(data);
    c.write_all(&b)
}

fn chunk(
    c: &mut UnixStream,
    cookie: u64,
    done: bool,
    kind: u16,
    payload: &[u8],
) -> std::io::Result<()> {
    let mut b = 0x668e_33efu32.to_be_bytes().to_vec();
    b.extend(u16::from(done).to_be_bytes());
    b.extend(kind.to_be_bytes());
    b.extend(cookie.to_be_bytes());
    b.extend((payload.len() as u32).to_be_bytes());
    b.extend(payload);
    c.write_all(&b)
}

fn serve(mut c: UnixStream, status: Status) -> std::io::Result<()> {
    // Greeting with FIXED_NEWSTYLE | NO_ZEROES; the client's flags.
    c.write_all(b"NBDMAGICIHAVEOPT\x00\x03")?;
    c.read_exact(&mut [0u8; 4])?;
    const ACK: u32 = 1;
    loop {
        let mut h = [0u8; 16];
        c.read_exact(&mut h)?;
        let option = be(&h[8..12]) as u32;
        c.read_exact(&mut vec![0u8; be(&h[12..16]) as usize])?;
        match option {
            // STRUCTURED_REPLY; LIST_META_CONTEXT (no bitmaps).
            8 | 9 => option_reply(&mut c, option, ACK, &[])?,
            // SET_META_CONTEXT: base:allocation, whatever was asked.
            10 => {
                let context = [1u32.to_be_bytes().as_slice(), b"base:allocation"].concat();
                option_reply(&mut c, option, 4, &context)?;
                option_reply(&mut c, option, ACK, &[])?;
            }
            // GO: INFO_EXPORT (size, HAS_FLAGS | READ_ONLY), then transmission.
            7 => {
                let info = [
                    0u16.to_be_bytes().as_slice(),
                    &HOSTILE_SIZE.to_be_bytes(),
                    &3u16.to_be_bytes(),
                ]
                .concat();
                option_reply(&mut c, option, 3, &info)?;
                option_reply(&mut c, option, ACK, &[])?;
                break;
            }
            _ => option_reply(&mut c, option, 0x8000_0001, &[])?,
        }
    }
    let content = hostile_content();
    loop {
        let mut r = [0u8; 28];
        c.read_exact(&mut r)?;
        let (command, cookie, offset, len) =
            (be(&r[6..8]), be(&r[8..16]), be(&r[16..24]), be(&r[24..28]));
        match command {
            // READ: OFFSET_DATA chunks, the second half before the first.
            0 => {
                let data = |from: u64, to: u64| {
                    let (a, b) = ((offset + from) as usize, (offset + to) as usize);
                    [(offset + from).to_be_bytes().as_slice(), &content[a..b]].concat()
                };
                let mid = len / 2;
                if mid > 0 {
                    chunk(&mut c, cookie, false, 1, &data(mid, len))?;
                    chunk(&mut c, cookie, true, 1, &data(0, mid))?;
                } else {
                    chunk(&mut c, cookie, true, 1, &data(0, len))?;
                }
            }
            // BLOCK_STATUS.
            7 => {
                let mut extents: Vec<(u32, u32)> = match status {
                    Status::Many => (offset..offset + len)
                        .step_by(512)
                        .map(|at| (512, if at / 512 % 2 == 0 { 0 } else { 3 }))
                        .collect(),
                    Status::ZeroLength => vec![(4096, 0), (0, 0)],
                    _ => vec![(len as u32, 0)],
                };
                if let Some(last) = extents
                    .last_mut()
                    .filter(|_| matches!(status, Status::Many))
                {
                    last.0 += 1 << 20;
                }
                let (cookie, context) = match status {
                    Status::Silent => continue,
                    Status::WrongCookie => (cookie + 1000, 1u32),
                    Status::OtherContext => (cookie, 7),
                    _ => (cookie, 1),
                };
                let mut payload = context.to_be_bytes().to_vec();
                for (len, flags) in extents {
                    payload.extend(len.to_be_bytes());
                    payload.extend(flags.to_be_bytes());
                }
                chunk(&mut c, cookie, true, 5, &payload)?;
            }
            // DISC, or anything else: hang up.
            _ => return Ok(()),
        }
    }
}

/// Block status in 32 Ki extents of 512 bytes, the last past the export, and reads answered
/// out of order: backed up exactly, the zero extents skipped.
#[test]
fn many_extents_and_reads_answered_out_of_order() {
    let bv = Bv::new();
    let url = hostile(&bv.path("many.sock"), Status::Many);
    let inspect = bv.json(&["inspect", &url]);
    assert_eq!(
        num(&inspect, "allocated_bytes"),
        HOSTILE_SIZE / 2,
        "{inspect}"
    );
    assert_eq!(
        num(&inspect, "data_ranges"),
        HOSTILE_SIZE / 1024,
        "{inspect}"
    );
    backup(&bv, &url, "d", &[]);
    bv.restore_and_compare("d", &hostile_content());
}

/// Block-status replies that break the protocol: a clear Integrity error naming the export,
/// no panic, no snapshot; a server that never answers fails within the timeout.
#[test]
fn malformed_block_status_is_a_clear_error() {
    let bv = Bv::new();
    for (i, (status, says)) in [
        (Status::ZeroLength, "extent 1 of context 1 has length 0"),
        (Status::WrongCookie, "matches no request in flight"),
        (Status::OtherContext, "without extents for context 1"),
    ]
    .into_iter()
    .enumerate()
    {
        let url = hostile(&bv.path(&format!("bad{i}.sock")), status);
        let inspect = ["inspect", url.as_str()];
        let backup = ["backup", url.as_str(), "--disk", "d"];
        for args in [&inspect[..], &backup[..]] {
            bv.run(args)
                .code(3)
                .stderr_has(&[&url, "malformed reply", says]);
        }
    }
    assert!(bv.snapshots().is_empty());

    let url = hostile(&bv.path("silent.sock"), Status::Silent);
    let opts = NbdOptions {
        timeout: Duration::from_secs(1),
        bitmap: None,
    };
    let src = NbdSource::open(&url, &opts).expect("open");
    let t = Instant::now();
    let e = src.data_ranges().unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());
    assert!(
        e.to_string()
            .contains("no reply within 1 s to the block status"),
        "{e}"
    );
}

/// A server that serves only over TLS (nbdkit with a PSK): refused at once as Unsupported,
/// saying TLS is required, not that structured replies were refused.
#[test]
fn a_tls_only_server_is_refused_saying_so() {
    let Some(bv) = vault("a_tls_only_server_is_refused_saying_so", NBDKIT) else {
        return;
    };
    let psk = bv.path("psk.keys");
    write_file(&psk, format!("alice:{}\n", "ab".repeat(16)).as_bytes());
    let file = bv.path("disk.raw");
    write_file(&file, &random_data(17, 64 * KIB as usize));
    let server = Server::nbdkit(
        &bv.path("tls.sock"),
        &[
            "--tls=require",
            &format!("--tls-psk={}", s(&psk)),
            "file",
            &format!("file={}", s(&file)),
        ],
    );
    let r = bv.run(&["inspect", &server.url]);
    r.code(1)
        .stderr_has(&[&server.url, "requires TLS, which is not supported"]);
    assert!(!r.stderr.contains("structured replies"), "{}", r.stderr);
}

/// nbdkit's `blocksize-policy` filter with a 64 KiB minimum block size, refusing unaligned
/// requests: reads are widened to it, and the disk's MBR is still scanned with 512-byte
/// sectors (a 64 KiB "sector size" made the scan refuse the disk).
#[test]
fn a_64k_minimum_block_size_is_an_io_granule_not_a_sector() {
    let Some(bv) = vault(
        "a_64k_minimum_block_size_is_an_io_granule_not_a_sector",
        &[NBDKIT, &[("sfdisk", "fdisk")]].concat(),
    ) else {
        return;
    };
    let file = bv.path("mbr.raw");
    let mut content = mixed_data(18, 8 * MIB as usize);
    content[..MIB as usize].fill(0);
    write_file(&file, &content);
    run_tool(
        Command::new("sfdisk").args(["-q", s(&file)]),
        "label: dos\n,2M\n,\n",
    );
    let content = read_file(&file);
    let path = format!("file={}", s(&file));
    let server = Server::nbdkit(
        &bv.path("granule.sock"),
        &[
            "--filter=blocksize-policy",
            "file",
            &path,
            "blocksize-minimum=65536",
            "blocksize-preferred=65536",
            "blocksize-error-policy=error",
        ],
    );
    let inspect = bv.json(&["inspect", &server.url]);
    assert_eq!(num(&inspect, "sector_size"), 512, "{inspect}");
    let table = &inspect["layout"]["table"];
    assert_eq!(table["scheme"], "mbr", "{inspect}");
    assert_eq!(table["partitions"][1]["first_byte"], 3 * MIB, "{inspect}");
    round_trip(&bv, &server.url, "d", &content);
}
