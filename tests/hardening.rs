//! Key-handling hardening from the security review of 2026-12-06, through the real binary:
//! - PKCS#11 enrolment refuses a private key that can leave its token (CKA_SENSITIVE false,
//!   CKA_EXTRACTABLE true) or be used without a PIN (CKA_PRIVATE false), unless
//!   `--allow-extractable-key`, which enrols it with a warning;
//! - RSA-OAEP with SHA-1 only on an explicit `--oaep sha1`;
//! - a PKCS#11 module path stored in the vault is never loaded (a shared object planted in
//!   the vault folder, whose constructor writes a marker file, never runs), and relative module
//!   paths are refused wherever they come from;
//! - keystore exports are sealed under Argon2id with a passphrase of 12 characters or more,
//!   old PBKDF2 exports still import, and a crafted export cannot make import allocate or
//!   work without bound;
//! - every command is not dumpable (seen from outside, in /proc, while a command holds keys);
//! - a pack index moved onto another pack of the same disk and generation is named by
//!   `verify --read-data`.
//!
//! Keys are made by the real tools: `pkcs11-tool --keypairgen` (defaults, and `--extractable`)
//! in SoftHSM2 tokens; the attribute combinations pkcs11-tool 0.23 cannot make with SoftHSM
//! 2.6 (it always sets CKA_SENSITIVE and CKA_PRIVATE) are generated inside the token through
//! the PKCS#11 API (`cryptoki`, the binary's own library). SoftHSM reads `SOFTHSM2_CONF` once
//! per process, so this binary's tokens share one folder, made before any test runs a command;
//! each test uses a token of its own and never changes one. A missing tool prints `SKIP` and
//! passes, except under `CI=true`.

mod common;

use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use blockvault::crypto::kek::{KekId, KekKind};
use blockvault::crypto::rsa::CmkKey;
use blockvault::crypto::Keystore;
use blockvault::vault::head::{self, Head};
use blockvault::vault::kekdesc;
use common::keys::{fixture_dir, pem_keys, softhsm, SoftHsm, SOFTHSM_MODULE};
use common::secrets::tree;
use common::tools::run_tool;
use common::{assert_file_eq, random_data, text, write_file, Bv, Run, MIB};
use serde_json::Value;

/// A path as an argument.
fn s(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

/// The user PIN of every token made here.
const PIN: &str = "1234";

// ---------------------------------------------------------------------------------------------
// SoftHSM tokens (one folder for the whole binary, see the module docs)
// ---------------------------------------------------------------------------------------------

/// Tokens of this binary. `acc`: keys with each containment attribute right or wrong (`def`
/// id 01, pkcs11-tool defaults; `ext` id 02, `--extractable`; `nonsens` id 03, CKA_SENSITIVE
/// false; `public` id 04, CKA_PRIVATE false). `oaep` and `mod`: one default key `cmk` each.
fn tokens(test: &str) -> Option<&'static SoftHsm> {
    if !softhsm(test) {
        return None;
    }
    static T: OnceLock<SoftHsm> = OnceLock::new();
    Some(T.get_or_init(|| {
        let hsm = SoftHsm::new(fixture_dir("hardening-hsm"));
        for label in ["acc", "oaep", "mod"] {
            hsm.init_token(label);
        }
        hsm.keypair("acc", "def", "01");
        hsm.p11(
            "acc",
            &[
                "--keypairgen",
                "--key-type",
                "rsa:3072",
                "--label",
                "ext",
                "--id",
                "02",
                "--extractable",
            ],
        );
        hsm.keypair("oaep", "cmk", "01");
        hsm.keypair("mod", "cmk", "01");
        // Before any PKCS#11 call of this process; the binary gets it through `Bv::env`.
        std::env::set_var("SOFTHSM2_CONF", &hsm.conf);
        generate_in_token("acc", "nonsens", 3, false, true);
        generate_in_token("acc", "public", 4, true, false);
        hsm
    }))
}

