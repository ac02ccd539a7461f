//! Interop with the TypeScript package `@wataruoguchi/emmett-event-store-kysely` on one
//! PostgreSQL database: a real Node.js service (`interop/ts-service.mjs`) and this crate take
//! turns appending, reading, aggregating and projecting the same streams into the same read model.
//!
//! Needs `node` and `npm ci --prefix interop` (`.ci/run` does it); fails saying so without them.
//! Compiled with the `postgres` feature only.

#![cfg(feature = "postgres")]

mod common;

use emmett_seaorm::projection::{
    ProjectionRegistry, ProjectionRunner, RunOptions, SnapshotProjection, construct_stream_id,
};
use emmett_seaorm::upcast::{RawEvent, Upcasters};
use emmett_seaorm::{AppendOptions, EventStore, ExpectedVersion, ReadOptions, RecordedEvent, columns, keys};
use sea_orm::{ConnectionTrait, DatabaseConnection};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

const TENANT: &str = "tenant-1";

/// The carts read model of the TypeScript peer benchmark.
const CARTS_TABLE: &str = "CREATE TABLE IF NOT EXISTS carts (
  tenant_id text NOT NULL, cart_id text NOT NULL, item_count integer, total bigint,
  PRIMARY KEY (cart_id, tenant_id))";

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(tag = "type", content = "data")]
enum CartEvent {
    CartCreated {
        #[serde(rename = "cartId")]
        cart_id: String,
    },
    ItemAdded {
        sku: String,
        qty: i64,
        price: i64,
    },
}

/// The state the TypeScript service folds: `{ items, total }`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
struct Cart {
    items: i64,
    total: i64,
}

fn evolve(cart: Cart, event: &CartEvent) -> Cart {
    match event {
        CartEvent::CartCreated { .. } => Cart::default(),
        CartEvent::ItemAdded { qty, price, .. } => Cart { items: cart.items + qty, total: cart.total + qty * price },
    }
}

fn item(sku: &str, qty: i64, price: i64) -> CartEvent {
    CartEvent::ItemAdded { sku: sku.into(), qty, price }
}

/// The same projection as the TypeScript service's, into `table`.
fn carts_projection(table: &str) -> SnapshotProjection<CartEvent, Cart> {
    SnapshotProjection::new(
        table,
        |e: &RecordedEvent<CartEvent>, partition: &str| keys! { "tenant_id" => partition, "cart_id" => &e.stream_id },
        evolve,
        Cart::default,
    )
    .handles(["CartCreated", "ItemAdded"])
    .columns(|c: &Cart| columns! { "item_count" => c.items, "total" => c.total })
}

fn carts_runner(store: &EventStore, table: &str) -> ProjectionRunner<CartEvent> {
    ProjectionRunner::new(store.clone(), ProjectionRegistry::new().with(carts_projection(table)))
}

/// Runs one step of the TypeScript service and returns what it printed; fails the test, saying
/// what to install, when Node.js or the package is missing.
fn typescript(url: &str, step: &str) -> Value {
    common::node::run("ts-service.mjs", &[step], &[("DATABASE_URL", url), ("TENANT", TENANT)], None)
}

async fn aggregate(store: &EventStore, cart: &str) -> Cart {
    let options = ReadOptions::default().partition(TENANT);
    store.aggregate_stream(cart, evolve, Cart::default, options).await.unwrap().state
}

/// `(cart_id, item_count, total)` of every cart of the tenant in `table`.
async fn rows(db: &DatabaseConnection, table: &str) -> Vec<(String, i64, i64)> {
    let sql =
        format!("SELECT cart_id, item_count::bigint, total FROM {table} WHERE tenant_id = '{TENANT}' ORDER BY cart_id");
    let rows = db.query_all_raw(sea_orm::Statement::from_string(db.get_database_backend(), sql)).await.unwrap();
    rows.iter()
        .map(|r| (r.try_get_by_index(0).unwrap(), r.try_get_by_index(1).unwrap(), r.try_get_by_index(2).unwrap()))
        .collect()
}

