//! Running one lease: a projection for one tenant, a few batches per turn, parked with
//! exponential backoff when it fails.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;

use crate::error::{Error, Result};
use crate::event::Event;
use crate::projection::{ProjectPartitionResult, ProjectionRunner, RunOptions};

/// Batches one lease runs before the daemon turns to the others.
pub(super) const BATCHES_PER_TURN: usize = 8;

/// A projection runner whatever its event type.
#[async_trait]
pub(super) trait Projector: Send + Sync {
    async fn project_partition(&self, subscription: &str, options: RunOptions) -> Result<ProjectPartitionResult>;
}

#[async_trait]
impl<E: Event + 'static> Projector for ProjectionRunner<E> {
    async fn project_partition(&self, subscription: &str, options: RunOptions) -> Result<ProjectPartitionResult> {
        ProjectionRunner::project_partition(self, subscription, options).await
    }
}

/// What this instance knows of a lease it holds.
#[derive(Debug, Clone)]
pub(super) struct Held {
    /// The fencing token the lease was claimed with.
    pub epoch: i64,
    /// The checkpoint after the last run (`None` before the first).
    pub checkpoint: Option<i64>,
    /// Whether events may be waiting past the checkpoint.
    pub dirty: bool,
    /// Failed runs in a row.
    pub failures: i64,
    /// When a parked lease may run again.
    pub retry_at: Option<Instant>,
}

impl Held {
    pub fn new(epoch: i64, failures: i64, retry_in: Duration) -> Self {
        let retry_at = (!retry_in.is_zero()).then(|| Instant::now() + retry_in);
        Self { epoch, checkpoint: None, dirty: true, failures, retry_at }
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
    /// Failed with this error after `checkpoint`.
    Failed { checkpoint: Option<i64>, error: Error },
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
                return Turn::Failed { checkpoint, error };
            }
        }
    }
    Turn::Ran { checkpoint: checkpoint.unwrap_or(0), processed, more: true }
}

/// The pause before the `failures`-th retry: `min` doubled per failure, at most `max`.
pub(super) fn backoff(failures: i64, min: Duration, max: Duration) -> Duration {
    let doublings = failures.saturating_sub(1).clamp(0, 30) as u32;
    min.saturating_mul(2u32.saturating_pow(doublings)).min(max)
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
