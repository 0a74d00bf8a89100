//! Bad input and faults: wrong or missing keystore, a vault of a newer format, damaged packs,
//! manifests and key records (verify names them and exits 3; restore refuses without a
//! panic and removes a target it created), bad sources, and a source that shrinks mid-read.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// A vault with two snapshots of disk `d` (the second an incremental) and one of disk `e`.
struct Fixture {
    bv: Bv,
    v1: Vec<u8>,
    v2: Vec<u8>,
    e: Vec<u8>,
    s1: Value,
    s2: Value,
    se: Value,
}

fn fixture() -> Fixture {
    let bv = Bv::new();
    let src = bv.path("d.img");
    let v1 = mixed_data(1000, 6 * MIB as usize + 500);
    write_file(&src, &v1);
    let s1 = bv.backup(&src, "d", &[]);
    let mut v2 = v1.clone();
    let patch = random_data(1001, 2 * MIB as usize);
    v2[MIB as usize..3 * MIB as usize].copy_from_slice(&patch);
    write_at(&src, MIB, &patch);
    let s2 = bv.backup(&src, "d", &[]);
    assert_eq!(num(&s2, "slots_new"), 2, "{s2}");
    let esrc = bv.path("e.img");
    let e = random_data(1002, 3 * MIB as usize);
    write_file(&esrc, &e);
    let se = bv.backup(&esrc, "e", &[]);
    bv.verify_ok();
    Fixture {
        bv,
        v1,
        v2,
        e,
        s1,
        s2,
        se,
    }
}

impl Fixture {
    /// Disk id (hex) of a disk, from the vault layout: the folder of its snapshot.
    fn disk_id(&self, snapshot: &Value) -> String {
        let id = text(snapshot, "snapshot");
        let m = self
            .bv
            .objects("snapshots")
            .into_iter()
            .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy() == id))
            .expect("manifest of the snapshot");
        m.parent()
            .unwrap()
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned()
    }

    fn manifest(&self, snapshot: &Value) -> PathBuf {
        self.bv.vault.join(format!(
            "snapshots/{}/{}",
            self.disk_id(snapshot),
            text(snapshot, "snapshot")
        ))
    }

    /// Packs that hold only disk `e`'s data (its only snapshot was written last, alone).
    fn packs_of_e(&self) -> Vec<PathBuf> {
        // Packs start with "BVPK" | u16 | u16 | disk id [16].
        let id = hex_decode(&self.disk_id(&self.se));
        self.bv
            .objects("packs")
            .into_iter()
            .filter(|p| read_at(p, 8, 16) == id)
            .collect()
    }

    /// Restore `spec` to a fresh path and expect a clean integrity failure (exit 3) that
    /// names `object`, with no target left behind.
    fn restore_refused(&self, spec: &str, object: &str) {
        let target = self.bv.path(&format!("refused-{}", unique()));
        self.bv
            .restore(spec, &target, &[])
            .code(3)
            .stderr_has(&[object]);
        assert!(
            !target.exists(),
            "the target file created by a failed restore must be removed"
        );
    }
}

