//! Conformance suite of what sceptical users try: ids that differ only in case or trailing
//! space, numbers at the edges, poison events, hostile identifiers, lost races and lost
//! connections, appends that take their global position early and commit late. Every backend.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::raw::{insert_raw, raw_message};
use common::{Ev, TestDb};
use emmett_seaorm::projection::{
    ProjectionRegistry, ProjectionRunner, RunOptions, SnapshotProjection, construct_stream_id,
};
use emmett_seaorm::schema::{messages, skipped_events, snapshots, subscriptions};
use emmett_seaorm::{AppendOptions, Error, EventStore, ExpectedVersion, ReadOptions, RecordedEvent, columns, keys};
use sea_orm::sea_query::{Alias, ColumnDef, Expr, ExprTrait, Index, Query, Table};
use sea_orm::{
    ConnectionTrait, DatabaseConnection, DbBackend, EntityTrait, PaginatorTrait, QueryFilter, Statement,
    TransactionTrait,
};
use serde_json::json;

fn on(partition: &str) -> AppendOptions {
    AppendOptions::default().partition(partition)
}

fn amount(e: &Ev) -> i64 {
    match e {
        Ev::Deposited { amount } => *amount,
        _ => 0,
    }
}

/// `(count, total)` of deposits: the state of the per-key totals below.
fn tally(state: (i64, i64), e: &Ev) -> (i64, i64) {
    match e {
        Ev::Deposited { amount } => (state.0 + 1, state.1 + amount),
        _ => state,
    }
}

/// A read model `table` keyed by `key` (text) with `count` and `total`.
async fn create_totals(db: &DatabaseConnection, table: &str, key: &str) {
    let mut key_column = ColumnDef::new(Alias::new(key));
    key_column.string().not_null();
    if db.get_database_backend() == DbBackend::MySql {
        // The read model's keys are the user's columns: exact comparison needs a binary collation
        // without trailing-space padding (MySQL 8: utf8mb4_0900_bin; MariaDB: utf8mb4_nopad_bin).
        let collation = db
            .query_one_raw(Statement::from_string(
                DbBackend::MySql,
                "SELECT COLLATION_NAME FROM information_schema.COLLATIONS
                 WHERE COLLATION_NAME IN ('utf8mb4_0900_bin', 'utf8mb4_nopad_bin') LIMIT 1",
            ))
            .await
            .unwrap()
            .unwrap()
            .try_get_by_index::<String>(0)
            .unwrap();
        key_column.extra(format!("COLLATE {collation}"));
    }
    db.execute(
        Table::create()
            .table(Alias::new(table))
            .col(key_column)
            .col(ColumnDef::new(Alias::new("count")).big_integer())
            .col(ColumnDef::new(Alias::new("total")).big_integer())
            .primary_key(Index::create().col(Alias::new(key))),
    )
    .await
    .unwrap();
}

fn totals(
    table: &str,
    keys: fn(&RecordedEvent<Ev>, &str) -> emmett_seaorm::projection::Keys,
) -> SnapshotProjection<Ev, (i64, i64)> {
    SnapshotProjection::new(table, keys, tally, || (0, 0))
        .columns(|s: &(i64, i64)| columns! { "count" => s.0, "total" => s.1 })
}

async fn totals_of(db: &DatabaseConnection, table: &str, key: &str) -> BTreeMap<String, (i64, i64)> {
    let rows = db
        .query_all(
            Query::select()
                .columns([Alias::new(key), Alias::new("count"), Alias::new("total")])
                .from(Alias::new(table)),
        )
        .await
        .unwrap();
    rows.into_iter()
        .map(|r| (r.try_get("", key).unwrap(), (r.try_get("", "count").unwrap(), r.try_get("", "total").unwrap())))
        .collect()
}

/// The deposits `(count, total)` of every stream of `tenant`, by folding each stream.
async fn fold_per_stream(store: &EventStore, tenant: &str, streams: &[String]) -> BTreeMap<String, (i64, i64)> {
    let mut folded = BTreeMap::new();
    for stream in streams {
        let s =
            store.aggregate_stream(stream, tally, || (0, 0), ReadOptions::default().partition(tenant)).await.unwrap();
        if s.stream_exists {
            folded.insert(stream.clone(), s.state);
        }
    }
    folded
}

