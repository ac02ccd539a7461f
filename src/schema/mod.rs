//! SeaORM entities for the four tables of the store.
//!
//! The schema is the one of `@wataruoguchi/emmett-event-store-kysely`, so a TypeScript service
//! using that package can share the database. Query them like any SeaORM entity:
//!
//! ```no_run
//! # async fn f(db: &sea_orm::DatabaseConnection) -> Result<(), sea_orm::DbErr> {
//! use emmett_seaorm::schema::messages;
//! use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};
//! let carts = messages::Entity::find()
//!     .filter(messages::Column::MessageType.eq("CartCreated"))
//!     .all(db)
//!     .await?;
//! # Ok(()) }
//! ```

pub mod messages;
pub mod skipped_events;
pub mod snapshots;
pub mod streams;
pub mod subscriptions;

/// The partition used when none is given.
pub const DEFAULT_PARTITION: &str = "default_partition";
