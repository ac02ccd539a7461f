//! Benchmarks of emmett-seaorm, printing the line format of the peers in `../shared/peers/`:
//! `<workload>\t<N>\tevents\t<seconds>\ts\t<rate>\tevents/s`.
//!
//! ```text
//! cargo run --release --example bench -- --database-url postgres://postgres@127.0.0.1:5432/bench \
//!     --streams 1000 --events-per-stream 10 --concurrency 8
//! ```
//! Workloads:
//! - `append-1`: one event per append, `--concurrency` writers, each with its exact expected version;
//!   `append-1-unnotified` the same without PostgreSQL notifications (`EventStore::notifications`),
//!   `append-1-inline` with the carts snapshot projection inline (`EventStore::inline`),
//!   `append-1-rls` (PostgreSQL, not in the default list) as an application role through a
//!   tenant-bound store (`EventStore::for_tenant`) with row-level security on;
//! - `append-batch`: 100 appends of 100 events;
//! - `project`: `project_events` per stream over the `append-1` streams, `--concurrency` in
//!   parallel, into a carts read model (snapshot-table mode), like the Kysely peer;
//! - `project-interleaved`: `project_partition` over the `append-1` tenant, whose streams'
//!   events interleave, so a batch writes up to `--batch-size` rows;
//! - `project-partition`: `project_partition` over one tenant of `--partition-events` events
//!   (analyzed after the load, as autovacuum would); `project-partition-cold` the same with no
//!   statistics for the tenant's partition (autovacuum off, no `ANALYZE`);
//! - `append-n`: one append of N events, N = 1, 10, 100, 150, 200, 400, 1000, 50 times each by one
//!   writer; each line `append-n<N>` gives the median append (rate = N / median) and
//!   `median_ms=<x>` after it.
//!
//! - `daemon-lag` / `daemon-lag-polling`: a projection daemon follows `--lag-rate` events/s over
//!   `--lag-tenants` tenants for `--lag-seconds`, appended from another pool, with PostgreSQL
//!   notifications on / off: `p50_ms`, `p99_ms` from an append's commit to the checkpoint covering it;
//! - `daemon-stores` (PostgreSQL, not in the default list): the `daemon-lag` load on one database
//!   (`daemon-stores-1`), then spread over three of the same server by a `StoreRouter` with a
//!   `DaemonFleet` (`daemon-stores-3`);
//! - `takeover-kill` / `takeover-stop`: `seconds=` until a second instance has projected the
//!   tenants of one killed / stopped;
//! - `daemon-scale`: `daemon-scale-1` and `daemon-scale-3`, 12 tenants × `--scale-events` events
//!   projected by 1 and by 3 instances;
//! - `idle` (PostgreSQL): transaction ids (`xids=`) and statements (`queries=`) of an idle daemon
//!   over `--idle-seconds`;
//! - `aggregate-1m` (not in the default list): folds a stream of `--aggregate-events`
//!   (1,000,000), then `aggregate-1m-snapshot` from a snapshot 50 events before its end;
//! - `command` / `command-snapshot` (not in the default list): `--commands` (4,000) single-event
//!   commands by 8 callers over 8 streams, without and with snapshots every 100 events;
//! - `project-partition-in-table` (not in the default list): `project-partition` with the
//!   snapshots kept in the read-model rows (`SnapshotProjection::in_table`);
//! - `project-partition-upcast` (not in the default list): `project-partition` over events
//!   stored one version behind their type's current one (one upcaster step each);
//! - `tenant-transfer` (not in the default list): one tenant of `--tenant-events` (1,000,000)
//!   events in its own partitions (PostgreSQL) exported to memory (`tenant-export`), imported
//!   under another id (`tenant-import`), then erased (`tenant-erase`);
//! - `daemon-tenants` (not in the default list): for each of `--tenant-counts` (100,10000), that
//!   many tenants of 3 events × `--tenant-projections` (2): `daemon-tenants-<N>-read`, 500 reads
//!   of a tenant's `cart-0` (every tenant has one; p50/p99 ms), then caught up from cold by one
//!   daemon (pairs/s), then idle: rows read and written and commits per second (PostgreSQL), RSS, then
//!   `daemon-tenants-<N>-lag-<rate>` for each of `--tenant-lag-rates` (50,2000) events/s over
//!   all tenants for `--tenant-lag-seconds` (10): p50/p99 from commit to both checkpoints.
//!
//! Each run writes to partitions of its own, so runs can repeat on one database.

