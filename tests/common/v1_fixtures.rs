//! The format 1 vaults committed under tests/fixtures/upgrade/ (made by blockvault 7ac70c3;
//! tests/fixtures/README.md): the recipe each was made by, the generator of its disks'
//! content, the snapshots it holds, and private copies to work on. Used by `tests/upgrade.rs`
//! and the `upgrade` kill loop of `tests/kill_keys.rs`.

use std::path::{Path, PathBuf};

use super::{read_file, Bv};

/// The committed fixtures.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/upgrade")
}

/// One fixture vault: the disks it backs up and the commands of the old release that made it.
pub struct Fixture {
    /// Its folder under tests/fixtures/upgrade/.
    pub name: &'static str,
    /// Disk names and sizes in MiB.
    pub disks: &'static [(&'static str, usize)],
    /// Arguments of each command, run in the fixture's folder after
    /// `--vault vault --keystore keystore --json`. A backup's source `DISK-vN.img` is
    /// [`image`]`(DISK, size, N)`; an escrow's `--secret-file escrow-DISK-NAME` holds
    /// [`escrow_secret`]`(DISK, NAME)`.
    pub steps: &'static [&'static [&'static str]],
    /// The private key that opens the vault after the steps (a file of `keys/`).
    pub cmk_private: Option<&'static str>,
}

/// Platform keys and a recovery key, two disks, escrow under two DEK generations, two
/// rotations, version 1 revoked, an export.
pub const PLATFORM: Fixture = Fixture {
    name: "platform",
    disks: &[("sys", 3), ("data", 2)],
    steps: &[
        &["init", "--recovery-key", "rsa:keys/r.pub"],
        &[
            "backup",
            "sys-v0.img",
            "--disk",
            "sys",
            "--slot-size",
            "64K",
        ],
        &["backup", "data-v0.img", "--disk", "data"],
        &["backup", "sys-v1.img", "--disk", "sys"],
        &[
            "key",
            "escrow",
            "sys",
            "--name",
            "luks-root",
            "--secret-file",
            "escrow-sys-luks-root",
        ],
        &["backup", "data-v1.img", "--disk", "data"],
        &["key", "rotate"],
        &["backup", "sys-v2.img", "--disk", "sys"],
        &["key", "rotate", "--new-dek"],
        &["backup", "sys-v3.img", "--disk", "sys"],
        &["backup", "data-v2.img", "--disk", "data"],
        &[
            "key",
            "escrow",
            "data",
            "--name",
            "bitlocker-D",
            "--secret-file",
            "escrow-data-bitlocker-D",
        ],
        &["key", "revoke", "--version", "1"],
    ],
    cmk_private: None,
};

/// A PEM customer key rotated from `a` to `b`, a recovery key, the infrastructure layer.
pub const CMK: Fixture = Fixture {
    name: "cmk",
    disks: &[("vm", 2)],
    steps: &[
        &[
            "init",
            "--cmk",
            "rsa:keys/a.pub",
            "--recovery-key",
            "rsa:keys/r.pub",
            "--infrastructure-encryption",
        ],
        &[
            "backup",
            "vm-v0.img",
            "--disk",
            "vm",
            "--slot-size",
            "64K",
            "--cmk-private",
            "keys/a.key",
        ],
        &[
            "backup",
            "vm-v1.img",
            "--disk",
            "vm",
            "--cmk-private",
            "keys/a.key",
        ],
        &[
            "key",
            "escrow",
            "vm",
            "--name",
            "bitlocker-C",
            "--secret-file",
            "escrow-vm-bitlocker-C",
            "--cmk-private",
            "keys/a.key",
        ],
        &[
            "backup",
            "vm-v2.img",
            "--disk",
            "vm",
            "--cmk-private",
            "keys/a.key",
        ],
        &[
            "key",
            "rotate",
            "--new-cmk",
            "rsa:keys/b.pub",
            "--cmk-private",
            "keys/a.key",
        ],
        &[
            "backup",
            "vm-v3.img",
            "--disk",
            "vm",
            "--cmk-private",
            "keys/b.key",
        ],
    ],
    cmk_private: Some("b.key"),
};

/// `len` bytes of the BLAKE3 XOF of `label` under the fixtures' derive-key context.
pub fn xof(label: &str, len: usize) -> Vec<u8> {
    let mut out = vec![0; len];
    blake3::Hasher::new_derive_key("blockvault upgrade fixture 2026-12-07")
        .update(label.as_bytes())
        .finalize_xof()
        .fill(&mut out);
    out
}

