//! The daemon's loop: coordinate leases, find tenants with new events, run their projections,
//! sleep until woken or the poll timer fires.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use std::panic::AssertUnwindSafe;

use futures::{FutureExt, StreamExt};
use sea_orm::{DatabaseConnection, DbBackend};
use tokio::sync::watch;
use tracing::Instrument;

use super::Options;
use super::agent::{self, Held, Turn};
use super::coordinator::{self, Key};
use super::telemetry;
use super::wakeup::Presence;
use crate::backend;
use crate::error::{Error, Result};
use crate::projection::Projector;
use crate::projection::RunOptions;
use crate::store::EventStore;

/// Tenants of one projection projected in one transaction.
const GROUP: usize = 16;

/// The longest pause between lease rounds where no notification tells of hand-overs, so a
/// gracefully stopped instance's work is taken over within a second.
const HAND_OVER_POLL: Duration = Duration::from_millis(500);

/// How long a cycle waits for PostgreSQL writers in flight before it looks again later.
const HORIZON_WAIT: Duration = Duration::from_secs(1);

pub(super) struct Worker {
    pub store: EventStore,
    pub db: DatabaseConnection,
    pub projections: BTreeMap<String, Arc<dyn Projector>>,
    pub tenants: Option<BTreeSet<String>>,
    pub options: Options,
    pub owner: String,
    /// Bumped after every cycle: what `caught_up` waits on.
    pub progress: watch::Sender<u64>,
}

