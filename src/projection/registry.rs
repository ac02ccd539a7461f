//! Combines snapshot projections and custom handlers; runs them on a batch in registration order.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use futures::FutureExt;

use sea_orm::{DatabaseTransaction, DbBackend};

use super::snapshot::Fold;
use crate::error::{Error, Result, panicked};
use crate::event::{Event, RecordedEvent, StoredMessage, is_unknown_type};
use crate::store::EventStore;

/// What a handler gets besides the event: the batch's transaction, a store bound to it, the
/// partition, and the daemon's lease epoch.
pub struct ProjectionContext<'a> {
    pub(crate) txn: &'a DatabaseTransaction,
    pub(crate) store: &'a EventStore,
    pub(crate) partition: &'a str,
    /// What feeds the batch.
    pub(crate) feed: Feed<'a>,
    pub(crate) epoch: Option<i64>,
    /// In a rebuild: the rows folded again so far (others' stored snapshots are ignored).
    pub(crate) replay: Option<&'a Replay>,
}

/// What feeds a batch, which says whether a stored snapshot may already hold some of its events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Feed<'a> {
    /// A per-stream run (`project_events`) of this stream, from its checkpoint.
    Stream(&'a str),
    /// A run over partitions in global order (runners, the daemon), each from its checkpoint.
    Partitions,
    /// The events an append just wrote in this transaction (an inline projection): no
    /// snapshot holds any of them yet, whatever its position.
    Append,
}

/// The snapshot ids (per read-model table) a rebuild of one tenant has folded again so far:
/// a stored snapshot not among them is from before the rebuild, and folding starts over from
/// the initial state.
#[derive(Default)]
pub(crate) struct Replay(std::sync::Mutex<std::collections::BTreeSet<(String, String)>>);

impl Replay {
    /// Whether `id` of `table` was not folded again yet; it counts as folded from now on.
    pub(crate) fn first_time(&self, table: &str, id: &str) -> bool {
        self.0.lock().expect("not poisoned").insert((table.to_owned(), id.to_owned()))
    }
}

impl ProjectionContext<'_> {
    /// The batch's transaction: write your read model here, it commits with the checkpoint.
    pub fn db(&self) -> &DatabaseTransaction {
        self.txn
    }
    /// The event store bound to the batch's transaction: events a handler appends (a reactor
    /// recording what it did, a saga's next step) commit together with the checkpoint, or not
    /// at all. Don't keep it beyond the call.
    pub fn store(&self) -> &EventStore {
        self.store
    }
    /// The epoch of the daemon's lease this batch runs under (`None` outside a daemon): a
    /// fencing token that grows with every change of owner. Pass it to external systems that
    /// can refuse requests from an older epoch; with the event's `message_id` as idempotency
    /// key, a reaction delivered again after a crash is recognised.
    pub fn lease_epoch(&self) -> Option<i64> {
        self.epoch
    }
    /// The partition (tenant) being projected.
    pub fn partition(&self) -> &str {
        self.partition
    }
    /// The database backend.
    pub fn backend(&self) -> DbBackend {
        sea_orm::ConnectionTrait::get_database_backend(self.txn)
    }
}

/// What a registry makes of a stored event.
pub(crate) enum Accepted<E> {
    /// Decoded, for the projections.
    Event(RecordedEvent<E>),
    /// No projection handles its type.
    Passed,
    /// Its type is one the event enum doesn't know (and no projection names).
    Unknown(Error),
}

/// The events of one partition in a batch: `(partition, the lease epoch it runs under, its
/// events in global order)`.
pub(crate) type TenantBatch<'a, E> = (&'a str, Option<i64>, Vec<RecordedEvent<E>>);

