//! Tenants spread over several databases (three PostgreSQL databases and a SQLite file) by a
//! `StoreRouter`: each tenant's events land in and are read from its store only; the catalog
//! changes at runtime; unknown tenants and stores are typed errors naming them; a tenant moved
//! between stores is refused for a moment, then found whole at its new store.
#![cfg(all(feature = "postgres", feature = "sqlite"))]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::{Ev, balances};
use emmett_seaorm::daemon::{Daemon, DaemonFleet};
use emmett_seaorm::{AppendOptions, Error, EventStore, ReadOptions, StoreRouter};
use sea_orm::{ConnectionTrait, DatabaseConnection, Statement};

/// The stores' databases (three PostgreSQL, one SQLite) and the catalog's (SQLite), migrated.
struct Databases {
    urls: Vec<(String, String)>,
    catalog: String,
}

impl Databases {
    async fn new() -> Self {
        let mut urls = Vec::new();
        for name in ["pg0", "pg1", "pg2"] {
            urls.push((name.to_owned(), common::postgres().await));
        }
        urls.push(("lite".to_owned(), common::sqlite().await));
        for (_, url) in &urls {
            emmett_seaorm::migrate(&common::connect(url).await.unwrap()).await.unwrap();
        }
        Databases { urls, catalog: common::sqlite().await }
    }

    /// A router over pools of its own (as another process would have) with the catalog.
    async fn router(&self, ttl: Duration) -> StoreRouter {
        let mut router = StoreRouter::new();
        for (name, url) in &self.urls {
            router = router.store(name, EventStore::new(common::connect(url).await.unwrap()));
        }
        router.catalog(common::connect(&self.catalog).await.unwrap(), ttl).await.unwrap()
    }

    async fn pool(&self, store: &str) -> DatabaseConnection {
        let url = &self.urls.iter().find(|(name, _)| name == store).unwrap().1;
        common::connect(url).await.unwrap()
    }

    async fn drop(self) {
        for (_, url) in self.urls {
            common::drop_database(&url).await;
        }
        common::drop_database(&self.catalog).await;
    }
}

/// The tenants with events in `db`, sorted.
async fn tenants_in(db: &DatabaseConnection) -> Vec<String> {
    let sql = "SELECT DISTINCT partition FROM messages ORDER BY partition";
    let rows = db.query_all_raw(Statement::from_string(db.get_database_backend(), sql)).await.unwrap();
    rows.iter().map(|r| r.try_get_by_index(0).unwrap()).collect()
}

async fn deposit(router: &StoreRouter, tenant: &str, amount: i64) -> Result<(), Error> {
    let store = router.for_tenant(tenant).await?;
    store.append_to_stream("acc", [Ev::Deposited { amount }], AppendOptions::default()).await.map(drop)
}