fn by_stream(e: &RecordedEvent<Ev>, _: &str) -> emmett_seaorm::projection::Keys {
    keys! { "stream" => &e.stream_id }
}

fn by_tenant(_: &RecordedEvent<Ev>, tenant: &str) -> emmett_seaorm::projection::Keys {
    keys! { "tenant" => tenant }
}

/// Item 1: ids differing in case, accents or trailing spaces are different streams, tenants,
/// snapshot rows and checkpoints on every backend.
async fn identifiers_compare_exactly(db: TestDb) {
    let store = db.store();
    for stream in ["acc-A", "acc-a", "acc-á", "acc-a "] {
        let res = store
            .append_to_stream(stream, [Ev::Deposited { amount: 1 }], on("t").expected(ExpectedVersion::NoStream))
            .await;
        assert_eq!(res.unwrap().next_expected_stream_version, 1, "{stream:?} is a stream of its own");
    }
    let tenants = ["Acme", "acme", "acme ", "ácme"];
    for (i, tenant) in tenants.iter().enumerate() {
        for _ in 0..=i {
            store.append_to_stream("s", [Ev::Deposited { amount: 10 }], on(tenant)).await.unwrap();
        }
    }
    for (i, tenant) in tenants.iter().enumerate() {
        let read = store.read_stream::<Ev>("s", ReadOptions::default().partition(*tenant)).await.unwrap();
        assert_eq!(read.events.len(), i + 1, "tenant {tenant:?} reads its own stream only");
        assert!(read.events.iter().all(|e| e.partition == *tenant));
    }

    create_totals(&db.db, "tenant_totals", "tenant").await;
    let runner =
        ProjectionRunner::new(store.clone(), ProjectionRegistry::new().with(totals("tenant_totals", by_tenant)));
    for tenant in tenants {
        runner.project_partition("totals", RunOptions::default().partition(tenant)).await.unwrap();
    }
    let expected: BTreeMap<String, (i64, i64)> =
        tenants.iter().enumerate().map(|(i, t)| (t.to_string(), (i as i64 + 1, 10 * (i as i64 + 1)))).collect();
    assert_eq!(totals_of(&db.db, "tenant_totals", "tenant").await, expected);
    for tenant in tenants {
        let checkpoints = subscriptions::Entity::find()
            .filter(Expr::col(subscriptions::Column::Partition).eq(tenant))
            .count(&db.db)
            .await
            .unwrap();
        assert_eq!(checkpoints, 1, "tenant {tenant:?} has its own checkpoint");
    }
    assert_eq!(snapshots::Entity::find().count(&db.db).await.unwrap(), tenants.len() as u64, "one snapshot per tenant");
}

/// Item 3: no `u64` wraps or panics on its way to SQL.
async fn numbers_at_the_edges_never_wrap_or_panic(db: TestDb) {
    let store = db.store();
    store.append_to_stream("n", [Ev::Deposited { amount: 1 }, Ev::Deposited { amount: 2 }], on("t")).await.unwrap();
    let read = |options: ReadOptions| store.read_stream::<Ev>("n", options.partition("t"));
    assert!(read(ReadOptions::default().from(u64::MAX)).await.unwrap().events.is_empty());
    assert!(read(ReadOptions::default().from(1u64 << 63)).await.unwrap().events.is_empty());
    assert_eq!(read(ReadOptions::default().max_count(u64::MAX)).await.unwrap().events.len(), 2);
    assert_eq!(read(ReadOptions::default().to(u64::MAX)).await.unwrap().events.len(), 2);
    let runner = ProjectionRunner::new(store.clone(), ProjectionRegistry::<Ev>::new());
    let huge = RunOptions::default().partition("t").batch_size(u64::MAX);
    assert_eq!(runner.project_events("n", "n", huge.clone()).await.unwrap().processed, 2);
    assert_eq!(runner.project_partition("n-partition", huge).await.unwrap().processed, 2);
    let folded =
        store.aggregate_stream("n", |n, e| n + amount(e), || 0, ReadOptions::default().partition("t").from(u64::MAX));
    assert_eq!(folded.await.unwrap().state, 0, "reading from past the end folds nothing");

    for expected in [u64::MAX, 1 << 63, i64::MAX as u64] {
        let res = store.append_to_stream("n", [Ev::Closed], on("t").expected(ExpectedVersion::Exact(expected))).await;
        match res {
            Err(Error::ExpectedVersionConflict { actual: 2, .. }) | Err(Error::OutOfRange { .. }) => {}
            other => panic!("Exact({expected}): {other:?}"),
        }
    }
    let res = store
        .append_to_stream("n", [Ev::Closed, Ev::Closed], on("t").expected(ExpectedVersion::Exact(i64::MAX as u64 - 1)))
        .await;
    assert!(matches!(res, Err(Error::OutOfRange { value, .. }) if value == i64::MAX as u64 - 1), "{res:?}");
    assert_eq!(read(ReadOptions::default()).await.unwrap().current_stream_version, 2, "nothing written");
}

