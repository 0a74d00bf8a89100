//! Fixtures shared by the fuzz targets: fixed vault/disk ids, fixed keys derived the way the
//! vault derives them, and seed writing.
//!
//! Seeds: when `BLOCKVAULT_FUZZ_SEED_DIR` is set, a target's `init` block writes a few valid
//! objects (sealed with the fixed keys below) into that folder before libFuzzer reads its
//! corpus, so the fuzzer starts past magics, ids and authentication tags. `tools/fuzz.sh`
//! points it at `fuzz/corpus/<target>`.

use std::sync::{Arc, OnceLock};

use blockvault::crypto::kek::{KekKind, KekState, PlatformKek, PlatformKeyVersion};
use blockvault::crypto::keyring::Keyring;
use blockvault::crypto::{GenerationKeys, IdentityKeys, Secret32};
use blockvault::vault::frame::Binding;
use blockvault::{Error, ErrorKind, Result};

pub use libfuzzer_sys::arbitrary::{self, Unstructured};

/// The vault every fixture belongs to.
pub const VAULT_ID: [u8; 16] = *b"fuzz-vault-id-01";
/// The disk every fixture belongs to.
pub const DISK_ID: [u8; 16] = *b"fuzz-disk-id-002";
/// Another vault/disk id, for "wrong binding" checks.
pub const OTHER_ID: [u8; 16] = *b"fuzz-other-id-03";
/// The DEKs of generations 0 and 1 (generation 2 and up have no key: a `Key` error).
pub const DEKS: [[u8; 32]; 2] = [[0x42; 32], [0x43; 32]];
/// The vault's config-authentication key.
pub const AUTH_KEY: [u8; 32] = [0xa5; 32];
/// Platform KEK version 1.
pub const KEK_KEY: [u8; 32] = [0x5a; 32];

/// The fixed binding (vault and disk).
pub fn binding() -> Binding {
    Binding {
        vault_id: VAULT_ID,
        disk_id: DISK_ID,
    }
}

/// A binding to another disk of the same vault.
pub fn other_binding() -> Binding {
    Binding {
        vault_id: VAULT_ID,
        disk_id: OTHER_ID,
    }
}

/// The fixed DEK of a generation (0 or 1).
pub fn dek(generation: u32) -> Secret32 {
    Secret32::from_bytes(DEKS[generation as usize])
}

/// Keys of generations 0 and 1, derived once.
fn all_generation_keys() -> &'static [Arc<GenerationKeys>; 2] {
    static K: OnceLock<[Arc<GenerationKeys>; 2]> = OnceLock::new();
    K.get_or_init(|| {
        [
            Arc::new(GenerationKeys::derive(&dek(0))),
            Arc::new(GenerationKeys::derive(&dek(1))),
        ]
    })
}

/// What `Disk::generation` does: keys of a known generation, else a `Key` error.
pub fn generation_keys(generation: u32) -> Result<Arc<GenerationKeys>> {
    all_generation_keys()
        .get(generation as usize)
        .cloned()
        .ok_or_else(|| {
            Error::new(
                ErrorKind::Key,
                format!("no key record for DEK generation {generation}"),
            )
        })
}

/// Identity keys derived from the generation-0 DEK.
pub fn identity() -> &'static IdentityKeys {
    static K: OnceLock<IdentityKeys> = OnceLock::new();
    K.get_or_init(|| IdentityKeys::derive(&dek(0)))
}

/// The config-authentication key.
pub fn auth() -> Secret32 {
    Secret32::from_bytes(AUTH_KEY)
}

/// A platform KEK holding version 1 (enabled) and version 2 (revoked).
pub fn platform_kek() -> &'static PlatformKek {
    static K: OnceLock<PlatformKek> = OnceLock::new();
    K.get_or_init(|| {
        PlatformKek::new(vec![
            PlatformKeyVersion {
                version: 2,
                state: KekState::Revoked,
                created: 0,
                key: Secret32::from_bytes([0x77; 32]),
            },
            PlatformKeyVersion {
                version: 1,
                state: KekState::Enabled,
                created: 0,
                key: Secret32::from_bytes(KEK_KEY),
            },
        ])
    })
}

/// A platform KEK whose newest version (1) is enabled: what `KeyRecord::create` wraps with.
pub fn wrapping_kek() -> &'static Keyring {
    static K: OnceLock<Keyring> = OnceLock::new();
    K.get_or_init(|| {
        let platform = PlatformKek::new(vec![PlatformKeyVersion {
            version: 1,
            state: KekState::Enabled,
            created: 0,
            key: Secret32::from_bytes(KEK_KEY),
        }]);
        Keyring::new(KekKind::Platform, Box::new(platform), None)
    })
}

/// The key that authenticates the fuzz vault's key records.
pub fn record_mac() -> Secret32 {
    blockvault::vault::keyrecord::mac_key(&Secret32::from_bytes([0x42; 32]))
}

/// Write seeds into `$BLOCKVAULT_FUZZ_SEED_DIR` (if set) as `seed-NN`, overwriting.
pub fn write_seeds(seeds: impl FnOnce() -> Vec<Vec<u8>>) {
    let Some(dir) = std::env::var_os("BLOCKVAULT_FUZZ_SEED_DIR") else {
        return;
    };
    let dir = std::path::PathBuf::from(dir);
    std::fs::create_dir_all(&dir).expect("creating the seed folder");
    for (i, s) in seeds().iter().enumerate() {
        std::fs::write(dir.join(format!("seed-{i:02}")), s).expect("writing a seed");
    }
}

