//! The `carts` read model: a plain SeaORM entity, fed by a snapshot projection.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "carts")]
pub struct Model {
    /// Key columns: on MySQL they get the exact collation (`migrations::exact_collation`), see main.rs.
    #[sea_orm(primary_key, auto_increment = false)]
    pub tenant_id: String,
    #[sea_orm(primary_key, auto_increment = false)]
    pub cart_id: String,
    pub currency: String,
    pub total: i64,
    pub order_id: Option<String>,
    #[sea_orm(column_type = "Text")]
    pub items_json: String,
    pub is_checked_out: bool,
    pub is_cancelled: bool,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