/// Generate a 3072-bit RSA key pair `label` with id `id` inside token `token` through the
/// PKCS#11 API, with the private key's CKA_SENSITIVE and CKA_PRIVATE as given (CKA_EXTRACTABLE
/// false). The module is finalised again when the context drops.
fn generate_in_token(token: &str, label: &str, id: u8, sensitive: bool, private: bool) {
    use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
    use cryptoki::mechanism::Mechanism;
    use cryptoki::object::Attribute;
    use cryptoki::session::UserType;
    use cryptoki::types::RawAuthPin;

    let ctx = Pkcs11::new(SOFTHSM_MODULE).expect("load SoftHSM");
    ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .expect("C_Initialize");
    let slot = ctx
        .get_slots_with_token()
        .expect("slots")
        .into_iter()
        .find(|s| {
            ctx.get_token_info(*s)
                .expect("token info")
                .label()
                .trim_end()
                == token
        })
        .unwrap_or_else(|| panic!("token {token}"));
    let session = ctx.open_rw_session(slot).expect("session");
    session
        .login_with_raw(UserType::User, &RawAuthPin::new(Box::new(PIN.into())))
        .expect("login");
    let named = |mut t: Vec<Attribute>| {
        t.extend([
            Attribute::Token(true),
            Attribute::Label(label.into()),
            Attribute::Id(vec![id]),
        ]);
        t
    };
    let public = named(vec![
        Attribute::Encrypt(true),
        Attribute::ModulusBits(3072u64.into()),
        Attribute::PublicExponent(vec![1, 0, 1]),
    ]);
    let private = named(vec![
        Attribute::Decrypt(true),
        Attribute::Sensitive(sensitive),
        Attribute::Private(private),
        Attribute::Extractable(false),
    ]);
    session
        .generate_key_pair(&Mechanism::RsaPkcsKeyPairGen, &public, &private)
        .unwrap_or_else(|e| panic!("generating {label} in {token}: {e}"));
}

/// A vault whose commands find the tokens and the PIN.
fn hsm_bv(hsm: &SoftHsm) -> Bv {
    let mut bv = Bv::new();
    bv.env.push(("SOFTHSM2_CONF".into(), s(&hsm.conf).into()));
    bv.env.push(("BLOCKVAULT_PKCS11_PIN".into(), PIN.into()));
    bv
}

/// `key show --json`: the `keks` entries.
fn keks(bv: &Bv) -> Vec<Value> {
    bv.json(&["key", "show"])["keks"]
        .as_array()
        .expect("keks")
        .clone()
}

/// Restore `d1` (newest) to a fresh file and compare with `expected`.
fn restore_eq(bv: &Bv, expected: &[u8]) {
    let target = bv.path(&format!("restored-{}", common::unique()));
    bv.restore("d1", &target, &[]).ok();
    assert_file_eq(&target, expected);
    fs::remove_file(&target).unwrap();
}

// ---------------------------------------------------------------------------------------------
// 1. PKCS#11 keys must stay in the token
// ---------------------------------------------------------------------------------------------

