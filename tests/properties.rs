//! Property tests (proptest; the seeds of cases found failing are kept in
//! `tests/properties.proptest-regressions` and replayed first), beside the generated data of
//! `tests/reliability.rs` (event data round trips, stored rows of any type and data): on every
//! backend, any stream id and tenant round-trips or is refused with a typed error before
//! anything is written; a row another writer stored at any schema version, read through
//! upcasters, reads or fails with a typed error naming it, never a panic; the key encoding of
//! read-model rows tells any two key sets apart; the command line's parser takes any
//! arguments without panicking.

mod common;

use common::TestDb;
use common::raw::raw_message;
use emmett_seaorm::projection::construct_stream_id;
use emmett_seaorm::schema::{messages, streams};
use emmett_seaorm::{AppendOptions, Error, ReadOptions};
use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence, TestRunner};
use sea_orm::ConnectionTrait;
use sea_orm::sea_query::{Expr, ExprTrait, Query};
use serde_json::{Value, json};

/// Cases per property and backend.
const CASES: u32 = 48;

fn config(cases: u32) -> Config {
    let regressions = FileFailurePersistence::Direct("tests/properties.proptest-regressions");
    Config { cases, failure_persistence: Some(Box::new(regressions)), ..Config::default() }
}

fn runner() -> TestRunner {
    TestRunner::new(config(CASES))
}

/// Any JSON value (strings of any characters, numbers at the edges, nesting).
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(Value::from),
        any::<String>().prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            prop::collection::btree_map(any::<String>(), inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Ids: mostly ordinary, sometimes empty, long, with NULs or any characters.
fn any_id() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "[a-z0-9-]{1,12}",
        2 => any::<String>(),
        1 => Just(String::new()),
        1 => "[a-z]{0,3}\u{0}[a-z]{0,3}",
        1 => "x{250,260}",
    ]
}

/// Whether the store may refuse `e` (a NUL where PostgreSQL's `jsonb` or a SQL string can't
/// hold one): then with a typed error.
fn holds_nul(v: &Value) -> bool {
    match v {
        Value::String(s) => s.contains('\0'),
        Value::Array(items) => items.iter().any(holds_nul),
        Value::Object(map) => map.iter().any(|(k, v)| k.contains('\0') || holds_nul(v)),
        _ => false,
    }
}

