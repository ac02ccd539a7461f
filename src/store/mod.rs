//! The event store: append with optimistic concurrency, read, aggregate, sessions, archive.

mod aggregate;
mod erase;
mod export;
mod group;
pub(crate) mod inline;
mod moving;
mod options;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use backon::Retryable;

use sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseConnection, DatabaseTransaction, DbBackend, DbErr, EntityTrait, ExecResult,
    QueryFilter, QueryOrder, QueryResult, QuerySelect, SqlErr, Statement, sea_query::Expr,
};
use serde_json::Value;

pub use aggregate::SnapshotPolicy;
pub use erase::PartitionRows;
pub use export::{ImportOptions, PartitionCounts};
pub use options::{AggregateStreamResult, AppendOptions, AppendResult, ReadOptions, ReadStreamResult};

use crate::backend::{self, Append, NewEvent};
use crate::conn::Conn;
use crate::error::{Error, Result};
use crate::event::{Event, RecordedEvent, StoredMessage, encode};
use crate::expected_version::ExpectedVersion;
use crate::limits::{self, MAX_IDENTIFIER_CHARS};
use crate::schema::{DEFAULT_PARTITION, messages, streams};
use crate::upcast::Upcasters;

/// Events archived per statement by [`EventStore::archive_stream`].
const ARCHIVE_CHUNK: i64 = 500;

/// Events per page when [`EventStore::aggregate_stream`] folds a stream.
const AGGREGATE_PAGE: u64 = 1_000;

/// The event store over a SeaORM connection you already have.
///
/// Cheap to clone. Inside [`with_session`](Self::with_session) a clone is bound to the
/// session's transaction. On SQLite, concurrent appends through a store and its clones commit
/// together (one writer at a time: a group shares one transaction), so share one store
/// rather than creating several over the same database.
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
/// let db = emmett_seaorm::connect("sqlite://counter.db?mode=rwc").await?;
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
    /// How appends wake projection daemons.
    signals: Arc<Signals>,
    /// Projections run in each append's transaction.
    inline: inline::InlineProjections,
    /// SQLite: appends waiting to be committed together.
    group: Arc<group::GroupCommit>,
    /// What brings stored events to the current versions of their types.
    upcasters: Arc<Upcasters>,
    /// MySQL: the partitions whose rows appends through this store have seen.
    known_partitions: Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
    /// The tenant this store is bound to ([`EventStore::for_tenant`]).
    tenant: Option<Arc<str>>,
}

/// How appends through a store (and its clones) wake projection daemons: in-process at once,
/// other processes on PostgreSQL by `NOTIFY` — at most one append per [`NOTIFY_EVERY`] carries
/// it, so concurrent writers don't queue on the lock `NOTIFY` takes while committing. A daemon
/// woken by one polls quickly while it finds work, so the appends in between are found too.
#[derive(Debug)]
struct Signals {
    /// Bumped by every committed append (shared by the stores on one SQLite or MySQL database:
    /// [`appends_signal`]).
    appends: Arc<tokio::sync::watch::Sender<u64>>,
    /// Whether appends notify on PostgreSQL.
    notify: AtomicBool,
    /// When the last notifying append was sent, in ms after `started` (`u64::MAX`: never).
    last_notify: std::sync::atomic::AtomicU64,
    started: std::time::Instant,
}

/// The signal appends through a store over `db` bump. SQLite and MySQL have no `NOTIFY`, so
/// there it is one per database in this process: a daemon over another pool on the same
/// database wakes up at once too, not at its next look.
fn appends_signal(db: &DatabaseConnection) -> Arc<tokio::sync::watch::Sender<u64>> {
    type Signals = std::collections::HashMap<String, std::sync::Weak<tokio::sync::watch::Sender<u64>>>;
    static BY_DATABASE: std::sync::LazyLock<std::sync::Mutex<Signals>> = std::sync::LazyLock::new(Default::default);
    let Some(database) = database_in_process(db) else {
        return Arc::new(tokio::sync::watch::Sender::new(0));
    };
    let mut signals = BY_DATABASE.lock().expect("not poisoned");
    signals.retain(|_, signal| signal.strong_count() > 0);
    if let Some(signal) = signals.get(&database).and_then(std::sync::Weak::upgrade) {
        return signal;
    }
    let signal = Arc::new(tokio::sync::watch::Sender::new(0));
    signals.insert(database, Arc::downgrade(&signal));
    signal
}

