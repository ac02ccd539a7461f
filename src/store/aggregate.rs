//! Aggregates of long streams: a stored snapshot of the folded state, and only the tail folded.

use serde::{Serialize, de::DeserializeOwned};

use super::{EventStore, check_expected, check_stream};
use crate::backend::aggregates::{self, StoredSnapshot};
use crate::error::Result;
use crate::event::Event;
use crate::store::{AggregateStreamResult, ReadOptions};

/// When [`EventStore::aggregate_stream_snapshotted`] (and a
/// [`CommandHandler`](crate::CommandHandler) with [`snapshots`](crate::CommandHandler::snapshots))
/// stores the state it folded: once at least `every` events were folded past the stored
/// snapshot. Snapshots are tagged with a **version**: bump it whenever `evolve`, the state's
/// shape or the upcasters change; a snapshot of another version (or one that no longer
/// decodes) is ignored and replaced, never trusted.
///
/// ```
/// use emmett_seaorm::SnapshotPolicy;
///
/// let policy = SnapshotPolicy::every(100).version(2);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotPolicy {
    every: u64,
    version: u32,
}

impl SnapshotPolicy {
    /// A snapshot once `events` (at least 1) were folded past the last one; version 1.
    pub fn every(events: u64) -> Self {
        Self { every: events.max(1), version: 1 }
    }

    /// The snapshots' version: those of any other version are ignored and replaced.
    pub fn version(mut self, version: u32) -> Self {
        self.version = version;
        self
    }
}

/// A stream's state and where its stored snapshot is, as the command handler needs them.
pub(crate) struct Snapshotted<S> {
    pub result: AggregateStreamResult<S>,
    /// The stream position of the snapshot stored now (0: none usable; `None`: a partial read,
    /// which stores none).
    pub snapshot_at: Option<u64>,
}

impl EventStore {
    /// [`aggregate_stream`](Self::aggregate_stream) from the stream's stored snapshot: folds only
    /// the events after it, and stores a new one when `policy` says (in the same session, if
    /// any). The result is the same as without a snapshot; a snapshot of another
    /// [`SnapshotPolicy::version`], past the stream's version, or that does not decode as `S`
    /// is ignored. Options that read part of a stream (`from`, `to`, `max_count`) fold without
    /// snapshots. A stream's snapshot is forgotten when it is archived.
    ///
    /// ```no_run
    /// # async fn f(store: emmett_seaorm::EventStore) -> emmett_seaorm::Result<()> {
    /// use emmett_seaorm::{ReadOptions, SnapshotPolicy};
    ///
    /// let balance = store
    ///     .aggregate_stream_snapshotted(
    ///         "account-1",
    ///         |balance: i64, e: &serde_json::Value| balance + e["data"]["amount"].as_i64().unwrap_or(0),
    ///         || 0,
    ///         ReadOptions::default().partition("tenant-a"),
    ///         SnapshotPolicy::every(1_000),
    ///     )
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub async fn aggregate_stream_snapshotted<E: Event, S: Serialize + DeserializeOwned>(
        &self,
        stream_id: &str,
        evolve: impl Fn(S, &E) -> S,
        initial_state: impl FnOnce() -> S,
        options: ReadOptions,
        policy: SnapshotPolicy,
    ) -> Result<AggregateStreamResult<S>> {
        let decode = |json: &str| serde_json::from_str(json).ok();
        let (partition, done) =
            self.aggregate_from_snapshot(stream_id, evolve, initial_state, options, policy, decode).await?;
        let version = done.result.current_stream_version;
        let result = done.result;
        if done.snapshot_at.is_some_and(|at| Self::snapshot_due(policy, at, version)) {
            let json = serde_json::to_string(&result.state)?;
            self.save_snapshot(&partition, stream_id, json, version, policy).await?;
        }
        Ok(result)
    }

    /// The aggregate from the stored snapshot (without storing one; `decode` reads a stored
    /// state, `None` when it can't), with the partition read.
    pub(crate) async fn aggregate_from_snapshot<E: Event, S>(
        &self,
        stream_id: &str,
        evolve: impl Fn(S, &E) -> S,
        initial_state: impl FnOnce() -> S,
        options: ReadOptions,
        policy: SnapshotPolicy,
        decode: impl FnOnce(&str) -> Option<S>,
    ) -> Result<(String, Snapshotted<S>)> {
        let partition = self.partition(options.partition.as_deref())?.to_owned();
        let partial = options.from.is_some() || options.to.is_some() || options.max_count.is_some();
        if partial {
            let result = self.aggregate_stream(stream_id, evolve, initial_state, options).await?;
            return Ok((partition, Snapshotted { result, snapshot_at: None }));
        }
        check_stream(stream_id, &partition)?;
        let load = || async { Ok(aggregates::load(self.executor(), &partition, stream_id).await?) };
        let (version, stored) = super::reading(load).await?;
        check_expected(stream_id, &partition, options.expected, version)?;
        let usable =
            stored.filter(|s| s.version == i64::from(policy.version) && (1..=version as i64).contains(&s.position));
        let (state, snapshot_at) = match usable.and_then(|s| Some((decode(&s.state)?, s.position))) {
            Some((state, position)) => (state, position as u64),
            None => (initial_state(), 0),
        };
        let state = self.fold_range(stream_id, &partition, state, &evolve, snapshot_at + 1, version, u64::MAX).await?;
        let result = AggregateStreamResult { state, current_stream_version: version, stream_exists: version > 0 };
        Ok((partition, Snapshotted { result, snapshot_at: Some(snapshot_at) }))
    }

    /// Stores `state` (JSON) as the snapshot of the stream at `position`.
    pub(crate) async fn save_snapshot(
        &self,
        partition: &str,
        stream_id: &str,
        state: String,
        position: u64,
        policy: SnapshotPolicy,
    ) -> Result<()> {
        let snapshot = StoredSnapshot { version: i64::from(policy.version), position: position as i64, state };
        aggregates::save(self.executor(), partition, stream_id, &snapshot).await?;
        Ok(())
    }

    /// Whether `policy` asks for a snapshot at `position`, the last one being at `snapshot_at`.
    pub(crate) fn snapshot_due(policy: SnapshotPolicy, snapshot_at: u64, position: u64) -> bool {
        position >= snapshot_at.saturating_add(policy.every)
    }
}
