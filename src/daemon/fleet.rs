//! One daemon per store of a [`StoreRouter`]: each store's leases, wake-ups, horizon and read
//! models are its own, and a store whose database is down stops only its tenants.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Mutex, watch};
use tokio::task::{JoinHandle, JoinSet};

use super::{Daemon, DaemonHandle, DaemonStatus, agent};
use crate::error::{Error, Result};
use crate::{EventStore, StoreRouter};

/// The daemons of every store of a [`StoreRouter`], kept running: a daemon that can't start
/// (its database is down) or that stops on its own is started again after a pause (1 s,
/// doubling up to 30 s) while the other stores' daemons go on. Start one per instance: the
/// instances share each store's tenants through its leases.
///
/// ```no_run
/// # fn carts() -> emmett_seaorm::projection::ProjectionRegistry<serde_json::Value> { unimplemented!() }
/// # async fn f(router: emmett_seaorm::StoreRouter) -> emmett_seaorm::Result<()> {
/// use emmett_seaorm::daemon::{Daemon, DaemonFleet};
///
/// // `carts()` builds the registry: each store's daemon gets its own.
/// let fleet = DaemonFleet::start(&router, |store| Daemon::new(store).projection("carts", carts()));
/// for (store, status) in fleet.status().await {
///     println!("{store}: {}", status.map_or_else(|e| e.to_string(), |s| format!("{} leases", s.leases.len())));
/// }
/// fleet.stop().await?;
/// # Ok(()) }
/// ```
pub struct DaemonFleet {
    members: Members,
    stop: watch::Sender<bool>,
    /// Starts a supervisor for each store the router has (now, and added later); it owns them.
    watcher: Option<JoinHandle<()>>,
}

/// Each store's daemon, by store name.
type Members = Arc<std::sync::Mutex<BTreeMap<String, Arc<Mutex<Member>>>>>;

/// What builds a store's daemon.
type DaemonOf = Arc<dyn Fn(EventStore) -> Daemon + Send + Sync>;

/// Dropped, the fleet aborts its daemons as a crash would (their leases are free once they
/// expire): [`stop`](DaemonFleet::stop) it to hand the work over at once.
impl Drop for DaemonFleet {
    fn drop(&mut self) {
        if let Some(watcher) = &self.watcher {
            watcher.abort();
        }
    }
}

/// What is known of one store's daemon.
enum Member {
    /// Not running: why.
    Down(String),
    Running(DaemonHandle),
}

/// The longest pause before a store's daemon is started again.
const MAX_PAUSE: Duration = Duration::from_secs(30);

/// How often the fleet looks for stores added to the router.
const NEW_STORES: Duration = Duration::from_secs(1);

impl DaemonFleet {
    /// Starts `daemon(store)` for every store of `router` (each supervised in the background),
    /// and for each store [added](StoreRouter::add_store) to it later, within a second.
    pub fn start(router: &StoreRouter, daemon: impl Fn(EventStore) -> Daemon + Send + Sync + 'static) -> DaemonFleet {
        let (stop, stopped) = watch::channel(false);
        let members = Members::default();
        let mut supervisors = JoinSet::new();
        let daemon: DaemonOf = Arc::new(daemon);
        supervise_new(router, &daemon, &members, &mut supervisors, &stopped);
        let watcher = tokio::spawn(watch_stores(router.clone(), daemon, Arc::clone(&members), supervisors, stopped));
        DaemonFleet { members, stop, watcher: Some(watcher) }
    }

    /// Each store's daemon status, by store name: [`Error::StoreDown`] for a store whose
    /// daemon is not running, the database's error for one that does not answer.
    pub async fn status(&self) -> BTreeMap<String, Result<DaemonStatus>> {
        let members = self.members.lock().expect("not poisoned").clone();
        let mut statuses = BTreeMap::new();
        for (name, member) in members {
            let status = match &*member.lock().await {
                Member::Running(handle) => handle.status().await,
                Member::Down(reason) => Err(Error::StoreDown { store: name.clone(), reason: reason.clone() }),
            };
            statuses.insert(name, status);
        }
        statuses
    }

    /// Stops every daemon gracefully; the first error any of them stopped on.
    pub async fn stop(mut self) -> Result<()> {
        let _ = self.stop.send(true);
        if let Some(watcher) = self.watcher.take() {
            watcher.await.ok();
        }
        let members = std::mem::take(&mut *self.members.lock().expect("not poisoned"));
        let mut outcome = Ok(());
        for member in members.into_values() {
            let member = std::mem::replace(&mut *member.lock().await, Member::Down("stopped".into()));
            if let Member::Running(handle) = member {
                let stopped = handle.stop().await;
                if outcome.is_ok() {
                    outcome = stopped;
                }
            }
        }
        outcome
    }
}

/// Supervises each store of `router` that has no supervisor yet.
fn supervise_new(
    router: &StoreRouter,
    daemon: &DaemonOf,
    members: &Members,
    supervisors: &mut JoinSet<()>,
    stopped: &watch::Receiver<bool>,
) {
    let mut members = members.lock().expect("not poisoned");
    for (name, _) in router.stores() {
        if !members.contains_key(&name) {
            let member = Arc::new(Mutex::new(Member::Down("starting".into())));
            members.insert(name.clone(), Arc::clone(&member));
            let (router, daemon, stopped) = (router.clone(), Arc::clone(daemon), stopped.clone());
            supervisors.spawn(supervise(name, router, daemon, member, stopped));
        }
    }
}

/// Looks for new stores until `stopped`, then waits for the supervisors to end.
async fn watch_stores(
    router: StoreRouter,
    daemon: DaemonOf,
    members: Members,
    mut supervisors: JoinSet<()>,
    mut stopped: watch::Receiver<bool>,
) {
    while !*stopped.borrow() {
        tokio::select! {
            _ = stopped.changed() => break,
            _ = tokio::time::sleep(NEW_STORES) => {}
        }
        supervise_new(&router, &daemon, &members, &mut supervisors, &stopped);
    }
    supervisors.join_all().await;
}

/// Keeps the daemon of the store named `name` running until `stopped` (the store as the router
/// has it at each start).
async fn supervise(
    name: String,
    router: StoreRouter,
    daemon: DaemonOf,
    member: Arc<Mutex<Member>>,
    mut stopped: watch::Receiver<bool>,
) {
    let mut failures = 0;
    while !*stopped.borrow() {
        let Some(store) = router.store_named(&name) else { return };
        match daemon(store).start().await {
            Ok(handle) => {
                failures = 0;
                *member.lock().await = Member::Running(handle);
                // Watched once a second: a daemon that ended on its own is started again.
                loop {
                    tokio::select! {
                        _ = stopped.changed() => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                    let mut state = member.lock().await;
                    if matches!(&*state, Member::Running(handle) if !handle.is_running()) {
                        let Member::Running(handle) = std::mem::replace(&mut *state, Member::Down(String::new()))
                        else {
                            unreachable!("matched above")
                        };
                        let why = handle.stop().await.err().map_or("it stopped".into(), |e| e.to_string());
                        tracing::warn!(store = name, %why, "a store's projection daemon stopped; starting it again");
                        *state = Member::Down(why);
                        break;
                    }
                }
            }
            Err(error) => {
                tracing::warn!(store = name, %error, "a store's projection daemon could not start");
                *member.lock().await = Member::Down(error.to_string());
            }
        }
        failures += 1;
        tokio::select! {
            _ = stopped.changed() => return,
            _ = tokio::time::sleep(agent::backoff(failures, Duration::from_secs(1), MAX_PAUSE)) => {}
        }
    }
}
