//! Running the real tools the tests make their fixtures with (qemu-img, sfdisk, cryptsetup,
//! openssl, pkcs11-tool, ...): whether they are installed, and one run that must succeed.
//!
//! A test that needs a missing tool says so with a SKIP line naming the Debian package and
//! passes, except under CI=true, where it fails (see [`super::skip`]).

use std::io::Write;
use std::process::{Command, Stdio};

use super::skip;

/// Whether every `(tool, Debian package)` runs (`tool --version` exits 0); otherwise a SKIP
/// line for `test` naming the first missing one (a failure under CI=true).
///
/// Not for tools without a `--version` option (openssl, pkcs11-tool): see
/// [`super::keys`] for those.
pub fn tools(test: &str, needed: &[(&str, &str)]) -> bool {
    for (tool, package) in needed {
        let ok = Command::new(tool)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            return skip(
                test,
                &format!("{tool} is not installed (apt-get install {package})"),
            );
        }
    }
    true
}

/// Run a fixture tool with `input` on its stdin (none when empty); it must exit 0, else the
/// test panics showing the command, its status and what it printed. Returns its stdout.
pub fn run_tool(cmd: &mut Command, input: &str) -> Vec<u8> {
    let stdin = if input.is_empty() {
        Stdio::null()
    } else {
        Stdio::piped()
    };
    let mut child = cmd
        .stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    if let Some(mut pipe) = child.stdin.take() {
        pipe.write_all(input.as_bytes())
            .unwrap_or_else(|e| panic!("writing the input of {cmd:?}: {e}"));
        // Dropped here: the tool sees the end of its input.
    }
    let out = child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("waiting for {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}
