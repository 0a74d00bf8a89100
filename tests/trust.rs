//! The storage holder's attacks of the security review of 2026-12-06 (issue 10, "What the
//! review reproduced"), each replayed through the real binary against a vault in a temp folder:
//! - freshness: a damaged or deleted manifest, a deleted newest key record, descriptors and
//!   key records rolled back after a customer-key rotation, a whole vault put back from an
//!   older copy;
//! - `key recover` launders nothing: a planted descriptor, a forged generation-1 key record and
//!   a config flipped to PKCS#11, with the keystore present and with it lost;
//! - no silent downgrade: a wiped vault folder, another vault served at a known URL;
//! - revocation against export, import and recover; destroy is final.
//!
//! The attacker holds the vault folder and nothing else: every tampering here is a plain file
//! operation on it (copy, delete, overwrite, `cp -a`), never a use of the keystore, except
//! where a test says it models an older build or an insider. The compromise response, the
//! nonce budget and custody are in `tests/trust_keys.rs`; locks and the smaller items in
//! `tests/trust_locks.rs`. A missing tool (openssl) prints `SKIP` and passes, except under
//! `CI=true`.

mod common;

use std::fs;

use common::keys::pem_keys;
use common::trust::{
    copy_tree, head_of, image, only, put_back, refused, restore_eq, restore_refused, s,
};
use common::{flip_byte, num, Bv, MIB};

/// Exit code of an integrity problem found (docs/TESTING.md).
const INTEGRITY: i32 = 3;

// ---------------------------------------------------------------------------------------------
// 2. Freshness
// ---------------------------------------------------------------------------------------------

#[test]
fn a_damaged_newest_manifest_makes_latest_fail_naming_it() {
    let bv = Bv::new();
    let (img, a1) = image(&bv, "d1.img", 1, 3 * MIB as usize);
    bv.backup(&img, "d1", &[]);
    let (_, a2) = image(&bv, "d1.img", 2, 3 * MIB as usize);
    let newest = common::text(&bv.backup(&img, "d1", &[]), "snapshot");
    let manifest = bv.vault.join(format!(
        "snapshots/{}/{newest}",
        hex::encode(head_of(&bv).disks.keys().next().unwrap())
    ));
    let key = bv.key_of(&manifest);
    let good = fs::read(&manifest).unwrap();

    // Before the head, a bit-flipped newest manifest was skipped with a warning and @latest
    // restored the older snapshot, exit 0.
    flip_byte(&manifest, 40);
    let damaged = [
        key.as_str(),
        "does not match the digest the vault head lists",
    ];
    for spec in ["d1@latest", "d1"] {
        restore_refused(&bv, spec, &[], INTEGRITY, &damaged);
    }
    let r = bv.verify(false);
    r.code(INTEGRITY);
    assert_eq!(
        r.json()["problems"][0]["object"],
        key.as_str(),
        "{}",
        r.stdout
    );

    // Put back, both snapshots restore again: nothing was adopted or lost meanwhile.
    fs::write(&manifest, &good).unwrap();
    restore_eq(&bv, "d1@latest", &[], &a2);
    let first = common::text(&bv.snapshots()[0], "id");
    restore_eq(&bv, &format!("d1@{first}"), &[], &a1);
    bv.verify_ok();
}

