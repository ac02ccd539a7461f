//! Every pooled PostgreSQL and MySQL connection has `TCP_NODELAY` (sqlx ≥ 0.9.1 sets it when it
//! opens the socket, before the TLS handshake: 0.9.0 did not, and each handshake stalled ~80 ms),
//! whether the pool came from `emmett_seaorm::connect` or not — checked from outside with
//! `getsockopt` on the process's sockets; SQLite runs in WAL mode.

// The TCP helpers serve the PostgreSQL and MySQL tests only.
#![cfg_attr(not(any(feature = "postgres", feature = "mysql")), allow(dead_code))]

mod common;

use sea_orm::{ConnectionTrait, Database, DatabaseConnection, DbBackend, Statement, TransactionTrait};

/// The client port the server sees for the connection `conn` runs on (`None` over a Unix socket).
async fn client_port(conn: &impl ConnectionTrait) -> Option<u16> {
    let sql = match conn.get_database_backend() {
        DbBackend::Postgres => "SELECT inet_client_port()::text",
        _ => "SELECT SUBSTRING_INDEX(HOST, ':', -1) FROM information_schema.PROCESSLIST WHERE ID = CONNECTION_ID()",
    };
    let row = conn.query_one_raw(Statement::from_string(conn.get_database_backend(), sql)).await.unwrap().unwrap();
    row.try_get_by_index::<Option<String>>(0).unwrap()?.parse().ok()
}

/// Whether the process's TCP socket with local port `port` has `TCP_NODELAY` on.
fn nodelay(port: u16) -> bool {
    let mut found = None;
    for entry in std::fs::read_dir("/proc/self/fd").unwrap() {
        let Ok(fd) = entry.unwrap().file_name().to_str().unwrap().parse::<libc::c_int>() else { continue };
        // SAFETY: plain getsockname/getsockopt calls writing into local buffers of the given size.
        unsafe {
            let mut addr: libc::sockaddr_in = std::mem::zeroed();
            let mut len = size_of::<libc::sockaddr_in>() as libc::socklen_t;
            let named = libc::getsockname(fd, (&mut addr as *mut libc::sockaddr_in).cast(), &mut len) == 0;
            if !named || addr.sin_family as libc::c_int != libc::AF_INET || u16::from_be(addr.sin_port) != port {
                continue;
            }
            let (mut on, mut len): (libc::c_int, libc::socklen_t) = (0, size_of::<libc::c_int>() as libc::socklen_t);
            libc::getsockopt(fd, libc::IPPROTO_TCP, libc::TCP_NODELAY, (&mut on as *mut libc::c_int).cast(), &mut len);
            found = Some(on != 0);
        }
    }
    found.unwrap_or_else(|| panic!("no socket with local port {port}"))
}

/// Holds `n` connections of `db` at once (so the pool opens new ones) and returns their ports.
async fn ports_of_open_connections(db: &DatabaseConnection, n: usize) -> Vec<u16> {
    let mut held = Vec::new();
    let mut ports = Vec::new();
    for _ in 0..n {
        let txn = db.begin().await.unwrap();
        ports.push(client_port(&txn).await.expect("a TCP connection"));
        held.push(txn);
    }
    ports
}

async fn every_pooled_tcp_connection_has_nodelay(url: String) {
    // A pool the store did not make (sqlx #4335: 0.9.0 left it off), and one it did.
    let plain = Database::connect(&url).await.unwrap();
    let ports = ports_of_open_connections(&plain, 3).await;
    assert!(ports.iter().all(|&p| nodelay(p)), "every connection of a plain pool has TCP_NODELAY: {ports:?}");
    let db = emmett_seaorm::connect(&url).await.unwrap();
    let ports = ports_of_open_connections(&db, 6).await;
    assert!(ports.iter().all(|&p| nodelay(p)), "every connection the pool opened has TCP_NODELAY: {ports:?}");
    common::drop_database(&url).await;
}

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_connections_have_nodelay() {
    every_pooled_tcp_connection_has_nodelay(common::postgres().await).await;
}

#[cfg(feature = "mysql")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_connections_have_nodelay() {
    every_pooled_tcp_connection_has_nodelay(common::mysql().await).await;
}

