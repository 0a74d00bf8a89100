//! The native qcow2 reader against the real QEMU tools: images made and written by `qemu-img`
//! and `qemu-io`, every byte compared with `qemu-img convert -O raw`, data ranges compared
//! with `qemu-img map`, dirty bitmaps compared with the writes QEMU recorded. Needs qemu-img
//! and qemu-io (Debian package `qemu-utils`); without them each test prints `SKIP` and passes,
//! except under CI=true, where it fails.

mod common;

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Instant;

use blockvault::source::{self, Access, OpenOptions, Qcow2, Source, SourceKind};
use blockvault::ErrorKind;
use common::qemu::{run_in, QemuIoSession, QEMU};
use common::tools::tools;
use common::*;

// ---------------------------------------------------------------------------------------------
// The QEMU tools
// ---------------------------------------------------------------------------------------------

/// A temp folder in which to run qemu-img and qemu-io; `None` (after a loud SKIP) when the
/// tools are missing.
struct Qemu {
    dir: tempfile::TempDir,
}

impl Qemu {
    fn new(test: &str) -> Option<Qemu> {
        tools(test, QEMU).then(|| Qemu {
            dir: tempfile::tempdir().expect("tempdir"),
        })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Run `tool args...` in the folder; panic with its output if it fails.
    fn run(&self, tool: &str, args: &[&str]) -> String {
        run_in(self.dir.path(), tool, args)
    }

    fn img(&self, args: &[&str]) -> String {
        self.run("qemu-img", args)
    }

    /// `qemu-img create -f qcow2 [opts] name size`.
    fn create(&self, name: &str, size: &str, opts: &[&str]) -> PathBuf {
        let mut args = vec!["create", "-q", "-f", "qcow2"];
        args.extend_from_slice(opts);
        args.extend_from_slice(&[name, size]);
        self.img(&args);
        self.path(name)
    }

    /// `qemu-img convert -c -O qcow2 [opts] raw name`: every cluster compressed.
    fn compress(&self, raw: &str, name: &str, opts: &[&str]) {
        let mut args = vec!["convert", "-c", "-O", "qcow2"];
        args.extend_from_slice(opts);
        args.extend_from_slice(&[raw, name]);
        self.img(&args);
    }

    /// Run qemu-io commands (`write -P 0xab 0 4k`, `write -z ...`) on a qcow2 image.
    fn io(&self, name: &str, cmds: &[String]) {
        let mut args = vec!["-f", "qcow2"];
        for c in cmds {
            args.extend_from_slice(&["-c", c]);
        }
        args.push(name);
        self.run("qemu-io", &args);
    }

    /// What QEMU reads from the image: `qemu-img convert -O raw`.
    fn raw(&self, name: &str) -> Vec<u8> {
        let out = format!("{name}.expected.raw");
        self.img(&["convert", "-O", "raw", name, &out]);
        let bytes = read_file(&self.path(&out));
        std::fs::remove_file(self.path(&out)).expect("remove");
        bytes
    }

    /// Where QEMU says the chain holds data (`qemu-img map`, extents with `"data": true`),
    /// less what it knows reads as zeros (`"zero": true`: a data cluster whose host bytes
    /// are a hole in the image file).
    fn map(&self, name: &str) -> Vec<Range<u64>> {
        let doc: serde_json::Value =
            serde_json::from_str(&self.img(&["map", "--output=json", name])).expect("map JSON");
        let mut out: Vec<Range<u64>> = Vec::new();
        for e in doc.as_array().expect("map is an array") {
            if e["data"].as_bool() != Some(true) || e["zero"].as_bool() == Some(true) {
                continue;
            }
            let start = num(e, "start");
            let end = start + num(e, "length");
            match out.last_mut() {
                Some(last) if last.end == start => last.end = end,
                _ => out.push(start..end),
            }
        }
        out
    }
}

/// `write -P PAT OFF LEN` for qemu-io.
fn write(pattern: u8, offset: u64, len: u64) -> String {
    format!("write -P {pattern:#x} {offset} {len}")
}

/// `write -z OFF LEN` (zero clusters where whole clusters are covered).
fn write_zeros(offset: u64, len: u64) -> String {
    format!("write -z {offset} {len}")
}

fn open(path: &Path) -> Box<dyn Source> {
    source::open(path.to_str().expect("utf-8"), &OpenOptions::default())
        .unwrap_or_else(|e| panic!("opening {}: {e:?}", path.display()))
}

fn open_err(path: &Path) -> blockvault::Error {
    match Qcow2::open(path.to_str().expect("utf-8")) {
        Ok(q) => panic!("{} opened: {q:?}", path.display()),
        Err(e) => e,
    }
}

/// Read `len` bytes at `offset` through the source's reader.
fn read(src: &dyn Source, offset: u64, len: usize) -> Vec<u8> {
    let Access::Translated(reader) = src.access() else {
        panic!("a qcow2 source reads through ReadAt");
    };
    let mut buf = vec![0xEE; len];
    reader
        .read_at(offset, &mut buf)
        .unwrap_or_else(|e| panic!("read {len} at {offset}: {e:?}"));
    buf
}

/// Open `name` with the native reader and check it against QEMU: size, every byte (in 1 MiB
/// reads and in unaligned odd-sized reads), and data ranges equal to `qemu-img map`'s data
/// extents, which also proves every non-zero byte lies within them. Returns the source.
fn check_against_qemu(q: &Qemu, name: &str) -> Box<dyn Source> {
    let expected = q.raw(name);
    let src = open(&q.path(name));
    assert_eq!(src.kind(), SourceKind::Qcow2);
    assert_eq!(src.size(), expected.len() as u64, "{name}: virtual size");
    assert_eq!((src.sector_size(), src.alignment()), (512, 1));

    let mut whole = Vec::with_capacity(expected.len());
    for at in (0..expected.len()).step_by(MIB as usize) {
        let len = (expected.len() - at).min(MIB as usize);
        whole.extend_from_slice(&read(&*src, at as u64, len));
    }
    assert_bytes_eq(&whole, &expected, &format!("{name}, 1 MiB reads"));
    let mut rng = Rng::new(expected.len() as u64);
    for _ in 0..64 {
        let at = rng.below(expected.len() as u64) as usize;
        let len = (rng.below(300 * KIB) as usize + 1).min(expected.len() - at);
        assert_bytes_eq(
            &read(&*src, at as u64, len),
            &expected[at..at + len],
            &format!("{name}, {len} bytes at {at}"),
        );
    }

    let ranges = src.data_ranges().expect("data_ranges");
    assert_eq!(ranges, q.map(name), "{name}: data ranges vs qemu-img map");
    let mut covered = 0;
    for r in &ranges {
        assert!(
            expected[covered as usize..r.start as usize]
                .iter()
                .all(|&b| b == 0),
            "{name}: non-zero bytes before {r:?}, outside the data ranges"
        );
        covered = r.end;
    }
    assert!(expected[covered as usize..].iter().all(|&b| b == 0));
    src
}

/// Writes that exercise one image: data at cluster starts, ends and across boundaries, zero
/// writes over data and over nothing, and the very last bytes of the disk.
fn mixed_writes(size: u64, cluster: u64) -> Vec<String> {
    vec![
        write(0xab, 0, 4 * KIB),
        write(0x11, cluster - 512, 1024),
        write(0x22, 3 * cluster + 7 * 512, 5 * cluster),
        write(0x33, 2 * MIB + 512, 70 * KIB),
        write_zeros(4 * cluster, 2 * cluster),
        write_zeros(20 * MIB, 3 * cluster),
        write(0x44, size - 1536, 1536),
    ]
}

// ---------------------------------------------------------------------------------------------
// Reading
// ---------------------------------------------------------------------------------------------

#[test]
fn v3_images_of_each_cluster_size_read_like_qemu() {
    let Some(q) = Qemu::new("v3_images_of_each_cluster_size_read_like_qemu") else {
        return;
    };
    // 40 MiB + 3 sectors: the last cluster is partial.
    let size = 40 * MIB + 1536;
    for cluster in [512, 4 * KIB, 64 * KIB, 2 * MIB] {
        let name = format!("v3-{cluster}.qcow2");
        q.create(
            &name,
            &size.to_string(),
            &["-o", &format!("cluster_size={cluster}")],
        );
        q.io(&name, &mixed_writes(size, cluster));
        let src = check_against_qemu(&q, &name);
        // Zero clusters written over data read as zeros and are not data.
        assert!(read(&*src, 4 * cluster, cluster as usize)
            .iter()
            .all(|&b| b == 0));
    }
    // Metadata preallocation: every cluster has a host offset, but in a sparse file: only
    // what was written is data, as qemu-img map says ("zero": true for the rest).
    q.create("prealloc.qcow2", "6M", &["-o", "preallocation=metadata"]);
    q.io("prealloc.qcow2", &[write(0x66, MIB + 3, 10 * KIB)]);
    let src = check_against_qemu(&q, "prealloc.qcow2");
    let ranges = src.data_ranges().expect("data_ranges");
    assert!(
        total_len(&ranges) <= 64 * KIB && ranges.iter().any(|r| r.contains(&(MIB + 3))),
        "only the written cluster of a preallocated image is data: {ranges:?}"
    );
}

#[test]
fn v2_image_reads_like_qemu() {
    let Some(q) = Qemu::new("v2_image_reads_like_qemu") else {
        return;
    };
    let size = 24 * MIB;
    q.create("v2.qcow2", "24M", &["-o", "compat=0.10"]);
    q.io("v2.qcow2", &mixed_writes(size, 64 * KIB)[..4]);
    q.io("v2.qcow2", &[write(0x44, size - 1536, 1536)]);
    check_against_qemu(&q, "v2.qcow2");
    // An internal snapshot shares clusters (refcount 2, no COPIED bit); later writes go to
    // new clusters, and the active L1 table is what is read.
    q.img(&["snapshot", "-c", "s1", "v2.qcow2"]);
    q.io(
        "v2.qcow2",
        &[write(0x55, 0, 8 * KIB), write(0x56, 10 * MIB, 4 * KIB)],
    );
    check_against_qemu(&q, "v2.qcow2");
}

#[test]
fn extended_l2_subclusters_read_like_qemu() {
    let Some(q) = Qemu::new("extended_l2_subclusters_read_like_qemu") else {
        return;
    };
    // A backing file full of 0x5a under an image with 64 KiB clusters of 2 KiB subclusters:
    // unallocated subclusters show the backing file, zero ones hide it.
    q.create("base.qcow2", "8M", &[]);
    q.io("base.qcow2", &[write(0x5a, 0, 8 * MIB)]);
    q.create(
        "ext.qcow2",
        "8M",
        &["-o", "extended_l2=on", "-b", "base.qcow2", "-F", "qcow2"],
    );
    q.io(
        "ext.qcow2",
        &[
            write(0x01, 0, 2 * KIB),
            write(0x02, 64 * KIB + 6 * KIB, 4 * KIB),
            write(0x03, MIB + 1000, 100),
            write_zeros(2 * MIB + 4 * KIB, 2 * KIB),
            write_zeros(3 * MIB, 128 * KIB),
            write(0x04, 4 * MIB + 60 * KIB, 8 * KIB),
        ],
    );
    check_against_qemu(&q, "ext.qcow2");
    // Without the backing file: unallocated subclusters read as zeros.
    q.create("ext-alone.qcow2", "8M", &["-o", "extended_l2=on"]);
    q.io(
        "ext-alone.qcow2",
        &[
            write(0x06, 64 * KIB + 2 * KIB, 2 * KIB),
            write_zeros(0, 4 * KIB),
        ],
    );
    let src = check_against_qemu(&q, "ext-alone.qcow2");
    assert_eq!(
        src.data_ranges().expect("ranges"),
        vec![64 * KIB + 2 * KIB..64 * KIB + 4 * KIB]
    );
}

#[test]
fn compressed_images_read_like_qemu() {
    let Some(q) = Qemu::new("compressed_images_read_like_qemu") else {
        return;
    };
    let size = 12 * MIB + 512;
    let raw = q.path("source.raw");
    make_sparse(
        &raw,
        size,
        &[
            (0, mixed_data(7, 5 * MIB as usize)),
            (7 * MIB + 100, text_data(8, 3 * MIB as usize)),
            (size - 300, random_data(9, 300)),
        ],
    );
    for (name, opts) in [
        ("zlib.qcow2", "compression_type=zlib"),
        ("zstd.qcow2", "compression_type=zstd"),
        ("zlib-4k.qcow2", "cluster_size=4096"),
        ("zstd-2m.qcow2", "cluster_size=2M,compression_type=zstd"),
        ("zlib-512.qcow2", "cluster_size=512"),
        ("zstd-ext.qcow2", "extended_l2=on,compression_type=zstd"),
    ] {
        q.compress("source.raw", name, &["-o", opts]);
        let src = check_against_qemu(&q, name);
        assert_bytes_eq(&read(&*src, 0, size as usize), &read_file(&raw), name);
    }
    // Compressed clusters under fresh writes: a mix of both kinds in one image.
    q.io("zstd.qcow2", &[write(0x77, 3 * MIB + 5, 200 * KIB)]);
    check_against_qemu(&q, "zstd.qcow2");
}

#[test]
fn backing_chains_read_like_qemu() {
    let Some(q) = Qemu::new("backing_chains_read_like_qemu") else {
        return;
    };
    // base.raw (sparse, 6 MiB) <- mid.qcow2 (10 MiB) <- top.qcow2 (16 MiB), all in a
    // subfolder and named relatively, opened from elsewhere.
    std::fs::create_dir(q.path("chain")).expect("mkdir");
    make_sparse(
        &q.path("chain/base.raw"),
        6 * MIB,
        &[
            (0, random_data(1, 300 * KIB as usize)),
            (5 * MIB, text_data(2, MIB as usize)),
        ],
    );
    q.create(
        "chain/mid.qcow2",
        "10M",
        &["-b", "base.raw", "-F", "raw", "-o", "cluster_size=4096"],
    );
    q.io(
        "chain/mid.qcow2",
        &[
            write(0x21, 100 * KIB, 8 * KIB),
            write(0x22, 9 * MIB, 64 * KIB),
        ],
    );
    q.create(
        "chain/top.qcow2",
        "16M",
        &["-b", "mid.qcow2", "-F", "qcow2"],
    );
    q.io(
        "chain/top.qcow2",
        &[
            write(0x31, 64 * KIB, 64 * KIB),
            // Zeros over backing data: reads as zeros, not data.
            write_zeros(5 * MIB, 128 * KIB),
            write(0x32, 15 * MIB, 4 * KIB),
        ],
    );
    let src = check_against_qemu(&q, "chain/top.qcow2");
    assert!(read(&*src, 5 * MIB, 128 * KIB as usize)
        .iter()
        .all(|&b| b == 0));
    let ranges = src.data_ranges().expect("ranges");
    assert!(ranges
        .iter()
        .all(|r| r.end <= 5 * MIB || r.start >= 5 * MIB + 128 * KIB));
    check_against_qemu(&q, "chain/mid.qcow2");

    // Without the backing format extension the format is probed: hide the extension of
    // top.qcow2 by changing its type to an unknown one (QEMU then probes as well).
    let top = q.path("chain/top.qcow2");
    let header = read_at(&top, 0, 64 * KIB as usize);
    let ext = header
        .windows(4)
        .position(|w| w == [0xe2, 0x79, 0x2a, 0xca])
        .expect("backing format extension");
    write_at(&top, ext as u64, &[0x0b, 0xad, 0xf0, 0x0d]);
    check_against_qemu(&q, "chain/top.qcow2");

    // A missing backing file is NotFound naming it and the image.
    std::fs::rename(q.path("chain/base.raw"), q.path("chain/gone.raw")).expect("rename");
    let err = open_err(&top);
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err:?}");
    assert!(
        err.to_string().contains("base.raw") && err.to_string().contains("mid.qcow2"),
        "{err}"
    );
}

