//! The projection daemon's benchmarks: lag under a steady write rate, takeover after a kill or a
//! stop, throughput with one and three instances, and what an idle daemon costs.
//!
//! Every daemon and writer gets a pool of its own, as separate processes would have.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use emmett_seaorm::daemon::{Daemon, DaemonFleet, DaemonHandle};
use emmett_seaorm::{AppendOptions, EventStore, StoreRouter};
use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, Statement};

use crate::{Args, CartEvent, cart_event, carts_projection, create_carts_table};

type Res<T = ()> = Result<T, Box<dyn std::error::Error>>;

/// A new pool on the benchmark's database.
async fn pool(args: &Args) -> Res<DatabaseConnection> {
    pool_at(&args.database_url).await
}

/// A new pool on the database at `url`.
async fn pool_at(url: &str) -> Res<DatabaseConnection> {
    let mut options = emmett_seaorm::connect_options(url);
    options.max_connections(8).sqlx_logging(false);
    Ok(sea_orm::Database::connect(emmett_seaorm::configure(options)).await?)
}

/// A daemon over its own pool running the carts projection as `subscription` into `table`.
async fn start(
    args: &Args,
    subscription: &str,
    table: &str,
    tenants: &[String],
    configure: impl FnOnce(Daemon) -> Daemon,
) -> Res<DaemonHandle> {
    let store = EventStore::new(pool(args).await?);
    let daemon = Daemon::new(store).projection(subscription, carts_projection(table)).tenants(tenants.iter().cloned());
    Ok(configure(daemon).start().await?)
}

fn tenants(run: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{run}-t{i:03}")).collect()
}