#[test]
fn hsm_keys_that_can_leave_the_token_are_refused_unless_allowed() {
    const T: &str = "hsm_keys_that_can_leave_the_token_are_refused_unless_allowed";
    let Some(hsm) = tokens(T) else {
        return;
    };
    let uri = |label: &str| format!("pkcs11:token=acc;object={label}");
    // Each wrong attribute is refused, naming it and the way out; nothing is created.
    for (label, attribute) in [
        ("ext", "CKA_EXTRACTABLE = true"),
        ("nonsens", "CKA_SENSITIVE = false"),
        ("public", "CKA_PRIVATE = false"),
    ] {
        let bv = hsm_bv(hsm);
        let r = bv.run(&["init", "--cmk", &uri(label), "--oaep", "sha1"]);
        r.code(1).stderr_has(&[
            &format!("object={label} on token 'acc' does not stay in the token"),
            attribute,
            "--allow-extractable-key",
        ]);
        assert!(
            tree(&bv.vault).is_empty(),
            "{label}: a refused init wrote the vault"
        );
        assert!(
            tree(&bv.keystore).is_empty(),
            "{label}: a refused init wrote keys"
        );
    }
    // pkcs11-tool's defaults (sensitive, never extractable, private) enrol without a word.
    let bv = hsm_bv(hsm);
    let r = bv.run(&["--json", "init", "--cmk", &uri("def"), "--oaep", "sha1"]);
    r.ok();
    assert!(!r.stderr.contains("warning"), "{}", r.stderr);
    let (img, a1) = (bv.path("d1.img"), random_data(1, MIB as usize));
    write_file(&img, &a1);
    bv.backup(&img, "d1", &[]);

    // Rotation to an extractable key: refused the same way, the vault untouched.
    let before = (tree(&bv.vault), tree(&bv.keystore));
    bv.run(&["key", "rotate", "--new-cmk", &uri("ext"), "--oaep", "sha1"])
        .code(1)
        .stderr_has(&["CKA_EXTRACTABLE = true", "--allow-extractable-key"]);
    assert_eq!((tree(&bv.vault), tree(&bv.keystore)), before);
    // Allowed: enrolled with a loud warning, and it works.
    let r = bv.run(&[
        "key",
        "rotate",
        "--new-cmk",
        &uri("ext"),
        "--oaep",
        "sha1",
        "--allow-extractable-key",
    ]);
    r.ok().stderr_has(&[
        "warning: the private key object=ext on token 'acc' does not stay in the token",
        "CKA_EXTRACTABLE = true",
        "whoever gets the key out of the token can unwrap every DEK",
    ]);
    // The rotation finished: the old key's descriptor left the head.
    let ids: Vec<String> = keks(&bv).iter().map(|k| text(k, "id")).collect();
    assert_eq!(ids, ["cmk-pkcs11-v2"]);
    restore_eq(&bv, &a1);
    let a2 = random_data(2, MIB as usize);
    write_file(&img, &a2);
    bv.backup(&img, "d1", &[]);
    restore_eq(&bv, &a2);

    // At init too, each wrong attribute is named in the warning.
    let bv = hsm_bv(hsm);
    bv.run(&[
        "init",
        "--cmk",
        &uri("nonsens"),
        "--oaep",
        "sha1",
        "--allow-extractable-key",
    ])
    .ok()
    .stderr_has(&["warning:", "CKA_SENSITIVE = false", "read out in the clear"]);
    // The options are for PKCS#11 keys: with a PEM key they are refused as the mistake they are.
    let Some(k) = pem_keys(T) else {
        return;
    };
    let pem = k.spec("a");
    for extra in [["--oaep", "sha1"].as_slice(), &["--allow-extractable-key"]] {
        let bv = Bv::new();
        let mut args = vec!["init", "--cmk", &pem];
        args.extend_from_slice(extra);
        bv.run(&args)
            .code(2)
            .stderr_has(&[extra[0], "applies to PKCS#11 keys only"]);
        assert!(tree(&bv.vault).is_empty());
    }
}

// ---------------------------------------------------------------------------------------------
// 2. No automatic SHA-1
// ---------------------------------------------------------------------------------------------

