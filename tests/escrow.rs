//! Volume-key escrow (`vault::escrow`) and the passphrase-protected keystore export
//! (`crypto::export`), through the library API against a real vault and keystore in a temp
//! folder: round trips, replacement, binding to disk, name and generation, damage, and that
//! no secret is ever stored in the clear.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use blockvault::crypto::export::{
    self, Header, Kdf, LANES, MAX_PASSPHRASE, MEMORY_KIB, MIN_MEMORY_KIB, MIN_PASSES, PASSES,
};
use blockvault::crypto::Keystore;
use blockvault::vault::escrow::{Record, MAX_SECRET};
use blockvault::vault::{Disk, Vault};
use blockvault::ErrorKind;

/// A vault and its keystore in a fresh temp folder.
struct Fixture {
    dir: tempfile::TempDir,
    vault: Vault,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = dir.path().join("vault");
        let vault = blockvault::keys::init::init(
            url.to_str().unwrap(),
            &Keystore::new(dir.path().join("keystore")),
            &blockvault::keys::init::InitOptions::default(),
        )
        .expect("init")
        .vault;
        Fixture { dir, vault }
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("vault")
    }

    /// The escrow record files of `disk`, sorted.
    fn records(&self, disk: &Disk) -> Vec<PathBuf> {
        let folder = self.root().join("escrow").join(disk.id_hex());
        let mut files: Vec<PathBuf> = match fs::read_dir(&folder) {
            Ok(rd) => rd.map(|e| e.unwrap().path()).collect(),
            Err(_) => Vec::new(),
        };
        files.sort();
        files
    }

    fn only_record(&self, disk: &Disk) -> PathBuf {
        let files = self.records(disk);
        assert_eq!(files.len(), 1, "{files:?}");
        files.into_iter().next().unwrap()
    }
}

/// Every regular file under `dir`, recursively (hidden ones too).
fn all_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            all_files(&p, out);
        } else {
            out.push(p);
        }
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// The object key of a record file, as the vault names it.
fn object_key(f: &Fixture, path: &Path) -> String {
    path.strip_prefix(f.root())
        .unwrap()
        .to_str()
        .unwrap()
        .to_string()
}

const SECRET: &[u8] = b"123456-654321-111111-222222-333333-444444-555555-666666";

#[test]
fn escrow_round_trip_replace_and_two_names() {
    let f = Fixture::new();
    let disk = f.vault.register_disk("vm1").unwrap().0;
    assert!(f.vault.escrows(&disk).unwrap().is_empty());

    let before = blockvault::util::now_unix();
    f.vault.put_escrow(&disk, "bitlocker-C", SECRET).unwrap();
    let all = f.vault.escrows(&disk).unwrap();
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].name, "bitlocker-C");
    assert_eq!(&all[0].secret[..], SECRET);
    assert!(all[0].created >= before);
    // Debug never shows the secret.
    let shown = format!("{:?}", all[0]);
    assert!(
        shown.contains("bitlocker-C") && !shown.contains("123456"),
        "{shown}"
    );

    // Re-escrowing the name replaces the record: a new revision beside the first's name id
    // (records are never rewritten), and the first revision is gone.
    let first = f.only_record(&disk);
    let first_name = first.file_name().unwrap().to_str().unwrap().to_string();
    assert!(first_name.ends_with("-00000001"), "{first_name}");
    f.vault
        .put_escrow(&disk, "bitlocker-C", b"new secret")
        .unwrap();
    assert_eq!(
        f.only_record(&disk),
        first.with_file_name(first_name.replace("-00000001", "-00000002"))
    );
    let all = f.vault.escrows(&disk).unwrap();
    assert_eq!(all.len(), 1);
    assert_eq!(&all[0].secret[..], b"new secret");

    // A second name: its own record; both come back, sorted by name.
    f.vault.put_escrow(&disk, "luks-root", b"hunter2").unwrap();
    assert_eq!(f.records(&disk).len(), 2);
    assert_eq!(
        f.vault.escrow_names(&disk).unwrap(),
        ["bitlocker-C", "luks-root"]
    );
    let all = f.vault.escrows(&disk).unwrap();
    assert_eq!(&all[1].secret[..], b"hunter2");

    // Another disk has none of them; a vault opened afresh reads them back.
    let other = f.vault.register_disk("vm2").unwrap().0;
    assert!(f.vault.escrow_names(&other).unwrap().is_empty());
    let reopened = Vault::open(
        f.root().to_str().unwrap(),
        &Keystore::new(f.dir.path().join("keystore")),
    )
    .unwrap();
    let disk = reopened.find_disk("vm1").unwrap().unwrap();
    assert_eq!(reopened.escrows(&disk).unwrap().len(), 2);
}

