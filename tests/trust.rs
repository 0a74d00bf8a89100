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
use common::secrets::tree;
use common::trust::{
    copy_tree, head_of, image, only, put_back, refused, restore_eq, restore_refused, run_as_is, s,
    INTEGRITY,
};
use common::{flip_byte, num, Bv, MIB};

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

// ---------------------------------------------------------------------------------------------
// 1. `key recover` launders nothing
// ---------------------------------------------------------------------------------------------

/// What the storage holder plants before a recovery, using only public material (the public
/// keys stored in the vault and its own key `c`).
#[derive(Clone, Copy, Debug)]
enum Plant {
    /// The attacker's RSA key as the descriptor of the vault's current customer key.
    DescriptorReplaced,
    /// The attacker's RSA key as a newer customer-key descriptor, beside the real one.
    DescriptorBeside,
    /// A generation-1 key record whose DEK the attacker chose, wrapped to the vault's public
    /// customer and recovery keys.
    ForgedRecord,
    /// The same forgery in place of the generation 0 record the head lists.
    RecordReplaced,
    /// The config flipped to PKCS#11 (MAC'd with a key of the attacker's).
    ConfigPkcs11,
}

const PLANTS: [Plant; 5] = [
    Plant::DescriptorReplaced,
    Plant::DescriptorBeside,
    Plant::ForgedRecord,
    Plant::RecordReplaced,
    Plant::ConfigPkcs11,
];

/// A customer-key vault (`a`, recovery key `r`) with one snapshot of `d1`: the vault, its
/// image's bytes and the auth fingerprint printed at init.
fn cmk_vault(pem: &common::keys::PemKeys, seed: u64) -> (Bv, Vec<u8>, String) {
    let bv = Bv::new();
    let init = bv.json(&[
        "init",
        "--cmk",
        &pem.spec("a"),
        "--recovery-key",
        &pem.spec("r"),
    ]);
    let fp = common::text(&init, "recovery_fingerprint");
    let (img, data) = image(&bv, "d1.img", seed, 2 * MIB as usize);
    bv.backup(&img, "d1", &["--cmk-private", &pem.key("a")]);
    (bv, data, fp)
}

/// Apply `plant` to the vault of `bv`; returns the object key it planted or changed.
fn plant(bv: &Bv, pem: &common::keys::PemKeys, what: Plant) -> String {
    use blockvault::crypto::kek::KekKind;
    use blockvault::crypto::rsa::{read_public_key, OaepHash, PemKek};
    use blockvault::crypto::Secret32;
    use blockvault::vault::config::{self, Config};
    use blockvault::vault::{kekdesc, keyrecord};

    let attacker = |version| {
        read_public_key(
            KekKind::CustomerRsa,
            version,
            OaepHash::Sha256,
            &pem.path("c.pub"),
        )
        .unwrap()
    };
    let stored = |key: &str| kekdesc::decode(&fs::read(bv.vault.join(key)).unwrap(), key).unwrap();
    let write = |key: &str, bytes: &[u8]| {
        fs::create_dir_all(bv.vault.join(key).parent().unwrap()).unwrap();
        fs::write(bv.vault.join(key), bytes).unwrap();
        key.to_string()
    };
    match what {
        Plant::DescriptorReplaced => write("kek/cmk-rsa-00000001", &kekdesc::encode(&attacker(1))),
        Plant::DescriptorBeside => write("kek/cmk-rsa-00000002", &kekdesc::encode(&attacker(2))),
        Plant::ForgedRecord | Plant::RecordReplaced => {
            let id = Config::decode_unverified(&fs::read(bv.vault.join(config::KEY)).unwrap())
                .unwrap()
                .vault_id;
            let disk = disk_id(bv);
            let cmk = PemKek::new(stored("kek/cmk-rsa-00000001"), None).unwrap();
            let rec = PemKek::new(stored("kek/recovery-00000001"), None).unwrap();
            let ring = blockvault::crypto::keyring::Keyring::new(
                KekKind::CustomerRsa,
                Box::new(cmk),
                Some(Box::new(rec)),
            );
            let dek = Secret32::from_bytes([0x41; 32]);
            let g = u32::from(matches!(what, Plant::ForgedRecord));
            let forged = keyrecord::KeyRecord::create(id, disk, g, &dek, "d1", &ring).unwrap();
            write(&keyrecord::object_key(&disk, g, 1), &forged.encode())
        }
        Plant::ConfigPkcs11 => {
            let mut c =
                Config::decode_unverified(&fs::read(bv.vault.join(config::KEY)).unwrap()).unwrap();
            c.kek_kind = KekKind::CustomerPkcs11;
            write(config::KEY, &c.encode(&Secret32::from_bytes([0x42; 32])))
        }
    }
}

