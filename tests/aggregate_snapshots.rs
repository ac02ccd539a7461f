//! Conformance suite of aggregate snapshots, on every backend: a long stream's aggregate folds
//! only the tail after its stored snapshot, a stale or broken snapshot is never trusted, and
//! snapshots go with archived streams; the command handler stores them after commands.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::{Ev, TestDb};
use emmett_seaorm::{AppendOptions, CommandHandler, Error, EventStore, ReadOptions, SnapshotPolicy};
use sea_orm::{ConnectionTrait, DbBackend, Statement};

/// The account's balance, counting the events `evolve` was given.
fn balance(calls: &Arc<AtomicUsize>) -> impl Fn(i64, &Ev) -> i64 + Send + Sync + 'static {
    let calls = Arc::clone(calls);
    move |balance, e| {
        calls.fetch_add(1, Ordering::SeqCst);
        match e {
            Ev::Deposited { amount } => balance + amount,
            _ => balance,
        }
    }
}

async fn deposit_many(store: &EventStore, stream: &str, n: i64) {
    let events: Vec<Ev> = (1..=n).map(|amount| Ev::Deposited { amount }).collect();
    store.append_to_stream(stream, events, AppendOptions::default().partition("t1")).await.expect("append");
}

/// Runs raw SQL on the test database (`partition` quoted for MySQL).
async fn sql(db: &TestDb, sql: &str) -> Vec<sea_orm::QueryResult> {
    let backend = db.db.get_database_backend();
    let sql = if backend == DbBackend::MySql { sql.replace("partition", "`partition`") } else { sql.to_owned() };
    db.db.query_all_raw(Statement::from_string(backend, sql)).await.expect("sql")
}

/// The stored snapshot of `stream` in t1: (version, position).
async fn stored(db: &TestDb, stream: &str) -> Option<(i64, i64)> {
    let rows = sql(
        db,
        &format!(
            "SELECT snapshot_version, stream_position FROM emt_aggregate_snapshots WHERE partition = 't1' AND stream_id = '{stream}'"
        ),
    )
    .await;
    rows.first().map(|r| (r.try_get_by_index(0).unwrap(), r.try_get_by_index(1).unwrap()))
}

async fn a_snapshot_folds_only_the_tail(db: TestDb) {
    let store = db.store();
    deposit_many(&store, "acc", 250).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let options = || ReadOptions::default().partition("t1");
    let policy = SnapshotPolicy::every(100);
    let first = store.aggregate_stream_snapshotted("acc", balance(&calls), || 0, options(), policy).await.unwrap();
    assert_eq!((first.state, first.current_stream_version), ((1..=250).sum::<i64>(), 250));
    assert_eq!(stored(&db, "acc").await, Some((1, 250)));
    deposit_many(&store, "acc", 10).await;
    calls.store(0, Ordering::SeqCst);
    let next = store.aggregate_stream_snapshotted("acc", balance(&calls), || 0, options(), policy).await.unwrap();
    let plain = store.aggregate_stream("acc", balance(&Arc::default()), || 0, options()).await.unwrap();
    assert_eq!((next.state, next.current_stream_version), (plain.state, 260));
    assert_eq!(calls.load(Ordering::SeqCst), 10, "only the tail is folded");
    assert_eq!(stored(&db, "acc").await, Some((1, 250)), "10 events past it: no new snapshot yet");
    // A part of the stream folds without snapshots.
    let part = store.aggregate_stream_snapshotted("acc", balance(&calls), || 0, options().to(5), policy).await.unwrap();
    assert_eq!(part.state, 15);
    // A stream without events: the initial state, and nothing stored.
    let none = store.aggregate_stream_snapshotted("nothing", balance(&calls), || 7, options(), policy).await.unwrap();
    assert_eq!((none.state, none.stream_exists), (7, false));
    assert_eq!(stored(&db, "nothing").await, None);
}

