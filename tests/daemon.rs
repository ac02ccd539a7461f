//! Conformance suite of the projection daemon, on every backend: tenants found while running,
//! restarts, several instances sharing and taking over work, failures parked per tenant.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{Ev, TestDb, balances};
use emmett_seaorm::daemon::{Daemon, DaemonHandle};
use emmett_seaorm::projection::{EventHandler, ProjectionContext, ProjectionRegistry};
use emmett_seaorm::{AppendOptions, EventStore, RecordedEvent};
use sea_orm::sea_query::{Alias, ColumnDef, Index, Query, Table};
use sea_orm::{ConnectionTrait, DatabaseConnection};

/// Records every event it is given as a row keyed by its global position: projecting an event
/// twice fails the batch (a duplicate key), so the rows are "exactly once" by construction.
/// Fails on a deposit of 13 while `poisoned` is set.
struct Recorder {
    poisoned: Arc<AtomicBool>,
}

#[async_trait::async_trait]
impl EventHandler<Ev> for Recorder {
    async fn handle(
        &self,
        ctx: &ProjectionContext<'_>,
        e: &RecordedEvent<Ev>,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        if matches!(e.event, Ev::Deposited { amount: 13 }) && self.poisoned.load(Ordering::SeqCst) {
            return Err("deposits of 13 are not supported yet".into());
        }
        let mut insert = Query::insert();
        insert
            .into_table(Alias::new("seen"))
            .columns([Alias::new("global_position"), Alias::new("tenant")])
            .values_panic([(e.global_position as i64).into(), e.partition.clone().into()]);
        ctx.db().execute(&insert).await?;
        Ok(())
    }
}

async fn create_seen(db: &DatabaseConnection) {
    let mut create = Table::create();
    create
        .table(Alias::new("seen"))
        .col(ColumnDef::new(Alias::new("global_position")).big_integer().not_null())
        .col(ColumnDef::new(Alias::new("tenant")).string_len(255).not_null())
        .primary_key(Index::create().col(Alias::new("global_position")));
    db.execute(&create).await.expect("create seen");
}

fn recorder(poisoned: Arc<AtomicBool>) -> ProjectionRegistry<Ev> {
    ProjectionRegistry::new().on(["Opened", "Deposited", "Closed"], Recorder { poisoned })
}

/// How long a crashed instance's work may stay unowned: the lease TTL of [`daemon`] (3 s), one
/// lease round (0.5 s without a presence connection) and slack for a machine running the whole
/// suite at once (measured here: 2.4–3.7 s).
const TAKEOVER_BOUND: Duration = Duration::from_secs(3 + 3);

/// A daemon with short timings, so the tests run in seconds.
fn daemon(store: EventStore, poisoned: Arc<AtomicBool>) -> Daemon {
    Daemon::new(store)
        .projection("recorder", recorder(poisoned))
        .lease_ttl(Duration::from_secs(3))
        .renew_every(Duration::from_millis(500))
        .poll_interval(Duration::from_millis(5), Duration::from_millis(300))
        .backoff(Duration::from_millis(200), Duration::from_secs(1))
}

async fn deposit(store: &EventStore, tenant: &str, account: &str, amount: i64) -> u64 {
    store
        .append_to_stream(account, [Ev::Deposited { amount }], AppendOptions::default().partition(tenant))
        .await
        .expect("append")
        .last_event_global_position
}

/// The global positions the recorder saw, sorted.
async fn seen(db: &DatabaseConnection) -> Vec<i64> {
    positions(db, "seen").await
}

/// Every global position the store holds, sorted.
async fn stored(db: &DatabaseConnection) -> Vec<i64> {
    positions(db, "messages").await
}

/// The `global_position` column of `table`, sorted.
async fn positions(db: &DatabaseConnection, table: &str) -> Vec<i64> {
    let select = Query::select().column(Alias::new("global_position")).from(Alias::new(table)).to_owned();
    let rows = db.query_all(&select).await.unwrap_or_else(|e| panic!("read {table}: {e}"));
    let mut positions: Vec<i64> = rows.iter().map(|r| r.try_get_by_index(0).unwrap()).collect();
    positions.sort();
    positions
}

async fn caught_up(daemon: &DaemonHandle, position: u64, within: Duration) {
    tokio::time::timeout(within, daemon.caught_up(position))
        .await
        .unwrap_or_else(|_| panic!("not caught up to {position} within {within:?}"))
        .expect("caught_up");
}

async fn projects_tenants_found_while_running_and_resumes_after_restart(db: TestDb) {
    create_seen(&db.db).await;
    let store = db.store();
    deposit(&store, "t1", "a", 1).await;
    deposit(&store, "t2", "b", 2).await;
    let first = daemon(store.clone(), Arc::default()).start().await.expect("start");
    let last = deposit(&store, "t1", "a", 3).await;
    caught_up(&first, last, Duration::from_secs(10)).await;
    assert_eq!(seen(&db.db).await, stored(&db.db).await);

    // A tenant whose first event arrives while the daemon runs, appended from another pool
    // (no in-process wake-up): found by polling.
    let other = EventStore::new(db.second_pool().await);
    let last = deposit(&other, "t3", "c", 4).await;
    caught_up(&first, last, Duration::from_secs(5)).await;
    assert_eq!(seen(&db.db).await, stored(&db.db).await);
    let status = first.status().await.expect("status");
    let tenants: BTreeSet<&str> = status.leases.iter().map(|l| l.tenant.as_str()).collect();
    assert_eq!(tenants, BTreeSet::from(["t1", "t2", "t3"]));
    assert!(status.leases.iter().all(|l| l.lag_events == 0 && l.checkpoint == l.head), "{status:?}");
    assert_eq!(status.held(), 3);
    // Idle, it rests: the poll interval backs off to its maximum (300 ms here).
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let before = first.status().await.expect("status").cycles;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let idle_cycles = first.status().await.expect("status").cycles - before;
    assert!((5..=20).contains(&idle_cycles), "{idle_cycles} cycles in 3 s of idling");
    first.stop().await.expect("graceful stop");

    // Written while no daemon runs; a new one resumes from the checkpoints, projecting each
    // event once (a second projection of any event would fail on the recorder's key).
    for i in 0..20 {
        deposit(&store, ["t1", "t2", "t4"][i % 3], "d", 10 + i as i64).await;
    }
    let second = daemon(store.clone(), Arc::default()).start().await.expect("restart");
    let last = deposit(&store, "t2", "b", 99).await;
    caught_up(&second, last, Duration::from_secs(10)).await;
    assert_eq!(seen(&db.db).await, stored(&db.db).await);
    let status = second.status().await.expect("status");
    assert!(status.leases.iter().all(|l| l.failures == 0 && l.last_error.is_none()), "{status:?}");
    second.stop().await.expect("graceful stop");
}

