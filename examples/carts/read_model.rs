//! The `carts` read model: a plain SeaORM entity, fed by a snapshot projection.

use emmett_seaorm::projection::SnapshotProjection;
use emmett_seaorm::{columns, keys};
use sea_orm::Schema;
use sea_orm::entity::prelude::*;

use crate::domain::{Cart, CartEvent, Status, evolve};

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

/// Creates the table if needed. MySQL compares text case-, accent- and trailing-space-
/// insensitively by default: the keys of a read model need the exact collation the store's own
/// id columns have.
pub async fn create_table(db: &impl ConnectionTrait) -> Result<(), DbErr> {
    db.execute(Schema::new(db.get_database_backend()).create_table_from_entity(Entity).if_not_exists()).await?;
    if let Some(collation) = emmett_seaorm::migrations::exact_collation(db).await? {
        let exact = |column: Column| format!("MODIFY {} VARCHAR(255) COLLATE {collation} NOT NULL", column.as_str());
        let (tenant, cart) = (exact(Column::TenantId), exact(Column::CartId));
        db.execute_unprepared(&format!("ALTER TABLE {} {tenant}, {cart}", Entity.table_name())).await?;
    }
    Ok(())
}

/// The projection feeding it: the domain's `evolve`, the state kept in the `snapshots` table,
/// the columns above for queries. Table and column names come from the entity, so a typo does
/// not compile.
pub fn projection() -> SnapshotProjection<CartEvent, Cart> {
    SnapshotProjection::new(
        Entity.table_name(),
        |event, tenant| keys! { Column::TenantId.as_str() => tenant, Column::CartId.as_str() => &event.stream_id },
        evolve,
        Cart::default,
    )
    .handles([
        "CartCreated",
        "ItemAddedToCart",
        "ItemRemovedFromCart",
        "CartEmptied",
        "CartCheckedOut",
        "CartCancelled",
    ])
    .columns(|cart: &Cart| {
        columns! {
            Column::Currency.as_str() => cart.currency.clone(),
            Column::Total.as_str() => cart.total,
            Column::OrderId.as_str() => cart.order_id.clone(),
            Column::ItemsJson.as_str() => serde_json::to_string(&cart.items).expect("items serialize"),
            Column::IsCheckedOut.as_str() => cart.status == Status::CheckedOut,
            Column::IsCancelled.as_str() => cart.status == Status::Cancelled,
        }
    })
    // Erasing a tenant (`ops partitions erase`) removes its carts by this column.
    .tenant_column(Column::TenantId.as_str())
}
