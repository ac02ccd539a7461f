//! Conformance suite of the event store, run on SQLite, PostgreSQL and MySQL.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;

use common::{Ev, TestDb};
use emmett_seaorm::{AppendOptions, Error, EventStore, ExpectedVersion, Migrator, ReadOptions};
use sea_orm::ConnectionTrait;
use sea_orm_migration::MigratorTrait;
use serde_json::json;
use tokio::sync::Barrier;

fn deposit(amount: i64) -> Ev {
    Ev::Deposited { amount }
}

fn exact(v: u64) -> AppendOptions {
    AppendOptions::default().expected(ExpectedVersion::Exact(v))
}

fn balance(total: i64, e: &Ev) -> i64 {
    match e {
        Ev::Deposited { amount } => total + amount,
        _ => total,
    }
}

fn assert_conflict<T: std::fmt::Debug>(
    res: emmett_seaorm::Result<T>,
    stream: &str,
    expected: ExpectedVersion,
    actual: u64,
) {
    match res {
        Err(Error::ExpectedVersionConflict { stream: s, partition, expected: e, actual: a }) => {
            assert_eq!((s.as_str(), e, a), (stream, expected, actual));
            assert!(!partition.is_empty());
        }
        other => panic!("expected a conflict on {stream} (expected {expected}, actual {actual}), got {other:?}"),
    }
}

async fn append_then_read_round_trips(db: TestDb) {
    let store = db.store();
    let res = store
        .append_to_stream(
            "acc-1",
            [Ev::Opened { owner: "ann".into() }, deposit(5), Ev::Closed],
            AppendOptions::default()
                .expected(ExpectedVersion::NoStream)
                .stream_type("account")
                .metadata(json!({ "by": "test" })),
        )
        .await
        .unwrap();
    assert_eq!(res.next_expected_stream_version, 3);
    assert!(res.created_new_stream);
    let read = store.read_stream::<Ev>("acc-1", ReadOptions::default()).await.unwrap();
    assert!(read.stream_exists);
    assert_eq!(read.current_stream_version, 3);
    let events: Vec<Ev> = read.events.iter().map(|r| r.event.clone()).collect();
    assert_eq!(events, [Ev::Opened { owner: "ann".into() }, deposit(5), Ev::Closed]);
    assert_eq!(read.events.iter().map(|r| r.stream_position).collect::<Vec<_>>(), [1, 2, 3]);
    assert_eq!(read.events[2].global_position, res.last_event_global_position);
    assert!(read.events.windows(2).all(|w| w[0].global_position < w[1].global_position));
    for r in &read.events {
        assert_eq!(r.stream_id, "acc-1");
        assert_eq!(r.partition, emmett_seaorm::DEFAULT_PARTITION);
        assert_eq!(r.metadata, json!({ "by": "test" }));
        assert_eq!(uuid::Uuid::parse_str(&r.message_id).unwrap().get_version_num(), 7);
        assert!((chrono::Utc::now() - r.created).num_seconds().abs() < 60, "created {:?}", r.created);
    }
    assert_eq!(read.events[1].message_type, "Deposited");

    let more = store.append_to_stream("acc-1", [deposit(1)], AppendOptions::default()).await.unwrap();
    assert_eq!(more.next_expected_stream_version, 4);
    assert!(!more.created_new_stream);
    assert!(more.last_event_global_position > res.last_event_global_position);

    // Untyped access works with serde_json::Value.
    let raw = store.read_stream::<serde_json::Value>("acc-1", ReadOptions::default().from(4)).await.unwrap();
    assert_eq!(raw.events[0].event, json!({ "type": "Deposited", "data": { "amount": 1 } }));
}

async fn every_expected_version_case(db: TestDb) {
    let store = db.store();
    let opts = |e| AppendOptions::default().expected(e);
    use ExpectedVersion::*;

    assert_conflict(store.append_to_stream("s", [deposit(1)], opts(StreamExists)).await, "s", StreamExists, 0);
    assert_conflict(store.append_to_stream("s", [deposit(1)], opts(Exact(2))).await, "s", Exact(2), 0);
    assert!(!store.stream_exists("s", emmett_seaorm::DEFAULT_PARTITION).await.unwrap());

    assert_eq!(
        store.append_to_stream("s", [deposit(1)], opts(Exact(0))).await.unwrap().next_expected_stream_version,
        1
    );
    assert_conflict(store.append_to_stream("s", [deposit(1)], opts(NoStream)).await, "s", NoStream, 1);
    assert_conflict(store.append_to_stream("s", [deposit(1)], opts(Exact(0))).await, "s", Exact(0), 1);
    assert_eq!(
        store.append_to_stream("s", [deposit(1)], opts(StreamExists)).await.unwrap().next_expected_stream_version,
        2
    );
    assert_eq!(
        store
            .append_to_stream("s", [deposit(1), deposit(1)], opts(Exact(2)))
            .await
            .unwrap()
            .next_expected_stream_version,
        4
    );
    assert_conflict(store.append_to_stream("s", [deposit(1)], opts(Exact(2))).await, "s", Exact(2), 4);
    assert_conflict(store.append_to_stream("s", [deposit(1)], opts(Exact(5))).await, "s", Exact(5), 4);
    assert_eq!(store.append_to_stream("s", [deposit(1)], opts(Any)).await.unwrap().next_expected_stream_version, 5);

    let created = store.append_to_stream("t", [deposit(1)], opts(Any)).await.unwrap();
    assert!(created.created_new_stream);
    assert_eq!(
        store.append_to_stream("u", [deposit(1)], opts(NoStream)).await.unwrap().next_expected_stream_version,
        1
    );

    // Failed appends wrote nothing.
    let read = store.read_stream::<Ev>("s", ReadOptions::default()).await.unwrap();
    assert_eq!(read.current_stream_version, 5);
    assert_eq!(read.events.len(), 5);
}

