//! What wakes the daemon besides its poll timer: appends through the same store (in-process),
//! and on PostgreSQL its presence connection, which listens for appends and lease hand-overs
//! and carries the instance's name and a deadline, renewed by the daemon's loop, so the others
//! know it is alive (a crashed instance's connection closes; a hung one's deadline passes).

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
#[cfg(feature = "postgres")]
use std::sync::atomic::Ordering;
use std::time::Duration;

use sea_orm::ConnectionTrait;
use tokio::sync::watch;
use tokio::task::JoinHandle;

#[cfg(feature = "postgres")]
use crate::backend::{APPENDS_CHANNEL, LEASES_CHANNEL, PRESENCE_PREFIX};
use crate::conn::Conn;

/// How a daemon learns of appends made by other processes ([`DaemonStatus::wake_ups`](super::DaemonStatus::wake_ups)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WakeUps {
    /// PostgreSQL `LISTEN` on a connection of its own: to the server, or to the
    /// [`listen_url`](super::Daemon::listen_url) behind a transaction pooler.
    Listening,
    /// Polling, every [`poll_interval`](super::Daemon::poll_interval) while idle: on SQLite and
    /// MySQL, with notifications off, or behind a transaction pooler without a `listen_url`
    /// (which cannot carry `LISTEN`). Appends through the daemon's own store wake it at once.
    Polling,
}

impl WakeUps {
    /// The wake-ups of a daemon on `conn`.
    pub(super) fn of(conn: &Conn, listen_url: Option<&str>, notifications: bool) -> Self {
        if notifications && has_presence(conn, listen_url) { WakeUps::Listening } else { WakeUps::Polling }
    }
}

/// Whether a daemon on `conn` has a presence connection: on PostgreSQL, to `listen_url`, or
/// like the pool's connections unless those go through a transaction pooler.
fn has_presence(conn: &Conn, listen_url: Option<&str>) -> bool {
    conn.get_database_backend() == sea_orm::DbBackend::Postgres && (listen_url.is_some() || !conn.pooled())
}

/// The presence connection (PostgreSQL only): `up` while it is connected. `appended` changes
/// when an append notifies, `leases` when an instance hands leases over; both change after a
/// reconnect (notifications may have been missed meanwhile).
pub(super) struct Presence {
    pub up: Arc<AtomicBool>,
    /// The lease TTL to renew the deadline for, sent by the daemon's loop while it runs.
    renew: watch::Sender<Duration>,
    pub appended: watch::Receiver<u64>,
    pub leases: watch::Receiver<u64>,
    task: Option<JoinHandle<()>>,
    /// Kept where no task holds them, so the receivers wait instead of reporting a closed channel.
    _idle: Option<Wake>,
}

/// The senders behind [`Presence`]'s receivers (only the PostgreSQL listener sends).
#[cfg_attr(not(feature = "postgres"), allow(dead_code))]
struct Wake {
    appended: watch::Sender<u64>,
    leases: watch::Sender<u64>,
}

#[cfg_attr(not(feature = "postgres"), allow(dead_code))]
impl Wake {
    fn all(&self) {
        self.appended.send_modify(|n| *n += 1);
        self.leases.send_modify(|n| *n += 1);
    }
}

impl Drop for Presence {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

impl Presence {
    /// Opens the presence connection where the backend has one (listening for appends if
    /// `appends`): to `listen_url` if given, else like the pool's connections unless those go
    /// through a transaction pooler. Without one, `up` stays false.
    pub async fn start(conn: &Conn, listen_url: Option<&str>, owner: &str, appends: bool, ttl: Duration) -> Self {
        let up = Arc::new(AtomicBool::new(false));
        let (renew, renewals) = watch::channel(ttl);
        let (appended_tx, appended) = watch::channel(0u64);
        let (leases_tx, leases) = watch::channel(0u64);
        let wake = Wake { appended: appended_tx, leases: leases_tx };
        #[cfg(feature = "postgres")]
        if let Some(options) = presence_options(conn, listen_url) {
            let options = options.application_name(&format!("{PRESENCE_PREFIX}{owner}"));
            let ready = Arc::new(tokio::sync::Notify::new());
            let name = format!("{PRESENCE_PREFIX}{owner}");
            let task =
                tokio::spawn(listen(options, name, appends, renewals, Arc::clone(&up), wake, Arc::clone(&ready)));
            // Let the first connection come up (briefly) so the instance starts alive.
            let _ = tokio::time::timeout(Duration::from_secs(2), ready.notified()).await;
            return Self { up, renew, appended, leases, task: Some(task), _idle: None };
        }
        let _ = (conn, listen_url, owner, appends, renewals);
        Self { up, renew, appended, leases, task: None, _idle: Some(wake) }
    }

