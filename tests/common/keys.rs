//! Customer key fixtures made by the real tools: RSA key files by `openssl` (Debian package
//! `openssl`), made once per test binary, and SoftHSM2 token folders set up by
//! `softhsm2-util` (`softhsm2`) and `pkcs11-tool` (`opensc`).
//!
//! A test that needs a missing tool prints a SKIP line and passes, except under CI=true, where
//! it fails (see [`super::skip`]).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use super::skip;
use super::tools::run_tool;

/// The SoftHSM2 PKCS#11 module, where Debian installs it.
pub const SOFTHSM_MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";

/// Whether `tool` is on the PATH: openssl and pkcs11-tool have no `--version` to probe with
/// (see [`super::tools::tools`] for the tools that do).
fn on_path(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// A fresh folder `name` for this process's fixtures under Cargo's target tmp folder: what a
/// static holds is never dropped, so a `TempDir` would be left behind. Folders of processes
/// that are gone (`PID-NAME`, the process no longer in /proc) are removed first.
pub fn fixture_dir(name: &str) -> PathBuf {
    let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fixtures");
    for e in std::fs::read_dir(&root).into_iter().flatten().flatten() {
        let folder = e.file_name().to_string_lossy().into_owned();
        let pid = folder.split('-').next().unwrap_or("");
        if !Path::new("/proc").join(pid).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
    let dir = root.join(format!("{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("fixture folder");
    dir
}

// ---------------------------------------------------------------------------------------------
// PEM keys
// ---------------------------------------------------------------------------------------------

/// RSA key files made once per test binary by openssl, in one folder:
/// - `a`, `b`, `c`, `r`: 3072-bit key pairs, `X.key` (PKCS#8 PEM) and `X.pub` (SPKI PEM);
/// - `small.key`, `small.pub`: a 2048-bit pair (too small to be accepted);
/// - `a.pkcs1.pub`: the public key of `a` as PKCS#1 PEM;
/// - `a.enc.key`: `a` as AES-256-CBC encrypted PKCS#8 under the passphrase in `pass`
///   (`correct horse battery staple`); `wrongpass` holds another;
/// - `a.pkcs1.key`: `a` as PKCS#1 PEM (`BEGIN RSA PRIVATE KEY`), and `a.pkcs1.enc.key` the
///   same encrypted the legacy OpenSSL way (`Proc-Type: 4,ENCRYPTED`) under `pass`;
/// - `c.der`, `c.pub.der`: `c` in DER, to import into a token.
pub struct PemKeys {
    dir: PathBuf,
}

impl PemKeys {
    /// A file of the folder.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// `rsa:<folder>/NAME.pub`, as `--cmk` and `--recovery-key` take it.
    pub fn spec(&self, name: &str) -> String {
        format!("rsa:{}", self.path(&format!("{name}.pub")).display())
    }

    /// The path of `NAME.key`, as an argument.
    pub fn key(&self, name: &str) -> String {
        self.path(&format!("{name}.key")).display().to_string()
    }

    /// Make every key file in `dir`.
    fn make(dir: PathBuf) -> PemKeys {
        let openssl = |args: &[&str]| {
            run_tool(Command::new("openssl").args(args).current_dir(&dir), "");
        };
        for (name, bits) in [
            ("a", "3072"),
            ("b", "3072"),
            ("c", "3072"),
            ("r", "3072"),
            ("small", "2048"),
        ] {
            openssl(&[
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                &format!("rsa_keygen_bits:{bits}"),
                "-out",
                &format!("{name}.key"),
            ]);
            openssl(&[
                "pkey",
                "-in",
                &format!("{name}.key"),
                "-pubout",
                "-out",
                &format!("{name}.pub"),
            ]);
        }
        openssl(&[
            "rsa",
            "-pubin",
            "-in",
            "a.pub",
            "-RSAPublicKey_out",
            "-out",
            "a.pkcs1.pub",
        ]);
        std::fs::write(dir.join("pass"), "correct horse battery staple\n").expect("pass");
        std::fs::write(dir.join("wrongpass"), "incorrect horse\n").expect("wrongpass");
        openssl(&[
            "pkcs8",
            "-topk8",
            "-v2",
            "aes-256-cbc",
            "-in",
            "a.key",
            "-out",
            "a.enc.key",
            "-passout",
            "file:pass",
        ]);
        openssl(&["rsa", "-in", "a.key", "-traditional", "-out", "a.pkcs1.key"]);
        openssl(&[
            "rsa",
            "-in",
            "a.key",
            "-traditional",
            "-aes256",
            "-passout",
            "file:pass",
            "-out",
            "a.pkcs1.enc.key",
        ]);
        openssl(&["pkey", "-in", "c.key", "-outform", "DER", "-out", "c.der"]);
        openssl(&[
            "pkey",
            "-in",
            "c.key",
            "-pubout",
            "-outform",
            "DER",
            "-out",
            "c.pub.der",
        ]);
        PemKeys { dir }
    }
}

/// The PEM keys of this test binary (made by the first test that asks), or `None` after a
/// SKIP line for `test` when openssl is missing.
pub fn pem_keys(test: &str) -> Option<&'static PemKeys> {
    if !on_path("openssl") {
        skip(test, "openssl is not installed (apt-get install openssl)");
        return None;
    }
    static KEYS: OnceLock<PemKeys> = OnceLock::new();
    Some(KEYS.get_or_init(|| PemKeys::make(fixture_dir("pem"))))
}

// ---------------------------------------------------------------------------------------------
// SoftHSM2
// ---------------------------------------------------------------------------------------------

/// Whether SoftHSM2 (its module and `softhsm2-util`) and OpenSC (`pkcs11-tool`) are
/// installed; otherwise a SKIP line for `test` (a failure under CI=true).
pub fn softhsm(test: &str) -> bool {
    if Path::new(SOFTHSM_MODULE).exists() && on_path("softhsm2-util") && on_path("pkcs11-tool") {
        return true;
    }
    skip(
        test,
        "SoftHSM2 or OpenSC is not installed (apt-get install softhsm2 opensc)",
    )
}

/// A SoftHSM2 token folder: `softhsm2.conf` keeping the tokens in `tokens/`, and the PIN
/// files `pin` (1234, the user PIN of every token made here) and `badpin` (9999).
///
/// The tools run here are given `SOFTHSM2_CONF`; a process that loads the module itself
/// (the `blockvault` binary, or a test calling the library) needs it in its environment
/// before its first PKCS#11 call.
pub struct SoftHsm {
    /// The folder.
    pub dir: PathBuf,
    /// `dir/softhsm2.conf`.
    pub conf: PathBuf,
}

impl SoftHsm {
    /// A token folder at `dir` (created if need be), no token in it yet. Check [`softhsm`]
    /// first.
    pub fn new(dir: PathBuf) -> SoftHsm {
        let tokens = dir.join("tokens");
        std::fs::create_dir_all(&tokens).expect("token folder");
        let conf = dir.join("softhsm2.conf");
        std::fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                tokens.display()
            ),
        )
        .expect("softhsm2.conf");
        std::fs::write(dir.join("pin"), "1234\n").expect("pin file");
        std::fs::write(dir.join("badpin"), "9999\n").expect("pin file");
        SoftHsm { dir, conf }
    }

    /// A new token `label` in the first free slot (user PIN 1234, SO PIN 5678). Labels must
    /// share no prefix: `pkcs11-tool --token-label` matches prefixes.
    pub fn init_token(&self, label: &str) {
        run_tool(
            Command::new("softhsm2-util")
                .env("SOFTHSM2_CONF", &self.conf)
                .args(["--init-token", "--free", "--label", label])
                .args(["--pin", "1234", "--so-pin", "5678"]),
            "",
        );
    }

    /// `pkcs11-tool ARGS`, logged in to `token`.
    pub fn p11(&self, token: &str, args: &[&str]) {
        run_tool(
            Command::new("pkcs11-tool")
                .env("SOFTHSM2_CONF", &self.conf)
                .args([
                    "--module",
                    SOFTHSM_MODULE,
                    "--token-label",
                    token,
                    "--login",
                ])
                .args(["--pin", "1234"])
                .args(args),
            "",
        );
    }

    /// A new 3072-bit RSA key pair `label` with `id` (hex) in `token`.
    pub fn keypair(&self, token: &str, label: &str, id: &str) {
        self.p11(
            token,
            &[
                "--keypairgen",
                "--key-type",
                "rsa:3072",
                "--label",
                label,
                "--id",
                id,
            ],
        );
    }

    /// Import a DER key file as object `label` with `id` (hex) into `token`; `kind` is
    /// `privkey` or `pubkey`.
    pub fn import(&self, token: &str, file: &Path, kind: &str, label: &str, id: &str) {
        let file = file.to_str().expect("utf-8 path");
        self.p11(
            token,
            &[
                "--write-object",
                file,
                "--type",
                kind,
                "--id",
                id,
                "--label",
                label,
            ],
        );
    }

    /// Delete the private key with `id` (hex) from `token`.
    pub fn delete_private(&self, token: &str, id: &str) {
        self.p11(token, &["--delete-object", "--type", "privkey", "--id", id]);
    }

    /// The path of PIN file `name` (`pin`, `badpin`).
    pub fn pin(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}
