//! The one error type of the crate.

use crate::expected_version::ExpectedVersion;

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

    /// A stored event could not be brought to the current version of its type by the store's
    /// [`Upcasters`](crate::upcast::Upcasters): a version newer than the code knows, no step
    /// from an older one, an upcaster that panicked, or a `message_schema_version` that is no
    /// number.
    #[error(
        "cannot upcast stored event '{message_type}' at position {position} (global {global_position}) of stream '{stream}' in partition '{partition}': {reason}"
    )]
    Upcast {
        /// The stream id.
        stream: String,
        /// The partition (tenant).
        partition: String,
        /// The event's stream position.
        position: u64,
        /// The event's global position.
        global_position: u64,
        /// The stored `message_type`.
        message_type: String,
        /// The stored `message_schema_version` (`None`: not a number, the reason quotes it).
        version: Option<u32>,
        /// What went wrong.
        reason: String,
    },

    /// [`EventStore::with_upcasters`](crate::EventStore::with_upcasters) refused an
    /// inconsistent set of upcasters (a step registered twice, a gap in a chain).
    #[error("invalid upcasters: {reason}")]
    InvalidUpcasters {
        /// What is inconsistent.
        reason: String,
    },

    /// A stored event could not be turned into the caller's event type: its type is unknown
    /// to the enum, or its data does not match.
    #[error(
        "cannot decode stored event '{message_type}' at position {position} (global {global_position}) of stream '{stream}' in partition '{partition}': {source}"
    )]
    UndecodableEvent {
        /// The stream id.
        stream: String,
        /// The partition (tenant).
        partition: String,
        /// The event's stream position.
        position: u64,
        /// The event's global position.
        global_position: u64,
        /// The stored `message_type`.
        message_type: String,
        /// What serde said.
        #[source]
        source: serde_json::Error,
    },

    /// An append carried a message id (from its idempotency key) that the partition already
    /// holds for other events: the key was used before for a different append.
    #[error(
        "message '{message_id}' already exists in partition '{partition}' (stream '{existing_stream}'); the append to stream '{stream}' reused its idempotency key"
    )]
    DuplicateMessage {
        /// The stream appended to.
        stream: String,
        /// The partition (tenant).
        partition: String,
        /// The message id found.
        message_id: String,
        /// The stream that holds it.
        existing_stream: String,
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

    /// A projection run reached a read-model row that another partition (tenant) wrote last,
    /// with events at or below the row's last global position: whether they are already folded
    /// can't be told from the row (each tenant's runs fold its events in order, but tenants run
    /// in any order). Nothing of the batch is written. Put the partition in the row's keys, or
    /// keep rows shared by tenants with an inline projection, which folds every append's events
    /// as they are written.
    #[error(
        "read model '{table}' row '{row}' is fed by several partitions ({partitions:?}, the first wrote it last); key it by partition"
    )]
    SharedRowAcrossPartitions {
        /// The read-model table.
        table: String,
        /// The row's snapshot id (its encoded keys).
        row: String,
        /// The partition that wrote the row last (or "(its events are gone)"), then the batch's.
        partitions: Vec<String>,
    },

    /// A per-stream run (`project_events`) reached a read-model row that another stream wrote
    /// last, with events at or below the row's last global position: which of them are
    /// already folded can't be told from the row. Project such rows (fed by several streams,
    /// e.g. a per-tenant total) with `project_partition`, which folds in global order.
    #[error(
        "read model '{table}' row '{row}' is fed by several streams ({streams:?}); project it with project_partition"
    )]
    SharedRow {
        /// The read-model table.
        table: String,
        /// The row's snapshot id (its encoded keys).
        row: String,
        /// The stream that wrote the row last, and the stream being projected.
        streams: Vec<String>,
    },

    /// A read-model table can't take the projection's rows: it does not exist, lacks a column,
    /// or has no primary or unique key over exactly the key columns. `reason` says what to create.
    /// Checked on a projection's first batch, before anything is written.
    #[error("read model '{table}': {reason}")]
    InvalidReadModel {
        /// The read-model table.
        table: String,
        /// What is wrong and what to create.
        reason: String,
    },

    /// Reading or writing a read-model table failed: most often the table, a key column or a
    /// mapped column does not exist, or the keys are not a unique key of the table.
    #[error("read model '{table}': {source}")]
    ReadModel {
        /// The read-model table.
        table: String,
        /// What the database said.
        #[source]
        source: sea_orm::DbErr,
    },

    /// A projection handler (or a snapshot projection's `evolve` or `extract_keys`) failed or
    /// panicked on this event; the batch was rolled back and the checkpoint stays before it.
    #[error(
        "projection handler failed on '{message_type}' at position {position} (global {global_position}) of stream '{stream}' in partition '{partition}': {source}"
    )]
    Handler {
        /// The stream id.
        stream: String,
        /// The partition (tenant).
        partition: String,
        /// The event's stream position.
        position: u64,
        /// The event's global position: a checkpoint there (`projections reset --to`) skips it.
        global_position: u64,
        /// The event's type.
        message_type: String,
        /// What the handler returned, or what it panicked with.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    /// The closure given to `with_session` kept a clone of the session's store alive,
    /// so the transaction could not be committed. It was rolled back.
    #[error("the session store was still in use when the session ended; the transaction was rolled back")]
    SessionStillInUse,

    /// A stream id, partition or other identifier cannot be stored: empty, too long for the
    /// schema, or containing a NUL character. Checked before anything reaches the database.
    #[error("invalid {what} '{value}': {reason}")]
    InvalidIdentifier {
        /// What the identifier is (`"stream id"`, `"partition"`, `"subscription id"`, …).
        what: &'static str,
        /// The identifier (its first 100 characters).
        value: String,
        /// What is wrong with it.
        reason: String,
    },

    /// A projection was asked for by a subscription id that names none of the daemon's.
    #[error("projection '{subscription}' is not one of this daemon's")]
    UnknownProjection {
        /// The subscription id asked for.
        subscription: String,
    },

    /// An event's data, or an append's metadata, holds what the schema can't store on every
    /// backend: a NUL character (`\u0000`) in a string or key, which PostgreSQL's `jsonb`
    /// refuses. Checked on every backend, so data can move between them; nothing was written.
    #[error("event {index} of the append to stream '{stream}' in partition '{partition}' can't be stored: {reason}")]
    UnstorableEvent {
        /// The stream id.
        stream: String,
        /// The partition (tenant).
        partition: String,
        /// The event's index in the append (0-based).
        index: usize,
        /// What can't be stored.
        reason: String,
    },

    /// A number given to the store is outside what it can mean, e.g. a version past the
    /// largest position the schema stores (`i64::MAX`). Nothing was written.
    #[error("{what} {value} is out of range for stream '{stream}' in partition '{partition}'")]
    OutOfRange {
        /// What the number is.
        what: &'static str,
        /// The number.
        value: u64,
        /// The stream id.
        stream: String,
        /// The partition (tenant).
        partition: String,
    },

    /// An import into a database that already holds the tenant, without asking to replace it.
    #[error("tenant '{partition}' already has streams or events here; import with replace to overwrite it")]
    PartitionExists {
        /// The tenant.
        partition: String,
    },

    /// A tenant changed while it was moved to another database (an append during the move):
    /// the copy there was erased and the tenant stays here, as it is.
    #[error(
        "tenant '{partition}' changed while it was moved ({reason}); it stays here: stop its writers and move it again"
    )]
    PartitionChanged {
        /// The tenant.
        partition: String,
        /// What differed.
        reason: String,
    },

    /// A [`StoreRouter`](crate::StoreRouter) knows no store for the tenant: no entry names it
    /// and there is no default store.
    #[error("no store holds tenant '{partition}': no entry names it and the router has no default store")]
    UnknownTenant {
        /// The tenant.
        partition: String,
    },

    /// A [`StoreRouter`](crate::StoreRouter)'s map names a store it does not have.
    #[error("tenant '{partition}' lives in store '{store}', which this router does not have")]
    UnknownStore {
        /// The store's name.
        store: String,
        /// The tenant.
        partition: String,
    },

    /// A store's projection daemon is not running ([`DaemonFleet`](crate::daemon::DaemonFleet)):
    /// it could not start or it stopped, and is started again after a pause.
    #[error("the projection daemon of store '{store}' is not running: {reason}")]
    StoreDown {
        /// The store's name.
        store: String,
        /// Why.
        reason: String,
    },

    /// A [`StoreRouter`](crate::StoreRouter) was asked to change its catalog, and has none.
    #[error("this router has no catalog to record a tenant's store in")]
    NoCatalog,

    /// A [`StoreRouter`](crate::StoreRouter)'s tenant is being moved to another store: try
    /// again in a moment.
    #[error("tenant '{partition}' is being moved to another store; try again in a moment")]
    TenantMoving {
        /// The tenant.
        partition: String,
    },

    /// The database refused the statement to this role: a privilege it lacks, or (PostgreSQL,
    /// [`rls`](crate::rls)) a row of another tenant than the one its transaction is bound to —
    /// e.g. an append through a store not bound to the tenant.
    #[error(
        "the database refused this role: {source} (a missing privilege, or row-level security: is the store bound to the tenant?)"
    )]
    Denied {
        /// The database's error.
        source: sea_orm::DbErr,
    },

    /// A store bound to one tenant ([`EventStore::for_tenant`](crate::EventStore::for_tenant))
    /// was asked to reach another. Nothing was read or written.
    #[error("this store is bound to tenant '{tenant}' and does not reach tenant '{partition}'")]
    OtherTenant {
        /// The tenant the store is bound to.
        tenant: String,
        /// The tenant asked for.
        partition: String,
    },

    /// A tenant's export file could not be imported: not an export, a malformed or truncated
    /// line, or a row the database refused. Nothing was imported.
    #[error("import failed at line {line}: {reason}; nothing was imported")]
    Import {
        /// The line of the file (1 is the header).
        line: u64,
        /// What was wrong.
        reason: String,
    },

    /// A stored row breaks the schema's rules: an event without a global position, or with
    /// data or metadata that is not JSON. Named so it can be repaired or skipped.
    #[error(
        "malformed stored event '{message_type}' at position {position} of stream '{stream}' in partition '{partition}': {reason}"
    )]
    MalformedEvent {
        /// The stream id.
        stream: String,
        /// The partition (tenant).
        partition: String,
        /// The event's stream position.
        position: u64,
        /// The stored `message_type`.
        message_type: String,
        /// What is wrong with the row.
        reason: String,
    },

    /// The database could not serve the operation in time: a lock wait or busy timeout (e.g.
    /// SQLite's "database is locked" behind a long write transaction), or a deadlock that
    /// persisted through the retries. The transaction was rolled back: nothing was written,
    /// and running the operation again later is safe.
    #[error("database busy, nothing was written: {source}")]
    Busy {
        /// What the database said.
        #[source]
        source: sea_orm::DbErr,
    },

    /// The connection to the database failed. When `maybe_written` is `false` nothing reached
    /// the database; when `true` the connection broke while a write may have been committing.
    /// [`append_to_stream`](crate::EventStore::append_to_stream) resolves that itself by asking
    /// the database again; see [`AppendOptions::idempotency_key`](crate::AppendOptions::idempotency_key)
    /// to retry an append safely when even that failed.
    #[error("connection to the database failed (maybe written: {maybe_written}): {source}")]
    ConnectionLost {
        /// Whether the operation may have been committed.
        maybe_written: bool,
        /// What the driver said.
        #[source]
        source: sea_orm::DbErr,
    },

    /// A projection daemon's batch found that its instance no longer holds the lease of this
    /// subscription and tenant (another instance took it over): nothing was committed.
    #[error("lease of subscription '{subscription}' for partition '{partition}' is held by another instance now")]
    LeaseLost {
        /// The subscription id.
        subscription: String,
        /// The partition (tenant).
        partition: String,
    },

    /// An inline projection failed on an appended event: the append was rolled back, nothing was
    /// written. `source` names the event (stream, partition, position, type) and the cause.
    #[error("inline projection '{projection}' failed, the append was rolled back: {source}")]
    InlineProjection {
        /// The name the projection was registered with.
        projection: String,
        /// Why it failed.
        #[source]
        source: Box<Error>,
    },

    /// A daemon's (projection, tenant) is parked: it failed its daemon's
    /// [`retries`](crate::daemon::Daemon::retries) in a row, so waiting for it to catch up
    /// would never end. Fix the cause, then `projections resume` (or `reset --to` past the
    /// event at `position` to skip it).
    #[error("projection '{subscription}' is parked in partition '{partition}' at position {position}: {reason}")]
    ProjectionParked {
        /// The subscription id.
        subscription: String,
        /// The partition (tenant).
        partition: String,
        /// The global position of the event it failed on (its checkpoint when no event is named).
        position: u64,
        /// The recorded error.
        reason: String,
    },

    /// A rebuild could not rebuild these tenants: each kept its previous read model and
    /// checkpoint (its failure is recorded where `status` shows it); every other tenant was
    /// rebuilt.
    #[error("rebuild of '{subscription}' left {} tenant(s) with their previous read model: {}", failed.len(), failed.iter().map(|(t, e)| format!("'{t}': {e}")).collect::<Vec<_>>().join("; "))]
    RebuildIncomplete {
        /// The subscription id.
        subscription: String,
        /// The tenants not rebuilt, with why.
        failed: Vec<(String, Error)>,
    },

    /// A projection daemon's task ended abnormally (it panicked or was aborted).
    #[error("projection daemon '{owner}' ended abnormally: {reason}")]
    DaemonFailed {
        /// The instance's name.
        owner: String,
        /// What the runtime said.
        reason: String,
    },

    /// An operator's action names a projection that has no checkpoint or lease (in that tenant).
    #[error("projection '{subscription}' has no checkpoint or lease{}", partition.as_ref().map(|p| format!(" in partition '{p}'")).unwrap_or_default())]
    UnknownPair {
        /// The projection's subscription id.
        subscription: String,
        /// The tenant, when one was named.
        partition: Option<String>,
    },

    /// [`admin::skip`](crate::admin::skip) on a projection that has not failed on an event in
    /// that tenant: nothing to go past.
    #[error("projection '{subscription}' has not failed on an event in partition '{partition}': nothing to skip")]
    NothingToSkip {
        /// The projection's subscription id.
        subscription: String,
        /// The tenant.
        partition: String,
    },

    /// Reading or writing a file or stream failed (an export's output, an import's input).
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),

    /// Serialising a value to JSON failed.
    #[error("JSON error: {0}")]
    Json(#[from] serde_json::Error),

    /// A pooler between the app and PostgreSQL routed a prepared statement to a server that
    /// doesn't have it, or to one that has another of that name (nothing was run): a
    /// transaction-mode pooler the URL did not mention, or one that keeps server sessions'
    /// statements from one client to the next.
    #[error(
        "a pooler mixed up prepared statements: behind a transaction-mode pooler put `pooler=transaction` in the \
         URL, and set PgBouncer's server_reset_query = DEALLOCATE ALL and server_reset_query_always = 1 (see \
         the README): {source}"
    )]
    Pooler {
        /// The database's error.
        source: sea_orm::DbErr,
    },

    /// The database reported an error.
    #[error("database error: {0}")]
    Database(sea_orm::DbErr),
}

