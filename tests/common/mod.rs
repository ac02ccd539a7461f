//! Test harness: every conformance test runs once per backend, each on a fresh database.
//!
//! PostgreSQL and MySQL URLs come from `EMMETT_TEST_POSTGRES_URL` / `EMMETT_TEST_MYSQL_URL`
//! (server URLs without a database; defaults: the local servers). When a server can't be
//! reached the test is skipped with a loud message, except under `CI=true`, where it fails.
#![allow(dead_code)]

use emmett_seaorm::EventStore;
use sea_orm::{ConnectOptions, ConnectionTrait, Database, DatabaseConnection};
use serde::{Deserialize, Serialize};

/// The events of the suites' bank-account domain.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(tag = "type", content = "data")]
pub enum Ev {
    Opened { owner: String },
    Deposited { amount: i64 },
    Closed,
}

/// A fresh, migrated database of one backend.
pub struct TestDb {
    pub db: DatabaseConnection,
    pub url: String,
}

impl TestDb {
    pub fn store(&self) -> EventStore {
        EventStore::new(self.db.clone())
    }

    /// Another pool on the same database: separate connections, as another process would have.
    pub async fn second_pool(&self) -> DatabaseConnection {
        connect(&self.url).await.expect("second pool")
    }
}

fn unique_name() -> String {
    format!("emmett_t_{}", uuid::Uuid::now_v7().simple())
}

async fn connect(url: &str) -> Result<DatabaseConnection, sea_orm::DbErr> {
    let mut options = ConnectOptions::new(url);
    options.max_connections(24).sqlx_logging(false);
    Database::connect(options).await
}

async fn migrated(url: String) -> TestDb {
    let db = connect(&url).await.expect("connect to the test database");
    emmett_seaorm::migrate(&db).await.expect("migrate");
    TestDb { db, url }
}

/// Skips the test loudly, or fails it under `CI=true`, when `what` is missing.
pub fn unavailable(what: &str, why: impl std::fmt::Display) {
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{what} is required in CI but unavailable: {why}");
    }
    eprintln!("\n!!! SKIPPED: {what} unavailable ({why}). Provide it to run this test. !!!\n");
}

pub async fn sqlite() -> Option<TestDb> {
    let path = std::env::temp_dir().join(format!("{}.db", unique_name()));
    Some(migrated(format!("sqlite://{}?mode=rwc", path.display())).await)
}

/// A fresh, empty database on a server; its URL.
async fn empty_database(backend: &str, var: &str, default: &str) -> Option<String> {
    let server = std::env::var(var).unwrap_or_else(|_| default.to_owned());
    let admin = match connect(&format!("{server}/{}", if backend == "PostgreSQL" { "postgres" } else { "" })).await {
        Ok(admin) => admin,
        Err(err) => {
            unavailable(backend, err);
            return None;
        }
    };
    let name = unique_name();
    admin.execute_unprepared(&format!("CREATE DATABASE {name}")).await.expect("create test database");
    admin.close().await.ok();
    Some(format!("{server}/{name}"))
}

/// A fresh, empty PostgreSQL database; its URL.
pub async fn empty_postgres() -> Option<String> {
    empty_database("PostgreSQL", "EMMETT_TEST_POSTGRES_URL", "postgres://postgres@127.0.0.1:5432").await
}

pub async fn postgres() -> Option<TestDb> {
    Some(migrated(empty_postgres().await?).await)
}

pub async fn mysql() -> Option<TestDb> {
    Some(migrated(empty_database("MySQL", "EMMETT_TEST_MYSQL_URL", "mysql://root@127.0.0.1:3306").await?).await)
}

/// Generates one `#[tokio::test]` per backend for each listed `async fn name(db: TestDb)`.
#[macro_export]
macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        $crate::conformance!(@backend sqlite; $($name),*);
        $crate::conformance!(@backend postgres; $($name),*);
        $crate::conformance!(@backend mysql; $($name),*);
    };
    (@backend $backend:ident; $($name:ident),*) => {
        mod $backend {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    if let Some(db) = $crate::common::$backend().await {
                        super::$name(db).await;
                    }
                }
            )*
        }
    };
}
