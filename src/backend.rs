//! The only module that knows how PostgreSQL, SQLite and MySQL differ.
//!
//! - **Schema**: native DDL per backend (PostgreSQL: LIST partitions, a sequence, `xid8`).
//! - **Append**: PostgreSQL appends in *one statement* (a data-modifying CTE that moves the stream
//!   row and inserts the messages; one round trip, atomic without an explicit transaction).
//!   SQLite and MySQL run the same steps as separate statements in one transaction
//!   (`BEGIN IMMEDIATE` on SQLite, so writers queue instead of failing on lock upgrade).
//! - **Global positions**: a sequence on PostgreSQL, `AUTO_INCREMENT` on MySQL, a one-row
//!   counter table on SQLite (one writer at a time, so it never contends).
//! - **Tenant partitions**: real `PARTITION OF` tables on PostgreSQL; nothing elsewhere.
//! - **Reading in global order** without passing a late commit ([`horizon`]): a transaction-id
//!   horizon on PostgreSQL, a per-partition lock that appends share on MySQL, nothing to wait
//!   for on SQLite.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use sea_orm::sea_query::{
    Expr, ExprTrait, LockType, OnConflict, PostgresQueryBuilder, Query, QueryBuilder, SimpleExpr,
};
use sea_orm::{
    ConnectionTrait, DatabaseTransaction, DbBackend, DbErr, ExecResult, SqlErr, Statement, TransactionOptions,
    TransactionTrait,
};
use serde_json::Value;

use crate::ExpectedVersion;
use crate::schema::{messages, snapshots, streams, subscriptions};

/// Without a backend there is no driver error to sort (and `lib.rs` stops the build).
#[cfg(not(any(feature = "sqlite", feature = "postgres", feature = "mysql")))]
pub(crate) fn classify(_: &DbErr) -> Failure {
    Failure::Other
}

/// Tables of the store, in creation order.
const TABLES: [&str; 4] = ["streams", "messages", "subscriptions", "snapshots"];

