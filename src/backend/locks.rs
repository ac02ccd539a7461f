//! The row locks of a projection batch: the checkpoint, then the snapshots.

use std::collections::{BTreeMap, HashSet};

use sea_orm::sea_query::{Expr, ExprTrait, LockType, OnConflict, Query};
use sea_orm::{ConnectionTrait, DatabaseTransaction, DbBackend, DbErr};
use serde_json::Value;

use crate::schema::{snapshots, subscriptions};

/// Creates the checkpoint rows of a subscription's `partitions` if needed and locks them,
/// returning their positions: concurrent runners of one subscription and partition queue here,
/// and each sees the checkpoint the previous one committed. Taken in partition order, so
/// concurrent batches can't deadlock on them. Existing rows are
/// locked, not written: PostgreSQL locks them first (one index probe each) and creates only the
/// missing ones (a no-op upsert creates, locks and returns them); SQLite and MySQL create the
/// missing rows first (MySQL: a locking read of a missing key would lock its gap, and two such
/// batches deadlock inserting into it), then read them all, `FOR UPDATE` on MySQL (SQLite's
/// writer holds the whole database).
pub(crate) async fn lock_checkpoints(
    txn: &DatabaseTransaction,
    subscription: &str,
    partitions: &[&str],
) -> Result<BTreeMap<String, i64>, DbErr> {
    let mut partitions = partitions.to_vec();
    partitions.sort_unstable();
    partitions.dedup();
    if partitions.is_empty() {
        return Ok(BTreeMap::new());
    }
    let key = [subscriptions::Column::SubscriptionId, subscriptions::Column::Partition, subscriptions::Column::Version];
    let create = |partitions: &[&str]| {
        let mut create = Query::insert();
        create.into_table(subscriptions::Entity).columns([
            subscriptions::Column::SubscriptionId,
            subscriptions::Column::Version,
            subscriptions::Column::Partition,
            subscriptions::Column::LastProcessedPosition,
        ]);
        for partition in partitions {
            create.values_panic([subscription.into(), 1.into(), (*partition).into(), 0i64.into()]);
        }
        create
    };
    let returned = [subscriptions::Column::Partition, subscriptions::Column::LastProcessedPosition];
    #[cfg(feature = "postgres")]
    if txn.get_database_backend() == DbBackend::Postgres {
        let read = PG_LOCK_CHECKPOINTS;
        let current = Expr::col((subscriptions::Entity, subscriptions::Column::LastProcessedPosition));
        let upsert = |missing: &[&str]| {
            create(missing)
                .on_conflict(
                    OnConflict::columns(key).value(subscriptions::Column::LastProcessedPosition, current).to_owned(),
                )
                .returning(Query::returning().columns(returned))
                .to_owned()
        };
        return positions(&pg_lock_or_create(txn, read, subscription, &partitions, "partition", upsert).await?);
    }
    let mut create = create(&partitions);
    create.on_conflict(OnConflict::columns(key).do_nothing_on([subscriptions::Column::SubscriptionId]).to_owned());
    txn.execute(&create).await?;
    let locked = txn
        .query_all(
            super::primary_key_only(Query::select().columns(returned).from(subscriptions::Entity))
                .and_where(Expr::col(subscriptions::Column::SubscriptionId).eq(subscription))
                .and_where(Expr::col(subscriptions::Column::Partition).is_in(partitions.iter().copied()))
                .and_where(Expr::col(subscriptions::Column::Version).eq(1))
                .order_by(subscriptions::Column::Partition, sea_orm::Order::Asc)
                .lock(LockType::Update),
        )
        .await?;
    positions(&locked)
}

/// Each checkpoint row's `(partition, last_processed_position)`.
fn positions(rows: &[sea_orm::QueryResult]) -> Result<BTreeMap<String, i64>, DbErr> {
    rows.iter().map(|row| Ok((row.try_get("", "partition")?, row.try_get("", "last_processed_position")?))).collect()
}

/// PostgreSQL: the checkpoint rows of `$2`'s partitions under subscription `$1`, locked, one
/// index probe each, in `$2`'s order.
#[cfg(feature = "postgres")]
const PG_LOCK_CHECKPOINTS: &str = "SELECT s.partition, s.last_processed_position FROM unnest($2::text[]) AS k(p)
    CROSS JOIN LATERAL (SELECT partition, last_processed_position FROM subscriptions
                        WHERE subscription_id = $1 AND partition = k.p AND version = 1 FOR UPDATE) AS s";