/// The database `db` reaches, where appends must tell daemons in this process themselves: a
/// SQLite file (by its canonical path; an in-memory database is its pool's own), a MySQL
/// server's database. `None` on PostgreSQL (its `NOTIFY` does it).
fn database_in_process(db: &DatabaseConnection) -> Option<String> {
    match db.get_database_backend() {
        #[cfg(feature = "sqlite")]
        DbBackend::Sqlite => {
            let file = std::fs::canonicalize(db.get_sqlite_connection_pool().connect_options().get_filename()).ok()?;
            Some(format!("sqlite:{}", file.display()))
        }
        #[cfg(feature = "mysql")]
        DbBackend::MySql => {
            let options = db.get_mysql_connection_pool().connect_options();
            let (host, port, socket) = (options.get_host(), options.get_port(), options.get_socket());
            Some(format!("mysql:{host}:{port}:{socket:?}/{}", options.get_database()?))
        }
        _ => None,
    }
}

/// The least time between two notifying appends of one store.
const NOTIFY_EVERY: std::time::Duration = std::time::Duration::from_millis(50);

impl Signals {
    /// Whether this append should notify (taking the turn if so).
    fn notify_now(&self) -> bool {
        if !self.notify.load(Ordering::Relaxed) {
            return false;
        }
        let now = self.started.elapsed().as_millis() as u64;
        let last = self.last_notify.load(Ordering::Relaxed);
        (last == u64::MAX || now >= last + NOTIFY_EVERY.as_millis() as u64)
            && self.last_notify.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_ok()
    }
}

impl EventStore {
    /// An event store over `db`. Run [`migrate`](crate::migrate) (or the migration crate) first.
    ///
    /// Make `db` with [`connect`](crate::connect), or [`configure`](crate::configure) your own
    /// options: a SQLite pool made otherwise misses WAL and the busy timeout, and a PostgreSQL
    /// pool behind a transaction-mode pooler needs its statement cache off.
    pub fn new(db: DatabaseConnection) -> Self {
        let signals = Signals {
            appends: appends_signal(&db),
            notify: true.into(),
            last_notify: u64::MAX.into(),
            started: std::time::Instant::now(),
        };
        Self {
            conn: Conn::pool(db),
            signals: Arc::new(signals),
            inline: Default::default(),
            group: Default::default(),
            upcasters: Default::default(),
            known_partitions: Default::default(),
            tenant: None,
        }
    }

    /// This store bound to one tenant: every call works in `tenant` (options that name no
    /// partition mean it; [`Error::OtherTenant`] for one that names another), and on
    /// PostgreSQL every statement it runs — appends, reads, inline projections, sessions and
    /// raw SQL on the store as a connection — runs with the tenant bound in its transaction
    /// (`SET LOCAL emt.tenant`, safe behind a transaction pooler). With row-level security on
    /// ([`rls`](crate::rls)) and a role that does not own the tables, the database then shows
    /// and takes that tenant's rows only, whatever the SQL. Bind before opening a session: a
    /// session's transaction is bound when it begins.
    ///
    /// ```no_run
    /// # async fn f(store: emmett_seaorm::EventStore) -> emmett_seaorm::Result<()> {
    /// use emmett_seaorm::{AppendOptions, ReadOptions};
    /// let acme = store.for_tenant("acme");
    /// let e = serde_json::json!({ "type": "Opened", "data": {} });
    /// acme.append_to_stream("cart-1", [e], AppendOptions::default()).await?; // in tenant `acme`
    /// let read = acme.read_stream::<serde_json::Value>("cart-1", ReadOptions::default()).await?;
    /// assert_eq!(read.events.len(), 1);
    /// # Ok(()) }
    /// ```
    pub fn for_tenant(&self, tenant: &str) -> EventStore {
        EventStore { conn: self.conn.for_tenant(tenant), tenant: Some(tenant.into()), ..self.clone() }
    }

    /// The store's connection (its tenant bound, if it is bound to one).
    pub(crate) fn conn(&self) -> &Conn {
        &self.conn
    }

    /// The tenant this store is bound to, if any ([`EventStore::for_tenant`]).
    pub fn tenant(&self) -> Option<&str> {
        self.tenant.as_deref()
    }

