//! The projection daemon: keeps every projection of every tenant current, continuously, on as
//! many processes as you run.
//!
//! A projection's tenants fall into 64 **segments** by a fixed hash of their id;
//! each segment is a row (`emt_segments`: owner, epoch). Every instance takes free segments up to
//! its fair share and runs the projections of their tenants with the [`ProjectionRunner`]'s
//! batches: a tenant's checkpoint moves in the batch's transaction, which also checks its
//! segment's epoch, so a batch of an instance that lost the segment never commits. What an
//! instance reads per second does not grow with the number of tenants: the segment rows, and
//! "which tenants have events since the last horizon" from the global-position index. A
//! gracefully stopped instance gives its segments back at once. Otherwise an instance holds them
//! while it renews them from its loop (one row per instance; on PostgreSQL a deadline in its
//! presence connection's name, no write): a crashed, hung or paused one loses them after the TTL
//! (10 s by default), on PostgreSQL a crashed one as soon as its connection closes.
//!
//! A tenant whose first event arrives while the daemon runs is picked up within one poll
//! interval. A failing — or panicking — projection stops only its tenant: retried with
//! exponential backoff, parked after [`Daemon::retries`] failures in a row, its error and the
//! event's global position recorded where [`DaemonHandle::status`] shows them. Operators'
//! resets and resumes reach running instances within a poll interval.
//!
//! ```no_run
//! # use serde::{Deserialize, Serialize};
//! # #[derive(Serialize, Deserialize)] #[serde(tag = "type", content = "data")]
//! # enum CartEvent { ItemAdded { price: i64 } }
//! # async fn f(store: emmett_seaorm::EventStore, carts: emmett_seaorm::projection::ProjectionRegistry<CartEvent>)
//! #     -> emmett_seaorm::Result<()> {
//! use emmett_seaorm::daemon::Daemon;
//!
//! let daemon = Daemon::new(store).projection("carts-read-model", carts).start().await?;
//! // … the app runs; read models follow every tenant's events …
//! println!("{:?}", daemon.status().await?);
//! daemon.stop().await?; // finishes its batches, gives its leases to the other instances
//! # Ok(()) }
//! ```

mod agent;
mod coordinator;
mod fleet;
mod handle;
mod status;
mod telemetry;
mod wakeup;
mod worker;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

pub use fleet::DaemonFleet;
pub use handle::DaemonHandle;
pub use status::{DaemonStatus, LeaseStatus, recorded};
pub use wakeup::WakeUps;

use crate::error::{Error, Result};
use crate::event::Event;
use crate::limits::{self, MAX_IDENTIFIER_CHARS};
use crate::projection::Projector;
use crate::projection::{ProjectionRegistry, ProjectionRunner};
use crate::store::EventStore;

/// Failed runs in a row after which a lease counts as parked, unless [`Daemon::retries`] says.
const DEFAULT_RETRIES: u32 = 3;

/// How many groups of (projection, tenant) pairs a daemon runs at once, unless
/// [`Daemon::concurrency`] says.
pub const DEFAULT_CONCURRENCY: usize = 8;

/// The daemon's settings (see the builder methods of [`Daemon`]).
#[derive(Debug, Clone)]
pub(crate) struct Options {
    lease_ttl: Duration,
    renew_every: Duration,
    poll_min: Duration,
    poll_max: Duration,
    backoff_min: Duration,
    backoff_max: Duration,
    retries: u32,
    batch_size: u64,
    concurrency: usize,
    skip_undecodable: bool,
    notifications: bool,
    listen_url: Option<String>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            lease_ttl: Duration::from_secs(10),
            renew_every: Duration::from_secs(2),
            poll_min: Duration::from_millis(10),
            poll_max: Duration::from_secs(1),
            backoff_min: Duration::from_secs(1),
            backoff_max: Duration::from_secs(300),
            retries: DEFAULT_RETRIES,
            batch_size: 500,
            concurrency: DEFAULT_CONCURRENCY,
            skip_undecodable: false,
            notifications: true,
            listen_url: None,
        }
    }
}

