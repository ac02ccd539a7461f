//! Tenants come and go, on every backend: an export imported into another database is the same
//! tenant there; erasing one removes every row of it the store and its
//! registered read models hold, leaves every other tenant as it was (tenant ids that differ only
//! by case, a prefix or a character a pattern would match included), is idempotent, lets the id
//! start again from scratch, and a running daemon resurrects nothing.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{Ev, TestDb, balances};
use emmett_seaorm::daemon::Daemon;
use emmett_seaorm::projection::ReadModel;
use emmett_seaorm::{AppendOptions, Error, EventStore, ExpectedVersion, ImportOptions, ReadOptions, SnapshotPolicy};
use sea_orm::{ConnectionTrait, DbBackend, Statement};

/// Tenants a careless erase of `t1` would hit: a prefix match, another case, pattern characters.
const TENANTS: [&str; 6] = ["t1", "t10", "T1", "t_", "t%1", "t|1"];

/// The store's tables with a tenant column.
const TABLES: [&str; 6] =
    ["messages", "streams", "subscriptions", "emt_leases", "emt_skipped_events", "emt_aggregate_snapshots"];

async fn scalar(db: &TestDb, sql: &str, tenant: &str) -> i64 {
    let backend = db.db.get_database_backend();
    let sql = match backend {
        DbBackend::Postgres => sql.to_owned(),
        _ => sql.replace(" partition ", " `partition` ").replace("$1", "?"),
    };
    let row = db.db.query_one_raw(Statement::from_sql_and_values(backend, &sql, [tenant.into()])).await;
    row.unwrap_or_else(|e| panic!("{sql}: {e}")).expect("a row").try_get_by_index(0).unwrap()
}

/// Rows of `tenant` per table: the store's, `balances` and the snapshots of its rows.
async fn rows_of(db: &TestDb, tenant: &str) -> BTreeMap<&'static str, i64> {
    let mut rows = BTreeMap::new();
    for table in TABLES {
        rows.insert(table, scalar(db, &format!("SELECT count(*) FROM {table} WHERE partition = $1"), tenant).await);
    }
    rows.insert("balances", scalar(db, "SELECT count(*) FROM balances WHERE tenant_id = $1", tenant).await);
    // The snapshot ids of `balances`: `account_id:…|tenant_id:<tenant, URI-encoded>`.
    let ids = "SELECT count(*) FROM snapshots WHERE readmodel_table_name = 'balances' AND stream_id = $1";
    let mut snapshots = 0;
    for account in ["acc-0", "acc-1", "acc-2"] {
        snapshots += scalar(db, ids, &format!("account_id:{account}|tenant_id:{}", encode(tenant))).await;
    }
    rows.insert("snapshots", snapshots);
    rows
}

fn encode(tenant: &str) -> String {
    tenant.replace('%', "%25").replace('|', "%7C")
}

/// Everything the store gives back of `tenant`: every stream's events and the read model.
async fn contents(db: &TestDb, store: &EventStore, tenant: &str) -> String {
    let mut out = String::new();
    for account in ["acc-0", "acc-1", "acc-2", "old"] {
        let read = store.read_stream::<Ev>(account, ReadOptions::default().partition(tenant)).await.unwrap();
        for e in read.events {
            out += &format!("{account} {} {} {:?} {}\n", e.stream_position, e.global_position, e.event, e.message_id);
        }
    }
    let balances = balances::rows(&db.db).await.into_iter().filter(|r| r.0 == tenant);
    out + &format!("{:?} {:?}", balances.collect::<Vec<_>>(), rows_of(db, tenant).await)
}