    /// Forgets that appends saw `partition`'s row (MySQL, `emt_partitions`): it was erased.
    pub(crate) fn forget_partition(&self, partition: &str) {
        self.known_partitions.lock().expect("not poisoned").remove(partition);
    }

    /// The partition a call that `asked` for one (or none) works in: the bound tenant, or
    /// [`DEFAULT_PARTITION`] when unbound and none was asked.
    pub(crate) fn partition<'a>(&'a self, asked: Option<&'a str>) -> Result<&'a str> {
        match (self.tenant.as_deref(), asked) {
            (Some(tenant), Some(asked)) if tenant != asked => {
                Err(Error::OtherTenant { tenant: tenant.to_owned(), partition: asked.to_owned() })
            }
            (Some(tenant), _) => Ok(tenant),
            (None, asked) => Ok(asked.unwrap_or(DEFAULT_PARTITION)),
        }
    }

    /// This store with `upcasters`: every read through it (and its clones, sessions, runners
    /// and daemons) brings stored events to the current versions of their types, and appends
    /// write those versions. [`Error::InvalidUpcasters`] for an inconsistent set.
    ///
    /// ```
    /// # async fn f(db: sea_orm::DatabaseConnection) -> emmett_seaorm::Result<()> {
    /// use emmett_seaorm::EventStore;
    /// use emmett_seaorm::upcast::{RawEvent, Upcasters};
    ///
    /// // `ItemAdded` v1 had `qty`; v2 calls it `quantity`.
    /// let upcasters = Upcasters::new().step("ItemAdded", 1, |mut e: RawEvent| {
    ///     e.rename_field("qty", "quantity");
    ///     vec![e]
    /// });
    /// let store = EventStore::new(db).with_upcasters(upcasters)?;
    /// # Ok(()) }
    /// ```
    pub fn with_upcasters(mut self, upcasters: Upcasters) -> Result<Self> {
        upcasters.check()?;
        self.upcasters = Arc::new(upcasters);
        Ok(self)
    }

    /// The store's upcasters.
    pub fn upcasters(&self) -> &Upcasters {
        &self.upcasters
    }

    /// Adds a projection run in every append's transaction ([`EventStore::inline`]).
    pub(crate) fn with_inline(mut self, projection: Arc<dyn inline::Inline>) -> Self {
        self.inline.0.push(projection);
        self
    }

    /// PostgreSQL: whether appends through this store and its clones send the `NOTIFY` that
    /// wakes projection daemons in other processes (default `true`; at most one append per
    /// 50 ms carries it). Without it, daemons elsewhere find the appends by polling.
    pub fn notifications(self, enabled: bool) -> Self {
        self.signals.notify.store(enabled, Ordering::Relaxed);
        self
    }

    /// A receiver that changes whenever an append through this store (or a clone) commits.
    pub(crate) fn appends(&self) -> tokio::sync::watch::Receiver<u64> {
        self.signals.appends.subscribe()
    }

    /// This store bound to `txn` (as in a session): its appends and queries run there.
    pub(crate) fn bound_to(&self, txn: Arc<DatabaseTransaction>) -> EventStore {
        EventStore { conn: Conn::Session(txn), ..self.clone() }
    }

    /// This store without inline projections.
    pub(crate) fn without_inline(mut self) -> EventStore {
        self.inline = Default::default();
        self
    }

    /// The transaction of a session store.
    pub(crate) fn transaction(&self) -> Option<&DatabaseTransaction> {
        match &self.conn {
            Conn::Pool { .. } => None,
            Conn::Session(txn) => Some(txn),
        }
    }

    /// The pool this store works on (`None` inside a session).
    pub(crate) fn pool(&self) -> Option<&DatabaseConnection> {
        self.conn.database()
    }

    /// Tells in-process listeners that an append committed.
    fn committed(&self) {
        self.signals.appends.send_modify(|n| *n += 1);
    }

    /// The connection (or the session's transaction) this store works on.
    pub(crate) fn executor(&self) -> &Conn {
        &self.conn
    }

