//! The NBD source against the real qemu-nbd (qemu-utils): every byte read over TCP and a Unix
//! socket equals `qemu-img convert -O raw`, reads from 8 threads in flight at once, data
//! ranges from `base:allocation`, dirty ranges from `qemu:dirty-bitmap:NAME`, clear errors for
//! an unknown export or bitmap, a server killed or stopped mid-read, and vmdk/vdi images
//! exported by qemu-nbd. Without qemu-nbd the tests print SKIP (under CI=true they fail).

mod common;

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use blockvault::source::{
    self, Access, NbdOptions, NbdSource, OpenOptions, ReadAt, Source, SourceKind,
};
use blockvault::ErrorKind;
use common::qemu::{converted, qemu_io, Listen, QemuNbd, QEMU_NBD};
use common::tools::{run_tool, tools};
use common::*;

/// Run a tool, panicking with its output on failure.
fn run(tool: &str, args: &[&str]) {
    run_tool(Command::new(tool).args(args), "");
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// A temp folder for one test, or `None` after a SKIP line when the QEMU tools are missing
/// (a failure under CI=true).
fn scratch(test: &str) -> Option<tempfile::TempDir> {
    tools(test, QEMU_NBD).then(|| tempfile::tempdir().expect("tempdir"))
}

/// A 64 MiB qcow2 with random, text and zero regions; returns (image, its raw bytes as
/// `qemu-img convert -O raw` gives them).
fn mixed_qcow2(dir: &Path, seed: u64) -> (PathBuf, Vec<u8>) {
    let raw = dir.join(format!("src-{seed}.raw"));
    write_file(&raw, &mixed_data(seed, 64 * MIB as usize));
    let img = dir.join(format!("img-{seed}.qcow2"));
    run(
        "qemu-img",
        &["convert", "-f", "raw", "-O", "qcow2", s(&raw), s(&img)],
    );
    // A zero cluster over data and unaligned small writes.
    qemu_io(
        "qcow2",
        s(&img),
        &["write -z 5M 1M", "write -P 0x5a 7340033 1000"],
    );
    (img.clone(), converted(dir, &img, "qcow2"))
}

fn reader(src: &dyn Source) -> &dyn ReadAt {
    match src.access() {
        Access::Translated(r) => r,
        Access::Fd(_) => panic!("an NBD source reads through ReadAt"),
    }
}

/// Read the whole source in `piece`-byte reads.
fn read_all(src: &dyn Source, piece: usize) -> Vec<u8> {
    let mut out = vec![0u8; src.size() as usize];
    for (i, chunk) in out.chunks_mut(piece).enumerate() {
        reader(src)
            .read_at((i * piece) as u64, chunk)
            .expect("read");
    }
    out
}

#[test]
fn tcp_reads_match_qemu_img_convert() {
    let Some(dir) = scratch("tcp_reads_match_qemu_img_convert") else {
        return;
    };
    let (img, expect) = mixed_qcow2(dir.path(), 1);
    let server = QemuNbd::serve(&img, "qcow2")
        .export("disk")
        .start(dir.path(), Listen::Tcp);
    let src = source::open(&server.url, &OpenOptions::default()).expect("open");
    assert_eq!(src.kind(), SourceKind::Nbd);
    assert_eq!(src.name(), server.url);
    assert_eq!(src.size(), 64 * MIB);
    assert_eq!((src.sector_size(), src.alignment()), (512, 1));
    assert_bytes_eq(
        &read_all(src.as_ref(), 4 * MIB as usize),
        &expect,
        "4 MiB reads",
    );
    // Odd sizes and offsets, one byte, and one read over 32 MiB (split into requests).
    let mut rng = Rng::new(7);
    for _ in 0..50 {
        let len = rng.range(1, 300_000) as usize;
        let at = rng.below(64 * MIB - len as u64);
        let mut buf = vec![0u8; len];
        reader(src.as_ref())
            .read_at(at, &mut buf)
            .expect("odd read");
        assert_bytes_eq(&buf, &expect[at as usize..at as usize + len], "odd read");
    }
    let mut big = vec![0u8; 40 * MIB as usize];
    reader(src.as_ref())
        .read_at(3, &mut big)
        .expect("40 MiB read");
    assert_bytes_eq(&big, &expect[3..3 + big.len()], "40 MiB read");
    let e = reader(src.as_ref())
        .read_at(64 * MIB - 1, &mut [0u8; 2])
        .unwrap_err();
    assert!(e.to_string().contains("past the end"), "{e}");
    // An empty read is a no-op; the connection stays usable after an error.
    reader(src.as_ref())
        .read_at(0, &mut [])
        .expect("empty read");
    assert_bytes_eq(
        &read_all(src.as_ref(), 64 * MIB as usize),
        &expect,
        "one 64 MiB read",
    );
}

#[test]
fn reads_in_flight_from_8_threads() {
    let Some(dir) = scratch("reads_in_flight_from_8_threads") else {
        return;
    };
    let (img, expect) = mixed_qcow2(dir.path(), 2);
    let server = QemuNbd::serve(&img, "qcow2").start(dir.path(), Listen::Tcp);
    let src = source::open(&server.url, &OpenOptions::default()).expect("open");
    let r = reader(src.as_ref());
    std::thread::scope(|scope| {
        for t in 0..8u64 {
            let expect = &expect;
            scope.spawn(move || {
                let mut rng = Rng::new(100 + t);
                for _ in 0..40 {
                    let len = rng.range(1, 4 * MIB) as usize;
                    let at = rng.below(64 * MIB - len as u64);
                    let mut buf = vec![0u8; len];
                    r.read_at(at, &mut buf).expect("concurrent read");
                    assert_bytes_eq(
                        &buf,
                        &expect[at as usize..at as usize + len],
                        "concurrent read",
                    );
                }
            });
        }
    });
}

#[test]
fn unix_socket_export() {
    let Some(dir) = scratch("unix_socket_export") else {
        return;
    };
    let (img, expect) = mixed_qcow2(dir.path(), 3);
    let sock = dir.path().join("nbd.sock");
    let server = QemuNbd::serve(&img, "qcow2")
        .export("vm disk")
        .start(dir.path(), Listen::Unix(&sock));
    // The export name has a space: percent-encoded in the URL.
    let url = server.url.replace("vm disk", "vm%20disk");
    let src = source::open(&url, &OpenOptions::default()).expect("open");
    assert_eq!(src.size(), 64 * MIB);
    assert_bytes_eq(
        &read_all(src.as_ref(), MIB as usize),
        &expect,
        "unix socket",
    );
}

/// Whether `r` overlaps any of `ranges`.
fn overlaps(ranges: &[Range<u64>], r: &Range<u64>) -> bool {
    ranges.iter().any(|x| x.start < r.end && r.start < x.end)
}

#[test]
fn data_ranges_skip_holes_and_zeros() {
    let Some(dir) = scratch("data_ranges_skip_holes_and_zeros") else {
        return;
    };
    let img = dir.path().join("sparse.qcow2");
    run("qemu-img", &["create", "-q", "-f", "qcow2", s(&img), "64M"]);
    qemu_io(
        "qcow2",
        s(&img),
        &[
            "write -P 0x11 1M 300k",
            "write -P 0x22 10M 3M",
            "write -z 11M 1M",
            "write -P 0x33 67043328 65536",
        ],
    );
    let expect = converted(dir.path(), &img, "qcow2");
    let server = QemuNbd::serve(&img, "qcow2")
        .export("d")
        .start(dir.path(), Listen::Tcp);
    let src = source::open(&server.url, &OpenOptions::default()).expect("open");
    let ranges = src.data_ranges().expect("data ranges");
    for w in ranges.windows(2) {
        assert!(w[0].end < w[1].start, "sorted, merged: {ranges:?}");
    }
    // Every nonzero byte is inside a range.
    for (i, b) in expect.iter().enumerate() {
        if *b != 0 {
            let i = i as u64;
            assert!(
                ranges.iter().any(|r| r.contains(&i)),
                "byte {i} not in {ranges:?}"
            );
        }
    }
    // Unallocated clusters and the zero cluster written over data are left out.
    for hole in [
        0..MIB,
        2 * MIB..10 * MIB,
        11 * MIB..12 * MIB,
        13 * MIB..63 * MIB,
    ] {
        assert!(!overlaps(&ranges, &hole), "{hole:?} in {ranges:?}");
    }
    let total = total_len(&ranges);
    assert!(total <= 3 * MIB, "{total} bytes of data ranges: {ranges:?}");
}

#[test]
fn data_ranges_of_a_1_tib_export_are_compact() {
    let Some(dir) = scratch("data_ranges_of_a_1_tib_export_are_compact") else {
        return;
    };
    let img = dir.path().join("big.qcow2");
    run("qemu-img", &["create", "-q", "-f", "qcow2", s(&img), "1T"]);
    let tib = 1u64 << 40;
    let writes = [(0u64, 0x41u8), (500 << 30, 0x42), (tib - 65536, 0x43)];
    let cmds: Vec<String> = writes
        .iter()
        .map(|(at, p)| format!("write -P {p} {at} 65536"))
        .collect();
    qemu_io("qcow2", s(&img), &cmds);
    let server = QemuNbd::serve(&img, "qcow2")
        .export("big")
        .start(dir.path(), Listen::Tcp);
    let src = source::open(&server.url, &OpenOptions::default()).expect("open");
    assert_eq!(src.size(), tib);
    let t = Instant::now();
    let ranges = src.data_ranges().expect("data ranges");
    let took = t.elapsed();
    assert_eq!(
        ranges,
        writes
            .iter()
            .map(|(at, _)| *at..at + 65536)
            .collect::<Vec<_>>(),
        "in {took:?}"
    );
    assert!(took < Duration::from_secs(30), "took {took:?}");
    for (at, p) in writes {
        let mut buf = vec![0u8; 65536 + 512];
        let start = at.saturating_sub(512).min(tib - buf.len() as u64);
        reader(src.as_ref()).read_at(start, &mut buf).expect("read");
        for (i, b) in buf.iter().enumerate() {
            let off = start + i as u64;
            let want = if (at..at + 65536).contains(&off) {
                p
            } else {
                0
            };
            assert_eq!(*b, want, "byte at {off}");
        }
    }
}

/// A 32 MiB qcow2 full of data with bitmap `b0` (64 KiB granularity) enabled before two
/// writes; returns the image and the clusters those writes touched.
fn image_with_bitmap(dir: &Path) -> (PathBuf, Vec<Range<u64>>) {
    let img = dir.join("dirty.qcow2");
    run("qemu-img", &["create", "-q", "-f", "qcow2", s(&img), "32M"]);
    qemu_io("qcow2", s(&img), &["write -P 1 0 32M"]);
    run(
        "qemu-img",
        &["bitmap", "--add", "--enable", "-g", "65536", s(&img), "b0"],
    );
    qemu_io(
        "qcow2",
        s(&img),
        &[
            "write -P 2 1M 4k",
            "write -P 3 5243000 200000",
            "write -P 4 20M 64k",
        ],
    );
    let g = 65536;
    let cluster = |at: u64, len: u64| at / g * g..(at + len).div_ceil(g) * g;
    (
        img,
        vec![
            cluster(MIB, 4096),
            cluster(5_243_000, 200_000),
            cluster(20 * MIB, 65536),
        ],
    )
}

#[test]
fn dirty_ranges_cover_exactly_the_written_clusters() {
    let Some(dir) = scratch("dirty_ranges_cover_exactly_the_written_clusters") else {
        return;
    };
    let (img, written) = image_with_bitmap(dir.path());
    let expect = converted(dir.path(), &img, "qcow2");
    let server = QemuNbd::serve(&img, "qcow2")
        .export("vm")
        .bitmap("b0")
        .start(dir.path(), Listen::Tcp);

    // Not negotiated at open: dirty_ranges reconnects (closing first: qemu-nbd serves one
    // client at a time, so holding two connections would hang).
    let src = source::open(&server.url, &OpenOptions::default()).expect("open");
    let bitmaps = src.bitmaps().expect("bitmaps");
    assert_eq!(bitmaps.len(), 1, "{bitmaps:?}");
    assert_eq!(bitmaps[0].name, "b0");
    // NBD carries neither the state nor the granularity; the dirty bytes come from block
    // status.
    assert!(bitmaps[0].enabled.is_none() && !bitmaps[0].in_use && bitmaps[0].granularity.is_none());
    assert_eq!(bitmaps[0].dirty_bytes, Some(total_len(&written)));
    let changes = src.dirty_ranges("b0").expect("dirty ranges");
    assert_eq!(changes.ranges, written);
    assert_eq!(src.dirty_ranges("b0").expect("again").ranges, written);
    assert_bytes_eq(
        &read_all(src.as_ref(), 4 * MIB as usize),
        &expect,
        "reads after the reconnect",
    );

    let e = src.dirty_ranges("nope").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Usage);
    assert!(
        e.to_string().contains("\"nope\"") && e.to_string().contains("offers: b0"),
        "{e}"
    );
    drop(src);

    // Negotiated at open.
    let opts = NbdOptions {
        bitmap: Some("b0".into()),
        ..NbdOptions::default()
    };
    let src = NbdSource::open(&server.url, &opts).expect("open with bitmap");
    assert_eq!(src.dirty_ranges("b0").expect("dirty").ranges, written);
    // All 32 MiB were written before the bitmap: all data.
    assert_eq!(src.data_ranges().expect("data"), vec![0..32 * MIB]);
}

