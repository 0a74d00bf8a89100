//! qcow2 images of many shapes, made by the real `qemu-img` and `qemu-io`, through the whole
//! binary: for each, `inspect` succeeds, and `backup` then `restore` gives exactly what
//! `qemu-img convert -O raw` reads (same size, same bytes). The shapes: cluster sizes 512 B to
//! 2 MiB, disk sizes that are not a multiple of the cluster (or, in a hand-edited header, of
//! 512), extended L2 subclusters over a backing file, zlib and zstd compressed clusters,
//! preallocation, refcount widths, qcow2 v2, a dirty image left by a killed writer, an image
//! a live QEMU process holds open for writing, internal snapshots, backing chains (raw,
//! shorter, relative, 5 deep, rebased, committed, missing), and dirty bitmaps at every
//! granularity (several per image, disabled, merged) driving incremental backups.
//!
//! Every image holds distinct non-zero patterns where it was written, so a cluster read from
//! the wrong place, a zero read as data or data read as zero changes the restored bytes. Needs
//! qemu-img and qemu-io (Debian `qemu-utils`); without them each test prints `SKIP` and
//! passes, except under CI=true, where it fails.

mod common;

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use common::qemu::{assert_write_locked, run_in, QemuIoSession, QEMU};
use common::tools::tools;
use common::*;
use serde_json::Value;

/// A vault, and a folder beside it in which the QEMU tools make the images.
struct Shapes {
    bv: Bv,
}

impl Shapes {
    /// `None` (after a loud SKIP) when qemu-img or qemu-io is missing.
    fn new(test: &str) -> Option<Shapes> {
        tools(test, QEMU).then(|| Shapes { bv: Bv::new() })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.bv.path(name)
    }

    /// Run `tool args...` in the folder; panic with its output if it fails (qemu-io reports a
    /// failed command in its output, not always in its exit code).
    fn run(&self, tool: &str, args: &[&str]) -> String {
        run_in(self.bv.dir.path(), tool, args)
    }

    fn img(&self, args: &[&str]) -> String {
        self.run("qemu-img", args)
    }

    /// `qemu-img create -f qcow2 [-o OPTS] NAME SIZE`.
    fn create(&self, name: &str, size: u64, opts: &str) -> PathBuf {
        let size = size.to_string();
        let mut args = vec!["create", "-q", "-f", "qcow2"];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        args.extend([name, &size]);
        self.img(&args);
        self.path(name)
    }

    /// `qemu-img create` of an overlay on `backing` (a qcow2 image).
    fn overlay(&self, name: &str, backing: &str, size: u64, opts: &str) -> PathBuf {
        let o = format!("backing_file={backing},backing_fmt=qcow2");
        self.create(
            name,
            size,
            &if opts.is_empty() {
                o
            } else {
                format!("{o},{opts}")
            },
        )
    }

    /// Run qemu-io commands on image `name`.
    fn io<S: AsRef<str>>(&self, name: &str, cmds: &[S]) {
        let mut args = vec!["-f", "qcow2"];
        for c in cmds {
            args.extend(["-c", c.as_ref()]);
        }
        args.push(name);
        self.run("qemu-io", &args);
    }

    /// A raw file `name` holding `data`.
    fn raw_file(&self, name: &str, data: &[u8]) -> PathBuf {
        let p = self.path(name);
        write_file(&p, data);
        p
    }

    /// Back up image `name` as a new disk (full), restore it, and check the restore is what
    /// QEMU reads; `inspect` must succeed on it first. Returns the disk name.
    fn round_trip(&self, name: &str) -> String {
        let img = self.path(name);
        self.bv.json(&["inspect", s(&img)]);
        let disk = format!("d{}", unique());
        self.bv.backup(&img, &disk, &[]);
        self.assert_restores(&disk, name);
        disk
    }

