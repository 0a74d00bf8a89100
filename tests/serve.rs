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
        let child = self.child.take().expect("running");
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

/// The NBD tools of Debian `libnbd-bin`, for [`tools`].
const LIBNBD: &[(&str, &str)] = &[("nbdinfo", "libnbd-bin"), ("nbdcopy", "libnbd-bin")];

#[test]
fn nbdinfo_map_is_the_snapshots_holes_and_nbdcopy_is_byte_exact() {
    if !tools("nbdinfo_map", LIBNBD) {
        return;
    }
    let bv = Bv::new();
    let (_, data) = disk(&bv);
    let mut srv = Served::start(&bv, &["vm"]);
    let out = run_tool(Command::new("nbdinfo").args(["--map", &srv.url(0)]), "");
    let map: Vec<(u64, u64, u32)> = String::from_utf8_lossy(&out)
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (
                f[0].parse().unwrap(),
                f[1].parse().unwrap(),
                f[2].parse().unwrap(),
            )
        })
        .collect();
    // Slots 0, 3, 5 and 11 hold data; every other slot was never written: hole + zero.
    let expect = vec![
        (0, MIB, 0),
        (MIB, 2 * MIB, 3),
        (3 * MIB, MIB, 0),
        (4 * MIB, MIB, 3),
        (5 * MIB, MIB, 0),
        (6 * MIB, 5 * MIB, 3),
        (11 * MIB, MIB, 0),
    ];
    assert_eq!(map, expect);
    let copy = bv.path("nbdcopy.raw");
    run_tool(
        Command::new("nbdcopy").args(["--connections", "4", &srv.url(0), s(&copy)]),
        "",
    );
    assert_file_eq(&copy, &data);
    srv.stop();
}

#[test]
fn a_qcow2_overlay_on_the_export_is_written_and_read_back() {
    if !tools("qcow2_overlay_on_the_export", QEMU) {
        return;
    }
    let bv = Bv::new();
    let (_, mut data) = disk(&bv);
    let mut srv = Served::start(&bv, &["vm"]);
    let top = bv.path("top.qcow2");
    run_in(
        bv.path("").as_path(),
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            &srv.url(0),
            "-F",
            "raw",
            s(&top),
        ],
    );
    qemu_io(
        "qcow2",
        s(&top),
        &["write -P 0x5a 3M 64k", "write -P 0xc3 7M 4k"],
    );
    data[3 * MIB as usize..(3 * MIB + 65536) as usize].fill(0x5a);
    data[7 * MIB as usize..(7 * MIB + 4096) as usize].fill(0xc3);
    let flat = common::qemu::converted(&bv.path(""), &top, "qcow2");
    assert_bytes_eq(&flat, &data, "qcow2 overlay over the export");
    srv.stop();
}

#[test]
fn writable_overlay_keeps_writes_across_restarts_and_never_touches_the_vault() {
    if !tools("writable_overlay", QEMU) {
        return;
    }
    let bv = Bv::new();
    let (img, orig) = disk(&bv);
    let ov = bv.path("vm.overlay");
    let mut expect = orig.clone();
    {
        let mut srv = Served::start(&bv, &["vm", "--writable", "--overlay", s(&ov)]);
        assert_eq!(srv.ready["exports"][0]["writable"], true);
        // Unaligned writes over data and over a hole, and zeroes over data.
        qemu_io(
            "raw",
            &srv.url(0),
            &[
                "write -P 0xab 1000 10000",
                "write -P 0xcd 2M 100",
                "write -z 5M 8k",
            ],
        );
        expect[1000..11000].fill(0xab);
        expect[2 * MIB as usize..(2 * MIB + 100) as usize].fill(0xcd);
        expect[5 * MIB as usize..(5 * MIB + 8192) as usize].fill(0);
        // Another connection sees them.
        let copy = bv.path("cow1.raw");
        run_in(
            bv.path("").as_path(),
            "qemu-img",
            &["convert", "-f", "raw", "-O", "raw", &srv.url(0), s(&copy)],
        );
        assert_file_eq(&copy, &expect);
        let stopped = srv.stop();
        assert_eq!(stopped["overlay_blocks"], 3 + 1 + 2, "{stopped}");
    }
    // The vault is as it was: every stored byte checks, and the snapshot restores as backed up.
    bv.verify(true).ok();
    bv.restore_and_compare("vm", &orig);
    // A restart with the same overlay continues.
    let mut srv = Served::start(&bv, &["vm", "--writable", "--overlay", s(&ov)]);
    assert_eq!(srv.ready["exports"][0]["overlay_blocks"], 6);
    let copy = bv.path("cow2.raw");
    run_in(
        bv.path("").as_path(),
        "qemu-img",
        &["convert", "-f", "raw", "-O", "raw", &srv.url(0), s(&copy)],
    );
    assert_file_eq(&copy, &expect);
    srv.stop();
    // An overlay belongs to one snapshot: a newer one refuses it.
    write_at(&img, 0, &[1u8; 4096]);
    bv.backup(&img, "vm", &[]);
    bv.run(&[
        "serve",
        "vm",
        "--listen",
        "127.0.0.1:0",
        "--writable",
        "--overlay",
        s(&ov),
    ])
    .code(2)
    .stderr_has(&[s(&ov), "made for snapshot", "give a new file name"]);
    // --overlay without --writable is a usage error.
    bv.run(&["serve", "vm", "--overlay", s(&ov)]).code(2);
}