/// Fills every tenant: three accounts, an archived stream, an aggregate snapshot, the read model
/// and its snapshots (by a daemon, which also leaves checkpoints and leases).
async fn fill(db: &TestDb, store: &EventStore) {
    balances::create_table(&db.db).await;
    // On PostgreSQL, t1 and t10 have partitions of their own (dropped whole by an erase).
    store.create_partition("t1").await.unwrap();
    store.create_partition("t10").await.unwrap();
    let mut head = 0;
    for tenant in TENANTS {
        let options = || AppendOptions::default().partition(tenant);
        store.append_to_stream("old", [Ev::Deposited { amount: 1 }], options()).await.unwrap();
        assert!(store.archive_stream("old", tenant).await.unwrap());
        for (i, account) in ["acc-0", "acc-1", "acc-2"].into_iter().enumerate() {
            let events = (0..3 + i as i64).map(|amount| Ev::Deposited { amount });
            head = store.append_to_stream(account, events, options()).await.unwrap().last_event_global_position;
        }
        let read = ReadOptions::default().partition(tenant);
        let fold = |total: i64, e: &Ev| if let Ev::Deposited { amount } = e { total + amount } else { total };
        store.aggregate_stream_snapshotted("acc-2", fold, || 0, read, SnapshotPolicy::every(1)).await.unwrap();
    }
    let daemon = Daemon::new(store.clone()).projection("balances", balances::registry()).start().await.unwrap();
    tokio::time::timeout(Duration::from_secs(30), daemon.caught_up(head)).await.expect("caught up").unwrap();
    daemon.stop().await.unwrap();
}

async fn erasing_a_tenant_removes_its_rows_and_only_its(db: TestDb) {
    let store = db.store();
    fill(&db, &store).await;
    let read_models = balances::registry().read_models().to_vec();
    assert_eq!(read_models, [ReadModel::new("balances", "tenant_id")]);
    let mut others = BTreeMap::new();
    for tenant in &TENANTS[1..] {
        others.insert(tenant, contents(&db, &store, tenant).await);
    }
    let before = rows_of(&db, "t1").await;
    for table in ["messages", "streams", "subscriptions", "emt_aggregate_snapshots", "balances", "snapshots"] {
        assert!(before[table] > 0, "t1 has rows in {table}: {before:?}");
    }

    // Counted: what would go, and nothing goes.
    let counted = store.partition_rows("t1", &read_models).await.unwrap();
    assert_eq!(rows_of(&db, "t1").await, before, "counting changes nothing");
    let erased = store.erase_partition("t1", &read_models).await.unwrap();
    assert_eq!(erased, counted, "it removes what it counted");
    let reported: BTreeMap<&str, u64> = erased.tables.iter().map(|(t, n)| (t.as_str(), *n)).collect();
    assert_eq!(reported["messages"] as i64, before["messages"]);
    assert_eq!(reported["balances"] as i64, before["balances"]);
    assert_eq!(reported["snapshots of balances"] as i64, before["snapshots"]);
    assert!(rows_of(&db, "t1").await.values().all(|n| *n == 0), "{:?}", rows_of(&db, "t1").await);
    if db.db.get_database_backend() == DbBackend::Postgres {
        let own = "SELECT count(*) FROM pg_class WHERE relname LIKE $1 AND relkind IN ('r', 'p')";
        assert_eq!(scalar(&db, own, "%\\_p\\_t1\\_%").await, 0, "t1's partitions dropped");
        assert_eq!(scalar(&db, own, "%\\_p\\_t10\\_%").await, 3, "t10's kept");
    }
    for (tenant, seen) in &others {
        assert_eq!(&contents(&db, &store, tenant).await, seen, "{tenant} untouched");
    }

    // Again: nothing left to remove.
    assert_eq!(store.erase_partition("t1", &read_models).await.unwrap().total(), 0);
    // The id starts from scratch: a new stream, projected alone.
    let options = AppendOptions::default().partition("t1").expected(ExpectedVersion::NoStream);
    let head = store.append_to_stream("acc-0", [Ev::Deposited { amount: 40 }], options).await.unwrap();
    assert_eq!((head.next_expected_stream_version, store.stream_exists("old", "t1").await.unwrap()), (1, false));
    let daemon = Daemon::new(store.clone()).projection("balances", balances::registry()).start().await.unwrap();
    let caught_up = daemon.caught_up(head.last_event_global_position);
    tokio::time::timeout(Duration::from_secs(30), caught_up).await.expect("caught up").unwrap();
    daemon.stop().await.unwrap();
    let t1: Vec<_> = balances::rows(&db.db).await.into_iter().filter(|r| r.0 == "t1").collect();
    assert_eq!(t1, [("t1".to_owned(), "acc-0".to_owned(), 40, 1)]);
    // Bad input: typed, nothing done.
    assert!(matches!(
        store.erase_partition("", &read_models).await,
        Err(emmett_seaorm::Error::InvalidIdentifier { .. })
    ));
}

