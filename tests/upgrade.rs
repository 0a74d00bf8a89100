//! `upgrade` of format 1 vaults made by the release before the vault head (blockvault 7ac70c3),
//! committed under tests/fixtures/upgrade/ with their keystores and test keys
//! (tests/fixtures/README.md says how each was made):
//! - `platform`: platform keys and a recovery key, two disks, incrementals with 4 KiB
//!   overlays, escrow records under two DEK generations, `key rotate`, `key rotate --new-dek`,
//!   platform KEK version 1 revoked, and a keystore export;
//! - `cmk`: a PEM customer key, a recovery key and the infrastructure layer, incrementals, an
//!   escrow record, and `key rotate --new-cmk` to a second PEM key.
//!
//! Every test works on a copy. Before the upgrade every other command refuses the vault,
//! naming `blockvault upgrade`, and changes nothing. The upgrade brings each fixture to format
//! 2: every snapshot restores byte for byte (the expected content is made again here by the
//! generator the fixtures were made with, [`image`], and checked against the BLAKE3 each
//! fixture recorded), both verify modes are clean, escrow records come back, backups continue
//! incrementally from the old snapshots, `key show` lists what the fixture made, recovery
//! through the new anchor works, and no key material is in the clear. A second `upgrade` has
//! nothing to do. A tampered version 1 key record or descriptor (a flipped byte; one replaced
//! or planted in the version 2 form, which has no MAC) is refused, naming it, with nothing
//! written.
//!
//! `make_fixtures` (ignored) makes the fixtures again with the old release binary named by
//! `BLOCKVAULT_V1_BIN`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use blockvault::crypto::kek::KekKind;
use blockvault::crypto::rsa::{read_public_key, OaepHash};
use serde_json::Value;

use common::secrets::{assert_no_key_material, private_components, tree};
use common::v1_fixtures::*;
use common::*;

/// Every file of the vault (but the empty lock files under `locks/`, which taking a lock
/// creates) and of the keystore folder, with its bytes.
fn state(bv: &Bv) -> (common::secrets::Tree, common::secrets::Tree) {
    let mut vault = tree(&bv.vault);
    vault.retain(|name, _| !name.starts_with("locks/"));
    (vault, tree(&bv.keystore))
}

/// Fail naming the files that differ between two [`state`]s.
fn assert_same(
    now: &(common::secrets::Tree, common::secrets::Tree),
    before: &(common::secrets::Tree, common::secrets::Tree),
    what: &str,
) {
    let differ = |a: &common::secrets::Tree, b: &common::secrets::Tree| -> Vec<String> {
        a.keys()
            .chain(b.keys())
            .filter(|k| a.get(*k) != b.get(*k))
            .cloned()
            .collect()
    };
    let (v, k) = (differ(&now.0, &before.0), differ(&now.1, &before.1));
    assert!(
        v.is_empty() && k.is_empty(),
        "{what}: vault files changed {v:?}, keystore files changed {k:?}"
    );
}

/// Every key record of `key show --json` is wrapped by exactly `ids`, and there are `n`.
fn assert_wrapped_by(show: &Value, ids: &[&str], n: usize) {
    let records = show["dek_generations"].as_array().expect("dek_generations");
    assert_eq!(records.len(), n, "{show}");
    for r in records {
        assert_eq!(r["wrapped_by"], serde_json::json!(ids), "{show}");
    }
}

/// The KEKs of `key show --json`: (id, state).
fn keks(show: &Value) -> Vec<(String, String)> {
    show["keks"]
        .as_array()
        .expect("keks")
        .iter()
        .map(|k| (text(k, "id"), k["state"].as_str().unwrap_or("").to_string()))
        .collect()
}

/// Every snapshot of the fixture restores byte for byte.
fn restore_all(bv: &Bv, snaps: &[Snap]) {
    for s in snaps {
        bv.restore_and_compare(&format!("{}@{}", s.disk, s.id), &s.data);
    }
}

/// `upgrade --json`, which must succeed; its document.
fn upgrade(bv: &Bv) -> Value {
    bv.json(&["upgrade"])
}

/// The PEM private components of the fixtures' test keys: never stored anywhere.
fn pems(bv: &Bv) -> Vec<(String, Vec<u8>)> {
    ["a", "b", "r"]
        .iter()
        .flat_map(|k| {
            private_components(bv.path("keys").join(format!("{k}.key")).to_str().unwrap())
        })
        .collect()
}

/// Whether openssl (for the PEM key scans) is here (it has no `--version`).
fn have_openssl(test: &str) -> bool {
    Command::new("openssl")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success())
        || skip(test, "openssl is not installed (apt-get install openssl)")
}

