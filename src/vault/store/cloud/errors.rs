//! `object_store` errors as the library's errors, with credentials scrubbed.
//!
//! The kind follows what the store said (404 NotFound, 409/412 on a create AlreadyExists, 412
//! on a replace Conflict, 401/403 an access problem). The message names the operation, the
//! object and the vault; the store's own text is kept as the cause, after every secret value of
//! the configuration and every URL query string (where a SAS token travels) is cut out of it.
//! `object_store` already hides SAS URLs; this is the second lock on the same door, because
//! the CLI prints the whole cause chain.

use crate::error::{Error, ErrorKind};

/// The store's error text, scrubbed: carried as an error's cause.
#[derive(Debug)]
pub(super) struct StoreSaid(String);

impl std::fmt::Display for StoreSaid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StoreSaid {}

/// `text` with every value in `secrets` (8 characters or more; shorter ones are not secrets
/// worth the false matches), every `&`-separated part of them (a SAS token's signature), and
/// every URL query string replaced by `<redacted>`.
pub(super) fn redact(text: &str, secrets: &[String]) -> String {
    let mut out = text.to_string();
    let mut values: Vec<&str> = secrets
        .iter()
        .flat_map(|s| {
            std::iter::once(s.as_str()).chain(
                s.split('&')
                    .filter_map(|p| p.split_once('=').map(|(_, v)| v)),
            )
        })
        .filter(|v| v.len() >= 8)
        .collect();
    // Longest first, so a part never leaves the rest of a longer secret behind.
    values.sort_by_key(|v| std::cmp::Reverse(v.len()));
    for v in values {
        out = out.replace(v, "<redacted>");
    }
    // Query strings of URLs: from `?` to the next whitespace, quote or bracket.
    let mut scrubbed = String::with_capacity(out.len());
    let mut rest = out.as_str();
    while let Some(at) = rest.find("://") {
        let (head, url) = rest.split_at(at);
        scrubbed.push_str(head);
        let end = url
            .find(|c: char| c.is_whitespace() || "\"')>]".contains(c))
            .unwrap_or(url.len());
        let (u, tail) = url.split_at(end);
        match u.split_once('?') {
            Some((base, _)) => {
                scrubbed.push_str(base);
                scrubbed.push_str("?<redacted>");
            }
            None => scrubbed.push_str(u),
        }
        rest = tail;
    }
    scrubbed.push_str(rest);
    scrubbed
}

/// What the failed operation was, for the message.
pub(super) struct Op<'a> {
    /// "reading", "writing", ...
    pub verb: &'a str,
    /// The object key.
    pub key: &'a str,
    /// The vault URL.
    pub location: &'a str,
    /// Whether the operation was a conditional replace (412 means "changed since read").
    pub replace: bool,
}

/// Map an `object_store` error of `op`.
pub(super) fn map(e: object_store::Error, op: &Op, secrets: &[String]) -> Error {
    use object_store::Error as E;
    let (kind, says) = match &e {
        E::NotFound { .. } => (ErrorKind::NotFound, "no such object"),
        E::AlreadyExists { .. } => (ErrorKind::AlreadyExists, "it already exists"),
        E::Precondition { .. } | E::NotModified { .. } if op.replace => {
            (ErrorKind::Conflict, "it changed since it was read")
        }
        E::Precondition { .. } | E::NotModified { .. } => {
            (ErrorKind::AlreadyExists, "it already exists")
        }
        E::PermissionDenied { .. } => (
            ErrorKind::Io,
            "access denied (check the credentials' permissions on this bucket or container)",
        ),
        E::Unauthenticated { .. } => (ErrorKind::Io, "the store did not accept the credentials"),
        E::InvalidPath { .. } => (ErrorKind::Usage, "invalid object name"),
        E::NotSupported { .. } | E::NotImplemented { .. } => {
            (ErrorKind::Unsupported, "the store does not support this")
        }
        _ => (ErrorKind::Io, "the request failed"),
    };
    let mut cause = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        let text = s.to_string();
        if !cause.contains(&text) {
            cause.push_str(": ");
            cause.push_str(&text);
        }
        source = s.source();
    }
    Error::new(
        kind,
        format!(
            "{} object {} in vault {}: {says}",
            op.verb, op.key, op.location
        ),
    )
    .with_source(StoreSaid(redact(&cause, secrets)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_and_query_strings_are_cut_out() {
        let secrets = vec![
            "wJalrXUtnFEMI/K7MDENG".to_string(),
            "sv=2021&sig=AbCdEfGh12345678%3D".to_string(),
        ];
        let text = "signing with wJalrXUtnFEMI/K7MDENG failed; GET \
                    https://acct.blob.core.windows.net/c/k?sv=2021&sig=AbCdEfGh12345678%3D \
                    (sig=AbCdEfGh12345678%3D) at http://h:1/p";
        let r = redact(text, &secrets);
        assert!(!r.contains("wJalr"), "{r}");
        assert!(!r.contains("AbCdEfGh"), "{r}");
        assert!(
            r.contains("https://acct.blob.core.windows.net/c/k?<redacted>"),
            "{r}"
        );
        assert!(r.contains("http://h:1/p"), "{r}");
    }
}
