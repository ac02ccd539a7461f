//! Connecting the way the store needs: no Nagle stalls over TCP, SQLite as a real embedded
//! database.
//!
//! - **PostgreSQL and MySQL over TCP**: `TCP_NODELAY` on every pooled connection, including the
//!   ones the pool opens later. sqlx 0.9.0 (the newest release, which SeaORM 2.0 uses) opens its
//!   sockets without it (sqlx issue #4335, fixed upstream but unreleased), and Nagle's algorithm
//!   meeting delayed ACKs stalled mid-size appends (150–400 events) for ~40 ms each. sqlx does not
//!   hand out its socket, so a per-connection hook asks the server for the connection's client
//!   port and sets the option on the process's socket with that local port (`getsockname`,
//!   `setsockopt`). Remove [`nodelay`] once sqlx ships the fix.
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

/// Applies the store's connection settings to options you built: `TCP_NODELAY` on PostgreSQL
/// and MySQL connections, WAL, `synchronous = NORMAL` and a 30 s busy timeout on SQLite.
///
/// sqlx's liveness ping on every checkout stays on PostgreSQL and MySQL (not on SQLite: a file has
/// no server to lose the connection). It costs a round trip per operation (PostgreSQL
/// `append-n1`: 1.05 ms with it, 0.64 ms with `test_before_acquire_if_idle_for(10 s)`), but a
/// pool with connections the server killed or lost in a restart recovers without any query
/// failing. Opt out with `options.test_before_acquire_if_idle_for(…)` where that is worth more.
///
/// It sets the per-connection hook of the PostgreSQL and MySQL pools (sqlx's `after_connect`),
/// replacing one set before through `map_sqlx_postgres_pool_opts` / `map_sqlx_mysql_pool_opts`
/// (and SeaORM's `set_schema_search_path`), and SQLite's options through `map_sqlx_sqlite_opts`
/// and `map_sqlx_sqlite_pool_opts`.
///
/// A PostgreSQL URL with `pooler=transaction` (or sqlx's `statement-cache-capacity=0`) is taken
/// as reaching the server through a transaction-mode pooler: sqlx's statement cache is turned
/// off (through `map_sqlx_postgres_opts`; sqlx logs that it ignores the `pooler` parameter,
/// which [`connect`] avoids), there is no ping on checkout, and `TCP_NODELAY` is set without
/// asking the server.
pub fn configure(mut options: ConnectOptions) -> ConnectOptions {
    #[cfg(feature = "postgres")]
    if let Some(pooler_port) = pooler::port(options.get_url()) {
        options.map_sqlx_postgres_opts(|pg| pg.statement_cache_capacity(0));
        // No ping on checkout: the pooler keeps the server connections (a broken connection to
        // it fails its statement, which the store retries). The server sees the pooler's port,
        // not ours: `TCP_NODELAY` goes on the sockets to the pooler.
        options.map_sqlx_postgres_pool_opts(move |pool| {
            pool.test_before_acquire(false).after_connect(move |_, _| {
                Box::pin(async move {
                    nodelay::set_towards(pooler_port);
                    Ok(())
                })
            })
        });
        return options;
    }
    #[cfg(feature = "postgres")]
    options.map_sqlx_postgres_pool_opts(|pool| {
        pool.after_connect(|conn, _| {
            Box::pin(async move {
                match sea_orm::sqlx::query_scalar::<_, Option<i32>>("SELECT inet_client_port()").fetch_one(&mut *conn).await {
                    Ok(port) => nodelay::set(port.and_then(|p| u16::try_from(p).ok())),
                    // Statements fail with `Error::Pooler` saying what to do; the option waits.
                    Err(error) if statements_mixed_up(&error) => {
                        tracing::warn!(%error, "the server is behind a transaction-mode pooler: add pooler=transaction to the URL");
                    }
                    Err(error) => return Err(error),
                }
                Ok(())
            })
        })
    });
    #[cfg(feature = "mysql")]
    options.map_sqlx_mysql_pool_opts(|pool| {
        pool.after_connect(|conn, _| {
            Box::pin(async move {
                // `HOST` is `address:port` over TCP, `localhost` over a Unix socket.
                let host: String = sea_orm::sqlx::query_scalar(
                    "SELECT HOST FROM information_schema.PROCESSLIST WHERE ID = CONNECTION_ID()",
                )
                .fetch_one(&mut *conn)
                .await?;
                nodelay::set(host.rsplit_once(':').and_then(|(_, port)| port.parse().ok()));
                Ok(())
            })
        })
    });
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

    /// The pooler's port if the PostgreSQL `url` says it goes through a transaction pooler.
    pub fn port(url: &str) -> Option<u16> {
        if !url.starts_with("postgres") {
            return None;
        }
        let url = match strip(url) {
            Some(url) => url,
            None if url.contains("statement-cache-capacity=0") => url.to_owned(),
            None => return None,
        };
        let options: sea_orm::sqlx::postgres::PgConnectOptions = url.parse().ok()?;
        Some(options.get_port())
    }
}

