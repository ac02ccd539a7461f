//! Row-level security on PostgreSQL (directly and through a transaction-mode pooler): an
//! application role working through a tenant-bound store reads and writes its tenant's rows
//! and nothing else — through the store's calls, in sessions, and with raw SQL on the store as
//! a connection — while the owner (the daemon, tenant operations) sees everything.
#![cfg(feature = "postgres")]

mod common;

use common::{Ev, TestDb, balances};
use emmett_seaorm::projection::ReadModel;
use emmett_seaorm::{AppendOptions, Error, EventStore, ReadOptions, rls};
use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, Statement};

/// The application role of these tests (PgBouncer's `users.txt` lists it, see scripts/services).
const APP_ROLE: &str = "emt_app";

/// The store's tables with a tenant column.
const TABLES: [&str; 7] = [
    "messages",
    "streams",
    "subscriptions",
    "snapshots",
    "emt_aggregate_snapshots",
    "emt_leases",
    "emt_skipped_events",
];

/// `url` with `role` as its user.
fn as_role(url: &str, role: &str) -> String {
    let (scheme, rest) = url.split_once("://").expect("a URL");
    let host = rest.split_once('@').map_or(rest, |(_, host)| host);
    format!("{scheme}://{role}@{host}")
}

/// The owner's setup: the app role with its grants, `balances` with a policy of its own; a pool
/// of the app role on the stores' URL.
async fn app_pool(db: &TestDb) -> DatabaseConnection {
    let create = format!(
        "DO $$ BEGIN CREATE ROLE {APP_ROLE} LOGIN; EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$"
    );
    db.db.execute_unprepared(&create).await.expect("app role");
    rls::grant(&db.db, APP_ROLE).await.expect("grants");
    for sql in [
        format!("GRANT SELECT, INSERT, UPDATE ON balances TO {APP_ROLE}"),
        "ALTER TABLE balances ENABLE ROW LEVEL SECURITY".into(),
        "CREATE POLICY tenant ON balances USING (tenant_id = current_setting('emt.tenant', true))".into(),
    ] {
        db.db.execute_unprepared(&sql).await.expect(&sql);
    }
    common::connect(&as_role(&db.url, APP_ROLE)).await.expect("connect as the app role")
}

async fn count(conn: &impl ConnectionTrait, sql: &str) -> i64 {
    let row = conn.query_one_raw(Statement::from_string(DbBackend::Postgres, sql)).await;
    row.unwrap_or_else(|e| panic!("{sql}: {e}")).expect("a row").try_get_by_index(0).unwrap()
}

/// Every table's rows as the owner sees them, per tenant.
async fn owner_view(db: &TestDb) -> Vec<(String, String, i64)> {
    let mut view = Vec::new();
    for table in TABLES.iter().chain(&["balances"]) {
        let column = if *table == "balances" { "tenant_id" } else { "partition" };
        let sql = format!("SELECT coalesce({column}, '?'), count(*) FROM {table} GROUP BY 1 ORDER BY 1");
        let rows = db.db.query_all_raw(Statement::from_string(DbBackend::Postgres, sql)).await.unwrap();
        for row in rows {
            view.push((table.to_string(), row.try_get_by_index(0).unwrap(), row.try_get_by_index(1).unwrap()));
        }
    }
    view
}

fn deposit(amount: i64) -> [Ev; 1] {
    [Ev::Deposited { amount }]
}

