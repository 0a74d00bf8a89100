//! NBD URLs, as in the NBD project's URI format (`doc/uri.md`) and as qemu and libnbd take
//! them:
//!
//! - `nbd://HOST[:PORT][/EXPORT]` — TCP, port 10809 by default, `HOST` a name, an IPv4
//!   address or a bracketed IPv6 address;
//! - `nbd+unix:///[EXPORT]?socket=PATH` — a Unix socket (the authority must be empty).
//!
//! The export name is the path without its leading `/`, percent-decoded; empty (the
//! server's default export) when absent. TLS (`nbds://`) and vsock schemes are refused as
//! unsupported rather than silently connected in the clear.

use crate::error::{Error, ErrorKind, Result};
use std::path::PathBuf;

/// The IANA port for NBD.
pub const DEFAULT_PORT: u16 = 10809;
/// The protocol's limit on strings (export names, context names).
pub const MAX_NAME: usize = 4096;

/// Where the server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A TCP host (name or address, brackets removed) and port.
    Tcp {
        /// Host name or address.
        host: String,
        /// Port.
        port: u16,
    },
    /// A Unix-domain socket.
    Unix(PathBuf),
}

/// A parsed NBD URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUrl {
    /// Where to connect.
    pub endpoint: Endpoint,
    /// The export name ("" = the server's default).
    pub export: String,
}

/// Whether `s` names an NBD export (any `nbd*://` scheme), so that `source::open` sends it
/// here before looking for a file, and unsupported variants get a clear error.
pub fn is_nbd_url(s: &str) -> bool {
    s.split_once("://")
        .is_some_and(|(scheme, _)| scheme.starts_with("nbd"))
}

/// Parse an NBD URL. Errors are [`ErrorKind::Usage`] (malformed) or
/// [`ErrorKind::Unsupported`] (TLS, vsock), naming the URL.
pub fn parse(url: &str) -> Result<NbdUrl> {
    let usage = |why: &str| Error::usage(format!("NBD URL {url}: {why}"));
    let (scheme, rest) = url.split_once("://").ok_or_else(|| {
        usage("expected nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH")
    })?;
    let (rest, query) = match rest.split_once('?') {
        Some((r, q)) => (r, Some(q)),
        None => (rest, None),
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    let export = decode(path.strip_prefix('/').unwrap_or(path)).map_err(|e| usage(&e))?;
    if export.len() > MAX_NAME {
        return Err(usage(&format!("export name longer than {MAX_NAME} bytes")));
    }
    let mut socket = None;
    for pair in query.into_iter().flat_map(|q| q.split('&')) {
        match pair.split_once('=') {
            Some(("socket", v)) => socket = Some(decode(v).map_err(|e| usage(&e))?),
            _ => return Err(usage(&format!("unsupported query parameter {pair:?}"))),
        }
    }
    let endpoint = match scheme {
        "nbd" => {
            if socket.is_some() {
                return Err(usage("socket= belongs to nbd+unix:// URLs"));
            }
            tcp(authority).map_err(|e| usage(&e))?
        }
        "nbd+unix" => {
            if !authority.is_empty() {
                return Err(usage("nbd+unix:// takes no host: write nbd+unix:///EXPORT?socket=PATH"));
            }
            let socket = socket
                .filter(|s| !s.is_empty())
                .ok_or_else(|| usage("nbd+unix:// needs ?socket=PATH"))?;
            Endpoint::Unix(PathBuf::from(socket))
        }
        s if s.starts_with("nbds") => {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!("NBD URL {url}: TLS (nbds://) is not supported; use nbd:// on a trusted network or nbd+unix://"),
            ))
        }
        s => {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!("NBD URL {url}: scheme {s}:// is not supported (nbd:// and nbd+unix:// are)"),
            ))
        }
    };
    Ok(NbdUrl { endpoint, export })
}