/// `daemon-lag` (notifications on) and `daemon-lag-polling` (off): appends at `--lag-rate`
/// events/s over `--lag-tenants` tenants for `--lag-seconds`, from another pool than the
/// daemon's; the time from each append's commit until the daemon's checkpoint covers it.
pub async fn lag(args: &Args, run: &str, notifications: bool) -> Res {
    let name = if notifications { "daemon-lag" } else { "daemon-lag-polling" };
    let run = format!("{run}-{name}");
    let tenants = tenants(&run, args.lag_tenants);
    let table = format!("bench_lag_{}", notifications as u8);
    create_carts_table(&EventStore::new(pool(args).await?), &table).await?;
    let daemon = start(args, &run, &table, &tenants, |d| d.notifications(notifications)).await?;
    // Measured once the daemon holds its leases (a start-up is not the steady state).
    let warm = Instant::now() + Duration::from_secs(10);
    while daemon.status().await?.held() < tenants.len() && Instant::now() < warm {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let lag = follow(args, std::slice::from_ref(&run), &tenants, args.lag_rate, args.lag_seconds).await?;
    println!("{}", lag.line(name, args.lag_seconds));
    daemon.stop().await?;
    Ok(())
}

/// `daemon-stores` (PostgreSQL): the load of `daemon-lag` (`--lag-rate` events/s over
/// `--lag-tenants` tenants for `--lag-seconds`) on the benchmark's database
/// (`daemon-stores-1`), then spread by a `StoreRouter` over it and two more databases of the
/// same server (`daemon-stores-3`, created if missing), a `DaemonFleet` projecting.
pub async fn stores(args: &Args, run: &str) -> Res {
    if pool(args).await?.get_database_backend() != DbBackend::Postgres {
        eprintln!("daemon-stores: several databases of one PostgreSQL server; skipped");
        return Ok(());
    }
    let (base, query) =
        args.database_url.split_once('?').map_or((args.database_url.as_str(), None), |(b, q)| (b, Some(q)));
    let (server, name) = base.rsplit_once('/').ok_or("a database URL")?;
    for count in [1usize, 3] {
        let label = format!("daemon-stores-{count}");
        let run = format!("{run}-{label}");
        let tenants = tenants(&run, args.lag_tenants);
        let mut urls = vec![args.database_url.clone()];
        for i in 2..=count {
            let database = format!("{name}_store{i}");
            let admin = pool(args).await?;
            let exists = format!("SELECT 1 FROM pg_database WHERE datname = '{database}'");
            if admin.query_one_raw(Statement::from_string(DbBackend::Postgres, exists)).await?.is_none() {
                admin.execute_unprepared(&format!("CREATE DATABASE {database}")).await?;
            }
            urls.push(format!("{server}/{database}{}", query.map(|q| format!("?{q}")).unwrap_or_default()));
        }
        let mut router = StoreRouter::new();
        let mut placement = Placement { writers: Vec::new(), readers: Vec::new(), of: Vec::new() };
        for (i, url) in urls.iter().enumerate() {
            let store = EventStore::new(pool_at(url).await?);
            emmett_seaorm::migrate(&pool_at(url).await?).await?;
            create_carts_table(&store, "bench_stores").await?;
            router = router.store(i.to_string(), store);
            placement.writers.push(EventStore::new(pool_at(url).await?));
            placement.readers.push(EventStore::new(pool_at(url).await?));
        }
        for (t, tenant) in tenants.iter().enumerate() {
            router = router.tenant(tenant, (t % count).to_string());
            placement.of.push(t % count);
        }
        let (subscription, listed) = (run.clone(), tenants.clone());
        let fleet = DaemonFleet::start(&router, move |store| {
            Daemon::new(store).projection(&subscription, carts_projection("bench_stores")).tenants(listed.clone())
        });
        tokio::time::sleep(Duration::from_secs(3)).await; // (held leases: the steady state)
        let lag = follow_on(placement, std::slice::from_ref(&run), &tenants, args.lag_rate, args.lag_seconds).await?;
        println!("{}", lag.line(&label, args.lag_seconds));
        fleet.stop().await?;
    }
    Ok(())
}

/// What [`follow`] measured.
struct Lag {
    events: u64,
    /// Appends refused as busy (SQLite past its one writer's capacity).
    busy: u64,
    /// Milliseconds from an append's commit until every checkpoint covered it, sorted.
    latencies: Vec<f64>,
    /// Appends not seen projected by the end.
    unseen: usize,
}

impl Lag {
    /// The DESIGN.md line of workload `name` over `secs`.
    fn line(&self, name: &str, secs: u64) -> String {
        let at = |q: f64| {
            let last = self.latencies.len() as f64 - 1.0;
            self.latencies.get((last * q).round() as usize).copied().unwrap_or(f64::NAN)
        };
        format!(
            "{}\t{}\tevents\t{secs}.000\ts\t{}\tevents/s\tp50_ms={:.1}\tp99_ms={:.1}\tmax_ms={:.1}\tunseen={}\tbusy={}",
            crate::label(name),
            self.events,
            (self.events as f64 / secs as f64).round(),
            at(0.5),
            at(0.99),
            at(1.0),
            self.unseen,
            self.busy
        )
    }
}

/// Where the tenants of a lag measurement live: a writer and a reader store per database (pools
/// of their own), and each tenant's database.
struct Placement {
    writers: Vec<EventStore>,
    readers: Vec<EventStore>,
    of: Vec<usize>,
}

impl Placement {
    /// Every tenant in the benchmark's database.
    async fn one(args: &Args, tenants: usize) -> Res<Self> {
        let (writer, reader) = (EventStore::new(pool(args).await?), EventStore::new(pool(args).await?));
        Ok(Placement { writers: vec![writer], readers: vec![reader], of: vec![0; tenants] })
    }
}

/// [`follow_on`] with every tenant in the benchmark's database.
async fn follow(args: &Args, subscriptions: &[String], tenants: &[String], rate: u64, seconds: u64) -> Res<Lag> {
    follow_on(Placement::one(args, tenants.len()).await?, subscriptions, tenants, rate, seconds).await
}

/// Appends single events at `rate` per second spread over `tenants` for `seconds`, from pools
/// of their own, and measures how long after each commit the checkpoints of every subscription in
/// `subscriptions` cover it (watched every 5 ms: only the tenants with appends not yet seen).
async fn follow_on(
    placement: Placement,
    subscriptions: &[String],
    tenants: &[String],
    rate: u64,
    seconds: u64,
) -> Res<Lag> {
    let Placement { writers: stores, readers, of } = placement;
    // (tenant, position, committed at) of appends not yet seen projected.
    let pending: Arc<Mutex<Vec<(usize, u64, Instant)>>> = Arc::default();
    let writers = 8usize;
    let period = Duration::from_secs_f64(writers as f64 / rate as f64);
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let tasks: Vec<_> = (0..writers)
        .map(|w| {
            let (stores, of, pending, tenants) = (stores.clone(), of.clone(), Arc::clone(&pending), tenants.to_vec());
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(period);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let mut i = w;
                let (mut appended, mut busy) = (0u64, 0u64);
                while Instant::now() < deadline {
                    tick.tick().await;
                    // (A stride coprime with most counts: consecutive appends go to far-apart tenants.)
                    let t = (i * 7919) % tenants.len();
                    let options = AppendOptions::default().partition(&tenants[t]);
                    let stream = format!("cart-{}", i % 10);
                    i += writers;
                    match stores[of[t]].append_to_stream(&stream, [cart_event(1, 1)], options).await {
                        Ok(done) => {
                            pending.lock().unwrap().push((t, done.last_event_global_position, Instant::now()));
                            appended += 1;
                        }
                        // An overloaded SQLite file: counted, not fatal.
                        Err(emmett_seaorm::Error::Busy { .. }) => busy += 1,
                        Err(error) => return Err(error),
                    }
                }
                Ok::<_, emmett_seaorm::Error>((appended, busy))
            })
        })
        .collect();
    let index: BTreeMap<&str, usize> = tenants.iter().enumerate().map(|(i, t)| (t.as_str(), i)).collect();
    let mut latencies = Vec::new();
    loop {
        let waiting: BTreeSet<usize> = pending.lock().unwrap().iter().map(|(t, _, _)| *t).collect();
        // Each waiting tenant's lowest checkpoint over the subscriptions (none yet: 0).
        let mut checkpoints: BTreeMap<usize, u64> = BTreeMap::new();
        for (store, reader) in readers.iter().enumerate() {
            let waiting_names: Vec<String> =
                waiting.iter().filter(|&&t| of[t] == store).map(|&t| tenants[t].clone()).collect();
            if waiting_names.is_empty() {
                continue;
            }
            for row in reader.query_all_raw(checkpoints_of(reader, subscriptions, waiting_names)).await? {
                let tenant: String = row.try_get_by_index(0)?;
                let covered = row.try_get_by_index::<i64>(2)? as usize == subscriptions.len();
                if let (Some(&i), true) = (index.get(tenant.as_str()), covered) {
                    checkpoints.insert(i, row.try_get_by_index::<i64>(1)? as u64);
                }
            }
        }
        let now = Instant::now();
        let left = {
            let mut pending = pending.lock().unwrap();
            pending.retain(|&(t, position, at)| {
                let seen = checkpoints.get(&t).is_some_and(|&c| c >= position);
                if seen {
                    latencies.push(now.duration_since(at).as_secs_f64() * 1000.0);
                }
                !seen
            });
            pending.len()
        };
        let done = left == 0 && tasks.iter().all(|t| t.is_finished());
        if done || Instant::now() > deadline + Duration::from_secs(30) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (mut events, mut busy) = (0, 0);
    for task in tasks {
        let (appended, refused) = task.await??;
        (events, busy) = (events + appended, busy + refused);
    }
    latencies.sort_by(f64::total_cmp);
    let unseen = pending.lock().unwrap().len();
    Ok(Lag { events, busy, latencies, unseen })
}