#[test]
fn unknown_export_is_not_found_naming_it() {
    let Some(dir) = scratch("unknown_export_is_not_found_naming_it") else {
        return;
    };
    let (img, _) = image_with_bitmap(dir.path());
    let server = QemuNbd::serve(&img, "qcow2")
        .export("vm")
        .start(dir.path(), Listen::Tcp);
    let url = server.url.replace("/vm", "/nope");
    let e = source::open(&url, &OpenOptions::default())
        .err()
        .expect("unknown export");
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    assert!(
        e.to_string().contains(&url) && e.to_string().contains("no export \"nope\""),
        "{e}"
    );
    // The server still serves the right name, and it offers no bitmap (no -B).
    let src = source::open(&server.url, &OpenOptions::default()).expect("open");
    assert!(src.bitmaps().expect("bitmaps").is_empty());
    let e = src.dirty_ranges("b0").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Usage);
    assert!(e.to_string().contains("offers none"), "{e}");
    // Nothing listens: an Io error naming the URL.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dead = format!("nbd://127.0.0.1:{port}/x");
    let e = source::open(&dead, &OpenOptions::default())
        .err()
        .expect("refused");
    assert_eq!(e.kind(), ErrorKind::Io);
    assert!(e.to_string().contains(&dead), "{e}");
}