    /// Appends `events` to a stream, creating it if needed, in one transaction.
    ///
    /// Fails with [`Error::ExpectedVersionConflict`] when `options.expected` does not hold,
    /// [`Error::EmptyAppend`] for no events, [`Error::InvalidIdentifier`] for a stream id,
    /// partition or event type the schema can't store; nothing is written then.
    ///
    /// Outside a session, a lost race (deadlock) or a lost connection is retried here. A retry
    /// after a connection broke during commit finds the events it already wrote by their
    /// message ids and returns their result, so an append is never written twice.
    #[tracing::instrument(name = "append", skip_all, fields(stream = stream_id, partition, events, position))]
    pub async fn append_to_stream<E: Event>(
        &self,
        stream_id: &str,
        events: impl IntoIterator<Item = E>,
        options: AppendOptions,
    ) -> Result<AppendResult> {
        let partition = self.partition(options.partition.as_deref())?;
        tracing::Span::current().record("partition", partition);
        check_stream(stream_id, partition)?;
        let stream_type = options.stream_type.as_deref().unwrap_or("unknown");
        limits::check_identifier("stream type", stream_type, MAX_IDENTIFIER_CHARS)?;
        let unstorable = |index: usize, what: &str| Error::UnstorableEvent {
            stream: stream_id.into(),
            partition: partition.into(),
            index,
            reason: format!("its {what} holds a NUL character (\\u0000), which PostgreSQL's jsonb can't store"),
        };
        let events = events
            .into_iter()
            .enumerate()
            .map(|(index, event)| {
                let encoded = encode(&event, stream_id)?;
                limits::check_identifier("event type", &encoded.message_type, MAX_IDENTIFIER_CHARS)?;
                if limits::holds_nul(&encoded.data) {
                    return Err(unstorable(index, "data"));
                }
                let version = crate::upcast::stored_version(self.upcasters.current_version(&encoded.message_type));
                let (message_type, data, id) = (encoded.message_type, encoded.data, options.message_id(index));
                Ok(NewEvent { message_type, data, id, version })
            })
            .collect::<Result<Vec<_>>>()?;
        if events.is_empty() {
            return Err(Error::EmptyAppend { stream: stream_id.into(), partition: partition.into() });
        }
        let count = events.len() as u64;
        // The new version must fit the schema's BIGINT; `Exact` beyond it can't match any stream.
        if let ExpectedVersion::Exact(v) = options.expected {
            if v > i64::MAX as u64 {
                return Err(self.conflict(stream_id, partition, options.expected).await);
            }
            if v.checked_add(count).is_none_or(|end| end > i64::MAX as u64) {
                let (stream, partition) = (stream_id.into(), partition.into());
                return Err(Error::OutOfRange { what: "expected version", value: v, stream, partition });
            }
        }
        let metadata = options.metadata.clone().unwrap_or_else(|| Value::Object(Default::default()));
        if limits::holds_nul(&metadata) {
            return Err(unstorable(0, "metadata"));
        }
        let notify = self.executor().get_database_backend() == DbBackend::Postgres && self.signals.notify_now();
        let known = self.known_partitions.lock().expect("not poisoned").contains(partition);
        let append = Arc::new(Append {
            stream_id: stream_id.to_owned(),
            partition: partition.to_owned(),
            stream_type: stream_type.to_owned(),
            expected: options.expected,
            metadata,
            events,
            partition_known: known,
            notify,
            returning_rows: !self.inline.is_empty(),
        });
        let appended = self.write(&append, options.idempotency_key.is_some()).await?;
        // (Outside a session only: a session's rollback takes a new partition's row with it.)
        let committed = matches!(self.conn, Conn::Pool { .. });
        if !known && committed && appended.is_some() && self.executor().get_database_backend() == DbBackend::MySql {
            self.known_partitions.lock().expect("not poisoned").insert(partition.to_owned());
        }
        if let Some(done) = &appended {
            tracing::Span::current().record("events", count).record("position", done.last_global_position);
            if matches!(self.conn, Conn::Pool { .. }) {
                self.committed();
            }
        }
        match appended {
            Some(done) => Ok(AppendResult {
                next_expected_stream_version: done.next_expected_version,
                last_event_global_position: done.last_global_position,
                created_new_stream: done.next_expected_version == count,
            }),
            None => Err(self.conflict(stream_id, partition, options.expected).await),
        }
    }

