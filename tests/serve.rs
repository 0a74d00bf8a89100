//! `serve`: snapshots as NBD exports, checked with the real NBD tools (qemu-img, qemu-io,
//! nbdinfo, nbdcopy) and with a hand-rolled hostile client.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command};

use common::qemu::{qemu_io, run_in, QEMU};
use common::tools::{run_tool, tools};
use common::*;
use serde_json::Value;

const MIB: u64 = 1 << 20;

/// A running `serve`, stopped with SIGTERM (and checked to exit 0) when dropped.
struct Served {
    child: Option<Child>,
    ready: Value,
}

impl Served {
    fn start(bv: &Bv, args: &[&str]) -> Served {
        let mut all = vec!["--json", "serve"];
        all.extend(args);
        if !args.contains(&"--socket") {
            all.extend(["--listen", "127.0.0.1:0"]);
        }
        let (mut child, what) = bv.spawn(&all);
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().expect("stdout"))
            .read_line(&mut line)
            .expect("ready line");
        if line.is_empty() {
            let mut err = String::new();
            child.stderr.take().unwrap().read_to_string(&mut err).ok();
            let _ = child.wait();
            panic!("{what} ended before its ready line: {err}");
        }
        let ready: Value = serde_json::from_str(&line).expect("ready event is JSON");
        assert_eq!(ready["event"], "ready");
        Served {
            child: Some(child),
            ready,
        }
    }

    /// URL of export `i`.
    fn url(&self, i: usize) -> String {
        self.ready["exports"][i]["url"].as_str().unwrap().to_owned()
    }

    fn name(&self, i: usize) -> String {
        self.ready["exports"][i]["name"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    /// host:port of a TCP server.
    fn addr(&self) -> String {
        self.ready["url"]
            .as_str()
            .unwrap()
            .trim_start_matches("nbd://")
            .to_owned()
    }

    /// SIGTERM; the exit status and the stopped event.
    fn stop(&mut self) -> Value {
        let mut child = self.child.take().expect("running");
        let pid = child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        let out = child.wait_with_output().unwrap();
        assert_eq!(
            out.status.code(),
            Some(0),
            "serve exit: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        let last = stdout.lines().last().expect("stopped event");
        let doc: Value = serde_json::from_str(last).unwrap();
        assert_eq!(doc["event"], "stopped");
        assert_eq!(doc["signal"], "SIGTERM");
        doc
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// An 12 MiB sparse disk: data in slots 0, 3 (partly), 5 and 11, the rest never written.
fn disk(bv: &Bv) -> (std::path::PathBuf, Vec<u8>) {
    let img = bv.path("disk.raw");
    let data = make_sparse(
        &img,
        12 * MIB,
        &[
            (0, random_data(1, MIB as usize)),
            (3 * MIB + 8192, random_data(2, 300_000)),
            (5 * MIB, mixed_data(3, MIB as usize)),
            (11 * MIB + 4096, text_data(4, 500_000)),
        ],
    );
    bv.backup(&img, "vm", &[]);
    (img, data)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn served_snapshot_equals_the_image_over_tcp_and_unix_sockets() {
    if !tools("served_snapshot_equals_the_image", QEMU) {
        return;
    }
    let bv = Bv::new();
    let (img, data) = disk(&bv);
    let mut tcp = Served::start(&bv, &["vm"]);
    assert!(tcp.name(0).starts_with("vm@"), "{}", tcp.ready);
    assert_eq!(tcp.ready["exports"][0]["size"], 12 * MIB);
    run_in(
        bv.path("").as_path(),
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", s(&img), &tcp.url(0)],
    );
    // The default export (an empty name) is the first one.
    let bare = format!("nbd://{}", tcp.addr());
    run_in(
        bv.path("").as_path(),
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", s(&img), &bare],
    );
    // qemu-io reads at random offsets and lengths, each compared with the image.
    let mut rng = Rng::new(7);
    for _ in 0..24 {
        let off = rng.below(12 * MIB - 1);
        let len = rng.range(1, (12 * MIB - off).min(64 << 10));
        let got = qemu_io_read(&tcp.url(0), off, len);
        assert_bytes_eq(
            &got,
            &data[off as usize..(off + len) as usize],
            &format!("read {off} {len}"),
        );
    }
    let stopped = tcp.stop();
    assert!(stopped["connections"].as_u64().unwrap() >= 26, "{stopped}");

    let sock = bv.path("serve.sock");
    let mut unix = Served::start(&bv, &["vm", "--socket", s(&sock)]);
    let url = unix.url(0);
    assert_eq!(
        url,
        format!("nbd+unix:///{}?socket={}", unix.name(0), s(&sock))
    );
    let copy = bv.path("copy.raw");
    run_in(
        bv.path("").as_path(),
        "qemu-img",
        &["convert", "-f", "raw", "-O", "raw", &url, s(&copy)],
    );
    assert_file_eq(&copy, &data);
    unix.stop();
    assert!(!sock.exists(), "the socket is removed when serve stops");
}

/// `len` bytes at `off` of an export, read with qemu-io (`read -v` hex dump, parsed).
fn qemu_io_read(url: &str, off: u64, len: u64) -> Vec<u8> {
    let out = run_tool(
        Command::new("qemu-io").args([
            "-r",
            "-f",
            "raw",
            "-c",
            &format!("read -v {off} {len}"),
            url,
        ]),
        "",
    );
    let text = String::from_utf8_lossy(&out);
    let mut bytes = Vec::with_capacity(len as usize);
    for line in text.lines() {
        let Some((addr, rest)) = line.split_once(":  ") else {
            continue;
        };
        if addr.len() != 8 || u64::from_str_radix(addr, 16).is_err() {
            continue;
        }
        let n = (len as usize - bytes.len()).min(16);
        for i in 0..n {
            bytes.push(u8::from_str_radix(&rest[3 * i..3 * i + 2], 16).expect("hex byte"));
        }
    }
    assert_eq!(
        bytes.len() as u64,
        len,
        "qemu-io read -v {off} {len}: {text}"
    );
    bytes
}
