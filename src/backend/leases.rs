//! The daemon's coordination tables and their SQL: a lease row per (subscription, tenant) with
//! its failures, and one row per running instance with its expiry. What instances hold are
//! segments of tenants ([`super::segments`]).
//!
//! Times are milliseconds since the Unix epoch on the *database's* clock, so instances on
//! machines whose clocks disagree still agree on who holds what.
//!
//! A segment is held while its owner is **live**, which its loop renews every `renew_every` —
//! one renewal per instance however many leases it holds: by writing the expiry of its instance
//! row, or on PostgreSQL, while its *presence connection* is up, by moving the deadline that
//! connection carries in its `application_name` (no write). A killed instance's presence
//! connection closes with it, so its segments are free at once; a hung or paused one (a stuck
//! handler, SIGSTOP, a VM pause) stops renewing and loses them after the TTL. Its batches are
//! then refused by the epoch. (`emt_leases.owner`, `epoch` and `expires_at`, which earlier
//! versions held per tenant, are no longer read or written.)

use sea_orm::{ConnectionTrait, DatabaseTransaction, DbBackend, DbErr, Statement, TransactionTrait, Value};

use super::instances::now_ms;
use super::segments::{SegmentRow, Segments, segment_of};
use super::{partition_column, statement};

/// DDL of the coordination tables (the third migration), not run.
pub(crate) async fn create_lease_tables(conn: &impl ConnectionTrait) -> Result<Vec<String>, DbErr> {
    let backend = conn.get_database_backend();
    let (text, long, bigint, table) = match backend {
        DbBackend::MySql => {
            let collation = super::mysql_exact_collation(conn).await?;
            ("VARCHAR(255)", "TEXT", "BIGINT", format!("DEFAULT CHARACTER SET utf8mb4 COLLATE {collation}"))
        }
        DbBackend::Postgres => ("text", "text", "bigint", String::new()),
        _ => ("TEXT", "TEXT", "INTEGER", String::new()),
    };
    let p = partition_column(backend);
    Ok(vec![
        format!(
            "CREATE TABLE IF NOT EXISTS emt_leases (
               subscription_id {text} NOT NULL, {p} {text} NOT NULL, owner {text},
               epoch {bigint} NOT NULL DEFAULT 0, expires_at {bigint} NOT NULL DEFAULT 0,
               failures {bigint} NOT NULL DEFAULT 0, retry_at {bigint} NOT NULL DEFAULT 0,
               last_error {long}, error_position {bigint},
               PRIMARY KEY (subscription_id, {p})) {table}"
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS emt_daemons (owner {text} NOT NULL PRIMARY KEY, expires_at {bigint} NOT NULL) {table}"
        ),
    ])
}

/// DDL of the index on lease owners (the fourth migration), not run: renewing and giving back
/// an instance's leases (`WHERE owner = …`) then reads only its rows. Without it, MySQL scans
/// the table and waits for every lease row another transaction locked, another tenant's too.
pub(crate) async fn create_owner_index(conn: &impl ConnectionTrait) -> Result<Vec<String>, DbErr> {
    Ok(match conn.get_database_backend() {
        DbBackend::MySql => {
            // No `CREATE INDEX IF NOT EXISTS` on MySQL; the migration may run twice (see `migrate`).
            let exists = "SELECT 1 FROM information_schema.STATISTICS WHERE TABLE_SCHEMA = DATABASE()
                          AND TABLE_NAME = 'emt_leases' AND INDEX_NAME = 'emt_leases_owner'";
            match conn.query_one_raw(Statement::from_string(DbBackend::MySql, exists)).await? {
                Some(_) => Vec::new(),
                None => vec!["CREATE INDEX emt_leases_owner ON emt_leases (owner)".to_owned()],
            }
        }
        _ => vec!["CREATE INDEX IF NOT EXISTS emt_leases_owner ON emt_leases (owner)".to_owned()],
    })
}

/// Drops the index on lease owners.
pub(crate) async fn drop_owner_index(conn: &impl ConnectionTrait) -> Result<(), DbErr> {
    let drop = match conn.get_database_backend() {
        DbBackend::MySql => "DROP INDEX emt_leases_owner ON emt_leases",
        _ => "DROP INDEX IF EXISTS emt_leases_owner",
    };
    conn.execute_unprepared(drop).await.map(|_| ())
}

