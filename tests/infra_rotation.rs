//! `key rotate --infrastructure`: the AES-256-XTS layer's key replaced, every object under the
//! layer re-encrypted under its own name, the old version destroyed (a tombstone in `key
//! show`), `infra-recovery` rewritten for the new version (a keystore-less `key recover`
//! opens the vault after it); readers and backups while a rotation is unfinished (two-key
//! reads); SIGKILL at several points of a rotation, after which running it again finishes.
//! Real binary, real RSA keys from openssl (skipped loudly without it, failing under CI).

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use common::keys::{pem_keys, PemKeys};
use common::*;
use serde_json::Value;

/// The vault's objects under the infrastructure layer (everything but the raw objects and the
/// lock files), by key: their bytes.
fn layered(bv: &Bv) -> BTreeMap<String, Vec<u8>> {
    const RAW: [&str; 5] = [
        "config",
        "head",
        "recovery-anchor",
        "infra-recovery",
        "infra-recovery-next",
    ];
    bv.objects("")
        .into_iter()
        .map(|p| bv.key_of(&p))
        .filter(|k| !RAW.contains(&k.as_str()) && !k.starts_with("locks/"))
        .map(|k| {
            let bytes = read_file(&bv.vault.join(&k));
            (k, bytes)
        })
        .collect()
}

/// A CMK vault (key `a`, recovery key `r`) with the infrastructure layer, `disks` disks of
/// two snapshots each; the snapshots (`disk@id`) with their data.
fn vault_with_snapshots(k: &PemKeys, disks: usize) -> (Bv, Vec<(String, Vec<u8>)>) {
    let mut bv = Bv::new();
    bv.env.push(("BLOCKVAULT_CMK_PRIVATE".into(), k.key("a")));
    bv.json(&[
        "init",
        "--cmk",
        &k.spec("a"),
        "--recovery-key",
        &k.spec("r"),
        "--infrastructure-encryption",
    ]);
    let mut snaps = Vec::new();
    for d in 0..disks {
        let img = bv.path(&format!("d{d}.img"));
        let mut data = mixed_data(700 + d as u64, 2 * MIB as usize + 12_345);
        for round in 0..2u64 {
            if round == 1 {
                let patch = random_data(800 + d as u64, 70_000);
                data[300_000..370_000].copy_from_slice(&patch);
            }
            write_file(&img, &data);
            let doc = bv.backup(&img, &format!("d{d}"), &[]);
            snaps.push((format!("d{d}@{}", text(&doc, "snapshot")), data.clone()));
        }
    }
    (bv, snaps)
}

fn restore_all(bv: &Bv, snaps: &[(String, Vec<u8>)]) {
    for (spec, data) in snaps {
        bv.restore_and_compare(spec, data);
    }
}

fn rotate(bv: &Bv) -> Value {
    bv.json(&["key", "rotate", "--infrastructure"])["infrastructure"].clone()
}

fn show(bv: &Bv) -> Value {
    bv.json(&["key", "show"])
}

/// `key show` lists infrastructure key versions `1..current` as destroyed and `current` as
/// the key in use.
fn assert_only_version(bv: &Bv, current: u64) {
    let doc = show(bv);
    assert_eq!(num(&doc, "infrastructure_key_version"), current, "{doc}");
    let destroyed: Vec<String> = doc["destroyed"]
        .as_array()
        .expect("destroyed")
        .iter()
        .map(|v| v.as_str().expect("text").to_string())
        .filter(|v| v.starts_with("infrastructure key"))
        .collect();
    let expected: Vec<String> = (1..current)
        .map(|v| format!("infrastructure key version {v}"))
        .collect();
    assert_eq!(destroyed, expected, "{doc}");
}

