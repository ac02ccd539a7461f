//! The schema as sea-orm-migration migrations, and [`migrate`] for apps that don't run the CLI.
//!
//! Add [`Migrator`]'s migrations to your own migrator, or run the `migration` crate of this
//! repository: `sea-orm-cli migrate up -d migration -u $DATABASE_URL`.

use sea_orm::{DatabaseConnection, TransactionTrait};

use crate::conn::Conn;
use sea_orm_migration::prelude::*;

use crate::backend;

/// Creates `streams`, `messages`, `subscriptions`, `snapshots` and the global-position sequence.
pub struct M20250101000001CreateEventStore;

impl M20250101000001CreateEventStore {
    const NAME: &str = "m20250101_000001_create_event_store";
}

impl MigrationName for M20250101000001CreateEventStore {
    fn name(&self) -> &str {
        Self::NAME
    }
}

#[async_trait::async_trait]
impl MigrationTrait for M20250101000001CreateEventStore {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        run(manager, up_sql(self.name(), manager.get_connection()).await?).await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        run(manager, backend::drop_schema(manager.get_database_backend())).await
    }
}

/// Makes the schema exact and strict: identifiers compared byte for byte on MySQL, no NULL
/// global positions, unique message ids per partition, the skipped-events table, and MySQL's
/// partitions table.
pub struct M20261128000001HardenEventStore;

impl M20261128000001HardenEventStore {
    const NAME: &str = "m20261128_000001_harden_event_store";
}

impl MigrationName for M20261128000001HardenEventStore {
    fn name(&self) -> &str {
        Self::NAME
    }
}

#[async_trait::async_trait]
impl MigrationTrait for M20261128000001HardenEventStore {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        run(manager, up_sql(self.name(), manager.get_connection()).await?).await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        backend::soften_schema(manager.get_connection()).await
    }
}

/// Creates the projection daemon's coordination tables: `emt_leases` (who projects which
/// subscription for which tenant, with an epoch as fencing token) and `emt_daemons` (the running
/// instances).
pub struct M20261128000002CreateDaemonLeases;

impl M20261128000002CreateDaemonLeases {
    const NAME: &str = "m20261128_000002_create_daemon_leases";
}

impl MigrationName for M20261128000002CreateDaemonLeases {
    fn name(&self) -> &str {
        Self::NAME
    }
}

#[async_trait::async_trait]
impl MigrationTrait for M20261128000002CreateDaemonLeases {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        run(manager, up_sql(self.name(), manager.get_connection()).await?).await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        backend::drop_lease_tables(manager.get_connection()).await
    }
}

/// Indexes lease owners, so an instance renewing or giving back its leases touches only its own
/// lease rows (on MySQL it otherwise waits for every row another transaction locked).
pub struct M20261128000003IndexLeaseOwners;

impl M20261128000003IndexLeaseOwners {
    const NAME: &str = "m20261128_000003_index_lease_owners";
}

impl MigrationName for M20261128000003IndexLeaseOwners {
    fn name(&self) -> &str {
        Self::NAME
    }
}

#[async_trait::async_trait]
impl MigrationTrait for M20261128000003IndexLeaseOwners {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        run(manager, up_sql(self.name(), manager.get_connection()).await?).await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        backend::drop_owner_index(manager.get_connection()).await
    }
}

/// Creates `emt_segments`: the segments of tenants the daemon's instances hold (owner, epoch),
/// instead of a hold per (subscription, tenant).
pub struct M20261206000001CreateDaemonSegments;

impl M20261206000001CreateDaemonSegments {
    const NAME: &str = "m20261206_000001_create_daemon_segments";
}

impl MigrationName for M20261206000001CreateDaemonSegments {
    fn name(&self) -> &str {
        Self::NAME
    }
}

#[async_trait::async_trait]
impl MigrationTrait for M20261206000001CreateDaemonSegments {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        run(manager, up_sql(self.name(), manager.get_connection()).await?).await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        backend::drop_segment_table(manager.get_connection()).await
    }
}

/// Creates `emt_aggregate_snapshots`: a stream's folded state at a position, so aggregating a
/// long stream folds only its tail.
pub struct M20261207000001CreateAggregateSnapshots;

impl M20261207000001CreateAggregateSnapshots {
    const NAME: &str = "m20261207_000001_create_aggregate_snapshots";
}

impl MigrationName for M20261207000001CreateAggregateSnapshots {
    fn name(&self) -> &str {
        Self::NAME
    }
}

