//! PKCS#11 URIs (RFC 7512) naming the token and key of a customer-managed key.
//!
//! ```text
//! pkcs11:token=bv;object=cmk;id=%01?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=/etc/bv.pin
//! ```
//! Path attributes (`;`-separated): `token`, `manufacturer`, `model`, `serial` select the
//! token; `object` (the key's CKA_LABEL) and `id` (CKA_ID bytes) select the key, at least one
//! of them; `type` may be `private` or `public`. Query attributes (`&`-separated):
//! `module-path` and `pin-source` (a file path, or a `file:` URI). Values are percent-encoded.
//! Parsing keeps `module-path` as written; whether it is used is not the parser's call: only
//! at enrolment, if absolute, and it is never stored (`super::module`).
//! `pin-value` is refused: a PIN in a URI ends up in arguments, shell history and the vault.
//! Any other attribute is refused rather than ignored, so a key is never chosen by a looser
//! match than the URI's author meant.

use std::fmt::Write as _;
use std::path::PathBuf;

use crate::error::{Error, Result};

/// URIs longer than this are not key names.
const MAX_URI_LEN: usize = 4096;

/// A parsed PKCS#11 URI.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pkcs11Uri {
    /// Token label.
    pub token: Option<String>,
    /// Token manufacturer id.
    pub manufacturer: Option<String>,
    /// Token model.
    pub model: Option<String>,
    /// Token serial number.
    pub serial: Option<String>,
    /// Key label (CKA_LABEL).
    pub object: Option<String>,
    /// Key id (CKA_ID).
    pub id: Option<Vec<u8>>,
    /// The PKCS#11 module to load.
    pub module_path: Option<PathBuf>,
    /// File holding the token's user PIN.
    pub pin_source: Option<PathBuf>,
}

fn bad(uri: &str, msg: impl std::fmt::Display) -> Error {
    Error::usage(format!("PKCS#11 URI {uri:?}: {msg}"))
}