/// `TCP_NODELAY` on the process's TCP socket bound to a local port — until sqlx sets it itself.
#[cfg(any(feature = "postgres", feature = "mysql"))]
pub(crate) mod nodelay {
    /// Sets `TCP_NODELAY` on the process's TCP sockets bound to local `port` — the connection the
    /// server reported (a no-op for `None`: a Unix-socket connection has no Nagle to turn off).
    /// Behind NAT or a proxy the server sees another port and nothing is found; that is logged.
    pub fn set(port: Option<u16>) {
        #[cfg(unix)]
        if let Some(port) = port {
            let sockets = find(port);
            if sockets.is_empty() {
                tracing::debug!(port, "no socket with this local port: TCP_NODELAY not set");
            }
            for fd in sockets {
                on(fd);
            }
        }
        #[cfg(not(unix))]
        let _ = port;
    }

    /// Sets `TCP_NODELAY` on every TCP socket of the process connected to remote `port` (a
    /// pooler's: the server can't tell which of them is the new connection; setting it on the
    /// others again is harmless).
    #[cfg(feature = "postgres")]
    pub fn set_towards(port: u16) {
        #[cfg(unix)]
        for fd in descriptors().filter(|&fd| address(fd, libc::getpeername) == Some(port)) {
            on(fd);
        }
        #[cfg(not(unix))]
        let _ = port;
    }

    /// The descriptors of the process's TCP sockets bound to local `port`.
    #[cfg(unix)]
    fn find(port: u16) -> Vec<libc::c_int> {
        descriptors().filter(|&fd| address(fd, libc::getsockname) == Some(port)).collect()
    }

    /// The process's open descriptors: `/proc/self/fd` where it exists, else the first 4,096.
    #[cfg(unix)]
    fn descriptors() -> impl Iterator<Item = libc::c_int> {
        let listed: Option<Vec<libc::c_int>> = std::fs::read_dir("/proc/self/fd")
            .ok()
            .map(|dir| dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect());
        listed.unwrap_or_else(|| (0..4096).collect()).into_iter()
    }

    /// Sets `TCP_NODELAY` on `fd`.
    #[cfg(unix)]
    fn on(fd: libc::c_int) {
        let on: libc::c_int = 1;
        // SAFETY: a plain setsockopt on a descriptor number; if it was closed meanwhile the call
        // fails with EBADF and changes nothing.
        let done = unsafe {
            libc::setsockopt(
                fd,
                libc::IPPROTO_TCP,
                libc::TCP_NODELAY,
                (&on as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if done != 0 {
            tracing::debug!(fd, "could not set TCP_NODELAY: {}", std::io::Error::last_os_error());
        }
    }

    /// The port of `fd`'s local (`getsockname`) or remote (`getpeername`) address if it is an
    /// IPv4 or IPv6 socket.
    #[cfg(unix)]
    fn address(
        fd: libc::c_int,
        get: unsafe extern "C" fn(libc::c_int, *mut libc::sockaddr, *mut libc::socklen_t) -> libc::c_int,
    ) -> Option<u16> {
        // SAFETY: sockaddr_storage is plain data, large enough for any address the call writes.
        let mut addr: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let mut len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        // SAFETY: getsockname/getpeername write at most `len` bytes into `addr`.
        if unsafe { get(fd, (&mut addr as *mut libc::sockaddr_storage).cast(), &mut len) } != 0 {
            return None;
        }
        // SAFETY: the family says which sockaddr the storage holds.
        unsafe {
            match addr.ss_family as libc::c_int {
                libc::AF_INET => Some(u16::from_be((*(&addr as *const _ as *const libc::sockaddr_in)).sin_port)),
                libc::AF_INET6 => Some(u16::from_be((*(&addr as *const _ as *const libc::sockaddr_in6)).sin6_port)),
                _ => None,
            }
        }
    }
}
