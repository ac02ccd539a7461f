//! The daemon's metrics, through the [`metrics`] facade: install any recorder (Prometheus,
//! StatsD, …) to export them; without one they cost nothing.
//!
//! | metric | kind | labels |
//! |---|---|---|
//! | `emmett_daemon_events_projected_total` | counter | `subscription` |
//! | `emmett_daemon_batch_seconds` | histogram | `subscription` |
//! | `emmett_daemon_lag_positions` | gauge: global positions between checkpoint and the tenant's last event | `subscription`, `tenant` |
//! | `emmett_daemon_lag_seconds` | gauge: how long the tenant has been behind | `subscription`, `tenant` |
//! | `emmett_daemon_leases_held` | gauge | `owner` |
//! | `emmett_daemon_coordination_age_seconds` | gauge: since the last successful lease round | `owner` |
//! | `emmett_daemon_parked` | gauge: 1 while the tenant has failed `retries` times in a row | `subscription`, `tenant` |

use std::time::Duration;

pub(super) fn projected(subscription: &str, events: u64) {
    metrics::counter!("emmett_daemon_events_projected_total", "subscription" => subscription.to_owned())
        .increment(events);
}

pub(super) fn batch(subscription: &str, took: Duration) {
    metrics::histogram!("emmett_daemon_batch_seconds", "subscription" => subscription.to_owned()).record(took);
}

pub(super) fn lag(subscription: &str, tenant: &str, positions: i64, behind: Duration) {
    let labels = [("subscription", subscription.to_owned()), ("tenant", tenant.to_owned())];
    metrics::gauge!("emmett_daemon_lag_positions", &labels).set(positions.max(0) as f64);
    metrics::gauge!("emmett_daemon_lag_seconds", &labels).set(behind.as_secs_f64());
}

pub(super) fn parked(subscription: &str, tenant: &str, parked: bool) {
    let labels = [("subscription", subscription.to_owned()), ("tenant", tenant.to_owned())];
    metrics::gauge!("emmett_daemon_parked", &labels).set(if parked { 1.0 } else { 0.0 });
}

pub(super) fn coordination(owner: &str, held: usize, age: Duration) {
    metrics::gauge!("emmett_daemon_leases_held", "owner" => owner.to_owned()).set(held as f64);
    metrics::gauge!("emmett_daemon_coordination_age_seconds", "owner" => owner.to_owned()).set(age.as_secs_f64());
}