#[test]
fn a_deleted_manifest_is_reported_by_verify() {
    let bv = Bv::new();
    let (img, _) = image(&bv, "d1.img", 3, 2 * MIB as usize);
    bv.backup(&img, "d1", &[]);
    let (_, a2) = image(&bv, "d1.img", 4, 2 * MIB as usize);
    bv.backup(&img, "d1", &[]);
    let first = common::text(&bv.snapshots()[0], "id");
    let manifest = bv
        .objects("snapshots")
        .into_iter()
        .find(|p| p.ends_with(&first))
        .expect("the first manifest");
    let key = bv.key_of(&manifest);
    let good = fs::read(&manifest).unwrap();
    fs::remove_file(&manifest).unwrap();

    // Before the head, verify said "no problems found".
    for read_data in [false, true] {
        let r = bv.verify(read_data);
        r.code(INTEGRITY);
        let doc = r.json();
        assert_eq!(doc["ok"], false);
        let problems = doc["problems"].as_array().unwrap();
        assert_eq!(problems.len(), 1, "{}", r.stdout);
        assert_eq!(problems[0]["object"], key.as_str());
        assert!(
            problems[0]["problem"]
                .as_str()
                .unwrap()
                .contains("is missing: the vault head lists it"),
            "{}",
            r.stdout
        );
        assert_eq!(
            problems[0]["snapshots"][0],
            format!("d1@{}", &first[..8]).as_str()
        );
    }
    // A disk whose history has a hole is not restored as if it had none.
    restore_refused(&bv, "d1@latest", &[], INTEGRITY, &[&key, "is missing"]);

    fs::write(&manifest, &good).unwrap();
    restore_eq(&bv, "d1@latest", &[], &a2);
    bv.verify_ok();
}

#[test]
fn deleting_the_newest_key_record_does_not_undo_a_new_dek_rotation() {
    let bv = Bv::new();
    let (img, a1) = image(&bv, "d1.img", 5, 3 * MIB as usize);
    bv.backup(&img, "d1", &[]);
    bv.run(&["key", "rotate", "--new-dek"]).ok();
    let disk = *head_of(&bv).disks.keys().next().unwrap();
    assert_eq!(head_of(&bv).disks[&disk].current_generation, 1);
    let newest = bv
        .objects(&format!("keys/{}", hex::encode(disk)))
        .into_iter()
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("00000001-")
        })
        .expect("the generation 1 record");
    let key = bv.key_of(&newest);
    let good = fs::read(&newest).unwrap();
    fs::remove_file(&newest).unwrap();

    // Before the head, the next backup went on under generation 0 as if the rotation had not
    // happened. Now every command that needs the disk's keys names the missing record.
    let missing = [key.as_str(), "is missing: the vault head lists it"];
    refused(
        &bv,
        &["backup", s(&img), "--disk", "d1"],
        INTEGRITY,
        &missing,
    );
    restore_refused(&bv, "d1", &[], INTEGRITY, &missing);
    let r = bv.verify(false);
    r.code(INTEGRITY);
    assert!(r.stdout.contains(&key), "{}", r.stdout);
    assert_eq!(head_of(&bv).disks[&disk].current_generation, 1);

    // Put back: the rotation holds; the next backup is under generation 1.
    fs::write(&newest, &good).unwrap();
    restore_eq(&bv, "d1", &[], &a1);
    bv.backup(&img, "d1", &[]);
    let h = head_of(&bv);
    assert_eq!(h.disks[&disk].current_generation, 1);
    assert!(
        h.disks[&disk].generations[&1].seals > 1,
        "sealed under generation 1"
    );
    restore_eq(&bv, "d1", &[], &a1);
    bv.verify_ok();
}

