//! Per-slot worker kernels on 1 MiB buffers (the default slot size), one criterion group per
//! kernel, throughput in bytes of plaintext.
//!
//! Quick run: `cargo bench --bench kernels -- --warm-up-time 1 --measurement-time 2`
//! One group: `cargo bench --bench kernels -- zstd`; the infrastructure encryption layer on a
//! 32 MiB pack: `cargo bench --bench kernels -- aes256xts`
//!
//! Data:
//! - *compressible*: 1 MiB of real files (ELF binaries, shared libraries, text, locale data)
//!   read from /usr at start-up in a fixed order, up to 64 KiB from each file, so the mix
//!   resembles an OS disk; generated text if /usr yields too little. `BENCH_DATA=FILE[@OFFSET]`
//!   takes the 1 MiB from a file instead (e.g. the reference image:
//!   `BENCH_DATA=/work/bench/disk.raw@1073741824`);
//! - *random*: a fixed-seed PRNG stream (the incompressible case: encrypted data, media);
//! - *zero*: all zeros (the zero check's worst case: it scans every byte).

use std::collections::HashMap;
use std::fs;
use std::hint::black_box;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};

use blockvault::crypto::{AeadKey, ExtentId, GenerationKeys, IdentityKeys, Secret32};
use blockvault::engine::worker::{is_zero, Compression, Outcome, Recycler, WorkerContext};
use blockvault::vault::frame::{self, Binding};
use blockvault::vault::manifest::ExtentLoc;
use blockvault::vault::store::xts::{InfraCipher, InfraKey};

const MIB: usize = 1 << 20;
/// Bytes taken from one file, so one big library does not make the whole buffer.
const PER_FILE: usize = 64 << 10;
/// The worker's trial sample (`worker::TRIAL_LEN`, private there).
const TRIAL_LEN: usize = 64 << 10;

/// Files under `dir`, sorted, depth-first, regular files only, at most `limit` of them.
fn walk(dir: &Path, out: &mut Vec<PathBuf>, limit: usize) {
    let Ok(rd) = fs::read_dir(dir) else { return };
    let mut entries: Vec<_> = rd.filter_map(|e| e.ok()).collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        if out.len() >= limit {
            return;
        }
        let Ok(ft) = e.file_type() else { continue };
        if ft.is_dir() {
            walk(&e.path(), out, limit);
        } else if ft.is_file() {
            out.push(e.path());
        }
    }
}

/// 1 MiB of real files from /usr: a quarter each from binaries, libraries, docs/text and
/// other shared data. Falls back to generated text for whatever it cannot fill.
fn compressible() -> (Vec<u8>, String) {
    if let Ok(spec) = std::env::var("BENCH_DATA") {
        return from_file(&spec);
    }
    let sources = [
        "/usr/bin",
        "/usr/lib/x86_64-linux-gnu",
        "/usr/share/doc",
        "/usr/share",
    ];
    let quota = MIB / sources.len();
    let mut buf = Vec::with_capacity(MIB);
    let mut used = Vec::new();
    for dir in sources {
        let target = buf.len() + quota;
        let mut files = Vec::new();
        walk(Path::new(dir), &mut files, 4096);
        let mut n = 0;
        // Stride through the sorted list so the sample is not one package's files.
        let stride = (files.len() / 64).max(1);
        for f in files.iter().step_by(stride) {
            if buf.len() >= target {
                break;
            }
            let Ok(file) = fs::File::open(f) else {
                continue;
            };
            let want = PER_FILE.min(target - buf.len());
            let before = buf.len();
            if file.take(want as u64).read_to_end(&mut buf).is_err() {
                buf.truncate(before);
                continue;
            }
            n += usize::from(buf.len() > before);
        }
        if n > 0 {
            used.push(format!("{dir} ({n} files)"));
        }
    }
    let mut generated = false;
    let mut i = 0u64;
    while buf.len() < MIB {
        generated = true;
        let line = format!(
            "{i:08} INFO worker[{}] slot {} stored {} bytes in pack {:x}, ratio {}.{}\n",
            i % 7,
            i * 13 % 4096,
            (i * 7919) % 1_048_576,
            i / 100,
            i % 5,
            i % 10
        );
        buf.extend_from_slice(line.as_bytes());
        i += 1;
    }
    buf.truncate(MIB);
    if generated {
        used.push("generated text".into());
    }
    (buf, used.join(", "))
}