/// A daemon projecting the tenant's backlog while it is erased: the batch in flight commits
/// first or finds nothing, and afterwards no row of the tenant comes back; the other tenant is
/// projected on.
async fn a_running_daemon_resurrects_nothing_of_an_erased_tenant(db: TestDb) {
    let store = db.store();
    balances::create_table(&db.db).await;
    for batch in 0..20 {
        let events = (0..100).map(|amount| Ev::Deposited { amount });
        store
            .append_to_stream(&format!("acc-{batch}"), events, AppendOptions::default().partition("t1"))
            .await
            .unwrap();
    }
    let daemon = Daemon::new(store.clone()).projection("balances", balances::registry()).start().await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let read_models = balances::registry().read_models().to_vec();
    let erased = store.erase_partition("t1", &read_models).await.unwrap();
    assert_eq!(erased.tables.iter().find(|(t, _)| t == "messages").map(|(_, n)| *n), Some(2_000));
    let mut head = 0;
    for i in 0..20 {
        let options = AppendOptions::default().partition("t2");
        head = store
            .append_to_stream("acc-0", [Ev::Deposited { amount: i }], options)
            .await
            .unwrap()
            .last_event_global_position;
    }
    tokio::time::timeout(Duration::from_secs(30), daemon.caught_up(head)).await.expect("caught up").unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let left = rows_of(&db, "t1").await;
    daemon.stop().await.unwrap();
    assert!(left.values().all(|n| *n == 0), "rows of the erased tenant: {left:?}");
    assert_eq!(rows_of(&db, "t1").await, left);
    let t2: Vec<_> = balances::rows(&db.db).await.into_iter().filter(|r| r.0 == "t2").collect();
    assert_eq!(t2, [("t2".to_owned(), "acc-0".to_owned(), (0..20).sum(), 20)]);
}

/// Every event of `tenant` as the store reads it, stream by stream, without global positions
/// (which differ between databases), and whether the archived stream is gone.
async fn events_of(store: &EventStore, tenant: &str) -> Vec<String> {
    let mut out = Vec::new();
    for account in ["acc-0", "acc-1", "acc-2", "old"] {
        let read = store.read_stream::<Ev>(account, ReadOptions::default().partition(tenant)).await.unwrap();
        for e in read.events {
            let at = e.created.timestamp_millis();
            out.push(format!(
                "{account} {} {:?} {} {} {at} {}",
                e.stream_position, e.event, e.message_id, e.message_type, e.metadata
            ));
        }
        out.push(format!("{account} exists: {}", store.stream_exists(account, tenant).await.unwrap()));
    }
    out
}