#[test]
fn largest_and_invalid_inputs() {
    let f = Fixture::new();
    let disk = f.vault.register_disk("vm1").unwrap().0;
    let big = vec![0xa7u8; MAX_SECRET];
    let long_name = "n".repeat(200);
    f.vault.put_escrow(&disk, &long_name, &big).unwrap();
    let all = f.vault.escrows(&disk).unwrap();
    assert_eq!(
        (all[0].name.as_str(), all[0].secret.len()),
        (long_name.as_str(), MAX_SECRET)
    );

    let too_big = vec![0x5au8; MAX_SECRET + 1];
    let cases: [(&str, &[u8]); 5] = [
        ("", SECRET),
        (&"n".repeat(201), SECRET),
        ("tab\tname", SECRET),
        ("empty", b""),
        ("big", &too_big),
    ];
    for (name, secret) in cases {
        let err = f.vault.put_escrow(&disk, name, secret).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Usage, "{name:?}: {err}");
        assert!(!err.to_string().contains("123456"), "{err}");
    }
    assert_eq!(f.records(&disk).len(), 1);
}

#[test]
fn secrets_and_names_never_appear_in_stored_bytes() {
    let f = Fixture::new();
    let disk = f.vault.register_disk("vm1").unwrap().0;
    f.vault.put_escrow(&disk, "bitlocker-C", SECRET).unwrap();
    f.vault
        .put_escrow(&disk, "luks-root", b"correct horse battery staple")
        .unwrap();
    let mut files = Vec::new();
    all_files(f.dir.path(), &mut files);
    assert!(files.len() >= 4, "{files:?}");
    for p in files {
        let b = fs::read(&p).unwrap();
        for needle in [
            SECRET,
            b"correct horse battery staple".as_slice(),
            b"bitlocker-C",
            b"luks-root",
        ] {
            assert!(
                !contains(&b, needle),
                "{} holds {:?}",
                p.display(),
                String::from_utf8_lossy(needle)
            );
        }
    }
}

#[test]
fn records_are_bound_to_disk_and_name() {
    let f = Fixture::new();
    let a = f.vault.register_disk("vm1").unwrap().0;
    let b = f.vault.register_disk("vm2").unwrap().0;
    f.vault.put_escrow(&a, "bitlocker-C", SECRET).unwrap();
    f.vault.put_escrow(&a, "luks-root", b"hunter2").unwrap();
    let recs = f.records(&a);

    // Copied into the other disk's folder under the same name id: the head does not list it
    // there, so disk vm2 has no escrow.
    let folder_b = f.root().join("escrow").join(b.id_hex());
    fs::create_dir_all(&folder_b).unwrap();
    let moved = folder_b.join(recs[0].file_name().unwrap());
    fs::copy(&recs[0], &moved).unwrap();
    assert!(f.vault.escrows(&b).unwrap().is_empty());
    // Nor would it open there if it were listed: its AAD names disk vm1 and its own key.
    let moved_key = object_key(&f, &moved);
    let rec = Record::decode(&fs::read(&recs[0]).unwrap(), &moved_key).unwrap();
    let keys = a.generation(rec.generation).unwrap();
    let err = rec.open(&b.binding, &keys, &moved_key).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Integrity, "{err}");
    assert!(err.to_string().contains(&moved_key), "{err}");
    let err = rec
        .open(&a.binding, &keys, &object_key(&f, &recs[1]))
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Integrity, "{err}");
    fs::remove_file(&moved).unwrap();

    // One name's record put in place of the other's: not the bytes the head lists.
    let saved = fs::read(&recs[1]).unwrap();
    fs::copy(&recs[0], &recs[1]).unwrap();
    let err = f.vault.escrows(&a).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Integrity, "{err}");
    let key1 = object_key(&f, &recs[1]);
    assert!(
        err.to_string().contains(&format!(
            "{key1} does not match the digest the vault head lists"
        )),
        "{err}"
    );
    // Deleted: the head still lists it.
    fs::remove_file(&recs[1]).unwrap();
    let err = f.vault.escrows(&a).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Integrity, "{err}");
    assert!(
        err.to_string()
            .contains(&format!("{key1} is missing: the vault head lists it")),
        "{err}"
    );
    fs::write(&recs[1], saved).unwrap();
    assert_eq!(f.vault.escrows(&a).unwrap().len(), 2);

    // A file whose name is not a name id is not an escrow record: ignored.
    fs::write(recs[0].with_file_name("notes.txt"), b"x").unwrap();
    assert_eq!(f.vault.escrows(&a).unwrap().len(), 2);
}