/// Item 4: a read-model row fed by several streams is never silently skipped by per-stream runs.
async fn per_stream_runs_refuse_rows_fed_by_several_streams(db: TestDb) {
    let store = db.store();
    create_totals(&db.db, "per_tenant", "tenant").await;
    // Interleaved: a1 (g1), b1 (g2), a2 (g3), b2 (g4).
    for (stream, amount) in [("a", 1), ("b", 10), ("a", 100), ("b", 1000)] {
        store.append_to_stream(stream, [Ev::Deposited { amount }], on("t")).await.unwrap();
    }
    let runner = ProjectionRunner::new(store.clone(), ProjectionRegistry::new().with(totals("per_tenant", by_tenant)));
    let options = RunOptions::default().partition("t");
    runner.project_events("per-tenant:a", "a", options.clone()).await.unwrap();
    let res = runner.project_events("per-tenant:b", "b", options.clone()).await;
    match res {
        Err(Error::SharedRow { table, row, streams }) => {
            assert_eq!((table.as_str(), row.as_str()), ("per_tenant", "tenant:t"));
            assert_eq!(streams, ["a", "b"]);
        }
        other => panic!("expected SharedRow, got {other:?}"),
    }
    assert_eq!(totals_of(&db.db, "per_tenant", "tenant").await["t"], (2, 101), "nothing of b was half-applied");

    // The partition runner folds such rows in global order.
    create_totals(&db.db, "per_tenant_2", "tenant").await;
    let runner =
        ProjectionRunner::new(store.clone(), ProjectionRegistry::new().with(totals("per_tenant_2", by_tenant)));
    runner.project_partition("per-tenant-2", RunOptions::default().partition("t").batch_size(1)).await.unwrap();
    assert_eq!(totals_of(&db.db, "per_tenant_2", "tenant").await["t"], (4, 1111));

    // Rows fed by one stream each still re-run as no-ops under a second subscription.
    create_totals(&db.db, "per_stream", "stream").await;
    let runner = ProjectionRunner::new(store.clone(), ProjectionRegistry::new().with(totals("per_stream", by_stream)));
    for round in ["one", "two"] {
        for stream in ["b", "a"] {
            runner.project_events(&format!("{round}:{stream}"), stream, options.clone()).await.unwrap();
        }
    }
    let expected = BTreeMap::from([("a".to_owned(), (2, 101)), ("b".to_owned(), (2, 1010))]);
    assert_eq!(totals_of(&db.db, "per_stream", "stream").await, expected);
}