/// The loop's state.
struct State {
    held: BTreeMap<Key, Held>,
    /// Tenants whose lease rows exist.
    known: BTreeSet<String>,
    /// The head up to which every tenant's last position is known.
    seen_head: Option<i64>,
    last_sweep: Instant,
    /// When the instance last renewed its registration (or presence deadline).
    last_renewal: Instant,
    /// When a lease round last succeeded.
    last_coordinated: Instant,
    /// When every partition was last listed, how long that took, and whether events arrived
    /// since.
    last_discovery: Option<Instant>,
    discovery_cost: Duration,
    discovery_due: bool,
    /// Told once the first round has claimed leases and found the tenants, so `start` returns
    /// with a `status()` that shows them.
    ready: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Worker {
    /// Runs until `stop` turns true, then gives its leases back. `ready` is told once the
    /// instance is registered and its first lease round and tenant discovery are done.
    pub async fn run(self, mut stop: watch::Receiver<bool>, ready: tokio::sync::oneshot::Sender<()>) -> Result<()> {
        let subscriptions: Vec<String> = self.projections.keys().cloned().collect();
        let ttl = self.options.lease_ttl;
        let mut presence = Presence::start(&self.db, &self.owner, self.options.notifications, ttl).await;
        let mut appends = self.store.appends();
        let mut state = State {
            held: BTreeMap::new(),
            known: BTreeSet::new(),
            seen_head: None,
            last_sweep: Instant::now(),
            last_renewal: Instant::now(),
            last_coordinated: Instant::now(),
            last_discovery: None,
            discovery_cost: Duration::ZERO,
            discovery_due: self.tenants.is_none(),
            ready: Some(ready),
        };
        // Registered before the first balance, so the others count this instance at once.
        backend::heartbeat(&self.db, &self.owner, self.options.lease_ttl.as_millis() as i64).await?;
        state.last_renewal = Instant::now();
        if let Some(tenants) = &self.tenants {
            self.ensure(&mut state, &subscriptions, tenants.iter().cloned().collect()).await?;
        }
        let mut delay = self.options.poll_min;
        let mut next_balance = Instant::now();
        while !*stop.borrow() {
            let mut head = None;
            if Instant::now() >= next_balance {
                match self.coordinate(&mut state, &subscriptions, &presence).await {
                    Ok(h) => {
                        head = Some(h);
                        state.last_coordinated = Instant::now();
                    }
                    Err(error) => tracing::warn!(%error, "lease coordination failed; retrying"),
                }
                // Without a presence connection no hand-over notice arrives: look twice as often.
                // And never less often than renewals are due, however long the idle poll.
                let every = match presence.up.load(Ordering::SeqCst) {
                    true => self.options.poll_max,
                    false => Ord::min(self.options.poll_max, HAND_OVER_POLL),
                };
                next_balance = Instant::now() + Ord::min(every, self.options.renew_every);
            }
            let span = tracing::debug_span!("daemon_cycle", owner = self.owner);
            let worked = match self.cycle(&mut state, &subscriptions, head, &presence).instrument(span).await {
                Ok(worked) => worked,
                Err(error) => {
                    tracing::warn!(%error, "daemon cycle failed; retrying");
                    false
                }
            };
            if let Some(ready) = state.ready.take() {
                let _ = ready.send(()); // (the first cycle failed: start anyway, it retries)
            }
            self.progress.send_modify(|n| *n += 1);
            telemetry::coordination(&self.owner, state.held.len(), state.last_coordinated.elapsed());
            delay = if worked { self.options.poll_min } else { Ord::min(delay * 2, self.options.poll_max) };
            let sleep = Ord::min(delay, next_balance.saturating_duration_since(Instant::now()));
            tokio::select! {
                _ = stop.changed() => {}
                _ = appends.changed() => {}
                _ = presence.appended.changed() => {}
                woke = presence.leases.changed() => {
                    // A hand-over or a reconnect: look at the leases again now.
                    if woke.is_ok() { next_balance = Instant::now(); }
                }
                _ = tokio::time::sleep(sleep) => {}
            }
        }
        // Graceful: batches have finished (cycles run to the end); hand everything over.
        drop(presence);
        backend::leave(&self.db, &self.owner).await?;
        tracing::info!(owner = self.owner, "projection daemon stopped; leases released");
        Ok(())
    }

    /// Renews and rebalances the leases; returns the store's head, read with them.
    async fn coordinate(&self, state: &mut State, subscriptions: &[String], presence: &Presence) -> Result<i64> {
        self.renew(state, presence).await?;
        Ok(coordinator::balance(&self.db, &self.owner, subscriptions, self.tenants.as_ref(), &mut state.held).await?)
    }

    /// Renews the instance's hold on its leases when due: its presence connection's deadline
    /// (PostgreSQL: no write), else its registration row. Only this loop renews, so an instance
    /// whose loop hangs (a stuck handler, a paused process) loses its leases after the TTL.
    async fn renew(&self, state: &mut State, presence: &Presence) -> Result<()> {
        if state.last_renewal.elapsed() < self.options.renew_every {
            return Ok(());
        }
        let ttl = self.options.lease_ttl;
        match presence.up.load(Ordering::SeqCst) {
            true => presence.renew(ttl),
            false => backend::heartbeat(&self.db, &self.owner, ttl.as_millis() as i64).await?,
        }
        state.last_renewal = Instant::now();
        Ok(())
    }

    /// Creates the lease rows of new tenants.
    async fn ensure(&self, state: &mut State, subscriptions: &[String], tenants: Vec<String>) -> Result<()> {
        let new: Vec<String> = tenants.into_iter().filter(|t| !state.known.contains(t)).collect();
        if new.is_empty() {
            return Ok(());
        }
        let pairs: Vec<(String, String)> =
            subscriptions.iter().flat_map(|s| new.iter().map(move |t| (s.clone(), t.clone()))).collect();
        backend::ensure_leases(&self.db, &pairs).await?;
        tracing::info!(count = new.len(), first = ?new.iter().take(5).collect::<Vec<_>>(), "tenants found");
        state.known.extend(new);
        Ok(())
    }

    /// Finds tenants with new events and runs the projections this instance holds for them
    /// (`head`: the store's head if just read). Returns whether it projected anything.
    async fn cycle(
        &self,
        state: &mut State,
        subscriptions: &[String],
        head: Option<i64>,
        presence: &Presence,
    ) -> Result<bool> {
        let backend_kind = self.db.get_database_backend();
        let head = match head {
            Some(head) => head,
            None => backend::head(&self.db).await?,
        };
        // MySQL's probe sees committed positions only, so a late commit below it changes
        // nothing there: every lease is looked at again each poll interval.
        let sweep = backend_kind == DbBackend::MySql && state.last_sweep.elapsed() >= self.options.poll_max;
        let started = Instant::now();
        let changed = state.seen_head != Some(head) || sweep;
        // Listing every partition finds new tenants. Its cost grows with the number of tenants,
        // so it takes at most a tenth of the daemon's time; between, only held tenants are
        // looked at.
        state.discovery_due |= changed && self.tenants.is_none();
        let discover =
            state.discovery_due && state.last_discovery.is_none_or(|at| at.elapsed() >= state.discovery_cost * 10);
        if changed || discover {
            let safe = backend::global_horizon(&self.db, HORIZON_WAIT).await?;
            let waited = started.elapsed();
            let heads: BTreeMap<String, i64> = if discover {
                let listing = Instant::now();
                let heads = backend::partition_heads(&self.db, None).await?.into_iter().collect();
                (state.last_discovery, state.discovery_cost) = (Some(Instant::now()), listing.elapsed());
                state.discovery_due = false;
                heads
            } else {
                let held: BTreeSet<String> = state.held.keys().map(|(_, t)| t.clone()).collect();
                let held: Vec<String> = held.into_iter().collect();
                match held.is_empty() {
                    true => BTreeMap::new(),
                    false => backend::partition_heads(&self.db, Some(&held)).await?.into_iter().collect(),
                }
            };
            tracing::debug!(head, ?safe, ?waited, scanned = ?started.elapsed(), tenants = heads.len(), discover, "daemon: new events");
            let before = state.known.len();
            self.ensure(state, subscriptions, heads.keys().cloned().collect()).await?;
            if state.known.len() != before {
                let tenants = self.tenants.as_ref();
                coordinator::balance(&self.db, &self.owner, subscriptions, tenants, &mut state.held).await?;
            }
            for ((_, tenant), held) in state.held.iter_mut() {
                held.head = heads.get(tenant).copied().unwrap_or(held.head);
                if sweep || held.checkpoint.is_none_or(|c| c < held.head) {
                    held.dirty = true;
                    held.behind_since.get_or_insert_with(Instant::now);
                }
            }
            // Without a new horizon (a writer still running after a second) the last one stays:
            // every event up to it is committed, and the next cycle looks again.
            match backend_kind {
                DbBackend::MySql => state.seen_head = Some(head),
                _ => state.seen_head = safe.or(state.seen_head),
            }
            if sweep {
                state.last_sweep = Instant::now();
            }
        }
        if let Some(ready) = state.ready.take() {
            let _ = ready.send(());
        }
        // Where the store has one, the horizon just waited for serves every tenant's run.
        let until = if backend_kind == DbBackend::MySql { None } else { state.seen_head };
        let ready: Vec<(Key, Held)> =
            state.held.iter().filter(|(_, h)| h.ready()).map(|(k, h)| (k.clone(), h.clone())).collect();
        if ready.is_empty() {
            return Ok(false);
        }
        // Where the horizon is known, tenants of one projection run in groups, one
        // transaction each; elsewhere (MySQL: a horizon per tenant) one by one.
        let group = if until.is_some() { GROUP } else { 1 };
        let mut jobs: Vec<(String, Vec<(String, Held)>)> = Vec::new();
        for ((subscription, tenant), held) in ready {
            match jobs.last_mut() {
                Some((s, tenants)) if *s == subscription && tenants.len() < group => tenants.push((tenant, held)),
                _ => jobs.push((subscription, vec![(tenant, held)])),
            }
        }
        let turns = futures::stream::iter(jobs)
            .map(|(subscription, tenants)| async move {
                let began = Instant::now();
                let projector = Arc::clone(&self.projections[&subscription]);
                let mut options = RunOptions::default().batch_size(self.options.batch_size).single_batch();
                options.lease_ttl = Some(self.options.lease_ttl);
                if self.options.skip_undecodable {
                    options = options.skip_undecodable_events();
                }
                let run = async {
                    match until {
                        Some(until) => {
                            agent::group_turn(projector, &subscription, &self.owner, &tenants, until, options).await
                        }
                        None => {
                            let (tenant, held) = &tenants[0];
                            let mut options = options.partition(tenant.clone());
                            options.lease = Some((self.owner.clone(), held.epoch));
                            let batch_size = self.options.batch_size;
                            vec![
                                agent::turn(projector, &subscription, tenant, options, batch_size, held.checkpoint)
                                    .await,
                            ]
                        }
                    }
                };
                // Handlers' panics are caught where they are called; anything else that panics
                // fails these tenants' turns, never the daemon.
                let turns = AssertUnwindSafe(run).catch_unwind().await.unwrap_or_else(|panic| {
                    let reason = crate::error::panicked(panic).to_string();
                    let failed = |_| Turn::Failed {
                        checkpoint: None,
                        error: Error::DaemonFailed { owner: self.owner.clone(), reason: reason.clone() },
                    };
                    tenants.iter().map(failed).collect()
                });
                telemetry::batch(&subscription, began.elapsed());
                tenants
                    .into_iter()
                    .zip(turns)
                    .map(move |((tenant, held), turn)| ((subscription.clone(), tenant), held, turn))
                    .collect::<Vec<_>>()
            })
            .buffer_unordered(self.options.concurrency);
        // A long cycle (a catch-up) renews between turns: the instance is working, not hung.
        let mut turns = std::pin::pin!(turns);
        let mut results = Vec::new();
        while let Some(done) = turns.next().await {
            results.extend(done);
            if let Err(error) = self.renew(state, presence).await {
                tracing::warn!(%error, "renewing the instance's leases failed; retrying");
            }
        }
        tracing::debug!(leases = results.len(), took = ?started.elapsed(), "daemon: cycle");
        let mut worked = false;
        for (key, held, turn) in results {
            worked |= self.settle(state, key, held, turn).await?;
        }
        Ok(worked)
    }

    /// Records how a turn ended: progress, a lost lease, or a failure that parks the lease.
    async fn settle(&self, state: &mut State, key: Key, before: Held, turn: Turn) -> Result<bool> {
        let Some(held) = state.held.get_mut(&key) else { return Ok(false) };
        match turn {
            Turn::Ran { checkpoint, processed, more } => {
                held.checkpoint = Some(checkpoint);
                held.dirty = more;
                if !more {
                    held.behind_since = None;
                }
                telemetry::projected(&key.0, processed);
                let behind = held.behind_since.map_or(Duration::ZERO, |at| at.elapsed());
                telemetry::lag(&key.0, &key.1, held.head - checkpoint, behind);
                if before.failures > 0 {
                    // The batch's transaction cleared the record.
                    telemetry::parked(&key.0, &key.1, false);
                    tracing::info!(subscription = key.0, tenant = key.1, "projection resumed");
                }
                held.failures = 0;
                held.retry_at = None;
                Ok(processed > 0)
            }
            Turn::Lost => {
                state.held.remove(&key);
                Ok(false)
            }
            Turn::Interrupted { checkpoint, reason } => {
                held.checkpoint = checkpoint.or(held.checkpoint);
                tracing::warn!(subscription = key.0, tenant = key.1, reason, "projection interrupted; retrying");
                Ok(false)
            }
            Turn::Failed { checkpoint, error } => {
                held.checkpoint = checkpoint.or(held.checkpoint);
                held.failures += 1;
                let pause = agent::backoff(held.failures, self.options.backoff_min, self.options.backoff_max);
                held.retry_at = Some(Instant::now() + pause);
                // The failing event's position where the error names one (`reset --to` it skips
                // the event), else the checkpoint the run failed after.
                let position = error.event_position().map_or(held.checkpoint.unwrap_or(0), |p| p as i64);
                let parked = held.failures >= i64::from(self.options.retries);
                let failures = held.failures;
                match parked {
                    true => tracing::error!(
                        subscription = key.0, tenant = key.1, position, failures, retry_in = ?pause, %error,
                        "projection failed again; tenant parked"
                    ),
                    false => tracing::warn!(
                        subscription = key.0, tenant = key.1, position, failures, retry_in = ?pause, %error,
                        "projection failed; retrying"
                    ),
                }
                let message = error.to_string();
                backend::park(&self.db, &key.0, &key.1, held.failures, pause.as_millis() as i64, &message, position)
                    .await?;
                telemetry::parked(&key.0, &key.1, parked);
                Ok(false)
            }
        }
    }
}
