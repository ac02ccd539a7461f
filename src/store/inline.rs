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
    async fn apply(&self, store: &EventStore, partition: &str, rows: Vec<StoredMessage>) -> Result<()>;
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
    /// Appends in a transaction (a savepoint inside a session) that also runs every inline
    /// projection on the events written; `None` when the expected version does not hold. A
    /// projection's failure rolls everything back: [`Error::InlineProjection`], unless it is a
    /// busy database or a lost connection, which the store retries as such.
    pub async fn append(&self, store: &EventStore, append: &Append<'_>) -> Result<Option<Appended>> {
        let txn = Arc::new(backend::begin_write(&store.executor()).await?);
        let Some(mut done) = backend::append(&*txn, append).await? else { return Ok(None) };
        let rows = std::mem::take(&mut done.rows);
        // Appends of the projections go through a store without them (no recursion).
        let session = store.bound_to(Arc::clone(&txn)).without_inline();
        for projection in &self.0 {
            projection.apply(&session, append.partition, rows.clone()).await.map_err(|source| match source {
                source if source.is_transient() => source,
                source => {
                    Error::InlineProjection { projection: projection.name().to_owned(), source: Box::new(source) }
                }
            })?;
        }
        drop(session);
        Arc::into_inner(txn).ok_or(Error::SessionStillInUse)?.commit().await?;
        Ok(Some(done))
    }
}