#[test]
fn hsm_sha1_oaep_only_when_asked() {
    const T: &str = "hsm_sha1_oaep_only_when_asked";
    let Some(hsm) = tokens(T) else {
        return;
    };
    let Some(k) = pem_keys(T) else {
        return;
    };
    let cmk = "pkcs11:token=oaep;object=cmk";
    let bv = hsm_bv(hsm);
    let r = bv.run(&[
        "--json",
        "init",
        "--cmk",
        cmk,
        "--recovery-key",
        &k.spec("r"),
    ]);
    if r.code == 0 {
        // A token that decrypts RSA-OAEP with SHA-256 (a newer SoftHSM) is enrolled with it.
        assert_eq!(text(&keks(&bv)[0], "oaep"), "RSA-OAEP-256");
    } else {
        // Debian 12's SoftHSM 2.6.1 refuses SHA-256: no silent SHA-1, but a way out, explained.
        r.code(1).stderr_has(&[
            "object=cmk: the token refuses RSA-OAEP with SHA-256",
            "enrol with --oaep sha1",
            "does not rest on SHA-1's collision resistance",
        ]);
        assert!(tree(&bv.vault).is_empty(), "a refused init wrote the vault");
        bv.json(&[
            "init",
            "--cmk",
            cmk,
            "--oaep",
            "sha1",
            "--recovery-key",
            &k.spec("r"),
        ]);
        // SHA-1 only for the key it was asked for: the recovery key stays SHA-256.
        let oaep: Vec<(String, String)> = keks(&bv)
            .iter()
            .map(|k| (text(k, "id"), text(k, "oaep")))
            .collect();
        assert_eq!(
            oaep,
            [
                ("cmk-pkcs11-v1".into(), "RSA-OAEP (SHA-1)".into()),
                ("recovery-v1".into(), "RSA-OAEP-256".into())
            ]
        );
        let (img, a1) = (bv.path("d1.img"), random_data(3, MIB as usize));
        write_file(&img, &a1);
        bv.backup(&img, "d1", &[]);
        restore_eq(&bv, &a1);
    }
    // PEM keys: always SHA-256.
    let bv = Bv::new();
    bv.json(&["init", "--cmk", &k.spec("a"), "--oaep", "sha256"]);
    assert_eq!(text(&keks(&bv)[0], "oaep"), "RSA-OAEP-256");
}

// ---------------------------------------------------------------------------------------------
// 3. The PKCS#11 module never comes from vault data
// ---------------------------------------------------------------------------------------------

/// A shared object whose constructor appends a line to `marker` when it is loaded, compiled
/// by the C compiler into `dir/evil.so`; `None` after a SKIP line when there is no compiler.
fn planted_module(test: &str, dir: &Path, marker: &Path) -> Option<PathBuf> {
    let cc = Command::new("cc").arg("--version").output();
    if !cc.is_ok_and(|o| o.status.success()) {
        common::skip(test, "no C compiler (apt-get install gcc)");
        return None;
    }
    let src = dir.join("evil.c");
    fs::write(
        &src,
        "#include <fcntl.h>\n#include <unistd.h>\n\
         __attribute__((constructor)) static void planted(void) {\n\
         int fd = open(MARKER, O_WRONLY | O_CREAT | O_APPEND, 0644);\n\
         if (fd >= 0) { write(fd, \"loaded\\n\", 7); close(fd); }\n}\n",
    )
    .unwrap();
    let so = dir.join("evil.so");
    run_tool(
        Command::new("cc")
            .args(["-shared", "-fPIC", "-o", s(&so), s(&src)])
            .arg(format!("-DMARKER=\"{}\"", s(marker))),
        "",
    );
    Some(so)
}