impl Error {
    /// The global position of the stored event this error is about, where it names one: the
    /// position to move a checkpoint to (`projections reset --to`) to skip that event.
    pub fn event_position(&self) -> Option<u64> {
        match self {
            Error::Handler { global_position, .. }
            | Error::UndecodableEvent { global_position, .. }
            | Error::Upcast { global_position, .. } => Some(*global_position),
            Error::InlineProjection { source, .. } => source.event_position(),
            _ => None,
        }
    }

    /// Whether running the same operation again later may succeed: a busy database, a lost
    /// connection, a tenant being moved.
    pub fn is_transient(&self) -> bool {
        matches!(self, Error::Busy { .. } | Error::ConnectionLost { .. } | Error::TenantMoving { .. })
    }
}

/// What a caught panic carried (its message when it was a string), as a handler's error:
/// `panicked: <message>`.
pub(crate) fn panicked(payload: Box<dyn std::any::Any + Send>) -> Box<dyn std::error::Error + Send + Sync> {
    let message = match (payload.downcast_ref::<&str>(), payload.downcast_ref::<String>()) {
        (Some(message), _) => (*message).to_owned(),
        (_, Some(message)) => message.clone(),
        _ => "a value that is not a string".to_owned(),
    };
    format!("panicked: {message}").into()
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
