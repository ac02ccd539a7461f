//! `emt_skipped_events`: events a runner went past because they could not be decoded.
//!
//! Written by runs with [`RunOptions::skip_undecodable_events`](crate::projection::RunOptions::skip_undecodable_events),
//! in the batch's transaction. Query it like any entity to find what to repair and replay:
//!
//! ```no_run
//! # async fn f(db: &sea_orm::DatabaseConnection) -> Result<(), sea_orm::DbErr> {
//! use emmett_seaorm::schema::skipped_events;
//! use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};
//! let skipped = skipped_events::Entity::find()
//!     .filter(skipped_events::Column::Partition.eq("tenant-a"))
//!     .all(db)
//!     .await?;
//! # Ok(()) }
//! ```

use sea_orm::DatabaseTransaction;
use sea_orm::entity::prelude::*;
use sea_orm::sea_query::OnConflict;

use crate::error::Error;

/// One skipped event: which subscription skipped it, where it is, why, and when.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "emt_skipped_events")]
pub struct Model {
    /// The subscription (runner) that skipped it.
    #[sea_orm(primary_key, auto_increment = false)]
    pub subscription_id: String,
    /// The partition (tenant).
    #[sea_orm(primary_key, auto_increment = false)]
    pub partition: String,
    /// The event's stream.
    #[sea_orm(primary_key, auto_increment = false)]
    pub stream_id: String,
    /// The event's stream position.
    #[sea_orm(primary_key, auto_increment = false)]
    pub stream_position: i64,
    /// The event's global position (`None` for a row that had none).
    pub global_position: Option<i64>,
    /// The stored `message_type`.
    pub message_type: String,
    /// The error, as its message.
    pub reason: String,
    /// When it was skipped (the last time, if skipped again after a reset).
    pub skipped_at: DateTimeUtc,
}

/// No relations are declared.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}

/// Records that `subscription` skipped the event `err` names (an `UndecodableEvent` or
/// `MalformedEvent`), in the batch's transaction.
pub(crate) async fn record(
    txn: &DatabaseTransaction,
    subscription: &str,
    global_position: Option<i64>,
    err: &Error,
) -> crate::error::Result<()> {
    let (Error::UndecodableEvent { stream, partition, position, message_type, .. }
    | Error::MalformedEvent { stream, partition, position, message_type, .. }
    | Error::Upcast { stream, partition, position, message_type, .. }) = err
    else {
        unreachable!("only undecodable events are skipped: {err}");
    };
    tracing::warn!(subscription, %err, "skipping an undecodable event");
    let row = Model {
        subscription_id: subscription.to_owned(),
        partition: partition.clone(),
        stream_id: stream.clone(),
        stream_position: *position as i64,
        global_position,
        message_type: message_type.clone(),
        reason: err.to_string(),
        skipped_at: chrono::Utc::now(),
    };
    save(txn, row).await
}

/// Records `row`, or updates the record of its event.
pub(crate) async fn save(conn: &impl ConnectionTrait, row: Model) -> crate::error::Result<()> {
    Entity::insert(ActiveModel::from(row))
        .on_conflict(
            OnConflict::columns([Column::SubscriptionId, Column::Partition, Column::StreamId, Column::StreamPosition])
                .update_columns([Column::GlobalPosition, Column::MessageType, Column::Reason, Column::SkippedAt])
                .to_owned(),
        )
        .exec(conn)
        .await?;
    Ok(())
}
