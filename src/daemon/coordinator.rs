//! Sharing the (projection, tenant) leases among the live instances: each takes free leases up
//! to its fair share (the total divided by the live instances, rounded up) and gives back what
//! it holds beyond it, so work spreads evenly within a coordination round or two of an
//! instance joining or leaving.

use std::collections::{BTreeMap, BTreeSet};

use sea_orm::{ConnectionTrait, DbErr, TransactionTrait};

use super::agent::Held;
use crate::backend::{self, LeaseRow};

/// A (subscription, tenant) pair.
pub(super) type Key = (String, String);

/// One round: updates the leases this instance holds — of `tenants` only, when the daemon runs
/// only those — and returns the store's head, read with them.
pub(super) async fn balance(
    conn: &(impl ConnectionTrait + TransactionTrait<Transaction = sea_orm::DatabaseTransaction>),
    owner: &str,
    subscriptions: &[String],
    tenants: Option<&BTreeSet<String>>,
    held: &mut BTreeMap<Key, Held>,
) -> Result<i64, DbErr> {
    let backend::Leases { mut rows, instances: live, head } = backend::leases(conn, subscriptions).await?;
    rows.retain(|r| tenants.is_none_or(|only| only.contains(&r.partition)));
    // Leases taken over by another instance (or released by an operator) are no longer ours.
    let ours: BTreeMap<Key, &LeaseRow> = rows
        .iter()
        .filter(|r| r.owner.as_deref() == Some(owner))
        .map(|r| ((r.subscription.clone(), r.partition.clone()), r))
        .collect();
    held.retain(|key, h| {
        let keep = ours.get(key).is_some_and(|r| r.epoch == h.epoch);
        if !keep {
            tracing::info!(subscription = key.0, tenant = key.1, "lease taken over by another instance");
        }
        keep
    });
    let share = rows.len().div_ceil(live.max(1) as usize);
    if held.len() > share {
        let extra: Vec<Key> = held.keys().rev().take(held.len() - share).cloned().collect();
        for key in extra {
            let h = held.remove(&key).expect("held");
            backend::release(conn, &key.0, &key.1, owner, h.epoch).await?;
            tracing::info!(subscription = key.0, tenant = key.1, "lease given back to balance the work");
        }
    } else if held.len() < share {
        // Spread the instances over the free leases instead of all racing for the first ones.
        // (A lease of ours counts as free while our presence is reconnecting: not to be taken again.)
        let mut free: Vec<&LeaseRow> = rows
            .iter()
            .filter(|r| r.free && !held.contains_key(&(r.subscription.clone(), r.partition.clone())))
            .collect();
        free.sort_by_key(|r| order(owner, &r.subscription, &r.partition));
        for row in free {
            if held.len() >= share {
                break;
            }
            if let Some(epoch) = backend::claim(conn, row, owner).await? {
                held.insert((row.subscription.clone(), row.partition.clone()), Held::new(epoch, row.failures));
                tracing::info!(subscription = row.subscription, tenant = row.partition, epoch, "lease claimed");
            }
        }
    }
    Ok(head)
}

/// A cheap hash of an instance and a lease, to give each instance its own order of the free
/// leases.
fn order(owner: &str, subscription: &str, tenant: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    (owner, subscription, tenant).hash(&mut hasher);
    hasher.finish()
}