#[test]
fn concurrent_reads_agree() {
    let Some(q) = Qemu::new("concurrent_reads_agree") else {
        return;
    };
    let size = 16 * MIB;
    let raw = q.path("src.raw");
    make_sparse(&raw, size, &[(MIB, mixed_data(3, 12 * MIB as usize))]);
    q.compress("src.raw", "c.qcow2", &["-o", "cluster_size=16384"]);
    q.io("c.qcow2", &[write(0x99, 4 * MIB + 3, 3 * MIB)]);
    let expected = q.raw("c.qcow2");
    let src = open(&q.path("c.qcow2"));
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let (src, expected) = (&src, &expected);
            s.spawn(move || {
                let mut rng = Rng::new(t);
                for _ in 0..200 {
                    let at = rng.below(size) as usize;
                    let len = (rng.below(MIB) as usize + 1).min(expected.len() - at);
                    assert_bytes_eq(
                        &read(&**src, at as u64, len),
                        &expected[at..at + len],
                        &format!("thread {t}: {len} bytes at {at}"),
                    );
                }
            });
        }
    });
}

#[test]
fn backup_of_a_qcow2_chain_restores_what_qemu_reads() {
    let Some(q) = Qemu::new("backup_of_a_qcow2_chain_restores_what_qemu_reads") else {
        return;
    };
    // A compressed base under a top with fresh writes and zero clusters, backed up by the real
    // binary (threaded ReadAt readers) and restored: the restore equals QEMU's view.
    let raw = q.path("base.raw");
    make_sparse(&raw, 9 * MIB, &[(MIB, mixed_data(11, 6 * MIB as usize))]);
    q.compress("base.raw", "base.qcow2", &[]);
    q.create("top.qcow2", "12M", &["-b", "base.qcow2", "-F", "qcow2"]);
    q.io(
        "top.qcow2",
        &[
            write(0x5c, 3 * MIB + 4 * KIB, 200 * KIB),
            write_zeros(5 * MIB, MIB),
        ],
    );
    let expected = q.raw("top.qcow2");
    let src = open(&q.path("top.qcow2"));
    let mapped = total_len(&src.data_ranges().expect("ranges"));

    let bv = Bv::new();
    let doc = bv.backup(&q.path("top.qcow2"), "vm", &[]);
    assert_eq!(num(&doc, "disk_size"), 12 * MIB, "{doc}");
    // Only the mapped clusters are read (whole slots around them at most).
    let read = num(&doc, "bytes_read");
    assert!(
        read <= mapped + 2 * MIB && read < 12 * MIB - MIB,
        "{read} read for {mapped} mapped: {doc}"
    );
    bv.restore_and_compare("vm", &expected);
}

