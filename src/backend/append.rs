//! Appends: one statement on PostgreSQL, one transaction on SQLite and MySQL.

use sea_orm::sea_query::{Expr, ExprTrait, Func, OnConflict, Query, SimpleExpr};
use sea_orm::{
    ConnectionTrait, DatabaseTransaction, DbBackend, DbErr, ExecResult, SqlErr, Statement, TransactionTrait,
};
use serde_json::Value;

use super::begin_write;
use crate::event::StoredMessage;
use crate::expected_version::ExpectedVersion;
use crate::schema::{messages, streams};

/// One append, as the backends receive it.
pub(crate) struct Append {
    pub stream_id: String,
    pub partition: String,
    pub stream_type: String,
    pub expected: ExpectedVersion,
    pub metadata: Value,
    pub events: Vec<NewEvent>,
    /// MySQL: whether the store has seen the partition's row (see `enter_partition`).
    pub partition_known: bool,
    /// PostgreSQL: wake listening projection daemons when the append commits
    /// (`NOTIFY emt_appends, '<partition>'`).
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    pub notify: bool,
    /// Return the rows as stored (inline projections fold them), read by the append itself
    /// rather than by a query after it.
    pub returning_rows: bool,
}

/// An event to append, as stored.
pub(crate) struct NewEvent {
    pub message_type: String,
    pub data: Value,
    pub id: String,
    /// The current version of its type (`message_schema_version`).
    pub version: String,
}

/// The channel appends notify on PostgreSQL.
#[cfg_attr(not(feature = "postgres"), allow(dead_code))]
pub(crate) const APPENDS_CHANNEL: &str = "emt_appends";

/// What a successful append wrote.
pub(crate) struct Appended {
    pub next_expected_version: u64,
    pub last_global_position: u64,
    /// The stored rows in stream order when [`Append::returning_rows`], else empty.
    pub rows: Vec<StoredMessage>,
}

/// The columns of a [`StoredMessage`].
const STORED_COLUMNS: [messages::Column; 10] = [
    messages::Column::StreamId,
    messages::Column::StreamPosition,
    messages::Column::Partition,
    messages::Column::MessageType,
    messages::Column::MessageId,
    messages::Column::GlobalPosition,
    messages::Column::Created,
    messages::Column::MessageData,
    messages::Column::MessageMetadata,
    messages::Column::MessageSchemaVersion,
];

/// Appends, or returns `None` when the expected version does not hold (nothing written).
/// `bind`: PostgreSQL, outside a transaction: the statement binds the append's partition as
/// the tenant of row-level security itself (for a tenant-bound store, whose `conn` is then
/// unbound: one prepared statement instead of a `SET LOCAL` and the statement as SQL).
#[cfg_attr(not(feature = "postgres"), allow(unused_variables))]
pub(crate) async fn append<C: ConnectionTrait + TransactionTrait<Transaction = DatabaseTransaction>>(
    conn: &C,
    append: &Append,
    bind: bool,
) -> Result<Option<Appended>, DbErr> {
    match conn.get_database_backend() {
        #[cfg(feature = "postgres")]
        DbBackend::Postgres => append_in_one_statement(conn, append, bind).await,
        _ => append_in_transaction(conn, append).await,
    }
}

/// PostgreSQL: the append function (migration `m20261207_000002_create_append_function`). It
/// moves the stream row and inserts the messages in one call (one round trip, atomic without an
/// explicit transaction); the stream row update takes the row lock, so a racing writer with the
/// same expected version re-checks its `WHERE` after we commit and matches nothing.
///
/// A function rather than the same statement sent as SQL, because PL/pgSQL keeps its plans per
/// server connection: behind a transaction-mode pooler statements go by the simple protocol
/// (see `conn`), where a data-modifying CTE was parsed and planned on every append (pgbench, 8
/// clients: 3,780 appends/s as SQL vs 4,871 calling the function, 6,512 prepared); direct, a
/// prepared call costs what the prepared CTE did (6,301 vs 6,138–6,512).
const APPEND_FUNCTION: &str = r#"CREATE OR REPLACE FUNCTION emt_append(
    p_stream_id text, p_partition text, p_stream_type text, p_expected bigint,
    p_types text[], p_data text[], p_ids text[], p_versions text[], p_metadata jsonb,
    p_notify boolean, p_rows boolean)
