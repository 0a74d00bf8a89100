//! Helpers of the storage-holder attack tests (`tests/trust*.rs`): what an attacker holding
//! the vault folder does to it (copy it away and put it back, plant or swap objects), and the
//! authenticated vault head read through the library, to compare its figures with the objects
//! actually stored.

use std::path::{Path, PathBuf};
use std::process::Command;

use blockvault::crypto::Keystore;
use blockvault::vault::head::{self, Head};

use super::tools::run_tool;
use super::{assert_file_eq, random_data, write_file, Bv, Run};

/// Exit code of an integrity problem found (docs/TESTING.md).
pub const INTEGRITY: i32 = 3;

/// A path as an argument.
pub fn s(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

/// An image `name` of `len` random bytes from `seed`, in the scratch folder.
pub fn image(bv: &Bv, name: &str, seed: u64, len: usize) -> (PathBuf, Vec<u8>) {
    let data = random_data(seed, len);
    let path = bv.path(name);
    write_file(&path, &data);
    (path, data)
}

/// Restore `spec` (with `extra` options) to a fresh file and compare it with `expected`.
pub fn restore_eq(bv: &Bv, spec: &str, extra: &[&str], expected: &[u8]) {
    let target = bv.path(&format!("restored-{}", super::unique()));
    bv.restore(spec, &target, extra).ok();
    assert_file_eq(&target, expected);
    std::fs::remove_file(&target).expect("remove restored file");
}

/// Restore `spec` must exit `code` with every one of `needles` on stderr, leaving no target.
pub fn restore_refused(bv: &Bv, spec: &str, extra: &[&str], code: i32, needles: &[&str]) {
    let target = bv.path(&format!("refused-{}", super::unique()));
    bv.restore(spec, &target, extra)
        .code(code)
        .stderr_has(needles);
    assert!(
        !target.exists(),
        "a refused restore left {}",
        target.display()
    );
}

/// `cp -a FROM TO`: the storage holder's copy of a whole folder (modes and times kept).
pub fn copy_tree(from: &Path, to: &Path) {
    run_tool(Command::new("cp").arg("-a").arg(from).arg(to), "");
}

/// Replace the folder `dir` (if there is one) by the copy `saved` (taken by [`copy_tree`]).
pub fn put_back(saved: &Path, dir: &Path) {
    if dir.exists() {
        std::fs::remove_dir_all(dir).unwrap_or_else(|e| panic!("removing {}: {e}", dir.display()));
    }
    copy_tree(saved, dir);
}

/// The vault id of `bv`'s vault, from the name of its (only) key file.
pub fn vault_id(bv: &Bv) -> [u8; 16] {
    vault_id_in(&bv.key_file())
}

/// The vault id named by a key file `<hex id>.keys`.
pub fn vault_id_in(key_file: &Path) -> [u8; 16] {
    let stem = key_file.file_stem().expect("key file name");
    hex::decode(stem.to_string_lossy().as_bytes())
        .expect("hex vault id")
        .try_into()
        .expect("16-byte vault id")
}

/// The vault head of `bv`, authenticated with the auth key of `keystore` (a folder).
pub fn head_with(bv: &Bv, keystore: &Path) -> Head {
    let raw = std::fs::read(bv.vault.join(head::KEY)).expect("read the head");
    let id = vault_id(bv);
    let keys = Keystore::new(keystore)
        .load(&id)
        .expect("load the keystore");
    let (_, version) = Head::peek(&raw).expect("a head");
    let auth = keys.auth(version).expect("the head's auth key version");
    Head::decode(&raw, auth).expect("the head authenticates")
}

/// The vault head of `bv`, authenticated with its own keystore.
pub fn head_of(bv: &Bv) -> Head {
    head_with(bv, &bv.keystore)
}

/// The single object under `prefix` of the vault.
pub fn only(bv: &Bv, prefix: &str) -> PathBuf {
    let found = bv.objects(prefix);
    assert_eq!(found.len(), 1, "one object under {prefix}: {found:?}");
    found.into_iter().next().expect("one")
}

/// Run the binary with `bv`'s vault and keystore and `args` as they are: unlike [`Bv::run`], a
/// `backup` into a folder without a vault is not preceded by `init`.
pub fn run_as_is(bv: &Bv, args: &[&str]) -> Run {
    let out = bv.command().args(args).output().expect("run the binary");
    Run::from_output(format!("blockvault {}", args.join(" ")), out)
}

/// Run `bv` with `args` (strings) and assert it fails with `code` naming every one of
/// `needles`.
pub fn refused(bv: &Bv, args: &[&str], code: i32, needles: &[&str]) {
    bv.run(args).code(code).stderr_has(needles);
}
