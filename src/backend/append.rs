//! Appends: one statement on PostgreSQL, one transaction on SQLite and MySQL.

use sea_orm::sea_query::{Expr, ExprTrait, OnConflict, Query, SimpleExpr};
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
pub(crate) async fn append<C: ConnectionTrait + TransactionTrait<Transaction = DatabaseTransaction>>(
    conn: &C,
    append: &Append,
) -> Result<Option<Appended>, DbErr> {
    match conn.get_database_backend() {
        #[cfg(feature = "postgres")]
        DbBackend::Postgres => append_in_one_statement(conn, append).await,
        _ => append_in_transaction(conn, append).await,
    }
}

#[cfg(feature = "postgres")]
/// PostgreSQL: one data-modifying CTE. The stream row update takes the row lock, so a racing
/// writer with the same expected version re-checks its `WHERE` after we commit and matches nothing.
async fn append_in_one_statement<C: ConnectionTrait>(conn: &C, a: &Append) -> Result<Option<Appended>, DbErr> {
    let n = a.events.len() as i64;
    // Three text arrays, unnested together, each event's data converted to jsonb alone. One JSON
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
    let mut values: Vec<sea_orm::Value> = vec![
        a.stream_id.as_str().into(),
        a.partition.as_str().into(),
        n.into(),
        types.into(),
        data.into(),
        ids.into(),
        a.metadata.clone().into(),
        versions.into(),
    ];
    let insert_stream = "INSERT INTO streams (stream_id, stream_position, partition, stream_type, stream_metadata)
                         VALUES ($1, $3, $2, $9, '{}') ON CONFLICT (stream_id, partition, is_archived)";
    let update_stream = "UPDATE streams SET stream_position = stream_position + $3
                         WHERE stream_id = $1 AND partition = $2 AND is_archived = false";
    let stream_write = match a.expected {
        ExpectedVersion::Any => {
            values.push(a.stream_type.as_str().into());
            format!("{insert_stream} DO UPDATE SET stream_position = streams.stream_position + $3")
        }
        ExpectedVersion::NoStream | ExpectedVersion::Exact(0) => {
            values.push(a.stream_type.as_str().into());
            format!("{insert_stream} DO NOTHING")
        }
        ExpectedVersion::StreamExists => update_stream.to_owned(),
        ExpectedVersion::Exact(v) => {
            values.push((v as i64).into());
            format!("{update_stream} AND stream_position = $9")
        }
    };
    // The last global position, or every row as stored; `version` is the stream's new version.
    let (returned, select) = match a.returning_rows {
        false => (
            "global_position",
            "SELECT st.stream_position AS version, (SELECT max(global_position) FROM ins) AS global_position",
        ),
        true => (
            "stream_id, stream_position, partition, message_type, message_id, global_position, created, message_data,
             message_metadata, message_schema_version",
            "SELECT st.stream_position AS version, ins.*",
        ),
    };
    let sql = format!(
        "WITH st AS ({stream_write} RETURNING stream_position),
         ins AS (
           INSERT INTO messages (stream_id, stream_position, partition, message_data, message_metadata,
                                 message_schema_version, message_type, message_id)
           SELECT $1, st.stream_position - $3 + e.ord, $2, e.d::jsonb, $7::jsonb, e.v, e.t, e.i
           FROM st, unnest($4::text[], $5::text[], $6::text[], $8::text[]) WITH ORDINALITY AS e(t, d, i, v, ord)
           RETURNING {returned})
         {select}{notify} FROM st{from_ins}",
        notify = if a.notify { format!(", (SELECT pg_notify('{APPENDS_CHANNEL}', $2)) AS n") } else { String::new() },
        from_ins = if a.returning_rows { ", ins ORDER BY ins.stream_position" } else { "" },
    );
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
            done.push(append_in_one_statement(txn, a).await?);
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
    let first_global = if backend == DbBackend::Sqlite && total > 0 {
        let row = txn
            .query_one_raw(Statement::from_sql_and_values(
                backend,
                "UPDATE emt_global_message_position SET last_value = last_value + ? WHERE id = 1 RETURNING last_value",
                [total.into()],
            ))
            .await?
            .ok_or_else(|| DbErr::RecordNotFound("emt_global_message_position".into()))?;
        Some(row.try_get::<i64>("", "last_value")? - total + 1)
    } else {
        None
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
            txn.execute(&insert).await?;
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
            None => read_back(txn, a, version).await?,
        };
        done.push(Some(Appended {
            next_expected_version: version as u64,
            last_global_position: last_global_position as u64,
            rows,
        }));
    }
    Ok(done)
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
async fn enter_partition(txn: &DatabaseTransaction, partition: &str, known: bool) -> Result<(), DbErr> {
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
    let increment = Expr::col(streams::Column::StreamPosition).add(n);
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
        ExpectedVersion::StreamExists | ExpectedVersion::Any => {
            let moved = if a.expected == ExpectedVersion::Any {
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
                updated(txn.execute(&upsert).await?)
            } else {
                let mut update = Query::update();
                update
                    .table(streams::Entity)
                    .value(streams::Column::StreamPosition, increment)
                    .cond_where(this_stream());
                updated(txn.execute(&update).await?)
            };
            if !moved {
                return Ok(None);
            }
            let row = txn
                .query_one(
                    Query::select()
                        .column(streams::Column::StreamPosition)
                        .from(streams::Entity)
                        .cond_where(this_stream()),
                )
                .await?
                .ok_or_else(|| DbErr::RecordNotFound(format!("stream {}", a.stream_id.as_str())))?;
            Ok(Some(row.try_get::<i64>("", "stream_position")?))
        }
    }
}