/// DDL that creates the schema on `backend`.
pub(crate) fn create_schema(backend: DbBackend) -> Result<Vec<&'static str>, DbErr> {
    Ok(match backend {
        DbBackend::Postgres => vec![
            "CREATE TABLE IF NOT EXISTS streams (
               stream_id text NOT NULL, stream_position bigint NOT NULL, partition text NOT NULL,
               stream_type text NOT NULL, stream_metadata jsonb NOT NULL, is_archived boolean NOT NULL DEFAULT false,
               CONSTRAINT pk_streams PRIMARY KEY (stream_id, partition, is_archived)
             ) PARTITION BY LIST (partition)",
            "CREATE TABLE IF NOT EXISTS streams_default PARTITION OF streams DEFAULT",
            "CREATE SEQUENCE IF NOT EXISTS emt_global_message_position",
            "CREATE TABLE IF NOT EXISTS messages (
               stream_id text NOT NULL, stream_position bigint NOT NULL, partition text NOT NULL,
               message_kind char(1) NOT NULL DEFAULT 'E', message_data jsonb NOT NULL, message_metadata jsonb NOT NULL,
               message_schema_version text NOT NULL, message_type text NOT NULL, message_id text NOT NULL,
               is_archived boolean NOT NULL DEFAULT false,
               global_position bigint DEFAULT nextval('emt_global_message_position'),
               created timestamptz(3) NOT NULL DEFAULT now(),
               transaction_id xid8 NOT NULL DEFAULT pg_current_xact_id(),
               CONSTRAINT pk_messages PRIMARY KEY (stream_id, stream_position, partition, is_archived)
             ) PARTITION BY LIST (partition)",
            // Emmett's column for gap-free reads, added to a schema the TypeScript package created.
            "ALTER TABLE messages ADD COLUMN IF NOT EXISTS transaction_id xid8 NOT NULL DEFAULT pg_current_xact_id()",
            "CREATE TABLE IF NOT EXISTS messages_default PARTITION OF messages DEFAULT",
            "CREATE INDEX IF NOT EXISTS idx_messages_partition_global_position ON messages (partition, global_position)",
            "CREATE TABLE IF NOT EXISTS subscriptions (
               subscription_id text NOT NULL, version integer NOT NULL DEFAULT 1, partition text NOT NULL,
               last_processed_position bigint NOT NULL,
               CONSTRAINT pk_subscriptions PRIMARY KEY (subscription_id, partition, version)
             ) PARTITION BY LIST (partition)",
            "CREATE TABLE IF NOT EXISTS subscriptions_default PARTITION OF subscriptions DEFAULT",
            "CREATE TABLE IF NOT EXISTS snapshots (
               readmodel_table_name text NOT NULL, stream_id text NOT NULL,
               last_stream_position bigint NOT NULL, last_global_position bigint NOT NULL,
               snapshot jsonb NOT NULL, PRIMARY KEY (readmodel_table_name, stream_id))",
        ],
        DbBackend::MySql => vec![
            "CREATE TABLE IF NOT EXISTS streams (
               stream_id VARCHAR(255) NOT NULL, stream_position BIGINT NOT NULL, `partition` VARCHAR(255) NOT NULL,
               stream_type VARCHAR(255) NOT NULL, stream_metadata JSON NOT NULL, is_archived BOOLEAN NOT NULL DEFAULT FALSE,
               PRIMARY KEY (stream_id, `partition`, is_archived))",
            "CREATE TABLE IF NOT EXISTS messages (
               stream_id VARCHAR(255) NOT NULL, stream_position BIGINT NOT NULL, `partition` VARCHAR(255) NOT NULL,
               message_kind CHAR(1) NOT NULL DEFAULT 'E', message_data JSON NOT NULL, message_metadata JSON NOT NULL,
               message_schema_version VARCHAR(64) NOT NULL, message_type VARCHAR(255) NOT NULL,
               message_id VARCHAR(64) NOT NULL, is_archived BOOLEAN NOT NULL DEFAULT FALSE,
               global_position BIGINT NOT NULL AUTO_INCREMENT,
               created DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
               PRIMARY KEY (stream_id, stream_position, `partition`, is_archived),
               UNIQUE KEY uq_messages_global_position (global_position),
               KEY idx_messages_partition_global_position (`partition`, global_position))",
            "CREATE TABLE IF NOT EXISTS subscriptions (
               subscription_id VARCHAR(255) NOT NULL, version INT NOT NULL DEFAULT 1, `partition` VARCHAR(255) NOT NULL,
               last_processed_position BIGINT NOT NULL,
               PRIMARY KEY (subscription_id, `partition`, version))",
            "CREATE TABLE IF NOT EXISTS snapshots (
               readmodel_table_name VARCHAR(255) NOT NULL, stream_id VARCHAR(512) NOT NULL,
               last_stream_position BIGINT NOT NULL, last_global_position BIGINT NOT NULL,
               snapshot JSON NOT NULL, PRIMARY KEY (readmodel_table_name, stream_id))",
        ],
        DbBackend::Sqlite => vec![
            "CREATE TABLE IF NOT EXISTS streams (
               stream_id TEXT NOT NULL, stream_position INTEGER NOT NULL, partition TEXT NOT NULL,
               stream_type TEXT NOT NULL, stream_metadata TEXT NOT NULL, is_archived BOOLEAN NOT NULL DEFAULT FALSE,
               PRIMARY KEY (stream_id, partition, is_archived))",
            "CREATE TABLE IF NOT EXISTS emt_global_message_position (
               id INTEGER PRIMARY KEY CHECK (id = 1), last_value INTEGER NOT NULL)",
            "INSERT OR IGNORE INTO emt_global_message_position (id, last_value) VALUES (1, 0)",
            "CREATE TABLE IF NOT EXISTS messages (
               stream_id TEXT NOT NULL, stream_position INTEGER NOT NULL, partition TEXT NOT NULL,
               message_kind TEXT NOT NULL DEFAULT 'E', message_data TEXT NOT NULL, message_metadata TEXT NOT NULL,
               message_schema_version TEXT NOT NULL, message_type TEXT NOT NULL, message_id TEXT NOT NULL,
               is_archived BOOLEAN NOT NULL DEFAULT FALSE, global_position INTEGER,
               created TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
               PRIMARY KEY (stream_id, stream_position, partition, is_archived))",
            "CREATE UNIQUE INDEX IF NOT EXISTS uq_messages_global_position ON messages (global_position)",
            "CREATE INDEX IF NOT EXISTS idx_messages_partition_global_position ON messages (partition, global_position)",
            "CREATE TABLE IF NOT EXISTS subscriptions (
               subscription_id TEXT NOT NULL, version INTEGER NOT NULL DEFAULT 1, partition TEXT NOT NULL,
               last_processed_position INTEGER NOT NULL,
               PRIMARY KEY (subscription_id, partition, version))",
            "CREATE TABLE IF NOT EXISTS snapshots (
               readmodel_table_name TEXT NOT NULL, stream_id TEXT NOT NULL,
               last_stream_position INTEGER NOT NULL, last_global_position INTEGER NOT NULL,
               snapshot TEXT NOT NULL, PRIMARY KEY (readmodel_table_name, stream_id))",
        ],
        other => return Err(DbErr::BackendNotSupported { db: other.as_str(), ctx: "emmett-seaorm schema" }),
    })
}

/// DDL that drops the schema on `backend` (the tenant partitions go with their parents).
pub(crate) fn drop_schema(backend: DbBackend) -> Vec<String> {
    let mut ddl: Vec<String> = TABLES.iter().rev().map(|t| format!("DROP TABLE IF EXISTS {t}")).collect();
    match backend {
        DbBackend::Postgres => ddl.push("DROP SEQUENCE IF EXISTS emt_global_message_position".into()),
        DbBackend::Sqlite => ddl.push("DROP TABLE IF EXISTS emt_global_message_position".into()),
        _ => {}
    }
    ddl
}

