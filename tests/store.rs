//! Store conformance: the contract of `blockvault::vault::store::Store` (see
//! src/vault/store/mod.rs), checked through the trait only against every backend: the local
//! folder (on disk and on tmpfs), the infrastructure layer over it, and object storage on real
//! servers (Azurite over HTTPS, SeaweedFS S3; tests/common/servers.rs), each store in a fresh
//! prefix.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blockvault::vault::store::cloud::{self, CloudConfig, CloudStore};
use blockvault::vault::store::lease::{Lease, LeaseRecord};
use blockvault::vault::store::xts::{InfraKey, XtsStore, MIN_OBJECT_LEN};
use blockvault::vault::store::{self, clock, LocalStore, Precondition, Store, Unfinished};
use blockvault::ErrorKind;
use common::servers;
use common::*;
use proptest::prelude::*;

/// No temporary (dot-prefixed) file is left in `dir`.
fn assert_no_hidden_files(dir: &std::path::Path) {
    let leftovers: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{}: {leftovers:?}", dir.display());
}

/// Every backend under test, each in a fresh empty location, with the smallest object it
/// holds: the local store on the temp folder's filesystem (O_DIRECT for large objects) and,
/// where /dev/shm exists, on tmpfs (which refuses O_DIRECT: the buffered path); the
/// infrastructure encryption layer (AES-XTS) over a local store, which needs one AES block;
/// and a fresh prefix on each object-storage server (their temp folder holds an empty
/// `vault/`, so checks for local leftovers pass trivially). `test` names the caller in the
/// SKIP line of a server that is not installed.
fn stores_for(test: &str) -> Vec<(tempfile::TempDir, Arc<dyn Store>, usize)> {
    let dir = tempfile::tempdir().expect("tempdir");
    let local: Arc<dyn Store> = Arc::new(LocalStore::new(dir.path().join("vault")));
    let mut all = vec![(dir, local, 0)];
    if let Ok(shm) = tempfile::tempdir_in("/dev/shm") {
        let s: Arc<dyn Store> = Arc::new(LocalStore::new(shm.path().join("vault")));
        all.push((shm, s, 0));
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let inner = Arc::new(LocalStore::new(dir.path().join("vault")));
    let key = InfraKey::generate().expect("infrastructure key");
    all.push((
        dir,
        Arc::new(XtsStore::new(inner, key)),
        MIN_OBJECT_LEN as usize,
    ));
    for server in servers::servers(test) {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("vault")).unwrap();
        all.push((dir, server.fresh_store(), 0));
    }
    all
}

/// [`stores_for`] named by the calling test.
macro_rules! stores {
    () => {
        stores_for(&format!("{}:{}", file!(), line!()))
    };
}

#[test]
fn large_objects_of_unaligned_size_round_trip() {
    for (_d, s, _) in stores!() {
        for len in [1 << 20, (1 << 20) + 1, (33 << 20) - 4095] {
            let data = random_data(len as u64, len);
            s.put("packs/cd/large", &data).unwrap();
            assert_eq!(s.size("packs/cd/large").unwrap(), len as u64);
            assert_eq!(
                s.get("packs/cd/large").unwrap(),
                data,
                "{len} bytes at {}",
                s.location()
            );
            s.put_new(&format!("packs/cd/new{len}"), &data).unwrap();
            assert_eq!(s.get(&format!("packs/cd/new{len}")).unwrap(), data);
        }
        assert!(s.list("packs").unwrap().iter().all(|k| !k.contains(".tmp")));
    }
}

#[test]
fn put_then_get_returns_the_same_bytes_and_put_replaces() {
    for (_d, s, min_len) in stores!() {
        let data = random_data(1, 100_000);
        s.put("packs/ab/abcdef", &data).unwrap();
        assert_eq!(s.get("packs/ab/abcdef").unwrap(), data);
        assert_eq!(s.size("packs/ab/abcdef").unwrap(), 100_000);
        // Replacing is atomic and complete, also with a shorter object.
        s.put("packs/ab/abcdef", b"a shorter object").unwrap();
        assert_eq!(s.get("packs/ab/abcdef").unwrap(), b"a shorter object");
        assert_eq!(s.size("packs/ab/abcdef").unwrap(), 16);
        // Small objects (empty ones included) exist and read back whole, down to the
        // backend's minimum; below it a put is refused, names the key and stores nothing.
        for len in 0..20 {
            let small = random_data(len as u64, len);
            if len >= min_len {
                s.put("config", &small).unwrap();
                assert_eq!(s.get("config").unwrap(), small);
                assert_eq!(s.size("config").unwrap(), len as u64);
                s.delete("config").unwrap();
            } else {
                let e = s.put("config", &small).unwrap_err();
                assert_eq!(e.kind(), ErrorKind::Usage, "{len} bytes: {e:?}");
                assert!(e.to_string().contains("config"), "{e}");
                assert_eq!(s.get("config").unwrap_err().kind(), ErrorKind::NotFound);
            }
        }
    }
}