mod aggregates;
mod daemon;
mod tenants;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use clap::Parser;
use emmett_seaorm::projection::{ProjectionRegistry, ProjectionRunner, RunOptions, SnapshotProjection};
use emmett_seaorm::{AppendOptions, EventStore, ExpectedVersion, ReadOptions, columns, keys};
use sea_orm::sea_query::{Alias, ColumnDef, Index, Table};
use sea_orm::{ConnectionTrait, Database};
use serde::{Deserialize, Serialize};

#[derive(Parser)]
struct Args {
    /// Appended to every workload name printed, to tell runs over another connection apart
    /// (`-pgbouncer` through a pooler, `-tls` with `sslmode=require`).
    #[arg(long, default_value = "")]
    suffix: String,
    /// Database to benchmark (migrated on start).
    #[arg(long, env = "DATABASE_URL", default_value = "sqlite://bench.db?mode=rwc")]
    database_url: String,
    /// Streams written by `append-1`.
    #[arg(long, default_value_t = 1000)]
    streams: u64,
    /// Events per stream in `append-1`.
    #[arg(long, default_value_t = 10)]
    events_per_stream: u64,
    /// Concurrent writers (and pool size).
    #[arg(long, default_value_t = 8)]
    concurrency: u64,
    /// Events of the tenant projected by `project-partition` (10 per stream).
    #[arg(long, default_value_t = 100_000)]
    partition_events: u64,
    /// Events per projection batch (one transaction each).
    #[arg(long, default_value_t = 500)]
    batch_size: u64,
    /// Workloads to run (comma-separated).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "append-1,append-1-unnotified,append-1-inline,append-batch,project,project-partition,project-partition-cold,append-n,\
                         daemon-lag,daemon-lag-polling,takeover-stop,takeover-kill,daemon-scale,idle"
    )]
    workloads: Vec<String>,
    /// Events per second appended in `daemon-lag`.
    #[arg(long, default_value_t = 2_000)]
    lag_rate: u64,
    /// Tenants written in `daemon-lag`.
    #[arg(long, default_value_t = 100)]
    lag_tenants: usize,
    /// Duration of `daemon-lag`.
    #[arg(long, default_value_t = 30)]
    lag_seconds: u64,
    /// Events per tenant in `daemon-scale` (12 tenants).
    #[arg(long, default_value_t = 20_000)]
    scale_events: u64,
    /// Duration of `idle`.
    #[arg(long, default_value_t = 60)]
    idle_seconds: u64,
    /// Events of the stream `aggregate-1m` folds.
    #[arg(long, default_value_t = 1_000_000)]
    aggregate_events: u64,
    /// Events of the tenant `tenant-transfer` exports, imports and erases.
    #[arg(long, default_value_t = 1_000_000)]
    tenant_events: u64,
    /// Commands of `command` / `command-snapshot`.
    #[arg(long, default_value_t = 4_000)]
    commands: u64,
    /// Tenant counts of `daemon-tenants`, each measured in turn in the same run.
    #[arg(long, value_delimiter = ',', default_value = "100,10000")]
    tenant_counts: Vec<usize>,
    /// Projections of `daemon-tenants`.
    #[arg(long, default_value_t = 2)]
    tenant_projections: usize,
    /// Length of the tenant ids of `daemon-tenants` (padded with quotes, `%`, `|`, spaces and
    /// non-ASCII characters; 0: short plain ids).
    #[arg(long, default_value_t = 0)]
    tenant_id_chars: usize,
    /// Rates (events/s) of the lag phases of `daemon-tenants`.
    #[arg(long, value_delimiter = ',', default_value = "50,2000")]
    tenant_lag_rates: Vec<u64>,
    /// Duration of each lag phase of `daemon-tenants`.
    #[arg(long, default_value_t = 10)]
    tenant_lag_seconds: u64,
}

/// The Kysely peer's cart state.
#[derive(Serialize, Deserialize, Default)]
struct CartState {
    items: i64,
    total: i64,
}

fn evolve(state: CartState, event: &CartEvent) -> CartState {
    match event {
        CartEvent::CartCreated { .. } => CartState::default(),
        CartEvent::ItemAdded { qty, price, .. } => {
            CartState { items: state.items + qty, total: state.total + qty * price }
        }
    }
}