/// The second migration: every identifier compared exactly, a NULL global position impossible,
/// message ids unique per partition (what lets an append be retried safely), the table of
/// skipped events, and on MySQL the partitions table whose row locks order appends against
/// horizon readers ([`horizon`]).
pub(crate) async fn harden_schema(conn: &impl ConnectionTrait) -> Result<(), DbErr> {
    let backend = conn.get_database_backend();
    let skipped = |text: &str, bigint: &str, timestamp: &str| {
        format!(
            "CREATE TABLE IF NOT EXISTS emt_skipped_events (
               subscription_id {text} NOT NULL, {partition} {text} NOT NULL, stream_id {text} NOT NULL,
               stream_position {bigint} NOT NULL, global_position {bigint}, message_type {text} NOT NULL,
               reason TEXT NOT NULL, skipped_at {timestamp} NOT NULL,
               PRIMARY KEY (subscription_id, {partition}, stream_id, stream_position))",
            partition = if backend == DbBackend::MySql { "`partition`" } else { "partition" },
        )
    };
    let ddl = match backend {
        DbBackend::Postgres => vec![
            "UPDATE messages SET global_position = nextval('emt_global_message_position') WHERE global_position IS NULL"
                .to_owned(),
            "ALTER TABLE messages ALTER COLUMN global_position SET NOT NULL".to_owned(),
            "CREATE UNIQUE INDEX IF NOT EXISTS uq_messages_message_id ON messages (message_id, partition)".to_owned(),
            skipped("text", "bigint", "timestamptz(3)"),
            // Dropping `messages` (e.g. `sea-orm-cli migrate fresh`) drops the sequence with it.
            "ALTER SEQUENCE emt_global_message_position OWNED BY messages.global_position".to_owned(),
        ],
        DbBackend::Sqlite => {
            // Rows another writer left without a position get the next ones, in insertion order.
            let unnumbered = conn
                .query_all_raw(Statement::from_string(
                    backend,
                    "SELECT rowid FROM messages WHERE global_position IS NULL ORDER BY rowid",
                ))
                .await?;
            for row in unnumbered {
                let rowid: i64 = row.try_get_by_index(0)?;
                conn.execute_raw(Statement::from_sql_and_values(
                    backend,
                    "UPDATE messages SET global_position =
                       (SELECT last_value FROM emt_global_message_position WHERE id = 1) + 1 WHERE rowid = ?",
                    [rowid.into()],
                ))
                .await?;
                conn.execute_unprepared(
                    "UPDATE emt_global_message_position SET last_value = last_value + 1 WHERE id = 1",
                )
                .await?;
            }
            let mut ddl = vec![
                "CREATE UNIQUE INDEX IF NOT EXISTS uq_messages_message_id ON messages (message_id, partition)"
                    .to_owned(),
                skipped("TEXT", "INTEGER", "TEXT"),
            ];
            // SQLite can't add NOT NULL to a column; these triggers are that constraint.
            for (event, name) in [("INSERT", "insert"), ("UPDATE OF global_position", "update")] {
                ddl.push(format!(
                    "CREATE TRIGGER IF NOT EXISTS messages_global_position_not_null_{name} BEFORE {event} ON messages
                     WHEN NEW.global_position IS NULL
                     BEGIN SELECT RAISE(ABORT, 'NOT NULL constraint failed: messages.global_position'); END"
                ));
            }
            ddl
        }
        DbBackend::MySql => {
            let collation = mysql_exact_collation(conn).await?;
            let table = format!("DEFAULT CHARACTER SET utf8mb4 COLLATE {collation}");
            let mut ddl = mysql_identifier_columns(&format!("CHARACTER SET utf8mb4 COLLATE {collation}"), &table);
            let long = format!("VARCHAR(255) CHARACTER SET utf8mb4 COLLATE {collation}");
            ddl.extend([
                format!("CREATE TABLE IF NOT EXISTS emt_partitions (`partition` {long} NOT NULL PRIMARY KEY) {table}"),
                "INSERT IGNORE INTO emt_partitions (`partition`) SELECT DISTINCT `partition` FROM streams".to_owned(),
                format!("{} {table}", skipped(&long, "BIGINT", "DATETIME(3)")),
            ]);
            // MySQL has no `CREATE INDEX IF NOT EXISTS`; the migration may run twice (see `migrate`).
            let indexed = conn
                .query_one_raw(Statement::from_string(
                    backend,
                    "SELECT 1 FROM information_schema.STATISTICS WHERE TABLE_SCHEMA = DATABASE()
                     AND TABLE_NAME = 'messages' AND INDEX_NAME = 'uq_messages_message_id'",
                ))
                .await?
                .is_some();
            if !indexed {
                ddl.push("CREATE UNIQUE INDEX uq_messages_message_id ON messages (message_id, `partition`)".to_owned());
            }
            ddl
        }
        other => return Err(DbErr::BackendNotSupported { db: other.as_str(), ctx: "emmett-seaorm schema" }),
    };
    for statement in ddl {
        conn.execute_unprepared(&statement).await?;
    }
    Ok(())
}

/// Undoes [`harden_schema`] (MySQL's identifiers go back to the server's default collation).
pub(crate) async fn soften_schema(conn: &impl ConnectionTrait) -> Result<(), DbErr> {
    let backend = conn.get_database_backend();
    let mut ddl = vec!["DROP TABLE IF EXISTS emt_skipped_events".to_owned()];
    match backend {
        DbBackend::Postgres => ddl.extend([
            "ALTER SEQUENCE emt_global_message_position OWNED BY NONE".to_owned(),
            "DROP INDEX IF EXISTS uq_messages_message_id".to_owned(),
            "ALTER TABLE messages ALTER COLUMN global_position DROP NOT NULL".to_owned(),
        ]),
        DbBackend::Sqlite => ddl.extend([
            "DROP INDEX IF EXISTS uq_messages_message_id".to_owned(),
            "DROP TRIGGER IF EXISTS messages_global_position_not_null_insert".to_owned(),
            "DROP TRIGGER IF EXISTS messages_global_position_not_null_update".to_owned(),
        ]),
        _ => {
            ddl.extend([
                "DROP TABLE IF EXISTS emt_partitions".to_owned(),
                "DROP INDEX uq_messages_message_id ON messages".to_owned(),
            ]);
            ddl.extend(mysql_identifier_columns("CHARACTER SET utf8mb4", "DEFAULT CHARACTER SET utf8mb4"));
        }
    }
    for statement in ddl {
        conn.execute_unprepared(&statement).await?;
    }
    Ok(())
}

