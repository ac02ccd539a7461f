//! What each command does: the queries behind `migrate`, `partitions`, `streams`,
//! `projections status|reset` and `leases`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect};
use serde_json::json;

use super::report::{self, Table};
use super::{CliError, JsonFlag, Migrate, Rls, StatusFilter};
use crate::admin;
use crate::conn::Conn;
use crate::daemon::{self, LeaseStatus};
use crate::migrations::{self, Change};
use crate::projection::ReadModel;
use crate::schema::messages;
use crate::store::{EventStore, ImportOptions, ReadOptions};
use crate::upcast::Upcasters;

/// `rls status|enable|disable|grant`.
pub(super) async fn rls(
    db: &sea_orm::DatabaseConnection,
    command: Rls,
    read_models: &[ReadModel],
) -> Result<(), CliError> {
    match command {
        Rls::Status => {}
        Rls::Enable => {
            let tagged = crate::rls::enable(db, read_models).await?;
            if tagged > 0 {
                println!("{tagged} snapshots now name their tenant");
            }
        }
        Rls::Disable => crate::rls::disable(db).await?,
        Rls::Grant { role } => {
            crate::rls::grant(db, &role).await?;
            println!("granted '{role}' what tenant-bound stores need");
            return Ok(());
        }
    }
    let on = crate::rls::enabled(db).await?;
    println!("row-level security is {}", if on { "on" } else { "off" });
    Ok(())
}

pub(super) async fn migrate(db: &sea_orm::DatabaseConnection, command: Migrate) -> Result<(), CliError> {
    match command {
        Migrate::Up => migrations::change(db, Change::Up).await?,
        Migrate::Down { steps } => migrations::change(db, Change::Down(steps)).await?,
        Migrate::Fresh { yes: false } => {
            return Err(CliError::Invalid("fresh drops every table of the database; pass --yes to do it".into()));
        }
        Migrate::Fresh { yes: true } => migrations::change(db, Change::Fresh).await?,
        Migrate::Sql => {
            let pending = migrations::pending_sql(db).await?;
            if pending.is_empty() {
                println!("-- no pending migrations");
            }
            for (name, statements) in pending {
                println!("-- {name}");
                for sql in statements {
                    println!("{sql};");
                }
            }
            return Ok(());
        }
        Migrate::Status => {}
    }
    let mut table = Table::new(["migration", "status"]);
    for (name, applied) in migrations::status(db).await? {
        table.record(json!({ "migration": name, "status": if applied { "applied" } else { "pending" } }));
    }
    table.print();
    Ok(())
}

pub(super) async fn partitions(store: &EventStore, flag: JsonFlag) -> Result<(), CliError> {
    let mut table = Table::new(["partition", "streams", "last_global_position"]).json(flag.json);
    for tenant in admin::tenants(store).await? {
        table.record(serde_json::to_value(tenant).map_err(crate::Error::from)?);
    }
    table.print();
    Ok(())
}

/// `partitions erase`: the rows of `tenant` per table, removed with `yes`, else only counted.
pub(super) async fn erase(
    store: &EventStore,
    tenant: &str,
    read_models: &[ReadModel],
    yes: bool,
    json: bool,
) -> Result<(), CliError> {
    let rows = match yes {
        true => store.erase_partition(tenant, read_models).await?,
        false => store.partition_rows(tenant, read_models).await?,
    };
    if rows.total() == 0 {
        return Err(CliError::Invalid(format!("tenant '{tenant}' has no rows: nothing to erase")));
    }
    let column = if yes { "removed" } else { "would_remove" };
    let mut table = Table::new(["table", column]).json(json);
    for (name, count) in &rows.tables {
        table.record(json!({ "table": name, column: count }));
    }
    table.print();
    match yes {
        true => eprintln!("tenant '{tenant}' erased: {} rows", rows.total()),
        false => eprintln!("nothing changed; pass --yes to erase tenant '{tenant}' ({} rows)", rows.total()),
    }
    Ok(())
}

