//! Inline projections: what the store runs inside the append's own transaction, so their read
//! models change atomically with the events.

use std::sync::Arc;

use async_trait::async_trait;

use crate::backend::{self, Append, Appended};
use crate::error::{Error, Result};
use crate::event::StoredMessage;
use crate::store::EventStore;

/// A named projection run in the append's transaction, whatever its event type (a registry:
/// see `projection::inline`).
#[async_trait]
pub(crate) trait Inline: Send + Sync {
    fn name(&self) -> &str;
    /// Folds `rows` (in global order, of any partitions) in `store`'s transaction.
    async fn apply(&self, store: &EventStore, rows: Vec<StoredMessage>) -> Result<()>;
}

/// The inline projections of a store and its clones.
#[derive(Clone, Default)]
pub(super) struct InlineProjections(pub Vec<Arc<dyn Inline>>);

impl std::fmt::Debug for InlineProjections {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.0.iter().map(|p| p.name())).finish()
    }
}

impl InlineProjections {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether `other` holds the very same projections (a clone of this store's).
    pub fn same_as(&self, other: &Self) -> bool {
        self.0.len() == other.0.len() && self.0.iter().zip(&other.0).all(|(a, b)| Arc::ptr_eq(a, b))
    }

    /// Appends in a transaction (a savepoint inside a session) that also runs every inline
    /// projection on the events written; `None` when the expected version does not hold. A
    /// projection's failure rolls everything back: [`Error::InlineProjection`], unless it is a
    /// busy database or a lost connection, which the store retries as such.
    pub async fn append(&self, store: &EventStore, append: &Append) -> Result<Option<Appended>> {
        let txn = Arc::new(backend::begin_write(store.executor()).await?);
        let Some(mut done) = backend::append_steps(&txn, &[append]).await?.pop().flatten() else { return Ok(None) };
        self.run(&store.bound_to(Arc::clone(&txn)), std::mem::take(&mut done.rows)).await?;
        Arc::into_inner(txn).ok_or(Error::SessionStillInUse)?.commit().await?;
        Ok(Some(done))
    }

    /// Runs every projection on `rows` (in global order) in the transaction `store` is bound to.
    pub async fn run(&self, store: &EventStore, rows: Vec<StoredMessage>) -> Result<()> {
        // Appends of the projections go through a store without them (no recursion).
        let session = store.clone().without_inline();
        for projection in &self.0 {
            projection.apply(&session, rows.clone()).await.map_err(|source| match source {
                source if source.is_transient() => source,
                source => {
                    Error::InlineProjection { projection: projection.name().to_owned(), source: Box::new(source) }
                }
            })?;
        }
        Ok(())
    }
}
