use emmett_seaorm::projection::{ProjectionRegistry, ProjectionRunner, RunOptions, SnapshotProjection};
use emmett_seaorm::{AppendOptions, EventStore, ExpectedVersion, ReadOptions, columns, keys};
use sea_orm::{ConnectionTrait, EntityName, EntityTrait, IdenStatic, Schema};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
#[serde(tag = "type", content = "data")] // stored as message_type + message_data
enum CartEvent {
    CartCreated { currency: String },
    ItemAdded { sku: String, qty: u32, price: i64 },
}

#[derive(Serialize, Deserialize, Default)]
struct Cart {
    currency: String,
    items: u32,
    total: i64,
}

/// The domain's one fold: the aggregate and the read model both use it.
fn evolve(mut cart: Cart, event: &CartEvent) -> Cart {
    match event {
        CartEvent::CartCreated { currency } => cart.currency = currency.clone(),
        CartEvent::ItemAdded { qty, price, .. } => {
            cart.items += qty;
            cart.total += *qty as i64 * price;
        }
    }
    cart
}

/// The read model: a plain SeaORM entity whose primary key is the projection's keys.
mod carts {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "carts")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub tenant_id: String,
        #[sea_orm(primary_key, auto_increment = false)]
        pub cart_id: String,
        pub currency: String,
        pub items: i64,
        pub total: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Embedded SQLite; or `DATABASE_URL=postgres://…` (`…?pooler=transaction` behind PgBouncer).
    let url = std::env::var("DATABASE_URL").unwrap_or_else(|_| "sqlite://quickstart.db?mode=rwc".into());
    let db = emmett_seaorm::connect(url).await?;
    emmett_seaorm::migrate(&db).await?; // the store's tables
    let store = EventStore::new(db);
    // The read model's table, from its entity (in an app: one of your migrations). The store
    // is a SeaORM connection too.
    let schema = Schema::new(store.get_database_backend());
    store.execute(schema.create_table_from_entity(carts::Entity).if_not_exists()).await?;

    // A command: fold the stream, decide, append at exactly the version it was folded at.
    let tenant = "tenant-a";
    let cart =
        store.aggregate_stream("cart-42", evolve, Cart::default, ReadOptions::default().partition(tenant)).await?;
    let mut events = vec![CartEvent::ItemAdded { sku: "book".into(), qty: 1, price: 1500 }];
    if !cart.stream_exists {
        events.insert(0, CartEvent::CartCreated { currency: "EUR".into() });
    }
    let expected = ExpectedVersion::Exact(cart.current_stream_version);
    store.append_to_stream("cart-42", events, AppendOptions::default().partition(tenant).expected(expected)).await?;

    // The read model, folded by the same `evolve`, keyed and mapped through the entity.
    let projection = SnapshotProjection::new(
        carts::Entity.table_name(),
        |event, tenant| {
            keys! { carts::Column::TenantId.as_str() => tenant, carts::Column::CartId.as_str() => &event.stream_id }
        },
        evolve,
        Cart::default,
    )
    .columns(|cart| {
        columns! {
            carts::Column::Currency.as_str() => cart.currency.clone(),
            carts::Column::Items.as_str() => cart.items as i64,
            carts::Column::Total.as_str() => cart.total,
        }
    });
    let runner = ProjectionRunner::new(store.clone(), ProjectionRegistry::new().with(projection));
    runner.project_partition("carts-read-model", RunOptions::default().partition(tenant)).await?;

    // Queries are plain SeaORM; the store is a connection.
    for cart in carts::Entity::find().all(&store).await? {
        println!("{}/{}: {} items, {} {}", cart.tenant_id, cart.cart_id, cart.items, cart.total, cart.currency);
    }
    Ok(())
}