#[cfg(feature = "sqlite")]
#[tokio::test]
async fn sqlite_runs_in_wal_mode() {
    let url = common::sqlite().await;
    let db = emmett_seaorm::connect(&url).await.unwrap();
    let pragma = |sql: &'static str| {
        let db = db.clone();
        async move {
            let row = db.query_one_raw(Statement::from_string(DbBackend::Sqlite, sql)).await.unwrap().unwrap();
            row.try_get_by_index::<String>(0)
                .or_else(|_| row.try_get_by_index::<i64>(0).map(|n| n.to_string()))
                .unwrap()
        }
    };
    assert_eq!(pragma("PRAGMA journal_mode").await, "wal");
    assert_eq!(pragma("PRAGMA synchronous").await, "1", "NORMAL");
    assert_eq!(pragma("PRAGMA busy_timeout").await, "30000");
    common::drop_database(&url).await;
}

/// The child's side of `two_processes_share_one_sqlite_file`: set by the parent.
#[cfg(feature = "sqlite")]
const CHILD_DB: &str = "EMMETT_TEST_SQLITE_CHILD_DB";

/// Appends `count` single-event appends (`Any`) round-robin to four streams of tenant `t`.
#[cfg(feature = "sqlite")]
async fn append_many(store: &emmett_seaorm::EventStore, writer: &str, count: usize) {
    for i in 0..count {
        let event = serde_json::json!({ "type": "Deposited", "data": { "amount": 1, "writer": writer, "i": i } });
        let options = emmett_seaorm::AppendOptions::default().partition("t");
        store.append_to_stream(&format!("s{}", i % 4), [event], options).await.unwrap();
    }
}

/// Two OS processes append to one SQLite file at once, a projection runner running in one of
/// them: no error reaches either caller, and every event is stored once.
#[cfg(feature = "sqlite")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_share_one_sqlite_file() {
    use emmett_seaorm::projection::{ProjectionRegistry, ProjectionRunner, RunOptions};
    const EACH: usize = 400;
    if let Ok(url) = std::env::var(CHILD_DB) {
        let store = emmett_seaorm::EventStore::new(emmett_seaorm::connect(&url).await.unwrap());
        append_many(&store, "child", EACH).await;
        return;
    }
    let url = common::sqlite().await;
    let db = emmett_seaorm::connect(&url).await.unwrap();
    emmett_seaorm::migrate(&db).await.unwrap();
    let store = emmett_seaorm::EventStore::new(db.clone());
    let child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "two_processes_share_one_sqlite_file", "--nocapture"])
        .env(CHILD_DB, &url)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let counted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let runner = {
        struct Count(std::sync::Arc<std::sync::atomic::AtomicUsize>);
        #[async_trait::async_trait]
        impl emmett_seaorm::projection::EventHandler<serde_json::Value> for Count {
            async fn handle(
                &self,
                _: &emmett_seaorm::projection::ProjectionContext<'_>,
                _: &emmett_seaorm::RecordedEvent<serde_json::Value>,
            ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
                self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                Ok(())
            }
        }
        let runner = ProjectionRunner::new(store.clone(), ProjectionRegistry::new().on([], Count(counted.clone())));
        tokio::spawn(async move {
            for _ in 0..20 {
                runner.project_partition("count", RunOptions::default().partition("t")).await.unwrap();
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            runner
        })
    };
    append_many(&store, "parent", EACH).await;
    let output = tokio::task::spawn_blocking(move || child.wait_with_output()).await.unwrap().unwrap();
    assert!(output.status.success(), "the child process failed: {}", String::from_utf8_lossy(&output.stdout));
    let runner = runner.await.unwrap();
    runner.project_partition("count", RunOptions::default().partition("t")).await.unwrap();

    let mut events = Vec::new();
    for s in 0..4 {
        let read = store
            .read_stream::<serde_json::Value>(&format!("s{s}"), emmett_seaorm::ReadOptions::default().partition("t"))
            .await
            .unwrap();
        assert!(read.events.iter().enumerate().all(|(i, e)| e.stream_position == i as u64 + 1), "contiguous");
        events.extend(read.events);
    }
    assert_eq!(events.len(), 2 * EACH, "every append stored");
    let mut appends: Vec<(String, u64)> = events
        .iter()
        .map(|e| (e.event["data"]["writer"].as_str().unwrap().to_owned(), e.event["data"]["i"].as_u64().unwrap()))
        .collect();
    appends.sort();
    appends.dedup();
    assert_eq!(appends.len(), 2 * EACH, "each once");
    let mut globals: Vec<u64> = events.iter().map(|e| e.global_position).collect();
    globals.sort();
    globals.dedup();
    assert_eq!(globals.len(), 2 * EACH, "global positions unique");
    assert_eq!(counted.load(std::sync::atomic::Ordering::SeqCst), 2 * EACH, "the runner saw each event once");
    common::drop_database(&url).await;
}