#[test]
fn rotation_reencrypts_every_object_and_everything_restores() {
    let Some(k) = pem_keys("rotation_reencrypts_every_object_and_everything_restores") else {
        return;
    };
    let (bv, mut snaps) = vault_with_snapshots(k, 3);
    let before = layered(&bv);
    let recovery_before = read_file(&bv.vault.join("infra-recovery"));

    let r = rotate(&bv);
    assert_eq!(num(&r, "key_version"), 2, "{r}");
    assert_eq!(num(&r, "objects_reencrypted"), before.len() as u64, "{r}");
    assert_eq!(num(&r, "objects_already_under_it"), 0, "{r}");
    assert_eq!(r["resumed"], false, "{r}");
    assert_eq!(r["retired_versions"], serde_json::json!([1]), "{r}");

    // Same names, same sizes, every byte string new (XTS under another key).
    let after = layered(&bv);
    assert_eq!(
        after.keys().collect::<Vec<_>>(),
        before.keys().collect::<Vec<_>>()
    );
    for (key, old) in &before {
        let new = &after[key];
        assert_eq!(new.len(), old.len(), "{key} changed size");
        assert_ne!(new, old, "{key} was not re-encrypted");
    }
    assert_ne!(read_file(&bv.vault.join("infra-recovery")), recovery_before);
    assert!(!bv.vault.join("infra-recovery-next").exists());
    assert_only_version(&bv, 2);
    assert_eq!(show(&bv)["unfinished_key_operation"], Value::Null);
    bv.verify_ok();
    restore_all(&bv, &snaps);

    // A new backup goes under the new key and deduplicates against the old data.
    let img = bv.path("d0.img");
    let mut data = snaps[1].1.clone();
    data[0..4096].fill(0x5a);
    write_file(&img, &data);
    let doc = bv.backup(&img, "d0", &[]);
    assert_eq!(num(&doc, "slots_new"), 1, "{doc}");
    snaps.push((format!("d0@{}", text(&doc, "snapshot")), data));

    // Again: version 3, both older versions tombstoned.
    let r = rotate(&bv);
    assert_eq!(num(&r, "key_version"), 3, "{r}");
    assert_eq!(r["retired_versions"], serde_json::json!([2]), "{r}");
    assert_only_version(&bv, 3);
    restore_all(&bv, &snaps);

    // The keystore lost: the recovery key recovers infrastructure key version 3 from the
    // rewritten infra-recovery record.
    let fingerprint = text(&show(&bv), "auth_fingerprint");
    let fresh = bv.path("keystore-2");
    let mut c = bv.command_with_keystore(&fresh);
    c.args([
        "key",
        "recover",
        "--recovery-private",
        &k.key("r"),
        "--take-over",
        "--anchor-fingerprint",
        &fingerprint,
    ]);
    let out = c.output().expect("run key recover");
    assert!(
        out.status.success(),
        "key recover: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let recovered = Bv {
        keystore: fresh,
        env: bv.env.clone(),
        vault: bv.vault.clone(),
        dir: tempfile::tempdir().expect("tempdir"),
    };
    assert_eq!(
        num(&show(&recovered), "infrastructure_key_version"),
        3,
        "the recovered keystore holds the rotated key"
    );
    restore_all(&recovered, &snaps);
}

#[test]
fn rotation_needs_the_layer_and_stands_alone_from_auth() {
    let Some(k) = pem_keys("rotation_needs_the_layer_and_stands_alone_from_auth") else {
        return;
    };
    let plain = Bv::new();
    plain.json(&["init"]);
    plain
        .run(&["key", "rotate", "--infrastructure"])
        .code(2)
        .stderr_has(&[
            "no infrastructure encryption layer",
            "--infrastructure-encryption",
        ]);
    let (bv, snaps) = vault_with_snapshots(k, 1);
    bv.run(&["key", "rotate", "--infrastructure", "--auth"])
        .code(2)
        .stderr_has(&["--auth"]);
    // A customer-key vault's --new-dek needs --new-cmk: refused before anything is rotated.
    let before = layered(&bv);
    bv.run(&["key", "rotate", "--infrastructure", "--new-dek"])
        .code(2)
        .stderr_has(&["--new-cmk"]);
    assert_eq!(layered(&bv), before, "a refused rotation changed objects");
    assert_only_version(&bv, 1);
    // With it: a new customer key, a new DEK generation and a new infrastructure key.
    let mut bv = bv;
    let doc = bv.json(&[
        "key",
        "rotate",
        "--infrastructure",
        "--new-dek",
        "--new-cmk",
        &k.spec("b"),
    ]);
    assert_eq!(text(&doc, "kek"), "cmk-rsa-v2", "{doc}");
    assert_eq!(num(&doc, "new_dek_generations"), 1, "{doc}");
    assert_eq!(num(&doc["infrastructure"], "key_version"), 2, "{doc}");
    bv.env = vec![("BLOCKVAULT_CMK_PRIVATE".into(), k.key("b"))];
    assert_only_version(&bv, 2);
    restore_all(&bv, &snaps);
}

/// Start `args`; once `seen()` holds (polled every 200 µs), SIGKILL it unless it finished
/// first. Returns whether it was killed.
fn kill_when(bv: &Bv, args: &[&str], seen: impl Fn() -> bool) -> bool {
    let (mut child, what) = bv.spawn(args);
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            let out = child.wait_with_output().expect("output");
            assert!(
                status.success(),
                "{what} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            return false;
        }
        if seen() {
            break;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    child.kill().expect("SIGKILL");
    let status = child.wait().expect("wait");
    if status.success() {
        return false;
    }
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9),
        "{what}: {status}"
    );
    true
}