async fn instances_split_tenants_and_take_over_a_crashed_ones_work(db: TestDb) {
    create_seen(&db.db).await;
    let tenants: Vec<String> = (0..12).map(|i| format!("tenant-{i:02}")).collect();
    let store = db.store();
    for t in &tenants {
        deposit(&store, t, "seed", 1).await;
    }
    // Three instances, each on its own pool, as three processes would be.
    let mut instances = Vec::new();
    for _ in 0..3 {
        let store = EventStore::new(db.second_pool().await);
        instances.push(daemon(store, Arc::default()).start().await.expect("start"));
    }
    // Writers keep appending to every tenant meanwhile.
    let stop_writing = Arc::new(AtomicBool::new(false));
    let writer = {
        let (store, tenants, stop) =
            (EventStore::new(db.second_pool().await), tenants.clone(), Arc::clone(&stop_writing));
        tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(Ordering::SeqCst) {
                deposit(&store, &tenants[i % tenants.len()], &format!("acc-{}", i % 5), 2).await;
                i += 1;
            }
        })
    };
    // The work spreads: the projection's 64 segments, 21 or 22 each.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = instances[0].status().await.expect("status");
        let counts: Vec<usize> =
            instances.iter().map(|d| status.segments.get(d.owner()).copied().unwrap_or(0)).collect();
        if status.leases.len() == 12
            && counts.iter().all(|&c| (21..=22).contains(&c))
            && counts.iter().sum::<usize>() == 64
        {
            break;
        }
        assert!(Instant::now() < deadline, "work not spread within 10 s: {counts:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // One instance crashes (its task is aborted: no lease given back); the others take its
    // tenants over once its leases expire (TTL 3 s here).
    let crashed = instances.remove(1);
    let crashed_owner = crashed.owner().to_owned();
    drop(crashed);
    let started = Instant::now();
    loop {
        let status = instances[0].status().await.expect("status");
        if status.leases.iter().all(|l| l.owner.as_deref().is_some_and(|o| o != crashed_owner)) {
            break;
        }
        assert!(started.elapsed() < TAKEOVER_BOUND, "crashed instance's leases not taken over: {status:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop_writing.store(true, Ordering::SeqCst);
    writer.await.expect("writer");
    let last = *stored(&db.db).await.last().unwrap() as u64;
    caught_up(&instances[0], last, Duration::from_secs(20)).await;
    assert_eq!(seen(&db.db).await, stored(&db.db).await, "every event projected exactly once");
    for d in instances {
        d.stop().await.expect("stop");
    }
}

async fn a_failing_tenant_is_parked_and_resumes_when_fixed(db: TestDb) {
    create_seen(&db.db).await;
    let store = db.store();
    let poisoned = Arc::new(AtomicBool::new(true));
    deposit(&store, "good", "a", 1).await;
    let poison = deposit(&store, "bad", "b", 13).await;
    deposit(&store, "bad", "b", 2).await;
    let daemon = daemon(store.clone(), Arc::clone(&poisoned)).start().await.expect("start");
    // Other tenants go on.
    let last = deposit(&store, "good", "a", 5).await;
    caught_up_tenant(&daemon, "good", last).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let parked = loop {
        let status = daemon.status().await.expect("status");
        let bad = status.get("recorder", "bad").expect("bad tenant").clone();
        if bad.failures >= 2 {
            break bad;
        }
        assert!(Instant::now() < deadline, "bad tenant not parked: {status:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let (error, position) = parked.last_error.clone().expect("error recorded");
    assert!(error.contains("deposits of 13"), "{error}");
    assert_eq!(position, poison, "the error names the failing event's global position");
    assert!(parked.checkpoint < poison, "the checkpoint stays before the event: {parked:?}");
    assert!(parked.lag_events >= 2);
    // Fixed: it resumes after its backoff (at most 1 s here) and the record is cleared.
    poisoned.store(false, Ordering::SeqCst);
    let last = deposit(&store, "bad", "b", 3).await;
    caught_up(&daemon, last, Duration::from_secs(10)).await;
    assert_eq!(seen(&db.db).await, stored(&db.db).await);
    let bad = daemon.status().await.expect("status").get("recorder", "bad").cloned().expect("bad");
    assert_eq!((bad.failures, bad.last_error), (0, None));
    daemon.stop().await.expect("stop");
}

/// Counts the recorder's calls for events of tenants other than `zz-bad`, rolled back or not.
struct Counting {
    recorder: Recorder,
    calls: Arc<AtomicUsize>,
}

#[async_trait::async_trait]
impl EventHandler<Ev> for Counting {
    async fn handle(
        &self,
        ctx: &ProjectionContext<'_>,
        e: &RecordedEvent<Ev>,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        if e.partition != "zz-bad" {
            self.calls.fetch_add(1, Ordering::SeqCst);
        }
        self.recorder.handle(ctx, e).await
    }
}

/// A tenant failing again and again among 300 busy ones (named to be applied last in a group):
/// once it has failed, its retries run alone, so no other tenant's batch is rolled back and run again with it (each healthy event
/// reaches the handler exactly once), and the others keep up.
async fn a_failing_tenant_among_many_runs_alone(db: TestDb) {
    create_seen(&db.db).await;
    let store = db.store();
    let calls = Arc::new(AtomicUsize::new(0));
    let recorder = Recorder { poisoned: Arc::new(AtomicBool::new(true)) };
    let registry = ProjectionRegistry::new().on(["Deposited"], Counting { recorder, calls: Arc::clone(&calls) });
    deposit(&store, "zz-bad", "b", 13).await;
    let daemon = Daemon::new(store.clone())
        .projection("recorder", registry)
        .poll_interval(Duration::from_millis(5), Duration::from_millis(100))
        .backoff(Duration::from_millis(20), Duration::from_millis(40))
        .start()
        .await
        .expect("start");
    let deadline = Instant::now() + Duration::from_secs(10);
    while daemon.status().await.expect("status").get("recorder", "zz-bad").is_none_or(|l| l.failures == 0) {
        assert!(Instant::now() < deadline, "the bad tenant never failed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let tenants: Vec<String> = (0..300).map(|i| format!("tenant-{i:03}")).collect();
    let mut healthy = 0;
    for round in 0..4 {
        for chunk in tenants.chunks(25) {
            futures::future::join_all(chunk.iter().map(|t| deposit(&store, t, "a", round))).await;
            healthy += chunk.len();
        }
        tokio::time::sleep(Duration::from_millis(60)).await; // a retry of the bad tenant or two
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while seen(&db.db).await.len() < healthy {
        assert!(Instant::now() < deadline, "healthy tenants not projected");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let bad = daemon.status().await.expect("status").get("recorder", "zz-bad").cloned().expect("zz-bad");
    assert!(bad.failures >= 3, "the bad tenant kept failing: {bad:?}");
    assert_eq!(calls.load(Ordering::SeqCst), healthy, "a healthy tenant's events were handled again");
    daemon.stop().await.expect("stop");
}

/// Waits until `tenant`'s recorder rows reach `position`.
async fn caught_up_tenant(daemon: &DaemonHandle, tenant: &str, position: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while daemon.status().await.expect("status").get("recorder", tenant).is_none_or(|l| l.checkpoint < position) {
        assert!(Instant::now() < deadline, "tenant {tenant} not projected to {position}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn a_graceful_stop_hands_work_over_at_once(db: TestDb) {
    create_seen(&db.db).await;
    let store = db.store();
    for t in ["a", "b", "c", "d"] {
        deposit(&store, t, "x", 1).await;
    }
    let first = daemon(EventStore::new(db.second_pool().await), Arc::default()).start().await.expect("start");
    let last = *stored(&db.db).await.last().unwrap() as u64;
    caught_up(&first, last, Duration::from_secs(10)).await;
    // A second instance with the default timings: the hand-over notice wakes it (PostgreSQL), or
    // its next lease round finds the free leases.
    let second = Daemon::new(EventStore::new(db.second_pool().await))
        .projection("recorder", recorder(Arc::default()))
        .start()
        .await
        .expect("start");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    first.stop().await.expect("stop");
    let stopped = Instant::now();
    loop {
        let status = second.status().await.expect("status");
        if status.held() == 4 {
            break;
        }
        assert!(stopped.elapsed() < Duration::from_secs(1), "not taken over within 1 s: {status:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let last = deposit(&store, "c", "x", 7).await;
    caught_up(&second, last, Duration::from_secs(5)).await;
    assert_eq!(seen(&db.db).await, stored(&db.db).await);
    second.stop().await.expect("stop");
}

async fn a_killed_process_tenants_are_taken_over(db: TestDb) {
    create_seen(&db.db).await;
    let store = db.store();
    let (mut child, here, tenants) = sharing_with_a_child(&db, &store, "k", 24).await;
    child.0.kill().expect("SIGKILL the child");
    child.0.wait().unwrap();
    let killed = Instant::now();
    let mut last = 0;
    for t in &tenants {
        last = deposit(&store, t, "x", 2).await;
    }
    caught_up(&here, last, TAKEOVER_BOUND).await;
    assert!(killed.elapsed() <= TAKEOVER_BOUND, "taken over after {:?}", killed.elapsed());
    assert_eq!(here.status().await.unwrap().held(), tenants.len());
    assert_eq!(seen(&db.db).await, stored(&db.db).await, "every event projected exactly once");
    here.stop().await.expect("stop");
}

/// `a_killed_process_tenants_are_taken_over` at scale and under load: 600 tenants shared with
/// another process, which is SIGKILLed while appends to all of them go on (its batches cut off
/// anywhere). Every tenant resumes here within the TTL and a second (plus slack for a loaded
/// machine), and every event is projected exactly once.
async fn a_process_killed_under_load_over_many_tenants_loses_nothing(db: TestDb) {
    create_seen(&db.db).await;
    let store = db.store();
    let (mut child, here, tenants) = sharing_with_a_child(&db, &store, "m", 600).await;
    let writing = Arc::new(AtomicBool::new(true));
    let writer = deposits_until_stopped(&store, &tenants, &writing);
    tokio::time::sleep(Duration::from_millis(300)).await;
    child.0.kill().expect("SIGKILL the child");
    child.0.wait().unwrap();
    let killed = Instant::now();
    loop {
        let status = here.status().await.expect("status");
        if status.leases.iter().all(|l| l.owner.as_deref() == Some(here.owner())) {
            break;
        }
        assert!(killed.elapsed() < TAKEOVER_BOUND, "not taken over: {:?}", status.segments);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!("taken over {:?} after SIGKILL", killed.elapsed());
    tokio::time::sleep(Duration::from_millis(500)).await;
    writing.store(false, Ordering::SeqCst);
    writer.await.unwrap();
    let last = *stored(&db.db).await.last().unwrap() as u64;
    caught_up(&here, last, Duration::from_secs(30)).await;
    assert_eq!(seen(&db.db).await, stored(&db.db).await, "every event projected exactly once");
    here.stop().await.expect("stop");
}

/// A paused instance (SIGSTOP: a stand-in for a handler stuck on an external call or a VM
/// pause) keeps its connections, presence included, but stops renewing: its tenants are taken
/// over within the TTL and a second, and after SIGCONT, under load, its late batches are
/// refused (every event projected exactly once, nothing parked by a duplicate).
#[cfg(any(feature = "postgres", feature = "mysql"))]
async fn a_paused_instance_tenants_are_taken_over_and_its_late_batches_refused(db: TestDb) {
    create_seen(&db.db).await;
    let store = db.store();
    let (child, here, tenants) = sharing_with_a_child(&db, &store, "p", 24).await;
    // On PostgreSQL under load, so the child is likely paused in the middle of a batch: the
    // server ends its transaction after a TTL of silence, and its locks go with it. MySQL has
    // no such timeout: a batch paused mid-way keeps its tenants' rows locked until it resumes
    // (claims skip them, so the others are taken over): the child is paused between batches.
    let mid_batch = db.db.get_database_backend() == sea_orm::DbBackend::Postgres;
    let writing = Arc::new(AtomicBool::new(true));
    let writer = mid_batch.then(|| deposits_until_stopped(&store, &tenants, &writing));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pid = child.0.id() as i32;
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
    let paused = Instant::now();
    loop {
        let status = here.status().await.expect("status");
        if status.leases.iter().all(|l| l.owner.as_deref() == Some(here.owner())) {
            break;
        }
        // The TTL (3 s), a lease round (0.3 s) and slack for a loaded machine.
        assert!(paused.elapsed() < Duration::from_secs(3 + 2), "not taken over: {status:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!("taken over {:?} after SIGSTOP", paused.elapsed());
    // Resumed under load.
    let writer = writer.unwrap_or_else(|| deposits_until_stopped(&store, &tenants, &writing));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(unsafe { libc::kill(pid, libc::SIGCONT) }, 0);
    tokio::time::sleep(Duration::from_secs(2)).await;
    writing.store(false, Ordering::SeqCst);
    writer.await.unwrap();
    let last = *stored(&db.db).await.last().unwrap() as u64;
    caught_up(&here, last, Duration::from_secs(20)).await;
    assert_eq!(seen(&db.db).await, stored(&db.db).await, "every event projected exactly once");
    let status = here.status().await.expect("status");
    assert!(status.leases.iter().all(|l| l.failures == 0), "a late batch failed instead of being refused: {status:?}");
    drop(child);
    here.stop().await.expect("stop");
}

/// Deposits 1 into `x` of each tenant in turn until `writing` turns false.
fn deposits_until_stopped(
    store: &EventStore,
    tenants: &[String],
    writing: &Arc<AtomicBool>,
) -> tokio::task::JoinHandle<()> {
    let (store, tenants, writing) = (store.clone(), tenants.to_vec(), Arc::clone(writing));
    tokio::spawn(async move {
        let mut i = 0;
        while writing.load(Ordering::SeqCst) {
            deposit(&store, &tenants[i % tenants.len()], "x", 1).await;
            i += 1;
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
}

/// `count` tenants (`<prefix>0000`…) with a deposit each, run by a daemon here and one in
/// another OS process (this test binary, re-run as `daemon_child_process`): returns once each
/// holds half the segments and at least 4 of the tenants (each tenant falls in either half: 4
/// of 24 is short of 12 by far more than chance reaches).
async fn sharing_with_a_child(
    db: &TestDb,
    store: &EventStore,
    prefix: &str,
    count: usize,
) -> (KillOnDrop, DaemonHandle, Vec<String>) {
    let tenants: Vec<String> = (0..count).map(|i| format!("{prefix}{i:04}")).collect();
    for chunk in tenants.chunks(8) {
        futures::future::join_all(chunk.iter().map(|t| deposit(store, t, "x", 1))).await;
    }
    let (child, owner) = spawn_child_daemon(&db.url).await;
    let here = daemon(store.clone(), Arc::default()).start().await.expect("start");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let status = here.status().await.expect("status");
        let theirs = status.leases.iter().filter(|l| l.owner.as_deref() == Some(owner.as_str())).count();
        let halves = [status.segments.get(&owner), status.segments.get(here.owner())];
        if status.leases.len() == count && halves == [Some(&32), Some(&32)] && theirs >= 4 && status.held() >= 4 {
            break;
        }
        assert!(Instant::now() < deadline, "work not shared with the child: {status:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (child, here, tenants)
}

/// Starts `daemon_child_process` on `url` in another OS process; the child and its owner name.
async fn spawn_child_daemon(url: &str) -> (KillOnDrop, String) {
    let mut child = KillOnDrop(
        std::process::Command::new(std::env::current_exe().unwrap())
            .args(["daemon_child_process", "--exact", "--nocapture", "--test-threads=1"])
            .env("EMMETT_DAEMON_CHILD_URL", url)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn the child daemon"),
    );
    let stdout = std::io::BufReader::new(child.0.stdout.take().unwrap());
    let owner = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        stdout.lines().map_while(Result::ok).find_map(|l| l.split_once("owner=").map(|(_, o)| o.to_owned()))
    })
    .await
    .unwrap()
    .expect("the child reports its owner");
    (child, owner)
}

/// An event writer that took its position and has not committed yet: the daemon must not move
/// past it (it would never come back for it), and projects it once it commits. SQLite has one
/// writer at a time, so nothing commits late there.
async fn a_writer_still_in_flight_is_waited_for(db: TestDb) {
    if db.db.get_database_backend() == sea_orm::DbBackend::Sqlite {
        return;
    }
    create_seen(&db.db).await;
    let store = db.store();
    let first = deposit(&store, "t1", "a", 1).await;
    let daemon = daemon(store.clone(), Arc::default()).start().await.expect("start");
    caught_up(&daemon, first, Duration::from_secs(10)).await;
    let (tx_commit, writer) = common::held_deposit(&store, "t1", "late", 100).await;
    let after = deposit(&store, "t1", "b", 10).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(seen(&db.db).await, vec![first as i64], "projected past a transaction still writing");
    tx_commit.send(()).unwrap();
    writer.await.unwrap();
    caught_up(&daemon, after, Duration::from_secs(15)).await;
    assert_eq!(seen(&db.db).await, stored(&db.db).await, "the late event is projected, once");
    daemon.stop().await.expect("stop");
}

/// Counts events per tenant into `counts` (a second projection beside the recorder).
struct Counter;

#[async_trait::async_trait]
impl EventHandler<Ev> for Counter {
    async fn handle(
        &self,
        ctx: &ProjectionContext<'_>,
        _: &RecordedEvent<Ev>,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let backend = ctx.backend();
        let sql = match backend {
            sea_orm::DbBackend::MySql => {
                "INSERT INTO counts (tenant, n) VALUES (?, 1) ON DUPLICATE KEY UPDATE n = n + 1"
            }
            sea_orm::DbBackend::Postgres => {
                "INSERT INTO counts (tenant, n) VALUES ($1, 1) ON CONFLICT (tenant) DO UPDATE SET n = counts.n + 1"
            }
            _ => "INSERT INTO counts (tenant, n) VALUES (?, 1) ON CONFLICT (tenant) DO UPDATE SET n = counts.n + 1",
        };
        ctx.db().execute_raw(sea_orm::Statement::from_sql_and_values(backend, sql, [ctx.partition().into()])).await?;
        Ok(())
    }
}

/// The table [`Counter`] counts each tenant's deposits in.
async fn create_counts(db: &DatabaseConnection) {
    let sql = "CREATE TABLE counts (tenant VARCHAR(255) NOT NULL PRIMARY KEY, n BIGINT NOT NULL)";
    db.execute_unprepared(sql).await.unwrap();
}

/// Records each call it gets: (tenant, events, first position) into `calls`.
struct Bulk;

#[async_trait::async_trait]
impl emmett_seaorm::projection::BatchHandler<Ev> for Bulk {
    async fn handle_batch(
        &self,
        ctx: &ProjectionContext<'_>,
        events: &[&RecordedEvent<Ev>],
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        assert!(events.iter().all(|e| matches!(e.event, Ev::Deposited { .. }) && e.partition == ctx.partition()));
        assert!(events.windows(2).all(|w| w[0].global_position < w[1].global_position));
        let mut insert = Query::insert();
        insert
            .into_table(Alias::new("calls"))
            .columns([Alias::new("tenant"), Alias::new("events"), Alias::new("first")])
            .values_panic([
                ctx.partition().into(),
                (events.len() as i64).into(),
                (events[0].global_position as i64).into(),
            ]);
        ctx.db().execute(&insert).await?;
        Ok(())
    }
}

/// A batch handler gets each partition's handled events of a batch in one call, in order.
async fn batch_handlers_get_a_tenants_events_at_once(db: TestDb) {
    let mut create = Table::create();
    create
        .table(Alias::new("calls"))
        .col(ColumnDef::new(Alias::new("tenant")).string_len(255).not_null())
        .col(ColumnDef::new(Alias::new("events")).big_integer().not_null())
        .col(ColumnDef::new(Alias::new("first")).big_integer().not_null());
    db.db.execute(&create).await.unwrap();
    let store = db.store();
    let mut last = 0;
    for t in ["t1", "t2", "t3"] {
        store
            .append_to_stream("a", [Ev::Opened { owner: t.into() }], AppendOptions::default().partition(t))
            .await
            .unwrap();
        for i in 0..10 {
            last = deposit(&store, t, "a", i).await;
        }
    }
    let daemon = Daemon::new(store)
        .projection("bulk", ProjectionRegistry::new().on_batch(["Deposited"], Bulk))
        .start()
        .await
        .expect("start");
    caught_up(&daemon, last, Duration::from_secs(10)).await;
    let select =
        Query::select().columns([Alias::new("tenant"), Alias::new("events")]).from(Alias::new("calls")).to_owned();
    let mut calls: Vec<(String, i64)> = db
        .db
        .query_all(&select)
        .await
        .unwrap()
        .iter()
        .map(|r| (r.try_get_by_index(0).unwrap(), r.try_get_by_index(1).unwrap()))
        .collect();
    calls.sort();
    assert_eq!(calls, vec![("t1".into(), 10), ("t2".into(), 10), ("t3".into(), 10)]);
    daemon.stop().await.expect("stop");
}

/// One daemon, two projections over the same tenants: each keeps its own checkpoints and read
/// model, and both follow every tenant.
async fn several_projections_run_side_by_side(db: TestDb) {
    create_seen(&db.db).await;
    create_counts(&db.db).await;
    let store = db.store();
    let daemon = daemon(store.clone(), Arc::default())
        .projection("counter", ProjectionRegistry::new().on(["Deposited"], Counter))
        .start()
        .await
        .expect("start");
    let mut last = 0;
    for i in 0..60 {
        last = deposit(&store, &format!("t{}", i % 20), &format!("a{}", i % 3), 1).await;
    }
    caught_up(&daemon, last, Duration::from_secs(10)).await;
    assert_eq!(seen(&db.db).await, stored(&db.db).await);
    let rows = db
        .db
        .query_all(
            &Query::select().columns([Alias::new("tenant"), Alias::new("n")]).from(Alias::new("counts")).to_owned(),
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 20);
    assert!(rows.iter().all(|r| r.try_get_by_index::<i64>(1).unwrap() == 3));
    let status = daemon.status().await.expect("status");
    assert_eq!(status.leases.len(), 40, "20 tenants × 2 projections");
    assert!(status.leases.iter().all(|l| l.checkpoint == l.head && l.lag_events == 0), "{status:?}");
    daemon.stop().await.expect("stop");
}

/// Segments held per (projection, owner), from the table.
async fn holders(db: &DatabaseConnection) -> BTreeMap<(String, Option<String>), i64> {
    let sql = "SELECT subscription_id, owner, count(*) FROM emt_segments GROUP BY subscription_id, owner";
    let rows = db.query_all_raw(sea_orm::Statement::from_string(db.get_database_backend(), sql)).await.unwrap();
    rows.iter()
        .map(|r| ((r.try_get_by_index(0).unwrap(), r.try_get_by_index(1).unwrap()), r.try_get_by_index(2).unwrap()))
        .collect()
}

/// Instances running different sets of projections share each projection among those running
/// it, and leave no segment without a live owner: A runs `recorder` and `counter`, B `recorder`
/// only, then C `counter` only joins and takes its half of `counter` from A.
async fn instances_running_different_projections_leave_no_segment_free(db: TestDb) {
    create_seen(&db.db).await;
    create_counts(&db.db).await;
    let store = db.store();
    let counter = |d: Daemon| d.projection("counter", ProjectionRegistry::new().on(["Deposited"], Counter));
    let a = counter(daemon(store.clone(), Arc::default()).owner("a")).start().await.expect("start a");
    let b = daemon(EventStore::new(db.second_pool().await), Arc::default()).owner("b").start().await.expect("start b");
    let split = |held: &BTreeMap<(String, Option<String>), i64>, projection: &str, owners: &[&str]| {
        let counts: Vec<i64> = owners
            .iter()
            .map(|o| held.get(&(projection.to_owned(), Some(o.to_string()))).copied().unwrap_or(0))
            .collect();
        counts.iter().sum::<i64>() == 64
            && counts.iter().all(|n| (64 / owners.len() as i64 - 1..=64 / owners.len() as i64 + 1).contains(n))
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let held = holders(&db.db).await;
        if split(&held, "recorder", &["a", "b"]) && split(&held, "counter", &["a"]) {
            break;
        }
        assert!(Instant::now() < deadline, "recorder not split a/b, or counter not all a's: {held:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let c = counter(Daemon::new(EventStore::new(db.second_pool().await)))
        .owner("c")
        .lease_ttl(Duration::from_secs(3))
        .renew_every(Duration::from_millis(500))
        .poll_interval(Duration::from_millis(5), Duration::from_millis(300))
        .start()
        .await
        .expect("start c");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let held = holders(&db.db).await;
        if split(&held, "recorder", &["a", "b"]) && split(&held, "counter", &["a", "c"]) {
            break;
        }
        assert!(Instant::now() < deadline, "counter not split a/c once c joined: {held:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut last = 0;
    for i in 0..40 {
        last = deposit(&store, &format!("t{}", i % 20), "x", 1).await;
    }
    for instance in [&a, &b, &c] {
        caught_up(instance, last, Duration::from_secs(10)).await;
    }
    assert_eq!(seen(&db.db).await, stored(&db.db).await);
    let counts = "SELECT count(*), min(n), max(n) FROM counts";
    let row = db
        .db
        .query_one_raw(sea_orm::Statement::from_string(db.db.get_database_backend(), counts))
        .await
        .unwrap()
        .unwrap();
    let (tenants, min, max): (i64, i64, i64) =
        (row.try_get_by_index(0).unwrap(), row.try_get_by_index(1).unwrap(), row.try_get_by_index(2).unwrap());
    assert_eq!((tenants, min, max), (20, 2, 2), "every tenant counted exactly twice");
    for instance in [a, b, c] {
        instance.stop().await.expect("stop");
    }
}

/// Archived streams' events are not projected, and do not count as waiting: the daemon is
/// caught up and shows no lag when a tenant's last events belong to an archived stream.
async fn archived_events_are_not_waited_for(db: TestDb) {
    create_seen(&db.db).await;
    let store = db.store();
    let live = deposit(&store, "t1", "a", 1).await;
    let last = deposit(&store, "t1", "b", 2).await;
    store.archive_stream("b", "t1").await.expect("archive");
    let daemon = daemon(store.clone(), Arc::default()).start().await.expect("start");
    caught_up(&daemon, last, Duration::from_secs(5)).await;
    assert_eq!(seen(&db.db).await, vec![live as i64]);
    let status = daemon.status().await.expect("status");
    let t1 = status.get("recorder", "t1").expect("t1");
    assert_eq!((t1.lag_events, t1.head), (0, live), "{status:?}");
    daemon.stop().await.expect("stop");
}

/// `start` returns once the instance is registered, or the reason it could not be; bad names
/// are refused before anything runs.
async fn start_reports_what_keeps_a_daemon_from_running(db: TestDb) {
    let long = "x".repeat(300);
    let refused = Daemon::new(db.store()).projection(long.as_str(), recorder(Arc::default())).start().await;
    assert!(matches!(refused, Err(emmett_seaorm::Error::InvalidIdentifier { .. })), "{:?}", refused.err());
    let refused = daemon(db.store(), Arc::default()).tenants([long.as_str()]).start().await;
    assert!(matches!(refused, Err(emmett_seaorm::Error::InvalidIdentifier { .. })), "{:?}", refused.err());
    db.db.execute_unprepared("DROP TABLE emt_daemons").await.unwrap();
    let failed = daemon(db.store(), Arc::default()).start().await;
    assert!(matches!(failed, Err(emmett_seaorm::Error::Database(_))), "{:?}", failed.err());
}

/// A child process killed when the test ends, however it ends.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Not a test of its own: the child process of `a_killed_process_tenants_are_taken_over` (runs
/// the recorder) and of `a_reaction_cut_off_by_a_kill_is_delivered_again` (runs a reactor that
/// hangs after its side effect), until it is killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_child_process() {
    let Ok(url) = std::env::var("EMMETT_DAEMON_CHILD_URL") else { return };
    let store = EventStore::new(emmett_seaorm::connect(&url).await.expect("connect"));
    let daemon = match std::env::var("EMMETT_DAEMON_CHILD_REACTOR") {
        Ok(_) => reactor_daemon(store, &url, true).await,
        Err(_) => daemon(store, Arc::default()),
    };
    let daemon = daemon.start().await.expect("start");
    println!("owner={}", daemon.owner());
    tokio::time::sleep(Duration::from_secs(600)).await;
}

/// A reactor: for each deposit it "sends a receipt" — a row in `sent`, written through its own
/// connection outside the batch, keyed by the event's message id, with the lease epoch as
/// fencing token — then appends a `Closed` event to the stream `receipt-<message id>` in the
/// batch's transaction, recording that it did. It fails on a deposit of 13 while `failing`, and
/// hangs (never letting its batch commit) when `hang`.
struct Receipts {
    outside: DatabaseConnection,
    failing: Arc<AtomicBool>,
    hang: bool,
}

#[async_trait::async_trait]
impl EventHandler<Ev> for Receipts {
    async fn handle(
        &self,
        ctx: &ProjectionContext<'_>,
        e: &RecordedEvent<Ev>,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let epoch = ctx.lease_epoch().ok_or("a reactor runs under a lease")?;
        let mut sent = Query::insert();
        sent.into_table(Alias::new("sent"))
            .columns([Alias::new("message_id"), Alias::new("epoch")])
            .values_panic([e.message_id.clone().into(), epoch.into()]);
        self.outside.execute(&sent).await?;
        let receipt = format!("receipt-{}", e.message_id);
        ctx.store().append_to_stream(&receipt, [Ev::Closed], AppendOptions::default().partition(&e.partition)).await?;
        if self.hang {
            tokio::time::sleep(Duration::from_secs(600)).await;
        }
        if matches!(e.event, Ev::Deposited { amount: 13 }) && self.failing.load(Ordering::SeqCst) {
            return Err("the receipt service refused it".into());
        }
        Ok(())
    }
}

async fn reactor_daemon(store: EventStore, url: &str, hang: bool) -> Daemon {
    let outside = emmett_seaorm::connect(outside_url(url)).await.expect("connect");
    let receipts = Receipts { outside, failing: Arc::new(AtomicBool::new(false)), hang };
    Daemon::new(store)
        .projection("receipts", ProjectionRegistry::new().on(["Deposited"], receipts))
        .lease_ttl(Duration::from_secs(3))
        .renew_every(Duration::from_millis(500))
        .poll_interval(Duration::from_millis(5), Duration::from_millis(300))
        .backoff(Duration::from_millis(200), Duration::from_secs(1))
}

/// Where reactions' side effects go: the test database (directly, not through a pooler),
/// except on SQLite, whose one writer is busy with the reaction's own batch — there another
/// database file plays the outside system.
fn outside_url(url: &str) -> String {
    let url = common::direct_url(url);
    match url.strip_prefix("sqlite://") {
        Some(rest) => {
            let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
            format!("sqlite://{path}-outside.db?{query}")
        }
        None => url,
    }
}

async fn create_sent(db: &DatabaseConnection) {
    let mut create = Table::create();
    create
        .table(Alias::new("sent"))
        .col(ColumnDef::new(Alias::new("message_id")).string_len(64).not_null())
        .col(ColumnDef::new(Alias::new("epoch")).big_integer().not_null());
    db.execute(&create).await.expect("create sent");
}

/// `(message_id, epoch)` of every receipt sent, sorted.
async fn sent(db: &DatabaseConnection) -> Vec<(String, i64)> {
    let select =
        Query::select().columns([Alias::new("message_id"), Alias::new("epoch")]).from(Alias::new("sent")).to_owned();
    let mut rows: Vec<(String, i64)> = db
        .query_all(&select)
        .await
        .unwrap()
        .iter()
        .map(|r| (r.try_get_by_index(0).unwrap(), r.try_get_by_index(1).unwrap()))
        .collect();
    rows.sort();
    rows
}

/// Whether the receipt stream of `message_id` exists.
async fn recorded(store: &EventStore, tenant: &str, message_id: &str) -> bool {
    let options = emmett_seaorm::ReadOptions::default().partition(tenant);
    store.read_stream::<Ev>(&format!("receipt-{message_id}"), options).await.unwrap().stream_exists
}

/// A reactor appends in its checkpoint's transaction: what it records commits with its progress
/// or not at all; a failing reaction parks its tenant only, and is delivered again (same
/// message id) until it succeeds.
async fn a_reactor_records_what_it_did_with_its_checkpoint(db: TestDb) {
    let outside = emmett_seaorm::connect(outside_url(&db.url)).await.unwrap();
    create_sent(&outside).await;
    let store = db.store();
    let ok = deposit(&store, "good", "a", 1).await;
    let refused = deposit(&store, "bad", "b", 13).await;
    let messages = store.read_stream::<Ev>("b", emmett_seaorm::ReadOptions::default().partition("bad")).await.unwrap();
    let refused_id = messages.events[0].message_id.clone();
    let failing = Arc::new(AtomicBool::new(true));
    let receipts = Receipts { outside: outside.clone(), failing: Arc::clone(&failing), hang: false };
    let daemon = reactor_daemon(store.clone(), &db.url, false)
        .await
        .projection("receipts", ProjectionRegistry::new().on(["Deposited"], receipts))
        .start()
        .await
        .expect("start");
    caught_up_on(&daemon, "receipts", "good", ok).await;
    let good = store.read_stream::<Ev>("a", emmett_seaorm::ReadOptions::default().partition("good")).await.unwrap();
    assert!(recorded(&store, "good", &good.events[0].message_id).await);
    // The refused reaction: sent (a side effect can't be taken back) but not recorded, and the
    // tenant parked; delivered again with the same message id.
    // Refused three times (the default `retries`): parked, the other tenant untouched.
    let deadline = Instant::now() + Duration::from_secs(10);
    let bad = loop {
        let status = daemon.status().await.unwrap();
        let bad = status.get("receipts", "bad").cloned().unwrap();
        if bad.parked {
            break bad;
        }
        assert!(bad.failures < 3, "{bad:?}");
        assert!(Instant::now() < deadline, "not parked: {status:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(bad.failures >= 3 && bad.checkpoint < refused, "{bad:?}");
    assert!(sent(&outside).await.iter().filter(|(id, _)| *id == refused_id).count() >= 3, "delivered each time");
    assert!(!recorded(&store, "bad", &refused_id).await, "recorded although its batch failed");
    let good_status = daemon.status().await.unwrap().get("receipts", "good").cloned().unwrap();
    assert!(!good_status.parked && good_status.failures == 0, "{good_status:?}");
    failing.store(false, Ordering::SeqCst);
    caught_up_on(&daemon, "receipts", "bad", refused).await;
    assert!(recorded(&store, "bad", &refused_id).await);
    daemon.stop().await.expect("stop");
}

/// Waits until `subscription`'s checkpoint for `tenant` reaches `position`.
async fn caught_up_on(daemon: &DaemonHandle, subscription: &str, tenant: &str, position: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while daemon.status().await.expect("status").get(subscription, tenant).is_none_or(|l| l.checkpoint < position) {
        assert!(Instant::now() < deadline, "{subscription} not at {position} for {tenant}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A daemon process killed after a reaction's side effect but before its checkpoint commits:
/// the reaction is delivered again, with the same message id (the idempotency key) and a higher
/// lease epoch, and nothing is skipped.
async fn a_reaction_cut_off_by_a_kill_is_delivered_again(db: TestDb) {
    let outside = emmett_seaorm::connect(outside_url(&db.url)).await.unwrap();
    create_sent(&outside).await;
    let store = db.store();
    deposit(&store, "t1", "a", 1).await;
    let mut child = KillOnDrop(
        std::process::Command::new(std::env::current_exe().unwrap())
            .args(["daemon_child_process", "--exact", "--nocapture", "--test-threads=1"])
            .env("EMMETT_DAEMON_CHILD_URL", &db.url)
            .env("EMMETT_DAEMON_CHILD_REACTOR", "hang")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn the child daemon"),
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    while sent(&outside).await.is_empty() {
        assert!(Instant::now() < deadline, "the child never reacted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    child.0.kill().expect("SIGKILL the child");
    child.0.wait().unwrap();
    let last = deposit(&store, "t1", "a", 2).await;
    let here = reactor_daemon(store.clone(), &db.url, false).await.start().await.expect("start");
    tokio::time::timeout(Duration::from_secs(10), here.caught_up(last)).await.expect("caught up").unwrap();
    let sent = sent(&outside).await;
    let events = store.read_stream::<Ev>("a", emmett_seaorm::ReadOptions::default().partition("t1")).await.unwrap();
    let (first, second) = (&events.events[0].message_id, &events.events[1].message_id);
    let first_sends: Vec<i64> = sent.iter().filter(|(id, _)| id == first).map(|(_, epoch)| *epoch).collect();
    assert_eq!(first_sends.len(), 2, "delivered again after the kill: {sent:?}");
    assert!(first_sends[1] > first_sends[0], "a higher epoch after the takeover: {sent:?}");
    assert_eq!(sent.iter().filter(|(id, _)| id == second).count(), 1);
    assert!(recorded(&store, "t1", first).await && recorded(&store, "t1", second).await);
    // What the killed reaction recorded died with its batch: one receipt event, not two.
    let receipt = store
        .read_stream::<Ev>(&format!("receipt-{first}"), emmett_seaorm::ReadOptions::default().partition("t1"))
        .await
        .unwrap();
    assert_eq!(receipt.events.len(), 1);
    here.stop().await.expect("stop");
}

/// A projection rebuilt in place through the daemon's handle while the daemon runs it and a
/// writer appends: it ends equal to the sequential fold.
async fn a_projection_is_rebuilt_while_the_daemon_runs_it(db: TestDb) {
    balances::create_table(&db.db).await;
    let store = db.store();
    for i in 0..300 {
        balances::deposit(&store, i, i as i64).await;
    }
    let daemon = Daemon::new(EventStore::new(db.second_pool().await))
        .projection("balances", balances::registry())
        .poll_interval(Duration::from_millis(5), Duration::from_millis(100))
        .start()
        .await
        .expect("start");
    caught_up(&daemon, balances::deposit(&store, 300, 1).await, Duration::from_secs(10)).await;
    balances::corrupt(&db.db).await;
    let writing = Arc::new(AtomicBool::new(true));
    let writer = {
        let (store, writing) = (EventStore::new(db.second_pool().await), Arc::clone(&writing));
        tokio::spawn(async move {
            let mut i = 301;
            while writing.load(Ordering::SeqCst) {
                balances::deposit(&store, i, 1).await;
                i += 1;
            }
        })
    };
    let mut reports = Vec::new();
    daemon.rebuild("balances", |p| reports.push((p.processed, p.total))).await.expect("rebuild");
    writing.store(false, Ordering::SeqCst);
    writer.await.unwrap();
    assert!(!reports.is_empty() && reports.windows(2).all(|w| w[0].0 <= w[1].0), "{reports:?}");
    assert!(reports[0].1 >= 301, "the total counts every event: {reports:?}");
    // The newest event, after the writer's: the daemon catches up with everything.
    let last = balances::deposit(&store, 0, 0).await;
    caught_up(&daemon, last, Duration::from_secs(10)).await;
    assert_eq!(balances::rows(&db.db).await, balances::folded(&store).await);
    let unknown = daemon.rebuild("nothing", |_| {}).await;
    assert!(
        matches!(&unknown, Err(emmett_seaorm::Error::UnknownProjection { subscription }) if subscription == "nothing")
    );
    daemon.stop().await.expect("stop");
}

conformance!(with_pooler:
    a_projection_is_rebuilt_while_the_daemon_runs_it,
    start_reports_what_keeps_a_daemon_from_running,
    batch_handlers_get_a_tenants_events_at_once,
    a_reactor_records_what_it_did_with_its_checkpoint,
    a_reaction_cut_off_by_a_kill_is_delivered_again,
    several_projections_run_side_by_side,
    archived_events_are_not_waited_for,
    a_writer_still_in_flight_is_waited_for,
    a_killed_process_tenants_are_taken_over,
    a_process_killed_under_load_over_many_tenants_loses_nothing,
    projects_tenants_found_while_running_and_resumes_after_restart,
    instances_split_tenants_and_take_over_a_crashed_ones_work,
    a_failing_tenant_is_parked_and_resumes_when_fixed,
    a_failing_tenant_among_many_runs_alone,
    a_graceful_stop_hands_work_over_at_once,
    instances_running_different_projections_leave_no_segment_free,
);

// A paused process holding SQLite's write lock stops every writer: not a fault one instance
// can take over from.
#[cfg(any(feature = "postgres", feature = "mysql"))]
mod paused {
    use super::a_paused_instance_tenants_are_taken_over_and_its_late_batches_refused;
    crate::conformance!(servers: a_paused_instance_tenants_are_taken_over_and_its_late_batches_refused);
}

/// SQLite and MySQL have no `NOTIFY`: a daemon over a pool of its own wakes up at once on an
/// append through another store on the same database in this process. Otherwise only its next
/// look finds it: a poll (30 s here) or a lease round (every 500 ms without notifications).
async fn a_daemon_wakes_on_appends_through_other_stores_on_its_database(db: TestDb) {
    create_seen(&db.db).await;
    let daemon = Daemon::new(EventStore::new(db.second_pool().await))
        .projection("recorder", recorder(Arc::default()))
        .poll_interval(Duration::from_secs(30), Duration::from_secs(30))
        .start()
        .await
        .expect("start");
    let writer = db.store();
    let mut lags = Vec::new();
    for (i, tenant) in ["t1", "t1", "t2", "t3", "t1"].into_iter().enumerate() {
        tokio::time::sleep(Duration::from_millis(100 + 37 * i as u64)).await;
        let position = deposit(&writer, tenant, "a", 5).await;
        // (Watched every 5 ms: `caught_up` looks every 100 ms.)
        let appended = std::time::Instant::now();
        while !seen(&db.db).await.contains(&(position as i64)) {
            assert!(appended.elapsed() < Duration::from_secs(5), "{position} projected within 5 s");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        lags.push(appended.elapsed());
    }
    lags.sort();
    assert!(lags[2] < Duration::from_millis(100), "woken at once, not at the next look: {lags:?}");
    assert_eq!(seen(&db.db).await, stored(&db.db).await);
    daemon.stop().await.expect("stop");
}

#[cfg(any(feature = "sqlite", feature = "mysql"))]
mod woken {
    #[cfg(feature = "sqlite")]
    #[tokio::test]
    async fn sqlite_a_daemon_wakes_on_appends_through_other_stores_on_its_database() {
        crate::common::run(
            crate::common::sqlite().await,
            super::a_daemon_wakes_on_appends_through_other_stores_on_its_database,
        )
        .await;
    }

    #[cfg(feature = "mysql")]
    #[tokio::test]
    async fn mysql_a_daemon_wakes_on_appends_through_other_stores_on_its_database() {
        crate::common::run(
            crate::common::mysql().await,
            super::a_daemon_wakes_on_appends_through_other_stores_on_its_database,
        )
        .await;
    }
}