/// The statement reading `tenants`' lowest checkpoint over `subscriptions` and how many of them
/// have one: `(tenant, min, count)` rows.
///
/// (The observer must stay cheap: a new SQL text with every waiting tenant written in, polled
/// every few ms, took 40% of the server's time at 10,000 tenants. On PostgreSQL one prepared
/// statement: an index probe per waiting tenant, `OFFSET 0` keeping the planner from joining all
/// 20,000 checkpoints by hash instead.)
fn checkpoints_of(reader: &EventStore, subscriptions: &[String], tenants: Vec<String>) -> Statement {
    let backend = reader.get_database_backend();
    let quote = |s: &str| format!("'{}'", s.replace('\'', "''"));
    match backend {
        #[cfg(feature = "postgres")]
        DbBackend::Postgres => Statement::from_sql_and_values(
            backend,
            "SELECT k.p, min(s.last_processed_position), count(*) FROM unnest($2::text[]) AS k(p)
             CROSS JOIN LATERAL (SELECT last_processed_position FROM subscriptions
                                 WHERE subscription_id = ANY($1) AND partition = k.p AND version = 1
                                 OFFSET 0) AS s
             GROUP BY k.p",
            [subscriptions.to_vec().into(), tenants.into()],
        ),
        _ => {
            let subscription_list = subscriptions.iter().map(|s| quote(s)).collect::<Vec<_>>().join(", ");
            let tenant_list = tenants.iter().map(|t| quote(t)).collect::<Vec<_>>().join(", ");
            let sql = format!(
                "SELECT partition, min(last_processed_position), count(*) FROM subscriptions
                 WHERE subscription_id IN ({subscription_list}) AND partition IN ({tenant_list}) GROUP BY partition"
            );
            let sql = match backend {
                DbBackend::MySql => sql.replace("partition", "`partition`"),
                _ => sql,
            };
            Statement::from_string(backend, sql)
        }
    }
}