/// Builds and starts a projection daemon over one [`EventStore`].
pub struct Daemon {
    store: EventStore,
    projections: BTreeMap<String, Arc<dyn Projector>>,
    tenants: Option<BTreeSet<String>>,
    owner: Option<String>,
    options: Options,
}

impl Daemon {
    /// A daemon over `store` (which must work on a pool, not inside a session).
    pub fn new(store: EventStore) -> Self {
        Self { store, projections: BTreeMap::new(), tenants: None, owner: None, options: Options::default() }
    }

    /// Runs `registry` under `subscription_id` (its checkpoints' name) for every tenant.
    pub fn projection<E: Event + 'static>(
        mut self,
        subscription_id: impl Into<String>,
        registry: ProjectionRegistry<E>,
    ) -> Self {
        let runner = ProjectionRunner::new(self.store.clone(), registry);
        self.projections.insert(subscription_id.into(), Arc::new(runner));
        self
    }

    /// Runs only these tenants instead of every tenant the store holds.
    pub fn tenants<S: Into<String>>(mut self, tenants: impl IntoIterator<Item = S>) -> Self {
        self.tenants = Some(tenants.into_iter().map(Into::into).collect());
        self
    }

    /// This instance's name in lease rows (default: host name, process id and a random suffix).
    pub fn owner(mut self, owner: impl Into<String>) -> Self {
        self.owner = Some(owner.into());
        self
    }

    /// How long an instance holds its leases without renewing them (default 10 s): a crashed,
    /// hung or paused instance's tenants are taken over after it, and its late batches are
    /// refused. Renewals happen every [`renew_every`](Self::renew_every), from the daemon's loop.
    pub fn lease_ttl(mut self, ttl: Duration) -> Self {
        self.options.lease_ttl = ttl;
        self
    }

    /// How often the instance renews its leases (default 2 s; keep it well below the
    /// [`lease_ttl`](Self::lease_ttl)): one write of its registration row, or on PostgreSQL
    /// while its presence connection is up a new deadline in that connection's name (no write).
    pub fn renew_every(mut self, every: Duration) -> Self {
        self.options.renew_every = every;
        self
    }

    /// The poll interval: `min` right after work, doubling up to `max` while idle (default
    /// 10 ms → 1 s). Appends through the same store wake the daemon at once.
    pub fn poll_interval(mut self, min: Duration, max: Duration) -> Self {
        self.options.poll_min = min;
        self.options.poll_max = max.max(min);
        self
    }

    /// How long a failing (projection, tenant) waits before it runs again: `min` after the
    /// first failure, doubling up to `max` (default 1 s → 5 min). Other tenants go on meanwhile.
    pub fn backoff(mut self, min: Duration, max: Duration) -> Self {
        self.options.backoff_min = min;
        self.options.backoff_max = max.max(min);
        self
    }

    /// Failed runs in a row after which a (projection, tenant) counts as *parked* (default 3):
    /// reported by [`LeaseStatus::parked`], logged as an error and counted in the
    /// `emmett_daemon_parked` metric. It keeps being retried with the [`backoff`](Self::backoff).
    pub fn retries(mut self, retries: u32) -> Self {
        self.options.retries = retries.max(1);
        self
    }

    /// Events per batch, i.e. per transaction (default 500).
    pub fn batch_size(mut self, batch_size: u64) -> Self {
        self.options.batch_size = batch_size.clamp(1, i64::MAX as u64);
        self
    }

    /// How many groups of (projection, tenant) pairs (up to 512 tenants of one projection in one
    /// transaction) run at once (default [`DEFAULT_CONCURRENCY`]). On SQLite one at a time
    /// whatever this says: the file has one writer, and batches waiting on its lock starved the
    /// app's appends past the busy timeout.
    pub fn concurrency(mut self, concurrency: usize) -> Self {
        self.options.concurrency = concurrency.max(1);
        self
    }

    /// PostgreSQL: whether appends' notifications wake the daemon (default `true`). Off, it
    /// finds other processes' appends by polling (appends in this process through the same
    /// store still wake it, and on SQLite and MySQL through any store on the same database).
    pub fn notifications(mut self, enabled: bool) -> Self {
        self.options.notifications = enabled;
        self
    }

    /// PostgreSQL behind a transaction pooler (a store connected with `pooler=transaction`):
    /// a URL that reaches the server directly (or through a session-mode pooler) for the
    /// daemon's one listening connection, which wakes it on appends and lease hand-overs and
    /// tells the other instances it is alive. Without it, such a daemon polls (see
    /// [`poll_interval`](Self::poll_interval)) and renews a registration row instead: equally
    /// correct, a little slower to react. Not needed with a direct connection.
    ///
    /// ```no_run
    /// # async fn f(store: emmett_seaorm::EventStore) -> emmett_seaorm::Result<()> {
    /// let daemon = emmett_seaorm::daemon::Daemon::new(store)
    ///     .listen_url("postgres://app@db.internal:5432/app")
    ///     .start()
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn listen_url(mut self, url: impl Into<String>) -> Self {
        self.options.listen_url = Some(url.into());
        self
    }

    /// Skip (and record) events the projections can't read instead of parking their tenant;
    /// see [`RunOptions::skip_undecodable_events`](crate::projection::RunOptions::skip_undecodable_events).
    pub fn skip_undecodable_events(mut self) -> Self {
        self.options.skip_undecodable = true;
        self
    }

    /// Starts the daemon in the background and returns once the instance is registered (the
    /// other instances count it; on PostgreSQL its presence connection is up). Fails with
    /// [`Error::InvalidIdentifier`] for a subscription id or tenant the schema can't store, and
    /// with the database's error when it can't register.
    pub async fn start(self) -> Result<DaemonHandle> {
        for subscription in self.projections.keys() {
            limits::check_identifier("subscription id", subscription, MAX_IDENTIFIER_CHARS)?;
        }
        for tenant in self.tenants.iter().flatten() {
            limits::check_identifier("partition", tenant, MAX_IDENTIFIER_CHARS)?;
        }
        if self.store.transaction().is_some() {
            return Err(Error::SessionStillInUse);
        }
        let db = self.store.executor().clone();
        #[cfg(feature = "postgres")]
        if let Some(url) = &self.options.listen_url
            && let Err(error) = url.parse::<sea_orm::sqlx::postgres::PgConnectOptions>()
        {
            let reason = error.to_string();
            return Err(Error::InvalidIdentifier { what: "listen URL", value: url.clone(), reason });
        }
        let wake_ups = WakeUps::of(&db, self.options.listen_url.as_deref(), self.options.notifications);
        tracing::info!(?wake_ups, "projection daemon starting");
        let owner = self.owner.unwrap_or_else(default_owner);
        limits::check_identifier("daemon owner", &owner, 40)?;
        let (progress, progress_rx) = watch::channel(worker::Cycles::default());
        let (stop, stop_rx) = watch::channel(false);
        let subscriptions: Vec<String> = self.projections.keys().cloned().collect();
        let projections = self.projections.clone();
        let retries = self.options.retries;
        let worker = worker::Worker {
            store: self.store,
            db: db.clone(),
            projections: self.projections,
            tenants: self.tenants.clone(),
            options: self.options,
            owner: owner.clone(),
            progress,
        };
        let (ready, registered) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(worker.run(stop_rx, ready));
        if registered.await.is_err() {
            // The worker ended before it was registered: its error.
            let failed = |reason: String| Error::DaemonFailed { owner: owner.clone(), reason };
            return Err(match task.await {
                Ok(Err(error)) => error,
                Ok(Ok(())) => failed("stopped before it started".into()),
                Err(error) => failed(error.to_string()),
            });
        }
        Ok(DaemonHandle {
            owner,
            db,
            subscriptions,
            projections,
            tenants: self.tenants,
            retries,
            wake_ups,
            progress: progress_rx,
            stop,
            task: Some(task),
        })
    }
}

/// `host-pid-random`: unique per start, short enough for PostgreSQL's `application_name`.
fn default_owner() -> String {
    let host = std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()).unwrap_or_else(|| "host".into());
    let host: String = host.chars().filter(char::is_ascii_alphanumeric).take(16).collect();
    let suffix = &uuid::Uuid::now_v7().simple().to_string()[20..];
    format!("{host}-{}-{suffix}", std::process::id())
}