    /// Renews the presence connection's deadline to `ttl` from now (done by the daemon's loop,
    /// so an instance whose loop hangs stops being alive).
    pub fn renew(&self, ttl: Duration) {
        self.renew.send_modify(|t| *t = ttl);
    }
}

/// The connect options of a presence connection on `conn`: `listen_url`'s, or the pool's unless
/// it goes through a transaction pooler (`None` then, and off PostgreSQL).
#[cfg(feature = "postgres")]
fn presence_options(conn: &Conn, listen_url: Option<&str>) -> Option<sea_orm::sqlx::postgres::PgConnectOptions> {
    if !has_presence(conn, listen_url) {
        return None;
    }
    match listen_url {
        // (`Daemon::start` refused a URL that doesn't parse.)
        Some(url) => url.parse().ok(),
        None => Some(conn.database()?.get_postgres_connection_pool().connect_options().as_ref().clone()),
    }
}

/// Keeps the presence connection open and listening, reconnecting with backoff.
#[cfg(feature = "postgres")]
async fn listen(
    options: sea_orm::sqlx::postgres::PgConnectOptions,
    name: String,
    appends: bool,
    mut renewals: watch::Receiver<Duration>,
    up: Arc<AtomicBool>,
    wake: Wake,
    ready: Arc<tokio::sync::Notify>,
) {
    use sea_orm::sqlx::postgres::{PgListener, PgPoolOptions};
    let mut pause = Duration::from_millis(100);
    loop {
        let pool = PgPoolOptions::new().max_connections(1).min_connections(0).connect_lazy_with(options.clone());
        let listener = async {
            let mut listener = PgListener::connect_with(&pool).await?;
            listener.listen(LEASES_CHANNEL).await?;
            if appends {
                listener.listen(APPENDS_CHANNEL).await?;
            }
            let ttl = *renewals.borrow_and_update();
            renew(&mut listener, &name, ttl).await?;
            Ok::<_, sea_orm::sqlx::Error>(listener)
        };
        match listener.await {
            Ok(mut listener) => {
                up.store(true, Ordering::SeqCst);
                ready.notify_one();
                pause = Duration::from_millis(100);
                wake.all();
                loop {
                    // (`try_recv` is cancel-safe: a renewal between notifications loses none.)
                    let received = tokio::select! {
                        received = listener.try_recv() => received,
                        Ok(()) = renewals.changed() => {
                            let ttl = *renewals.borrow_and_update();
                            match renew(&mut listener, &name, ttl).await {
                                Ok(()) => continue,
                                Err(error) => Err(error),
                            }
                        }
                    };
                    match received {
                        Ok(Some(n)) if n.channel() == LEASES_CHANNEL => wake.leases.send_modify(|n| *n += 1),
                        Ok(Some(_)) => wake.appended.send_modify(|n| *n += 1),
                        // Lost: a new connection has a new name; make it again.
                        Ok(None) => break,
                        Err(error) => {
                            tracing::warn!(%error, "daemon presence connection lost; reconnecting");
                            break;
                        }
                    }
                }
            }
            Err(error) => tracing::warn!(%error, "daemon presence connection failed; retrying"),
        }
        up.store(false, Ordering::SeqCst);
        wake.all();
        tokio::time::sleep(pause).await;
        pause = Ord::min(pause * 2, Duration::from_secs(5));
    }
}

/// Names the presence connection with its deadline, `ttl` from now.
#[cfg(feature = "postgres")]
async fn renew(
    listener: &mut sea_orm::sqlx::postgres::PgListener,
    name: &str,
    ttl: Duration,
) -> Result<(), sea_orm::sqlx::Error> {
    let query = sea_orm::sqlx::query(crate::backend::presence_renewal()).bind(name).bind(ttl.as_millis() as i64);
    query.execute(listener).await.map(|_| ())
}