/// Exported from this backend, imported into a new SQLite database and back into this one under
/// another id: the same streams and events, projected to the same read model; an import into a
/// database that has the tenant is refused unless replacing; a truncated or corrupted file
/// imports nothing and names the line.
async fn a_tenant_exported_and_imported_elsewhere_is_the_same(db: TestDb) {
    let store = db.store();
    fill(&db, &store).await;
    let mut file = Vec::new();
    let written = store.export_partition("t|1", &mut file).await.unwrap();
    assert_eq!((written.streams, written.events), (4, 13), "three accounts and an archived stream");
    let text = String::from_utf8(file.clone()).unwrap();
    assert_eq!(text.lines().count(), 1 + 4 + 13);

    let elsewhere = emmett_seaorm::testing::TestDatabase::at("sqlite::memory:").await;
    let there = EventStore::new(elsewhere.connection().clone());
    let read = there.import_partition(&file[..], ImportOptions::default()).await.unwrap();
    assert_eq!(read, written);
    assert_eq!(events_of(&there, "t|1").await, events_of(&store, "t|1").await);
    // The daemon there projects it as here.
    balances::create_table(elsewhere.connection()).await;
    let daemon = Daemon::new(there.clone()).projection("balances", balances::registry()).start().await.unwrap();
    let head = there.read_stream::<Ev>("acc-2", ReadOptions::default().partition("t|1")).await.unwrap();
    let head = head.events.last().unwrap().global_position;
    tokio::time::timeout(Duration::from_secs(30), daemon.caught_up(head)).await.expect("caught up").unwrap();
    daemon.stop().await.unwrap();
    let projected =
        |rows: Vec<(String, String, i64, i64)>| rows.into_iter().filter(|r| r.0 == "t|1").collect::<Vec<_>>();
    assert_eq!(projected(balances::rows(elsewhere.connection()).await), projected(balances::rows(&db.db).await));

    // Refused where the tenant is, unless replacing; then the same again.
    let again = there.import_partition(&file[..], ImportOptions::default()).await;
    assert!(matches!(again, Err(Error::PartitionExists { ref partition }) if partition == "t|1"), "{again:?}");
    let read_models = balances::registry().read_models().to_vec();
    let replaced = there.import_partition(&file[..], ImportOptions::default().replace(&read_models)).await.unwrap();
    assert_eq!(replaced, written);
    assert_eq!(events_of(&there, "t|1").await, events_of(&store, "t|1").await);
    assert!(balances::rows(elsewhere.connection()).await.is_empty(), "the replaced tenant's rows wait for the daemon");

    // Back here under another id: its own export is the same file but for ids and positions.
    store.import_partition(&file[..], ImportOptions::default().partition("copy")).await.unwrap();
    assert_eq!(events_of(&store, "copy").await, events_of(&store, "t|1").await);
    let mut copy = Vec::new();
    store.export_partition("copy", &mut copy).await.unwrap();
    let without_positions = |file: &[u8]| -> Vec<serde_json::Value> {
        let lines = String::from_utf8(file.to_vec()).unwrap();
        lines
            .lines()
            .skip(1)
            .map(|l| {
                let mut line: serde_json::Value = serde_json::from_str(l).unwrap();
                if let Some(event) = line.get_mut("event") {
                    event.as_object_mut().unwrap().remove("global_position");
                }
                line
            })
            .collect()
    };
    assert_eq!(without_positions(&copy), without_positions(&file));

    // Bad files: nothing imported, the line named.
    let lines: Vec<&str> = text.lines().collect();
    let truncated = lines[..lines.len() - 1].join("\n");
    let failed = store.import_partition(truncated.as_bytes(), ImportOptions::default().partition("bad")).await;
    assert!(matches!(failed, Err(Error::Import { line: 18, .. })), "{failed:?}");
    let mut corrupted = lines.clone();
    corrupted[9] = "{\"event\": {\"stream_id\": ";
    let failed =
        store.import_partition(corrupted.join("\n").as_bytes(), ImportOptions::default().partition("bad")).await;
    assert!(matches!(failed, Err(Error::Import { line: 10, .. })), "{failed:?}");
    // A stream's row left out, or its events out of order: refused where it shows.
    let without_row: Vec<&str> = lines.iter().enumerate().filter(|(i, _)| *i != 1).map(|(_, l)| *l).collect();
    let failed =
        store.import_partition(without_row.join("\n").as_bytes(), ImportOptions::default().partition("bad")).await;
    assert!(
        matches!(&failed, Err(Error::Import { reason, .. }) if reason.contains("without its stream row")),
        "{failed:?}"
    );
    let mut swapped = lines.clone();
    let acc2 = |l: &&str| l.contains("\"event\"") && l.contains("\"stream_id\":\"acc-2\"");
    let (first, second) = {
        let mut at = swapped.iter().enumerate().filter(|(_, l)| acc2(l)).map(|(i, _)| i);
        (at.next().unwrap(), at.next().unwrap())
    };
    swapped.swap(first, second);
    let failed = store.import_partition(swapped.join("\n").as_bytes(), ImportOptions::default().partition("bad")).await;
    assert!(
        matches!(&failed, Err(Error::Import { reason, .. }) if reason.contains("position 2 of stream 'acc-2'")),
        "{failed:?}"
    );
    let failed = store.import_partition(&b"{}\n"[..], ImportOptions::default().partition("bad")).await;
    assert!(matches!(failed, Err(Error::Import { line: 1, .. })), "{failed:?}");
    assert!(rows_of(&db, "bad").await.values().all(|n| *n == 0));
    assert_eq!(store.export_partition("bad", &mut Vec::new()).await.unwrap().events, 0);
}