#[async_trait::async_trait]
impl MigrationTrait for M20261207000001CreateAggregateSnapshots {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        run(manager, up_sql(self.name(), manager.get_connection()).await?).await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        backend::aggregates::drop_aggregate_snapshots(manager.get_connection()).await
    }
}

/// Creates the PostgreSQL append function `emt_append` (a statement that keeps its plans on every
/// server connection, also behind a transaction pooler). Nothing on SQLite and MySQL.
pub struct M20261207000002CreateAppendFunction;

impl M20261207000002CreateAppendFunction {
    const NAME: &str = "m20261207_000002_create_append_function";
}

impl MigrationName for M20261207000002CreateAppendFunction {
    fn name(&self) -> &str {
        Self::NAME
    }
}

#[async_trait::async_trait]
impl MigrationTrait for M20261207000002CreateAppendFunction {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        run(manager, up_sql(self.name(), manager.get_connection()).await?).await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        run(manager, backend::drop_append_function(manager.get_database_backend())).await
    }
}

/// Tells PostgreSQL's planner that a tenant holds a small share of the events (a statistics
/// setting on `messages_default`, then `ANALYZE`), so every tenant-scoped read walks its
/// `(partition, global_position)` range. Without it, statistics taken while a few big tenants
/// filled the table made generic plans scan the global-position index through every tenant's
/// rows for tenants added since (`status` 1.9 s, a daemon group read 1.1 s). Nothing on SQLite
/// and MySQL.
pub struct M20261207000003AssumeManyTenants;

impl M20261207000003AssumeManyTenants {
    const NAME: &str = "m20261207_000003_assume_many_tenants";
}

impl MigrationName for M20261207000003AssumeManyTenants {
    fn name(&self) -> &str {
        Self::NAME
    }
}

#[async_trait::async_trait]
impl MigrationTrait for M20261207000003AssumeManyTenants {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        run(manager, up_sql(self.name(), manager.get_connection()).await?).await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        run(manager, backend::forget_tenant_statistics(manager.get_database_backend())).await
    }
}

/// Names each snapshot's tenant (`snapshots.partition`, written by every projection run) and, on
/// PostgreSQL, adds row-level security policies on the tenant tables: a role other than their
/// owner sees and writes only the rows of the tenant its transaction is bound to
/// ([`EventStore::for_tenant`](crate::EventStore::for_tenant)). The policies are inert until
/// [`rls::enable`](crate::rls::enable) switches them on.
pub struct M20261207000004TenantPolicies;

impl M20261207000004TenantPolicies {
    const NAME: &str = "m20261207_000004_tenant_policies";
}

impl MigrationName for M20261207000004TenantPolicies {
    fn name(&self) -> &str {
        Self::NAME
    }
}

#[async_trait::async_trait]
impl MigrationTrait for M20261207000004TenantPolicies {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        run(manager, up_sql(self.name(), manager.get_connection()).await?).await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        run(manager, backend::rls::drop_tenant_policies(manager.get_database_backend())).await
    }
}

/// Keys `messages` by stream, tenant, archive flag and position (the TypeScript package's key puts
/// the position before the tenant), so reading or appending to one tenant's stream no longer
/// walks the events of every tenant with a stream of the same id. The primary key is rebuilt on
/// PostgreSQL and MySQL (appends wait meanwhile); SQLite gets an index in that order. Databases
/// created since have the key already.
pub struct M20261208000001KeyMessagesByStream;

impl M20261208000001KeyMessagesByStream {
    const NAME: &str = "m20261208_000001_key_messages_by_stream";
}

impl MigrationName for M20261208000001KeyMessagesByStream {
    fn name(&self) -> &str {
        Self::NAME
    }
}

#[async_trait::async_trait]
impl MigrationTrait for M20261208000001KeyMessagesByStream {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        run(manager, up_sql(self.name(), manager.get_connection()).await?).await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        backend::key_messages_by_position(manager.get_connection()).await
    }
}

/// Runs `statements` in order.
async fn run(manager: &SchemaManager<'_>, statements: Vec<String>) -> Result<(), DbErr> {
    for statement in statements {
        manager.get_connection().execute_unprepared(&statement).await?;
    }
    Ok(())
}

