//! How far a reader in global order may go without passing a late commit.

use std::time::{Duration, Instant};

use sea_orm::sea_query::{Expr, ExprTrait, Query};
use sea_orm::{ConnectionTrait, DatabaseTransaction, DbBackend, DbErr, Statement, TransactionTrait};

use super::failure::{Failure, classify};
use super::{partition_column, statement};
use crate::schema::messages;

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
/// - PostgreSQL: the sequence's value, once the writers that may hold a position up to it have
///   ended ([`pg_horizon`]).
pub(crate) async fn horizon<C: ConnectionTrait + TransactionTrait<Transaction = DatabaseTransaction>>(
    conn: &C,
    partition: &str,
    after: i64,
    wait: Duration,
) -> Result<Option<i64>, DbErr> {
    let backend = conn.get_database_backend();
    if backend != DbBackend::Postgres {
        let txn = conn.begin().await?;
        if backend == DbBackend::MySql && !mysql_gate(&txn, &[partition], wait).await? {
            return Ok(None);
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
    pg_horizon(conn, wait).await
}

/// MySQL: the horizon of the tenants `partitions` read together (a daemon's group): their rows
/// of `emt_partitions` taken exclusively, which waits for their appends in flight, then the
/// last committed global position of all. Positions are handed out in increasing order, so
/// every later append of these tenants lands past it. `None` when their appends did not end
/// within `wait`.
pub(crate) async fn tenants_horizon<C: ConnectionTrait + TransactionTrait<Transaction = DatabaseTransaction>>(
    conn: &C,
    partitions: &[&str],
    wait: Duration,
) -> Result<Option<i64>, DbErr> {
    let txn = conn.begin().await?;
    if !mysql_gate(&txn, partitions, wait).await? {
        return Ok(None);
    }
    let last = txn
        .query_one(
            Query::select().expr_as(Expr::col(messages::Column::GlobalPosition).max(), "last").from(messages::Entity),
        )
        .await?;
    txn.commit().await?;
    Ok(Some(last.map(|row| row.try_get::<Option<i64>>("", "last")).transpose()?.flatten().unwrap_or(0)))
}

/// MySQL: takes the rows of `partitions` in `emt_partitions` exclusively (in order, so two
/// readers can't deadlock), waiting at most `wait` for the appends that share them: whether
/// it got them.
async fn mysql_gate(txn: &DatabaseTransaction, partitions: &[&str], wait: Duration) -> Result<bool, DbErr> {
    let mut partitions = partitions.to_vec();
    partitions.sort_unstable();
    txn.execute_unprepared(&format!("SET SESSION innodb_lock_wait_timeout = {}", Ord::max(wait.as_secs(), 1))).await?;
    let mut gate = Ok(());
    for chunk in partitions.chunks(500) {
        let list = vec!["?"; chunk.len()].join(", ");
        let sql = format!(
            "SELECT 1 FROM emt_partitions {} WHERE `partition` IN ({list}) ORDER BY `partition` FOR UPDATE",
            super::MYSQL_PRIMARY_KEY_ONLY
        );
        let values = chunk.iter().map(|p| (*p).into());
        gate = txn.query_all_raw(Statement::from_sql_and_values(DbBackend::MySql, sql, values)).await.map(|_| ());
        if gate.is_err() {
            break;
        }
    }
    txn.execute_unprepared("SET SESSION innodb_lock_wait_timeout = DEFAULT").await?;
    match gate {
        Err(err) if classify(&err) == Failure::Busy => Ok(false),
        other => other.map(|_| true),
    }
}

/// PostgreSQL: the sequence's value S, once every transaction that held a row-exclusive lock on
/// `messages` or `streams` (or one of their tenant partitions, written directly) when S was read
/// has ended. A writer locks both tables before it takes
/// a position (an `INSERT` locks its table when it is planned, before `nextval` runs), so every
/// position up to S belongs to a transaction that had ended or held such a lock. Nothing else is
/// waited for: transactions writing other tables, or other databases, don't hold projections
/// back, and the reader takes no transaction id (reading `pg_locks` and the sequence writes
/// nothing).
async fn pg_horizon(conn: &impl ConnectionTrait, wait: Duration) -> Result<Option<i64>, DbErr> {
    let position: i64 =
        pg_scalar(conn, "SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM emt_global_message_position", [])
            .await?;
    // Virtual transaction ids (`backend/local`), comma-separated.
    let writers: Option<String> = pg_scalar(
        conn,
        "SELECT string_agg(DISTINCT virtualtransaction, ',') FROM pg_locks
         WHERE locktype = 'relation' AND mode = 'RowExclusiveLock' AND pid <> pg_backend_pid()
           AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
           AND relation IN (SELECT 'messages'::regclass UNION ALL SELECT 'streams'::regclass
                            UNION ALL SELECT inhrelid FROM pg_inherits
                            WHERE inhparent IN ('messages'::regclass, 'streams'::regclass))",
        [],
    )
    .await?;
    let Some(writers) = writers else {
        return Ok(Some(position));
    };
    let (started, mut pause) = (Instant::now(), Duration::from_millis(1));
    loop {
        let running: bool = pg_scalar(
            conn,
            "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'virtualxid' AND virtualxid = ANY(string_to_array($1, ',')))",
            [writers.as_str().into()],
        )
        .await?;
        if !running {
            return Ok(Some(position));
        }
        if started.elapsed() > wait {
            return Ok(None);
        }
        tokio::time::sleep(pause).await;
        pause = Ord::min(pause * 2, Duration::from_millis(50));
    }
}

/// The last global position handed out (committed or not): a cheap "did anything happen" probe.
/// PostgreSQL reads the sequence, SQLite its counter row, MySQL the last committed position.
pub(crate) async fn head(conn: &impl ConnectionTrait) -> Result<i64, DbErr> {
    let backend = conn.get_database_backend();
    let row = conn.query_one_raw(Statement::from_string(backend, format!("SELECT {}", head_sql(backend)))).await?;
    Ok(row.map(|row| row.try_get_by_index::<i64>(0)).transpose()?.unwrap_or(0))
}

/// [`head`] as a scalar subquery.
pub(crate) fn head_sql(backend: DbBackend) -> &'static str {
    match backend {
        DbBackend::Postgres => {
            "(SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM emt_global_message_position)"
        }
        DbBackend::Sqlite => "(SELECT last_value FROM emt_global_message_position WHERE id = 1)",
        _ => "(SELECT coalesce(max(global_position), 0) FROM messages)",
    }
}

/// A position up to which every event of every partition is committed or will never be (see
/// [`horizon`]), or `None` when writers did not finish within `wait`. MySQL has no such global
/// position without stopping every writer; there it is `None` and callers look at each
/// partition.
pub(crate) async fn global_horizon(conn: &impl ConnectionTrait, wait: Duration) -> Result<Option<i64>, DbErr> {
    match conn.get_database_backend() {
        DbBackend::Postgres => pg_horizon(conn, wait).await,
        DbBackend::Sqlite => head(conn).await.map(Some),
        _ => Ok(None),
    }
}

/// Partitions with their last global position: every partition holding events (`None`: a skip
/// scan of the `(partition, global_position)` index, one probe per partition however many
/// events there are), or just `these` (one probe each).
pub(crate) async fn partition_heads(
    conn: &impl ConnectionTrait,
    these: Option<&[String]>,
) -> Result<Vec<(String, i64)>, DbErr> {
    let backend = conn.get_database_backend();
    let p = partition_column(backend);
    let query = match these {
        // MySQL stops a recursive CTE after 1,000 rounds (MariaDB's `max_recursive_iterations`,
        // MySQL's `cte_max_recursion_depth`): it would list 1,001 tenants. Its appends register
        // every partition in `emt_partitions` (the migration filled it from `streams`).
        None if backend == DbBackend::MySql => Statement::from_string(
            backend,
            "SELECT t.`partition`, (SELECT max(global_position) FROM messages
                                    WHERE `partition` = t.`partition` AND NOT is_archived)
             FROM emt_partitions t",
        ),
        None => Statement::from_string(
            backend,
            format!(
                "WITH RECURSIVE t(p) AS (
                   SELECT min({p}) FROM messages
                   UNION ALL
                   SELECT (SELECT min({p}) FROM messages WHERE {p} > t.p) FROM t WHERE t.p IS NOT NULL)
                 SELECT p, (SELECT max(global_position) FROM messages WHERE {p} = t.p AND NOT is_archived) FROM t
                 WHERE p IS NOT NULL"
            ),
        ),
        Some([]) => return Ok(Vec::new()),
        Some(these) => {
            let list = serde_json::to_string(these).map_err(|e| DbErr::Custom(e.to_string()))?;
            let sql = match backend {
                DbBackend::Postgres => {
                    "SELECT t.p, (SELECT max(global_position) FROM messages WHERE partition = t.p AND NOT is_archived)
                     FROM json_array_elements_text($1::json) AS t(p)"
                }
                DbBackend::Sqlite => {
                    "SELECT t.value, (SELECT max(global_position) FROM messages
                                      WHERE partition = t.value AND NOT is_archived)
                     FROM json_each(?) AS t"
                }
                _ => {
                    let rows = vec!["SELECT ? AS p"; these.len()].join(" UNION ALL ");
                    let sql = format!(
                        "SELECT t.p, (SELECT max(global_position) FROM messages
                                      WHERE `partition` = t.p AND NOT is_archived)
                         FROM ({rows}) AS t"
                    );
                    let values = these.iter().map(|t| sea_orm::Value::from(t.as_str()));
                    return collect(conn.query_all_raw(Statement::from_sql_and_values(backend, sql, values)).await?);
                }
            };
            Statement::from_sql_and_values(backend, sql, [list.into()])
        }
    };
    collect(conn.query_all_raw(query).await?)
}

