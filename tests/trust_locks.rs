//! The security review's lock and local-file repros (issue 10, points 7 and 9), through the
//! real binary: `key rotate`, `key revoke` and backups (of known and of new disks) racing in
//! loops lose no key and leave every record under the current KEK; `key import --force` of a
//! keystore missing a version in use is refused; keystore files others can read are refused;
//! `--keystore` on a shared folder keeps its keys in a private subfolder and never changes the
//! folder; the local store follows no symbolic link planted in the vault; `restore
//! --with-escrow DIR` follows no planted link and refuses two names that map to one file.
//! The storage-holder attacks are in `tests/trust.rs`, the key lifecycle in
//! `tests/trust_keys.rs`.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};

use blockvault::crypto::keystore::KeyClass;
use blockvault::crypto::Keystore;
use common::secrets::tree;
use common::trust::{head_of, image, refused, restore_eq, restore_refused, s, vault_id, INTEGRITY};
use common::{text, Bv, Run, MIB};

/// The passphrase of the keystore exports made here.
const PASS: &str = "correct horse battery staple";

/// The mode bits of a file or folder.
fn mode(p: &std::path::Path) -> u32 {
    fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

// ---------------------------------------------------------------------------------------------
// 7. Locks
// ---------------------------------------------------------------------------------------------

#[test]
fn rotate_revoke_and_backups_racing_in_loops_lose_nothing() {
    const ROUNDS: u64 = 10;
    let bv = Bv::new();
    let mut expected: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let (img, data) = image(&bv, "d0.img", 700, MIB as usize);
    bv.backup(&img, "d0", &[]);
    expected.insert("d0".into(), data);
    let id = vault_id(&bv);
    let (mut rotated, mut revoked, mut refused_backups) = (0, 0, 0);
    for round in 0..ROUNDS {
        // A backup of the known disk, one registering a new disk, a rotation and a revoke,
        // all at once; each may lose a race cleanly (locked, revoked), none may lose data.
        let new_disk = format!("n{round}");
        let (known_img, known) = image(&bv, "d0.img", 800 + round, MIB as usize);
        let (new_img, fresh) = image(&bv, &format!("{new_disk}.img"), 900 + round, MIB as usize);
        let spawned = [
            bv.spawn(&["--json", "backup", s(&known_img), "--disk", "d0"]),
            bv.spawn(&["--json", "backup", s(&new_img), "--disk", &new_disk]),
            bv.spawn(&["key", "rotate"]),
            bv.spawn(&["key", "revoke"]),
        ];
        let runs: Vec<Run> = spawned
            .into_iter()
            .map(|(child, what)| Run::wait(child, what))
            .collect();
        for r in &runs {
            r.no_panic();
            assert!((0..=3).contains(&r.code), "{}: {}", r.what, r.stderr);
        }
        for (r, disk, data) in [
            (&runs[0], "d0", known),
            (&runs[1], new_disk.as_str(), fresh),
        ] {
            if r.code == 0 {
                expected.insert(disk.to_string(), data);
            } else {
                refused_backups += 1;
            }
        }
        rotated += u32::from(runs[2].code == 0);
        revoked += u32::from(runs[3].code == 0);
        let enable = bv.run(&["key", "enable"]);
        enable.no_panic();
        // Enabled again, but for a version a rotation destroyed meanwhile (nothing to enable).
        let destroyed = Keystore::new(&bv.keystore).load(&id).unwrap().destroyed;
        let still: Vec<u32> = head_of(&bv)
            .revoked
            .into_iter()
            .filter(|v| !destroyed.contains(&(KeyClass::Kek, *v)))
            .collect();
        assert!(
            still.is_empty(),
            "round {round}: {still:?} revoked: {} {}",
            enable.stdout,
            enable.stderr
        );

        // Every record wrapped by the current KEK, which the keystore holds; every disk's
        // newest snapshot is its last successful backup.
        let show = bv.json(&["key", "show"]);
        let current = text(&show, "current_kek");
        for g in show["dek_generations"].as_array().unwrap() {
            assert_eq!(
                g["wrapped_by"],
                serde_json::json!([current.as_str()]),
                "round {round}: {g}"
            );
        }
        let version: u32 = current.trim_start_matches("platform-v").parse().unwrap();
        let keys = Keystore::new(&bv.keystore).load(&id).unwrap();
        assert!(
            keys.kek.versions().iter().any(|v| v.version == version),
            "round {round}: {current} is missing from the keystore"
        );
        let v = bv.verify(false);
        if v.code != 0 {
            for r in &runs {
                eprintln!(
                    "round {round} {} -> {}\n{}\n{}",
                    r.what, r.code, r.stdout, r.stderr
                );
            }
        }
        bv.verify_ok();
        for (disk, data) in &expected {
            restore_eq(&bv, disk, &[], data);
        }
    }
    eprintln!(
        "{ROUNDS} rounds: {rotated} rotations, {revoked} revokes, {refused_backups} backups refused"
    );
    assert!(rotated > 0, "no rotation ever won its race");
    // Every snapshot ever committed restores.
    for snap in bv.snapshots() {
        let target = bv.path("every.img");
        bv.restore(
            &format!("{}@{}", text(&snap, "disk"), text(&snap, "id")),
            &target,
            &["--force"],
        )
        .ok();
    }
}

#[test]
fn importing_a_keystore_missing_a_version_in_use_is_refused() {
    let mut bv = Bv::new();
    bv.env
        .push(("BLOCKVAULT_EXPORT_PASSPHRASE".into(), PASS.into()));
    let (img, a1) = image(&bv, "d1.img", 61, MIB as usize);
    bv.backup(&img, "d1", &[]);
    let old = bv.path("old.export");
    bv.run(&["key", "export", s(&old)]).ok();
    bv.run(&["key", "rotate"]).ok();
    let before = fs::read(bv.key_file()).unwrap();
    refused(
        &bv,
        &["key", "import", "--force", s(&old)],
        1,
        &["platform KEK version 2 is not in this keystore"],
    );
    assert_eq!(
        fs::read(bv.key_file()).unwrap(),
        before,
        "the key file changed"
    );
    restore_eq(&bv, "d1", &[], &a1);
}

// ---------------------------------------------------------------------------------------------
// 9. Local files: keystore modes, shared folders, links
// ---------------------------------------------------------------------------------------------

#[test]
fn keystore_files_others_can_read_are_refused() {
    let bv = Bv::new();
    let (img, a1) = image(&bv, "d1.img", 62, MIB as usize);
    bv.backup(&img, "d1", &[]);
    let file = bv.key_file();
    for bad in [0o644, 0o640, 0o604, 0o660] {
        fs::set_permissions(&file, fs::Permissions::from_mode(bad)).unwrap();
        refused(
            &bv,
            &["snapshots"],
            1,
            &[
                s(&file),
                &format!("is not private to this user (mode {bad:04o}"),
            ],
        );
        restore_refused(&bv, "d1", &[], 1, &[s(&file)]);
        assert_eq!(mode(&file), bad, "blockvault changed the key file's mode");
    }
    fs::set_permissions(&file, fs::Permissions::from_mode(0o600)).unwrap();
    restore_eq(&bv, "d1", &[], &a1);
}

#[test]
fn a_shared_keystore_folder_gets_a_private_subfolder_and_keeps_its_mode() {
    let mut bv = Bv::new();
    let shared = bv.path("shared");
    fs::create_dir(&shared).unwrap();
    for m in [0o1777, 0o755] {
        fs::set_permissions(&shared, fs::Permissions::from_mode(m)).unwrap();
        bv.keystore = shared.clone();
        bv.vault = bv.path(&format!("vault-{m:o}"));
        let (img, a1) = image(&bv, "d1.img", u64::from(m), MIB as usize);
        bv.run(&["init"])
            .ok()
            .stdout_has(&[&format!("{}/blockvault/", s(&shared))]);
        bv.backup(&img, "d1", &[]);
        restore_eq(&bv, "d1", &[], &a1);
        assert_eq!(mode(&shared), m, "the folder the user named was changed");
        assert_eq!(mode(&shared.join("blockvault")), 0o700);
        let keys: Vec<String> = tree(&shared)
            .into_keys()
            .filter(|k| k.ends_with(".keys"))
            .collect();
        assert!(
            keys.iter().all(|k| k.starts_with("blockvault/")),
            "a key file outside the private subfolder: {keys:?}"
        );
    }
}

#[test]
fn the_local_store_follows_no_link_planted_in_the_vault() {
    let bv = Bv::new();
    let (img, a1) = image(&bv, "d1.img", 63, 2 * MIB as usize);
    bv.backup(&img, "d1", &[]);
    let outside = bv.path("outside");
    fs::create_dir(&outside).unwrap();

    // A disk's snapshot folder made a link to another folder: before, the next backup wrote
    // its manifest there and exited 0.
    let snaps = bv.objects("snapshots")[0].parent().unwrap().to_path_buf();
    let real = bv.path("snapshots-real");
    fs::rename(&snaps, &real).unwrap();
    for e in fs::read_dir(&real).unwrap() {
        let e = e.unwrap();
        fs::copy(e.path(), outside.join(e.file_name())).unwrap();
    }
    symlink(&outside, &snaps).unwrap();
    let before = tree(&outside);
    let (_, a2) = image(&bv, "d1.img", 64, 2 * MIB as usize);
    let link = bv.key_of(&snaps);
    let named = [link.as_str(), "is a symbolic link"];
    refused(
        &bv,
        &["backup", s(&bv.path("d1.img")), "--disk", "d1"],
        INTEGRITY,
        &named,
    );
    restore_refused(&bv, "d1", &[], INTEGRITY, &named);
    assert!(
        before == tree(&outside),
        "the backup wrote through the link"
    );
    fs::remove_file(&snaps).unwrap();
    fs::rename(&real, &snaps).unwrap();

    // A pack replaced by a link to a file outside the vault.
    let pack = bv.objects("packs")[0].clone();
    let moved = outside.join("pack");
    fs::rename(&pack, &moved).unwrap();
    symlink(&moved, &pack).unwrap();
    let key = bv.key_of(&pack);
    let named = [key.as_str(), "is a symbolic link"];
    restore_refused(&bv, "d1", &[], INTEGRITY, &named);
    let r = bv.run(&["verify", "--read-data"]);
    r.code(INTEGRITY);
    assert!(
        format!("{}{}", r.stdout, r.stderr).contains(&key),
        "{}\n{}",
        r.stdout,
        r.stderr
    );
    fs::remove_file(&pack).unwrap();
    fs::rename(&moved, &pack).unwrap();
    restore_eq(&bv, "d1", &[], &a1);
    bv.backup(&bv.path("d1.img"), "d1", &[]);
    restore_eq(&bv, "d1", &[], &a2);
}

#[test]
fn with_escrow_follows_no_planted_link_and_refuses_two_names_for_one_file() {
    let bv = Bv::new();
    let (img, a1) = image(&bv, "d1.img", 65, MIB as usize);
    bv.backup(&img, "d1", &[]);
    let secret = bv.path("secret");
    fs::write(&secret, "luks passphrase 1").unwrap();
    bv.run(&[
        "key",
        "escrow",
        "d1",
        "--name",
        "luks-root",
        "--secret-file",
        s(&secret),
    ])
    .ok();

    // A link planted in the output folder, pointing at a file the attacker wants written.
    let out = bv.path("escrow-out");
    fs::create_dir(&out).unwrap();
    let victim = bv.path("victim");
    fs::write(&victim, "untouched").unwrap();
    symlink(&victim, out.join("luks-root")).unwrap();
    let target = bv.path("restored.img");
    bv.restore("d1", &target, &["--with-escrow", s(&out)])
        .code(2)
        .stderr_has(&[s(&out.join("luks-root")), "is a symbolic link"]);
    assert_eq!(fs::read_to_string(&victim).unwrap(), "untouched");
    fs::remove_file(out.join("luks-root")).unwrap();
    bv.restore("d1", &target, &["--force", "--with-escrow", s(&out)])
        .ok();
    assert_eq!(
        fs::read_to_string(out.join("luks-root")).unwrap(),
        "luks passphrase 1"
    );
    common::assert_file_eq(&target, &a1);

    // Two names that map to one file: refused before anything is written.
    fs::write(&secret, "luks passphrase 2").unwrap();
    bv.run(&[
        "key",
        "escrow",
        "d1",
        "--name",
        "luks root",
        "--secret-file",
        s(&secret),
    ])
    .ok();
    fs::write(&secret, "luks passphrase 3").unwrap();
    bv.run(&[
        "key",
        "escrow",
        "d1",
        "--name",
        "luks_root",
        "--secret-file",
        s(&secret),
    ])
    .ok();
    let fresh = bv.path("escrow-fresh");
    bv.restore("d1", &target, &["--force", "--with-escrow", s(&fresh)])
        .code(1)
        .stderr_has(&[
            "\"luks root\" and \"luks_root\"",
            "luks_root",
            "nothing was written",
        ]);
    assert!(!fresh.exists(), "escrow files were written");
}
