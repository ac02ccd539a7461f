//! What an operator sees and does, from what the database records: the calls behind the
//! command line and the web console (`emmett-seaorm-console`), one code path for both. They
//! need none of the app's projections.
//!
//! ```no_run
//! # async fn f(store: emmett_seaorm::EventStore) -> emmett_seaorm::Result<()> {
//! use emmett_seaorm::admin;
//!
//! for p in admin::projections(&store).await?.iter().filter(|p| p.parked) {
//!     let (error, position) = p.last_error.clone().unwrap_or_default();
//!     println!("{} / {}: parked at {position}: {error}", p.subscription, p.tenant);
//! }
//! admin::resume(&store, "carts", Some("tenant-a")).await?; // after deploying a fix
//! let skipped = admin::skip(&store, "carts", "tenant-b").await?; // or go past the event
//! println!("skipped {} #{}", skipped.stream_id, skipped.stream_position);
//! # Ok(()) }
//! ```

use std::collections::BTreeMap;
use std::time::Duration;

use sea_orm::sea_query::LikeExpr;
use sea_orm::{ColumnTrait, EntityTrait, PaginatorTrait, QueryFilter, QueryOrder, QuerySelect};
use serde::Serialize;

use crate::backend;
use crate::daemon::{self, LeaseStatus};
use crate::error::{Error, Result};
use crate::schema::{messages, skipped_events, snapshots, streams, subscriptions};
use crate::store::EventStore;

/// Every (projection, tenant) pair the store records: those a daemon runs (with their lease:
/// owner, failures, the parked error) and those a `ProjectionRunner` runs alone (a checkpoint,
/// no lease), ordered by projection then tenant.
pub async fn projections(store: &EventStore) -> Result<Vec<LeaseStatus>> {
    let db = store.conn();
    let mut pairs: BTreeMap<(String, String), LeaseStatus> = BTreeMap::new();
    for lease in daemon::recorded(db).await? {
        pairs.insert((lease.subscription.clone(), lease.tenant.clone()), lease);
    }
    let alone: Vec<subscriptions::Model> = subscriptions::Entity::find()
        .filter(subscriptions::Column::Version.eq(1))
        .all(db)
        .await?
        .into_iter()
        .filter(|c| !pairs.contains_key(&(c.subscription_id.clone(), c.partition.clone())))
        .collect();
    if !alone.is_empty() {
        let heads: BTreeMap<String, i64> = backend::partition_heads(db, None).await?.into_iter().collect();
        for c in alone {
            let (lag_events, age) = backend::pending(db, &c.partition, c.last_processed_position).await?;
            let lease = LeaseStatus {
                head: heads.get(&c.partition).copied().unwrap_or(0).max(0) as u64,
                checkpoint: c.last_processed_position.max(0) as u64,
                lag_events: lag_events.max(0) as u64,
                lag: Duration::from_secs_f64(age.max(0.0)),
                owner: None,
                free: true,
                expires_in: Duration::ZERO,
                failures: 0,
                parked: false,
                retry_in: Duration::ZERO,
                last_error: None,
                subscription: c.subscription_id.clone(),
                tenant: c.partition.clone(),
            };
            pairs.insert((c.subscription_id, c.partition), lease);
        }
    }
    Ok(pairs.into_values().collect())
}

/// Runs `projection`'s parked tenants (or only `tenant`) now instead of after their backoff:
/// running daemons take the leases again within a poll interval (at once on PostgreSQL). The
/// number of leases; [`Error::UnknownPair`] when there is none.
pub async fn resume(store: &EventStore, projection: &str, tenant: Option<&str>) -> Result<u64> {
    let only = tenant.map(|t| [t]);
    let resumed = backend::revoke(store.conn(), projection, only.as_ref().map(|t| &t[..])).await?;
    match resumed {
        0 => Err(unknown_pair(projection, tenant)),
        resumed => Ok(resumed),
    }
}

