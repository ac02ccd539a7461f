//! Snapshot projections: a read model kept by folding events with the domain's `evolve`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, OnceLock};

use sea_orm::sea_query::QueryBuilder;
use sea_orm::sea_query::{
    Alias, CaseStatement, CommonTableExpression, Condition, Expr, ExprTrait, InsertStatement, LockType, OnConflict,
    Query, SimpleExpr, WithClause,
};
use sea_orm::{ColumnTrait, ConnectionTrait, DbBackend, EntityTrait, QueryFilter, QuerySelect};
use serde::{Serialize, de::DeserializeOwned};

use super::registry::Feed;
use super::{Columns, Keys, ProjectionContext};
use crate::error::{Error, Result};
use crate::event::{RecordedEvent, json_column};
use crate::limits::{self, MAX_SNAPSHOT_ID_CHARS};
use crate::schema::{messages, snapshots};

/// Rows per multi-row statement. The "10x slower past 100 rows" measured before was Nagle's
/// 40 ms stall (see `connect`); with `TCP_NODELAY`, `project-interleaved` (batches of 500 rows,
/// PostgreSQL 15, 3 runs each) gave 16.8–22.4k events/s at 100 rows, 17.5–24.6k at 250 and
/// 20.5–22.2k at 500: no difference beyond noise. Chunks stay, so any `batch_size` keeps each
/// statement far below the backends' bound-parameter limits (SQLite 32,766; MySQL, PostgreSQL 65,535).
const ROWS_PER_STATEMENT: usize = 100;

type KeysFn<E> = dyn Fn(&RecordedEvent<E>, &str) -> Keys + Send + Sync;
type ColumnsFn<S> = dyn Fn(&S) -> Columns + Send + Sync;
type EvolveFn<E, S> = dyn Fn(S, &E) -> S + Send + Sync;

/// Where a snapshot projection keeps its state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Storage {
    /// In the central `snapshots` table; the read-model row holds keys and mapped columns.
    SnapshotTable,
    /// In the read-model row: `snapshot`, `stream_id`, `last_stream_position`, `last_global_position`.
    InTable,
}

/// A read model defined by the domain's own `evolve`.
///
/// Per batch, each read-model row's snapshot is locked once (`SELECT … FOR UPDATE`; SQLite's
/// write transaction is exclusive), the batch's events for that row are folded in memory —
/// skipping those at or below the snapshot's last position, so re-runs are no-ops — and the
/// snapshot and row are written once. A row created by two batches at once is a lost race,
/// run again. An inline projection folds every event of its append (a row fed by several
/// streams gets each, whatever order the appends commit in); a run over partitions refuses a
/// row another tenant wrote last with `Error::SharedRowAcrossPartitions` rather than guess.
///
/// Table, key and column names are quoted identifiers, never spliced into SQL.
pub struct SnapshotProjection<E, S> {
    table: String,
    pub(crate) event_types: Option<Vec<String>>,
    extract_keys: Box<KeysFn<E>>,
    evolve: Box<EvolveFn<E, S>>,
    initial_state: Box<dyn Fn() -> S + Send + Sync>,
    map_to_columns: Option<Box<ColumnsFn<S>>>,
    storage: Storage,
    tenant_column: Option<String>,
    key_names: OnceLock<Vec<String>>,
    /// The read-model table's columns, once it was checked (see `check_table`).
    table_columns: Mutex<Option<Arc<BTreeSet<String>>>>,
}

impl<E, S> SnapshotProjection<E, S> {
    /// A projection into `table` (its rows keyed by `extract_keys`), folding with `evolve` from
    /// `initial_state`. The state lives in the central `snapshots` table.
    pub fn new(
        table: impl Into<String>,
        extract_keys: impl Fn(&RecordedEvent<E>, &str) -> Keys + Send + Sync + 'static,
        evolve: impl Fn(S, &E) -> S + Send + Sync + 'static,
        initial_state: impl Fn() -> S + Send + Sync + 'static,
    ) -> Self {
        Self {
            table: table.into(),
            event_types: None,
            extract_keys: Box::new(extract_keys),
            evolve: Box::new(evolve),
            initial_state: Box::new(initial_state),
            map_to_columns: None,
            storage: Storage::SnapshotTable,
            tenant_column: None,
            key_names: OnceLock::new(),
            table_columns: Mutex::default(),
        }
    }

