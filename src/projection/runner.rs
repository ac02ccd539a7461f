//! The ProjectionRunner: feeds a registry from the store, one transaction per batch, resuming
//! from a checkpoint in `subscriptions`.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use backon::Retryable;

use sea_orm::{ColumnTrait, DatabaseTransaction, EntityTrait, PaginatorTrait, QueryFilter, QueryOrder, QuerySelect};

use super::ProjectionRegistry;
use super::own_streams::OwnStreams;
use super::registry::{Accepted, Feed, Replay};
use crate::backend;
use crate::backend::{is_retried, retry_policy};
use crate::error::{Error, Result};
use crate::event::StoredMessage;
use crate::event::{Event, RecordedEvent};
use crate::limits::{self, MAX_IDENTIFIER_CHARS};
use crate::schema::skipped_events as skipped;
use crate::schema::{messages, subscriptions};
use crate::store::EventStore;

/// How long `project_partition` waits on PostgreSQL for transactions still writing before it
/// returns what it has done (MySQL waits on their row locks, up to `innodb_lock_wait_timeout`).
const CATCH_UP_WAIT: Duration = Duration::from_secs(10);

/// Options of [`ProjectionRunner`] runs.
///
/// ```
/// use emmett_seaorm::projection::RunOptions;
/// let options = RunOptions::default().partition("tenant-a").batch_size(1_000).single_batch();
/// ```
#[derive(Debug, Clone)]
pub struct RunOptions {
    partition: Option<String>,
    batch_size: u64,
    single_batch: bool,
    skip_undecodable: bool,
    /// The daemon's lease `(owner, epoch)`: every batch commits only while it is held.
    pub(crate) lease: Option<(String, i64)>,
    /// The daemon's lease TTL: on PostgreSQL a batch whose process stops talking (paused,
    /// hung) for this long is ended by the server, so its locks don't block a takeover.
    pub(crate) lease_ttl: Option<std::time::Duration>,
    /// A horizon the caller already waited for (the daemon's, for all tenants at once).
    pub(crate) until: Option<i64>,
    /// The daemon's tenants with failures on record: cleared in their next batch's transaction.
    pub(crate) recovering: BTreeSet<String>,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self {
            partition: None,
            batch_size: 500,
            single_batch: false,
            skip_undecodable: false,
            lease: None,
            lease_ttl: None,
            until: None,
            recovering: BTreeSet::new(),
        }
    }
}

impl RunOptions {
    /// The partition (tenant) to project: the stream's for
    /// [`project_events`](ProjectionRunner::project_events), the one whose streams
    /// [`project_partition`](ProjectionRunner::project_partition) follows; `default_partition`
    /// when not set.
    pub fn partition(mut self, partition: impl Into<String>) -> Self {
        self.partition = Some(partition.into());
        self
    }
    /// Events per batch, i.e. per transaction (default 500).
    pub fn batch_size(mut self, batch_size: u64) -> Self {
        self.batch_size = batch_size.clamp(1, i64::MAX as u64);
        self
    }
    /// The events per batch.
    pub(crate) fn batch_size_value(&self) -> u64 {
        self.batch_size
    }
    /// Process at most one batch instead of running until caught up.
    pub fn single_batch(mut self) -> Self {
        self.single_batch = true;
        self
    }
    /// Go past events the projections can't read — [`Error::UndecodableEvent`] (data not
    /// matching the event type) and [`Error::MalformedEvent`] (a row breaking the schema) —
    /// instead of failing the run on them again and again. Each skipped event is recorded in
    /// [`skipped_events`](crate::schema::skipped_events) (subscription, where, why, when), in
    /// the batch's transaction, so it can be found, repaired and replayed.
    pub fn skip_undecodable_events(mut self) -> Self {
        self.skip_undecodable = true;
        self
    }
}

/// What [`ProjectionRunner::project_events`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProjectEventsResult {
    /// Events read past the checkpoint (handled or not).
    pub processed: u64,
    /// The stream's version when the run ended.
    pub current_stream_version: u64,
}

/// What [`ProjectionRunner::project_partition`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProjectPartitionResult {
    /// Events read past the checkpoint (handled or not).
    pub processed: u64,
    /// The checkpoint (a global position) when the run ended.
    pub last_processed_position: u64,
}

/// How far a [`catch_up`](ProjectionRunner::catch_up) or [`rebuild`](ProjectionRunner::rebuild)
/// has got, reported after every batch: enough for a progress bar with a rate and an ETA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    /// The tenant the last batch was of.
    pub partition: String,
    /// Events read so far, over every tenant of the run.
    pub processed: u64,
    /// Events to read in all: those past the checkpoints when the run started (events appended
    /// meanwhile are read too, so `processed` may end above it).
    pub total: u64,
}