async fn events_of(router: &StoreRouter, tenant: &str) -> Vec<i64> {
    let store = router.for_tenant(tenant).await.unwrap();
    let read = store.read_stream::<Ev>("acc", ReadOptions::default()).await.unwrap();
    read.events.iter().map(|e| if let Ev::Deposited { amount } = e.event { amount } else { 0 }).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tenants_live_in_the_store_the_router_names() {
    let dbs = Databases::new().await;
    let stores = ["pg0", "pg1", "pg2", "lite"];
    let router = dbs.router(Duration::from_millis(200)).await.tenant("vip", "pg2").default_store("pg0");
    // 300 tenants: the catalog spreads 240 over the four stores, 60 fall to the default.
    let tenant = |i: usize| format!("tenant-{i:03}");
    for i in 0..240 {
        router.assign(&tenant(i), stores[i % 4]).await.unwrap();
    }
    for i in 0..300 {
        deposit(&router, &tenant(i), i as i64).await.unwrap();
    }
    deposit(&router, "vip", 7).await.unwrap();
    for (s, store) in stores.iter().enumerate() {
        let mut expected: Vec<String> = (0..240).filter(|i| i % 4 == s).map(tenant).collect();
        match *store {
            "pg0" => expected.extend((240..300).map(tenant)),
            "pg2" => expected.push("vip".into()),
            _ => {}
        }
        expected.sort();
        assert_eq!(tenants_in(&dbs.pool(store).await).await, expected, "{store}");
    }
    for i in [0, 1, 2, 3, 250] {
        assert_eq!(events_of(&router, &tenant(i)).await, [i as i64]);
    }

    // Another router on the same catalog sees a change within its ttl.
    let other = dbs.router(Duration::from_millis(200)).await;
    assert_eq!(other.store_of("tenant-000").await.unwrap(), "pg0");
    let unknown =
        |r: Result<String, Error>| matches!(r, Err(Error::UnknownTenant { partition }) if partition == "newcomer");
    assert!(unknown(other.store_of("newcomer").await));
    router.assign("newcomer", "lite").await.unwrap();
    assert!(unknown(other.store_of("newcomer").await), "cached for the ttl");
    assert_eq!(router.store_of("newcomer").await.unwrap(), "lite", "the router that assigned it knows at once");
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert_eq!(other.store_of("newcomer").await.unwrap(), "lite");

    // Bad input: a tenant nothing names without a default, a store the router doesn't have.
    assert!(
        matches!(other.for_tenant("nobody").await, Err(Error::UnknownTenant { partition }) if partition == "nobody")
    );
    let catalog = common::connect(&dbs.catalog).await.unwrap();
    catalog.execute_unprepared("INSERT INTO emt_tenant_stores (tenant, store) VALUES ('lost', 'gone')").await.unwrap();
    let error = router.for_tenant("lost").await.unwrap_err();
    assert!(
        matches!(&error, Error::UnknownStore { store, partition } if store == "gone" && partition == "lost"),
        "{error}"
    );
    assert!(error.to_string().contains("'gone'"), "{error}");
    assert!(matches!(router.assign("x", "gone").await, Err(Error::UnknownStore { .. })));
    assert_eq!(events_of(&router, "vip").await, [7], "other tenants unaffected");
    assert!(matches!(StoreRouter::new().assign("x", "pg0").await, Err(Error::NoCatalog)));
    dbs.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_moved_tenant_is_refused_for_a_moment_then_whole_at_its_new_store() {
    let dbs = Databases::new().await;
    let ttl = Duration::from_millis(200);
    let mover = dbs.router(ttl).await;
    mover.assign("acme", "pg1").await.unwrap();
    for amount in 0..20 {
        deposit(&mover, "acme", amount).await.unwrap();
    }
    // A writer in another "process" keeps depositing, one handle per append.
    let writer = dbs.router(ttl).await;
    let stop = Arc::new(AtomicBool::new(false));
    let writing = tokio::spawn({
        let stop = Arc::clone(&stop);
        async move {
            let (mut acknowledged, mut refused) = (Vec::new(), 0);
            let mut amount = 100;
            while !stop.load(Ordering::Relaxed) {
                match deposit(&writer, "acme", amount).await {
                    Ok(()) => acknowledged.push(amount),
                    Err(Error::TenantMoving { partition }) => {
                        assert_eq!(partition, "acme");
                        refused += 1;
                    }
                    Err(other) => panic!("{other}"),
                }
                amount += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            (acknowledged, refused)
        }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let moved = mover.move_tenant("acme", "lite", &[]).await.unwrap();
    tokio::time::sleep(ttl + Duration::from_millis(200)).await;
    stop.store(true, Ordering::Relaxed);
    let (acknowledged, refused) = writing.await.unwrap();
    assert!(refused > 0, "writes were refused during the move");
    assert!(moved.events >= 20, "{moved:?}");
    assert_eq!(mover.store_of("acme").await.unwrap(), "lite");
    // Every acknowledged append is at the new store, in order; none is left at the old one.
    let mut expected: Vec<i64> = (0..20).collect();
    expected.extend(&acknowledged);
    assert_eq!(events_of(&mover, "acme").await, expected);
    assert!(tenants_in(&dbs.pool("pg1").await).await.is_empty(), "nothing left at the old store");
    dbs.drop().await;
}

/// Waits until every store's `balances` holds what `expected` says of its tenants.
async fn projected(
    dbs: &Databases,
    stores: &[&str],
    owner: impl Fn(&str) -> String,
    expected: &BTreeMap<String, (i64, i64)>,
) {
    for store in stores {
        let want: Vec<_> = expected
            .iter()
            .filter(|(tenant, _)| owner(tenant) == *store)
            .map(|(tenant, (total, deposits))| (tenant.clone(), "acc".to_owned(), *total, *deposits))
            .collect();
        let pool = dbs.pool(store).await;
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let rows = balances::rows(&pool).await;
            if rows == want {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "{store}: {rows:?} != {want:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fleet_projects_every_store_and_one_down_stops_only_its_tenants() {
    let dbs = Databases::new().await;
    let stores = ["pg0", "pg1", "pg2", "lite"];
    for store in stores {
        balances::create_table(&dbs.pool(store).await).await;
    }
    let router = dbs.router(Duration::from_millis(100)).await;
    let owner = |tenant: &str| stores[tenant[1..].parse::<usize>().unwrap() % 4].to_owned();
    let tenants: Vec<String> = (0..300).map(|i| format!("t{i}")).collect();
    for tenant in &tenants {
        router.assign(tenant, &owner(tenant)).await.unwrap();
    }
    // Two instances, each with pools of its own.
    let start = |router: &StoreRouter| {
        let daemon = |store| {
            let daemon = Daemon::new(store).projection("balances", balances::registry());
            daemon.lease_ttl(Duration::from_secs(2)).renew_every(Duration::from_millis(400))
        };
        DaemonFleet::start(router, daemon)
    };
    let fleet = start(&router);
    let second = start(&dbs.router(Duration::from_millis(100)).await);
    let mut expected = BTreeMap::new();
    let deposit_all = async |expected: &mut BTreeMap<String, (i64, i64)>, of: &[&str]| {
        for tenant in tenants.iter().filter(|t| of.contains(&owner(t).as_str())) {
            deposit(&router, tenant, 5).await.unwrap();
            let (total, deposits) = expected.entry(tenant.clone()).or_insert((0, 0));
            (*total, *deposits) = (*total + 5, *deposits + 1);
        }
    };
    deposit_all(&mut expected, &stores).await;
    projected(&dbs, &stores, owner, &expected).await;

    // pg1's database refuses connections: its tenants stop, the others go on.
    let pg1 = dbs.urls[1].1.rsplit('/').next().unwrap().to_owned();
    let admin = common::connect(&common::postgres_database("postgres")).await.unwrap();
    admin.execute_unprepared(&format!("ALTER DATABASE {pg1} ALLOW_CONNECTIONS false")).await.unwrap();
    let kill = format!("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = '{pg1}'");
    admin.execute_unprepared(&kill).await.unwrap();
    let up = ["pg0", "pg2", "lite"];
    deposit_all(&mut expected, &up).await;
    projected(&dbs, &up, owner, &expected).await;
    let status = fleet.status().await;
    assert!(status["pg1"].is_err(), "{:?}", status["pg1"].as_ref().map(|s| s.leases.len()));
    for store in up {
        assert!(status[store].is_ok(), "{store}: {:?}", status[store].as_ref().err());
    }

    // Back: its tenants are projected again, every read model equals the sequential fold.
    admin.execute_unprepared(&format!("ALTER DATABASE {pg1} ALLOW_CONNECTIONS true")).await.unwrap();
    deposit_all(&mut expected, &["pg1"]).await;
    projected(&dbs, &stores, owner, &expected).await;
    for tenant in &tenants {
        let amounts = events_of(&router, tenant).await;
        assert_eq!((amounts.iter().sum::<i64>(), amounts.len() as i64), expected[tenant], "{tenant}");
    }

    // The second instance killed (dropped): the first takes its tenants over once their leases expire.
    drop(second);
    deposit_all(&mut expected, &stores).await;
    projected(&dbs, &stores, owner, &expected).await;
    let status = fleet.status().await;
    for store in stores {
        let status = status[store].as_ref().unwrap();
        let owners: BTreeSet<_> = status.leases.iter().map(|l| l.owner.as_deref()).collect();
        assert_eq!(owners, BTreeSet::from([Some(status.owner.as_str())]), "{store}: all with the first instance");
    }
    fleet.stop().await.unwrap();
    dbs.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_store_added_at_runtime_gets_its_daemon() {
    let dbs = Databases::new().await;
    for store in ["pg0", "pg1"] {
        balances::create_table(&dbs.pool(store).await).await;
    }
    let catalog = common::connect(&dbs.catalog).await.unwrap();
    let router = StoreRouter::new().store("pg0", EventStore::new(dbs.pool("pg0").await));
    let router = router.catalog(catalog, Duration::from_millis(100)).await.unwrap();
    let fleet = DaemonFleet::start(&router, |store| Daemon::new(store).projection("balances", balances::registry()));
    assert_eq!(fleet.status().await.keys().collect::<Vec<_>>(), ["pg0"]);
    assert!(
        matches!(router.assign("t1", "pg1").await, Err(Error::UnknownStore { store, partition }) if store == "pg1" && partition == "t1")
    );

    // A clone of the router (as an app's request handlers hold) gets the store; the fleet too.
    router.clone().add_store("pg1", EventStore::new(dbs.pool("pg1").await));
    router.assign("t0", "pg0").await.unwrap();
    router.assign("t1", "pg1").await.unwrap();
    deposit(&router, "t0", 3).await.unwrap();
    deposit(&router, "t1", 4).await.unwrap();
    let expected = BTreeMap::from([("t0".to_owned(), (3, 1)), ("t1".to_owned(), (4, 1))]);
    let owner = |tenant: &str| if tenant == "t0" { "pg0".to_owned() } else { "pg1".to_owned() };
    projected(&dbs, &["pg0", "pg1"], owner, &expected).await;
    let status = fleet.status().await;
    assert!(status["pg1"].as_ref().is_ok_and(|s| !s.leases.is_empty()), "{:?}", status["pg1"].as_ref().err());
    fleet.stop().await.unwrap();
    dbs.drop().await;
}