/// Moves `projection`'s checkpoint in `tenant` to the global position `to` (back to replay,
/// or past a poison event) and clears its failures; running daemons give the lease up and go
/// on from there. [`Error::UnknownPair`] when the tenant has no checkpoint or lease of it.
pub async fn reset(store: &EventStore, projection: &str, tenant: &str, to: u64) -> Result<()> {
    let db = store.conn();
    let to = i64::try_from(to).map_err(|_| Error::OutOfRange {
        what: "checkpoint",
        value: to,
        stream: "-".into(),
        partition: tenant.into(),
    })?;
    let leased = backend::lease_rows(db, &[projection.to_owned()]).await?.iter().any(|l| l.partition == tenant);
    if !leased && checkpoint(store, projection, tenant).await?.is_none() {
        return Err(unknown_pair(projection, Some(tenant)));
    }
    move_checkpoint(store, projection, tenant, to, None).await
}

/// Moves the checkpoint of `projection` in `tenant` to `to` and clears its failures, recording
/// `skipped` in the same transaction; running daemons give the lease up and go on from there.
async fn move_checkpoint(
    store: &EventStore,
    projection: &str,
    tenant: &str,
    to: i64,
    skipped: Option<skipped_events::Model>,
) -> Result<()> {
    let txn = backend::begin_write(store.conn()).await?;
    backend::lock_checkpoints(&txn, projection, &[tenant]).await?;
    if let Some(skipped) = skipped {
        skipped_events::save(&txn, skipped).await?;
    }
    backend::move_checkpoints(&txn, projection, &[(tenant, to)]).await?;
    backend::unpark(&txn, projection, &[tenant]).await?;
    // Running daemons drop what they knew of this tenant and read the new checkpoint.
    backend::revoke(&txn, projection, Some(&[tenant])).await?;
    txn.commit().await?;
    Ok(())
}

/// Goes past the event `projection` failed on in `tenant` (its lease's error position): the
/// event is recorded in [`skipped_events`] with the error and the checkpoint moved to it
/// ([`reset`]), in one transaction. [`Error::NothingToSkip`] when the tenant has not failed on
/// an event.
pub async fn skip(store: &EventStore, projection: &str, tenant: &str) -> Result<skipped_events::Model> {
    let db = store.conn();
    let lease = backend::lease_rows(db, &[projection.to_owned()]).await?.into_iter().find(|l| l.partition == tenant);
    let Some(lease) = lease else { return Err(unknown_pair(projection, Some(tenant))) };
    let nothing = || Error::NothingToSkip { subscription: projection.into(), partition: tenant.into() };
    let (Some(reason), Some(position)) = (lease.last_error, lease.error_position) else { return Err(nothing()) };
    let at = checkpoint(store, projection, tenant).await?.unwrap_or(0);
    let event = event_at(store, tenant, position as u64).await?;
    // An error naming no event (its position is the checkpoint) leaves nothing to go past.
    let Some(event) = event.filter(|_| position > at) else { return Err(nothing()) };
    let skipped = skipped_events::Model {
        subscription_id: projection.into(),
        partition: tenant.into(),
        stream_id: event.stream_id,
        stream_position: event.stream_position,
        global_position: Some(position),
        message_type: event.message_type,
        reason,
        skipped_at: chrono::Utc::now(),
    };
    move_checkpoint(store, projection, tenant, position, Some(skipped.clone())).await?;
    Ok(skipped)
}

/// The live event of `tenant` at `global_position` (the one a parked error names), as stored.
pub async fn event_at(store: &EventStore, tenant: &str, global_position: u64) -> Result<Option<messages::Model>> {
    let event = messages::Entity::find()
        .filter(messages::Column::Partition.eq(tenant))
        .filter(messages::Column::GlobalPosition.eq(global_position.min(i64::MAX as u64) as i64))
        .filter(messages::Column::IsArchived.eq(false))
        .one(store.conn())
        .await?;
    Ok(event)
}