/// 16 tasks append to one stream, each with the exact version it read, until each has written
/// 5 events: every success is contiguous, every loser a typed conflict, nothing lost or doubled.
async fn racing_appenders_on_one_stream(db: TestDb) {
    const TASKS: u64 = 16;
    const EACH: u64 = 5;
    let store = db.store();
    let other_pool = EventStore::new(db.second_pool().await);
    store.append_to_stream("race", [Ev::Opened { owner: "x".into() }], AppendOptions::default()).await.unwrap();

    // Round 1: everyone at once with the same expected version — exactly one wins.
    let barrier = Arc::new(Barrier::new(TASKS as usize));
    let handles: Vec<_> = (0..TASKS)
        .map(|i| {
            let store = if i % 2 == 0 { store.clone() } else { other_pool.clone() };
            let barrier = barrier.clone();
            tokio::spawn(async move {
                barrier.wait().await;
                store.append_to_stream("race", [deposit(i as i64)], exact(1)).await
            })
        })
        .collect();
    let mut winners = 0;
    for h in handles {
        match h.await.unwrap() {
            Ok(r) => {
                winners += 1;
                assert_eq!(r.next_expected_stream_version, 2);
            }
            Err(e) => assert!(
                matches!(e, Error::ExpectedVersionConflict { expected: ExpectedVersion::Exact(1), actual: 2, .. }),
                "{e:?}"
            ),
        }
    }
    assert_eq!(winners, 1);

    // Round 2: retry loops until each task has written EACH events.
    let handles: Vec<_> = (0..TASKS)
        .map(|i| {
            let store = if i % 2 == 0 { store.clone() } else { other_pool.clone() };
            tokio::spawn(async move {
                let (mut versions, mut conflicts) = (Vec::new(), 0);
                while (versions.len() as u64) < EACH {
                    let v = store.read_stream::<Ev>("race", ReadOptions::default().from(u64::MAX)).await.unwrap();
                    match store.append_to_stream("race", [deposit(100)], exact(v.current_stream_version)).await {
                        Ok(r) => versions.push(r.next_expected_stream_version),
                        Err(Error::ExpectedVersionConflict { expected: ExpectedVersion::Exact(e), actual, .. }) => {
                            assert!(actual > e, "a conflict must report a newer version ({actual} vs {e})");
                            conflicts += 1;
                        }
                        Err(e) => panic!("unexpected error: {e:?}"),
                    }
                }
                (versions, conflicts)
            })
        })
        .collect();
    let mut all = BTreeSet::new();
    for h in handles {
        let (versions, _) = h.await.unwrap();
        for v in versions {
            assert!(all.insert(v), "version {v} was handed out twice");
        }
    }
    let last = 2 + TASKS * EACH;
    assert_eq!(all, (3..=last).collect::<BTreeSet<_>>());

    let read = store.read_stream::<Ev>("race", ReadOptions::default()).await.unwrap();
    assert_eq!(read.current_stream_version, last);
    assert_eq!(read.events.iter().map(|e| e.stream_position).collect::<Vec<_>>(), (1..=last).collect::<Vec<_>>());
    let globals: BTreeSet<u64> = read.events.iter().map(|e| e.global_position).collect();
    assert_eq!(globals.len() as u64, last, "global positions are unique");
    assert!(read.events.windows(2).all(|w| w[0].global_position < w[1].global_position));
}

/// 16 tasks try to create the same stream at once: one creates it, the rest get a conflict.
async fn racing_creators(db: TestDb) {
    let store = db.store();
    let barrier = Arc::new(Barrier::new(16));
    let handles: Vec<_> = (0..16)
        .map(|i| {
            let (store, barrier) = (store.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                let opts = AppendOptions::default().expected(ExpectedVersion::NoStream);
                store.append_to_stream("new", [deposit(i), deposit(i)], opts).await
            })
        })
        .collect();
    let mut ok = 0;
    for h in handles {
        match h.await.unwrap() {
            Ok(_) => ok += 1,
            Err(e) => assert!(matches!(e, Error::ExpectedVersionConflict { actual: 2, .. }), "{e:?}"),
        }
    }
    assert_eq!(ok, 1);
    assert_eq!(store.read_stream::<Ev>("new", ReadOptions::default()).await.unwrap().events.len(), 2);
}

async fn partitions_isolate_tenants(db: TestDb) {
    let store = db.store();
    store.create_partition("tenant-a").await.unwrap(); // before its first event
    for (tenant, n) in [("tenant-a", 2), ("tenant-b", 3)] {
        let events: Vec<Ev> = (0..n).map(deposit).collect();
        let opts = AppendOptions::default().partition(tenant).expected(ExpectedVersion::NoStream);
        store.append_to_stream("cart-1", events, opts).await.unwrap();
    }
    for (tenant, n) in [("tenant-a", 2), ("tenant-b", 3)] {
        let read = store.read_stream::<Ev>("cart-1", ReadOptions::default().partition(tenant)).await.unwrap();
        assert_eq!(read.current_stream_version, n);
        assert!(read.events.iter().all(|e| e.partition == tenant));
        assert!(store.stream_exists("cart-1", tenant).await.unwrap());
    }
    assert!(!store.stream_exists("cart-1", emmett_seaorm::DEFAULT_PARTITION).await.unwrap());
    assert!(!store.read_stream::<Ev>("cart-1", ReadOptions::default()).await.unwrap().stream_exists);
    let wrong_tenant = AppendOptions::default().partition("tenant-a").expected(ExpectedVersion::Exact(3));
    assert_conflict(
        store.append_to_stream("cart-1", [deposit(1)], wrong_tenant).await,
        "cart-1",
        ExpectedVersion::Exact(3),
        2,
    );

    // After its first events (rows move out of DEFAULT), twice (idempotent), and for a hostile name.
    let hostile = "o'neil\"; DROP TABLE streams; --";
    store.append_to_stream("cart-9", [deposit(9)], AppendOptions::default().partition(hostile)).await.unwrap();
    for tenant in ["tenant-b", "tenant-b", hostile] {
        store.create_partition(tenant).await.unwrap();
    }
    for (tenant, n) in [("tenant-a", 2), ("tenant-b", 3)] {
        let read = store.read_stream::<Ev>("cart-1", ReadOptions::default().partition(tenant)).await.unwrap();
        assert_eq!(read.events.len(), n as usize);
    }
    let hostile_read = store.read_stream::<Ev>("cart-9", ReadOptions::default().partition(hostile)).await.unwrap();
    assert_eq!(hostile_read.events.len(), 1);
    if store.get_database_backend() == sea_orm::DbBackend::Postgres {
        use sea_orm::ConnectionTrait;
        let count = |sql: &'static str| {
            let db = db.db.clone();
            async move {
                db.query_one_raw(sea_orm::Statement::from_string(db.get_database_backend(), sql))
                    .await
                    .unwrap()
                    .unwrap()
                    .try_get_by_index::<i64>(0)
                    .unwrap()
            }
        };
        assert_eq!(count("SELECT count(*) FROM messages_default").await, 0, "tenant rows left the DEFAULT partition");
        assert_eq!(count("SELECT count(*) FROM streams_default").await, 0);
        assert_eq!(count("SELECT count(*) FROM pg_inherits WHERE inhparent = 'messages'::regclass").await, 4);
    }
}

