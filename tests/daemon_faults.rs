//! One tenant's mistake never stops the others, on every backend: a panicking `evolve` and an
//! erroring handler, each in one tenant of 20, on one instance and across two.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{Ev, Picky, TestDb};
use emmett_seaorm::daemon::{Daemon, DaemonHandle};
use emmett_seaorm::projection::{ProjectionRegistry, SnapshotProjection};
use emmett_seaorm::{AppendOptions, Error, EventStore, RecordedEvent, columns, keys};
use sea_orm::ConnectionTrait;

/// The tenant whose `evolve` panics (on a deposit of 666) and the one whose handler fails (13).
const PANICS: &str = "t03";
const FAILS: &str = "t07";

/// Balances per account, folded by an `evolve` that panics on a deposit of 666, beside a handler
/// that fails on a deposit of 13.
fn registry() -> ProjectionRegistry<Ev> {
    let totals = SnapshotProjection::new(
        "totals",
        |e: &RecordedEvent<Ev>, tenant: &str| keys! { "tenant_id" => tenant, "account_id" => &e.stream_id },
        |total: i64, e: &Ev| match e {
            Ev::Deposited { amount: 666 } => panic!("evolve exploded on 666"),
            Ev::Deposited { amount } => total + amount,
            _ => total,
        },
        || 0,
    )
    .columns(|total: &i64| columns! { "total" => *total });
    ProjectionRegistry::new().with(totals).on(["Deposited"], Picky::failing())
}

fn daemon(store: EventStore) -> Daemon {
    Daemon::new(store)
        .projection("totals", registry())
        .lease_ttl(Duration::from_secs(3))
        .renew_every(Duration::from_millis(500))
        .poll_interval(Duration::from_millis(5), Duration::from_millis(300))
        .backoff(Duration::from_millis(100), Duration::from_millis(400))
        .retries(2)
}

async fn deposit(store: &EventStore, tenant: &str, amount: i64) -> u64 {
    let options = AppendOptions::default().partition(tenant);
    store.append_to_stream("acc", [Ev::Deposited { amount }], options).await.expect("append").last_event_global_position
}

