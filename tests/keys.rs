//! Key management end to end, through the real `blockvault` binary: platform key rotation,
//! `--new-dek`, revoke and enable; customer-managed RSA keys as PEM files (plain and
//! passphrase-protected PKCS#8) and inside a SoftHSM2 token; the seed's rules; tampering with
//! key records, manifests, packs and key descriptors; the infrastructure layer; recovery with
//! the recovery key; keystore export and import; volume-key escrow; and a scan showing that no
//! key material is stored unwrapped.
//!
//! Keys are made by the real tools: `openssl genpkey` (once per test binary, under Cargo's
//! target tmp folder) and, for PKCS#11, `softhsm2-util` and `pkcs11-tool` in a token folder
//! of each test's own (its `SOFTHSM2_CONF` is passed to the binary), so tests never share a
//! token. A missing tool prints `SKIP` and passes, except under `CI=true`.
//!
//! "Nothing written" is checked by comparing every file of the vault (hidden ones included)
//! and of the keystore folder, bytes and all, before and after the failing command.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::keys::{pem_keys, softhsm, SoftHsm, SOFTHSM_MODULE};
use common::secrets::{contains, keystore_secrets, private_components, tree, Tree};
use common::tools::run_tool;
use common::{assert_file_eq, random_data, text, write_file, Bv, Run, MIB};
use serde_json::Value;

// ---------------------------------------------------------------------------------------------
// Tools and fixtures (PEM keys and SoftHSM2 tokens: tests/common/keys.rs)
// ---------------------------------------------------------------------------------------------