fn carts_projection(table: &str) -> ProjectionRegistry<CartEvent> {
    ProjectionRegistry::new().with(carts(table))
}

/// The carts read model: a row per cart and tenant, its item count and total.
fn carts(table: &str) -> SnapshotProjection<CartEvent, CartState> {
    SnapshotProjection::new(
        table,
        |e, tenant| keys! { "tenant_id" => tenant, "cart_id" => &e.stream_id },
        evolve,
        CartState::default,
    )
    .handles(["CartCreated", "ItemAdded"])
    .columns(|s: &CartState| columns! { "item_count" => s.items, "total" => s.total })
}

/// The read model of `project-partition-in-table`: the carts with their snapshots in the rows.
const IN_ROW_TABLE: &str = "bench_carts_in_row";

fn carts_in_row() -> ProjectionRegistry<CartEvent> {
    ProjectionRegistry::new().with(carts(IN_ROW_TABLE).in_table())
}

fn cart_event(s: u64, e: u64) -> CartEvent {
    if e == 0 {
        CartEvent::CartCreated { cart_id: format!("c{s}") }
    } else {
        CartEvent::ItemAdded { sku: format!("sku-{e}"), qty: 1, price: 100 + e as i64 }
    }
}

/// The peers' event shapes.
#[derive(Serialize, Deserialize, Clone)]
#[serde(tag = "type", content = "data")]
enum CartEvent {
    CartCreated {
        #[serde(rename = "cartId")]
        cart_id: String,
    },
    ItemAdded {
        sku: String,
        qty: i64,
        price: i64,
    },
}

/// Appended to every workload name printed (`--suffix`).
static SUFFIX: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// `workload` as a result line names it: with the run's `--suffix`.
fn label(workload: &str) -> String {
    format!("{workload}{}", SUFFIX.get().map_or("", String::as_str))
}

fn report(workload: &str, events: u64, started: Instant) {
    let secs = started.elapsed().as_secs_f64();
    println!("{}\t{events}\tevents\t{secs:.3}\ts\t{}\tevents/s", label(workload), (events as f64 / secs).round());
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    SUFFIX.set(args.suffix.clone()).expect("set once");
    // `RUST_LOG=emmett_seaorm=debug` shows what the store and the daemon do.
    tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).init();
    let mut options = emmett_seaorm::connect_options(&args.database_url);
    options.max_connections(args.concurrency as u32).min_connections(args.concurrency as u32).sqlx_logging(false);
    let db = Database::connect(emmett_seaorm::configure(options)).await?;
    emmett_seaorm::migrate(&db).await?;
    let store = EventStore::new(db.clone());
    for table in ["bench_carts", "bench_carts_interleaved", "bench_carts_inline"] {
        create_carts_table(&store, table).await?;
    }
    create_carts_table_with(&store, IN_ROW_TABLE, true).await?;
    let partition = format!("bench-{}", uuid::Uuid::now_v7().simple());
    let mut appended = false;

    for workload in &args.workloads {
        match workload.as_str() {
            "append-1" => {
                append_one(&store, &args, &partition, "append-1").await?;
                appended = true;
            }
            "append-1-inline" => {
                let inline = EventStore::new(db.clone()).inline("carts", carts_projection("bench_carts_inline"));
                append_one(&inline, &args, &format!("{partition}-inline"), "append-1-inline").await?;
            }
            "append-1-unnotified" => {
                let quiet = EventStore::new(db.clone()).notifications(false);
                append_one(&quiet, &args, &format!("{partition}-quiet"), "append-1-unnotified").await?;
            }
            "append-1-rls" => tenants::append_rls(&db, &args, &format!("{partition}-rls")).await?,
            "append-batch" => append_batch(&store, &partition).await?,
            "project" => {
                if !appended {
                    seed(&store, &partition, args.streams, args.events_per_stream, args.concurrency).await?;
                }
                project(&store, &args, &partition).await?;
            }
            "project-interleaved" => {
                if !appended {
                    seed(&store, &partition, args.streams, args.events_per_stream, args.concurrency).await?;
                }
                let runner = ProjectionRunner::new(store.clone(), carts_projection("bench_carts_interleaved"));
                let started = Instant::now();
                let options = RunOptions::default().partition(&partition).batch_size(args.batch_size);
                let done = runner.project_partition("carts-interleaved", options).await?;
                report("project-interleaved", done.processed, started);
            }
            "project-partition" => project_partition(&store, &args, &format!("{partition}-pp"), Mode::Warm).await?,
            "project-partition-cold" => {
                project_partition(&store, &args, &format!("{partition}-ppc"), Mode::Cold).await?
            }
            "project-partition-upcast" => {
                project_partition(&store, &args, &format!("{partition}-ppu"), Mode::Upcast).await?
            }
            "project-partition-in-table" => {
                project_partition(&store, &args, &format!("{partition}-ppi"), Mode::InTable).await?
            }
            "append-n" => append_n(&store, &format!("{partition}-n")).await?,
            "daemon-lag" => daemon::lag(&args, &partition, true).await?,
            "daemon-lag-polling" => daemon::lag(&args, &partition, false).await?,
            "daemon-stores" => daemon::stores(&args, &partition).await?,
            "takeover-kill" => daemon::takeover(&args, &partition, true).await?,
            "takeover-stop" => daemon::takeover(&args, &partition, false).await?,
            "daemon-scale" => {
                let tenants = daemon::load_scale(&args, &partition).await?;
                daemon::scale(&args, &partition, 1, &tenants).await?;
                daemon::scale(&args, &partition, 3, &tenants).await?;
            }
            "idle" => daemon::idle(&args, &partition).await?,
            "aggregate-1m" => {
                aggregates::long_stream(&store, &format!("{partition}-agg"), args.aggregate_events).await?
            }
            // (Fresh streams each time: a command folds its stream, which grows.)
            "command" | "command-snapshot" => {
                let run = format!("{partition}-{}", uuid::Uuid::now_v7().simple());
                aggregates::commands(&store, &run, args.commands, workload == "command-snapshot").await?
            }
            "tenant-transfer" => tenants::transfer(&store, &partition, args.tenant_events).await?,
            "daemon-tenants" => {
                for &count in &args.tenant_counts {
                    daemon::tenants_scale(&args, &partition, count).await?;
                }
            }
            other => return Err(format!("unknown workload {other}").into()),
        }
    }
    Ok(())
}