/// `(partition, last position)` rows.
fn collect(rows: Vec<sea_orm::QueryResult>) -> Result<Vec<(String, i64)>, DbErr> {
    rows.into_iter()
        .map(|row| Ok((row.try_get_by_index(0)?, row.try_get_by_index::<Option<i64>>(1)?.unwrap_or(0))))
        .collect()
}

/// PostgreSQL: while `on`, plan the transaction's queries without sorts, so a partition read in
/// global order walks the `(partition, global_position)` index and stops after its batch.
/// Without statistics (a tenant's fresh partition before autovacuum analyzed it) the planner
/// estimates one row and prefers a bitmap scan of the whole range plus a sort: 70 ms instead of
/// 0.4 ms per batch of 500 on a 100,000-event tenant. A no-op elsewhere.
pub(crate) async fn index_order_only(txn: &DatabaseTransaction, on: bool) -> Result<(), DbErr> {
    if txn.get_database_backend() == DbBackend::Postgres {
        txn.execute_unprepared(if on { "SET LOCAL enable_sort = off" } else { "SET LOCAL enable_sort = DEFAULT" })
            .await?;
    }
    Ok(())
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

/// The events of `partition` after `after`: how many, and the age in seconds of the oldest
/// (by its `created` time on the database's clock).
pub(crate) async fn pending(conn: &impl ConnectionTrait, partition: &str, after: i64) -> Result<(i64, f64), DbErr> {
    let backend = conn.get_database_backend();
    let age = age_of_oldest(backend, "created");
    let sql = format!(
        "SELECT count(*), {age} FROM messages WHERE NOT is_archived AND {p} = $1 AND global_position > $2",
        p = partition_column(backend),
    );
    let row = conn.query_one_raw(statement(backend, &sql, [partition.into(), after.into()])).await?;
    Ok(match row {
        Some(row) => (row.try_get_by_index(0)?, row.try_get_by_index::<Option<f64>>(1)?.unwrap_or(0.0)),
        None => (0, 0.0),
    })
}

/// SQL: the age in seconds (on the database's clock) of the oldest of the rows' `created`.
pub(crate) fn age_of_oldest(backend: DbBackend, created: &str) -> String {
    match backend {
        DbBackend::Postgres => format!("extract(epoch from now() - min({created}))::float8"),
        DbBackend::MySql => format!("TIMESTAMPDIFF(MICROSECOND, min({created}), NOW(3)) / 1e6"),
        _ => format!("(julianday('now') - julianday(min({created}))) * 86400.0"),
    }
}

/// The last global position of `partition` at or below `upto`.
pub(crate) async fn last_position_upto(
    conn: &impl ConnectionTrait,
    partition: &str,
    upto: i64,
) -> Result<Option<i64>, DbErr> {
    let row = conn
        .query_one(
            Query::select()
                .expr_as(Expr::col(messages::Column::GlobalPosition).max(), "last")
                .from(messages::Entity)
                .and_where(Expr::col(messages::Column::Partition).eq(partition))
                .and_where(Expr::col(messages::Column::GlobalPosition).lte(upto))
                .and_where(Expr::col(messages::Column::IsArchived).eq(false)),
        )
        .await?;
    Ok(row.map(|row| row.try_get::<Option<i64>>("", "last")).transpose()?.flatten())
}

/// The partitions with events at global positions in `(after, upto]`, each with its last one
/// there, and how many positions of the range hold an event (archived or not): one range read
/// of the global position index, costing what happened since `after`, however many partitions
/// exist. On MySQL a count below `upto - after` means a position of the range is not committed
/// yet (or never will be).
pub(crate) async fn changes(
    conn: &impl ConnectionTrait,
    after: i64,
    upto: i64,
) -> Result<(Vec<(String, i64)>, i64), DbErr> {
    let backend = conn.get_database_backend();
    let sql = format!(
        "SELECT {p}, max(global_position), count(*) FROM messages
         WHERE global_position > $1 AND global_position <= $2 GROUP BY {p}",
        p = partition_column(backend),
    );
    let rows = conn.query_all_raw(statement(backend, &sql, [after.into(), upto.into()])).await?;
    let mut found = 0;
    let mut partitions = Vec::with_capacity(rows.len());
    for row in rows {
        found += row.try_get_by_index::<i64>(2)?;
        partitions.push((row.try_get_by_index(0)?, row.try_get_by_index(1)?));
    }
    Ok((partitions, found))
}