// ---------------------------------------------------------------------------------------------
// Bitmaps
// ---------------------------------------------------------------------------------------------

/// The ranges `writes` (offset, len) dirty at `granularity`, clipped to `size`, merged.
fn dirtied(writes: &[(u64, u64)], granularity: u64, size: u64) -> Vec<Range<u64>> {
    let mut r: Vec<Range<u64>> = writes
        .iter()
        .map(|&(o, l)| o / granularity * granularity..(o + l).div_ceil(granularity) * granularity)
        .map(|r| r.start..r.end.min(size))
        .collect();
    r.sort_by_key(|r| r.start);
    let mut out: Vec<Range<u64>> = Vec::new();
    for x in r {
        match out.last_mut() {
            Some(last) if last.end >= x.start => last.end = last.end.max(x.end),
            _ => out.push(x),
        }
    }
    out
}

#[test]
fn dirty_bitmaps_cover_exactly_what_qemu_wrote() {
    let Some(q) = Qemu::new("dirty_bitmaps_cover_exactly_what_qemu_wrote") else {
        return;
    };
    let size = 100 * MIB + 512;
    for granularity in [65536u64, 4096] {
        let name = format!("bm-{granularity}.qcow2");
        q.create(&name, &size.to_string(), &[]);
        q.io(&name, &[write(0x10, 0, MIB)]); // before the bitmap: not dirty
        q.img(&[
            "bitmap",
            "--add",
            "--enable",
            "-g",
            &granularity.to_string(),
            &name,
            "b0",
        ]);
        q.img(&["bitmap", "--add", "-g", "65536", &name, "off"]);
        q.img(&["bitmap", "--disable", &name, "off"]);
        let writes = [
            (5 * MIB + 100, 10u64),
            (5 * MIB + 200 * KIB, 300 * KIB),
            (64 * MIB - 512, 1024),
            (80 * MIB, 4 * MIB),
            (size - 512, 512),
        ];
        let mut cmds: Vec<String> = writes.iter().map(|&(o, l)| write(0x20, o, l)).collect();
        cmds.push(write_zeros(90 * MIB, 128 * KIB));
        q.io(&name, &cmds);

        let src = open(&q.path(&name));
        let list = src.bitmaps().expect("bitmaps");
        assert_eq!(list.len(), 2, "{list:?}");
        assert_eq!(list[0].name, "b0");
        assert_eq!(list[0].granularity, Some(granularity));
        assert!(list[0].enabled == Some(true) && !list[0].in_use, "{list:?}");
        assert_eq!(list[1].enabled, Some(false), "{list:?}");

        let mut all = writes.to_vec();
        all.push((90 * MIB, 128 * KIB));
        let changes = src.dirty_ranges("b0").expect("dirty ranges");
        assert_eq!(changes.granularity, granularity);
        assert_eq!(changes.ranges, dirtied(&all, granularity, size), "{name}");

        let err = src.dirty_ranges("nope").expect_err("unknown bitmap");
        assert_eq!(err.kind(), ErrorKind::Usage);
        assert!(
            err.to_string().contains("no bitmap nope") && err.to_string().contains("b0, off"),
            "{err}"
        );
        let err = src.dirty_ranges("off").expect_err("disabled bitmap");
        assert_eq!(err.kind(), ErrorKind::Usage);
        assert!(err.to_string().contains("disabled"), "{err}");
        // Reading is unaffected by bitmaps.
        check_against_qemu(&q, &name);
    }
}