#[test]
fn server_killed_mid_read_fails_reads_without_hanging() {
    let Some(dir) = scratch("server_killed_mid_read_fails_reads_without_hanging") else {
        return;
    };
    let (img, _) = mixed_qcow2(dir.path(), 4);
    let mut server = QemuNbd::serve(&img, "qcow2")
        .export("k")
        .start(dir.path(), Listen::Tcp);
    let opts = NbdOptions {
        timeout: Duration::from_secs(20),
        ..NbdOptions::default()
    };
    let src = NbdSource::open(&server.url, &opts).expect("open");
    let started = AtomicBool::new(false);
    let t = Instant::now();
    let errors: Vec<blockvault::Error> = std::thread::scope(|scope| {
        let threads: Vec<_> = (0..8u64)
            .map(|i| {
                let (src, started) = (&src, &started);
                scope.spawn(move || {
                    let mut buf = vec![0u8; 4 * MIB as usize];
                    let mut at = i * 4 * MIB;
                    loop {
                        if let Err(e) = src.read_at(at % (60 * MIB), &mut buf) {
                            return e;
                        }
                        started.store(true, Ordering::Relaxed);
                        at += 4 * MIB;
                    }
                })
            })
            .collect();
        while !started.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(1));
        }
        std::thread::sleep(Duration::from_millis(50));
        server.stop("-KILL");
        threads
            .into_iter()
            .map(|h| h.join().expect("no panic"))
            .collect()
    });
    // Well within the 20 s timeout: the dropped connection fails the reads at once.
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "took {:?}",
        t.elapsed()
    );
    for e in &errors {
        assert_eq!(e.kind(), ErrorKind::Io, "{e}");
        assert!(e.to_string().contains(&server.url), "{e}");
    }
    let e = src.read_at(0, &mut [0u8; 512]).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Io);
    assert!(e.to_string().contains("connection lost"), "{e}");
}

