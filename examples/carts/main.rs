//! Multi-tenant shopping carts: commands decided against the aggregate, events appended with
//! optimistic concurrency, a `carts` read model kept by a snapshot projection that reuses the
//! domain's `evolve` — inline, in each append's transaction — and a reactor, run by the
//! projection daemon, that places an order for each checkout.
//!
//! `cargo run --example carts` uses an embedded SQLite file (`carts.db`); set `DATABASE_URL`
//! to a PostgreSQL or MySQL URL to use those. Run it again: it carries on where it stopped.

mod domain;
mod orders;
mod read_model;

use std::time::Duration;

use domain::{Cart, CartCommand, decide, evolve};
use emmett_seaorm::daemon::Daemon;
use emmett_seaorm::projection::ProjectionRegistry;
use emmett_seaorm::{AppendOptions, EventStore, ExpectedVersion, ReadOptions};
use orders::OrderEvent;
use sea_orm::{EntityTrait, QueryOrder};

/// Decides `command` against the cart's current state and appends the outcome, expecting the
/// version it decided on; returns the global position of the last event appended (0: refused).
async fn handle(
    store: &EventStore,
    tenant: &str,
    cart_id: &str,
    command: CartCommand,
) -> Result<u64, Box<dyn std::error::Error>> {
    let current =
        store.aggregate_stream(cart_id, evolve, Cart::default, ReadOptions::default().partition(tenant)).await?;
    let events = match decide(command.clone(), &current.state) {
        Ok(events) => events,
        Err(refused) => {
            println!("  {tenant}/{cart_id}: {command:?} refused: {refused}");
            return Ok(0);
        }
    };
    let options = AppendOptions::default()
        .partition(tenant)
        .stream_type("cart")
        .expected(ExpectedVersion::Exact(current.current_stream_version));
    let appended = store.append_to_stream(cart_id, events, options).await?;
    println!("  {tenant}/{cart_id}: {command:?} -> version {}", appended.next_expected_stream_version);
    Ok(appended.last_event_global_position)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("DATABASE_URL").unwrap_or_else(|_| "sqlite://carts.db?mode=rwc".into());
    println!("database: {url}");
    let db = emmett_seaorm::connect(&url).await?;
    emmett_seaorm::migrate(&db).await?;
    read_model::create_table(&db).await?;
    // The read model changes with each append, in its transaction.
    let store = EventStore::new(db.clone()).inline("carts", ProjectionRegistry::new().with(read_model::projection()));

    // Each run adds a new cart per tenant, so re-running shows the runner resuming.
    let run = store
        .read_stream::<serde_json::Value>("runs", ReadOptions::default().max_count(0))
        .await?
        .current_stream_version
        + 1;
    store
        .append_to_stream(
            "runs",
            [serde_json::json!({ "type": "DemoRun", "data": { "run": run } })],
            AppendOptions::default(),
        )
        .await?;
    println!("run {run}: deciding commands");
    let mut last = 0;
    for (tenant, currency) in [("acme", "EUR"), ("globex", "USD")] {
        store.create_partition(tenant).await?;
        let (kept, dropped) = (format!("cart-{run}-a"), format!("cart-{run}-b"));
        use CartCommand::*;
        for (cart, command) in [
            (&kept, Create { currency: currency.into() }),
            (&kept, AddItem { sku: "book".into(), quantity: 2, unit_price: 1_500 }),
            (&kept, AddItem { sku: "pen".into(), quantity: 3, unit_price: 250 }),
            (&kept, RemoveItem { sku: "pen".into(), quantity: 1 }),
            (&kept, CheckOut { order_id: format!("order-{run}") }),
            (&kept, AddItem { sku: "late".into(), quantity: 1, unit_price: 1 }), // refused: checked out
            (&dropped, Create { currency: currency.into() }),
            (&dropped, AddItem { sku: "lamp".into(), quantity: 1, unit_price: 4_000 }),
            (&dropped, Empty),
            (&dropped, Cancel { reason: "changed my mind".into() }),
        ] {
            last = last.max(handle(&store, tenant, cart, command).await?);
        }
    }

    // The reactor runs in the projection daemon (`carts-worker` runs it continuously); here it
    // runs until it has seen every checkout so far.
    let daemon = Daemon::new(store.clone()).projection("orders", orders::reactor()).start().await?;
    tokio::time::timeout(Duration::from_secs(30), daemon.caught_up(last)).await??;
    daemon.stop().await?;
    println!("orders placed by the reactor:");
    for tenant in ["acme", "globex"] {
        let order = store
            .read_stream::<OrderEvent>(&format!("order-order-{run}"), ReadOptions::default().partition(tenant))
            .await?;
        for placed in order.events {
            println!("  {tenant}/order-order-{run}: {:?}", placed.event);
        }
    }

    println!("carts read model (plain SeaORM query; kept inline):");
    let rows = read_model::Entity::find()
        .order_by_asc(read_model::Column::TenantId)
        .order_by_asc(read_model::Column::CartId)
        .all(&db)
        .await?;
    for row in rows {
        println!(
            "  {:<7} {:<12} {} {:>6} order={:<9} checked_out={:<5} cancelled={:<5} items={}",
            row.tenant_id,
            row.cart_id,
            row.currency,
            row.total,
            row.order_id.unwrap_or_default(),
            row.is_checked_out,
            row.is_cancelled,
            row.items_json
        );
    }
    Ok(())
}