/// `ALTER TABLE`s giving every identifier column of the store the character set and collation
/// `charset` (and each table the default `table`).
fn mysql_identifier_columns(charset: &str, table: &str) -> Vec<String> {
    let id = |len: u32| format!("VARCHAR({len}) {charset} NOT NULL");
    let (short, long, snapshot) = (id(64), id(255), id(512));
    vec![
        format!(
            "ALTER TABLE streams MODIFY stream_id {long}, MODIFY `partition` {long}, MODIFY stream_type {long}, {table}"
        ),
        format!(
            "ALTER TABLE messages MODIFY stream_id {long}, MODIFY `partition` {long}, MODIFY message_type {long},
             MODIFY message_id {short}, MODIFY message_schema_version {short},
             MODIFY message_kind CHAR(1) {charset} NOT NULL DEFAULT 'E', {table}"
        ),
        format!("ALTER TABLE subscriptions MODIFY subscription_id {long}, MODIFY `partition` {long}, {table}"),
        format!("ALTER TABLE snapshots MODIFY readmodel_table_name {long}, MODIFY stream_id {snapshot}, {table}"),
    ]
}

/// A binary collation without trailing-space padding: `utf8mb4_0900_bin` on MySQL 8,
/// `utf8mb4_nopad_bin` on MariaDB. The servers' defaults compare ids case-, accent- and
/// trailing-space-insensitively, which would make `Acme`, `acme` and `acme ` one tenant.
pub(crate) async fn mysql_exact_collation(conn: &impl ConnectionTrait) -> Result<String, DbErr> {
    let found = conn
        .query_one_raw(Statement::from_string(
            DbBackend::MySql,
            "SELECT COLLATION_NAME FROM information_schema.COLLATIONS
             WHERE COLLATION_NAME IN ('utf8mb4_0900_bin', 'utf8mb4_nopad_bin') ORDER BY COLLATION_NAME LIMIT 1",
        ))
        .await?;
    match found {
        Some(row) => row.try_get_by_index(0),
        None => Err(DbErr::Migration("the server has neither utf8mb4_0900_bin nor utf8mb4_nopad_bin".into())),
    }
}

/// Begins a write transaction (a savepoint inside a session): `BEGIN IMMEDIATE` on SQLite so
/// concurrent writers wait for the lock instead of failing when they upgrade to it.
pub(crate) async fn begin_write<C: TransactionTrait<Transaction = DatabaseTransaction>>(
    conn: &C,
) -> Result<DatabaseTransaction, DbErr> {
    conn.begin_with_options(TransactionOptions {
        sqlite_transaction_mode: Some(sea_orm::SqliteTransactionMode::Immediate),
        ..Default::default()
    })
    .await
}

/// One append, as the backends receive it.
pub(crate) struct Append<'a> {
    pub stream_id: &'a str,
    pub partition: &'a str,
    pub stream_type: &'a str,
    pub expected: ExpectedVersion,
    pub metadata: &'a Value,
    /// `(message_type, message_data, message_id)` per event.
    pub events: Vec<(String, Value, String)>,
}

/// What a successful append wrote.
pub(crate) struct Appended {
    pub next_expected_version: u64,
    pub last_global_position: u64,
}

/// Appends, or returns `None` when the expected version does not hold (nothing written).
pub(crate) async fn append<C: ConnectionTrait + TransactionTrait<Transaction = DatabaseTransaction>>(
    conn: &C,
    append: &Append<'_>,
) -> Result<Option<Appended>, DbErr> {
    match conn.get_database_backend() {
        DbBackend::Postgres => append_in_one_statement(conn, append).await,
        _ => append_in_transaction(conn, append).await,
    }
}

/// PostgreSQL: one data-modifying CTE. The stream row update takes the row lock, so a racing
/// writer with the same expected version re-checks its `WHERE` after we commit and matches nothing.
async fn append_in_one_statement<C: ConnectionTrait>(conn: &C, a: &Append<'_>) -> Result<Option<Appended>, DbErr> {
    /// One event of the jsonb array parameter.
    #[derive(serde::Serialize)]
    struct Row<'a> {
        t: &'a str,
        d: &'a Value,
        i: &'a str,
    }
    let n = a.events.len() as i64;
    // Serialized straight to text (no intermediate `Value`); the statement casts it to jsonb.
    let rows: Vec<Row<'_>> = a.events.iter().map(|(t, d, i)| Row { t, d, i }).collect();
    let events = serde_json::to_string(&rows).map_err(|err| DbErr::Custom(err.to_string()))?;
    let mut values: Vec<sea_orm::Value> =
        vec![a.stream_id.into(), a.partition.into(), n.into(), events.into(), a.metadata.clone().into()];
    let insert_stream = "INSERT INTO streams (stream_id, stream_position, partition, stream_type, stream_metadata)
                         VALUES ($1, $3, $2, $6, '{}') ON CONFLICT (stream_id, partition, is_archived)";
    let update_stream = "UPDATE streams SET stream_position = stream_position + $3
                         WHERE stream_id = $1 AND partition = $2 AND is_archived = false";
    let stream_write = match a.expected {
        ExpectedVersion::Any => {
            values.push(a.stream_type.into());
            format!("{insert_stream} DO UPDATE SET stream_position = streams.stream_position + $3")
        }
        ExpectedVersion::NoStream | ExpectedVersion::Exact(0) => {
            values.push(a.stream_type.into());
            format!("{insert_stream} DO NOTHING")
        }
        ExpectedVersion::StreamExists => update_stream.to_owned(),
        ExpectedVersion::Exact(v) => {
            values.push((v as i64).into());
            format!("{update_stream} AND stream_position = $6")
        }
    };
    let sql = format!(
        "WITH st AS ({stream_write} RETURNING stream_position),
         ins AS (
           INSERT INTO messages (stream_id, stream_position, partition, message_data, message_metadata,
                                 message_schema_version, message_type, message_id)
           SELECT $1, st.stream_position - $3 + e.ord, $2, e.m->'d', $5::jsonb, '1', e.m->>'t', e.m->>'i'
           FROM st, jsonb_array_elements($4::jsonb) WITH ORDINALITY AS e(m, ord)
           RETURNING global_position)
         SELECT st.stream_position, (SELECT max(global_position) FROM ins) AS last_global_position FROM st"
    );
    let row = conn.query_one_raw(Statement::from_sql_and_values(DbBackend::Postgres, sql, values)).await?;
    row.map(|row| {
        Ok(Appended {
            next_expected_version: row.try_get::<i64>("", "stream_position")? as u64,
            last_global_position: row.try_get::<i64>("", "last_global_position")? as u64,
        })
    })
    .transpose()
}