/// `takeover-kill` / `takeover-stop`: two instances share 12 tenants; one is killed (aborted,
/// its leases left as they are) or stopped; seconds until the other has projected an event
/// appended to each of its tenants right after.
pub async fn takeover(args: &Args, run: &str, kill: bool) -> Res {
    let name = if kill { "takeover-kill" } else { "takeover-stop" };
    let run = format!("{run}-{name}");
    let tenants = tenants(&run, 12);
    let table = format!("bench_takeover_{}", kill as u8);
    let writer = EventStore::new(pool(args).await?);
    create_carts_table(&EventStore::new(pool(args).await?), &table).await?;
    for t in &tenants {
        writer.append_to_stream("cart-0", [cart_event(0, 0)], AppendOptions::default().partition(t)).await?;
    }
    let leaving = start(args, &run, &table, &tenants, |d| d).await?;
    let staying = start(args, &run, &table, &tenants, |d| d).await?;
    // Shared out, and (for the kill) running longer than a lease's time to live, as a
    // long-running instance would be.
    let warm = if kill { Duration::from_secs(11) } else { Duration::from_secs(3) };
    tokio::time::sleep(warm).await;
    let status = staying.status().await?;
    let theirs: Vec<String> = status
        .leases
        .iter()
        .filter(|l| l.owner.as_deref() == Some(leaving.owner()))
        .map(|l| l.tenant.clone())
        .collect();
    let started = Instant::now();
    if kill {
        drop(leaving);
    } else {
        leaving.stop().await?;
    }
    let mut last = 0;
    for t in &theirs {
        last = writer
            .append_to_stream("cart-0", [cart_event(0, 1)], AppendOptions::default().partition(t))
            .await?
            .last_event_global_position;
    }
    tokio::time::timeout(Duration::from_secs(60), staying.caught_up(last)).await??;
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{}\t{}\tevents\t{secs:.3}\ts\t{}\tevents/s\tseconds={secs:.2}\ttenants={}",
        crate::label(name),
        theirs.len(),
        (theirs.len() as f64 / secs).round(),
        theirs.len()
    );
    staying.stop().await?;
    Ok(())
}

/// `daemon-scale-<k>`: 12 tenants × `--scale-events` events, projected from scratch by `k`
/// instances (events/s from start until every tenant is caught up).
pub async fn scale(args: &Args, run: &str, instances: usize, tenants_of_run: &[String]) -> Res {
    let name = format!("daemon-scale-{instances}");
    let subscription = format!("{run}-{name}");
    let table = format!("bench_scale_{instances}");
    create_carts_table(&EventStore::new(pool(args).await?), &table).await?;
    let last = {
        let db = EventStore::new(pool(args).await?);
        let row = db
            .query_one_raw(Statement::from_string(
                db.get_database_backend(),
                "SELECT max(global_position) FROM messages",
            ))
            .await?;
        row.map(|r| r.try_get_by_index::<i64>(0)).transpose()?.unwrap_or(0) as u64
    };
    let started = Instant::now();
    let mut daemons = Vec::new();
    for _ in 0..instances {
        daemons.push(start(args, &subscription, &table, tenants_of_run, |d| d.batch_size(args.batch_size)).await?);
    }
    tokio::time::timeout(Duration::from_secs(600), daemons[0].caught_up(last)).await??;
    let secs = started.elapsed().as_secs_f64();
    let events = tenants_of_run.len() as u64 * args.scale_events;
    println!("{}\t{events}\tevents\t{secs:.3}\ts\t{}\tevents/s", crate::label(&name), (events as f64 / secs).round());
    for d in daemons {
        d.stop().await?;
    }
    Ok(())
}