/// A minimal client for requests no real client sends.
struct Raw(TcpStream);

impl Raw {
    /// Connected and through the handshake (structured replies, base:allocation, GO "").
    fn connect(addr: &str) -> Raw {
        Raw::connect_with(addr, true)
    }

    /// Connected and through the handshake, with structured replies and base:allocation
    /// only if `structured` (else every reply is a simple one, as the kernel's client asks).
    fn connect_with(addr: &str, structured: bool) -> Raw {
        let mut r = Raw(TcpStream::connect(addr).unwrap());
        let mut greeting = [0u8; 18];
        r.0.read_exact(&mut greeting).unwrap();
        assert_eq!(&greeting[..8], b"NBDMAGIC");
        r.0.write_all(&1u32.to_be_bytes()).unwrap();
        if structured {
            r.option(8, &[]);
            let mut meta = 0u32.to_be_bytes().to_vec();
            meta.extend(1u32.to_be_bytes());
            meta.extend(15u32.to_be_bytes());
            meta.extend(b"base:allocation");
            r.option(10, &meta);
        }
        let mut go = 0u32.to_be_bytes().to_vec();
        go.extend(0u16.to_be_bytes());
        r.option(7, &go);
        r
    }

    /// Send an option and read replies up to its ACK (panics on an error reply).
    fn option(&mut self, opt: u32, data: &[u8]) {
        let mut b = b"IHAVEOPT".to_vec();
        b.extend(opt.to_be_bytes());
        b.extend((data.len() as u32).to_be_bytes());
        b.extend(data);
        self.0.write_all(&b).unwrap();
        loop {
            let mut h = [0u8; 20];
            self.0.read_exact(&mut h).unwrap();
            let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
            let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
            let mut d = vec![0u8; len as usize];
            self.0.read_exact(&mut d).unwrap();
            assert!(
                kind & (1 << 31) == 0,
                "option {opt} refused: {}",
                String::from_utf8_lossy(&d)
            );
            if kind == 1 {
                return;
            }
        }
    }

    fn request(&mut self, kind: u16, offset: u64, length: u32) {
        self.request_as(42, kind, offset, length);
    }

    /// A request with its own cookie.
    fn request_as(&mut self, cookie: u64, kind: u16, offset: u64, length: u32) {
        self.request_with(cookie, 0, kind, offset, length);
    }

    /// A request with its own cookie and command flags.
    fn request_with(&mut self, cookie: u64, flags: u16, kind: u16, offset: u64, length: u32) {
        let mut b = 0x2560_9513u32.to_be_bytes().to_vec();
        b.extend(flags.to_be_bytes());
        b.extend(kind.to_be_bytes());
        b.extend(cookie.to_be_bytes());
        b.extend(offset.to_be_bytes());
        b.extend(length.to_be_bytes());
        self.0.write_all(&b).unwrap();
    }

    /// The chunks of one structured reply up to DONE: (data read, error (errno, message)).
    fn reply(&mut self) -> (Vec<u8>, Option<(u32, String)>) {
        let (_, data, err) = self.reply_with_cookie();
        (data, err)
    }

    /// A simple reply to a read of `len` bytes: (cookie, errno, data; none after an error).
    fn simple_reply(&mut self, len: usize) -> (u64, u32, Vec<u8>) {
        let mut h = [0u8; 16];
        self.0.read_exact(&mut h).unwrap();
        assert_eq!(u32::from_be_bytes(h[0..4].try_into().unwrap()), 0x6744_6698);
        let errno = u32::from_be_bytes(h[4..8].try_into().unwrap());
        let mut data = vec![0u8; if errno == 0 { len } else { 0 }];
        self.0.read_exact(&mut data).unwrap();
        (
            u64::from_be_bytes(h[8..16].try_into().unwrap()),
            errno,
            data,
        )
    }