// ---------------------------------------------------------------------------------------------
// Before the upgrade
// ---------------------------------------------------------------------------------------------

/// Every command but `upgrade` refuses a format 1 vault (exit 1), naming `blockvault upgrade`,
/// and leaves the vault and the keystore as they were.
#[test]
fn format_1_refused_by_every_command_but_upgrade() {
    for f in [&PLATFORM, &CMK] {
        let bv = copy(f);
        let before = state(&bv);
        let img = bv.path("new.img");
        write_file(&img, &image("new", 1, 0));
        let target = bv.path("target");
        let escrowed = bv.path("escrowed");
        let pass = bv.path("pass");
        std::fs::write(&pass, "a long export passphrase\n").unwrap();
        let disk = f.disks[0].0;
        let r = bv.path("keys/r.key").display().to_string();
        let commands: Vec<Vec<String>> = [
            vec!["snapshots"],
            vec!["restore", disk, target.to_str().unwrap()],
            vec!["verify"],
            vec!["verify", "--read-data"],
            vec!["backup", img.to_str().unwrap(), "--disk", disk],
            vec!["backup", img.to_str().unwrap(), "--disk", "new", "--init"],
            vec!["key", "show"],
            vec!["key", "rotate"],
            vec!["key", "rotate", "--new-dek"],
            vec!["key", "rotate", "--auth"],
            vec!["key", "revoke"],
            vec!["key", "enable"],
            vec!["key", "destroy", "--version", "1"],
            vec![
                "key",
                "escrow",
                disk,
                "--name",
                "x",
                "--secret-file",
                pass.to_str().unwrap(),
            ],
            vec![
                "key",
                "export",
                escrowed.to_str().unwrap(),
                "--passphrase-file",
                pass.to_str().unwrap(),
            ],
            vec!["key", "recover", "--recovery-private", &r],
        ]
        .into_iter()
        .map(|c| c.into_iter().map(String::from).collect())
        .collect();
        for args in &commands {
            let run = bv.run(args);
            run.code(1)
                .stderr_has(&["format version 1", "blockvault upgrade"]);
            assert_same(
                &state(&bv),
                &before,
                &format!("{} on the {} fixture", run.what, f.name),
            );
        }
        assert!(!target.exists() && !escrowed.exists());
        assert_eq!(format_version(&bv), 1);
    }
}

/// `key import` is the exception: a format 1 vault whose keystore is lost gets its keys back
/// from an export made by the old release (checked against the config's MAC; the vault is not
/// touched), so that `upgrade` can run; then every snapshot restores.
#[test]
fn format_1_keystore_imported_then_upgraded() {
    let f = &PLATFORM;
    let snaps = snaps(f);
    let bv = copy(f);
    std::fs::remove_dir_all(&bv.keystore).unwrap();
    let before = tree(&bv.vault);
    let pass = bv.path("pass");
    std::fs::write(&pass, "a long export passphrase\n").unwrap();
    let export = fixtures().join("platform/keys.export");
    bv.json(&[
        "key",
        "import",
        export.to_str().unwrap(),
        "--passphrase-file",
        pass.to_str().unwrap(),
    ]);
    assert!(tree(&bv.vault) == before, "key import changed the vault");
    bv.run(&["snapshots"])
        .code(1)
        .stderr_has(&["blockvault upgrade"]);
    upgrade(&bv);
    restore_all(&bv, &snaps);
    bv.verify_ok();
}

// ---------------------------------------------------------------------------------------------
// The upgrade
// ---------------------------------------------------------------------------------------------

