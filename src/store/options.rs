//! Options and results of the event store's operations.

use serde_json::Value;

use crate::expected_version::ExpectedVersion;

/// Options of [`EventStore::append_to_stream`](crate::EventStore::append_to_stream).
///
/// ```
/// use emmett_seaorm::{AppendOptions, ExpectedVersion};
/// let options = AppendOptions::default()
///     .partition("tenant-a")
///     .stream_type("cart")
///     .expected(ExpectedVersion::NoStream)
///     .metadata(serde_json::json!({ "correlation_id": "c-1" }));
/// ```
#[derive(Debug, Clone, Default)]
pub struct AppendOptions {
    pub(crate) partition: Option<String>,
    pub(crate) stream_type: Option<String>,
    pub(crate) expected: ExpectedVersion,
    pub(crate) metadata: Option<Value>,
    pub(crate) idempotency_key: Option<String>,
}

impl AppendOptions {
    /// The partition (tenant); when not set, the store's tenant if it is bound to one, else
    /// `default_partition`.
    pub fn partition(mut self, partition: impl Into<String>) -> Self {
        self.partition = Some(partition.into());
        self
    }
    /// The stream type recorded when the stream is created; `"unknown"` when not set.
    pub fn stream_type(mut self, stream_type: impl Into<String>) -> Self {
        self.stream_type = Some(stream_type.into());
        self
    }
    /// The optimistic-concurrency check; [`ExpectedVersion::Any`] when not set.
    pub fn expected(mut self, expected: ExpectedVersion) -> Self {
        self.expected = expected;
        self
    }
    /// Metadata stored with every event of this append (`{}` when not set).
    pub fn metadata(mut self, metadata: Value) -> Self {
        self.metadata = Some(metadata);
        self
    }
    /// Makes the append safe to retry: the events' message ids derive from `key` (UUID v5 of
    /// the key and the event's index), and an append whose ids are already stored in the
    /// partition returns the stored result instead of writing them again.
    ///
    /// Use a key that names the command, e.g. its request id, and retry with the same events
    /// after [`Error::ConnectionLost`](crate::Error::ConnectionLost) with `maybe_written`.
    /// Without a key, each append gets fresh UUID v7 ids (the store still resolves its own
    /// retries after a lost connection). Inside a session the caller retries the whole
    /// session: a reused key there fails the append instead of returning the stored result.
    ///
    /// ```
    /// use emmett_seaorm::AppendOptions;
    /// let options = AppendOptions::default().idempotency_key("checkout-request-7f3a");
    /// ```
    pub fn idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.idempotency_key = Some(key.into());
        self
    }

    /// The message id of event `index` of this append.
    pub(crate) fn message_id(&self, index: usize) -> String {
        match &self.idempotency_key {
            Some(key) => uuid::Uuid::new_v5(&MESSAGE_ID_NAMESPACE, format!("{key}/{index}").as_bytes()).to_string(),
            None => uuid::Uuid::now_v7().to_string(),
        }
    }
}

/// Namespace of message ids derived from idempotency keys.
const MESSAGE_ID_NAMESPACE: uuid::Uuid = uuid::Uuid::from_u128(0x6a1c_51e2_9b1f_4d8e_a3c2_5e0f_7d41_b9a6);

/// Options of reads: [`EventStore::read_stream`](crate::EventStore::read_stream) and
/// [`EventStore::aggregate_stream`](crate::EventStore::aggregate_stream).
///
/// ```
/// use emmett_seaorm::{ExpectedVersion, ReadOptions};
/// let options = ReadOptions::default().partition("tenant-a").from(3).to(10).max_count(5);
/// let checked = ReadOptions::default().expected(ExpectedVersion::Exact(4));
/// ```
#[derive(Debug, Clone, Default)]
pub struct ReadOptions {
    pub(crate) partition: Option<String>,
    pub(crate) from: Option<u64>,
    pub(crate) to: Option<u64>,
    pub(crate) max_count: Option<u64>,
    pub(crate) expected: Option<ExpectedVersion>,
}

impl ReadOptions {
    /// The partition (tenant); when not set, the store's tenant if it is bound to one, else
    /// `default_partition`.
    pub fn partition(mut self, partition: impl Into<String>) -> Self {
        self.partition = Some(partition.into());
        self
    }
    /// First stream position to read (inclusive, 1-based).
    pub fn from(mut self, position: u64) -> Self {
        self.from = Some(position);
        self
    }
    /// Last stream position to read (inclusive).
    pub fn to(mut self, position: u64) -> Self {
        self.to = Some(position);
        self
    }
    /// At most this many stored events (an event an [upcaster](crate::upcast) split counts
    /// once, one it dropped too).
    pub fn max_count(mut self, count: u64) -> Self {
        self.max_count = Some(count);
        self
    }
    /// Fail with [`Error::ExpectedVersionConflict`](crate::Error::ExpectedVersionConflict)
    /// unless the stream is at this version.
    pub fn expected(mut self, expected: ExpectedVersion) -> Self {
        self.expected = Some(expected);
        self
    }
}

/// What [`EventStore::append_to_stream`](crate::EventStore::append_to_stream) wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppendResult {
    /// The stream's version after the append: pass it as `ExpectedVersion::Exact` next time.
    pub next_expected_stream_version: u64,
    /// Global position of the last appended event.
    pub last_event_global_position: u64,
    /// Whether this append created the stream.
    pub created_new_stream: bool,
}

/// What [`EventStore::read_stream`](crate::EventStore::read_stream) found.
#[derive(Debug, Clone)]
pub struct ReadStreamResult<E> {
    /// The events, in stream order.
    pub events: Vec<crate::event::RecordedEvent<E>>,
    /// The stream's version (0 when it does not exist).
    pub current_stream_version: u64,
    /// Whether the stream exists (and is not archived).
    pub stream_exists: bool,
}

/// What [`EventStore::aggregate_stream`](crate::EventStore::aggregate_stream) folded.
#[derive(Debug, Clone)]
pub struct AggregateStreamResult<S> {
    /// The state after folding every event.
    pub state: S,
    /// The version the state corresponds to (0 when the stream does not exist).
    pub current_stream_version: u64,
    /// Whether the stream exists (and is not archived).
    pub stream_exists: bool,
}
