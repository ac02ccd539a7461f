//! `messages`: the events, one row each.

use sea_orm::entity::prelude::*;

/// A stored event.
#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "messages")]
pub struct Model {
    /// The stream id.
    #[sea_orm(primary_key, auto_increment = false)]
    pub stream_id: String,
    /// 1-based position in the stream.
    #[sea_orm(primary_key, auto_increment = false)]
    pub stream_position: i64,
    /// The partition (tenant).
    #[sea_orm(primary_key, auto_increment = false)]
    pub partition: String,
    /// `'E'` for events.
    pub message_kind: String,
    /// The event's `data`.
    #[sea_orm(column_type = "JsonBinary")]
    pub message_data: Json,
    /// Metadata given at append time.
    #[sea_orm(column_type = "JsonBinary")]
    pub message_metadata: Json,
    /// Schema version of the payload.
    pub message_schema_version: String,
    /// The event's `type`.
    pub message_type: String,
    /// Unique message id.
    pub message_id: String,
    /// Archived messages are invisible to reads.
    #[sea_orm(primary_key, auto_increment = false)]
    pub is_archived: bool,
    /// Position in the whole store (unique, never NULL).
    pub global_position: i64,
    /// When the event was stored.
    pub created: DateTimeUtc,
}

/// No relations are declared.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
