//! What the schema can store, checked before anything reaches the database.
//!
//! - Stream ids, partitions, subscription ids and event types: 1 to 255 characters, no NUL
//!   (the `VARCHAR(255)` columns of MySQL; PostgreSQL `text` rejects NUL). The same limits on
//!   every backend, so data can move between them.
//! - Snapshot ids (the encoded keys of a read-model row): at most 512 characters.
//! - Event data and metadata: no NUL character in a string or key (PostgreSQL's `jsonb`).
//! - Positions and versions are `u64` in the API and `BIGINT` in the schema: the largest one
//!   stored is `i64::MAX`.

use crate::error::{Error, Result};

/// Longest stream id, partition, subscription id or event type, in characters.
pub const MAX_IDENTIFIER_CHARS: usize = 255;

/// Longest snapshot id (a read-model row's encoded keys), in characters.
pub const MAX_SNAPSHOT_ID_CHARS: usize = 512;

/// Fails with [`Error::InvalidIdentifier`] unless `value` is 1 to `max` characters without NUL.
pub(crate) fn check_identifier(what: &'static str, value: &str, max: usize) -> Result<()> {
    let reason = if value.is_empty() {
        "must not be empty".to_owned()
    } else if value.contains('\0') {
        "must not contain a NUL character".to_owned()
    } else if value.chars().count() > max {
        format!("is {} characters long; the limit is {max}", value.chars().count())
    } else {
        return Ok(());
    };
    Err(Error::InvalidIdentifier { what, value: value.chars().take(100).collect(), reason })
}

/// Whether a JSON value holds a NUL character in a string or an object key: PostgreSQL's `jsonb`
/// can't store one.
pub(crate) fn holds_nul(value: &serde_json::Value) -> bool {
    use serde_json::Value;
    match value {
        Value::String(s) => s.contains('\0'),
        Value::Array(items) => items.iter().any(holds_nul),
        Value::Object(map) => map.iter().any(|(k, v)| k.contains('\0') || holds_nul(v)),
        _ => false,
    }
}

/// A position or count for SQL: values past `i64::MAX` (none is stored) become `i64::MAX`.
pub(crate) fn clamp(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_checked_in_characters() {
        assert!(check_identifier("stream id", &"ä".repeat(255), MAX_IDENTIFIER_CHARS).is_ok());
        for bad in ["", "a\0b", &"x".repeat(256)] {
            assert!(matches!(
                check_identifier("stream id", bad, MAX_IDENTIFIER_CHARS),
                Err(Error::InvalidIdentifier { what: "stream id", .. })
            ));
        }
        assert_eq!((clamp(u64::MAX), clamp(7)), (i64::MAX, 7));
    }
}
