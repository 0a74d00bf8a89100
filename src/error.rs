//! The public error of the library.
//!
//! Policy (one error type for the whole library, as callers see it):
//! - every error carries a [`ErrorKind`] a caller can match on (the CLI maps kinds to exit
//!   codes: [`ErrorKind::Integrity`] is exit 3, [`ErrorKind::Usage`] exit 2,
//!   [`ErrorKind::Interrupted`] 128 + the signal (130 for SIGINT, 143 for SIGTERM), the rest
//!   exit 1);
//! - a `context` naming *what* and *where*: the disk, snapshot, object key, byte offset;
//! - the underlying `source` error, if any, kept as a cause rather than repeated in the text.
//!
//! Library code never panics on bad input; `anyhow` is used only in the binary.

use std::fmt;

/// What went wrong, in the terms a caller decides on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The caller asked for something impossible (bad argument, conflicting options).
    Usage,
    /// A named thing (source, vault, disk, snapshot, object) does not exist.
    NotFound,
    /// A thing that must not be overwritten already exists.
    AlreadyExists,
    /// An operating-system I/O error.
    Io,
    /// Stored data failed a check: CRC, authentication tag, digest, structure.
    Integrity,
    /// A key is missing, revoked or cannot unwrap.
    Key,
    /// The vault or object was written by a newer or unknown format version.
    Unsupported,
    /// The source changed while it was being read (shrank, vanished).
    SourceChanged,
    /// A compare-and-swap lost: the object changed (or appeared) since the caller read it.
    /// The caller re-reads and applies its change again.
    Conflict,
    /// SIGINT or SIGTERM asked the process to stop ([`crate::interrupt`]); the work was
    /// abandoned and cleaned up as after any other failure.
    Interrupted,
}

/// The library's error: a kind to match, context that names what and where, and a cause.
pub struct Error {
    kind: ErrorKind,
    context: String,
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

/// Result with the library's error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A new error of `kind` with a message naming what and where.
    pub fn new(kind: ErrorKind, context: impl Into<String>) -> Self {
        Error {
            kind,
            context: context.into(),
            source: None,
        }
    }

    /// Attach the underlying cause.
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    /// An I/O error with the path or object it concerns.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        let kind = match source.kind() {
            std::io::ErrorKind::NotFound => ErrorKind::NotFound,
            std::io::ErrorKind::AlreadyExists => ErrorKind::AlreadyExists,
            _ => ErrorKind::Io,
        };
        Error::new(kind, context).with_source(source)
    }

    /// Stored data failed a check.
    pub fn integrity(context: impl Into<String>) -> Self {
        Error::new(ErrorKind::Integrity, context)
    }

    /// The caller's request cannot be carried out as asked.
    pub fn usage(context: impl Into<String>) -> Self {
        Error::new(ErrorKind::Usage, context)
    }

    /// What went wrong, for matching.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The message naming what and where, without the cause.
    pub fn context(&self) -> &str {
        &self.context
    }

    /// Prefix the context with an outer "where" (e.g. the disk being backed up).
    pub fn within(mut self, outer: impl fmt::Display) -> Self {
        self.context = format!("{outer}: {}", self.context);
        self
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.context)
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.kind, self.context)?;
        if let Some(s) = &self.source {
            write!(f, " (caused by: {s})")?;
        }
        Ok(())
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|s| s as &(dyn std::error::Error + 'static))
    }
}

/// Attach "what and where" to foreign errors at the point they cross into the library.
pub trait IoContext<T> {
    /// Map an `io::Error` to [`Error`] with the given context.
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for std::result::Result<T, std::io::Error> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::io(context(), e))
    }
}