/// Feeds a [`ProjectionRegistry`] from the store.
///
/// Each batch is one transaction: the subscription's checkpoint row is locked, the events after
/// it are read, every handler runs, and the checkpoint moves — all or nothing. Runners sharing a
/// subscription therefore take turns, and running again after a crash or alongside another
/// runner gives the read model of one sequential fold.
pub struct ProjectionRunner<E> {
    store: EventStore,
    registry: Arc<ProjectionRegistry<E>>,
    own_streams: Arc<OwnStreams>,
}

impl<E> Clone for ProjectionRunner<E> {
    fn clone(&self) -> Self {
        Self {
            store: self.store.clone(),
            registry: Arc::clone(&self.registry),
            own_streams: Arc::clone(&self.own_streams),
        }
    }
}

/// What [`ProjectionRunner::project_group`] did for one tenant.
#[derive(Debug, Clone)]
pub(crate) struct GroupProgress {
    pub tenant: String,
    /// Events read past the checkpoint.
    pub processed: u64,
    /// The checkpoint after the batch.
    pub checkpoint: i64,
    /// Whether the batch read as many of its events as it could take: more may wait.
    pub full: bool,
    /// The lease was no longer held: nothing was done.
    pub lost: bool,
}

/// Which events a run reads.
#[derive(Clone, Copy)]
enum Source<'a> {
    /// One stream, checkpoint = stream position (the TypeScript runner's semantics).
    Stream(&'a str),
    /// Every stream of the partition up to a global position, checkpoint = global position.
    Partition { until: i64 },
}