RETURNS TABLE (version bigint, stream_id text, stream_position bigint, partition text, message_type text,
               message_id text, global_position bigint, created timestamptz, message_data jsonb,
               message_metadata jsonb, message_schema_version text)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    n bigint := cardinality(p_types);
    new_version bigint;
BEGIN
    -- p_expected: NULL any, 0 no stream, -1 the stream exists, else the exact version.
    IF p_expected IS NULL THEN
        INSERT INTO streams AS s (stream_id, stream_position, partition, stream_type, stream_metadata)
        VALUES (p_stream_id, n, p_partition, p_stream_type, '{}')
        ON CONFLICT (stream_id, partition, is_archived) DO UPDATE SET stream_position = s.stream_position + n
        RETURNING s.stream_position INTO new_version;
    ELSIF p_expected = 0 THEN
        INSERT INTO streams AS s (stream_id, stream_position, partition, stream_type, stream_metadata)
        VALUES (p_stream_id, n, p_partition, p_stream_type, '{}')
        ON CONFLICT (stream_id, partition, is_archived) DO NOTHING
        RETURNING s.stream_position INTO new_version;
    ELSE
        UPDATE streams AS s SET stream_position = s.stream_position + n
        WHERE s.stream_id = p_stream_id AND s.partition = p_partition AND s.is_archived = false
          AND (p_expected < 0 OR s.stream_position = p_expected)
        RETURNING s.stream_position INTO new_version;
    END IF;
    IF new_version IS NULL THEN
        RETURN;
    END IF;
    IF p_notify THEN
        PERFORM pg_notify('emt_appends', p_partition);
    END IF;
    IF p_rows THEN
        RETURN QUERY WITH ins AS (
            INSERT INTO messages AS m (stream_id, stream_position, partition, message_data, message_metadata,
                                       message_schema_version, message_type, message_id)
            SELECT p_stream_id, new_version - n + e.ord, p_partition, e.d::jsonb, p_metadata, e.v, e.t, e.i
            FROM unnest(p_types, p_data, p_ids, p_versions) WITH ORDINALITY AS e(t, d, i, v, ord)
            RETURNING m.*)
        SELECT new_version, ins.stream_id, ins.stream_position, ins.partition, ins.message_type, ins.message_id,
               ins.global_position, ins.created, ins.message_data, ins.message_metadata, ins.message_schema_version
        FROM ins ORDER BY ins.stream_position;
    ELSE
        RETURN QUERY WITH ins AS (
            INSERT INTO messages AS m (stream_id, stream_position, partition, message_data, message_metadata,
                                       message_schema_version, message_type, message_id)
            SELECT p_stream_id, new_version - n + e.ord, p_partition, e.d::jsonb, p_metadata, e.v, e.t, e.i
            FROM unnest(p_types, p_data, p_ids, p_versions) WITH ORDINALITY AS e(t, d, i, v, ord)
            RETURNING m.global_position)
        SELECT new_version, NULL::text, NULL::bigint, NULL::text, NULL::text, NULL::text, max(ins.global_position),
               NULL::timestamptz, NULL::jsonb, NULL::jsonb, NULL::text FROM ins;
    END IF;
END
$$"#;

/// The DDL of the append function on `backend` (none but on PostgreSQL).
pub(crate) fn create_append_function(backend: DbBackend) -> Vec<String> {
    match backend {
        DbBackend::Postgres => vec![APPEND_FUNCTION.to_owned()],
        _ => Vec::new(),
    }
}

/// Drops the append function on `backend`.
pub(crate) fn drop_append_function(backend: DbBackend) -> Vec<String> {
    match backend {
        DbBackend::Postgres => vec![format!("DROP FUNCTION IF EXISTS {APPEND_SIGNATURE}")],
        _ => Vec::new(),
    }
}