/// The statements migration `name` runs on `db`'s database, in order, without running them. They
/// can depend on the database (MySQL's exact collation, rows written without a global position),
/// which is only read.
async fn up_sql(name: &str, db: &impl ConnectionTrait) -> Result<Vec<String>, DbErr> {
    match name {
        M20250101000001CreateEventStore::NAME => {
            Ok(backend::create_schema(db.get_database_backend())?.into_iter().map(str::to_owned).collect())
        }
        M20261128000001HardenEventStore::NAME => backend::harden_schema(db).await,
        M20261128000002CreateDaemonLeases::NAME => backend::create_lease_tables(db).await,
        M20261128000003IndexLeaseOwners::NAME => backend::create_owner_index(db).await,
        M20261206000001CreateDaemonSegments::NAME => backend::create_segment_table(db).await,
        M20261207000001CreateAggregateSnapshots::NAME => backend::aggregates::create_aggregate_snapshots(db).await,
        M20261207000002CreateAppendFunction::NAME => Ok(backend::create_append_function(db.get_database_backend())),
        M20261207000003AssumeManyTenants::NAME => Ok(backend::tenant_statistics(db.get_database_backend())),
        M20261207000004TenantPolicies::NAME => backend::rls::tenant_policies(db).await,
        M20261208000001KeyMessagesByStream::NAME => backend::key_messages_by_stream(db).await,
        other => Err(DbErr::Migration(format!("no migration named {other}"))),
    }
}

/// The SQL of the migrations still to run on `db`, by migration name, without running it: for
/// teams whose DBAs apply schema changes themselves (`emmett-seaorm migrate sql`). Apply the
/// statements in order, then record the migrations as applied in `emt_migrations` (or run
/// [`migrate`], which finds the schema in place: every statement is idempotent).
///
/// ```no_run
/// # async fn f(db: sea_orm::DatabaseConnection) -> Result<(), sea_orm::DbErr> {
/// for (migration, statements) in emmett_seaorm::migrations::pending_sql(&db).await? {
///     println!("-- {migration}");
///     for sql in statements {
///         println!("{sql};");
///     }
/// }
/// # Ok(()) }
/// ```
pub async fn pending_sql(db: &DatabaseConnection) -> Result<Vec<(String, Vec<String>)>, DbErr> {
    let (conn, mut plans) = (Conn::pool(db.clone()), Vec::new());
    for (name, applied) in status(db).await? {
        if !applied {
            plans.push((name.clone(), up_sql(&name, &conn).await?));
        }
    }
    Ok(plans)
}

/// Every migration of the store's schema, in order, and whether it is applied on `db`
/// (recorded in `emt_migrations`). Only reads: a database never migrated has none applied.
pub async fn status(db: &DatabaseConnection) -> Result<Vec<(String, bool)>, DbErr> {
    // In one transaction: a consistent view, and one server behind a transaction pooler.
    let txn = db.begin().await?;
    let table = Migrator::migration_table_name().to_string();
    let applied: Vec<String> = match SchemaManager::new(&txn).has_table(&table).await? {
        false => Vec::new(),
        true => {
            let sql = format!("SELECT version FROM {table}");
            let rows = txn.query_all_raw(sea_orm::Statement::from_string(db.get_database_backend(), sql)).await?;
            rows.iter().map(|row| row.try_get_by_index(0)).collect::<Result<_, _>>()?
        }
    };
    txn.commit().await?;
    Ok(Migrator::migrations().iter().map(|m| (m.name().to_owned(), applied.iter().any(|a| a == m.name()))).collect())
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
            Box::new(M20261128000003IndexLeaseOwners),
            Box::new(M20261206000001CreateDaemonSegments),
            Box::new(M20261207000001CreateAggregateSnapshots),
            Box::new(M20261207000002CreateAppendFunction),
            Box::new(M20261207000003AssumeManyTenants),
            Box::new(M20261207000004TenantPolicies),
            Box::new(M20261208000001KeyMessagesByStream),
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
    change(db, Change::Up).await
}

/// What [`change`] does to the schema.
#[cfg_attr(not(feature = "cli"), allow(dead_code))]
pub(crate) enum Change {
    Up,
    Down(u32),
    Fresh,
}

/// Applies `what` to `db`; behind a transaction pooler, in one transaction (every statement must
/// run in one there).
pub(crate) async fn change(db: &DatabaseConnection, what: Change) -> Result<(), DbErr> {
    async fn on<'c, C: sea_orm_migration::IntoSchemaManagerConnection<'c>>(db: C, what: Change) -> Result<(), DbErr> {
        match what {
            Change::Up => Migrator::up(db, None).await,
            Change::Down(steps) => Migrator::down(db, Some(steps)).await,
            Change::Fresh => Migrator::fresh(db).await,
        }
    }
    if !crate::connect::behind_pooler(db) {
        return on(db, what).await;
    }
    let txn = db.begin().await?;
    on(&txn, what).await?;
    txn.commit().await
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
