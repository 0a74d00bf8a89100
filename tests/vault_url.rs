//! Which `--vault` URLs the binary accepts, and that only `init` and `backup --init` create
//! a vault: a URL of an unknown scheme or a remote spec is refused by every command with a
//! message listing what is accepted, and creates nothing; a path, `./name:x`, an absolute
//! path with a colon and `file://PATH` are local folders; `backup` into a location without a vault fails naming the URL and
//! both ways to create one, and creates nothing; `backup --init` creates a platform-key vault
//! (saying where its key is) and is an ordinary backup once the vault exists.

mod common;

use std::ffi::OsStr;
use std::path::Path;

use common::*;

/// The binary run in `cwd` with `--vault url` and the keystore of `bv`. Not through
/// [`Bv::run`], which runs `init` before a first backup.
fn with_vault(bv: &Bv, cwd: &Path, url: &str, args: &[&str]) -> Run {
    let mut c = bv.command_for(OsStr::new(url), &bv.keystore);
    let out = c
        .current_dir(cwd)
        .args(args)
        .output()
        .expect("run blockvault");
    Run::from_output(format!("blockvault --vault {url} {}", args.join(" ")), out)
}

/// Every name in `dir`, sorted.
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn unknown_schemes_and_remote_specs_are_refused_and_create_nothing() {
    let bv = Bv::new();
    let cwd = bv.path("cwd");
    std::fs::create_dir(&cwd).unwrap();
    let img = bv.path("img");
    write_file(&img, &random_data(1, MIB as usize));
    let img = img.to_str().unwrap();
    for url in [
        "sftp://host/x",
        "azure://container/x",
        "ssh://host/x",
        "gs://bucket/x",
        "http://host/x",
        "https://host/x",
        "b2:bucket",
        "sftp:host:/x",
        "rclone:remote",
        "host:/srv/vault",
    ] {
        for args in [
            vec!["init"],
            vec!["backup", "--init", img, "--disk", "d"],
            vec!["backup", img, "--disk", "d"],
            vec!["snapshots"],
        ] {
            with_vault(&bv, &cwd, url, &args).code(2).stderr_has(&[
                &format!("vault URL {url}"),
                "file://PATH",
                "s3://BUCKET/PREFIX",
                "az://CONTAINER/PREFIX",
                "./NAME",
            ]);
        }
        assert_eq!(names(&cwd), Vec::<String>::new(), "{url} created something");
        assert!(!bv.keystore.exists(), "{url} made a key");
    }
}

#[test]
fn paths_with_colons_and_file_urls_are_local_folders() {
    let bv = Bv::new();
    let cwd = bv.path("cwd");
    std::fs::create_dir(&cwd).unwrap();
    let data = random_data(2, MIB as usize + 7);
    let img = bv.path("img");
    write_file(&img, &data);
    let img = img.to_str().unwrap();
    let absolute = bv.path("abs:vault");
    let file_url = format!("file://{}", bv.path("by-url").display());
    for (url, folder) in [
        ("./b2:bucket", cwd.join("b2:bucket")),
        (absolute.to_str().unwrap(), absolute.clone()),
        (file_url.as_str(), bv.path("by-url")),
        ("relative", cwd.join("relative")),
    ] {
        with_vault(&bv, &cwd, url, &["init"]).ok();
        assert!(
            folder.join("config").is_file(),
            "{url}: no vault at {folder:?}"
        );
        with_vault(&bv, &cwd, url, &["backup", img, "--disk", "d"]).ok();
        let out = bv.path("out");
        with_vault(&bv, &cwd, url, &["restore", "d", out.to_str().unwrap()]).ok();
        assert_file_eq(&out, &data);
        std::fs::remove_file(&out).unwrap();
    }
}

#[test]
fn backup_without_a_vault_fails_and_creates_nothing() {
    let bv = Bv::new();
    let img = bv.path("img");
    write_file(&img, &random_data(3, MIB as usize));
    let vault = bv.vault.to_str().unwrap();
    for json in [false, true] {
        let mut args = vec!["backup", img.to_str().unwrap(), "--disk", "d"];
        if json {
            args.insert(0, "--json");
        }
        let r = with_vault(&bv, bv.dir.path(), vault, &args);
        r.code(1).stderr_has(&[
            &format!("no vault at {vault}"),
            "blockvault init",
            "blockvault backup --init",
        ]);
        if json {
            assert_eq!(r.json()["kind"], "NotFound", "{}", r.stdout);
        }
        assert!(!bv.vault.exists(), "a failed backup created {}", vault);
        assert!(!bv.keystore.exists(), "a failed backup made a key");
    }
}

#[test]
fn backup_init_creates_a_platform_key_vault_once() {
    let bv = Bv::new();
    let img = bv.path("img");
    let first = random_data(4, 2 * MIB as usize);
    write_file(&img, &first);
    let img_s = img.to_str().unwrap();
    let r = bv.run(&["backup", "--init", img_s, "--disk", "d"]);
    r.ok();
    let key = bv.key_file();
    r.stdout_has(&[
        &format!("created vault at {}", bv.vault.display()),
        key.to_str().unwrap(),
        "blockvault key export",
    ]);
    let show = bv.json(&["key", "show"]);
    assert!(show.to_string().contains("platform"), "{show}");

    // Once the vault exists, --init is an ordinary backup: same key, no new vault.
    let second = random_data(5, 2 * MIB as usize);
    write_file(&img, &second);
    let doc = bv.json(&["backup", "--init", img_s, "--disk", "d"]);
    assert_eq!(doc["vault_created"], false, "{doc}");
    assert_eq!(text(&doc, "keystore"), key.to_str().unwrap());
    assert_eq!(bv.key_file(), key);
    assert_eq!(bv.snapshots().len(), 2);
    bv.restore_and_compare(&format!("d@{}", text(&doc, "short_id")), &second);

    // A vault `init` made is used as is by `backup --init` too.
    let other = Bv::new();
    other.json(&["init"]);
    let key = other.key_file();
    let doc = other.json(&["backup", "--init", img_s, "--disk", "d"]);
    assert_eq!(doc["vault_created"], false, "{doc}");
    assert_eq!(other.key_file(), key);
}

#[test]
fn a_failed_first_backup_still_says_where_the_new_vaults_key_is() {
    let bv = Bv::new();
    let img = bv.path("img");
    write_file(&img, &random_data(6, MIB as usize));
    // An unknown parent fails once the vault was created.
    let r = bv.run(&[
        "backup",
        "--init",
        img.to_str().unwrap(),
        "--disk",
        "d",
        "--parent",
        "0123456789abcdef",
    ]);
    r.code(1);
    let key = bv.key_file();
    r.stderr_has(&[
        &format!("created vault at {}", bv.vault.display()),
        key.to_str().unwrap(),
        "but its first backup failed",
        "0123456789abcdef",
    ]);
}