async fn sessions_commit_or_roll_back_together(db: TestDb) {
    let store = db.store();
    // An error from the closure rolls back every append of the session.
    let res: Result<(), Error> = store
        .with_session(|s| async move {
            s.append_to_stream("a", [deposit(1)], AppendOptions::default()).await?;
            s.append_to_stream("b", [deposit(1)], AppendOptions::default()).await?;
            s.append_to_stream("a", [deposit(1)], exact(7)).await?; // conflict
            Ok(())
        })
        .await;
    assert!(matches!(res, Err(Error::ExpectedVersionConflict { actual: 1, .. })), "{res:?}");
    assert!(!store.stream_exists("a", emmett_seaorm::DEFAULT_PARTITION).await.unwrap());
    assert!(!store.stream_exists("b", emmett_seaorm::DEFAULT_PARTITION).await.unwrap());

    // Success commits all; a conflict handled inside the session leaves the rest intact.
    let versions = store
        .with_session(|s| async move {
            let a = s.append_to_stream("a", [deposit(1)], AppendOptions::default()).await?;
            assert!(s.append_to_stream("a", [deposit(9)], exact(5)).await.is_err());
            let b = s.append_to_stream("b", [deposit(2), deposit(3)], exact(0)).await?;
            Ok::<_, Error>((a.next_expected_stream_version, b.next_expected_stream_version))
        })
        .await
        .unwrap();
    assert_eq!(versions, (1, 2));
    let total = store.aggregate_stream("b", balance, || 0, ReadOptions::default()).await.unwrap();
    assert_eq!(total.state, 5);
    assert_eq!(store.read_stream::<Ev>("a", ReadOptions::default()).await.unwrap().events.len(), 1);

    // Keeping the session store alive past the closure is refused, and nothing commits.
    let leaked: Result<EventStore, Error> = store
        .with_session(|s| async move {
            s.append_to_stream("c", [deposit(1)], AppendOptions::default()).await?;
            Ok(s.clone())
        })
        .await;
    assert!(leaked.is_err());
    drop(leaked);
    assert!(!store.stream_exists("c", emmett_seaorm::DEFAULT_PARTITION).await.unwrap());
}

async fn archived_streams_are_invisible_and_recreatable(db: TestDb) {
    let store = db.store();
    let p = emmett_seaorm::DEFAULT_PARTITION;
    assert!(!store.archive_stream("gone", p).await.unwrap());
    store.append_to_stream("gone", [deposit(1), deposit(2)], AppendOptions::default()).await.unwrap();
    assert!(store.archive_stream("gone", p).await.unwrap());
    assert!(!store.stream_exists("gone", p).await.unwrap());
    let read = store.read_stream::<Ev>("gone", ReadOptions::default()).await.unwrap();
    assert!(!read.stream_exists && read.events.is_empty() && read.current_stream_version == 0);

    let again = store
        .append_to_stream("gone", [deposit(7)], AppendOptions::default().expected(ExpectedVersion::NoStream))
        .await
        .unwrap();
    assert_eq!(again.next_expected_stream_version, 1);
    let read = store.read_stream::<Ev>("gone", ReadOptions::default()).await.unwrap();
    assert_eq!(read.events.iter().map(|e| e.event.clone()).collect::<Vec<_>>(), [deposit(7)]);
    assert!(matches!(store.archive_stream("gone", p).await, Err(Error::AlreadyArchived { .. })));
    assert!(store.stream_exists("gone", p).await.unwrap());
}

async fn read_options_select_a_range(db: TestDb) {
    let store = db.store();
    store.append_to_stream("r", (1..=10).map(deposit), AppendOptions::default()).await.unwrap();
    let positions = |opts: ReadOptions| {
        let store = store.clone();
        async move {
            let read = store.read_stream::<Ev>("r", opts).await.unwrap();
            assert_eq!(read.current_stream_version, 10);
            read.events.iter().map(|e| e.stream_position).collect::<Vec<_>>()
        }
    };
    assert_eq!(positions(ReadOptions::default().from(3).to(5)).await, [3, 4, 5]);
    assert_eq!(positions(ReadOptions::default().from(8)).await, [8, 9, 10]);
    assert_eq!(positions(ReadOptions::default().to(2)).await, [1, 2]);
    assert_eq!(positions(ReadOptions::default().from(2).max_count(3)).await, [2, 3, 4]);
    assert_eq!(positions(ReadOptions::default().from(11)).await, Vec::<u64>::new());
    assert_eq!(positions(ReadOptions::default().max_count(0)).await, Vec::<u64>::new());
    // The aggregate folds exactly the events the same options read.
    for options in [
        ReadOptions::default().max_count(0),
        ReadOptions::default().from(2).max_count(3),
        ReadOptions::default().from(4).to(6),
        ReadOptions::default().max_count(1),
    ] {
        let read: Vec<u64> = positions(options.clone()).await;
        let folded = store
            .aggregate_stream(
                "r",
                |mut seen: Vec<u64>, e: &Ev| {
                    seen.push(match e {
                        Ev::Deposited { amount } => *amount as u64,
                        _ => 0,
                    });
                    seen
                },
                Vec::new,
                options,
            )
            .await
            .unwrap();
        assert_eq!(folded.state, read, "deposit n is at position n");
    }
    assert_eq!(positions(ReadOptions::default().to(50)).await.len(), 10);
    let missing = store.read_stream::<Ev>("nope", ReadOptions::default()).await.unwrap();
    assert!(!missing.stream_exists && missing.events.is_empty());
    assert_conflict(
        store.read_stream::<Ev>("r", ReadOptions::default().expected(ExpectedVersion::Exact(3))).await,
        "r",
        ExpectedVersion::Exact(3),
        10,
    );
}

