//! The daemon's loop: coordinate leases, find tenants with new events, run their projections,
//! sleep until woken or the poll timer fires.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use std::panic::AssertUnwindSafe;

use futures::{FutureExt, StreamExt, TryFutureExt};
use sea_orm::{ConnectionTrait, DbBackend};
use tokio::sync::watch;
use tracing::Instrument;

use super::Options;
use super::agent::{self, Held, Turn};
use super::coordinator::{self, Key, SegmentKey};
use super::telemetry;
use super::wakeup::Presence;
use crate::backend::{self, segment_of};
use crate::conn::Conn;
use crate::error::{Error, Result};
use crate::projection::Projector;
use crate::projection::RunOptions;
use crate::store::EventStore;

/// Tenants of one projection projected in one transaction (sharing its batch size).
const GROUP: usize = 512;

/// The longest pause between lease rounds where no notification tells of hand-overs, so a
/// gracefully stopped instance's work is taken over within a second.
const HAND_OVER_POLL: Duration = Duration::from_millis(500);

/// How long a cycle waits for PostgreSQL writers in flight before it looks again later.
const HORIZON_WAIT: Duration = Duration::from_secs(1);

/// MySQL: how long a position below the last committed one may stay missing before the daemon
/// reads on past it (it was rolled back). A writer that commits later still has its tenant
/// projected with that tenant's next event.
const GAP_WAIT: Duration = Duration::from_secs(2);

pub(super) struct Worker {
    pub store: EventStore,
    pub db: Conn,
    pub projections: BTreeMap<String, Arc<dyn Projector>>,
    pub tenants: Option<BTreeSet<String>>,
    pub options: Options,
    pub owner: String,
    /// Told after every cycle: what `caught_up` waits on.
    pub progress: watch::Sender<Cycles>,
}

/// What the loop tells after each cycle.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Cycles {
    /// Cycles run so far.
    pub count: u64,
    /// When the last cycle left no tenant of this instance ready to run: the position up to
    /// which every event was looked at (its tenants' events up to it are projected, or they
    /// wait out a failure's backoff).
    pub idle_at: Option<i64>,
}