    /// Only these event types feed the projection (default: every event of the stream or partition).
    pub fn handles<'a>(mut self, event_types: impl IntoIterator<Item = &'a str>) -> Self {
        self.event_types = Some(event_types.into_iter().map(str::to_owned).collect());
        self
    }

    /// Denormalises the state into read-model columns; called once per written state.
    pub fn columns(mut self, map_to_columns: impl Fn(&S) -> Columns + Send + Sync + 'static) -> Self {
        self.map_to_columns = Some(Box::new(map_to_columns));
        self
    }

    /// Legacy mode: keep the state in the read-model row itself, in the columns `snapshot`,
    /// `stream_id`, `last_stream_position` and `last_global_position`.
    pub fn in_table(mut self) -> Self {
        self.storage = Storage::InTable;
        self
    }

    /// Names the key column that holds the tenant (the key `extract_keys` fills with the
    /// partition): erasing a tenant removes its rows and snapshots of this read model (see
    /// [`ReadModel`](super::ReadModel)).
    pub fn tenant_column(mut self, column: impl Into<String>) -> Self {
        self.tenant_column = Some(column.into());
        self
    }

    /// The read model as tenant operations see it, if [`tenant_column`](Self::tenant_column)
    /// named its tenant column.
    pub(crate) fn read_model(&self) -> Option<super::ReadModel> {
        self.tenant_column.as_ref().map(|column| super::ReadModel::new(&self.table, column))
    }

    /// The read model's table (`schema.table` when qualified).
    pub fn table(&self) -> &str {
        &self.table
    }

    /// The table as SQL names it: `schema.table` is a table of that schema.
    fn table_name(&self) -> sea_orm::sea_query::TableName {
        match self.table.split_once('.') {
            Some((schema, table)) => (Alias::new(schema), Alias::new(table)).into(),
            None => Alias::new(&self.table).into(),
        }
    }

    /// Checks the read-model table on the first batch (again after a failed check): it exists,
    /// has the key columns (and the snapshot columns in legacy mode), and a primary or unique
    /// key over exactly the key columns — the upsert's conflict target. Returns its columns.
    async fn check_table(&self, ctx: &ProjectionContext<'_>, keys: &Keys) -> Result<Arc<BTreeSet<String>>> {
        if let Some(columns) = self.table_columns.lock().expect("not poisoned").clone() {
            return Ok(columns);
        }
        let invalid = |reason: String| Error::InvalidReadModel { table: self.table.clone(), reason };
        let key_names: BTreeSet<String> = keys.keys().cloned().collect();
        let mut required = key_names.clone();
        if self.storage == Storage::InTable {
            required.extend(IN_TABLE_COLUMNS.map(String::from));
        }
        let Some(shape) = crate::backend::table_shape(ctx.txn, &self.table).await? else {
            return Err(invalid(format!(
                "the table does not exist; create it with the columns ({}) and a primary key over ({})",
                list(&required),
                list(&key_names)
            )));
        };
        let missing: BTreeSet<String> = required.into_iter().filter(|c| !shape.columns.contains_key(c)).collect();
        if !missing.is_empty() {
            return Err(invalid(format!("the columns ({}) do not exist", list(&missing))));
        }
        if !shape.unique_keys.contains(&key_names) {
            return Err(invalid(format!(
                "no primary or unique key over exactly ({}); rows are upserted by these keys, so create one",
                list(&key_names)
            )));
        }
        // A key column that can't tell two distinct ids apart (MySQL's default collations: case,
        // accents, trailing spaces) would let tenants or keys overwrite each other's rows.
        for (column, collation) in &shape.columns {
            if let Some(collation) = collation.as_deref().filter(|_| key_names.contains(column)) {
                let table = &self.table;
                let fix = match ctx.backend() {
                    DbBackend::MySql => format!(
                        "ALTER TABLE {table} MODIFY {column} VARCHAR(255) CHARACTER SET utf8mb4 \
                         COLLATE <migrations::exact_collation()> NOT NULL"
                    ),
                    DbBackend::Postgres => format!("ALTER TABLE {table} ALTER {column} TYPE text COLLATE \"C\""),
                    _ => format!("declare {column} without COLLATE {collation}"),
                };
                return Err(invalid(format!(
                    "key column `{column}` compares text inexactly ({collation}): ids differing only in case, \
                     accents or trailing spaces are one key, so rows of distinct tenants or keys would overwrite \
                     each other; make it exact: {fix}"
                )));
            }
        }
        let columns = Arc::new(shape.columns.into_keys().collect::<BTreeSet<_>>());
        *self.table_columns.lock().expect("not poisoned") = Some(Arc::clone(&columns));
        Ok(columns)
    }

    /// Every event must yield the same key names: a projection's rows have one primary key.
    fn check_key_names(&self, keys: &Keys) -> Result<()> {
        let found: Vec<String> = keys.keys().cloned().collect();
        let expected = self.key_names.get_or_init(|| found.clone());
        if *expected != found {
            return Err(Error::KeySetMismatch { projection: self.table.clone(), expected: expected.clone(), found });
        }
        Ok(())
    }
}