fn hex_decode(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

/// The `problems` of a verify document that name `object`.
fn problems_naming(doc: &Value, object: &str) -> Vec<Value> {
    doc["problems"]
        .as_array()
        .expect("problems")
        .iter()
        .filter(|p| p["object"].as_str().is_some_and(|o| o.contains(object)))
        .cloned()
        .collect()
}

/// `verify` (with or without --read-data) must exit 3 and name `object` in its JSON and text.
fn verify_finds(bv: &Bv, read_data: bool, object: &str) -> Value {
    let r = bv.verify(read_data);
    r.code(3);
    let doc = r.json();
    assert_eq!(doc["ok"], false, "{doc}");
    assert!(
        !problems_naming(&doc, object).is_empty(),
        "verify should name {object}: {doc}"
    );
    let mut args = vec!["verify"];
    if read_data {
        args.push("--read-data");
    }
    bv.run(&args)
        .code(3)
        .stdout_has(&["DAMAGED", object, "vault has damage"]);
    doc
}

// ---------------------------------------------------------------------------------------------
// Keystore
// ---------------------------------------------------------------------------------------------

#[test]
fn wrong_keystore_folder_is_a_clear_error() {
    let f = fixture();
    let config_before = read_file(&f.bv.vault.join("config"));
    let key = f.bv.key_file();
    let other = f.bv.path("other-keystore");
    std::fs::create_dir(&other).unwrap();
    // A folder others may read is not used as is: keys would live in its `blockvault/`.
    let expected = other.join("blockvault").join(key.file_name().unwrap());
    let src = f.bv.path("d.img");
    for args in [
        vec!["verify"],
        vec!["snapshots"],
        vec!["restore", "d", "/nonexistent/never-written"],
        vec!["backup", src.to_str().unwrap(), "--disk", "d"],
    ] {
        let c = f.bv.command_with_keystore(&other);
        f.bv.run_cmd(c, &args)
            .code(1)
            .stderr_has(&["keystore", expected.to_str().unwrap()]);
    }
    // Nothing was created or replaced: the vault still opens with its own keystore.
    assert_eq!(read_file(&f.bv.vault.join("config")), config_before);
    assert!(!expected.exists());
    f.bv.verify_ok();
}

#[test]
fn missing_or_damaged_keystore_file_is_a_clear_error() {
    let f = fixture();
    let key = f.bv.key_file();
    let saved = read_file(&key);

    std::fs::remove_file(&key).unwrap();
    f.bv.run(&["verify"])
        .code(1)
        .stderr_has(&["keystore", key.to_str().unwrap()]);
    let t = f.bv.path("t");
    f.bv.restore("d", &t, &[])
        .code(1)
        .stderr_has(&[key.to_str().unwrap()]);
    assert!(!t.exists());
    // A backup must not silently start a new vault over the old one.
    let src = f.bv.path("d.img");
    f.bv.run(&["backup", src.to_str().unwrap(), "--disk", "d"])
        .code(1)
        .stderr_has(&[key.to_str().unwrap()]);
    assert!(!key.exists(), "no new key file for the old vault");

    // A flipped byte in the key file (written private, as key files must be).
    let mut damaged = saved.clone();
    damaged[60] ^= 1;
    write_private(&key, &damaged);
    f.bv.run(&["verify"])
        .code(1)
        .stderr_has(&[key.to_str().unwrap(), "damaged"]);

    // The key file of another vault under this vault's name.
    let other = Bv::new();
    let osrc = other.path("x");
    write_file(&osrc, &random_data(5, 4096));
    other.backup(&osrc, "x", &[]);
    write_private(&key, &read_file(&other.key_file()));
    f.bv.run(&["verify"]).code(1).stderr_has(&["another vault"]);

    // Restored, everything works again.
    write_private(&key, &saved);
    f.bv.verify_ok();
    f.bv.restore_and_compare(&format!("d@{}", text(&f.s2, "short_id")), &f.v2);
}

/// Write `bytes` to `path` readable by its owner only.
fn write_private(path: &Path, bytes: &[u8]) {
    use std::os::unix::fs::PermissionsExt;
    write_file(path, bytes);
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

// ---------------------------------------------------------------------------------------------
// Format version
// ---------------------------------------------------------------------------------------------

#[test]
fn vault_of_a_newer_format_version_is_refused() {
    let f = fixture();
    let config = f.bv.vault.join("config");
    let mut b = read_file(&config);
    assert_eq!(&b[..4], b"BVLT");
    assert_eq!(
        u16::from_le_bytes([b[4], b[5]]),
        2,
        "this build writes version 2"
    );
    b[4..6].copy_from_slice(&3u16.to_le_bytes());
    write_file(&config, &b);
    let src = f.bv.path("d.img");
    let t = f.bv.path("t");
    for args in [
        vec!["verify"],
        vec!["verify", "--read-data"],
        vec!["snapshots"],
        vec!["restore", "d", t.to_str().unwrap()],
        vec!["backup", src.to_str().unwrap(), "--disk", "d"],
    ] {
        f.bv.run(&args).failed().stderr_has(&["version 3"]);
    }
    assert!(!t.exists());
    f.bv.run(&["init"]).failed();
    assert_eq!(read_file(&config), b, "the config was not rewritten");
    // Version 0 is not a valid version either.
    b[4..6].copy_from_slice(&0u16.to_le_bytes());
    write_file(&config, &b);
    f.bv.run(&["snapshots"]).failed().stderr_has(&["version 0"]);
}

#[test]
fn tampered_config_fails_authentication() {
    let f = fixture();
    let config = f.bv.vault.join("config");
    let good = read_file(&config);
    // The "created" time lives at bytes 24..32; it is covered by the MAC.
    flip_byte(&config, 26);
    f.bv.run(&["verify"])
        .failed()
        .stderr_has(&["config", "authentication"]);
    write_file(&config, &good[..40]);
    f.bv.run(&["snapshots"]).failed();
    write_file(&config, &good);
    f.bv.verify_ok();
}

// ---------------------------------------------------------------------------------------------
// Damaged packs
// ---------------------------------------------------------------------------------------------

#[test]
fn bit_flipped_pack_is_found_by_read_data_and_refused_by_restore() {
    let f = fixture();
    let packs = f.packs_of_e();
    assert_eq!(packs.len(), 1, "disk e's 3 MiB fit in one pack: {packs:?}");
    let pack = &packs[0];
    let key = f.bv.key_of(pack);
    // The first frame starts after the 32-byte header; its length is its first u32.
    let flen = u32::from_le_bytes(read_at(pack, 32, 4).try_into().unwrap()) as u64;
    assert!(flen > 1000 && flen < 2 * MIB, "frame length {flen}");
    flip_byte(pack, 32 + flen / 2);

    // The structure is intact; reading the data finds the damage and names the pack.
    f.bv.verify(false).ok();
    let doc = verify_finds(&f.bv, true, &key);
    let p = &problems_naming(&doc, &key)[0];
    assert!(
        p["snapshots"]
            .to_string()
            .contains(&text(&f.se, "short_id")),
        "the problem lists the snapshot that depends on the pack: {p}"
    );
    // Only that pack is damaged.
    assert_eq!(
        doc["problems"].as_array().unwrap().len(),
        problems_naming(&doc, &key).len()
    );

    f.restore_refused("e", &key);
    // Disk d is unaffected.
    f.bv.restore_and_compare(&format!("d@{}", text(&f.s2, "short_id")), &f.v2);
    f.bv.restore_and_compare(&format!("d@{}", text(&f.s1, "short_id")), &f.v1);
}

#[test]
fn damaged_pack_index_is_found_by_read_data() {
    let f = fixture();
    let packs = f.packs_of_e();
    let pack = &packs[0];
    let key = f.bv.key_of(pack);
    // Footer (last 16 bytes): u64 index offset | u32 index length | "BVPF".
    let len = std::fs::metadata(pack).unwrap().len();
    let footer = read_at(pack, len - 16, 16);
    assert_eq!(&footer[12..], b"BVPF");
    let index_off = u64::from_le_bytes(footer[..8].try_into().unwrap());
    let index_len = u32::from_le_bytes(footer[8..12].try_into().unwrap()) as u64;
    assert_eq!(index_off + index_len + 16, len, "index ends at the footer");
    flip_byte(pack, index_off + index_len / 2);
    f.bv.verify(false).ok();
    verify_finds(&f.bv, true, &key);
    // The frames themselves are intact: a restore gives the exact bytes or refuses.
    let target = f.bv.path("after-index-damage");
    let r = f.bv.restore("e", &target, &[]);
    if r.code == 0 {
        assert_file_eq(&target, &f.e);
    } else {
        r.code(3);
        assert!(!target.exists());
    }
}

#[test]
fn frames_swapped_inside_a_pack_are_refused() {
    // Disk e is random data: its three 1 MiB slots are frames of equal length, one after
    // the other from byte 32. Swapping two keeps every CRC valid; only the binding of a
    // frame to its extent id can tell.
    let f = fixture();
    let packs = f.packs_of_e();
    let pack = &packs[0];
    let key = f.bv.key_of(pack);
    let l0 = u32::from_le_bytes(read_at(pack, 32, 4).try_into().unwrap()) as u64;
    let l1 = u32::from_le_bytes(read_at(pack, 32 + l0, 4).try_into().unwrap()) as u64;
    assert_eq!(l0, l1, "incompressible slots give frames of one length");
    let a = read_at(pack, 32, l0 as usize);
    let b = read_at(pack, 32 + l0, l0 as usize);
    write_at(pack, 32, &b);
    write_at(pack, 32 + l0, &a);
    verify_finds(&f.bv, true, &key);
    f.restore_refused("e", &key);
}

#[test]
fn truncated_pack_is_found_by_verify_and_refused_by_restore() {
    let f = fixture();
    let packs = f.packs_of_e();
    assert_eq!(packs.len(), 1);
    let pack = &packs[0];
    let key = f.bv.key_of(pack);
    let len = std::fs::metadata(pack).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(pack)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    verify_finds(&f.bv, false, &key);
    verify_finds(&f.bv, true, &key);
    f.restore_refused("e", &key);
    f.bv.restore_and_compare(&format!("d@{}", text(&f.s2, "short_id")), &f.v2);

    // Truncated to nothing at all.
    std::fs::File::create(pack).unwrap();
    verify_finds(&f.bv, false, &key);
    f.restore_refused("e", &key);
}

#[test]
fn missing_pack_is_found_by_verify_and_refused_by_restore() {
    let f = fixture();
    let packs = f.packs_of_e();
    let key = f.bv.key_of(&packs[0]);
    std::fs::remove_file(&packs[0]).unwrap();
    verify_finds(&f.bv, false, &key);
    let target = f.bv.path("missing-pack-target");
    f.bv.restore("e", &target, &[]).failed().stderr_has(&[&key]);
    assert!(!target.exists());
}

// ---------------------------------------------------------------------------------------------
// Damaged manifests
// ---------------------------------------------------------------------------------------------

#[test]
fn bit_flipped_manifest_is_found_and_refused() {
    let f = fixture();
    let m = f.manifest(&f.s1);
    let key = f.bv.key_of(&m);
    let len = std::fs::metadata(&m).unwrap().len();
    assert!(len > 100);
    // In the sealed body, past the 60-byte plaintext header and the nonce.
    flip_byte(&m, 72 + (len - 72) / 2);
    verify_finds(&f.bv, false, &key);
    f.restore_refused(&format!("d@{}", text(&f.s1, "short_id")), &key);
    // The other snapshot of the disk, and the other disk, still restore by id.
    f.bv.restore_and_compare(&format!("d@{}", text(&f.s2, "short_id")), &f.v2);
    f.bv.restore_and_compare("e", &f.e);

    // A flipped byte in the plaintext header (bound as AAD) is caught too.
    let m2 = f.manifest(&f.s2);
    let key2 = f.bv.key_of(&m2);
    flip_byte(&m2, 30);
    verify_finds(&f.bv, false, &key2);
    let t = f.bv.path("t2");
    f.bv.restore(&format!("d@{}", text(&f.s2, "short_id")), &t, &[])
        .failed()
        .stderr_has(&[&key2]);
    assert!(!t.exists());
}

#[test]
fn manifest_replaced_by_another_snapshot_is_refused() {
    // Rolling snapshot s2 back to s1's manifest under s2's name must not go unnoticed.
    let f = fixture();
    let m1 = f.manifest(&f.s1);
    let m2 = f.manifest(&f.s2);
    let key2 = f.bv.key_of(&m2);
    std::fs::copy(&m1, &m2).unwrap();
    verify_finds(&f.bv, false, &key2);
    f.restore_refused(&format!("d@{}", text(&f.s2, "short_id")), &key2);
    f.bv.restore_and_compare(&format!("d@{}", text(&f.s1, "short_id")), &f.v1);
    // Nor may a manifest of disk e stand in for one of disk d.
    let me = f.manifest(&f.se);
    std::fs::copy(&me, &m2).unwrap();
    verify_finds(&f.bv, false, &key2);
    f.restore_refused(&format!("d@{}", text(&f.s2, "short_id")), &key2);
}

#[test]
fn truncated_manifest_is_found_and_refused() {
    let f = fixture();
    let m = f.manifest(&f.s2);
    let key = f.bv.key_of(&m);
    let good = read_file(&m);
    for cut in [good.len() - 7, 70, 30, 0] {
        write_file(&m, &good[..cut]);
        verify_finds(&f.bv, false, &key);
        f.restore_refused(&format!("d@{}", text(&f.s2, "short_id")), &key);
        f.bv.restore_and_compare(&format!("d@{}", text(&f.s1, "short_id")), &f.v1);
    }
    write_file(&m, &good);
    f.bv.verify_ok();
}

// ---------------------------------------------------------------------------------------------
// Damaged key records
// ---------------------------------------------------------------------------------------------

#[test]
fn bit_flipped_key_record_is_found_and_refused() {
    let f = fixture();
    let disk = f.disk_id(&f.se);
    let rec = f.bv.vault.join(format!("keys/{disk}/00000000-00000001"));
    assert!(rec.exists(), "key record of disk e at {}", rec.display());
    let len = std::fs::metadata(&rec).unwrap().len();
    flip_byte(&rec, len / 2);
    let key = format!("keys/{disk}");
    verify_finds(&f.bv, false, &key);
    let t = f.bv.path("t");
    f.bv.restore("e", &t, &[]).failed().stderr_has(&[&key]);
    assert!(!t.exists());
}

#[test]
fn damaged_key_record_of_one_disk_does_not_block_the_others() {
    let f = fixture();
    let disk = f.disk_id(&f.se);
    let rec = f.bv.vault.join(format!("keys/{disk}/00000000-00000001"));
    let len = std::fs::metadata(&rec).unwrap().len();
    flip_byte(&rec, len / 2);
    // Disk d's keys and data are intact: it must still restore and verify by itself.
    f.bv.restore_and_compare(&format!("d@{}", text(&f.s2, "short_id")), &f.v2);
    f.bv.run(&["verify", "--disk", "d", "--read-data"]).ok();
}

// ---------------------------------------------------------------------------------------------
// Bad sources
// ---------------------------------------------------------------------------------------------

#[test]
fn missing_source_and_directory_source_are_clear_errors() {
    let bv = Bv::new();
    let missing = bv.path("no-such.img");
    bv.run(&["backup", missing.to_str().unwrap(), "--disk", "d"])
        .code(1)
        .stderr_has(&[missing.to_str().unwrap(), "does not exist"]);
    let dir = bv.path("a-dir");
    std::fs::create_dir(&dir).unwrap();
    bv.run(&["backup", dir.to_str().unwrap(), "--disk", "d"])
        .code(2)
        .stderr_has(&[dir.to_str().unwrap(), "directory"]);
    bv.run(&["backup", "/dev/null", "--disk", "d"])
        .code(2)
        .stderr_has(&["/dev/null", "character device"]);
    // Bad usage: no vault, no disk name, an unknown command.
    let mut c = std::process::Command::new(bin());
    c.env_remove("BLOCKVAULT_VAULT")
        .arg("--keystore")
        .arg(&bv.keystore);
    bv.run_cmd(c, &["snapshots"]).code(2).stderr_has(&["vault"]);
    bv.run(&["backup", dir.to_str().unwrap()]).code(2);
    bv.run(&["frobnicate"]).code(2);
    // None of this left a snapshot behind.
    if bv.vault.join("config").exists() {
        assert!(bv.snapshots().is_empty());
    }
}

/// Every file under `dir`, hidden temporaries included.
fn all_files(dir: &Path) -> usize {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    rd.map(|e| {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            all_files(&e.path())
        } else {
            1
        }
    })
    .sum()
}

#[test]
fn source_that_shrinks_during_the_read() {
    let bv = Bv::new();
    // Earlier snapshots: of the same disk name and of another disk.
    let small = bv.path("small.img");
    let small_data = mixed_data(2000, 4 * MIB as usize + 1);
    write_file(&small, &small_data);
    let s1 = bv.backup(&small, "d", &[]);
    bv.backup(&small, "other", &[]);

    let big = bv.path("big.img");
    {
        use std::io::Write;
        let mut f = std::io::BufWriter::new(std::fs::File::create(&big).unwrap());
        for i in 0..200u64 {
            f.write_all(&random_data(3000 + i, MIB as usize)).unwrap();
        }
        f.flush().unwrap();
    }
    let packs_before = all_files(&bv.vault.join("packs"));
    let (mut child, what) = bv.spawn(&[
        "backup",
        big.to_str().unwrap(),
        "--disk",
        "d",
        "--threads",
        "1",
    ]);
    // Truncate as soon as the backup has started writing its first pack (~32 MiB in), so
    // it is well before the end of the 200 MiB.
    let started = Instant::now();
    let mut finished_first = None;
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            finished_first = Some(st);
            break;
        }
        if all_files(&bv.vault.join("packs")) > packs_before {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "backup wrote no pack within 60 s"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    std::fs::OpenOptions::new()
        .write(true)
        .open(&big)
        .unwrap()
        .set_len(MIB)
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let run = Run {
        what,
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    assert!(
        finished_first.is_none(),
        "the backup finished before the source could be truncated: {run:?}"
    );
    run.code(1).stderr_has(&[big.to_str().unwrap()]);
    assert!(
        ["ended", "shrank", "changed", "truncated"]
            .iter()
            .any(|w| run.stderr.contains(w)),
        "the message should say the source shrank: {}",
        run.stderr
    );

    // No snapshot was committed, and everything before is intact.
    let snaps = bv.snapshots();
    assert_eq!(snaps.len(), 2, "no new snapshot: {snaps:?}");
    let v = bv.verify_ok();
    eprintln!(
        "shrinking source: {} unreferenced packs left (allowed)",
        v["unreferenced_packs"]
    );
    bv.restore_and_compare("d", &small_data);
    bv.restore_and_compare(&format!("d@{}", text(&s1, "short_id")), &small_data);
    bv.restore_and_compare("other", &small_data);
    // And the next backup of the (now 1 MiB) source works.
    let data = read_file(&big);
    let s2 = bv.backup(&big, "d", &[]);
    bv.restore_and_compare(&format!("d@{}", text(&s2, "short_id")), &data);
}

#[test]
fn a_damaged_escrow_record_is_reported_by_verify() {
    let bv = Bv::new();
    let src = bv.path("disk.img");
    write_file(&src, &random_data(77, MIB as usize));
    bv.backup(&src, "d", &[]);
    let secret = bv.path("secret.txt");
    std::fs::write(
        &secret,
        b"123456-654321-111111-222222-333333-444444-555555-666666",
    )
    .unwrap();
    bv.run(&[
        "key",
        "escrow",
        "d",
        "--name",
        "bitlocker-C",
        "--secret-file",
        secret.to_str().unwrap(),
    ])
    .ok();
    bv.verify_ok();
    let records = bv.objects("escrow");
    assert_eq!(records.len(), 1, "{records:?}");
    flip_byte(&records[0], 40);
    bv.verify(false).code(3).stdout_has(&["escrow/"]);
}