/// The checkpoints a projection batch locked ([`lock_batch_checkpoints`]), to save with
/// [`save_checkpoints`].
pub(crate) struct BatchCheckpoints {
    /// Each partition's position (0 without a checkpoint).
    positions: BTreeMap<String, i64>,
    /// PostgreSQL: the partitions without a checkpoint row, which the batch creates only if it
    /// moves them (a row created meanwhile by another runner is a lost race: the batch rolls
    /// back and runs again).
    absent: HashSet<String>,
}

impl BatchCheckpoints {
    /// `partition`'s position (0 without a checkpoint).
    pub fn position(&self, partition: &str) -> i64 {
        self.positions.get(partition).copied().unwrap_or(0)
    }
}

/// [`lock_checkpoints`] for a projection batch: on PostgreSQL the existing rows are locked and
/// the missing ones are not created (a new tenant's placeholder row, written and then moved in
/// the same batch, doubled the checkpoint writes of a cold start); [`save_checkpoints`] inserts
/// them, and fails with a retried lost race if another runner created one meanwhile.
pub(crate) async fn lock_batch_checkpoints(
    txn: &DatabaseTransaction,
    subscription: &str,
    partitions: &[&str],
) -> Result<BatchCheckpoints, DbErr> {
    #[cfg(feature = "postgres")]
    if txn.get_database_backend() == DbBackend::Postgres {
        let mut sorted = partitions.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        let rows = pg_lock(txn, PG_LOCK_CHECKPOINTS, subscription, &sorted).await?;
        let absent = absent(&rows, &sorted, "partition")?.into_iter().collect();
        return Ok(BatchCheckpoints { positions: positions(&rows)?, absent });
    }
    let positions = lock_checkpoints(txn, subscription, partitions).await?;
    Ok(BatchCheckpoints { positions, absent: HashSet::new() })
}

/// Saves a batch's checkpoints: `moves` (`(partition, position)`), the rows of absent ones
/// created; checkpoints left at 0 are forgotten (see [`forget_unmoved_checkpoints`]).
pub(crate) async fn save_checkpoints(
    txn: &DatabaseTransaction,
    subscription: &str,
    locked: &BatchCheckpoints,
    moves: &[(&str, i64)],
) -> Result<(), DbErr> {
    let (created, moved): (Vec<_>, Vec<_>) = moves.iter().partition(|(p, _)| locked.absent.contains(*p));
    move_checkpoints(txn, subscription, &moved).await?;
    // (Absent ones: PostgreSQL only.)
    if !created.is_empty() {
        let sql = "INSERT INTO subscriptions (subscription_id, version, partition, last_processed_position)
                   SELECT $1, 1, e ->> 0, (e ->> 1)::bigint FROM json_array_elements($2::json) AS e
                   ON CONFLICT (subscription_id, partition, version) DO NOTHING";
        let json = serde_json::to_string(&created).map_err(|e| DbErr::Custom(e.to_string()))?;
        let values: [sea_orm::Value; 2] = [subscription.into(), json.into()];
        let done = txn.execute_raw(super::statement(txn.get_database_backend(), sql, values)).await?;
        if done.rows_affected() < created.len() as u64 {
            return Err(super::lost_race(&format!("another runner created a checkpoint of '{subscription}'")));
        }
    }
    let moved: HashSet<&str> = moves.iter().map(|(partition, _)| *partition).collect();
    let unmoved: Vec<&str> = locked
        .positions
        .iter()
        .filter(|(partition, position)| **position == 0 && !moved.contains(partition.as_str()))
        .map(|(partition, _)| partition.as_str())
        .collect();
    forget_unmoved_checkpoints(txn, subscription, &unmoved).await
}

/// Deletes the checkpoints of `partitions` still at 0: rows a batch created only to lock them
/// and then found no event for (a tenant erased meanwhile). A checkpoint at 0 and none mean the
/// same; only events leave a checkpoint behind.
pub(crate) async fn forget_unmoved_checkpoints(
    txn: &DatabaseTransaction,
    subscription: &str,
    partitions: &[&str],
) -> Result<(), DbErr> {
    if partitions.is_empty() {
        return Ok(());
    }
    txn.execute(
        Query::delete()
            .from_table(subscriptions::Entity)
            .and_where(Expr::col(subscriptions::Column::SubscriptionId).eq(subscription))
            .and_where(Expr::col(subscriptions::Column::Partition).is_in(partitions.iter().copied()))
            .and_where(Expr::col(subscriptions::Column::Version).eq(1))
            .and_where(Expr::col(subscriptions::Column::LastProcessedPosition).eq(0)),
    )
    .await?;
    Ok(())
}