/// The whole round trip, on a database whose event-store schema is in place.
async fn round_trip(url: String, db: DatabaseConnection) {
    db.execute_unprepared(CARTS_TABLE).await.unwrap();
    db.execute_unprepared(&CARTS_TABLE.replace("carts", "cart_totals")).await.unwrap();
    let store = EventStore::new(db.clone());
    store.create_partition(TENANT).await.unwrap();
    let on_tenant = || AppendOptions::default().partition(TENANT).stream_type("cart");

    // 1. We write a cart; the TypeScript service reads, aggregates and projects it, appends to
    //    it at the version we left, and starts a cart of its own.
    let ours =
        [CartEvent::CartCreated { cart_id: "cart-rs".into() }, item("a", 1, 100), item("b", 2, 150), item("c", 1, 75)];
    store.append_to_stream("cart-rs", ours, on_tenant().expected(ExpectedVersion::NoStream)).await.unwrap();
    let first = typescript(&url, "first");

    let recorded =
        store.read_stream::<CartEvent>("cart-rs", ReadOptions::default().partition(TENANT)).await.unwrap().events;
    let seen: Vec<Value> = recorded[..4]
        .iter()
        .map(|e| json!({ "type": e.message_type, "data": serde_json::to_value(&e.event).unwrap()["data"], "streamPosition": e.stream_position, "globalPosition": e.global_position }))
        .collect();
    assert_eq!(first["events"], json!(seen), "the TypeScript service reads our events as stored");
    assert_eq!(first["currentStreamVersion"], 4);
    assert_eq!(first["state"], json!(Cart { items: 4, total: 475 }), "its aggregate folds our events");
    assert_eq!(first["processed"], 4);
    assert_eq!((first["appendedVersion"].as_u64(), first["createdVersion"].as_u64()), (Some(5), Some(3)));
    assert_eq!(
        (recorded[4].stream_position, &recorded[4].event),
        (5, &item("sku-ts", 1, 500)),
        "we read what it appended"
    );

    // 2. We read what it appended, append to its stream at its version, and resume both
    //    projections from the checkpoints and snapshots it left.
    let theirs = store.read_stream::<CartEvent>("cart-ts", ReadOptions::default().partition(TENANT)).await.unwrap();
    let events: Vec<CartEvent> = theirs.events.iter().map(|e| e.event.clone()).collect();
    assert_eq!(
        events,
        [CartEvent::CartCreated { cart_id: "cart-ts".into() }, item("sku-1", 2, 100), item("sku-2", 1, 250)]
    );
    assert_eq!(theirs.events.iter().map(|e| e.stream_position).collect::<Vec<_>>(), [1, 2, 3]);
    assert_eq!(aggregate(&store, "cart-rs").await, Cart { items: 5, total: 975 });
    store
        .append_to_stream("cart-ts", [item("sku-3", 1, 50)], on_tenant().expected(ExpectedVersion::Exact(3)))
        .await
        .unwrap();

    let runner = carts_runner(&store, "carts");
    let options = || RunOptions::default().partition(TENANT);
    let resumed = runner.project_events("carts:cart-rs", "cart-rs", options()).await.unwrap();
    assert_eq!((resumed.processed, resumed.current_stream_version), (1, 5), "resumes after the TypeScript checkpoint");
    let fresh = runner.project_events("carts:cart-ts", "cart-ts", options()).await.unwrap();
    assert_eq!((fresh.processed, fresh.current_stream_version), (4, 4));
    assert_eq!(rows(&db, "carts").await, [("cart-rs".into(), 5, 975), ("cart-ts".into(), 4, 500)]);

    // Our partition runner sees the events both sides appended.
    store
        .append_to_stream("cart-rs", [item("d", 3, 10)], on_tenant().expected(ExpectedVersion::Exact(5)))
        .await
        .unwrap();
    store
        .append_to_stream("cart-ts", [item("sku-4", 2, 5)], on_tenant().expected(ExpectedVersion::Exact(4)))
        .await
        .unwrap();
    let all = carts_runner(&store, "cart_totals")
        .project_partition("cart-totals", RunOptions::default().partition(TENANT))
        .await
        .unwrap();
    assert_eq!(all.processed, 11);
    let expected = vec![("cart-rs".to_owned(), 8, 1005), ("cart-ts".to_owned(), 6, 510)];
    assert_eq!(rows(&db, "cart_totals").await, expected);

    // 3. The TypeScript service resumes both projections from our checkpoints and snapshots.
    let second = typescript(&url, "second");
    assert_eq!(second["processed"], json!({ "cart-rs": 1, "cart-ts": 1 }), "resumes after our checkpoints");
    assert_eq!(second["states"]["cart-rs"], json!(aggregate(&store, "cart-rs").await));
    assert_eq!(second["states"]["cart-ts"], json!(aggregate(&store, "cart-ts").await));
    assert_eq!(rows(&db, "carts").await, expected, "both runners built one read model");
    let snapshot = |cart: &str, position: u64, state: Cart| json!({ "streamId": construct_stream_id(&keys! { "tenant_id" => TENANT, "cart_id" => cart }), "lastStreamPosition": position, "snapshot": state });
    assert_eq!(
        second["snapshots"],
        json!([
            snapshot("cart-rs", 6, Cart { items: 8, total: 1005 }),
            snapshot("cart-ts", 5, Cart { items: 6, total: 510 })
        ]),
        "one snapshot per cart, under the TypeScript stream id"
    );

    // 4. A projection daemon follows what the TypeScript service appends (no notification
    //    comes from it: found by polling), into a read model equal to the others'.
    db.execute_unprepared(&CARTS_TABLE.replace("carts", "cart_daemon")).await.unwrap();
    let daemon = emmett_seaorm::daemon::Daemon::new(store.clone())
        .projection("cart-daemon", ProjectionRegistry::new().with(carts_projection("cart_daemon")))
        .start()
        .await
        .unwrap();
    let third = typescript(&url, "third");
    let last = store.read_stream::<CartEvent>("cart-ts", ReadOptions::default().partition(TENANT)).await.unwrap();
    let last = last.events.last().unwrap().global_position.max(third["lastGlobalPosition"].as_u64().unwrap_or(0));
    tokio::time::timeout(std::time::Duration::from_secs(10), daemon.caught_up(last)).await.unwrap().unwrap();
    let expected = vec![("cart-rs".to_owned(), 9, 1012), ("cart-ts".to_owned(), 8, 516)];
    assert_eq!(rows(&db, "cart_daemon").await, expected);
    daemon.stop().await.unwrap();

    // 5. A later release of ours turned `ItemAdded.price` into money. The TypeScript package
    //    stores each event's index in its append as `message_schema_version` ("0", "1", "2"):
    //    its rows are at version 1 and read at the new shape through the upcaster.
    let sql = "SELECT DISTINCT message_schema_version FROM messages WHERE stream_id = 'cart-ts' ORDER BY 1";
    let stored = db.query_all_raw(sea_orm::Statement::from_string(sea_orm::DbBackend::Postgres, sql)).await.unwrap();
    let stored: Vec<String> = stored.iter().map(|r| r.try_get_by_index(0).unwrap()).collect();
    assert!(stored.contains(&"0".to_owned()) && stored.contains(&"2".to_owned()), "indexes, not versions: {stored:?}");
    let money = Upcasters::new().step("ItemAdded", 1, |mut e: RawEvent| {
        let cents = e.data["price"].take();
        e.data["price"] = json!({ "cents": cents, "currency": "EUR" });
        vec![e]
    });
    let later = EventStore::new(db.clone()).with_upcasters(money).unwrap();
    let read = later.read_stream::<CartV2>("cart-ts", ReadOptions::default().partition(TENANT)).await.unwrap();
    let before = store.read_stream::<CartEvent>("cart-ts", ReadOptions::default().partition(TENANT)).await.unwrap();
    assert_eq!(read.events.len(), before.events.len());
    for (new, old) in read.events.iter().zip(&before.events) {
        match (&new.event, &old.event) {
            (CartV2::ItemAdded { price, .. }, CartEvent::ItemAdded { price: cents, .. }) => {
                assert_eq!((price.cents, price.currency.as_str()), (*cents, "EUR"))
            }
            (CartV2::CartCreated { cart_id }, CartEvent::CartCreated { cart_id: old }) => assert_eq!(cart_id, old),
            other => panic!("upcast changed the event's type: {other:?}"),
        }
    }
    // Aggregated and projected (a runner's rebuild) by the new code: the same carts as before.
    let evolve_v2 = |cart: Cart, e: &CartV2| match e {
        CartV2::CartCreated { .. } => Cart::default(),
        CartV2::ItemAdded { qty, price, .. } => Cart { items: cart.items + qty, total: cart.total + qty * price.cents },
    };
    let options = || ReadOptions::default().partition(TENANT);
    for cart in ["cart-rs", "cart-ts"] {
        let state = later.aggregate_stream(cart, evolve_v2, Cart::default, options()).await.unwrap().state;
        assert_eq!(state, aggregate(&store, cart).await, "{cart} aggregated at the new shape");
    }
    db.execute_unprepared(&CARTS_TABLE.replace("carts", "cart_v2")).await.unwrap();
    let projection = SnapshotProjection::new(
        "cart_v2",
        |e: &RecordedEvent<CartV2>, partition: &str| keys! { "tenant_id" => partition, "cart_id" => &e.stream_id },
        evolve_v2,
        Cart::default,
    )
    .columns(|c: &Cart| columns! { "item_count" => c.items, "total" => c.total });
    let runner = ProjectionRunner::new(later.clone(), ProjectionRegistry::new().with(projection));
    runner.rebuild("cart-v2", RunOptions::default(), |_| {}).await.unwrap();
    assert_eq!(rows(&db, "cart_v2").await, rows(&db, "cart_daemon").await);
}

/// The cart events of a later release of ours: prices are money.
#[derive(Serialize, Deserialize, Debug, PartialEq)]
#[serde(tag = "type", content = "data")]
enum CartV2 {
    CartCreated {
        #[serde(rename = "cartId")]
        cart_id: String,
    },
    ItemAdded {
        sku: String,
        qty: i64,
        price: Money,
    },
}

#[derive(Serialize, Deserialize, Debug, PartialEq)]
struct Money {
    cents: i64,
    currency: String,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typescript_service_on_our_schema() {
    let url = common::empty_postgres().await;
    let db = emmett_seaorm::connect(&url).await.unwrap();
    emmett_seaorm::migrate(&db).await.unwrap();
    round_trip(url.clone(), db).await;
    common::drop_database(&url).await;
}

/// The schema the TypeScript package's migration created, then ours run over it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typescript_service_on_its_own_schema() {
    let url = common::empty_postgres().await;
    let db = emmett_seaorm::connect(&url).await.unwrap();
    db.execute_unprepared(include_str!("../interop/kysely-schema.sql")).await.unwrap();
    emmett_seaorm::migrate(&db).await.unwrap();
    round_trip(url.clone(), db).await;
    common::drop_database(&url).await;
}
