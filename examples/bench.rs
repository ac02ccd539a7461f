//! Benchmarks of emmett-seaorm, printing the line format of the peers in `../shared/peers/`:
//! `<workload>\t<N>\tevents\t<seconds>\ts\t<rate>\tevents/s`.
//!
//! ```text
//! cargo run --release --example bench -- --database-url postgres://postgres@127.0.0.1:5432/bench \
//!     --streams 1000 --events-per-stream 10 --concurrency 8
//! ```
//! Workloads: `append-1` (one event per append, `--concurrency` writers, each with its exact
//! expected version) and `append-batch` (100 appends of 100 events). Each run writes to a
//! partition of its own, so runs can repeat on one database.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use clap::Parser;
use emmett_seaorm::{AppendOptions, EventStore, ExpectedVersion, ReadOptions};
use sea_orm::{ConnectOptions, Database};
use serde::{Deserialize, Serialize};

#[derive(Parser)]
struct Args {
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
    /// Workloads to run (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "append-1,append-batch")]
    workloads: Vec<String>,
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

fn report(workload: &str, events: u64, started: Instant) {
    let secs = started.elapsed().as_secs_f64();
    println!("{workload}\t{events}\tevents\t{secs:.3}\ts\t{}\tevents/s", (events as f64 / secs).round());
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let mut options = ConnectOptions::new(&args.database_url);
    options.max_connections(args.concurrency as u32).min_connections(args.concurrency as u32).sqlx_logging(false);
    let db = Database::connect(options).await?;
    emmett_seaorm::migrate(&db).await?;
    let store = EventStore::new(db);
    let partition = format!("bench-{}", uuid::Uuid::now_v7().simple());

    for workload in &args.workloads {
        match workload.as_str() {
            "append-1" => append_one(&store, &args, &partition).await?,
            "append-batch" => append_batch(&store, &partition).await?,
            other => return Err(format!("unknown workload {other}").into()),
        }
    }
    Ok(())
}

async fn append_one(store: &EventStore, args: &Args, partition: &str) -> Result<(), Box<dyn std::error::Error>> {
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
                        let event = if e == 0 {
                            CartEvent::CartCreated { cart_id: format!("c{s}") }
                        } else {
                            CartEvent::ItemAdded { sku: format!("sku-{e}"), qty: 1, price: 100 + e as i64 }
                        };
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
    report("append-1", args.streams * args.events_per_stream, started);
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
