//! Erasing one tenant: every row the store (and the read models named) holds of a partition,
//! counted or deleted table by table in one transaction.

use sea_orm::sea_query::{Alias, Expr, ExprTrait, Query, TableName};
use sea_orm::{ConnectionTrait, DatabaseTransaction, DbBackend, DbErr, Statement, Value};

use super::{lock_checkpoints, partition_column, statement};

/// A read model's table and the column holding the tenant (see `ReadModel`).
pub(crate) struct TenantRows<'a> {
    pub table: &'a str,
    pub tenant_column: &'a str,
    /// The tenant's part of a snapshot id: `encodeURIComponent(column):encodeURIComponent(tenant)`.
    pub snapshot_key: String,
}

/// The rows of `partition`, table by table (`erase`: deleted, else counted), in an order that
/// shuts out concurrent writers first: the checkpoints of every subscription are locked (created
/// where missing), so a projection batch in flight for the tenant commits before and none starts
/// until the end; MySQL also locks the tenant's `emt_partitions` row, which appends share-lock.
/// Streams go before their events: an append in flight holds its stream row, and its events are
/// then committed and seen. On PostgreSQL the tenant's own LIST partitions (see
/// `create_partition`) are dropped, last, instead of deleted row by row.
pub(crate) async fn partition_rows(
    txn: &DatabaseTransaction,
    partition: &str,
    read_models: &[TenantRows<'_>],
    erase: bool,
) -> Result<Vec<(String, u64)>, DbErr> {
    let backend = txn.get_database_backend();
    let p = partition_column(backend);
    // The tables whose rows the locks below create where missing (deleted with the rest):
    // counted before.
    let mut locked = vec!["subscriptions"];
    if backend == DbBackend::MySql {
        locked.push("emt_partitions");
    }
    let mut before = Vec::new();
    for table in locked {
        before.push((table, run(txn, false, table, &format!("{p} = $1"), [partition.into()]).await?));
    }
    if erase {
        let sql = "SELECT subscription_id FROM subscriptions UNION SELECT subscription_id FROM emt_leases
                   UNION SELECT subscription_id FROM emt_segments ORDER BY 1";
        let rows = txn.query_all_raw(Statement::from_string(backend, sql)).await?;
        for row in rows {
            let subscription: String = row.try_get_by_index(0)?;
            lock_checkpoints(txn, &subscription, &[partition]).await?;
        }
        if backend == DbBackend::MySql {
            let lock = "INSERT IGNORE INTO emt_partitions (`partition`) VALUES (?)";
            txn.execute_raw(Statement::from_sql_and_values(backend, lock, [partition.into()])).await?;
            let lock = "SELECT 1 FROM emt_partitions WHERE `partition` = ? FOR UPDATE";
            txn.query_all_raw(Statement::from_sql_and_values(backend, lock, [partition.into()])).await?;
        }
    }
    let own = own_partitions(txn, partition).await?;
    let mut report = Vec::new();
    let mut tables = vec!["subscriptions", "emt_leases", "emt_skipped_events", super::aggregates::TABLE];
    let mut dropped = Vec::new();
    for read_model in read_models {
        let snapshot = match backend {
            DbBackend::Postgres => "strpos('|' || stream_id || '|', $2) > 0",
            DbBackend::MySql => "INSTR(CONCAT('|', stream_id, '|'), $2) > 0",
            _ => "instr('|' || stream_id || '|', $2) > 0",
        };
        let key = format!("|{}|", read_model.snapshot_key);
        let rows = run(
            txn,
            erase,
            "snapshots",
            &format!("readmodel_table_name = $1 AND {snapshot}"),
            [read_model.table.into(), key.into()],
        )
        .await?;
        report.push((format!("snapshots of {}", read_model.table), rows));
        let rows = read_model_rows(txn, read_model, partition, erase).await?;
        report.push((read_model.table.to_owned(), rows));
    }
    tables.extend(["streams", "messages"]);
    if backend == DbBackend::MySql {
        tables.push("emt_partitions");
    }
    for table in tables {
        let rows = match own.iter().find(|(parent, _)| *parent == table) {
            Some((_, leaf)) => {
                dropped.push(leaf);
                run(txn, false, leaf, "true", []).await?
            }
            None => run(txn, erase, table, &format!("{p} = $1"), [partition.into()]).await?,
        };
        let rows = before.iter().find(|(t, _)| *t == table).map_or(rows, |(_, counted)| *counted);
        report.push((table.to_owned(), rows));
    }
    if erase && !dropped.is_empty() {
        drop_or_empty(txn, &dropped).await?;
    }
    Ok(report)
}

/// How long dropping a tenant's partitions may wait for the parent tables' lock, which every
/// reader and writer of any tenant holds while its transaction runs (and which those that come
/// after wait behind): past it the partitions are emptied row by row instead, blocking no one.
const DROP_LOCK_TIMEOUT: &str = "1s";

/// PostgreSQL: drops the tenant's own partitions `leaves` (one statement, one lock wait) if
/// their parents' lock comes within [`DROP_LOCK_TIMEOUT`]; else deletes their rows and leaves
/// them empty (the tenant's id can use them again).
async fn drop_or_empty(txn: &DatabaseTransaction, leaves: &[&String]) -> Result<(), DbErr> {
    let names = leaves.iter().map(|l| l.as_str()).collect::<Vec<_>>().join(", ");
    txn.execute_unprepared("SAVEPOINT emt_drop_partitions").await?;
    txn.execute_unprepared(&format!("SET LOCAL lock_timeout = '{DROP_LOCK_TIMEOUT}'")).await?;
    let dropped = txn.execute_unprepared(&format!("DROP TABLE {names}")).await;
    match dropped {
        Ok(_) => txn.execute_unprepared("RELEASE SAVEPOINT emt_drop_partitions").await?,
        Err(err) if super::failure::classify(&err) == super::failure::Failure::Busy => {
            tracing::info!(partitions = names, "partitions busy: emptied instead of dropped");
            txn.execute_unprepared("ROLLBACK TO SAVEPOINT emt_drop_partitions").await?;
            for leaf in leaves {
                txn.execute_unprepared(&format!("DELETE FROM {leaf}")).await?;
            }
            txn.execute_unprepared("RELEASE SAVEPOINT emt_drop_partitions").await?
        }
        Err(err) => return Err(err),
    };
    txn.execute_unprepared("SET LOCAL lock_timeout = DEFAULT").await?;
    Ok(())
}

/// `DELETE FROM table WHERE condition` (`erase`) or its `count(*)`: the rows it covers.
async fn run<const N: usize>(
    txn: &DatabaseTransaction,
    erase: bool,
    table: &str,
    condition: &str,
    values: [Value; N],
) -> Result<u64, DbErr> {
    let backend = txn.get_database_backend();
    if erase {
        let sql = format!("DELETE FROM {table} WHERE {condition}");
        return Ok(txn.execute_raw(statement(backend, &sql, values)).await?.rows_affected());
    }
    let sql = format!("SELECT count(*) FROM {table} WHERE {condition}");
    let row = txn.query_one_raw(statement(backend, &sql, values)).await?;
    Ok(row.map_or(Ok(0), |r| r.try_get_by_index::<i64>(0))? as u64)
}

/// The tenant's rows of a read model (identifiers quoted by sea-query): deleted or counted.
async fn read_model_rows(
    txn: &DatabaseTransaction,
    read_model: &TenantRows<'_>,
    partition: &str,
    erase: bool,
) -> Result<u64, DbErr> {
    let table: TableName = match read_model.table.split_once('.') {
        Some((schema, table)) => (Alias::new(schema), Alias::new(table)).into(),
        None => Alias::new(read_model.table).into(),
    };
    let tenant = Expr::col(Alias::new(read_model.tenant_column)).eq(partition);
    if erase {
        let delete = Query::delete().from_table(table).and_where(tenant).to_owned();
        return Ok(txn.execute(&delete).await?.rows_affected());
    }
    let count = Query::select().expr(Expr::cust("count(*)")).from(table).and_where(tenant).to_owned();
    let row = txn.query_one(&count).await?;
    Ok(row.map_or(Ok(0), |r| r.try_get_by_index::<i64>(0))? as u64)
}

/// PostgreSQL: the tenant's own partitions that exist, `(parent, leaf)`.
async fn own_partitions(txn: &DatabaseTransaction, partition: &str) -> Result<Vec<(&'static str, String)>, DbErr> {
    let mut own = Vec::new();
    if txn.get_database_backend() != DbBackend::Postgres {
        return Ok(own);
    }
    for table in ["streams", "messages", "subscriptions"] {
        let leaf = super::schema::partition_table_name(table, partition);
        let sql = "SELECT 1 FROM pg_class WHERE relname = $1";
        let found = txn.query_one_raw(Statement::from_sql_and_values(DbBackend::Postgres, sql, [leaf.as_str().into()]));
        if found.await?.is_some() {
            own.push((table, leaf));
        }
    }
    Ok(own)
}