    /// Writes `append`: `None` when its expected version does not hold. Outside a session, lost
    /// races and lost connections are retried; an earlier attempt of this call (or, when
    /// `keyed`, a caller's earlier call with the same idempotency key) may have committed, and
    /// is then found by its message ids. Inside a session nothing is retried or looked up: a
    /// failed statement may have aborted the caller's transaction.
    async fn write(&self, append: &Arc<Append>, keyed: bool) -> Result<Option<backend::Appended>> {
        let pooled = matches!(self.conn, Conn::Pool { .. });
        let grouped = pooled && self.executor().get_database_backend() == DbBackend::Sqlite;
        let may_exist = AtomicBool::new(keyed);
        let attempt = || async {
            let written = match grouped {
                true => self.group.append(self, append).await,
                false => self.append_once(append).await,
            };
            let failure = match written {
                Ok(Some(done)) => return Ok(Some(done)),
                Ok(None) => None,
                Err(Error::Database(err)) if matches!(err.sql_err(), Some(SqlErr::UniqueConstraintViolation(_))) => {
                    Some(Error::Database(err))
                }
                Err(err) => {
                    if matches!(err, Error::ConnectionLost { .. }) {
                        may_exist.store(true, Ordering::Relaxed);
                    }
                    return Err(err);
                }
            };
            if pooled
                && (may_exist.load(Ordering::Relaxed) || failure.is_some())
                && let Some(done) = self.find_appended(append).await?
            {
                return Ok(Some(done));
            }
            failure.map_or(Ok(None), Err)
        };
        match pooled {
            true => attempt.retry(backend::retry_policy()).when(backend::is_retried).await,
            false => attempt().await,
        }
    }

    /// One attempt at `append` where this store works (its pool or its session's transaction,
    /// where it takes a savepoint), with the store's inline projections.
    async fn append_once(&self, append: &Append) -> Result<Option<backend::Appended>> {
        match self.inline.is_empty() {
            true => match self.conn.without_tenant() {
                Some(unbound) => backend::append(&unbound, append, true).await.map_err(Error::from),
                None => backend::append(self.executor(), append, false).await.map_err(Error::from),
            },
            false => self.inline.append(self, append).await,
        }
    }

    /// The result of `append` if its events are already stored (found by message id);
    /// [`Error::DuplicateMessage`] when their ids belong to other events.
    async fn find_appended(&self, append: &Append) -> Result<Option<backend::Appended>> {
        let ids = append.events.iter().map(|e| e.id.as_str());
        let rows = messages::Entity::find()
            .select_only()
            .columns([
                messages::Column::MessageId,
                messages::Column::StreamId,
                messages::Column::StreamPosition,
                messages::Column::GlobalPosition,
            ])
            .filter(messages::Column::Partition.eq(&append.partition))
            .filter(messages::Column::MessageId.is_in(ids))
            .into_tuple::<(String, String, i64, i64)>()
            .all(self.executor())
            .await?;
        if rows.is_empty() {
            return Ok(None);
        }
        // All of them, in this stream: that append. Anything else: the ids mean other events.
        let foreign =
            rows.iter().find(|row| row.1 != append.stream_id).or((rows.len() != append.events.len()).then(|| &rows[0]));
        if let Some((id, other, _, _)) = foreign {
            return Err(Error::DuplicateMessage {
                stream: append.stream_id.clone(),
                partition: append.partition.clone(),
                message_id: id.clone(),
                existing_stream: other.clone(),
            });
        }
        let last = rows.iter().max_by_key(|row| row.2).expect("not empty");
        Ok(Some(backend::Appended {
            next_expected_version: last.2 as u64,
            last_global_position: last.3 as u64,
            rows: Vec::new(),
        }))
    }

    /// Reads a stream's events in order. A missing stream is not an error: it reads as empty,
    /// with `stream_exists == false`.
    #[tracing::instrument(name = "read", skip_all, fields(stream = stream_id, partition = options.partition.as_deref()))]
    pub async fn read_stream<E: Event>(&self, stream_id: &str, options: ReadOptions) -> Result<ReadStreamResult<E>> {
        let partition = self.partition(options.partition.as_deref())?;
        check_stream(stream_id, partition)?;
        let version = self.stream_version(stream_id, partition).await?;
        check_expected(stream_id, partition, options.expected, version)?;
        let from = options.from.unwrap_or(1).max(1);
        // Read up to the version we saw, so events and version agree under concurrent appends.
        let to = options.to.map_or(version, |to| to.min(version));
        let events = match version {
            0 => Vec::new(),
            _ => self.read_range(stream_id, partition, from, to, options.max_count).await?.0,
        };
        Ok(ReadStreamResult { events, current_stream_version: version, stream_exists: version > 0 })
    }