impl<E: Event + 'static> ProjectionRunner<E> {
    /// A runner feeding `registry` from `store`.
    pub fn new(store: EventStore, registry: ProjectionRegistry<E>) -> Self {
        Self::shared(store, Arc::new(registry))
    }

    /// A runner feeding a registry shared with others.
    pub(crate) fn shared(store: EventStore, registry: Arc<ProjectionRegistry<E>>) -> Self {
        Self { store, registry, own_streams: Arc::default() }
    }

    /// Projects one stream's events past the checkpoint of `subscription_id` (in the stream's
    /// partition), until caught up or for one batch.
    pub async fn project_events(
        &self,
        subscription_id: &str,
        stream_id: &str,
        options: RunOptions,
    ) -> Result<ProjectEventsResult> {
        let partition = self.store.partition(options.partition.as_deref())?.to_owned();
        check_run(subscription_id, &partition)?;
        limits::check_identifier("stream id", stream_id, MAX_IDENTIFIER_CHARS)?;
        let (processed, checkpoint, caught_up) =
            self.run(subscription_id, &partition, Source::Stream(stream_id), &options).await?;
        // Caught up, the checkpoint is the last position of the stream: no need to ask.
        let current_stream_version = match caught_up {
            true => checkpoint,
            false => self.store.stream_version(stream_id, &partition).await?,
        };
        Ok(ProjectEventsResult { processed, current_stream_version })
    }

    /// Projects every stream of a partition (a tenant: `options.partition`, `default_partition`
    /// when not set) in global order past the checkpoint of `subscription_id`, until caught up
    /// or for one batch.
    ///
    /// Caught up means every event committed when the run started, and every event of a
    /// transaction that was writing then: global positions are taken before commit, so the run
    /// first waits (at most 10 s) for such transactions to end, and never moves its checkpoint
    /// past an event that could still commit below it. On PostgreSQL it waits for every older
    /// writing transaction of the cluster; keep write transactions short.
    pub async fn project_partition(
        &self,
        subscription_id: &str,
        options: RunOptions,
    ) -> Result<ProjectPartitionResult> {
        let partition = self.store.partition(options.partition.as_deref())?;
        check_run(subscription_id, partition)?;
        let until = match options.until {
            Some(until) => until,
            None => (|| self.horizon(subscription_id, partition)).retry(retry_policy()).when(is_retried).await?,
        };
        let (processed, last_processed_position, _) =
            self.run(subscription_id, partition, Source::Partition { until }, &options).await?;
        Ok(ProjectPartitionResult { processed, last_processed_position })
    }

    /// [`project_partition`](Self::project_partition) batch by batch, calling `progress` after
    /// each: a long catch-up with a progress bar, such as a new version of a projection (a new
    /// subscription id writing new tables) filling from the first event while the old version
    /// keeps serving.
    ///
    /// ```no_run
    /// # async fn f(runner: emmett_seaorm::projection::ProjectionRunner<serde_json::Value>) -> emmett_seaorm::Result<()> {
    /// use emmett_seaorm::projection::RunOptions;
    /// runner
    ///     .catch_up("carts-v2", RunOptions::default().partition("acme"), |p| {
    ///         println!("{}: {}/{} events", p.partition, p.processed, p.total)
    ///     })
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub async fn catch_up(
        &self,
        subscription_id: &str,
        options: RunOptions,
        mut progress: impl FnMut(&Progress),
    ) -> Result<ProjectPartitionResult> {
        let partition = self.store.partition(options.partition.as_deref())?;
        check_run(subscription_id, partition)?;
        let checkpoint = self.checkpoint(subscription_id, partition).await?;
        let (total, _) = backend::pending(self.store.executor(), partition, checkpoint).await?;
        let mut report = Progress { partition: partition.to_owned(), processed: 0, total: total.max(0) as u64 };
        self.fill(subscription_id, partition, &options, &mut report, &mut progress).await
    }

    /// Replays a projection from the first event of every tenant (of `options.partition` only,
    /// when set), **one tenant at a time, each in one transaction**: the tenant's checkpoint
    /// goes back to 0, its events are folded again from the initial state (snapshot
    /// projections ignore their stored snapshots and rewrite every row the events reach; custom
    /// handlers see every event again: clear their tables first, and don't rebuild a reactor
    /// whose effects must not repeat), and the new checkpoint and rows commit together. A
    /// tenant that fails keeps its previous read model and checkpoint, the failure is recorded
    /// in its lease (where `status` shows it), and the other tenants are rebuilt: the run then
    /// fails with [`Error::RebuildIncomplete`] naming them. Running daemons are fenced off each
    /// tenant while it is rebuilt and go on from its new checkpoint. `progress` is called after
    /// each batch. For a large read model that must keep serving, fill a new version with
    /// [`catch_up`](Self::catch_up) instead.
    pub async fn rebuild(
        &self,
        subscription_id: &str,
        options: RunOptions,
        mut progress: impl FnMut(&Progress),
    ) -> Result<ProjectPartitionResult> {
        limits::check_identifier("subscription id", subscription_id, MAX_IDENTIFIER_CHARS)?;
        let executor = self.store.executor();
        let (tenants, total) = match &options.partition {
            Some(tenant) => {
                check_run(subscription_id, tenant)?;
                (vec![tenant.clone()], backend::pending(executor, tenant, 0).await?.0.max(0) as u64)
            }
            None => {
                let mut tenants: BTreeSet<String> =
                    backend::partition_heads(executor, None).await?.into_iter().map(|(t, _)| t).collect();
                let checkpointed: Vec<String> = subscriptions::Entity::find()
                    .select_only()
                    .column(subscriptions::Column::Partition)
                    .filter(subscriptions::Column::SubscriptionId.eq(subscription_id))
                    .into_tuple()
                    .all(executor)
                    .await?;
                tenants.extend(checkpointed);
                let unarchived = messages::Entity::find().filter(messages::Column::IsArchived.eq(false));
                (tenants.into_iter().collect(), unarchived.count(executor).await?)
            }
        };
        let mut report = Progress { partition: String::new(), processed: 0, total };
        let (mut last_processed_position, mut failed) = (0, Vec::new());
        for tenant in tenants {
            report.partition = tenant.clone();
            let counted = report.processed;
            let mut pauses = backon::BackoffBuilder::build(retry_policy());
            let rebuilt = loop {
                report.processed = counted;
                match self.rebuild_tenant(subscription_id, &tenant, &options, &mut report, &mut progress).await {
                    Err(error) if is_retried(&error) => match pauses.next() {
                        Some(pause) => tokio::time::sleep(pause).await,
                        None => break Err(error),
                    },
                    done => break done,
                }
            };
            match rebuilt {
                Ok(checkpoint) => last_processed_position = last_processed_position.max(checkpoint),
                Err(error) => {
                    tracing::error!(subscription = subscription_id, tenant, %error, "tenant not rebuilt; it keeps its previous read model");
                    let position = error.event_position().unwrap_or(0) as i64;
                    let message = error.to_string();
                    let run = backend::FailedRun { failures: 1, retry_in_ms: 0, error: &message, position };
                    let recorded = backend::park(executor, subscription_id, &tenant, run, None);
                    if let Err(record) = recorded.await {
                        tracing::warn!(%record, "recording the failed rebuild failed");
                    }
                    failed.push((tenant, error));
                }
            }
        }
        match failed.is_empty() {
            true => Ok(ProjectPartitionResult { processed: report.processed, last_processed_position }),
            false => Err(Error::RebuildIncomplete { subscription: subscription_id.to_owned(), failed }),
        }
    }

    /// Rebuilds one tenant in one transaction (see [`rebuild`](Self::rebuild)); its new
    /// checkpoint.
    async fn rebuild_tenant(
        &self,
        subscription: &str,
        tenant: &str,
        options: &RunOptions,
        report: &mut Progress,
        progress: &mut impl FnMut(&Progress),
    ) -> Result<u64> {
        let executor = self.store.executor();
        let Some(until) = backend::horizon(executor, tenant, 0, CATCH_UP_WAIT).await? else {
            return Err(Error::Busy { source: sea_orm::DbErr::Custom("events still being written".into()) });
        };
        let txn = Arc::new(backend::begin_write(executor).await?);
        backend::lock_checkpoints(&txn, subscription, &[tenant]).await?;
        let replay = Replay::default();
        let mut checkpoint = 0;
        let source = Source::Partition { until };
        while let Some((count, next)) =
            self.apply_next(&txn, subscription, tenant, source, checkpoint, options, Some(&replay)).await?
        {
            checkpoint = next;
            report.processed += count;
            progress(report);
            if count < options.batch_size {
                break;
            }
        }
        backend::move_checkpoints(&txn, subscription, &[(tenant, checkpoint)]).await?;
        backend::unpark(&txn, subscription, &[tenant]).await?;
        // Last, so the lease row is locked only for a moment: a daemon's batch of this tenant
        // waiting for the checkpoint finds its lease gone; its next round takes it again.
        backend::revoke(&*txn, subscription, Some(&[tenant])).await?;
        commit(txn).await?;
        Ok(checkpoint as u64)
    }

    /// Projects `partition` up to its horizon, one batch at a time, adding to `report`.
    async fn fill(
        &self,
        subscription: &str,
        partition: &str,
        options: &RunOptions,
        report: &mut Progress,
        progress: &mut impl FnMut(&Progress),
    ) -> Result<ProjectPartitionResult> {
        let until = (|| self.horizon(subscription, partition)).retry(retry_policy()).when(is_retried).await?;
        let options = RunOptions { partition: Some(partition.to_owned()), single_batch: true, ..options.clone() };
        report.partition = partition.to_owned();
        let mut processed = 0;
        loop {
            let (count, checkpoint, caught_up) =
                self.run(subscription, partition, Source::Partition { until }, &options).await?;
            processed += count;
            report.processed += count;
            progress(report);
            if caught_up {
                return Ok(ProjectPartitionResult { processed, last_processed_position: checkpoint });
            }
        }
    }

    /// The checkpoint of `subscription` in `partition` (0 before its first batch).
    async fn checkpoint(&self, subscription: &str, partition: &str) -> Result<i64> {
        let row = subscriptions::Entity::find_by_id((subscription.to_owned(), 1, partition.to_owned()))
            .one(self.store.executor())
            .await?;
        Ok(row.map_or(0, |s| s.last_processed_position))
    }

    /// Runs batches until one comes back short. Returns (events read, checkpoint, whether
    /// caught up).
    async fn run(
        &self,
        subscription: &str,
        partition: &str,
        source: Source<'_>,
        options: &RunOptions,
    ) -> Result<(u64, u64, bool)> {
        let mut processed = 0;
        loop {
            let (count, checkpoint) = (|| self.batch(subscription, partition, source, options))
                .retry(retry_policy())
                .when(is_retried)
                .notify(|err, _| tracing::debug!(subscription, partition, %err, "projection batch failed; retrying"))
                .await?;
            processed += count;
            let caught_up = count < options.batch_size;
            if caught_up || options.single_batch {
                return Ok((processed, checkpoint, caught_up));
            }
        }
    }

    /// How far a partition run may read: the [horizon](backend::horizon), waited for at most
    /// [`CATCH_UP_WAIT`]; the checkpoint when transactions still running hide what follows it.
    async fn horizon(&self, subscription: &str, partition: &str) -> Result<i64> {
        let checkpoint = self.checkpoint(subscription, partition).await?;
        match backend::horizon(self.store.executor(), partition, checkpoint, CATCH_UP_WAIT).await? {
            Some(horizon) => Ok(horizon),
            None => {
                tracing::warn!(subscription, partition, checkpoint, "events still hidden by in-flight transactions");
                Ok(checkpoint)
            }
        }
    }

    /// One batch in one transaction; returns (events read, checkpoint after).
    #[tracing::instrument(name = "batch", skip_all, fields(subscription = subscription, partition = partition, checkpoint, events))]
    async fn batch(
        &self,
        subscription: &str,
        partition: &str,
        source: Source<'_>,
        options: &RunOptions,
    ) -> Result<(u64, u64)> {
        let txn = Arc::new(backend::begin_write(self.store.executor()).await?);
        let locked = backend::lock_batch_checkpoints(&txn, subscription, &[partition]).await?;
        let checkpoint = locked.position(partition);
        tracing::Span::current().record("checkpoint", checkpoint);
        if let Some((owner, epoch)) = &options.lease {
            let lease = [(partition.to_owned(), *epoch)];
            if backend::held_tenants(&txn, subscription, owner, &lease, options.lease_ttl).await?.is_empty() {
                return Err(Error::LeaseLost { subscription: subscription.into(), partition: partition.into() });
            }
            // A tenant recovering from failures: its record goes with this batch's progress.
            if options.recovering.contains(partition) {
                backend::unpark(&txn, subscription, &[partition]).await?;
            }
        }
        let applied = self.apply_next(&txn, subscription, partition, source, checkpoint, options, None).await?;
        let Some((count, next_checkpoint)) = applied else {
            backend::save_checkpoints(&txn, subscription, &locked, &[]).await?;
            commit(txn).await?;
            return Ok((0, checkpoint as u64));
        };
        tracing::Span::current().record("events", count);
        backend::save_checkpoints(&txn, subscription, &locked, &[(partition, next_checkpoint)]).await?;
        commit(txn).await?;
        Ok((count, next_checkpoint as u64))
    }

    /// Reads the batch of `partition` after `after` in `txn` and runs the registry on it (under
    /// the daemon's lease epoch, if any; `replay` in a rebuild): how many rows it read and the
    /// checkpoint after them (a stream position for a stream, a global position for a
    /// partition), `None` when there were none.
    #[allow(clippy::too_many_arguments)] // (what to read, for whom, and how: all distinct)
    async fn apply_next(
        &self,
        txn: &Arc<DatabaseTransaction>,
        subscription: &str,
        partition: &str,
        source: Source<'_>,
        after: i64,
        options: &RunOptions,
        replay: Option<&Replay>,
    ) -> Result<Option<(u64, i64)>> {
        let rows = read_after(txn, partition, source, after, options.batch_size).await?;
        let Some(last) = rows.last() else { return Ok(None) };
        let (next, feed) = match source {
            Source::Stream(stream) => (last.stream_position, Feed::Stream(stream)),
            // Rows without a global position are not read in global order.
            Source::Partition { .. } => (last.global_position.unwrap_or(after), Feed::Partitions),
        };
        let count = rows.len() as u64;
        let batch = self.decode(txn, subscription, rows, options).await?;
        let epoch = options.lease.as_ref().map(|(_, epoch)| *epoch);
        let session = self.store.bound_to(Arc::clone(txn));
        self.registry.apply(&session, feed, &[(partition, epoch, batch)], replay).await?;
        Ok(Some((count, next)))
    }

    /// The events of `rows` the registry handles, brought to the current versions of their
    /// types and decoded (an [`Error::Upcast`] is undecodable too). Another aggregate's events (types
    /// the event enum doesn't know, in streams without a type it knows) are passed over unless
    /// a projection names their type; undecodable ones — an unknown type in a stream of the
    /// projection's own aggregate too (a variant renamed or removed) — fail the batch, or are
    /// recorded and skipped with [`RunOptions::skip_undecodable_events`].
    async fn decode(
        &self,
        txn: &DatabaseTransaction,
        subscription: &str,
        rows: Vec<StoredMessage>,
        options: &RunOptions,
    ) -> Result<Vec<RecordedEvent<E>>> {
        let mut batch = Vec::with_capacity(rows.len());
        for row in rows {
            let global_position = row.global_position;
            let accepted = match row.upcast(self.store.upcasters()) {
                Ok(rows) => rows.into_iter().map(|row| self.registry.accept(row)).collect(),
                Err(err) => vec![Err(err)],
            };
            for accepted in accepted {
                match accepted {
                    Ok(Accepted::Event(event)) => batch.push(event),
                    Ok(Accepted::Passed) => {}
                    Ok(Accepted::Unknown(err)) if !self.own_streams.holds(txn, &err).await? => {}
                    Ok(Accepted::Unknown(err)) | Err(err) if options.skip_undecodable => {
                        skipped::record(txn, subscription, global_position, &err).await?
                    }
                    Ok(Accepted::Unknown(err)) | Err(err) => return Err(err),
                }
            }
        }
        Ok(batch)
    }

    /// The daemon's batch: several tenants of `subscription` in one transaction, each read from
    /// its checkpoint up to `until` (a horizon the caller waited for), at most
    /// `options.batch_size` events each, and only while `owner` holds their leases at the
    /// given epochs. Tenants whose lease is gone are left out of the batch and reported.
    pub(crate) async fn project_group(
        &self,
        subscription: &str,
        owner: &str,
        tenants: &[(String, i64)],
        until: i64,
        options: &RunOptions,
    ) -> Result<Vec<GroupProgress>> {
        (|| self.group_batch(subscription, owner, tenants, until, options))
            .retry(retry_policy())
            .when(is_retried)
            .notify(|err, _| tracing::debug!(subscription, %err, "projection group batch failed; retrying"))
            .await
    }

    #[tracing::instrument(name = "group_batch", skip_all, fields(subscription = subscription, tenants = tenants.len(), until = until, events))]
    async fn group_batch(
        &self,
        subscription: &str,
        owner: &str,
        tenants: &[(String, i64)],
        until: i64,
        options: &RunOptions,
    ) -> Result<Vec<GroupProgress>> {
        let txn = Arc::new(backend::begin_write(self.store.executor()).await?);
        let names: Vec<&str> = tenants.iter().map(|(t, _)| t.as_str()).collect();
        let checkpoints = backend::lock_batch_checkpoints(&txn, subscription, &names).await?;
        let held = backend::held_tenants(&txn, subscription, owner, tenants, options.lease_ttl).await?;
        let reads: Vec<(&str, i64)> =
            names.iter().filter(|t| held.contains(**t)).map(|t| (*t, checkpoints.position(t))).collect();
        // Tenants recovering from failures: their records go with this batch's progress.
        let recovering: Vec<&str> = reads.iter().map(|(t, _)| *t).filter(|t| options.recovering.contains(*t)).collect();
        backend::unpark(&txn, subscription, &recovering).await?;
        backend::index_order_only(&txn, true).await?;
        // The batch's events shared among its tenants (a few each at least).
        let limit = (options.batch_size / reads.len().max(1) as u64).max(MIN_GROUP_SHARE);
        let rows = read_partitions_after(&txn, &reads, until, limit, options.batch_size).await?;
        backend::index_order_only(&txn, false).await?;
        tracing::Span::current().record("events", rows.len());
        let mut by_tenant: HashMap<&str, Vec<StoredMessage>> = reads.iter().map(|(t, _)| (*t, Vec::new())).collect();
        for row in rows {
            if let Some(events) = by_tenant.get_mut(row.partition.as_str()) {
                events.push(row);
            }
        }
        let epochs: HashMap<&str, i64> = tenants.iter().map(|(t, epoch)| (t.as_str(), *epoch)).collect();
        let mut progress = Vec::with_capacity(tenants.len());
        let mut batches = Vec::with_capacity(by_tenant.len());
        let mut moved = Vec::with_capacity(by_tenant.len());
        for (tenant, checkpoint) in &reads {
            let rows = by_tenant.remove(tenant).unwrap_or_default();
            let next = rows.last().and_then(|r| r.global_position).unwrap_or(*checkpoint);
            progress.push(GroupProgress {
                tenant: tenant.to_string(),
                processed: rows.len() as u64,
                checkpoint: next,
                full: rows.len() as u64 >= limit,
                lost: false,
            });
            if !rows.is_empty() {
                moved.push((*tenant, next));
                let epoch = epochs.get(tenant).copied();
                batches.push((*tenant, epoch, self.decode(&txn, subscription, rows, options).await?));
            }
        }
        let session = self.store.bound_to(Arc::clone(&txn));
        self.registry.apply(&session, Feed::Partitions, &batches, None).await?;
        drop(session);
        backend::save_checkpoints(&txn, subscription, &checkpoints, &moved).await?;
        commit(txn).await?;
        progress.extend(names.iter().filter(|t| !held.contains(**t)).map(|t| GroupProgress {
            tenant: t.to_string(),
            processed: 0,
            checkpoint: checkpoints.position(t),
            full: false,
            lost: true,
        }));
        Ok(progress)
    }
}

