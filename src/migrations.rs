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

/// Makes the schema exact and strict: identifiers compared byte for byte on MySQL, no NULL
/// global positions, unique message ids per partition, the skipped-events table, and MySQL's
/// partitions table.
pub struct M20261128000001HardenEventStore;

impl MigrationName for M20261128000001HardenEventStore {
    fn name(&self) -> &str {
        "m20261128_000001_harden_event_store"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for M20261128000001HardenEventStore {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        backend::harden_schema(manager.get_connection()).await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        backend::soften_schema(manager.get_connection()).await
    }
}

/// Creates the projection daemon's coordination tables: `emt_leases` (who projects which
/// subscription for which tenant, with an epoch as fencing token) and `emt_daemons` (the running
/// instances).
pub struct M20261128000002CreateDaemonLeases;

impl MigrationName for M20261128000002CreateDaemonLeases {
    fn name(&self) -> &str {
        "m20261128_000002_create_daemon_leases"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for M20261128000002CreateDaemonLeases {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        backend::create_lease_tables(manager.get_connection()).await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        backend::drop_lease_tables(manager.get_connection()).await
    }
}

/// The migrator of emmett-seaorm's schema, keeping its records in its own table,
/// `emt_migrations`, so it coexists with your app's migrator (`seaql_migrations`).
///
/// Two ways to run it, which can be mixed (every migration is idempotent):
/// - [`migrate`] (this migrator) at startup;
/// - its migrations inside your own migrator, recorded in yours:
///
/// ```
/// use sea_orm_migration::prelude::*;
///
/// pub struct AppMigrator;
///
/// impl MigratorTrait for AppMigrator {
///     fn migrations() -> Vec<Box<dyn MigrationTrait>> {
///         let mut migrations = emmett_seaorm::Migrator::migrations();
///         // migrations.push(Box::new(m20260101_000001_create_carts::Migration));
///         migrations
///     }
/// }
/// ```
pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(M20250101000001CreateEventStore),
            Box::new(M20261128000001HardenEventStore),
            Box::new(M20261128000002CreateDaemonLeases),
        ]
    }

    fn migration_table_name() -> DynIden {
        Alias::new("emt_migrations").into_iden()
    }
}

/// Applies every pending migration of the store's schema to `db`.
///
/// ```no_run
/// # async fn f() -> Result<(), sea_orm::DbErr> {
/// let db = emmett_seaorm::connect("sqlite://app.db?mode=rwc").await?;
/// emmett_seaorm::migrate(&db).await?;
/// # Ok(()) }
/// ```
pub async fn migrate(db: &DatabaseConnection) -> Result<(), DbErr> {
    Migrator::up(db, None).await
}

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
/// if let Some(collation) = emmett_seaorm::migrations::exact_collation(db).await? {
///     db.execute_unprepared(&format!(
///         "ALTER TABLE carts MODIFY tenant_id VARCHAR(255) COLLATE {collation} NOT NULL"
///     ))
///     .await?;
/// }
/// # Ok(()) }
/// ```
pub async fn exact_collation(db: &impl sea_orm::ConnectionTrait) -> Result<Option<String>, sea_orm::DbErr> {
    match db.get_database_backend() {
        sea_orm::DbBackend::MySql => backend::mysql_exact_collation(db).await.map(Some),
        _ => Ok(None),
    }
}
