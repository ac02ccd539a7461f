//! The command handler: load a stream's state, decide, append at the version read, retry on a
//! lost race.

use backon::{ExponentialBuilder, Retryable};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::event::Event;
use crate::expected_version::ExpectedVersion;
use crate::store::{AppendOptions, EventStore, ReadOptions, SnapshotPolicy};

/// The domain's `evolve`, boxed.
type EvolveFn<S, E> = dyn Fn(S, &E) -> S + Send + Sync;

/// Runs commands against one kind of stream: folds the stream with the domain's `evolve`, calls
/// the command's `decide` with the state, appends the events it returns with the version it read
/// as the expected version, and returns the new state.
///
/// Two commands racing on one stream can't both win: the loser's append fails with
/// [`Error::ExpectedVersionConflict`]. With [`retry_on_conflict`](Self::retry_on_conflict) the
/// loser loads the new state and decides again (off by default, as in Emmett: a command decided
/// on a state the caller never saw is not always what the caller meant).
///
/// ```no_run
/// use emmett_seaorm::{AppendOptions, CommandHandler, EventStore};
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Serialize, Deserialize)]
/// #[serde(tag = "type", content = "data")]
/// enum Counter { Incremented { by: i64 } }
///
/// #[derive(Debug, thiserror::Error)]
/// enum CounterError {
///     #[error("the counter is full")]
///     Full,
///     #[error(transparent)]
///     Store(#[from] emmett_seaorm::Error),
/// }
///
/// async fn increment(store: &EventStore, counter: &str) -> Result<i64, CounterError> {
///     let counters = CommandHandler::new(|n, e: &Counter| match e { Counter::Incremented { by } => n + by }, || 0)
///         .retry_on_conflict(emmett_seaorm::backon::ExponentialBuilder::default().with_max_times(5));
///     let handled = counters
///         .handle(store, counter, AppendOptions::default().partition("tenant-a"), |&n| match n {
///             10.. => Err(CounterError::Full),
///             _ => Ok([Counter::Incremented { by: 1 }]),
///         })
///         .await?;
///     Ok(handled.state)
/// }
/// ```
pub struct CommandHandler<S, E> {
    evolve: Box<EvolveFn<S, E>>,
    initial_state: Box<dyn Fn() -> S + Send + Sync>,
    retry: Option<ExponentialBuilder>,
    snapshots: Option<Snapshots<S>>,
}

/// Aggregate snapshots of a handler: the policy, and the state's encoding (`S` is only required
/// to be serde when snapshots are asked for).
struct Snapshots<S> {
    policy: SnapshotPolicy,
    encode: Box<EncodeFn<S>>,
    decode: Box<DecodeFn<S>>,
}

/// A state to JSON text, and back (what the snapshot table stores).
type EncodeFn<S> = dyn Fn(&S) -> serde_json::Result<String> + Send + Sync;
type DecodeFn<S> = dyn Fn(&str) -> serde_json::Result<S> + Send + Sync;

/// What [`CommandHandler::handle`] did.
#[derive(Debug, Clone, PartialEq)]
pub struct Handled<S, E> {
    /// The stream's state after the new events.
    pub state: S,
    /// The events the command appended (none when `decide` returned none: nothing was written).
    pub events: Vec<E>,
    /// The stream's version after the append: pass it as `ExpectedVersion::Exact` next time.
    pub next_expected_stream_version: u64,
    /// Global position of the last appended event; `None` when nothing was appended.
    pub last_event_global_position: Option<u64>,
    /// Whether this command created the stream.
    pub created_new_stream: bool,
}

/// Why one attempt failed: the store (a conflict may be retried) or the command.
enum Failure<Err> {
    Store(Error),
    Decide(Err),
}

impl<S, E: Event> CommandHandler<S, E> {
    /// A handler folding streams with `evolve` from `initial_state`.
    pub fn new(
        evolve: impl Fn(S, &E) -> S + Send + Sync + 'static,
        initial_state: impl Fn() -> S + Send + Sync + 'static,
    ) -> Self {
        Self { evolve: Box::new(evolve), initial_state: Box::new(initial_state), retry: None, snapshots: None }
    }

    /// On [`Error::ExpectedVersionConflict`], load the stream again and decide again, waiting as
    /// `backoff` says between attempts and giving up when it does. Inside a session
    /// ([`EventStore::with_session`]) nothing is retried: the caller retries the whole session.
    pub fn retry_on_conflict(mut self, backoff: ExponentialBuilder) -> Self {
        self.retry = Some(backoff);
        self
    }