/// Item 5: a poison event is named, can be skipped and is recorded; malformed rows are named;
/// a NULL global position can't be stored.
async fn poison_events_are_named_skippable_and_recorded(db: TestDb) {
    let store = db.store();
    store.append_to_stream("p", [Ev::Deposited { amount: 1 }], on("t")).await.unwrap();
    insert_raw(&db.db, "t", "p", 2, "Deposited", json!({ "amount": "lots" }).into()).await;
    store.append_to_stream("p", [Ev::Deposited { amount: 2 }], on("t")).await.unwrap();
    let sqlite = db.db.get_database_backend() == DbBackend::Sqlite;
    if sqlite {
        // SQLite stores any text: a row another writer left with data that is not JSON.
        insert_raw(&db.db, "t", "p", 4, "Deposited", "{not json".into()).await;
        store.append_to_stream("p", [Ev::Deposited { amount: 4 }], on("t")).await.unwrap();
        let read = store.read_stream::<Ev>("p", ReadOptions::default().partition("t").from(4)).await;
        assert!(
            matches!(&read, Err(Error::MalformedEvent { stream, partition, position: 4, .. }) if stream == "p" && partition == "t"),
            "{read:?}"
        );
    }
    let read = store.read_stream::<Ev>("p", ReadOptions::default().partition("t")).await;
    assert!(matches!(read, Err(Error::UndecodableEvent { position: 2, .. })), "{read:?}");

    create_totals(&db.db, "p_totals", "stream").await;
    let runner = ProjectionRunner::new(store.clone(), ProjectionRegistry::new().with(totals("p_totals", by_stream)));
    for _ in 0..2 {
        let stuck = runner.project_partition("p", RunOptions::default().partition("t")).await;
        assert!(matches!(stuck, Err(Error::UndecodableEvent { position: 2, .. })), "{stuck:?}");
    }
    let done =
        runner.project_partition("p", RunOptions::default().partition("t").skip_undecodable_events()).await.unwrap();
    assert_eq!(done.processed, if sqlite { 5 } else { 3 });
    let expected = if sqlite { (3, 7) } else { (2, 3) };
    assert_eq!(totals_of(&db.db, "p_totals", "stream").await["p"], expected);
    let skipped = skipped_events::Entity::find().all(&db.db).await.unwrap();
    assert_eq!(skipped.len(), if sqlite { 2 } else { 1 });
    let first = &skipped[0];
    assert_eq!(
        (first.subscription_id.as_str(), first.partition.as_str(), first.stream_id.as_str(), first.stream_position),
        ("p", "t", "p", 2)
    );
    assert!(first.reason.contains("position 2") && first.global_position.is_some(), "{first:?}");

    // No row can be stored without a global position.
    let insert = raw_message("t", "q", 1, "Closed", json!({}).into(), Some(Expr::val(Option::<i64>::None)));
    // Refused (PostgreSQL, SQLite) or numbered by AUTO_INCREMENT (MySQL): never stored as NULL.
    let refused = db.db.execute(&insert).await.is_err();
    let nulls =
        messages::Entity::find().filter(Expr::col(messages::Column::GlobalPosition).is_null()).count(&db.db).await;
    assert!(refused || nulls.unwrap() == 0, "a NULL global position is never stored");
}

/// Item 6: identifiers the schema can't store are refused before the database, by name.
async fn bad_identifiers_are_refused_by_name(db: TestDb) {
    let store = db.store();
    let long = "x".repeat(256);
    for (stream, partition, what) in [
        ("a\0b", "t", "stream id"),
        ("s", "t\0", "partition"),
        (long.as_str(), "t", "stream id"),
        ("s", long.as_str(), "partition"),
        ("", "t", "stream id"),
    ] {
        let res = store.append_to_stream(stream, [Ev::Closed], on(partition)).await;
        assert!(matches!(&res, Err(Error::InvalidIdentifier { what: w, .. }) if *w == what), "{res:?}");
        let res = store.read_stream::<Ev>(stream, ReadOptions::default().partition(partition)).await;
        assert!(matches!(&res, Err(Error::InvalidIdentifier { what: w, .. }) if *w == what), "{res:?}");
    }
    let at_limit = "ü".repeat(255);
    store.append_to_stream(&at_limit, [Ev::Closed], on(&at_limit)).await.unwrap();
    let read = store.read_stream::<Ev>(&at_limit, ReadOptions::default().partition(&at_limit)).await.unwrap();
    assert_eq!(read.events[0].stream_id, at_limit);
    let runner = ProjectionRunner::new(store.clone(), ProjectionRegistry::new().with(totals("none", by_stream)));
    let res = runner.project_partition("sub\0", RunOptions::default().partition("t")).await;
    assert!(matches!(res, Err(Error::InvalidIdentifier { what: "subscription id", .. })), "{res:?}");
    assert_eq!(messages::Entity::find().count(&db.db).await.unwrap(), 1, "only the valid append wrote");
}

