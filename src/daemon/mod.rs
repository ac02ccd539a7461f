//! The projection daemon: keeps every projection of every tenant current, continuously, on as
//! many processes as you run.
//!
//! Each (projection, tenant) pair is a **lease row** (`emt_leases`: owner, epoch, expiry). Every
//! instance takes free leases up to its fair share and runs their projections with the
//! [`ProjectionRunner`]'s batches: the checkpoint moves in the batch's transaction, which also
//! checks the lease's epoch, so a batch of an instance that lost its lease never commits. A
//! gracefully stopped instance gives its leases back at once; a crashed one's are free when it
//! is gone: on PostgreSQL as soon as its presence connection closes (and its lease expired),
//! elsewhere when its lease expires (TTL, 10 s by default).
//!
//! A tenant whose first event arrives while the daemon runs is picked up within one poll
//! interval. A failing projection parks only its tenant, with exponential backoff, and records
//! the error where [`DaemonHandle::status`] shows it.
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
mod status;
mod telemetry;
mod wakeup;
mod worker;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use sea_orm::DatabaseConnection;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use status::{DaemonStatus, LeaseStatus};

use crate::backend;
use crate::error::{Error, Result};
use crate::event::Event;
use crate::limits::{self, MAX_IDENTIFIER_CHARS};
use crate::projection::{ProjectionRegistry, ProjectionRunner};
use crate::schema::subscriptions;
use crate::store::EventStore;
use agent::Projector;

/// The daemon's settings (see the builder methods of [`Daemon`]).
#[derive(Debug, Clone)]
pub(crate) struct Options {
    lease_ttl: Duration,
    renew_every: Duration,
    poll_min: Duration,
    poll_max: Duration,
    backoff_min: Duration,
    backoff_max: Duration,
    batch_size: u64,
    concurrency: usize,
    skip_undecodable: bool,
    notifications: bool,
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
            batch_size: 500,
            concurrency: 8,
            skip_undecodable: false,
            notifications: true,
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

    /// How long a lease stays valid without renewal (default 10 s): a crashed instance's
    /// tenants are taken over after it. Renewals happen every [`renew_every`](Self::renew_every).
    pub fn lease_ttl(mut self, ttl: Duration) -> Self {
        self.options.lease_ttl = ttl;
        self
    }

    /// How often leases are renewed where that takes a write (default 2 s; on PostgreSQL the
    /// presence connection makes renewals unnecessary while it is up).
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

    /// How long a failing (projection, tenant) stays parked: `min` after the first failure,
    /// doubling up to `max` (default 1 s → 5 min).
    pub fn backoff(mut self, min: Duration, max: Duration) -> Self {
        self.options.backoff_min = min;
        self.options.backoff_max = max.max(min);
        self
    }

    /// Events per batch, i.e. per transaction (default 500).
    pub fn batch_size(mut self, batch_size: u64) -> Self {
        self.options.batch_size = batch_size.clamp(1, i64::MAX as u64);
        self
    }

    /// How many (projection, tenant) pairs run at once (default 4).
    pub fn concurrency(mut self, concurrency: usize) -> Self {
        self.options.concurrency = concurrency.max(1);
        self
    }

    /// PostgreSQL: whether appends' notifications wake the daemon (default `true`). Off, it
    /// finds other processes' appends by polling (appends through the same store still wake
    /// it).
    pub fn notifications(mut self, enabled: bool) -> Self {
        self.options.notifications = enabled;
        self
    }

    /// Skip (and record) events the projections can't read instead of parking their tenant;
    /// see [`RunOptions::skip_undecodable_events`](crate::projection::RunOptions::skip_undecodable_events).
    pub fn skip_undecodable_events(mut self) -> Self {
        self.options.skip_undecodable = true;
        self
    }