/// Drops the coordination tables.
pub(crate) async fn drop_lease_tables(conn: &impl ConnectionTrait) -> Result<(), DbErr> {
    conn.execute_unprepared("DROP TABLE IF EXISTS emt_leases").await?;
    conn.execute_unprepared("DROP TABLE IF EXISTS emt_daemons").await?;
    Ok(())
}

/// A tenant's lease row, with the owner of its segment.
#[derive(Debug, Clone)]
pub(crate) struct LeaseRow {
    pub subscription: String,
    pub partition: String,
    /// The instance holding the tenant's segment, and whether another may take it now.
    pub owner: Option<String>,
    pub free: bool,
    /// Failed runs in a row (0 = healthy).
    pub failures: i64,
    /// Milliseconds until a parked lease may run again (0 = now).
    pub retry_in_ms: i64,
    /// The last failure, and the checkpoint it happened after.
    pub last_error: Option<String>,
    pub error_position: Option<i64>,
    /// Milliseconds until the owner's registration expires unless it renews it (0 = expired).
    pub expires_in_ms: i64,
}

/// A lease row with its projection's progress, as `status` reports it.
pub(crate) struct LeaseReport {
    pub lease: LeaseRow,
    /// The checkpoint (0 before the first batch).
    pub checkpoint: i64,
    /// The tenant's last live global position (`None`: no live event).
    pub head: Option<i64>,
    /// Live events past the checkpoint, and the age in seconds of the oldest of them.
    pub lag_events: i64,
    pub lag_seconds: f64,
}

/// The lease rows of `subscriptions` with their checkpoints, heads and lag, and the segments
/// with the number of live instances: one statement, however many tenants (each row's figures are index lookups
/// on the tenant's `(partition, global_position)` range).
pub(crate) async fn lease_reports<C: ConnectionTrait + TransactionTrait<Transaction = DatabaseTransaction>>(
    conn: &C,
    subscriptions: &[String],
) -> Result<(Vec<LeaseReport>, Segments), DbErr> {
    let backend = conn.get_database_backend();
    let p = partition_column(backend);
    let past = format!("FROM messages m WHERE m.{p} = l.{p} AND NOT m.is_archived");
    let progress = format!(
        ", l.checkpoint, (SELECT max(m.global_position) {past}),
           (SELECT count(*) {past} AND m.global_position > l.checkpoint),
           (SELECT {age} {past} AND m.global_position > l.checkpoint)",
        age = super::horizon::age_of_oldest(backend, "m.created"),
    );
    // Each lease's checkpoint by its key (not a join: with tables just filled, before their
    // statistics, PostgreSQL planned a nested loop over every lease × every checkpoint —
    // 0.5 s at 2,000 tenants, growing with the square).
    let leases = format!(
        "(SELECT e.*, COALESCE((SELECT s.last_processed_position FROM subscriptions s
                                WHERE s.subscription_id = e.subscription_id AND s.{p} = e.{p} AND s.version = 1), 0)
                      AS checkpoint
          FROM emt_leases e)"
    );
    // PostgreSQL plans three index probes per tenant; past ~1,000 tenants the estimate crosses
    // `jit_above_cost` and compiling the query took longer than running it (55 ms of 105 at
    // 2,000 tenants, more as inlining and optimization kick in): not for a query this cheap.
    let txn = conn.begin().await?;
    if backend == DbBackend::Postgres {
        txn.execute_unprepared("SET LOCAL jit = off").await?;
    }
    let rows = select_leases(&txn, subscriptions, &progress, &leases).await?;
    let segments = super::segments::segments(&txn, subscriptions).await?;
    txn.commit().await?;
    let mut reports = Vec::with_capacity(rows.len());
    for row in rows {
        let Some(lease) = lease_row(&row, &segments.rows)? else { continue };
        reports.push(LeaseReport {
            lease,
            checkpoint: row.try_get_by_index(LEASE_COLUMNS)?,
            head: row.try_get_by_index(LEASE_COLUMNS + 1)?,
            lag_events: row.try_get_by_index(LEASE_COLUMNS + 2)?,
            lag_seconds: row.try_get_by_index::<Option<f64>>(LEASE_COLUMNS + 3)?.unwrap_or(0.0),
        });
    }
    Ok((reports, segments))
}