/// The fewest events a group batch reads of each of its tenants, however many tenants share
/// its batch size.
const MIN_GROUP_SHARE: u64 = 16;

/// [`Error::InvalidIdentifier`] unless the subscription id and partition can be stored.
fn check_run(subscription: &str, partition: &str) -> Result<()> {
    limits::check_identifier("subscription id", subscription, MAX_IDENTIFIER_CHARS)?;
    limits::check_identifier("partition", partition, MAX_IDENTIFIER_CHARS)
}

/// The next `limit` live events after the checkpoint (in global order: planned by index order).
async fn read_after(
    txn: &DatabaseTransaction,
    partition: &str,
    source: Source<'_>,
    checkpoint: i64,
    limit: u64,
) -> Result<Vec<StoredMessage>> {
    let query = messages::Entity::find()
        .filter(messages::Column::Partition.eq(partition))
        .filter(messages::Column::IsArchived.eq(false));
    let query = match source {
        Source::Stream(stream_id) => query
            .filter(messages::Column::StreamId.eq(stream_id))
            .filter(messages::Column::StreamPosition.gt(checkpoint))
            .order_by_asc(messages::Column::StreamPosition),
        Source::Partition { until } => query
            .filter(messages::Column::GlobalPosition.gt(checkpoint))
            .filter(messages::Column::GlobalPosition.lte(until))
            .order_by_asc(messages::Column::GlobalPosition),
    };
    let in_global_order = matches!(source, Source::Partition { .. });
    if in_global_order {
        backend::index_order_only(txn, true).await?;
    }
    let rows = query.limit(limit).into_model::<StoredMessage>().all(txn).await?;
    if in_global_order {
        backend::index_order_only(txn, false).await?;
    }
    Ok(rows)
}

