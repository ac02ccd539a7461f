//! The projection daemon on PostgreSQL: what idling costs (transaction ids), what it waits for
//! (late commits: yes; unrelated transactions: no), and a lost presence connection.
//!
//! A test binary of its own: it reads cluster-wide transaction counters, which the other
//! suites (run in parallel within their binaries, one binary at a time) would move.
#![cfg(feature = "postgres")]

mod common;

use std::time::{Duration, Instant};

use common::{Ev, TestDb};
use emmett_seaorm::daemon::{Daemon, DaemonHandle};
use emmett_seaorm::projection::{ProjectionRegistry, SnapshotProjection};
use emmett_seaorm::{AppendOptions, EventStore, columns, keys};
use sea_orm::{ConnectionTrait, DatabaseConnection, TransactionTrait};

fn balances() -> ProjectionRegistry<Ev> {
    let balances = SnapshotProjection::new(
        "balances",
        |e, tenant| keys! { "tenant_id" => tenant, "account_id" => &e.stream_id },
        |total: i64, e: &Ev| match e {
            Ev::Deposited { amount } => total + amount,
            _ => total,
        },
        || 0,
    )
    .columns(|total: &i64| columns! { "total" => *total });
    ProjectionRegistry::new().with(balances)
}

async fn setup(db: &TestDb) -> DaemonHandle {
    db.db
        .execute_unprepared(
            "CREATE TABLE balances (tenant_id text, account_id text, total bigint, PRIMARY KEY (tenant_id, account_id))",
        )
        .await
        .expect("read model");
    Daemon::new(db.store()).projection("balances", balances()).start().await.expect("start")
}

async fn deposit(store: &EventStore, tenant: &str, amount: i64) -> u64 {
    store
        .append_to_stream("acc", [Ev::Deposited { amount }], AppendOptions::default().partition(tenant))
        .await
        .expect("append")
        .last_event_global_position
}

/// The sum of a tenant's balances.
async fn total(db: &DatabaseConnection, tenant: &str) -> Option<i64> {
    let sql = format!("SELECT sum(total)::bigint FROM balances WHERE tenant_id = '{tenant}'");
    db.query_one_raw(sea_orm::Statement::from_string(sea_orm::DbBackend::Postgres, sql))
        .await
        .expect("read balance")
        .and_then(|row| row.try_get_by_index(0).unwrap())
}

/// Transactions (statements outside explicit transactions) the test database has run.
async fn statements(db: &DatabaseConnection) -> i64 {
    // The statistics are flushed at most once a second.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    scalar(db, "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = current_database()").await
}

/// The next transaction id of the cluster.
async fn next_xid(db: &DatabaseConnection) -> i64 {
    scalar(db, "SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint").await
}

/// The one bigint `sql` returns.
async fn scalar(db: &DatabaseConnection, sql: &str) -> i64 {
    let row = db
        .query_one_raw(sea_orm::Statement::from_string(sea_orm::DbBackend::Postgres, sql))
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .expect("a row");
    row.try_get_by_index(0).unwrap()
}

async fn an_idle_daemon_burns_no_transaction_ids(db: TestDb) {
    let daemon = setup(&db).await;
    let last = deposit(&db.store(), "t1", 5).await;
    tokio::time::timeout(Duration::from_secs(10), daemon.caught_up(last)).await.expect("caught up").unwrap();
    // Its poll interval backs off to 1 s; and each backend's statistics of the setup reach
    // `pg_stat_database` within 10 s of going idle (PostgreSQL's PGSTAT_IDLE_INTERVAL), not to
    // be counted in the window.
    tokio::time::sleep(Duration::from_secs(11)).await;
    // Transaction ids are the cluster's: autovacuum analysing what earlier tests wrote in other
    // databases takes some. A daemon that wrote (a renewal every 2 s) would take
    // them in every 15 s window; one clean window of three is the proof.
    let mut windows = Vec::new();
    let per_second = loop {
        let (before, statements_before) = (next_xid(&db.db).await, statements(&db.db).await);
        tokio::time::sleep(Duration::from_secs(15)).await;
        let (after, statements_after) = (next_xid(&db.db).await, statements(&db.db).await);
        windows.push(after - before);
        if after == before {
            break (statements_after - statements_before - 2) as f64 / 15.0;
        }
        assert!(windows.len() < 3, "transaction ids taken while idle, in every window: {windows:?}");
    };
    // About one query a second: the coordination round, which reads the head with the leases
    // (and a renewal of the presence deadline every 2 s, no write).
    println!("idle: {per_second:.2} statements/s");
    assert!(per_second <= 1.5, "{per_second:.2} statements/s while idle");
    // Still awake: an append from another pool is projected.
    let last = deposit(&EventStore::new(db.second_pool().await), "t1", 7).await;
    tokio::time::timeout(Duration::from_secs(3), daemon.caught_up(last)).await.expect("caught up").unwrap();
    assert_eq!(total(&db.db, "t1").await, Some(12));
    daemon.stop().await.unwrap();
}