/// Every tenant's lease row of `subscriptions` (no owners: see [`lease_reports`]).
pub(crate) async fn lease_rows(conn: &impl ConnectionTrait, subscriptions: &[String]) -> Result<Vec<LeaseRow>, DbErr> {
    let rows = select_leases(conn, subscriptions, "", "emt_leases").await?;
    rows.iter().filter_map(|row| lease_row(row, &[]).transpose()).collect()
}

/// The columns [`select_leases`] reads before the caller's.
const LEASE_COLUMNS: usize = 6;

/// Each lease row of `subscriptions` from `leases` (`emt_leases` or a derived table over it),
/// with `columns` (`, …`, over the lease `l`) after [`LEASE_COLUMNS`].
async fn select_leases(
    conn: &impl ConnectionTrait,
    subscriptions: &[String],
    columns: &str,
    leases: &str,
) -> Result<Vec<sea_orm::QueryResult>, DbErr> {
    let backend = conn.get_database_backend();
    let marks = (1..=subscriptions.len()).map(|i| format!("${i}")).collect::<Vec<_>>().join(", ");
    let matching =
        if subscriptions.is_empty() { "1 = 0".to_owned() } else { format!("l.subscription_id IN ({marks})") };
    let sql = format!(
        "SELECT l.subscription_id, l.{p}, l.failures, CASE WHEN l.retry_at > {now} THEN l.retry_at - {now} ELSE 0 END,
                l.last_error, l.error_position{columns}
         FROM {leases} l WHERE {matching}",
        p = partition_column(backend),
        now = now_ms(backend),
    );
    let values = subscriptions.iter().map(|s| Value::from(s.as_str()));
    conn.query_all_raw(statement(backend, &sql, values)).await
}

/// The lease of a [`select_leases`] row, with the owner of its segment among `segments`.
fn lease_row(row: &sea_orm::QueryResult, segments: &[SegmentRow]) -> Result<Option<LeaseRow>, DbErr> {
    let subscription: String = row.try_get_by_index(0)?;
    let partition: String = row.try_get_by_index(1)?;
    let segment = segment_of(&partition);
    let holder = segments.iter().find(|s| s.subscription == subscription && s.segment == segment);
    Ok(Some(LeaseRow {
        owner: holder.and_then(|s| s.owner.clone()),
        free: holder.is_none_or(|s| s.free),
        expires_in_ms: holder.map_or(0, |s| s.expires_in_ms),
        subscription,
        partition,
        failures: row.try_get_by_index(2)?,
        retry_in_ms: row.try_get_by_index(3)?,
        last_error: row.try_get_by_index(4)?,
        error_position: row.try_get_by_index(5)?,
    }))
}

/// Creates the lease rows of (subscription, partition) pairs that have none (unowned).
pub(crate) async fn ensure_leases(conn: &impl ConnectionTrait, pairs: &[(String, String)]) -> Result<(), DbErr> {
    if pairs.is_empty() {
        return Ok(());
    }
    let backend = conn.get_database_backend();
    // In key order: instances creating the same rows at once queue on them instead of deadlocking.
    let mut pairs: Vec<(&str, &str)> = pairs.iter().map(|(s, t)| (s.as_str(), t.as_str())).collect();
    pairs.sort_unstable();
    // PostgreSQL and SQLite: the pairs as one JSON parameter (as `move_checkpoints` does), one
    // statement however many (10,000 tenants × 2 projections in statements of 100 rows, each
    // committed alone, took 0.75 s of a 4.6 s catch-up).
    let sql = match backend {
        DbBackend::Postgres => Some(
            "INSERT INTO emt_leases (subscription_id, partition)
             SELECT e ->> 0, e ->> 1 FROM json_array_elements($1::json) AS e ON CONFLICT DO NOTHING",
        ),
        DbBackend::Sqlite => Some(
            "INSERT INTO emt_leases (subscription_id, partition)
             SELECT value ->> 0, value ->> 1 FROM json_each($1) WHERE true ON CONFLICT DO NOTHING",
        ),
        _ => None,
    };
    if let Some(sql) = sql {
        let json = serde_json::to_string(&pairs).map_err(|e| DbErr::Custom(e.to_string()))?;
        conn.execute_raw(statement(backend, sql, [json.into()])).await?;
        return Ok(());
    }
    let p = partition_column(backend);
    for chunk in pairs.chunks(1000) {
        let rows = vec!["(?, ?)"; chunk.len()].join(", ");
        let sql = format!("INSERT IGNORE INTO emt_leases (subscription_id, {p}) VALUES {rows}");
        let values = chunk.iter().flat_map(|(s, t)| [Value::from(*s), Value::from(*t)]);
        conn.execute_raw(statement(backend, &sql, values)).await?;
    }
    Ok(())
}