/// The append function's name and parameter types.
const APPEND_SIGNATURE: &str =
    "emt_append(text, text, text, bigint, text[], text[], text[], text[], jsonb, boolean, boolean)";

#[cfg(feature = "postgres")]
/// PostgreSQL: one call of [`APPEND_FUNCTION`]; with `bind`, the partition is bound as the
/// statement's tenant by the call's argument, evaluated before the function runs (pgbench, 8
/// clients, simple protocol: as fast as the plain call; a `LATERAL` join to a subquery binding
/// it took 10–20% longer to plan).
async fn append_in_one_statement<C: ConnectionTrait>(
    conn: &C,
    a: &Append,
    bind: bool,
) -> Result<Option<Appended>, DbErr> {
    // Text arrays unnested together, each event's data converted to jsonb alone. One JSON
    // array of the events (`json_to_recordset`) took ~35% longer at 150 events (2.3–3.4 ms vs
    // 1.3–2.1 ms per statement, PostgreSQL 15): the whole array was parsed once more.
    let mut types = Vec::with_capacity(a.events.len());
    let mut data = Vec::with_capacity(a.events.len());
    let mut ids = Vec::with_capacity(a.events.len());
    let mut versions = Vec::with_capacity(a.events.len());
    for event in &a.events {
        types.push(event.message_type.clone());
        data.push(event.data.to_string());
        ids.push(event.id.clone());
        versions.push(event.version.clone());
    }
    let expected: Option<i64> = match a.expected {
        ExpectedVersion::Any => None,
        ExpectedVersion::NoStream => Some(0),
        ExpectedVersion::StreamExists => Some(-1),
        ExpectedVersion::Exact(v) => match i64::try_from(v) {
            Ok(v) => Some(v),
            Err(_) => return Ok(None), // no stream reaches a version past i64::MAX
        },
    };
    let values: Vec<sea_orm::Value> = vec![
        a.stream_id.as_str().into(),
        a.partition.as_str().into(),
        a.stream_type.as_str().into(),
        expected.into(),
        types.into(),
        data.into(),
        ids.into(),
        versions.into(),
        a.metadata.clone().into(),
        a.notify.into(),
        a.returning_rows.into(),
    ];
    let sql = match bind {
        false => "SELECT * FROM emt_append($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
        true => {
            "SELECT * FROM emt_append($1, set_config('emt.tenant', $2, true), $3, $4, $5, $6, $7, $8, $9, $10, $11)"
        }
    };
    let found = conn.query_all_raw(Statement::from_sql_and_values(DbBackend::Postgres, sql, values)).await?;
    let Some(first) = found.first() else { return Ok(None) };
    let next_expected_version = first.try_get::<i64>("", "version")? as u64;
    let rows = if a.returning_rows { StoredMessage::from_rows(&found)? } else { Vec::new() };
    let last_global_position = match rows.last() {
        Some(last) => last.global_position.unwrap_or_default(),
        None => first.try_get::<i64>("", "global_position")?,
    } as u64;
    Ok(Some(Appended { next_expected_version, last_global_position, rows }))
}

/// SQLite and MySQL: [`append_steps`] in a transaction of their own (a savepoint inside one).
async fn append_in_transaction<C: TransactionTrait<Transaction = DatabaseTransaction>>(
    conn: &C,
    a: &Append,
) -> Result<Option<Appended>, DbErr> {
    let txn = begin_write(conn).await?;
    let appended = append_steps(&txn, &[a]).await?.pop().flatten();
    if appended.is_some() {
        txn.commit().await?;
    }
    Ok(appended) // else dropping the transaction rolls it back
}

/// Messages per `INSERT` on SQLite and MySQL: at 9 values a row, below SQLite's 32,766 bound
/// parameters (MySQL's limit is 65,535), whatever the size of an append.
const MESSAGES_PER_INSERT: usize = 3_000;

