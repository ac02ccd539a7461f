//! The one error type of the crate.

use crate::ExpectedVersion;

/// Everything that can go wrong in emmett-seaorm.
///
/// Each variant names what was wrong (stream, partition, position, table), so a log line
/// is enough to find the offending data. Nothing is written when an operation returns an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The stream was not at the version the caller expected: another writer won the race,
    /// or the caller's view was stale. `actual` is the stream's current version (0 = no stream).
    #[error(
        "expected version conflict on stream '{stream}' in partition '{partition}': expected {expected}, actual {actual}"
    )]
    ExpectedVersionConflict {
        /// The stream id.
        stream: String,
        /// The partition (tenant).
        partition: String,
        /// What the caller expected.
        expected: ExpectedVersion,
        /// The stream's version when the append was rejected; 0 when it does not exist.
        actual: u64,
    },

    /// `append_to_stream` was called with no events.
    #[error("cannot append an empty list of events to stream '{stream}' in partition '{partition}'")]
    EmptyAppend {
        /// The stream id.
        stream: String,
        /// The partition (tenant).
        partition: String,
    },

    /// A typed event did not serialize to `{"type": <string>, "data": <any>}`.
    ///
    /// Use `#[serde(tag = "type", content = "data")]` on the event enum.
    #[error("event for stream '{stream}' does not serialize to {{\"type\": string, \"data\": …}}: {reason}")]
    InvalidEvent {
        /// The stream the event was meant for.
        stream: String,
        /// What was wrong with its JSON shape.
        reason: String,
    },

    /// A stored event could not be turned into the caller's event type: its type is unknown
    /// to the enum, or its data does not match.
    #[error(
        "cannot decode stored event '{message_type}' at position {position} of stream '{stream}' in partition '{partition}': {source}"
    )]
    UndecodableEvent {
        /// The stream id.
        stream: String,
        /// The partition (tenant).
        partition: String,
        /// The event's stream position.
        position: u64,
        /// The stored `message_type`.
        message_type: String,
        /// What serde said.
        #[source]
        source: serde_json::Error,
    },

    /// `archive_stream` found an archived generation of the stream already; the schema keeps
    /// one archived generation per stream.
    #[error("stream '{stream}' in partition '{partition}' already has an archived generation")]
    AlreadyArchived {
        /// The stream id.
        stream: String,
        /// The partition (tenant).
        partition: String,
    },

    /// A projection's `extract_keys` returned a different set of key names than before:
    /// a read model has one primary key.
    #[error("projection '{projection}' extracted keys {found:?}, but its rows are keyed by {expected:?}")]
    KeySetMismatch {
        /// The projection's read-model table.
        projection: String,
        /// The key names seen first.
        expected: Vec<String>,
        /// The key names of the offending event.
        found: Vec<String>,
    },

    /// A stored snapshot is not valid JSON for the projection's state type.
    #[error("snapshot '{stream_id}' of read model '{table}' does not decode as the projection's state: {source}")]
    CorruptSnapshot {
        /// The read-model table.
        table: String,
        /// The snapshot's stream id (its encoded keys).
        stream_id: String,
        /// What serde said.
        #[source]
        source: serde_json::Error,
    },

    /// A custom projection handler failed; the batch was rolled back and the checkpoint stays
    /// before this event.
    #[error(
        "projection handler failed on '{message_type}' at position {position} of stream '{stream}' in partition '{partition}': {source}"
    )]
    Handler {
        /// The stream id.
        stream: String,
        /// The partition (tenant).
        partition: String,
        /// The event's stream position.
        position: u64,
        /// The event's type.
        message_type: String,
        /// What the handler returned.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    /// The closure given to `with_session` kept a clone of the session's store alive,
    /// so the transaction could not be committed. It was rolled back.
    #[error("the session store was still in use when the session ended; the transaction was rolled back")]
    SessionStillInUse,

    /// Serialising a value to JSON failed.
    #[error("JSON error: {0}")]
    Json(#[from] serde_json::Error),

    /// The database reported an error.
    #[error("database error: {0}")]
    Database(#[from] sea_orm::DbErr),
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
