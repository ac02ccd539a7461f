//! The event store: append with optimistic concurrency, read, aggregate, sessions, archive.

mod options;

use std::future::Future;
use std::sync::Arc;

use sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseConnection, DatabaseExecutor, DatabaseTransaction, DbBackend, EntityTrait,
    QueryFilter, QueryOrder, QuerySelect, sea_query::Expr,
};
use serde_json::Value;

pub use options::{AggregateStreamResult, AppendOptions, AppendResult, ExpectedVersion, ReadOptions, ReadStreamResult};

use crate::backend::{self, Append};
use crate::event::{Event, RecordedEvent, decode, encode};
use crate::schema::{DEFAULT_PARTITION, messages, streams};
use crate::{Error, Result};

/// Events per page when [`EventStore::aggregate_stream`] folds a stream.
const AGGREGATE_PAGE: u64 = 1_000;

/// The event store over a SeaORM connection you already have.
///
/// Cheap to clone. Inside [`with_session`](Self::with_session) a clone is bound to the
/// session's transaction.
///
/// ```no_run
/// # async fn f() -> emmett_seaorm::Result<()> {
/// use emmett_seaorm::{AppendOptions, EventStore, ExpectedVersion, ReadOptions};
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Serialize, Deserialize)]
/// #[serde(tag = "type", content = "data")]
/// enum Counter { Incremented { by: i64 } }
///
/// let db = sea_orm::Database::connect("sqlite://counter.db?mode=rwc").await?;
/// emmett_seaorm::migrate(&db).await?;
/// let store = EventStore::new(db);
/// store
///     .append_to_stream("counter-1", [Counter::Incremented { by: 2 }],
///         AppendOptions::default().expected(ExpectedVersion::NoStream))
///     .await?;
/// let total = store
///     .aggregate_stream("counter-1", |n: i64, e: &Counter| match e { Counter::Incremented { by } => n + by },
///         || 0, ReadOptions::default())
///     .await?
///     .state;
/// assert_eq!(total, 2);
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct EventStore {
    conn: Conn,
}

#[derive(Clone, Debug)]
enum Conn {
    Pool(DatabaseConnection),
    Session(Arc<DatabaseTransaction>),
}

impl EventStore {
    /// An event store over `db`. Run [`migrate`](crate::migrate) (or the migration crate) first.
    pub fn new(db: DatabaseConnection) -> Self {
        Self { conn: Conn::Pool(db) }
    }