/// Appends `appends` in order in `txn` itself, without savepoints: SQLite's group commit (see
/// `store::group`) writes the appends of many callers this way. `None` for an append whose
/// expected version does not hold: it wrote nothing. After an error `txn` may hold part of
/// them and must be rolled back.
///
/// SQLite and MySQL move the stream rows first, one statement each (a row's lock serialises the
/// writers of its stream), then insert the messages of all the appends together.
pub(crate) async fn append_steps(
    txn: &DatabaseTransaction,
    appends: &[&Append],
) -> Result<Vec<Option<Appended>>, DbErr> {
    let backend = txn.get_database_backend();
    #[cfg(feature = "postgres")]
    if backend == DbBackend::Postgres {
        let mut done = Vec::with_capacity(appends.len());
        for a in appends {
            done.push(append_in_one_statement(txn, a, false).await?);
        }
        return Ok(done);
    }
    if backend == DbBackend::MySql {
        let partitions: std::collections::BTreeMap<&str, bool> =
            appends.iter().map(|a| (a.partition.as_str(), a.partition_known)).collect();
        for (partition, known) in partitions {
            enter_partition(txn, partition, known).await?;
        }
    }
    let mut versions = Vec::with_capacity(appends.len());
    for a in appends {
        versions.push(move_stream_row(txn, a, a.events.len() as i64).await?);
    }
    // `(append, its first stream position)` of each append whose expected version held.
    let moved: Vec<(&Append, i64)> = appends
        .iter()
        .zip(&versions)
        .filter_map(|(a, version)| version.map(|v| (*a, v - a.events.len() as i64 + 1)))
        .collect();
    let total: i64 = moved.iter().map(|(a, _)| a.events.len() as i64).sum();

    // SQLite numbers messages itself, in append order; MySQL's AUTO_INCREMENT does it there.
    let first_global = match backend == DbBackend::Sqlite && total > 0 {
        true => Some(take_global_positions(txn, total).await?),
        false => None,
    };

    let mut columns = vec![
        messages::Column::StreamId,
        messages::Column::StreamPosition,
        messages::Column::Partition,
        messages::Column::MessageData,
        messages::Column::MessageMetadata,
        messages::Column::MessageSchemaVersion,
        messages::Column::MessageType,
        messages::Column::MessageId,
    ];
    columns.extend(first_global.map(|_| messages::Column::GlobalPosition));
    let mut rows: Vec<Vec<SimpleExpr>> = Vec::with_capacity(total as usize);
    for (a, first) in &moved {
        for (i, event) in a.events.iter().enumerate() {
            rows.push(vec![
                a.stream_id.as_str().into(),
                (first + i as i64).into(),
                a.partition.as_str().into(),
                event.data.clone().into(),
                a.metadata.clone().into(),
                event.version.as_str().into(),
                event.message_type.as_str().into(),
                event.id.as_str().into(),
            ]);
        }
    }
    // SQLite returns the rows of inline projections from the insert; MySQL reads them back.
    let returning = first_global.is_some() && moved.iter().any(|(a, _)| a.returning_rows);
    let mut returned = std::collections::BTreeMap::new();
    let mut inserted = None;
    let mut rows = rows.into_iter().enumerate();
    for _ in 0..rows.len().div_ceil(MESSAGES_PER_INSERT) {
        let mut insert = Query::insert();
        insert.into_table(messages::Entity).columns(columns.clone());
        for (i, mut row) in rows.by_ref().take(MESSAGES_PER_INSERT) {
            if let Some(g) = first_global {
                row.push((g + i as i64).into());
            }
            insert.values_panic(row);
        }
        if returning {
            insert.returning(Query::returning().columns(STORED_COLUMNS));
            for row in StoredMessage::from_rows(&txn.query_all(&insert).await?)? {
                returned.insert(row.global_position.unwrap_or_default(), row);
            }
        } else {
            let res = txn.execute(&insert).await?;
            // MySQL: a one-row insert answers with the position it took.
            if backend == DbBackend::MySql && total == 1 {
                inserted = Some(res.last_insert_id() as i64);
            }
        }
    }

    let mut next_global = first_global;
    let mut done = Vec::with_capacity(appends.len());
    for (a, version) in appends.iter().zip(versions) {
        let Some(version) = version else {
            done.push(None);
            continue;
        };
        let n = a.events.len() as i64;
        let (last_global_position, rows) = match next_global.as_mut() {
            Some(g) => {
                let range = *g..*g + n;
                *g += n;
                let rows = if a.returning_rows {
                    range.clone().filter_map(|p| returned.remove(&p)).collect()
                } else {
                    Vec::new()
                };
                (range.end - 1, rows)
            }
            None => match inserted {
                Some(position) if !a.returning_rows => (position, Vec::new()),
                _ => read_back(txn, a, version).await?,
            },
        };
        done.push(Some(Appended {
            next_expected_version: version as u64,
            last_global_position: last_global_position as u64,
            rows,
        }));
    }
    Ok(done)
}

