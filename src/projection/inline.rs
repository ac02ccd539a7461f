//! Registries as inline projections: [`EventStore::inline`].

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;

use super::ProjectionRegistry;
use super::registry::{Accepted, Feed};
use crate::error::Result;
use crate::event::{Event, RecordedEvent, StoredMessage};
use crate::store::EventStore;
use crate::store::inline::Inline;

/// A registry under the name its errors carry.
struct Named<E> {
    name: String,
    registry: ProjectionRegistry<E>,
}

#[async_trait]
impl<E: Event + 'static> Inline for Named<E> {
    fn name(&self) -> &str {
        &self.name
    }

    async fn apply(&self, store: &EventStore, rows: Vec<StoredMessage>) -> Result<()> {
        let mut by_partition: BTreeMap<String, Vec<RecordedEvent<E>>> = BTreeMap::new();
        for row in rows {
            // (Appends through a typed store write the enum's types: an unknown one is another
            // aggregate's, appended as JSON.)
            if let Accepted::Event(event) = self.registry.accept(row)? {
                by_partition.entry(event.partition.clone()).or_default().push(event);
            }
        }
        let batches: Vec<_> = by_partition
            .iter_mut()
            .map(|(partition, events)| (partition.as_str(), None, std::mem::take(events)))
            .collect();
        if !batches.is_empty() {
            self.registry.apply(store, Feed::Append, &batches, None).await?;
        }
        Ok(())
    }
}

impl EventStore {
    /// Runs `registry` inside every append's transaction (also in sessions), so its read
    /// models change atomically with the events: read-your-writes without waiting for a
    /// runner or daemon. A failing projection rolls the append back with
    /// [`Error::InlineProjection`](crate::Error::InlineProjection) naming it. Appends pay for
    /// it: a transaction instead of one statement (PostgreSQL), and the projection's own
    /// statements (a snapshot projection: two). The projection gets the rows the append wrote,
    /// nothing is read back.
    ///
    /// ```no_run
    /// # use serde::{Deserialize, Serialize};
    /// # #[derive(Serialize, Deserialize)] #[serde(tag = "type", content = "data")]
    /// # enum CartEvent { ItemAdded { price: i64 } }
    /// # fn f(db: sea_orm::DatabaseConnection, carts: emmett_seaorm::projection::ProjectionRegistry<CartEvent>) {
    /// let store = emmett_seaorm::EventStore::new(db).inline("carts", carts);
    /// # }
    /// ```
    pub fn inline<E: Event + 'static>(self, name: impl Into<String>, registry: ProjectionRegistry<E>) -> Self {
        self.with_inline(Arc::new(Named { name: name.into(), registry }))
    }
}