async fn stale_or_broken_snapshots_are_never_trusted(db: TestDb) {
    let store = db.store();
    deposit_many(&store, "acc", 120).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let options = || ReadOptions::default().partition("t1");
    let total = (1..=120).sum::<i64>();
    store
        .aggregate_stream_snapshotted("acc", balance(&calls), || 0, options(), SnapshotPolicy::every(100))
        .await
        .unwrap();
    let fold_with = async |policy: SnapshotPolicy| {
        calls.store(0, Ordering::SeqCst);
        let done = store.aggregate_stream_snapshotted("acc", balance(&calls), || 0, options(), policy).await.unwrap();
        (done.state, calls.load(Ordering::SeqCst))
    };
    // Another version: ignored (all 120 folded) and replaced.
    assert_eq!(fold_with(SnapshotPolicy::every(100).version(2)).await, (total, 120));
    assert_eq!(stored(&db, "acc").await, Some((2, 120)));
    assert_eq!(fold_with(SnapshotPolicy::every(100).version(2)).await, (total, 0));
    // A state that no longer decodes, or a position past the stream: ignored and replaced.
    let update = "UPDATE emt_aggregate_snapshots SET state = '{\"not\": \"a number\"}' WHERE stream_id = 'acc'";
    sql(&db, update).await;
    assert_eq!(fold_with(SnapshotPolicy::every(100).version(2)).await, (total, 120));
    sql(&db, "UPDATE emt_aggregate_snapshots SET stream_position = 999, state = '5' WHERE stream_id = 'acc'").await;
    assert_eq!(fold_with(SnapshotPolicy::every(100).version(2)).await, (total, 120));
    assert_eq!(stored(&db, "acc").await, Some((2, 120)));
}

async fn archived_streams_take_their_snapshots_with_them(db: TestDb) {
    let store = db.store();
    deposit_many(&store, "acc", 3).await;
    let options = || ReadOptions::default().partition("t1");
    let policy = SnapshotPolicy::every(1);
    store.aggregate_stream_snapshotted("acc", balance(&Arc::default()), || 0, options(), policy).await.unwrap();
    assert_eq!(stored(&db, "acc").await, Some((1, 3)));
    assert!(store.archive_stream("acc", "t1").await.unwrap());
    assert_eq!(stored(&db, "acc").await, None);
    // A new stream of the same id starts from scratch.
    store
        .append_to_stream("acc", [Ev::Deposited { amount: 1 }], AppendOptions::default().partition("t1"))
        .await
        .unwrap();
    let again =
        store.aggregate_stream_snapshotted("acc", balance(&Arc::default()), || 0, options(), policy).await.unwrap();
    assert_eq!((again.state, again.current_stream_version), (1, 1));
}

async fn the_command_handler_stores_snapshots_after_commands(db: TestDb) {
    let store = db.store();
    let calls = Arc::new(AtomicUsize::new(0));
    let handler = CommandHandler::new(balance(&calls), || 0i64).snapshots(SnapshotPolicy::every(5));
    let options = || AppendOptions::default().partition("t1");
    for amount in 1..=12 {
        let decide = |_: &i64| Ok::<_, Error>([Ev::Deposited { amount }]);
        handler.handle(&store, "acc", options(), decide).await.expect("command");
    }
    // Stored after the commands that reached 5 and 10 events past the last.
    assert_eq!(stored(&db, "acc").await, Some((1, 10)));
    calls.store(0, Ordering::SeqCst);
    let handled = handler
        .handle(&store, "acc", options(), |_: &i64| Ok::<_, Error>([Ev::Deposited { amount: 13 }]))
        .await
        .unwrap();
    assert_eq!(handled.state, (1..=13).sum::<i64>());
    assert_eq!(calls.load(Ordering::SeqCst), 2 + 1, "the tail (11, 12) and the new event");
    let plain = store.aggregate_stream("acc", balance(&Arc::default()), || 0, ReadOptions::default().partition("t1"));
    assert_eq!(plain.await.unwrap().state, handled.state);
}

conformance!(
    a_snapshot_folds_only_the_tail,
    stale_or_broken_snapshots_are_never_trusted,
    archived_streams_take_their_snapshots_with_them,
    the_command_handler_stores_snapshots_after_commands,
);