#[test]
fn missing_objects_are_not_found() {
    for (_d, s, _) in stores!() {
        assert_eq!(
            s.get("snapshots/x/y").unwrap_err().kind(),
            ErrorKind::NotFound
        );
        assert_eq!(
            s.get_range("snapshots/x/y", 0, 1).unwrap_err().kind(),
            ErrorKind::NotFound
        );
        assert_eq!(
            s.size("snapshots/x/y").unwrap_err().kind(),
            ErrorKind::NotFound
        );
        let e = s.get("keys/nothing").unwrap_err();
        assert!(e.to_string().contains("keys/nothing"), "names the key: {e}");
    }
}

#[test]
fn get_range_reads_exact_ranges_and_refuses_past_the_end() {
    for (_d, s, _) in stores!() {
        let data = random_data(2, 10_000);
        s.put("packs/01/obj", &data).unwrap();
        assert_eq!(s.get_range("packs/01/obj", 0, 10).unwrap(), &data[..10]);
        assert_eq!(
            s.get_range("packs/01/obj", 1234, 4321).unwrap(),
            &data[1234..5555]
        );
        assert_eq!(
            s.get_range("packs/01/obj", 9_990, 10).unwrap(),
            &data[9_990..]
        );
        assert_eq!(s.get_range("packs/01/obj", 0, 10_000).unwrap(), data);
        assert!(s.get_range("packs/01/obj", 10_000, 0).unwrap().is_empty());
        for (off, len) in [(9_991, 10), (0, 10_001), (10_000, 1), (1 << 40, 1)] {
            let e = s.get_range("packs/01/obj", off, len).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Integrity, "{off}+{len}: {e:?}");
            assert!(e.to_string().contains("packs/01/obj"), "{e}");
        }
    }
}

#[test]
fn list_is_recursive_sorted_and_scoped_to_the_folder() {
    for (_d, s, _) in stores!() {
        let keys = [
            "snapshots/d2/s1",
            "snapshots/d1/s2",
            "snapshots/d1/s1",
            "snapshots-other/x",
            "snapshotsx",
            "packs/aa/1",
            "keys/d1/00000000",
        ];
        // Contents are the key's name, made long enough for every backend.
        let contents = |k: &str| format!("contents of {k}").into_bytes();
        for k in keys {
            s.put(k, &contents(k)).unwrap();
        }
        assert_eq!(
            s.list("snapshots").unwrap(),
            vec!["snapshots/d1/s1", "snapshots/d1/s2", "snapshots/d2/s1"]
        );
        assert_eq!(
            s.list("snapshots/d1").unwrap(),
            vec!["snapshots/d1/s1", "snapshots/d1/s2"]
        );
        assert_eq!(s.list("packs").unwrap(), vec!["packs/aa/1"]);
        assert!(s.list("nothing-here").unwrap().is_empty());
        assert!(s.list("snapshots/d9").unwrap().is_empty());
        // Every listed key reads back as itself.
        for k in s.list("snapshots").unwrap() {
            assert_eq!(s.get(&k).unwrap(), contents(&k));
        }
    }
}

#[test]
fn unfinished_writes_are_never_listed() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("vault");
    let s = LocalStore::new(&root);
    s.put("packs/aa/done", b"whole").unwrap();
    // What a crash in the middle of a put leaves: a hidden temporary beside the target.
    std::fs::write(root.join("packs/aa/.tmp-0123456789abcdef"), b"part").unwrap();
    assert_eq!(s.list("packs").unwrap(), vec!["packs/aa/done"]);
    // And a put leaves no temporaries of its own.
    for i in 0..20 {
        s.put(&format!("packs/bb/{i}"), &random_data(i, 1000))
            .unwrap();
    }
    assert_no_hidden_files(&root.join("packs/bb"));
}

