//! The canonical form of a vault URL, by which the keystore remembers where each vault lives.
//!
//! Two spellings of one place must give one string (`./v`, `v/`, `/abs/v`, `file:///abs/v`),
//! so that "vault B at a URL where this host knew vault A" is judged on the place, not the
//! spelling. A local path becomes absolute and free of `.`/`..` and symlinks as far as it
//! exists (the last components of a vault not created yet are appended as given). Object
//! storage URLs are kept as given, without trailing slashes.

use std::path::{Component, Path, PathBuf};

use crate::error::{Error, Result};

/// The canonical form of `url`.
pub fn canonical(url: &str) -> Result<String> {
    if let Some((scheme, rest)) = url.split_once("://") {
        if scheme != "file" {
            return Ok(format!("{scheme}://{}", rest.trim_end_matches('/')));
        }
        return canonical_path(Path::new(rest));
    }
    canonical_path(Path::new(url))
}

fn canonical_path(path: &Path) -> Result<String> {
    let absolute = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .map_err(|e| Error::io("reading the current folder", e))?
            .join(path)
    };
    // `.` and `..` first, lexically; then the longest existing prefix is resolved (symlinks
    // included) and the rest appended.
    let mut lexical = PathBuf::from("/");
    for c in absolute.components() {
        match c {
            Component::ParentDir => {
                lexical.pop();
            }
            Component::Normal(n) => lexical.push(n),
            _ => {}
        }
    }
    let mut existing = lexical;
    let mut rest: Vec<std::ffi::OsString> = Vec::new();
    let resolved = loop {
        match existing.canonicalize() {
            Ok(p) => break p,
            Err(_) => match (existing.file_name(), existing.parent()) {
                (Some(name), Some(parent)) => {
                    rest.push(name.to_os_string());
                    existing = parent.to_path_buf();
                }
                _ => break PathBuf::from("/"),
            },
        }
    };
    let mut out = resolved;
    for name in rest.iter().rev() {
        out.push(name);
    }
    Ok(out.to_string_lossy().into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spellings_of_one_place_agree() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().canonicalize().unwrap();
        std::fs::create_dir(real.join("v")).unwrap();
        let want = real.join("v").to_string_lossy().into_owned();
        for spelling in [
            format!("{}/v", real.display()),
            format!("{}/v/", real.display()),
            format!("{}/x/../v", real.display()),
            format!("file://{}/v", real.display()),
        ] {
            assert_eq!(canonical(&spelling).unwrap(), want, "{spelling}");
        }
        // Not created yet: the missing part is appended as given.
        assert_eq!(
            canonical(&format!("{}/new/vault", real.display())).unwrap(),
            real.join("new/vault").to_string_lossy()
        );
        assert_eq!(
            canonical("s3://bucket/prefix/").unwrap(),
            "s3://bucket/prefix"
        );
    }
}