async fn run(db: TestDb, instances: usize) {
    let create = "CREATE TABLE totals (tenant_id VARCHAR(100) NOT NULL, account_id VARCHAR(100) NOT NULL, \
                  total BIGINT, PRIMARY KEY (tenant_id, account_id))";
    db.db.execute_unprepared(create).await.unwrap();
    let store = db.store();
    let tenants: Vec<String> = (0..20).map(|i| format!("t{i:02}")).collect();
    for t in &tenants {
        deposit(&store, t, 1).await;
    }
    let panic_at = deposit(&store, PANICS, 666).await;
    let fail_at = deposit(&store, FAILS, 13).await;
    let mut daemons: Vec<DaemonHandle> = Vec::new();
    for _ in 0..instances {
        daemons.push(daemon(EventStore::new(db.second_pool().await)).start().await.expect("start"));
    }
    // Load on the 18 good tenants while the bad ones fail.
    let writing = Arc::new(AtomicBool::new(true));
    let writer = {
        let (store, writing, tenants) = (store.clone(), Arc::clone(&writing), tenants.clone());
        tokio::spawn(async move {
            let good: Vec<&String> = tenants.iter().filter(|t| *t != PANICS && *t != FAILS).collect();
            let mut i = 0;
            while writing.load(Ordering::SeqCst) {
                deposit(&store, good[i % good.len()], 2).await;
                i += 1;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(1500)).await;
    writing.store(false, Ordering::SeqCst);
    writer.await.unwrap();
    // Every good tenant reaches its last event; the bad ones are parked with the event's
    // position and what went wrong.
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        let status = daemons[0].status().await.expect("status");
        let good_done =
            status.leases.iter().filter(|l| l.tenant != PANICS && l.tenant != FAILS).all(|l| l.lag_events == 0);
        let parked = [PANICS, FAILS].iter().all(|t| status.get("totals", t).is_some_and(|l| l.parked));
        if status.leases.len() == 20 && good_done && parked {
            break status;
        }
        assert!(Instant::now() < deadline, "good tenants not caught up or bad ones not parked: {status:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let panicked = status.get("totals", PANICS).unwrap();
    let (error, position) = panicked.last_error.clone().expect("the panic is recorded");
    assert!(error.contains("panicked: evolve exploded on 666"), "{error}");
    assert_eq!(position, panic_at, "the panic names its event's global position");
    let failed = status.get("totals", FAILS).unwrap();
    let (error, position) = failed.last_error.clone().expect("the error is recorded");
    assert!(error.contains("13 is unlucky") && position == fail_at, "{error} at {position}");
    // Every instance still runs; waiting on a parked tenant says so instead of hanging.
    assert!(daemons.iter().all(DaemonHandle::is_running));
    let last = deposit(&store, "t00", 3).await;
    let waited = tokio::time::timeout(Duration::from_secs(10), daemons[0].caught_up(last)).await.expect("no hang");
    assert!(
        matches!(&waited, Err(Error::ProjectionParked { subscription, partition, .. })
            if subscription == "totals" && (partition == PANICS || partition == FAILS)),
        "{waited:?}"
    );
    // The good tenants' rows are the fold of their events.
    let deadline = Instant::now() + Duration::from_secs(10);
    while daemons[0].status().await.unwrap().get("totals", "t00").is_none_or(|l| l.checkpoint < last) {
        assert!(Instant::now() < deadline, "t00 not caught up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let sql = "SELECT tenant_id, total FROM totals ORDER BY tenant_id";
    let rows = db.db.query_all_raw(sea_orm::Statement::from_string(db.db.get_database_backend(), sql)).await.unwrap();
    let rows: Vec<(String, i64)> =
        rows.iter().map(|r| (r.try_get_by_index(0).unwrap(), r.try_get_by_index(1).unwrap())).collect();
    let mut expected = Vec::new();
    for t in tenants.iter().filter(|t| *t != PANICS && *t != FAILS) {
        let read = store.read_stream::<Ev>("acc", emmett_seaorm::ReadOptions::default().partition(t.as_str()));
        let events = read.await.unwrap().events;
        let total = events.iter().map(|e| if let Ev::Deposited { amount } = e.event { amount } else { 0 }).sum();
        expected.push((t.clone(), total));
    }
    let good: Vec<(String, i64)> = rows.into_iter().filter(|(t, _)| t != PANICS && t != FAILS).collect();
    assert_eq!(good, expected);
    for d in daemons {
        d.stop().await.expect("stop");
    }
}

async fn a_panic_or_an_error_stops_only_its_tenant(db: TestDb) {
    run(db, 1).await;
}

async fn across_two_instances_too(db: TestDb) {
    run(db, 2).await;
}

/// A read model whose key column can't tell `Acme` from `acme` — MySQL's default collations,
/// PostgreSQL's nondeterministic (case-insensitive ICU) collations, SQLite's `COLLATE NOCASE` —
/// is refused before anything is written, saying how to fix it; with an exact column the
/// three tenants get a row each.
async fn a_key_column_that_mixes_tenants_is_refused(db: TestDb) {
    let backend = db.db.get_database_backend();
    let (inexact, named) = match backend {
        sea_orm::DbBackend::MySql => ("VARCHAR(100) COLLATE utf8mb4_general_ci", "utf8mb4_general_ci"),
        sea_orm::DbBackend::Postgres => {
            let ci = "CREATE COLLATION ci (provider = icu, locale = 'und-u-ks-level2', deterministic = false)";
            db.db.execute_unprepared(ci).await.unwrap();
            ("VARCHAR(100) COLLATE ci", "ci")
        }
        _ => ("VARCHAR(100) COLLATE NOCASE", "NOCASE"),
    };
    let create = |tenant_column: &str| {
        format!(
            "CREATE TABLE totals (tenant_id {tenant_column} NOT NULL, account_id VARCHAR(100) NOT NULL, \
             total BIGINT, PRIMARY KEY (tenant_id, account_id))"
        )
    };
    db.db.execute_unprepared(&create(inexact)).await.unwrap();
    let store = db.store();
    for tenant in ["Acme", "acme", "acme "] {
        deposit(&store, tenant, 1).await;
    }
    let runner = emmett_seaorm::projection::ProjectionRunner::new(store.clone(), registry_without_failures());
    let options = emmett_seaorm::projection::RunOptions::default().partition("Acme");
    let refused = runner.project_partition("totals", options.clone()).await;
    assert!(
        matches!(&refused, Err(Error::InvalidReadModel { reason, .. }) if reason.contains("tenant_id") && reason.contains(named)),
        "{refused:?}"
    );
    assert!(totals(&db.db).await.is_empty(), "nothing written");
    let exact = match emmett_seaorm::migrations::exact_collation(&db.db).await.unwrap() {
        Some(collation) => format!("VARCHAR(100) CHARACTER SET utf8mb4 COLLATE {collation}"),
        None => "VARCHAR(100)".to_owned(),
    };
    db.db.execute_unprepared("DROP TABLE totals").await.unwrap();
    db.db.execute_unprepared(&create(&exact)).await.unwrap();
    let runner = emmett_seaorm::projection::ProjectionRunner::new(store.clone(), registry_without_failures());
    for tenant in ["Acme", "acme", "acme "] {
        let options = emmett_seaorm::projection::RunOptions::default().partition(tenant);
        runner.project_partition("totals", options).await.expect("project");
    }
    // (Not `totals`: its statement, prepared on a pooled connection before the table was made
    // again, would fail on PostgreSQL with "cached plan must not change result type".)
    let count = "SELECT count(*) FROM totals";
    let count = db.db.query_one_raw(sea_orm::Statement::from_string(backend, count)).await.unwrap().unwrap();
    assert_eq!(count.try_get_by_index::<i64>(0).unwrap(), 3, "one row per distinct tenant");
}

/// The rows of `totals`: (tenant, total), ordered.
async fn totals(db: &sea_orm::DatabaseConnection) -> Vec<(String, i64)> {
    let sql = "SELECT tenant_id, total FROM totals ORDER BY tenant_id";
    let rows = db.query_all_raw(sea_orm::Statement::from_string(db.get_database_backend(), sql)).await.unwrap();
    rows.iter().map(|r| (r.try_get_by_index(0).unwrap(), r.try_get_by_index(1).unwrap())).collect()
}

/// A rebuild with code that fails for one tenant rebuilds every other tenant and leaves that
/// one with its previous rows and checkpoint, recorded where `status` shows it; a tenant whose
/// rows were deleted is restored by rebuilding that tenant alone.
async fn a_failed_rebuild_keeps_the_failing_tenants_read_model(db: TestDb) {
    let create = "CREATE TABLE totals (tenant_id VARCHAR(100) NOT NULL, account_id VARCHAR(100) NOT NULL, \
                  total BIGINT, PRIMARY KEY (tenant_id, account_id))";
    db.db.execute_unprepared(create).await.unwrap();
    let store = db.store();
    let tenants = ["r0", "r1", "r2", "r3", "r4"];
    for (i, t) in tenants.iter().enumerate() {
        for amount in [5, 7, if i == 2 { 13 } else { 1 }] {
            deposit(&store, t, amount).await;
        }
    }
    // Version 1 counts the deposits; version 2 sums them but fails on r2's deposit of 13.
    let v1 = emmett_seaorm::projection::ProjectionRunner::new(store.clone(), registry_without_failures());
    for t in tenants {
        v1.project_partition("totals", emmett_seaorm::projection::RunOptions::default().partition(t)).await.unwrap();
    }
    let counted: Vec<(String, i64)> = tenants.iter().map(|t| (t.to_string(), 3)).collect();
    assert_eq!(totals(&db.db).await, counted);
    let heads = emmett_seaorm::daemon::recorded(&db.db).await.unwrap();
    assert!(heads.is_empty(), "no daemon ran: {heads:?}");
    let v2 = emmett_seaorm::projection::ProjectionRunner::new(store.clone(), registry());
    let mut reports = 0;
    let failed =
        v2.rebuild("totals", emmett_seaorm::projection::RunOptions::default().batch_size(2), |_| reports += 1).await;
    match &failed {
        Err(Error::RebuildIncomplete { subscription, failed }) => {
            assert_eq!(subscription, "totals");
            assert_eq!(failed.len(), 1, "{failed:?}");
            assert_eq!(failed[0].0, "r2");
            assert!(failed[0].1.to_string().contains("13 is unlucky"), "{}", failed[0].1);
        }
        other => panic!("{other:?}"),
    }
    assert!(reports > 0);
    let summed: Vec<(String, i64)> = tenants.iter().map(|t| (t.to_string(), if *t == "r2" { 3 } else { 13 })).collect();
    assert_eq!(totals(&db.db).await, summed, "r2 keeps version 1's row, the others have version 2's");
    // r2's checkpoint did not move back: nothing is replayed by a daemon over the old rows.
    let options = emmett_seaorm::projection::RunOptions::default().partition("r2");
    assert_eq!(v1.project_partition("totals", options).await.unwrap().processed, 0);
    // Rows deleted by hand come back by rebuilding that tenant alone (others untouched).
    db.db.execute_unprepared("DELETE FROM totals WHERE tenant_id = 'r0'").await.unwrap();
    let options = emmett_seaorm::projection::RunOptions::default().partition("r0");
    v2.rebuild("totals", options, |_| {}).await.expect("rebuild r0");
    assert_eq!(totals(&db.db).await, summed);
}

/// An event type the enum no longer knows (renamed or removed) in a stream of the projection's
/// own aggregate fails the run loudly, naming the event, as `aggregate_stream` does; another
/// aggregate's events (streams with no type the enum knows) are passed over; a rebuild keeps
/// the tenant's previous rows and says why.
async fn an_event_type_the_code_no_longer_knows_is_not_folded_away(db: TestDb) {
    let create = "CREATE TABLE totals (tenant_id VARCHAR(100) NOT NULL, account_id VARCHAR(100) NOT NULL, \
                  total BIGINT, PRIMARY KEY (tenant_id, account_id))";
    db.db.execute_unprepared(create).await.unwrap();
    let store = db.store();
    let json = |t: &str| serde_json::json!({ "type": t, "data": {} });
    for tenant in ["renamed", "other"] {
        deposit(&store, tenant, 5).await;
        let options = AppendOptions::default().partition(tenant);
        store.append_to_stream("customer-1", [json("CustomerRegistered")], options.clone()).await.unwrap();
    }
    let runner = emmett_seaorm::projection::ProjectionRunner::new(store.clone(), registry_without_failures());
    let run = |tenant: &'static str| {
        let runner = runner.clone();
        async move {
            runner.project_partition("totals", emmett_seaorm::projection::RunOptions::default().partition(tenant)).await
        }
    };
    run("renamed").await.expect("before the rename");
    // `acc` gets an event the enum no longer has a variant for.
    let voided = store
        .append_to_stream("acc", [json("AccountVoided")], AppendOptions::default().partition("renamed"))
        .await
        .unwrap()
        .last_event_global_position;
    let failed = run("renamed").await;
    assert!(
        matches!(&failed, Err(Error::UndecodableEvent { stream, message_type, global_position, .. })
            if stream == "acc" && message_type == "AccountVoided" && *global_position == voided),
        "{failed:?}"
    );
    assert_eq!(run("other").await.expect("another aggregate's events pass").processed, 2);
    let rebuilt = runner.rebuild("totals", emmett_seaorm::projection::RunOptions::default(), |_| {}).await;
    assert!(
        matches!(&rebuilt, Err(Error::RebuildIncomplete { failed, .. })
            if failed.len() == 1 && failed[0].0 == "renamed" && failed[0].1.to_string().contains("AccountVoided")),
        "{rebuilt:?}"
    );
    assert_eq!(totals(&db.db).await, [("other".to_owned(), 1), ("renamed".to_owned(), 1)]);
}

/// A daemon finds every tenant, past the 1,000 rounds at which MySQL stops a recursive query
/// (it found 1,001 of 1,100), and `status` shows each.
async fn every_tenant_is_found_past_a_thousand(db: TestDb) {
    let store = db.store();
    for t in 0..1_100 {
        deposit(&store, &format!("t{t:05}"), 1).await;
    }
    let daemon = Daemon::new(store.clone()).projection("counts", ProjectionRegistry::<Ev>::new()).start().await;
    let daemon = daemon.expect("start");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status = daemon.status().await.expect("status");
        if status.leases.len() == 1_100 && status.leases.iter().all(|l| l.lag_events == 0) {
            break;
        }
        assert!(Instant::now() < deadline, "{} of 1,100 tenants found", status.leases.len());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    daemon.stop().await.expect("stop");
}

/// The totals projection alone.
fn registry_without_failures() -> ProjectionRegistry<Ev> {
    let totals = SnapshotProjection::new(
        "totals",
        |e: &RecordedEvent<Ev>, tenant: &str| keys! { "tenant_id" => tenant, "account_id" => &e.stream_id },
        |total: i64, _: &Ev| total + 1,
        || 0,
    )
    .columns(|total: &i64| columns! { "total" => *total });
    ProjectionRegistry::new().with(totals)
}

conformance!(with_pooler:
    a_panic_or_an_error_stops_only_its_tenant,
    across_two_instances_too,
    a_key_column_that_mixes_tenants_is_refused,
    a_failed_rebuild_keeps_the_failing_tenants_read_model,
    an_event_type_the_code_no_longer_knows_is_not_folded_away,
    every_tenant_is_found_past_a_thousand
);