/// What a writer killed in the middle of a `put` of `key` leaves in the store rooted at
/// `dir` (as [`stores`] makes them), in the backend's own form, holding `len` bytes. The
/// local store and the layer over it: a hidden temp file beside the target. A new backend
/// adds its form here (an abandoned multipart upload, uncommitted blocks).
fn abandon_write(dir: &std::path::Path, key: &str, len: usize) -> Unfinished {
    let temp = format!(".tmp-{:016x}", unique() + 0xabc0);
    let name = match key.rsplit_once('/') {
        Some((folder, _)) => format!("{folder}/{temp}"),
        None => temp,
    };
    let path = dir.join("vault").join(&name);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, random_data(len as u64, len)).unwrap();
    Unfinished {
        name,
        size: len as u64,
    }
}

#[test]
fn unfinished_writes_are_reported_with_their_sizes() {
    for (d, s, min_len) in stores!() {
        // A store nothing was written to yet (its folder does not exist) has none.
        assert_eq!(s.unfinished().unwrap(), vec![], "{}", s.location());
        let object = random_data(7, 5000.max(min_len));
        s.put("packs/ab/abcdef", &object).unwrap();
        s.put_new("keys/k/0", &object).unwrap();
        assert_eq!(
            s.unfinished().unwrap(),
            vec![],
            "finished writes leave none"
        );
        if s.location().starts_with("s3://") || s.location().starts_with("az://") {
            // One PUT per object: an upload killed midway leaves nothing behind to report.
            continue;
        }
        let mut left = vec![
            abandon_write(d.path(), "packs/ab/abcdef", 3 << 20),
            abandon_write(d.path(), "snapshots/x/y", 0),
            abandon_write(d.path(), "config", 100),
        ];
        left.sort_by(|a, b| a.name.cmp(&b.name));
        assert_eq!(s.unfinished().unwrap(), left, "{}", s.location());
        // Still invisible to everything else, and the objects are untouched.
        assert_eq!(s.list("").unwrap(), vec!["keys/k/0", "packs/ab/abcdef"]);
        assert_eq!(s.get("packs/ab/abcdef").unwrap(), object);
    }
}

#[test]
fn delete_is_idempotent() {
    for (_d, s, _) in stores!() {
        s.put("packs/cc/x", b"an object to delete").unwrap();
        s.delete("packs/cc/x").unwrap();
        assert_eq!(s.get("packs/cc/x").unwrap_err().kind(), ErrorKind::NotFound);
        assert!(s.list("packs").unwrap().is_empty());
        s.delete("packs/cc/x").unwrap();
        s.delete("never/existed").unwrap();
    }
}

#[test]
fn keys_that_escape_the_store_are_refused() {
    for (d, s, _) in stores!() {
        for bad in [
            "",
            "../outside",
            "packs/../../outside",
            "a//b",
            "/abs",
            ".hidden",
            "a/./b",
        ] {
            let e = s.put(bad, b"x-long-enough-for-xts").unwrap_err();
            assert_eq!(
                e.kind(),
                ErrorKind::Usage,
                "{bad:?} at {}: {e:?}",
                s.location()
            );
            assert!(s.get(bad).is_err(), "{bad:?}");
            assert!(s.put_new(bad, b"x-long-enough-for-xts").is_err(), "{bad:?}");
        }
        assert!(!d.path().join("outside").exists());
        assert!(s.list("").unwrap().is_empty(), "{}", s.location());
    }
}

#[test]
fn readers_never_see_a_partial_object() {
    for (_d, s, _) in stores!() {
        let a = vec![b'a'; 2 << 20];
        let b = vec![b'b'; 3 << 20];
        s.put("obj", &a).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let (s, stop, a, b) = (s.clone(), stop.clone(), a.clone(), b.clone());
            std::thread::spawn(move || {
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    s.put("obj", if n % 2 == 0 { &b } else { &a }).unwrap();
                    n += 1;
                }
                n
            })
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_millis(1500);
        let mut reads = 0;
        while std::time::Instant::now() < deadline {
            let got = s.get("obj").unwrap();
            assert!(
                got == a || got == b,
                "read a partial object of {} bytes",
                got.len()
            );
            reads += 1;
        }
        stop.store(true, Ordering::Relaxed);
        let writes = writer.join().unwrap();
        assert!(writes >= 2 && reads >= 2, "{writes} writes, {reads} reads");
    }
}

