//! `tenant-transfer`: one tenant of `--tenant-events` events (its own partitions on PostgreSQL)
//! exported to memory (`tenant-export`), imported under another id (`tenant-import`), then the
//! original erased (`tenant-erase`); `append-1-rls`: `append-1` under row-level security.

use std::time::Instant;

use emmett_seaorm::{AppendOptions, EventStore, ImportOptions, rls};
use sea_orm::{ConnectionTrait, Database, DatabaseConnection, DbBackend};

use super::{Args, append_one, cart_event, report};

/// The application role `append-1-rls` connects as (PgBouncer's `users.txt` of scripts/services
/// lists it).
const APP_ROLE: &str = "emt_app";

/// `append-1` as an application role through a store bound to the tenant, row-level security on
/// (PostgreSQL only): the role is created and granted if needed, and security is switched off
/// again after unless it was on.
pub async fn append_rls(
    db: &DatabaseConnection,
    args: &Args,
    partition: &str,
) -> Result<(), Box<dyn std::error::Error>> {
    if db.get_database_backend() != DbBackend::Postgres {
        eprintln!("append-1-rls: row-level security is PostgreSQL's; skipped");
        return Ok(());
    }
    let role = format!(
        "DO $$ BEGIN CREATE ROLE {APP_ROLE} LOGIN; EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$"
    );
    db.execute_unprepared(&role).await?;
    rls::grant(db, APP_ROLE).await?;
    let was_on = rls::enabled(db).await?;
    rls::enable(db, &[]).await?;
    let (scheme, rest) = args.database_url.split_once("://").ok_or("a database URL")?;
    let host = rest.split_once('@').map_or(rest, |(_, host)| host);
    let mut options = emmett_seaorm::connect_options(&format!("{scheme}://{APP_ROLE}@{host}"));
    options.max_connections(args.concurrency as u32).min_connections(args.concurrency as u32).sqlx_logging(false);
    let app = EventStore::new(Database::connect(emmett_seaorm::configure(options)).await?).for_tenant(partition);
    let appended = append_one(&app, args, partition, "append-1-rls").await;
    if !was_on {
        rls::disable(db).await?;
    }
    appended
}

pub async fn transfer(store: &EventStore, partition: &str, events: u64) -> Result<(), Box<dyn std::error::Error>> {
    const PER_STREAM: u64 = 1_000;
    let tenant = format!("{partition}-transfer");
    store.create_partition(&tenant).await?;
    for s in 0..events.div_ceil(PER_STREAM) {
        let batch = (0..PER_STREAM.min(events - s * PER_STREAM)).map(|e| cart_event(s, e));
        store.append_to_stream(&format!("cart-{s}"), batch, AppendOptions::default().partition(&tenant)).await?;
    }
    let mut file = Vec::new();
    let started = Instant::now();
    let written = store.export_partition(&tenant, &mut file).await?;
    report("tenant-export", written.events, started);
    let started = Instant::now();
    let copy = ImportOptions::default().partition(format!("{tenant}-copy"));
    let read = store.import_partition(&file[..], copy).await?;
    report("tenant-import", read.events, started);
    let started = Instant::now();
    store.erase_partition(&tenant, &[]).await?;
    report("tenant-erase", written.events, started);
    store.erase_partition(&format!("{tenant}-copy"), &[]).await?;
    Ok(())
}