/// The central snapshots (`snapshots` table) that `tenant`'s stream `stream` has a key in:
/// the read-model rows a snapshot projection keyed by the stream's id made from it.
pub async fn snapshots_of(store: &EventStore, tenant: &str, stream: &str) -> Result<Vec<snapshots::Model>> {
    let part = format!(":{}", crate::projection::snapshot::encode_uri_component(stream));
    let escaped = part.replace('\\', "\\\\").replace('%', "\\%").replace('_', "\\_");
    let rows = snapshots::Entity::find()
        .filter(snapshots::Column::Partition.eq(tenant))
        .filter(snapshots::Column::StreamId.like(LikeExpr::new(format!("%{escaped}%")).escape('\\')))
        .order_by_asc(snapshots::Column::ReadmodelTableName)
        .order_by_asc(snapshots::Column::StreamId)
        .all(store.conn())
        .await?;
    // The pattern finds the value anywhere in a part: keep the rows where a whole part's value is it.
    let whole = |id: &str| id.split('|').any(|p| p.split_once(':').is_some_and(|(_, v)| format!(":{v}") == part));
    Ok(rows.into_iter().filter(|r| whole(&r.stream_id)).collect())
}

/// What [`retire`] removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Retired {
    /// Checkpoint rows.
    pub checkpoints: u64,
    /// Lease rows.
    pub leases: u64,
    /// Skipped-event records.
    pub skipped: u64,
}

/// Forgets a projection nobody runs any more: its checkpoints, leases and skipped-event
/// records (its read-model tables and snapshots are the app's to drop). A daemon still running
/// it starts it again from the first event. [`Error::UnknownPair`] when it has none.
pub async fn retire(store: &EventStore, projection: &str) -> Result<Retired> {
    let txn = backend::begin_write(store.conn()).await?;
    let checkpoints = subscriptions::Entity::delete_many()
        .filter(subscriptions::Column::SubscriptionId.eq(projection))
        .exec(&txn)
        .await?
        .rows_affected;
    let skipped = skipped_events::Entity::delete_many()
        .filter(skipped_events::Column::SubscriptionId.eq(projection))
        .exec(&txn)
        .await?
        .rows_affected;
    let leases = backend::forget_leases(&txn, projection).await?;
    txn.commit().await?;
    match checkpoints + leases {
        0 => Err(unknown_pair(projection, None)),
        _ => Ok(Retired { checkpoints, leases, skipped }),
    }
}

/// A daemon instance, as its registration row records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Instance {
    /// Its name (the owner of its segments).
    pub owner: String,
    /// Whether it is live (renewed its registration in time, or on PostgreSQL its presence).
    pub live: bool,
    /// Time until its registration expires unless renewed.
    pub expires_in: Duration,
    /// Segments it holds, by projection.
    pub segments: BTreeMap<String, u64>,
}

/// A projection's segment (its tenants fall into 64 by a hash of their id): who holds it and
/// at which epoch (bumped by each claim, which fences the batches of the holder before).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Segment {
    /// The projection.
    pub subscription: String,
    /// The segment's number.
    pub segment: i64,
    /// The instance holding it, if any.
    pub owner: Option<String>,
    /// Its epoch.
    pub epoch: i64,
    /// Whether another instance may take it now (no owner, or one that is gone).
    pub free: bool,
}

/// The daemon instances registered in the store, and every projection's segments.
pub async fn instances(store: &EventStore) -> Result<(Vec<Instance>, Vec<Segment>)> {
    let db = store.conn();
    let subscriptions = backend::lease_subscriptions(db).await?;
    let rows = backend::segments(db, &subscriptions).await?.rows;
    let mut instances: BTreeMap<String, Instance> = BTreeMap::new();
    for (owner, live, expires_in_ms) in backend::registered(db).await? {
        let expires_in = Duration::from_millis(expires_in_ms.max(0) as u64);
        let segments = BTreeMap::new();
        instances.insert(owner.clone(), Instance { owner, live, expires_in, segments });
    }
    let segments = rows
        .into_iter()
        .map(|s| {
            if let Some(instance) = s.owner.as_ref().and_then(|o| instances.get_mut(o)) {
                *instance.segments.entry(s.subscription.clone()).or_default() += 1;
            }
            Segment { subscription: s.subscription, segment: s.segment, owner: s.owner, epoch: s.epoch, free: s.free }
        })
        .collect();
    Ok((instances.into_values().collect(), segments))
}