#[test]
fn locks_are_exclusive_until_dropped() {
    for (_d, s, _) in stores!() {
        let g = s.lock("disk-1", Duration::ZERO).unwrap();
        let e = s
            .lock("disk-1", Duration::ZERO)
            .err()
            .expect("second lock must fail");
        assert_eq!(e.kind(), ErrorKind::AlreadyExists, "{e:?}");
        assert!(e.to_string().contains("locked"), "{e}");
        // Another name is independent.
        let g2 = s.lock("disk-2", Duration::ZERO).unwrap();
        drop(g);
        let g3 = s.lock("disk-1", Duration::ZERO).unwrap();
        drop(g2);
        drop(g3);
    }
}

#[test]
fn lock_waits_up_to_the_given_time() {
    for (_d, s, _) in stores!() {
        let g = s.lock("new-disk", Duration::ZERO).unwrap();
        // A short wait gives up after about that long.
        let t0 = Instant::now();
        let e = s
            .lock("new-disk", Duration::from_millis(150))
            .err()
            .expect("still held");
        assert_eq!(e.kind(), ErrorKind::AlreadyExists);
        let waited = t0.elapsed();
        assert!(
            waited >= Duration::from_millis(150) && waited < Duration::from_secs(5),
            "waited {waited:?}"
        );
        // A long wait gets the lock once the holder lets go.
        let releaser = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            drop(g);
        });
        let t0 = Instant::now();
        let g2 = s.lock("new-disk", Duration::from_secs(20)).unwrap();
        let waited = t0.elapsed();
        assert!(
            waited >= Duration::from_millis(250) && waited < Duration::from_secs(10),
            "waited {waited:?}"
        );
        releaser.join().unwrap();
        drop(g2);
    }
}

#[test]
fn put_if_creates_only_when_absent_and_replaces_only_the_version_read() {
    for (_d, s, _) in stores!() {
        let first = vec![1u8; 100];
        let tag = s.put_if("head", &first, &Precondition::Absent).unwrap();
        let (bytes, read_tag) = s.get_tagged("head").unwrap();
        assert_eq!((bytes, &read_tag), (first.clone(), &tag));
        let err = s
            .put_if("head", &[2; 100], &Precondition::Absent)
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Conflict, "{err}");
        let second = vec![3u8; 50];
        let new_tag = s
            .put_if("head", &second, &Precondition::Matches(tag.clone()))
            .unwrap();
        assert_ne!(new_tag, tag);
        // The tag read before the replacement is stale now: nothing changes.
        let err = s
            .put_if("head", &[4; 100], &Precondition::Matches(tag))
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Conflict, "{err}");
        assert_eq!(s.get_tagged("head").unwrap(), (second, new_tag));
        // A missing object matches no tag.
        let err = s
            .put_if(
                "other",
                &[5; 100],
                &Precondition::Matches(store::Tag("x".into())),
            )
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Conflict, "{err}");
        assert_eq!(s.get("other").unwrap_err().kind(), ErrorKind::NotFound);
    }
}

/// Many writers doing read-modify-write through `put_if` lose no update: each increments a
/// counter object, retrying when its compare-and-swap loses.
#[test]
fn compare_and_swap_loses_no_update_under_contention() {
    for (_d, s, min_len) in stores!() {
        let encode = move |n: u64| {
            let mut b = n.to_le_bytes().to_vec();
            b.resize(min_len.max(8), 0);
            b
        };
        s.put_if("counter", &encode(0), &Precondition::Absent)
            .unwrap();
        let (threads, rounds) = (8, 25);
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                let s = s.clone();
                std::thread::spawn(move || {
                    let mut conflicts = 0;
                    for _ in 0..rounds {
                        loop {
                            let (b, tag) = s.get_tagged("counter").unwrap();
                            let n = u64::from_le_bytes(b[..8].try_into().unwrap());
                            match s.put_if("counter", &encode(n + 1), &Precondition::Matches(tag)) {
                                Ok(_) => break,
                                Err(e) if e.kind() == ErrorKind::Conflict => conflicts += 1,
                                Err(e) => panic!("{e}"),
                            }
                        }
                    }
                    conflicts
                })
            })
            .collect();
        let conflicts: u64 = handles.into_iter().map(|h| h.join().unwrap()).sum();
        let b = s.get("counter").unwrap();
        assert_eq!(
            u64::from_le_bytes(b[..8].try_into().unwrap()),
            threads * rounds,
            "{} ({conflicts} conflicts retried)",
            s.location()
        );
    }
}

