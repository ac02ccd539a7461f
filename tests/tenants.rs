//! Tenants come and go, on every backend: erasing one removes every row of it the store and its
//! registered read models hold, leaves every other tenant as it was (tenant ids that differ only
//! by case, a prefix or a character a pattern would match included), is idempotent, lets the id
//! start again from scratch, and a running daemon resurrects nothing.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{Ev, TestDb, balances};
use emmett_seaorm::daemon::Daemon;
use emmett_seaorm::projection::ReadModel;
use emmett_seaorm::{AppendOptions, EventStore, ExpectedVersion, ReadOptions, SnapshotPolicy};
use sea_orm::{ConnectionTrait, DbBackend, Statement};

/// Tenants a careless erase of `t1` would hit: a prefix match, another case, pattern characters.
const TENANTS: [&str; 6] = ["t1", "t10", "T1", "t_", "t%1", "t|1"];

/// The store's tables with a tenant column.
const TABLES: [&str; 6] =
    ["messages", "streams", "subscriptions", "emt_leases", "emt_skipped_events", "emt_aggregate_snapshots"];

async fn scalar(db: &TestDb, sql: &str, tenant: &str) -> i64 {
    let backend = db.db.get_database_backend();
    let sql = match backend {
        DbBackend::Postgres => sql.to_owned(),
        _ => sql.replace(" partition ", " `partition` ").replace("$1", "?"),
    };
    let row = db.db.query_one_raw(Statement::from_sql_and_values(backend, &sql, [tenant.into()])).await;
    row.unwrap_or_else(|e| panic!("{sql}: {e}")).expect("a row").try_get_by_index(0).unwrap()
}

/// Rows of `tenant` per table: the store's, `balances` and the snapshots of its rows.
async fn rows_of(db: &TestDb, tenant: &str) -> BTreeMap<&'static str, i64> {
    let mut rows = BTreeMap::new();
    for table in TABLES {
        rows.insert(table, scalar(db, &format!("SELECT count(*) FROM {table} WHERE partition = $1"), tenant).await);
    }
    rows.insert("balances", scalar(db, "SELECT count(*) FROM balances WHERE tenant_id = $1", tenant).await);
    // The snapshot ids of `balances`: `account_id:…|tenant_id:<tenant, URI-encoded>`.
    let ids = "SELECT count(*) FROM snapshots WHERE readmodel_table_name = 'balances' AND stream_id = $1";
    let mut snapshots = 0;
    for account in ["acc-0", "acc-1", "acc-2"] {
        snapshots += scalar(db, ids, &format!("account_id:{account}|tenant_id:{}", encode(tenant))).await;
    }
    rows.insert("snapshots", snapshots);
    rows
}

fn encode(tenant: &str) -> String {
    tenant.replace('%', "%25").replace('|', "%7C")
}

/// Everything the store gives back of `tenant`: every stream's events and the read model.
async fn contents(db: &TestDb, store: &EventStore, tenant: &str) -> String {
    let mut out = String::new();
    for account in ["acc-0", "acc-1", "acc-2", "old"] {
        let read = store.read_stream::<Ev>(account, ReadOptions::default().partition(tenant)).await.unwrap();
        for e in read.events {
            out += &format!("{account} {} {} {:?} {}\n", e.stream_position, e.global_position, e.event, e.message_id);
        }
    }
    let balances = balances::rows(&db.db).await.into_iter().filter(|r| r.0 == tenant);
    out + &format!("{:?} {:?}", balances.collect::<Vec<_>>(), rows_of(db, tenant).await)
}

/// Fills every tenant: three accounts, an archived stream, an aggregate snapshot, the read model
/// and its snapshots (by a daemon, which also leaves checkpoints and leases).
async fn fill(db: &TestDb, store: &EventStore) {
    balances::create_table(&db.db).await;
    // On PostgreSQL, t1 and t10 have partitions of their own (dropped whole by an erase).
    store.create_partition("t1").await.unwrap();
    store.create_partition("t10").await.unwrap();
    let mut head = 0;
    for tenant in TENANTS {
        let options = || AppendOptions::default().partition(tenant);
        store.append_to_stream("old", [Ev::Deposited { amount: 1 }], options()).await.unwrap();
        assert!(store.archive_stream("old", tenant).await.unwrap());
        for (i, account) in ["acc-0", "acc-1", "acc-2"].into_iter().enumerate() {
            let events = (0..3 + i as i64).map(|amount| Ev::Deposited { amount });
            head = store.append_to_stream(account, events, options()).await.unwrap().last_event_global_position;
        }
        let read = ReadOptions::default().partition(tenant);
        let fold = |total: i64, e: &Ev| if let Ev::Deposited { amount } = e { total + amount } else { total };
        store.aggregate_stream_snapshotted("acc-2", fold, || 0, read, SnapshotPolicy::every(1)).await.unwrap();
    }
    let daemon = Daemon::new(store.clone()).projection("balances", balances::registry()).start().await.unwrap();
    tokio::time::timeout(Duration::from_secs(30), daemon.caught_up(head)).await.expect("caught up").unwrap();
    daemon.stop().await.unwrap();
}