/// Moved to a new SQLite database: there as it was here, gone here, the others untouched; a
/// move that stopped after its copy (a crash) finishes when run again; a different copy there
/// is refused.
async fn a_moved_tenant_is_there_and_gone_here(db: TestDb) {
    let store = db.store();
    fill(&db, &store).await;
    let read_models = balances::registry().read_models().to_vec();
    let mut others = BTreeMap::new();
    for tenant in ["t1", "t10", "t_", "t%1", "t|1"] {
        others.insert(tenant, contents(&db, &store, tenant).await);
    }
    let before = events_of(&store, "T1").await;
    let elsewhere = emmett_seaorm::testing::TestDatabase::at("sqlite::memory:").await;
    let there = EventStore::new(elsewhere.connection().clone());
    let moved = store.move_partition("T1", &there, &read_models).await.unwrap();
    assert_eq!((moved.streams, moved.events), (4, 13));
    assert_eq!(events_of(&there, "T1").await, before);
    assert!(rows_of(&db, "T1").await.values().all(|n| *n == 0), "{:?}", rows_of(&db, "T1").await);
    for (tenant, seen) in &others {
        assert_eq!(&contents(&db, &store, tenant).await, seen, "{tenant} untouched");
    }
    // Copied, then the process died before the erase: run again, it finishes.
    let mut file = Vec::new();
    store.export_partition("t10", &mut file).await.unwrap();
    there.import_partition(&file[..], ImportOptions::default()).await.unwrap();
    let t10 = events_of(&store, "t10").await;
    store.move_partition("t10", &there, &read_models).await.unwrap();
    assert_eq!(events_of(&there, "t10").await, t10);
    assert!(rows_of(&db, "t10").await.values().all(|n| *n == 0));
    // A different tenant of that id there: refused, nothing changed.
    there.import_partition(&file[..], ImportOptions::default().partition("t_")).await.unwrap();
    let refused = store.move_partition("t_", &there, &read_models).await;
    assert!(matches!(refused, Err(Error::PartitionExists { .. })), "{refused:?}");
    assert_eq!(contents(&db, &store, "t_").await, others["t_"]);
}

