//! The schema as sea-orm-migration migrations, and [`migrate`] for apps that don't run the CLI.
//!
//! Add [`Migrator`]'s migrations to your own migrator, or run the `migration` crate of this
//! repository: `sea-orm-cli migrate up -d migration -u $DATABASE_URL`.

use sea_orm::DatabaseConnection;
use sea_orm_migration::prelude::*;

use crate::backend;

/// Creates `streams`, `messages`, `subscriptions`, `snapshots` and the global-position sequence.
pub struct M20250101000001CreateEventStore;

impl MigrationName for M20250101000001CreateEventStore {
    fn name(&self) -> &str {
        "m20250101_000001_create_event_store"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for M20250101000001CreateEventStore {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        for ddl in backend::create_schema(manager.get_database_backend())? {
            db.execute_unprepared(ddl).await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        for ddl in backend::drop_schema(manager.get_database_backend()) {
            db.execute_unprepared(&ddl).await?;
        }
        Ok(())
    }
}

/// The migrator of emmett-seaorm's schema.
pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![Box::new(M20250101000001CreateEventStore)]
    }
}

/// Applies every pending migration of the store's schema to `db`.
///
/// ```no_run
/// # async fn f() -> Result<(), sea_orm::DbErr> {
/// let db = sea_orm::Database::connect("sqlite://app.db?mode=rwc").await?;
/// emmett_seaorm::migrate(&db).await?;
/// # Ok(()) }
/// ```
pub async fn migrate(db: &DatabaseConnection) -> Result<(), DbErr> {
    Migrator::up(db, None).await
}
