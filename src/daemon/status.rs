//! What [`DaemonHandle::status`](super::DaemonHandle::status) and [`recorded`] report: the work
//! of every instance, as the database records it.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseTransaction, EntityTrait, QueryFilter, QuerySelect, TransactionTrait,
};

use crate::backend;
use crate::error::Result;
use crate::schema::subscriptions;

/// The state of every (projection, tenant) pair a daemon runs, read from the database, so it
/// covers the work of every instance, not only this one's.
#[derive(Debug, Clone)]
pub struct DaemonStatus {
    /// This instance's name (the owner in lease rows).
    pub owner: String,
    /// Live instances sharing the work.
    pub instances: u64,
    /// Cycles this instance has completed (look for new events, run what is due): a daemon
    /// that is alive but stuck stops counting.
    pub cycles: u64,
    /// One entry per (projection, tenant), ordered by projection then tenant.
    pub leases: Vec<LeaseStatus>,
    /// How many segments each instance holds, over all projections (an instance holds
    /// segments of tenants, the tenants' entries in [`leases`](Self::leases) name it).
    pub segments: BTreeMap<String, usize>,
    /// How this instance learns of other processes' appends.
    pub wake_ups: super::WakeUps,
}

impl DaemonStatus {
    /// The entry of `subscription` for `tenant`.
    pub fn get(&self, subscription: &str, tenant: &str) -> Option<&LeaseStatus> {
        self.leases.iter().find(|l| l.subscription == subscription && l.tenant == tenant)
    }

    /// Tenants' entries held by this instance.
    pub fn held(&self) -> usize {
        self.leases.iter().filter(|l| l.owner.as_deref() == Some(self.owner.as_str())).count()
    }
}

/// One projection for one tenant.
#[derive(Debug, Clone)]
pub struct LeaseStatus {
    /// The projection's subscription id.
    pub subscription: String,
    /// The tenant (partition).
    pub tenant: String,
    /// The instance holding the lease, if any.
    pub owner: Option<String>,
    /// Whether another instance may take the lease now (no owner, or one that is gone).
    pub free: bool,
    /// Time until the owner's registration expires unless renewed (zero when expired: on
    /// PostgreSQL a live instance renews its presence connection instead, without a write).
    pub expires_in: Duration,
    /// The last global position projected.
    pub checkpoint: u64,
    /// The tenant's last global position.
    pub head: u64,
    /// Events of the tenant past the checkpoint.
    pub lag_events: u64,
    /// Age of the oldest event past the checkpoint (zero when caught up).
    pub lag: Duration,
    /// Failed runs in a row; above zero it runs again once `retry_in` has passed.
    pub failures: u64,
    /// Whether it failed [`retries`](super::Daemon::retries) times in a row or more.
    pub parked: bool,
    /// Time left until a parked lease runs again.
    pub retry_in: Duration,
    /// The last failure, and the global position of the event it failed on (the checkpoint
    /// when the error names no event): `projections reset --to` it to skip the event.
    pub last_error: Option<(String, u64)>,
}

/// Every (projection, tenant) pair any daemon has run on `db`, as [`LeaseStatus`]es: what an
/// operator's tool shows without knowing the app's projections (`parked` counts the default
/// number of [`retries`](super::Daemon::retries)).
///
/// ```no_run
/// # async fn f(db: sea_orm::DatabaseConnection) -> emmett_seaorm::Result<()> {
/// for lease in emmett_seaorm::daemon::recorded(&db).await? {
///     println!("{} {}: {} events behind", lease.subscription, lease.tenant, lease.lag_events);
/// }
/// # Ok(()) }
/// ```
pub async fn recorded(
    db: &(impl ConnectionTrait + TransactionTrait<Transaction = DatabaseTransaction>),
) -> Result<Vec<LeaseStatus>> {
    // In one transaction: one server behind a transaction pooler.
    let txn = db.begin().await?;
    let subscriptions: Vec<String> = backend::lease_subscriptions(&txn).await?;
    let (leases, ..) = leases(&txn, &subscriptions, None, super::DEFAULT_RETRIES).await?;
    txn.commit().await?;
    Ok(leases)
}

/// The lease entries of `subscriptions` (of `tenants` only, when given) whose tenant has live
/// events, the number of live instances and the segments each holds: one query however many
/// tenants.
pub(super) async fn leases(
    db: &(impl ConnectionTrait + TransactionTrait<Transaction = DatabaseTransaction>),
    subscriptions: &[String],
    tenants: Option<&BTreeSet<String>>,
    retries: u32,
) -> Result<(Vec<LeaseStatus>, u64, BTreeMap<String, usize>)> {
    let (reports, segments) = backend::lease_reports(db, subscriptions).await?;
    let mut held = BTreeMap::new();
    for owner in segments.rows.iter().filter_map(|s| s.owner.clone()) {
        *held.entry(owner).or_default() += 1;
    }
    let mut leases = Vec::with_capacity(reports.len());
    for backend::LeaseReport { lease: row, checkpoint, head, lag_events, lag_seconds } in reports {
        let Some(head) = head else { continue };
        if tenants.is_some_and(|only| !only.contains(&row.partition)) {
            continue;
        }
        leases.push(LeaseStatus {
            head: head.max(0) as u64,
            checkpoint: checkpoint.max(0) as u64,
            lag_events: lag_events.max(0) as u64,
            lag: Duration::from_secs_f64(lag_seconds.max(0.0)),
            failures: row.failures.max(0) as u64,
            parked: row.failures >= i64::from(retries),
            retry_in: Duration::from_millis(row.retry_in_ms.max(0) as u64),
            last_error: row.last_error.map(|e| (e, row.error_position.unwrap_or(0).max(0) as u64)),
            owner: row.owner,
            free: row.free,
            expires_in: Duration::from_millis(row.expires_in_ms.max(0) as u64),
            subscription: row.subscription,
            tenant: row.partition,
        });
    }
    leases.sort_by(|a, b| (&a.subscription, &a.tenant).cmp(&(&b.subscription, &b.tenant)));
    Ok((leases, segments.instances, held))
}

/// The checkpoints of `subscriptions`, by (subscription, tenant).
pub(super) async fn checkpoints(
    db: &impl ConnectionTrait,
    subscriptions: &[String],
) -> Result<BTreeMap<(String, String), i64>> {
    let rows = subscriptions::Entity::find()
        .select_only()
        .columns([
            subscriptions::Column::SubscriptionId,
            subscriptions::Column::Partition,
            subscriptions::Column::LastProcessedPosition,
        ])
        .filter(subscriptions::Column::SubscriptionId.is_in(subscriptions.iter().cloned()))
        .filter(subscriptions::Column::Version.eq(1))
        .into_tuple::<(String, String, i64)>()
        .all(db)
        .await?;
    Ok(rows.into_iter().map(|(s, t, c)| ((s, t), c)).collect())
}

/// The checkpoint of `subscription` for `tenant` (0 before its first batch).
pub(super) fn checkpoint(checkpoints: &BTreeMap<(String, String), i64>, subscription: &str, tenant: &str) -> i64 {
    checkpoints.get(&(subscription.to_owned(), tenant.to_owned())).copied().unwrap_or(0)
}