/// Loads the 12 tenants of the `daemon-scale-*` workloads (untimed).
pub async fn load_scale(args: &Args, run: &str) -> Res<Vec<String>> {
    let tenants = tenants(&format!("{run}-scale"), 12);
    let store = EventStore::new(pool(args).await?);
    let per_append = 500u64;
    let tasks: Vec<_> = tenants
        .iter()
        .cloned()
        .map(|t| {
            let (store, events) = (store.clone(), args.scale_events);
            tokio::spawn(async move {
                for chunk in 0..events.div_ceil(per_append) {
                    let n = per_append.min(events - chunk * per_append);
                    let batch: Vec<CartEvent> = (0..n).map(|e| cart_event(chunk, e)).collect();
                    store
                        .append_to_stream(&format!("cart-{chunk}"), batch, AppendOptions::default().partition(&t))
                        .await?;
                }
                Ok::<_, emmett_seaorm::Error>(())
            })
        })
        .collect();
    for task in tasks {
        task.await??;
    }
    Ok(tenants)
}

/// `idle`: one caught-up daemon doing nothing for `--idle-seconds`; PostgreSQL transaction ids
/// taken (`xids=`) and statements run on the database (`queries=`) meanwhile.
pub async fn idle(args: &Args, run: &str) -> Res {
    let db = EventStore::new(pool(args).await?);
    if db.get_database_backend() != DbBackend::Postgres {
        eprintln!("idle: PostgreSQL only (transaction ids and statement counts come from its statistics)");
        return Ok(());
    }
    let tenants = tenants(&format!("{run}-idle"), 1);
    create_carts_table(&db, "bench_idle").await?;
    let store = EventStore::new(pool(args).await?);
    let last = store
        .append_to_stream("cart-0", [cart_event(0, 0)], AppendOptions::default().partition(&tenants[0]))
        .await?
        .last_event_global_position;
    let daemon = start(args, &format!("{run}-idle"), "bench_idle", &tenants, |d| d).await?;
    tokio::time::timeout(Duration::from_secs(30), daemon.caught_up(last)).await??;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let scalar = |sql: &'static str| {
        let db = db.clone();
        async move {
            let row = db.query_one_raw(Statement::from_string(DbBackend::Postgres, sql)).await?.expect("a row");
            row.try_get_by_index::<i64>(0)
        }
    };
    let xid = "SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint";
    let statements = "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = current_database()";
    let (xids_before, statements_before) = (scalar(xid).await?, scalar(statements).await?);
    tokio::time::sleep(Duration::from_secs(args.idle_seconds)).await;
    let xids = scalar(xid).await? - xids_before;
    tokio::time::sleep(Duration::from_millis(1500)).await; // statistics are flushed once a second
    let queries = scalar(statements).await? - statements_before - 3; // the reads of this measure
    println!(
        "{}\t0\tevents\t{}\ts\t0\tevents/s\txids={xids}\tqueries={queries}",
        crate::label("idle"),
        args.idle_seconds
    );
    daemon.stop().await?;
    Ok(())
}

/// `name`, padded to `chars` characters (when longer) with what ids must survive: quotes,
/// a backslash, `%`, `|`, spaces, non-ASCII letters and an emoji.
fn tenant_name(name: &str, chars: usize) -> String {
    let hostile = " ' \" %|; é日本 🦀 ";
    let mut padded: String = name.to_owned();
    while padded.chars().count() < chars {
        padded.push(hostile.chars().nth(padded.chars().count() % hostile.chars().count()).expect("a char"));
    }
    padded
}

/// `daemon-tenants-<N>-read`: 500 reads, one after another, of `cart-0` in tenants taken across
/// `tenants`, every one of which has a `cart-0` (median and p99 ms): what a tenant's read costs
/// as the tenants sharing its stream ids grow.
async fn reads_of_a_shared_stream(store: &EventStore, name: &str, tenants: &[String]) -> Res {
    const READS: usize = 500;
    let mut took = Vec::with_capacity(READS);
    let started = Instant::now();
    for i in 0..READS {
        let options = emmett_seaorm::ReadOptions::default().partition(&tenants[i * 7919 % tenants.len()]);
        let began = Instant::now();
        let read = store.read_stream::<CartEvent>("cart-0", options).await?;
        took.push(began.elapsed().as_secs_f64() * 1000.0);
        assert_eq!(read.events.len(), 3, "a tenant's cart-0");
    }
    let secs = started.elapsed().as_secs_f64();
    took.sort_by(f64::total_cmp);
    println!(
        "{}\t{READS}\treads\t{secs:.3}\ts\t{:.0}\treads/s\tp50_ms={:.2}\tp99_ms={:.2}",
        crate::label(&format!("{name}-read")),
        READS as f64 / secs,
        took[READS / 2],
        took[READS * 99 / 100]
    );
    Ok(())
}