#[test]
fn a_module_path_from_the_vault_is_never_loaded() {
    const T: &str = "a_module_path_from_the_vault_is_never_loaded";
    let Some(hsm) = tokens(T) else {
        return;
    };
    let bv = hsm_bv(hsm);
    let marker = bv.path("PWNED");
    let Some(built) = planted_module(T, bv.dir.path(), &marker) else {
        return;
    };
    let never_loaded = |when: &str| assert!(!marker.exists(), "evil.so was loaded {when}");

    // A relative module path is refused wherever it comes from.
    let cmk = "pkcs11:token=mod;object=cmk";
    bv.run(&[
        "init",
        "--cmk",
        &format!("{cmk}?module-path=evil.so"),
        "--oaep",
        "sha1",
    ])
    .code(2)
    .stderr_has(&["PKCS#11 module evil.so (the URI's module-path) is a relative path"]);
    bv.run(&[
        "--pkcs11-module",
        "lib/evil.so",
        "init",
        "--cmk",
        cmk,
        "--oaep",
        "sha1",
    ])
    .code(2)
    .stderr_has(&["lib/evil.so (--pkcs11-module) is a relative path"]);
    let mut c = bv.command();
    c.env("BLOCKVAULT_PKCS11_MODULE", "evil.so");
    bv.run_cmd(c, &["init", "--cmk", cmk, "--oaep", "sha1"])
        .code(2)
        .stderr_has(&["evil.so (BLOCKVAULT_PKCS11_MODULE) is a relative path"]);
    assert!(tree(&bv.vault).is_empty());

    // The URI typed at enrolment may name the module (absolute); it is not stored.
    let init = bv.json(&[
        "init",
        "--cmk",
        &format!("{cmk}?module-path={SOFTHSM_MODULE}"),
        "--oaep",
        "sha1",
    ]);
    assert_eq!(text(&keks(&bv)[0], "source"), cmk);
    let (img, a1) = (bv.path("d1.img"), random_data(4, 2 * MIB as usize));
    write_file(&img, &a1);
    bv.backup(&img, "d1", &[]);

    // The storage holder plants evil.so in the vault folder and a descriptor naming it.
    let evil = bv.vault.join("evil.so");
    fs::copy(&built, &evil).unwrap();
    let desc_key = kekdesc::object_key(KekId {
        kind: KekKind::CustomerPkcs11,
        version: 1,
    });
    let desc_path = bv.vault.join(&desc_key);
    let stored = fs::read(&desc_path).unwrap();
    let key = kekdesc::decode(&stored, &desc_key).unwrap();
    let planted_uri = format!("{cmk}?module-path={}", s(&evil));
    let planted = CmkKey::from_spki(
        KekKind::CustomerPkcs11,
        1,
        key.oaep(),
        key.public_spki(),
        planted_uri.clone(),
    )
    .unwrap();

    // a) Without the keystore it cannot list the descriptor in the vault head: every command
    //    refuses it.
    fs::write(&desc_path, planted.encode()).unwrap();
    let target = bv.path("refused.img");
    for r in [
        bv.run(&["backup", s(&img), "--disk", "d1"]),
        bv.restore("d1", &target, &[]),
        bv.run(&["verify", "--read-data"]),
        bv.run(&["key", "show"]),
    ] {
        r.failed()
            .stderr_has(&["cmk-pkcs11-00000001", "does not match the digest"]);
        never_loaded(&r.what);
    }

    // b) Listed in the head, as an older build stored such a URI or as `key recover` adopted a
    //    planted one before it checked anything (review C1): the module path is ignored,
    //    SoftHSM is found among the known modules, and every command works.
    let vault_id: [u8; 16] = hex::decode(text(&init, "vault_id"))
        .unwrap()
        .try_into()
        .unwrap();
    let keys = Keystore::new(&bv.keystore).load(&vault_id).unwrap();
    let head_path = bv.vault.join(head::KEY);
    let raw = fs::read(&head_path).unwrap();
    let auth = keys.auth(Head::peek(&raw).unwrap().1).unwrap();
    let mut h = Head::decode(&raw, auth).unwrap();
    let planted_bytes = kekdesc::encode(&planted);
    for d in h.descriptors.iter_mut().filter(|d| d.id == planted.id()) {
        d.digest = head::digest(&planted_bytes);
    }
    h.epoch += 1;
    fs::write(&head_path, h.encode(auth)).unwrap();
    fs::write(&desc_path, &planted_bytes).unwrap();
    assert_eq!(text(&keks(&bv)[0], "source"), planted_uri);
    let a2 = random_data(5, 2 * MIB as usize);
    write_file(&img, &a2);
    bv.backup(&img, "d1", &[]);
    never_loaded("by backup");
    restore_eq(&bv, &a2);
    never_loaded("by restore");
    assert_eq!(bv.json(&["verify", "--read-data"])["ok"], true);
    never_loaded("by verify --read-data");

    // The marker works: a module the operator names is loaded (and then fails as no module).
    for how in ["option", "environment"] {
        fs::remove_file(&marker).ok();
        let mut c = bv.command();
        let mut args = vec!["backup", s(&img), "--disk", "d1"];
        if how == "option" {
            args.splice(0..0, ["--pkcs11-module", s(&evil)]);
        } else {
            c.env("BLOCKVAULT_PKCS11_MODULE", &evil);
        }
        bv.run_cmd(c, &args)
            .code(1)
            .stderr_has(&[&format!("PKCS#11 module {} cannot be loaded", s(&evil))]);
        assert_eq!(fs::read_to_string(&marker).unwrap(), "loaded\n", "{how}");
    }
}