/// The next `limit` live events of each `(partition, checkpoint)` up to `until`, in global
/// order. PostgreSQL: one statement. SQLite, MySQL: the partitions whose checkpoints lie within
/// `window` positions of `until` (caught up: the steady state) in one read of their
/// `(partition, global_position)` ranges from the lowest of them, at most `window` rows since
/// positions are unique; the others a query per [`UNION_PARTS`] partitions, a part per partition
/// (each walks its index range and stops at its limit).
async fn read_partitions_after(
    txn: &DatabaseTransaction,
    reads: &[(&str, i64)],
    until: i64,
    limit: u64,
    window: u64,
) -> Result<Vec<StoredMessage>> {
    use sea_orm::sea_query::{Alias, Asterisk, Query, UnionType};
    use sea_orm::{ConnectionTrait, QueryTrait};
    #[cfg(feature = "postgres")]
    if txn.get_database_backend() == sea_orm::DbBackend::Postgres {
        return read_partitions_lateral(txn, reads, until, limit).await;
    }
    let (near, reads): (Vec<_>, Vec<_>) =
        reads.iter().copied().partition(|(_, checkpoint)| until.saturating_sub(*checkpoint) <= window as i64);
    let mut messages = read_near(txn, &near, until, limit).await?;
    let inner = |(partition, checkpoint): (&str, i64)| {
        messages::Entity::find()
            .filter(messages::Column::Partition.eq(partition))
            .filter(messages::Column::IsArchived.eq(false))
            .filter(messages::Column::GlobalPosition.gt(checkpoint))
            .filter(messages::Column::GlobalPosition.lte(until))
            .order_by_asc(messages::Column::GlobalPosition)
            .limit(limit)
            .into_query()
    };
    // MySQL: the parts as parenthesized query expressions. As derived tables (below) each was
    // materialized in a temporary table: 80–110 ms for 100 tenants of 3 events on MariaDB, 10–20
    // ms so. (SQLite refuses a `LIMIT` in a compound's part.)
    #[cfg(feature = "mysql")]
    if txn.get_database_backend() == sea_orm::DbBackend::MySql {
        use sea_orm::sea_query::MysqlQueryBuilder;
        for chunk in reads.chunks(UNION_PARTS) {
            let (mut sql, mut values) = (String::new(), Vec::new());
            for read in chunk {
                let (part, part_values) = inner(*read).build(MysqlQueryBuilder);
                let glue = if sql.is_empty() { "(" } else { " UNION ALL (" };
                sql.extend([glue, part.as_str(), ")"]);
                values.extend(part_values.0);
            }
            let statement = sea_orm::Statement::from_sql_and_values(sea_orm::DbBackend::MySql, sql, values);
            messages.extend(StoredMessage::from_rows(&txn.query_all_raw(statement).await?)?);
        }
        messages.sort_by_key(|m| m.global_position);
        return Ok(messages);
    }
    let part = |i: usize, read: (&str, i64)| {
        Query::select().column(Asterisk).from_subquery(inner(read), Alias::new(format!("p{i}"))).to_owned()
    };
    for chunk in reads.chunks(UNION_PARTS) {
        let mut parts = chunk.iter().enumerate().map(|(i, read)| part(i, *read));
        let Some(mut query) = parts.next() else { continue };
        for other in parts {
            query.union(UnionType::All, other);
        }
        messages.extend(StoredMessage::from_rows(&txn.query_all(&query).await?)?);
    }
    messages.sort_by_key(|m| m.global_position);
    Ok(messages)
}