/// `partitions export`: the tenant's file, to `output` or standard output.
pub(super) async fn export(store: &EventStore, tenant: &str, output: Option<PathBuf>) -> Result<(), CliError> {
    let written = match &output {
        Some(path) => {
            let file = tokio::fs::File::create(path).await.map_err(|e| file_error(path, e))?;
            let lines = store.partition_rows(tenant, &[]).await?;
            let rows = |table: &str| lines.tables.iter().find(|(t, _)| t == table).map_or(0, |(_, n)| *n);
            let (file, count) = report::Lines::new(file);
            let total = 1 + rows("streams") + rows("messages");
            report::with_progress(&format!("export {tenant}"), total, count, store.export_partition(tenant, file))
                .await?
        }
        // (No bar: the file is the output.)
        None => store.export_partition(tenant, tokio::io::stdout()).await?,
    };
    if written.streams == 0 {
        if let Some(path) = &output {
            tokio::fs::remove_file(path).await.map_err(|e| file_error(path, e))?;
        }
        return Err(CliError::Invalid(format!("tenant '{tenant}' has no streams: nothing to export")));
    }
    eprintln!("tenant '{tenant}' exported: {} streams, {} events", written.streams, written.events);
    Ok(())
}

/// `partitions import`: a tenant's file from `input` or standard input.
pub(super) async fn import(
    store: &EventStore,
    input: Option<PathBuf>,
    partition: Option<String>,
    replace: Option<&[ReadModel]>,
) -> Result<(), CliError> {
    let mut options = ImportOptions::default();
    if let Some(partition) = partition {
        options = options.partition(partition);
    }
    if let Some(read_models) = replace {
        options = options.replace(read_models);
    }
    let read = match input {
        Some(path) => {
            let file = tokio::fs::File::open(&path).await.map_err(|e| file_error(&path, e))?;
            let total = lines_in(&path).await;
            let (file, count) = report::Lines::new(file);
            let import = store.import_partition(tokio::io::BufReader::new(file), options);
            report::with_progress("import", total, count, import).await?
        }
        None => store.import_partition(tokio::io::BufReader::new(tokio::io::stdin()), options).await?,
    };
    eprintln!("tenant '{}' imported: {} streams, {} events", read.partition, read.streams, read.events);
    Ok(())
}

/// `partitions move`: the tenant to the database at `to`, or with `dry_run` what would move.
pub(super) async fn move_partition(
    store: &EventStore,
    tenant: &str,
    to: &str,
    read_models: &[ReadModel],
    dry_run: bool,
) -> Result<(), CliError> {
    let target =
        crate::connect(to).await.map_err(|source| CliError::Connect { url: report::without_password(to), source })?;
    let there = EventStore::new(target.clone());
    let outcome = async {
        let here = store.partition_rows(tenant, &[]).await?;
        let rows = |table: &str| here.tables.iter().find(|(t, _)| t == table).map_or(0, |(_, n)| *n);
        if rows("streams") == 0 {
            return Err(CliError::Invalid(format!("tenant '{tenant}' has no streams: nothing to move")));
        }
        let target_rows = there.partition_rows(tenant, &[]).await?.total();
        if dry_run {
            let (streams, events) = (rows("streams"), rows("messages"));
            let target = report::without_password(to);
            println!("would move tenant '{tenant}' ({streams} streams, {events} events) to {target}");
            if target_rows > 0 {
                println!("the target already has {target_rows} rows of it: the move finishes only if they equal these");
            }
            return Ok(());
        }
        let moved = store.move_partition(tenant, &there, read_models).await?;
        eprintln!("tenant '{tenant}' moved: {} streams, {} events", moved.streams, moved.events);
        Ok(())
    }
    .await;
    target.close().await.ok();
    outcome
}