/// Item 8: a writer blocked behind a long transaction past the busy timeout gets `Busy`.
async fn blocked_writer_gets_a_typed_busy_error(db: TestDb) {
    let backend = db.db.get_database_backend();
    let store = db.store();
    store.append_to_stream("b", [Ev::Closed], on("t")).await.unwrap();
    let mut options = sea_orm::ConnectOptions::new(db.url.clone());
    options.sqlx_logging(false);
    #[cfg(feature = "sqlite")]
    options.map_sqlx_sqlite_opts(|o| o.busy_timeout(Duration::from_millis(300)));
    let impatient = EventStore::new(sea_orm::Database::connect(options).await.unwrap());
    let holder = db.db.begin().await.unwrap();
    match backend {
        // SQLite: any write transaction blocks every other writer.
        DbBackend::Sqlite => holder.execute_unprepared("UPDATE streams SET stream_type = stream_type").await.unwrap(),
        DbBackend::MySql => holder.execute_unprepared("SET innodb_lock_wait_timeout = 1").await.unwrap(),
        _ => holder.execute_unprepared("SET lock_timeout = '300ms'").await.unwrap(),
    };
    // On the servers, the writer is the one waiting: lock the stream row and let the writer time out.
    let waiter = match backend {
        DbBackend::Sqlite => impatient.clone(),
        _ => {
            let sql = match backend {
                DbBackend::MySql => "SET SESSION innodb_lock_wait_timeout = 1",
                _ => "SET lock_timeout = '300ms'",
            };
            let mut options = sea_orm::ConnectOptions::new(db.url.clone());
            options.sqlx_logging(false).max_connections(1);
            let conn = sea_orm::Database::connect(options).await.unwrap();
            conn.execute_unprepared(sql).await.unwrap();
            holder
                .execute_unprepared("UPDATE streams SET stream_type = stream_type WHERE stream_id = 'b'")
                .await
                .unwrap();
            EventStore::new(conn)
        }
    };
    let started = Instant::now();
    let res = waiter.append_to_stream("b", [Ev::Closed], on("t").expected(ExpectedVersion::Exact(1))).await;
    assert!(matches!(res, Err(Error::Busy { .. })), "{res:?}");
    assert!(res.unwrap_err().is_transient());
    assert!(started.elapsed() < Duration::from_secs(5), "timeouts are not retried: {:?}", started.elapsed());
    holder.rollback().await.unwrap();
    assert_eq!(store.read_stream::<Ev>("b", ReadOptions::default().partition("t")).await.unwrap().events.len(), 1);
}