/// SQLite and MySQL: the stream row first (its lock serialises writers of one stream), then the
/// messages, in one transaction.
async fn append_in_transaction<C: TransactionTrait<Transaction = DatabaseTransaction>>(
    conn: &C,
    a: &Append<'_>,
) -> Result<Option<Appended>, DbErr> {
    let txn = begin_write(conn).await?;
    let backend = txn.get_database_backend();
    if backend == DbBackend::MySql {
        enter_partition(&txn, a.partition).await?;
    }
    let n = a.events.len() as i64;
    let Some(version) = move_stream_row(&txn, a, n).await? else {
        return Ok(None); // dropping the transaction rolls it back
    };
    let first = version - n + 1;

    // SQLite numbers messages itself; MySQL's AUTO_INCREMENT does it there.
    let first_global = if backend == DbBackend::Sqlite {
        let row = txn
            .query_one_raw(Statement::from_sql_and_values(
                backend,
                "UPDATE emt_global_message_position SET last_value = last_value + ? WHERE id = 1 RETURNING last_value",
                [n.into()],
            ))
            .await?
            .ok_or_else(|| DbErr::RecordNotFound("emt_global_message_position".into()))?;
        Some(row.try_get::<i64>("", "last_value")? - n + 1)
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
    let mut insert = Query::insert();
    insert.into_table(messages::Entity).columns(columns);
    for (i, (message_type, data, id)) in a.events.iter().enumerate() {
        let mut row: Vec<SimpleExpr> = vec![
            a.stream_id.into(),
            (first + i as i64).into(),
            a.partition.into(),
            data.clone().into(),
            a.metadata.clone().into(),
            "1".into(),
            message_type.as_str().into(),
            id.as_str().into(),
        ];
        if let Some(g) = first_global {
            row.push((g + i as i64).into());
        }
        insert.values_panic(row);
    }
    txn.execute(&insert).await?;

    let last_global_position = match first_global {
        Some(g) => g + n - 1,
        None => {
            let row = txn
                .query_one(
                    Query::select()
                        .column(messages::Column::GlobalPosition)
                        .from(messages::Entity)
                        .and_where(Expr::col(messages::Column::StreamId).eq(a.stream_id))
                        .and_where(Expr::col(messages::Column::Partition).eq(a.partition))
                        .and_where(Expr::col(messages::Column::IsArchived).eq(false))
                        .and_where(Expr::col(messages::Column::StreamPosition).eq(version)),
                )
                .await?
                .ok_or_else(|| DbErr::RecordNotFound("appended message".into()))?;
            row.try_get::<i64>("", "global_position")?
        }
    };
    txn.commit().await?;
    Ok(Some(Appended { next_expected_version: version as u64, last_global_position: last_global_position as u64 }))
}

/// MySQL: share-locks the partition's row of `emt_partitions` (creating it the first time)
/// until the append ends, before the append takes any global position. Appends share it;
/// [`horizon`] takes it exclusively, so it waits for every append of the partition in flight.
async fn enter_partition(txn: &DatabaseTransaction, partition: &str) -> Result<(), DbErr> {
    let sql = |sql: &str| Statement::from_sql_and_values(DbBackend::MySql, sql, [partition.into()]);
    let locked = txn
        .query_one_raw(sql("SELECT 1 FROM emt_partitions WHERE `partition` = ? LOCK IN SHARE MODE"))
        .await?
        .is_some();
    if !locked {
        // Inserts and locks the row, or (when another append inserted it) share-locks it.
        txn.execute_raw(sql("INSERT IGNORE INTO emt_partitions (`partition`) VALUES (?)")).await?;
    }
    Ok(())
}

/// Moves the stream row by `n` if the expected version holds; returns the new version.
async fn move_stream_row(txn: &DatabaseTransaction, a: &Append<'_>, n: i64) -> Result<Option<i64>, DbErr> {
    let this_stream = || {
        Expr::col(streams::Column::StreamId)
            .eq(a.stream_id)
            .and(Expr::col(streams::Column::Partition).eq(a.partition))
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
                a.stream_id.into(),
                n.into(),
                a.partition.into(),
                a.stream_type.into(),
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
                .ok_or_else(|| DbErr::RecordNotFound(format!("stream {}", a.stream_id)))?;
            Ok(Some(row.try_get::<i64>("", "stream_position")?))
        }
    }
}

