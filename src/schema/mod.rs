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

/// The collation under which MySQL compares text exactly — byte for byte, trailing spaces
/// included — as every identifier column of the store does: `utf8mb4_0900_bin` on MySQL 8,
/// `utf8mb4_nopad_bin` on MariaDB. `None` on PostgreSQL and SQLite, which compare exactly anyway.
///
/// Give it to the **key columns of your read models** on MySQL: under the server's default
/// collation `Acme`, `acme` and `acme ` are one key, so two tenants' rows would collide.
///
/// ```no_run
/// # async fn f(db: &sea_orm::DatabaseConnection) -> Result<(), sea_orm::DbErr> {
/// use sea_orm::ConnectionTrait;
/// if let Some(collation) = emmett_seaorm::schema::exact_collation(db).await? {
///     db.execute_unprepared(&format!(
///         "ALTER TABLE carts MODIFY tenant_id VARCHAR(255) COLLATE {collation} NOT NULL"
///     ))
///     .await?;
/// }
/// # Ok(()) }
/// ```
pub async fn exact_collation(db: &impl sea_orm::ConnectionTrait) -> Result<Option<String>, sea_orm::DbErr> {
    match db.get_database_backend() {
        sea_orm::DbBackend::MySql => crate::backend::mysql_exact_collation(db).await.map(Some),
        _ => Ok(None),
    }
}