#[test]
fn bitmap_left_in_use_by_a_killed_qemu_is_refused() {
    let test = "bitmap_left_in_use_by_a_killed_qemu_is_refused";
    let Some(q) = Qemu::new(test) else {
        return;
    };
    // Lazy refcounts: the first allocating write also sets the image's dirty bit.
    let img = q.create("crash.qcow2", "32M", &["-o", "lazy_refcounts=on"]);
    q.img(&["bitmap", "--add", "--enable", "crash.qcow2", "b0"]);
    // qemu-io opened read-write marks the bitmap in use at open and clears the flag when it
    // closes; SIGKILL after a write keeps it from closing.
    QemuIoSession::start(
        q.dir.path(),
        &["-f", "qcow2", "crash.qcow2"],
        &write(0x33, 0, 64 * KIB),
        "wrote 65536/65536",
    )
    .kill();
    assert_eq!(
        read_at(&img, 79, 1)[0] & 1,
        1,
        "the dirty bit should be set"
    );

    let src = open(&img);
    let list = src.bitmaps().expect("bitmaps");
    assert!(list[0].in_use && list[0].enabled == Some(true), "{list:?}");
    let err = src.dirty_ranges("b0").expect_err("stale bitmap");
    assert_eq!(err.kind(), ErrorKind::Usage);
    let msg = err.to_string();
    assert!(
        msg.contains("bitmap b0 in image")
            && msg.contains("is in use: QEMU did not close it cleanly")
            && msg.contains("back up without --bitmap once"),
        "{msg}"
    );
    // The data of the dirty image stays readable.
    check_against_qemu(&q, "crash.qcow2");
}