/// SQLite: takes `n` global positions from the counter; returns the first.
pub(super) async fn take_global_positions(txn: &DatabaseTransaction, n: i64) -> Result<i64, DbErr> {
    let take = "UPDATE emt_global_message_position SET last_value = last_value + ? WHERE id = 1 RETURNING last_value";
    let row = txn
        .query_one_raw(Statement::from_sql_and_values(DbBackend::Sqlite, take, [n.into()]))
        .await?
        .ok_or_else(|| DbErr::RecordNotFound("emt_global_message_position".into()))?;
    Ok(row.try_get::<i64>("", "last_value")? - n + 1)
}

/// MySQL: the last global position of an append that moved its stream to `version`, and its
/// rows when it returns them (else only the last row's position is read).
async fn read_back(txn: &DatabaseTransaction, a: &Append, version: i64) -> Result<(i64, Vec<StoredMessage>), DbErr> {
    let (columns, from): (&[messages::Column], i64) = match a.returning_rows {
        true => (&STORED_COLUMNS, version - a.events.len() as i64 + 1),
        false => (&[messages::Column::GlobalPosition], version),
    };
    let read_back = Query::select()
        .columns(columns.iter().copied())
        .from(messages::Entity)
        .and_where(Expr::col(messages::Column::StreamId).eq(a.stream_id.as_str()))
        .and_where(Expr::col(messages::Column::Partition).eq(a.partition.as_str()))
        .and_where(Expr::col(messages::Column::IsArchived).eq(false))
        .and_where(Expr::col(messages::Column::StreamPosition).gte(from))
        .order_by(messages::Column::StreamPosition, sea_orm::Order::Asc)
        .to_owned();
    let found = txn.query_all(&read_back).await?;
    let missing = || DbErr::RecordNotFound(format!("appended message of stream {}", a.stream_id));
    let last: i64 = found.last().ok_or_else(missing)?.try_get("", "global_position")?;
    let rows = if a.returning_rows { StoredMessage::from_rows(&found)? } else { Vec::new() };
    Ok((last, rows))
}

/// MySQL: share-locks the partition's row of `emt_partitions` (creating it the first time)
/// until the append ends, before the append takes any global position. Appends share it;
/// [`horizon`] takes it exclusively, so it waits for every append of the partition in flight.
///
/// A partition the store has seen (`known`) is share-locked by a locking read (a record lock);
/// another gets one `INSERT IGNORE`, which inserts and locks its row or share-locks the one
/// there (InnoDB's lock on a duplicate key). A locking read of a *missing* row share-locks the
/// gap where it would be, and the first appends of two new tenants in one gap then each waited
/// for the other's gap lock to insert: a deadlock, again on every retry
/// (`many_tenants_first_appends_at_once_all_succeed`). `INSERT IGNORE` on every append instead
/// cost MariaDB's `append-1` 16%.
pub(super) async fn enter_partition(txn: &DatabaseTransaction, partition: &str, known: bool) -> Result<(), DbErr> {
    let sql = |sql: &str| Statement::from_sql_and_values(DbBackend::MySql, sql, [partition.into()]);
    if known {
        let lock = "SELECT 1 FROM emt_partitions WHERE `partition` = ? LOCK IN SHARE MODE";
        if txn.query_one_raw(sql(lock)).await?.is_some() {
            return Ok(());
        }
    }
    txn.execute_raw(sql("INSERT IGNORE INTO emt_partitions (`partition`) VALUES (?)")).await?;
    Ok(())
}

