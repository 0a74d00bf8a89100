//! `qcow2`: the native qcow2 reader (`source::Qcow2`) on arbitrary image files.
//!
//! The reader opens files (an image names its backing files by path), so each input is written
//! to `image.qcow2` in a folder of this process (`$BLOCKVAULT_FUZZ_TMP` if set, else /dev/shm
//! when there is one, else the system temp folder) and opened from there; a backing file name
//! in the input resolves in that folder, where the image itself is the only file. Whatever
//! opens must then answer, with errors but never a panic, a hang or an unbounded allocation:
//! `data_ranges` (checked sorted, disjoint, non-empty and within the size), reads of the
//! disk's first and last 4 KiB and of the start of its first data ranges, the bitmap list
//! and every bitmap's dirty ranges (checked the same way).
//!
//! Seeds (with `BLOCKVAULT_FUZZ_SEED_DIR` set and qemu-img/qemu-io installed): small images made
//! by the real tools — 512-byte and 4 KiB clusters, v2 and v3, zero clusters, compressed
//! clusters (zlib and zstd), extended L2 entries, a dirty bitmap.
#![no_main]

use std::ops::Range;
use std::path::PathBuf;
use std::process::Command;

use blockvault::source::{Access, Qcow2, Source};
use blockvault_fuzz::{outcome, write_seeds};
use libfuzzer_sys::fuzz_target;

/// Bytes read per probe: enough to cross clusters of every size up to 64 KiB.
const PROBE: u64 = 80 * 1024;

fn dir() -> &'static PathBuf {
    blockvault_fuzz::scratch_dir("qcow2")
}

/// Small images made by qemu-img and qemu-io; none when the tools are missing.
fn seeds() -> Vec<Vec<u8>> {
    let d = dir().join("seeds");
    std::fs::create_dir_all(&d).expect("seed folder");
    let run = |tool: &str, args: &[&str]| {
        Command::new(tool)
            .args(args)
            .current_dir(&d)
            .output()
            .is_ok_and(|o| o.status.success())
    };
    let writes = [
        "-c",
        "write -P 0xab 0 3k",
        "-c",
        "write -z 8k 8k",
        "-c",
        "write -P 0x12 60k 5k",
    ];
    let mut out = Vec::new();
    for (name, opts) in [
        ("v3-512", "cluster_size=512"),
        ("v2-512", "cluster_size=512,compat=0.10"),
        ("v3-4k", "cluster_size=4096"),
        ("ext-16k", "cluster_size=16384,extended_l2=on"),
    ] {
        let ok = run(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", "-o", opts, name, "128k"],
        ) && (!name.starts_with("v3-4k")
            || run(
                "qemu-img",
                &["bitmap", "--add", "--enable", "-g", "4096", name, "b0"],
            ));
        let mut io = vec!["-f", "qcow2"];
        io.extend_from_slice(&writes);
        io.push(name);
        if ok && run("qemu-io", &io) {
            out.extend(std::fs::read(d.join(name)));
        }
        for compression in ["zlib", "zstd"] {
            let c = format!("{name}-{compression}");
            let opts = format!("cluster_size=512,compression_type={compression}");
            if ok
                && run(
                    "qemu-img",
                    &["convert", "-c", "-O", "qcow2", "-o", &opts, name, &c],
                )
            {
                out.extend(std::fs::read(d.join(&c)));
            }
        }
    }
    if out.is_empty() {
        eprintln!("qcow2 seeds: qemu-img/qemu-io are missing; starting without seeds");
    }
    out
}

/// Check a range list's shape: sorted, disjoint, non-empty, within `size`.
fn check_ranges(what: &str, ranges: &[Range<u64>], size: u64) {
    for r in ranges {
        assert!(r.start < r.end && r.end <= size, "{what}: {r:?} in {size}");
    }
    for w in ranges.windows(2) {
        assert!(
            w[0].end < w[1].start,
            "{what}: unsorted or unmerged {ranges:?}"
        );
    }
}

fuzz_target!(
    init: { write_seeds(seeds) },
    |data: &[u8]| {
        let path = dir().join("image.qcow2");
        std::fs::write(&path, data).expect("writing the image");
        let opened = Qcow2::open(path.to_str().expect("utf-8 temp path"));
        outcome("open", &opened);
        let Ok(q) = opened else {
            return;
        };
        let size = q.size();
        let Access::Translated(reader) = q.access() else {
            panic!("a qcow2 source reads through ReadAt");
        };
        let ranges = q.data_ranges();
        outcome("data_ranges", &ranges);
        let mut probes = vec![0..size.min(4096), size.saturating_sub(4096)..size];
        if let Ok(ranges) = &ranges {
            check_ranges("data_ranges", ranges, size);
            probes.extend(ranges.iter().take(4).map(|r| r.start..r.end.min(r.start + PROBE)));
        }
        for p in probes.into_iter().filter(|p| !p.is_empty()) {
            let mut buf = vec![0; (p.end - p.start) as usize];
            let r = reader.read_at(p.start, &mut buf);
            outcome("read_at", &r);
        }
        let bitmaps = q.bitmaps();
        outcome("bitmaps", &bitmaps);
        for b in bitmaps.iter().flatten() {
            let r = q.dirty_ranges(&b.name);
            outcome("dirty_ranges", &r);
            if let Ok(c) = r {
                check_ranges("dirty_ranges", &c.ranges, u64::MAX);
                assert!(c.ranges.iter().all(|r| r.end <= size), "dirty range past {size}");
            }
        }
    }
);