// ---------------------------------------------------------------------------------------------
// Features and damage
// ---------------------------------------------------------------------------------------------

/// Set bits in the big-endian u64 of incompatible features (header bytes 72..80).
fn set_incompatible(path: &Path, bits: u64) {
    let mut field = [0u8; 8];
    field.copy_from_slice(&read_at(path, 72, 8));
    let v = u64::from_be_bytes(field) | bits;
    write_at(path, 72, &v.to_be_bytes());
}

#[test]
fn feature_bits_are_honoured() {
    let Some(q) = Qemu::new("feature_bits_are_honoured") else {
        return;
    };
    let fresh = |name: &str| {
        let p = q.create(name, "4M", &[]);
        q.io(name, &[write(0x42, 0, 100 * KIB)]);
        p
    };
    // Dirty (QEMU did not close the image): refcounts may be stale, data is readable.
    let dirty = fresh("dirty.qcow2");
    set_incompatible(&dirty, 1);
    let src = open(&dirty);
    assert_eq!(read(&*src, 0, 10), vec![0x42; 10]);

    let corrupt = fresh("corrupt.qcow2");
    set_incompatible(&corrupt, 2);
    let err = open_err(&corrupt);
    assert_eq!(err.kind(), ErrorKind::Integrity, "{err:?}");
    assert!(err.to_string().contains("corrupt"), "{err}");

    let unknown = fresh("unknown.qcow2");
    set_incompatible(&unknown, 1 << 9);
    let err = open_err(&unknown);
    assert_eq!(err.kind(), ErrorKind::Unsupported, "{err:?}");
    assert!(
        err.to_string()
            .contains("unsupported qcow2 feature: incompatible feature bit 9"),
        "{err}"
    );

    // Bitmaps whose autoclear bit (header byte 95, bit 0) was cleared by a program without
    // bitmap support: none is listed, and asking for one says why.
    let cleared = fresh("cleared.qcow2");
    q.img(&["bitmap", "--add", "--enable", "cleared.qcow2", "b0"]);
    assert_eq!(open(&cleared).bitmaps().expect("bitmaps").len(), 1);
    write_at(&cleared, 95, &[read_at(&cleared, 95, 1)[0] & !1]);
    let src = open(&cleared);
    assert!(src.bitmaps().expect("bitmaps").is_empty());
    let err = src.dirty_ranges("b0").expect_err("inconsistent bitmaps");
    assert_eq!(err.kind(), ErrorKind::Usage);
    assert!(err.to_string().contains("cannot be trusted"), "{err}");

    q.create("ext.qcow2", "4M", &["-o", "data_file=ext.data"]);
    let err = open_err(&q.path("ext.qcow2"));
    assert_eq!(err.kind(), ErrorKind::Unsupported, "{err:?}");
    assert!(err.to_string().contains("external data file"), "{err}");

    q.create(
        "luks.qcow2",
        "4M",
        &[
            "--object",
            "secret,id=s0,data=x",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=s0",
        ],
    );
    let err = source::open(
        q.path("luks.qcow2").to_str().unwrap(),
        &OpenOptions::default(),
    )
    .err()
    .expect("encrypted image refused");
    assert_eq!(err.kind(), ErrorKind::Unsupported, "{err:?}");
    assert!(
        err.to_string()
            .contains("unsupported qcow2 feature: LUKS encryption"),
        "{err}"
    );
}