#[test]
fn every_bit_flip_is_rejected_naming_the_object() {
    let f = Fixture::new();
    let disk = f.vault.register_disk("vm1").unwrap().0;
    f.vault.put_escrow(&disk, "bitlocker-C", SECRET).unwrap();
    let path = f.only_record(&disk);
    let key = object_key(&f, &path);
    let good = fs::read(&path).unwrap();
    let replaced = format!("{key} does not match the digest the vault head lists for it");
    // What the record itself says of a flip (its header, AAD and tag), were it not for the
    // head's digest: decoded and opened directly.
    let opened = |b: &[u8]| -> blockvault::Error {
        let open = || -> blockvault::Result<()> {
            let rec = Record::decode(b, &key)?;
            // As the vault names it: a generation this disk lacks is the record's problem.
            let keys = disk
                .generation(rec.generation)
                .map_err(|e| e.within(format!("escrow record {key}")))?;
            rec.open(&disk.binding, &keys, &key).map(|_| ())
        };
        open().unwrap_err()
    };
    for byte in 0..good.len() {
        for bit in [0, 7] {
            let mut bad = good.clone();
            bad[byte] ^= 1 << bit;
            fs::write(&path, &bad).unwrap();
            let err = f.vault.escrows(&disk).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Integrity, "byte {byte}: {err}");
            assert!(err.to_string().contains(&replaced), "byte {byte}: {err}");
            let err = opened(&bad);
            assert!(err.to_string().contains(&key), "byte {byte}: {err}");
            // Version bytes: a newer format; generation bytes: a key this disk lacks.
            let expect = match byte {
                4..=5 => ErrorKind::Unsupported,
                8..=11 => ErrorKind::Key,
                _ => ErrorKind::Integrity,
            };
            assert_eq!(err.kind(), expect, "byte {byte}: {err}");
        }
    }
    // Truncated and extended.
    for bad in [
        &good[..good.len() - 1],
        &good[..19],
        &[good.as_slice(), b"x"].concat(),
    ] {
        fs::write(&path, bad).unwrap();
        let err = f.vault.escrows(&disk).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Integrity, "{err}");
        assert!(err.to_string().contains(&replaced), "{err}");
        assert_eq!(opened(bad).kind(), ErrorKind::Integrity);
    }
    fs::write(&path, &good).unwrap();
    assert_eq!(&f.vault.escrows(&disk).unwrap()[0].secret[..], SECRET);
}

#[test]
fn new_dek_generation_seals_new_escrows_and_keeps_old_ones_readable() {
    let f = Fixture::new();
    let disk = f.vault.register_disk("vm1").unwrap().0;
    f.vault.put_escrow(&disk, "old", b"first").unwrap();
    f.vault.put_escrow(&disk, "again", b"one").unwrap();
    // A reservation of what is left of generation 0's nonce budget would reach the limit:
    // generation 1 starts (a fresh generation has room for it, having sealed only the name).
    let spent = f.vault.head().unwrap().disk(&disk.id).unwrap().generations[&0].seals;
    let (disk, _) = f
        .vault
        .reserve(
            disk,
            blockvault::vault::snapshots::GENERATION_SEAL_LIMIT - spent,
        )
        .unwrap();
    assert_eq!(disk.current_generation(), 1);
    f.vault.put_escrow(&disk, "again", b"two").unwrap();
    f.vault.put_escrow(&disk, "new", b"second").unwrap();
    let generation = |name: &str| {
        let (key, bytes) = f
            .records(&disk)
            .into_iter()
            .map(|p| (object_key(&f, &p), fs::read(&p).unwrap()))
            .find(|(k, b)| {
                let rec = Record::decode(b, k).unwrap();
                let keys = disk.generation(rec.generation).unwrap();
                rec.open(&disk.binding, &keys, k).unwrap().name == name
            })
            .unwrap();
        Record::decode(&bytes, &key).unwrap().generation
    };
    assert_eq!(
        (generation("old"), generation("again"), generation("new")),
        (0, 1, 1)
    );
    let all = f.vault.escrows(&disk).unwrap();
    let got: Vec<(&str, &[u8])> = all
        .iter()
        .map(|e| (e.name.as_str(), &e.secret[..]))
        .collect();
    assert_eq!(
        got,
        [
            ("again", &b"two"[..]),
            ("new", b"second"),
            ("old", b"first")
        ]
    );
}

