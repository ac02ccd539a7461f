//! Connecting the way the store needs: SQLite as a real embedded database, PostgreSQL behind a
//! transaction-mode pooler.
//!
//! - **SQLite**: WAL (readers never block the writer, nor it them), `synchronous = NORMAL`
//!   (durable at checkpoints, no fsync per commit) and a 30 s busy timeout.
//! - **Behind a transaction-mode pooler** (PgBouncer `pool_mode = transaction`, and the managed
//!   poolers built on it): say so in the URL with `pooler=transaction`
//!   (`postgres://app@pgbouncer:6432/app?pooler=transaction`). The pool then keeps no prepared
//!   statements between transactions (sqlx's statement cache is off: the pooler may hand the next
//!   transaction another server), the store runs each of its statements inside a transaction
//!   (a statement outside one is prepared and executed in two exchanges the pooler may route to
//!   two servers), and the daemon wakes up by polling instead of `LISTEN` (see
//!   [`Daemon::listen_url`](crate::daemon::Daemon::listen_url)). The README lists the PgBouncer
//!   settings this needs.
//!
//! ```no_run
//! # async fn f() -> Result<(), sea_orm::DbErr> {
//! let db = emmett_seaorm::connect("postgres://postgres@127.0.0.1/app").await?;
//!
//! // Or your own pool settings, with the store's applied on top:
//! let mut options = sea_orm::ConnectOptions::new("sqlite://app.db?mode=rwc");
//! options.max_connections(8);
//! let db = sea_orm::Database::connect(emmett_seaorm::configure(options)).await?;
//! # Ok(()) }
//! ```

use sea_orm::{ConnectOptions, Database, DatabaseConnection, DbErr};

/// Connects to `url` with [`configure`]'s settings (`pooler=transaction` in a PostgreSQL URL:
/// through a transaction-mode pooler: see the crate docs, "Behind PgBouncer, and over TLS").
pub async fn connect(url: impl Into<String>) -> Result<DatabaseConnection, DbErr> {
    Database::connect(configure(connect_options(&url.into()))).await
}

/// `ConnectOptions::new(url)`, its `pooler=transaction` (if any) written as sqlx's own
/// `statement-cache-capacity=0`, which [`configure`] reads the same way, so that sqlx does not
/// warn of a parameter it doesn't know. For your own pool settings behind a pooler:
///
/// ```no_run
/// # async fn f() -> Result<(), sea_orm::DbErr> {
/// let mut options = emmett_seaorm::connect_options("postgres://app@pgbouncer:6432/app?pooler=transaction");
/// options.max_connections(32);
/// let db = sea_orm::Database::connect(emmett_seaorm::configure(options)).await?;
/// # Ok(()) }
/// ```
pub fn connect_options(url: &str) -> ConnectOptions {
    #[cfg(feature = "postgres")]
    if let Some(rest) = pooler::strip(url) {
        return ConnectOptions::new(pooler::with_param(&rest, "statement-cache-capacity=0"));
    }
    ConnectOptions::new(url)
}

/// Applies the store's connection settings to options you built: WAL, `synchronous = NORMAL`
/// and a 30 s busy timeout on SQLite; no statement cache and no checkout ping behind a
/// transaction-mode pooler. (sqlx ≥ 0.9.1 sets `TCP_NODELAY` on every TCP connection itself:
/// 0.9.0 did not, and Nagle's algorithm meeting delayed ACKs cost ~40 ms twice in every TLS
/// handshake and once per mid-size append.)
///
/// sqlx's liveness ping on every checkout stays on PostgreSQL and MySQL (not on SQLite: a file has
/// no server to lose the connection). It costs a round trip per operation (PostgreSQL
/// `append-n1`: 1.05 ms with it, 0.64 ms with `test_before_acquire_if_idle_for(10 s)`), but a
/// pool with connections the server killed or lost in a restart recovers without any query
/// failing. Opt out with `options.test_before_acquire_if_idle_for(…)` where that is worth more.
///
/// It sets SQLite's options through `map_sqlx_sqlite_opts` and `map_sqlx_sqlite_pool_opts`.
///
/// A PostgreSQL URL with `pooler=transaction` (or sqlx's `statement-cache-capacity=0`) is taken
/// as reaching the server through a transaction-mode pooler: sqlx's statement cache is turned
/// off (through `map_sqlx_postgres_opts`; sqlx logs that it ignores the `pooler` parameter,
/// which [`connect`] avoids) and there is no ping on checkout.
pub fn configure(mut options: ConnectOptions) -> ConnectOptions {
    #[cfg(feature = "postgres")]
    if pooler::behind(options.get_url()) {
        options.map_sqlx_postgres_opts(|pg| pg.statement_cache_capacity(0));
        // No ping on checkout: the pooler keeps the server connections (a broken connection to
        // it fails its statement, which the store retries).
        options.map_sqlx_postgres_pool_opts(|pool| pool.test_before_acquire(false));
        return options;
    }
    #[cfg(feature = "sqlite")]
    options.map_sqlx_sqlite_opts(|sqlite| {
        use sea_orm::sqlx::sqlite::{SqliteJournalMode, SqliteSynchronous};
        sqlite
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(std::time::Duration::from_secs(30))
    });
    // A file has no server to lose the connection: no liveness ping on checkout.
    #[cfg(feature = "sqlite")]
    options.map_sqlx_sqlite_pool_opts(|pool| pool.test_before_acquire(false));
    options
}

/// Whether `db` reaches PostgreSQL through a transaction-mode pooler (its statement cache is
/// off, as [`configure`] sets it for `pooler=transaction`).
pub(crate) fn behind_pooler(db: &DatabaseConnection) -> bool {
    #[cfg(feature = "postgres")]
    if db.get_database_backend() == sea_orm::DbBackend::Postgres {
        // sqlx has no getter for the capacity; its `Debug` shows it (tested in tests/pooler.rs).
        let options = format!("{:?}", db.get_postgres_connection_pool().connect_options());
        return options.contains("statement_cache_capacity: 0,");
    }
    let _ = db;
    false
}

/// Whether `error` is a transaction pooler's mixing up of prepared statements: one prepared on a
/// server, executed on another (not found there, or found another's of that name). Nothing ran.
#[cfg(feature = "postgres")]
pub(crate) fn statements_mixed_up(error: &sea_orm::sqlx::Error) -> bool {
    error
        .as_database_error()
        .is_some_and(|db| matches!(db.code().as_deref(), Some("26000" | "42P05")) && db.message().contains("\"sqlx_s_"))
}

/// The `pooler=transaction` URL parameter.
#[cfg(feature = "postgres")]
mod pooler {
    /// `url` without `pooler=transaction` if it has it.
    pub fn strip(url: &str) -> Option<String> {
        let (base, query) = url.split_once('?')?;
        let params: Vec<&str> = query.split('&').collect();
        let kept: Vec<&str> = params.iter().copied().filter(|p| *p != "pooler=transaction").collect();
        if kept.len() == params.len() {
            return None;
        }
        Some(if kept.is_empty() { base.to_owned() } else { format!("{base}?{}", kept.join("&")) })
    }

    /// `url` with one more query parameter.
    pub fn with_param(url: &str, param: &str) -> String {
        format!("{url}{}{param}", if url.contains('?') { '&' } else { '?' })
    }

    /// Whether the PostgreSQL `url` says it goes through a transaction pooler.
    pub fn behind(url: &str) -> bool {
        url.starts_with("postgres") && (strip(url).is_some() || url.contains("statement-cache-capacity=0"))
    }
}