/// `HOST[:PORT]`, `[V6][:PORT]`.
fn tcp(authority: &str) -> std::result::Result<Endpoint, String> {
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) = v6.split_once(']').ok_or("unclosed [ in the IPv6 host")?;
        match after {
            "" => (host, None),
            p => (
                host,
                Some(p.strip_prefix(':').ok_or("junk after the IPv6 host")?),
            ),
        }
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err("no host".into());
    }
    let port = match port {
        None => DEFAULT_PORT,
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|&p| p != 0)
            .ok_or_else(|| format!("port {p:?} is not a number from 1 to 65535"))?,
    };
    Ok(Endpoint::Tcp {
        host: host.to_owned(),
        port,
    })
}

/// Percent-decoding (`%2F` -> `/`); the result must be UTF-8 (export names are strings).
fn decode(s: &str) -> std::result::Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad percent escape at byte {i} of {s:?}"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("{s:?} does not decode to UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(host: &str, port: u16, export: &str) -> NbdUrl {
        NbdUrl {
            endpoint: Endpoint::Tcp {
                host: host.into(),
                port,
            },
            export: export.into(),
        }
    }

    #[test]
    fn tcp_urls() {
        assert_eq!(parse("nbd://h").unwrap(), tcp("h", 10809, ""));
        assert_eq!(parse("nbd://h/").unwrap(), tcp("h", 10809, ""));
        assert_eq!(
            parse("nbd://10.0.0.1:1234/disk").unwrap(),
            tcp("10.0.0.1", 1234, "disk")
        );
        assert_eq!(
            parse("nbd://[::1]:99/a%2Fb%20c").unwrap(),
            tcp("::1", 99, "a/b c")
        );
        assert_eq!(
            parse("nbd://[fe80::1]/x/y").unwrap(),
            tcp("fe80::1", 10809, "x/y")
        );
        assert!(is_nbd_url("nbd://h/x") && is_nbd_url("nbds://h") && !is_nbd_url("/dev/sda"));
        assert!(!is_nbd_url("disk.img"));
    }

    #[test]
    fn unix_urls() {
        assert_eq!(
            parse("nbd+unix:///vm1?socket=/run/x%20y.sock").unwrap(),
            NbdUrl {
                endpoint: Endpoint::Unix("/run/x y.sock".into()),
                export: "vm1".into()
            }
        );
        assert_eq!(
            parse("nbd+unix://?socket=/s").unwrap().export,
            "",
            "no path: default export"
        );
    }

    #[test]
    fn bad_urls_say_why() {
        for (url, why, kind) in [
            ("nbd://", "no host", ErrorKind::Usage),
            ("nbd://h:0/x", "port", ErrorKind::Usage),
            ("nbd://h:70000/x", "port", ErrorKind::Usage),
            ("nbd://[::1/x", "unclosed", ErrorKind::Usage),
            ("nbd://h/x?socket=/s", "socket=", ErrorKind::Usage),
            ("nbd://h/x?tls=on", "query parameter", ErrorKind::Usage),
            ("nbd://h/%zz", "percent", ErrorKind::Usage),
            ("nbd://h/%ff", "UTF-8", ErrorKind::Usage),
            ("nbd+unix://h/x?socket=/s", "no host", ErrorKind::Usage),
            ("nbd+unix:///x", "socket=PATH", ErrorKind::Usage),
            ("nbds://h/x", "TLS", ErrorKind::Unsupported),
            ("nbd+vsock://1/x", "nbd+vsock", ErrorKind::Unsupported),
        ] {
            let e = parse(url).unwrap_err();
            assert_eq!(e.kind(), kind, "{url}: {e}");
            assert!(
                e.to_string().contains(url) && e.to_string().contains(why),
                "{url}: {e}"
            );
        }
        let long = format!("nbd://h/{}", "x".repeat(MAX_NAME + 1));
        assert!(parse(&long).is_err());
    }
}
