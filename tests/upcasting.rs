//! Conformance suite of event schema evolution, on every backend: events written at old shapes
//! (by the code of an older release) are read, aggregated, projected by a runner and by the
//! daemon, and rebuilt at the current shapes, with positions and expected versions unchanged.

mod common;

use std::time::Duration;

use common::TestDb;
use emmett_seaorm::daemon::Daemon;
use emmett_seaorm::projection::{ProjectionRegistry, ProjectionRunner, RunOptions, SnapshotProjection};
use emmett_seaorm::upcast::{RawEvent, Upcasters};
use emmett_seaorm::{AppendOptions, Error, EventStore, ExpectedVersion, ReadOptions, columns, keys};
use sea_orm::sea_query::{Alias, ColumnDef, Index, Table};
use sea_orm::{ConnectionTrait, DbBackend, Statement};
use serde::{Deserialize, Serialize};
use serde_json::json;

/// The events as the older release wrote them (all at version 1).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(tag = "type", content = "data")]
enum Old {
    /// `qty` became `quantity`.
    ItemAdded { sku: String, qty: u32 },
    /// Split into `ItemRemoved` + `PriceChanged`.
    ItemReplaced { sku: String, cents: i64 },
    /// Renamed `CartCheckedOut`.
    CheckedOut,
    /// Dropped.
    Viewed,
}