async fn aggregate_folds_a_long_stream_in_pages(db: TestDb) {
    let store = db.store();
    let mut expected = 0;
    for chunk in 0..5 {
        let events: Vec<Ev> = (0..500).map(|i| deposit(chunk * 500 + i)).collect();
        expected += events.iter().fold(0, balance);
        store.append_to_stream("long", events, AppendOptions::default()).await.unwrap();
    }
    let folded = store.aggregate_stream("long", balance, || 0, ReadOptions::default()).await.unwrap();
    assert_eq!((folded.state, folded.current_stream_version, folded.stream_exists), (expected, 2500, true));

    let counted = store
        .aggregate_stream("long", |n: u64, _: &Ev| n + 1, || 0, ReadOptions::default().from(1001).to(2200))
        .await
        .unwrap();
    assert_eq!(counted.state, 1200);
    let checked = store
        .aggregate_stream("long", balance, || 0, ReadOptions::default().expected(ExpectedVersion::Exact(2499)))
        .await;
    assert_conflict(checked, "long", ExpectedVersion::Exact(2499), 2500);
    let missing = store.aggregate_stream("none", balance, || -1, ReadOptions::default()).await.unwrap();
    assert_eq!((missing.state, missing.stream_exists), (-1, false));
}

async fn bad_input_gets_typed_errors_and_writes_nothing(db: TestDb) {
    let store = db.store();
    let empty = store.append_to_stream("e", Vec::<Ev>::new(), AppendOptions::default().partition("t1")).await;
    assert!(
        matches!(&empty, Err(Error::EmptyAppend { stream, partition }) if stream == "e" && partition == "t1"),
        "{empty:?}"
    );
    let untagged = store.append_to_stream("e", [json!({ "kind": "x" })], AppendOptions::default()).await;
    assert!(matches!(untagged, Err(Error::InvalidEvent { .. })), "{untagged:?}");
    assert!(!store.stream_exists("e", "t1").await.unwrap());
    assert!(!store.stream_exists("e", emmett_seaorm::DEFAULT_PARTITION).await.unwrap());

    // A stored event that the caller's enum does not know is named precisely.
    let opts = AppendOptions::default().partition("t1");
    store.append_to_stream("m", [json!({ "type": "Deposited", "data": { "amount": 1 } })], opts.clone()).await.unwrap();
    store.append_to_stream("m", [json!({ "type": "Teleported", "data": {} })], opts.clone()).await.unwrap();
    store.append_to_stream("m", [json!({ "type": "Deposited", "data": { "amount": "lots" } })], opts).await.unwrap();
    let read = store.read_stream::<Ev>("m", ReadOptions::default().partition("t1")).await;
    match read {
        Err(Error::UndecodableEvent { stream, partition, position, message_type, .. }) => {
            assert_eq!(
                (stream.as_str(), partition.as_str(), position, message_type.as_str()),
                ("m", "t1", 2, "Teleported")
            );
        }
        other => panic!("{other:?}"),
    }
    let malformed = store.aggregate_stream("m", balance, || 0, ReadOptions::default().partition("t1").from(3)).await;
    assert!(matches!(malformed, Err(Error::UndecodableEvent { position: 3, .. })), "{malformed:?}");
}

async fn migrations_go_down_and_up_again(db: TestDb) {
    let store = db.store();
    store.append_to_stream("x", [deposit(1)], AppendOptions::default()).await.unwrap();
    Migrator::down(&db.db, None).await.unwrap();
    Migrator::up(&db.db, None).await.unwrap();
    assert!(!store.stream_exists("x", emmett_seaorm::DEFAULT_PARTITION).await.unwrap());
    let again = store.append_to_stream("x", [deposit(1)], AppendOptions::default()).await.unwrap();
    assert_eq!((again.next_expected_stream_version, again.last_event_global_position), (1, 1));
}

/// Appends over one connection, alternating existing and new streams, single events and several:
/// every result reports the version and last global position the store holds (MySQL hands both
/// back in a statement's answer, which must not carry over from the connection's last statement).
async fn reported_versions_and_positions_are_the_stored_ones(db: TestDb) {
    let mut options = emmett_seaorm::connect_options(&db.url);
    options.max_connections(1).sqlx_logging(false);
    let single = sea_orm::Database::connect(emmett_seaorm::configure(options)).await.unwrap();
    let store = EventStore::new(single.clone());
    let any = AppendOptions::default;
    let exists = || AppendOptions::default().expected(ExpectedVersion::StreamExists);
    let steps: [(&str, usize, AppendOptions, u64); 8] = [
        ("a", 2, any(), 2),
        ("a", 1, any(), 3),
        ("a", 1, exists(), 4),
        ("b", 1, any(), 1),
        ("a", 3, exists(), 7),
        ("c", 1, any(), 1),
        ("b", 1, exists(), 2),
        ("b", 2, any(), 4),
    ];
    for (stream, n, options, version) in steps {
        let events: Vec<Ev> = (0..n as i64).map(deposit).collect();
        let done = store.append_to_stream(stream, events, options).await.unwrap();
        assert_eq!(done.next_expected_stream_version, version, "{stream}");
        let read = store.read_stream::<Ev>(stream, ReadOptions::default()).await.unwrap();
        let last = read.events.last().unwrap();
        assert_eq!((last.stream_position, last.global_position), (version, done.last_event_global_position));
    }
    single.close().await.unwrap();
}

