//! The reliability suite: races at scale, killed connections under load, tenant isolation, a
//! soak, and compatibility with the TypeScript package by property — on every backend where they
//! apply. Sizes are short by default; `EMMETT_RELIABILITY_SCALE=10` runs them ten times longer
//! (the 16 × 10,000 race, a 150 s soak).

// The server-only tests' helpers are unused when a server backend is left out.
#![cfg_attr(not(all(feature = "postgres", feature = "mysql")), allow(dead_code))]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::{Ev, TestDb, balances};
use emmett_seaorm::daemon::{Daemon, DaemonHandle};
use emmett_seaorm::projection::{ProjectionRunner, RunOptions};
use emmett_seaorm::{AppendOptions, Error, EventStore, ExpectedVersion, ReadOptions};
use sea_orm::{ConnectionTrait, DbBackend, Statement};

/// How many times longer than the default the suite runs.
fn scale() -> u64 {
    std::env::var("EMMETT_RELIABILITY_SCALE").ok().and_then(|s| s.parse().ok()).unwrap_or(1).max(1)
}

/// Writer `w`'s attempt `a`, as the event's amount: every event names who wrote it.
fn tag(w: u64, a: u64) -> i64 {
    (w * 1_000_000 + a) as i64
}

/// 16 writers race on 3 hot streams, each attempt appending at the exact version it read:
/// every success is contiguous, every loser a typed conflict with a newer actual version,
/// nothing lost or duplicated — stream and global positions alike.
async fn exact_version_races_lose_and_duplicate_nothing(db: TestDb) {
    const WRITERS: u64 = 16;
    let attempts = 1_000 * scale();
    let pool = EventStore::new(db.second_pool().await);
    let streams = ["hot-0", "hot-1", "hot-2"];
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let store = if w % 2 == 0 { db.store() } else { pool.clone() };
        tasks.push(tokio::spawn(async move {
            let (mut won, mut lost) = (Vec::new(), 0u64);
            for a in 0..attempts {
                let stream = streams[(a % 3) as usize];
                let seen = store.read_stream::<Ev>(stream, ReadOptions::default().from(u64::MAX)).await.unwrap();
                let v = seen.current_stream_version;
                let options = AppendOptions::default().expected(ExpectedVersion::Exact(v));
                match store.append_to_stream(stream, [Ev::Deposited { amount: tag(w, a) }], options).await {
                    Ok(r) => {
                        assert_eq!(r.next_expected_stream_version, v + 1);
                        won.push((stream, v + 1, tag(w, a)));
                    }
                    Err(Error::ExpectedVersionConflict { expected, actual, stream: s, .. }) => {
                        assert_eq!((expected, s.as_str()), (ExpectedVersion::Exact(v), stream));
                        assert!(actual > v, "a conflict reports the newer version ({actual} vs {v})");
                        lost += 1;
                    }
                    Err(other) => panic!("writer {w}, attempt {a}: not a conflict: {other:?}"),
                }
            }
            (won, lost)
        }));
    }
    let (mut won, mut lost) = (Vec::new(), 0);
    for task in tasks {
        let (w, l) = task.await.unwrap();
        won.extend(w);
        lost += l;
    }
    assert_eq!(won.len() as u64 + lost, WRITERS * attempts);
    let store = db.store();
    let mut globals = BTreeSet::new();
    for stream in streams {
        let read = store.read_stream::<Ev>(stream, ReadOptions::default()).await.unwrap();
        let stored: BTreeMap<u64, i64> = read
            .events
            .iter()
            .map(|e| match e.event {
                Ev::Deposited { amount } => (e.stream_position, amount),
                _ => panic!("{e:?}"),
            })
            .collect();
        let expected: BTreeMap<u64, i64> = won.iter().filter(|w| w.0 == stream).map(|w| (w.1, w.2)).collect();
        assert_eq!(stored, expected, "{stream}: exactly the successful appends, at the versions they were given");
        assert_eq!(stored.keys().copied().collect::<Vec<_>>(), (1..=read.current_stream_version).collect::<Vec<_>>());
        for e in &read.events {
            assert!(globals.insert(e.global_position), "global position {} twice", e.global_position);
        }
    }
    eprintln!("exact-version race: {} writers x {attempts} attempts: {} won, {lost} lost", WRITERS, won.len());
}