/// A custom projection step, called for each event it handles, inside the batch's transaction.
///
/// ```
/// use emmett_seaorm::projection::{EventHandler, ProjectionContext};
/// use emmett_seaorm::RecordedEvent;
/// use sea_orm::ConnectionTrait;
///
/// struct AuditLog;
///
/// #[async_trait::async_trait]
/// impl EventHandler<serde_json::Value> for AuditLog {
///     async fn handle(
///         &self,
///         ctx: &ProjectionContext<'_>,
///         event: &RecordedEvent<serde_json::Value>,
///     ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
///         let sql = format!("-- {} at {}", event.message_type, event.global_position);
///         ctx.db().execute_unprepared(&sql).await?;
///         Ok(())
///     }
/// }
/// ```
#[async_trait::async_trait]
pub trait EventHandler<E>: Send + Sync {
    /// Handles one event. An error rolls the whole batch back.
    async fn handle(
        &self,
        ctx: &ProjectionContext<'_>,
        event: &RecordedEvent<E>,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>>;
}

/// A custom step called once per batch and partition with all the events it handles: for
/// reactions that are cheaper in bulk (one message to a broker, one bulk request), inside the
/// batch's transaction like [`EventHandler`].
///
/// ```
/// use emmett_seaorm::projection::{BatchHandler, ProjectionContext};
/// use emmett_seaorm::RecordedEvent;
///
/// struct Publish;
///
/// #[async_trait::async_trait]
/// impl BatchHandler<serde_json::Value> for Publish {
///     async fn handle_batch(
///         &self,
///         ctx: &ProjectionContext<'_>,
///         events: &[&RecordedEvent<serde_json::Value>],
///     ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
///         let ids: Vec<&str> = events.iter().map(|e| e.message_id.as_str()).collect();
///         println!("publishing {} events of {}: {ids:?}", events.len(), ctx.partition());
///         Ok(())
///     }
/// }
/// ```
#[async_trait::async_trait]
pub trait BatchHandler<E>: Send + Sync {
    /// Handles the batch's events of one partition, in global order. An error rolls the whole
    /// batch back.
    async fn handle_batch(
        &self,
        ctx: &ProjectionContext<'_>,
        events: &[&RecordedEvent<E>],
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>>;
}

enum Step<E> {
    Snapshot(Arc<dyn Fold<E>>),
    Custom(Arc<dyn EventHandler<E>>),
    Batch(Arc<dyn BatchHandler<E>>),
}

struct Registered<E> {
    /// `None`: every event.
    event_types: Option<Vec<String>>,
    step: Step<E>,
}

impl<E> Registered<E> {
    fn handles(&self, message_type: &str) -> bool {
        self.event_types.as_ref().is_none_or(|types| types.iter().any(|t| t == message_type))
    }
}

/// The projections and handlers a [`ProjectionRunner`](super::ProjectionRunner) feeds: the
/// TypeScript package's `SnapshotProjectionRegistry` (`createSnapshotProjectionRegistry`).
///
/// Handlers run in registration order, all inside the batch's transaction.
#[doc(alias = "SnapshotProjectionRegistry", alias = "createSnapshotProjectionRegistry")]
pub struct ProjectionRegistry<E> {
    steps: Vec<Registered<E>>,
    read_models: Vec<super::ReadModel>,
}

impl<E> Default for ProjectionRegistry<E> {
    fn default() -> Self {
        Self { steps: Vec::new(), read_models: Vec::new() }
    }
}

impl<E: Event + 'static> ProjectionRegistry<E> {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a snapshot projection.
    pub fn with<S>(mut self, projection: super::SnapshotProjection<E, S>) -> Self
    where
        S: serde::Serialize + serde::de::DeserializeOwned + Send + Sync + 'static,
    {
        let event_types = projection.event_types.clone();
        self.read_models.extend(projection.read_model());
        self.steps.push(Registered { event_types, step: Step::Snapshot(Arc::new(projection)) });
        self
    }

    /// Names a table a custom handler writes, with its tenant column, for tenant operations
    /// (snapshot projections name theirs with
    /// [`tenant_column`](super::SnapshotProjection::tenant_column)).
    pub fn read_model(mut self, read_model: super::ReadModel) -> Self {
        self.read_models.push(read_model);
        self
    }

    /// The read models whose tenant column is known: what erasing a tenant clears.
    pub fn read_models(&self) -> &[super::ReadModel] {
        &self.read_models
    }

    /// Adds a custom handler for the given event types (an empty list, `[]`: every event).
    pub fn on<'a>(
        mut self,
        event_types: impl IntoIterator<Item = &'a str>,
        handler: impl EventHandler<E> + 'static,
    ) -> Self {
        self.steps.push(Registered { event_types: listed(event_types), step: Step::Custom(Arc::new(handler)) });
        self
    }