    /// Folds a stream with the domain's `evolve`, page by page, so a stream of any length folds
    /// in bounded memory: the events [`read_stream`](Self::read_stream) would return with the
    /// same options (`from`, `to`, `max_count`). `options.expected` checks the version before
    /// folding.
    pub async fn aggregate_stream<E: Event, S>(
        &self,
        stream_id: &str,
        evolve: impl Fn(S, &E) -> S,
        initial_state: impl FnOnce() -> S,
        options: ReadOptions,
    ) -> Result<AggregateStreamResult<S>> {
        let partition = self.partition(options.partition.as_deref())?;
        check_stream(stream_id, partition)?;
        let version = self.stream_version(stream_id, partition).await?;
        check_expected(stream_id, partition, options.expected, version)?;
        let to = options.to.map_or(version, |to| to.min(version));
        let from = options.from.unwrap_or(1).max(1);
        // At most `max_count` events, as `read_stream` returns.
        let left = options.max_count.unwrap_or(u64::MAX);
        let state = self.fold_range(stream_id, partition, initial_state(), &evolve, from, to, left).await?;
        Ok(AggregateStreamResult { state, current_stream_version: version, stream_exists: version > 0 })
    }

    /// Folds stream positions `from..=to` (at most `left` stored rows) into `state`, page by page.
    #[allow(clippy::too_many_arguments)] // (the stream, the fold, the range: all distinct)
    async fn fold_range<E: Event, S>(
        &self,
        stream_id: &str,
        partition: &str,
        mut state: S,
        evolve: &impl Fn(S, &E) -> S,
        mut next: u64,
        to: u64,
        mut left: u64,
    ) -> Result<S> {
        while next <= to && left > 0 {
            let (page, read): (Vec<RecordedEvent<E>>, _) =
                self.read_range(stream_id, partition, next, to, Some(AGGREGATE_PAGE.min(left))).await?;
            let Some((rows, last)) = read else { break };
            (next, left) = (last + 1, left - rows);
            state = page.iter().fold(state, |state, recorded| evolve(state, &recorded.event));
        }
        Ok(state)
    }

    /// Whether the stream exists (and is not archived) in `partition`.
    pub async fn stream_exists(&self, stream_id: &str, partition: &str) -> Result<bool> {
        let partition = self.partition(Some(partition))?;
        check_stream(stream_id, partition)?;
        Ok(self.stream_version(stream_id, partition).await? > 0)
    }

    /// Archives a stream: its row and events become invisible to reads and appends, and the
    /// stream id can be used again. Returns `false` when there was no live stream to archive.
    ///
    /// The schema keeps one archived generation per stream: archiving a second generation
    /// fails with [`Error::AlreadyArchived`].
    pub async fn archive_stream(&self, stream_id: &str, partition: &str) -> Result<bool> {
        let partition = self.partition(Some(partition))?;
        check_stream(stream_id, partition)?;
        let txn = backend::begin_write(self.executor()).await?;
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
        // The row is locked now: no append can add an event the loop below would miss.
        let archived =
            streams::Entity::find_by_id((stream_id.to_owned(), partition.to_owned(), true)).one(&txn).await?;
        let version = archived.as_ref().map_or(0, |s| s.stream_position);
        // The events by their whole key, positions listed: matched on the stream id alone, MySQL
        // scans — and locks — the events of same-named streams of every other tenant too.
        let mut first = 1;
        while first <= version {
            let last = (first + ARCHIVE_CHUNK - 1).min(version);
            messages::Entity::update_many()
                .col_expr(messages::Column::IsArchived, Expr::value(true))
                .filter(messages::Column::StreamId.eq(stream_id))
                .filter(messages::Column::StreamPosition.is_in(first..=last))
                .filter(messages::Column::Partition.eq(partition))
                .filter(messages::Column::IsArchived.eq(false))
                .exec(&txn)
                .await?;
            first = last + 1;
        }
        // Its aggregate snapshot goes with it: a stream of the same id starts again from scratch.
        backend::aggregates::forget(&txn, partition, stream_id).await?;
        let done = archived.is_some();
        txn.commit().await?;
        Ok(done)
    }