/// A path as an argument.
fn s(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

/// A SoftHSM2 token `t` in a folder of this test's own (PIN files `pin`, and `badpin` with
/// another PIN); its `SOFTHSM2_CONF` is set for every run of `bv`. `None` after a SKIP line
/// when SoftHSM2 or OpenSC is missing.
fn token(bv: &mut Bv, test: &str) -> Option<SoftHsm> {
    if !softhsm(test) {
        return None;
    }
    let hsm = SoftHsm::new(bv.path("hsm"));
    hsm.init_token("t");
    bv.env.push(("SOFTHSM2_CONF".into(), s(&hsm.conf).into()));
    Some(hsm)
}

/// `pkcs11:token=t;object=LABEL?module-path=...` (the module counts at enrolment only; later
/// commands find SoftHSM among the known system modules). These tests enrol with `--oaep
/// sha1`: Debian 12's SoftHSM 2.6.1 refuses SHA-256, and enrolment never falls back on its own.
fn uri(label: &str) -> String {
    format!("pkcs11:token=t;object={label}?module-path={SOFTHSM_MODULE}")
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// The vault's and the keystore's files.
fn state(bv: &Bv) -> (Tree, Tree) {
    (tree(&bv.vault), tree(&bv.keystore))
}

/// Assert that nothing in the vault or keystore changed since `before`.
fn assert_unchanged(bv: &Bv, before: &(Tree, Tree)) {
    let now = state(bv);
    for (what, a, b) in [
        ("vault", &before.0, &now.0),
        ("keystore", &before.1, &now.1),
    ] {
        let added: Vec<_> = b.keys().filter(|k| !a.contains_key(*k)).collect();
        let removed: Vec<_> = a.keys().filter(|k| !b.contains_key(*k)).collect();
        let changed: Vec<_> = a
            .iter()
            .filter(|(k, v)| b.get(*k).is_some_and(|w| w != *v))
            .map(|(k, _)| k)
            .collect();
        assert!(
            added.is_empty() && removed.is_empty() && changed.is_empty(),
            "the {what} changed: added {added:?}, removed {removed:?}, changed {changed:?}"
        );
    }
}

/// Files under `prefix` of the vault.
fn objects(bv: &Bv, prefix: &str) -> Tree {
    tree(&bv.vault)
        .into_iter()
        .filter(|(k, _)| k.starts_with(prefix))
        .collect()
}

/// Run `args` (strings) and assert a clean failure whose stderr has every one of `needles`.
fn fails(bv: &Bv, args: &[&str], needles: &[&str]) -> Run {
    let r = bv.run(args);
    r.failed().stderr_has(needles);
    r
}

/// `backup IMG --disk d1 EXTRA...` must fail cleanly with every one of `needles`.
fn backup_fails(bv: &Bv, img: &Path, extra: &[&str], needles: &[&str]) {
    let mut args = vec!["backup", s(img), "--disk", "d1"];
    args.extend_from_slice(extra);
    fails(bv, &args, needles);
}

/// A `DISK` image of `len` random bytes from `seed`, in the scratch folder.
fn image(bv: &Bv, name: &str, seed: u64, len: usize) -> (PathBuf, Vec<u8>) {
    let data = random_data(seed, len);
    let path = bv.path(name);
    write_file(&path, &data);
    (path, data)
}

/// Restore `spec` (with `extra` key options) to a fresh file and compare with `expected`.
fn restore_eq(bv: &Bv, spec: &str, extra: &[&str], expected: &[u8]) {
    let target = bv.path(&format!("restored-{}", common::unique()));
    bv.restore(spec, &target, extra).ok();
    assert_file_eq(&target, expected);
    std::fs::remove_file(&target).unwrap();
}

/// Restore `spec` must fail with every one of `needles`, creating no target file.
fn restore_fails(bv: &Bv, spec: &str, extra: &[&str], needles: &[&str]) {
    let target = bv.path(&format!("refused-{}", common::unique()));
    bv.restore(spec, &target, extra)
        .failed()
        .stderr_has(needles);
    assert!(
        !target.exists(),
        "a failed restore left {}",
        target.display()
    );
}

/// `key show --json` with `extra` options.
fn show(bv: &Bv, extra: &[&str]) -> Value {
    let mut args = vec!["key", "show"];
    args.extend_from_slice(extra);
    bv.json(&args)
}

/// The `wrapped_by` list of every DEK generation in a `key show` document, with the disk
/// name, generation and snapshot count.
fn generations(show: &Value) -> Vec<(String, u64, Vec<String>, u64)> {
    let mut v: Vec<_> = show["dek_generations"]
        .as_array()
        .expect("dek_generations")
        .iter()
        .map(|g| {
            (
                g["disk"].as_str().unwrap_or("?").to_string(),
                g["generation"].as_u64().unwrap(),
                g["wrapped_by"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|w| w.as_str().unwrap().to_string())
                    .collect(),
                g["snapshots"].as_u64().unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

/// `(id, state)` of every KEK in a `key show` document.
fn keks(show: &Value) -> Vec<(String, String)> {
    show["keks"]
        .as_array()
        .expect("keks")
        .iter()
        .map(|k| {
            (
                text(k, "id"),
                k["state"].as_str().unwrap_or("-").to_string(),
            )
        })
        .collect()
}

/// Snapshot ids (full hex) of `disk`, oldest first.
fn snapshot_ids(bv: &Bv, extra: &[&str], disk: &str) -> Vec<String> {
    let mut args = vec!["snapshots"];
    args.extend_from_slice(extra);
    bv.json(&args)["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["disk"] == disk)
        .map(|s| text(s, "id"))
        .collect()
}

/// The single object under `prefix` of the vault.
fn only(bv: &Bv, prefix: &str) -> PathBuf {
    let found = bv.objects(prefix);
    assert_eq!(found.len(), 1, "one object under {prefix}: {found:?}");
    found.into_iter().next().unwrap()
}

/// `key recover --recovery-private KEY --take-over --anchor-fingerprint FINGERPRINT`: taking
/// over a vault whose keystore is lost.
fn take_over_args(key: &str, fingerprint: &str) -> Vec<String> {
    [
        "key",
        "recover",
        "--recovery-private",
        key,
        "--take-over",
        "--anchor-fingerprint",
        fingerprint,
    ]
    .map(String::from)
    .to_vec()
}

/// The disk id (hex) of the disk named `name`, from `key show`.
fn disk_id(show: &Value, name: &str) -> String {
    show["dek_generations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["disk"] == name)
        .map(|g| text(g, "disk_id"))
        .unwrap_or_else(|| panic!("no disk {name} in {show}"))
}

// ---------------------------------------------------------------------------------------------
// Platform key
// ---------------------------------------------------------------------------------------------

#[test]
fn platform_rotation_keeps_every_snapshot_restorable_without_touching_data() {
    let bv = Bv::new();
    bv.json(&["init"]);
    let (img1, a1) = image(&bv, "d1.img", 1, 2 * MIB as usize);
    let (img2, b1) = image(&bv, "d2.img", 2, MIB as usize);
    bv.backup(&img1, "d1", &[]);
    bv.backup(&img2, "d2", &[]);
    let data_before = (objects(&bv, "packs"), objects(&bv, "snapshots"));
    let records_before = objects(&bv, "keys");
    let v1_fingerprint = show(&bv, &[])["keks"][0]["fingerprint"].clone();
    let v1_key = platform_key(&bv, 1);

    let doc = bv.json(&["key", "rotate"]);
    assert_eq!(doc["kek"], "platform-v2", "{doc}");
    assert_eq!(doc["records_rewrapped"], 2, "{doc}");
    assert_eq!(doc["new_dek_generations"], 0, "{doc}");
    // Nothing needs version 1 any more: the rotation destroyed it.
    assert_eq!(doc["retired_versions"], serde_json::json!([1]), "{doc}");
    // Only the key records changed: no data was re-encrypted.
    assert_eq!(
        (objects(&bv, "packs"), objects(&bv, "snapshots")),
        data_before
    );
    // Each record was written again as its next revision (records are never rewritten in
    // place) and the old revision deleted.
    let records_after = objects(&bv, "keys");
    assert_eq!(
        records_after.keys().cloned().collect::<Vec<_>>(),
        records_before
            .keys()
            .map(String::as_str)
            .map(next_revision)
            .collect::<Vec<_>>()
    );
    assert!(records_after
        .values()
        .all(|v| !records_before.values().any(|w| w == v)));
    // `key show` lists the current version only, and version 1 among the destroyed; its key
    // is gone from the keystore file.
    let doc = show(&bv, &[]);
    assert_eq!(
        keks(&doc),
        [("platform-v2".to_string(), "enabled".to_string())]
    );
    assert_eq!(
        doc["destroyed"],
        serde_json::json!(["platform KEK version 1"])
    );
    assert_ne!(doc["keks"][0]["fingerprint"], v1_fingerprint);
    assert!(!contains(&std::fs::read(bv.key_file()).unwrap(), &v1_key));
    let v2 = vec!["platform-v2".to_string()];
    assert_eq!(
        generations(&doc),
        [
            ("d1".to_string(), 0, v2.clone(), 1),
            ("d2".to_string(), 0, v2.clone(), 1)
        ]
    );

    let a2 = random_data(3, 2 * MIB as usize);
    write_file(&img1, &a2);
    bv.backup(&img1, "d1", &[]);
    let doc = bv.json(&["key", "rotate", "--new-dek"]);
    assert_eq!(doc["kek"], "platform-v3", "{doc}");
    assert_eq!(doc["new_dek_generations"], 2, "{doc}");
    assert_eq!(doc["records_rewrapped"], 2, "{doc}");
    assert_eq!(doc["retired_versions"], serde_json::json!([2]), "{doc}");
    let a3 = random_data(4, 2 * MIB as usize);
    write_file(&img1, &a3);
    bv.backup(&img1, "d1", &[]);
    // New data went under the new DEK generation; every record is wrapped by v3.
    let v3 = vec!["platform-v3".to_string()];
    let doc = show(&bv, &[]);
    assert_eq!(
        generations(&doc),
        [
            ("d1".to_string(), 0, v3.clone(), 2),
            ("d1".to_string(), 1, v3.clone(), 1),
            ("d2".to_string(), 0, v3.clone(), 1),
            ("d2".to_string(), 1, v3.clone(), 0)
        ]
    );
    assert_eq!(
        keks(&doc),
        [("platform-v3".to_string(), "enabled".to_string())]
    );
    assert_eq!(
        doc["destroyed"],
        serde_json::json!(["platform KEK version 1", "platform KEK version 2"])
    );

    // The old versions are gone: there is nothing left to revoke.
    for v in ["1", "2"] {
        fails(
            &bv,
            &["key", "revoke", "--version", v],
            &[&format!("platform KEK version {v} was destroyed")],
        );
    }
    let ids = snapshot_ids(&bv, &[], "d1");
    assert_eq!(ids.len(), 3);
    for (id, data) in ids.iter().zip([&a1, &a2, &a3]) {
        restore_eq(&bv, &format!("d1@{id}"), &[], data);
    }
    restore_eq(&bv, "d2", &[], &b1);
    bv.verify_ok();
    // A version that does not exist.
    fails(
        &bv,
        &["key", "revoke", "--version", "9"],
        &["no platform KEK version 9"],
    )
    .code(2);
}

/// The object key of the next revision of key record `key` (`keys/<disk>/<gen>-<rev>`).
fn next_revision(key: &str) -> String {
    let (name, rev) = key.rsplit_once('-').expect("a key record name");
    let rev = u32::from_str_radix(rev, 16).expect("a hex revision");
    format!("{name}-{:08x}", rev + 1)
}

/// The key of platform KEK version `v`, as the keystore holds it (read through the library).
fn platform_key(bv: &Bv, v: u32) -> Vec<u8> {
    let id: [u8; 16] = hex::decode(hex_id(bv)).unwrap().try_into().unwrap();
    let keys = blockvault::crypto::Keystore::new(bv.key_file().parent().unwrap().to_path_buf())
        .load(&id)
        .expect("the keystore opens");
    keys.kek
        .versions()
        .iter()
        .find(|k| k.version == v)
        .unwrap_or_else(|| panic!("no platform KEK version {v} in the keystore"))
        .key
        .expose()
        .to_vec()
}

#[test]
fn revoked_platform_key_stops_backup_restore_and_verify_until_enabled() {
    let bv = Bv::new();
    let (img, a1) = image(&bv, "d1.img", 11, MIB as usize + 4096);
    bv.backup(&img, "d1", &[]);
    let doc = bv.json(&["key", "revoke"]);
    assert_eq!(doc["state"], "revoked", "{doc}");
    let before = state(&bv);
    let a2 = random_data(12, MIB as usize + 4096);
    write_file(&img, &a2);
    for disk in ["d1", "new-disk"] {
        fails(
            &bv,
            &["backup", s(&img), "--disk", disk],
            &["revoked", "cannot unwrap"],
        );
    }
    restore_fails(&bv, "d1", &[], &["revoked"]);
    let r = bv.verify(true);
    r.failed();
    assert!(
        r.stdout.contains("revoked") || r.stderr.contains("revoked"),
        "verify --read-data must say the key is revoked:\n{}\n{}",
        r.stdout,
        r.stderr
    );
    fails(&bv, &["snapshots"], &["revoked"]);
    // `key show` still works and says so.
    assert_eq!(keks(&show(&bv, &[]))[0].1, "revoked");
    // The keystore changes only through `key enable`; the vault not at all.
    assert_unchanged(&bv, &before);

    bv.json(&["key", "enable"]);
    restore_eq(&bv, "d1", &[], &a1);
    bv.backup(&img, "d1", &[]);
    restore_eq(&bv, "d1", &[], &a2);
    bv.verify_ok();
}

#[test]
fn keystore_export_and_import() {
    let bv = Bv::new();
    let (img, a1) = image(&bv, "d1.img", 21, MIB as usize);
    bv.backup(&img, "d1", &[]);
    let pass = bv.path("pass");
    std::fs::write(&pass, "a long export passphrase\n").unwrap();
    let wrong = bv.path("wrong");
    std::fs::write(&wrong, "not it\n").unwrap();
    let out = bv.path("keys.export");
    let doc = bv.json(&["key", "export", s(&out), "--passphrase-file", s(&pass)]);
    assert_eq!(doc["file"], s(&out));
    let mode = std::fs::metadata(&out).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "export file mode {mode:o}");
    let key_file = bv.key_file();
    let original = std::fs::read(&key_file).unwrap();
    // Nothing of the keystore file is in the export in the clear (its platform KEK, for one).
    assert!(!contains(
        &std::fs::read(&out).unwrap(),
        &platform_key(&bv, 1)
    ));
    // An export never overwrites.
    fails(
        &bv,
        &["key", "export", s(&out), "--passphrase-file", s(&pass)],
        &[s(&out)],
    );

    std::fs::remove_file(&key_file).unwrap();
    restore_fails(&bv, "d1", &[], &["keystore has no key", s(&key_file)]);
    fails(
        &bv,
        &["key", "import", s(&out), "--passphrase-file", s(&wrong)],
        &["wrong passphrase"],
    );
    assert!(!key_file.exists(), "a failed import wrote {key_file:?}");
    // The passphrase from the environment this time.
    let mut c = bv.command();
    c.env("BLOCKVAULT_EXPORT_PASSPHRASE", "a long export passphrase");
    bv.run_cmd(c, &["key", "import", s(&out)]).ok();
    assert_eq!(std::fs::read(&key_file).unwrap(), original);
    restore_eq(&bv, "d1", &[], &a1);
    // Importing over a present key file needs --force.
    fails(
        &bv,
        &["key", "import", s(&out), "--passphrase-file", s(&pass)],
        &["--force"],
    );
    bv.run(&[
        "key",
        "import",
        s(&out),
        "--passphrase-file",
        s(&pass),
        "--force",
    ])
    .ok();
    bv.verify_ok();
}

#[test]
fn escrowed_secret_comes_back_beside_the_restore_and_nowhere_else() {
    let mut bv = Bv::new();
    bv.env.push(("RUST_LOG".into(), "debug".into()));
    let (img, a1) = image(&bv, "d1.img", 31, MIB as usize);
    const SECRET: &str = "424242-131313-555555-000000-987654-111111-222222-333333";
    let secret_file = bv.path("secret");
    std::fs::write(&secret_file, SECRET).unwrap();
    let mut outputs = vec![bv.run(&["--json", "backup", s(&img), "--disk", "d1"])];
    let r = bv.run(&[
        "--json",
        "key",
        "escrow",
        "d1",
        "--name",
        "bitlocker-C",
        "--secret-file",
        s(&secret_file),
    ]);
    r.ok();
    assert_eq!(r.json()["name"], "bitlocker-C");
    outputs.push(r);
    fails(
        &bv,
        &[
            "key",
            "escrow",
            "nope",
            "--name",
            "x",
            "--secret-file",
            s(&secret_file),
        ],
        &["nope"],
    );
    let dir = bv.path("escrow-out");
    let target = bv.path("restored");
    let r = bv.run(&[
        "--json",
        "restore",
        "d1",
        s(&target),
        "--with-escrow",
        s(&dir),
    ]);
    r.ok();
    assert_eq!(
        r.json()["escrow_written"],
        serde_json::json!(["bitlocker-C"])
    );
    outputs.push(r);
    outputs.push(bv.run(&["--json", "verify", "--read-data"]));
    outputs.push(bv.run(&["--json", "key", "show"]));
    assert_file_eq(&target, &a1);
    let written = dir.join("bitlocker-C");
    assert_eq!(std::fs::read(&written).unwrap(), SECRET.as_bytes());
    let mode = std::fs::metadata(&written).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "escrow file mode {mode:o}");
    let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "escrow folder mode {mode:o}");
    for r in &outputs {
        r.ok();
        assert!(
            !r.stdout.contains(SECRET) && !r.stderr.contains(SECRET),
            "`{}` printed the secret",
            r.what
        );
    }
    assert!(
        outputs.iter().any(|r| r.stderr.contains("DEBUG")),
        "RUST_LOG=debug should have logged"
    );
    let (vault, keystore) = state(&bv);
    for (name, bytes) in vault.iter().chain(&keystore) {
        assert!(
            !contains(bytes, SECRET.as_bytes()),
            "{name} holds the secret"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Tampering
// ---------------------------------------------------------------------------------------------

/// Replace `path` with `bytes` for the duration of `check`, then put the original back.
fn with_file(path: &Path, bytes: &[u8], check: impl FnOnce()) {
    let original = std::fs::read(path).unwrap();
    std::fs::write(path, bytes).unwrap();
    check();
    std::fs::write(path, original).unwrap();
}

#[test]
fn swapped_foreign_and_moved_objects_are_refused() {
    let bv = Bv::new();
    let (img1, a1) = image(&bv, "d1.img", 41, MIB as usize);
    let (img2, b1) = image(&bv, "d2.img", 42, MIB as usize);
    bv.backup(&img1, "d1", &[]);
    let pack1 = only(&bv, "packs");
    bv.backup(&img2, "d2", &[]);
    let pack2 = bv
        .objects("packs")
        .into_iter()
        .find(|p| *p != pack1)
        .expect("d2's pack");
    let doc = show(&bv, &[]);
    let (id1, id2) = (disk_id(&doc, "d1"), disk_id(&doc, "d2"));
    let (key1, key2) = (
        format!("keys/{id1}/00000000-00000001"),
        format!("keys/{id2}/00000000-00000001"),
    );
    let (rec1, rec2) = (bv.vault.join(&key1), bv.vault.join(&key2));
    let (r1, r2) = (std::fs::read(&rec1).unwrap(), std::fs::read(&rec2).unwrap());
    let replaced = "does not match the digest the vault head lists for it";

    // Two disks' key records swapped: neither is the record the head lists.
    std::fs::write(&rec1, &r2).unwrap();
    std::fs::write(&rec2, &r1).unwrap();
    let r = bv.verify(false);
    r.code(3)
        .stdout_has(&[&format!("{key1} {replaced}"), &format!("{key2} {replaced}")]);
    // Which of the two the restore names depends on the order disks are tried in.
    restore_fails(&bv, "d1", &[], &["disk d1", replaced]);
    std::fs::write(&rec1, &r1).unwrap();
    std::fs::write(&rec2, &r2).unwrap();

    // A key record from another vault (its own keystore), put in place of d1's.
    let other = Bv::new();
    let (img3, _) = image(&other, "d3.img", 43, MIB as usize);
    other.backup(&img3, "d3", &[]);
    let foreign = std::fs::read(only(&other, "keys")).unwrap();
    with_file(&rec1, &foreign, || {
        bv.verify(false)
            .code(3)
            .stdout_has(&[&format!("{key1} {replaced}")]);
        restore_fails(&bv, "d1", &[], &[&format!("{key1} {replaced}")]);
        // The other disk is not held hostage.
        restore_eq(&bv, "d2", &[], &b1);
    });

    // d1's manifest moved under d2: the head lists it under d1 only, so d1's is missing
    // (its latest snapshot fails: no silent fallback) and d2 has no such snapshot.
    let manifest1 = only(&bv, &format!("snapshots/{id1}"));
    let snap = manifest1.file_name().unwrap().to_str().unwrap().to_string();
    let moved = bv.vault.join(format!("snapshots/{id2}/{snap}"));
    std::fs::rename(&manifest1, &moved).unwrap();
    let missing = format!("snapshots/{id1}/{snap} is missing: the vault head lists it");
    bv.verify(false).code(3).stdout_has(&[&missing]);
    restore_fails(&bv, "d1", &[], &[&missing]);
    restore_fails(
        &bv,
        &format!("d2@{}", &snap[..8]),
        &[],
        &[&format!("disk d2 has no snapshot {}", &snap[..8])],
    );
    restore_eq(&bv, "d2", &[], &b1);
    std::fs::rename(&moved, &manifest1).unwrap();

    // d1's pack in place of d2's (under d2's pack name).
    with_file(&pack2, &std::fs::read(&pack1).unwrap(), || {
        let r = bv.verify(true);
        r.code(3).stdout_has(&[&bv.key_of(&pack2)]);
        restore_fails(&bv, "d2", &[], &[&bv.key_of(&pack2)]);
        restore_eq(&bv, "d1", &[], &a1);
    });
    bv.verify_ok();
    restore_eq(&bv, "d1", &[], &a1);
    restore_eq(&bv, "d2", &[], &b1);
}

#[test]
fn replaced_key_descriptor_is_refused() {
    let Some(k) = pem_keys("replaced_key_descriptor_is_refused") else {
        return;
    };
    let bv = Bv::new();
    bv.json(&["init", "--cmk", &k.spec("a")]);
    let (img, a1) = image(&bv, "d1.img", 51, MIB as usize);
    bv.backup(&img, "d1", &["--cmk-private", &k.key("a")]);
    // Someone with write access to the storage makes a vault of their own key `c` and puts
    // its descriptor in place of ours, so that new DEKs would be wrapped to them.
    let theirs = Bv::new();
    theirs.json(&["init", "--cmk", &k.spec("c")]);
    let desc = "kek/cmk-rsa-00000001";
    let forged = std::fs::read(theirs.vault.join(desc)).unwrap();
    let replaced = format!("{desc} does not match the digest the vault head lists for it");
    with_file(&bv.vault.join(desc), &forged, || {
        let before = state(&bv);
        for key in ["a", "c"] {
            backup_fails(&bv, &img, &["--cmk-private", &k.key(key)], &[&replaced]);
            restore_fails(&bv, "d1", &["--cmk-private", &k.key(key)], &[&replaced]);
        }
        fails(&bv, &["key", "show"], &[&replaced]);
        assert_unchanged(&bv, &before);
    });
    restore_eq(&bv, "d1", &["--cmk-private", &k.key("a")], &a1);
}

// ---------------------------------------------------------------------------------------------
// The seed's rules
// ---------------------------------------------------------------------------------------------

#[test]
fn encryption_settings_are_chosen_at_init_only() {
    let Some(k) = pem_keys("encryption_settings_are_chosen_at_init_only") else {
        return;
    };
    // Infrastructure encryption only with a customer key: refused, nothing created.
    let bv = Bv::new();
    fails(
        &bv,
        &["init", "--infrastructure-encryption"],
        &["only together with a customer-managed key"],
    )
    .code(2);
    assert!(!bv.vault.join("config").exists());
    assert!(tree(&bv.keystore).is_empty(), "a refused init made keys");

    // A platform vault, made by `init` or by a first backup, cannot become a CMK vault.
    let made_by_init = Bv::new();
    made_by_init.json(&["init"]);
    let made_by_backup = Bv::new();
    let (img, a1) = image(&made_by_backup, "d1.img", 61, MIB as usize);
    made_by_backup.backup(&img, "d1", &[]);
    for bv in [&made_by_init, &made_by_backup] {
        let before = state(bv);
        fails(
            bv,
            &["init", "--cmk", &k.spec("a")],
            &["already exists", "cannot be changed"],
        );
        fails(
            bv,
            &["init", "--cmk", &k.spec("a"), "--infrastructure-encryption"],
            &["already exists"],
        );
        fails(bv, &["init"], &["already exists"]);
        fails(
            bv,
            &["key", "rotate", "--new-cmk", &k.spec("a")],
            &["can only be chosen at init"],
        )
        .code(2);
        assert_unchanged(bv, &before);
    }
    restore_eq(&made_by_backup, "d1", &[], &a1);
    assert_eq!(show(&made_by_backup, &[])["kek_kind"], "platform");

    // A CMK vault cannot switch its key kind or go back to the platform key either.
    let cmk = Bv::new();
    cmk.json(&["init", "--cmk", &k.spec("a")]);
    let before = state(&cmk);
    fails(&cmk, &["init"], &["already exists"]);
    fails(&cmk, &["key", "rotate"], &["--new-cmk"]).code(2);
    fails(
        &cmk,
        &["key", "revoke"],
        &["customer-managed", "withhold its private key"],
    )
    .code(2);
    assert_unchanged(&cmk, &before);
}

// ---------------------------------------------------------------------------------------------
// Customer-managed PEM keys
// ---------------------------------------------------------------------------------------------

#[test]
fn pem_cmk_vault_needs_its_private_key() {
    let Some(k) = pem_keys("pem_cmk_vault_needs_its_private_key") else {
        return;
    };
    let mut bv = Bv::new();
    let doc = bv.json(&["init", "--cmk", &k.spec("a")]);
    assert_eq!(doc["kek"], "cmk-rsa", "{doc}");
    // The fingerprint is the SHA-256 of the key's DER SubjectPublicKeyInfo.
    let digest = run_tool(
        Command::new("sh").arg("-c").arg(format!(
            "openssl pkey -pubin -in '{}' -outform DER | openssl dgst -sha256 -r",
            k.path("a.pub").display()
        )),
        "",
    );
    let digest = String::from_utf8(digest).unwrap();
    assert_eq!(
        doc["cmk_fingerprint_sha256"].as_str().unwrap(),
        digest.split_whitespace().next().unwrap()
    );

    let (img, a1) = image(&bv, "d1.img", 71, 2 * MIB as usize);
    // Without the private key, or with another one: refused before anything is written.
    let before = state(&bv);
    let not_given = [
        "cmk-rsa-v1",
        "was not given its private key",
        "--cmk-private",
        "BLOCKVAULT_CMK_PRIVATE",
    ];
    backup_fails(&bv, &img, &[], &not_given);
    backup_fails(
        &bv,
        &img,
        &["--cmk-private", &k.key("b")],
        &["b.key holds key sha256:", "cannot unwrap"],
    );
    assert_unchanged(&bv, &before);

    bv.backup(&img, "d1", &["--cmk-private", &k.key("a")]);
    restore_fails(&bv, "d1", &[], &not_given);
    restore_eq(&bv, "d1", &["--cmk-private", &k.key("a")], &a1);
    // The private key from the environment.
    bv.env.push(("BLOCKVAULT_CMK_PRIVATE".into(), k.key("a")));
    restore_eq(&bv, "d1", &[], &a1);
    bv.verify_ok();

    // Encrypted PKCS#8: passphrase from a file or the environment; a wrong one is named.
    let enc = s(&k.path("a.enc.key")).to_string();
    let pass = s(&k.path("pass")).to_string();
    let wrong = s(&k.path("wrongpass")).to_string();
    bv.env.clear();
    let a2 = random_data(72, 2 * MIB as usize);
    write_file(&img, &a2);
    let before = state(&bv);
    backup_fails(
        &bv,
        &img,
        &["--cmk-private", &enc, "--cmk-passphrase-file", &wrong],
        &["passphrase incorrect"],
    );
    backup_fails(
        &bv,
        &img,
        &["--cmk-private", &enc],
        &["BLOCKVAULT_CMK_PASSPHRASE"],
    );
    assert_unchanged(&bv, &before);
    bv.backup(
        &img,
        "d1",
        &["--cmk-private", &enc, "--cmk-passphrase-file", &pass],
    );
    bv.env.push(("BLOCKVAULT_CMK_PRIVATE".into(), enc.clone()));
    bv.env.push((
        "BLOCKVAULT_CMK_PASSPHRASE".into(),
        "correct horse battery staple".into(),
    ));
    let ids = snapshot_ids(&bv, &[], "d1");
    restore_eq(&bv, &format!("d1@{}", ids[0]), &[], &a1);
    restore_eq(&bv, &format!("d1@{}", ids[1]), &[], &a2);
    bv.verify_ok();
}

#[test]
fn pem_rotation_to_a_new_cmk_needs_only_the_old_private_key() {
    let Some(k) = pem_keys("pem_rotation_to_a_new_cmk_needs_only_the_old_private_key") else {
        return;
    };
    let bv = Bv::new();
    bv.json(&["init", "--cmk", &k.spec("a")]);
    let with_a = ["--cmk-private", &k.key("a")];
    let with_b = ["--cmk-private", &k.key("b")];
    let (img1, a1) = image(&bv, "d1.img", 81, MIB as usize);
    let (img2, b1) = image(&bv, "d2.img", 82, MIB as usize);
    bv.backup(&img1, "d1", &with_a);
    bv.backup(&img2, "d2", &with_a);
    let a2 = random_data(83, MIB as usize);
    write_file(&img1, &a2);
    bv.backup(&img1, "d1", &with_a);

    // With the new private key only: the old records cannot be unwrapped, nothing changes.
    let before = state(&bv);
    let mut args = vec!["key", "rotate", "--new-cmk"];
    let spec_b = k.spec("b");
    args.push(&spec_b);
    args.extend_from_slice(&with_b);
    fails(&bv, &args, &["b.key holds key sha256:", "cmk-rsa-v1"]);
    assert_unchanged(&bv, &before);

    let records_before = objects(&bv, "keys");
    let data_before = (objects(&bv, "packs"), objects(&bv, "snapshots"));
    let mut args = vec!["key", "rotate", "--new-cmk", &spec_b];
    args.extend_from_slice(&with_a);
    let doc = bv.json(&args);
    assert_eq!(doc["kek"], "cmk-rsa-v2", "{doc}");
    assert_eq!(doc["records_rewrapped"], 2, "{doc}");
    assert_eq!(
        (objects(&bv, "packs"), objects(&bv, "snapshots")),
        data_before
    );

    // From now on only the new private key opens anything.
    restore_fails(
        &bv,
        "d1",
        &with_a,
        &["a.key holds key sha256:", "cmk-rsa-v2"],
    );
    let ids = snapshot_ids(&bv, &with_b, "d1");
    restore_eq(&bv, &format!("d1@{}", ids[0]), &with_b, &a1);
    restore_eq(&bv, &format!("d1@{}", ids[1]), &with_b, &a2);
    restore_eq(&bv, "d2", &with_b, &b1);
    let a3 = random_data(84, MIB as usize);
    write_file(&img1, &a3);
    bv.backup(&img1, "d1", &with_b);
    restore_eq(&bv, "d1", &with_b, &a3);
    // The old key's descriptor left the head and the vault: only v2 is listed.
    let doc = show(&bv, &with_b);
    let ids: Vec<String> = keks(&doc).into_iter().map(|k| k.0).collect();
    assert_eq!(ids, ["cmk-rsa-v2"]);
    assert_eq!(
        objects(&bv, "kek").keys().collect::<Vec<_>>(),
        ["kek/cmk-rsa-00000002"]
    );
    assert!(generations(&doc)
        .iter()
        .all(|g| g.2 == ["cmk-rsa-v2".to_string()]));

    // A record rolled back to its revision still wrapped by v1 (under the current name, or
    // under its old one beside the current) is not what the head lists: refused, or ignored.
    let d1 = disk_id(&doc, "d1");
    let (old_key, new_key) = (
        format!("keys/{d1}/00000000-00000001"),
        format!("keys/{d1}/00000000-00000002"),
    );
    assert!(objects(&bv, "keys").contains_key(&new_key));
    assert!(!objects(&bv, "keys").contains_key(&old_key));
    with_file(&bv.vault.join(&new_key), &records_before[&old_key], || {
        restore_fails(
            &bv,
            "d1",
            &with_b,
            &[&format!(
                "{new_key} does not match the digest the vault head lists for it"
            )],
        );
    });
    std::fs::write(bv.vault.join(&old_key), &records_before[&old_key]).unwrap();
    restore_eq(&bv, "d1", &with_b, &a3);
    restore_fails(&bv, "d1", &with_a, &["a.key holds key sha256:"]);
    std::fs::remove_file(bv.vault.join(&old_key)).unwrap();
    restore_eq(&bv, "d2", &with_b, &b1);
    let mut verify = vec!["verify", "--read-data"];
    verify.extend_from_slice(&with_b);
    assert_eq!(bv.json(&verify)["ok"], true);
}

#[test]
fn recovery_key_restores_access_after_keystore_or_cmk_loss() {
    let Some(k) = pem_keys("recovery_key_restores_access_after_keystore_or_cmk_loss") else {
        return;
    };
    // A platform vault whose keystore file is lost.
    let bv = Bv::new();
    let init = bv.json(&["init", "--recovery-key", &k.spec("r")]);
    // The auth fingerprint to keep with the recovery key: what proves the recovery anchor.
    let fingerprint = text(&init, "recovery_fingerprint");
    let (img, a1) = image(&bv, "d1.img", 91, MIB as usize);
    bv.backup(&img, "d1", &[]);
    let g = generations(&show(&bv, &[]));
    assert_eq!(g[0].2, ["platform-v1", "recovery-v1"]);
    let key_file = bv.key_file();
    std::fs::remove_file(&key_file).unwrap();
    restore_fails(&bv, "d1", &[], &["keystore has no key"]);
    // Refused, and neither the vault nor the keystore is touched (so the real keystore file
    // would still open the vault if it turned up): without `--take-over`, with the wrong
    // private key, with a fingerprint that is not the anchor's.
    let before = state(&bv);
    let take_over = |key: &str, fp: &str| take_over_args(&k.key(key), fp);
    fails(
        &bv,
        &["key", "recover", "--recovery-private", &k.key("r")],
        &["--take-over"],
    );
    let args = take_over("b", &fingerprint);
    fails(
        &bv,
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        &["b.key holds key sha256:", "recovery-v1"],
    );
    let wrong = "0".repeat(fingerprint.len());
    let args = take_over("r", &wrong);
    fails(
        &bv,
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        &[&fingerprint, &wrong],
    );
    assert_unchanged(&bv, &before);
    let args = take_over("r", &fingerprint);
    let doc = bv.json(&args);
    assert_eq!(doc["records_rewrapped"], 1, "{doc}");
    assert_eq!(
        doc["replaced_keystore_auth_fingerprint"],
        fingerprint.as_str()
    );
    assert_ne!(doc["auth_fingerprint"], fingerprint.as_str());
    restore_eq(&bv, "d1", &[], &a1);
    let a2 = random_data(92, MIB as usize);
    write_file(&img, &a2);
    bv.backup(&img, "d1", &[]);
    restore_eq(&bv, "d1", &[], &a2);
    bv.verify_ok();

    // A PEM CMK vault: keystore lost, then the customer key itself lost.
    let bv = Bv::new();
    let init = bv.json(&[
        "init",
        "--cmk",
        &k.spec("a"),
        "--recovery-key",
        &k.spec("r"),
    ]);
    bv.backup(&img, "d1", &["--cmk-private", &k.key("a")]);
    std::fs::remove_file(bv.key_file()).unwrap();
    bv.json(&take_over_args(
        &k.key("r"),
        &text(&init, "recovery_fingerprint"),
    ));
    restore_eq(&bv, "d1", &["--cmk-private", &k.key("a")], &a2);
    let spec_c = k.spec("c");
    let doc = bv.json(&[
        "key",
        "recover",
        "--recovery-private",
        &k.key("r"),
        "--new-cmk",
        &spec_c,
    ]);
    assert_eq!(doc["records_rewrapped"], 1, "{doc}");
    let with_c = ["--cmk-private", &k.key("c")];
    // The lost key's descriptor left the head: the new key replaced it.
    let mut ids: Vec<String> = keks(&show(&bv, &with_c)).into_iter().map(|k| k.0).collect();
    ids.sort();
    assert_eq!(ids, ["cmk-rsa-v2", "recovery-v1"]);
    restore_eq(&bv, "d1", &["--cmk-private", &k.key("c")], &a2);
    restore_fails(&bv, "d1", &["--cmk-private", &k.key("a")], &["a.key"]);
    bv.backup(&img, "d1", &["--cmk-private", &k.key("c")]);
    assert_eq!(
        bv.json(&["verify", "--read-data", "--cmk-private", &k.key("c")])["ok"],
        true
    );
}

// ---------------------------------------------------------------------------------------------
// Infrastructure encryption
// ---------------------------------------------------------------------------------------------

#[test]
fn infrastructure_layer_changes_every_stored_byte_and_recovers() {
    let Some(k) = pem_keys("infrastructure_layer_changes_every_stored_byte_and_recovers") else {
        return;
    };
    let with_a = ["--cmk-private", &k.key("a")];
    let plain = Bv::new();
    let infra = Bv::new();
    plain.json(&[
        "init",
        "--cmk",
        &k.spec("a"),
        "--recovery-key",
        &k.spec("r"),
    ]);
    let doc = infra.json(&[
        "init",
        "--cmk",
        &k.spec("a"),
        "--recovery-key",
        &k.spec("r"),
        "--infrastructure-encryption",
    ]);
    assert_eq!(doc["infrastructure_encryption"], true, "{doc}");
    let data = common::mixed_data(101, 3 * MIB as usize);
    let img = plain.path("d1.img");
    write_file(&img, &data);
    plain.backup(&img, "d1", &with_a);
    infra.backup(&img, "d1", &with_a);
    assert_eq!(show(&infra, &with_a)["infrastructure_encryption"], true);

    // Every object but `config` differs from every object of the single-layer vault (`head`
    // and `recovery-anchor` are outside the layer too, but name their own vault); the plain
    // vault's objects of each kind start with their format's magic, the layered ones do not.
    // (`locks/` holds local lock files, not objects.)
    let objects_of = |bv: &Bv| -> Tree {
        tree(&bv.vault)
            .into_iter()
            .filter(|(n, _)| n != "config" && !n.starts_with("locks/"))
            .collect()
    };
    let p = objects_of(&plain);
    let i = objects_of(&infra);
    let plain_bodies: Vec<&Vec<u8>> = p.values().collect();
    for (name, bytes) in &i {
        assert!(
            !plain_bodies.contains(&bytes),
            "{name} is byte-equal to an object of the plain vault"
        );
    }
    for prefix in ["keys/", "snapshots/", "packs/", "kek/"] {
        let magic = |t: &Tree| -> Vec<Vec<u8>> {
            t.iter()
                .filter(|(n, _)| n.starts_with(prefix) && !n.contains("/."))
                .map(|(_, b)| b[..4].to_vec())
                .collect()
        };
        let (pm, im) = (magic(&p), magic(&i));
        assert!(!pm.is_empty() && pm.len() == im.len(), "{prefix}");
        assert!(pm.iter().all(|m| *m == pm[0]), "{prefix}: {pm:?}");
        assert!(
            im.iter().all(|m| *m != pm[0]),
            "{prefix}: a layered object starts with {:?}",
            String::from_utf8_lossy(&pm[0])
        );
    }
    restore_eq(&infra, "d1", &with_a, &data);
    let mut verify = vec!["verify", "--read-data"];
    verify.extend_from_slice(&with_a);
    assert_eq!(infra.json(&verify)["ok"], true);

    // The keystore file (which holds the layer's key) lost: the recovery key brings it back.
    std::fs::remove_file(infra.key_file()).unwrap();
    restore_fails(&infra, "d1", &with_a, &["keystore has no key"]);
    let before = state(&infra);
    let fingerprint = text(&doc, "recovery_fingerprint");
    let args = take_over_args(&k.key("b"), &fingerprint);
    fails(
        &infra,
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        &["b.key holds key sha256:"],
    );
    assert_unchanged(&infra, &before);
    infra.json(&take_over_args(&k.key("r"), &fingerprint));
    restore_eq(&infra, "d1", &with_a, &data);
    assert_eq!(infra.json(&verify)["ok"], true);
}

// ---------------------------------------------------------------------------------------------
// PKCS#11 (SoftHSM2)
// ---------------------------------------------------------------------------------------------

/// With the private key of the vault's token key deleted: backup and restore with `extra`
/// fail naming it, and write nothing.
fn refused_without_private_key(bv: &Bv, img: &Path, extra: &[&str]) {
    let before = state(bv);
    backup_fails(
        bv,
        img,
        extra,
        &[
            "private key not found on token 't'",
            "revoked or unreachable",
        ],
    );
    restore_fails(bv, "d1", extra, &["private key not found"]);
    assert_unchanged(bv, &before);
}

#[test]
fn hsm_key_lost_then_recovered_with_the_recovery_key() {
    const T: &str = "hsm_key_lost_then_recovered_with_the_recovery_key";
    let Some(k) = pem_keys(T) else {
        return;
    };
    let mut bv = Bv::new();
    let Some(h) = token(&mut bv, T) else {
        return;
    };
    h.keypair("t", "cmk", "01");
    let pin = s(&h.pin("pin")).to_string();
    let with_pin = ["--pin-file", pin.as_str()];
    let doc = bv.json(&[
        "--pin-file",
        &pin,
        "init",
        "--cmk",
        &uri("cmk"),
        "--oaep",
        "sha1",
        "--recovery-key",
        &k.spec("r"),
    ]);
    assert_eq!(doc["kek"], "cmk-pkcs11", "{doc}");
    let (img, a1) = image(&bv, "d1.img", 111, 2 * MIB as usize);
    bv.backup(&img, "d1", &with_pin);
    restore_eq(&bv, "d1", &with_pin, &a1);
    // The PIN from the environment.
    let mut c = bv.command();
    c.env("BLOCKVAULT_PKCS11_PIN", "1234");
    bv.run_cmd(c, &["verify", "--read-data"]).ok();

    // A wrong PIN, or none: refused clearly, nothing written.
    let a2 = random_data(112, 2 * MIB as usize);
    write_file(&img, &a2);
    let before = state(&bv);
    let bad = s(&h.pin("badpin")).to_string();
    backup_fails(
        &bv,
        &img,
        &["--pin-file", &bad],
        &["PIN incorrect for token 't'"],
    );
    restore_fails(&bv, "d1", &["--pin-file", &bad], &["PIN incorrect"]);
    backup_fails(&bv, &img, &[], &["no PIN"]);
    // A module that is not there: one sentence naming the key, the module and the options.
    let gone = "/nonexistent/libpkcs11.so";
    let mut no_module = with_pin.to_vec();
    no_module.extend(["--pkcs11-module", gone]);
    let needles = ["cmk-pkcs11-v1", "--pkcs11-module", "--pin-file", gone];
    restore_fails(&bv, "d1", &no_module, &needles);
    backup_fails(&bv, &img, &no_module, &needles);
    assert_unchanged(&bv, &before);

    // The private key deleted from the token: backup, restore and verify fail saying so.
    h.delete_private("t", "01");
    refused_without_private_key(&bv, &img, &with_pin);
    let mut verify = vec!["verify", "--read-data"];
    verify.extend_from_slice(&with_pin);
    let r = bv.run(&verify);
    r.failed();
    assert!(
        (r.stdout.clone() + &r.stderr).contains("private key not found"),
        "{r:?}"
    );
    assert_unchanged(&bv, &before);

    // A new key in the token, put in place with the recovery key.
    h.keypair("t", "cmk2", "02");
    let doc = bv.json(&[
        "--pin-file",
        &pin,
        "key",
        "recover",
        "--recovery-private",
        &k.key("r"),
        "--new-cmk",
        &uri("cmk2"),
        "--oaep",
        "sha1",
    ]);
    assert_eq!(doc["records_rewrapped"], 1, "{doc}");
    // The lost key's descriptor left the head: the new key replaced it.
    let mut ids: Vec<String> = keks(&show(&bv, &with_pin))
        .into_iter()
        .map(|k| k.0)
        .collect();
    ids.sort();
    assert_eq!(ids, ["cmk-pkcs11-v2", "recovery-v1"]);
    restore_eq(&bv, "d1", &with_pin, &a1);
    bv.backup(&img, "d1", &with_pin);
    restore_eq(&bv, "d1", &with_pin, &a2);
    assert_eq!(bv.json(&verify)["ok"], true);
}

#[test]
fn hsm_private_key_put_back_restores_access() {
    const T: &str = "hsm_private_key_put_back_restores_access";
    let Some(k) = pem_keys(T) else {
        return;
    };
    let mut bv = Bv::new();
    let Some(h) = token(&mut bv, T) else {
        return;
    };
    // A key made outside the token (as when the customer keeps a backup of it) and imported.
    let der = k.path("c.der");
    h.import("t", &der, "privkey", "kept", "05");
    h.import("t", &k.path("c.pub.der"), "pubkey", "kept", "05");
    let pin = s(&h.pin("pin")).to_string();
    let with_pin = ["--pin-file", pin.as_str()];
    bv.json(&[
        "--pin-file",
        &pin,
        "init",
        "--cmk",
        &uri("kept"),
        "--oaep",
        "sha1",
    ]);
    let (img, a1) = image(&bv, "d1.img", 121, MIB as usize);
    bv.backup(&img, "d1", &with_pin);

    h.delete_private("t", "05");
    refused_without_private_key(&bv, &img, &with_pin);

    h.import("t", &der, "privkey", "kept", "05");
    restore_eq(&bv, "d1", &with_pin, &a1);
    let a2 = random_data(122, MIB as usize);
    write_file(&img, &a2);
    bv.backup(&img, "d1", &with_pin);
    let ids = snapshot_ids(&bv, &with_pin, "d1");
    restore_eq(&bv, &format!("d1@{}", ids[0]), &with_pin, &a1);
    restore_eq(&bv, &format!("d1@{}", ids[1]), &with_pin, &a2);
}

// ---------------------------------------------------------------------------------------------
// No key material unwrapped
// ---------------------------------------------------------------------------------------------

/// A platform vault (rotated, with an escrowed secret and an export), a PEM CMK vault and an
/// infrastructure-layer vault, every command run with RUST_LOG=debug: the platform KEKs, auth
/// keys and infrastructure keys (read from the keystore files) appear in their own keystore
/// file only, never in any vault file, export file, JSON output or log; the escrowed secret
/// and the PEM private keys' private exponents and primes, and their whole PKCS#8 DER, appear
/// in no file of any vault or keystore, nor in any output.
#[test]
fn no_key_material_is_stored_or_printed_unwrapped() {
    let Some(k) = pem_keys("no_key_material_is_stored_or_printed_unwrapped") else {
        return;
    };
    const SECRET: &[u8] = b"escrowed-luks-passphrase-0123456789-abcdefgh";
    let mut outputs: Vec<Run> = Vec::new();
    let debug = |mut bv: Bv| {
        bv.env.push(("RUST_LOG".into(), "debug".into()));
        bv
    };
    let (platform, pemv, infra) = (debug(Bv::new()), debug(Bv::new()), debug(Bv::new()));
    let data = common::mixed_data(131, 3 * MIB as usize);
    let img = platform.path("d1.img");
    write_file(&img, &data);
    let secret_file = platform.path("secret");
    std::fs::write(&secret_file, SECRET).unwrap();
    let export = platform.path("keys.export");
    let pass = platform.path("pass");
    std::fs::write(&pass, "export passphrase\n").unwrap();
    let restored = platform.path("restored");
    let escrow_dir = platform.path("escrow");
    let run = |bv: &Bv, args: &[&str], outputs: &mut Vec<Run>| {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let r = bv.run(&all);
        r.ok();
        outputs.push(r);
    };
    let backup = ["backup", s(&img), "--disk", "d1"];
    run(
        &platform,
        &["init", "--recovery-key", &k.spec("r")],
        &mut outputs,
    );
    run(&platform, &backup, &mut outputs);
    run(&platform, &["key", "rotate", "--new-dek"], &mut outputs);
    run(&platform, &backup, &mut outputs);
    run(
        &platform,
        &[
            "key",
            "escrow",
            "d1",
            "--name",
            "luks",
            "--secret-file",
            s(&secret_file),
        ],
        &mut outputs,
    );
    run(
        &platform,
        &[
            "restore",
            "d1",
            s(&restored),
            "--with-escrow",
            s(&escrow_dir),
        ],
        &mut outputs,
    );
    run(
        &platform,
        &["key", "export", s(&export), "--passphrase-file", s(&pass)],
        &mut outputs,
    );
    run(&platform, &["key", "show"], &mut outputs);
    let with_a = ["--cmk-private", &k.key("a")];
    let spec_a = k.spec("a");
    for (bv, extra) in [
        (&pemv, &[][..]),
        (&infra, &["--infrastructure-encryption"][..]),
    ] {
        let mut init = vec!["init", "--cmk", &spec_a];
        init.extend_from_slice(extra);
        run(bv, &init, &mut outputs);
        let mut b = backup.to_vec();
        b.extend_from_slice(&with_a);
        run(bv, &b, &mut outputs);
        let mut v = vec!["verify", "--read-data"];
        v.extend_from_slice(&with_a);
        run(bv, &v, &mut outputs);
    }
    assert_file_eq(&restored, &data);
    assert!(
        outputs.iter().any(|r| r.stderr.contains("DEBUG")),
        "RUST_LOG=debug should have logged"
    );

    // Every file that must not hold key material in the clear.
    let mut stored = Tree::new();
    for bv in [&platform, &pemv, &infra] {
        for (name, bytes) in tree(&bv.vault) {
            stored.insert(format!("{}/{name}", bv.vault.display()), bytes);
        }
    }
    stored.insert(s(&export).into(), std::fs::read(&export).unwrap());
    let mut keystores = Tree::new();
    for bv in [&platform, &pemv, &infra] {
        keystores.insert(
            s(&bv.key_file()).into(),
            std::fs::read(bv.key_file()).unwrap(),
        );
    }
    let printed: String = outputs
        .iter()
        .map(|r| format!("{}\n{}\n", r.stdout, r.stderr))
        .collect();

    let mut checked = 0;
    for (file, bytes) in &keystores {
        let secrets = keystore_secrets(bytes);
        assert_eq!(
            secrets
                .iter()
                .filter(|(n, _)| n.starts_with("infrastructure"))
                .count(),
            if file.contains(&hex_id(&infra)) { 2 } else { 0 },
            "{file}"
        );
        for (what, key) in secrets {
            for (name, other) in stored.iter().chain(&keystores) {
                let own = name == file;
                assert_eq!(
                    contains(other, &key),
                    own,
                    "{what} of {file} {} in {name}",
                    if own { "is missing" } else { "appears" }
                );
            }
            assert!(
                !printed.contains(&hex::encode(&key)),
                "{what} printed in hex"
            );
            assert!(!contains(printed.as_bytes(), &key), "{what} printed raw");
            checked += 1;
        }
    }
    // Platform: auth + the current KEK version (rotation destroyed the first); PEM: auth + 1;
    // infra: auth + 1 + 2 halves.
    assert_eq!(checked, 2 + 2 + 4);

    let mut forbidden = vec![("escrowed secret".to_string(), SECRET.to_vec())];
    for key in ["a", "r"] {
        forbidden.extend(private_components(&k.key(key)));
    }
    for (what, bytes) in &forbidden {
        for (name, file) in stored.iter().chain(&keystores) {
            assert!(!contains(file, bytes), "{what} appears in {name}");
        }
        assert!(!contains(printed.as_bytes(), bytes), "{what} printed");
    }
}

/// The vault id of `bv` (hex), from its keystore file's name.
fn hex_id(bv: &Bv) -> String {
    bv.key_file()
        .file_stem()
        .unwrap()
        .to_string_lossy()
        .into_owned()
}