fn hex_digit(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

/// Percent-decode `value`, the value of attribute `name`.
fn decode_bytes(uri: &str, name: &str, value: &str) -> Result<Vec<u8>> {
    let b = value.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let pair = b
                .get(i + 1..i + 3)
                .and_then(|p| Some((hex_digit(p[0])?, hex_digit(p[1])?)));
            let (hi, lo) = pair.ok_or_else(|| {
                bad(
                    uri,
                    format_args!(
                        "attribute {name}: bad percent-escape at character {i} of its value"
                    ),
                )
            })?;
            out.push(hi << 4 | lo);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Ok(out)
}

fn decode_string(uri: &str, name: &str, value: &str) -> Result<String> {
    String::from_utf8(decode_bytes(uri, name, value)?)
        .map_err(|_| bad(uri, format_args!("attribute {name} is not UTF-8")))
}

fn set<T>(uri: &str, name: &str, slot: &mut Option<T>, value: T) -> Result<()> {
    if slot.replace(value).is_some() {
        return Err(bad(uri, format_args!("attribute {name} appears twice")));
    }
    Ok(())
}

impl Pkcs11Uri {
    /// Parse; every error is a [`crate::ErrorKind::Usage`] naming the URI and the attribute.
    pub fn parse(uri: &str) -> Result<Self> {
        if uri.len() > MAX_URI_LEN {
            return Err(Error::usage(format!(
                "PKCS#11 URI is {} bytes, over {MAX_URI_LEN}",
                uri.len()
            )));
        }
        let rest = uri
            .strip_prefix("pkcs11:")
            .ok_or_else(|| bad(uri, "does not start with \"pkcs11:\""))?;
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        let mut u = Pkcs11Uri::default();
        for attr in path.split(';').filter(|a| !a.is_empty()) {
            let (name, value) = attr
                .split_once('=')
                .ok_or_else(|| bad(uri, format_args!("path attribute {attr:?} has no '='")))?;
            match name {
                "token" => set(uri, name, &mut u.token, decode_string(uri, name, value)?)?,
                "manufacturer" => set(
                    uri,
                    name,
                    &mut u.manufacturer,
                    decode_string(uri, name, value)?,
                )?,
                "model" => set(uri, name, &mut u.model, decode_string(uri, name, value)?)?,
                "serial" => set(uri, name, &mut u.serial, decode_string(uri, name, value)?)?,
                "object" => set(uri, name, &mut u.object, decode_string(uri, name, value)?)?,
                "id" => set(uri, name, &mut u.id, decode_bytes(uri, name, value)?)?,
                "type" => match value {
                    "private" | "public" => {}
                    other => {
                        return Err(bad(
                            uri,
                            format_args!(
                                "type={other}: an RSA key pair is type=private or type=public"
                            ),
                        ))
                    }
                },
                other => {
                    return Err(bad(
                        uri,
                        format_args!("path attribute {other:?} is not supported"),
                    ))
                }
            }
        }
        for attr in query.split('&').filter(|a| !a.is_empty()) {
            let (name, value) = attr
                .split_once('=')
                .ok_or_else(|| bad(uri, format_args!("query attribute {attr:?} has no '='")))?;
            match name {
                "module-path" => set(
                    uri,
                    name,
                    &mut u.module_path,
                    PathBuf::from(decode_string(uri, name, value)?),
                )?,
                "pin-source" => {
                    let v = decode_string(uri, name, value)?;
                    let path = v.strip_prefix("file:").unwrap_or(&v);
                    if !path.starts_with('/') {
                        return Err(bad(
                            uri,
                            "pin-source must be an absolute file path or a file: URI",
                        ));
                    }
                    set(uri, name, &mut u.pin_source, PathBuf::from(path))?
                }
                "pin-value" => {
                    return Err(bad(
                        uri,
                        "pin-value is refused: a PIN must not be an argument; use a PIN file or BLOCKVAULT_PKCS11_PIN",
                    ))
                }
                "module-name" => {
                    return Err(bad(uri, "module-name is not supported; give module-path"))
                }
                other => {
                    return Err(bad(
                        uri,
                        format_args!("query attribute {other:?} is not supported"),
                    ))
                }
            }
        }
        if u.object.is_none() && u.id.is_none() {
            return Err(bad(uri, "names no key: give object= or id="));
        }
        Ok(u)
    }

    /// A short description of the key for messages: `object=cmk id=01`.
    pub fn key_name(&self) -> String {
        let mut s = String::new();
        if let Some(o) = &self.object {
            let _ = write!(s, "object={o}");
        }
        if let Some(id) = &self.id {
            let sep = if s.is_empty() { "" } else { " " };
            let _ = write!(s, "{sep}id={}", hex::encode(id));
        }
        s
    }
}

/// Percent-encode every byte outside RFC 3986's unreserved set (and `/` when `slash`).
fn encode(out: &mut String, bytes: &[u8], slash: bool) {
    for &b in bytes {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) || (slash && b == b'/') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
}

impl std::fmt::Display for Pkcs11Uri {
    /// The canonical form: attributes in a fixed order, every value percent-encoded as needed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut s = String::from("pkcs11:");
        let mut path: Vec<(&str, &[u8])> = Vec::new();
        for (name, v) in [
            ("token", &self.token),
            ("manufacturer", &self.manufacturer),
            ("model", &self.model),
            ("serial", &self.serial),
            ("object", &self.object),
        ] {
            if let Some(v) = v {
                path.push((name, v.as_bytes()));
            }
        }
        if let Some(id) = &self.id {
            path.push(("id", id));
        }
        for (i, (name, v)) in path.iter().enumerate() {
            if i > 0 {
                s.push(';');
            }
            s.push_str(name);
            s.push('=');
            encode(&mut s, v, false);
        }
        let mut sep = '?';
        for (name, v) in [
            ("module-path", &self.module_path),
            ("pin-source", &self.pin_source),
        ] {
            if let Some(v) = v {
                s.push(sep);
                s.push_str(name);
                s.push('=');
                encode(&mut s, v.as_os_str().as_encoded_bytes(), true);
                sep = '&';
            }
        }
        f.write_str(&s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_the_documented_example() {
        let u = Pkcs11Uri::parse(
            "pkcs11:token=bv;object=cmk;id=%01;type=private?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/etc/bv.pin",
        )
        .unwrap();
        assert_eq!(u.token.as_deref(), Some("bv"));
        assert_eq!(u.object.as_deref(), Some("cmk"));
        assert_eq!(u.id.as_deref(), Some(&[1u8][..]));
        assert_eq!(
            u.module_path.as_deref(),
            Some(std::path::Path::new("/usr/lib/softhsm/libsofthsm2.so"))
        );
        assert_eq!(
            u.pin_source.as_deref(),
            Some(std::path::Path::new("/etc/bv.pin"))
        );
        assert_eq!(u.key_name(), "object=cmk id=01");
        assert_eq!(
            u.to_string(),
            "pkcs11:token=bv;object=cmk;id=%01?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=/etc/bv.pin"
        );
    }

    #[test]
    fn refuses_pins_unknown_attributes_and_bad_escapes() {
        for (uri, says) in [
            ("pkcs11:object=k?pin-value=1234", "must not be an argument"),
            ("pkcs11:object=k;slot-id=1", "not supported"),
            ("pkcs11:token=bv", "names no key"),
            ("pkcs11:object=%zz", "percent-escape"),
            ("pkcs11:object=%4", "percent-escape"),
            ("pkcs11:object=a;object=b", "twice"),
            ("pkcs11:object=%ff", "UTF-8"),
            ("pkcs11:object=k?pin-source=relative", "absolute"),
            ("pkcs11:object=k;type=secret-key", "type=private"),
            ("pkcs:object=k", "pkcs11:"),
            ("pkcs11:object", "no '='"),
        ] {
            let err = Pkcs11Uri::parse(uri).unwrap_err();
            assert_eq!(err.kind(), crate::ErrorKind::Usage);
            assert!(err.to_string().contains(says), "{uri}: {err}");
        }
    }

    proptest! {
        #[test]
        fn display_then_parse_is_identity(
            token in proptest::option::of(".{0,20}"),
            object in ".{1,20}",
            id in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..8)),
            module in proptest::option::of("/[a-z/ %;?&=]{0,20}"),
        ) {
            let u = Pkcs11Uri {
                token,
                object: Some(object),
                id,
                module_path: module.map(PathBuf::from),
                ..Default::default()
            };
            prop_assert_eq!(Pkcs11Uri::parse(&u.to_string()).unwrap(), u);
        }

        #[test]
        fn never_panics(s in "pkcs11:.{0,80}") {
            let _ = Pkcs11Uri::parse(&s);
        }
    }
}
