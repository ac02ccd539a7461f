//! What [`DaemonHandle::status`](super::DaemonHandle::status) reports.

use std::time::Duration;

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
}

impl DaemonStatus {
    /// The entry of `subscription` for `tenant`.
    pub fn get(&self, subscription: &str, tenant: &str) -> Option<&LeaseStatus> {
        self.leases.iter().find(|l| l.subscription == subscription && l.tenant == tenant)
    }

    /// Leases held by this instance.
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
    /// The last failure, and the checkpoint it happened after.
    pub last_error: Option<(String, u64)>,
}
