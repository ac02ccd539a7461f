//! Test harness: every conformance test runs once per backend, each on a fresh database.
//!
//! PostgreSQL and MySQL URLs come from `EMMETT_TEST_POSTGRES_URL` / `EMMETT_TEST_MYSQL_URL`
//! (server URLs without a database; defaults: the local servers). A server that can't be
//! reached fails the tests (within seconds) with what to do; leave a backend out with
//! `cargo test --no-default-features --features …`. Each test drops its database when it passes.
#![allow(dead_code)]

pub mod balances;
pub mod node;
pub mod raw;

use std::collections::BTreeMap;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use emmett_seaorm::EventStore;
use sea_orm::{ConnectionTrait, Database, DatabaseConnection};
use serde::{Deserialize, Serialize};

/// The events of the suites' bank-account domain.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(tag = "type", content = "data")]
pub enum Ev {
    Opened { owner: String },
    Deposited { amount: i64 },
    Closed,
}

/// A handler that fails on every deposit of 13 ("13 is unlucky") while its flag is set.
#[derive(Clone)]
pub struct Picky(pub std::sync::Arc<std::sync::atomic::AtomicBool>);

impl Picky {
    /// A `Picky` that always fails.
    pub fn failing() -> Self {
        Picky(std::sync::Arc::new(true.into()))
    }
}

#[async_trait::async_trait]
impl emmett_seaorm::projection::EventHandler<Ev> for Picky {
    async fn handle(
        &self,
        _: &emmett_seaorm::projection::ProjectionContext<'_>,
        e: &emmett_seaorm::RecordedEvent<Ev>,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        match (&e.event, self.0.load(std::sync::atomic::Ordering::SeqCst)) {
            (Ev::Deposited { amount: 13 }, true) => Err("13 is unlucky".into()),
            _ => Ok(()),
        }
    }
}

/// A fresh, migrated database of one backend.
pub struct TestDb {
    /// A pool for the test's own statements (direct, also when the stores go through a pooler).
    pub db: DatabaseConnection,
    /// The URL the stores connect to.
    pub url: String,
    /// Behind a transaction pooler (`postgres_pooled`): the pool the stores use.
    pub pooled: Option<DatabaseConnection>,
}

impl TestDb {
    pub fn store(&self) -> EventStore {
        EventStore::new(self.pooled.clone().unwrap_or_else(|| self.db.clone()))
    }

    /// Another pool on the same database: separate connections, as another process would have.
    pub async fn second_pool(&self) -> DatabaseConnection {
        connect(&self.url).await.expect("second pool")
    }
}

fn unique_name() -> String {
    format!("emmett_t_{}", uuid::Uuid::now_v7().simple())
}

pub async fn connect(url: &str) -> Result<DatabaseConnection, sea_orm::DbErr> {
    let mut options = emmett_seaorm::connect_options(url);
    // Fail fast on a server that isn't there, instead of waiting out sqlx's 30 s per test.
    options.max_connections(24).connect_timeout(Duration::from_secs(3)).acquire_timeout(Duration::from_secs(10));
    options.sqlx_logging(false);
    Database::connect(emmett_seaorm::configure(options)).await
}

async fn migrated(url: String) -> TestDb {
    let Some((direct_url, pooled_url)) = url.split_once(' ') else {
        let db = connect(&url).await.expect("connect to the test database");
        emmett_seaorm::migrate(&db).await.expect("migrate");
        return TestDb { db, url, pooled: None };
    };
    let db = connect(direct_url).await.expect("connect to the test database");
    let pooled = reach_pooler(pooled_url).await;
    emmett_seaorm::migrate(&pooled).await.expect("migrate through the pooler");
    TestDb { db, url: pooled_url.to_owned(), pooled: Some(pooled) }
}

/// `url`, or for a URL through the pooler of [`postgres_pooled`], the same database's direct URL
/// (what another system, the test's stand-in for one, would use).
pub fn direct_url(url: &str) -> String {
    match url.strip_suffix("?pooler=transaction") {
        Some(pooled) => postgres_database(pooled.rsplit('/').next().expect("a name")),
        None => url.to_owned(),
    }
}

/// A pool on `url` through a pooler, failing the test within seconds, saying what to start, if
/// the pooler isn't there.
pub async fn reach_pooler(url: &str) -> DatabaseConnection {
    let connected = tokio::time::timeout(Duration::from_secs(10), connect(url)).await;
    match connected.map_err(|e| e.to_string()).and_then(|c| c.map_err(|e| e.to_string())) {
        Ok(pooled) => pooled,
        Err(e) => unavailable(
            &format!("PgBouncer at {url}"),
            e,
            "run scripts/services (it starts PgBouncer), or point EMMETT_TEST_POOLER_URL (transaction mode) or EMMETT_TEST_SESSION_POOLER_URL (session mode) at one",
        ),
    }
}