/// [`read_partitions_after`] of partitions close to `until`: one read of their index ranges from
/// the lowest checkpoint, each partition's rows at or below its own checkpoint or past its
/// `limit` dropped.
async fn read_near(
    txn: &DatabaseTransaction,
    near: &[(&str, i64)],
    until: i64,
    limit: u64,
) -> Result<Vec<StoredMessage>> {
    let Some(low) = near.iter().map(|(_, checkpoint)| *checkpoint).min() else {
        return Ok(Vec::new());
    };
    let rows = messages::Entity::find()
        .filter(messages::Column::Partition.is_in(near.iter().map(|(partition, _)| *partition)))
        .filter(messages::Column::IsArchived.eq(false))
        .filter(messages::Column::GlobalPosition.gt(low))
        .filter(messages::Column::GlobalPosition.lte(until))
        .order_by_asc(messages::Column::GlobalPosition)
        .into_model::<StoredMessage>()
        .all(txn)
        .await?;
    let mut left: HashMap<&str, (i64, u64)> = near.iter().map(|(p, c)| (*p, (*c, limit))).collect();
    Ok(rows
        .into_iter()
        .filter(|row| match left.get_mut(row.partition.as_str()) {
            Some((checkpoint, left)) if row.global_position.unwrap_or_default() > *checkpoint && *left > 0 => {
                *left -= 1;
                true
            }
            _ => false,
        })
        .collect())
}