/// Moves the checkpoints of `subscription`: `(partition, position)` each.
pub(crate) async fn move_checkpoints(
    txn: &DatabaseTransaction,
    subscription: &str,
    moves: &[(&str, i64)],
) -> Result<(), DbErr> {
    if moves.is_empty() {
        return Ok(());
    }
    let backend = txn.get_database_backend();
    // PostgreSQL and SQLite: the moves as one JSON parameter joined by key, one statement text
    // whatever their number (a `CASE` over the moves made each row scanned test every move:
    // 70–100 ms for 128 tenants).
    let json = |moves: &[(&str, i64)]| serde_json::to_string(moves).map_err(|e| DbErr::Custom(e.to_string()));
    let sql = match backend {
        DbBackend::Postgres => Some(
            // (An upsert of the rows the batch locked: a key lookup each, whatever the
            // statistics say; a join chose to scan every tenant's checkpoint of a fresh table.)
            "INSERT INTO subscriptions (subscription_id, version, partition, last_processed_position)
             SELECT $1, 1, e ->> 0, (e ->> 1)::bigint FROM json_array_elements($2::json) AS e
             ON CONFLICT (subscription_id, partition, version)
             DO UPDATE SET last_processed_position = excluded.last_processed_position",
        ),
        // (`WHERE true`: SQLite's grammar for an upsert from a select. An `UPDATE … FROM
        // json_each` scanned every checkpoint per move: 110–340 ms for 512 tenants.)
        DbBackend::Sqlite => Some(
            "INSERT INTO subscriptions (subscription_id, version, partition, last_processed_position)
             SELECT $1, 1, value ->> 0, value ->> 1 FROM json_each($2) WHERE true
             ON CONFLICT (subscription_id, partition, version)
             DO UPDATE SET last_processed_position = excluded.last_processed_position",
        ),
        _ => None,
    };
    if let Some(sql) = sql {
        let values: [sea_orm::Value; 2] = [subscription.into(), json(moves)?.into()];
        txn.execute_raw(super::statement(backend, sql, values)).await?;
        return Ok(());
    }
    // MySQL: an upsert of the rows the batch locked, too (an `UPDATE` with a `CASE` over the
    // moves made each row test every move: 134 ms for 512 tenants on MariaDB).
    let p = super::partition_column(backend);
    for chunk in moves.chunks(1000) {
        let rows = vec!["(?, 1, ?, ?)"; chunk.len()].join(", ");
        let sql = format!(
            "INSERT INTO subscriptions (subscription_id, version, {p}, last_processed_position) VALUES {rows}
             ON DUPLICATE KEY UPDATE last_processed_position = VALUES(last_processed_position)"
        );
        let values = chunk.iter().flat_map(|(partition, to)| [subscription.into(), (*partition).into(), (*to).into()]);
        txn.execute_raw(super::statement(backend, &sql, values)).await?;
    }
    Ok(())
}

/// The snapshot rows a projection batch locked ([`lock_snapshots`]).
pub(crate) struct LockedSnapshots {
    /// `stream_id`, `last_global_position` and `snapshot` of each locked row (`null` for rows
    /// created as placeholders).
    pub rows: Vec<sea_orm::QueryResult>,
    /// PostgreSQL: the ids without a row, which the batch inserts when it writes them, without
    /// `ON CONFLICT`: a row another batch created meanwhile fails the insert on `snapshots`'
    /// key ([`is_snapshot_taken`]), a lost race, and the batch runs again.
    pub absent: Vec<String>,
}