/// The PostgreSQL server's URL (`EMMETT_TEST_POSTGRES_URL`, without a database).
pub fn postgres_server() -> String {
    server(POSTGRES.0, POSTGRES.1)
}

/// The direct URL of the test database `name` on the PostgreSQL server.
pub fn postgres_database(name: &str) -> String {
    format!("{}/{name}", postgres_server())
}

/// A fresh, empty PostgreSQL database reached through a transaction-mode pooler
/// (`EMMETT_TEST_POOLER_URL`, default PgBouncer on 127.0.0.1:6432): its direct URL and its URL
/// through the pooler, separated by a space.
pub async fn postgres_pooled() -> String {
    let direct = empty_postgres().await;
    let name = direct.rsplit('/').next().expect("a database name").to_owned();
    let pooler = server("EMMETT_TEST_POOLER_URL", "postgres://postgres@127.0.0.1:6432");
    format!("{direct} {pooler}/{name}?pooler=transaction")
}

/// Fails the test, saying what is missing and how to provide it — a missing server or tool is
/// never a silent pass.
pub fn unavailable(what: &str, why: impl std::fmt::Display, how: &str) -> ! {
    panic!("\n!!! {what} is unavailable ({why}).\n!!! {how}\n");
}

pub async fn sqlite() -> String {
    let path = std::env::temp_dir().join(format!("{}.db", unique_name()));
    format!("sqlite://{}?mode=rwc", path.display())
}

/// A deposit of `amount` into `account` of `tenant` held in an open session: returns once it has
/// taken its positions, with the sender that lets it commit and the task to wait for.
pub async fn held_deposit(
    store: &EventStore,
    tenant: &str,
    account: &str,
    amount: i64,
) -> (tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
    let (took_position, taken) = tokio::sync::oneshot::channel::<()>();
    let (commit, may_commit) = tokio::sync::oneshot::channel::<()>();
    let (store, tenant, account) = (store.clone(), tenant.to_owned(), account.to_owned());
    let writer = tokio::spawn(async move {
        store
            .with_session(|s| async move {
                let options = emmett_seaorm::AppendOptions::default().partition(tenant);
                s.append_to_stream(&account, [Ev::Deposited { amount }], options).await?;
                took_position.send(()).unwrap();
                may_commit.await.unwrap();
                Ok::<_, emmett_seaorm::Error>(())
            })
            .await
            .unwrap();
    });
    taken.await.unwrap();
    (commit, writer)
}

/// Kills the connections of the test database other than the one asking (the server's view of
/// "the network dropped"): all of them, or with `busy_only` those running a statement. How many
/// it killed; a list that fails (the killer's own pool hit) kills none.
pub async fn kill_connections(killer: &DatabaseConnection, busy_only: bool) -> usize {
    let backend = killer.get_database_backend();
    let list = match (backend, busy_only) {
        (sea_orm::DbBackend::Postgres, busy) => format!(
            "SELECT pid::bigint FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid(){}",
            if busy { " AND state = 'active' AND query NOT LIKE '%pg_stat_activity%'" } else { "" }
        ),
        (_, busy) => format!(
            "SELECT CAST(ID AS SIGNED) FROM information_schema.PROCESSLIST WHERE DB = DATABASE() AND ID <> CONNECTION_ID(){}",
            if busy { " AND COMMAND = 'Query'" } else { "" }
        ),
    };
    let victims: Vec<i64> = match killer.query_all_raw(sea_orm::Statement::from_string(backend, list)).await {
        Ok(rows) => rows.iter().map(|r| r.try_get_by_index(0).unwrap()).collect(),
        Err(_) => Vec::new(),
    };
    let mut killed = 0;
    for id in victims {
        let kill = match backend {
            sea_orm::DbBackend::Postgres => format!("SELECT pg_terminate_backend({id})"),
            _ => format!("KILL CONNECTION {id}"),
        };
        // Gone already is fine.
        killed += killer.execute_unprepared(&kill).await.is_ok() as usize;
    }
    killed
}

/// The server URL of a backend (without a database), from its variable or the local default.
fn server(var: &str, default: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| default.to_owned())
}

/// An admin connection to a server; after one failure every later call fails at once.
async fn admin(backend: &'static str, var: &str, default: &str) -> DatabaseConnection {
    static UNREACHABLE: Mutex<BTreeMap<&'static str, String>> = Mutex::new(BTreeMap::new());
    let server = server(var, default);
    let how = format!(
        "Start it, point {var} at one (a server URL without a database), or leave the backend out: \
         cargo test --no-default-features --features <the others of sqlite,postgres,mysql>"
    );
    let known = UNREACHABLE.lock().unwrap_or_else(PoisonError::into_inner).get(backend).cloned();
    if let Some(err) = known {
        unavailable(&format!("{backend} at {server}"), err, &how);
    }
    let database = if backend == "PostgreSQL" { "postgres" } else { "" };
    match connect(&format!("{server}/{database}")).await {
        Ok(admin) => admin,
        Err(err) => {
            UNREACHABLE.lock().unwrap_or_else(PoisonError::into_inner).insert(backend, err.to_string());
            unavailable(&format!("{backend} at {server}"), err, &how)
        }
    }
}