/// The lines of an export file as its header counts them (0 when it has none: the import says
/// what is wrong).
async fn lines_in(path: &std::path::Path) -> u64 {
    use tokio::io::AsyncBufReadExt;
    let Ok(file) = tokio::fs::File::open(path).await else { return 0 };
    let mut header = String::new();
    if tokio::io::BufReader::new(file).read_line(&mut header).await.is_err() {
        return 0;
    }
    let counted = |key: &str| serde_json::from_str::<serde_json::Value>(&header).ok()?["header"][key].as_u64();
    1 + counted("streams").unwrap_or(0) + counted("events").unwrap_or(0)
}

fn file_error(path: &std::path::Path, err: std::io::Error) -> CliError {
    CliError::Invalid(format!("{}: {err}", path.display()))
}

pub(super) async fn list_streams(
    store: &EventStore,
    partition: Option<String>,
    stream_type: Option<String>,
    limit: u64,
    flag: JsonFlag,
) -> Result<(), CliError> {
    let filter = admin::StreamFilter { partition, stream_type, ..Default::default() };
    let (rows, _) = admin::streams(store, &filter, 0, limit).await?;
    let mut table = Table::new(["partition", "stream", "type", "version"]).json(flag.json);
    for s in rows {
        table.record(json!({
            "partition": s.partition, "stream": s.stream_id, "type": s.stream_type, "version": s.stream_position,
        }));
    }
    table.print();
    Ok(())
}

pub(super) async fn event_types(
    db: &Conn,
    upcasters: &Upcasters,
    partition: Option<String>,
    flag: JsonFlag,
) -> Result<(), CliError> {
    use sea_orm::sea_query::{Expr, ExprTrait};
    let mut query = messages::Entity::find().select_only().filter(messages::Column::IsArchived.eq(false));
    if let Some(partition) = partition {
        query = query.filter(messages::Column::Partition.eq(partition));
    }
    let columns = [messages::Column::Partition, messages::Column::MessageType, messages::Column::MessageSchemaVersion];
    let rows: Vec<(String, String, String, i64)> = query
        .columns(columns)
        .column_as(Expr::col(messages::Column::GlobalPosition).count(), "count")
        .group_by(messages::Column::Partition)
        .group_by(messages::Column::MessageType)
        .group_by(messages::Column::MessageSchemaVersion)
        .order_by_asc(messages::Column::Partition)
        .order_by_asc(messages::Column::MessageType)
        .order_by_asc(messages::Column::MessageSchemaVersion)
        .into_tuple()
        .all(db)
        .await?;
    // By the version each stored value means (the TypeScript package's indexes are version 1).
    let mut counts: BTreeMap<(String, String, String), i64> = BTreeMap::new();
    for (partition, message_type, stored, count) in rows {
        let version = crate::upcast::parse_version(&stored).map_or(stored, |v| v.to_string());
        *counts.entry((partition, message_type, version)).or_default() += count;
    }
    let mut table = Table::new(["partition", "type", "version", "count", "current"]).json(flag.json);
    for ((partition, message_type, version), count) in counts {
        let current = upcasters.current_version(&message_type);
        table.record(json!({
            "partition": partition, "type": message_type, "version": version, "count": count, "current": current,
        }));
    }
    table.print();
    Ok(())
}

pub(super) async fn read_stream(
    store: &EventStore,
    stream: &str,
    partition: &str,
    from: u64,
    flag: JsonFlag,
) -> Result<(), CliError> {
    let read = store.read_stream::<serde_json::Value>(stream, ReadOptions::default().partition(partition).from(from));
    let read = read.await?;
    if !read.stream_exists {
        return Err(CliError::Invalid(format!("stream '{stream}' not found in partition '{partition}'")));
    }
    let mut table = Table::new(["stream_position", "global_position", "created", "type", "data"]).json(flag.json);
    for e in read.events {
        let data = e.event.get("data").cloned().unwrap_or_default();
        table.record(json!({
            "stream_position": e.stream_position, "global_position": e.global_position,
            "created": e.created.to_rfc3339(), "type": e.message_type, "data": data,
            "stream": e.stream_id, "partition": e.partition, "message_id": e.message_id, "metadata": e.metadata,
        }));
    }
    table.print();
    Ok(())
}