/// What kind of failure a database error is, for the typed errors and the retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    /// A deadlock or serialization failure: the transaction lost a race; run it again.
    Retry,
    /// A lock wait or busy timeout ran out: the database already waited; give up for now.
    Busy,
    /// The connection broke or could not be had; `maybe_written` unless it never reached the server.
    Connection { maybe_written: bool },
    /// Anything else.
    Other,
}

/// Sorts a database error by what a caller can do about it.
///
/// Codes: PostgreSQL 40001/40P01 (serialization failure, deadlock), 55P03 (lock timeout),
/// 57P01–57P03 and class 08 (connection); MySQL 1213 (deadlock, SQLSTATE 40001), 1205 (lock
/// wait timeout), 1927 (connection killed); SQLite 5/6 and extended BUSY/LOCKED codes
/// (`database is locked` after the busy timeout), 517 (BUSY_SNAPSHOT: retry at once).
#[cfg(any(feature = "sqlite", feature = "postgres", feature = "mysql"))]
pub(crate) fn classify(err: &DbErr) -> Failure {
    use sea_orm::sqlx::Error as Sqlx;
    let sqlx = match err {
        DbErr::ConnectionAcquire(_) => return Failure::Connection { maybe_written: false },
        DbErr::Conn(sea_orm::RuntimeErr::SqlxError(e))
        | DbErr::Exec(sea_orm::RuntimeErr::SqlxError(e))
        | DbErr::Query(sea_orm::RuntimeErr::SqlxError(e)) => e.as_ref(),
        DbErr::Conn(_) => return Failure::Connection { maybe_written: true },
        _ => return Failure::Other,
    };
    let db = match sqlx {
        Sqlx::PoolTimedOut | Sqlx::PoolClosed => return Failure::Connection { maybe_written: false },
        Sqlx::Io(_) | Sqlx::Tls(_) | Sqlx::Protocol(_) | Sqlx::WorkerCrashed => {
            return Failure::Connection { maybe_written: true };
        }
        Sqlx::Database(db) => db,
        _ => return Failure::Other,
    };
    #[cfg(feature = "mysql")]
    if let Some(mysql) = db.try_downcast_ref::<sea_orm::sqlx::mysql::MySqlDatabaseError>() {
        return match mysql.number() {
            1213 => Failure::Retry,
            1205 => Failure::Busy,
            1053 | 1927 => Failure::Connection { maybe_written: true },
            _ => Failure::Other,
        };
    }
    match db.code().as_deref() {
        Some("40001" | "40P01" | "517") => Failure::Retry,
        Some("55P03" | "5" | "6" | "261" | "262" | "773") => Failure::Busy,
        Some("57P01" | "57P02" | "57P03") => Failure::Connection { maybe_written: true },
        Some(code) if code.starts_with("08") => Failure::Connection { maybe_written: true },
        _ => Failure::Other,
    }
}

/// The highest global position a reader of `partition` in global order may reach without
/// passing an event that a transaction still running will commit later (a sequence or
/// `AUTO_INCREMENT` value is taken before commit), or `None` when such transactions did not end
/// within `wait`.
/// - SQLite: one writer at a time, so the partition's last committed position.
/// - MySQL: `AUTO_INCREMENT` hands out a position when an `INSERT` starts, before its row can
///   be seen or locked (it may still wait, e.g. on a gap lock). Appends share-lock their
///   partition's row of `emt_partitions` before taking positions; this takes it exclusively,
///   which waits for every append of the partition in flight and holds new ones back while it
///   reads the last committed position.
/// - PostgreSQL: the sequence's value, once every transaction older than an id taken after it
///   has ended: writers take their transaction id before their position (this crate's and the
///   TypeScript package's appends write `streams` first), so each one that holds a position up
///   to it is waited for. Any transaction of the cluster older than that id is waited for too.
pub(crate) async fn horizon<C: ConnectionTrait + TransactionTrait<Transaction = DatabaseTransaction>>(
    conn: &C,
    partition: &str,
    after: i64,
    wait: Duration,
) -> Result<Option<i64>, DbErr> {
    let backend = conn.get_database_backend();
    if backend != DbBackend::Postgres {
        let txn = conn.begin().await?;
        if backend == DbBackend::MySql {
            txn.execute_unprepared(&format!("SET SESSION innodb_lock_wait_timeout = {}", Ord::max(wait.as_secs(), 1)))
                .await?;
            let gate = txn
                .query_one_raw(Statement::from_sql_and_values(
                    backend,
                    "SELECT 1 FROM emt_partitions WHERE `partition` = ? FOR UPDATE",
                    [partition.into()],
                ))
                .await;
            txn.execute_unprepared("SET SESSION innodb_lock_wait_timeout = DEFAULT").await?;
            match gate {
                Err(err) if classify(&err) == Failure::Busy => return Ok(None),
                other => other?,
            };
        }
        let last = txn
            .query_one(
                Query::select()
                    .expr_as(Expr::col(messages::Column::GlobalPosition).max(), "last")
                    .from(messages::Entity)
                    .and_where(Expr::col(messages::Column::Partition).eq(partition))
                    .and_where(Expr::col(messages::Column::GlobalPosition).gt(after)),
            )
            .await?;
        txn.commit().await?;
        return Ok(Some(
            last.map(|row| row.try_get::<Option<i64>>("", "last")).transpose()?.flatten().unwrap_or(after),
        ));
    }
    // The position first, then a transaction id: every writer holding a position up to it has an
    // older id, and has ended once no transaction older than that id is running.
    let position: i64 =
        pg_scalar(conn, "SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM emt_global_message_position", [])
            .await?;
    let id: String = pg_scalar(conn, "SELECT pg_current_xact_id()::text", []).await?;
    let (started, mut pause) = (Instant::now(), Duration::from_millis(2));
    loop {
        if pg_scalar::<bool>(conn, "SELECT pg_snapshot_xmin(pg_current_snapshot()) >= $1::xid8", [id.as_str().into()])
            .await?
        {
            return Ok(Some(position));
        }
        if started.elapsed() > wait {
            return Ok(None);
        }
        tokio::time::sleep(pause).await;
        pause = Ord::min(pause * 2, Duration::from_millis(100));
    }
}