/// A failed run, as [`park`] records it.
pub(crate) struct FailedRun<'a> {
    /// Failed runs in a row, this one included.
    pub failures: i64,
    /// Milliseconds until it may run again.
    pub retry_in_ms: i64,
    pub error: &'a str,
    /// The failing event's position, or the checkpoint the run failed after.
    pub position: i64,
}

/// Parks a lease after a failed run: records the error and where it happened, and when it may
/// run again, where every instance (and `status()`) can read it. With `fence` (a daemon's
/// `(owner, epoch)`), only while that instance still holds the tenant's segment at that epoch:
/// a paused instance whose late batch failed after a takeover records nothing over the new
/// holder's tenant. Whether it recorded.
pub(crate) async fn park(
    conn: &impl ConnectionTrait,
    subscription: &str,
    partition: &str,
    run: FailedRun<'_>,
    fence: Option<(&str, i64)>,
) -> Result<bool, DbErr> {
    let backend = conn.get_database_backend();
    let held = match fence {
        Some(_) => {
            "AND EXISTS (SELECT 1 FROM emt_segments g WHERE g.subscription_id = $7 AND g.segment = $8
                                AND g.owner = $9 AND g.epoch = $10)"
        }
        None => "",
    };
    let sql = format!(
        "UPDATE emt_leases SET failures = $1, retry_at = {now} + $2, last_error = $3, error_position = $4
         WHERE subscription_id = $5 AND {p} = $6 {held}",
        now = now_ms(backend),
        p = partition_column(backend),
    );
    let mut values: Vec<Value> = vec![
        run.failures.into(),
        run.retry_in_ms.into(),
        run.error.into(),
        run.position.into(),
        subscription.into(),
        partition.into(),
    ];
    if let Some((owner, epoch)) = fence {
        values.extend([subscription.into(), segment_of(partition).into(), owner.into(), epoch.into()]);
    }
    Ok(conn.execute_raw(statement(backend, &sql, values)).await?.rows_affected() > 0)
}

/// Clears the failure records of `partitions`' leases: in the transaction of a batch that
/// succeeded, so the record goes with the progress.
pub(crate) async fn unpark(txn: &DatabaseTransaction, subscription: &str, partitions: &[&str]) -> Result<(), DbErr> {
    if partitions.is_empty() {
        return Ok(());
    }
    let backend = txn.get_database_backend();
    let marks = (2..partitions.len() + 2).map(|i| format!("${i}")).collect::<Vec<_>>().join(", ");
    let sql = format!(
        "UPDATE emt_leases SET failures = 0, retry_at = 0, last_error = NULL, error_position = NULL
         WHERE subscription_id = $1 AND {p} IN ({marks})",
        p = partition_column(backend),
    );
    let values = std::iter::once(Value::from(subscription)).chain(partitions.iter().map(|p| Value::from(*p)));
    txn.execute_raw(statement(backend, &sql, values)).await?;
    Ok(())
}

/// Removes every lease and segment row of `subscription` (retiring it); the number of leases.
pub(crate) async fn forget_leases(conn: &impl ConnectionTrait, subscription: &str) -> Result<u64, DbErr> {
    let backend = conn.get_database_backend();
    let sql = "DELETE FROM emt_segments WHERE subscription_id = $1";
    conn.execute_raw(statement(backend, sql, [subscription.into()])).await?;
    let sql = "DELETE FROM emt_leases WHERE subscription_id = $1";
    Ok(conn.execute_raw(statement(backend, sql, [subscription.into()])).await?.rows_affected())
}

/// Every subscription with lease rows: the projections daemons have run.
pub(crate) async fn lease_subscriptions(conn: &impl ConnectionTrait) -> Result<Vec<String>, DbErr> {
    let sql = "SELECT DISTINCT subscription_id FROM emt_leases ORDER BY subscription_id";
    let rows = conn.query_all_raw(Statement::from_string(conn.get_database_backend(), sql)).await?;
    rows.iter().map(|row| row.try_get_by_index(0)).collect()
}