/// The loop's state.
struct State {
    /// The tenants of the segments held, by (subscription, tenant).
    held: BTreeMap<Key, Held>,
    /// The segments held, with the epochs they were claimed at.
    segments: BTreeMap<SegmentKey, i64>,
    /// Segments claimed whose tenants are not looked up yet.
    unscanned: BTreeSet<SegmentKey>,
    /// Tenants found by a scan without their lease row yet: made while their first batches run.
    unleased: Vec<Key>,
    /// The position up to which changes were read: every event up to it is committed (or will
    /// never be), and its tenant is marked where its segment is held.
    scanned: Option<i64>,
    /// MySQL: since when a position below the last committed one is missing (a writer that
    /// took it has not committed yet, or rolled back).
    gap_since: Option<Instant>,
    /// When the instance last renewed its registration (or presence deadline).
    last_renewal: Instant,
    /// When a segment round last succeeded, and whether one is due now.
    last_coordinated: Instant,
    round_due: bool,
    /// Told once the first round has claimed segments and found their tenants, so `start`
    /// returns with a `status()` that shows them.
    ready: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Worker {
    /// Runs until `stop` turns true, then gives its segments back. `ready` is told once the
    /// instance is registered and its first round and scan are done.
    pub async fn run(self, mut stop: watch::Receiver<bool>, ready: tokio::sync::oneshot::Sender<()>) -> Result<()> {
        let subscriptions: Vec<String> = self.projections.keys().cloned().collect();
        let ttl = self.options.lease_ttl;
        let mut presence =
            Presence::start(&self.db, self.options.listen_url.as_deref(), &self.owner, self.options.notifications, ttl)
                .await;
        let mut appends = self.store.appends();
        let mut state = State {
            held: BTreeMap::new(),
            segments: BTreeMap::new(),
            unscanned: BTreeSet::new(),
            unleased: Vec::new(),
            scanned: None,
            gap_since: None,
            last_renewal: Instant::now(),
            last_coordinated: Instant::now(),
            round_due: true,
            ready: Some(ready),
        };
        // Registered before the first balance, so the others count this instance at once.
        backend::heartbeat(&self.db, &self.owner, self.options.lease_ttl.as_millis() as i64).await?;
        state.last_renewal = Instant::now();
        backend::ensure_segments(&self.db, &subscriptions).await?;
        if let Some(tenants) = &self.tenants {
            let pairs: Vec<(String, String)> =
                subscriptions.iter().flat_map(|s| tenants.iter().map(move |t| (s.clone(), t.clone()))).collect();
            backend::ensure_leases(&self.db, &pairs).await?;
        }
        let wanted: Option<BTreeSet<i64>> = self.tenants.as_ref().map(|t| t.iter().map(|t| segment_of(t)).collect());
        let mut delay = self.options.poll_min;
        let mut next_balance = Instant::now();
        while !*stop.borrow() {
            let mut head = None;
            if Instant::now() >= next_balance || state.round_due {
                match self.coordinate(&mut state, &subscriptions, wanted.as_ref(), &presence).await {
                    Ok(h) => {
                        head = Some(h);
                        state.last_coordinated = Instant::now();
                        state.round_due = false;
                    }
                    Err(error) => tracing::warn!(%error, "segment coordination failed; retrying"),
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
            let (worked, idle) = match self.cycle(&mut state, head, &presence).instrument(span).await {
                Ok(worked) => (worked, !state.held.values().any(Held::ready)),
                Err(error) => {
                    tracing::warn!(%error, "daemon cycle failed; retrying");
                    (false, false)
                }
            };
            if let Some(ready) = state.ready.take() {
                let _ = ready.send(()); // (the first cycle failed: start anyway, it retries)
            }
            let idle_at = state.scanned.filter(|_| idle && state.unscanned.is_empty());
            self.progress.send_modify(|c| (c.count, c.idle_at) = (c.count + 1, idle_at));
            telemetry::coordination(&self.owner, state.held.len(), state.last_coordinated.elapsed());
            delay = if worked { self.options.poll_min } else { Ord::min(delay * 2, self.options.poll_max) };
            let sleep = Ord::min(delay, next_balance.saturating_duration_since(Instant::now()));
            tokio::select! {
                _ = stop.changed() => {}
                _ = appends.changed() => {}
                _ = presence.appended.changed() => {}
                woke = presence.leases.changed() => {
                    // A hand-over or a reconnect: look at the segments again now.
                    if woke.is_ok() { next_balance = Instant::now(); }
                }
                _ = tokio::time::sleep(sleep) => {}
            }
        }
        // Graceful: batches have finished (cycles run to the end); hand everything over.
        drop(presence);
        backend::leave(&self.db, &self.owner).await?;
        tracing::info!(owner = self.owner, "projection daemon stopped; segments released");
        Ok(())
    }

    /// Renews and rebalances the segments; returns the store's head, read with them.
    async fn coordinate(
        &self,
        state: &mut State,
        subscriptions: &[String],
        wanted: Option<&BTreeSet<i64>>,
        presence: &Presence,
    ) -> Result<i64> {
        self.renew(state, presence).await?;
        let round = coordinator::balance(&self.db, &self.owner, subscriptions, wanted, &mut state.segments).await?;
        for lost in &round.lost {
            state.unscanned.remove(lost);
            state.held.retain(|(s, t), _| !(*s == lost.0 && segment_of(t) == lost.1));
        }
        for (claimed, _) in round.claimed {
            state.held.retain(|(s, t), _| !(*s == claimed.0 && segment_of(t) == claimed.1));
            state.unscanned.insert(claimed);
        }
        Ok(round.head)
    }

    /// Renews the instance's hold on its segments when due: its presence connection's deadline
    /// (PostgreSQL: no write), else its registration row. Only this loop renews, so an instance
    /// whose loop hangs (a stuck handler, a paused process) loses its segments after the TTL.
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

    /// Whether the daemon runs `tenant`.
    fn runs(&self, tenant: &str) -> bool {
        self.tenants.as_ref().is_none_or(|only| only.contains(tenant))
    }

    /// Looks up the tenants of segments just claimed: every tenant's last position, checkpoint
    /// and failures (one read each for all of them: a claim's cost, not a cycle's).
    async fn scan(&self, state: &mut State) -> Result<()> {
        let segments = std::mem::take(&mut state.unscanned);
        let subscriptions: Vec<String> =
            segments.iter().map(|(s, _)| s.clone()).collect::<BTreeSet<_>>().into_iter().collect();
        // Three reads on three connections at once.
        let (heads, checkpoints, leases) = futures::try_join!(
            backend::partition_heads(&self.db, None).err_into::<Error>(),
            super::status::checkpoints(&self.db, &subscriptions),
            backend::lease_rows(&self.db, &subscriptions).err_into(),
        )?;
        let failures: BTreeMap<Key, i64> =
            leases.into_iter().map(|l| ((l.subscription, l.partition), l.failures)).collect();
        let mut missing = Vec::new();
        for (tenant, head) in heads {
            if !self.runs(&tenant) {
                continue;
            }
            let segment = segment_of(&tenant);
            for subscription in &subscriptions {
                let key = (subscription.clone(), segment);
                let Some(&epoch) = state.segments.get(&key).filter(|_| segments.contains(&key)) else { continue };
                let key = (subscription.clone(), tenant.clone());
                let checkpoint = super::status::checkpoint(&checkpoints, subscription, &tenant);
                let failures = match failures.get(&key) {
                    Some(&failures) => failures,
                    None => {
                        missing.push(key.clone());
                        0
                    }
                };
                let mut held = Held::new(epoch, failures);
                (held.checkpoint, held.head, held.dirty) = (Some(checkpoint), head, checkpoint < head);
                held.behind_since = held.dirty.then(Instant::now);
                state.held.insert(key, held);
            }
        }
        state.unleased.extend(missing);
        tracing::debug!(segments = segments.len(), tenants = state.held.len(), "segments scanned");
        Ok(())
    }

    /// Marks the tenants with events in `(state.scanned, upto]` whose segment is held; a tenant
    /// seen for the first time gets its lease row.
    async fn mark_changes(&self, state: &mut State, upto: i64) -> Result<()> {
        let after = state.scanned.expect("a cursor");
        let (changed, found) = backend::changes(&self.db, after, upto).await?;
        let mut new = Vec::new();
        for (tenant, last) in changed {
            if !self.runs(&tenant) {
                continue;
            }
            let segment = segment_of(&tenant);
            let subscriptions: Vec<(String, i64)> = state
                .segments
                .iter()
                .filter(|((_, s), _)| *s == segment)
                .map(|((subscription, _), epoch)| (subscription.clone(), *epoch))
                .collect();
            for (subscription, epoch) in subscriptions {
                let key = (subscription, tenant.clone());
                let held = state.held.entry(key.clone()).or_insert_with(|| {
                    new.push(key);
                    Held::new(epoch, 0)
                });
                held.head = held.head.max(last);
                if held.checkpoint.is_none_or(|c| c < held.head) {
                    held.dirty = true;
                    held.behind_since.get_or_insert_with(Instant::now);
                }
            }
        }
        if !new.is_empty() {
            backend::ensure_leases(&self.db, &new).await?;
            tracing::info!(count = new.len(), first = ?new.iter().take(5).collect::<Vec<_>>(), "tenants found");
        }
        // MySQL: a position of the range not visible yet belongs to a writer still running (or
        // one that rolled back): read the range again until it shows, for up to a poll interval.
        let complete = found >= upto - after;
        match self.db.get_database_backend() {
            DbBackend::MySql if !complete && state.gap_since.is_none_or(|at| at.elapsed() < GAP_WAIT) => {
                state.gap_since.get_or_insert_with(Instant::now);
            }
            _ => (state.scanned, state.gap_since) = (Some(upto), None),
        }
        Ok(())
    }

    /// Finds tenants with new events and runs the projections this instance holds for them
    /// (`head`: the store's head if just read). Returns whether it projected anything.
    async fn cycle(&self, state: &mut State, head: Option<i64>, presence: &Presence) -> Result<bool> {
        let backend_kind = self.db.get_database_backend();
        let head = match head {
            Some(head) => head,
            None => backend::head(&self.db).await?,
        };
        let started = Instant::now();
        if state.scanned.is_none_or(|s| s < head) || (state.scanned.is_none() && !state.unscanned.is_empty()) {
            // Every event up to the horizon is committed: PostgreSQL waits for the writers in
            // flight (a second at most; else it looks again next cycle); SQLite has one writer at
            // a time; MySQL's head is its last committed position (see `mark_changes`).
            let horizon = match backend_kind {
                DbBackend::Postgres => backend::global_horizon(&self.db, HORIZON_WAIT).await?,
                _ => Some(head),
            };
            match (state.scanned, horizon) {
                // The first cursor: the segments' scans see every event up to it.
                (None, Some(horizon)) => state.scanned = Some(horizon),
                (Some(scanned), Some(horizon)) if scanned < horizon => self.mark_changes(state, horizon).await?,
                _ => {}
            }
        }
        if !state.unscanned.is_empty() && state.scanned.is_some() {
            self.scan(state).await?;
        }
        tracing::debug!(head, scanned = ?state.scanned, took = ?started.elapsed(), "daemon: changes read");
        // `start` returns once the tenants found have their lease rows, so `status()` shows them.
        if state.unleased.is_empty()
            && let Some(ready) = state.ready.take()
        {
            let _ = ready.send(());
        }
        // Where the store has one, the horizon just waited for serves every tenant's run.
        let until = if backend_kind == DbBackend::MySql { None } else { state.scanned };
        let ready: Vec<(Key, Held)> =
            state.held.iter().filter(|(_, h)| h.ready()).map(|(k, h)| (k.clone(), h.clone())).collect();
        if ready.is_empty() {
            let unleased = std::mem::take(&mut state.unleased);
            return self.make_leases(state, unleased).await.map(|()| false);
        }
        // Tenants of one projection run in groups, one transaction each (MySQL: each group
        // takes the horizon of its tenants first). A tenant that failed last time runs alone:
        // were it to fail again, its group would not be run again tenant by tenant to find it.
        let mut jobs: Vec<(String, Vec<(String, Held)>)> = Vec::new();
        for ((subscription, tenant), held) in ready {
            match jobs.last_mut() {
                Some((s, tenants))
                    if *s == subscription
                        && tenants.len() < GROUP
                        && held.failures == 0
                        && tenants[0].1.failures == 0 =>
                {
                    tenants.push((tenant, held))
                }
                _ => jobs.push((subscription, vec![(tenant, held)])),
            }
        }
        // SQLite has one writer: batches in parallel only queue on its lock, and more writers
        // waiting on it starve the app's appends past the busy timeout.
        let concurrency = match backend_kind {
            DbBackend::Sqlite => 1,
            _ => self.options.concurrency,
        };
        let turns = futures::stream::iter(jobs)
            .map(|(subscription, tenants)| async move {
                let began = Instant::now();
                let projector = Arc::clone(&self.projections[&subscription]);
                let mut options = RunOptions::default().batch_size(self.options.batch_size).single_batch();
                options.lease_ttl = Some(self.options.lease_ttl);
                options.recovering =
                    tenants.iter().filter(|(_, held)| held.failures > 0).map(|(t, _)| t.clone()).collect();
                if self.options.skip_undecodable {
                    options = options.skip_undecodable_events();
                }
                let run = async {
                    let until = match until {
                        Some(until) => Ok(Some(until)),
                        None => {
                            let names: Vec<&str> = tenants.iter().map(|(t, _)| t.as_str()).collect();
                            backend::tenants_horizon(&self.db, &names, HORIZON_WAIT).await
                        }
                    };
                    let interrupted = |reason: String| {
                        tenants.iter().map(|_| Turn::Interrupted { checkpoint: None, reason: reason.clone() }).collect()
                    };
                    match until {
                        Ok(Some(until)) => {
                            agent::group_turn(projector, &subscription, &self.owner, &tenants, until, options).await
                        }
                        Ok(None) => interrupted("their events are still being written".into()),
                        Err(error) => interrupted(error.to_string()),
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
            .buffer_unordered(concurrency);
        // A long cycle (a catch-up) renews between turns: the instance is working, not hung.
        // The lease rows a scan found missing are made meanwhile (a failure is recorded in them).
        let (unleased, waiting) = (std::mem::take(&mut state.unleased), state.ready.take());
        let mut results = Vec::new();
        let run = async {
            let mut turns = std::pin::pin!(turns);
            while let Some(done) = turns.next().await {
                results.extend(done);
                if let Err(error) = self.renew(state, presence).await {
                    tracing::warn!(%error, "renewing the instance's leases failed; retrying");
                }
            }
        };
        let make = async {
            let made = backend::ensure_leases(&self.db, &unleased).await;
            let mut waiting = waiting;
            if made.is_ok()
                && let Some(ready) = waiting.take()
            {
                let _ = ready.send(());
            }
            (made, waiting)
        };
        let ((), (made, waiting)) = tokio::join!(run, make);
        state.ready = waiting;
        if made.is_err() {
            self.make_leases(state, unleased).await?;
        }
        tracing::debug!(leases = results.len(), took = ?started.elapsed(), "daemon: cycle");
        let mut worked = false;
        for (key, held, turn) in results {
            worked |= self.settle(state, key, held, turn).await?;
        }
        Ok(worked)
    }

    /// Makes the lease rows of `unleased`; kept for the next cycle if that fails.
    async fn make_leases(&self, state: &mut State, unleased: Vec<Key>) -> Result<()> {
        if let Err(error) = backend::ensure_leases(&self.db, &unleased).await {
            state.unleased.extend(unleased);
            return Err(error.into());
        }
        Ok(())
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
                // Its segment was taken over or revoked: the next round tells which.
                state.held.remove(&key);
                state.round_due = true;
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
                let run =
                    backend::FailedRun { failures, retry_in_ms: pause.as_millis() as i64, error: &message, position };
                if !backend::park(&self.db, &key.0, &key.1, run, Some((&self.owner, held.epoch))).await? {
                    // Its segment was taken over meanwhile: the failure is not ours to record.
                    state.held.remove(&key);
                    state.round_due = true;
                    return Ok(false);
                }
                telemetry::parked(&key.0, &key.1, parked);
                Ok(false)
            }
        }
    }
}
