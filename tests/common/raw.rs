//! Rows written by hand, as another writer (or a bug, or an attacker) would write them.

use emmett_seaorm::schema::messages;
use sea_orm::sea_query::{Expr, ExprTrait, Query};
use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, Statement};
use serde_json::json;

/// `INSERT INTO messages` of one row of `partition`, as another writer would write it; with
/// `global_position` only when given.
pub fn raw_message(
    partition: &str,
    stream: &str,
    position: i64,
    message_type: &str,
    data: sea_orm::Value,
    global: Option<sea_orm::sea_query::SimpleExpr>,
) -> sea_orm::sea_query::InsertStatement {
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
    let mut values: Vec<sea_orm::sea_query::SimpleExpr> = vec![
        stream.into(),
        position.into(),
        partition.into(),
        Expr::val(data),
        json!({}).into(),
        "1".into(),
        message_type.into(),
        uuid::Uuid::now_v7().to_string().into(),
    ];
    if let Some(global) = global {
        columns.push(messages::Column::GlobalPosition);
        values.push(global);
    }
    let mut insert = Query::insert();
    insert.into_table(messages::Entity).columns(columns).values_panic(values);
    insert
}

/// Inserts a `messages` row by hand, as another writer would.
pub async fn insert_raw(
    db: &DatabaseConnection,
    partition: &str,
    stream: &str,
    position: i64,
    message_type: &str,
    data: sea_orm::Value,
) {
    let backend = db.get_database_backend();
    let global = match backend {
        DbBackend::Sqlite => {
            let row = db
                .query_one_raw(Statement::from_string(
                    backend,
                    "UPDATE emt_global_message_position SET last_value = last_value + 1 WHERE id = 1 RETURNING last_value",
                ))
                .await
                .unwrap()
                .unwrap();
            Some(row.try_get_by_index::<i64>(0).unwrap())
        }
        _ => None,
    };
    let insert = raw_message(partition, stream, position, message_type, data, global.map(Into::into));
    db.execute(&insert).await.unwrap();
    let mut bump = Query::update();
    bump.table(emmett_seaorm::schema::streams::Entity)
        .value(emmett_seaorm::schema::streams::Column::StreamPosition, position)
        .and_where(Expr::col(emmett_seaorm::schema::streams::Column::StreamId).eq(stream))
        .and_where(Expr::col(emmett_seaorm::schema::streams::Column::Partition).eq(partition));
    db.execute(&bump).await.unwrap();
}
