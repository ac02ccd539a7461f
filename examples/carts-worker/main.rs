//! The carts projections and the orders reactor as a long-running worker: every one for every
//! tenant, kept current until Ctrl-C (SIGINT) or SIGTERM, then a graceful stop (exit code 0).
//!
//! `cargo run --example carts-worker --features cli` uses the demo's SQLite file (`carts.db`);
//! set `DATABASE_URL` like for the demo. Start it twice: the two processes split the tenants,
//! and when one stops the other takes its tenants over.
//!
//! It mounts the operator's commands with its projections, so they can be rebuilt in-process:
//! `cargo run --example carts-worker --features cli -- ops projections rebuild carts-read-model`
//! (and every other `emmett-seaorm` command: `ops projections status`, `ops streams list`, …).

#[path = "../carts/domain.rs"]
#[allow(dead_code)]
mod domain;
#[path = "../carts/orders.rs"]
mod orders;
#[path = "../carts/read_model.rs"]
mod read_model;

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use emmett_seaorm::EventStore;
use emmett_seaorm::cli::Projections;
use emmett_seaorm::daemon::Daemon;
use emmett_seaorm::projection::ProjectionRegistry;

#[derive(Parser)]
struct Worker {
    #[arg(long, env = "DATABASE_URL", default_value = "sqlite://carts.db?mode=rwc")]
    database_url: String,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Run the projections until stopped (the default).
    Run,
    /// The operator's commands, with this app's projections.
    #[command(subcommand)]
    Ops(emmett_seaorm::cli::Command),
}

/// The projections this worker runs, by subscription id.
const CARTS: &str = "carts-read-model";
const ORDERS: &str = "orders";

#[tokio::main]
async fn main() -> ExitCode {
    let worker = Worker::parse();
    match worker.command {
        Some(Command::Ops(ops)) => {
            let projections = Projections::new()
                .projection(CARTS, ProjectionRegistry::new().with(read_model::projection()))
                .projection(ORDERS, orders::reactor());
            ops.run_and_report(&worker.database_url, &projections).await
        }
        Some(Command::Run) | None => match run(&worker.database_url).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("error: {err}");
                ExitCode::FAILURE
            }
        },
    }
}

async fn run(url: &str) -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "emmett_seaorm=info".into()),
        )
        .init();
    let db = emmett_seaorm::connect(url).await?;
    emmett_seaorm::migrate(&db).await?;
    let store = EventStore::new(db);
    read_model::create_table(&store).await?;

    let mut daemon = Daemon::new(store);
    // Behind a transaction pooler, `LISTEN_URL` (a direct URL) lets it listen instead of polling.
    if let Ok(listen) = std::env::var("LISTEN_URL") {
        daemon = daemon.listen_url(listen);
    }
    let daemon = daemon
        .projection(CARTS, ProjectionRegistry::new().with(read_model::projection()))
        .projection(ORDERS, orders::reactor())
        .start()
        .await?;
    let wake_ups = daemon.status().await?.wake_ups;
    println!("worker {} running on {url} ({wake_ups:?}); Ctrl-C to stop", daemon.owner());

    let mut report =
        tokio::time::interval_at(tokio::time::Instant::now() + Duration::from_secs(10), Duration::from_secs(10));
    loop {
        tokio::select! {
            _ = shutdown() => break,
            _ = report.tick() => {
                let status = daemon.status().await?;
                println!("{} instance(s); this one holds {} of {} leases", status.instances, status.held(), status.leases.len());
                for lease in status.leases.iter().filter(|l| l.lag_events > 0 || l.failures > 0) {
                    println!("  {} / {}: {} behind ({:?}), failures {}", lease.subscription, lease.tenant, lease.lag_events, lease.lag, lease.failures);
                }
            }
        }
    }
    println!("stopping: finishing batches, handing leases over");
    daemon.stop().await?;
    Ok(())
}

/// Resolves on Ctrl-C, or on SIGTERM where there is one.
async fn shutdown() {
    #[cfg(unix)]
    {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}