/// Creates a carts read-model table (keys, item count, total) if needed; on MySQL its keys
/// compare exactly, as the store requires of a read model.
async fn create_carts_table(db: &impl ConnectionTrait, table: &str) -> Result<(), sea_orm::DbErr> {
    create_carts_table_with(db, table, false).await
}

/// [`create_carts_table`], with the snapshot columns of `SnapshotProjection::in_table` if `in_row`.
async fn create_carts_table_with(db: &impl ConnectionTrait, table: &str, in_row: bool) -> Result<(), sea_orm::DbErr> {
    let collation = emmett_seaorm::migrations::exact_collation(db).await?;
    let key = |name: &str| {
        let mut column = ColumnDef::new(Alias::new(name));
        column.string().not_null();
        if let Some(collation) = &collation {
            column.extra(format!("COLLATE {collation}"));
        }
        column
    };
    let mut create = Table::create();
    create
        .table(Alias::new(table))
        .if_not_exists()
        .col(key("tenant_id"))
        .col(key("cart_id"))
        .col(ColumnDef::new(Alias::new("item_count")).big_integer())
        .col(ColumnDef::new(Alias::new("total")).big_integer())
        .primary_key(Index::create().col(Alias::new("cart_id")).col(Alias::new("tenant_id")));
    if in_row {
        create
            .col(ColumnDef::new(Alias::new("snapshot")).json_binary())
            .col(ColumnDef::new(Alias::new("stream_id")).string())
            .col(ColumnDef::new(Alias::new("last_stream_position")).big_integer())
            .col(ColumnDef::new(Alias::new("last_global_position")).big_integer());
    }
    db.execute(&create).await?;
    Ok(())
}

async fn append_n(store: &EventStore, partition: &str) -> Result<(), Box<dyn std::error::Error>> {
    const APPENDS: usize = 50;
    for n in [1u64, 10, 100, 150, 200, 400, 1000] {
        let mut took = Vec::with_capacity(APPENDS);
        for a in 0..APPENDS {
            let events: Vec<CartEvent> = (0..n).map(|e| cart_event(a as u64, e)).collect();
            let options = AppendOptions::default().partition(partition).expected(ExpectedVersion::NoStream);
            let started = Instant::now();
            store.append_to_stream(&format!("n{n}-{a}"), events, options).await?;
            took.push(started.elapsed().as_secs_f64());
        }
        took.sort_by(f64::total_cmp);
        let median = took[APPENDS / 2];
        println!(
            "{}\t{n}\tevents\t{median:.6}\ts\t{}\tevents/s\tmedian_ms={:.2}",
            label(&format!("append-n{n}")),
            (n as f64 / median).round(),
            median * 1000.0
        );
    }
    Ok(())
}