/// 1 MiB of `FILE[@OFFSET]`.
fn from_file(spec: &str) -> (Vec<u8>, String) {
    use std::os::unix::fs::FileExt;
    let (path, offset) = match spec.rsplit_once('@') {
        Some((p, o)) => (p, o.parse::<u64>().expect("BENCH_DATA offset: bytes")),
        None => (spec, 0),
    };
    let f = fs::File::open(path).unwrap_or_else(|e| panic!("BENCH_DATA {path}: {e}"));
    let mut buf = vec![0u8; MIB];
    f.read_exact_at(&mut buf, offset)
        .unwrap_or_else(|e| panic!("BENCH_DATA {path}: 1 MiB at {offset}: {e}"));
    assert!(!is_zero(&buf), "BENCH_DATA {spec}: all zeros");
    (buf, format!("{path} at offset {offset}"))
}

/// 1 MiB from a fixed-seed splitmix64: incompressible, reproducible.
fn random() -> Vec<u8> {
    let mut s: u64 = 0x5eed_0000_0000_0001;
    let mut buf = Vec::with_capacity(MIB);
    while buf.len() < MIB {
        s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        buf.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    buf
}

struct Fixture {
    compressible: Vec<u8>,
    random: Vec<u8>,
    zero: Vec<u8>,
    identity: IdentityKeys,
    keys: Arc<GenerationKeys>,
    binding: Binding,
    empty: HashMap<ExtentId, ExtentLoc>,
}

impl Fixture {
    fn new() -> Self {
        let (compressible, origin) = compressible();
        let ratio = compressible.len() as f64
            / zstd::bulk::compress(&compressible, 1).expect("zstd").len() as f64;
        eprintln!("compressible data: {origin}; zstd-1 ratio {ratio:.2}");
        let dek = Secret32::from_bytes([0x42; 32]);
        Fixture {
            compressible,
            random: random(),
            zero: vec![0; MIB],
            identity: IdentityKeys::derive(&dek),
            keys: Arc::new(GenerationKeys::derive(&dek)),
            binding: Binding {
                vault_id: [1; 16],
                disk_id: [2; 16],
            },
            empty: HashMap::new(),
        }
    }

    fn ctx<'a>(
        &'a self,
        known: &'a HashMap<ExtentId, ExtentLoc>,
        level: Option<i32>,
    ) -> WorkerContext<'a> {
        WorkerContext {
            binding: self.binding,
            identity: &self.identity,
            keys: &self.keys,
            generation: 0,
            known,
            compression: Compression { level },
            buffers: Recycler::new(4),
            parent: None,
            slot_size: 1 << 20,
            ciphertext: Vec::new(),
        }
    }

    /// A sealed frame of `data` and its id, as the backup writes it.
    fn frame(&self, data: &[u8], level: Option<i32>) -> (ExtentId, Vec<u8>) {
        match self
            .ctx(&self.empty, level)
            .process(0, data)
            .expect("process")
        {
            Outcome::New { id, frame, .. } => (id, frame),
            _ => panic!("expected a new extent"),
        }
    }
}