    /// Runs `work` in one transaction: every append, and any query run on the session store
    /// (it is a SeaORM connection), commits together when `work` returns `Ok`, or not at all.
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
        let txn = Arc::new(backend::begin_write(self.executor()).await.map_err(Error::from)?);
        let outcome = work(self.bound_to(Arc::clone(&txn))).await;
        // A clone kept alive by `work` holds the transaction; it rolls back when dropped.
        let txn = Arc::into_inner(txn).ok_or(Error::SessionStillInUse)?;
        match outcome {
            Ok(value) => {
                txn.commit().await.map_err(Error::from)?;
                self.committed();
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
        let partition = self.partition(Some(partition))?;
        limits::check_identifier("partition", partition, MAX_IDENTIFIER_CHARS)?;
        Ok(backend::create_partition(self.executor(), partition).await?)
    }

    /// The stream's version, 0 when it does not exist.
    pub(crate) async fn stream_version(&self, stream_id: &str, partition: &str) -> Result<u64> {
        let key = (stream_id.to_owned(), partition.to_owned(), false);
        let row =
            reading(|| async { Ok(streams::Entity::find_by_id(key.clone()).one(self.executor()).await?) }).await?;
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

    /// Events `from..=to` of a stream from at most `limit` stored rows, at the current versions
    /// of their types; with how many rows were read and the last one's position (`None`: none).
    async fn read_range<E: Event>(
        &self,
        stream_id: &str,
        partition: &str,
        from: u64,
        to: u64,
        limit: Option<u64>,
    ) -> Result<(Vec<RecordedEvent<E>>, Option<(u64, u64)>)> {
        let query = messages::Entity::find()
            .filter(messages::Column::StreamId.eq(stream_id))
            .filter(messages::Column::Partition.eq(partition))
            .filter(messages::Column::IsArchived.eq(false))
            .filter(messages::Column::StreamPosition.between(limits::clamp(from), limits::clamp(to)))
            .order_by_asc(messages::Column::StreamPosition)
            .limit(limit.map(|n| limits::clamp(n) as u64));
        let rows =
            reading(|| async { Ok(query.clone().into_model::<StoredMessage>().all(self.executor()).await?) }).await?;
        let read = rows.last().map(|last| (rows.len() as u64, last.stream_position as u64));
        let mut events = Vec::with_capacity(rows.len());
        for row in rows {
            for row in row.upcast(&self.upcasters)? {
                events.push(row.decode()?);
            }
        }
        Ok((events, read))
    }
}

/// Runs a read, again after a lost connection or a busy database (a read is always safe to
/// repeat; inside a session the transaction is gone and it fails again at once). A read that
/// still fails never says it may have written.
async fn reading<T, Fut: Future<Output = Result<T>>>(read: impl FnMut() -> Fut) -> Result<T> {
    match read.retry(backend::retry_policy()).when(backend::is_retried).await {
        Err(Error::ConnectionLost { source, .. }) => Err(Error::ConnectionLost { maybe_written: false, source }),
        done => done,
    }
}

/// The store is a SeaORM connection: query your read models with it — inside
/// [`with_session`](EventStore::with_session), in the session's transaction.
///
/// ```no_run
/// # async fn f(store: emmett_seaorm::EventStore) -> Result<(), sea_orm::DbErr> {
/// use emmett_seaorm::schema::streams;
/// use sea_orm::EntityTrait;
/// let all_streams = streams::Entity::find().all(&store).await?;
/// # Ok(()) }
/// ```
#[async_trait::async_trait]
impl ConnectionTrait for EventStore {
    fn get_database_backend(&self) -> DbBackend {
        self.executor().get_database_backend()
    }
    async fn execute_raw(&self, stmt: Statement) -> Result<ExecResult, DbErr> {
        self.executor().execute_raw(stmt).await
    }
    async fn execute_unprepared(&self, sql: &str) -> Result<ExecResult, DbErr> {
        self.executor().execute_unprepared(sql).await
    }
    async fn query_one_raw(&self, stmt: Statement) -> Result<Option<QueryResult>, DbErr> {
        self.executor().query_one_raw(stmt).await
    }
    async fn query_all_raw(&self, stmt: Statement) -> Result<Vec<QueryResult>, DbErr> {
        self.executor().query_all_raw(stmt).await
    }
}

/// [`Error::InvalidIdentifier`] unless the stream id and partition can be stored.
fn check_stream(stream_id: &str, partition: &str) -> Result<()> {
    limits::check_identifier("stream id", stream_id, MAX_IDENTIFIER_CHARS)?;
    limits::check_identifier("partition", partition, MAX_IDENTIFIER_CHARS)
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