/// The inode of every layered object: a re-encryption replaces the file.
fn inodes(bv: &Bv) -> BTreeMap<String, u64> {
    layered(bv)
        .into_keys()
        .filter_map(|k| {
            std::fs::metadata(bv.vault.join(&k))
                .ok()
                .map(|m| (k, m.ino()))
        })
        .collect()
}

/// When to kill a rotation, given the vault, the key file's bytes and the layered objects'
/// inodes from before it started.
type KillPoint<'a> = dyn Fn(&Bv, &[u8], &BTreeMap<String, u64>) -> bool + 'a;

fn changed(path: &Path, before: &[u8]) -> bool {
    std::fs::read(path).is_ok_and(|b| b != before)
}

#[test]
fn killed_rotations_leave_a_readable_vault_and_a_rerun_finishes() {
    let Some(k) = pem_keys("killed_rotations_leave_a_readable_vault_and_a_rerun_finishes") else {
        return;
    };
    let (bv, mut snaps) = vault_with_snapshots(k, 6);
    let key_file = bv.key_file();
    let args = ["key", "rotate", "--infrastructure"];
    let mut version = 1;
    // Where each kill is aimed: once the new key is in the keystore; once the first object
    // was re-encrypted; once the new infra-recovery record is staged.
    let points: [(&str, Box<KillPoint>); 3] = [
        (
            "new key stored",
            Box::new(|_: &Bv, keys: &[u8], _: &BTreeMap<String, u64>| changed(&key_file, keys)),
        ),
        (
            "re-encrypting",
            Box::new(|bv: &Bv, _: &[u8], ino: &BTreeMap<String, u64>| {
                ino.iter()
                    .any(|(k, i)| std::fs::metadata(bv.vault.join(k)).is_ok_and(|m| m.ino() != *i))
            }),
        ),
        (
            "recovery record staged",
            Box::new(|bv: &Bv, _: &[u8], _: &BTreeMap<String, u64>| {
                bv.vault.join("infra-recovery-next").exists()
            }),
        ),
    ];
    for (round, (point, seen)) in points.iter().enumerate() {
        let keys_before = read_file(&key_file);
        let ino = inodes(&bv);
        let killed = kill_when(&bv, &args, || seen(&bv, &keys_before, &ino));
        eprintln!("kill at {point}: killed {killed}");
        // A reader and a writer while the rotation is unfinished: restores exact, a backup
        // commits (under whichever key the head names).
        restore_all(&bv, &snaps);
        let d = round % 6;
        let img = bv.path(&format!("d{d}.img"));
        let mut data = snaps[2 * d + 1].1.clone();
        data[MIB as usize..MIB as usize + 8192].fill(round as u8 + 1);
        write_file(&img, &data);
        let doc = bv.backup(&img, &format!("d{d}"), &[]);
        snaps.push((format!("d{d}@{}", text(&doc, "snapshot")), data));
        // Running it again finishes (or, if the kill came after the last head swap, only
        // cleans up, or rotates once more: either way one key is left, the newest).
        let r = rotate(&bv);
        version = num(&r, "key_version");
        assert!(!bv.vault.join("infra-recovery-next").exists());
        assert_only_version(&bv, version);
        assert_eq!(show(&bv)["unfinished_key_operation"], Value::Null);
        bv.verify_ok();
        restore_all(&bv, &snaps);
    }
    assert!(version >= 4, "three rotations ran, at version {version}");
}

#[test]
fn a_restore_started_during_a_rotation_reads_both_keys() {
    let Some(k) = pem_keys("a_restore_started_during_a_rotation_reads_both_keys") else {
        return;
    };
    let (bv, snaps) = vault_with_snapshots(k, 6);
    let ino = inodes(&bv);
    let (mut child, what) = bv.spawn(&["key", "rotate", "--infrastructure"]);
    // Once an object was re-encrypted the head names both keys: a restore opened now reads
    // objects under either, and under the new one when the rotation overtakes it.
    while child.try_wait().expect("try_wait").is_none()
        && !ino
            .iter()
            .any(|(k, i)| std::fs::metadata(bv.vault.join(k)).is_ok_and(|m| m.ino() != *i))
    {
        std::thread::sleep(Duration::from_micros(200));
    }
    restore_all(&bv, &snaps);
    let out = child.wait_with_output().expect("wait");
    assert!(
        out.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_only_version(&bv, 2);
    restore_all(&bv, &snaps);
}
