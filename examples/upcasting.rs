//! The carts domain, a release later: `ItemAdded.price` in cents became a money object with a
//! currency, and `CartCreated` was renamed `CartOpened`. Rows written by the old release are
//! read, aggregated and projected by the new code through two upcasters.
//!
//! `cargo run --example upcasting` (embedded SQLite in memory; or `DATABASE_URL=…`).

use emmett_seaorm::projection::{ProjectionRegistry, ProjectionRunner, RunOptions, SnapshotProjection};
use emmett_seaorm::upcast::{RawEvent, Upcasters};
use emmett_seaorm::{AppendOptions, EventStore, ReadOptions, columns, keys};
use sea_orm::sea_query::{Alias, ColumnDef, Index, Table};
use sea_orm::{ConnectionTrait, Statement};
use serde::{Deserialize, Serialize};
use serde_json::json;

/// What the old release wrote.
mod v1 {
    use serde::{Deserialize, Serialize};

    #[derive(Serialize, Deserialize)]
    #[serde(tag = "type", content = "data")]
    pub enum CartEvent {
        CartCreated { currency: String },
        ItemAdded { sku: String, qty: u32, price: i64 },
    }
}

/// The current events.
#[derive(Serialize, Deserialize, Debug)]
#[serde(tag = "type", content = "data")]
enum CartEvent {
    CartOpened { currency: String },
    ItemAdded { sku: String, qty: u32, price: Money },
}

#[derive(Serialize, Deserialize, Debug, Clone)]
struct Money {
    cents: i64,
    currency: String,
}

#[derive(Serialize, Deserialize, Default, Debug)]
struct Cart {
    currency: String,
    items: u32,
    total_cents: i64,
}

fn evolve(mut cart: Cart, event: &CartEvent) -> Cart {
    match event {
        CartEvent::CartOpened { currency } => cart.currency = currency.clone(),
        CartEvent::ItemAdded { qty, price, .. } => {
            cart.items += qty;
            cart.total_cents += i64::from(*qty) * price.cents;
        }
    }
    cart
}

/// The two changes, as steps from version 1 to 2.
fn upcasters() -> Upcasters {
    Upcasters::new()
        .step("CartCreated", 1, |e: RawEvent| vec![e.renamed("CartOpened", e.data.clone())])
        .current("CartOpened", 2)
        // (The old rows had no currency per item: the cart's was EUR in that release.)
        .step("ItemAdded", 1, |mut e: RawEvent| {
            let cents = e.data["price"].take();
            e.data["price"] = json!({ "cents": cents, "currency": "EUR" });
            vec![e]
        })
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("DATABASE_URL").unwrap_or_else(|_| "sqlite::memory:".into());
    let mut options = emmett_seaorm::connect_options(&url);
    options.min_connections(1); // (an in-memory SQLite database lives as long as a connection)
    let db = sea_orm::Database::connect(emmett_seaorm::configure(options)).await?;
    emmett_seaorm::migrate(&db).await?;

    // The old release wrote these (a new cart per run, so it runs again on the same database).
    let id = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_nanos();
    let cart_id = format!("cart-{id}");
    let old = EventStore::new(db.clone());
    let tenant = AppendOptions::default().partition("acme");
    let events = [
        v1::CartEvent::CartCreated { currency: "EUR".into() },
        v1::CartEvent::ItemAdded { sku: "book".into(), qty: 2, price: 1500 },
    ];
    old.append_to_stream(&cart_id, events, tenant.clone()).await?;

    // The new release reads them at the current shapes, and appends at the current versions.
    let store = EventStore::new(db.clone()).with_upcasters(upcasters())?;
    let euros = Money { cents: 990, currency: "EUR".into() };
    store
        .append_to_stream(&cart_id, [CartEvent::ItemAdded { sku: "pen".into(), qty: 1, price: euros }], tenant)
        .await?;
    let read = store.read_stream::<CartEvent>(&cart_id, ReadOptions::default().partition("acme")).await?;
    for e in &read.events {
        println!("{} {:?}", e.stream_position, e.event);
    }
    let cart =
        store.aggregate_stream(&cart_id, evolve, Cart::default, ReadOptions::default().partition("acme")).await?;
    println!("aggregate at version {}: {:?}", cart.current_stream_version, cart.state);
    assert_eq!((cart.state.items, cart.state.total_cents), (3, 3990));

    // And projects them with the same `evolve`. (MySQL: the read model's keys compare exactly.)
    let collation = emmett_seaorm::migrations::exact_collation(&store).await?;
    let key = |name: &str| {
        let mut column = ColumnDef::new(Alias::new(name));
        column.string_len(100).not_null();
        if let Some(collation) = &collation {
            column.extra(format!("COLLATE {collation}"));
        }
        column
    };
    let mut create = Table::create();
    create
        .table(Alias::new("upcast_carts"))
        .if_not_exists()
        .col(key("tenant_id"))
        .col(key("cart_id"))
        .col(ColumnDef::new(Alias::new("total_cents")).big_integer().not_null())
        .primary_key(Index::create().col(Alias::new("tenant_id")).col(Alias::new("cart_id")));
    store.execute(&create).await?;
    let projection = SnapshotProjection::new(
        "upcast_carts",
        |e: &emmett_seaorm::RecordedEvent<CartEvent>, tenant: &str| keys! { "tenant_id" => tenant, "cart_id" => &e.stream_id },
        evolve,
        Cart::default,
    )
    .columns(|cart: &Cart| columns! { "total_cents" => cart.total_cents });
    let runner = ProjectionRunner::new(store.clone(), ProjectionRegistry::new().with(projection));
    runner.project_partition("upcast-carts", RunOptions::default().partition("acme")).await?;
    let backend = store.get_database_backend();
    let row = store
        .query_one_raw(Statement::from_string(
            backend,
            format!("SELECT total_cents FROM upcast_carts WHERE cart_id = '{cart_id}'"),
        ))
        .await?
        .ok_or("the cart's row")?;
    let total: i64 = row.try_get_by_index(0)?;
    println!("read model: {cart_id} total {total} cents");
    assert_eq!(total, 3990);
    Ok(())
}