/// The most parts of one `UNION ALL` read: SQLite refuses more than 500 (`too many terms in
/// compound SELECT`, which failed every daemon group of 512 tenants: each then ran alone).
const UNION_PARTS: usize = 100;

/// PostgreSQL's [`read_partitions_after`]: the partitions and checkpoints as two arrays, each
/// pair joined laterally to its index range, so the statement's text and plan are the same
/// whatever the number of partitions (a `UNION ALL` of 128 parts took longer to plan than to run).
#[cfg(feature = "postgres")]
async fn read_partitions_lateral(
    txn: &DatabaseTransaction,
    reads: &[(&str, i64)],
    until: i64,
    limit: u64,
) -> Result<Vec<StoredMessage>> {
    use sea_orm::ConnectionTrait;
    let sql = "SELECT m.* FROM unnest($1::text[], $2::bigint[]) AS r(p, c) CROSS JOIN LATERAL (
                 SELECT stream_id, stream_position, partition, message_type, message_id, global_position,
                        created, message_data, message_metadata, message_schema_version
                 FROM messages WHERE partition = r.p AND is_archived = false
                   AND global_position > r.c AND global_position <= $3
                 ORDER BY global_position LIMIT $4) AS m";
    let partitions: Vec<String> = reads.iter().map(|(p, _)| p.to_string()).collect();
    let checkpoints: Vec<i64> = reads.iter().map(|(_, c)| *c).collect();
    let values: [sea_orm::Value; 4] = [partitions.into(), checkpoints.into(), until.into(), (limit as i64).into()];
    let rows =
        txn.query_all_raw(sea_orm::Statement::from_sql_and_values(sea_orm::DbBackend::Postgres, sql, values)).await?;
    let mut messages = StoredMessage::from_rows(&rows)?;
    messages.sort_by_key(|m| m.global_position);
    Ok(messages)
}