async fn any_ids_round_trip_or_are_refused_typed(db: TestDb) {
    let store = db.store();
    let handle = tokio::runtime::Handle::current();
    let data = prop_oneof![
        Just(Value::Null),
        any::<i64>().prop_map(|n| json!({ "n": n })),
        any::<String>().prop_map(Value::from)
    ];
    let strategy = (any_id(), any_id(), "[A-Za-z][A-Za-z0-9_.]{0,20}", data);
    let case = std::sync::atomic::AtomicU64::new(0);
    let outcome = tokio::task::block_in_place(|| {
        runner()
            .run(&strategy, |(stream, partition, message_type, data)| {
                let stream = format!("{stream}{}", case.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
                let event = json!({ "type": message_type, "data": data });
                handle.block_on(async {
                    let options = AppendOptions::default().partition(&partition);
                    match store.append_to_stream(&stream, [event.clone()], options).await {
                        Ok(appended) => {
                            let read = ReadOptions::default().partition(&partition);
                            let read = store.read_stream::<Value>(&stream, read).await.expect("read what was appended");
                            prop_assert_eq!(read.current_stream_version, appended.next_expected_stream_version);
                            prop_assert_eq!(read.events.len(), 1);
                            let got = &read.events[0];
                            prop_assert_eq!(&got.message_type, &message_type);
                            // A unit variant's missing data reads back as `{}`.
                            let expected = if Value::is_null(&data) { &got.event["data"] } else { &data };
                            prop_assert_eq!(&got.event["data"], expected);
                            prop_assert_eq!((&got.stream_id, &got.partition), (&stream, &partition));
                        }
                        Err(Error::InvalidIdentifier { .. }) => {
                            let bad = |id: &str| id.is_empty() || id.contains('\0') || id.chars().count() > 255;
                            prop_assert!(bad(&stream) || bad(&partition), "refused ids {stream:?} / {partition:?}");
                        }
                        Err(Error::UnstorableEvent { .. }) | Err(Error::InvalidEvent { .. }) => {
                            prop_assert!(holds_nul(&event), "refused {event}");
                        }
                        Err(other) => prop_assert!(false, "untyped refusal of {event}: {other:?}"),
                    }
                    // Refused or not, the stream holds exactly what was accepted.
                    Ok(())
                })
            })
            .map_err(|failure| failure.to_string())
    });
    outcome.unwrap();
}

async fn any_stored_row_reads_or_fails_typed(db: TestDb) {
    // With an upcaster, so that every row's stored version is parsed.
    let upcasters = emmett_seaorm::upcast::Upcasters::new().step("Deposited", 1, |e| vec![e]);
    let store = db.store().with_upcasters(upcasters).unwrap();
    let handle = tokio::runtime::Handle::current();
    let message_type = prop_oneof![Just("Deposited".to_owned()), Just("Closed".to_owned()), any::<String>()];
    let version = prop_oneof![Just("1".to_owned()), Just("v2".to_owned()), Just("v3".to_owned()), any::<String>()];
    let data = prop_oneof![any_json(), any::<i64>().prop_map(|amount| json!({ "amount": amount }))];
    let strategy = (message_type, version, data);
    let outcomes = std::sync::Mutex::new(std::collections::BTreeSet::new());
    let case = std::sync::atomic::AtomicU64::new(0);
    let outcome = tokio::task::block_in_place(|| {
        runner().run(&strategy, |(message_type, version, data)| {
            let stream = format!("raw-{}", case.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
            handle.block_on(async {
                // A stream the store wrote, then a row another writer added at position 2.
                let first = json!({ "type": "Closed" });
                store.append_to_stream(&stream, [first], AppendOptions::default().partition("raw")).await.unwrap();
                let global = match db.db.get_database_backend() {
                    sea_orm::DbBackend::Sqlite => {
                        let bump = "UPDATE emt_global_message_position SET last_value = last_value + 1 WHERE id = 1 RETURNING last_value";
                        let row = db.db.query_one_raw(sea_orm::Statement::from_string(sea_orm::DbBackend::Sqlite, bump));
                        Some(Expr::val(row.await.unwrap().unwrap().try_get_by_index::<i64>(0).unwrap()))
                    }
                    _ => None,
                };
                let insert = raw_message("raw", &stream, 2, &message_type, data.clone().into(), global);
                let mut versioned = Query::update();
                versioned
                    .table(messages::Entity)
                    .value(messages::Column::MessageSchemaVersion, version.clone())
                    .and_where(Expr::col(messages::Column::StreamId).eq(stream.as_str()))
                    .and_where(Expr::col(messages::Column::StreamPosition).eq(2));
                let mut bump = Query::update();
                bump.table(streams::Entity)
                    .value(streams::Column::StreamPosition, 2)
                    .and_where(Expr::col(streams::Column::StreamId).eq(stream.as_str()));
                if db.db.execute(&insert).await.is_err() || db.db.execute(&versioned).await.is_err() {
                    // The database refused the row itself (e.g. a NUL in text): nothing to read.
                    return Ok(());
                }
                db.db.execute(&bump).await.unwrap();
                let options = || ReadOptions::default().partition("raw");
                let read = store.read_stream::<Value>(&stream, options()).await;
                let typed = store.read_stream::<common::Ev>(&stream, options()).await;
                for outcome in [read.map(|r| r.events.len()), typed.map(|r| r.events.len())] {
                    let seen = match outcome {
                        Ok(events) => {
                            prop_assert!(events <= 2, "{events} events from 2 rows");
                            "read"
                        }
                        Err(Error::MalformedEvent { stream: s, .. }) => {
                            prop_assert_eq!(&s, &stream);
                            "malformed"
                        }
                        Err(Error::UndecodableEvent { stream: s, position, .. }) => {
                            prop_assert_eq!((&s, position), (&stream, 2));
                            "undecodable"
                        }
                        Err(Error::Upcast { stream: s, .. }) => {
                            prop_assert_eq!(&s, &stream);
                            "upcast"
                        }
                        Err(other) => {
                            prop_assert!(false, "untyped failure reading {message_type:?} {version:?}: {other:?}");
                            unreachable!()
                        }
                    };
                    outcomes.lock().unwrap().insert(seen);
                }
                Ok(())
            })
        })
        .map_err(|failure| failure.to_string())
    });
    outcome.unwrap();
    // The cases reached both sides: rows read, and rows refused with a typed error.
    let outcomes = outcomes.into_inner().unwrap();
    assert!(outcomes.contains("read") && outcomes.len() >= 3, "{outcomes:?}");
}

conformance!(any_ids_round_trip_or_are_refused_typed, any_stored_row_reads_or_fails_typed);

proptest! {
    #![proptest_config(config(512))]

    /// Two different key sets never share a read-model row id.
    #[test]
    fn key_sets_are_told_apart(
        a in prop::collection::btree_map(any::<String>(), any::<String>(), 1..4),
        b in prop::collection::btree_map(any::<String>(), any::<String>(), 1..4),
    ) {
        let keys = |m: &std::collections::BTreeMap<String, String>| {
            m.iter().map(|(k, v)| (k.clone(), sea_orm::Value::from(v.clone()))).collect::<emmett_seaorm::projection::Keys>()
        };
        prop_assert_eq!(construct_stream_id(&keys(&a)) == construct_stream_id(&keys(&b)), a == b);
    }

    /// The command line parses any arguments or says why, without panicking.
    #[test]
    #[cfg(feature = "cli")]
    fn the_command_line_takes_any_arguments(args in prop::collection::vec(
        prop_oneof![
            Just("projections".to_owned()), Just("status".to_owned()), Just("partitions".to_owned()),
            Just("move".to_owned()), Just("--to".to_owned()), Just("--json".to_owned()), Just("--from".to_owned()),
            Just("streams".to_owned()), Just("read".to_owned()), Just("--stores".to_owned()), any::<String>(),
        ],
        0..6,
    )) {
        use clap::Parser;
        let _ = emmett_seaorm::cli::Cli::try_parse_from(std::iter::once("emmett-seaorm".to_owned()).chain(args));
    }
}
