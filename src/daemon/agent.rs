//! Running leases: a group of tenants of one projection in one transaction, or one tenant for a
//! few batches; a failing one is parked with exponential backoff by the worker.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::Error;
use crate::projection::{GroupProgress, Projector, RunOptions};

/// Batches one lease runs before the daemon turns to the others.
pub(super) const BATCHES_PER_TURN: usize = 8;

/// What this instance knows of a lease it holds.
#[derive(Debug, Clone)]
pub(super) struct Held {
    /// The fencing token the lease was claimed with.
    pub epoch: i64,
    /// The checkpoint after the last run (`None` before the first).
    pub checkpoint: Option<i64>,
    /// Whether events may be waiting past the checkpoint.
    pub dirty: bool,
    /// The tenant's last position when last looked at, and since when the checkpoint is below it.
    pub head: i64,
    pub behind_since: Option<Instant>,
    /// Failed runs in a row.
    pub failures: i64,
    /// When a parked lease may run again.
    pub retry_at: Option<Instant>,
}

impl Held {
    /// A lease just claimed. It runs at once, whatever backoff its last holder was waiting out
    /// (after a restart a fix may have been deployed); a failure then backs off from its count
    /// of failures in a row.
    pub fn new(epoch: i64, failures: i64) -> Self {
        Self { epoch, checkpoint: None, dirty: true, head: 0, behind_since: None, failures, retry_at: None }
    }

    /// Whether it should run now.
    pub fn ready(&self) -> bool {
        self.dirty && self.retry_at.is_none_or(|at| at <= Instant::now())
    }
}

/// How a turn ended.
pub(super) enum Turn {
    /// Ran; `more` when the last batch was full.
    Ran { checkpoint: i64, processed: u64, more: bool },
    /// The lease is another instance's now: nothing was done.
    Lost,
    /// A busy database or a lost connection, after `checkpoint`: runs again next cycle.
    Interrupted { checkpoint: Option<i64>, reason: String },
    /// Failed with this error after `checkpoint`.
    Failed { checkpoint: Option<i64>, error: Error },
}

impl Turn {
    /// How a run that failed with `error` after `checkpoint` ended.
    fn failed(checkpoint: Option<i64>, error: Error) -> Self {
        match error {
            Error::LeaseLost { .. } => Turn::Lost,
            error if error.is_transient() => Turn::Interrupted { checkpoint, reason: error.to_string() },
            error => Turn::Failed { checkpoint, error },
        }
    }
}

/// Runs `tenants` (leases of `subscription`, with what is known of each) in one batch of one
/// transaction up to `until`. When the batch fails for another reason than the database, each
/// tenant runs alone, so only the failing one is parked.
pub(super) async fn group_turn(
    projector: Arc<dyn Projector>,
    subscription: &str,
    owner: &str,
    tenants: &[(String, Held)],
    until: i64,
    options: RunOptions,
) -> Vec<Turn> {
    let leases: Vec<(String, i64)> = tenants.iter().map(|(t, h)| (t.clone(), h.epoch)).collect();
    let batch_size = options.batch_size_value();
    match projector.project_group(subscription, owner, &leases, until, &options).await {
        Ok(progress) => {
            let progress: HashMap<&str, &GroupProgress> = progress.iter().map(|p| (p.tenant.as_str(), p)).collect();
            tenants
                .iter()
                .map(|(tenant, _)| match progress.get(tenant.as_str()) {
                    Some(p) if p.lost => Turn::Lost,
                    Some(p) => Turn::Ran { checkpoint: p.checkpoint, processed: p.processed, more: p.full },
                    None => Turn::Interrupted { checkpoint: None, reason: "left out of its group's batch".into() },
                })
                .collect()
        }
        Err(error) if error.is_transient() => {
            let reason = error.to_string();
            tenants.iter().map(|_| Turn::Interrupted { checkpoint: None, reason: reason.clone() }).collect()
        }
        Err(error) if tenants.len() == 1 => vec![Turn::failed(None, error)],
        Err(_) => {
            let mut turns = Vec::with_capacity(tenants.len());
            for (tenant, held) in tenants {
                let mut alone = options.clone().partition(tenant.clone());
                alone.lease = Some((owner.to_owned(), held.epoch));
                turns
                    .push(turn(Arc::clone(&projector), subscription, tenant, alone, batch_size, held.checkpoint).await);
            }
            turns
        }
    }
}

/// Runs up to [`BATCHES_PER_TURN`] batches of `subscription` for `tenant` under the lease.
pub(super) async fn turn(
    projector: Arc<dyn Projector>,
    subscription: &str,
    tenant: &str,
    options: RunOptions,
    batch_size: u64,
    start: Option<i64>,
) -> Turn {
    let (mut checkpoint, mut processed) = (start, 0);
    for _ in 0..BATCHES_PER_TURN {
        match projector.project_partition(subscription, options.clone()).await {
            Ok(done) => {
                checkpoint = Some(done.last_processed_position as i64);
                processed += done.processed;
                if done.processed < batch_size {
                    return Turn::Ran { checkpoint: done.last_processed_position as i64, processed, more: false };
                }
            }
            Err(error) => {
                tracing::debug!(subscription, tenant, %error, "projection turn failed");
                return Turn::failed(checkpoint, error);
            }
        }
    }
    Turn::Ran { checkpoint: checkpoint.unwrap_or(0), processed, more: true }
}

/// The pause after `failures` failed runs in a row: backon's exponential schedule, `min`
/// doubled per failure, at most `max`.
pub(super) fn backoff(failures: i64, min: Duration, max: Duration) -> Duration {
    use backon::BackoffBuilder;
    let doublings = failures.saturating_sub(1).clamp(0, 64) as usize;
    let mut schedule =
        backon::ExponentialBuilder::default().with_min_delay(min).with_max_delay(max).without_max_times().build();
    schedule.nth(doublings).unwrap_or(max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let (min, max) = (Duration::from_secs(1), Duration::from_secs(300));
        let pauses: Vec<u64> = (1..=11).map(|f| backoff(f, min, max).as_secs()).collect();
        assert_eq!(pauses, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300]);
        assert_eq!(backoff(i64::MAX, min, max), max);
    }
}