    /// [`Raw::reply`] and its cookie: this server sends each reply's chunks together.
    fn reply_with_cookie(&mut self) -> (u64, Vec<u8>, Option<(u32, String)>) {
        let (cookie, chunks) = self.chunks();
        let (mut data, mut err) = (Vec::new(), None);
        for (kind, p) in chunks {
            match kind {
                1 => data.extend(&p[8..]),
                2 => data.resize(
                    data.len() + u32::from_be_bytes(p[8..12].try_into().unwrap()) as usize,
                    0,
                ),
                k if k & 0x8000 != 0 => {
                    let n = u16::from_be_bytes([p[4], p[5]]) as usize;
                    err = Some((
                        u32::from_be_bytes(p[0..4].try_into().unwrap()),
                        String::from_utf8_lossy(&p[6..6 + n]).into_owned(),
                    ));
                }
                _ => {}
            }
        }
        (cookie, data, err)
    }

    /// The chunks of one structured reply up to DONE, as (type, payload), and its cookie.
    fn chunks(&mut self) -> (u64, Vec<(u16, Vec<u8>)>) {
        let (mut chunks, mut cookie) = (Vec::new(), None);
        loop {
            let mut h = [0u8; 20];
            self.0.read_exact(&mut h).unwrap();
            assert_eq!(u32::from_be_bytes(h[0..4].try_into().unwrap()), 0x668e_33ef);
            let this = u64::from_be_bytes(h[8..16].try_into().unwrap());
            assert_eq!(
                *cookie.get_or_insert(this),
                this,
                "chunks of two replies interleaved"
            );
            let flags = u16::from_be_bytes([h[4], h[5]]);
            let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
            let mut p = vec![0u8; len as usize];
            self.0.read_exact(&mut p).unwrap();
            chunks.push((u16::from_be_bytes([h[6], h[7]]), p));
            if flags & 1 != 0 {
                return (this, chunks);
            }
        }
    }
}

#[test]
fn hostile_clients_get_errors_and_the_server_serves_others() {
    let bv = Bv::new();
    let (_, data) = disk(&bv);
    let mut srv = Served::start(&bv, &["vm"]);
    let addr = srv.addr();
    // Garbage instead of client flags and options: the connection ends, nothing else.
    let mut g = TcpStream::connect(&addr).unwrap();
    let mut greeting = [0u8; 18];
    g.read_exact(&mut greeting).unwrap();
    g.write_all(&[0xff; 64]).unwrap();
    let mut rest = Vec::new();
    let _ = g.read_to_end(&mut rest);
    assert!(rest.is_empty(), "garbage flags get no answer");
    // An option claiming 4 GiB of data: refused, the connection closed.
    let mut g = TcpStream::connect(&addr).unwrap();
    g.read_exact(&mut greeting).unwrap();
    g.write_all(&1u32.to_be_bytes()).unwrap();
    let mut b = b"IHAVEOPT".to_vec();
    b.extend(7u32.to_be_bytes());
    b.extend(u32::MAX.to_be_bytes());
    g.write_all(&b).unwrap();
    let mut rest = Vec::new();
    let _ = g.read_to_end(&mut rest);
    assert_eq!(
        u32::from_be_bytes(rest[12..16].try_into().unwrap()),
        (1 << 31) | 9,
        "NBD_REP_ERR_TOO_BIG"
    );

    let mut c = Raw::connect(&addr);
    // Past the end, huge, a write to a read-only export, an unknown command: errors.
    c.request(0, 12 * MIB - 10, 20);
    assert_eq!(c.reply().1.unwrap().0, 22, "read past the end: EINVAL");
    c.request(0, 0, u32::MAX);
    assert_eq!(c.reply().1.unwrap().0, 75, "huge read: EOVERFLOW");
    c.request(1, 0, 512);
    c.0.write_all(&[0u8; 512]).unwrap();
    let (_, e) = c.reply();
    assert_eq!(e.unwrap(), (1, "the export is read-only".to_owned()));
    c.request(77, 0, 0);
    assert_eq!(c.reply().1.unwrap().0, 95);
    // Still serving this connection: a read across data and holes.
    c.request(0, MIB - 100, 300_000);
    let (got, e) = c.reply();
    assert!(e.is_none());
    assert_bytes_eq(
        &got,
        &data[(MIB - 100) as usize..(MIB - 100 + 300_000) as usize],
        "read after errors",
    );
    // Half a request, then gone.
    c.0.write_all(&0x2560_9513u32.to_be_bytes()).unwrap();
    drop(c);
    // Others are served as before.
    let mut d = Raw::connect(&addr);
    d.request(0, 5 * MIB, 4096);
    assert_bytes_eq(
        &d.reply().0,
        &data[5 * MIB as usize..(5 * MIB + 4096) as usize],
        "another client",
    );
    srv.stop();
}