// ---------------------------------------------------------------------------------------------
// 4. Export passphrases: Argon2id, and a minimum length
// ---------------------------------------------------------------------------------------------

/// A version 1 export (PBKDF2-HMAC-SHA256, 600 000 iterations) of `keystore_file`, as the
/// previous build wrote it, made here from FORMAT.md's layout with `ring`.
fn pbkdf2_export(keystore_file: &[u8], vault_id: &[u8; 16], pass: &[u8]) -> Vec<u8> {
    use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
    let salt = [0x5a; 16];
    let mut header = b"BVKE\x01\x00\x00\x00".to_vec();
    header.extend_from_slice(vault_id);
    header.extend_from_slice(&600_000u32.to_le_bytes());
    header.extend_from_slice(&salt);
    let mut key = [0u8; 32];
    let iterations = std::num::NonZeroU32::new(600_000).unwrap();
    ring::pbkdf2::derive(
        ring::pbkdf2::PBKDF2_HMAC_SHA256,
        iterations,
        &salt,
        pass,
        &mut key,
    );
    let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &key).unwrap());
    let nonce = [0x3c; 12];
    let mut sealed = keystore_file.to_vec();
    key.seal_in_place_append_tag(
        Nonce::assume_unique_for_key(nonce),
        Aad::from(&header),
        &mut sealed,
    )
    .unwrap();
    [header, nonce.to_vec(), sealed].concat()
}

#[test]
fn exports_use_argon2id_and_old_pbkdf2_exports_still_import() {
    let bv = Bv::new();
    let init = bv.json(&["init"]);
    let (img, a1) = (bv.path("d1.img"), random_data(6, MIB as usize));
    write_file(&img, &a1);
    bv.backup(&img, "d1", &[]);
    let (short, pass) = (bv.path("short"), bv.path("pass"));
    fs::write(&short, "eleven char\n").unwrap();
    fs::write(&pass, "twelve chars\n").unwrap();

    // Too short: refused, saying how long, and no file is written.
    let out = bv.path("keys.export");
    bv.run(&["key", "export", s(&out), "--passphrase-file", s(&short)])
        .code(2)
        .stderr_has(&["the passphrase has 11 characters", "at least 12"]);
    assert!(!out.exists());

    // Version 2, Argon2id with the costs recorded: 256 MiB, 3 passes, 1 lane.
    bv.json(&["key", "export", s(&out), "--passphrase-file", s(&pass)]);
    let file = fs::read(&out).unwrap();
    let u32_at = |at: usize| u32::from_le_bytes(file[at..at + 4].try_into().unwrap());
    assert_eq!(&file[..8], b"BVKE\x02\x00\x00\x00");
    assert_eq!(hex::encode(&file[8..24]), text(&init, "vault_id"));
    assert_eq!((u32_at(24), u32_at(28), u32_at(32)), (256 * 1024, 3, 1));

    // A crafted file cannot make import allocate 4 TiB nor run for long: refused before any
    // derivation, naming the field (exit 3, a damaged file), and nothing imported.
    let empty = bv.path("empty-keystore");
    for (at, v, says) in [
        (24, u32::MAX, "Argon2id memory (KiB) 4294967295"),
        (28, 1_000_000, "Argon2id passes 1000000"),
    ] {
        let mut bomb = file.clone();
        bomb[at..at + 4].copy_from_slice(&v.to_le_bytes());
        let path = bv.path(&format!("bomb-{at}"));
        fs::write(&path, &bomb).unwrap();
        let c = bv.command_with_keystore(&empty);
        bv.run_cmd(
            c,
            &["key", "import", s(&path), "--passphrase-file", s(&pass)],
        )
        .code(3)
        .stderr_has(&[says]);
    }
    assert!(tree(&empty).is_empty(), "a refused import wrote keys");

    // A version 2 export and a version 1 export (an older build's) each restore the vault
    // into an empty keystore.
    let keystore_file = fs::read(bv.key_file()).unwrap();
    let vault_id: [u8; 16] = file[8..24].try_into().unwrap();
    let v1 = bv.path("keys.v1.export");
    fs::write(&v1, pbkdf2_export(&keystore_file, &vault_id, b"old")).unwrap();
    fs::write(bv.path("old"), "old\n").unwrap();
    for (export, pass) in [(&out, &pass), (&v1, &bv.path("old"))] {
        let keystore = bv.path(&format!("keystore-{}", common::unique()));
        let c = bv.command_with_keystore(&keystore);
        bv.run_cmd(
            c,
            &["key", "import", s(export), "--passphrase-file", s(pass)],
        )
        .ok();
        let target = bv.path(&format!("restored-{}", common::unique()));
        let c = bv.command_with_keystore(&keystore);
        bv.run_cmd(c, &["restore", "d1", s(&target)]).ok();
        assert_file_eq(&target, &a1);
    }
}