#[test]
fn damaged_images_are_errors_naming_what_and_where() {
    let Some(q) = Qemu::new("damaged_images_are_errors_naming_what_and_where") else {
        return;
    };
    let good = q.create("good.qcow2", "8M", &[]);
    q.io("good.qcow2", &[write(0x42, 0, 100 * KIB)]);
    let copy = |name: &str| {
        let p = q.path(name);
        std::fs::copy(&good, &p).expect("copy");
        p
    };
    let expect = |p: &Path, kind: ErrorKind, needles: &[&str]| {
        let err = open_err(p);
        assert_eq!(err.kind(), kind, "{err:?}");
        for n in needles {
            assert!(err.to_string().contains(n), "{err} should contain {n}");
        }
    };

    let short = copy("short.qcow2");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&short)
        .and_then(|f| f.set_len(50))
        .expect("truncate");
    expect(&short, ErrorKind::Integrity, &["short.qcow2", "header"]);

    let l1 = copy("l1.qcow2");
    write_at(&l1, 40, &(1u64 << 40).to_be_bytes());
    expect(
        &l1,
        ErrorKind::Integrity,
        &["l1_table_offset", "file offset 40"],
    );

    let bits = copy("bits.qcow2");
    write_at(&bits, 20, &30u32.to_be_bytes());
    expect(
        &bits,
        ErrorKind::Unsupported,
        &["unsupported qcow2 feature"],
    );

    // The first L1 entry pointing far past the end of the file.
    let l2 = copy("l2.qcow2");
    let mut l1_offset = [0u8; 8];
    l1_offset.copy_from_slice(&read_at(&l2, 40, 8));
    let l1_offset = u64::from_be_bytes(l1_offset);
    write_at(&l2, l1_offset, &(1u64 << 40).to_be_bytes());
    expect(&l2, ErrorKind::Integrity, &["L1 entry 0", "L2 table"]);

    // An image that is its own backing file.
    let looped = copy("loop.qcow2");
    q.img(&[
        "rebase",
        "-u",
        "-b",
        "loop.qcow2",
        "-F",
        "qcow2",
        "loop.qcow2",
    ]);
    expect(
        &looped,
        ErrorKind::Unsupported,
        &["backing chain of more than 16"],
    );

    // A raw file is still a raw file.
    let raw = q.path("plain.raw");
    write_file(&raw, &[0x51; 4096]);
    assert_eq!(open(&raw).kind(), SourceKind::RawFile);
    let err = open_err(&raw);
    assert_eq!(err.kind(), ErrorKind::Usage, "{err:?}");
}