#[test]
fn simple_replies_and_reads_that_must_not_fragment_carry_every_byte() {
    let bv = Bv::new();
    let (_, data) = disk(&bv);
    let mut srv = Served::start(&bv, &["vm"]);
    let addr = srv.addr();
    let want = |off: u64, len: u64| &data[off as usize..(off + len) as usize];
    // Without structured replies every read is a simple reply followed by all its bytes:
    // data, a partly written slot, and over 5 MiB of never-written slots sent as zeros.
    let mut c = Raw::connect_with(&addr, false);
    for (cookie, (off, len)) in [
        (MIB - 100, 300_000),
        (3 * MIB, MIB + 5),
        (5 * MIB + 7, 6 * MIB + 4096 + 100),
    ]
    .into_iter()
    .enumerate()
    {
        c.request_as(cookie as u64, 0, off, len as u32);
        let (got_cookie, errno, got) = c.simple_reply(len as usize);
        assert_eq!((got_cookie, errno), (cookie as u64, 0));
        assert_bytes_eq(&got, want(off, len), &format!("simple read at {off}"));
    }
    // A simple reply's error carries no data; the connection goes on.
    c.request_as(7, 0, 12 * MIB - 10, 20);
    assert_eq!(c.simple_reply(20).1, 22, "read past the end: EINVAL");
    c.request_as(8, 0, 0, 4096);
    assert_bytes_eq(
        &c.simple_reply(4096).2,
        want(0, 4096),
        "read after an error",
    );
    // With structured replies and NBD_CMD_FLAG_DF, holes are sent as zeros inside one data
    // chunk; without the flag they are hole chunks.
    let mut d = Raw::connect(&addr);
    let (off, len) = (MIB - 100, 3 * MIB);
    d.request_with(1, 1 << 2, 0, off, len as u32);
    let (_, chunks) = d.chunks();
    let kinds: Vec<u16> = chunks.iter().map(|c| c.0).collect();
    assert_eq!(kinds, [1], "one OFFSET_DATA chunk");
    assert_bytes_eq(&chunks[0].1[8..], want(off, len), "DF read");
    d.request(0, off, len as u32);
    let kinds: Vec<u16> = d.chunks().1.iter().map(|c| c.0).collect();
    assert!(kinds.contains(&2), "holes as OFFSET_HOLE chunks: {kinds:?}");
    srv.stop();
}

#[test]
fn pipelined_requests_are_answered_by_cookie_and_a_client_that_stops_reading_cannot_block_shutdown()
{
    let bv = Bv::new();
    let (_, data) = disk(&bv);
    let mut srv = Served::start(&bv, &["vm"]);
    let addr = srv.addr();
    // 64 reads sent before any reply is read, across slots, holes and slot edges: every
    // cookie answered once, each with its own bytes, in whatever order the workers finish.
    let mut c = Raw::connect(&addr);
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut asked = std::collections::HashMap::new();
    for cookie in 0..64u64 {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let len = 1 + rng % (2 * MIB);
        let off = (rng >> 24) % (12 * MIB - len);
        c.request_as(cookie, 0, off, len as u32);
        asked.insert(cookie, (off as usize, len as usize));
    }
    for _ in 0..64 {
        let (cookie, got, e) = c.reply_with_cookie();
        assert!(e.is_none(), "read {cookie}: {e:?}");
        let (off, len) = asked
            .remove(&cookie)
            .expect("a cookie asked for, answered once");
        assert_bytes_eq(&got, &data[off..off + len], &format!("read {cookie}"));
    }
    // A client that queues 256 MiB of reads and never reads a reply: the server's workers
    // block on its full socket, yet SIGTERM still ends the server (exit 0).
    let mut stuck = Raw::connect(&addr);
    for cookie in 0..256 {
        stuck.request_as(cookie, 0, (cookie % 11) * MIB, MIB as u32);
    }
    std::thread::sleep(std::time::Duration::from_millis(500));
    let mut child = srv.child.take().expect("running");
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("serve did not stop within 30 s of SIGTERM with a client not reading");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(0));
    drop(stuck);
}