// ---------------------------------------------------------------------------------------------
// Keystore export
// ---------------------------------------------------------------------------------------------

const PASS: &[u8] = b"a long export passphrase";

/// A vault, its keystore file's bytes, and an export of them under [`PASS`].
fn exported() -> (Fixture, Vec<u8>, Vec<u8>) {
    let f = Fixture::new();
    let file = fs::read(f.vault.keystore_file()).unwrap();
    let id = f.vault.config().vault_id;
    let exp = export::export(&file, &id, PASS).unwrap();
    (f, file, exp)
}

#[test]
fn export_import_round_trip_opens_the_vault() {
    let (f, file, exp) = exported();
    let id = f.vault.config().vault_id;
    let keys = f.vault.keystore().load(&id).unwrap();
    assert!(
        !contains(&exp, keys.auth[0].key.expose()),
        "auth key in the clear"
    );
    let kek = &keys.kek.versions()[0].key;
    assert!(!contains(&exp, kek.expose()), "platform KEK in the clear");
    let (h, _) = Header::parse(&exp).unwrap();
    let argon2 = Kdf::Argon2id {
        memory_kib: MEMORY_KIB,
        passes: PASSES,
        lanes: LANES,
    };
    assert_eq!((h.vault_id, h.kdf), (id, argon2));
    // A fresh salt each time.
    let again = export::export(&file, &id, PASS).unwrap();
    assert_ne!(Header::parse(&again).unwrap().0.salt, h.salt);

    let (got_id, bytes) = export::import(&exp, PASS).unwrap();
    assert_eq!(got_id, id);
    assert_eq!(&bytes[..], &file[..]);
    // Saved into an empty keystore folder, the imported file opens the vault.
    // (Key files and their folder must be private to their owner.)
    let ks = Keystore::new(f.dir.path().join("restored-keystore"));
    fs::DirBuilder::new().mode(0o700).create(ks.dir()).unwrap();
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(ks.path_for(&got_id))
        .and_then(|mut file| file.write_all(&bytes[..]))
        .unwrap();
    Vault::open(f.root().to_str().unwrap(), &ks).unwrap();
}

