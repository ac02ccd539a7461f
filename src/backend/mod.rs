//! The only module that knows how PostgreSQL, SQLite and MySQL differ.
//!
//! - **Schema**: native DDL per backend (PostgreSQL: LIST partitions, a sequence, `xid8`).
//! - **Append**: PostgreSQL appends in *one statement* (a call of the `emt_append` function,
//!   which moves the stream row and inserts the messages; one round trip, atomic without an
//!   explicit transaction).
//!   SQLite and MySQL run the same steps as separate statements in one transaction
//!   (`BEGIN IMMEDIATE` on SQLite, so writers queue instead of failing on lock upgrade), and can
//!   write several appends in one (SQLite's group commit, `store::group`).
//! - **Global positions**: a sequence on PostgreSQL, `AUTO_INCREMENT` on MySQL, a one-row
//!   counter table on SQLite (one writer at a time, so it never contends).
//! - **Tenant partitions**: real `PARTITION OF` tables on PostgreSQL; nothing elsewhere.
//! - **Reading in global order** without passing a late commit ([`horizon()`]): a transaction-id
//!   horizon on PostgreSQL, a per-partition lock that appends share on MySQL, nothing to wait
//!   for on SQLite.
//!
//! One file per concern: [`schema`] (DDL, migrations, partitions, the catalog), [`append`],
//! [`aggregates`] (aggregate snapshots),
//! [`horizon`], [`locks`] (projection batches), [`instances`], [`leases`] and [`segments`] (the
//! daemon's coordination) and
//! [`failure`] (what an error code means).

pub(crate) mod aggregates;
mod append;
mod catalog;
mod erase;
mod failure;
mod horizon;
mod import;
mod instances;
mod leases;
mod locks;
pub(crate) mod rls;
mod schema;
mod segments;

use sea_orm::{DatabaseTransaction, DbBackend, DbErr, Statement, TransactionOptions, TransactionTrait, Value};

#[cfg(feature = "postgres")]
pub(crate) use append::APPENDS_CHANNEL;
pub(crate) use append::{
    Append, Appended, NewEvent, append, append_steps, create_append_function, drop_append_function,
};
pub(crate) use catalog::catalog_table;
pub(crate) use erase::{TenantRows, partition_rows};
pub(crate) use failure::{is_retried, lost_race, retry_policy};
pub(crate) use horizon::{
    changes, global_horizon, head, horizon, index_order_only, last_position_upto, partition_heads, pending,
    tenants_horizon,
};
pub(crate) use import::{
    ImportedMessage, ImportedStream, announce_import, begin_import, insert_messages, insert_streams,
};
#[cfg(feature = "postgres")]
pub(crate) use instances::{LEASES_CHANNEL, PRESENCE_PREFIX, presence_renewal};
pub(crate) use instances::{heartbeat, registered};
pub(crate) use leases::{
    FailedRun, LeaseReport, create_lease_tables, create_owner_index, drop_lease_tables, drop_owner_index,
    ensure_leases, forget_leases, lease_reports, lease_rows, lease_subscriptions, park, unpark,
};
pub(crate) use locks::{
    is_snapshot_taken, lock_batch_checkpoints, lock_checkpoints, lock_snapshots, move_checkpoints, save_checkpoints,
};
pub(crate) use schema::{
    create_partition, create_schema, drop_schema, forget_tenant_statistics, harden_schema, key_messages_by_position,
    key_messages_by_stream, mysql_exact_collation, soften_schema, table_shape, tenant_statistics,
};
pub(crate) use segments::{
    SegmentRow, Segments, claim, create_segment_table, drop_segment_table, ensure_segments, held_tenants, leave,
    release, revoke, segment_of, segments,
};

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

/// The `partition` column, quoted where it is a keyword.
pub(super) fn partition_column(backend: DbBackend) -> &'static str {
    if backend == DbBackend::MySql { "`partition`" } else { "partition" }
}

/// MySQL's locking reads of a few rows by key (`prefix = ? AND rest IN (…) FOR UPDATE`) read the
/// primary key's ranges only. Left to itself the optimizer may scan the whole prefix instead
/// (`ref` access: every tenant's checkpoint of a subscription, every snapshot of a read model),
/// and a locking read locks every row it scans, so one tenant's batch would wait for another's.
pub(super) const MYSQL_PRIMARY_KEY_ONLY: &str = "FORCE INDEX (PRIMARY)";

/// [`MYSQL_PRIMARY_KEY_ONLY`] on a select built with sea-query (only the MySQL builder writes it).
pub(super) fn primary_key_only(
    select: &mut sea_orm::sea_query::SelectStatement,
) -> &mut sea_orm::sea_query::SelectStatement {
    #[cfg(feature = "mysql")]
    {
        use sea_orm::sea_query::extension::mysql::{IndexHintScope, MySqlSelectStatementExt};
        select.force_index(sea_orm::sea_query::Alias::new("PRIMARY"), IndexHintScope::All);
    }
    select
}

/// A statement with `$n` placeholders, numbered in order of use, written `?` where the backend
/// wants that.
pub(super) fn statement(backend: DbBackend, sql: &str, values: impl IntoIterator<Item = Value>) -> Statement {
    let sql = match backend {
        DbBackend::Postgres => sql.to_owned(),
        _ => {
            let mut out = String::with_capacity(sql.len());
            let mut chars = sql.chars().peekable();
            while let Some(c) = chars.next() {
                if c == '$' && chars.peek().is_some_and(char::is_ascii_digit) {
                    while chars.peek().is_some_and(char::is_ascii_digit) {
                        chars.next();
                    }
                    out.push('?');
                } else {
                    out.push(c);
                }
            }
            out
        }
    };
    Statement::from_sql_and_values(backend, sql, values)
}
