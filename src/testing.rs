//! A testing kit for your own tests: fresh databases, decider and projection specifications.
//!
//! Everything runs on a real database: in-memory SQLite by default, or the server named by
//! `EMMETT_TEST_DATABASE_URL` (a PostgreSQL or MySQL URL: each [`TestDatabase`] is a new database
//! there, dropped again with it), so one suite can run on every backend you ship on. The kit is
//! for tests: it panics with a message saying what differed, like `assert_eq!`.
//!
//! ```no_run
//! # async fn f() {
//! use emmett_seaorm::testing::{DeciderSpecification, TestDatabase};
//! use emmett_seaorm::{CommandHandler, Error};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Serialize, Deserialize, Debug, PartialEq)]
//! #[serde(tag = "type", content = "data")]
//! enum Counter { Incremented { by: i64 } }
//!
//! let db = TestDatabase::new().await;
//! let counters = CommandHandler::new(|n, e: &Counter| match e { Counter::Incremented { by } => n + by }, || 0);
//! let spec = DeciderSpecification::new(&db, counters, |by: &i64, n: &i64| match n + by {
//!     ..=10 => Ok(vec![Counter::Incremented { by: *by }]),
//!     _ => Err(Error::InvalidEvent { stream: "counter".into(), reason: "the counter is full".into() }),
//! });
//! spec.given([Counter::Incremented { by: 9 }]).when(1).then([Counter::Incremented { by: 1 }]).await;
//! spec.given([Counter::Incremented { by: 9 }]).when(2).then_error(|e| e.to_string().contains("full")).await;
//! # }
//! ```

use std::fmt::Debug;

use sea_orm::{ConnectionTrait, DatabaseConnection, EntityTrait, Iterable, PrimaryKeyToColumn, QueryOrder};

use crate::command::CommandHandler;
use crate::event::Event;
use crate::projection::{ProjectionRegistry, ProjectionRunner, RunOptions};
use crate::store::{AppendOptions, EventStore, ReadOptions};

/// The variable naming the database server the kit's databases are made on.
pub const DATABASE_URL_VAR: &str = "EMMETT_TEST_DATABASE_URL";

/// A fresh, migrated database for one test: in-memory SQLite, or a new database on a PostgreSQL
/// or MySQL server, dropped when this is dropped.
pub struct TestDatabase {
    db: DatabaseConnection,
    /// The server URL and the database's name, when it was made on a server.
    made_on: Option<(String, String)>,
}

impl TestDatabase {
    /// A database on the server `EMMETT_TEST_DATABASE_URL` names, or in-memory SQLite when it is
    /// not set. Panics, saying why, when the server can't be reached.
    pub async fn new() -> Self {
        let url = std::env::var(DATABASE_URL_VAR).unwrap_or_else(|_| "sqlite::memory:".to_owned());
        Self::at(&url).await
    }

    /// A database at `url`: a SQLite URL is used as it is; on a PostgreSQL or MySQL server (the
    /// URL's database part is ignored) a new database with a unique name is made (on MySQL
    /// with the exact collation as its default, so the read models' tables get exact keys).
    pub async fn at(url: &str) -> Self {
        let made_on = match url.split_once("://") {
            Some((scheme, rest)) if scheme.starts_with("postgres") || scheme == "mysql" => {
                let server = format!("{scheme}://{}", rest.split('/').next().unwrap_or(rest));
                let name = format!("emt_test_{}", uuid::Uuid::now_v7().simple());
                on_server(&server, &format!("CREATE DATABASE {name}")).await;
                Some((server, name))
            }
            _ => None,
        };
        let url = made_on.as_ref().map_or(url.to_owned(), |(server, name)| format!("{server}/{name}"));
        let mut options = sea_orm::ConnectOptions::new(url.clone());
        // An in-memory SQLite database lives as long as one of its connections.
        options.min_connections(1).sqlx_logging(false);
        let db = sea_orm::Database::connect(crate::configure(options))
            .await
            .unwrap_or_else(|err| panic!("test database {url}: {err}"));
        if let Some((_, name)) = &made_on {
            exact_by_default(&db, name).await;
        }
        crate::migrate(&db).await.unwrap_or_else(|err| panic!("migrating the test database {url}: {err}"));
        Self { db, made_on }
    }

    /// The connection, for the read models' tables and queries.
    pub fn connection(&self) -> &DatabaseConnection {
        &self.db
    }