/// The columns of the primary key of `messages`, in order, and whether SQLite's index by stream
/// (added to a table keyed the old way) is there.
async fn messages_key(db: &sea_orm::DatabaseConnection) -> (Vec<String>, bool) {
    let backend = db.get_database_backend();
    let sql = match backend {
        sea_orm::DbBackend::Postgres => {
            "SELECT a.attname::text FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid
             AND a.attnum = ANY(i.indkey) WHERE i.indrelid = 'messages'::regclass AND i.indisprimary
             ORDER BY array_position(i.indkey::int2[], a.attnum)"
        }
        sea_orm::DbBackend::MySql => {
            "SELECT COLUMN_NAME FROM information_schema.STATISTICS WHERE TABLE_SCHEMA = DATABASE()
             AND TABLE_NAME = 'messages' AND INDEX_NAME = 'PRIMARY' ORDER BY SEQ_IN_INDEX"
        }
        _ => {
            "SELECT name FROM pragma_index_info((SELECT name FROM pragma_index_list('messages') WHERE origin = 'pk')) ORDER BY seqno"
        }
    };
    let rows = db.query_all_raw(sea_orm::Statement::from_string(backend, sql)).await.unwrap();
    let key = rows.iter().map(|row| row.try_get_by_index(0).unwrap()).collect();
    let index = "SELECT 1 FROM sqlite_master WHERE name = 'idx_messages_stream'";
    let indexed = backend == sea_orm::DbBackend::Sqlite
        && db.query_one_raw(sea_orm::Statement::from_string(backend, index)).await.unwrap().is_some();
    (key, indexed)
}

/// `messages` is keyed by stream, tenant, archive flag and position. A database keyed the
/// TypeScript package's way (position before tenant: reading one tenant's stream walked every
/// tenant's stream of that id) is rekeyed by the migration, its events kept; on MySQL, whose
/// handler counters are exact, reading a tenant's stream then reads its rows only.
async fn messages_are_keyed_by_stream_then_tenant(db: TestDb) {
    use sea_orm::{DbBackend, Statement};
    let backend = db.db.get_database_backend();
    let store = db.store();
    // (On PostgreSQL `t1` has partitions of its own, rekeyed with their parents.)
    store.create_partition("t1").await.unwrap();
    // 40 tenants with a stream `shared`; `t0` also has 100 events in another stream.
    for t in 0..40 {
        let events: Vec<Ev> = (1..=3).map(deposit).collect();
        store.append_to_stream("shared", events, AppendOptions::default().partition(format!("t{t}"))).await.unwrap();
    }
    let other: Vec<Ev> = (0..100).map(deposit).collect();
    store.append_to_stream("other", other, AppendOptions::default().partition("t0")).await.unwrap();
    let by_stream = ["stream_id", "partition", "is_archived", "stream_position"].map(String::from).to_vec();
    let by_position = ["stream_id", "stream_position", "partition", "is_archived"].map(String::from).to_vec();
    assert_eq!(messages_key(&db.db).await, (by_stream.clone(), false), "a new database");

    // Back to the old key: the migration undone on PostgreSQL and MySQL; on SQLite (whose key
    // can't change) the table is rebuilt by hand with it, indexes and triggers included.
    Migrator::down(&db.db, Some(1)).await.unwrap();
    if backend == DbBackend::Sqlite {
        use sea_orm::TransactionTrait;
        let txn = db.db.begin().await.unwrap();
        let objects = "SELECT sql FROM sqlite_master WHERE tbl_name = 'messages' AND sql IS NOT NULL
                       ORDER BY CASE type WHEN 'table' THEN 0 WHEN 'index' THEN 1 ELSE 2 END";
        let rows = txn.query_all_raw(Statement::from_string(backend, objects)).await.unwrap();
        let ddl: Vec<String> = rows.iter().map(|row| row.try_get_by_index(0).unwrap()).collect();
        txn.execute_unprepared("CREATE TEMP TABLE kept AS SELECT * FROM messages").await.unwrap();
        txn.execute_unprepared("DROP TABLE messages").await.unwrap();
        for sql in ddl {
            let (new, old) = ("partition, is_archived, stream_position)", "stream_position, partition, is_archived)");
            txn.execute_unprepared(&sql.replace(new, old)).await.unwrap();
        }
        txn.execute_unprepared("INSERT INTO messages SELECT * FROM kept").await.unwrap();
        txn.execute_unprepared("DROP TABLE kept").await.unwrap();
        txn.commit().await.unwrap();
    }
    assert_eq!(messages_key(&db.db).await, (by_position, false), "keyed the old way");
    let read_shared = async |db: &sea_orm::DatabaseConnection| {
        let store = EventStore::new(db.clone());
        let read = store.read_stream::<Ev>("shared", ReadOptions::default().partition("t0")).await.unwrap();
        assert_eq!(read.events.iter().map(|e| e.stream_position).collect::<Vec<_>>(), [1, 2, 3]);
    };
    // Rows MySQL reads for one read of `t0`'s `shared` (over one connection, so the session's
    // counters see the store's read); 0 elsewhere.
    let single = {
        let mut options = emmett_seaorm::connect_options(&db.url);
        options.max_connections(1).sqlx_logging(false);
        sea_orm::Database::connect(emmett_seaorm::configure(options)).await.unwrap()
    };
    let rows_read = async || {
        let counters = async || {
            let sql = "SELECT sum(VARIABLE_VALUE) FROM information_schema.SESSION_STATUS
                       WHERE VARIABLE_NAME IN ('HANDLER_READ_KEY', 'HANDLER_READ_NEXT', 'HANDLER_READ_PREV')";
            let row = single.query_one_raw(Statement::from_string(backend, sql)).await.unwrap().unwrap();
            row.try_get_by_index::<f64>(0).unwrap() as u64
        };
        // (Once first: the statement is prepared again after the table changed.)
        read_shared(&single).await;
        let before = if backend == DbBackend::MySql { counters().await } else { 0 };
        read_shared(&single).await;
        if backend == DbBackend::MySql { counters().await - before } else { 0 }
    };
    let old = rows_read().await;
    assert!(backend != DbBackend::MySql || old > 60, "the old key walks other tenants' rows: {old}");

    Migrator::up(&db.db, None).await.unwrap();
    let rekeyed = match backend {
        DbBackend::Sqlite => {
            (["stream_id", "stream_position", "partition", "is_archived"].map(String::from).to_vec(), true)
        }
        _ => (by_stream, false),
    };
    assert_eq!(messages_key(&db.db).await, rekeyed, "rekeyed by the migration");
    let new = rows_read().await;
    assert!(new < 20, "the stream's rows only: {new} (old key: {old})");
    for tenant in ["t0", "t1"] {
        let again = store.append_to_stream("shared", [deposit(4)], exact(3).partition(tenant)).await.unwrap();
        assert_eq!(again.next_expected_stream_version, 4);
        let conflict = store.append_to_stream("shared", [deposit(4)], exact(3).partition(tenant)).await;
        assert_conflict(conflict, "shared", ExpectedVersion::Exact(3), 4);
    }
    if backend == DbBackend::Postgres {
        // Every partition's key follows its parent's.
        let sql = "SELECT count(*) FROM pg_inherits i JOIN pg_index x ON x.indrelid = i.inhrelid AND x.indisprimary
                   WHERE i.inhparent = 'messages'::regclass AND x.indkey::text = (SELECT indkey::text FROM pg_index
                   WHERE indrelid = 'messages'::regclass AND indisprimary)";
        let row = db.db.query_one_raw(Statement::from_string(backend, sql)).await.unwrap().unwrap();
        assert_eq!(row.try_get_by_index::<i64>(0).unwrap(), 2, "messages_default and t1's partition");
    }
    let read = store.read_stream::<Ev>("other", ReadOptions::default().partition("t0")).await.unwrap();
    assert_eq!(read.events.len(), 100);
    single.close().await.unwrap();
}