/// Every (projection, tenant) with a lease (run by a daemon) or a checkpoint (run by a
/// `ProjectionRunner` alone), by projection and tenant.
pub(super) async fn status(store: &EventStore, filter: StatusFilter) -> Result<(), CliError> {
    let shown = |l: &LeaseStatus| {
        (!filter.parked || l.parked)
            && (!filter.lagging || l.lag_events > 0)
            && filter.projection.as_deref().is_none_or(|p| l.subscription == p)
            && filter.partition.as_deref().is_none_or(|t| l.tenant == t)
    };
    let columns = ["projection", "tenant", "checkpoint", "head", "lag", "lag_age", "owner", "expires", "error"];
    let mut table = Table::new(columns).json(filter.json.json);
    for l in admin::projections(store).await?.into_iter().filter(shown) {
        let (error, error_position) = l.last_error.clone().unzip();
        table.record(json!({
            "projection": l.subscription, "tenant": l.tenant, "checkpoint": l.checkpoint, "head": l.head,
            "lag": l.lag_events, "lag_age": report::seconds(l.lag), "owner": l.owner,
            "expires": report::expiry(&l), "error": error, "error_position": error_position,
            "failures": l.failures, "parked": l.parked,
        }));
    }
    table.print();
    Ok(())
}

pub(super) async fn resume(store: &EventStore, name: &str, partition: Option<&str>) -> Result<(), CliError> {
    let resumed = admin::resume(store, name, partition).await?;
    println!("projection '{name}': {resumed} lease(s) run again now");
    Ok(())
}

pub(super) async fn skip(store: &EventStore, name: &str, partition: &str) -> Result<(), CliError> {
    let skipped = admin::skip(store, name, partition).await?;
    println!(
        "projection '{name}' in partition '{partition}' went past event {} of stream '{}' (global position {}, {}); \
         recorded in emt_skipped_events",
        skipped.stream_position,
        skipped.stream_id,
        skipped.global_position.unwrap_or(0),
        skipped.message_type
    );
    Ok(())
}

pub(super) async fn retire(store: &EventStore, name: &str, yes: bool) -> Result<(), CliError> {
    if !yes {
        return Err(CliError::Invalid(format!(
            "retire forgets every checkpoint and lease of '{name}'; pass --yes to do it"
        )));
    }
    let admin::Retired { checkpoints, leases, skipped } = admin::retire(store, name).await?;
    println!(
        "projection '{name}' retired: {checkpoints} checkpoint(s), {leases} lease(s), {skipped} skipped-event record(s) \
         removed; drop its read-model tables yourself"
    );
    Ok(())
}

pub(super) async fn leases(db: &Conn, flag: JsonFlag) -> Result<(), CliError> {
    let mut table = Table::new(["projection", "tenant", "owner", "expires", "failures", "retry_in"]).json(flag.json);
    for l in daemon::recorded(db).await? {
        table.record(json!({
            "projection": l.subscription, "tenant": l.tenant, "owner": l.owner, "expires": report::expiry(&l),
            "failures": l.failures, "retry_in": report::seconds(l.retry_in),
        }));
    }
    table.print();
    Ok(())
}

pub(super) async fn reset(store: &EventStore, name: &str, partition: &str, to: u64) -> Result<(), CliError> {
    admin::reset(store, name, partition, to).await?;
    println!(
        "projection '{name}' in partition '{partition}' goes on after position {to}; running daemons pick it up \
         within a poll interval (snapshot projections skip events already folded: `rebuild --partition` re-folds)"
    );
    Ok(())
}
