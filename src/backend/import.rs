//! Writing a tenant's rows as they were exported: stream rows, then messages in their order,
//! each message a new global position (in that order) on this database.

use chrono::{DateTime, Utc};
use sea_orm::sea_query::{Alias, Expr, ExprTrait, IntoTableRef, Query, SimpleExpr};
use sea_orm::{ConnectionTrait, DatabaseTransaction, DbBackend, DbErr, Statement};
use serde_json::Value;

use crate::schema::{messages, streams};

/// A stored stream row of the tenant being imported.
pub(crate) struct ImportedStream {
    pub stream_id: String,
    pub stream_position: i64,
    pub stream_type: String,
    pub metadata: Value,
    pub is_archived: bool,
}

/// A stored message of the tenant being imported, every column but its global position.
pub(crate) struct ImportedMessage {
    pub stream_id: String,
    pub stream_position: i64,
    pub is_archived: bool,
    pub kind: String,
    pub message_type: String,
    pub schema_version: String,
    pub message_id: String,
    pub data: Value,
    pub metadata: Value,
    pub created: DateTime<Utc>,
}

/// Starts an import of `partition` in `txn`: on MySQL takes the tenant's `emt_partitions` row
/// the way appends do (so horizon readers wait for the import's positions). Whether the
/// database already holds rows of the tenant.
pub(crate) async fn begin_import(txn: &DatabaseTransaction, partition: &str) -> Result<bool, DbErr> {
    if txn.get_database_backend() == DbBackend::MySql {
        super::append::enter_partition(txn, partition, false).await?;
    }
    Ok(has_rows(txn, streams::Entity, partition).await? || has_rows(txn, messages::Entity, partition).await?)
}

/// Whether `table` has a row of `partition`.
async fn has_rows(txn: &DatabaseTransaction, table: impl IntoTableRef, partition: &str) -> Result<bool, DbErr> {
    let any = Query::select()
        .expr(Expr::val(1))
        .from(table)
        .and_where(Expr::col(Alias::new("partition")).eq(partition))
        .limit(1)
        .to_owned();
    Ok(txn.query_one(&any).await?.is_some())
}

/// Inserts stream rows of `partition`.
pub(crate) async fn insert_streams(
    txn: &DatabaseTransaction,
    partition: &str,
    rows: &[ImportedStream],
) -> Result<(), DbErr> {
    if rows.is_empty() {
        return Ok(());
    }
    let mut insert = Query::insert();
    insert.into_table(streams::Entity).columns([
        streams::Column::StreamId,
        streams::Column::StreamPosition,
        streams::Column::Partition,
        streams::Column::StreamType,
        streams::Column::StreamMetadata,
        streams::Column::IsArchived,
    ]);
    for s in rows {
        insert.values_panic([
            s.stream_id.as_str().into(),
            s.stream_position.into(),
            partition.into(),
            s.stream_type.as_str().into(),
            s.metadata.clone().into(),
            s.is_archived.into(),
        ]);
    }
    txn.execute(&insert).await?;
    Ok(())
}

/// Inserts messages of `partition` in order, numbered by this database's global positions.
pub(crate) async fn insert_messages(
    txn: &DatabaseTransaction,
    partition: &str,
    rows: &[ImportedMessage],
) -> Result<(), DbErr> {
    if rows.is_empty() {
        return Ok(());
    }
    let backend = txn.get_database_backend();
    let mut columns = vec![
        messages::Column::StreamId,
        messages::Column::StreamPosition,
        messages::Column::Partition,
        messages::Column::MessageKind,
        messages::Column::MessageData,
        messages::Column::MessageMetadata,
        messages::Column::MessageSchemaVersion,
        messages::Column::MessageType,
        messages::Column::MessageId,
        messages::Column::IsArchived,
        messages::Column::Created,
    ];
    // SQLite numbers messages itself; PostgreSQL's sequence and MySQL's AUTO_INCREMENT number
    // a multi-row insert in its order.
    let first_global = match backend {
        DbBackend::Sqlite => {
            columns.push(messages::Column::GlobalPosition);
            Some(super::append::take_global_positions(txn, rows.len() as i64).await?)
        }
        _ => None,
    };
    let mut insert = Query::insert();
    insert.into_table(messages::Entity).columns(columns);
    for (i, m) in rows.iter().enumerate() {
        // SQLite keeps the text its default writes (`julianday` and the lag read it).
        let created: SimpleExpr = match backend {
            DbBackend::Sqlite => m.created.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string().into(),
            _ => m.created.into(),
        };
        let mut row: Vec<SimpleExpr> = vec![
            m.stream_id.as_str().into(),
            m.stream_position.into(),
            partition.into(),
            m.kind.as_str().into(),
            m.data.clone().into(),
            m.metadata.clone().into(),
            m.schema_version.as_str().into(),
            m.message_type.as_str().into(),
            m.message_id.as_str().into(),
            m.is_archived.into(),
            created,
        ];
        row.extend(first_global.map(|g| (g + i as i64).into()));
        insert.values_panic(row);
    }
    txn.execute(&insert).await?;
    Ok(())
}

/// PostgreSQL: wakes listening daemons when the import commits, as an append does.
pub(crate) async fn announce_import(txn: &DatabaseTransaction, partition: &str) -> Result<(), DbErr> {
    if txn.get_database_backend() == DbBackend::Postgres {
        let notify = "SELECT pg_notify($1, $2)";
        let values = [super::append::APPENDS_CHANNEL.into(), partition.into()];
        txn.query_one_raw(Statement::from_sql_and_values(DbBackend::Postgres, notify, values)).await?;
    }
    Ok(())
}
