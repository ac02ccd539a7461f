//! What the console's tests share: fresh databases (PostgreSQL from `EMMETT_TEST_POSTGRES_URL`,
//! default 127.0.0.1:5432; SQLite files), a projection that fails on one tenant until fixed,
//! and the console served on a free port.
#![allow(dead_code)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use emmett_seaorm::projection::{EventHandler, ProjectionContext, ProjectionRegistry};
use emmett_seaorm::{AppendOptions, EventStore, RecordedEvent};
use sea_orm::{ConnectionTrait, DatabaseConnection};
use serde_json::{Value, json};

fn server() -> String {
    std::env::var("EMMETT_TEST_POSTGRES_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

fn unique_name() -> String {
    format!("emmett_t_{}", uuid::Uuid::new_v4().simple())
}

pub async fn connect(url: &str) -> DatabaseConnection {
    let mut options = emmett_seaorm::connect_options(url);
    options.max_connections(24).connect_timeout(Duration::from_secs(3)).sqlx_logging(false);
    emmett_seaorm::sea_orm::Database::connect(emmett_seaorm::configure(options))
        .await
        .unwrap_or_else(|e| panic!("\n!!! {url} is unavailable ({e}): run scripts/services\n"))
}

/// A fresh, migrated PostgreSQL database: its URL.
pub async fn postgres() -> String {
    let admin = connect(&format!("{}/postgres", server())).await;
    let name = unique_name();
    admin.execute_unprepared(&format!("CREATE DATABASE {name}")).await.expect("create the test database");
    admin.close().await.ok();
    let url = format!("{}/{name}", server());
    emmett_seaorm::migrate(&connect(&url).await).await.expect("migrate");
    url
}

/// A fresh, migrated SQLite file: its URL.
pub async fn sqlite() -> String {
    let url = format!("sqlite://{}?mode=rwc", std::env::temp_dir().join(format!("{}.db", unique_name())).display());
    emmett_seaorm::migrate(&connect(&url).await).await.expect("migrate");
    url
}

pub async fn drop_database(url: &str) {
    if let Some(path) = url.strip_prefix("sqlite://").and_then(|rest| rest.split('?').next()) {
        for suffix in ["", "-wal", "-shm"] {
            std::fs::remove_file(format!("{path}{suffix}")).ok();
        }
        return;
    }
    let (_, name) = url.rsplit_once('/').expect("a database URL");
    let admin = connect(&format!("{}/postgres", server())).await;
    admin.execute_unprepared(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).await.expect("drop");
}

/// A deposit event.
pub fn deposit(amount: i64, note: &str) -> Value {
    json!({ "type": "Deposited", "data": { "amount": amount, "note": note } })
}

pub async fn append(store: &EventStore, tenant: &str, stream: &str, events: Vec<Value>) {
    store.append_to_stream(stream, events, AppendOptions::default().partition(tenant)).await.unwrap();
}

/// A projection handler that fails on tenant `poisoned`'s deposits of 13 while `broken` is set.
pub struct Ledger {
    pub broken: Arc<AtomicBool>,
}

#[async_trait::async_trait]
impl EventHandler<Value> for Ledger {
    async fn handle(
        &self,
        _: &ProjectionContext<'_>,
        e: &RecordedEvent<Value>,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let poison = e.partition == "poisoned" && e.event["data"]["amount"] == 13;
        match poison && self.broken.load(Ordering::SeqCst) {
            true => Err(format!("ledger refuses event {} of {}", e.stream_position, e.stream_id).into()),
            false => Ok(()),
        }
    }
}

/// The `ledger` projection, and the switch that fixes it.
pub fn ledger() -> (ProjectionRegistry<Value>, Arc<AtomicBool>) {
    let broken = Arc::new(AtomicBool::new(true));
    let registry = ProjectionRegistry::new().on(["Deposited"], Ledger { broken: Arc::clone(&broken) });
    (registry, broken)
}

/// Serves `router` on a free localhost port: its address.
pub async fn serve(router: axum::Router) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    address
}

/// Waits until `check` holds, for at most `seconds`.
pub async fn eventually<F: AsyncFnMut() -> bool>(seconds: u64, what: &str, mut check: F) {
    let deadline = std::time::Instant::now() + Duration::from_secs(seconds);
    while !check().await {
        assert!(std::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
