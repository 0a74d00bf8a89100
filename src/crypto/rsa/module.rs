//! Which PKCS#11 module (shared library) blockvault loads for a token key.
//!
//! Loading a module runs its code inside this process, usually as root, so the path must come
//! from the operator, never from the vault: the vault is untrusted storage, and a key
//! descriptor naming `module-path=<vault>/evil.so` would otherwise be a way to run code on the
//! backup host (security review, C1/L1).
//!
//! ```text
//!  enrolment (init, key rotate/recover --new-cmk):  --pkcs11-module ▶ URI module-path ▶ $BLOCKVAULT_PKCS11_MODULE ▶ known paths
//!  every later use (stored descriptor):             --pkcs11-module ▶ $BLOCKVAULT_PKCS11_MODULE ▶ known paths
//! ```
//! The URI typed at enrolment is the operator's own input, so its `module-path` may choose the
//! module then; it is never stored, and a `module-path` found in a stored descriptor (written
//! by an older build, or planted) is ignored. Every path must be absolute: a relative one
//! would load whatever library the working directory holds. Without a choice, the first
//! installed module of [`KNOWN_MODULES`] is used.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Environment variable naming the PKCS#11 module.
pub const MODULE_ENV: &str = "BLOCKVAULT_PKCS11_MODULE";

/// Where distributions install the modules blockvault loads without being told: SoftHSM2
/// (Debian and Ubuntu, their multiarch folders, Fedora and RHEL), then OpenSC's. The first one
/// installed is used; any other module (a vendor HSM's) is named with `--pkcs11-module` or
/// [`MODULE_ENV`].
pub const KNOWN_MODULES: &[&str] = &[
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib64/pkcs11/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/opensc-pkcs11.so",
    "/usr/lib/aarch64-linux-gnu/opensc-pkcs11.so",
    "/usr/lib64/opensc-pkcs11.so",
];

/// `path`, given by `from`, if it is absolute.
fn absolute(path: PathBuf, from: &str) -> Result<PathBuf> {
    if path.is_absolute() {
        Ok(path)
    } else {
        Err(Error::usage(format!(
            "PKCS#11 module {} ({from}) is a relative path; give an absolute one (a relative \
             path loads whatever library the working directory holds)",
            path.display()
        )))
    }
}

/// The module to load: `explicit` (the caller's `--pkcs11-module`), else `from_uri` (only the
/// URI typed at enrolment; `None` for a stored descriptor), else [`MODULE_ENV`], else the
/// first installed of [`KNOWN_MODULES`] (the first of them when none is, so that loading it
/// fails naming a path). A relative path from any source is a `Usage` error.
pub fn resolve(explicit: Option<PathBuf>, from_uri: Option<&Path>) -> Result<PathBuf> {
    if let Some(path) = explicit {
        return absolute(path, "--pkcs11-module");
    }
    if let Some(path) = from_uri {
        return absolute(path.to_owned(), "the URI's module-path");
    }
    if let Some(path) = std::env::var_os(MODULE_ENV) {
        return absolute(PathBuf::from(path), MODULE_ENV);
    }
    let known = KNOWN_MODULES
        .iter()
        .find(|p| Path::new(p).exists())
        .unwrap_or(&KNOWN_MODULES[0]);
    Ok(PathBuf::from(known))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_are_refused_from_the_caller_and_the_uri() {
        for (explicit, uri, from) in [
            (Some("libsofthsm2.so"), None, "--pkcs11-module"),
            (
                Some("./lib/evil.so"),
                Some("/usr/lib/a.so"),
                "--pkcs11-module",
            ),
            (None, Some("vault/evil.so"), "the URI's module-path"),
        ] {
            let err = resolve(explicit.map(PathBuf::from), uri.map(Path::new)).unwrap_err();
            assert_eq!(err.kind(), crate::ErrorKind::Usage);
            assert!(err.to_string().contains("relative path"), "{err}");
            assert!(err.to_string().contains(from), "{err}");
        }
        // The caller's choice wins over the URI's.
        assert_eq!(
            resolve(Some("/opt/hsm.so".into()), Some(Path::new("/x.so"))).unwrap(),
            Path::new("/opt/hsm.so")
        );
        assert_eq!(
            resolve(None, Some(Path::new("/x.so"))).unwrap(),
            Path::new("/x.so")
        );
    }

    #[test]
    fn known_modules_are_absolute() {
        assert!(KNOWN_MODULES.iter().all(|p| Path::new(p).is_absolute()));
    }
}