    /// Loads streams from their aggregate snapshots (see
    /// [`EventStore::aggregate_stream_snapshotted`]) and stores a new one after a command once
    /// `policy` says: a long-lived stream's commands fold only its tail.
    pub fn snapshots(mut self, policy: SnapshotPolicy) -> Self
    where
        S: Serialize + DeserializeOwned,
    {
        let encode = Box::new(|state: &S| serde_json::to_string(state));
        let decode = Box::new(|json: &str| serde_json::from_str(json));
        self.snapshots = Some(Snapshots { policy, encode, decode });
        self
    }

    /// Handles one command on `stream_id`: `decide` gets the current state and returns the
    /// events to append (or the command's own error, returned as it is). `options` give the
    /// partition, stream type and metadata; an `expected` version there is checked before
    /// deciding (and a conflict with it is never retried), otherwise the version read is
    /// expected.
    pub async fn handle<Events, Err>(
        &self,
        store: &EventStore,
        stream_id: &str,
        options: AppendOptions,
        decide: impl Fn(&S) -> Result<Events, Err>,
    ) -> Result<Handled<S, E>, Err>
    where
        Events: IntoIterator<Item = E>,
        Err: From<Error>,
    {
        let attempt = || self.attempt(store, stream_id, &options, &decide);
        let outcome = match (self.retry, store.transaction()) {
            (Some(backoff), None) => {
                let retried = |failure: &Failure<Err>| {
                    matches!(failure, Failure::Store(Error::ExpectedVersionConflict { .. }))
                        && options.expected == ExpectedVersion::Any
                };
                attempt
                    .retry(backoff)
                    .when(retried)
                    .notify(|_, wait| tracing::debug!(stream = stream_id, ?wait, "command lost a race; deciding again"))
                    .await
            }
            _ => attempt().await,
        };
        outcome.map_err(|failure| match failure {
            Failure::Store(err) => err.into(),
            Failure::Decide(err) => err,
        })
    }

    async fn attempt<Events, Err>(
        &self,
        store: &EventStore,
        stream_id: &str,
        options: &AppendOptions,
        decide: &impl Fn(&S) -> Result<Events, Err>,
    ) -> Result<Handled<S, E>, Failure<Err>>
    where
        Events: IntoIterator<Item = E>,
    {
        let mut read = ReadOptions::default();
        read.partition.clone_from(&options.partition);
        if options.expected != ExpectedVersion::Any {
            read.expected = Some(options.expected);
        }
        let (loaded, snapshot_at) = match &self.snapshots {
            None => {
                let loaded = store.aggregate_stream(stream_id, &self.evolve, &self.initial_state, read).await;
                (loaded.map_err(Failure::Store)?, None)
            }
            Some(snapshots) => {
                let decode = |json: &str| (snapshots.decode)(json).ok();
                let (_, done) = store
                    .aggregate_from_snapshot(
                        stream_id,
                        &self.evolve,
                        &self.initial_state,
                        read,
                        snapshots.policy,
                        decode,
                    )
                    .await
                    .map_err(Failure::Store)?;
                (done.result, done.snapshot_at)
            }
        };
        let events: Vec<E> = decide(&loaded.state).map_err(Failure::Decide)?.into_iter().collect();
        let version = loaded.current_stream_version;
        if events.is_empty() {
            let (state, events) = (loaded.state, Vec::new());
            let none = Handled {
                state,
                events,
                next_expected_stream_version: version,
                last_event_global_position: None,
                created_new_stream: false,
            };
            return Ok(none);
        }
        let encoded = events.iter().map(serde_json::to_value).collect::<Result<Vec<Value>, _>>();
        let encoded = encoded.map_err(|err| Failure::Store(err.into()))?;
        let appended = store
            .append_to_stream(stream_id, encoded, options.clone().expected(ExpectedVersion::Exact(version)))
            .await
            .map_err(Failure::Store)?;
        let state = events.iter().fold(loaded.state, &self.evolve);
        let version = appended.next_expected_stream_version;
        if let (Some(snapshots), Some(at)) = (&self.snapshots, snapshot_at)
            && EventStore::snapshot_due(snapshots.policy, at, version)
        {
            // A cache: the events are stored, so failing to store it fails nothing.
            let partition = store.partition(options.partition.as_deref()).map_err(Failure::Store)?;
            let saved = match (snapshots.encode)(&state) {
                Ok(json) => store.save_snapshot(partition, stream_id, json, version, snapshots.policy).await,
                Err(err) => Err(err.into()),
            };
            if let Err(error) = saved {
                tracing::warn!(stream = stream_id, partition, %error, "storing the aggregate snapshot failed");
            }
        }
        Ok(Handled {
            state,
            events,
            next_expected_stream_version: appended.next_expected_stream_version,
            last_event_global_position: Some(appended.last_event_global_position),
            created_new_stream: appended.created_new_stream,
        })
    }
}