/// Commits a batch's transaction; a handler that kept the store it was given holds it, and the
/// batch fails ([`Error::SessionStillInUse`]) instead of committing.
async fn commit(txn: Arc<DatabaseTransaction>) -> Result<()> {
    Arc::into_inner(txn).ok_or(Error::SessionStillInUse)?.commit().await?;
    Ok(())
}

#[cfg(all(test, feature = "sqlite"))]
mod tests {
    use super::*;
    use crate::AppendOptions;

    /// A group read of any number of tenants is one batch's read, on SQLite too (where one
    /// `UNION ALL` of more than 500 parts is refused).
    #[tokio::test]
    async fn a_group_read_takes_any_number_of_tenants() {
        let db = crate::testing::TestDatabase::at("sqlite::memory:").await;
        let store = EventStore::new(db.connection().clone());
        let tenants: Vec<String> = (0..700).map(|i| format!("t{i:03}")).collect();
        for tenant in &tenants {
            let noted = serde_json::json!({"type": "Noted", "data": {}});
            store.append_to_stream("s", [noted], AppendOptions::default().partition(tenant)).await.expect("append");
        }
        let noted = serde_json::json!({"type": "Noted", "data": {}});
        let two = [noted.clone(), noted];
        store.append_to_stream("s", two, AppendOptions::default().partition("t000")).await.expect("append");
        let txn = backend::begin_write(store.executor()).await.expect("begin");
        let reads: Vec<(&str, i64)> = tenants.iter().map(|t| (t.as_str(), 0)).collect();
        let rows = read_partitions_after(&txn, &reads, i64::MAX, 16, 500).await.expect("read");
        assert_eq!(rows.len(), 702, "every tenant's events");
        // Caught up (within the window): one read. Tenants past their event get none, the others
        // theirs, each at most its limit (`t000` has 3).
        let reads: Vec<(&str, i64)> =
            tenants.iter().enumerate().map(|(i, t)| (t.as_str(), if i % 2 == 0 { 0 } else { i as i64 + 1 })).collect();
        for (window, limit) in [(10_000, 16), (500, 16), (10_000, 1)] {
            let rows = read_partitions_after(&txn, &reads, 702, limit, window).await.expect("read");
            let expected = 350 + if limit > 1 { 2 } else { 0 };
            assert_eq!(rows.len(), expected, "window {window}, limit {limit}");
            assert!(rows.windows(2).all(|w| w[0].global_position < w[1].global_position), "in global order");
        }
    }
}