/// The racers' results: exactly one succeeded (its number is returned), every other failed
/// with `loser`.
fn one_winner(
    racers: Vec<std::thread::JoinHandle<blockvault::Result<u8>>>,
    loser: ErrorKind,
    what: &str,
) -> u8 {
    let results: Vec<_> = racers.into_iter().map(|h| h.join().unwrap()).collect();
    let winners: Vec<u8> = results
        .iter()
        .filter_map(|r| r.as_ref().ok().copied())
        .collect();
    assert_eq!(winners.len(), 1, "{what}: {results:?}");
    for e in results.iter().filter_map(|r| r.as_ref().err()) {
        assert_eq!(e.kind(), loser, "{what}: {e:?}");
    }
    winners[0]
}

#[test]
fn put_new_never_replaces() {
    for (_d, s, _) in stores!() {
        s.put_new("keys/d/00000000", b"the first writer").unwrap();
        let e = s
            .put_new("keys/d/00000000", b"the second writer")
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::AlreadyExists, "{e:?}");
        assert_eq!(s.get("keys/d/00000000").unwrap(), b"the first writer");
        assert_eq!(s.list("keys").unwrap(), vec!["keys/d/00000000"]);
    }
    // Racing writers: exactly one wins and the object is the winner's, whole.
    for round in 0..10 {
        for (d, s, _) in stores!() {
            let barrier = Arc::new(std::sync::Barrier::new(4));
            let handles: Vec<_> = (0..4u8)
                .map(|i| {
                    let (s, barrier) = (s.clone(), barrier.clone());
                    std::thread::spawn(move || {
                        let data = vec![i; 1 << 20];
                        barrier.wait();
                        s.put_new("config", &data).map(|()| i)
                    })
                })
                .collect();
            let winner = one_winner(handles, ErrorKind::AlreadyExists, &format!("round {round}"));
            assert_eq!(s.get("config").unwrap(), vec![winner; 1 << 20]);
            assert_no_hidden_files(&d.path().join("vault"));
        }
    }
}

/// Twenty writers race to create one key: exactly one wins on every backend (SeaweedFS and
/// Azurite enforce If-None-Match atomically; a store that did not would be refused at open).
#[test]
fn a_race_of_twenty_creates_has_one_winner() {
    for (_d, s, _) in stores!() {
        for key in ["head", "locks/race"] {
            let barrier = Arc::new(std::sync::Barrier::new(20));
            let handles: Vec<_> = (0..20u8)
                .map(|i| {
                    let (s, barrier) = (s.clone(), barrier.clone());
                    let key = key.to_string();
                    std::thread::spawn(move || {
                        let data = vec![i; 4096];
                        barrier.wait();
                        s.put_if(&key, &data, &Precondition::Absent).map(|_| i)
                    })
                })
                .collect();
            let winner = one_winner(
                handles,
                ErrorKind::Conflict,
                &format!("{} {key}", s.location()),
            );
            assert_eq!(s.get(key).unwrap(), vec![winner; 4096]);
        }
    }
}

/// `modified` is the store's timestamp of the last write, and the store's clock is within a
/// few seconds of ours (every server here runs on this machine).
#[test]
fn modified_comes_from_the_store_and_its_clock_skew_is_measurable() {
    for (_d, s, _) in stores!() {
        let before = std::time::SystemTime::now();
        s.put("snapshots/d/s1", b"a manifest, long enough").unwrap();
        let after = std::time::SystemTime::now();
        let m = s.modified("snapshots/d/s1").unwrap();
        // Whole-second stamps on object storage: allow the second the write fell in.
        let lo = before - Duration::from_secs(2);
        let hi = after + Duration::from_secs(2);
        assert!(
            m >= lo && m <= hi,
            "{}: {m:?} not in {lo:?}..{hi:?}",
            s.location()
        );
        let e = s.modified("snapshots/d/none").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotFound, "{e:?}");
        assert!(e.to_string().contains("snapshots/d/none"), "{e}");
        let skew = clock::skew(&*s).unwrap();
        assert!(
            !skew.exceeds(Duration::from_secs(5)) && skew.uncertainty_ms < 5_000,
            "{}: {skew:?}",
            s.location()
        );
        // The probe object is gone.
        assert_eq!(
            s.list("").unwrap(),
            vec!["snapshots/d/s1"],
            "{}",
            s.location()
        );
    }
}