/// Moves the stream row by `n` if the expected version holds; returns the new version.
async fn move_stream_row(txn: &DatabaseTransaction, a: &Append, n: i64) -> Result<Option<i64>, DbErr> {
    let this_stream = || {
        Expr::col(streams::Column::StreamId)
            .eq(a.stream_id.as_str())
            .and(Expr::col(streams::Column::Partition).eq(a.partition.as_str()))
            .and(Expr::col(streams::Column::IsArchived).eq(false))
    };
    let new_stream = || {
        let mut insert = Query::insert();
        insert
            .into_table(streams::Entity)
            .columns([
                streams::Column::StreamId,
                streams::Column::StreamPosition,
                streams::Column::Partition,
                streams::Column::StreamType,
                streams::Column::StreamMetadata,
            ])
            .values_panic([
                a.stream_id.as_str().into(),
                n.into(),
                a.partition.as_str().into(),
                a.stream_type.as_str().into(),
                serde_json::json!({}).into(),
            ]);
        insert
    };
    let backend = txn.get_database_backend();
    // The moved row's new version comes back with the statement: SQLite returns it; MySQL's
    // `LAST_INSERT_ID(expr)` puts it in the statement's answer (0 when the row was inserted, at
    // version `n`: the table has no AUTO_INCREMENT column).
    let mut increment = Expr::col(streams::Column::StreamPosition).add(n);
    if backend == DbBackend::MySql {
        increment = Func::cust("LAST_INSERT_ID").arg(increment).into();
    }
    let moved = async |statement: Statement| -> Result<Option<i64>, DbErr> {
        if backend == DbBackend::MySql {
            let res = txn.execute_raw(statement).await?;
            return Ok((res.rows_affected() > 0).then(|| match res.last_insert_id() {
                0 => n,
                version => version as i64,
            }));
        }
        let row = txn.query_one_raw(statement).await?;
        row.map(|row| row.try_get::<i64>("", "stream_position")).transpose()
    };

    let updated = |res: ExecResult| res.rows_affected() > 0;
    match a.expected {
        ExpectedVersion::NoStream | ExpectedVersion::Exact(0) => match txn.execute(&new_stream()).await {
            Ok(_) => Ok(Some(n)),
            Err(e) if matches!(e.sql_err(), Some(SqlErr::UniqueConstraintViolation(_))) => Ok(None),
            Err(e) => Err(e),
        },
        ExpectedVersion::Exact(v) => {
            let res = txn
                .execute(
                    Query::update()
                        .table(streams::Entity)
                        .value(streams::Column::StreamPosition, v as i64 + n)
                        .cond_where(this_stream().and(Expr::col(streams::Column::StreamPosition).eq(v as i64))),
                )
                .await?;
            Ok(updated(res).then_some(v as i64 + n))
        }
        ExpectedVersion::Any => {
            let mut upsert = new_stream();
            upsert.on_conflict(
                OnConflict::columns([
                    streams::Column::StreamId,
                    streams::Column::Partition,
                    streams::Column::IsArchived,
                ])
                .value(streams::Column::StreamPosition, increment)
                .to_owned(),
            );
            if backend != DbBackend::MySql {
                upsert.returning_col(streams::Column::StreamPosition);
            }
            moved(backend.build(&upsert)).await
        }
        ExpectedVersion::StreamExists => {
            let mut update = Query::update();
            update.table(streams::Entity).value(streams::Column::StreamPosition, increment).cond_where(this_stream());
            if backend != DbBackend::MySql {
                update.returning_col(streams::Column::StreamPosition);
            }
            moved(backend.build(&update)).await
        }
    }
}