/// The first column of the one row a PostgreSQL query returns.
async fn pg_scalar<T: sea_orm::TryGetable>(
    conn: &impl ConnectionTrait,
    sql: &str,
    values: impl IntoIterator<Item = sea_orm::Value>,
) -> Result<T, DbErr> {
    conn.query_one_raw(Statement::from_sql_and_values(DbBackend::Postgres, sql, values))
        .await?
        .ok_or_else(|| DbErr::RecordNotFound(sql.to_owned()))?
        .try_get_by_index(0)
}

/// Creates a subscription's checkpoint row if needed and locks it, returning its position:
/// concurrent runners of one subscription and partition queue here, and each sees the
/// checkpoint the previous one committed. One statement where `RETURNING` exists (a no-op
/// upsert locks the row), two on MySQL.
pub(crate) async fn lock_checkpoint(
    txn: &DatabaseTransaction,
    subscription: &str,
    partition: &str,
) -> Result<i64, DbErr> {
    let key = [subscriptions::Column::SubscriptionId, subscriptions::Column::Partition, subscriptions::Column::Version];
    let mut create = Query::insert();
    create
        .into_table(subscriptions::Entity)
        .columns([
            subscriptions::Column::SubscriptionId,
            subscriptions::Column::Version,
            subscriptions::Column::Partition,
            subscriptions::Column::LastProcessedPosition,
        ])
        .values_panic([subscription.into(), 1.into(), partition.into(), 0i64.into()]);
    let position = |row: Option<sea_orm::QueryResult>| -> Result<i64, DbErr> {
        row.ok_or_else(|| DbErr::RecordNotFound(format!("subscription {subscription}")))?
            .try_get("", "last_processed_position")
    };
    if txn.get_database_backend() != DbBackend::MySql {
        let current = Expr::col((subscriptions::Entity, subscriptions::Column::LastProcessedPosition));
        create
            .on_conflict(
                OnConflict::columns(key).value(subscriptions::Column::LastProcessedPosition, current).to_owned(),
            )
            .returning_col(subscriptions::Column::LastProcessedPosition);
        return position(txn.query_one(&create).await?);
    }
    create.on_conflict(OnConflict::columns(key).do_nothing_on([subscriptions::Column::SubscriptionId]).to_owned());
    txn.execute(&create).await?;
    let locked = txn
        .query_one(
            Query::select()
                .column(subscriptions::Column::LastProcessedPosition)
                .from(subscriptions::Entity)
                .and_where(Expr::col(subscriptions::Column::SubscriptionId).eq(subscription))
                .and_where(Expr::col(subscriptions::Column::Partition).eq(partition))
                .and_where(Expr::col(subscriptions::Column::Version).eq(1))
                .lock(LockType::Update),
        )
        .await?;
    position(locked)
}

/// Locks the snapshots `ids` of read model `table`, creating missing ones first (a lock on a
/// row that does not exist locks nothing), and returns `stream_id`, `last_global_position` and
/// `snapshot` of each (`null` for new ones). Rows are taken in `ids` order (callers sort it), so
/// concurrent batches cannot deadlock. Where `RETURNING` exists, a no-op upsert creates, locks
/// and returns them in one statement; MySQL inserts, then selects `FOR UPDATE`.
pub(crate) async fn lock_snapshots(
    txn: &DatabaseTransaction,
    table: &str,
    ids: &[String],
) -> Result<Vec<sea_orm::QueryResult>, DbErr> {
    let key = [snapshots::Column::ReadmodelTableName, snapshots::Column::StreamId];
    let mut upsert = snapshots::insert_all_columns();
    for id in ids {
        upsert.values_panic([table.into(), id.as_str().into(), 0i64.into(), 0i64.into(), Value::Null.into()]);
    }
    let returned = [snapshots::Column::StreamId, snapshots::Column::LastGlobalPosition, snapshots::Column::Snapshot];
    if txn.get_database_backend() != DbBackend::MySql {
        let unchanged = Expr::col((snapshots::Entity, snapshots::Column::StreamId));
        upsert
            .on_conflict(OnConflict::columns(key).value(snapshots::Column::StreamId, unchanged).to_owned())
            .returning(Query::returning().columns(returned));
        return txn.query_all(&upsert).await;
    }
    upsert.on_conflict(OnConflict::columns(key).do_nothing_on([snapshots::Column::StreamId]).to_owned());
    txn.execute(&upsert).await?;
    txn.query_all(
        Query::select()
            .columns(returned)
            .from(snapshots::Entity)
            .and_where(Expr::col(snapshots::Column::ReadmodelTableName).eq(table))
            .and_where(Expr::col(snapshots::Column::StreamId).is_in(ids.iter().map(String::as_str)))
            .order_by(snapshots::Column::StreamId, sea_orm::Order::Asc)
            .lock(LockType::Update),
    )
    .await
}