/// `daemon-tenants-<N>`: N tenants with one stream of 3 events each, `--tenant-projections`
/// projections, one daemon finding the tenants itself. Catch-up from cold (pairs of projection
/// and tenant per second), then idle for 10 s: rows read and written and commits per second on
/// the database (PostgreSQL's `pg_stat_database`), and the process's resident memory; then the
/// lag of single appends spread over all tenants at each of `--tenant-lag-rates`
/// (`daemon-tenants-<N>-lag-<rate>`: p50/p99 from commit until both projections covered it).
pub async fn tenants_scale(args: &Args, run: &str, count: usize) -> Res {
    let name = format!("daemon-tenants-{count}");
    let run = format!("{run}-{name}");
    let store = EventStore::new(pool(args).await?);
    let names: Vec<String> = (0..count).map(|i| tenant_name(&format!("{run}-t{i:06}"), args.tenant_id_chars)).collect();
    let mut last = 0;
    for chunk in names.chunks(8) {
        let appends = chunk.iter().map(|t| {
            let events: Vec<CartEvent> = (0..3).map(|e| cart_event(0, e)).collect();
            store.append_to_stream("cart-0", events, AppendOptions::default().partition(t))
        });
        for done in futures::future::join_all(appends).await {
            last = last.max(done?.last_event_global_position);
        }
    }
    reads_of_a_shared_stream(&store, &name, &names).await?;
    let db = EventStore::new(pool(args).await?);
    let mut daemon = Daemon::new(EventStore::new(pool(args).await?));
    for p in 0..args.tenant_projections {
        let table = format!("bench_tenants_{count}_{p}");
        create_carts_table(&db, &table).await?;
        daemon = daemon.projection(format!("{run}-p{p}"), carts_projection(&table));
    }
    eprintln!("{name}: catching up"); // a mark to profile from
    let started = Instant::now();
    let daemon = daemon.start().await?;
    tokio::time::timeout(Duration::from_secs(1800), daemon.caught_up(last)).await??;
    let secs = started.elapsed().as_secs_f64();
    let pairs = count * args.tenant_projections;
    let mut idle = String::new();
    if db.get_database_backend() == DbBackend::Postgres {
        // Backends flush their statistics within 10 s of going idle: the catch-up's land first.
        tokio::time::sleep(Duration::from_secs(11)).await;
        let stats = "SELECT (tup_returned + tup_fetched)::bigint, (tup_inserted + tup_updated + tup_deleted)::bigint,
                            xact_commit::bigint FROM pg_stat_database WHERE datname = current_database()";
        let read = || async {
            let row = db.query_one_raw(Statement::from_string(DbBackend::Postgres, stats)).await?.expect("a row");
            Ok::<_, sea_orm::DbErr>([
                row.try_get_by_index::<i64>(0)?,
                row.try_get_by_index(1)?,
                row.try_get_by_index(2)?,
            ])
        };
        let before = read().await?;
        tokio::time::sleep(Duration::from_secs(10)).await;
        tokio::time::sleep(Duration::from_millis(1500)).await; // statistics are flushed once a second
        let after = read().await?;
        let per_second = |i: usize| (after[i] - before[i]) as f64 / 11.5;
        idle = format!(
            "\tidle_rows_read_s={:.0}\tidle_rows_written_s={:.0}\tidle_commits_s={:.1}",
            per_second(0),
            per_second(1),
            per_second(2)
        );
    }
    let rss_mb = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("VmRSS:").map(|v| v.trim().trim_end_matches(" kB").to_owned()))
        })
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(String::new(), |kb| format!("\trss_mb={:.0}", kb / 1024.0));
    println!(
        "{}\t{pairs}\tpairs\t{secs:.3}\ts\t{:.0}\tpairs/s{idle}{rss_mb}",
        crate::label(&name),
        pairs as f64 / secs
    );
    let subscriptions: Vec<String> = (0..args.tenant_projections).map(|p| format!("{run}-p{p}")).collect();
    for &rate in &args.tenant_lag_rates {
        let lag = follow(args, &subscriptions, &names, rate, args.tenant_lag_seconds).await?;
        println!("{}", lag.line(&format!("{name}-lag-{rate}"), args.tenant_lag_seconds));
    }
    daemon.stop().await?;
    Ok(())
}