async fn erasing_a_tenant_removes_its_rows_and_only_its(db: TestDb) {
    let store = db.store();
    fill(&db, &store).await;
    let read_models = balances::registry().read_models().to_vec();
    assert_eq!(read_models, [ReadModel::new("balances", "tenant_id")]);
    let mut others = BTreeMap::new();
    for tenant in &TENANTS[1..] {
        others.insert(tenant, contents(&db, &store, tenant).await);
    }
    let before = rows_of(&db, "t1").await;
    for table in ["messages", "streams", "subscriptions", "emt_aggregate_snapshots", "balances", "snapshots"] {
        assert!(before[table] > 0, "t1 has rows in {table}: {before:?}");
    }

    // Counted: what would go, and nothing goes.
    let counted = store.partition_rows("t1", &read_models).await.unwrap();
    assert_eq!(rows_of(&db, "t1").await, before, "counting changes nothing");
    let erased = store.erase_partition("t1", &read_models).await.unwrap();
    assert_eq!(erased, counted, "it removes what it counted");
    let reported: BTreeMap<&str, u64> = erased.tables.iter().map(|(t, n)| (t.as_str(), *n)).collect();
    assert_eq!(reported["messages"] as i64, before["messages"]);
    assert_eq!(reported["balances"] as i64, before["balances"]);
    assert_eq!(reported["snapshots of balances"] as i64, before["snapshots"]);
    assert!(rows_of(&db, "t1").await.values().all(|n| *n == 0), "{:?}", rows_of(&db, "t1").await);
    if db.db.get_database_backend() == DbBackend::Postgres {
        let own = "SELECT count(*) FROM pg_class WHERE relname LIKE $1 AND relkind IN ('r', 'p')";
        assert_eq!(scalar(&db, own, "%\\_p\\_t1\\_%").await, 0, "t1's partitions dropped");
        assert_eq!(scalar(&db, own, "%\\_p\\_t10\\_%").await, 3, "t10's kept");
    }
    for (tenant, seen) in &others {
        assert_eq!(&contents(&db, &store, tenant).await, seen, "{tenant} untouched");
    }

    // Again: nothing left to remove.
    assert_eq!(store.erase_partition("t1", &read_models).await.unwrap().total(), 0);
    // The id starts from scratch: a new stream, projected alone.
    let options = AppendOptions::default().partition("t1").expected(ExpectedVersion::NoStream);
    let head = store.append_to_stream("acc-0", [Ev::Deposited { amount: 40 }], options).await.unwrap();
    assert_eq!((head.next_expected_stream_version, store.stream_exists("old", "t1").await.unwrap()), (1, false));
    let daemon = Daemon::new(store.clone()).projection("balances", balances::registry()).start().await.unwrap();
    let caught_up = daemon.caught_up(head.last_event_global_position);
    tokio::time::timeout(Duration::from_secs(30), caught_up).await.expect("caught up").unwrap();
    daemon.stop().await.unwrap();
    let t1: Vec<_> = balances::rows(&db.db).await.into_iter().filter(|r| r.0 == "t1").collect();
    assert_eq!(t1, [("t1".to_owned(), "acc-0".to_owned(), 40, 1)]);
    // Bad input: typed, nothing done.
    assert!(matches!(
        store.erase_partition("", &read_models).await,
        Err(emmett_seaorm::Error::InvalidIdentifier { .. })
    ));
}

/// A daemon projecting the tenant's backlog while it is erased: the batch in flight commits
/// first or finds nothing, and afterwards no row of the tenant comes back; the other tenant is
/// projected on.
async fn a_running_daemon_resurrects_nothing_of_an_erased_tenant(db: TestDb) {
    let store = db.store();
    balances::create_table(&db.db).await;
    for batch in 0..20 {
        let events = (0..100).map(|amount| Ev::Deposited { amount });
        store
            .append_to_stream(&format!("acc-{batch}"), events, AppendOptions::default().partition("t1"))
            .await
            .unwrap();
    }
    let daemon = Daemon::new(store.clone()).projection("balances", balances::registry()).start().await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let read_models = balances::registry().read_models().to_vec();
    let erased = store.erase_partition("t1", &read_models).await.unwrap();
    assert_eq!(erased.tables.iter().find(|(t, _)| t == "messages").map(|(_, n)| *n), Some(2_000));
    let mut head = 0;
    for i in 0..20 {
        let options = AppendOptions::default().partition("t2");
        head = store
            .append_to_stream("acc-0", [Ev::Deposited { amount: i }], options)
            .await
            .unwrap()
            .last_event_global_position;
    }
    tokio::time::timeout(Duration::from_secs(30), daemon.caught_up(head)).await.expect("caught up").unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let left = rows_of(&db, "t1").await;
    daemon.stop().await.unwrap();
    assert!(left.values().all(|n| *n == 0), "rows of the erased tenant: {left:?}");
    assert_eq!(rows_of(&db, "t1").await, left);
    let t2: Vec<_> = balances::rows(&db.db).await.into_iter().filter(|r| r.0 == "t2").collect();
    assert_eq!(t2, [("t2".to_owned(), "acc-0".to_owned(), (0..20).sum(), 20)]);
}

conformance!(with_pooler: erasing_a_tenant_removes_its_rows_and_only_its, a_running_daemon_resurrects_nothing_of_an_erased_tenant);