async fn append_one(
    store: &EventStore,
    args: &Args,
    partition: &str,
    workload: &str,
) -> Result<(), Box<dyn std::error::Error>> {
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let workers: Vec<_> = (0..args.concurrency)
        .map(|_| {
            let (store, next, partition) = (store.clone(), next.clone(), partition.to_owned());
            let (streams, events) = (args.streams, args.events_per_stream);
            tokio::spawn(async move {
                loop {
                    let s = next.fetch_add(1, Ordering::Relaxed);
                    if s >= streams {
                        return Ok::<_, emmett_seaorm::Error>(());
                    }
                    for e in 0..events {
                        let event = cart_event(s, e);
                        let options = AppendOptions::default()
                            .partition(&partition)
                            .stream_type("cart")
                            .expected(ExpectedVersion::Exact(e));
                        store.append_to_stream(&format!("cart-{s}"), [event], options).await?;
                    }
                }
            })
        })
        .collect();
    for worker in workers {
        worker.await??;
    }
    report(workload, args.streams * args.events_per_stream, started);
    let check = store.read_stream::<CartEvent>("cart-0", ReadOptions::default().partition(partition)).await?;
    assert_eq!(check.current_stream_version, args.events_per_stream);
    Ok(())
}

async fn append_batch(store: &EventStore, partition: &str) -> Result<(), Box<dyn std::error::Error>> {
    const APPENDS: u64 = 100;
    const EVENTS: u64 = 100;
    let started = Instant::now();
    for b in 0..APPENDS {
        let events = (0..EVENTS).map(|i| CartEvent::ItemAdded { sku: format!("sku-{i}"), qty: 1, price: 100 });
        let options = AppendOptions::default().partition(partition).stream_type("batch");
        store.append_to_stream(&format!("batch-{b}"), events, options).await?;
    }
    report("append-batch", APPENDS * EVENTS, started);
    Ok(())
}

/// Writes `streams` carts of `events` events each (untimed set-up), one append per cart.
async fn seed(
    store: &EventStore,
    partition: &str,
    streams: u64,
    events: u64,
    concurrency: u64,
) -> emmett_seaorm::Result<()> {
    let next = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (store, next, partition) = (store.clone(), next.clone(), partition.to_owned());
            tokio::spawn(async move {
                loop {
                    let s = next.fetch_add(1, Ordering::Relaxed);
                    if s >= streams {
                        return Ok::<_, emmett_seaorm::Error>(());
                    }
                    let options = AppendOptions::default().partition(&partition).stream_type("cart");
                    store
                        .append_to_stream(&format!("cart-{s}"), (0..events).map(|e| cart_event(s, e)), options)
                        .await?;
                }
            })
        })
        .collect();
    for worker in workers {
        worker.await.expect("seed worker")?;
    }
    Ok(())
}

async fn project(store: &EventStore, args: &Args, partition: &str) -> Result<(), Box<dyn std::error::Error>> {
    let runner = ProjectionRunner::new(store.clone(), carts_projection("bench_carts"));
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let workers: Vec<_> = (0..args.concurrency)
        .map(|_| {
            let (runner, next, partition, streams) = (runner.clone(), next.clone(), partition.to_owned(), args.streams);
            let batch_size = args.batch_size;
            tokio::spawn(async move {
                loop {
                    let s = next.fetch_add(1, Ordering::Relaxed);
                    if s >= streams {
                        return Ok::<_, emmett_seaorm::Error>(());
                    }
                    let options = RunOptions::default().partition(&partition).batch_size(batch_size);
                    runner.project_events(&format!("carts:cart-{s}"), &format!("cart-{s}"), options).await?;
                }
            })
        })
        .collect();
    for worker in workers {
        worker.await??;
    }
    report("project", args.streams * args.events_per_stream, started);
    check_cart_0(store, "bench_carts", partition, args.events_per_stream).await
}