#[test]
fn customer_key_objects_rolled_back_after_a_rotation_are_refused() {
    const T: &str = "customer_key_objects_rolled_back_after_a_rotation_are_refused";
    let Some(pem) = pem_keys(T) else {
        return;
    };
    let bv = Bv::new();
    let (old_key, new_key) = (pem.key("a"), pem.key("b"));
    let old = ["--cmk-private", old_key.as_str()];
    let new = ["--cmk-private", new_key.as_str()];
    bv.run(&["init", "--cmk", &pem.spec("a")]).ok();
    let (img, a1) = image(&bv, "d1.img", 6, 2 * MIB as usize);
    bv.backup(&img, "d1", &old);
    let saved = bv.path("vault-before-rotation");
    copy_tree(&bv.vault, &saved);
    let mut args = old.to_vec();
    args.extend(["key", "rotate", "--new-cmk"]);
    let b = pem.spec("b");
    args.push(&b);
    bv.run(&args).ok();
    let rotated = bv.path("vault-after-rotation");
    copy_tree(&bv.vault, &rotated);
    let desc_v2 = bv.key_of(&only(&bv, "kek"));
    assert_eq!(desc_v2, "kek/cmk-rsa-00000002");
    let record_v2 = only(&bv, "keys");
    let record_v1 = saved.join(
        bv.key_of(&only(&bv, "keys"))
            .replace("-00000002", "-00000001"),
    );
    assert!(record_v1.exists(), "{}", record_v1.display());

    // a) The old descriptor and record put back beside the new ones' removal: the head lists
    //    the new ones, so the old key (maybe the compromised one) is not adopted.
    fs::copy(
        saved.join("kek/cmk-rsa-00000001"),
        bv.vault.join("kek/cmk-rsa-00000001"),
    )
    .unwrap();
    fs::copy(
        &record_v1,
        record_v2.with_file_name(record_v1.file_name().unwrap()),
    )
    .unwrap();
    fs::remove_file(bv.vault.join(&desc_v2)).unwrap();
    fs::remove_file(&record_v2).unwrap();
    let missing = [desc_v2.as_str(), "is missing: the vault head lists it"];
    restore_refused(&bv, "d1", &old, INTEGRITY, &missing);
    refused(&bv, &[&old[..], &["verify"]].concat(), INTEGRITY, &missing);
    refused(&bv, &["key", "show"], INTEGRITY, &missing);

    // b) The old bytes under the new names: they do not match the head's digests.
    put_back(&rotated, &bv.vault);
    fs::copy(saved.join("kek/cmk-rsa-00000001"), bv.vault.join(&desc_v2)).unwrap();
    fs::copy(&record_v1, &record_v2).unwrap();
    let replaced = [
        desc_v2.as_str(),
        "does not match the digest the vault head lists",
    ];
    for keys in [&old, &new] {
        restore_refused(&bv, "d1", keys, INTEGRITY, &replaced);
    }
    // Only the descriptor is put right: the record still fails, named.
    fs::copy(rotated.join(&desc_v2), bv.vault.join(&desc_v2)).unwrap();
    let record_key = bv.key_of(&record_v2);
    restore_refused(
        &bv,
        "d1",
        &new,
        INTEGRITY,
        &[
            &record_key,
            "does not match the digest the vault head lists",
        ],
    );

    // The rotated vault, untouched, restores with the new key only.
    put_back(&rotated, &bv.vault);
    restore_eq(&bv, "d1", &new, &a1);
    restore_refused(&bv, "d1", &old, 1, &["cmk-rsa-v2"]);
}

#[test]
fn a_whole_vault_put_back_from_an_older_copy_is_refused_by_a_host_that_saw_newer() {
    let bv = Bv::new();
    let (img, a1) = image(&bv, "d1.img", 7, 2 * MIB as usize);
    bv.backup(&img, "d1", &[]);
    let saved = bv.path("vault-copy");
    copy_tree(&bv.vault, &saved);
    let (_, a2) = image(&bv, "d1.img", 8, 2 * MIB as usize);
    let doc = bv.backup(&img, "d1", &[]);
    assert_eq!(num(&doc, "slots_new"), 2);
    let newer = bv.path("vault-newer");
    copy_tree(&bv.vault, &newer);
    let epoch = head_of(&bv).epoch;

    // The storage holder puts back the copy: one snapshot fewer, every object authentic.
    put_back(&saved, &bv.vault);
    let rolled = [
        "the vault was rolled back or replaced by an older copy",
        &format!("this host saw epoch {epoch}"),
    ];
    restore_refused(&bv, "d1", &[], INTEGRITY, &rolled);
    for args in [
        vec!["backup", s(&img), "--disk", "d1"],
        vec!["verify"],
        vec!["snapshots"],
        vec!["key", "show"],
        vec!["key", "rotate"],
    ] {
        refused(&bv, &args, INTEGRITY, &rolled);
    }
    // Refusing changed nothing: the newer vault put back works, with both snapshots.
    put_back(&newer, &bv.vault);
    let ids: Vec<String> = bv
        .snapshots()
        .iter()
        .map(|d| common::text(d, "id"))
        .collect();
    assert_eq!(ids.len(), 2);
    restore_eq(&bv, &format!("d1@{}", ids[0]), &[], &a1);
    restore_eq(&bv, "d1@latest", &[], &a2);
    bv.verify_ok();
}