/// What a read-model table looks like: its columns (with their collation where the backend
/// has one per column) and the column sets of its primary and unique keys.
pub(crate) struct TableShape {
    pub columns: BTreeMap<String, Option<String>>,
    pub unique_keys: Vec<BTreeSet<String>>,
}

/// The shape of `table` from the catalog, `None` when it does not exist. Partial and expression
/// indexes are left out: an upsert can't use them as its conflict target.
pub(crate) async fn table_shape(conn: &impl ConnectionTrait, table: &str) -> Result<Option<TableShape>, DbErr> {
    let backend = conn.get_database_backend();
    let (columns_sql, keys_sql) = match backend {
        DbBackend::Postgres => (
            "SELECT a.attname::text, NULL::text FROM pg_attribute a
             WHERE a.attrelid = to_regclass(quote_ident($1)) AND a.attnum > 0 AND NOT a.attisdropped",
            "SELECT i.indexrelid::text, a.attname::text FROM pg_index i
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)
             WHERE i.indrelid = to_regclass(quote_ident($1)) AND i.indisunique
               AND i.indpred IS NULL AND i.indexprs IS NULL",
        ),
        DbBackend::MySql => (
            "SELECT COLUMN_NAME, COLLATION_NAME FROM information_schema.COLUMNS
             WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ?",
            "SELECT INDEX_NAME, COLUMN_NAME FROM information_schema.STATISTICS
             WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ? AND NON_UNIQUE = 0 AND COLUMN_NAME IS NOT NULL",
        ),
        _ => (
            "SELECT name, NULL FROM pragma_table_info(?)",
            // The primary key (a rowid alias has no index), then the unique indexes.
            "SELECT '' AS key_name, name FROM pragma_table_info(?1) WHERE pk > 0
             UNION ALL SELECT il.name, ii.name FROM pragma_index_list(?1) il, pragma_index_info(il.name) ii
             WHERE il.\"unique\" = 1 AND il.partial = 0 AND il.origin <> 'pk'",
        ),
    };
    let query = |sql: &str| conn.query_all_raw(Statement::from_sql_and_values(backend, sql, [table.into()]));
    let columns: BTreeMap<String, Option<String>> = query(columns_sql)
        .await?
        .iter()
        .map(|row| Ok((row.try_get_by_index(0)?, row.try_get_by_index(1)?)))
        .collect::<Result<_, DbErr>>()?;
    if columns.is_empty() {
        return Ok(None);
    }
    let mut keys: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for row in query(keys_sql).await? {
        keys.entry(row.try_get_by_index(0)?).or_default().insert(row.try_get_by_index(1)?);
    }
    Ok(Some(TableShape { columns, unique_keys: keys.into_values().collect() }))
}

/// Creates the PostgreSQL partitions of `partition` for the three partitioned tables, moving any
/// of its rows out of the DEFAULT partitions. Idempotent; a no-op on SQLite and MySQL.
pub(crate) async fn create_partition<C: TransactionTrait<Transaction = DatabaseTransaction>>(
    conn: &C,
    partition: &str,
) -> Result<(), DbErr> {
    let txn = conn.begin().await?;
    if txn.get_database_backend() != DbBackend::Postgres {
        return Ok(());
    }
    let literal = PostgresQueryBuilder.value_to_string(&partition.into());
    for table in ["streams", "messages", "subscriptions"] {
        let name = partition_table_name(table, partition);
        let exists = txn
            .query_one_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                "SELECT 1 FROM pg_class WHERE relname = $1",
                [name.as_str().into()],
            ))
            .await?
            .is_some();
        if exists {
            continue;
        }
        // `name` holds only [a-z0-9_]; `literal` is quoted by sea-query.
        for ddl in [
            format!("CREATE TABLE {name} (LIKE {table} INCLUDING DEFAULTS INCLUDING CONSTRAINTS)"),
            format!("INSERT INTO {name} SELECT * FROM {table}_default WHERE partition = {literal}"),
            format!("DELETE FROM {table}_default WHERE partition = {literal}"),
            format!("ALTER TABLE {table} ATTACH PARTITION {name} FOR VALUES IN ({literal})"),
        ] {
            txn.execute_unprepared(&ddl).await?;
        }
    }
    txn.commit().await
}

/// `streams_p_<readable part>_<hash>`: only `[a-z0-9_]`, at most 63 bytes, distinct per tenant.
fn partition_table_name(table: &str, partition: &str) -> String {
    let readable: String = partition
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '_' })
        .take(63 - table.len() - 3 - 9)
        .collect();
    // FNV-1a: stable across releases, unlike std's hasher.
    let hash = partition.bytes().fold(0x811c_9dc5_u32, |h, b| (h ^ b as u32).wrapping_mul(0x0100_0193));
    format!("{table}_p_{readable}_{hash:08x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_table_names_are_safe_distinct_and_short() {
        let a = partition_table_name("subscriptions", "Tenant A\"; DROP TABLE x; --");
        assert!(a.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'), "{a}");
        assert_ne!(partition_table_name("streams", "a-b"), partition_table_name("streams", "a_b"));
        assert!(partition_table_name("subscriptions", &"x".repeat(500)).len() <= 63);
    }

    #[test]
    fn sqlite_ddl_never_declares_json_affinity() {
        // A column declared JSON has NUMERIC affinity in SQLite and would turn "1" into 1.
        assert!(create_schema(DbBackend::Sqlite).unwrap().iter().all(|s| !s.contains(" JSON")));
    }
}