/// An app's own migration: a read-model table.
struct CreateCarts;

impl sea_orm_migration::MigrationName for CreateCarts {
    fn name(&self) -> &str {
        "m20260101_000001_create_carts"
    }
}

#[async_trait::async_trait]
impl sea_orm_migration::MigrationTrait for CreateCarts {
    async fn up(&self, manager: &sea_orm_migration::SchemaManager) -> Result<(), sea_orm::DbErr> {
        use sea_orm_migration::prelude::*;
        manager
            .create_table(
                Table::create()
                    .table(Alias::new("carts"))
                    .if_not_exists()
                    .col(ColumnDef::new(Alias::new("cart_id")).string().not_null().primary_key())
                    .to_owned(),
            )
            .await
    }
}

/// The app's migrator, with or without the store's migrations in it.
struct AppMigrator<const WITH_STORE: bool>;

impl<const WITH_STORE: bool> MigratorTrait for AppMigrator<WITH_STORE> {
    fn migrations() -> Vec<Box<dyn sea_orm_migration::MigrationTrait>> {
        let mut migrations = if WITH_STORE { Migrator::migrations() } else { Vec::new() };
        migrations.push(Box::new(CreateCarts));
        migrations
    }
}

/// `migrate(&db)` and an app's own migrator coexist in any order, with or without the store's
/// migrations inside the app's; `fresh` starts global positions over.
async fn migrate_coexists_with_the_apps_migrator(db: TestDb) {
    // The test database was set up with `migrate(&db)`; the app adds its migrator later.
    AppMigrator::<false>::up(&db.db, None).await.unwrap();
    emmett_seaorm::migrate(&db.db).await.unwrap();
    AppMigrator::<true>::up(&db.db, None).await.unwrap();
    emmett_seaorm::migrate(&db.db).await.unwrap();
    assert_eq!(AppMigrator::<true>::get_pending_migrations(&db.db).await.unwrap().len(), 0);

    let store = db.store();
    store.append_to_stream("x", [deposit(1), deposit(2)], AppendOptions::default()).await.unwrap();
    AppMigrator::<true>::fresh(&db.db).await.unwrap();
    let first = store.append_to_stream("x", [deposit(1)], AppendOptions::default()).await.unwrap();
    assert_eq!(first.last_event_global_position, 1, "fresh starts global positions over");
}

/// Appends of any size are one append: 10,000 events (SQLite and MySQL insert them in several
/// statements, below their bound-parameter limits), contiguous, read back whole.
async fn appends_of_any_size(db: TestDb) {
    let store = db.store();
    let events: Vec<Ev> = (1..=10_000).map(deposit).collect();
    let done = store.append_to_stream("big", events, exact(0)).await.unwrap();
    assert_eq!(done.next_expected_stream_version, 10_000);
    let read = store.read_stream::<Ev>("big", ReadOptions::default()).await.unwrap();
    let positions: Vec<u64> = read.events.iter().map(|e| e.stream_position).collect();
    assert_eq!(positions, (1..=10_000).collect::<Vec<_>>());
    assert_eq!(read.events.last().unwrap().global_position, done.last_event_global_position);
    let globals: BTreeSet<u64> = read.events.iter().map(|e| e.global_position).collect();
    assert_eq!(globals.len(), 10_000);
    assert_eq!(store.aggregate_stream("big", balance, || 0, ReadOptions::default()).await.unwrap().state, 50_005_000);
}