/// A string of at most `max` bytes from the fuzz input.
pub fn short_string(u: &mut Unstructured, max: usize) -> arbitrary::Result<String> {
    let s: &str = u.arbitrary()?;
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    Ok(s[..end].to_string())
}

/// At most `max` bytes from the fuzz input.
pub fn short_bytes<'a>(u: &mut Unstructured<'a>, max: usize) -> arbitrary::Result<&'a [u8]> {
    let n = u.int_in_range(0..=max)?;
    u.bytes(n.min(u.len()))
}

/// Whether `BLOCKVAULT_FUZZ_STRICT` is set: targets then also assert canonical encodings
/// (decode then encode gives back the same bytes), which is a format-hygiene property, not
/// a safety one, so it is off in the default runs.
pub fn strict() -> bool {
    static S: OnceLock<bool> = OnceLock::new();
    *S.get_or_init(|| std::env::var_os("BLOCKVAULT_FUZZ_STRICT").is_some())
}

/// With `BLOCKVAULT_FUZZ_OUTCOMES` set, print what a decoder returned (its error message with
/// digits blanked, or "ok") on stderr, so that replaying a corpus (`-runs=0`) shows which
/// checks the fuzzer reaches: `... 2>&1 | grep '^outcome' | sort | uniq -c`.
pub fn outcome<T>(label: &str, r: &Result<T>) {
    static ON: OnceLock<bool> = OnceLock::new();
    if !*ON.get_or_init(|| std::env::var_os("BLOCKVAULT_FUZZ_OUTCOMES").is_some()) {
        return;
    }
    let msg = match r {
        Ok(_) => "ok".to_string(),
        Err(e) => e
            .to_string()
            .chars()
            .map(|c| if c.is_ascii_digit() { '#' } else { c })
            .collect(),
    };
    eprintln!("outcome {label}: {msg}");
}

/// A folder of this process for files a target must write (`$BLOCKVAULT_FUZZ_TMP` if set,
/// else /dev/shm when there is one, so fsyncs cost nothing, else the system temp folder),
/// named after the target. Made once per process.
pub fn scratch_dir(target: &str) -> &'static std::path::PathBuf {
    static D: OnceLock<std::path::PathBuf> = OnceLock::new();
    D.get_or_init(|| {
        let base = std::env::var_os("BLOCKVAULT_FUZZ_TMP")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| {
                let shm = std::path::PathBuf::from("/dev/shm");
                if shm.is_dir() {
                    shm
                } else {
                    std::env::temp_dir()
                }
            });
        let d = base.join(format!("blockvault-fuzz-{target}-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("creating the fuzz scratch folder");
        d
    })
}

/// A recovery key pair for the targets of objects wrapped to one (`anchor`,
/// `infra_recovery`): its descriptor, the private half as a `--recovery-private` file, and the
/// private half of another key (the wrong one). Generated once per process (RSA-3072).
pub struct RecoveryKeys {
    /// The public half, as the vault stores it.
    pub key: blockvault::crypto::rsa::CmkKey,
    /// The private half's PEM file.
    pub private: blockvault::crypto::rsa::PrivateKeyFile,
    /// Another key's private half.
    pub wrong: blockvault::crypto::rsa::PrivateKeyFile,
}

/// The process's [`RecoveryKeys`], their files in [`scratch_dir`]`(target)`.
pub fn recovery_keys(target: &str) -> &'static RecoveryKeys {
    use aws_lc_rs::encoding::AsDer;
    use aws_lc_rs::rsa::{KeySize, PrivateDecryptingKey};
    use base64ct::Encoding;
    static K: OnceLock<RecoveryKeys> = OnceLock::new();
    K.get_or_init(|| {
        let file = |name: &str| {
            let key = PrivateDecryptingKey::generate(KeySize::Rsa3072).expect("RSA key");
            let der = key.as_der().expect("PKCS#8");
            let b64 = base64ct::Base64::encode_string(der.as_ref());
            let mut text = String::from("-----BEGIN PRIVATE KEY-----\n");
            for line in b64.as_bytes().chunks(64) {
                text += std::str::from_utf8(line).expect("base64 is ASCII");
                text.push('\n');
            }
            text += "-----END PRIVATE KEY-----\n";
            let path = scratch_dir(target).join(name);
            std::fs::write(&path, text).expect("writing the key file");
            let spki = key.public_key().as_der().expect("SPKI").as_ref().to_vec();
            (
                spki,
                blockvault::crypto::rsa::PrivateKeyFile {
                    path,
                    passphrase: None,
                },
            )
        };
        let (spki, private) = file("recovery.pem");
        let (_, wrong) = file("wrong.pem");
        let key = blockvault::crypto::rsa::CmkKey::from_spki(
            KekKind::Recovery,
            1,
            blockvault::crypto::rsa::OaepHash::Sha256,
            &spki,
            "recovery.pem",
        )
        .expect("recovery key descriptor");
        RecoveryKeys {
            key,
            private,
            wrong,
        }
    })
}

/// XOR `pattern` over `buf` from byte `skip` on, wrapping around (`buf` longer than `skip`):
/// damage anywhere past a prologue.
pub fn xor_after(buf: &mut [u8], skip: usize, pattern: &[u8]) {
    let span = buf.len() - skip;
    for (i, x) in pattern.iter().enumerate() {
        buf[skip + i % span] ^= x;
    }
}