/// The same race with `Any`: every append lands, each event exactly once.
async fn any_version_races_store_every_event_once(db: TestDb) {
    const WRITERS: u64 = 16;
    let attempts = 200 * scale();
    let pool = EventStore::new(db.second_pool().await);
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let store = if w % 2 == 0 { db.store() } else { pool.clone() };
        tasks.push(tokio::spawn(async move {
            for a in 0..attempts {
                let stream = ["hot-0", "hot-1", "hot-2"][(a % 3) as usize];
                store
                    .append_to_stream(stream, [Ev::Deposited { amount: tag(w, a) }], AppendOptions::default())
                    .await
                    .unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let mut tags = BTreeSet::new();
    for stream in ["hot-0", "hot-1", "hot-2"] {
        let read = db.store().read_stream::<Ev>(stream, ReadOptions::default()).await.unwrap();
        assert_eq!(
            read.events.iter().map(|e| e.stream_position).collect::<Vec<_>>(),
            (1..=read.current_stream_version).collect::<Vec<_>>()
        );
        for e in read.events {
            let Ev::Deposited { amount } = e.event else { panic!() };
            assert!(tags.insert(amount), "event {amount} stored twice");
        }
    }
    let expected: BTreeSet<i64> = (0..WRITERS).flat_map(|w| (0..attempts).map(move |a| tag(w, a))).collect();
    assert_eq!(tags, expected, "every event stored exactly once");
}

/// A small deterministic generator (xorshift), so a failing case can be found again.
struct Gen(u64);

impl Gen {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// A string from one of several alphabets: ASCII, the id delimiters and percent signs,
    /// Latin and CJK, astral characters, or anything in Unicode.
    fn text(&mut self) -> String {
        let len = self.below(12) as usize;
        let alphabet = self.below(5);
        (0..len)
            .map(|_| match alphabet {
                0 => (b' ' + self.below(95) as u8) as char,
                1 => [':', '|', '%', '2', 'C', 'a', ' ', '/', '?', '#', '&', '='][self.below(12) as usize],
                2 => char::from_u32(0xA0 + self.below(0x2000) as u32).unwrap_or('x'),
                3 => char::from_u32(0x1F300 + self.below(0x300) as u32).unwrap_or('x'),
                _ => loop {
                    if let Some(c) = char::from_u32(self.below(0x11_0000) as u32) {
                        break c;
                    }
                },
            })
            .collect()
    }
}

impl Gen {
    /// A JSON value: any shape, nested a little, with hostile strings.
    fn json(&mut self, depth: u32) -> serde_json::Value {
        use serde_json::{Value, json};
        match self.below(if depth > 2 { 5 } else { 7 }) {
            0 => Value::Null,
            1 => json!(self.below(2) == 1),
            2 => json!((self.next() as i64) >> self.below(64)),
            3 => json!(f64::from_bits(self.next()).clamp(-1e300, 1e300)),
            4 => json!(self.text()),
            5 => Value::Array((0..self.below(4)).map(|_| self.json(depth + 1)).collect()),
            _ => {
                let mut object = serde_json::Map::new();
                for _ in 0..self.below(4) {
                    let key = if self.below(2) == 0 {
                        ["amount", "owner"][self.below(2) as usize].to_owned()
                    } else {
                        self.text()
                    };
                    object.insert(key, self.json(depth + 1));
                }
                Value::Object(object)
            }
        }
    }
}

/// Stored events of any type and any JSON data — written by hand, as another writer or a bug
/// would — never panic a read or a projection: each reads back, or fails with
/// `UndecodableEvent` naming its stream, tenant, position and type; a projection that skips
/// undecodable events records exactly those, and projects the rest.
async fn any_stored_data_decodes_or_is_named(db: TestDb) {
    let store = db.store();
    let mut generator = Gen(0x0bad_da7a_5eed);
    let cases = 150 * scale();
    let (mut undecodable, mut unknown, mut bad_known) = (0, BTreeSet::new(), BTreeSet::new());
    for k in 0..cases {
        let stream = format!("fz-{k}");
        store.append_to_stream(&stream, [Ev::Closed], AppendOptions::default().partition("fz")).await.unwrap();
        let message_type = match generator.below(3) {
            0 => format!("T{}", generator.text()),
            _ => ["Opened", "Deposited", "Closed"][generator.below(3) as usize].to_owned(),
        };
        // A third of them in the type's own shape (extra fields and all), the rest anything.
        let data = match (generator.below(3), message_type.as_str()) {
            (0, "Opened") => serde_json::json!({ "owner": generator.text(), "extra": generator.json(1) }),
            (0, "Deposited") => serde_json::json!({ "amount": (generator.next() as i64) >> 1 }),
            (0, "Closed") => [serde_json::json!({}), serde_json::Value::Null][generator.below(2) as usize].clone(),
            _ => generator.json(0),
        };
        common::raw::insert_raw(&db.db, "fz", &stream, 2, &message_type, data.clone().into()).await;
        let read = store.read_stream::<Ev>(&stream, ReadOptions::default().partition("fz")).await;
        match read {
            Ok(read) => {
                assert_eq!(read.events.len(), 2);
                assert_eq!(read.events[1].message_type, message_type, "{data}");
            }
            Err(Error::UndecodableEvent { stream: s, partition, position, message_type: t, .. }) => {
                assert_eq!(
                    (s.as_str(), partition.as_str(), position, t.as_str()),
                    (stream.as_str(), "fz", 2, message_type.as_str())
                );
                undecodable += 1;
                match message_type.starts_with('T') {
                    true => unknown.insert(stream.clone()),
                    false => bad_known.insert(stream.clone()),
                };
            }
            Err(other) => panic!("{message_type} {data}: {other:?}"),
        }
        // Untyped, everything reads.
        let untyped =
            store.read_stream::<serde_json::Value>(&stream, ReadOptions::default().partition("fz")).await.unwrap();
        assert_eq!(untyped.events[1].event["type"], serde_json::json!(message_type));
    }
    // A projection of every event skips and records exactly the undecodable events: of its
    // types, and of types its event enum doesn't know in its own streams (each also holds a
    // `Closed`: a renamed or removed type, not another aggregate's).
    let runner = ProjectionRunner::new(store.clone(), balances::seen_registry());
    balances::create_recorded_tables(&db.db).await;
    let options = RunOptions::default().partition("fz").skip_undecodable_events();
    runner.project_partition("fz", options).await.unwrap();
    let skipped =
        <emmett_seaorm::schema::skipped_events::Entity as sea_orm::EntityTrait>::find().all(&db.db).await.unwrap();
    let recorded: BTreeSet<String> = skipped.iter().map(|s| s.stream_id.clone()).collect();
    let expected: BTreeSet<String> = bad_known.union(&unknown).cloned().collect();
    assert_eq!(recorded, expected, "the skipped events are recorded, by stream");
    assert!(skipped.iter().all(|s| s.stream_position == 2 && s.partition == "fz" && !s.reason.is_empty()));
    let (seen, stored) = balances::seen_and_stored(&db.db).await;
    assert_eq!(seen.len(), stored.len() - expected.len(), "every other event was projected");
    eprintln!("stored data: {cases} cases, {undecodable} undecodable ({} of unknown types)", unknown.len());
}

/// Events of generated data — any Unicode, nesting, integers, doubles of any magnitude — and
/// metadata read back exactly as they were appended.
async fn any_event_data_round_trips_exactly(db: TestDb) {
    let store = db.store();
    let mut generator = Gen(0x0da7_a0da_7a00);
    for k in 0..100 * scale() {
        let events: Vec<serde_json::Value> = (0..1 + generator.below(3))
            .map(|_| {
                let data = loop {
                    let data = serde_json::json!({ "v": generator.json(0), generator.text(): generator.json(1) });
                    if !data.to_string().contains("\\u0000") {
                        break data;
                    }
                };
                serde_json::json!({ "type": "Generated", "data": data })
            })
            .collect();
        let metadata =
            serde_json::json!({ "m": generator.text(), "n": f64::from_bits(generator.next()).clamp(-1e300, 1e300) });
        let stream = format!("g-{k}");
        let options = AppendOptions::default().partition("g").metadata(metadata.clone());
        store.append_to_stream(&stream, events.clone(), options).await.unwrap();
        let read =
            store.read_stream::<serde_json::Value>(&stream, ReadOptions::default().partition("g")).await.unwrap();
        let got: Vec<serde_json::Value> = read.events.iter().map(|e| by_value(&e.event)).collect();
        assert_eq!(got, events.iter().map(by_value).collect::<Vec<_>>(), "{stream}");
        assert!(read.events.iter().all(|e| by_value(&e.metadata) == by_value(&metadata)), "{stream}");
    }
}

/// `value` with every number as a double: numbers compare by value (PostgreSQL's jsonb writes
/// a double with an integral value, 5.7e18, as the integer 5700000000000000000).
fn by_value(value: &serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match value {
        Value::Number(n) => serde_json::json!(n.as_f64().unwrap()),
        Value::Array(items) => Value::Array(items.iter().map(by_value).collect()),
        Value::Object(map) => Value::Object(map.iter().map(|(k, v)| (k.clone(), by_value(v))).collect()),
        other => other.clone(),
    }
}

/// Events of generated types and data — any Unicode, nesting, numbers JavaScript holds exactly —
/// written by the TypeScript package read back here as they were written, and ours read back
/// there, on one PostgreSQL database.
#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_round_trip_with_the_typescript_package_by_property() {
    let url = common::postgres().await;
    let db = emmett_seaorm::connect(&url).await.unwrap();
    emmett_seaorm::migrate(&db).await.unwrap();
    let store = EventStore::new(db.clone());
    let mut generator = Gen(0x007e_570f_1a57);
    // Objects (the package's event data), JavaScript numbers (integers within 2^53), no NUL
    // (the store refuses it).
    let payload = |generator: &mut Gen| loop {
        let data = serde_json::json!({ "v": generator.json(0), generator.text(): generator.json(1) });
        let text = data.to_string();
        if !text.contains("\\u0000") && !has_big_int(&data) {
            break data;
        }
    };
    let streams = 60 * scale() as usize;
    let mut batches = Vec::new();
    for k in 0..streams {
        let events: Vec<serde_json::Value> = (0..1 + generator.below(3))
            .map(|_| serde_json::json!({ "type": format!("T{}", generator.text()).chars().take(200).collect::<String>(), "data": payload(&mut generator) }))
            .collect();
        batches.push((format!("s-{k}"), ["t1", "ünï"][k % 2].to_owned(), events));
    }
    let (theirs, ours): (Vec<_>, Vec<_>) = batches.iter().enumerate().partition(|(k, _)| k % 2 == 0);
    let requests = |batch: &[(usize, &Batch)], with_events: bool| {
        serde_json::Value::Array(
            batch
                .iter()
                .map(|(_, (stream, partition, events))| match with_events {
                    true => serde_json::json!({ "stream": stream, "partition": partition, "events": events }),
                    false => serde_json::json!({ "stream": stream, "partition": partition }),
                })
                .collect(),
        )
    };
    common::node::run("events.mjs", &["write"], &[("DATABASE_URL", &url)], Some(&requests(&theirs, true)));
    for (_, (stream, partition, events)) in &ours {
        store.append_to_stream(stream, events.clone(), AppendOptions::default().partition(partition)).await.unwrap();
    }
    // Theirs, read here.
    for (_, (stream, partition, events)) in &theirs {
        let read =
            store.read_stream::<serde_json::Value>(stream, ReadOptions::default().partition(partition)).await.unwrap();
        let got: Vec<serde_json::Value> = read.events.into_iter().map(|e| e.event).collect();
        assert_eq!(&got, events, "{stream} written by TypeScript");
    }
    // Ours, read there.
    let read = common::node::run("events.mjs", &["read"], &[("DATABASE_URL", &url)], Some(&requests(&ours, false)));
    for ((_, (stream, _, events)), got) in ours.iter().zip(read.as_array().unwrap()) {
        assert_eq!(got.as_array().unwrap(), events, "{stream} written here, read by TypeScript");
    }
    db.close().await.unwrap();
    common::drop_database(&url).await;
}

/// Events for one stream of one tenant: (stream, tenant, events).
type Batch = (String, String, Vec<serde_json::Value>);

/// Whether `value` holds an integer JavaScript can't hold exactly.
fn has_big_int(value: &serde_json::Value) -> bool {
    match value {
        serde_json::Value::Number(n) => n.as_i64().is_some_and(|i| i.unsigned_abs() > 1 << 53),
        serde_json::Value::Array(items) => items.iter().any(has_big_int),
        serde_json::Value::Object(map) => map.values().any(has_big_int),
        _ => false,
    }
}

/// Snapshot ids equal the TypeScript package's own `constructStreamId` for thousands of generated
/// key sets: any Unicode in names and values, delimiters, percent signs, numbers and booleans.
#[test]
fn snapshot_ids_match_the_typescript_package_by_property() {
    use emmett_seaorm::projection::{Keys, construct_stream_id};
    let mut generator = Gen(0x0005_eed0_f1d5);
    let (mut sets, mut json) = (Vec::new(), Vec::new());
    // Numbers whose text differs between Rust's and JavaScript's formatting.
    for d in [-0.0, 1e21, 1e-7, 0.1 + 0.2, 123456789012345680000.0, f64::MAX, f64::MIN_POSITIVE, 5e-324] {
        sets.push(Keys::from([("n".to_owned(), sea_orm::Value::from(d))]));
        json.push(serde_json::json!({ "n": d }));
    }
    for _ in 0..5_000 * scale() {
        let (mut keys, mut object) = (Keys::new(), serde_json::Map::new());
        for _ in 0..1 + generator.below(4) {
            let name = generator.text();
            let (value, js) = match generator.below(5) {
                3 => {
                    // Any finite double: JavaScript's number formatting (`1e+21`, `5e-7`).
                    let d = f64::from_bits(generator.next());
                    let d = if d.is_finite() { d } else { generator.below(1 << 40) as f64 / 8.0 };
                    (sea_orm::Value::from(d), serde_json::json!(d))
                }
                0 => {
                    let n = generator.next() as i64 >> 11; // within JavaScript's safe integers
                    (sea_orm::Value::from(n), serde_json::json!(n))
                }
                1 => {
                    let b = generator.below(2) == 1;
                    (sea_orm::Value::from(b), serde_json::json!(b))
                }
                _ => {
                    let s = generator.text();
                    (sea_orm::Value::from(s.clone()), serde_json::json!(s))
                }
            };
            keys.insert(name.clone(), value);
            object.insert(name, js);
        }
        sets.push(keys);
        json.push(serde_json::Value::Object(object));
    }
    let theirs = common::node::run("construct-stream-id.mjs", &[], &[], Some(&serde_json::Value::Array(json.clone())));
    let theirs: Vec<String> = serde_json::from_value(theirs).unwrap();
    assert_eq!(theirs.len(), sets.len());
    for ((keys, theirs), js) in sets.iter().zip(&theirs).zip(&json) {
        assert_eq!(&construct_stream_id(keys), theirs, "keys {js}");
    }
}

/// Everything of tenant `t1` runs while another connection holds every row of tenant `t2`
/// locked — streams, events, checkpoints, leases, snapshots and read-model rows: nothing of
/// `t1`'s waits for them, and none of `t2`'s rows changes. (PostgreSQL and MySQL; SQLite has
/// one lock for the whole database.)
async fn a_tenants_work_never_touches_anothers_rows(db: TestDb) {
    let backend = db.db.get_database_backend();
    balances::create_table(&db.db).await;
    let store = db.store();
    for tenant in ["t1", "t2"] {
        store.create_partition(tenant).await.unwrap();
    }
    // Deposits 0, 3, 6… go to t1, 1, 4, 7… to t2 (see `balances::deposit`).
    for i in 0..60 {
        balances::deposit(&store, i, i as i64).await;
    }
    let runner = ProjectionRunner::new(store.clone(), balances::registry());
    for tenant in ["t1", "t2"] {
        runner.project_partition("balances", RunOptions::default().partition(tenant)).await.unwrap();
    }
    let daemon =
        Daemon::new(EventStore::new(db.second_pool().await)).projection("balances", balances::registry()).start();
    let daemon = daemon.await.unwrap();
    daemon.caught_up(balances::deposit(&store, 60, 1).await).await.unwrap();
    daemon.stop().await.unwrap();
    let before = tenant_rows(&db.db, "t2").await;

    // Another connection locks all of t2's rows and keeps them.
    let locker = sea_orm::Database::connect(&db.url).await.unwrap();
    let txn = sea_orm::TransactionTrait::begin_with_config(&locker, Some(sea_orm::IsolationLevel::ReadCommitted), None);
    let txn = txn.await.unwrap();
    let p = if backend == DbBackend::MySql { "`partition`" } else { "partition" };
    for table in ["streams", "messages", "subscriptions", "emt_leases"] {
        txn.execute_unprepared(&format!("SELECT * FROM {table} WHERE {p} = 't2' FOR UPDATE")).await.unwrap();
    }
    txn.execute_unprepared("SELECT * FROM balances WHERE tenant_id = 't2' FOR UPDATE").await.unwrap();
    txn.execute_unprepared("SELECT * FROM snapshots WHERE stream_id LIKE '%tenant_id:t2%' FOR UPDATE").await.unwrap();
    if backend == DbBackend::MySql {
        txn.execute_unprepared("SELECT * FROM emt_partitions WHERE `partition` = 't2' FOR UPDATE").await.unwrap();
    }

    let t1 = async {
        let last = balances::deposit(&store, 63, 5).await;
        let read = store.read_stream::<Ev>("acc-0", ReadOptions::default().partition("t1")).await.unwrap();
        let fold = |n: i64, _: &Ev| n + 1;
        let aggregated = store.aggregate_stream("acc-0", fold, || 0, ReadOptions::default().partition("t1"));
        assert_eq!(aggregated.await.unwrap().state, read.events.len() as i64);
        runner.project_partition("balances", RunOptions::default().partition("t1")).await.unwrap();
        // t2 has streams of the same ids.
        assert!(store.archive_stream("acc-5", "t1").await.unwrap());
        let daemon = Daemon::new(EventStore::new(db.second_pool().await))
            .projection("balances", balances::registry())
            .tenants(["t1"])
            .start()
            .await
            .unwrap();
        let last = last.max(balances::deposit(&store, 66, 5).await);
        daemon.caught_up(last).await.unwrap();
        daemon.stop().await.unwrap();
        #[cfg(feature = "cli")]
        for args in [
            &["streams", "read", "acc-0", "--partition", "t1"][..],
            &["projections", "reset", "balances", "--partition", "t1", "--to", "0"],
            &["projections", "catch-up", "balances", "--partition", "t1"],
        ] {
            use clap::Parser;
            #[derive(Parser)]
            struct App {
                #[command(subcommand)]
                ops: emmett_seaorm::cli::Command,
            }
            let projections = emmett_seaorm::cli::Projections::new().projection("balances", balances::registry());
            let app = App::try_parse_from(["app"].iter().chain(args)).unwrap();
            app.ops.run(&db.url, &projections).await.unwrap_or_else(|e| panic!("{args:?}: {e}"));
        }
    };
    tokio::time::timeout(Duration::from_secs(10), t1).await.expect("t1's work waited for t2's rows");
    txn.rollback().await.unwrap();
    assert_eq!(tenant_rows(&db.db, "t2").await, before, "t2's rows did not change");
    // t1's read model is its fold (the archived stream's row stays, as it was).
    let t1 = |rows: Vec<(String, String, i64, i64)>| {
        rows.into_iter().filter(|r| r.0 == "t1" && r.1 != "acc-5").collect::<Vec<_>>()
    };
    assert_eq!(t1(balances::rows(&db.db).await), t1(balances::folded(&store).await));
}

/// Every row of `tenant` in the store's tables and the read model, as text, sorted.
async fn tenant_rows(db: &sea_orm::DatabaseConnection, tenant: &str) -> Vec<String> {
    let backend = db.get_database_backend();
    let p = if backend == DbBackend::MySql { "`partition`" } else { "partition" };
    let mut rows = Vec::new();
    for (table, filter) in [
        ("streams", format!("{p} = '{tenant}'")),
        ("messages", format!("{p} = '{tenant}'")),
        ("subscriptions", format!("{p} = '{tenant}'")),
        ("balances", format!("tenant_id = '{tenant}'")),
        ("snapshots", format!("stream_id LIKE '%tenant_id:{tenant}%'")),
    ] {
        let sql = format!("SELECT * FROM {table} WHERE {filter}");
        for row in db.query_all_raw(Statement::from_string(backend, sql)).await.unwrap() {
            let columns = row.column_names();
            let values: Vec<String> = (0..columns.len())
                .map(|i| {
                    row.try_get_by_index::<Option<String>>(i)
                        .map(|v| v.unwrap_or_default())
                        .or_else(|_| row.try_get_by_index::<Option<i64>>(i).map(|v| format!("{v:?}")))
                        .or_else(|_| row.try_get_by_index::<Option<bool>>(i).map(|v| format!("{v:?}")))
                        .or_else(|_| row.try_get_by_index::<Option<serde_json::Value>>(i).map(|v| format!("{v:?}")))
                        .unwrap_or_else(|_| "?".into())
                })
                .collect();
            rows.push(format!("{table}: {}", values.join(", ")));
        }
    }
    rows.sort();
    rows
}

/// Stream ids and tenants with quotes, SQL, percent signs, the snapshot-id delimiters, Unicode
/// and the longest length go through every operation — append, read, aggregate, archive, the
/// runner, the daemon, the command line — and come back as they were; a 10 kB one and one with
/// NUL get a typed error naming them, and nothing is written.
async fn hostile_identifiers_round_trip_everywhere(db: TestDb) {
    use emmett_seaorm::MAX_IDENTIFIER_CHARS;
    let long = "é".repeat(MAX_IDENTIFIER_CHARS);
    let hostile = [
        "o'brien",
        "a\"b`c",
        "100%_",
        "a|b:c=d",
        "x'; DROP TABLE messages; --",
        "back\\slash",
        "ünï©ødé 🚀",
        "\u{202E}rtl\u{200B}",
        "%25%7C",
        " padded ",
        long.as_str(),
    ];
    balances::create_recorded_tables(&db.db).await;
    let store = db.store();
    let fold = |n: i64, e: &Ev| match e {
        Ev::Deposited { amount } => n + amount,
        _ => n,
    };
    for (i, tenant) in hostile.iter().enumerate() {
        let stream = hostile[(i + 3) % hostile.len()];
        let options = AppendOptions::default().partition(*tenant).expected(ExpectedVersion::NoStream);
        let appended =
            store.append_to_stream(stream, [Ev::Deposited { amount: 2 }, Ev::Deposited { amount: 3 }], options);
        assert_eq!(appended.await.unwrap().next_expected_stream_version, 2, "{tenant:?}/{stream:?}");
        let read = store.read_stream::<Ev>(stream, ReadOptions::default().partition(*tenant)).await.unwrap();
        assert!(read.events.iter().all(|e| e.stream_id == stream && e.partition == *tenant), "{tenant:?}/{stream:?}");
        let total = store.aggregate_stream(stream, fold, || 0, ReadOptions::default().partition(*tenant)).await;
        assert_eq!(total.unwrap().state, 5);
        assert!(store.stream_exists(stream, tenant).await.unwrap());
        store.create_partition(tenant).await.unwrap();
    }
    // The runner, tenant by tenant, then the daemon over all of them.
    // (Only the recorder: the balances table's keys hold 100 characters.)
    let recorder = ProjectionRunner::new(store.clone(), balances::seen_registry());
    for tenant in &hostile[..5] {
        recorder.project_partition("recorder", RunOptions::default().partition(*tenant)).await.unwrap();
    }
    let daemon = Daemon::new(EventStore::new(db.second_pool().await))
        .projection("recorder", balances::seen_registry())
        .start()
        .await
        .unwrap();
    let last = store.append_to_stream("last", [Ev::Closed], AppendOptions::default()).await.unwrap();
    tokio::time::timeout(Duration::from_secs(20), daemon.caught_up(last.last_event_global_position))
        .await
        .unwrap()
        .unwrap();
    daemon.stop().await.unwrap();
    let (seen, stored) = balances::seen_and_stored(&db.db).await;
    assert_eq!(seen, stored, "every event of every tenant projected exactly once");
    #[cfg(feature = "cli")]
    for (i, tenant) in hostile.iter().enumerate() {
        use clap::Parser;
        #[derive(Parser)]
        struct App {
            #[command(subcommand)]
            ops: emmett_seaorm::cli::Command,
        }
        let stream = hostile[(i + 3) % hostile.len()];
        let app = App::try_parse_from(["app", "streams", "read", stream, "--partition", tenant, "--json"]).unwrap();
        app.ops
            .run(&db.url, &emmett_seaorm::cli::Projections::new())
            .await
            .unwrap_or_else(|e| panic!("{tenant:?}: {e}"));
    }
    for (i, tenant) in hostile.iter().enumerate() {
        let stream = hostile[(i + 3) % hostile.len()];
        assert!(store.archive_stream(stream, tenant).await.unwrap(), "{tenant:?}/{stream:?}");
        assert!(!store.stream_exists(stream, tenant).await.unwrap());
    }
    // Too long, or with NUL: refused by name, nothing written.
    let before = balances::seen_and_stored(&db.db).await.1.len();
    let huge = "x".repeat(10_000);
    for (stream, tenant, what) in
        [(huge.as_str(), "t", "stream id"), ("s", huge.as_str(), "partition"), ("s\0", "t", "stream id")]
    {
        let res = store.append_to_stream(stream, [Ev::Closed], AppendOptions::default().partition(tenant)).await;
        assert!(matches!(&res, Err(Error::InvalidIdentifier { what: w, .. }) if *w == what), "{res:?}");
    }
    // A NUL in event data, a key or metadata: PostgreSQL's jsonb can't hold it, so no backend takes it.
    let fine = serde_json::json!({ "type": "Opened", "data": { "owner": "o" } });
    for (events, metadata, index) in [
        (vec![fine.clone(), serde_json::json!({ "type": "Opened", "data": { "owner": "a\u{0}b" } })], None, 1),
        (vec![serde_json::json!({ "type": "Opened", "data": { "k\u{0}": 1 } })], None, 0),
        (vec![fine.clone()], Some(serde_json::json!({ "trace": ["x\u{0}"] })), 0),
    ] {
        let mut options = AppendOptions::default().partition("t");
        if let Some(metadata) = metadata {
            options = options.metadata(metadata);
        }
        let res = store.append_to_stream("s", events, options).await;
        assert!(
            matches!(&res, Err(Error::UnstorableEvent { stream, index: i, .. }) if stream == "s" && *i == index),
            "{res:?}"
        );
    }
    let all = store.read_stream::<Ev>("s", ReadOptions::default().partition("t")).await.unwrap();
    assert!(!all.stream_exists);
    assert_eq!(balances::seen_and_stored(&db.db).await.1.len(), before, "nothing written");
}

/// Connections the server has open to the test database (`None` for SQLite: a file).
async fn server_connections(db: &sea_orm::DatabaseConnection) -> Option<i64> {
    let sql = match db.get_database_backend() {
        DbBackend::Postgres => "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()",
        DbBackend::MySql => "SELECT count(*) FROM information_schema.PROCESSLIST WHERE DB = DATABASE()",
        _ => return None,
    };
    let row = db.query_one_raw(Statement::from_string(db.get_database_backend(), sql)).await.unwrap()?;
    row.try_get_by_index::<i64>(0).ok()
}

/// Resident memory of process `pid`, in MiB.
fn rss_mib(pid: u32) -> f64 {
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).unwrap_or_default();
    let pages: f64 = statm.split_whitespace().nth(1).and_then(|p| p.parse().ok()).unwrap_or(0.0);
    pages * 4096.0 / (1024.0 * 1024.0)
}

/// Writers, a daemon (in a process of its own, so its memory is its own) and a reader together
/// for a while (15 s; 150 s with `EMMETT_RELIABILITY_SCALE=10`): the daemon's memory, the
/// connections and the lag stay flat, printed every second; at the end every event was projected
/// exactly once.
async fn a_soak_keeps_memory_connections_and_lag_flat(db: TestDb) {
    balances::create_recorded_tables(&db.db).await;
    let daemon = child(&db.url, "daemon", 500);
    let writers: Vec<TaggedWriter> = (0..2).map(|w| TaggedWriter::start(db.store(), 1 + w * 1_000_000_000)).collect();
    let reading = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let reader = {
        let (store, reading) = (db.store(), reading.clone());
        tokio::spawn(async move {
            let mut reads = 0u64;
            while reading.load(std::sync::atomic::Ordering::SeqCst) {
                let account = format!("acc-{}", reads % 7);
                let options = ReadOptions::default().partition(["t1", "t2", "t3"][(reads % 3) as usize]);
                store.aggregate_stream(&account, |n: u64, _: &Ev| n + 1, || 0, options).await.unwrap();
                reads += 1;
            }
            reads
        })
    };
    let backend = db.db.get_database_backend();
    let max_lag = || async {
        let leases = emmett_seaorm::daemon::recorded(&db.db).await.unwrap();
        leases.iter().map(|l| l.lag_events).max().unwrap_or(0)
    };
    let seconds = 15 * scale();
    let (mut samples, started) = (Vec::new(), std::time::Instant::now());
    for second in 1..=seconds {
        tokio::time::sleep_until(tokio::time::Instant::from_std(started + Duration::from_secs(second))).await;
        let (rss, connections, lag) = (rss_mib(daemon.0.id()), server_connections(&db.db).await, max_lag().await);
        let events = balances::seen_and_stored(&db.db).await.1.len();
        eprintln!(
            "soak {backend:?} t={second:>3}s events={events:>7} daemon rss={rss:>5.1} MiB connections={connections:?} max lag={lag}"
        );
        samples.push((rss, connections.unwrap_or(0) as f64, lag as f64));
    }
    reading.store(false, std::sync::atomic::Ordering::SeqCst);
    let reads = reader.await.unwrap();
    let mut written = BTreeSet::new();
    for writer in writers {
        written.extend(writer.stop().await.0);
    }
    // Flat: the last third no worse than the two before it (pools and caches warm up), give or take.
    let cut = samples.len() * 2 / 3;
    let worst =
        |from: usize, to: usize, f: fn(&(f64, f64, f64)) -> f64| samples[from..to].iter().map(f).fold(0.0, f64::max);
    let (before, last) = ((0, cut), (cut, samples.len()));
    assert!(
        worst(last.0, last.1, |s| s.0) < worst(before.0, before.1, |s| s.0) * 1.1 + 4.0,
        "memory grows: {samples:?}"
    );
    assert!(
        worst(last.0, last.1, |s| s.1) <= worst(before.0, before.1, |s| s.1) + 3.0,
        "connections grow: {samples:?}"
    );
    // Lag (events behind) spikes with the machine's load: the last third's median, not its worst.
    let mut lags: Vec<f64> = samples[last.0..last.1].iter().map(|s| s.2).collect();
    lags.sort_by(f64::total_cmp);
    let median = lags[lags.len() / 2];
    assert!(median <= worst(before.0, before.1, |s| s.2).max(500.0), "lag grows: {samples:?}");
    // The daemon catches up with the rest.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while max_lag().await > 0 {
        assert!(std::time::Instant::now() < deadline, "the daemon did not catch up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(daemon);
    stored_once_and_projected_once(&db.db, &written).await;
    eprintln!("soak {backend:?}: {} appends, {reads} aggregates in {seconds} s", written.len());
}

/// A child process killed when the test ends, however it ends.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `mode` ("daemon", or "runner": every tenant round and round) with batches of `batch`
/// events in a child process: this test binary, re-run as `reliability_child`.
fn child(url: &str, mode: &str, batch: u64) -> KillOnDrop {
    KillOnDrop(
        std::process::Command::new(std::env::current_exe().unwrap())
            .args(["reliability_child", "--exact", "--nocapture", "--test-threads=1"])
            .env("EMMETT_RELIABILITY_CHILD_URL", url)
            .env("EMMETT_RELIABILITY_CHILD_MODE", mode)
            .env("EMMETT_RELIABILITY_CHILD_BATCH", batch.to_string())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn the child"),
    )
}

/// Not a test of its own: the child process of the crash tests, projecting until it is killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reliability_child() {
    let Ok(url) = std::env::var("EMMETT_RELIABILITY_CHILD_URL") else { return };
    let store = EventStore::new(emmett_seaorm::connect(&url).await.expect("connect"));
    let batch = std::env::var("EMMETT_RELIABILITY_CHILD_BATCH").ok().and_then(|b| b.parse().ok()).unwrap_or(7);
    if std::env::var("EMMETT_RELIABILITY_CHILD_MODE").as_deref() == Ok("daemon") {
        let daemon = Daemon::new(store.clone())
            .projection("balances", balances::recorded_registry())
            .lease_ttl(Duration::from_secs(1))
            .renew_every(Duration::from_millis(250))
            .batch_size(batch)
            .start()
            .await
            .expect("start");
        tokio::time::sleep(Duration::from_secs(600)).await;
        drop(daemon);
    }
    let runner = ProjectionRunner::new(store, balances::recorded_registry());
    loop {
        for tenant in ["t1", "t2", "t3"] {
            let options = RunOptions::default().partition(tenant).batch_size(batch);
            runner.project_partition("balances", options).await.expect("project");
        }
    }
}

/// A daemon (then a runner) in a child process is SIGKILLed at a random moment of its work, 20
/// times, restarted each time, then one of three daemons sharing the work, 20 times, while a
/// writer appends: every event ends projected exactly once
/// (a duplicate fails its batch on `seen`'s key; a skipped one is missing there), the read model
/// equals the sequential fold, and each checkpoint is its tenant's last event.
async fn killed_projectors_lose_and_repeat_nothing(db: TestDb) {
    balances::create_recorded_tables(&db.db).await;
    let store = db.store();
    for i in 0..90 {
        balances::deposit(&store, i, i as i64).await;
    }
    let writing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let writer = {
        let (store, writing) = (EventStore::new(db.second_pool().await), writing.clone());
        tokio::spawn(async move {
            let mut i = 90;
            while writing.load(std::sync::atomic::Ordering::SeqCst) {
                balances::deposit(&store, i, 1).await;
                i += 1;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    let mut generator = Gen(0x00c0_ffee_d00d);
    for mode in ["daemon", "runner"] {
        for _ in 0..20 {
            let child = child(&db.url, mode, 7);
            tokio::time::sleep(Duration::from_millis(100 + generator.below(400))).await;
            drop(child); // SIGKILL
        }
    }
    // Three daemons sharing the work; one of them, at random, is killed and replaced, 20 times.
    let mut instances: Vec<KillOnDrop> = (0..3).map(|_| child(&db.url, "daemon", 7)).collect();
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(100 + generator.below(400))).await;
        instances[generator.below(3) as usize] = child(&db.url, "daemon", 7); // the old one is SIGKILLed
    }
    drop(instances);
    writing.store(false, std::sync::atomic::Ordering::SeqCst);
    writer.await.unwrap();
    let (by_children, stored) = balances::seen_and_stored(&db.db).await;
    assert!(by_children.len() > 90, "the killed processes did project: {} of {}", by_children.len(), stored.len());
    eprintln!(
        "killed projectors: {} of {} events projected by the 63 killed processes",
        by_children.len(),
        stored.len()
    );
    // What the killed ones left, finished here.
    let runner = ProjectionRunner::new(store.clone(), balances::recorded_registry());
    for tenant in ["t1", "t2", "t3"] {
        runner.project_partition("balances", RunOptions::default().partition(tenant)).await.expect("catch up");
    }
    let (seen, stored) = balances::seen_and_stored(&db.db).await;
    assert_eq!(seen, stored, "every event projected exactly once");
    assert_eq!(balances::rows(&db.db).await, balances::folded(&store).await);
    let backend = db.db.get_database_backend();
    let p = if backend == DbBackend::MySql { "`partition`" } else { "partition" };
    let sql = format!(
        "SELECT s.{p}, s.last_processed_position, (SELECT max(global_position) FROM messages m WHERE m.{p} = s.{p})
         FROM subscriptions s WHERE s.subscription_id = 'balances'"
    );
    for row in db.db.query_all_raw(Statement::from_string(backend, sql)).await.unwrap() {
        let (tenant, checkpoint, head): (String, i64, i64) =
            (row.try_get_by_index(0).unwrap(), row.try_get_by_index(1).unwrap(), row.try_get_by_index(2).unwrap());
        assert_eq!(checkpoint, head, "{tenant}: the checkpoint is the last event");
    }
}

conformance!(with_pooler:
    exact_version_races_lose_and_duplicate_nothing,
    any_version_races_store_every_event_once,
    killed_projectors_lose_and_repeat_nothing,
    hostile_identifiers_round_trip_everywhere,
    a_soak_keeps_memory_connections_and_lag_flat,
    any_stored_data_decodes_or_is_named,
    any_event_data_round_trips_exactly,
);
/// Appends deposits tagged 0, 1, 2… round robin over the tenants' accounts until stopped.
struct TaggedWriter {
    writing: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<(BTreeSet<i64>, Vec<String>)>,
}

impl TaggedWriter {
    /// Starts writing tags `first`, `first + 1`…
    fn start(store: EventStore, first: usize) -> Self {
        let writing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let going = writing.clone();
        let task = tokio::spawn(async move {
            let (mut written, mut failed) = (BTreeSet::new(), Vec::new());
            let mut i = first;
            while going.load(std::sync::atomic::Ordering::SeqCst) {
                let (tenant, account) = (["t1", "t2", "t3"][i % 3], format!("acc-{}", i % 7));
                let event = [Ev::Deposited { amount: i as i64 }];
                match store.append_to_stream(&account, event, AppendOptions::default().partition(tenant)).await {
                    Ok(_) => {
                        written.insert(i as i64);
                    }
                    Err(e @ (Error::ConnectionLost { .. } | Error::Busy { .. })) => {
                        failed.push(e.to_string());
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    Err(other) => panic!("append {i}: not a typed connection error: {other:?}"),
                }
                i += 1;
            }
            (written, failed)
        });
        Self { writing, task }
    }

    /// Stops; the tags acknowledged, and the typed errors met.
    async fn stop(self) -> (BTreeSet<i64>, Vec<String>) {
        self.writing.store(false, std::sync::atomic::Ordering::SeqCst);
        self.task.await.unwrap()
    }
}

/// Every acknowledged deposit is stored, none twice; once `daemon` caught up, every event was
/// projected exactly once and the read model is the fold.
async fn nothing_lost_or_repeated(db: &sea_orm::DatabaseConnection, daemon: &DaemonHandle, written: &BTreeSet<i64>) {
    let last = balances::deposit(&EventStore::new(db.clone()), 0, 0).await;
    tokio::time::timeout(Duration::from_secs(30), daemon.caught_up(last))
        .await
        .expect("the daemon came back and caught up")
        .expect("caught up");
    stored_once_and_projected_once(db, written).await;
}

/// Every acknowledged deposit is stored, none twice; every event was projected exactly once and
/// the read model is the fold.
async fn stored_once_and_projected_once(db: &sea_orm::DatabaseConnection, written: &BTreeSet<i64>) {
    let store = EventStore::new(db.clone());
    let mut stored = BTreeMap::new();
    for tenant in ["t1", "t2", "t3"] {
        for account in (0..7).map(|a| format!("acc-{a}")) {
            let read = store.read_stream::<Ev>(&account, ReadOptions::default().partition(tenant));
            for e in read.await.unwrap().events {
                let Ev::Deposited { amount } = e.event else { panic!() };
                *stored.entry(amount).or_insert(0) += 1;
            }
        }
    }
    let twice: Vec<_> = stored.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "stored twice: {twice:?}");
    let missing: Vec<_> = written.iter().filter(|a| !stored.contains_key(a)).collect();
    assert!(missing.is_empty(), "acknowledged but not stored: {missing:?}");
    let (seen, all) = balances::seen_and_stored(db).await;
    assert_eq!(seen, all, "every event projected exactly once");
    assert_eq!(balances::rows(db).await, balances::folded(&store).await);
}

/// A daemon running the recorded balances, with short timings.
async fn recorded_daemon(store: EventStore) -> DaemonHandle {
    Daemon::new(store)
        .projection("balances", balances::recorded_registry())
        .lease_ttl(Duration::from_secs(2))
        .renew_every(Duration::from_millis(300))
        .backoff(Duration::from_millis(100), Duration::from_millis(500))
        .start()
        .await
        .expect("start")
}

/// Every connection of the database is killed again and again while a writer appends and a
/// daemon projects: appends succeed or fail with a typed error, none is stored twice and every
/// success is stored; the daemon reconnects and ends with every event projected exactly once.
async fn killed_connections_lose_and_repeat_nothing(db: TestDb) {
    balances::create_recorded_tables(&db.db).await;
    let daemon = recorded_daemon(EventStore::new(db.second_pool().await)).await;
    let writer = TaggedWriter::start(EventStore::new(db.second_pool().await), 1);
    let killer = sea_orm::Database::connect(&db.url).await.unwrap();
    let mut killed = 0;
    let until = std::time::Instant::now() + Duration::from_secs(3 * scale());
    while std::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(150)).await;
        killed += common::kill_connections(&killer, false).await;
    }
    let (written, failed) = writer.stop().await;
    nothing_lost_or_repeated(&db.db, &daemon, &written).await;
    eprintln!(
        "killed connections: {killed} killed; {} appends acknowledged, {} typed errors",
        written.len(),
        failed.len()
    );
    daemon.stop().await.expect("stop");
}

/// Reads while every connection is killed again and again: a read is retried (it is always safe
/// to), and one that still fails never says it may have written.
async fn reads_outlast_killed_connections(db: TestDb) {
    let store = EventStore::new(db.second_pool().await);
    store
        .append_to_stream("r", (1..=20).map(|amount| Ev::Deposited { amount }), AppendOptions::default())
        .await
        .unwrap();
    let killer = sea_orm::Database::connect(&db.url).await.unwrap();
    let reading = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let reader = {
        let (store, reading) = (store.clone(), std::sync::Arc::clone(&reading));
        tokio::spawn(async move {
            let (mut reads, mut failures) = (0, Vec::new());
            while reading.load(std::sync::atomic::Ordering::SeqCst) {
                let read = store.read_stream::<Ev>("r", ReadOptions::default()).await.map(|r| r.events.len());
                let folded = store.aggregate_stream("r", |n: usize, _: &Ev| n + 1, || 0, ReadOptions::default());
                for done in [read, folded.await.map(|a| a.state)] {
                    reads += 1;
                    match done {
                        Ok(n) => assert_eq!(n, 20),
                        Err(error) => failures.push(error),
                    }
                }
            }
            (reads, failures)
        })
    };
    let until = std::time::Instant::now() + Duration::from_secs(2);
    let mut killed = 0;
    while std::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(100)).await;
        killed += common::kill_connections(&killer, false).await;
    }
    reading.store(false, std::sync::atomic::Ordering::SeqCst);
    let (reads, failures) = reader.await.unwrap();
    eprintln!("reads under kills: {killed} killed, {reads} reads, {} failed", failures.len());
    assert!(killed > 5 && reads >= 10, "{killed} kills, {reads} reads");
    for failure in &failures {
        assert!(
            matches!(failure, Error::ConnectionLost { maybe_written: false, .. } | Error::Busy { .. }),
            "{failure:?}"
        );
    }
    assert!(failures.len() * 20 <= reads, "reads were not retried: {} of {reads} failed", failures.len());
}