/// On SQLite, a transaction holding the write lock, so that appends started meanwhile queue up
/// and commit as a group once it ends (see `release`); `None` on the servers.
async fn hold_sqlite_writes(db: &TestDb) -> Option<sea_orm::DatabaseTransaction> {
    if db.db.get_database_backend() != sea_orm::DbBackend::Sqlite {
        return None;
    }
    let holder = sea_orm::TransactionTrait::begin(&db.db).await.unwrap();
    holder.execute_unprepared("UPDATE streams SET stream_type = stream_type").await.unwrap();
    Some(holder)
}

/// Lets the appends started since `hold_sqlite_writes` queue for 300 ms, then releases the lock.
async fn release(holder: Option<sea_orm::DatabaseTransaction>) {
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    if let Some(holder) = holder {
        holder.rollback().await.unwrap();
    }
}

/// The streams of each call of an inline batch handler; fails on a deposit of 13.
#[derive(Clone, Default)]
struct Calls(Arc<std::sync::Mutex<Vec<BTreeSet<String>>>>);

#[async_trait::async_trait]
impl emmett_seaorm::projection::BatchHandler<Ev> for Calls {
    async fn handle_batch(
        &self,
        _: &emmett_seaorm::projection::ProjectionContext<'_>,
        events: &[&emmett_seaorm::RecordedEvent<Ev>],
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        self.0.lock().unwrap().push(events.iter().map(|e| e.stream_id.clone()).collect());
        match events.iter().any(|e| e.event == Ev::Deposited { amount: 13 }) {
            true => Err("unlucky deposit".into()),
            false => Ok(()),
        }
    }
}

/// Concurrent appends through one store each get their own outcome — success, version
/// conflict, failing inline projection — also when they share a commit: on SQLite they queue
/// while another transaction holds the write lock, then commit as a group (the inline handler
/// sees several appends' streams in one call). A failing member fails alone.
async fn concurrent_appends_each_get_their_own_outcome(db: TestDb) {
    let calls = Calls::default();
    let registry = emmett_seaorm::projection::ProjectionRegistry::new().on_batch([], calls.clone());
    let store = db.store().inline("calls", registry);
    store.append_to_stream("taken", [Ev::Closed], exact(0)).await.unwrap();
    for round in ["ok", "failing"] {
        let holder = hold_sqlite_writes(&db).await;
        let tasks: Vec<_> = (0..24)
            .map(|i| {
                let store = store.clone();
                let (stream, amount) = match i % 4 {
                    0 => ("taken".to_owned(), i),
                    1 if round == "failing" => (format!("{round}-{i}"), 13),
                    _ => (format!("{round}-{i}"), i),
                };
                tokio::spawn(async move {
                    let res = store.append_to_stream(&stream, [deposit(amount)], exact(0)).await;
                    (stream, amount, res)
                })
            })
            .collect();
        release(holder).await;
        for task in tasks {
            let (stream, amount, res) = task.await.unwrap();
            let stored = store.read_stream::<Ev>(&stream, ReadOptions::default()).await.unwrap();
            match (stream.as_str(), amount) {
                ("taken", _) => {
                    assert_conflict(res, "taken", ExpectedVersion::Exact(0), 1);
                    assert_eq!(stored.events.len(), 1);
                }
                (_, 13) => {
                    assert!(
                        matches!(&res, Err(Error::InlineProjection { projection, .. }) if projection == "calls"),
                        "{res:?}"
                    );
                    assert_eq!(stored.current_stream_version, 0, "{stream} was rolled back");
                }
                _ => {
                    assert_eq!(res.unwrap().next_expected_stream_version, 1, "{stream}");
                    assert_eq!(stored.events.iter().map(|e| e.event.clone()).collect::<Vec<_>>(), [deposit(amount)]);
                }
            }
        }
    }
    if db.db.get_database_backend() == sea_orm::DbBackend::Sqlite {
        let grouped = calls.0.lock().unwrap().iter().map(BTreeSet::len).max();
        assert!(grouped > Some(1), "no inline call saw several appends: they were not grouped");
    }
}

/// An inline handler that panics on a deposit of 66.
struct Panicky;

#[async_trait::async_trait]
impl emmett_seaorm::projection::EventHandler<Ev> for Panicky {
    async fn handle(
        &self,
        _: &emmett_seaorm::projection::ProjectionContext<'_>,
        e: &emmett_seaorm::RecordedEvent<Ev>,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        assert_ne!(e.event, Ev::Deposited { amount: 66 }, "a handler bug");
        Ok(())
    }
}

/// A panicking inline projection fails its append with a typed error naming the event and the
/// panic, and writes nothing; concurrent appends (on SQLite: of the same group) succeed, and
/// the store keeps working.
async fn a_panicking_inline_projection_fails_its_append_alone(db: TestDb) {
    let registry = emmett_seaorm::projection::ProjectionRegistry::new().on([], Panicky);
    let store = db.store().inline("panicky", registry);
    let holder = hold_sqlite_writes(&db).await;
    let tasks: Vec<_> = (0..12)
        .map(|i| {
            let store = store.clone();
            let amount = if i == 5 { 66 } else { i };
            tokio::spawn(async move { store.append_to_stream(&format!("p-{i}"), [deposit(amount)], exact(0)).await })
        })
        .collect();
    release(holder).await;
    for (i, task) in tasks.into_iter().enumerate() {
        let answered = tokio::time::timeout(std::time::Duration::from_secs(10), task).await;
        match answered.expect("every append is answered") {
            Ok(Err(emmett_seaorm::Error::InlineProjection { projection, source })) if i == 5 => {
                assert_eq!(projection, "panicky");
                let message = source.to_string();
                assert!(message.contains("panicked: ") && message.contains("a handler bug"), "{message}");
                assert!(matches!(*source, emmett_seaorm::Error::Handler { ref stream, .. } if stream == "p-5"));
            }
            Ok(res) if i != 5 => assert_eq!(res.unwrap().next_expected_stream_version, 1),
            other => panic!("append {i}: {other:?}"),
        }
        let stored = store.read_stream::<Ev>(&format!("p-{i}"), ReadOptions::default()).await.unwrap();
        assert_eq!(stored.current_stream_version, if i == 5 { 0 } else { 1 }, "p-{i}");
    }
    let after = store.append_to_stream("p-after", [deposit(1)], exact(0));
    tokio::time::timeout(std::time::Duration::from_secs(10), after).await.expect("the store still appends").unwrap();
}

