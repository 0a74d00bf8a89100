//! Key material that must never be stored unwrapped, and the scans that look for it: the
//! secrets of a keystore file (layout: docs/FORMAT.md §3.6), the private exponent and primes
//! of PEM private keys (as `openssl rsa -text` prints them) and the DEKs of a vault (unwrapped
//! through the library, as the binary would).
//!
//! Shared by `tests/keys.rs` (every command once, outputs and logs included) and
//! `tests/kill_keys.rs` (after every SIGKILL, temp files left behind included).

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use blockvault::crypto::keyring::KeyAccess;
use blockvault::crypto::rsa::PrivateKeyFile;
use blockvault::crypto::Keystore;
use blockvault::vault::keyrecord::KeyRecord;
use blockvault::vault::Vault;

use super::tools::run_tool;
use super::Bv;

/// Files by relative path, with their bytes.
pub type Tree = BTreeMap<String, Vec<u8>>;

/// Every file under `dir` (hidden ones too: temp files of interrupted writes).
pub fn tree(dir: &Path) -> Tree {
    fn walk(root: &Path, dir: &Path, out: &mut Tree) {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        for e in rd {
            let p = e.expect("dir entry").path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
                out.insert(rel, std::fs::read(&p).expect("read"));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// Whether `needle` occurs in `hay`.
pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// The raw secrets of a keystore file (docs/FORMAT.md §3.6), parsed here from the documented
/// layout rather than through the library: every auth key version, every platform KEK
/// version's key and both halves of every infrastructure key version. Versions 1 and 2 (one
/// auth key, at most one infrastructure key) are what a format 1 vault's keystore holds.
pub fn keystore_secrets(file: &[u8]) -> Vec<(String, Vec<u8>)> {
    assert_eq!(&file[..4], b"BVKS", "a keystore file");
    let le16 = |at: usize| u16::from_le_bytes([file[at], file[at + 1]]) as usize;
    let le32 = |at: usize| u32::from_le_bytes(file[at..at + 4].try_into().unwrap());
    let version = le16(4);
    let mut out = Vec::new();
    let infra = |out: &mut Vec<(String, Vec<u8>)>, v: u32, key: &[u8]| {
        out.push((format!("infrastructure key v{v} K1"), key[..32].to_vec()));
        out.push((format!("infrastructure key v{v} K2"), key[32..64].to_vec()));
    };
    if version < 3 {
        let n = le16(56);
        out.push(("auth key v1".to_string(), file[24..56].to_vec()));
        for i in 0..n {
            let e = 58 + 48 * i;
            out.push((
                format!("platform KEK v{}", le32(e)),
                file[e + 16..e + 48].to_vec(),
            ));
        }
        let at = 58 + 48 * n;
        if version == 2 {
            assert_eq!(file.len(), 158 + 48 * n, "a version 2 keystore file");
            if file[at] == 1 {
                infra(&mut out, 1, &file[at + 4..at + 68]);
            }
        } else {
            assert_eq!(file.len(), 90 + 48 * n, "a version 1 keystore file");
        }
        return out;
    }
    assert_eq!(version, 3, "keystore format version");
    let mut at = 24;
    for _ in 0..le16(at) {
        let e = at + 2;
        out.push((
            format!("auth key v{}", le32(e)),
            file[e + 12..e + 44].to_vec(),
        ));
        at += 44;
    }
    at += 2;
    for _ in 0..le16(at) {
        let e = at + 2;
        out.push((
            format!("platform KEK v{}", le32(e)),
            file[e + 16..e + 48].to_vec(),
        ));
        at += 48;
    }
    at += 2;
    for _ in 0..le16(at) {
        let e = at + 2;
        infra(&mut out, le32(e), &file[e + 12..e + 76]);
        at += 76;
    }
    at += 2;
    let destroyed = le16(at);
    assert_eq!(
        file.len(),
        at + 2 + 5 * destroyed + 32,
        "a version 3 keystore file's length follows its entry counts"
    );
    out
}

/// The first 32 bytes of the private exponent and of both primes of a PEM private key, as
/// `openssl rsa -text` prints them, and its whole PKCS#8 DER: what must never be stored.
pub fn private_components(key: &str) -> Vec<(String, Vec<u8>)> {
    let out = run_tool(
        Command::new("openssl").args(["rsa", "-in", key, "-noout", "-text"]),
        "",
    );
    let text = String::from_utf8(out).expect("openssl prints text");
    let mut found = Vec::new();
    for field in ["privateExponent", "prime1", "prime2"] {
        let hexdigits: String = text
            .lines()
            .skip_while(|l| *l != format!("{field}:"))
            .skip(1)
            .take_while(|l| l.starts_with(' '))
            .flat_map(|l| l.trim().split(':'))
            .collect();
        let bytes = hex::decode(&hexdigits).expect("hex from openssl");
        let start = bytes.iter().position(|b| *b != 0).expect("non-zero");
        assert!(bytes.len() - start >= 32, "{field} of {key} too short");
        found.push((
            format!("{field} of {key}"),
            bytes[start..start + 32].to_vec(),
        ));
    }
    let der = run_tool(
        Command::new("openssl").args(["pkey", "-in", key, "-outform", "DER"]),
        "",
    );
    found.push((format!("PKCS#8 DER of {key}"), der));
    found
}

/// The DEK of every key record of `bv`'s vault, unwrapped through the library with the
/// customer key's private half `cmk_private` if the vault has one.
pub fn deks(bv: &Bv, cmk_private: Option<&Path>) -> Vec<(String, Vec<u8>)> {
    let access = KeyAccess {
        cmk_private: cmk_private.map(|p| PrivateKeyFile {
            path: p.to_path_buf(),
            passphrase: None,
        }),
        ..KeyAccess::default()
    };
    let url = bv.vault.to_str().expect("UTF-8 path");
    let vault = Vault::open_with(url, &Keystore::new(&bv.keystore), &access)
        .unwrap_or_else(|e| panic!("opening {url} to read its DEKs: {e}"));
    // Every key record the head lists (format 2: `keys/<disk id>/<gen>-<rev>`), unwrapped; and
    // every other record stored under `keys/` (a killed rotation's leftover the head never
    // listed) whose KEK this keystore still holds: one whose KEK version was destroyed cannot
    // be unwrapped by anyone, so it holds no DEK to find.
    let listed: Vec<(String, Vec<u8>)> = vault
        .key_records()
        .expect("reading the key records the head lists")
        .into_iter()
        .map(|r| {
            let dek = r
                .record
                .unwrap(vault.keyring())
                .unwrap_or_else(|e| panic!("unwrapping {}: {e}", r.key));
            (format!("DEK of {}", r.key), dek.expose().to_vec())
        })
        .collect();
    let store = vault.store();
    let leftovers: Vec<(String, Vec<u8>)> = store
        .list("keys")
        .expect("listing key records")
        .into_iter()
        .filter(|key| {
            !listed
                .iter()
                .any(|(what, _)| what == &format!("DEK of {key}"))
        })
        .filter_map(|key| {
            let disk: [u8; 16] = hex::decode(key.split('/').nth(1).expect("keys/<disk>/..."))
                .ok()
                .and_then(|d| d.try_into().ok())
                .unwrap_or_else(|| panic!("{key}: not a disk id"));
            let bytes = store.get(&key).expect("reading a key record");
            let record = KeyRecord::decode(&bytes, &key, &vault.config().vault_id, &disk)
                .unwrap_or_else(|e| panic!("decoding {key}: {e}"));
            let dek = record.unwrap(vault.keyring()).ok()?;
            Some((format!("DEK of {key} (not listed)"), dek.expose().to_vec()))
        })
        .collect();
    listed.into_iter().chain(leftovers).collect()
}

/// The first of `needles` found in any of `files`: `(needle's name, file)`. Needles of 32
/// bytes (every key here) are looked up together, window by window, so that a scan of a
/// vault for hundreds of DEKs reads each file once.
pub fn find_any<'a>(
    files: impl IntoIterator<Item = (&'a String, &'a Vec<u8>)> + Clone,
    needles: &'a [(String, Vec<u8>)],
) -> Option<(&'a str, &'a str)> {
    let keys: HashMap<&[u8], &str> = needles
        .iter()
        .filter(|(_, n)| n.len() == 32)
        .map(|(what, n)| (n.as_slice(), what.as_str()))
        .collect();
    for (file, bytes) in files.clone() {
        if let Some(what) = bytes.windows(32).find_map(|w| keys.get(w)) {
            return Some((what, file));
        }
    }
    for (what, needle) in needles.iter().filter(|(_, n)| n.len() != 32) {
        if let Some((file, _)) = files.clone().into_iter().find(|(_, b)| contains(b, needle)) {
            return Some((what, file));
        }
    }
    None
}

/// Nothing of `bv` holds key material in the clear where it must not: every secret of a
/// keystore file appears in the keystore folder only (its file, or a temp copy an interrupted
/// save left), never in a vault file; every file of the keystore folder is mode 0600; no DEK
/// (`cmk_private` opens a customer-key vault) and none of `also` (say the
/// [`private_components`] of the PEM keys in use) appears in any file of the vault or the
/// keystore folder. Hidden temp files are included.
pub fn assert_no_key_material(bv: &Bv, cmk_private: Option<&Path>, also: &[(String, Vec<u8>)]) {
    let vault = tree(&bv.vault);
    let keystore = tree(&bv.keystore);
    let mut platform = Vec::new();
    for (name, bytes) in &keystore {
        let mode = std::fs::metadata(bv.keystore.join(name))
            .expect("stat keystore file")
            .permissions()
            .mode();
        assert_eq!(
            mode & 0o777,
            0o600,
            "keystore file {name} has mode {mode:o}"
        );
        if name.ends_with(".keys") {
            platform.extend(
                keystore_secrets(bytes)
                    .into_iter()
                    .map(|(what, key)| (format!("{what} of {name}"), key)),
            );
        }
    }
    if let Some((what, file)) = find_any(&vault, &platform) {
        panic!("{what} appears in vault file {file}");
    }
    let mut forbidden = deks(bv, cmk_private);
    forbidden.extend_from_slice(also);
    if let Some((what, file)) = find_any(vault.iter().chain(&keystore), &forbidden) {
        panic!("{what} appears in {file}");
    }
}