/// How `project-partition` runs.
#[derive(PartialEq)]
enum Mode {
    /// Statistics up to date.
    Warm,
    /// No statistics for the tenant's fresh partition.
    Cold,
    /// Warm, every event stored one version behind its type's current one: one upcaster step each.
    Upcast,
    /// Warm, the snapshots in the read-model rows.
    InTable,
}

/// The cart events' step from version 1 to 2: `price` moved into `unitPrice` and back (a
/// field renamed, at the cost of a real one).
fn cart_upcasters() -> emmett_seaorm::upcast::Upcasters {
    use emmett_seaorm::upcast::{RawEvent, Upcasters};
    let step = |mut e: RawEvent| {
        if let Some(data) = e.data.as_object_mut()
            && let Some(price) = data.remove("price")
        {
            data.insert("unitPrice".into(), price);
            let unit = data.remove("unitPrice").expect("just set");
            data.insert("price".into(), unit);
        }
        vec![e]
    };
    Upcasters::new().step("CartCreated", 1, step).step("ItemAdded", 1, step)
}

async fn project_partition(
    store: &EventStore,
    args: &Args,
    partition: &str,
    mode: Mode,
) -> Result<(), Box<dyn std::error::Error>> {
    let cold = mode == Mode::Cold;
    let streams = args.partition_events / 10;
    store.create_partition(partition).await?; // what a PostgreSQL tenant gets in production
    let postgres = store.get_database_backend() == sea_orm::DbBackend::Postgres;
    if postgres && cold {
        // No statistics at all for the tenant's fresh partition: autovacuum off, no ANALYZE.
        let table: String = store
            .query_one_raw(sea_orm::Statement::from_sql_and_values(
                sea_orm::DbBackend::Postgres,
                "SELECT c.oid::regclass::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
                 WHERE i.inhparent = 'messages'::regclass AND pg_get_expr(c.relpartbound, c.oid) LIKE '%' || $1 || '%'",
                [partition.into()],
            ))
            .await?
            .ok_or("the tenant's partition")?
            .try_get_by_index(0)?;
        store.execute_unprepared(&format!("ALTER TABLE {table} SET (autovacuum_enabled = false)")).await?;
    }
    seed(store, partition, streams, 10, args.concurrency).await?;
    if postgres && !cold {
        // Autovacuum's job after a bulk load.
        store.execute_unprepared("ANALYZE messages").await?;
    }
    let reader = match mode {
        Mode::Upcast => store.clone().with_upcasters(cart_upcasters())?,
        _ => store.clone(),
    };
    let (table, registry) = match mode {
        Mode::InTable => (IN_ROW_TABLE, carts_in_row()),
        _ => ("bench_carts", carts_projection("bench_carts")),
    };
    let runner = ProjectionRunner::new(reader, registry);
    let started = Instant::now();
    let done = runner
        .project_partition("carts-partition", RunOptions::default().partition(partition).batch_size(args.batch_size))
        .await?;
    let name = match mode {
        Mode::Warm => "project-partition",
        Mode::Cold => "project-partition-cold",
        Mode::Upcast => "project-partition-upcast",
        Mode::InTable => "project-partition-in-table",
    };
    report(name, done.processed, started);
    assert_eq!(done.processed, streams * 10);
    check_cart_0(store, table, partition, 10).await
}

/// The read model of `cart-0` must be the fold of its events.
async fn check_cart_0(
    store: &EventStore,
    table: &str,
    partition: &str,
    events: u64,
) -> Result<(), Box<dyn std::error::Error>> {
    let row = store
        .query_one(
            sea_orm::sea_query::Query::select()
                .columns([Alias::new("item_count"), Alias::new("total")])
                .from(Alias::new(table))
                .and_where(sea_orm::sea_query::ExprTrait::eq(
                    sea_orm::sea_query::Expr::col(Alias::new("cart_id")),
                    "cart-0",
                ))
                .and_where(sea_orm::sea_query::ExprTrait::eq(
                    sea_orm::sea_query::Expr::col(Alias::new("tenant_id")),
                    partition,
                )),
        )
        .await?
        .ok_or("cart-0 missing from the read model")?;
    let (items, total): (i64, i64) = (row.try_get("", "item_count")?, row.try_get("", "total")?);
    let expected = (1..events as i64).map(|e| 100 + e).sum::<i64>();
    assert_eq!((items, total), (events as i64 - 1, expected), "read model of cart-0");
    Ok(())
}
