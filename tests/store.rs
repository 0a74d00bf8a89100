//! Store conformance: the contract of `blockvault::vault::store::Store` (see
//! src/vault/store/mod.rs), checked against `LocalStore` through the trait only, so that the
//! same checks can run against every backend that lands later.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blockvault::vault::store::xts::{InfraKey, XtsStore, MIN_OBJECT_LEN};
use blockvault::vault::store::{self, LocalStore, Store, Unfinished};
use blockvault::ErrorKind;
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
/// where /dev/shm exists, on tmpfs (which refuses O_DIRECT: the buffered path); and the
/// infrastructure encryption layer (AES-XTS) over a local store, which needs one AES block.
fn stores() -> Vec<(tempfile::TempDir, Box<dyn Store>, usize)> {
    let dir = tempfile::tempdir().expect("tempdir");
    let local: Box<dyn Store> = Box::new(LocalStore::new(dir.path().join("vault")));
    let mut all = vec![(dir, local, 0)];
    if let Ok(shm) = tempfile::tempdir_in("/dev/shm") {
        let s: Box<dyn Store> = Box::new(LocalStore::new(shm.path().join("vault")));
        all.push((shm, s, 0));
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let inner = Arc::new(LocalStore::new(dir.path().join("vault")));
    let key = InfraKey::generate().expect("infrastructure key");
    all.push((
        dir,
        Box::new(XtsStore::new(inner, key)),
        MIN_OBJECT_LEN as usize,
    ));
    all
}

#[test]
fn large_objects_of_unaligned_size_round_trip() {
    for (_d, s, _) in stores() {
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
    for (_d, s, min_len) in stores() {
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
    for (_d, s, _) in stores() {
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
    for (_d, s, _) in stores() {
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
    for (_d, s, _) in stores() {
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
    for (d, s, min_len) in stores() {
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
    for (_d, s, _) in stores() {
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
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("vault");
    let s = LocalStore::new(&root);
    for bad in [
        "",
        "../outside",
        "packs/../../outside",
        "a//b",
        "/abs",
        ".hidden",
        "a/./b",
    ] {
        let e = s.put(bad, b"x").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Usage, "{bad:?}: {e:?}");
        assert!(s.get(bad).is_err(), "{bad:?}");
    }
    assert!(!dir.path().join("outside").exists());
}

#[test]
fn readers_never_see_a_partial_object() {
    for (_d, s, _) in stores() {
        let s: Arc<dyn Store> = s.into();
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
    for (_d, s, _) in stores() {
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
    for (_d, s, _) in stores() {
        let s: Arc<dyn Store> = s.into();
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
fn put_new_never_replaces() {
    for (_d, s, _) in stores() {
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
        for (d, s, _) in stores() {
            let s: Arc<dyn Store> = s.into();
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
            let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
            let winners: Vec<u8> = results
                .iter()
                .filter_map(|r| r.as_ref().ok().copied())
                .collect();
            assert_eq!(winners.len(), 1, "round {round}: {results:?}");
            for r in &results {
                if let Err(e) = r {
                    assert_eq!(e.kind(), ErrorKind::AlreadyExists, "{e:?}");
                }
            }
            assert_eq!(s.get("config").unwrap(), vec![winners[0]; 1 << 20]);
            assert_no_hidden_files(&d.path().join("vault"));
        }
    }
}

#[test]
fn lock_held_by_another_process_is_refused() {
    // The binary takes the disk lock for the whole backup; a lock held here must make a
    // backup of that disk fail with a "locked" message naming it.
    let bv = Bv::new();
    let src = bv.path("img");
    write_file(&src, &random_data(3, MIB as usize));
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
    for url in ["s3://bucket/prefix", "az://container/prefix"] {
        let e = store::open(url).err().expect("not supported yet");
        assert_eq!(e.kind(), ErrorKind::Unsupported, "{url}");
        assert!(e.to_string().contains(url), "{e}");
    }
    // Other schemes and remote specs are no folder names (tests/vault_url.rs has them all).
    for url in ["sftp://host/x", "gs://bucket/x", "b2:bucket"] {
        let e = store::open(url).err().expect("refused");
        assert_eq!(e.kind(), ErrorKind::Usage, "{url}");
        assert!(e.to_string().contains(url), "{e}");
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
        for (_d, s, min_len) in stores() {
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
