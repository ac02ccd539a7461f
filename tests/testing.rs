//! The testing kit, tested with itself on every backend: specifications pass when they hold and
//! fail, saying what differed, when they don't; its databases are fresh and dropped again.

mod common;

use std::panic::AssertUnwindSafe;

use common::Ev;
use emmett_seaorm::projection::{EventHandler, ProjectionContext, ProjectionRegistry};
use emmett_seaorm::testing::{DeciderSpecification, ProjectionSpecification, TestDatabase};
use emmett_seaorm::{CommandHandler, Error, RecordedEvent};
use futures::FutureExt;
use sea_orm::{ConnectionTrait, Statement};

/// The kit's URLs of the three backends: the servers the other suites use.
fn urls() -> Vec<String> {
    let server = |var: &str, default: &str| std::env::var(var).unwrap_or_else(|_| default.to_owned());
    [
        cfg!(feature = "sqlite").then(|| "sqlite::memory:".to_owned()),
        cfg!(feature = "postgres").then(|| server("EMMETT_TEST_POSTGRES_URL", "postgres://postgres@127.0.0.1:5432")),
        cfg!(feature = "mysql").then(|| server("EMMETT_TEST_MYSQL_URL", "mysql://root@127.0.0.1:3306")),
    ]
    .into_iter()
    .flatten()
    .collect()
}

fn accounts() -> CommandHandler<Option<i64>, Ev> {
    CommandHandler::new(
        |balance: Option<i64>, e: &Ev| match e {
            Ev::Opened { .. } => Some(0),
            Ev::Deposited { amount } => balance.map(|b| b + amount),
            Ev::Closed => None,
        },
        || None,
    )
}

fn decide(amount: &i64, balance: &Option<i64>) -> Result<Vec<Ev>, Error> {
    match balance {
        Some(_) => Ok(vec![Ev::Deposited { amount: *amount }]),
        None => Err(Error::InvalidEvent { stream: "account".into(), reason: "not open".into() }),
    }
}

/// The panic message of `check`, which must fail.
async fn failure(check: impl std::future::Future<Output = ()>) -> String {
    let panic = AssertUnwindSafe(check).catch_unwind().await.expect_err("the specification must fail");
    panic.downcast_ref::<String>().cloned().or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string())).unwrap()
}

#[tokio::test]
async fn decider_specifications_hold_and_fail() {
    for url in urls() {
        let db = TestDatabase::at(&url).await;
        let spec = DeciderSpecification::new(&db, accounts(), decide);
        let opened = || Ev::Opened { owner: "o".into() };
        spec.given([opened()]).when(5).then([Ev::Deposited { amount: 5 }]).await;
        spec.given([]).when(5).then_error(|e| e.to_string().contains("not open")).await;
        // Wrong expectations fail, naming what happened.
        let message = failure(spec.given([opened()]).when(5).then([Ev::Deposited { amount: 6 }])).await;
        assert!(message.contains("other events") && message.contains("amount: 5"), "{url}: {message}");
        let message = failure(spec.given([opened()]).when(5).then_error(|_| true)).await;
        assert!(message.contains("succeeded"), "{url}: {message}");
        let message = failure(spec.given([]).when(5).then([])).await;
        assert!(message.contains("not open"), "{url}: {message}");
    }
}

/// Counts deposits per tenant in `totals` (created by the test).
struct Totals;

#[async_trait::async_trait]
impl EventHandler<Ev> for Totals {
    async fn handle(
        &self,
        ctx: &ProjectionContext<'_>,
        e: &RecordedEvent<Ev>,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let Ev::Deposited { amount } = e.event else { return Ok(()) };
        let sql = match ctx.backend() {
            sea_orm::DbBackend::Postgres => "UPDATE totals SET total = total + $1 WHERE tenant = $2",
            _ => "UPDATE totals SET total = total + ? WHERE tenant = ?",
        };
        let update = Statement::from_sql_and_values(ctx.backend(), sql, [amount.into(), e.partition.clone().into()]);
        ctx.db().execute_raw(update).await?;
        Ok(())
    }
}

async fn totals(db: &sea_orm::DatabaseConnection) -> Vec<(String, i64)> {
    let rows = db.query_all_raw(Statement::from_string(
        db.get_database_backend(),
        "SELECT tenant, total FROM totals ORDER BY tenant",
    ));
    rows.await.unwrap().iter().map(|r| (r.try_get("", "tenant").unwrap(), r.try_get("", "total").unwrap())).collect()
}

#[tokio::test]
async fn projection_specifications_run_every_tenant() {
    for url in urls() {
        let db = TestDatabase::at(&url).await;
        let setup = "CREATE TABLE totals (tenant VARCHAR(64) PRIMARY KEY, total BIGINT NOT NULL)";
        db.connection().execute_unprepared(setup).await.unwrap();
        db.connection().execute_unprepared("INSERT INTO totals VALUES ('a', 0), ('b', 0)").await.unwrap();
        let registry = ProjectionRegistry::new().on(["Deposited"], Totals);
        ProjectionSpecification::new(&db, registry)
            .given("a", "acc-1", [Ev::Opened { owner: "o".into() }, Ev::Deposited { amount: 5 }])
            .given("b", "acc-1", [Ev::Deposited { amount: 7 }])
            .given("a", "acc-2", [Ev::Deposited { amount: 1 }])
            .then(async |db| assert_eq!(totals(db).await, [("a".to_owned(), 6), ("b".to_owned(), 7)], "{url}"))
            .await;
    }
}

#[tokio::test]
async fn test_databases_are_fresh_and_dropped() {
    for url in urls().into_iter().filter(|u| !u.starts_with("sqlite")) {
        let db = TestDatabase::at(&url).await;
        let store = db.store();
        store.append_to_stream("s", [Ev::Closed], Default::default()).await.expect("migrated");
        let name: String = {
            let sql = match db.connection().get_database_backend() {
                sea_orm::DbBackend::Postgres => "SELECT current_database() AS name",
                _ => "SELECT DATABASE() AS name",
            };
            let row =
                db.connection().query_one_raw(Statement::from_string(db.connection().get_database_backend(), sql));
            row.await.unwrap().unwrap().try_get("", "name").unwrap()
        };
        assert!(name.starts_with("emt_test_"), "{name}");
        drop(store);
        drop(db);
        let again = TestDatabase::at(&url).await;
        let backend = again.connection().get_database_backend();
        let (sql, value) = match backend {
            sea_orm::DbBackend::Postgres => ("SELECT count(*) AS n FROM pg_database WHERE datname = $1", name),
            _ => ("SELECT count(*) AS n FROM information_schema.schemata WHERE schema_name = ?", name),
        };
        let row = again.connection().query_one_raw(Statement::from_sql_and_values(backend, sql, [value.into()]));
        let left: i64 = row.await.unwrap().unwrap().try_get("", "n").unwrap();
        assert_eq!(left, 0, "{url}: the database was dropped with its TestDatabase");
    }
}
