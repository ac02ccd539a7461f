//! A snapshot projection for rebuild tests: each account's balance per tenant in `balances`,
//! and the sequential fold it must equal.

use emmett_seaorm::projection::{ProjectionRegistry, SnapshotProjection};
use emmett_seaorm::{AppendOptions, EventStore, ReadOptions, RecordedEvent, columns, keys};
use sea_orm::{ConnectionTrait, DatabaseConnection, Statement};

use super::Ev;

#[derive(Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Balance {
    total: i64,
    deposits: i64,
}

fn fold(b: Balance, e: &Ev) -> Balance {
    match e {
        Ev::Deposited { amount } => Balance { total: b.total + amount, deposits: b.deposits + 1 },
        _ => b,
    }
}

/// The registry writing `balances` (snapshots in the central table).
pub fn registry() -> ProjectionRegistry<Ev> {
    let projection = SnapshotProjection::new(
        "balances",
        |e: &RecordedEvent<Ev>, tenant: &str| keys! { "tenant_id" => tenant, "account_id" => &e.stream_id },
        fold,
        Balance::default,
    )
    .columns(|b: &Balance| columns! { "total" => b.total, "deposits" => b.deposits })
    .tenant_column("tenant_id");
    ProjectionRegistry::new().with(projection)
}

pub async fn create_table(db: &DatabaseConnection) {
    let setup = "CREATE TABLE balances (tenant_id VARCHAR(100) NOT NULL, account_id VARCHAR(100) NOT NULL, \
                 total BIGINT, deposits BIGINT, PRIMARY KEY (tenant_id, account_id))";
    db.execute_unprepared(setup).await.unwrap();
}

/// Deposit number `i`: `amount` into one of 7 accounts of one of 3 tenants, round robin.
pub async fn deposit(store: &EventStore, i: usize, amount: i64) -> u64 {
    let (tenant, account) = (["t1", "t2", "t3"][i % 3], format!("acc-{}", i % 7));
    let appended =
        store.append_to_stream(&account, [Ev::Deposited { amount }], AppendOptions::default().partition(tenant));
    appended.await.unwrap().last_event_global_position
}

/// Deletes the rows and corrupts every snapshot: only a replay from the first event repairs them.
pub async fn corrupt(db: &DatabaseConnection) {
    db.execute_unprepared("DELETE FROM balances").await.unwrap();
    db.execute_unprepared(r#"UPDATE snapshots SET snapshot = '{"total": -1000, "deposits": 0}'"#).await.unwrap();
}

/// The rows of `balances`: (tenant, account, total, deposits), ordered.
pub async fn rows(db: &DatabaseConnection) -> Vec<(String, String, i64, i64)> {
    let sql = "SELECT tenant_id, account_id, total, deposits FROM balances ORDER BY tenant_id, account_id";
    let rows = db.query_all_raw(Statement::from_string(db.get_database_backend(), sql)).await.unwrap();
    let row = |r: &sea_orm::QueryResult| {
        let get = |i| r.try_get_by_index::<i64>(i).unwrap();
        (r.try_get_by_index(0).unwrap(), r.try_get_by_index(1).unwrap(), get(2), get(3))
    };
    rows.iter().map(row).collect()
}

/// What `rows` must be: the sequential fold of every account's stream.
pub async fn folded(store: &EventStore) -> Vec<(String, String, i64, i64)> {
    let mut expected = Vec::new();
    for tenant in ["t1", "t2", "t3"] {
        for account in (0..7).map(|a| format!("acc-{a}")) {
            let options = ReadOptions::default().partition(tenant);
            let folded = store.aggregate_stream(&account, fold, Balance::default, options).await.unwrap();
            if folded.stream_exists {
                expected.push((tenant.to_owned(), account, folded.state.total, folded.state.deposits));
            }
        }
    }
    expected.sort();
    expected
}

/// Records every event it is given in `seen`, keyed by global position: an event projected twice
/// fails its batch (a duplicate key), one skipped is missing from `seen`.
struct Seen;

#[async_trait::async_trait]
impl emmett_seaorm::projection::EventHandler<Ev> for Seen {
    async fn handle(
        &self,
        ctx: &emmett_seaorm::projection::ProjectionContext<'_>,
        e: &RecordedEvent<Ev>,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let sql = match ctx.backend() {
            sea_orm::DbBackend::Postgres => "INSERT INTO seen (global_position) VALUES ($1)",
            _ => "INSERT INTO seen (global_position) VALUES (?)",
        };
        ctx.db()
            .execute_raw(Statement::from_sql_and_values(ctx.backend(), sql, [(e.global_position as i64).into()]))
            .await?;
        Ok(())
    }
}

/// [`registry`] and the `seen` recorder: exactly once, checked by the database.
pub fn recorded_registry() -> ProjectionRegistry<Ev> {
    registry().on([], Seen)
}

/// The `seen` recorder alone.
pub fn seen_registry() -> ProjectionRegistry<Ev> {
    ProjectionRegistry::new().on([], Seen)
}

/// `balances` and `seen`.
pub async fn create_recorded_tables(db: &DatabaseConnection) {
    create_table(db).await;
    db.execute_unprepared("CREATE TABLE seen (global_position BIGINT NOT NULL PRIMARY KEY)").await.unwrap();
}

/// The global positions in `seen`, and those of every live event: equal when every event was
/// projected exactly once.
pub async fn seen_and_stored(db: &DatabaseConnection) -> (Vec<i64>, Vec<i64>) {
    let column = |sql: &str| {
        let statement = Statement::from_string(db.get_database_backend(), sql.to_owned());
        async move {
            let rows = db.query_all_raw(statement).await.unwrap();
            rows.iter().map(|r| r.try_get_by_index::<i64>(0).unwrap()).collect::<Vec<i64>>()
        }
    };
    let seen = column("SELECT global_position FROM seen ORDER BY global_position").await;
    let stored = column("SELECT global_position FROM messages WHERE NOT is_archived ORDER BY global_position").await;
    (seen, stored)
}