    /// An event store on it.
    pub fn store(&self) -> EventStore {
        EventStore::new(self.db.clone())
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let Some((server, name)) = self.made_on.take() else { return };
        let force = if server.starts_with("postgres") { " WITH (FORCE)" } else { "" };
        // Dropping is async; this may run inside a runtime, so it gets a thread of its own.
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build();
            runtime.expect("a runtime").block_on(on_server(&server, &format!("DROP DATABASE IF EXISTS {name}{force}")))
        });
        dropped.join().ok();
    }
}

/// Runs `sql` on the server's administrative database.
async fn on_server(server: &str, sql: &str) {
    let admin = if server.starts_with("postgres") { format!("{server}/postgres") } else { server.to_owned() };
    let db = sea_orm::Database::connect(admin.as_str())
        .await
        .unwrap_or_else(|err| panic!("database server {server}: {err}"));
    db.execute_unprepared(sql).await.unwrap_or_else(|err| panic!("{sql} on {server}: {err}"));
    db.close().await.ok();
}

/// The decider's `decide`, boxed.
type DecideFn<'db, S, E, C, Err> = dyn Fn(&C, &S) -> Result<Vec<E>, Err> + Send + Sync + 'db;

/// Given events / when a command / then events or an error: a decider tested through a
/// [`CommandHandler`] on a real store, each scenario on a stream of its own.
pub struct DeciderSpecification<'db, S, E, C, Err> {
    db: &'db TestDatabase,
    handler: CommandHandler<S, E>,
    decide: Box<DecideFn<'db, S, E, C, Err>>,
}

/// A scenario of a [`DeciderSpecification`]: its history and its command.
pub struct Scenario<'spec, 'db, S, E, C, Err> {
    spec: &'spec DeciderSpecification<'db, S, E, C, Err>,
    given: Vec<E>,
    command: Option<C>,
}

impl<'db, S, E, C, Err> DeciderSpecification<'db, S, E, C, Err>
where
    E: Event + PartialEq + Debug,
    Err: From<crate::Error> + Debug,
{
    /// A specification of `decide` (command, state → events or the domain's error), with the
    /// state `handler` folds.
    pub fn new(
        db: &'db TestDatabase,
        handler: CommandHandler<S, E>,
        decide: impl Fn(&C, &S) -> Result<Vec<E>, Err> + Send + Sync + 'db,
    ) -> Self {
        Self { db, handler, decide: Box::new(decide) }
    }

    /// A scenario whose stream holds `events` first (none: a new stream).
    pub fn given(&self, events: impl IntoIterator<Item = E>) -> Scenario<'_, 'db, S, E, C, Err> {
        Scenario { spec: self, given: events.into_iter().collect(), command: None }
    }
}

impl<S, E, C, Err> Scenario<'_, '_, S, E, C, Err>
where
    E: Event + PartialEq + Debug,
    Err: From<crate::Error> + Debug,
{
    /// The command under test.
    pub fn when(mut self, command: C) -> Self {
        self.command = Some(command);
        self
    }

    /// Asserts that the command appends exactly `expected`.
    pub async fn then(self, expected: impl IntoIterator<Item = E>) {
        let expected: Vec<E> = expected.into_iter().collect();
        match self.run().await {
            Ok(events) => assert_eq!(events, expected, "the command decided other events"),
            Err(err) => panic!("the command failed: {err:?}; expected events {expected:?}"),
        }
    }

    /// Asserts that the command fails with an error `matches` accepts, and writes nothing.
    pub async fn then_error(self, matches: impl FnOnce(&Err) -> bool) {
        match self.run().await {
            Ok(events) => panic!("the command succeeded with {events:?}; expected an error"),
            Err(err) => assert!(matches(&err), "the command failed with an unexpected error: {err:?}"),
        }
    }

    /// Appends the history, runs the command; on an error, checks that nothing was written.
    async fn run(self) -> Result<Vec<E>, Err> {
        let command = self.command.expect("a scenario needs a command: .when(command)");
        let store = self.spec.db.store();
        let stream = format!("spec-{}", uuid::Uuid::now_v7().simple());
        if !self.given.is_empty() {
            store
                .append_to_stream(&stream, self.given, AppendOptions::default())
                .await
                .expect("append the given events");
        }
        let version = || async { store.read_stream::<serde_json::Value>(&stream, ReadOptions::default()).await };
        let before = version().await.expect("read the stream").current_stream_version;
        let spec = self.spec;
        match spec
            .handler
            .handle(&store, &stream, AppendOptions::default(), |state| (spec.decide)(&command, state))
            .await
        {
            Ok(handled) => Ok(handled.events),
            Err(err) => {
                let after = version().await.expect("read the stream").current_stream_version;
                assert_eq!(after, before, "the failed command wrote events");
                Err(err)
            }
        }
    }
}

