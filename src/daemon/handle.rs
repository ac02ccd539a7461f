//! The handle of a running daemon: stop it, wait for it to catch up, ask how it is doing.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use sea_orm::{ColumnTrait, DatabaseConnection, EntityTrait, QueryFilter};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::status::{DaemonStatus, LeaseStatus};
use crate::backend;
use crate::error::{Error, Result};
use crate::schema::subscriptions;

/// A running daemon. [`stop`](Self::stop) it to hand its work over gracefully; dropping the
/// handle aborts it like a crash would (its leases are free once they expire).
pub struct DaemonHandle {
    pub(super) owner: String,
    pub(super) db: DatabaseConnection,
    pub(super) subscriptions: Vec<String>,
    pub(super) tenants: Option<BTreeSet<String>>,
    pub(super) retries: u32,
    pub(super) progress: watch::Receiver<u64>,
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
        let heads = self.tenant_heads(Some(position)).await?;
        let checkpoints = self.checkpoints().await?;
        Ok(self
            .subscriptions
            .iter()
            .flat_map(|s| heads.iter().map(move |(t, h)| (s, t, *h)))
            .filter(|(s, t, head)| checkpoint(&checkpoints, s, t) < *head)
            .map(|(s, t, _)| (s.clone(), t.clone()))
            .collect())
    }

    /// The checkpoints of the daemon's subscriptions, by (subscription, tenant).
    async fn checkpoints(&self) -> Result<BTreeMap<(String, String), i64>> {
        let rows = subscriptions::Entity::find()
            .filter(subscriptions::Column::SubscriptionId.is_in(self.subscriptions.iter().cloned()))
            .filter(subscriptions::Column::Version.eq(1))
            .all(&self.db)
            .await?;
        Ok(rows.into_iter().map(|c| ((c.subscription_id, c.partition), c.last_processed_position)).collect())
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
        let backend::Leases { rows, instances, .. } = backend::leases(&self.db, &self.subscriptions).await?;
        let heads: BTreeMap<String, i64> = self.tenant_heads(None).await?.into_iter().collect();
        let checkpoints = self.checkpoints().await?;
        let mut leases = Vec::with_capacity(rows.len());
        for row in rows {
            if self.tenants.as_ref().is_some_and(|only| !only.contains(&row.partition)) {
                continue;
            }
            let checkpoint = checkpoint(&checkpoints, &row.subscription, &row.partition);
            let (lag_events, lag_seconds) = backend::pending(&self.db, &row.partition, checkpoint).await?;
            leases.push(LeaseStatus {
                head: heads.get(&row.partition).copied().unwrap_or(0).max(0) as u64,
                checkpoint: checkpoint.max(0) as u64,
                lag_events: lag_events.max(0) as u64,
                lag: Duration::from_secs_f64(lag_seconds.max(0.0)),
                failures: row.failures.max(0) as u64,
                parked: row.failures >= i64::from(self.retries),
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

/// The checkpoint of `subscription` for `tenant` (0 before its first batch).
fn checkpoint(checkpoints: &BTreeMap<(String, String), i64>, subscription: &str, tenant: &str) -> i64 {
    checkpoints.get(&(subscription.to_owned(), tenant.to_owned())).copied().unwrap_or(0)
}