/// The content of disk `disk` of `mib` MiB at version `version`, as tests/fixtures/README.md
/// describes it. Version 0: 64 KiB chunk `i` is zeros when `i % 8` is 0 or 4, random
/// (`xof("DISK chunk i")`) when it is 1, and text lines `"DISK chunk i line j\n"` otherwise.
/// Version `k` ≥ 1 is version `k − 1` with three 4 KiB blocks `(37k + 101j) mod blocks`
/// (j = 0, 1, 2) replaced by `xof("DISK vk block j")`, and 64 KiB chunk `3k mod chunks` by
/// `xof("DISK vk chunk")`.
pub fn image(disk: &str, mib: usize, version: u32) -> Vec<u8> {
    const CHUNK: usize = 64 << 10;
    const BLOCK: usize = 4 << 10;
    let len = mib << 20;
    let mut data = vec![0u8; len];
    for (i, chunk) in data.chunks_mut(CHUNK).enumerate() {
        match i % 8 {
            0 | 4 => {}
            1 => chunk.copy_from_slice(&xof(&format!("{disk} chunk {i}"), CHUNK)),
            _ => {
                let text: Vec<u8> = (0..)
                    .flat_map(|j| format!("{disk} chunk {i} line {j}\n").into_bytes())
                    .take(CHUNK)
                    .collect();
                chunk.copy_from_slice(&text);
            }
        }
    }
    for k in 1..=version as usize {
        for j in 0..3 {
            let b = (37 * k + 101 * j) % (len / BLOCK);
            data[b * BLOCK..(b + 1) * BLOCK]
                .copy_from_slice(&xof(&format!("{disk} v{k} block {j}"), BLOCK));
        }
        let c = (3 * k) % (len / CHUNK);
        data[c * CHUNK..(c + 1) * CHUNK]
            .copy_from_slice(&xof(&format!("{disk} v{k} chunk"), CHUNK));
    }
    data
}

/// The secret escrowed as `name` for `disk`.
pub fn escrow_secret(disk: &str, name: &str) -> Vec<u8> {
    format!("escrowed secret of {disk}/{name}\n").into_bytes()
}

/// The escrow records a fixture's steps made: (disk, name).
pub fn escrows(f: &Fixture) -> Vec<(String, String)> {
    f.steps
        .iter()
        .filter(|s| s[..2] == ["key", "escrow"])
        .map(|s| (s[2].to_string(), s[4].to_string()))
        .collect()
}

/// The size in MiB of `disk` of `f`.
pub fn disk_mib(f: &Fixture, disk: &str) -> usize {
    f.disks
        .iter()
        .find(|(d, _)| *d == disk)
        .map(|(_, m)| *m)
        .expect("a disk of the fixture")
}

/// One snapshot a fixture holds, from its `snapshots` file.
pub struct Snap {
    /// The disk's name.
    pub disk: String,
    /// The version of [`image`] it holds.
    pub version: u32,
    /// The snapshot id (hex).
    pub id: String,
    /// Its content.
    pub data: Vec<u8>,
}

/// The snapshots of fixture `f`, oldest first, each with its content made again by [`image`]
/// and checked against the BLAKE3 recorded when the fixture was made.
pub fn snaps(f: &Fixture) -> Vec<Snap> {
    let list = std::fs::read_to_string(fixtures().join(f.name).join("snapshots"))
        .expect("the fixture's snapshots file");
    list.lines()
        .map(|line| {
            let w: Vec<&str> = line.split_whitespace().collect();
            let [disk, version, id, hash] = w[..] else {
                panic!("snapshots line {line:?}: DISK VERSION ID BLAKE3");
            };
            let version: u32 = version.parse().expect("a version");
            let data = image(disk, disk_mib(f, disk), version);
            assert_eq!(
                blake3::hash(&data).to_hex().as_str(),
                hash,
                "the generator no longer makes {disk} version {version} as the fixture recorded"
            );
            Snap {
                disk: disk.into(),
                version,
                id: id.into(),
                data,
            }
        })
        .collect()
}

/// A copy of fixture `f` (vault, keystore, and the test keys under `keys/`), private as the
/// keystore must be, with the customer key's private half in the environment.
pub fn copy(f: &Fixture) -> Bv {
    let mut bv = Bv::new();
    let from = fixtures();
    copy_tree(&from.join(f.name).join("vault"), &bv.vault, 0o644);
    copy_tree(&from.join(f.name).join("keystore"), &bv.keystore, 0o600);
    copy_tree(&from.join("keys"), &bv.path("keys"), 0o600);
    if let Some(key) = f.cmk_private {
        bv.env.push((
            "BLOCKVAULT_CMK_PRIVATE".into(),
            bv.path("keys").join(key).display().to_string(),
        ));
    }
    bv
}

/// Copy the folder `from` to `to` (created 0700), every file with `mode`.
pub fn copy_tree(from: &Path, to: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(to).expect("create folder");
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    for e in std::fs::read_dir(from).unwrap_or_else(|e| panic!("{}: {e}", from.display())) {
        let p = e.expect("entry").path();
        let dest = to.join(p.file_name().expect("a name"));
        if p.is_dir() {
            copy_tree(&p, &dest, mode);
        } else {
            std::fs::copy(&p, &dest).expect("copy");
            std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(mode)).expect("chmod");
        }
    }
}

/// The format version the vault's config names.
pub fn format_version(bv: &Bv) -> u16 {
    let c = read_file(&bv.vault.join("config"));
    u16::from_le_bytes([c[4], c[5]])
}
