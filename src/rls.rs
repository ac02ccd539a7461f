//! PostgreSQL row-level security: the database itself keeps each tenant's rows apart.
//!
//! The migrations put a policy on every table of the store that holds a tenant's rows
//! (`streams`, `messages`, `subscriptions`, `snapshots`, `emt_aggregate_snapshots`, `emt_leases`,
//! `emt_skipped_events`): a row is seen and written only by a transaction bound to its tenant
//! (the setting `emt.tenant`, which [`EventStore::for_tenant`](crate::EventStore::for_tenant)
//! sets with `SET LOCAL` in every transaction it runs). [`enable`] switches the policies on.
//! They hold for roles that neither own the tables nor have `BYPASSRLS`: the application
//! connects as such a role ([`grant`] gives it the least it needs) and works through
//! tenant-bound stores; the daemon, migrations and tenant operations (erase, export, move)
//! connect as the owner. Without a bound tenant the application role sees no rows at all.
//!
//! ```no_run
//! # async fn f() -> emmett_seaorm::Result<()> {
//! use emmett_seaorm::{EventStore, connect, rls};
//! // As the owner (who ran the migrations), once:
//! let owner = connect("postgres://owner@db/app").await?;
//! rls::grant(&owner, "app").await?;
//! rls::enable(&owner, &[]).await?;
//! // In the application, as `app`:
//! let store = EventStore::new(connect("postgres://app@db/app").await?);
//! let acme = store.for_tenant("acme"); // sees and writes tenant `acme` only, whatever the SQL
//! # Ok(()) }
//! ```
//!
//! The setting is a guard against the application's mistakes (a forgotten tenant filter, a
//! wrong id, raw SQL), not against code that runs SQL of its choosing on the connection: such
//! code can bind another tenant itself.

use std::collections::BTreeMap;

use sea_orm::sea_query::Query;
use sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseConnection, DbBackend, DbErr, EntityTrait, QueryFilter, QuerySelect,
    TransactionTrait,
};

use crate::backend::rls;
use crate::projection::ReadModel;
use crate::schema::snapshots;
use crate::{Error, Result};

/// Switches row-level security on for the store's tenant tables (idempotent). First, each
/// snapshot of `read_models` that does not name its tenant yet (written before the column
/// existed) gets it from its key: a tenant-bound store could not see it otherwise. Returns
/// how many snapshots were tagged.
pub async fn enable(db: &DatabaseConnection, read_models: &[ReadModel]) -> Result<u64> {
    postgres_only(db)?;
    let txn = db.begin().await?;
    let mut tagged = 0;
    for read_model in read_models {
        tagged += tag_snapshots(&txn, read_model).await?;
    }
    for sql in rls::row_security(DbBackend::Postgres, true) {
        txn.execute_unprepared(&sql).await?;
    }
    txn.commit().await?;
    Ok(tagged)
}

/// Switches row-level security off for the store's tenant tables (idempotent).
pub async fn disable(db: &DatabaseConnection) -> Result<()> {
    postgres_only(db)?;
    let txn = db.begin().await?;
    for sql in rls::row_security(DbBackend::Postgres, false) {
        txn.execute_unprepared(&sql).await?;
    }
    Ok(txn.commit().await?)
}

/// Whether row-level security is on for every tenant table.
pub async fn enabled(db: &DatabaseConnection) -> Result<bool> {
    postgres_only(db)?;
    // (In a transaction: one server behind a transaction pooler.)
    let txn = db.begin().await?;
    let on = rls::row_security_on(&txn).await?;
    txn.commit().await?;
    Ok(on)
}

/// Grants `role` what an application needs through tenant-bound stores, and no more: it reads
/// and writes the rows of the store's tables (never deleting but aggregate snapshots), uses the
/// global-position sequence, and can't `DROP`, `TRUNCATE` or `ALTER` anything. Read models the
/// application writes need grants (and policies) of their own.
pub async fn grant(db: &DatabaseConnection, role: &str) -> Result<()> {
    postgres_only(db)?;
    let txn = db.begin().await?;
    for sql in rls::app_role_grants(role) {
        txn.execute_unprepared(&sql).await?;
    }
    Ok(txn.commit().await?)
}

/// Row-level security is PostgreSQL's.
fn postgres_only(db: &DatabaseConnection) -> Result<()> {
    match db.get_database_backend() {
        DbBackend::Postgres => Ok(()),
        other => Err(Error::Database(DbErr::BackendNotSupported { db: other.as_str(), ctx: "row-level security" })),
    }
}

/// Names the tenant of `read_model`'s snapshots that name none, from their keys: returns how many.
async fn tag_snapshots(txn: &impl ConnectionTrait, read_model: &ReadModel) -> Result<u64> {
    let untagged: Vec<String> = snapshots::Entity::find()
        .select_only()
        .column(snapshots::Column::StreamId)
        .filter(snapshots::Column::ReadmodelTableName.eq(read_model.table()))
        .filter(snapshots::Column::Partition.is_null())
        .into_tuple()
        .all(txn)
        .await?;
    let mut by_tenant: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for id in untagged {
        if let Some(tenant) = crate::projection::snapshot::key_value(&id, read_model.tenant_column()) {
            by_tenant.entry(tenant).or_default().push(id);
        }
    }
    let mut tagged = 0;
    for (tenant, ids) in by_tenant {
        for chunk in ids.chunks(1_000) {
            let tag = Query::update()
                .table(snapshots::Entity)
                .value(snapshots::Column::Partition, tenant.as_str())
                .and_where(snapshots::Column::ReadmodelTableName.eq(read_model.table()))
                .and_where(snapshots::Column::StreamId.is_in(chunk))
                .to_owned();
            tagged += txn.execute(&tag).await?.rows_affected();
        }
    }
    Ok(tagged)
}