/// Given events across streams and tenants / then read-model rows: a projection registry run by
/// the [`ProjectionRunner`] over what was appended, tenant by tenant.
///
/// ```no_run
/// # use serde::{Deserialize, Serialize};
/// # #[derive(Serialize, Deserialize)] #[serde(tag = "type", content = "data")]
/// # enum CartEvent { ItemAdded { price: i64 } }
/// # async fn f(registry: emmett_seaorm::projection::ProjectionRegistry<CartEvent>) {
/// use emmett_seaorm::testing::{ProjectionSpecification, TestDatabase};
///
/// let db = TestDatabase::new().await;
/// // Create the read model's tables on db.connection() here.
/// ProjectionSpecification::new(&db, registry)
///     .given("tenant-a", "cart-1", [CartEvent::ItemAdded { price: 5 }])
///     .given("tenant-b", "cart-1", [CartEvent::ItemAdded { price: 7 }])
///     .then(async |db| {
///         // Query the read model on `db` and assert on its rows.
///     })
///     .await;
/// # }
/// ```
pub struct ProjectionSpecification<'db, E> {
    db: &'db TestDatabase,
    registry: ProjectionRegistry<E>,
    given: Vec<(String, String, Vec<E>)>,
}

impl<'db, E: Event + 'static> ProjectionSpecification<'db, E> {
    /// A specification of the projections in `registry`; create their tables on `db` first.
    pub fn new(db: &'db TestDatabase, registry: ProjectionRegistry<E>) -> Self {
        Self { db, registry, given: Vec::new() }
    }

    /// Events appended to `stream` of `tenant` (in the order of the `given` calls).
    pub fn given(mut self, tenant: &str, stream: &str, events: impl IntoIterator<Item = E>) -> Self {
        self.given.push((tenant.to_owned(), stream.to_owned(), events.into_iter().collect()));
        self
    }

    /// Appends the events, projects every tenant, then runs `check` on the database.
    pub async fn then(self, check: impl AsyncFnOnce(&DatabaseConnection)) {
        let db = self.project().await;
        check(db.connection()).await;
    }

    /// Asserts that `entity`'s table holds exactly `expected`, in primary-key order.
    pub async fn then_rows<En>(self, entity: En, expected: impl IntoIterator<Item = En::Model>)
    where
        En: EntityTrait,
        En::Model: PartialEq + Debug,
    {
        let db = self.project().await;
        let ordered = En::PrimaryKey::iter().fold(En::find(), |select, key| select.order_by_asc(key.into_column()));
        let rows =
            ordered.all(db.connection()).await.unwrap_or_else(|err| panic!("reading {}: {err}", entity.table_name()));
        assert_eq!(rows, expected.into_iter().collect::<Vec<_>>(), "rows of {}", entity.table_name());
    }

    async fn project(self) -> &'db TestDatabase {
        let store = self.db.store();
        let mut tenants: Vec<String> = Vec::new();
        for (tenant, stream, events) in self.given {
            let options = AppendOptions::default().partition(&tenant);
            store.append_to_stream(&stream, events, options).await.expect("append the given events");
            if !tenants.contains(&tenant) {
                tenants.push(tenant);
            }
        }
        let runner = ProjectionRunner::new(store, self.registry);
        for tenant in tenants {
            let run = runner.project_partition("spec", RunOptions::default().partition(&tenant)).await;
            run.unwrap_or_else(|err| panic!("projecting tenant {tenant}: {err}"));
        }
        self.db
    }
}

/// MySQL: makes the exact collation (see [`crate::migrations::exact_collation`]) the default of
/// database `name`, so tables created without one compare their keys exactly.
async fn exact_by_default(db: &DatabaseConnection, name: &str) {
    if let Some(collation) = crate::migrations::exact_collation(db).await.expect("the server's collations") {
        let alter = format!("ALTER DATABASE {name} CHARACTER SET utf8mb4 COLLATE {collation}");
        db.execute_unprepared(&alter).await.unwrap_or_else(|err| panic!("{alter}: {err}"));
    }
}