/// Runs the domain's code (`evolve`, `extract_keys`) on `event`; a panic becomes the event's
/// [`Error::Handler`], so it fails the batch (and parks only its tenant in the daemon).
fn catch<E, T>(event: &RecordedEvent<E>, code: impl FnOnce() -> T) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(code))
        .map_err(|panic| event.handler_failed(crate::error::panicked(panic)))
}

/// The columns that hold the state in legacy (in-table) mode.
const IN_TABLE_COLUMNS: [&str; 4] = ["snapshot", "stream_id", "last_stream_position", "last_global_position"];

/// `a, b, c`.
fn list(names: &BTreeSet<String>) -> String {
    names.iter().map(String::as_str).collect::<Vec<_>>().join(", ")
}

/// The keys of one read-model row, encoded exactly like the TypeScript `constructStreamId`:
/// sorted by name as JavaScript compares strings (by UTF-16 code units, which differs from
/// Rust's byte order when names mix characters above U+FFFF with ones in U+E000–U+FFFF),
/// `encodeURIComponent(name):encodeURIComponent(value)`, joined by `|`.
///
/// ```
/// let keys = emmett_seaorm::keys! { "tenant_id" => "t|1", "cart_id" => "cart-1" };
/// assert_eq!(emmett_seaorm::projection::construct_stream_id(&keys), "cart_id:cart-1|tenant_id:t%7C1");
/// ```
pub fn construct_stream_id(keys: &Keys) -> String {
    let mut sorted: Vec<(&String, &sea_orm::Value)> = keys.iter().collect();
    sorted.sort_by(|(a, _), (b, _)| a.encode_utf16().cmp(b.encode_utf16()));
    sorted.into_iter().map(|(k, v)| stream_id_part(k, &key_text(v))).collect::<Vec<_>>().join("|")
}

/// The part of every [`construct_stream_id`] of a row whose key `name` is `value`.
pub(crate) fn stream_id_part(name: &str, value: &str) -> String {
    format!("{}:{}", encode_uri_component(name), encode_uri_component(value))
}

/// The value of key `name` in a [`construct_stream_id`] (as text), if it has that key.
pub(crate) fn key_value(stream_id: &str, name: &str) -> Option<String> {
    let prefix = format!("{}:", encode_uri_component(name));
    let encoded = stream_id.split('|').find_map(|part| part.strip_prefix(&prefix))?;
    decode_uri_component(encoded)
}

/// A key value as text, as JavaScript's `String(value)` gives it for the usual key types
/// (strings, integers, booleans, UUIDs); `null` for NULL.
fn key_text(value: &sea_orm::Value) -> String {
    use sea_orm::Value as V;
    let text = match value {
        V::String(s) => s.clone(),
        V::Char(c) => c.map(String::from),
        V::Bool(b) => b.map(|b| b.to_string()),
        V::TinyInt(n) => n.map(|n| n.to_string()),
        V::SmallInt(n) => n.map(|n| n.to_string()),
        V::Int(n) => n.map(|n| n.to_string()),
        V::BigInt(n) => n.map(|n| n.to_string()),
        V::TinyUnsigned(n) => n.map(|n| n.to_string()),
        V::SmallUnsigned(n) => n.map(|n| n.to_string()),
        V::Unsigned(n) => n.map(|n| n.to_string()),
        V::BigUnsigned(n) => n.map(|n| n.to_string()),
        // JavaScript's number formatting (`1e+21`, `5e-7`, `0` for -0), not Rust's.
        V::Float(n) => n.map(|n| ryu_js::Buffer::new().format(f64::from(n)).to_owned()),
        V::Double(n) => n.map(|n| ryu_js::Buffer::new().format(n).to_owned()),
        V::Uuid(u) => u.map(|u| u.to_string()),
        other => Some(sea_orm::sea_query::PostgresQueryBuilder.value_to_string(other).trim_matches('\'').to_owned()),
    };
    text.unwrap_or_else(|| "null".to_owned())
}

