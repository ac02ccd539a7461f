//! Read models: snapshot projections that reuse the domain's `evolve`, custom handlers, the
//! registry that combines them, and the runner that feeds them from the store.
//!
//! ```no_run
//! # use serde::{Deserialize, Serialize};
//! # #[derive(Serialize, Deserialize)] #[serde(tag = "type", content = "data")]
//! # enum CartEvent { ItemAdded { price: i64 } }
//! # #[derive(Serialize, Deserialize, Default)] struct Cart { total: i64 }
//! # fn evolve(cart: Cart, e: &CartEvent) -> Cart { match e { CartEvent::ItemAdded { price } => Cart { total: cart.total + price } } }
//! # async fn f(store: emmett_seaorm::EventStore) -> emmett_seaorm::Result<()> {
//! use emmett_seaorm::projection::{ProjectionRunner, RunOptions, SnapshotProjection, ProjectionRegistry};
//! use emmett_seaorm::{columns, keys};
//!
//! let carts = SnapshotProjection::new(
//!     "carts",
//!     |e, partition| keys! { "tenant_id" => partition, "cart_id" => &e.stream_id },
//!     evolve,
//!     Cart::default,
//! )
//! .columns(|cart| columns! { "total" => cart.total });
//! let runner = ProjectionRunner::new(store, ProjectionRegistry::new().with(carts));
//! runner.project_partition("carts-read-model", RunOptions::default().partition("tenant-a")).await?;
//! # Ok(()) }
//! ```

mod erased;
mod inline;
mod own_streams;
mod read_model;
mod registry;
mod runner;
pub(crate) mod snapshot;

use std::collections::BTreeMap;

pub(crate) use erased::Projector;
pub use read_model::ReadModel;
pub use registry::{BatchHandler, EventHandler, ProjectionContext, ProjectionRegistry};
pub(crate) use runner::GroupProgress;
pub use runner::{Progress, ProjectEventsResult, ProjectPartitionResult, ProjectionRunner, RunOptions};
pub(crate) use snapshot::stream_id_part;
pub use snapshot::{SnapshotProjection, construct_stream_id};

/// The key columns of a read-model row and their values, as returned by `extract_keys`.
/// Values are typed: text, integer, UUID… key columns take the value as it is.
pub type Keys = BTreeMap<String, sea_orm::Value>;

/// Denormalised read-model columns and their values, as returned by `map_to_columns`.
pub type Columns = BTreeMap<String, sea_orm::Value>;

/// Builds [`Keys`]: `keys! { "tenant_id" => partition, "cart_id" => &event.stream_id }`.
/// Any value SeaORM binds works (`&str`, `String`, `i64`, `Uuid`, …).
#[macro_export]
macro_rules! keys {
    ($($name:expr => $value:expr),* $(,)?) => {{
        let mut keys = $crate::projection::Keys::new();
        $( keys.insert(::std::string::String::from($name), $crate::sea_orm::Value::from($value)); )*
        keys
    }};
}

/// Builds [`Columns`]: `columns! { "currency" => cart.currency.clone(), "total" => cart.total }`.
#[macro_export]
macro_rules! columns {
    ($($name:expr => $value:expr),* $(,)?) => {{
        let mut columns = $crate::projection::Columns::new();
        $( columns.insert(::std::string::String::from($name), $crate::sea_orm::Value::from($value)); )*
        columns
    }};
}