    /// Starts the daemon in the background. Fails with [`Error::InvalidIdentifier`] for a
    /// subscription id or tenant the schema can't store.
    pub async fn start(self) -> Result<DaemonHandle> {
        for subscription in self.projections.keys() {
            limits::check_identifier("subscription id", subscription, MAX_IDENTIFIER_CHARS)?;
        }
        for tenant in self.tenants.iter().flatten() {
            limits::check_identifier("partition", tenant, MAX_IDENTIFIER_CHARS)?;
        }
        let db = self.store.pool().cloned().ok_or(Error::SessionStillInUse)?;
        let owner = self.owner.unwrap_or_else(default_owner);
        limits::check_identifier("daemon owner", &owner, 40)?;
        let (progress, progress_rx) = watch::channel(0);
        let (stop, stop_rx) = watch::channel(false);
        let subscriptions: Vec<String> = self.projections.keys().cloned().collect();
        let worker = worker::Worker {
            store: self.store,
            db: db.clone(),
            projections: self.projections,
            tenants: self.tenants.clone(),
            options: self.options,
            owner: owner.clone(),
            progress,
        };
        let task = tokio::spawn(worker.run(stop_rx));
        Ok(DaemonHandle {
            owner,
            db,
            subscriptions,
            tenants: self.tenants,
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

/// A running daemon. [`stop`](Self::stop) it to hand its work over gracefully; dropping the
/// handle aborts it like a crash would (its leases are free once they expire).
pub struct DaemonHandle {
    owner: String,
    db: DatabaseConnection,
    subscriptions: Vec<String>,
    tenants: Option<BTreeSet<String>>,
    progress: watch::Receiver<u64>,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<Result<()>>>,
}

impl Drop for DaemonHandle {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

impl DaemonHandle {
    /// This instance's name, as lease rows show it.
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// Stops gracefully: batches in flight finish, leases are given back (other instances take
    /// them at once), and the daemon's last error, if it stopped on one, is returned.
    pub async fn stop(mut self) -> Result<()> {
        let _ = self.stop.send(true);
        match self.task.take() {
            Some(task) => {
                task.await.map_err(|e| Error::DaemonFailed { owner: self.owner.clone(), reason: e.to_string() })?
            }
            None => Ok(()),
        }
    }

    /// Waits until every projection has processed, for every tenant, every event up to global
    /// `position` (e.g. an append's `last_event_global_position`: read-your-writes). Wrap it in
    /// `tokio::time::timeout` to bound the wait.
    pub async fn caught_up(&self, position: u64) -> Result<()> {
        let mut progress = self.progress.clone();
        loop {
            if self.behind(position as i64).await?.is_empty() {
                return Ok(());
            }
            let _ = tokio::time::timeout(Duration::from_millis(100), progress.changed()).await;
        }
    }

    /// The (subscription, tenant) pairs whose checkpoint is below their last event up to
    /// `position`.
    async fn behind(&self, position: i64) -> Result<Vec<(String, String)>> {
        use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};
        let heads = self.tenant_heads(Some(position)).await?;
        let checkpoints = subscriptions::Entity::find()
            .filter(subscriptions::Column::SubscriptionId.is_in(self.subscriptions.iter().cloned()))
            .filter(subscriptions::Column::Version.eq(1))
            .all(&self.db)
            .await?;
        let checkpoint = |s: &str, t: &str| {
            checkpoints
                .iter()
                .find(|c| c.subscription_id == s && c.partition == t)
                .map_or(0, |c| c.last_processed_position)
        };
        Ok(self
            .subscriptions
            .iter()
            .flat_map(|s| heads.iter().map(move |(t, h)| (s, t, *h)))
            .filter(|(s, t, head)| checkpoint(s, t) < *head)
            .map(|(s, t, _)| (s.clone(), t.clone()))
            .collect())
    }

    /// The daemon's tenants with their last global position (at or below `upto`).
    async fn tenant_heads(&self, upto: Option<i64>) -> Result<Vec<(String, i64)>> {
        let only: Option<Vec<String>> = self.tenants.as_ref().map(|t| t.iter().cloned().collect());
        let mut heads = backend::partition_heads(&self.db, only.as_deref()).await?;
        if let Some(upto) = upto {
            let mut below = Vec::with_capacity(heads.len());
            for (tenant, head) in heads {
                if head <= upto {
                    below.push((tenant, head));
                } else if let Some(h) = backend::last_position_upto(&self.db, &tenant, upto).await? {
                    below.push((tenant, h));
                }
            }
            heads = below;
        }
        Ok(heads)
    }

    /// Every (projection, tenant) pair with its checkpoint, lag, owner and last failure, read
    /// from the database: the work of every instance.
    pub async fn status(&self) -> Result<DaemonStatus> {
        use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};
        let backend::Leases { rows, instances, .. } = backend::leases(&self.db, &self.subscriptions).await?;
        let heads: BTreeMap<String, i64> = self.tenant_heads(None).await?.into_iter().collect();
        let checkpoints = subscriptions::Entity::find()
            .filter(subscriptions::Column::SubscriptionId.is_in(self.subscriptions.iter().cloned()))
            .filter(subscriptions::Column::Version.eq(1))
            .all(&self.db)
            .await?;
        let mut leases = Vec::with_capacity(rows.len());
        for row in rows {
            if self.tenants.as_ref().is_some_and(|only| !only.contains(&row.partition)) {
                continue;
            }
            let checkpoint = checkpoints
                .iter()
                .find(|c| c.subscription_id == row.subscription && c.partition == row.partition)
                .map_or(0, |c| c.last_processed_position);
            let (lag_events, lag_seconds) = backend::pending(&self.db, &row.partition, checkpoint).await?;
            leases.push(LeaseStatus {
                head: heads.get(&row.partition).copied().unwrap_or(0).max(0) as u64,
                checkpoint: checkpoint.max(0) as u64,
                lag_events: lag_events.max(0) as u64,
                lag: Duration::from_secs_f64(lag_seconds.max(0.0)),
                failures: row.failures.max(0) as u64,
                retry_in: Duration::from_millis(row.retry_in_ms.max(0) as u64),
                last_error: row.last_error.map(|e| (e, row.error_position.unwrap_or(0).max(0) as u64)),
                owner: row.owner,
                subscription: row.subscription,
                tenant: row.partition,
            });
        }
        leases.sort_by(|a, b| (&a.subscription, &a.tenant).cmp(&(&b.subscription, &b.tenant)));
        Ok(DaemonStatus { owner: self.owner.clone(), instances, cycles: *self.progress.borrow(), leases })
    }
}