/// This machine's kernel boot id, as a lease records it.
fn boot_id() -> [u8; 16] {
    let text = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    hex::decode(text.trim().replace('-', ""))
        .unwrap()
        .try_into()
        .unwrap()
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// A lease record as another holder would have written it.
fn foreign_lease(boot_id: [u8; 16], pid: u32, expires_ms: u64) -> Vec<u8> {
    LeaseRecord {
        holder: [0xab; 16],
        expires_ms,
        ttl_ms: 60_000,
        boot_id,
        pid,
        start_ticks: 1,
        host: "other-host".into(),
    }
    .encode()
}

/// On object storage a lock is a lease object: a holder on this machine whose process is gone
/// is taken over at once; a holder on another machine only once its lease ran out (by more
/// than its time to live), and until then the refusal names it.
#[test]
fn leases_of_dead_or_expired_holders_are_taken_over_and_live_ones_are_not() {
    for server in servers::servers("leases_of_dead_or_expired_holders") {
        let s: Arc<dyn Store> = server.fresh_store();
        // A process of this machine that has exited.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead_pid = child.id();
        child.wait().unwrap();
        s.put(
            "locks/disk-a",
            &foreign_lease(boot_id(), dead_pid, now_ms() + 3_600_000),
        )
        .unwrap();
        let g = s.lock("disk-a", Duration::ZERO).unwrap();
        // Another machine, lease still running: refused, naming the holder.
        s.put(
            "locks/disk-b",
            &foreign_lease([7; 16], 1234, now_ms() + 30_000),
        )
        .unwrap();
        let e = s
            .lock("disk-b", Duration::ZERO)
            .err()
            .expect("held elsewhere");
        assert_eq!(e.kind(), ErrorKind::AlreadyExists, "{e:?}");
        for says in ["locked", "other-host", "pid 1234", "locks/disk-b"] {
            assert!(e.to_string().contains(says), "{says}: {e}");
        }
        // Expired, but by less than its time to live: still refused (clock skew margin).
        s.put(
            "locks/disk-b",
            &foreign_lease([7; 16], 1234, now_ms() - 30_000),
        )
        .unwrap();
        assert!(s.lock("disk-b", Duration::ZERO).is_err());
        // Expired by more: taken over.
        s.put(
            "locks/disk-b",
            &foreign_lease([7; 16], 1234, now_ms() - 61_000),
        )
        .unwrap();
        let g2 = s.lock("disk-b", Duration::ZERO).unwrap();
        // An unreadable lease protects nothing.
        s.put("locks/disk-c", b"garbage, not a lease record")
            .unwrap();
        let g3 = s.lock("disk-c", Duration::ZERO).unwrap();
        // Released leases are deleted.
        drop((g, g2, g3));
        assert!(s.list("locks").unwrap().is_empty(), "{:?}", s.list("locks"));
    }
}

/// A held lease is renewed by compare-and-swap while its guard lives, and a lease taken over
/// behind the holder's back is noticed (and not deleted by the old holder).
#[test]
fn leases_are_renewed_while_held_and_a_take_over_is_noticed() {
    for server in servers::servers("leases_are_renewed_while_held") {
        let s: Arc<dyn Store> = server.fresh_store();
        let ttl = Duration::from_millis(900);
        let lease = Lease::acquire(s.clone(), "renewed", Duration::ZERO, ttl).unwrap();
        let read = || LeaseRecord::decode(&s.get("locks/renewed").unwrap(), "lease").unwrap();
        let first = read();
        assert_eq!(first.pid, std::process::id());
        std::thread::sleep(Duration::from_millis(1500));
        let later = read();
        assert_eq!(later.holder, first.holder);
        assert!(
            later.expires_ms > first.expires_ms,
            "{first:?} then {later:?}"
        );
        assert!(!lease.is_lost());
        // Someone replaces it (as a take-over would): the next renewal loses the swap.
        s.put(
            "locks/renewed",
            &foreign_lease([7; 16], 99, now_ms() + 600_000),
        )
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !lease.is_lost() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(lease.is_lost());
        drop(lease);
        assert_eq!(read().pid, 99, "the new holder's lease must stay");
    }
}

#[test]
fn lock_held_by_another_process_is_refused() {
    // The binary takes the disk lock for the whole backup; a lock held here must make a
    // backup of that disk fail with a "locked" message naming it.
    let bv = Bv::new();
    let src = bv.path("img");
    write_file(&src, &random_data(3, MIB as usize));
    bv.run(&["init"]).ok();
    bv.backup(&src, "d", &[]);
    let disk_id = std::fs::read_dir(bv.vault.join("snapshots"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .file_name()
        .to_string_lossy()
        .into_owned();
    let s = LocalStore::new(&bv.vault);
    let guard = s.lock(&disk_id, Duration::ZERO).unwrap();
    bv.run(&["backup", src.to_str().unwrap(), "--disk", "d"])
        .code(1)
        .stderr_has(&["locked"]);
    drop(guard);
    bv.backup(&src, "d", &[]);
}

#[test]
fn store_urls() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().join("v").display());
    let s = store::open(&url).unwrap();
    s.put("config", b"c").unwrap();
    assert_eq!(std::fs::read(dir.path().join("v/config")).unwrap(), b"c");
    let plain = store::open(dir.path().join("v").to_str().unwrap()).unwrap();
    assert_eq!(plain.get("config").unwrap(), b"c");
    // Other schemes and remote specs are no folder names (tests/vault_url.rs has them all).
    for url in [
        "sftp://host/x",
        "gs://bucket/x",
        "https://host/prefix",
        "b2:bucket",
    ] {
        let e = store::open(url).err().expect("refused");
        assert_eq!(e.kind(), ErrorKind::Usage, "{url}");
        assert!(e.to_string().contains(url), "{e}");
    }
    // Bad names and plain HTTP are refused before any request is made (port 9 is closed).
    let http = CloudConfig::from_pairs([("AWS_ENDPOINT_URL", "http://127.0.0.1:9")]);
    for (url, says) in [
        ("s3://ab/prefix", "bucket name"),
        ("az://no_underscores/p", "container name"),
        ("s3://bucket/a/../b", "prefix"),
        ("s3://bucket/p?X-Amz-Credential=secret", "query"),
        ("s3://bucket/prefix", "BLOCKVAULT_ALLOW_HTTP"),
    ] {
        let e = CloudStore::open(url, &http).err().expect("refused");
        assert_eq!(e.kind(), ErrorKind::Usage, "{url}: {e:?}");
        assert!(
            e.to_string().contains(says) && e.to_string().contains(url.split('?').next().unwrap()),
            "{url}: {e}"
        );
    }
    // A private CA file that is missing or not PEM is named.
    let bad_ca = dir.path().join("ca.pem");
    std::fs::write(&bad_ca, "not a certificate").unwrap();
    for file in [bad_ca.clone(), dir.path().join("missing.pem")] {
        let c = CloudConfig::from_pairs([(cloud::CA_CERT, file.to_str().unwrap())]);
        let e = CloudStore::open("s3://bucket/p", &c)
            .err()
            .expect("refused");
        assert_eq!(e.kind(), ErrorKind::Usage, "{e:?}");
        assert!(e.to_string().contains(file.to_str().unwrap()), "{e}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn any_object_reads_back_whole_and_in_ranges(
        data in proptest::collection::vec(any::<u8>(), 0..20_000),
        cuts in proptest::collection::vec((any::<u16>(), any::<u16>()), 1..8),
        name in "[a-z0-9]{1,12}(/[a-z0-9_-]{1,12}){0,3}",
    ) {
        for (_d, s, min_len) in stores!() {
            if data.len() < min_len {
                prop_assert_eq!(s.put(&name, &data).unwrap_err().kind(), ErrorKind::Usage);
                prop_assert!(s.list("").unwrap().is_empty());
                continue;
            }
            s.put(&name, &data).unwrap();
            prop_assert_eq!(&s.get(&name).unwrap(), &data);
            prop_assert_eq!(s.size(&name).unwrap(), data.len() as u64);
            for &(o, l) in &cuts {
                let (o, l) = (o as usize, l as usize);
                let r = s.get_range(&name, o as u64, l);
                if o + l <= data.len() {
                    prop_assert_eq!(&r.unwrap()[..], &data[o..o + l]);
                } else {
                    prop_assert_eq!(r.unwrap_err().kind(), ErrorKind::Integrity);
                }
            }
            prop_assert_eq!(s.list("").unwrap(), vec![name.clone()]);
        }
    }
}
