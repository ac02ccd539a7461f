//! A projection runner behind a type-erased face: what the daemon (one per projection, over
//! every tenant) and the command line (rebuild and catch-up with a progress bar) run, whatever
//! the registry's event type, through the same [`ProjectionRunner`] methods.

use async_trait::async_trait;

use super::{GroupProgress, Progress, ProjectPartitionResult, ProjectionRunner, RunOptions};
use crate::error::Result;
use crate::event::Event;

/// A progress callback of any lifetime (`for<'p>` spelt out: `async_trait` would name an
/// elided lifetime).
pub(crate) type ProgressFn<'a> = &'a mut (dyn for<'p> FnMut(&'p Progress) + Send);

/// A [`ProjectionRunner`] whatever its event type.
#[async_trait]
pub(crate) trait Projector: Send + Sync {
    async fn project_partition(&self, subscription: &str, options: RunOptions) -> Result<ProjectPartitionResult>;

    async fn project_group(
        &self,
        subscription: &str,
        owner: &str,
        tenants: &[(String, i64)],
        until: i64,
        options: &RunOptions,
    ) -> Result<Vec<GroupProgress>>;

    async fn rebuild(
        &self,
        subscription: &str,
        options: RunOptions,
        progress: ProgressFn<'_>,
    ) -> Result<ProjectPartitionResult>;

    #[cfg(feature = "cli")]
    async fn catch_up(
        &self,
        subscription: &str,
        options: RunOptions,
        progress: ProgressFn<'_>,
    ) -> Result<ProjectPartitionResult>;
}

#[async_trait]
impl<E: Event + 'static> Projector for ProjectionRunner<E> {
    async fn project_partition(&self, subscription: &str, options: RunOptions) -> Result<ProjectPartitionResult> {
        ProjectionRunner::project_partition(self, subscription, options).await
    }

    async fn project_group(
        &self,
        subscription: &str,
        owner: &str,
        tenants: &[(String, i64)],
        until: i64,
        options: &RunOptions,
    ) -> Result<Vec<GroupProgress>> {
        ProjectionRunner::project_group(self, subscription, owner, tenants, until, options).await
    }

    async fn rebuild(
        &self,
        subscription: &str,
        options: RunOptions,
        progress: ProgressFn<'_>,
    ) -> Result<ProjectPartitionResult> {
        ProjectionRunner::rebuild(self, subscription, options, progress).await
    }

    #[cfg(feature = "cli")]
    async fn catch_up(
        &self,
        subscription: &str,
        options: RunOptions,
        progress: ProgressFn<'_>,
    ) -> Result<ProjectPartitionResult> {
        ProjectionRunner::catch_up(self, subscription, options, progress).await
    }
}