#[test]
fn wrong_passphrase_and_tampering_are_refused() {
    let (f, _file, exp) = exported();
    let wrong = "wrong passphrase or damaged export file";
    let err = export::import(&exp, b"a long export passphrasE").unwrap_err();
    assert_eq!(
        (err.kind(), err.to_string().as_str()),
        (ErrorKind::Key, wrong)
    );

    // Header fields are the AAD: vault id, Argon2id costs and salt cannot be edited (costs
    // edited within their bounds, so that the derivation runs and the open fails).
    let edited_cost = |at: usize, v: u32| {
        let mut b = exp.clone();
        b[at..at + 4].copy_from_slice(&v.to_le_bytes());
        Some(b)
    };
    for (at, edited) in [
        (8, None),
        (24, edited_cost(24, MIN_MEMORY_KIB)),
        (28, edited_cost(28, MIN_PASSES)),
        (32, edited_cost(32, 2)),
        (40, None),
        (exp.len() - 1, None),
    ] {
        let bad = edited.unwrap_or_else(|| {
            let mut b = exp.clone();
            b[at] ^= 1;
            b
        });
        let err = export::import(&bad, PASS).unwrap_err();
        assert_eq!(
            (err.kind(), err.to_string().as_str()),
            (ErrorKind::Key, wrong),
            "byte {at}"
        );
    }
    // Structure: refused before any key is derived, naming the field.
    let edit = |at: usize, v: &[u8]| {
        let mut b = exp.clone();
        b[at..at + v.len()].copy_from_slice(v);
        export::import(&b, PASS).unwrap_err()
    };
    assert_eq!(edit(0, b"BVKX").kind(), ErrorKind::Integrity);
    assert_eq!(edit(4, &3u16.to_le_bytes()).kind(), ErrorKind::Unsupported);
    assert_eq!(edit(6, &[1]).kind(), ErrorKind::Integrity);
    // No memory bomb and no endless derivation: every cost is bounded before any is used.
    for (at, n, says) in [
        (24, MIN_MEMORY_KIB - 1, "Argon2id memory"),
        (24, u32::MAX, "Argon2id memory"),
        (28, MIN_PASSES - 1, "Argon2id passes"),
        (28, u32::MAX, "Argon2id passes"),
        (32, 0, "Argon2id lanes"),
        (32, u32::MAX, "Argon2id lanes"),
    ] {
        let err = edit(at, &n.to_le_bytes());
        assert_eq!(err.kind(), ErrorKind::Integrity);
        assert!(err.to_string().contains(says), "{err}");
    }
    let err = export::import(&exp[..80], PASS).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Integrity);
    assert!(err.to_string().contains("truncated"), "{err}");
    assert_eq!(
        export::import(&exp, b"").unwrap_err().kind(),
        ErrorKind::Usage
    );

    // Export checks what it is given.
    let id = f.vault.config().vault_id;
    let mut other = id;
    other[0] ^= 1;
    let file = fs::read(f.vault.keystore_file()).unwrap();
    assert_eq!(
        export::export(&file, &other, PASS).unwrap_err().kind(),
        ErrorKind::Key
    );
    assert_eq!(
        export::export(b"BVKS", &id, PASS).unwrap_err().kind(),
        ErrorKind::Key
    );
    assert_eq!(
        export::export(&file, &id, b"").unwrap_err().kind(),
        ErrorKind::Usage
    );
    let err = export::export(&file, &id, b"eleven char").unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Usage);
    assert!(err.to_string().contains("at least 12"), "{err}");
}

#[test]
fn passphrase_from_file_or_environment() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("pass");
    for (content, want) in [
        (&b"secret\n"[..], &b"secret"[..]),
        (b"secret\r\n", b"secret"),
        (b"secret", b"secret"),
        (b"two\n\n", b"two\n"),
        (b" spaced ", b" spaced "),
    ] {
        fs::write(&p, content).unwrap();
        assert_eq!(
            &export::read_passphrase(Some(&p), "BV_TEST_UNSET").unwrap()[..],
            want
        );
    }
    let usage = |file: Option<&Path>, env: &str| {
        let err = export::read_passphrase(file, env).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Usage, "{err}");
        err.to_string()
    };
    for content in [&b""[..], b"\n", b"\r\n"] {
        fs::write(&p, content).unwrap();
        assert!(usage(Some(&p), "BV_TEST_UNSET").contains("empty"));
    }
    fs::write(&p, vec![b'x'; MAX_PASSPHRASE]).unwrap();
    assert_eq!(
        export::read_passphrase(Some(&p), "X").unwrap().len(),
        MAX_PASSPHRASE
    );
    fs::write(&p, vec![b'x'; MAX_PASSPHRASE + 1]).unwrap();
    assert!(usage(Some(&p), "X").contains("longer"));
    fs::write(&p, vec![b'x'; 1 << 20]).unwrap();
    assert!(usage(Some(&p), "X").contains("longer"));
    assert_eq!(
        export::read_passphrase(Some(&dir.path().join("missing")), "X")
            .unwrap_err()
            .kind(),
        ErrorKind::NotFound
    );

    // The environment: each variable name is used by this test only.
    std::env::set_var("BV_ESCROW_TEST_PASS", "from env\n");
    assert_eq!(
        &export::read_passphrase(None, "BV_ESCROW_TEST_PASS").unwrap()[..],
        b"from env\n"
    );
    // A file wins over the environment.
    fs::write(&p, b"file\n").unwrap();
    assert_eq!(
        &export::read_passphrase(Some(&p), "BV_ESCROW_TEST_PASS").unwrap()[..],
        b"file"
    );
    std::env::set_var("BV_ESCROW_TEST_EMPTY", "");
    assert!(usage(None, "BV_ESCROW_TEST_EMPTY").contains("empty"));
    assert!(usage(None, "BV_ESCROW_TEST_NEVER_SET").contains("BV_ESCROW_TEST_NEVER_SET"));
}
