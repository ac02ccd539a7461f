//! What wakes the daemon besides its poll timer: appends through the same store (in-process),
//! and on PostgreSQL its presence connection, which listens for appends and lease hand-overs
//! and carries the instance's name so the others know it is alive.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
#[cfg(feature = "postgres")]
use std::{sync::atomic::Ordering, time::Duration};

use sea_orm::DatabaseConnection;
use tokio::sync::watch;
use tokio::task::JoinHandle;

#[cfg(feature = "postgres")]
use crate::backend::{APPENDS_CHANNEL, LEASES_CHANNEL, PRESENCE_PREFIX};

/// The presence connection (PostgreSQL only): `up` while it is connected. `appended` changes
/// when an append notifies, `leases` when an instance hands leases over; both change after a
/// reconnect (notifications may have been missed meanwhile).
pub(super) struct Presence {
    pub up: Arc<AtomicBool>,
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
    /// `appends`); elsewhere `up` stays false.
    pub async fn start(db: &DatabaseConnection, owner: &str, appends: bool) -> Self {
        let up = Arc::new(AtomicBool::new(false));
        let (appended_tx, appended) = watch::channel(0u64);
        let (leases_tx, leases) = watch::channel(0u64);
        let wake = Wake { appended: appended_tx, leases: leases_tx };
        #[cfg(feature = "postgres")]
        if db.get_database_backend() == sea_orm::DbBackend::Postgres {
            let pool = db.get_postgres_connection_pool();
            let options =
                pool.connect_options().as_ref().clone().application_name(&format!("{PRESENCE_PREFIX}{owner}"));
            let ready = Arc::new(tokio::sync::Notify::new());
            let task = tokio::spawn(listen(options, appends, Arc::clone(&up), wake, Arc::clone(&ready)));
            // Let the first connection come up (briefly) so the instance starts alive.
            let _ = tokio::time::timeout(Duration::from_secs(2), ready.notified()).await;
            return Self { up, appended, leases, task: Some(task), _idle: None };
        }
        let _ = (db, owner, appends);
        Self { up, appended, leases, task: None, _idle: Some(wake) }
    }
}

/// Keeps the presence connection open and listening, reconnecting with backoff.
#[cfg(feature = "postgres")]
async fn listen(
    options: sea_orm::sqlx::postgres::PgConnectOptions,
    appends: bool,
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
            Ok::<_, sea_orm::sqlx::Error>(listener)
        };
        match listener.await {
            Ok(mut listener) => {
                up.store(true, Ordering::SeqCst);
                ready.notify_one();
                pause = Duration::from_millis(100);
                wake.all();
                loop {
                    match listener.try_recv().await {
                        Ok(Some(n)) if n.channel() == LEASES_CHANNEL => wake.leases.send_modify(|n| *n += 1),
                        Ok(Some(_)) => wake.appended.send_modify(|n| *n += 1),
                        // Lost and reconnected: what was sent meanwhile is lost; catch up.
                        Ok(None) => wake.all(),
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