    /// The connection (or the session's transaction) this store works on, for your own queries
    /// in the same transaction.
    pub fn executor(&self) -> DatabaseExecutor<'_> {
        match &self.conn {
            Conn::Pool(db) => db.into(),
            Conn::Session(txn) => txn.as_ref().into(),
        }
    }

    /// The database backend.
    pub fn backend(&self) -> DbBackend {
        self.executor().get_database_backend()
    }

    /// Appends `events` to a stream, creating it if needed, in one transaction.
    ///
    /// Fails with [`Error::ExpectedVersionConflict`] when `options.expected` does not hold,
    /// [`Error::EmptyAppend`] for no events; nothing is written then.
    pub async fn append_to_stream<E: Event>(
        &self,
        stream_id: &str,
        events: impl IntoIterator<Item = E>,
        options: AppendOptions,
    ) -> Result<AppendResult> {
        let partition = options.partition.as_deref().unwrap_or(DEFAULT_PARTITION);
        let events = events
            .into_iter()
            .map(|event| {
                let encoded = encode(&event, stream_id)?;
                Ok((encoded.message_type, encoded.data, uuid::Uuid::now_v7().to_string()))
            })
            .collect::<Result<Vec<_>>>()?;
        if events.is_empty() {
            return Err(Error::EmptyAppend { stream: stream_id.into(), partition: partition.into() });
        }
        let count = events.len() as u64;
        let metadata = options.metadata.unwrap_or_else(|| Value::Object(Default::default()));
        let append = Append {
            stream_id,
            partition,
            stream_type: options.stream_type.as_deref().unwrap_or("unknown"),
            expected: options.expected,
            metadata: &metadata,
            events,
        };
        match backend::append(&self.executor(), &append).await? {
            Some(done) => Ok(AppendResult {
                next_expected_stream_version: done.next_expected_version,
                last_event_global_position: done.last_global_position,
                created_new_stream: done.next_expected_version == count,
            }),
            None => Err(self.conflict(stream_id, partition, options.expected).await),
        }
    }

    /// Reads a stream's events in order. A missing stream is not an error: it reads as empty,
    /// with `stream_exists == false`.
    pub async fn read_stream<E: Event>(&self, stream_id: &str, options: ReadOptions) -> Result<ReadStreamResult<E>> {
        let partition = options.partition_or_default();
        let version = self.stream_version(stream_id, partition).await?;
        check_expected(stream_id, partition, options.expected, version)?;
        let from = options.from.unwrap_or(1).max(1);
        // Read up to the version we saw, so events and version agree under concurrent appends.
        let to = options.to.map_or(version, |to| to.min(version));
        let events = match version {
            0 => Vec::new(),
            _ => self.read_range(stream_id, partition, from, to, options.max_count).await?,
        };
        Ok(ReadStreamResult { events, current_stream_version: version, stream_exists: version > 0 })
    }

    /// Folds a stream with the domain's `evolve`, page by page, so a stream of any length folds
    /// in bounded memory. `options.expected` checks the version before folding.
    pub async fn aggregate_stream<E: Event, S>(
        &self,
        stream_id: &str,
        evolve: impl Fn(S, &E) -> S,
        initial_state: impl FnOnce() -> S,
        options: ReadOptions,
    ) -> Result<AggregateStreamResult<S>> {
        let partition = options.partition_or_default();
        let version = self.stream_version(stream_id, partition).await?;
        check_expected(stream_id, partition, options.expected, version)?;
        let to = options.to.map_or(version, |to| to.min(version));
        let mut state = initial_state();
        let mut next = options.from.unwrap_or(1).max(1);
        while next <= to {
            let page: Vec<RecordedEvent<E>> =
                self.read_range(stream_id, partition, next, to, Some(AGGREGATE_PAGE)).await?;
            let Some(last) = page.last() else { break };
            next = last.stream_position + 1;
            state = page.iter().fold(state, |state, recorded| evolve(state, &recorded.event));
        }
        Ok(AggregateStreamResult { state, current_stream_version: version, stream_exists: version > 0 })
    }

    /// Whether the stream exists (and is not archived) in `partition`.
    pub async fn stream_exists(&self, stream_id: &str, partition: &str) -> Result<bool> {
        Ok(self.stream_version(stream_id, partition).await? > 0)
    }

    /// Archives a stream: its row and events become invisible to reads and appends, and the
    /// stream id can be used again. Returns `false` when there was no live stream to archive.
    ///
    /// The schema keeps one archived generation per stream: archiving a second generation
    /// fails with [`Error::AlreadyArchived`].
    pub async fn archive_stream(&self, stream_id: &str, partition: &str) -> Result<bool> {
        let txn = backend::begin_write(&self.executor()).await?;
        let archived =
            streams::Entity::find_by_id((stream_id.to_owned(), partition.to_owned(), true)).one(&txn).await?;
        if archived.is_some() {
            return Err(Error::AlreadyArchived { stream: stream_id.into(), partition: partition.into() });
        }
        streams::Entity::update_many()
            .col_expr(streams::Column::IsArchived, Expr::value(true))
            .filter(streams::Column::StreamId.eq(stream_id))
            .filter(streams::Column::Partition.eq(partition))
            .filter(streams::Column::IsArchived.eq(false))
            .exec(&txn)
            .await?;
        messages::Entity::update_many()
            .col_expr(messages::Column::IsArchived, Expr::value(true))
            .filter(messages::Column::StreamId.eq(stream_id))
            .filter(messages::Column::Partition.eq(partition))
            .filter(messages::Column::IsArchived.eq(false))
            .exec(&txn)
            .await?;
        let done =
            streams::Entity::find_by_id((stream_id.to_owned(), partition.to_owned(), true)).one(&txn).await?.is_some();
        txn.commit().await?;
        Ok(done)
    }

    /// Runs `work` in one transaction: every append (and any query on
    /// [`executor`](Self::executor)) commits together when it returns `Ok`, or not at all.
    /// Inside a session, another `with_session` nests as a savepoint.
    ///
    /// ```no_run
    /// # async fn f(store: emmett_seaorm::EventStore) -> emmett_seaorm::Result<()> {
    /// use emmett_seaorm::AppendOptions;
    /// let e = serde_json::json!({ "type": "Moved", "data": { "amount": 5 } });
    /// store
    ///     .with_session(|session| async move {
    ///         session.append_to_stream("account-a", [e.clone()], AppendOptions::default()).await?;
    ///         session.append_to_stream("account-b", [e], AppendOptions::default()).await?;
    ///         Ok::<_, emmett_seaorm::Error>(())
    ///     })
    ///     .await
    /// # }
    /// ```
    pub async fn with_session<F, Fut, T, E>(&self, work: F) -> Result<T, E>
    where
        F: FnOnce(EventStore) -> Fut,
        Fut: Future<Output = Result<T, E>>,
        E: From<Error>,
    {
        let txn = Arc::new(backend::begin_write(&self.executor()).await.map_err(Error::from)?);
        let outcome = work(EventStore { conn: Conn::Session(Arc::clone(&txn)) }).await;
        // A clone kept alive by `work` holds the transaction; it rolls back when dropped.
        let txn = Arc::into_inner(txn).ok_or(Error::SessionStillInUse)?;
        match outcome {
            Ok(value) => {
                txn.commit().await.map_err(Error::from)?;
                Ok(value)
            }
            Err(err) => {
                txn.rollback().await.map_err(Error::from)?;
                Err(err)
            }
        }
    }

    /// Creates the tenant's own partitions of `streams`, `messages` and `subscriptions` on
    /// PostgreSQL (moving rows it already has out of the DEFAULT partitions). Any string is a
    /// valid tenant: the table names are derived, never interpolated. Idempotent; does nothing
    /// on SQLite and MySQL.
    pub async fn create_partition(&self, partition: &str) -> Result<()> {
        Ok(backend::create_partition(&self.executor(), partition).await?)
    }

    /// The stream's version, 0 when it does not exist.
    pub(crate) async fn stream_version(&self, stream_id: &str, partition: &str) -> Result<u64> {
        let row = streams::Entity::find_by_id((stream_id.to_owned(), partition.to_owned(), false))
            .one(&self.executor())
            .await?;
        Ok(row.map_or(0, |s| s.stream_position as u64))
    }

    async fn conflict(&self, stream_id: &str, partition: &str, expected: ExpectedVersion) -> Error {
        match self.stream_version(stream_id, partition).await {
            Ok(actual) => Error::ExpectedVersionConflict {
                stream: stream_id.into(),
                partition: partition.into(),
                expected,
                actual,
            },
            Err(err) => err,
        }
    }

    /// Events `from..=to` of a stream, at most `limit`.
    async fn read_range<E: Event>(
        &self,
        stream_id: &str,
        partition: &str,
        from: u64,
        to: u64,
        limit: Option<u64>,
    ) -> Result<Vec<RecordedEvent<E>>> {
        let rows = messages::Entity::find()
            .filter(messages::Column::StreamId.eq(stream_id))
            .filter(messages::Column::Partition.eq(partition))
            .filter(messages::Column::IsArchived.eq(false))
            .filter(messages::Column::StreamPosition.between(from as i64, to as i64))
            .order_by_asc(messages::Column::StreamPosition)
            .limit(limit)
            .all(&self.executor())
            .await?;
        rows.into_iter().map(recorded).collect()
    }
}

/// Decodes a stored message into a [`RecordedEvent`], naming it precisely when it can't.
pub(crate) fn recorded<E: Event>(row: messages::Model) -> Result<RecordedEvent<E>> {
    let event = decode(&row.message_type, row.message_data).map_err(|source| Error::UndecodableEvent {
        stream: row.stream_id.clone(),
        partition: row.partition.clone(),
        position: row.stream_position as u64,
        message_type: row.message_type.clone(),
        source,
    })?;
    Ok(RecordedEvent {
        event,
        message_type: row.message_type,
        stream_id: row.stream_id,
        stream_position: row.stream_position as u64,
        global_position: row.global_position.unwrap_or_default() as u64,
        message_id: row.message_id,
        partition: row.partition,
        created: row.created,
        metadata: row.message_metadata,
    })
}

/// `ExpectedVersionConflict` unless a stream at `actual` satisfies `expected` (when given).
fn check_expected(stream_id: &str, partition: &str, expected: Option<ExpectedVersion>, actual: u64) -> Result<()> {
    match expected {
        Some(expected) if !expected.matches(actual) => Err(Error::ExpectedVersionConflict {
            stream: stream_id.into(),
            partition: partition.into(),
            expected,
            actual,
        }),
        _ => Ok(()),
    }
}