async fn a_tenant_bound_store_reaches_its_tenant_only(db: TestDb) {
    balances::create_table(&db.db).await;
    let owner = db.store().inline("balances", balances::registry());
    for (tenant, amount) in [("a", 1), ("b", 10), ("b", 20)] {
        let options = AppendOptions::default().partition(tenant);
        owner.append_to_stream("acc-1", deposit(amount), options).await.unwrap();
    }
    // A snapshot written before snapshots named their tenant is tagged when security goes on.
    db.db.execute_unprepared("UPDATE snapshots SET partition = NULL").await.unwrap();
    let app = EventStore::new(app_pool(&db).await).inline("balances", balances::registry());
    // (Through the pooler where the stores go through it.)
    let owner_pool = db.pooled.as_ref().unwrap_or(&db.db);
    let tagged = rls::enable(owner_pool, &[ReadModel::new("balances", "tenant_id")]).await.unwrap();
    assert_eq!(tagged, 2);
    assert!(rls::enabled(owner_pool).await.unwrap());
    let before = owner_view(&db).await;

    // Its own tenant: appends (inline projection included), reads, aggregates, sessions.
    let a = app.for_tenant("a");
    assert_eq!(a.tenant(), Some("a"));
    a.append_to_stream("acc-1", deposit(2), AppendOptions::default()).await.unwrap();
    let read = a.read_stream::<Ev>("acc-1", ReadOptions::default()).await.unwrap();
    assert_eq!(read.events.len(), 2, "the owner's event and its own");
    let sum = |total: i64, e: &Ev| if let Ev::Deposited { amount } = e { total + amount } else { total };
    let total = a.aggregate_stream("acc-1", sum, || 0, ReadOptions::default()).await.unwrap();
    assert_eq!(total.state, 3);
    assert_eq!(
        count(&db.db, "SELECT total FROM balances WHERE tenant_id = 'a'").await,
        3,
        "inline, from the tagged snapshot"
    );
    a.with_session(|s| async move {
        s.append_to_stream("acc-2", deposit(5), AppendOptions::default()).await?;
        assert_eq!(count(&s, "SELECT count(*) FROM messages").await, 3, "raw SQL in a session");
        Ok::<_, Error>(())
    })
    .await
    .unwrap();

    // Another tenant through the store's calls: refused before any SQL.
    let b = ReadOptions::default().partition("b");
    let refused = a.read_stream::<Ev>("acc-1", b.clone()).await.unwrap_err();
    assert!(
        matches!(&refused, Error::OtherTenant { tenant, partition } if tenant == "a" && partition == "b"),
        "{refused}"
    );
    assert!(matches!(
        a.append_to_stream("acc-1", deposit(1), AppendOptions::default().partition("b")).await,
        Err(Error::OtherTenant { .. })
    ));
    assert!(matches!(a.stream_exists("acc-1", "b").await, Err(Error::OtherTenant { .. })));

    // Raw SQL on the bound store: its tenant's rows only, in every table; no rows of another.
    assert_eq!(count(&a, "SELECT count(*) FROM messages").await, 3);
    for table in TABLES {
        let other =
            count(&a, &format!("SELECT count(*) FROM {table} WHERE partition <> 'a' OR partition IS NULL")).await;
        assert_eq!(other, 0, "{table}");
    }
    assert_eq!(count(&a, "SELECT count(*) FROM balances").await, 2);
    assert_eq!(count(&a, "SELECT count(*) FROM snapshots").await, 2);
    // Writes aimed at another tenant: refused by the policy, or they find nothing.
    let forged = "INSERT INTO messages (stream_id, stream_position, partition, message_data, message_metadata,
                  message_schema_version, message_type, message_id) VALUES ('x', 1, 'b', '{}', '{}', '1', 'T', 'forged')";
    let error = a.execute_unprepared(forged).await.unwrap_err().to_string();
    assert!(error.contains("row-level security"), "{error}");
    let moved = a.execute_unprepared("UPDATE messages SET partition = 'b'").await.unwrap_err().to_string();
    assert!(moved.contains("row-level security"), "{moved}");
    assert_eq!(
        a.execute_unprepared("UPDATE streams SET stream_position = 0 WHERE partition = 'b'")
            .await
            .unwrap()
            .rows_affected(),
        0
    );
    assert_eq!(
        a.execute_unprepared("UPDATE balances SET total = 0 WHERE tenant_id = 'b'").await.unwrap().rows_affected(),
        0
    );
    // What the role may not do at all.
    for sql in [
        "DELETE FROM messages",
        "TRUNCATE messages",
        "DROP TABLE messages",
        "ALTER TABLE messages DISABLE ROW LEVEL SECURITY",
        "SELECT count(*) FROM messages_default",
        "SELECT count(*) FROM emt_daemons",
    ] {
        let error = a.execute_unprepared(sql).await.unwrap_err().to_string();
        assert!(error.contains("permission denied") || error.contains("must be owner"), "{sql}: {error}");
    }

    // Without a tenant the role sees nothing and writes nothing.
    let read = app.read_stream::<Ev>("acc-1", b).await.unwrap();
    assert!(!read.stream_exists, "no tenant bound: no rows");
    assert_eq!(count(&app, "SELECT count(*) FROM messages").await, 0);
    let refused = app.append_to_stream("acc-9", deposit(1), AppendOptions::default().partition("c")).await;
    assert!(matches!(&refused, Err(Error::Denied { .. })), "{refused:?}");
    assert!(refused.unwrap_err().to_string().contains("row-level security"));

    // The owner sees every tenant; `b` is as it was.
    let after = owner_view(&db).await;
    let of_b = |view: &[(String, String, i64)]| view.iter().filter(|(_, t, _)| t == "b").cloned().collect::<Vec<_>>();
    assert_eq!(of_b(&after), of_b(&before));
    assert_eq!(count(&db.db, "SELECT count(*) FROM messages").await, 5);
    rls::disable(owner_pool).await.unwrap();
    assert!(!rls::enabled(owner_pool).await.unwrap());
}

conformance!(@backend postgres; a_tenant_bound_store_reaches_its_tenant_only);
conformance!(@backend postgres_pooled; a_tenant_bound_store_reaches_its_tenant_only);