/// The platform fixture upgraded: the report's figures, `key show` (platform versions 1
/// revoked, 2 and 3 enabled, 3 current; every record under version 3 and the recovery key),
/// every snapshot exact, both verify modes, both escrow records, an incremental backup of each
/// disk on its old latest snapshot, a second `upgrade` with nothing to do, and no key material
/// in the clear. Then the keys move on as format 2 has them: version 1 destroyed, a rotation.
#[test]
fn platform_fixture_upgrades() {
    const TEST: &str = "platform_fixture_upgrades";
    if !have_openssl(TEST) {
        return;
    }
    let f = &PLATFORM;
    let snaps = snaps(f);
    let bv = copy(f);
    let doc = upgrade(&bv);
    assert_eq!(doc["already"], false, "{doc}");
    assert_eq!(doc["disks"], 2, "{doc}");
    assert_eq!(doc["key_records"], 4, "{doc}");
    assert_eq!(doc["snapshots"], snaps.len(), "{doc}");
    assert_eq!(doc["escrows"], 2, "{doc}");
    assert_eq!(doc["damaged_manifests"], serde_json::json!([]), "{doc}");
    assert_eq!(doc["removed_v1_objects"], 6, "{doc}");
    assert_eq!(format_version(&bv), 2);

    let show = bv.json(&["key", "show"]);
    assert_eq!(
        keks(&show),
        [
            ("platform-v1", "revoked"),
            ("platform-v2", "enabled"),
            ("platform-v3", "enabled"),
            ("recovery-v1", ""),
        ]
        .map(|(a, b)| (a.to_string(), b.to_string())),
        "{show}"
    );
    assert_wrapped_by(&show, &["platform-v3", "recovery-v1"], 4);
    checks_after_upgrade(&bv, f, &snaps);

    // Format 2's key lifecycle from here: the revoked version destroyed, then a rotation,
    // which destroys version 2 at its end.
    bv.json(&["key", "destroy", "--version", "1"]);
    bv.json(&["key", "rotate"]);
    let show = bv.json(&["key", "show"]);
    let ids: Vec<String> = keks(&show).into_iter().map(|(id, _)| id).collect();
    assert!(ids.contains(&"platform-v4".to_string()), "{show}");
    assert!(!ids.contains(&"platform-v1".to_string()), "{show}");
    bv.verify_ok();
    restore_all(&bv, &snaps);
}

/// The customer-key fixture upgraded (PEM key `b` after a rotation from `a`, recovery key
/// `r`, infrastructure layer): the same checks, every record under `cmk-rsa-v2` and the
/// recovery key; then the keystore is lost and `key recover --take-over` with the fingerprint
/// the upgrade printed (the recovery anchor it made) and the recovery key gets everything back.
#[test]
fn cmk_fixture_upgrades() {
    const TEST: &str = "cmk_fixture_upgrades";
    if !have_openssl(TEST) {
        return;
    }
    let f = &CMK;
    let snaps = snaps(f);
    let bv = copy(f);
    let doc = upgrade(&bv);
    assert_eq!(doc["already"], false, "{doc}");
    assert_eq!(doc["disks"], 1, "{doc}");
    assert_eq!(doc["key_records"], 1, "{doc}");
    assert_eq!(doc["snapshots"], snaps.len(), "{doc}");
    assert_eq!(doc["escrows"], 1, "{doc}");
    assert_eq!(doc["removed_v1_objects"], 2, "{doc}");
    let fingerprint = text(&doc, "auth_fingerprint");

    let show = bv.json(&["key", "show"]);
    assert_eq!(text(&show, "kek_kind"), "cmk-rsa", "{show}");
    // The rotated-out key stays listed until the next rotation (records a killed format 1
    // rotation left under it still unwrap).
    let ids: Vec<String> = keks(&show).into_iter().map(|(id, _)| id).collect();
    assert_eq!(ids, ["cmk-rsa-v1", "cmk-rsa-v2", "recovery-v1"], "{show}");
    assert_wrapped_by(&show, &["cmk-rsa-v2", "recovery-v1"], 1);
    checks_after_upgrade(&bv, f, &snaps);

    // The keystore is lost: the recovery key and the fingerprint take the vault over.
    std::fs::remove_dir_all(&bv.keystore).unwrap();
    let r = bv.path("keys/r.key").display().to_string();
    bv.json(&[
        "key",
        "recover",
        "--recovery-private",
        &r,
        "--take-over",
        "--anchor-fingerprint",
        &fingerprint,
    ]);
    bv.verify_ok();
    restore_all(&bv, &snaps);
    assert_no_key_material(&bv, Some(&bv.path("keys/b.key")), &pems(&bv));
}