/// JavaScript's `decodeURIComponent` of what [`encode_uri_component`] wrote (`None` if malformed).
fn decode_uri_component(s: &str) -> Option<String> {
    let mut bytes = Vec::with_capacity(s.len());
    let mut rest = s.as_bytes();
    while let Some((&b, tail)) = rest.split_first() {
        if b == b'%' {
            let hex = std::str::from_utf8(tail.get(..2)?).ok()?;
            bytes.push(u8::from_str_radix(hex, 16).ok()?);
            rest = &tail[2..];
        } else {
            bytes.push(b);
            rest = tail;
        }
    }
    String::from_utf8(bytes).ok()
}

/// JavaScript's `encodeURIComponent`.
pub(crate) fn encode_uri_component(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.!~*'()".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A locked row's last global position and its snapshot (`None`: NULL; `Err`: not JSON).
type Stored = (i64, Option<serde_json::Result<serde_json::Value>>);

/// One read-model row of a batch: its keys, its events, and what folding them gave.
struct Row<'a, E, S> {
    keys: Keys,
    events: Vec<&'a RecordedEvent<E>>,
    state: Option<S>,
    last: Option<&'a RecordedEvent<E>>,
    /// The stored snapshot's global position (0 for a new one).
    folded: i64,
}

/// The stream and partition of the event at each global position (a row's last writer).
type Writers = BTreeMap<i64, (String, String)>;

/// Whether a row stored at `position` may hold some of `events` (at or below it).
fn holds_some<E>(position: i64, events: &[&RecordedEvent<E>]) -> bool {
    position > 0 && events.iter().any(|e| e.global_position as i64 <= position)
}