// ---------------------------------------------------------------------------------------------
// 5. Core dumps
// ---------------------------------------------------------------------------------------------

/// The unprivileged user commands run as here.
const NOBODY: u32 = 65534;

/// Owner of `/proc/<pid>/status` and the real uid its `Uid:` line shows. proc(5): the files
/// of a process whose "dumpable" attribute is not 1 are owned by root, whoever runs it.
fn proc_owner_and_uid(pid: u32) -> Option<(u32, u32)> {
    let path = format!("/proc/{pid}/status");
    let owner = fs::metadata(&path).ok()?.uid();
    let status = fs::read_to_string(&path).ok()?;
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some((owner, uid))
}

/// `cmd` as uid/gid [`NOBODY`] (util-linux `setpriv`), output piped.
fn as_nobody(cmd: &Path) -> Command {
    let mut c = Command::new("setpriv");
    c.args([
        format!("--reuid={NOBODY}"),
        format!("--regid={NOBODY}"),
        "--clear-groups".into(),
    ])
    .arg(cmd)
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .stdin(Stdio::null());
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("BLOCKVAULT_") {
            c.env_remove(k);
        }
    }
    c
}

#[test]
fn commands_holding_keys_are_not_dumpable() {
    const T: &str = "commands_holding_keys_are_not_dumpable";
    if !common::is_root() {
        common::skip(T, "needs root to run the binary as another user (setpriv)");
        return;
    }
    let bv = Bv::new();
    bv.json(&["init"]);
    // The binary, vault and keystore, owned by an unprivileged user who runs `key export`:
    // root's /proc files are root's anyway, so only another user shows the attribute.
    let bin = bv.path("blockvault");
    fs::copy(common::bin(), &bin).unwrap();
    let fifo = bv.path("pass.fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
    for p in walkdir(bv.dir.path()) {
        std::os::unix::fs::chown(&p, Some(NOBODY), Some(NOBODY)).unwrap();
    }
    let out = bv.path("keys.export");
    let mut c = as_nobody(&bin);
    c.args(["--vault", s(&bv.vault), "--keystore", s(&bv.keystore)])
        .args(["key", "export", s(&out), "--passphrase-file", s(&fifo)]);
    let mut child = c.spawn().unwrap();
    // `key export` loads the keystore, then opens the passphrase FIFO: once a writer's open
    // succeeds, the command holds the vault's keys and waits for the passphrase.
    let mut writer = loop {
        match fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&fifo)
        {
            Ok(w) => break w,
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => {
                if let Some(status) = child.try_wait().unwrap() {
                    let r = Run::wait(child, format!("key export ({status})"));
                    panic!("key export ended before reading its passphrase: {r:?}");
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            Err(e) => panic!("opening {}: {e}", fifo.display()),
        }
    };
    let seen = proc_owner_and_uid(child.id()).expect("/proc of the running command");
    writer.write_all(b"a long export passphrase\n").unwrap();
    drop(writer);
    let r = Run::wait(child, "key export (as nobody)".into());
    r.ok();
    assert!(out.exists());
    assert_eq!(seen, (0, NOBODY), "(owner, uid) of /proc/<pid>/status");

    // Control: a process of the same user that does not turn dumpability off shows its own
    // uid as the owner, so the root owner above is the command's doing.
    let mut sleeper = as_nobody(Path::new("/bin/sleep"))
        .arg("600")
        .spawn()
        .unwrap();
    // Wait for `sleep` itself: between setpriv's setuid and its exec the process is setpriv
    // with the new uid, not dumpable (a credential change resets the attribute) and so owned
    // by root; exec of `sleep` makes it dumpable again.
    let control = loop {
        let name = fs::read_to_string(format!("/proc/{}/comm", sleeper.id())).unwrap_or_default();
        match proc_owner_and_uid(sleeper.id()) {
            Some((owner, uid)) if uid == NOBODY && name.trim() == "sleep" => break owner,
            _ => std::thread::sleep(std::time::Duration::from_millis(10)),
        }
    };
    sleeper.kill().unwrap();
    sleeper.wait().unwrap();
    assert_eq!(control, NOBODY);
}

/// Every file and folder under `dir`.
fn walkdir(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![dir.to_path_buf()];
    for e in fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            out.extend(walkdir(&p));
        } else {
            out.push(p);
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// 6. The pack index bound to its pack
// ---------------------------------------------------------------------------------------------

/// The index offset a pack's footer gives.
fn index_offset(pack: &[u8]) -> usize {
    let footer = &pack[pack.len() - 16..];
    u64::from_le_bytes(footer[..8].try_into().unwrap()) as usize
}

#[test]
fn a_pack_index_moved_onto_another_pack_is_named_by_verify() {
    let bv = Bv::new();
    // Two backups of one 1 MiB slot of random bytes: two packs of one disk and generation,
    // each one incompressible frame of the same length, so one footer fits both.
    let img = bv.path("d1.img");
    write_file(&img, &random_data(7, MIB as usize));
    bv.backup(&img, "d1", &[]);
    let first = bv.objects("packs");
    write_file(&img, &random_data(8, MIB as usize));
    bv.backup(&img, "d1", &[]);
    let second: Vec<PathBuf> = bv
        .objects("packs")
        .into_iter()
        .filter(|p| !first.contains(p))
        .collect();
    let (a_path, b_path) = (&first[0], &second[0]);
    let (a, b) = (fs::read(a_path).unwrap(), fs::read(b_path).unwrap());
    assert_eq!((a.len(), index_offset(&a)), (b.len(), index_offset(&b)));
    bv.verify_ok();

    // b's header and frames, a's index and footer.
    let at = index_offset(&b);
    fs::write(b_path, [&b[..at], &a[at..]].concat()).unwrap();
    let r = bv.verify(true);
    r.code(3);
    let doc = r.json();
    let b_key = bv.key_of(b_path);
    let problems: Vec<&Value> = doc["problems"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["object"] == b_key.as_str())
        .collect();
    assert!(
        problems.iter().any(|p| {
            let t = text(p, "problem");
            t.contains(&format!(
                "pack index: {b_key}: index: authentication failed"
            ))
        }),
        "verify should name the moved index of {b_key}: {doc}"
    );
    assert!(
        doc["problems"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["object"] == b_key.as_str()),
        "only the changed pack is damaged: {doc}"
    );
}