#[test]
fn a_damaged_slot_fails_its_range_only_and_the_error_names_the_object() {
    let bv = Bv::new();
    let (_, data) = disk(&bv);
    let packs = bv.objects("packs");
    assert_eq!(packs.len(), 1, "{packs:?}");
    let pack = &packs[0];
    let key = bv.key_of(pack);
    let flen = u32::from_le_bytes(read_at(pack, 32, 4).try_into().unwrap()) as u64;
    flip_byte(pack, 32 + flen / 2);
    // The best-effort restore says which bytes the damage costs.
    let r = bv.restore("vm", &bv.path("salvage.raw"), &["--skip-damaged", "--json"]);
    let doc = r.json();
    let bad = &doc["damaged"][0];
    let (off, len) = (num(bad, "offset"), num(bad, "length"));
    let mut srv = Served::start(&bv, &["vm"]);
    let mut c = Raw::connect(&srv.addr());
    c.request(0, off + 100, 4096);
    let (errno, message) = c.reply().1.expect("the damaged range fails");
    assert_eq!(errno, 5, "EIO");
    assert!(message.contains(&key), "names the pack: {message}");
    assert!(
        message.contains(&format!("bytes {off}..{}", off + len)),
        "names the range: {message}"
    );
    // Every other slot still reads.
    for (o, l) in [(0, MIB), (3 * MIB, MIB), (5 * MIB, MIB), (11 * MIB, MIB)] {
        if o == off {
            continue;
        }
        c.request(0, o, l as u32);
        let (got, e) = c.reply();
        assert!(e.is_none(), "{e:?}");
        assert_bytes_eq(&got, &data[o as usize..(o + l) as usize], "an intact slot");
    }
    srv.stop();
}

/// `serve group:VM` serves every disk of the VM's group as its own read-only export, named
/// as one disk's export is; each equals what the guest saw at the point in time. The group
/// is a real one: `backup qmp://` of a QEMU with two drives (no guest OS).
#[test]
fn a_group_is_served_one_read_only_export_per_disk() {
    const T: &str = "a_group_is_served_one_read_only_export_per_disk";
    if !tools(T, QEMU) {
        return;
    }
    let Some(bin) = common::vm::qemu_system(T) else {
        return;
    };
    let bv = Bv::new();
    let vm = common::vm::Vm::start(
        &bin,
        bv.dir.path(),
        "vm7",
        &[("d0", 8 * MIB), ("d1", 6 * MIB)],
    );
    vm.write(0, 0, &random_data(70, MIB as usize));
    vm.write(1, 2 * MIB + 4096, &text_data(71, 700_000));
    let url = vm.url();
    let doc = bv.json(&["backup", &url, "--disk-map", "d0=g-root,d1=g-data"]);
    let group = doc["group"].as_str().expect("group id").to_owned();
    let mut served = Served::start(&bv, &[&format!("group:vm7@{}", &group[..8])]);
    let exports = served.ready["exports"].as_array().expect("exports").clone();
    assert_eq!(exports.len(), 2, "{}", served.ready);
    for (i, disk) in ["g-root", "g-data"].iter().enumerate() {
        let snap = doc["disks"][i]["snapshot"].as_str().expect("snapshot");
        assert_eq!(served.name(i), format!("{disk}@{}", &snap[..8]));
        assert_eq!(exports[i]["writable"], false);
        let copy = bv.path(&format!("{disk}.raw"));
        run_in(
            bv.path("").as_path(),
            "qemu-img",
            &[
                "convert",
                "-f",
                "raw",
                "-O",
                "raw",
                &served.url(i),
                s(&copy),
            ],
        );
        assert_file_eq(&copy, &vm.read(i));
    }
    served.stop();
    // A group is several disks: one overlay file cannot take them.
    bv.run(&[
        "serve",
        "group:vm7",
        "--writable",
        "--overlay",
        s(&bv.path("o.overlay")),
    ])
    .code(2)
    .stderr_has(&["--writable serves one disk", "a group has several"]);
    bv.run(&["serve", "group:nosuchvm"])
        .code(1)
        .stderr_has(&["no group of a VM named nosuchvm"]);
}