/// The type-erased face of a snapshot projection, as the registry runs it.
#[async_trait::async_trait]
pub(crate) trait Fold<E>: Send + Sync {
    async fn fold(&self, ctx: &ProjectionContext<'_>, events: &[&RecordedEvent<E>]) -> Result<()>;
}

#[async_trait::async_trait]
impl<E, S> Fold<E> for SnapshotProjection<E, S>
where
    E: Send + Sync,
    S: Serialize + DeserializeOwned + Send + Sync,
{
    async fn fold(&self, ctx: &ProjectionContext<'_>, events: &[&RecordedEvent<E>]) -> Result<()> {
        let mut rows: BTreeMap<String, Row<'_, E, S>> = BTreeMap::new();
        for &event in events {
            let keys = catch(event, || (self.extract_keys)(event, &event.partition))?;
            self.check_key_names(&keys)?;
            let id = construct_stream_id(&keys);
            limits::check_identifier("snapshot id", &id, MAX_SNAPSHOT_ID_CHARS)?;
            rows.entry(id)
                .or_insert_with(|| Row { keys, events: Vec::new(), state: None, last: None, folded: 0 })
                .events
                .push(event);
        }
        let Some(first) = rows.values().next() else { return Ok(()) };
        let table_columns = self.check_table(ctx, &first.keys).await?;
        let (mut stored, absent) = match self.storage {
            Storage::SnapshotTable => {
                let ids: Vec<(&str, &str)> =
                    rows.iter().map(|(id, row)| (id.as_str(), row.events[0].partition.as_str())).collect();
                self.lock_snapshots(ctx, &ids).await?
            }
            Storage::InTable => {
                let stored = self.lock_rows(ctx, &rows).await?;
                // PostgreSQL locks nothing for a row that does not exist: its insert must not
                // overwrite one another batch created meanwhile (see `read_model_upserts`).
                let absent = match ctx.backend() {
                    DbBackend::Postgres => rows.keys().filter(|id| !stored.contains_key(*id)).cloned().collect(),
                    _ => BTreeSet::new(),
                };
                (stored, absent)
            }
        };
        // A rebuild folds every row again from the initial state; not a row another tenant's
        // events fed, which a rebuild of this one would wipe.
        let mut discarded = Vec::new();
        for (id, row) in rows.iter() {
            if ctx.replay.is_some_and(|r| r.first_time(&self.table, id))
                && let Some((position, _)) = stored.remove(id)
            {
                discarded.push((id.as_str(), position, row.events[0].partition.as_str()));
            }
        }
        // The last writers of the rows whose position a check needs, read at once.
        let overlapping = rows.iter().filter_map(|(id, row)| {
            let position = stored.get(id).map(|(position, _)| *position)?;
            (ctx.feed != Feed::Append && holds_some(position, &row.events)).then_some(position)
        });
        let positions = discarded.iter().map(|(_, position, _)| *position).chain(overlapping);
        let writers = self.last_writers(ctx, positions.filter(|p| *p > 0).collect()).await?;
        self.check_rebuilt_alone(&discarded, &writers)?;
        for (id, row) in rows.iter_mut() {
            let stored = stored.remove(id);
            let (folded, mut state) = match stored {
                Some((position, json)) => (position, self.decode(id, json)?),
                None => (0, (self.initial_state)()),
            };
            // Events up to the snapshot's position are in it, unless they were just appended;
            // the events one stored row became (an upcaster's split) share its position, so all
            // of them are folded or none.
            let in_snapshot = match ctx.feed {
                Feed::Stream(stream) => self.check_fed_alone(id, folded, &row.events, Some(stream), &writers)?,
                Feed::Partitions => self.check_fed_alone(id, folded, &row.events, None, &writers)?,
                Feed::Append => 0,
            };
            for &event in row.events.iter().filter(|e| e.global_position as i64 > in_snapshot) {
                state = catch(event, || (self.evolve)(state, &event.event))?;
                row.last = Some(event);
            }
            row.state = row.last.is_some().then_some(state);
            row.folded = folded;
        }
        rows.retain(|_, row| row.last.is_some());
        self.write(ctx, &rows, &absent, &table_columns).await
    }
}

impl<E, S> SnapshotProjection<E, S>
where
    E: Send + Sync,
    S: Serialize + DeserializeOwned + Send + Sync,
{
    /// A run skips events at or below the row's last global position as already folded
    /// (returned: the position up to which the row holds the batch's events). That holds when
    /// the row's last writer (in `writers`) is the events' own partition and, in a per-stream
    /// run (`stream`), their own stream: each folds its events in order. When another wrote it
    /// last, the order of the runs decides, and skipping could lose events: fail with
    /// [`Error::SharedRow`] (another stream) or [`Error::SharedRowAcrossPartitions`] instead.
    fn check_fed_alone(
        &self,
        id: &str,
        last_global: i64,
        events: &[&RecordedEvent<E>],
        stream: Option<&str>,
        writers: &Writers,
    ) -> Result<i64> {
        if !holds_some(last_global, events) {
            return Ok(last_global);
        }
        let mut partitions: Vec<String> = Vec::new();
        for event in events.iter().filter(|e| e.global_position as i64 <= last_global) {
            if !partitions.contains(&event.partition) {
                partitions.push(event.partition.clone());
            }
        }
        let (table, row) = (self.table.clone(), id.to_owned());
        match writers.get(&last_global).cloned() {
            Some((_, partition)) if partitions.iter().any(|p| *p != partition) => {
                partitions.retain(|p| *p != partition);
                partitions.insert(0, partition);
                Err(Error::SharedRowAcrossPartitions { table, row, partitions })
            }
            None => {
                partitions.insert(0, "(its events are gone)".to_owned());
                Err(Error::SharedRowAcrossPartitions { table, row, partitions })
            }
            Some((other, _)) if stream.is_some_and(|s| s != other) => {
                Err(Error::SharedRow { table, row, streams: vec![other, stream.unwrap_or_default().to_owned()] })
            }
            Some(_) => Ok(last_global),
        }
    }

    /// A rebuild starts the rows `discarded` (`(id, stored position, the batch's partition)`)
    /// over: each must have been written last (`writers`) by the partition being rebuilt, or by
    /// events no longer stored; one another tenant wrote last fails with
    /// [`Error::SharedRowAcrossPartitions`] instead of losing that tenant's events.
    fn check_rebuilt_alone(&self, discarded: &[(&str, i64, &str)], writers: &Writers) -> Result<()> {
        for (id, position, partition) in discarded {
            if let Some((_, writer)) = writers.get(position).filter(|(_, w)| w != partition) {
                let partitions = vec![writer.clone(), partition.to_string()];
                return Err(Error::SharedRowAcrossPartitions {
                    table: self.table.clone(),
                    row: id.to_string(),
                    partitions,
                });
            }
        }
        Ok(())
    }

    /// The stream and partition of the events still stored at `positions` (rows' last writers):
    /// one read per 1,000, none for no positions.
    async fn last_writers(&self, ctx: &ProjectionContext<'_>, positions: Vec<i64>) -> Result<Writers> {
        let mut writers = Writers::new();
        for chunk in positions.chunks(1000) {
            let found: Vec<(i64, String, String)> = messages::Entity::find()
                .select_only()
                .columns([messages::Column::GlobalPosition, messages::Column::StreamId, messages::Column::Partition])
                .filter(messages::Column::GlobalPosition.is_in(chunk.iter().copied()))
                .into_tuple()
                .all(ctx.txn)
                .await?;
            writers.extend(found.into_iter().map(|(position, stream, partition)| (position, (stream, partition))));
        }
        Ok(writers)
    }

    /// A database error from the read-model table, named with the table unless it is one the
    /// run retries (busy, connection lost).
    fn read_model_error(&self, err: sea_orm::DbErr) -> Error {
        match Error::from(err) {
            Error::Database(source) => Error::ReadModel { table: self.table.clone(), source },
            other => other,
        }
    }

    /// The stored state; the initial state for a new (NULL or JSON `null`) snapshot.
    fn decode(&self, id: &str, json: Option<serde_json::Result<serde_json::Value>>) -> Result<S> {
        let corrupt = |source| Error::CorruptSnapshot { table: self.table.clone(), stream_id: id.to_owned(), source };
        match json.transpose().map_err(corrupt)? {
            None | Some(serde_json::Value::Null) => Ok((self.initial_state)()),
            Some(json) => serde_json::from_value(json).map_err(corrupt),
        }
    }

    /// Snapshot-table mode: locks and loads the batch's snapshots, and the ids of those that
    /// have no row yet (PostgreSQL; the other backends create them as placeholders).
    async fn lock_snapshots(
        &self,
        ctx: &ProjectionContext<'_>,
        ids: &[(&str, &str)],
    ) -> Result<(BTreeMap<String, Stored>, BTreeSet<String>)> {
        let (mut stored, mut absent) = (BTreeMap::new(), BTreeSet::new());
        for chunk in ids.chunks(ROWS_PER_STATEMENT) {
            let locked = crate::backend::lock_snapshots(ctx.txn, &self.table, chunk).await?;
            for row in locked.rows {
                let id: String = row.try_get("", "stream_id")?;
                stored.insert(id, (row.try_get("", "last_global_position")?, json_column(&row, "", "snapshot")?));
            }
            absent.extend(locked.absent);
        }
        Ok((stored, absent))
    }

    /// In-table mode: locks the existing read-model rows of the batch, in key order, a
    /// statement per [`ROWS_PER_STATEMENT`] rows (one per row took a round trip each). Each
    /// found row says which of the batch's rows it is by a `CASE` over their keys, compared by
    /// the database as the `WHERE` is, so no key is read back and converted.
    async fn lock_rows(
        &self,
        ctx: &ProjectionContext<'_>,
        rows: &BTreeMap<String, Row<'_, E, S>>,
    ) -> Result<BTreeMap<String, Stored>> {
        let mut stored = BTreeMap::new();
        let rows: Vec<(&String, &Row<'_, E, S>)> = rows.iter().collect();
        for chunk in rows.chunks(ROWS_PER_STATEMENT) {
            // (Every row of a batch has the same key names: `check_key_names`.)
            let names: Vec<Alias> = chunk[0].1.keys.keys().map(Alias::new).collect();
            let columns = || Expr::tuple(names.iter().map(|name| Expr::col(name.clone())));
            let keys = |row: &Row<'_, E, S>| Expr::tuple(row.keys.values().map(|v| Expr::val(v.clone())));
            let mut which = CaseStatement::new();
            for (i, (_, row)) in chunk.iter().enumerate() {
                which = which.case(columns().eq(keys(row)), i as i64);
            }
            let mut select = Query::select();
            select
                .expr_as(which, Alias::new("emt_row"))
                .expr_as(Expr::col(Alias::new("last_global_position")), Alias::new("last_global_position"))
                .expr_as(Expr::col(Alias::new("snapshot")), Alias::new("snapshot"))
                .from(self.table_name())
                .cond_where(chunk.iter().fold(Condition::any(), |any, (_, row)| any.add(columns().eq(keys(row)))))
                .lock(LockType::Update);
            for name in &names {
                select.order_by(name.clone(), sea_orm::Order::Asc);
            }
            for found in ctx.txn.query_all(&select).await.map_err(|err| self.read_model_error(err))? {
                let which: i64 = found.try_get("", "emt_row")?;
                let Some((id, _)) = chunk.get(which as usize) else { continue };
                let position: Option<i64> = found.try_get("", "last_global_position")?;
                stored.insert((*id).clone(), (position.unwrap_or(0), json_column(&found, "", "snapshot")?));
            }
        }
        Ok(stored)
    }

    /// Writes every folded row: the snapshot (central table or in the row) and the read-model row.
    /// `absent`: the snapshots (or, in-table, read-model rows) without a row (PostgreSQL),
    /// which another batch must not have created meanwhile.
    async fn write(
        &self,
        ctx: &ProjectionContext<'_>,
        rows: &BTreeMap<String, Row<'_, E, S>>,
        absent: &BTreeSet<String>,
        table_columns: &BTreeSet<String>,
    ) -> Result<()> {
        let rows: Vec<(&String, &Row<'_, E, S>)> = rows.iter().collect();
        for chunk in rows.chunks(ROWS_PER_STATEMENT) {
            let mut written = Vec::with_capacity(chunk.len());
            for (id, row) in chunk {
                let (state, last) = (row.state.as_ref().expect("folded"), row.last.expect("folded"));
                let snapshot = serde_json::to_value(state)?;
                let columns = self.map_to_columns.as_ref().map(|map| map(state)).unwrap_or_default();
                if let Some(missing) = columns.keys().find(|c| !table_columns.contains(*c)) {
                    *self.table_columns.lock().expect("not poisoned") = None; // look again next time
                    let reason = format!("the column '{missing}' (from map_to_columns) does not exist");
                    return Err(Error::InvalidReadModel { table: self.table.clone(), reason });
                }
                // (An append's events may fold after a later position's: the row keeps the highest.)
                let position = Ord::max(row.folded, last.global_position as i64);
                written.push(Written { id: id.as_str(), keys: &row.keys, snapshot, last, position, columns });
            }
            let mut upserts = self.read_model_upserts(&written, absent);
            if self.storage == Storage::SnapshotTable {
                let (new, old): (Vec<_>, Vec<_>) = written.iter().partition(|w| absent.contains(w.id));
                let snapshots = [self.snapshots_insert(&new, false), self.snapshots_insert(&old, true)];
                let mut with = WithClause::new();
                for (i, snapshots) in snapshots.into_iter().flatten().enumerate() {
                    match ctx.backend() {
                        // One statement writes snapshots and rows: a round trip less per batch.
                        DbBackend::Postgres => {
                            let name = format!("emt_snapshots_{i}");
                            with.cte(CommonTableExpression::new().query(snapshots).table_name(name).to_owned());
                        }
                        _ => {
                            ctx.txn.execute(&snapshots).await?;
                        }
                    }
                }
                if ctx.backend() == DbBackend::Postgres {
                    upserts[0].0.with_cte(with);
                }
            }
            let lost_race =
                |what: &str| Error::from(crate::backend::lost_race(&format!("another batch created {what}")));
            for (upsert, new_rows) in upserts {
                let done =
                    ctx.txn.execute(&upsert).await.map_err(|err| match crate::backend::is_snapshot_taken(&err) {
                        true => lost_race(&format!("a snapshot of '{}'", self.table)),
                        false => self.read_model_error(err),
                    })?;
                if new_rows.is_some_and(|rows| done.rows_affected() < rows) {
                    return Err(lost_race(&format!("a row of '{}'", self.table)));
                }
            }
        }
        Ok(())
    }

    /// The snapshots of `written` as one insert (none for no rows), an upsert if `existing`.
    fn snapshots_insert(&self, written: &[&Written<'_, E>], existing: bool) -> Option<InsertStatement> {
        if written.is_empty() {
            return None;
        }
        let mut upsert = snapshots::insert_all_columns();
        for Written { id, snapshot, last, position, .. } in written {
            upsert.values_panic([
                self.table.as_str().into(),
                (*id).into(),
                (last.stream_position as i64).into(),
                (*position).into(),
                snapshot.clone().into(),
                last.partition.as_str().into(),
            ]);
        }
        if existing {
            upsert.on_conflict(
                OnConflict::columns([snapshots::Column::ReadmodelTableName, snapshots::Column::StreamId])
                    .update_columns([
                        snapshots::Column::LastStreamPosition,
                        snapshots::Column::LastGlobalPosition,
                        snapshots::Column::Snapshot,
                        snapshots::Column::Partition,
                    ])
                    .to_owned(),
            );
        }
        Some(upsert)
    }

    /// Upserts keys + mapped columns (+ the snapshot columns in in-table mode), at least one.
    /// Rows whose mapped column names differ go in separate statements, since one statement
    /// has one column list. In-table rows in `absent` are inserted apart, with the number of
    /// rows each statement must insert: one another batch created meanwhile is skipped
    /// (`ON CONFLICT DO NOTHING` waits for that batch), a lost race.
    fn read_model_upserts(
        &self,
        written: &[Written<'_, E>],
        absent: &BTreeSet<String>,
    ) -> Vec<(InsertStatement, Option<u64>)> {
        type Shape = (bool, Vec<String>);
        let mut by_shape: BTreeMap<Shape, Vec<(Vec<SimpleExpr>, &Keys)>> = BTreeMap::new();
        for Written { id, keys, snapshot, last, position, columns } in written {
            let mut names: Vec<String> = keys.keys().cloned().collect();
            let mut values: Vec<SimpleExpr> = keys.values().map(|v| Expr::val(v.clone())).collect();
            if self.storage == Storage::InTable {
                names.extend(IN_TABLE_COLUMNS.map(String::from));
                values.extend([
                    snapshot.clone().into(),
                    last.stream_id.as_str().into(),
                    (last.stream_position as i64).into(),
                    (*position).into(),
                ]);
            }
            for (name, value) in columns {
                names.push(name.clone());
                values.push(Expr::val(value.clone()));
            }
            let new = self.storage == Storage::InTable && absent.contains(*id);
            by_shape.entry((new, names)).or_default().push((values, keys));
        }
        let statements = by_shape.into_iter().map(|((new, names), rows)| {
            let (key_count, count) = (rows[0].1.len(), rows.len() as u64);
            let mut upsert = Query::insert();
            upsert.into_table(self.table_name()).columns(names.iter().map(Alias::new));
            for (values, _) in rows {
                upsert.values_panic(values);
            }
            let key_columns = names[..key_count].iter().map(Alias::new);
            let updated: Vec<Alias> = names[key_count..].iter().map(Alias::new).collect();
            let on_conflict = if updated.is_empty() || new {
                OnConflict::columns(key_columns).do_nothing_on(names[..1].iter().map(Alias::new)).to_owned()
            } else {
                OnConflict::columns(key_columns).update_columns(updated).to_owned()
            };
            upsert.on_conflict(on_conflict);
            (upsert, new.then_some(count))
        });
        statements.collect()
    }
}

/// A folded row ready to write.
struct Written<'a, E> {
    /// The snapshot id.
    id: &'a str,
    keys: &'a Keys,
    snapshot: serde_json::Value,
    /// The last event folded.
    last: &'a RecordedEvent<E>,
    /// The global position the row holds every event up to.
    position: i64,
    /// The mapped columns.
    columns: Columns,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_ids_match_encode_uri_component() {
        let keys = crate::keys! { "tenant_id" => "t|1", "cart_id" => "c 1/ä", "a" => "x-_.!~*'()" };
        assert_eq!(construct_stream_id(&keys), "a:x-_.!~*'()|cart_id:c%201%2F%C3%A4|tenant_id:t%7C1");
    }

    #[test]
    fn a_key_is_read_back_from_a_stream_id() {
        let keys = crate::keys! { "tenant id" => "t|1 ä", "cart_id" => "c:1", "tenant" => "other" };
        let id = construct_stream_id(&keys);
        assert_eq!(key_value(&id, "tenant id").as_deref(), Some("t|1 ä"));
        assert_eq!(key_value(&id, "cart_id").as_deref(), Some("c:1"));
        assert_eq!(key_value(&id, "tenant").as_deref(), Some("other"));
        assert_eq!(key_value(&id, "missing"), None);
        assert_eq!(key_value("tenant:%E", "tenant"), None);
    }

    #[test]
    fn keys_sort_by_utf16_code_units_like_javascript() {
        // U+FF21 (fullwidth A) is one code unit 0xFF21; U+1F600 is the surrogate pair 0xD83D 0xDE00.
        // Bytes put U+FF21 first (EF BC A1 < F0 9F 98 80); JavaScript puts the emoji first.
        let keys = crate::keys! { "\u{FF21}" => "1", "\u{1F600}" => "2" };
        assert_eq!(construct_stream_id(&keys), "%F0%9F%98%80:2|%EF%BC%A1:1");
    }
}