// ---------------------------------------------------------------------------------------------
// Scale
// ---------------------------------------------------------------------------------------------

#[test]
fn terabyte_sparse_image_maps_quickly() {
    let Some(q) = Qemu::new("terabyte_sparse_image_maps_quickly") else {
        return;
    };
    const TIB: u64 = 1 << 40;
    q.create("big.qcow2", "1T", &[]);
    q.img(&["bitmap", "--add", "--enable", "big.qcow2", "b0"]);
    // 64 MiB written since the bitmap: 64 writes of 1 MiB spread over the disk.
    let step = TIB / 64;
    let writes: Vec<(u64, u64)> = (0..64).map(|i| (i * step + 17 * MIB, MIB)).collect();
    let cmds: Vec<String> = writes.iter().map(|&(o, l)| write(0x61, o, l)).collect();
    q.io("big.qcow2", &cmds);

    let t = Instant::now();
    let src = open(&q.path("big.qcow2"));
    let opened = t.elapsed();
    let ranges = src.data_ranges().expect("ranges");
    let mapped = t.elapsed() - opened;
    let changes = src.dirty_ranges("b0").expect("dirty");
    let dirty = t.elapsed() - opened - mapped;
    eprintln!(
        "1 TiB qcow2, 64 MiB written: open {opened:?}, data_ranges {mapped:?} ({} ranges), \
         dirty_ranges {dirty:?} ({} ranges)",
        ranges.len(),
        changes.ranges.len()
    );
    let expected: Vec<Range<u64>> = writes.iter().map(|&(o, l)| o..o + l).collect();
    assert_eq!(ranges, expected);
    assert_eq!(changes.ranges, expected);
    assert_eq!(read(&*src, 17 * MIB, 4096), vec![0x61; 4096]);
    assert!(read(&*src, TIB - MIB, MIB as usize).iter().all(|&b| b == 0));
}