    /// Restore the latest snapshot of `disk` and compare it with what `qemu-img convert -O
    /// raw` reads from image `name`: the same size, the same bytes.
    fn assert_restores(&self, disk: &str, name: &str) {
        let expected = self.path(&format!("{name}.{}.qemu.raw", unique()));
        self.img(&["convert", "-O", "raw", name, s(&expected)]);
        let restored = self.path(&format!("{disk}.{}.restored.raw", unique()));
        self.bv.restore(disk, &restored, &[]).ok();
        assert_same_file(&restored, &expected, name);
        std::fs::remove_file(expected).expect("remove");
        std::fs::remove_file(restored).expect("remove");
    }

    /// Overwrite the header's big-endian u64 at `offset` of image `name`.
    fn poke_u64(&self, name: &str, offset: u64, value: u64) {
        write_at(&self.path(name), offset, &value.to_be_bytes());
    }
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// `write -P PAT OFF LEN` for qemu-io.
fn write(pattern: u8, offset: u64, len: u64) -> String {
    format!("write -P {pattern:#x} {offset} {len}")
}

/// Compare two files streaming (images here reach 1 GiB, mostly holes): same size, same
/// bytes, else a panic naming the first differing offset.
fn assert_same_file(actual: &Path, expected: &Path, what: &str) {
    let (la, le) = (
        std::fs::metadata(actual).expect("restored").len(),
        std::fs::metadata(expected).expect("expected").len(),
    );
    assert_eq!(
        la, le,
        "{what}: restored size vs what qemu-img convert reads"
    );
    let (mut a, mut e) = (
        File::open(actual).expect("open"),
        File::open(expected).expect("open"),
    );
    let (mut ba, mut be) = (vec![0; MIB as usize], vec![0; MIB as usize]);
    let mut at = 0;
    while at < le {
        let n = (le - at).min(MIB) as usize;
        a.read_exact(&mut ba[..n]).expect("read restored");
        e.read_exact(&mut be[..n]).expect("read expected");
        if ba[..n] != be[..n] {
            let i = (0..n).find(|&i| ba[i] != be[i]).expect("a difference");
            panic!(
                "{what}: restored byte at offset {} is {:#04x}, QEMU reads {:#04x}",
                at + i as u64,
                ba[i],
                be[i]
            );
        }
        at += n as u64;
    }
}

/// Writes that make a disk of `size` bytes with `cluster`-byte clusters non-trivial: data at
/// the start, unaligned data across a cluster boundary, a zero write over data, and the very
/// last bytes.
fn shape_writes(size: u64, cluster: u64) -> Vec<String> {
    // Three clusters in where the disk is big enough (one 512-byte cluster is too short).
    let boundary = if 3 * cluster + 800 < size {
        3 * cluster
    } else {
        cluster
    };
    vec![
        write(0xa1, 0, 4 * KIB),
        write(0xa2, boundary - 700, 1500),
        write(0xa3, size / 2 + 123, 70_000),
        format!("write -z {} {}", size / 2 + 4096, 8192),
        write(0xa4, size - 3000, 3000),
    ]
}

// ---------------------------------------------------------------------------------------------
// Geometry
// ---------------------------------------------------------------------------------------------

#[test]
fn cluster_sizes_and_disk_sizes_not_a_multiple_of_the_cluster_round_trip() {
    let Some(t) =
        Shapes::new("cluster_sizes_and_disk_sizes_not_a_multiple_of_the_cluster_round_trip")
    else {
        return;
    };
    for (cluster, size) in [
        (512, 100 * MIB + 3584),
        (4 * KIB, 1024 * MIB + 512),
        (64 * KIB, 100 * MIB + 3584),
        (2 * MIB, 1024 * MIB + 512),
        (2 * MIB, 5 * MIB + 512),
    ] {
        let name = format!("c{cluster}-{size}.qcow2");
        t.create(&name, size, &format!("cluster_size={cluster}"));
        t.io(&name, &shape_writes(size, cluster));
        t.round_trip(&name);
    }
}

/// QEMU counts a qcow2 disk in 512-byte sectors and drops a partial last one (qemu-img never
/// writes such a size, other writers may): the guest, `qemu-img info` and `convert` see the
/// size rounded down, and so must the backup.
#[test]
fn a_size_not_a_multiple_of_512_reads_as_qemu_reads_it() {
    let Some(t) = Shapes::new("a_size_not_a_multiple_of_512_reads_as_qemu_reads_it") else {
        return;
    };
    let size = 7 * MIB + 512;
    t.create("odd.qcow2", size, "");
    t.io("odd.qcow2", &[write(0x5c, 0, size)]);
    // Header field `size`: bytes 24..32.
    t.poke_u64("odd.qcow2", 24, 7 * MIB + 100);
    let doc = t.bv.json(&["inspect", s(&t.path("odd.qcow2"))]);
    assert_eq!(num(&doc, "size"), 7 * MIB, "{doc}");
    t.round_trip("odd.qcow2");
}

// ---------------------------------------------------------------------------------------------
// Extended L2, compression, creation options
// ---------------------------------------------------------------------------------------------

/// Subclusters over a backing file full of data: each of data, zero (`write -z`, `write -z
/// -u`) and unallocated (`discard`) reads differently, so a subcluster of the wrong state
/// changes the restore.
#[test]
fn extended_l2_subclusters_over_a_backing_file_round_trip() {
    let Some(t) = Shapes::new("extended_l2_subclusters_over_a_backing_file_round_trip") else {
        return;
    };
    let size = 12 * MIB + 3584;
    t.raw_file("below.raw", &random_data(7, size as usize));
    t.img(&[
        "convert",
        "-q",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "below.raw",
        "below.qcow2",
    ]);
    for cluster in [64 * KIB, 2 * MIB] {
        let sub = cluster / 32;
        let name = format!("el2-{cluster}.qcow2");
        t.overlay(
            &name,
            "below.qcow2",
            size,
            &format!("cluster_size={cluster},extended_l2=on"),
        );
        t.io(
            &name,
            &[
                write(0x11, 1000, 3000),
                write(0x12, cluster + 3 * sub + 17, 5),
                format!("write -z {} {}", 2 * cluster + sub, 2 * sub),
                write(0x13, 4 * MIB, cluster),
                format!("write -z -u {} {}", 4 * MIB + 2 * sub, 3 * sub),
                format!("discard {} {}", 4 * MIB + 8 * sub, 4 * sub),
                format!("write -z {} {}", 6 * MIB, cluster),
                write(0x14, size - 1500, 1500),
            ],
        );
        t.round_trip(&name);
    }
    // Preallocated over a backing file (QEMU allows it only with subclusters): every cluster
    // has a host offset in a sparse file, and its unwritten subclusters still read from below.
    let name = "el2-prealloc.qcow2";
    t.overlay(
        name,
        "below.qcow2",
        size,
        "extended_l2=on,preallocation=metadata",
    );
    t.io(
        name,
        &[
            write(0x15, 300 * KIB, 1),
            "write -z 1M 64k".to_string(),
            "write -z -u 2M 4k".to_string(),
        ],
    );
    t.round_trip(name);
}

/// Every cluster compressed by `qemu-img convert -c`, and compressed writes by qemu-io over
/// an image with plain data in between, with zlib and zstd, clusters of 4 KiB to 2 MiB:
/// compressed clusters start at any byte and cross sector boundaries, and the last one ends
/// at the end of the file.
#[test]
fn compressed_clusters_round_trip() {
    let Some(t) = Shapes::new("compressed_clusters_round_trip") else {
        return;
    };
    let size = 6 * MIB + 3584;
    let mut data = mixed_data(11, size as usize);
    data[size as usize - 3584..].copy_from_slice(&text_data(12, 3584));
    t.raw_file("src.raw", &data);
    for kind in ["zlib", "zstd"] {
        for cluster in [4 * KIB, 64 * KIB, 2 * MIB] {
            let name = format!("conv-{kind}-{cluster}.qcow2");
            let opts = format!("compression_type={kind},cluster_size={cluster}");
            t.img(&[
                "convert", "-q", "-c", "-f", "raw", "-O", "qcow2", "-o", &opts, "src.raw", &name,
            ]);
            t.round_trip(&name);
        }
        let name = format!("io-{kind}.qcow2");
        t.create(&name, 4 * MIB, &format!("compression_type={kind}"));
        t.io(
            &name,
            &[
                "write -c -s src.raw 0 1M".to_string(),
                write(0x21, 128 * KIB + 512, 512),
                format!("write -c -P 0x22 {} 64k", 4 * MIB - 64 * KIB),
            ],
        );
        t.round_trip(&name);
    }
}

#[test]
fn preallocation_refcount_widths_and_v2_round_trip() {
    let Some(t) = Shapes::new("preallocation_refcount_widths_and_v2_round_trip") else {
        return;
    };
    let size = 24 * MIB + 3584;
    for (i, opts) in [
        "preallocation=metadata",
        "preallocation=falloc",
        "preallocation=full",
        "preallocation=metadata,compat=0.10",
        "preallocation=metadata,extended_l2=on",
        "refcount_bits=1",
        "refcount_bits=64",
        "compat=0.10",
        "compat=0.10,cluster_size=4k",
    ]
    .iter()
    .enumerate()
    {
        let name = format!("opts{i}.qcow2");
        t.create(&name, size, opts);
        t.io(&name, &shape_writes(size, 64 * KIB));
        t.round_trip(&name);
    }
}

/// `preallocation=metadata` gives every cluster a host offset in a sparse file: the holes
/// read as zeros, so a backup reads what was written, not the virtual size (it read all of it
/// before).
#[test]
fn a_metadata_preallocated_image_reads_only_what_was_written() {
    let Some(t) = Shapes::new("a_metadata_preallocated_image_reads_only_what_was_written") else {
        return;
    };
    let size = 256 * MIB;
    for (i, opts) in [
        "preallocation=metadata",
        "preallocation=metadata,compat=0.10",
    ]
    .iter()
    .enumerate()
    {
        let name = format!("pm{i}.qcow2");
        t.create(&name, size, opts);
        t.io(
            &name,
            &[
                write(0xe1, MIB + 3, 10 * KIB),
                write(0xe2, size - 4 * KIB, 4 * KIB),
            ],
        );
        let disk = format!("pm{i}");
        let doc = t.bv.backup(&t.path(&name), &disk, &[]);
        let read = num(&doc, "bytes_read");
        assert!(
            read <= 2 * MIB,
            "read {read} of a 256 MiB image holding 14 KiB: {doc}"
        );
        t.assert_restores(&disk, &name);
    }
}

// ---------------------------------------------------------------------------------------------
// Images other processes had open
// ---------------------------------------------------------------------------------------------

/// `qemu-io -f qcow2 [-r] NAME` in the shapes folder, once it answered `cmd` with `answer`
/// (so it has the image open, and locked).
fn session(t: &Shapes, name: &str, read_only: bool, cmd: &str, answer: &str) -> QemuIoSession {
    let mut args = vec!["-f", "qcow2", name];
    if read_only {
        args.insert(0, "-r");
    }
    QemuIoSession::start(t.bv.dir.path(), &args, cmd, answer)
}

/// Decision: an image whose writer died (the dirty bit of lazy refcounts set) is read as
/// QEMU reads it — only its refcounts may be stale, and they are never read — so it backs up
/// exactly what `qemu-img convert` reads from it.
#[test]
fn a_dirty_image_left_by_a_killed_writer_reads_as_qemu_reads_it() {
    let Some(t) = Shapes::new("a_dirty_image_left_by_a_killed_writer_reads_as_qemu_reads_it")
    else {
        return;
    };
    t.create("lazy.qcow2", 16 * MIB, "lazy_refcounts=on");
    t.io("lazy.qcow2", &[write(0x31, 0, MIB)]);
    let cmd = write(0x32, 5 * MIB + 512, 100 * KIB);
    session(&t, "lazy.qcow2", false, &cmd, "wrote").kill();
    // Incompatible feature bit 0 (dirty): the last byte of header bytes 72..80.
    assert_eq!(read_at(&t.path("lazy.qcow2"), 79, 1)[0] & 1, 1, "dirty bit");
    t.round_trip("lazy.qcow2");
}

/// A process that may write the image (it holds QEMU's write lock) keeps metadata in memory:
/// the image is refused, by backup and inspect alike, and backs up normally once the process
/// is gone. A read-only user (`qemu-io -r`) does not block it. While the reader holds the
/// image open, a QEMU writer cannot open it.
#[test]
fn an_image_open_for_writing_is_refused() {
    let Some(t) = Shapes::new("an_image_open_for_writing_is_refused") else {
        return;
    };
    t.bv.run(&["init"]).ok();
    t.create("live.qcow2", 16 * MIB, "");
    t.io("live.qcow2", &[write(0x41, 0, MIB)]);
    let img = t.path("live.qcow2");
    let writer = session(
        &t,
        "live.qcow2",
        false,
        &write(0x42, 3 * MIB, 64 * KIB),
        "wrote",
    );
    for args in [
        vec!["backup", s(&img), "--disk", "live"],
        vec!["inspect", s(&img)],
    ] {
        t.bv.run(&args).code(2).stderr_has(&[
            "live.qcow2 is open for writing by another process",
            "QEMU's write lock",
        ]);
    }
    writer.kill();
    assert!(t.bv.snapshots().is_empty(), "no snapshot while it was open");

    let reader = session(&t, "live.qcow2", true, "read 0 512", "read 512/512");
    t.round_trip("live.qcow2");
    reader.kill();
    assert_eq!(t.bv.snapshots().len(), 1);

    // While the reader has the image open, no QEMU process may start writing it; once it is
    // closed, one may.
    let open = blockvault::source::Qcow2::open(s(&img)).expect("open");
    assert_write_locked("qcow2", &img);
    drop(open);
    t.io("live.qcow2", &[write(0x43, 0, 512)]);
}

// ---------------------------------------------------------------------------------------------
// Snapshots and backing chains
// ---------------------------------------------------------------------------------------------

/// Internal snapshots keep old L1 tables in the file: the active one must be read, also after
/// a snapshot is deleted, applied, and the disk resized.
#[test]
fn internal_snapshots_leave_the_active_l1_read() {
    let Some(t) = Shapes::new("internal_snapshots_leave_the_active_l1_read") else {
        return;
    };
    for (i, opts) in ["", "compat=0.10", "extended_l2=on", "cluster_size=4k"]
        .iter()
        .enumerate()
    {
        let name = format!("snap{i}.qcow2");
        t.create(&name, 20 * MIB, opts);
        t.io(&name, &[write(0x51, 0, 4 * MIB)]);
        t.img(&["snapshot", "-c", "s1", &name]);
        t.io(
            &name,
            &[
                write(0x52, MIB, MIB),
                "write -z 3M 64k".to_string(),
                "discard 0 64k".to_string(),
            ],
        );
        t.img(&["snapshot", "-c", "s2", &name]);
        t.io(
            &name,
            &[write(0x53, 1536 * KIB, 8 * KIB), write(0x54, 10 * MIB, MIB)],
        );
        t.img(&["snapshot", "-d", "s1", &name]);
        t.io(&name, &[write(0x55, 0, 4 * KIB)]);
        t.round_trip(&name);
    }
    t.img(&["resize", "-q", "snap0.qcow2", "300M"]);
    t.io("snap0.qcow2", &[write(0x56, 250 * MIB, MIB)]);
    t.round_trip("snap0.qcow2");
    t.img(&["snapshot", "-a", "s2", "snap0.qcow2"]);
    t.io("snap0.qcow2", &[write(0x57, 2 * MIB, 100 * KIB)]);
    t.round_trip("snap0.qcow2");
}

/// Raw and qcow2 backing files shorter than the overlay, of other cluster sizes, named
/// relative to the overlay's folder (the binary runs elsewhere), five deep with extended L2
/// and compressed clusters, and the results of `qemu-img rebase` and `commit`.
#[test]
fn backing_chain_shapes_round_trip() {
    let Some(t) = Shapes::new("backing_chain_shapes_round_trip") else {
        return;
    };
    std::fs::create_dir_all(t.path("sub/deeper")).expect("mkdir");
    // A raw base shorter than the overlay, not a multiple of 512.
    t.raw_file("sub/base.raw", &random_data(21, 3 * MIB as usize + 1000));
    t.create(
        "ov.qcow2",
        10 * MIB,
        "backing_file=sub/base.raw,backing_fmt=raw",
    );
    t.io(
        "ov.qcow2",
        &[write(0x61, 64 * KIB, 4 * KIB), "write -z 1M 64k".into()],
    );
    t.round_trip("ov.qcow2");

    // Five qcow2 images, each naming the one below relative to its own folder.
    let size0 = 2 * MIB + 512;
    t.create("sub/deeper/b0.qcow2", size0, "cluster_size=4k");
    t.io("sub/deeper/b0.qcow2", &[write(0xb0, 0, size0)]);
    t.overlay(
        "sub/b1.qcow2",
        "deeper/b0.qcow2",
        5 * MIB,
        "cluster_size=2M",
    );
    t.io("sub/b1.qcow2", &[write(0xb1, MIB, 4 * KIB)]);
    t.overlay("b2.qcow2", "sub/b1.qcow2", 7 * MIB, "cluster_size=512");
    t.io(
        "b2.qcow2",
        &[write(0xb2, 1_500_000, 1000), "write -z 2M 512".into()],
    );
    t.overlay("b3.qcow2", "b2.qcow2", 9 * MIB, "extended_l2=on");
    t.io(
        "b3.qcow2",
        &[
            write(0xb3, 2_000_000, 100),
            "write -z -u 2097152 2048".into(),
            "discard 4096 2048".into(),
            "write -z 1M 1024".into(),
        ],
    );
    t.overlay("b4.qcow2", "b3.qcow2", 9 * MIB, "");
    t.io("b4.qcow2", &["write -c -P 0xb4 0 64k".to_string()]);
    for name in ["sub/b1.qcow2", "b2.qcow2", "b3.qcow2", "b4.qcow2"] {
        t.round_trip(name);
    }
    // Relative names resolve against each image's folder, not the working directory.
    let elsewhere = tempfile::tempdir().expect("tempdir");
    let mut c = t.bv.command();
    c.current_dir(elsewhere.path());
    t.bv.run_cmd(c, &["backup", s(&t.path("b4.qcow2")), "--disk", "far"])
        .ok();
    t.assert_restores("far", "b4.qcow2");

    // Rebase b3 onto b0 (copying what b2 and b1 held), then commit b4 into it.
    t.img(&[
        "rebase",
        "-q",
        "-b",
        "sub/deeper/b0.qcow2",
        "-F",
        "qcow2",
        "b3.qcow2",
    ]);
    t.round_trip("b3.qcow2");
    t.round_trip("b4.qcow2");
    t.img(&["commit", "-q", "b4.qcow2"]);
    t.round_trip("b3.qcow2");
}

/// A raw backing file on a block device (an overlay on an LVM volume or a LUN; here a loop
/// device, shorter than the overlay) reads like a raw file; a qcow2 image on a block device
/// as backing file is refused by name. Needs root for the loop device.
#[test]
fn a_raw_backing_file_on_a_block_device_round_trips() {
    let test = "a_raw_backing_file_on_a_block_device_round_trips";
    let Some(t) = Shapes::new(test) else {
        return;
    };
    let base = t.raw_file("lv.raw", &random_data(41, 6 * MIB as usize));
    let Some(dev) = LoopDev::attach(&base, test) else {
        return;
    };
    let o = format!("backing_file={},backing_fmt=raw", s(&dev.path));
    t.create("on-device.qcow2", 9 * MIB, &o);
    t.io(
        "on-device.qcow2",
        &[
            write(0xd1, MIB + 512, 4 * KIB),
            write(0xd2, 8 * MIB, 4 * KIB),
        ],
    );
    t.round_trip("on-device.qcow2");

    t.create("inner.qcow2", 6 * MIB, "");
    t.io("inner.qcow2", &[write(0xd3, 0, MIB)]);
    let inner = read_file(&t.path("inner.qcow2"));
    write_at(&base, 0, &inner);
    let o = format!("backing_file={},backing_fmt=qcow2", s(&dev.path));
    t.create("on-qcow2-device.qcow2", 6 * MIB, &o);
    t.bv.run(&["inspect", s(&t.path("on-qcow2-device.qcow2"))])
        .failed()
        .stderr_has(&["unsupported qcow2 feature: a qcow2 backing file on a block device"]);
}

/// `qemu-img rebase -u` onto a file that does not exist: a clear error naming the overlay
/// and the missing file, and no snapshot.
#[test]
fn an_overlay_rebased_onto_a_missing_file_names_it() {
    let Some(t) = Shapes::new("an_overlay_rebased_onto_a_missing_file_names_it") else {
        return;
    };
    t.bv.run(&["init"]).ok();
    t.create("top.qcow2", 4 * MIB, "");
    t.io("top.qcow2", &[write(0x71, 0, 64 * KIB)]);
    t.img(&[
        "rebase",
        "-u",
        "-b",
        "gone/base.qcow2",
        "-F",
        "qcow2",
        "top.qcow2",
    ]);
    let img = t.path("top.qcow2");
    for args in [
        vec!["backup", s(&img), "--disk", "top"],
        vec!["inspect", s(&img)],
    ] {
        t.bv.run(&args).failed().stderr_has(&[
            "backing file of qcow2 image",
            "top.qcow2",
            "gone/base.qcow2",
        ]);
    }
    assert!(t.bv.snapshots().is_empty());
}

// ---------------------------------------------------------------------------------------------
// Dirty bitmaps
// ---------------------------------------------------------------------------------------------

/// Bytes a bitmap of `granularity` marks for `writes`, clipped to `size`.
fn marked(writes: &[(u64, u64)], granularity: u64, size: u64) -> u64 {
    let mut r: Vec<(u64, u64)> = writes
        .iter()
        .map(|&(o, l)| {
            (
                o / granularity * granularity,
                ((o + l).div_ceil(granularity) * granularity).min(size),
            )
        })
        .collect();
    r.sort();
    let (mut total, mut end) = (0, 0);
    for (a, b) in r {
        let a = a.max(end);
        if b > a {
            total += b - a;
            end = b;
        }
    }
    total
}

/// `backup --bitmap NAME --verify-unchanged 0`: trusting the bitmap alone, so a granule it
/// marks but the reader missed would be carried over stale and show in the restore. Checks
/// the bytes read cover what the bitmap marks.
fn bitmap_backup(t: &Shapes, img: &str, disk: &str, bitmap: &str, marked: u64) {
    let doc: Value = t.bv.json(&[
        "backup",
        s(&t.path(img)),
        "--disk",
        disk,
        "--bitmap",
        bitmap,
        "--verify-unchanged",
        "0",
    ]);
    assert_eq!(doc["change_source"], "bitmap", "{doc}");
    let read = num(&doc, "bytes_read");
    assert!(
        read >= marked && read <= marked + 64 * KIB,
        "{img} bitmap {bitmap}: read {read} for {marked} marked bytes: {doc}"
    );
    t.assert_restores(disk, img);
}

/// Bitmaps of granularity 512 B to 2 MiB on a disk whose size is a multiple of none of them
/// but 512, with writes in the last, partial granule; bitmaps on images of 512 B, 4 KiB and
/// 2 MiB clusters (bitmap tables and data clusters of every size).
#[test]
fn bitmaps_of_every_granularity_drive_exact_incrementals() {
    let Some(t) = Shapes::new("bitmaps_of_every_granularity_drive_exact_incrementals") else {
        return;
    };
    let size = 12 * MIB + 3584;
    let writes = [
        (size - 512, 512),
        (size - 4000, 100),
        (12345, 1),
        (6 * MIB - 1, 2),
        (9 * MIB, 4 * KIB),
    ];
    for (i, (cluster, granularity)) in [
        (64 * KIB, 512),
        (64 * KIB, 4 * KIB),
        (64 * KIB, 64 * KIB),
        (64 * KIB, 2 * MIB),
        (512, 512),
        (4 * KIB, 64 * KIB),
        (2 * MIB, 4 * KIB),
    ]
    .into_iter()
    .enumerate()
    {
        let name = format!("bm{i}.qcow2");
        t.create(&name, size, &format!("cluster_size={cluster}"));
        t.io(&name, &[write(0x81, 0, size)]);
        // The bitmap before the full backup: it records every write after it.
        let g = granularity.to_string();
        t.img(&["bitmap", "--add", "--enable", "-g", &g, &name, "b"]);
        let disk = t.round_trip(&name);
        let cmds: Vec<String> = writes
            .iter()
            .enumerate()
            .map(|(j, &(o, l))| write(0x90 + j as u8, o, l))
            .collect();
        t.io(&name, &cmds);
        bitmap_backup(&t, &name, &disk, "b", marked(&writes, granularity, size));
    }
}

/// Several bitmaps in one image (long and short names, different granularities, created at
/// different times), a disabled one (refused), and one made by merging two others and then
/// enabled: each drives an exact incremental of what it recorded.
#[test]
fn several_disabled_and_merged_bitmaps_in_one_image() {
    let Some(t) = Shapes::new("several_disabled_and_merged_bitmaps_in_one_image") else {
        return;
    };
    let size = 24 * MIB + 3584;
    let img = "multi.qcow2";
    t.create(img, size, "");
    t.io(img, &[write(0xc1, 0, size)]);
    let disk = t.round_trip(img);
    let long = "a-long-bitmap-name-whose-entry-needs-padding-to-eight-bytes";
    t.img(&["bitmap", "--add", "--enable", "-g", "512", img, long]);
    t.img(&["bitmap", "--add", "--enable", "-g", "2M", img, "big"]);
    let first = [(size - 512, 512), (12345, 1), (9 * MIB - 1, 2)];
    t.io(
        img,
        &[
            write(0xc2, first[0].0, 512),
            write(0xc3, 12345, 1),
            write(0xc4, 9 * MIB - 1, 2),
        ],
    );
    t.img(&["bitmap", "--add", "--enable", img, "later"]);
    t.img(&["bitmap", "--add", "--disable", "-g", "4096", img, "merged"]);
    t.img(&["bitmap", "--merge", long, img, "merged"]);
    t.img(&["bitmap", "--merge", "later", img, "merged"]);
    let doc = t.bv.json(&["inspect", s(&t.path(img))]);
    assert_eq!(doc["bitmaps"].as_array().map(Vec::len), Some(4), "{doc}");
    t.bv.run(&[
        "backup",
        s(&t.path(img)),
        "--disk",
        &disk,
        "--bitmap",
        "merged",
    ])
    .code(2)
    .stderr_has(&["bitmap merged", "is disabled"]);
    t.img(&["bitmap", "--enable", img, "merged"]);
    // A backup that records all four as recording, so each has its lineage to it.
    t.bv.backup(&t.path(img), &disk, &[]);
    let second = [(17 * MIB + 100, 5000)];
    t.io(img, &[write(0xc5, second[0].0, second[0].1)]);
    let all: Vec<(u64, u64)> = first.iter().chain(&second).copied().collect();
    // Each backup re-reads what the bitmap marks since it was made (bitmaps are not cleared).
    bitmap_backup(&t, img, &disk, "merged", marked(&all, 4 * KIB, size));
    bitmap_backup(&t, img, &disk, long, marked(&all, 512, size));
    bitmap_backup(&t, img, &disk, "big", marked(&all, 2 * MIB, size));
    bitmap_backup(&t, img, &disk, "later", marked(&second, 64 * KIB, size));
}
