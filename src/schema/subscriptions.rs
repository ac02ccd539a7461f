//! `subscriptions`: checkpoints of projection runners, per subscription and partition.

use sea_orm::entity::prelude::*;

/// A checkpoint.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "subscriptions")]
pub struct Model {
    /// The subscription (runner) id.
    #[sea_orm(primary_key, auto_increment = false)]
    pub subscription_id: String,
    /// Version of the subscription (1).
    #[sea_orm(primary_key, auto_increment = false)]
    pub version: i32,
    /// The partition (tenant).
    #[sea_orm(primary_key, auto_increment = false)]
    pub partition: String,
    /// The last position this subscription has processed.
    pub last_processed_position: i64,
}

/// No relations are declared.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
