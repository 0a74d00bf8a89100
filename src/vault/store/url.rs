//! Vault URLs: which store a `--vault` argument names.
//!
//! Accepted: a path (`/srv/vault`, `vault`, `./name:x`), `file://PATH`, and the object-storage
//! schemes `s3://` and `az://` (the object-store backend, `cloud`). Everything
//! else that looks like a URL or a remote spec is refused rather than taken as a folder name:
//! `scheme://…` of any other scheme (`sftp://`, `azure://`, `gs://`, `https://`), and
//! `name:rest` with the colon before any `/` (`b2:bucket`, `sftp:host:/x`, `rclone:remote`,
//! scp's `host:/path`). Taken as paths, those would create a local folder such as
//! `./sftp:/host/x` and a new vault in it, silently: the backups would land on this machine
//! instead of the remote the user named. A local folder whose name has such a colon is still
//! reachable as `./name:x` or by its absolute path.

use std::path::PathBuf;

use crate::error::{Error, Result};

/// What a vault URL names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VaultUrl {
    /// A folder on this machine.
    Local(PathBuf),
    /// Object storage (`s3`, `az`), reached through the object-store backend.
    ObjectStorage(&'static str),
}

/// Object-storage schemes the vault supports.
const OBJECT_SCHEMES: [&str; 2] = ["s3", "az"];

/// What `--vault` accepts, for error messages.
const ACCEPTED: &str = "a vault is a local folder (a path, or file://PATH) or object storage \
    (s3://BUCKET/PREFIX, az://CONTAINER/PREFIX); a local folder whose name has a colon \
    before any `/` can be given as ./NAME or by its absolute path";

impl VaultUrl {
    /// Read `url`. Errors: an empty URL or a scheme or remote spec that is not accepted ->
    /// [`ErrorKind::Usage`], naming it and listing what is accepted.
    pub fn parse(url: &str) -> Result<VaultUrl> {
        if url.is_empty() {
            return Err(Error::usage(format!("the vault URL is empty: {ACCEPTED}")));
        }
        if let Some(path) = url.strip_prefix("file://") {
            if path.is_empty() {
                return Err(Error::usage(format!(
                    "vault URL {url} names no folder: {ACCEPTED}"
                )));
            }
            return Ok(VaultUrl::Local(PathBuf::from(path)));
        }
        let Some(colon) = url.find(':') else {
            return Ok(VaultUrl::Local(PathBuf::from(url)));
        };
        if url[..colon].contains('/') {
            // `./name:x`, `/srv/a:b`: a path whose folder name holds a colon.
            return Ok(VaultUrl::Local(PathBuf::from(url)));
        }
        let scheme = &url[..colon];
        if url[colon..].starts_with("://") {
            if let Some(known) = OBJECT_SCHEMES.iter().find(|s| **s == scheme) {
                return Ok(VaultUrl::ObjectStorage(known));
            }
            return Err(Error::usage(format!(
                "vault URL {url}: scheme {scheme}:// is not supported: {ACCEPTED}"
            )));
        }
        Err(Error::usage(format!(
            "vault URL {url} looks like a remote ({scheme}:...), not a folder: {ACCEPTED}"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    fn local(url: &str) -> PathBuf {
        match VaultUrl::parse(url) {
            Ok(VaultUrl::Local(p)) => p,
            other => panic!("{url}: {other:?}"),
        }
    }

    #[test]
    fn paths_and_file_urls_are_local_folders() {
        assert_eq!(local("vault"), PathBuf::from("vault"));
        assert_eq!(local("/srv/backups/v"), PathBuf::from("/srv/backups/v"));
        assert_eq!(local("./b2:bucket"), PathBuf::from("./b2:bucket"));
        assert_eq!(local("/srv/a:b/c"), PathBuf::from("/srv/a:b/c"));
        assert_eq!(local("file:///srv/v"), PathBuf::from("/srv/v"));
        assert_eq!(local("file://rel/v"), PathBuf::from("rel/v"));
    }

    #[test]
    fn object_storage_is_recognised() {
        for (url, scheme) in [("s3://bucket/p", "s3"), ("az://c/p", "az")] {
            assert_eq!(
                VaultUrl::parse(url).unwrap(),
                VaultUrl::ObjectStorage(scheme)
            );
        }
    }

    #[test]
    fn other_schemes_and_remote_specs_are_refused() {
        for url in [
            "sftp://host/x",
            "azure://c/x",
            "ssh://host/x",
            "gs://bucket/x",
            "http://host/x",
            "https://host/x",
            "S3://bucket/x",
            "rest:http://host/x",
            "b2:bucket",
            "sftp:host:/x",
            "rclone:remote",
            "host:/srv/vault",
            "file:vault",
            "",
            "file://",
        ] {
            let e = VaultUrl::parse(url).expect_err(url);
            assert_eq!(e.kind(), ErrorKind::Usage, "{url}");
            let text = e.to_string();
            assert!(text.contains(url), "{url}: {text}");
            assert!(
                text.contains("file://PATH") && text.contains("s3://"),
                "{text}"
            );
        }
    }
}