#[test]
fn stopped_server_times_out_and_a_second_client_waits() {
    let Some(dir) = scratch("stopped_server_times_out_and_a_second_client_waits") else {
        return;
    };
    let (img, _) = image_with_bitmap(dir.path());
    let server = QemuNbd::serve(&img, "qcow2")
        .export("vm")
        .start(dir.path(), Listen::Tcp);
    let opts = NbdOptions {
        timeout: Duration::from_secs(2),
        ..NbdOptions::default()
    };
    let src = NbdSource::open(&server.url, &opts).expect("open");
    // qemu-nbd serves one client at a time: a second one gets no greeting.
    let t = Instant::now();
    let e = NbdSource::open(&server.url, &opts)
        .err()
        .expect("second client");
    assert_eq!(e.kind(), ErrorKind::Io);
    assert!(e.to_string().contains("--shared"), "{e}");
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    // A server that stops answering: the read fails after the timeout.
    server.signal("-STOP");
    let t = Instant::now();
    let e = src.read_at(0, &mut [0u8; 4096]).unwrap_err();
    let took = t.elapsed();
    server.signal("-CONT");
    assert_eq!(e.kind(), ErrorKind::Io);
    assert!(e.to_string().contains("no reply within 2 s"), "{e}");
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(10),
        "{took:?}"
    );
}

#[test]
fn vmdk_and_vdi_through_qemu_nbd() {
    let Some(dir) = scratch("vmdk_and_vdi_through_qemu_nbd") else {
        return;
    };
    let (qcow2, expect) = mixed_qcow2(dir.path(), 5);
    for fmt in ["vmdk", "vdi"] {
        let img = dir.path().join(format!("disk.{fmt}"));
        run(
            "qemu-img",
            &["convert", "-f", "qcow2", "-O", fmt, s(&qcow2), s(&img)],
        );
        let server = QemuNbd::serve(&img, fmt)
            .export(fmt)
            .start(dir.path(), Listen::Tcp);
        let src = source::open(&server.url, &OpenOptions::default()).expect("open");
        assert_eq!(src.size(), 64 * MIB, "{fmt}");
        assert_bytes_eq(&read_all(src.as_ref(), 4 * MIB as usize), &expect, fmt);
        // Zero regions of the source are not allocated in the converted image.
        let data = total_len(&src.data_ranges().expect("ranges"));
        assert!(data < 64 * MIB, "{fmt}: {data} bytes of data");
    }
}