/// Many tenants' first appends at once (tenants signing up together), each in a session (where
/// the store retries nothing, so a lost race shows): every one succeeds. On MySQL a first append
/// creates its tenant's row in `emt_partitions`; a locking read of the missing row took a gap
/// lock, and concurrent first appends into one gap deadlocked each other (in a full test run,
/// again on every retry of a plain append too).
async fn many_tenants_first_appends_at_once_all_succeed(db: TestDb) {
    for round in 0..3 {
        let store = db.store();
        let barrier = Arc::new(Barrier::new(48));
        let appends = (0..48).map(|t| {
            let (store, barrier) = (store.clone(), Arc::clone(&barrier));
            async move {
                barrier.wait().await;
                let options = AppendOptions::default().partition(format!("signup-{round}-{t:02}"));
                let opened = [Ev::Opened { owner: "o".into() }];
                store.with_session(|s| async move { s.append_to_stream("account", opened, options).await }).await
            }
        });
        for done in futures::future::join_all(appends).await {
            done.expect("a first append of a new tenant");
        }
    }
}

conformance!(with_pooler:
    many_tenants_first_appends_at_once_all_succeed,
    migrate_coexists_with_the_apps_migrator,
    append_then_read_round_trips,
    every_expected_version_case,
    racing_appenders_on_one_stream,
    racing_creators,
    partitions_isolate_tenants,
    sessions_commit_or_roll_back_together,
    archived_streams_are_invisible_and_recreatable,
    read_options_select_a_range,
    aggregate_folds_a_long_stream_in_pages,
    bad_input_gets_typed_errors_and_writes_nothing,
    migrations_go_down_and_up_again,
    messages_are_keyed_by_stream_then_tenant,
    reported_versions_and_positions_are_the_stored_ones,
    appends_of_any_size,
    concurrent_appends_each_get_their_own_outcome,
    a_panicking_inline_projection_fails_its_append_alone,
);

/// SQLite: a store whose group writer was dropped with its runtime (mid-group, its transaction
/// waiting for a lock another connection held) while an append from another runtime waited in
/// its queue: that append is written (alone, by its caller), and the next starts a new writer.
#[cfg(feature = "sqlite")]
#[test]
fn a_group_writer_dropped_with_its_runtime_is_replaced() {
    let runtime = || tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let queued = |store: &EventStore, n: usize| format!("{store:?}").contains(&format!("waiting: {n}, writing: true"));
    let first = runtime();
    let (url, store, holder) = first.block_on(async {
        let url = common::sqlite().await;
        let db = common::connect(&url).await.unwrap();
        emmett_seaorm::migrate(&db).await.unwrap();
        let store = EventStore::new(db);
        let holder = common::connect(&url).await.unwrap();
        let holder = sea_orm::TransactionTrait::begin(&holder).await.unwrap();
        holder.execute_unprepared("UPDATE streams SET stream_type = stream_type").await.unwrap();
        let waiting = store.clone();
        tokio::spawn(async move { waiting.append_to_stream("stuck", [deposit(1)], exact(0)).await });
        // Its writer took it from the queue and waits for the lock.
        while !queued(&store, 0) {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        (url, store, holder)
    });
    let second = runtime();
    let next = {
        let store = store.clone();
        second.spawn(async move { store.append_to_stream("next", [deposit(2)], exact(0)).await })
    };
    while !queued(&store, 1) {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    drop(first);
    second.block_on(async {
        holder.rollback().await.unwrap();
        let done = tokio::time::timeout(std::time::Duration::from_secs(10), next).await;
        let done = done.expect("the append queued behind the dropped writer is written").unwrap();
        assert_eq!(done.unwrap().next_expected_stream_version, 1);
        let append = store.append_to_stream("after", [deposit(3)], exact(0));
        let done = tokio::time::timeout(std::time::Duration::from_secs(10), append).await;
        assert_eq!(done.expect("the store still appends").unwrap().next_expected_stream_version, 1);
    });
    let _ = std::fs::remove_file(url.trim_start_matches("sqlite://").trim_end_matches("?mode=rwc"));
}

/// SQLite: the runtime stops after an append queued for its group and spawned the group's
/// writer, before that writer first ran; its caller is gone too. The store still appends on
/// another runtime, and the cancelled append is not written.
#[cfg(feature = "sqlite")]
#[test]
fn a_group_writer_dropped_before_it_ran_is_replaced() {
    let first = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let (url, store) = first.block_on(async {
        let url = common::sqlite().await;
        let db = common::connect(&url).await.unwrap();
        emmett_seaorm::migrate(&db).await.unwrap();
        let store = EventStore::new(db);
        {
            let mut cancelled = std::pin::pin!(store.append_to_stream("cancelled", [deposit(1)], exact(0)));
            assert!(futures::poll!(cancelled.as_mut()).is_pending());
        }
        assert!(format!("{store:?}").contains("waiting: 1"), "queued, its writer not run yet: {store:?}");
        (url, store)
    });
    drop(first);
    let second = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    second.block_on(async {
        let append = store.append_to_stream("next", [deposit(2)], exact(0));
        let done = tokio::time::timeout(std::time::Duration::from_secs(10), append).await;
        assert_eq!(done.expect("the store still appends").unwrap().next_expected_stream_version, 1);
        let read = store.read_stream::<Ev>("cancelled", ReadOptions::default()).await.unwrap();
        assert!(!read.stream_exists, "a cancelled append is not written");
    });
    let _ = std::fs::remove_file(url.trim_start_matches("sqlite://").trim_end_matches("?mode=rwc"));
}