async fn late_commits_are_waited_for_and_unrelated_transactions_are_not(db: TestDb) {
    let daemon = setup(&db).await;
    let store = db.store();
    // A transaction that holds a transaction id in another database, and one in this database
    // that writes another table: neither holds projection back.
    let (server, _) = db.url.rsplit_once('/').unwrap();
    let other_db = sea_orm::Database::connect(format!("{server}/postgres")).await.expect("postgres db");
    let unrelated = other_db.begin().await.unwrap();
    unrelated.execute_unprepared("SELECT pg_current_xact_id()").await.unwrap();
    db.db.execute_unprepared("CREATE TABLE other (x int)").await.unwrap();
    let writer_elsewhere = db.db.begin().await.unwrap();
    writer_elsewhere.execute_unprepared("INSERT INTO other VALUES (1)").await.unwrap();
    let started = Instant::now();
    let last = deposit(&store, "t1", 1).await;
    tokio::time::timeout(Duration::from_secs(5), daemon.caught_up(last)).await.expect("caught up").unwrap();
    assert!(started.elapsed() < Duration::from_secs(1), "held back {:?} by unrelated transactions", started.elapsed());

    // An event writer that took its position and has not committed: the daemon must not move
    // past it, and projects it once it commits.
    let (tx_commit, writer) = common::held_deposit(&store, "t1", "late", 100).await;
    let after = deposit(&store, "t1", 10).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(total(&db.db, "t1").await, Some(1), "projected past a transaction still writing");
    tx_commit.send(()).unwrap();
    writer.await.unwrap();
    tokio::time::timeout(Duration::from_secs(15), daemon.caught_up(after)).await.expect("caught up").unwrap();
    assert_eq!(total(&db.db, "t1").await, Some(111));
    unrelated.rollback().await.unwrap();
    writer_elsewhere.rollback().await.unwrap();
    daemon.stop().await.unwrap();
}

async fn appends_of_other_processes_wake_the_daemon(db: TestDb) {
    db.db
        .execute_unprepared(
            "CREATE TABLE balances (tenant_id text, account_id text, total bigint, PRIMARY KEY (tenant_id, account_id))",
        )
        .await
        .expect("read model");
    // Polling every 10 s at most: only a notification can wake it in time.
    let daemon = Daemon::new(db.store())
        .projection("balances", balances())
        .poll_interval(Duration::from_millis(5), Duration::from_secs(10))
        .start()
        .await
        .expect("start");
    let other = EventStore::new(db.second_pool().await);
    for round in 0..3 {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let started = Instant::now();
        let last = deposit(&other, &format!("t{round}"), 1).await;
        tokio::time::timeout(Duration::from_secs(5), daemon.caught_up(last)).await.expect("caught up").unwrap();
        assert!(started.elapsed() < Duration::from_millis(500), "round {round}: woken after {:?}", started.elapsed());
    }
    daemon.stop().await.unwrap();
}

