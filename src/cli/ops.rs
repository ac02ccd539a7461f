//! What each command does: the queries behind `migrate`, `partitions`, `streams`,
//! `projections status|reset` and `leases`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect};
use serde_json::json;

use super::report::{self, Table};
use super::{CliError, JsonFlag, Migrate, Rls, StatusFilter};
use crate::conn::Conn;
use crate::migrations::{self, Change};
use crate::projection::ReadModel;
use crate::schema::{messages, skipped_events, streams, subscriptions};
use crate::store::{EventStore, ImportOptions, ReadOptions};
use crate::upcast::Upcasters;
use crate::{backend, daemon};

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

pub(super) async fn partitions(db: &Conn, flag: JsonFlag) -> Result<(), CliError> {
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
    let mut table = Table::new(["partition", "streams", "last_global_position"]).json(flag.json);
    for (tenant, streams) in counts {
        let head = heads.get(&tenant).copied().unwrap_or(0);
        table.record(json!({ "partition": tenant, "streams": streams, "last_global_position": head }));
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
    db: &Conn,
    partition: Option<String>,
    stream_type: Option<String>,
    limit: u64,
    flag: JsonFlag,
) -> Result<(), CliError> {
    let mut query = streams::Entity::find().filter(streams::Column::IsArchived.eq(false));
    if let Some(partition) = partition {
        query = query.filter(streams::Column::Partition.eq(partition));
    }
    if let Some(stream_type) = stream_type {
        query = query.filter(streams::Column::StreamType.eq(stream_type));
    }
    let rows = query
        .order_by_asc(streams::Column::Partition)
        .order_by_asc(streams::Column::StreamId)
        .limit(limit)
        .all(db)
        .await?;
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
pub(super) async fn status(db: &Conn, filter: StatusFilter) -> Result<(), CliError> {
    let mut records = BTreeMap::new();
    for l in daemon::recorded(db).await? {
        let (error, error_position) = l.last_error.clone().unzip();
        let record = json!({
            "projection": l.subscription, "tenant": l.tenant, "checkpoint": l.checkpoint, "head": l.head,
            "lag": l.lag_events, "lag_age": report::seconds(l.lag), "owner": l.owner,
            "expires": report::expiry(&l), "error": error, "error_position": error_position,
            "failures": l.failures, "parked": l.parked,
        });
        records.insert((l.subscription, l.tenant), record);
    }
    let heads: BTreeMap<String, i64> = backend::partition_heads(db, None).await?.into_iter().collect();
    let checkpoints = subscriptions::Entity::find().filter(subscriptions::Column::Version.eq(1)).all(db).await?;
    for c in checkpoints {
        let key = (c.subscription_id, c.partition);
        if records.contains_key(&key) {
            continue;
        }
        let (lag, age) = backend::pending(db, &key.1, c.last_processed_position).await?;
        let record = json!({
            "projection": key.0, "tenant": key.1, "checkpoint": c.last_processed_position,
            "head": heads.get(&key.1).copied().unwrap_or(0), "lag": lag,
            "lag_age": report::seconds(std::time::Duration::from_secs_f64(age.max(0.0))), "owner": null,
            "expires": "-", "error": null, "error_position": null, "failures": 0, "parked": false,
        });
        records.insert(key, record);
    }
    let columns = ["projection", "tenant", "checkpoint", "head", "lag", "lag_age", "owner", "expires", "error"];
    let mut table = Table::new(columns).json(filter.json.json);
    let shown = |r: &serde_json::Value| {
        (!filter.parked || r["parked"] == true)
            && (!filter.lagging || r["lag"].as_i64().unwrap_or(0) > 0)
            && filter.projection.as_deref().is_none_or(|p| r["projection"] == p)
            && filter.partition.as_deref().is_none_or(|t| r["tenant"] == t)
    };
    for record in records.into_values().filter(shown) {
        table.record(record);
    }
    table.print();
    Ok(())
}

pub(super) async fn resume(db: &Conn, name: &str, partition: Option<&str>) -> Result<(), CliError> {
    let only = partition.map(|p| [p]);
    let resumed = backend::revoke(db, name, only.as_ref().map(|p| &p[..])).await?;
    if resumed == 0 {
        return Err(CliError::Invalid(format!("projection '{name}' has no such lease")));
    }
    println!("projection '{name}': {resumed} lease(s) run again now");
    Ok(())
}

pub(super) async fn retire(db: &Conn, name: &str, yes: bool) -> Result<(), CliError> {
    if !yes {
        return Err(CliError::Invalid(format!(
            "retire forgets every checkpoint and lease of '{name}'; pass --yes to do it"
        )));
    }
    let txn = backend::begin_write(db).await?;
    let checkpoints = subscriptions::Entity::delete_many()
        .filter(subscriptions::Column::SubscriptionId.eq(name))
        .exec(&txn)
        .await?
        .rows_affected;
    let skipped = skipped_events::Entity::delete_many()
        .filter(skipped_events::Column::SubscriptionId.eq(name))
        .exec(&txn)
        .await?
        .rows_affected;
    let leases = backend::forget_leases(&txn, name).await?;
    txn.commit().await?;
    if checkpoints + leases == 0 {
        return Err(CliError::Invalid(format!("projection '{name}' has no checkpoint or lease")));
    }
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

pub(super) async fn reset(db: &Conn, name: &str, partition: &str, to: u64) -> Result<(), CliError> {
    let to = i64::try_from(to).map_err(|_| CliError::Invalid(format!("checkpoint {to} is out of range")))?;
    let leased = backend::lease_rows(db, &[name.to_owned()]).await?.iter().any(|l| l.partition == partition);
    let checkpointed = subscriptions::Entity::find()
        .filter(subscriptions::Column::SubscriptionId.eq(name))
        .filter(subscriptions::Column::Partition.eq(partition))
        .one(db)
        .await?
        .is_some();
    if !leased && !checkpointed {
        return Err(CliError::Invalid(format!(
            "projection '{name}' has no checkpoint or lease in partition '{partition}'"
        )));
    }
    let txn = backend::begin_write(db).await?;
    backend::lock_checkpoints(&txn, name, &[partition]).await?;
    backend::move_checkpoints(&txn, name, &[(partition, to)]).await?;
    backend::unpark(&txn, name, &[partition]).await?;
    // Running daemons drop what they knew of this tenant and read the new checkpoint.
    backend::revoke(&txn, name, Some(&[partition])).await?;
    txn.commit().await?;
    println!(
        "projection '{name}' in partition '{partition}' goes on after position {to}; running daemons pick it up \
         within a poll interval (snapshot projections skip events already folded: `rebuild --partition` re-folds)"
    );
    Ok(())
}
