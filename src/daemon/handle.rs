//! The handle of a running daemon: stop it, wait for it to catch up, ask how it is doing.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::status::DaemonStatus;
use crate::backend;
use crate::conn::Conn;
use crate::error::{Error, Result};
use crate::projection::Projector;
use crate::projection::{Progress, ProjectPartitionResult};

/// A running daemon. [`stop`](Self::stop) it to hand its work over gracefully; dropping the
/// handle aborts it like a crash would (its leases are free once they expire), so keep it for
/// as long as the daemon should run, e.g. in the app's state, and await
/// [`finished`](Self::finished) to learn if it ends on its own.
#[must_use = "dropping the handle aborts the daemon at once; keep it and call `stop()` to end it"]
pub struct DaemonHandle {
    pub(super) owner: String,
    pub(super) db: Conn,
    pub(super) wake_ups: super::WakeUps,
    pub(super) subscriptions: Vec<String>,
    pub(super) projections: BTreeMap<String, Arc<dyn Projector>>,
    pub(super) tenants: Option<BTreeSet<String>>,
    pub(super) retries: u32,
    pub(super) progress: watch::Receiver<super::worker::Cycles>,
    pub(super) stop: watch::Sender<bool>,
    pub(super) task: Option<JoinHandle<Result<()>>>,
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

    /// Whether the daemon still runs: `false` once it failed or was stopped.
    pub fn is_running(&self) -> bool {
        self.task.as_ref().is_some_and(|task| !task.is_finished())
    }

    /// Waits until the daemon ends on its own (it only does on an error it could not retry
    /// past) and returns that error; `Ok` if it was already awaited. For an app's
    /// `tokio::select!` beside its server, so a dead daemon does not go unnoticed.
    pub async fn finished(&mut self) -> Result<()> {
        match self.task.as_mut() {
            Some(task) => {
                let ended = task.await;
                self.task = None;
                ended.map_err(|e| Error::DaemonFailed { owner: self.owner.clone(), reason: e.to_string() })?
            }
            None => Ok(()),
        }
    }

    /// Waits until every projection has processed, for every tenant, every event up to global
    /// `position` (e.g. an append's `last_event_global_position`: read-your-writes). Wrap it in
    /// `tokio::time::timeout` to bound the wait. Fails with [`Error::ProjectionParked`] when a
    /// tenant it waits for is parked, and with [`Error::DaemonFailed`] when the daemon ended.
    pub async fn caught_up(&self, position: u64) -> Result<()> {
        let mut progress = self.progress.clone();
        loop {
            let checking = Instant::now();
            let behind = self.behind(position as i64).await?;
            // Each look reads every tenant's position, so the next waits until this instance has
            // nothing left to run up to `position` (its tenants are done: maybe all are), at
            // least twice as long as this look took and at most ten times (other instances' work).
            let took = checking.elapsed();
            let (pause, longest) =
                (Ord::max(Duration::from_millis(100), took * 2), Ord::max(Duration::from_secs(1), took * 10));
            if behind.is_empty() {
                return Ok(());
            }
            if !self.is_running() {
                let reason = "it is not running (stopped, or ended on an error: see `finished`)".into();
                return Err(Error::DaemonFailed { owner: self.owner.clone(), reason });
            }
            let leases = backend::lease_rows(&self.db, &self.subscriptions).await?;
            let parked = leases.into_iter().find(|l| {
                l.failures >= i64::from(self.retries) && behind.contains(&(l.subscription.clone(), l.partition.clone()))
            });
            if let Some(l) = parked {
                return Err(Error::ProjectionParked {
                    subscription: l.subscription,
                    partition: l.partition,
                    position: l.error_position.unwrap_or(0).max(0) as u64,
                    reason: l.last_error.unwrap_or_default(),
                });
            }
            tokio::time::sleep(pause.saturating_sub(checking.elapsed())).await;
            let idle = progress.wait_for(|c| c.idle_at.is_some_and(|at| at >= position as i64));
            let _ = tokio::time::timeout(longest.saturating_sub(checking.elapsed()), idle).await;
        }
    }

    /// The (subscription, tenant) pairs whose checkpoint is below their last event up to
    /// `position`.
    async fn behind(&self, position: i64) -> Result<Vec<(String, String)>> {
        let heads = self.tenant_heads(Some(position)).await?;
        let checkpoints = super::status::checkpoints(&self.db, &self.subscriptions).await?;
        Ok(self
            .subscriptions
            .iter()
            .flat_map(|s| heads.iter().map(move |(t, h)| (s, t, *h)))
            .filter(|(s, t, head)| super::status::checkpoint(&checkpoints, s, t) < *head)
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

    /// Rebuilds one of the daemon's projections in place, tenant by tenant, as
    /// [`ProjectionRunner::rebuild`](crate::projection::ProjectionRunner::rebuild) does, while
    /// the daemon goes on (a tenant's batches wait for its rebuild's transaction through the
    /// checkpoint lock, then go on from its new checkpoint); `progress` is called after each of
    /// the rebuild's batches. A tenant that fails keeps its previous read model:
    /// [`Error::RebuildIncomplete`] names it.
    ///
    /// For a new version that must not disturb the one serving, add it to the daemon as another
    /// projection instead: the daemon fills it from the first event, and
    /// [`status`](Self::status) shows its lag.
    pub async fn rebuild(
        &self,
        subscription_id: &str,
        mut progress: impl FnMut(&Progress) + Send,
    ) -> Result<ProjectPartitionResult> {
        let projector = self
            .projections
            .get(subscription_id)
            .ok_or_else(|| Error::UnknownProjection { subscription: subscription_id.into() })?;
        projector.rebuild(subscription_id, crate::projection::RunOptions::default(), &mut progress).await
    }

    /// Every (projection, tenant) pair with its checkpoint, lag, owner and last failure, read
    /// from the database: the work of every instance.
    pub async fn status(&self) -> Result<DaemonStatus> {
        let tenants = self.tenants.as_ref();
        let (leases, instances, segments) =
            super::status::leases(&self.db, &self.subscriptions, tenants, self.retries).await?;
        let cycles = self.progress.borrow().count;
        Ok(DaemonStatus { owner: self.owner.clone(), instances, cycles, leases, segments, wake_ups: self.wake_ups })
    }
}
