//! Sharing the segments of every projection among the live instances that run it: each takes
//! free segments up to its fair share (the projection's segments divided by the live instances
//! holding some of them; see [`fair_share`]) and gives back what it holds beyond it, so work
//! spreads evenly (±1 segment) within a round or two of an instance joining or leaving, also
//! when instances run different sets of projections. An instance that runs a projection but
//! holds none of its segments while none is free takes one from a live holder, so the others
//! count it and make room. A round reads [`SEGMENTS`](crate::backend::SEGMENTS) rows per
//! projection, however many tenants there are.

use std::collections::{BTreeMap, BTreeSet};

use sea_orm::{ConnectionTrait, DbErr, TransactionTrait};

use crate::backend::{self, SegmentRow};

/// A (subscription, tenant) pair.
pub(super) type Key = (String, String);

/// A (subscription, segment) pair.
pub(super) type SegmentKey = (String, i64);

/// What a round changed.
pub(super) struct Round {
    /// The store's head, read with the segments.
    pub head: i64,
    /// Segments claimed in this round, with their epochs.
    pub claimed: Vec<(SegmentKey, i64)>,
    /// Segments no longer held (taken over, revoked by an operator, or given back).
    pub lost: Vec<SegmentKey>,
}

/// One round over the segments of `subscriptions` (of `wanted` segments only, when the daemon
/// runs only some tenants): updates `held` (segment → epoch).
pub(super) async fn balance(
    conn: &(impl ConnectionTrait + TransactionTrait<Transaction = sea_orm::DatabaseTransaction>),
    owner: &str,
    subscriptions: &[String],
    wanted: Option<&BTreeSet<i64>>,
    held: &mut BTreeMap<SegmentKey, i64>,
) -> Result<Round, DbErr> {
    let backend::Segments { mut rows, head, .. } = backend::segments(conn, subscriptions).await?;
    rows.retain(|r| wanted.is_none_or(|only| only.contains(&r.segment)));
    let mut round = Round { head, claimed: Vec::new(), lost: Vec::new() };
    // Segments taken over by another instance (or revoked by an operator) are no longer ours.
    let ours: BTreeMap<SegmentKey, &SegmentRow> = rows
        .iter()
        .filter(|r| r.owner.as_deref() == Some(owner))
        .map(|r| ((r.subscription.clone(), r.segment), r))
        .collect();
    held.retain(|key, epoch| {
        let keep = ours.get(key).is_some_and(|r| r.epoch == *epoch);
        if !keep {
            tracing::info!(subscription = key.0, segment = key.1, "segment taken over or revoked");
            round.lost.push(key.clone());
        }
        keep
    });
    for subscription in subscriptions {
        let rows: Vec<&SegmentRow> = rows.iter().filter(|r| &r.subscription == subscription).collect();
        balance_one(conn, owner, subscription, &rows, held, &mut round).await?;
    }
    Ok(round)
}

/// One projection's part of a round: `rows` are its segments.
async fn balance_one(
    conn: &(impl ConnectionTrait + TransactionTrait<Transaction = sea_orm::DatabaseTransaction>),
    owner: &str,
    subscription: &str,
    rows: &[&SegmentRow],
    held: &mut BTreeMap<SegmentKey, i64>,
    round: &mut Round,
) -> Result<(), DbErr> {
    let mine = |held: &BTreeMap<SegmentKey, i64>| held.keys().filter(|k| k.0 == subscription).count();
    // The instances running it: the live ones holding some of its segments, and this one.
    let holders: BTreeSet<&str> =
        rows.iter().filter(|r| !r.free).filter_map(|r| r.owner.as_deref()).chain([owner]).collect();
    let share = fair_share(owner, rows, holders.len());
    if mine(held) > share {
        let extra: Vec<SegmentKey> =
            held.keys().filter(|k| k.0 == subscription).rev().take(mine(held) - share).cloned().collect();
        for key in extra {
            let epoch = held.remove(&key).expect("held");
            backend::release(conn, &key.0, key.1, owner, epoch).await?;
            tracing::info!(subscription = key.0, segment = key.1, "segment given back to balance the work");
            round.lost.push(key);
        }
        return Ok(());
    }
    // Spread the instances over the free segments instead of all racing for the first ones.
    // (A segment of ours counts as free while our presence is reconnecting: not to be taken
    // again.) With none free and none held, one of the most loaded holder's.
    let mut free: Vec<&SegmentRow> =
        rows.iter().copied().filter(|r| r.free && !held.contains_key(&(r.subscription.clone(), r.segment))).collect();
    free.sort_by_key(|r| order(owner, &r.subscription, r.segment));
    let from_live = free.is_empty() && mine(held) == 0 && share > 0;
    if from_live {
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        for held in rows.iter().filter_map(|r| r.owner.as_deref()) {
            *counts.entry(held).or_default() += 1;
        }
        let most = counts.iter().max_by_key(|(o, n)| (**n, std::cmp::Reverse(**o))).map(|(o, _)| *o);
        free = rows.iter().copied().filter(|r| r.owner.as_deref() == most).take(1).collect();
    }
    // As many as the share lacks, in one transaction; again with the next ones for those another
    // instance took first.
    let mut free = free.into_iter();
    loop {
        let wanted: Vec<&SegmentRow> = free.by_ref().take(share.saturating_sub(mine(held))).collect();
        if wanted.is_empty() {
            break;
        }
        for (segment, epoch) in backend::claim(conn, &wanted, owner, from_live).await? {
            let key = (subscription.to_owned(), segment);
            held.insert(key.clone(), epoch);
            tracing::debug!(subscription, segment, epoch, from_live, "segment claimed");
            round.claimed.push((key, epoch));
        }
    }
    Ok(())
}

/// How many of `rows` this instance should hold: `total / live`, or one more for the first
/// `total % live` instances (by name) that hold more than that — so shares differ by one at
/// most and settle without instances giving segments to each other back and forth.
fn fair_share(owner: &str, rows: &[&SegmentRow], live: usize) -> usize {
    let live = live.max(1);
    let (base, extra) = (rows.len() / live, rows.len() % live);
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for held in rows.iter().filter(|r| !r.free).filter_map(|r| r.owner.as_deref()) {
        *counts.entry(held).or_default() += 1;
    }
    let above: Vec<&str> = counts.iter().filter(|(_, n)| **n > base).map(|(o, _)| *o).collect();
    let mine = above.iter().position(|o| *o == owner);
    match mine {
        Some(rank) => base + usize::from(rank < extra),
        None => base + usize::from(above.len() < extra),
    }
}

/// A cheap hash of an instance and a segment, to give each instance its own order of the free
/// segments.
fn order(owner: &str, subscription: &str, segment: i64) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    (owner, subscription, segment).hash(&mut hasher);
    hasher.finish()
}