/// A PostgreSQL cluster of the test's own (initdb, pg_ctl), on a port of its own, removed when
/// dropped: a server the test may restart.
struct OwnCluster {
    bin: std::path::PathBuf,
    dir: std::path::PathBuf,
    port: u16,
}

impl OwnCluster {
    fn start() -> Self {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .ok()
            .and_then(|versions| versions.filter_map(|v| v.ok()).map(|v| v.path().join("bin")).max())
            .filter(|bin| bin.join("initdb").exists())
            .unwrap_or_else(|| {
                common::unavailable(
                    "initdb and pg_ctl",
                    "no /usr/lib/postgresql/*/bin",
                    "Install postgresql (.ci/run does).",
                )
            });
        let dir = std::env::temp_dir().join(format!("emt-cluster-{}", uuid::Uuid::now_v7().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let port = 20_000 + (std::process::id() % 10_000) as u16;
        let cluster = Self { bin, dir, port };
        // PostgreSQL refuses to run as root: as root, the cluster belongs to `postgres`.
        if unsafe { libc::geteuid() } == 0 {
            cluster.run("chown", &["postgres", cluster.dir.to_str().unwrap()]);
        }
        cluster.pg("initdb", &["-D", cluster.dir.to_str().unwrap(), "-A", "trust", "-U", "postgres", "--no-sync"]);
        cluster.ctl("start");
        cluster
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// `pg_ctl start` or `restart -m immediate` (a crash: no shutdown checkpoint, recovery on start).
    fn ctl(&self, action: &str) {
        let options = format!("-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off", self.port, self.dir.display());
        let dir = self.dir.to_str().unwrap();
        let log = self.dir.join("log");
        let mut args = vec!["-D", dir, "-o", &options, "-l", log.to_str().unwrap(), "-w", action];
        if action != "start" {
            args.extend(["-m", "immediate"]);
        }
        self.pg("pg_ctl", &args);
    }

    fn pg(&self, tool: &str, args: &[&str]) {
        let tool = self.bin.join(tool);
        match unsafe { libc::geteuid() } == 0 {
            true => self.run("runuser", &[&["-u", "postgres", "--", tool.to_str().unwrap()][..], args].concat()),
            false => self.run(tool.to_str().unwrap(), args),
        }
    }

    fn run(&self, program: &str, args: &[&str]) {
        let output = std::process::Command::new(program).args(args).output().unwrap();
        let log = std::fs::read_to_string(self.dir.join("log")).unwrap_or_default();
        assert!(output.status.success(), "{program} {args:?}: {}\n{log}", String::from_utf8_lossy(&output.stderr));
    }
}

impl Drop for OwnCluster {
    fn drop(&mut self) {
        let _ = std::panic::catch_unwind(|| {
            self.pg("pg_ctl", &["-D", self.dir.to_str().unwrap(), "-m", "immediate", "stop"])
        });
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The PostgreSQL server crashes and restarts twice while a writer appends and a daemon
/// projects: appends succeed or fail typed, the daemon reconnects, nothing is lost or repeated.
#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restarted_server_loses_and_repeats_nothing() {
    let cluster = OwnCluster::start();
    restarts_lose_and_repeat_nothing(&cluster.url(), || cluster.ctl("restart")).await;
}

/// The same with a MariaDB/MySQL server of the test's own, killed (SIGKILL: InnoDB recovers on
/// start) and started again twice.
#[cfg(feature = "mysql")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restarted_mysql_server_loses_and_repeats_nothing() {
    let server = OwnMariaDb::start();
    let admin = emmett_seaorm::connect(server.url("")).await.expect("connect to the own server");
    // Read-model tables get exact keys, as the store requires.
    let collation = emmett_seaorm::migrations::exact_collation(&admin).await.unwrap().expect("an exact collation");
    admin.execute_unprepared(&format!("CREATE DATABASE emt CHARACTER SET utf8mb4 COLLATE {collation}")).await.unwrap();
    admin.close().await.ok();
    restarts_lose_and_repeat_nothing(&server.url("emt"), || server.restart()).await;
    assert_eq!(server.starts(), 3, "started once and restarted twice");
}

/// A writer appends and a daemon projects on the server at `url` while `restart` crashes and
/// restarts it twice: appends succeed or fail typed, the daemon reconnects, nothing is lost or
/// repeated.
async fn restarts_lose_and_repeat_nothing(url: &str, restart: impl Fn()) {
    let db = emmett_seaorm::connect(url).await.expect("connect to the own server");
    emmett_seaorm::migrate(&db).await.unwrap();
    balances::create_recorded_tables(&db).await;
    let daemon = recorded_daemon(EventStore::new(emmett_seaorm::connect(url).await.unwrap())).await;
    let writer = TaggedWriter::start(EventStore::new(emmett_seaorm::connect(url).await.unwrap()), 1);
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_millis(800)).await;
        restart();
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    let (written, failed) = writer.stop().await;
    nothing_lost_or_repeated(&db, &daemon, &written).await;
    eprintln!(
        "restarted server: {} appends acknowledged, {} typed errors: {:?}",
        written.len(),
        failed.len(),
        failed.first()
    );
    daemon.stop().await.expect("stop");
}

/// A MariaDB server of the test's own (`mariadb-install-db`, `mariadbd` without grant tables),
/// on a port of its own, removed when dropped: a server the test may kill and start again.
#[cfg(feature = "mysql")]
struct OwnMariaDb {
    dir: std::path::PathBuf,
    port: u16,
    server: std::sync::Mutex<std::process::Child>,
}

#[cfg(feature = "mysql")]
impl OwnMariaDb {
    fn start() -> Self {
        let install = ["mariadb-install-db", "mysql_install_db"]
            .into_iter()
            .find(|tool| std::process::Command::new(tool).arg("--help").output().is_ok())
            .unwrap_or_else(|| {
                common::unavailable(
                    "mariadb-install-db and mariadbd",
                    "not on PATH",
                    "Install mariadb-server (.ci/run does).",
                )
            });
        let dir = std::env::temp_dir().join(format!("emt-mariadb-{}", uuid::Uuid::now_v7().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let root = unsafe { libc::geteuid() } == 0;
        if root {
            // mariadbd refuses to run as root: as root, the server runs as `mysql`.
            let chown = std::process::Command::new("chown").args(["mysql", dir.to_str().unwrap()]).status().unwrap();
            assert!(chown.success(), "chown mysql {}", dir.display());
        }
        let data = format!("--datadir={}", dir.join("data").display());
        let mut args = vec![data.as_str(), "--auth-root-authentication-method=normal", "--skip-test-db"];
        if root {
            args.push("--user=mysql");
        }
        let output = std::process::Command::new(install).args(&args).output().unwrap();
        assert!(output.status.success(), "{install}: {}", String::from_utf8_lossy(&output.stderr));
        let port = 30_000 + (std::process::id() % 10_000) as u16;
        let server = std::sync::Mutex::new(Self::spawn(&dir, port));
        let own = Self { dir, port, server };
        own.wait_until_up();
        own
    }

    fn spawn(dir: &std::path::Path, port: u16) -> std::process::Child {
        let mut server = std::process::Command::new("mariadbd");
        server.args([
            format!("--datadir={}", dir.join("data").display()),
            format!("--port={port}"),
            format!("--socket={}", dir.join("sock").display()),
            format!("--log-error={}", dir.join("err.log").display()),
            "--bind-address=127.0.0.1".to_owned(),
            "--skip-grant-tables".to_owned(),
            "--innodb-flush-log-at-trx-commit=2".to_owned(),
        ]);
        if unsafe { libc::geteuid() } == 0 {
            server.arg("--user=mysql");
        }
        let path = std::env::var("PATH").unwrap_or_default();
        server.env("PATH", format!("{path}:/usr/sbin")).stdout(std::process::Stdio::null());
        server.spawn().expect("start mariadbd")
    }

    fn wait_until_up(&self) {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            let log = std::fs::read_to_string(self.dir.join("err.log")).unwrap_or_default();
            assert!(std::time::Instant::now() < deadline, "mariadbd did not start:\n{log}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn url(&self, database: &str) -> String {
        format!("mysql://root@127.0.0.1:{}/{database}", self.port)
    }

    /// How many times the server got ready for connections (its error log says so each time).
    fn starts(&self) -> usize {
        std::fs::read_to_string(self.dir.join("err.log")).unwrap_or_default().matches("ready for connections").count()
    }

    /// Kills the server (SIGKILL: a crash) and starts it again.
    fn restart(&self) {
        let mut server = self.server.lock().unwrap();
        server.kill().ok();
        server.wait().ok();
        *server = Self::spawn(&self.dir, self.port);
        drop(server);
        self.wait_until_up();
    }
}

#[cfg(feature = "mysql")]
impl Drop for OwnMariaDb {
    fn drop(&mut self) {
        let mut server = self.server.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        server.kill().ok();
        server.wait().ok();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

mod servers {
    use super::*;
    conformance!(
        servers: a_tenants_work_never_touches_anothers_rows,
        killed_connections_lose_and_repeat_nothing,
        reads_outlast_killed_connections
    );
}