/// The id of the vault's only disk, from the folder of its key records.
fn disk_id(bv: &Bv) -> [u8; 16] {
    let dirs: Vec<_> = fs::read_dir(bv.vault.join("keys")).unwrap().collect();
    assert_eq!(dirs.len(), 1, "one disk");
    let name = dirs.into_iter().next().unwrap().unwrap().file_name();
    hex::decode(name.to_string_lossy().as_bytes())
        .unwrap()
        .try_into()
        .unwrap()
}

/// `(id, source)` of every KEK `key show` lists.
fn keks(bv: &Bv) -> Vec<(String, String)> {
    bv.json(&["key", "show"])["keks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| (common::text(k, "id"), common::text(k, "source")))
        .collect()
}

/// After a recovery or take-over that had to ignore `what`: the attacker's key is not among
/// the vault's KEKs, the disk has generation 0 only, and the snapshot restores exactly with
/// `private` (a new backup too).
fn nothing_adopted(bv: &Bv, pem: &common::keys::PemKeys, what: Plant, private: &str, a1: &[u8]) {
    let attacker = s(&pem.path("c.pub")).to_string();
    let listed = keks(bv);
    assert!(
        listed.iter().all(|(_, source)| *source != attacker),
        "{what:?}: the attacker's key was adopted: {listed:?}"
    );
    let h = head_of(bv);
    let disk = &h.disks[&disk_id(bv)];
    assert_eq!(disk.current_generation, 0, "{what:?}");
    assert_eq!(
        disk.generations.keys().copied().collect::<Vec<_>>(),
        [0],
        "{what:?}"
    );
    let keys = ["--cmk-private", private];
    restore_eq(bv, "d1", &keys, a1);
    let (img, a2) = image(bv, "d1.img", 99, 2 * MIB as usize);
    bv.backup(&img, "d1", &keys);
    assert_eq!(head_of(bv).disks[&disk_id(bv)].current_generation, 0);
    restore_eq(bv, "d1", &keys, &a2);
}

#[test]
fn key_recover_with_the_keystore_adopts_no_planted_object() {
    const T: &str = "key_recover_with_the_keystore_adopts_no_planted_object";
    let Some(pem) = pem_keys(T) else {
        return;
    };
    let (bv, a1, _) = cmk_vault(pem, 11);
    let (good, keystore) = (bv.path("vault-good"), bv.path("keystore-good"));
    copy_tree(&bv.vault, &good);
    copy_tree(&bv.keystore, &keystore);
    let recover = [
        "key",
        "recover",
        "--recovery-private",
        &pem.key("r"),
        "--new-cmk",
        &pem.spec("b"),
    ];
    for what in PLANTS {
        put_back(&good, &bv.vault);
        put_back(&keystore, &bv.keystore);
        let key = plant(&bv, pem, what);
        let before = (tree(&bv.vault), tree(&bv.keystore));
        match what {
            // Refused before anything is touched, naming the object.
            Plant::DescriptorReplaced | Plant::RecordReplaced | Plant::ConfigPkcs11 => {
                let why = match what {
                    Plant::ConfigPkcs11 => "vault config failed authentication",
                    _ => "does not match the digest the vault head lists",
                };
                refused(&bv, &recover, INTEGRITY, &[&key, why]);
                let after = (tree(&bv.vault), tree(&bv.keystore));
                let changed: Vec<_> = [(&before.0, &after.0), (&before.1, &after.1)]
                    .iter()
                    .flat_map(|(b, a)| {
                        a.iter()
                            .filter(|(k, v)| b.get(*k) != Some(v))
                            .map(|(k, _)| k.clone())
                            .collect::<Vec<_>>()
                    })
                    .collect();
                assert!(changed.is_empty(), "{what:?}: changed {changed:?}");
            }
            // Not listed in the head: recovery works and ignores it.
            Plant::DescriptorBeside | Plant::ForgedRecord => {
                bv.run(&recover).ok();
                assert_eq!(
                    fs::read(bv.vault.join(&key)).unwrap(),
                    before.0[&key],
                    "{what:?}: {key} was rewritten"
                );
                nothing_adopted(&bv, pem, what, &pem.key("b"), &a1);
            }
        }
    }
}

#[test]
fn key_recover_take_over_verifies_against_the_anchor_before_adopting_anything() {
    use blockvault::crypto::Secret32;
    use blockvault::vault::{anchor, kekdesc};

    const T: &str = "key_recover_take_over_verifies_against_the_anchor_before_adopting_anything";
    let Some(pem) = pem_keys(T) else {
        return;
    };
    let (bv, a1, fp) = cmk_vault(pem, 12);
    let good = bv.path("vault-good");
    copy_tree(&bv.vault, &good);
    let lost = bv.path("keystore-lost");
    fs::rename(&bv.keystore, &lost).unwrap();
    let take_over = [
        "key",
        "recover",
        "--recovery-private",
        &pem.key("r"),
        "--take-over",
        "--anchor-fingerprint",
        &fp,
    ];
    let fresh = |bv: &Bv| {
        put_back(&good, &bv.vault);
        let _ = fs::remove_dir_all(&bv.keystore);
    };
    let no_keys = |bv: &Bv, what: &str| {
        let made = tree(&bv.keystore);
        assert!(
            made.keys().all(|k| !k.ends_with(".keys")),
            "{what}: a refused take-over made a key file: {:?}",
            made.keys()
        );
    };

    // The storage holder's own anchor (its auth key wrapped to the public recovery key), with
    // which it could MAC any config and head: refused by the fingerprint kept since init.
    fresh(&bv);
    let id = common::trust::vault_id_in(
        &fs::read_dir(&lost)
            .unwrap()
            .flatten()
            .find(|e| e.file_name().to_string_lossy().ends_with(".keys"))
            .unwrap()
            .path(),
    );
    let recovery = kekdesc::decode(
        &fs::read(bv.vault.join("kek/recovery-00000001")).unwrap(),
        "kek/recovery-00000001",
    )
    .unwrap();
    let forged = anchor::encode(&id, 1, &Secret32::from_bytes([7; 32]), &recovery).unwrap();
    fs::write(bv.vault.join(anchor::KEY), forged).unwrap();
    let before = tree(&bv.vault);
    refused(&bv, &take_over, INTEGRITY, &[anchor::KEY, &fp]);
    assert!(
        before == tree(&bv.vault),
        "a refused take-over changed the vault"
    );
    no_keys(&bv, "forged anchor");

    for what in PLANTS {
        fresh(&bv);
        let key = plant(&bv, pem, what);
        match what {
            Plant::DescriptorReplaced | Plant::RecordReplaced | Plant::ConfigPkcs11 => {
                let before = tree(&bv.vault);
                let why = match what {
                    Plant::ConfigPkcs11 => "vault config failed authentication",
                    _ => "does not match the digest the vault head lists",
                };
                refused(&bv, &take_over, INTEGRITY, &[&key, why]);
                assert!(before == tree(&bv.vault), "{what:?}: the vault changed");
                no_keys(&bv, &format!("{what:?}"));
            }
            Plant::DescriptorBeside | Plant::ForgedRecord => {
                bv.run(&take_over).ok();
                nothing_adopted(&bv, pem, what, &pem.key("a"), &a1);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 8. No silent downgrade
// ---------------------------------------------------------------------------------------------

#[test]
fn a_wiped_vault_folder_is_not_replaced_by_a_new_vault() {
    let bv = Bv::new();
    let (img, _) = image(&bv, "d1.img", 21, 2 * MIB as usize);
    bv.backup(&img, "d1", &[]);
    let id = hex::encode(common::trust::vault_id(&bv));
    fs::remove_dir_all(&bv.vault).unwrap();

    // Before, the next backup made a fresh platform-key vault (no customer key, no recovery
    // key, no infrastructure layer) and exited 0.
    let gone = [id.as_str(), "is gone", &format!("init --forget-vault {id}")];
    for args in [
        vec!["backup", s(&img), "--disk", "d1"],
        vec!["backup", "--init", s(&img), "--disk", "d1"],
        vec!["init"],
    ] {
        run_as_is(&bv, &args).code(1).stderr_has(&gone);
        assert!(!bv.vault.join("config").exists(), "{args:?} made a vault");
    }
    // (A refused `init` leaves only its lock file: `locks/init`.)
    let left: Vec<String> = bv.objects("").iter().map(|p| bv.key_of(p)).collect();
    assert!(
        left.iter().all(|k| k.starts_with("locks/")),
        "objects in the wiped vault folder: {left:?}"
    );

    // The way out the message names: a new vault, knowingly.
    let _ = fs::remove_dir_all(&bv.vault);
    bv.run(&["init", "--forget-vault", &id]).ok();
    assert_ne!(
        hex::encode(common::trust::vault_id_in(&newest_key_file(&bv))),
        id
    );
}

/// The key file of the vault at `bv.vault` (read from its config), in `bv`'s keystore.
fn newest_key_file(bv: &Bv) -> std::path::PathBuf {
    use blockvault::vault::config::{self, Config};
    let id = Config::decode_unverified(&fs::read(bv.vault.join(config::KEY)).unwrap())
        .unwrap()
        .vault_id;
    bv.keystore.join(format!("{}.keys", hex::encode(id)))
}

#[test]
fn another_vault_served_at_a_known_url_is_refused() {
    let (a, b) = (Bv::new(), Bv::new());
    let (img, a1) = image(&a, "d1.img", 22, 2 * MIB as usize);
    a.backup(&img, "d1", &[]);
    b.backup(&img, "d1", &[]);
    let (id_a, id_b) = (
        hex::encode(common::trust::vault_id(&a)),
        hex::encode(common::trust::vault_id(&b)),
    );
    // One host holding both vaults' keys (one keystore folder for all its vaults).
    fs::copy(
        b.key_file(),
        a.keystore.join(b.key_file().file_name().unwrap()),
    )
    .unwrap();
    let a_vault = a.path("vault-a");
    fs::rename(&a.vault, &a_vault).unwrap();
    copy_tree(&b.vault, &a.vault);

    // Before, vault B served at A's URL restored as A.
    let other = [
        format!("holds vault {id_b}, but this host knew vault {id_a} there"),
        format!("init --forget-vault {id_a}"),
    ];
    let other: Vec<&str> = other.iter().map(String::as_str).collect();
    restore_refused(&a, "d1", &[], INTEGRITY, &other);
    for args in [
        vec!["backup", s(&img), "--disk", "d1"],
        vec!["snapshots"],
        vec!["verify"],
        vec!["key", "show"],
    ] {
        refused(&a, &args, INTEGRITY, &other);
    }
    // Without B's keys on this host it is refused too (no key for that vault).
    fs::remove_file(a.keystore.join(b.key_file().file_name().unwrap())).unwrap();
    restore_refused(&a, "d1", &[], 1, &[&id_b]);

    // A put back is A again.
    put_back(&a_vault, &a.vault);
    restore_eq(&a, "d1", &[], &a1);
}

// ---------------------------------------------------------------------------------------------
// 6. Revocation holds; destroy is final
// ---------------------------------------------------------------------------------------------

/// The passphrase of the keystore exports made here.
const PASS: &str = "correct horse battery staple";

/// `bv` with the export passphrase in its environment.
fn with_pass(mut bv: Bv) -> Bv {
    bv.env
        .push(("BLOCKVAULT_EXPORT_PASSPHRASE".into(), PASS.into()));
    bv
}

#[test]
fn revocation_holds_against_export_import_and_recover() {
    const T: &str = "revocation_holds_against_export_import_and_recover";
    let Some(pem) = pem_keys(T) else {
        return;
    };
    let bv = with_pass(Bv::new());
    let init = bv.json(&["init", "--recovery-key", &pem.spec("r")]);
    let fp = common::text(&init, "recovery_fingerprint");
    let (img, a1) = image(&bv, "d1.img", 31, 2 * MIB as usize);
    bv.backup(&img, "d1", &[]);
    let before = bv.path("before-revoke.export");
    bv.run(&["key", "export", s(&before)]).ok();
    bv.run(&["key", "revoke"]).ok();
    let revoked = ["platform KEK version 1 is revoked"];
    refused(&bv, &["backup", s(&img), "--disk", "d1"], 1, &revoked);

    // Export: refused while revoked, nothing written.
    let out = bv.path("while-revoked.export");
    refused(
        &bv,
        &["key", "export", s(&out)],
        2,
        &["are revoked", "key enable"],
    );
    assert!(!out.exists());

    // Import of the export made before the revocation: the head keeps the revocation.
    bv.run(&["key", "import", "--force", s(&before)]).ok();
    refused(&bv, &["backup", s(&img), "--disk", "d1"], 1, &revoked);
    restore_refused(&bv, "d1", &[], 1, &revoked);
    assert_eq!(
        head_of(&bv).revoked.iter().copied().collect::<Vec<_>>(),
        [1]
    );

    // Recover into an empty keystore (the original one kept aside): refused without
    // --lift-revocation, nothing written; the original keystore still opens the vault.
    let original = bv.path("keystore-original");
    copy_tree(&bv.keystore, &original);
    fs::remove_dir_all(&bv.keystore).unwrap();
    let take_over = [
        "key",
        "recover",
        "--recovery-private",
        &pem.key("r"),
        "--take-over",
        "--anchor-fingerprint",
        &fp,
    ];
    let vault_before = tree(&bv.vault);
    refused(&bv, &take_over, 1, &["revoked", "--lift-revocation"]);
    assert!(
        vault_before == tree(&bv.vault),
        "a refused recovery changed the vault"
    );
    assert!(tree(&bv.keystore).keys().all(|k| !k.ends_with(".keys")));
    put_back(&original, &bv.keystore);
    refused(&bv, &["backup", s(&img), "--disk", "d1"], 1, &revoked);

    // Lifted knowingly, by the recovery key's holder.
    fs::remove_dir_all(&bv.keystore).unwrap();
    let mut lift = take_over.to_vec();
    lift.push("--lift-revocation");
    bv.run(&lift).ok();
    restore_eq(&bv, "d1", &[], &a1);
    bv.backup(&img, "d1", &[]);
    assert!(head_of(&bv).revoked.is_empty());
}

#[test]
fn destroy_refuses_a_version_in_use_and_is_final() {
    use blockvault::crypto::kek::PlatformKek;
    use blockvault::crypto::keystore::KeyClass;
    use blockvault::crypto::Keystore;

    let bv = with_pass(Bv::new());
    let (img, a1) = image(&bv, "d1.img", 32, 2 * MIB as usize);
    bv.backup(&img, "d1", &[]);
    let id = common::trust::vault_id(&bv);
    let v1 = Keystore::new(&bv.keystore).load(&id).unwrap().kek;

    // While a record needs it: refused, nothing changes.
    let keys_before = fs::read(bv.key_file()).unwrap();
    refused(
        &bv,
        &["key", "destroy", "--version", "1"],
        2,
        &["version 1", "rotate first"],
    );
    assert_eq!(fs::read(bv.key_file()).unwrap(), keys_before);

    // A rotation destroys the old version at its end. A rotation stopped before that step
    // leaves it in the keystore: made here by putting version 1 back through the library.
    bv.run(&["key", "rotate"]).ok();
    Keystore::new(&bv.keystore)
        .update(&id, |keys| {
            let mut all =
                std::mem::replace(&mut keys.kek, PlatformKek::new(Vec::new())).into_versions();
            all.extend(v1.into_versions());
            keys.destroyed.remove(&(KeyClass::Kek, 1));
            keys.kek = PlatformKek::new(all);
            Ok(())
        })
        .unwrap();
    let both = bv.path("both-versions.export");
    bv.run(&["key", "export", s(&both)]).ok();

    // No record needs version 1 any more: destroyed for good.
    bv.run(&["key", "destroy", "--version", "1"]).ok();
    let show = bv.json(&["key", "show"]);
    assert_eq!(show["destroyed"][0], "platform KEK version 1");
    refused(
        &bv,
        &["key", "destroy", "--version", "1"],
        1,
        &["destroyed already"],
    );

    // The export made before the destroy brings version 1 back to nobody: it is dropped.
    bv.run(&["key", "import", "--force", s(&both)]).ok();
    let keys = Keystore::new(&bv.keystore).load(&id).unwrap();
    assert!(
        keys.kek.versions().iter().all(|v| v.version != 1),
        "version 1 came back with the import"
    );
    assert!(keys.destroyed.contains(&(KeyClass::Kek, 1)));
    restore_eq(&bv, "d1", &[], &a1);
    bv.backup(&img, "d1", &[]);
}