/// A tenant with live streams.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Tenant {
    /// Its id (partition).
    pub partition: String,
    /// Its live (not archived) streams.
    pub streams: u64,
    /// Its last global position.
    pub last_global_position: u64,
}

/// Every tenant with live streams, by id.
pub async fn tenants(store: &EventStore) -> Result<Vec<Tenant>> {
    let db = store.conn();
    let counts: Vec<(String, i64)> = streams::Entity::find()
        .select_only()
        .column(streams::Column::Partition)
        .column_as(streams::Column::StreamId.count(), "streams")
        .filter(streams::Column::IsArchived.eq(false))
        .group_by(streams::Column::Partition)
        .order_by_asc(streams::Column::Partition)
        .into_tuple()
        .all(db)
        .await?;
    let heads: BTreeMap<String, i64> = backend::partition_heads(db, None).await?.into_iter().collect();
    let tenant = |(partition, streams): (String, i64)| Tenant {
        last_global_position: heads.get(&partition).copied().unwrap_or(0).max(0) as u64,
        streams: streams.max(0) as u64,
        partition,
    };
    Ok(counts.into_iter().map(tenant).collect())
}

/// Which streams [`streams()`] lists.
#[derive(Debug, Clone, Default)]
pub struct StreamFilter {
    /// Only this tenant's.
    pub partition: Option<String>,
    /// Only streams of this type.
    pub stream_type: Option<String>,
    /// Only the stream with this id (its generations, with `archived`).
    pub stream: Option<String>,
    /// Archived generations too (each generation is a row).
    pub archived: bool,
}

/// A page of streams (`limit` from `offset`, by tenant then id) and how many match in all.
pub async fn streams(
    store: &EventStore,
    filter: &StreamFilter,
    offset: u64,
    limit: u64,
) -> Result<(Vec<streams::Model>, u64)> {
    let mut query = streams::Entity::find();
    if !filter.archived {
        query = query.filter(streams::Column::IsArchived.eq(false));
    }
    if let Some(partition) = &filter.partition {
        query = query.filter(streams::Column::Partition.eq(partition));
    }
    if let Some(stream_type) = &filter.stream_type {
        query = query.filter(streams::Column::StreamType.eq(stream_type));
    }
    if let Some(stream) = &filter.stream {
        query = query.filter(streams::Column::StreamId.eq(stream));
    }
    let total = query.clone().count(store.conn()).await?;
    let page = query
        .order_by_asc(streams::Column::Partition)
        .order_by_asc(streams::Column::StreamId)
        .order_by_asc(streams::Column::IsArchived)
        .offset(offset)
        .limit(limit)
        .all(store.conn())
        .await?;
    Ok((page, total))
}

/// The checkpoint of `projection` in `tenant`, if it has one.
async fn checkpoint(store: &EventStore, projection: &str, tenant: &str) -> Result<Option<i64>> {
    let row = subscriptions::Entity::find()
        .filter(subscriptions::Column::SubscriptionId.eq(projection))
        .filter(subscriptions::Column::Partition.eq(tenant))
        .filter(subscriptions::Column::Version.eq(1))
        .one(store.conn())
        .await?;
    Ok(row.map(|c| c.last_processed_position))
}

fn unknown_pair(projection: &str, tenant: Option<&str>) -> Error {
    Error::UnknownPair { subscription: projection.into(), partition: tenant.map(Into::into) }
}