    /// Adds a handler called once per batch and partition with its events of the given types
    /// (an empty list, `[]`: every event).
    pub fn on_batch<'a>(
        mut self,
        event_types: impl IntoIterator<Item = &'a str>,
        handler: impl BatchHandler<E> + 'static,
    ) -> Self {
        self.steps.push(Registered { event_types: listed(event_types), step: Step::Batch(Arc::new(handler)) });
        self
    }

    /// Whether any step handles events of `message_type` (others are skipped undecoded).
    pub(crate) fn handles(&self, message_type: &str) -> bool {
        self.steps.iter().any(|s| s.handles(message_type))
    }

    /// Whether a step lists `message_type` among the event types it handles.
    pub(crate) fn names(&self, message_type: &str) -> bool {
        self.steps.iter().any(|s| s.event_types.as_ref().is_some_and(|types| types.iter().any(|t| t == message_type)))
    }

    /// `row` decoded for the projections, passed over when none handles its type, or
    /// [`Accepted::Unknown`] when the event enum doesn't know its type and no projection names
    /// it (another aggregate's event, or a type of its own that was renamed or removed: the
    /// caller tells them apart); an error when it can't be decoded otherwise.
    pub(crate) fn accept(&self, row: StoredMessage) -> Result<Accepted<E>> {
        if !self.handles(&row.message_type) {
            return Ok(Accepted::Passed);
        }
        match row.decode() {
            Ok(event) => Ok(Accepted::Event(event)),
            Err(err @ Error::UndecodableEvent { .. }) if self.unknown(&err) => Ok(Accepted::Unknown(err)),
            Err(err) => Err(err),
        }
    }

    /// Whether `err` is about a type the enum doesn't know and no step names.
    fn unknown(&self, err: &Error) -> bool {
        matches!(err, Error::UndecodableEvent { message_type, source, .. }
            if is_unknown_type(source) && !self.names(message_type))
    }

    /// Runs every step, in registration order, on the batches of one transaction: `(partition,
    /// the lease epoch it runs under, its events in global order)` each, fed by `feed`;
    /// `replay` in a rebuild.
    pub(crate) async fn apply(
        &self,
        store: &EventStore,
        feed: Feed<'_>,
        batches: &[TenantBatch<'_, E>],
        replay: Option<&Replay>,
    ) -> Result<()> {
        let txn = store.transaction().expect("a batch runs on a session store");
        for registered in &self.steps {
            match &registered.step {
                // One fold over every partition's events: their rows are keyed by each event's
                // partition, so the snapshots of all of them are locked and written together.
                Step::Snapshot(projection) => {
                    let events: Vec<&RecordedEvent<E>> = batches
                        .iter()
                        .flat_map(|(_, _, batch)| batch.iter().filter(|e| registered.handles(&e.message_type)))
                        .collect();
                    if let Some(first) = events.first() {
                        let ctx =
                            ProjectionContext { txn, store, partition: &first.partition, feed, epoch: None, replay };
                        projection.fold(&ctx, &events).await?;
                    }
                }
                Step::Custom(handler) => {
                    for (partition, epoch, batch) in batches {
                        let ctx = ProjectionContext { txn, store, partition, feed, epoch: *epoch, replay };
                        for event in batch.iter().filter(|e| registered.handles(&e.message_type)) {
                            let handled = AssertUnwindSafe(handler.handle(&ctx, event)).catch_unwind().await;
                            handled
                                .unwrap_or_else(|panic| Err(panicked(panic)))
                                .map_err(|e| event.handler_failed(e))?;
                        }
                    }
                }
                Step::Batch(handler) => {
                    for (partition, epoch, batch) in batches {
                        let ctx = ProjectionContext { txn, store, partition, feed, epoch: *epoch, replay };
                        let events: Vec<&RecordedEvent<E>> =
                            batch.iter().filter(|e| registered.handles(&e.message_type)).collect();
                        if let Some(first) = events.first() {
                            let handled = AssertUnwindSafe(handler.handle_batch(&ctx, &events)).catch_unwind().await;
                            handled
                                .unwrap_or_else(|panic| Err(panicked(panic)))
                                .map_err(|e| first.handler_failed(e))?;
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

/// The event types a step handles: `None` (every type) for an empty list.
fn listed<'a>(event_types: impl IntoIterator<Item = &'a str>) -> Option<Vec<String>> {
    let types: Vec<String> = event_types.into_iter().map(str::to_owned).collect();
    (!types.is_empty()).then_some(types)
}