/// A fresh, empty database on a server; its URL.
async fn empty_database(backend: &'static str, var: &str, default: &str) -> String {
    let admin = admin(backend, var, default).await;
    let name = unique_name();
    admin.execute_unprepared(&format!("CREATE DATABASE {name}")).await.expect("create test database");
    // MySQL: read-model tables made by the tests get exact keys, as the store requires.
    if let Some(collation) = emmett_seaorm::migrations::exact_collation(&admin).await.expect("collations") {
        let alter = format!("ALTER DATABASE {name} CHARACTER SET utf8mb4 COLLATE {collation}");
        admin.execute_unprepared(&alter).await.expect("exact collation");
    }
    admin.close().await.ok();
    format!("{}/{name}", server(var, default))
}

const POSTGRES: (&str, &str) = ("EMMETT_TEST_POSTGRES_URL", "postgres://postgres@127.0.0.1:5432");
const MYSQL: (&str, &str) = ("EMMETT_TEST_MYSQL_URL", "mysql://root@127.0.0.1:3306");

/// A fresh, empty PostgreSQL database; its URL.
pub async fn empty_postgres() -> String {
    empty_database("PostgreSQL", POSTGRES.0, POSTGRES.1).await
}

pub async fn postgres() -> String {
    empty_postgres().await
}

pub async fn mysql() -> String {
    empty_database("MySQL", MYSQL.0, MYSQL.1).await
}

/// Drops a test database (or SQLite file) once its test passed; a failed test leaves it to
/// look at (`.ci/run` drops leftovers before it runs the tests).
pub async fn drop_database(url: &str) {
    if let Some(path) = url.strip_prefix("sqlite://").and_then(|rest| rest.split('?').next()) {
        for suffix in ["", "-wal", "-shm", "-journal"] {
            std::fs::remove_file(format!("{path}{suffix}")).ok();
        }
        return;
    }
    let (server, name) = url.rsplit_once('/').expect("a database URL");
    let (backend, sql) = if url.starts_with("postgres") {
        ("PostgreSQL", format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
    } else {
        ("MySQL", format!("DROP DATABASE IF EXISTS {name}"))
    };
    let database = if backend == "PostgreSQL" { "postgres" } else { "" };
    let admin = connect(&format!("{server}/{database}")).await.expect("admin connection");
    admin.execute_unprepared(&sql).await.expect("drop the test database");
    admin.close().await.ok();
}

/// Runs `test` on a fresh migrated database at `url`, then drops the database.
pub async fn run<F: std::future::Future<Output = ()>>(url: String, test: impl FnOnce(TestDb) -> F) {
    let db = migrated(url.clone()).await;
    let pools = (db.db.clone(), db.pooled.clone());
    test(db).await;
    pools.0.close().await.ok();
    if let Some(pooled) = pools.1 {
        pooled.close().await.ok();
    }
    drop_database(url.split(' ').next().expect("a URL")).await;
}

/// Generates one `#[tokio::test]` per backend for each listed `async fn name(db: TestDb)`
/// (`conformance!(servers: …)`: PostgreSQL and MySQL only).
/// A backend whose feature is off is not compiled, so it is not reported as passed:
/// `cargo test --no-default-features --features sqlite` runs the SQLite tests alone.
#[macro_export]
macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        #[cfg(feature = "sqlite")]
        $crate::conformance!(@backend sqlite; $($name),*);
        #[cfg(feature = "postgres")]
        $crate::conformance!(@backend postgres; $($name),*);
        #[cfg(feature = "mysql")]
        $crate::conformance!(@backend mysql; $($name),*);
    };
    // Tests of what only a server has (row locks, killed connections): PostgreSQL and MySQL.
    // And on PostgreSQL through a transaction-mode pooler (the test's `db.db` stays direct).
    (with_pooler: $($name:ident),* $(,)?) => {
        $crate::conformance!($($name),*);
        #[cfg(feature = "postgres")]
        $crate::conformance!(@backend postgres_pooled; $($name),*);
    };
    (servers: $($name:ident),* $(,)?) => {
        #[cfg(feature = "postgres")]
        $crate::conformance!(@backend postgres; $($name),*);
        #[cfg(feature = "mysql")]
        $crate::conformance!(@backend mysql; $($name),*);
    };
    (@backend $backend:ident; $($name:ident),*) => {
        mod $backend {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    $crate::common::run($crate::common::$backend().await, super::$name).await;
                }
            )*
        }
    };
}
