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

use domain::{Cart, CartCommand, CartError, CartEvent, decide, evolve};
use emmett_seaorm::daemon::Daemon;
use emmett_seaorm::projection::ProjectionRegistry;
use emmett_seaorm::{AppendOptions, CommandHandler, EventStore, ReadOptions};
use orders::OrderEvent;
use sea_orm::{EntityTrait, QueryOrder};

/// Why a command did not land: the domain refused it, or the store failed.
#[derive(Debug, thiserror::Error)]
enum CommandError {
    #[error(transparent)]
    Refused(#[from] CartError),
    #[error(transparent)]
    Store(#[from] emmett_seaorm::Error),
}

/// The carts' command handler: `decide` runs on the state `evolve` folds, and the events are
/// appended expecting the version it decided on.
fn carts() -> CommandHandler<Cart, CartEvent> {
    CommandHandler::new(evolve, Cart::default)
}

/// Handles `command` on a cart; returns the global position of the last event appended (0:
/// refused).
async fn handle(store: &EventStore, tenant: &str, cart_id: &str, command: CartCommand) -> Result<u64, CommandError> {
    let options = AppendOptions::default().partition(tenant).stream_type("cart");
    match carts().handle(store, cart_id, options, |cart| Ok(decide(command.clone(), cart)?)).await {
        Ok(handled) => {
            println!("  {tenant}/{cart_id}: {command:?} -> version {}", handled.next_expected_stream_version);
            Ok(handled.last_event_global_position.unwrap_or(0))
        }
        Err(CommandError::Refused(refused)) => {
            println!("  {tenant}/{cart_id}: {command:?} refused: {refused}");
            Ok(0)
        }
        Err(err) => Err(err),
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Logs with RUST_LOG (e.g. `RUST_LOG=emmett_seaorm=debug`).
    tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).init();
    let url = std::env::var("DATABASE_URL").unwrap_or_else(|_| "sqlite://carts.db?mode=rwc".into());
    println!("database: {url}");
    let db = emmett_seaorm::connect(&url).await?;
    emmett_seaorm::migrate(&db).await?;
    // The read model changes with each append, in its transaction.
    let store = EventStore::new(db).inline("carts", ProjectionRegistry::new().with(read_model::projection()));
    // The store runs SeaORM statements too: behind a transaction pooler, each in a transaction.
    read_model::create_table(&store).await?;

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
        .all(&store)
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

/// The domain and the read model, specified with the crate's testing kit (`cargo test --example
/// carts`; `EMMETT_TEST_DATABASE_URL` runs them on a PostgreSQL or MySQL server).
#[cfg(test)]
mod tests {
    use super::*;
    use domain::{Line, Status};
    use emmett_seaorm::testing::{DeciderSpecification, ProjectionSpecification, TestDatabase};

    fn added(sku: &str, quantity: u32, unit_price: i64) -> CartEvent {
        CartEvent::ItemAddedToCart { sku: sku.into(), quantity, unit_price }
    }

    #[tokio::test]
    async fn carts_decide() {
        let db = TestDatabase::new().await;
        let spec = DeciderSpecification::new(&db, carts(), |command: &CartCommand, cart: &Cart| {
            Ok::<_, CommandError>(decide(command.clone(), cart)?)
        });
        let created = CartEvent::CartCreated { currency: "EUR".into() };
        spec.given([]).when(CartCommand::Create { currency: "EUR".into() }).then([created.clone()]).await;
        spec.given([created.clone()])
            .when(CartCommand::AddItem { sku: "pen".into(), quantity: 2, unit_price: 250 })
            .then([added("pen", 2, 250)])
            .await;
        spec.given([created.clone()])
            .when(CartCommand::CheckOut { order_id: "o-1".into() })
            .then_error(|e| matches!(e, CommandError::Refused(CartError::EmptyCart)))
            .await;
        spec.given([created, added("pen", 1, 250), CartEvent::CartCheckedOut { order_id: "o-1".into() }])
            .when(CartCommand::Empty)
            .then_error(|e| matches!(e, CommandError::Refused(CartError::Closed(Status::CheckedOut))))
            .await;
    }

    #[tokio::test]
    async fn carts_read_model() {
        let db = TestDatabase::new().await;
        read_model::create_table(db.connection()).await.expect("create the table");
        let row = |tenant: &str, total: i64, items: &[(&str, u32, i64)], checked_out: bool| {
            let items: std::collections::BTreeMap<_, _> = items
                .iter()
                .map(|&(sku, quantity, unit_price)| (sku.to_owned(), Line { quantity, unit_price }))
                .collect();
            read_model::Model {
                tenant_id: tenant.into(),
                cart_id: "cart-1".into(),
                currency: "EUR".into(),
                total,
                order_id: checked_out.then(|| "o-1".to_owned()),
                items_json: serde_json::to_string(&items).unwrap(),
                is_checked_out: checked_out,
                is_cancelled: false,
            }
        };
        let created = || CartEvent::CartCreated { currency: "EUR".into() };
        ProjectionSpecification::new(&db, ProjectionRegistry::new().with(read_model::projection()))
            .given("acme", "cart-1", [created(), added("pen", 2, 250)])
            .given("globex", "cart-1", [created(), added("book", 1, 1_500)])
            .given("acme", "cart-1", [CartEvent::CartCheckedOut { order_id: "o-1".into() }])
            .then_rows(
                read_model::Entity,
                [row("acme", 500, &[("pen", 2, 250)], true), row("globex", 1_500, &[("book", 1, 1_500)], false)],
            )
            .await;
    }
}