/// Item 0: an append that took its global position and then waits (MySQL: on a gap lock held
/// by another transaction) must not be passed by a partition run that sees later positions.
async fn append_waiting_after_taking_its_position_is_not_passed(db: TestDb) {
    let backend = db.db.get_database_backend();
    let store = db.store();
    for stream in ["b", "d"] {
        store.append_to_stream(stream, [Ev::Deposited { amount: 1 }], on("t")).await.unwrap();
    }
    create_totals(&db.db, "gap_totals", "stream").await;
    let registry = || ProjectionRegistry::new().with(totals("gap_totals", by_stream));
    ProjectionRunner::new(store.clone(), registry())
        .project_partition("gap", RunOptions::default().partition("t"))
        .await
        .unwrap();

    let other = db.second_pool().await;
    let locker = other.begin().await.unwrap();
    if backend != DbBackend::Sqlite {
        // A gap lock past b's rows: an insert of b's next row waits on it (MySQL).
        locker
            .query_all(
                Query::select()
                    .column(messages::Column::StreamId)
                    .from(messages::Entity)
                    .and_where(Expr::col(messages::Column::StreamId).eq("b"))
                    .lock(sea_orm::sea_query::LockType::Update),
            )
            .await
            .unwrap();
    }
    let late = {
        let store = store.clone();
        tokio::spawn(async move { store.append_to_stream("b", [Ev::Deposited { amount: 100 }], on("t")).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    if backend != DbBackend::Sqlite {
        store.append_to_stream("d", [Ev::Deposited { amount: 10 }], on("t")).await.unwrap();
    }
    let run = {
        let runner = ProjectionRunner::new(store.clone(), registry());
        tokio::spawn(async move { runner.project_partition("gap", RunOptions::default().partition("t")).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    locker.rollback().await.unwrap();
    late.await.unwrap().unwrap();
    run.await.unwrap().unwrap();
    ProjectionRunner::new(store.clone(), registry())
        .project_partition("gap", RunOptions::default().partition("t"))
        .await
        .unwrap();
    let streams = ["b".to_owned(), "d".to_owned()];
    assert_eq!(totals_of(&db.db, "gap_totals", "stream").await, fold_per_stream(&store, "t", &streams).await);
}

/// Items 0 and 2: 4 writers and 8 runners (two pools) race for a while: no call fails, not even
/// with a raw deadlock, and the read model equals the fold.
async fn writers_and_runners_race_without_errors_or_losses(db: TestDb) {
    let store = db.store();
    let other = EventStore::new(db.second_pool().await);
    create_totals(&db.db, "race_totals", "stream").await;
    let streams: Vec<String> = (0..6).map(|i| format!("s{i}")).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..4 {
        let (store, streams, stop) =
            (if w % 2 == 0 { store.clone() } else { other.clone() }, streams.clone(), stop.clone());
        writers.push(tokio::spawn(async move {
            let mut i = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let events: Vec<Ev> =
                    (0..1 + i % 3).map(|k| Ev::Deposited { amount: (w * 1000 + i + k) as i64 }).collect();
                store.append_to_stream(&streams[(w + i) % streams.len()], events, on("t")).await?;
                i += 1;
            }
            Ok::<_, Error>(())
        }));
    }
    let mut runners = Vec::new();
    for r in 0..8 {
        let runner = ProjectionRunner::new(
            if r % 2 == 0 { store.clone() } else { other.clone() },
            ProjectionRegistry::new().with(totals("race_totals", by_stream)),
        );
        let stop = stop.clone();
        runners.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                runner.project_partition("race", RunOptions::default().partition("t").batch_size(7)).await?;
            }
            Ok::<_, Error>(())
        }));
    }
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop.store(true, Ordering::Relaxed);
    for task in writers.into_iter().chain(runners) {
        task.await.unwrap().unwrap();
    }
    ProjectionRunner::new(store.clone(), ProjectionRegistry::new().with(totals("race_totals", by_stream)))
        .project_partition("race", RunOptions::default().partition("t"))
        .await
        .unwrap();
    assert_eq!(totals_of(&db.db, "race_totals", "stream").await, fold_per_stream(&store, "t", &streams).await);
}

/// Item 9: an append with an idempotency key is written once however often it is retried;
/// a key reused for other events is refused by name.
async fn idempotency_keys_make_appends_safe_to_retry(db: TestDb) {
    let store = db.store();
    let options = on("t").idempotency_key("req-1");
    let first = store.append_to_stream("i", [Ev::Deposited { amount: 5 }, Ev::Closed], options.clone()).await.unwrap();
    for expected in [ExpectedVersion::Any, ExpectedVersion::NoStream, ExpectedVersion::Exact(0)] {
        let again = store
            .append_to_stream("i", [Ev::Deposited { amount: 5 }, Ev::Closed], options.clone().expected(expected))
            .await;
        assert_eq!(again.unwrap(), first, "a retry with {expected} returns the stored result");
    }
    assert_eq!(store.read_stream::<Ev>("i", ReadOptions::default().partition("t")).await.unwrap().events.len(), 2);
    let reused = store.append_to_stream("j", [Ev::Deposited { amount: 5 }], options.clone()).await;
    assert!(
        matches!(&reused, Err(Error::DuplicateMessage { existing_stream, .. }) if existing_stream == "i"),
        "{reused:?}"
    );
    // The same key in another tenant is another append.
    store.append_to_stream("i", [Ev::Closed], on("u").idempotency_key("req-1")).await.unwrap();
    assert!(!store.stream_exists("j", "t").await.unwrap());
}

/// Item 9: connections killed while appends run: every call either succeeds or says the
/// connection was lost; retrying the lost ones with their key writes each append exactly once.
async fn killed_connections_never_duplicate_appends(db: TestDb) {
    let backend = db.db.get_database_backend();
    if backend == DbBackend::Sqlite {
        return; // an embedded database has no connection to lose
    }
    let store = db.store();
    create_totals(&db.db, "kill_totals", "stream").await; // before the killer: the test's own DDL isn't retried
    let stop = Arc::new(AtomicBool::new(false));
    let killer = {
        let admin = db.second_pool().await;
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut kills = 0;
            while !stop.load(Ordering::Relaxed) {
                kills += common::kill_connections(&admin, true).await;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            kills
        })
    };
    let mut writers = Vec::new();
    for w in 0..6 {
        let store = store.clone();
        writers.push(tokio::spawn(async move {
            let mut lost = Vec::new();
            for i in 0..60 {
                let key = format!("w{w}-{i}");
                let events = [Ev::Deposited { amount: 1 }, Ev::Deposited { amount: 2 }];
                match store.append_to_stream(&format!("k{}", i % 3), events, on("t").idempotency_key(&key)).await {
                    Ok(_) => {}
                    Err(Error::ConnectionLost { .. }) => lost.push((key, i)),
                    Err(other) => panic!("append {key}: {other:?}"),
                }
            }
            lost
        }));
    }
    let registry = || ProjectionRegistry::new().with(totals("kill_totals", by_stream));
    let runner = {
        let (runner, stop) = (ProjectionRunner::new(store.clone(), registry()), stop.clone());
        tokio::spawn(async move {
            let mut runs = 0;
            while !stop.load(Ordering::Relaxed) {
                // The run retries lost connections itself; one that keeps losing says so, typed.
                match runner.project_partition("kill", RunOptions::default().partition("t").batch_size(10)).await {
                    Ok(_) | Err(Error::ConnectionLost { .. }) => runs += 1,
                    Err(other) => panic!("run: {other:?}"),
                }
            }
            runs
        })
    };
    let mut lost = Vec::new();
    for writer in writers {
        lost.extend(writer.await.unwrap());
    }
    stop.store(true, Ordering::Relaxed);
    let kills = killer.await.unwrap();
    assert!(runner.await.unwrap() > 0);
    assert!(kills > 0, "the killer killed no connection");
    for (key, i) in &lost {
        let events = [Ev::Deposited { amount: 1 }, Ev::Deposited { amount: 2 }];
        store.append_to_stream(&format!("k{}", i % 3), events, on("t").idempotency_key(key)).await.unwrap();
    }
    let total: usize = {
        let mut n = 0;
        for k in 0..3 {
            n += store
                .read_stream::<Ev>(&format!("k{k}"), ReadOptions::default().partition("t"))
                .await
                .unwrap()
                .events
                .len();
        }
        n
    };
    eprintln!("{kills} connections killed; {} appends reported a lost connection and were retried", lost.len());
    assert_eq!(total, 6 * 60 * 2, "every append exactly once ({} reported lost and retried)", lost.len());
    ProjectionRunner::new(store.clone(), registry())
        .project_partition("kill", RunOptions::default().partition("t"))
        .await
        .unwrap();
    let streams: Vec<String> = (0..3).map(|k| format!("k{k}")).collect();
    assert_eq!(totals_of(&db.db, "kill_totals", "stream").await, fold_per_stream(&store, "t", &streams).await);
}

/// Item 7: snapshot ids order keys like JavaScript, so a TypeScript writer finds our snapshots.
#[test]
fn snapshot_ids_order_keys_by_utf16_code_units() {
    let keys = keys! { "b" => "1", "\u{FF21}" => "2", "\u{1F600}" => "3", "B" => "4" };
    assert_eq!(construct_stream_id(&keys), "B:4|b:1|%F0%9F%98%80:3|%EF%BC%A1:2");
}

conformance!(
    identifiers_compare_exactly,
    numbers_at_the_edges_never_wrap_or_panic,
    per_stream_runs_refuse_rows_fed_by_several_streams,
    poison_events_are_named_skippable_and_recorded,
    bad_identifiers_are_refused_by_name,
    blocked_writer_gets_a_typed_busy_error,
    append_waiting_after_taking_its_position_is_not_passed,
    writers_and_runners_race_without_errors_or_losses,
    idempotency_keys_make_appends_safe_to_retry,
    killed_connections_never_duplicate_appends,
);