/// Locks the snapshots `ids` (with the tenant each folds) of read model `table`. Rows are
/// taken in `ids` order (callers sort it), so concurrent batches cannot deadlock; existing ones
/// are locked, not written, as in [`lock_checkpoints`]. PostgreSQL leaves missing ones absent
/// (a placeholder row, written and then updated in the same batch, doubled the snapshot writes
/// of every new row); SQLite and MySQL create them as placeholders first (MySQL: a locking read
/// of a missing key locks its gap, and two such batches deadlock inserting into it).
pub(crate) async fn lock_snapshots(
    txn: &DatabaseTransaction,
    table: &str,
    ids: &[(&str, &str)],
) -> Result<LockedSnapshots, DbErr> {
    let returned = [snapshots::Column::StreamId, snapshots::Column::LastGlobalPosition, snapshots::Column::Snapshot];
    let keys: Vec<&str> = ids.iter().map(|(id, _)| *id).collect();
    #[cfg(feature = "postgres")]
    if txn.get_database_backend() == DbBackend::Postgres {
        let read = "SELECT s.stream_id, s.last_global_position, s.snapshot FROM unnest($2::text[]) AS k(id)
                    CROSS JOIN LATERAL (SELECT stream_id, last_global_position, snapshot FROM snapshots
                                        WHERE readmodel_table_name = $1 AND stream_id = k.id
                                        FOR UPDATE) AS s";
        let rows = pg_lock(txn, read, table, &keys).await?;
        let absent = absent(&rows, &keys, "stream_id")?;
        return Ok(LockedSnapshots { rows, absent });
    }
    let mut create = snapshots::insert_all_columns();
    for (id, partition) in ids {
        create.values_panic([
            table.into(),
            (*id).into(),
            0i64.into(),
            0i64.into(),
            Value::Null.into(),
            (*partition).into(),
        ]);
    }
    let key = [snapshots::Column::ReadmodelTableName, snapshots::Column::StreamId];
    create.on_conflict(OnConflict::columns(key).do_nothing_on([snapshots::Column::StreamId]).to_owned());
    txn.execute(&create).await?;
    let rows = txn
        .query_all(
            super::primary_key_only(Query::select().columns(returned).from(snapshots::Entity))
                .and_where(Expr::col(snapshots::Column::ReadmodelTableName).eq(table))
                .and_where(Expr::col(snapshots::Column::StreamId).is_in(keys.iter().copied()))
                .order_by(snapshots::Column::StreamId, sea_orm::Order::Asc)
                .lock(LockType::Update),
        )
        .await?;
    Ok(LockedSnapshots { rows, absent: Vec::new() })
}

/// Whether `err` is an insert of a snapshot row that another batch created meanwhile (see
/// [`LockedSnapshots::absent`]).
pub(crate) fn is_snapshot_taken(err: &DbErr) -> bool {
    matches!(err.sql_err(), Some(sea_orm::SqlErr::UniqueConstraintViolation(message)) if message.contains("snapshots_pkey"))
}

/// `keys` without a row among `rows` (matched on `key_column`), in `keys` order.
#[cfg(feature = "postgres")]
fn absent(rows: &[sea_orm::QueryResult], keys: &[&str], key_column: &str) -> Result<Vec<String>, DbErr> {
    let found: HashSet<String> = rows.iter().map(|row| row.try_get("", key_column)).collect::<Result<_, _>>()?;
    Ok(keys.iter().filter(|k| !found.contains(**k)).map(|k| k.to_string()).collect())
}

/// PostgreSQL: the rows `read` locks (a `LATERAL` read `FOR UPDATE` of `$2`'s keys under `$1`,
/// `scope`), one index probe each, in `keys` order.
#[cfg(feature = "postgres")]
async fn pg_lock(
    txn: &DatabaseTransaction,
    read: &str,
    scope: &str,
    keys: &[&str],
) -> Result<Vec<sea_orm::QueryResult>, DbErr> {
    let values: [sea_orm::Value; 2] = [scope.into(), keys.iter().map(|k| k.to_string()).collect::<Vec<_>>().into()];
    txn.query_all_raw(sea_orm::Statement::from_sql_and_values(DbBackend::Postgres, read, values)).await
}

/// PostgreSQL: the rows of `keys` locked without writing them ([`pg_lock`]), then the missing ones (no row with that `key_column`) created and locked by `upsert`
/// (a no-op upsert returning them: a row created meanwhile is locked as it is).
#[cfg(feature = "postgres")]
async fn pg_lock_or_create(
    txn: &DatabaseTransaction,
    read: &str,
    scope: &str,
    keys: &[&str],
    key_column: &str,
    upsert: impl FnOnce(&[&str]) -> sea_orm::sea_query::InsertStatement,
) -> Result<Vec<sea_orm::QueryResult>, DbErr> {
    let mut rows = pg_lock(txn, read, scope, keys).await?;
    let missing = absent(&rows, keys, key_column)?;
    if !missing.is_empty() {
        let missing: Vec<&str> = missing.iter().map(String::as_str).collect();
        rows.extend(txn.query_all(&upsert(&missing)).await?);
    }
    Ok(rows)
}
