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

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::qemu::{qemu_io, QEMU_NBD};
use common::tools::{run_tool, tools};
use common::*;

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

    /// qemu-nbd, read-only, without `--persistent`: it exits when its one client leaves.
    fn qemu_nbd_once(sock: &Path, image: &Path, fmt: &str, args: &[&str]) -> Server {
        let mut c = Command::new("qemu-nbd");
        c.args(["-r", "-f", fmt, "-k", s(sock)])
            .args(args)
            .arg(image);
        Server::on_socket(c, sock)
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

/// The content `qemu-img convert` reads from an image.
fn converted(dir: &Path, img: &Path, fmt: &str) -> Vec<u8> {
    let out = dir.join(format!("expect-{}.raw", unique()));
    run(
        "qemu-img",
        &["convert", "-f", fmt, "-O", "raw", s(img), s(&out)],
    );
    read_file(&out)
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
/// with zeros); a wrong export name is a clear NotFound naming it.
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
        .stderr_has(&[&wrong, "no export \"odd\""]);
    assert_eq!(bv.snapshots().len(), 1);
}