/// The events as the current code knows them.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(tag = "type", content = "data")]
enum CartEvent {
    ItemAdded { sku: String, quantity: u32 },
    ItemRemoved { sku: String },
    PriceChanged { sku: String, price: Money },
    CartCheckedOut,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
struct Money {
    cents: i64,
    currency: String,
}

fn upcasters() -> Upcasters {
    Upcasters::new()
        .step("ItemAdded", 1, |mut e: RawEvent| {
            e.rename_field("qty", "quantity");
            vec![e]
        })
        .step("ItemReplaced", 1, |e: RawEvent| {
            let sku = e.data["sku"].clone();
            let price = json!({ "cents": e.data["cents"], "currency": "EUR" });
            vec![
                e.renamed("ItemRemoved", json!({ "sku": sku })),
                e.renamed("PriceChanged", json!({ "sku": sku, "price": price })),
            ]
        })
        .current("ItemRemoved", 2)
        .current("PriceChanged", 2)
        .step("CheckedOut", 1, |e: RawEvent| vec![e.renamed("CartCheckedOut", json!({}))])
        .current("CartCheckedOut", 2)
        .step("Viewed", 1, |_| vec![])
}

/// What the current code expects from the old stream of [`write_old`], in order, with the
/// stored stream position each event carries.
fn expected() -> Vec<(u64, CartEvent)> {
    vec![
        (1, CartEvent::ItemAdded { sku: "a".into(), quantity: 2 }),
        (3, CartEvent::ItemRemoved { sku: "a".into() }),
        (3, CartEvent::PriceChanged { sku: "a".into(), price: Money { cents: 250, currency: "EUR".into() } }),
        (4, CartEvent::CartCheckedOut),
    ]
}

/// The older release's stream: added, viewed (dropped), replaced (split), checked out, viewed
/// (dropped: the stream's last event).
async fn write_old(store: &EventStore, tenant: &str) -> u64 {
    let events = [
        Old::ItemAdded { sku: "a".into(), qty: 2 },
        Old::Viewed,
        Old::ItemReplaced { sku: "a".into(), cents: 250 },
        Old::CheckedOut,
        Old::Viewed,
    ];
    let options = AppendOptions::default().partition(tenant);
    store.append_to_stream("cart-1", events, options).await.expect("append old").last_event_global_position
}

/// The stored `message_schema_version`s of a tenant's stream, in order.
async fn stored_versions(db: &TestDb, tenant: &str) -> Vec<String> {
    let backend = db.db.get_database_backend();
    let p = if backend == DbBackend::MySql { "`partition`" } else { "partition" };
    let sql = format!("SELECT message_schema_version FROM messages WHERE {p} = '{tenant}' ORDER BY stream_position");
    let rows = db.db.query_all_raw(Statement::from_string(backend, sql)).await.expect("versions");
    rows.iter().map(|r| r.try_get_by_index::<String>(0).expect("version")).collect()
}

async fn old_rows_are_read_and_aggregated_at_the_current_shapes(db: TestDb) {
    let old = EventStore::new(db.db.clone());
    write_old(&old, "t1").await;
    let store = db.store().with_upcasters(upcasters()).expect("upcasters");
    let read = store.read_stream::<CartEvent>("cart-1", ReadOptions::default().partition("t1")).await.expect("read");
    let got: Vec<(u64, CartEvent)> = read.events.iter().map(|e| (e.stream_position, e.event.clone())).collect();
    assert_eq!(got, expected());
    assert_eq!(read.current_stream_version, 5, "versions count stored rows");
    // Raw JSON shows the current shapes too; the store without upcasters shows the rows.
    let raw = old.read_stream::<serde_json::Value>("cart-1", ReadOptions::default().partition("t1")).await.unwrap();
    assert_eq!(raw.events.len(), 5);
    assert_eq!(raw.events[2].message_type, "ItemReplaced");

    let folded = store
        .aggregate_stream(
            "cart-1",
            |mut items: Vec<String>, e: &CartEvent| {
                items.push(format!("{e:?}"));
                items
            },
            Vec::new,
            ReadOptions::default().partition("t1"),
        )
        .await
        .expect("aggregate");
    assert_eq!(folded.state.len(), 4);
    assert_eq!(folded.current_stream_version, 5);
    // `max_count` counts stored rows, in both readers: the split row 3 is one row, two events.
    let count = |events: usize| assert_eq!(events, 2, "row 3 read alone gives its two events");
    let one_row = ReadOptions::default().partition("t1").from(3).max_count(1);
    count(store.read_stream::<CartEvent>("cart-1", one_row.clone()).await.expect("read row 3").events.len());
    let fold = |mut n: usize, _: &CartEvent| {
        n += 1;
        n
    };
    count(store.aggregate_stream("cart-1", fold, || 0, one_row).await.expect("aggregate row 3").state);
    // A page that ends on a dropped row (row 2) goes on after it.
    let two_rows = ReadOptions::default().partition("t1").max_count(2);
    assert_eq!(store.aggregate_stream("cart-1", fold, || 0, two_rows).await.unwrap().state, 1);
    // Appending after it at the stored version holds; the new row is written at version 2.
    let options = AppendOptions::default().partition("t1").expected(ExpectedVersion::Exact(5));
    store.append_to_stream("cart-1", [CartEvent::CartCheckedOut], options).await.expect("append at the stored version");
    assert_eq!(stored_versions(&db, "t1").await, ["1", "1", "1", "1", "1", "v2"]);
    let again = store.read_stream::<CartEvent>("cart-1", ReadOptions::default().partition("t1")).await.unwrap();
    assert_eq!(again.events.last().map(|e| (e.stream_position, e.event.clone())), Some((6, CartEvent::CartCheckedOut)));
}

async fn a_version_newer_than_the_code_is_a_typed_error(db: TestDb) {
    let newer = EventStore::new(db.db.clone()).with_upcasters(Upcasters::new().current("ItemAdded", 3)).unwrap();
    let options = AppendOptions::default().partition("t1");
    let item = CartEvent::ItemAdded { sku: "a".into(), quantity: 1 };
    newer.append_to_stream("cart-9", [item], options).await.expect("append v3");
    let store = db.store().with_upcasters(upcasters()).unwrap();
    let err = store.read_stream::<CartEvent>("cart-9", ReadOptions::default().partition("t1")).await.unwrap_err();
    match &err {
        Error::Upcast { stream, partition, position, message_type, version, reason, .. } => {
            assert_eq!((stream.as_str(), partition.as_str(), *position), ("cart-9", "t1", 1));
            assert_eq!((message_type.as_str(), *version), ("ItemAdded", Some(3)));
            assert!(reason.contains("newer than this code knows"), "{reason}");
        }
        other => panic!("expected Error::Upcast, got {other:?}"),
    }
    assert_eq!(err.event_position(), Some(1));
    // An inconsistent set is refused when registered.
    let gap = Upcasters::new().step("T", 1, |e: RawEvent| vec![e]).step("T", 3, |e: RawEvent| vec![e]);
    assert!(matches!(db.store().with_upcasters(gap), Err(Error::InvalidUpcasters { .. })));
}

/// The carts read model: items and the checked-out flag per cart.
fn carts() -> ProjectionRegistry<CartEvent> {
    let projection = SnapshotProjection::new(
        "upcast_carts",
        |e: &emmett_seaorm::RecordedEvent<CartEvent>, tenant: &str| keys! { "tenant_id" => tenant, "cart_id" => &e.stream_id },
        |mut state: (i64, i64, bool), e: &CartEvent| {
            match e {
                CartEvent::ItemAdded { quantity, .. } => state.0 += i64::from(*quantity),
                CartEvent::ItemRemoved { .. } => state.0 -= 1,
                CartEvent::PriceChanged { price, .. } => state.1 = price.cents,
                CartEvent::CartCheckedOut => state.2 = true,
            }
            state
        },
        || (0, 0, false),
    )
    .columns(|s: &(i64, i64, bool)| columns! { "items" => s.0, "price" => s.1, "checked_out" => s.2 });
    ProjectionRegistry::new().with(projection)
}

async fn create_carts_table(db: &TestDb) {
    let mut create = Table::create();
    create
        .table(Alias::new("upcast_carts"))
        .if_not_exists()
        .col(ColumnDef::new(Alias::new("tenant_id")).string_len(100).not_null())
        .col(ColumnDef::new(Alias::new("cart_id")).string_len(100).not_null())
        .col(ColumnDef::new(Alias::new("items")).big_integer().not_null())
        .col(ColumnDef::new(Alias::new("price")).big_integer().not_null())
        .col(ColumnDef::new(Alias::new("checked_out")).boolean().not_null())
        .primary_key(Index::create().col(Alias::new("tenant_id")).col(Alias::new("cart_id")));
    db.db.execute(&create).await.expect("create upcast_carts");
}

/// `(items, price, checked_out)` of a tenant's cart-1.
async fn cart_row(db: &TestDb, tenant: &str) -> Option<(i64, i64, bool)> {
    let sql = format!(
        "SELECT items, price, checked_out FROM upcast_carts WHERE tenant_id = '{tenant}' AND cart_id = 'cart-1'"
    );
    let row = db.db.query_one_raw(Statement::from_string(db.db.get_database_backend(), sql)).await.expect("row")?;
    Some((row.try_get_by_index(0).unwrap(), row.try_get_by_index(1).unwrap(), row.try_get_by_index(2).unwrap()))
}

async fn runners_and_the_daemon_project_old_rows_at_the_current_shapes(db: TestDb) {
    create_carts_table(&db).await;
    let old = EventStore::new(db.db.clone());
    write_old(&old, "t1").await;
    let last = write_old(&old, "t2").await;
    let store = db.store().with_upcasters(upcasters()).unwrap();
    // A fold of the upcasted events: 2 added, 1 removed, price 250, checked out.
    let want = Some((1, 250, true));

    // A runner, one row per batch: a split row's events go together.
    let runner = ProjectionRunner::new(store.clone(), carts());
    let options = RunOptions::default().partition("t1").batch_size(1);
    runner.project_partition("upcast-runner", options.clone()).await.expect("runner");
    while runner.project_partition("upcast-runner", options.clone()).await.expect("runner").processed > 0 {}
    assert_eq!(cart_row(&db, "t1").await, want);

    // The daemon, over both tenants (t1's row is folded already: skipped by position).
    let daemon = Daemon::new(store.clone()).projection("upcast-daemon", carts()).start().await.expect("start");
    tokio::time::timeout(Duration::from_secs(20), daemon.caught_up(last)).await.expect("in time").expect("caught up");
    daemon.stop().await.expect("stop");
    assert_eq!(cart_row(&db, "t1").await, want);
    assert_eq!(cart_row(&db, "t2").await, want);

    // A rebuild folds them again from the initial state, to the same rows.
    runner.rebuild("upcast-runner", RunOptions::default(), |_| {}).await.expect("rebuild");
    assert_eq!((cart_row(&db, "t1").await, cart_row(&db, "t2").await), (want, want));
}

async fn an_upcaster_that_panics_parks_only_its_tenant(db: TestDb) {
    create_carts_table(&db).await;
    let old = EventStore::new(db.db.clone());
    let last_good = write_old(&old, "good").await;
    old.append_to_stream("cart-1", [Old::Viewed], AppendOptions::default().partition("bad")).await.unwrap();
    let broken = upcasters().step("Broken", 1, |_| panic!("cannot upcast this"));
    let store = db.store().with_upcasters(broken).unwrap();
    let bad = RawEventWriter(EventStore::new(db.db.clone()));
    bad.write("bad").await;
    let daemon = Daemon::new(store.clone())
        .projection("upcast-panic", carts())
        .backoff(Duration::from_millis(50), Duration::from_millis(100))
        .retries(2)
        .start()
        .await
        .expect("start");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let status = daemon.status().await.expect("status");
        let bad = status.get("upcast-panic", "bad").cloned();
        if let Some(bad) = bad.filter(|b| b.parked) {
            let (error, _) = bad.last_error.expect("an error");
            assert!(error.contains("panicked: cannot upcast this"), "{error}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the bad tenant is not parked: {status:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let good = daemon.status().await.unwrap().get("upcast-panic", "good").cloned().expect("good");
    assert!(good.checkpoint >= last_good && !good.parked, "{good:?}");
    assert_eq!(cart_row(&db, "good").await, Some((1, 250, true)));
    daemon.stop().await.expect("stop");
}

/// Writes a `Broken` v1 event (a type whose only upcaster panics).
struct RawEventWriter(EventStore);

impl RawEventWriter {
    async fn write(&self, tenant: &str) {
        let event = json!({ "type": "Broken", "data": {} });
        self.0.append_to_stream("cart-1", [event], AppendOptions::default().partition(tenant)).await.expect("append");
    }
}

conformance!(
    old_rows_are_read_and_aggregated_at_the_current_shapes,
    a_version_newer_than_the_code_is_a_typed_error,
    runners_and_the_daemon_project_old_rows_at_the_current_shapes,
    an_upcaster_that_panics_parks_only_its_tenant,
);