/// What every upgraded fixture must do: snapshots exact, verify clean, escrow back, backups
/// continuing incrementally from each disk's old latest snapshot, a second `upgrade` with
/// nothing to do, and no key material in the clear.
fn checks_after_upgrade(bv: &Bv, f: &Fixture, snaps: &[Snap]) {
    let listed: Vec<String> = bv.snapshots().iter().map(|s| text(s, "id")).collect();
    let mut expected: Vec<String> = snaps.iter().map(|s| s.id.clone()).collect();
    let mut got = listed.clone();
    expected.sort();
    got.sort();
    assert_eq!(got, expected, "the upgraded vault lists other snapshots");
    restore_all(bv, snaps);
    bv.verify_ok();
    for (disk, name) in escrows(f) {
        let dir = bv.path(&format!("escrowed-{disk}"));
        let target = bv.path(&format!("escrow-target-{disk}"));
        bv.restore(
            disk.as_str(),
            &target,
            &["--with-escrow", dir.to_str().unwrap()],
        )
        .ok();
        assert_eq!(read_file(&dir.join(&name)), escrow_secret(&disk, &name));
    }
    let key = f.cmk_private.map(|k| bv.path("keys").join(k));
    assert_no_key_material(bv, key.as_deref(), &pems(bv));

    let mut all: Vec<(String, String, Vec<u8>)> = Vec::new();
    for (disk, mib) in f.disks {
        let latest = snaps
            .iter()
            .filter(|s| s.disk == *disk)
            .max_by_key(|s| s.version);
        let latest = latest.expect("a snapshot of every disk");
        let data = image(disk, *mib, latest.version + 1);
        let img = bv.path(&format!("{disk}-next.img"));
        write_file(&img, &data);
        let doc = bv.backup(&img, disk, &[]);
        // An incremental on the old latest snapshot: slots compared by hash, only the changed
        // 4 KiB blocks and 64 KiB chunk stored.
        assert_eq!(text(&doc, "parent"), latest.id, "{doc}");
        assert_eq!(text(&doc, "change_source"), "hash-compare", "{doc}");
        assert!(
            num(&doc, "bytes_stored") < (*mib as u64) * MIB / 4,
            "stored too much for an incremental: {doc}"
        );
        all.push((disk.to_string(), text(&doc, "snapshot"), data));
    }
    for (disk, id, data) in &all {
        bv.restore_and_compare(&format!("{disk}@{id}"), data);
    }
    bv.verify_ok();

    let again = upgrade(bv);
    assert_eq!(again["already"], true, "{again}");
    assert_eq!(again["removed_v1_objects"], 0, "{again}");
    bv.run(&["upgrade"])
        .ok()
        .stdout_has(&["is at the current format"]);
}

// ---------------------------------------------------------------------------------------------
// Tampering
// ---------------------------------------------------------------------------------------------

/// Version 1 objects that fail their check stop the upgrade (exit 3) naming the object, and
/// nothing is written: a key record with a flipped byte; a key descriptor with a flipped MAC
/// byte; the recovery key's descriptor replaced by another RSA key's in the version 2 form (no
/// MAC: a storage holder's key, which would get every new DEK and the auth key through the
/// recovery anchor); a customer key descriptor planted in that form; and in the customer-key
/// fixture (infrastructure layer) a flipped byte of its stored descriptor.
#[test]
fn tampered_v1_objects_refused() {
    let platform = copy(&PLATFORM);
    let record = platform.objects("keys")[1].clone();
    let recovery = platform.vault.join("kek/recovery-00000001");
    let foreign = |kind: KekKind| {
        read_public_key(kind, 1, OaepHash::Sha256, &platform.path("keys/b.pub"))
            .expect("b.pub")
            .encode()
    };
    let cases: Vec<(&str, Box<Tamper<'_>>)> = vec![
        (
            "a key record with a flipped byte",
            Box::new(|bv: &Bv| {
                let p = bv.vault.join(platform.key_of(&record));
                flip_byte(&p, 40);
                platform.key_of(&record)
            }),
        ),
        (
            "a descriptor with a flipped MAC byte",
            Box::new(|bv: &Bv| {
                let p = bv.vault.join("kek/recovery-00000001");
                let len = std::fs::metadata(&p).unwrap().len();
                flip_byte(&p, len - 1);
                "kek/recovery-00000001".into()
            }),
        ),
        (
            "the recovery descriptor replaced by another key's, without a MAC",
            Box::new(|bv: &Bv| {
                assert!(recovery.exists());
                write_file(
                    &bv.vault.join("kek/recovery-00000001"),
                    &foreign(KekKind::Recovery),
                );
                "kek/recovery-00000001".into()
            }),
        ),
        (
            "a customer key descriptor planted without a MAC",
            Box::new(|bv: &Bv| {
                write_file(
                    &bv.vault.join("kek/cmk-rsa-00000001"),
                    &foreign(KekKind::CustomerRsa),
                );
                "kek/cmk-rsa-00000001".into()
            }),
        ),
    ];
    for (what, tamper) in &cases {
        let bv = copy(&PLATFORM);
        let named = tamper(&bv);
        refused(&bv, what, &named);
    }
    let bv = copy(&CMK);
    let p = bv.vault.join("kek/cmk-rsa-00000002");
    flip_byte(&p, 100);
    refused(
        &bv,
        "an infrastructure-encrypted descriptor with a flipped byte",
        "kek/cmk-rsa-00000002",
    );
}

