//! What a valid object key is, for every backend alike: `/`-separated components, none empty,
//! none `.` or `..`, none starting with `.` (hidden names are a local store's temporaries, and
//! the same key must be valid everywhere so a vault can move between backends).

use crate::error::{Error, Result};

/// Refuse a key that is empty, absolute, or has an empty, `.`, `..` or hidden component.
pub(crate) fn check_key(key: &str) -> Result<()> {
    if key.is_empty()
        || key
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == ".." || c.starts_with('.'))
    {
        return Err(Error::usage(format!("invalid object key {key:?}")));
    }
    Ok(())
}