fn kernels(c: &mut Criterion) {
    let fx = Fixture::new();
    let bytes = Throughput::Bytes(MIB as u64);

    let mut g = c.benchmark_group("zero_check");
    g.throughput(bytes.clone());
    g.bench_function("zero", |b| b.iter(|| is_zero(black_box(&fx.zero))));
    // Non-zero data exits in the first 64 bytes: the cost of a data slot is negligible.
    g.bench_function("data", |b| b.iter(|| is_zero(black_box(&fx.compressible))));
    g.finish();

    let mut g = c.benchmark_group("blake3_keyed_id");
    g.throughput(bytes.clone());
    g.bench_function("1MiB", |b| {
        b.iter(|| fx.identity.extent_id.id(black_box(&fx.random)))
    });
    g.finish();

    let mut g = c.benchmark_group("aes256gcm_seal");
    g.throughput(bytes.clone());
    let key = AeadKey::new(&Secret32::from_bytes([7; 32]));
    let aad = [0u8; 76]; // the frame AAD's length
    let mut buf = fx.random.clone();
    g.bench_function("1MiB", |b| {
        b.iter(|| {
            key.seal(black_box(&aad), black_box(&mut buf))
                .expect("seal")
        })
    });
    g.finish();

    let mut g = c.benchmark_group("zstd");
    g.throughput(bytes.clone());
    for level in [1, -1] {
        let mut comp = zstd::bulk::Compressor::new(level).expect("zstd");
        let mut out = vec![0u8; zstd::zstd_safe::compress_bound(MIB)];
        g.bench_function(format!("level{level}/compressible"), |b| {
            b.iter(|| {
                comp.compress_to_buffer(black_box(&fx.compressible), &mut out)
                    .expect("zstd")
            })
        });
    }
    {
        let mut comp = zstd::bulk::Compressor::new(1).expect("zstd");
        let mut out = vec![0u8; zstd::zstd_safe::compress_bound(MIB)];
        // What random data would cost without the trial.
        g.bench_function("level1/random", |b| {
            b.iter(|| {
                comp.compress_to_buffer(black_box(&fx.random), &mut out)
                    .expect("zstd")
            })
        });
        // The trial alone (64 KiB sample), counted against the 1 MiB slot it decides.
        g.bench_function("level1/random_trial_skip", |b| {
            b.iter(|| {
                comp.compress_to_buffer(black_box(&fx.random[..TRIAL_LEN]), &mut out)
                    .expect("zstd")
            })
        });
    }
    let mut dec = zstd::bulk::Decompressor::new().expect("zstd");
    let packed = zstd::bulk::compress(&fx.compressible, 1).expect("zstd");
    let mut plain = vec![0u8; MIB];
    g.bench_function("decompress/level1", |b| {
        b.iter(|| {
            dec.decompress_to_buffer(black_box(&packed), &mut plain)
                .expect("zstd")
        })
    });
    g.finish();

    // The whole per-slot path as a rayon worker runs it, one slot at a time. New frames go
    // back to the context's recycler, as the writer hands them back once packed.
    let run = |ctx: &WorkerContext<'_>, data: &[u8]| match ctx.process(0, data).expect("process") {
        Outcome::New { frame, .. } => ctx.buffers.give(frame),
        other => drop(black_box(other)),
    };
    let mut g = c.benchmark_group("process");
    g.throughput(bytes.clone());
    let ctx1 = fx.ctx(&fx.empty, Some(1));
    let ctx_off = fx.ctx(&fx.empty, None);
    g.bench_function("compressible/zstd1", |b| {
        b.iter(|| run(&ctx1, black_box(&fx.compressible)))
    });
    g.bench_function("random/zstd1", |b| {
        b.iter(|| run(&ctx1, black_box(&fx.random)))
    });
    g.bench_function("random/no_compress", |b| {
        b.iter(|| run(&ctx_off, black_box(&fx.random)))
    });
    let (id, _) = fx.frame(&fx.compressible, Some(1));
    let known: HashMap<ExtentId, ExtentLoc> = HashMap::from([(
        id,
        ExtentLoc {
            id,
            pack: 0,
            offset: 0,
            len: 0,
            plain_len: MIB as u32,
        },
    )]);
    let ctx_known = fx.ctx(&known, Some(1));
    // An unchanged slot of an incremental: zero check, hash, lookup.
    g.bench_function("unchanged", |b| {
        b.iter(|| run(&ctx_known, black_box(&fx.compressible)))
    });
    g.bench_function("zero", |b| b.iter(|| run(&ctx1, black_box(&fx.zero))));
    g.finish();

    let mut g = c.benchmark_group("crc32fast");
    g.throughput(bytes.clone());
    g.bench_function("1MiB", |b| {
        b.iter(|| crc32fast::hash(black_box(&fx.random)))
    });
    g.finish();

    // Restore's per-extent work: CRC + header check, GCM open, zstd decompress, id check.
    let mut g = c.benchmark_group("frame_open");
    g.throughput(bytes);
    let keys = fx.keys.clone();
    let lookup = move |_: u32| Ok(keys.clone());
    for (name, data, level) in [
        ("compressible/zstd1", &fx.compressible, Some(1)),
        ("random/raw", &fx.random, Some(1)),
    ] {
        let (id, sealed) = fx.frame(data, level);
        g.bench_function(name, |b| {
            b.iter_batched(
                || sealed.clone(),
                |f| {
                    frame::open(f, &fx.binding, &lookup, &fx.identity, &id, &|| {
                        "bench".into()
                    })
                    .expect("open")
                },
                BatchSize::LargeInput,
            )
        });
    }
    g.finish();
}

/// The infrastructure encryption layer (AES-256-XTS, 4 KiB units) over a whole 32 MiB pack,
/// as `XtsStore` applies it on put and get: what the second layer costs per byte stored.
fn infrastructure_xts(c: &mut Criterion) {
    const PACK: usize = 32 * MIB;
    let cipher = InfraCipher::new(InfraKey::generate().expect("infrastructure key"));
    let mut buf = random().repeat(PACK / MIB);
    let mut g = c.benchmark_group("aes256xts_4k_units");
    g.throughput(Throughput::Bytes(PACK as u64));
    g.sample_size(20);
    let key = "packs/ab/bench";
    g.bench_function("encrypt/32MiB", |b| {
        b.iter(|| cipher.encrypt(key, black_box(&mut buf)).expect("encrypt"))
    });
    g.bench_function("decrypt/32MiB", |b| {
        b.iter(|| cipher.decrypt(key, black_box(&mut buf)).expect("decrypt"))
    });
    g.finish();
}

criterion_group!(benches, kernels, infrastructure_xts);
criterion_main!(benches);