/// Appends to the tenant race its erase: each append lands wholly before it (and is erased) or
/// after it (a new stream from position 1); no stream row without its events or events without
/// their stream row is left, and every acknowledged append after the erase is there.
async fn appends_racing_an_erase_leave_whole_streams(db: TestDb) {
    const WRITERS: usize = 4;
    let store = db.store();
    let running = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let (store, running) = (store.clone(), running.clone());
        writers.push(tokio::spawn(async move {
            let mut acknowledged = Vec::new();
            let mut i = 0;
            while running.load(std::sync::atomic::Ordering::SeqCst) {
                let events = [Ev::Deposited { amount: 1 }, Ev::Deposited { amount: 2 }];
                let options = AppendOptions::default().partition("t1");
                match store.append_to_stream(&format!("w{w}-{}", i % 5), events, options).await {
                    Ok(done) => acknowledged.push((format!("w{w}-{}", i % 5), done.last_event_global_position)),
                    Err(e) if e.is_transient() => {}
                    Err(e) => panic!("writer {w}: {e}"),
                }
                i += 1;
            }
            acknowledged
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let erased = store.erase_partition("t1", &[]).await.unwrap();
    assert!(erased.total() > 0);
    tokio::time::sleep(Duration::from_millis(300)).await;
    running.store(false, std::sync::atomic::Ordering::SeqCst);
    let mut acknowledged = Vec::new();
    for writer in writers {
        acknowledged.extend(writer.await.unwrap());
    }
    // Every stream of t1 now: its row's version equals its events, numbered 1..=version.
    let mut positions = BTreeMap::<String, Vec<u64>>::new();
    for stream in (0..WRITERS).flat_map(|w| (0..5).map(move |i| format!("w{w}-{i}"))) {
        let read = store.read_stream::<Ev>(&stream, ReadOptions::default().partition("t1")).await.unwrap();
        let numbered: Vec<u64> = read.events.iter().map(|e| e.stream_position).collect();
        assert_eq!(numbered, (1..=read.current_stream_version).collect::<Vec<_>>(), "{stream}: whole, from 1");
        positions.insert(stream, read.events.iter().map(|e| e.global_position).collect());
    }
    let stored: i64 = scalar(&db, "SELECT count(*) FROM messages WHERE partition = $1", "t1").await;
    assert_eq!(stored as usize, positions.values().map(Vec::len).sum::<usize>(), "no event outside a live stream");
    // Acknowledged after the erase (positions past every erased one are kept): still there.
    let kept: std::collections::BTreeSet<u64> = positions.values().flatten().copied().collect();
    let first_kept = kept.first().copied().unwrap_or(u64::MAX);
    for (stream, position) in acknowledged.iter().filter(|(_, p)| *p > first_kept) {
        assert!(kept.contains(position), "{stream}: acknowledged event {position} lost");
    }
}

/// A store bound to a tenant works in it when no partition is named, and refuses every call
/// naming another (before any SQL: nothing written); a session opened from it is bound too.
async fn a_tenant_bound_store_works_in_its_tenant_only(db: TestDb) {
    let store = db.store().inline("balances", balances::registry());
    balances::create_table(&db.db).await;
    let t1 = store.for_tenant("t1");
    assert_eq!((t1.tenant(), store.tenant()), (Some("t1"), None));
    t1.append_to_stream("acc-0", [Ev::Deposited { amount: 3 }], AppendOptions::default()).await.unwrap();
    let explicit = AppendOptions::default().partition("t1").expected(ExpectedVersion::Exact(1));
    t1.append_to_stream("acc-0", [Ev::Deposited { amount: 4 }], explicit).await.unwrap();
    t1.with_session(|s| async move {
        s.append_to_stream("acc-1", [Ev::Deposited { amount: 5 }], AppendOptions::default()).await?;
        let other =
            s.append_to_stream("acc-1", [Ev::Deposited { amount: 1 }], AppendOptions::default().partition("t2"));
        assert!(matches!(other.await, Err(Error::OtherTenant { .. })));
        Ok::<_, Error>(())
    })
    .await
    .unwrap();
    let read = store.read_stream::<Ev>("acc-0", ReadOptions::default().partition("t1")).await.unwrap();
    assert_eq!(read.current_stream_version, 2, "written in t1");
    assert_eq!(t1.read_stream::<Ev>("acc-1", ReadOptions::default()).await.unwrap().current_stream_version, 1);
    assert_eq!(balances::rows(&db.db).await.len(), 2, "the inline projection ran in t1");

    let other = |result: Result<(), Error>| {
        let error = result.expect_err("another tenant");
        assert!(
            matches!(&error, Error::OtherTenant { tenant, partition } if tenant == "t1" && partition == "t2"),
            "{error}"
        );
    };
    let t2 = ReadOptions::default().partition("t2");
    let sum = |total: i64, _: &Ev| total + 1;
    other(t1.append_to_stream("acc-0", [Ev::Closed], AppendOptions::default().partition("t2")).await.map(drop));
    other(t1.read_stream::<Ev>("acc-0", t2.clone()).await.map(drop));
    other(t1.aggregate_stream("acc-0", sum, || 0, t2).await.map(drop));
    other(t1.stream_exists("acc-0", "t2").await.map(drop));
    other(t1.archive_stream("acc-0", "t2").await.map(drop));
    other(t1.create_partition("t2").await);
    other(t1.partition_rows("t2", &[]).await.map(drop));
    other(t1.erase_partition("t2", &[]).await.map(drop));
    other(t1.export_partition("t2", tokio::io::sink()).await.map(drop));
    let mut file = Vec::new();
    store.export_partition("t1", &mut file).await.unwrap();
    let import = t1.import_partition(&file[..], ImportOptions::default().partition("t2"));
    other(import.await.map(drop));
    assert_eq!(scalar(&db, "SELECT count(*) FROM streams WHERE partition = $1", "t2").await, 0, "nothing written");
    // Row-level security is PostgreSQL's: elsewhere it is refused, naming the backend.
    if db.db.get_database_backend() != DbBackend::Postgres {
        let refused = emmett_seaorm::rls::enable(&db.db, &[]).await.unwrap_err().to_string();
        assert!(refused.contains("row-level security"), "{refused}");
    }
}

conformance!(with_pooler:
    a_tenant_bound_store_works_in_its_tenant_only,
    erasing_a_tenant_removes_its_rows_and_only_its,
    a_running_daemon_resurrects_nothing_of_an_erased_tenant,
    a_tenant_exported_and_imported_elsewhere_is_the_same,
    a_moved_tenant_is_there_and_gone_here,
    appends_racing_an_erase_leave_whole_streams,
);

/// PostgreSQL: a tenant with partitions of its own is erased beside a long transaction of
/// another tenant (which holds the parent tables' lock a drop needs): within a moment, emptied
/// instead of dropped, and no other tenant waits for it; erased again later, the empty
/// partitions go.
#[cfg(feature = "postgres")]
async fn an_erase_beside_a_long_transaction_blocks_no_one(db: TestDb) {
    use sea_orm::TransactionTrait;
    let store = db.store();
    balances::create_table(&db.db).await;
    store.create_partition("own").await.unwrap();
    for tenant in ["own", "other"] {
        let events = (0..50).map(|amount| Ev::Deposited { amount });
        store.append_to_stream("acc", events, AppendOptions::default().partition(tenant)).await.unwrap();
    }
    let long = db.db.begin().await.unwrap();
    long.execute_unprepared("SELECT count(*) FROM messages WHERE partition = 'other'").await.unwrap();
    let started = std::time::Instant::now();
    let erased = store.erase_partition("own", &[]).await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(3), "erased in {:?}", started.elapsed());
    assert_eq!(erased.tables.iter().find(|(t, _)| t == "messages").map(|(_, n)| *n), Some(50));
    // Others read and write meanwhile.
    let other = AppendOptions::default().partition("other");
    tokio::time::timeout(Duration::from_secs(2), store.append_to_stream("acc", [Ev::Deposited { amount: 1 }], other))
        .await
        .expect("not blocked")
        .unwrap();
    assert!(rows_of(&db, "own").await.values().all(|n| *n == 0));
    let own = "SELECT count(*) FROM pg_class WHERE relname LIKE $1 AND relkind = 'r'";
    assert_eq!(scalar(&db, own, "messages\\_p\\_own\\_%").await, 1, "emptied, still there");
    long.commit().await.unwrap();
    assert_eq!(store.erase_partition("own", &[]).await.unwrap().total(), 0);
    assert_eq!(scalar(&db, own, "messages\\_p\\_own\\_%").await, 0, "dropped once free");
}

#[cfg(feature = "postgres")]
mod postgres_only {
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn an_erase_beside_a_long_transaction_blocks_no_one() {
        crate::common::run(crate::common::postgres().await, super::an_erase_beside_a_long_transaction_blocks_no_one)
            .await;
    }
}
