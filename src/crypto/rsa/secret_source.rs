//! Where a PIN or passphrase comes from: a file or an environment variable, never a command
//! line argument (which `ps` and shell history show to everyone).

use std::io::Read;
use std::os::unix::ffi::OsStringExt;
use std::path::PathBuf;

use zeroize::Zeroizing;

use crate::error::{Error, ErrorKind, Result};

/// PINs and passphrases are short; a longer file is the wrong file.
const MAX_SECRET_LEN: u64 = 4096;

/// A file or environment variable holding one secret line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    /// The first line of this file (a trailing newline is not part of the secret).
    File(PathBuf),
    /// The value of this environment variable.
    Env(String),
}

impl SecretSource {
    /// Read the secret; `what` says what it is for ("PIN of token bv"). Missing, empty or
    /// over-long sources are [`ErrorKind::Key`] errors naming the file or variable.
    pub fn read(&self, what: &str) -> Result<Zeroizing<Vec<u8>>> {
        let mut secret = Zeroizing::new(Vec::new());
        match self {
            SecretSource::File(path) => {
                let f = std::fs::File::open(path).map_err(|e| {
                    Error::new(
                        ErrorKind::Key,
                        format!("{what}: cannot open {}", path.display()),
                    )
                    .with_source(e)
                })?;
                f.take(MAX_SECRET_LEN + 1)
                    .read_to_end(&mut secret)
                    .map_err(|e| {
                        Error::new(
                            ErrorKind::Key,
                            format!("{what}: cannot read {}", path.display()),
                        )
                        .with_source(e)
                    })?;
            }
            SecretSource::Env(name) => {
                let value = std::env::var_os(name).ok_or_else(|| {
                    Error::new(
                        ErrorKind::Key,
                        format!("{what}: environment variable {name} is not set"),
                    )
                })?;
                secret = Zeroizing::new(value.into_vec());
            }
        }
        if secret.len() as u64 > MAX_SECRET_LEN {
            return Err(Error::new(
                ErrorKind::Key,
                format!("{what}: {self} is longer than {MAX_SECRET_LEN} bytes"),
            ));
        }
        let line_end = secret
            .iter()
            .position(|&b| b == b'\n')
            .unwrap_or(secret.len());
        let mut len = line_end;
        if len > 0 && secret[len - 1] == b'\r' {
            len -= 1;
        }
        let line = Zeroizing::new(secret[..len].to_vec());
        if line.is_empty() {
            return Err(Error::new(
                ErrorKind::Key,
                format!("{what}: {self} is empty"),
            ));
        }
        Ok(line)
    }
}

impl std::fmt::Display for SecretSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SecretSource::File(p) => write!(f, "file {}", p.display()),
            SecretSource::Env(n) => write!(f, "environment variable {n}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_line_without_newline_and_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pin");
        std::fs::write(&p, "1234\r\nignored\n").unwrap();
        let s = SecretSource::File(p.clone());
        assert_eq!(&s.read("PIN").unwrap()[..], b"1234");
        std::fs::write(&p, "\n").unwrap();
        assert!(s.read("PIN").unwrap_err().to_string().contains("is empty"));
        std::fs::write(&p, vec![b'x'; 5000]).unwrap();
        assert!(s.read("PIN").unwrap_err().to_string().contains("longer"));
        let missing = SecretSource::File(dir.path().join("nope"));
        let err = missing.read("PIN of token bv").unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Key);
        assert!(err.to_string().contains("nope"), "{err}");
        let unset = SecretSource::Env("BLOCKVAULT_TEST_SURELY_UNSET_VAR".into());
        assert!(unset
            .read("PIN")
            .unwrap_err()
            .to_string()
            .contains("not set"));
    }
}
