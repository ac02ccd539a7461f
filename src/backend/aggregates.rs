//! Aggregate snapshots: a stream's folded state at a stream position, so a long stream's
//! aggregate folds only its tail (`emt_aggregate_snapshots`).

use sea_orm::sea_query::{Alias, Expr, ExprTrait, OnConflict, Query};
use sea_orm::{ConnectionTrait, DbBackend, DbErr};

use super::partition_column;

/// The table.
pub(crate) const TABLE: &str = "emt_aggregate_snapshots";

/// DDL of the aggregate snapshots table (a migration), not run.
pub(crate) async fn create_aggregate_snapshots(conn: &impl ConnectionTrait) -> Result<Vec<String>, DbErr> {
    let backend = conn.get_database_backend();
    let (text, bigint, state, table) = match backend {
        DbBackend::MySql => {
            let collation = super::mysql_exact_collation(conn).await?;
            ("VARCHAR(255)", "BIGINT", "LONGTEXT", format!("DEFAULT CHARACTER SET utf8mb4 COLLATE {collation}"))
        }
        DbBackend::Postgres => ("text", "bigint", "text", String::new()),
        _ => ("TEXT", "INTEGER", "TEXT", String::new()),
    };
    let p = partition_column(backend);
    Ok(vec![format!(
        "CREATE TABLE IF NOT EXISTS {TABLE} (
           {p} {text} NOT NULL, stream_id {text} NOT NULL, snapshot_version {bigint} NOT NULL,
           stream_position {bigint} NOT NULL, state {state} NOT NULL, PRIMARY KEY ({p}, stream_id)) {table}"
    )])
}

/// Drops the aggregate snapshots table.
pub(crate) async fn drop_aggregate_snapshots(conn: &impl ConnectionTrait) -> Result<(), DbErr> {
    conn.execute_unprepared(&format!("DROP TABLE IF EXISTS {TABLE}")).await.map(|_| ())
}

/// A stored snapshot: the version it was written under, the stream position it folds up to, and
/// the state's JSON text.
pub(crate) struct StoredSnapshot {
    pub version: i64,
    pub position: i64,
    pub state: String,
}

/// The stream's version (0: none) and its snapshot, if one is stored: one statement, so loading
/// from a snapshot costs no round trip more than an aggregate without.
pub(crate) async fn load(
    conn: &impl ConnectionTrait,
    partition: &str,
    stream_id: &str,
) -> Result<(u64, Option<StoredSnapshot>), DbErr> {
    let backend = conn.get_database_backend();
    let p = partition_column(backend);
    let sql = format!(
        "SELECT (SELECT s.stream_position FROM streams s
                 WHERE s.stream_id = $1 AND s.{p} = $2 AND s.is_archived = false),
                a.snapshot_version, a.stream_position, a.state
         FROM (SELECT 1 AS one) AS o LEFT JOIN {TABLE} a ON a.{p} = $3 AND a.stream_id = $4"
    );
    let values = [stream_id.into(), partition.into(), partition.into(), stream_id.into()];
    let row = conn.query_one_raw(super::statement(backend, &sql, values)).await?;
    let Some(row) = row else { return Ok((0, None)) };
    let version = Ord::max(row.try_get_by_index::<Option<i64>>(0)?.unwrap_or(0), 0) as u64;
    let snapshot = match row.try_get_by_index::<Option<i64>>(1)? {
        Some(snapshot_version) => Some(StoredSnapshot {
            version: snapshot_version,
            position: row.try_get_by_index(2)?,
            state: row.try_get_by_index(3)?,
        }),
        None => None,
    };
    Ok((version, snapshot))
}

/// Stores (or replaces) the snapshot of a stream.
pub(crate) async fn save(
    conn: &impl ConnectionTrait,
    partition: &str,
    stream_id: &str,
    snapshot: &StoredSnapshot,
) -> Result<(), DbErr> {
    let columns = ["partition", "stream_id", "snapshot_version", "stream_position", "state"].map(Alias::new);
    let mut insert = Query::insert();
    insert
        .into_table(Alias::new(TABLE))
        .columns(columns.clone())
        .values_panic([
            partition.into(),
            stream_id.into(),
            snapshot.version.into(),
            snapshot.position.into(),
            snapshot.state.as_str().into(),
        ])
        .on_conflict(
            OnConflict::columns([Alias::new("partition"), Alias::new("stream_id")])
                .update_columns(columns[2..].iter().cloned())
                .to_owned(),
        );
    conn.execute(&insert).await.map(|_| ())
}

/// Forgets the snapshot of a stream (archived: its events are no longer read).
pub(crate) async fn forget(conn: &impl ConnectionTrait, partition: &str, stream_id: &str) -> Result<(), DbErr> {
    let delete = Query::delete()
        .from_table(Alias::new(TABLE))
        .and_where(Expr::col(Alias::new("partition")).eq(partition))
        .and_where(Expr::col(Alias::new("stream_id")).eq(stream_id))
        .to_owned();
    conn.execute(&delete).await.map(|_| ())
}