/// A change to a fixture copy that `upgrade` must refuse; returns the object it must name.
type Tamper<'a> = dyn Fn(&Bv) -> String + 'a;

/// `upgrade` of `bv` fails with exit 3 naming `object`, and changes nothing.
fn refused(bv: &Bv, what: &str, object: &str) {
    let before = state(bv);
    let r = bv.run(&["upgrade"]);
    r.code(3).stderr_has(&[object]);
    assert_same(&state(bv), &before, &format!("{what}: the refused upgrade"));
    bv.run(&["snapshots"])
        .code(1)
        .stderr_has(&["blockvault upgrade"]);
}

// ---------------------------------------------------------------------------------------------
// Making the fixtures
// ---------------------------------------------------------------------------------------------

/// Make tests/fixtures/upgrade/{platform,cmk} again with the format 1 release binary named by
/// `BLOCKVAULT_V1_BIN` (blockvault 7ac70c3), keeping the test keys of `keys/` (made by
/// openssl if missing). Prints every command it runs. Run:
/// `BLOCKVAULT_V1_BIN=/work/artifacts/blockvault-7ac70c3 cargo test --release --test upgrade
/// make_fixtures -- --ignored`.
#[test]
#[ignore = "makes the committed fixtures again with the old release binary"]
fn make_fixtures() {
    let bin = PathBuf::from(std::env::var("BLOCKVAULT_V1_BIN").expect("BLOCKVAULT_V1_BIN"));
    let keys = fixtures().join("keys");
    std::fs::create_dir_all(&keys).unwrap();
    for k in ["a", "b", "r"] {
        if !keys.join(format!("{k}.key")).exists() {
            let openssl = |args: &[&str]| {
                let st = Command::new("openssl")
                    .args(args)
                    .current_dir(&keys)
                    .status()
                    .expect("openssl");
                assert!(st.success());
            };
            openssl(&[
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:3072",
                "-out",
                &format!("{k}.key"),
            ]);
            openssl(&[
                "pkey",
                "-in",
                &format!("{k}.key"),
                "-pubout",
                "-out",
                &format!("{k}.pub"),
            ]);
        }
    }
    for f in [&PLATFORM, &CMK] {
        let out = fixtures().join(f.name);
        let _ = std::fs::remove_dir_all(&out);
        std::fs::create_dir_all(&out).unwrap();
        let work = tempfile::tempdir().unwrap();
        let w = work.path();
        copy_tree(&keys, &w.join("keys"), 0o600);
        for (disk, name) in escrows(f) {
            std::fs::write(
                w.join(format!("escrow-{disk}-{name}")),
                escrow_secret(&disk, &name),
            )
            .unwrap();
        }
        let mut listing = String::new();
        for step in f.steps {
            if step[0] == "backup" {
                let (disk, version) = step[1]
                    .strip_suffix(".img")
                    .and_then(|s| s.rsplit_once("-v"))
                    .expect("DISK-vN.img");
                let version: u32 = version.parse().unwrap();
                let data = image(disk, disk_mib(f, disk), version);
                write_file(&w.join(step[1]), &data);
                let doc = run_v1(&bin, w, step);
                listing += &format!(
                    "{disk} {version} {} {}\n",
                    text(&doc, "snapshot"),
                    blake3::hash(&data).to_hex()
                );
                std::fs::remove_file(w.join(step[1])).unwrap();
            } else {
                run_v1(&bin, w, step);
            }
        }
        if f.name == "platform" {
            std::fs::write(w.join("pass"), "a long export passphrase\n").unwrap();
            run_v1(
                &bin,
                w,
                &["key", "export", "keys.export", "--passphrase-file", "pass"],
            );
            std::fs::copy(w.join("keys.export"), out.join("keys.export")).unwrap();
        }
        copy_tree(&w.join("vault"), &out.join("vault"), 0o644);
        copy_tree(&w.join("keystore"), &out.join("keystore"), 0o600);
        std::fs::write(out.join("snapshots"), listing).unwrap();
    }
}

/// Run the old release in `dir` with `--vault vault --keystore keystore --json` and `args`.
fn run_v1(bin: &Path, dir: &Path, args: &[&str]) -> Value {
    eprintln!(
        "blockvault --vault vault --keystore keystore --json {}",
        args.join(" ")
    );
    let out = Command::new(bin)
        .args(["--vault", "vault", "--keystore", "keystore", "--json"])
        .args(args)
        .current_dir(dir)
        .env_remove("BLOCKVAULT_CMK_PRIVATE")
        .output()
        .expect("run the old release");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
}