async fn a_killed_presence_connection_loses_no_event(db: TestDb) {
    let daemon = setup(&db).await;
    let other = EventStore::new(db.second_pool().await);
    let mut last = 0;
    for round in 0..3 {
        // The connection comes up in the daemon's task (and again after each kill).
        let kill = format!(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name LIKE 'emt-daemon:{}:%'",
            daemon.owner()
        );
        let deadline = Instant::now() + Duration::from_secs(5);
        while db.db.execute_unprepared(&kill).await.unwrap().rows_affected() != 1 {
            assert!(Instant::now() < deadline, "round {round}: no presence connection within 5 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for _ in 0..5 {
            last = deposit(&other, "t1", 1).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    tokio::time::timeout(Duration::from_secs(5), daemon.caught_up(last)).await.expect("caught up").unwrap();
    assert_eq!(total(&db.db, "t1").await, Some(15));
    daemon.stop().await.unwrap();
}

/// A pool whose every statement runs a generic plan (what PostgreSQL settles on for a prepared
/// statement after five runs, if it looks no worse): the plans that see no parameter values.
async fn generic_plans(url: &str) -> DatabaseConnection {
    let mut options = emmett_seaorm::connect_options(url);
    options.map_sqlx_postgres_opts(|o| o.options([("plan_cache_mode", "force_generic_plan")]));
    sea_orm::Database::connect(emmett_seaorm::configure(options)).await.expect("connect")
}

/// Index entries of `messages_default`'s global-position index read so far, once the
/// statistics of every closed connection have arrived (they are flushed at exit).
async fn global_index_reads(db: &DatabaseConnection) -> i64 {
    let sql =
        "SELECT idx_tup_read FROM pg_stat_user_indexes WHERE indexrelname = 'messages_default_global_position_idx'";
    let mut seen = scalar(db, sql).await;
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        match scalar(db, sql).await {
            now if now == seen => return now,
            now => seen = now,
        }
    }
}

/// Tenants added after the statistics saw a few big ones: the daemon's reads and `status` of
/// the new tenants walk their own `(partition, global_position)` ranges, even in generic plans,
/// instead of the global-position index through every older tenant's events (a group read took
/// 1.1 s and `status` 1.9 s beside 220,000 older events).
async fn new_tenants_beside_big_ones_read_only_their_own_events(db: TestDb) {
    const BIG: usize = 60_000;
    let store = db.store();
    for batch in 0..BIG / 1_000 {
        let events = (0..1_000).map(|_| Ev::Deposited { amount: 1 });
        let tenant = format!("big-{}", batch % 4);
        store
            .append_to_stream(&format!("s{batch}"), events, AppendOptions::default().partition(&tenant))
            .await
            .unwrap();
    }
    let daemon = setup(&db).await;
    let head = deposit(&store, "big-0", 1).await;
    tokio::time::timeout(Duration::from_secs(60), daemon.caught_up(head)).await.expect("caught up").unwrap();
    daemon.stop().await.unwrap();
    // The statistics a later autovacuum would take: four tenants.
    db.db.execute_unprepared("ANALYZE messages_default").await.unwrap();
    let mut head = 0;
    for tenant in 0..100 {
        for _ in 0..3 {
            head = deposit(&store, &format!("new-{tenant}"), 1).await;
        }
    }
    let before = global_index_reads(&db.db).await;
    let pool = generic_plans(&db.url).await;
    let daemon = Daemon::new(EventStore::new(pool.clone())).projection("balances", balances()).start().await.unwrap();
    tokio::time::timeout(Duration::from_secs(30), daemon.caught_up(head)).await.expect("caught up").unwrap();
    let status = daemon.status().await.unwrap();
    assert_eq!(status.leases.len(), 104, "one entry per tenant");
    daemon.stop().await.unwrap();
    pool.close().await.unwrap();
    let read = global_index_reads(&db.db).await - before;
    println!("global-position index entries read for 300 new events beside {BIG}: {read}");
    assert!(read < 10 * 300, "{read} entries of the global-position index read for 300 new events");
    assert_eq!(total(&db.db, "new-99").await, Some(3));
}

/// One test at a time: the idle test counts the cluster's transaction ids.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

mod postgres {
    use super::SERIAL;

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn an_idle_daemon_burns_no_transaction_ids() {
        let _one = SERIAL.lock().await;
        crate::common::run(crate::common::postgres().await, super::an_idle_daemon_burns_no_transaction_ids).await;
    }
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn late_commits_are_waited_for_and_unrelated_transactions_are_not() {
        let _one = SERIAL.lock().await;
        crate::common::run(
            crate::common::postgres().await,
            super::late_commits_are_waited_for_and_unrelated_transactions_are_not,
        )
        .await;
    }
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn appends_of_other_processes_wake_the_daemon() {
        let _one = SERIAL.lock().await;
        crate::common::run(crate::common::postgres().await, super::appends_of_other_processes_wake_the_daemon).await;
    }
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn new_tenants_beside_big_ones_read_only_their_own_events() {
        let _one = SERIAL.lock().await;
        crate::common::run(
            crate::common::postgres().await,
            super::new_tenants_beside_big_ones_read_only_their_own_events,
        )
        .await;
    }
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_killed_presence_connection_loses_no_event() {
        let _one = SERIAL.lock().await;
        crate::common::run(crate::common::postgres().await, super::a_killed_presence_connection_loses_no_event).await;
    }
}
