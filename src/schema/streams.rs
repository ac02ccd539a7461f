//! `streams`: one row per live stream (and per archived generation) with its version.

use sea_orm::entity::prelude::*;

/// A stream's row: its current version (`stream_position`) and type.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "streams")]
pub struct Model {
    /// The stream id.
    #[sea_orm(primary_key, auto_increment = false)]
    pub stream_id: String,
    /// The stream's version: the position of its last event.
    pub stream_position: i64,
    /// The partition (tenant).
    #[sea_orm(primary_key, auto_increment = false)]
    pub partition: String,
    /// Free-form stream type given at first append (`"unknown"` by default).
    pub stream_type: String,
    /// Stream metadata (`{}`).
    #[sea_orm(column_type = "JsonBinary")]
    pub stream_metadata: Json,
    /// Archived streams are invisible to reads.
    #[sea_orm(primary_key, auto_increment = false)]
    pub is_archived: bool,
}

/// No relations are declared.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
