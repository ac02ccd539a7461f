//! Conformance suite of snapshot projections and the ProjectionRunner, on every backend.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::{Ev, Picky, TestDb};
use emmett_seaorm::projection::{
    EventHandler, ProjectionContext, ProjectionRegistry, ProjectionRunner, RunOptions, SnapshotProjection,
    construct_stream_id,
};
use emmett_seaorm::schema::{snapshots, subscriptions};
use emmett_seaorm::{AppendOptions, Error, EventStore, ExpectedVersion, ReadOptions, RecordedEvent, columns, keys};
use sea_orm::sea_query::{Alias, ColumnDef, Index, Table};
use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, EntityTrait, Statement};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
struct Account {
    owner: String,
    total: i64,
    deposits: u32,
    closed: bool,
}

fn evolve(mut acc: Account, e: &Ev) -> Account {
    match e {
        Ev::Opened { owner } => acc.owner = owner.clone(),
        Ev::Deposited { amount } => {
            acc.total += amount;
            acc.deposits += 1;
        }
        Ev::Closed => acc.closed = true,
    }
    acc
}

fn account_keys(e: &RecordedEvent<Ev>, tenant: &str) -> emmett_seaorm::projection::Keys {
    keys! { "tenant_id" => tenant, "account_id" => &e.stream_id }
}

fn projection(table: &str) -> SnapshotProjection<Ev, Account> {
    SnapshotProjection::new(table, account_keys, evolve, Account::default)
        .columns(|a: &Account| columns! { "total" => a.total, "deposits" => a.deposits as i64 })
}

/// Creates a read-model table: keys, `total`, `deposits`, and the legacy snapshot columns.
async fn create_read_model(db: &DatabaseConnection, table: &str, legacy: bool) {
    let mut create = Table::create();
    create
        .table(Alias::new(table))
        .col(ColumnDef::new(Alias::new("tenant_id")).string().not_null())
        .col(ColumnDef::new(Alias::new("account_id")).string().not_null())
        .col(ColumnDef::new(Alias::new("total")).big_integer())
        .col(ColumnDef::new(Alias::new("deposits")).big_integer())
        .primary_key(Index::create().col(Alias::new("tenant_id")).col(Alias::new("account_id")));
    if legacy {
        create
            .col(ColumnDef::new(Alias::new("snapshot")).json_binary())
            .col(ColumnDef::new(Alias::new("stream_id")).string())
            .col(ColumnDef::new(Alias::new("last_stream_position")).big_integer())
            .col(ColumnDef::new(Alias::new("last_global_position")).big_integer());
    }
    db.execute(&create).await.unwrap();
}

/// `(account_id, total, deposits)` rows of a read model for one tenant, sorted.
async fn read_model(db: &DatabaseConnection, table: &str, tenant: &str) -> Vec<(String, i64, i64)> {
    let select = sea_orm::sea_query::Query::select()
        .columns([Alias::new("account_id"), Alias::new("total"), Alias::new("deposits")])
        .from(Alias::new(table))
        .and_where(sea_orm::sea_query::ExprTrait::eq(sea_orm::sea_query::Expr::col(Alias::new("tenant_id")), tenant))
        .order_by(Alias::new("account_id"), sea_orm::Order::Asc)
        .to_owned();
    db.query_all(&select)
        .await
        .unwrap()
        .into_iter()
        .map(|r| {
            (r.try_get("", "account_id").unwrap(), r.try_get("", "total").unwrap(), r.try_get("", "deposits").unwrap())
        })
        .collect()
}

/// Appends `streams` accounts to `tenant`, account i with i + 2 deposits, in a few appends.
async fn seed(store: &EventStore, tenant: &str, streams: usize) {
    for i in 0..streams {
        let id = format!("acc-{i:02}");
        let opts = AppendOptions::default().partition(tenant);
        store.append_to_stream(&id, [Ev::Opened { owner: format!("o{i}") }], opts.clone()).await.unwrap();
        let deposits: Vec<Ev> = (0..i as i64 + 2).map(|d| Ev::Deposited { amount: 10 * d + 1 }).collect();
        store.append_to_stream(&id, deposits, opts).await.unwrap();
    }
}

/// The read model a sequential fold of every stream of `tenant` gives.
async fn folded(store: &EventStore, tenant: &str, streams: usize) -> Vec<(String, i64, i64)> {
    let mut rows = Vec::new();
    for i in 0..streams {
        let id = format!("acc-{i:02}");
        let acc = store
            .aggregate_stream(&id, evolve, Account::default, ReadOptions::default().partition(tenant))
            .await
            .unwrap();
        if acc.stream_exists {
            rows.push((id, acc.state.total, acc.state.deposits as i64));
        }
    }
    rows
}

async fn checkpoint(db: &DatabaseConnection, subscription: &str, tenant: &str) -> Option<i64> {
    subscriptions::Entity::find_by_id((subscription.to_owned(), 1, tenant.to_owned()))
        .one(db)
        .await
        .unwrap()
        .map(|s| s.last_processed_position)
}

async fn fold_equals_read_model_and_rerun_is_a_no_op(db: TestDb) {
    let store = db.store();
    create_read_model(&db.db, "accounts", false).await;
    seed(&store, "t1", 6).await;
    seed(&store, "t2", 2).await;
    let runner = ProjectionRunner::new(store.clone(), ProjectionRegistry::new().with(projection("accounts")));

    let first =
        runner.project_partition("accounts-rm", RunOptions::default().partition("t1").batch_size(7)).await.unwrap();
    assert_eq!(first.processed, (0..6).map(|i| i + 3).sum::<u64>());
    assert_eq!(read_model(&db.db, "accounts", "t1").await, folded(&store, "t1", 6).await);
    assert!(read_model(&db.db, "accounts", "t2").await.is_empty(), "another tenant's events stay out");

    // The snapshot is the fold, stored under the TypeScript-compatible id.
    let id = construct_stream_id(&keys! { "tenant_id" => "t1", "account_id" => "acc-03" });
    assert_eq!(id, "account_id:acc-03|tenant_id:t1");
    let snap = snapshots::Entity::find_by_id(("accounts".to_owned(), id)).one(&db.db).await.unwrap().unwrap();
    let expected = store
        .aggregate_stream("acc-03", evolve, Account::default, ReadOptions::default().partition("t1"))
        .await
        .unwrap();
    assert_eq!(serde_json::from_value::<Account>(snap.snapshot).unwrap(), expected.state);
    assert_eq!(snap.last_stream_position as u64, expected.current_stream_version);

    let again = runner.project_partition("accounts-rm", RunOptions::default().partition("t1")).await.unwrap();
    assert_eq!((again.processed, again.last_processed_position), (0, first.last_processed_position));

    // New events are picked up from the checkpoint; the fold still matches.
    store
        .append_to_stream(
            "acc-01",
            [Ev::Deposited { amount: 1000 }, Ev::Closed],
            AppendOptions::default().partition("t1"),
        )
        .await
        .unwrap();
    let more = runner.project_partition("accounts-rm", RunOptions::default().partition("t1")).await.unwrap();
    assert_eq!(more.processed, 2);
    assert_eq!(read_model(&db.db, "accounts", "t1").await, folded(&store, "t1", 6).await);
    assert_eq!(checkpoint(&db.db, "accounts-rm", "t1").await, Some(more.last_processed_position as i64));

    // A second subscription over the same snapshots (e.g. a rebuild) adds nothing twice.
    let rebuild = runner.project_partition("accounts-rm-2", RunOptions::default().partition("t1")).await.unwrap();
    assert_eq!(rebuild.processed, first.processed + 2);
    assert_eq!(read_model(&db.db, "accounts", "t1").await, folded(&store, "t1", 6).await);
}

async fn project_events_per_stream_resumes_from_its_checkpoint(db: TestDb) {
    let store = db.store();
    create_read_model(&db.db, "accounts", false).await;
    seed(&store, "t1", 3).await;
    let runner = ProjectionRunner::new(store.clone(), ProjectionRegistry::new().with(projection("accounts")));
    let opts = RunOptions::default().partition("t1");

    let one = runner.project_events("acc:acc-02", "acc-02", opts.clone().batch_size(2).single_batch()).await.unwrap();
    assert_eq!((one.processed, one.current_stream_version), (2, 5));
    assert_eq!(checkpoint(&db.db, "acc:acc-02", "t1").await, Some(2), "stream-position checkpoint, as in TypeScript");
    let rest = runner.project_events("acc:acc-02", "acc-02", opts.clone().batch_size(2)).await.unwrap();
    assert_eq!(rest.processed, 3);
    for i in 0..3 {
        let id = format!("acc-{i:02}");
        runner.project_events(&format!("acc:{id}"), &id, opts.clone()).await.unwrap();
    }
    assert_eq!(read_model(&db.db, "accounts", "t1").await, folded(&store, "t1", 3).await);
    let noop = runner.project_events("acc:acc-00", "acc-00", opts.clone()).await.unwrap();
    assert_eq!((noop.processed, noop.current_stream_version), (0, 3));
    let missing = runner.project_events("acc:none", "none", opts).await.unwrap();
    assert_eq!((missing.processed, missing.current_stream_version), (0, 0));
}

/// Four runners (two connection pools) race on one partition while events keep arriving:
/// the read model equals one sequential fold.
async fn concurrent_runners_give_one_sequential_fold(db: TestDb) {
    let store = db.store();
    let other = EventStore::new(db.second_pool().await);
    create_read_model(&db.db, "accounts", false).await;
    seed(&store, "t1", 12).await;
    let registry = || ProjectionRegistry::new().with(projection("accounts"));
    let runners: Vec<_> = (0..4)
        .map(|i| {
            let runner = ProjectionRunner::new(if i % 2 == 0 { store.clone() } else { other.clone() }, registry());
            tokio::spawn(async move {
                for _ in 0..3 {
                    runner
                        .project_partition("accounts-rm", RunOptions::default().partition("t1").batch_size(5))
                        .await?;
                }
                Ok::<_, Error>(())
            })
        })
        .collect();
    let writer = {
        let store = store.clone();
        tokio::spawn(async move {
            for i in 0..12 {
                let opts = AppendOptions::default().partition("t1");
                store.append_to_stream(&format!("acc-{i:02}"), [Ev::Deposited { amount: 7 }], opts).await.unwrap();
            }
        })
    };
    writer.await.unwrap();
    for r in runners {
        r.await.unwrap().unwrap();
    }
    ProjectionRunner::new(store.clone(), registry())
        .project_partition("accounts-rm", RunOptions::default().partition("t1"))
        .await
        .unwrap();
    assert_eq!(read_model(&db.db, "accounts", "t1").await, folded(&store, "t1", 12).await);

    // The same with per-stream runners racing on one stream.
    create_read_model(&db.db, "accounts_by_stream", false).await;
    let runners: Vec<_> = (0..4)
        .map(|i| {
            let runner = ProjectionRunner::new(
                if i % 2 == 0 { store.clone() } else { other.clone() },
                ProjectionRegistry::new().with(projection("accounts_by_stream")),
            );
            tokio::spawn(async move {
                runner.project_events("s:acc-11", "acc-11", RunOptions::default().partition("t1").batch_size(3)).await
            })
        })
        .collect();
    let mut processed = 0;
    for r in runners {
        processed += r.await.unwrap().unwrap().processed;
    }
    assert_eq!(processed, 15, "every event projected exactly once across the racing runners");
    let expected: Vec<_> = folded(&store, "t1", 12).await.into_iter().filter(|r| r.0 == "acc-11").collect();
    assert_eq!(read_model(&db.db, "accounts_by_stream", "t1").await, expected);
}

/// One read-model row fed by several streams and tenants. Inline appends (two pools) race to
/// create it and each folds its own events, whatever order they commit in (PostgreSQL inserts
/// a new snapshot without a placeholder row: the losers of the race run again). Runs over
/// partitions can't tell which of a row's earlier positions another tenant folded: the tenant
/// whose events lie below the row's position fails typed instead of skipping them.
async fn a_row_shared_by_streams_and_tenants_loses_no_event(db: TestDb) {
    let store = db.store();
    let other = EventStore::new(db.second_pool().await);
    let shared = |table: &str| {
        let everyone = |_: &RecordedEvent<Ev>, _: &str| keys! { "tenant_id" => "all", "account_id" => "all" };
        SnapshotProjection::new(table, everyone, evolve, Account::default)
            .columns(|a: &Account| columns! { "total" => a.total, "deposits" => a.deposits as i64 })
    };
    // In the central snapshots table, then in the row.
    for in_table in [false, true] {
        let table = if in_table { "everyone_in_row" } else { "everyone_inline" };
        create_read_model(&db.db, table, in_table).await;
        let inline = |store: &EventStore| {
            let projection = if in_table { shared(table).in_table() } else { shared(table) };
            store.clone().inline("everyone", ProjectionRegistry::new().with(projection))
        };
        let (inline, inline_other) = (inline(&store), inline(&other));
        for round in 0..3 {
            let appends: Vec<_> = (0..8)
                .map(|i| {
                    let store = if i % 2 == 0 { inline.clone() } else { inline_other.clone() };
                    tokio::spawn(async move {
                        let opts = AppendOptions::default().partition(format!("t{}", i % 3));
                        store.append_to_stream(&format!("s-{i}"), [Ev::Deposited { amount: i }], opts).await
                    })
                })
                .collect();
            for a in appends {
                a.await.unwrap().unwrap();
            }
            let expected = ("all".to_owned(), 28 * (round + 1), 8 * (round + 1));
            assert_eq!(read_model(&db.db, table, "all").await, vec![expected], "{table}, round {round}");
        }
    }

    create_read_model(&db.db, "everyone", false).await;
    for t in 0..8 {
        let deposits = (0..3).map(|d| Ev::Deposited { amount: 10 * t + d });
        store.append_to_stream("acc", deposits, AppendOptions::default().partition(format!("p{t}"))).await.unwrap();
    }
    let runner =
        |store: &EventStore| ProjectionRunner::new(store.clone(), ProjectionRegistry::new().with(shared("everyone")));
    let options = |t: i64| RunOptions::default().partition(format!("p{t}"));
    assert_eq!(runner(&store).project_partition("everyone-rm", options(7)).await.unwrap().processed, 3);
    let runners: Vec<_> = (0..7)
        .map(|t| {
            let runner = runner(if t % 2 == 0 { &store } else { &other });
            tokio::spawn(async move { runner.project_partition("everyone-rm", options(t)).await })
        })
        .collect();
    for (t, r) in runners.into_iter().enumerate() {
        match r.await.unwrap() {
            Err(Error::SharedRowAcrossPartitions { table, partitions, .. }) => {
                assert_eq!((table.as_str(), partitions), ("everyone", vec!["p7".to_owned(), format!("p{t}")]));
            }
            other => panic!("p{t}: expected SharedRowAcrossPartitions, got {other:?}"),
        }
    }
    let p7 = ("all".to_owned(), 70 + 71 + 72, 3);
    assert_eq!(read_model(&db.db, "everyone", "all").await, vec![p7.clone()]);

    // Rebuilding a tenant would start the row over with its events alone: refused for a row
    // another tenant wrote last, done for the tenant that wrote it.
    match runner(&store).rebuild("everyone-rm", options(0), |_| {}).await {
        Err(Error::RebuildIncomplete { failed, .. }) => {
            assert!(matches!(&failed[..], [(t, Error::SharedRowAcrossPartitions { .. })] if t == "p0"), "{failed:?}")
        }
        other => panic!("expected RebuildIncomplete, got {other:?}"),
    }
    assert_eq!(read_model(&db.db, "everyone", "all").await, vec![p7.clone()]);
    // From nothing, one event per batch: later batches build on the row the first one created.
    for sql in ["DELETE FROM everyone", "DELETE FROM snapshots"] {
        db.db.execute_unprepared(sql).await.unwrap();
    }
    let one_by_one = options(7).batch_size(1);
    assert_eq!(runner(&store).rebuild("everyone-rm", one_by_one.clone(), |_| {}).await.unwrap().processed, 3);
    assert_eq!(read_model(&db.db, "everyone", "all").await, vec![p7.clone()]);
    create_read_model(&db.db, "everyone_row", true).await;
    let in_row =
        ProjectionRunner::new(store.clone(), ProjectionRegistry::new().with(shared("everyone_row").in_table()));
    assert_eq!(in_row.rebuild("everyone-row", one_by_one, |_| {}).await.unwrap().processed, 3);
    assert_eq!(read_model(&db.db, "everyone_row", "all").await, vec![p7]);
}

async fn handler_failure_rolls_the_batch_back(db: TestDb) {
    let store = db.store();
    create_read_model(&db.db, "accounts", false).await;
    // One transaction, so the runner sees all four events in one batch.
    store
        .with_session(|s| async move {
            let opts = AppendOptions::default().partition("t1");
            s.append_to_stream("a", [Ev::Opened { owner: "a".into() }, Ev::Deposited { amount: 1 }], opts.clone())
                .await?;
            s.append_to_stream("b", [Ev::Opened { owner: "b".into() }, Ev::Deposited { amount: 13 }], opts).await
        })
        .await
        .unwrap();
    let picky = Arc::new(AtomicBool::new(true));
    let registry = ProjectionRegistry::new().with(projection("accounts")).on(["Deposited"], Picky(picky.clone()));
    let runner = ProjectionRunner::new(store.clone(), registry);

    let failed = runner.project_partition("rm", RunOptions::default().partition("t1")).await;
    match failed {
        Err(Error::Handler { stream, partition, position, message_type, .. }) => {
            assert_eq!(
                (stream.as_str(), partition.as_str(), position, message_type.as_str()),
                ("b", "t1", 2, "Deposited")
            );
        }
        other => panic!("{other:?}"),
    }
    assert!(read_model(&db.db, "accounts", "t1").await.is_empty(), "nothing of the batch was written");
    assert_eq!(snapshots::Entity::find().all(&db.db).await.unwrap().len(), 0);
    assert_eq!(checkpoint(&db.db, "rm", "t1").await.unwrap_or(0), 0, "the checkpoint did not move");

    picky.store(false, Ordering::SeqCst);
    assert_eq!(runner.project_partition("rm", RunOptions::default().partition("t1")).await.unwrap().processed, 4);
    assert_eq!(read_model(&db.db, "accounts", "t1").await, vec![("a".into(), 1, 1), ("b".into(), 13, 1)]);
}

async fn key_set_mismatch_is_a_typed_error(db: TestDb) {
    let store = db.store();
    create_read_model(&db.db, "accounts", false).await;
    store
        .append_to_stream("a", [Ev::Opened { owner: "a".into() }, Ev::Closed], AppendOptions::default())
        .await
        .unwrap();
    let shifty = SnapshotProjection::new(
        "accounts",
        |e: &RecordedEvent<Ev>, p: &str| match e.event {
            Ev::Closed => keys! { "tenant_id" => p, "account_id" => &e.stream_id, "extra" => 1 },
            _ => keys! { "tenant_id" => p, "account_id" => &e.stream_id },
        },
        evolve,
        Account::default,
    );
    let runner = ProjectionRunner::new(store, ProjectionRegistry::new().with(shifty));
    match runner.project_partition("rm", RunOptions::default().partition(emmett_seaorm::DEFAULT_PARTITION)).await {
        Err(Error::KeySetMismatch { projection, expected, found }) => {
            assert_eq!(projection, "accounts");
            assert_eq!(expected, ["account_id", "tenant_id"]);
            assert_eq!(found, ["account_id", "extra", "tenant_id"]);
        }
        other => panic!("{other:?}"),
    }
}

async fn corrupt_snapshot_is_a_typed_error(db: TestDb) {
    let store = db.store();
    create_read_model(&db.db, "accounts", false).await;
    let runner = ProjectionRunner::new(store.clone(), ProjectionRegistry::new().with(projection("accounts")));
    store.append_to_stream("a", [Ev::Opened { owner: "a".into() }], AppendOptions::default()).await.unwrap();
    runner.project_partition("rm", RunOptions::default().partition(emmett_seaorm::DEFAULT_PARTITION)).await.unwrap();
    // The wrong shape everywhere; text that is not JSON where the column can hold it (SQLite).
    let mut corruptions = vec![r#"{"total": "lots"}"#];
    if db.db.get_database_backend() == DbBackend::Sqlite {
        corruptions.push("{not json");
    }
    for corruption in corruptions {
        let update = format!("UPDATE snapshots SET snapshot = '{corruption}'");
        db.db.execute_raw(Statement::from_string(db.db.get_database_backend(), update)).await.unwrap();
        store.append_to_stream("a", [Ev::Closed], AppendOptions::default()).await.unwrap();
        match runner.project_partition("rm", RunOptions::default().partition(emmett_seaorm::DEFAULT_PARTITION)).await {
            Err(Error::CorruptSnapshot { table, stream_id, .. }) => {
                assert_eq!(
                    (table.as_str(), stream_id.as_str()),
                    ("accounts", "account_id:a|tenant_id:default_partition")
                );
            }
            other => panic!("{corruption}: {other:?}"),
        }
    }
}

async fn identifiers_are_quoted_never_executed(db: TestDb) {
    let store = db.store();
    create_read_model(&db.db, "accounts", false).await;
    store.append_to_stream("a", [Ev::Opened { owner: "a".into() }], AppendOptions::default()).await.unwrap();
    let hostile_table = "accounts\"; DROP TABLE snapshots; --";
    let hostile_column = SnapshotProjection::new("accounts", account_keys, evolve, Account::default)
        .columns(|a: &Account| columns! { "total = 0; DROP TABLE messages; --" => a.total });
    for (registry, table) in [
        (ProjectionRegistry::new().with(projection(hostile_table)), hostile_table),
        (ProjectionRegistry::new().with(hostile_column), "accounts"),
    ] {
        let res = ProjectionRunner::new(store.clone(), registry)
            .project_partition("rm", RunOptions::default().partition(emmett_seaorm::DEFAULT_PARTITION))
            .await;
        // The error names the read model and what it lacks.
        assert!(matches!(&res, Err(Error::InvalidReadModel { table: t, .. }) if t == table), "{res:?}");
    }
    // Both tables are still there, and the store still works.
    assert_eq!(snapshots::Entity::find().all(&db.db).await.unwrap().len(), 0);
    assert_eq!(store.read_stream::<Ev>("a", ReadOptions::default()).await.unwrap().events.len(), 1);
}

async fn in_table_mode_keeps_state_in_the_row(db: TestDb) {
    let store = db.store();
    create_read_model(&db.db, "legacy_accounts", true).await;
    seed(&store, "t1", 3).await;
    let legacy = projection("legacy_accounts").in_table();
    let runner = ProjectionRunner::new(store.clone(), ProjectionRegistry::new().with(legacy));
    runner.project_partition("legacy", RunOptions::default().partition("t1").batch_size(4)).await.unwrap();
    assert_eq!(read_model(&db.db, "legacy_accounts", "t1").await, folded(&store, "t1", 3).await);
    assert!(snapshots::Entity::find().all(&db.db).await.unwrap().is_empty(), "nothing in the central table");
    let row = db
        .db
        .query_one_raw(Statement::from_string(
            db.db.get_database_backend(),
            "SELECT snapshot, stream_id, last_stream_position FROM legacy_accounts WHERE account_id = 'acc-02'",
        ))
        .await
        .unwrap()
        .unwrap();
    let state: serde_json::Value = row.try_get("", "snapshot").unwrap();
    let expected = store
        .aggregate_stream("acc-02", evolve, Account::default, ReadOptions::default().partition("t1"))
        .await
        .unwrap();
    assert_eq!(serde_json::from_value::<Account>(state).unwrap(), expected.state);
    assert_eq!(row.try_get::<String>("", "stream_id").unwrap(), "acc-02");
    assert_eq!(row.try_get::<i64>("", "last_stream_position").unwrap() as u64, expected.current_stream_version);

    // Re-projecting from scratch under another subscription is a no-op on the rows.
    runner.project_partition("legacy-2", RunOptions::default().partition("t1")).await.unwrap();
    assert_eq!(read_model(&db.db, "legacy_accounts", "t1").await, folded(&store, "t1", 3).await);
}

async fn map_to_columns_runs_once_per_written_state(db: TestDb) {
    let store = db.store();
    create_read_model(&db.db, "accounts", false).await;
    // 3 streams, 3 + 4 + 5 events, in one transaction so they are one batch under any load.
    store
        .with_session(|s| async move {
            seed(&s, "t1", 3).await;
            Ok::<_, Error>(())
        })
        .await
        .unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = {
        let calls = calls.clone();
        SnapshotProjection::new("accounts", account_keys, evolve, Account::default).columns(move |a: &Account| {
            calls.fetch_add(1, Ordering::SeqCst);
            columns! { "total" => a.total, "deposits" => a.deposits as i64 }
        })
    };
    let runner = ProjectionRunner::new(store.clone(), ProjectionRegistry::new().with(counted));
    runner.project_partition("rm", RunOptions::default().partition("t1")).await.unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 3, "one write per row per batch");
    runner.project_partition("rm", RunOptions::default().partition("t1")).await.unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 3, "a re-run writes nothing");
    assert_eq!(read_model(&db.db, "accounts", "t1").await, folded(&store, "t1", 3).await);
}

/// A transaction that took its global position early but commits late must not be passed by a
/// partition runner that meanwhile saw later positions. Built so that the late transaction also
/// got its PostgreSQL transaction id *after* the early-committing one (which wrote elsewhere
/// first), the case a `transaction_id < xmin` filter alone lets through. SQLite has one writer
/// at a time, so there the late transaction is only held open while the runner starts.
async fn late_commit_is_not_skipped(db: TestDb) {
    let one_writer = db.db.get_database_backend() == DbBackend::Sqlite;
    let store = db.store();
    create_read_model(&db.db, "accounts", false).await;
    seed(&store, "t1", 3).await;
    let on_t1 = || AppendOptions::default().partition("t1");
    let (early_started, early_started_rx) = oneshot::channel();
    let (late_appended, late_appended_rx) = oneshot::channel();
    let (commit_late, commit_late_rx) = oneshot::channel::<()>();

    // Starts first (its id is older), appends last, commits first.
    let early_store = store.clone();
    let mut late_appended_rx = Some(late_appended_rx);
    let early = (!one_writer).then(|| {
        let late_appended_rx = late_appended_rx.take().unwrap();
        tokio::spawn(async move {
            early_store
                .with_session(move |s| async move {
                    s.append_to_stream("elsewhere", [Ev::Closed], AppendOptions::default().partition("t2")).await?;
                    early_started.send(()).unwrap();
                    late_appended_rx.await.unwrap();
                    s.append_to_stream("acc-02", [Ev::Deposited { amount: 300 }], on_t1()).await?;
                    Ok::<_, Error>(())
                })
                .await
        })
    });
    // Starts second, takes its global position first, commits when told.
    let late_store = store.clone();
    let late = tokio::spawn(async move {
        late_store
            .with_session(move |s| async move {
                if !one_writer {
                    early_started_rx.await.unwrap();
                }
                s.append_to_stream("acc-01", [Ev::Deposited { amount: 200 }], on_t1()).await?;
                late_appended.send(()).unwrap();
                commit_late_rx.await.unwrap();
                Ok::<_, Error>(())
            })
            .await
    });
    match early {
        Some(early) => early.await.unwrap().unwrap(),
        None => late_appended_rx.take().unwrap().await.unwrap(),
    }

    let runner = ProjectionRunner::new(store.clone(), ProjectionRegistry::new().with(projection("accounts")));
    let run =
        tokio::spawn(
            async move { runner.project_partition("accounts-rm", RunOptions::default().partition("t1")).await },
        );
    tokio::time::sleep(Duration::from_millis(300)).await;
    commit_late.send(()).unwrap();
    late.await.unwrap().unwrap();
    run.await.unwrap().unwrap();

    let rerun = ProjectionRunner::new(store.clone(), ProjectionRegistry::new().with(projection("accounts")));
    rerun.project_partition("accounts-rm", RunOptions::default().partition("t1")).await.unwrap();
    assert_eq!(read_model(&db.db, "accounts", "t1").await, folded(&store, "t1", 3).await);
}

/// Counts the events it sees.
struct Counting(Arc<AtomicUsize>);

#[async_trait::async_trait]
impl EventHandler<Ev> for Counting {
    async fn handle(
        &self,
        _: &ProjectionContext<'_>,
        _: &RecordedEvent<Ev>,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// A tenant holds several aggregates' events: types the event enum doesn't know are not the
/// projections' business, unless one of them names the type; a known type with bad data is
/// always an error.
async fn other_aggregates_events_are_not_the_projections_business(db: TestDb) {
    let store = db.store();
    create_read_model(&db.db, "accounts", false).await;
    seed(&store, "t1", 2).await;
    let on_t1 = || AppendOptions::default().partition("t1");
    let cart = serde_json::json!({ "type": "CartCreated", "data": { "currency": "EUR" } });
    store.append_to_stream("cart-1", [cart], on_t1()).await.unwrap();
    let seen = Arc::new(AtomicUsize::new(0));
    let registry = ProjectionRegistry::new().with(projection("accounts")).on([], Counting(seen.clone()));
    let runner = ProjectionRunner::new(store.clone(), registry);
    let done = runner.project_partition("rm", RunOptions::default().partition("t1")).await.unwrap();
    assert_eq!(done.processed, 3 + 4 + 1);
    assert_eq!(read_model(&db.db, "accounts", "t1").await, folded(&store, "t1", 2).await);
    assert_eq!(seen.load(Ordering::SeqCst), 7, "`on([])` sees every event of the enum's types");

    let named = ProjectionRegistry::new().with(projection("accounts").handles(["Deposited", "CartCreated"]));
    let res = ProjectionRunner::new(store.clone(), named)
        .project_partition("rm-2", RunOptions::default().partition("t1"))
        .await;
    assert!(
        matches!(&res, Err(Error::UndecodableEvent { message_type, .. }) if message_type == "CartCreated"),
        "{res:?}"
    );

    let bad = serde_json::json!({ "type": "Deposited", "data": { "amount": "lots" } });
    store.append_to_stream("acc-00", [bad], on_t1()).await.unwrap();
    let res = runner.project_partition("rm", RunOptions::default().partition("t1")).await;
    assert!(matches!(&res, Err(Error::UndecodableEvent { stream, position: 4, .. }) if stream == "acc-00"), "{res:?}");
}

/// The read-model table is checked on the first batch, with an error that says what to create;
/// keys are typed, so integer and UUID key columns work.
async fn read_model_tables_are_checked_and_keys_are_typed(db: TestDb) {
    use sea_orm::sea_query::{ColumnDef, Index, Table};
    let store = db.store();
    seed(&store, "t1", 3).await;
    let typed_keys = |e: &RecordedEvent<Ev>, _: &str| {
        let number: i64 = e.stream_id.trim_start_matches("acc-").parse().unwrap();
        keys! { "account_no" => number, "account_uuid" => uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, e.stream_id.as_bytes()) }
    };
    let projection = || {
        SnapshotProjection::new("typed", typed_keys, evolve, Account::default)
            .columns(|a: &Account| columns! { "total" => a.total })
    };
    let runner = ProjectionRunner::new(store.clone(), ProjectionRegistry::new().with(projection()));
    let run = || runner.project_partition("typed", RunOptions::default().partition("t1"));
    let table = |key: bool, total: bool| {
        let mut create = Table::create();
        create
            .table(Alias::new("typed"))
            .col(ColumnDef::new(Alias::new("account_no")).big_integer().not_null())
            .col(ColumnDef::new(Alias::new("account_uuid")).uuid().not_null());
        if total {
            create.col(ColumnDef::new(Alias::new("total")).big_integer());
        }
        if key {
            create.primary_key(Index::create().col(Alias::new("account_uuid")).col(Alias::new("account_no")));
        }
        create.to_owned()
    };
    let expect = |res: emmett_seaorm::Result<_>, says: &str| match res {
        Err(Error::InvalidReadModel { table, reason }) => {
            assert_eq!(table, "typed");
            assert!(reason.contains(says), "{reason}");
        }
        other => panic!("expected InvalidReadModel ({says}), got {other:?}"),
    };
    expect(run().await, "does not exist; create it with the columns (account_no, account_uuid) and a primary key");
    for (key, total, says) in
        [(false, true, "no primary or unique key over exactly (account_no, account_uuid)"), (true, false, "'total'")]
    {
        db.db.execute(&table(key, total)).await.unwrap();
        expect(run().await, says);
        db.db.execute(Table::drop().table(Alias::new("typed"))).await.unwrap();
    }
    assert_eq!(checkpoint(&db.db, "typed", "t1").await.unwrap_or(0), 0, "nothing was written");
    assert_eq!(snapshots::Entity::find().all(&db.db).await.unwrap().len(), 0);

    db.db.execute(&table(true, true)).await.unwrap();
    assert_eq!(run().await.unwrap().processed, 3 + 4 + 5);
    // `(account_no, total)` of every row of `table`.
    let conn = &db.db;
    let totals = move |table: &'static str| async move {
        let select = sea_orm::sea_query::Query::select()
            .columns([Alias::new("account_no"), Alias::new("total")])
            .from(Alias::new(table))
            .order_by(Alias::new("account_no"), sea_orm::Order::Asc)
            .to_owned();
        let rows = conn.query_all(&select).await.unwrap();
        rows.iter()
            .map(|r| (r.try_get("", "account_no").unwrap(), r.try_get("", "total").unwrap()))
            .collect::<Vec<(i64, i64)>>()
    };
    let folded: Vec<(i64, i64)> =
        folded(&store, "t1", 3).await.iter().enumerate().map(|(i, r)| (i as i64, r.1)).collect();
    assert_eq!(totals("typed").await, folded);
    // The same in the row, two events a batch: later batches find (lock) the rows by typed keys.
    let mut in_row = table(true, true);
    in_row
        .table(Alias::new("typed_row"))
        .col(ColumnDef::new(Alias::new("snapshot")).json_binary())
        .col(ColumnDef::new(Alias::new("stream_id")).string())
        .col(ColumnDef::new(Alias::new("last_stream_position")).big_integer())
        .col(ColumnDef::new(Alias::new("last_global_position")).big_integer());
    db.db.execute(&in_row).await.unwrap();
    let in_row = SnapshotProjection::new("typed_row", typed_keys, evolve, Account::default)
        .columns(|a: &Account| columns! { "total" => a.total })
        .in_table();
    let runner = ProjectionRunner::new(store.clone(), ProjectionRegistry::new().with(in_row));
    let options = RunOptions::default().partition("t1").batch_size(2);
    assert_eq!(runner.project_partition("typed-row", options).await.unwrap().processed, 3 + 4 + 5);
    assert_eq!(totals("typed_row").await, folded);
    // Typed keys are encoded in snapshot ids as JavaScript's String(value) would.
    let id = construct_stream_id(&keys! { "account_no" => 7i64, "flag" => true });
    assert_eq!(id, "account_no:7|flag:true");
}

/// An inline projection changes its read model in the append's transaction: visible when the
/// append returns, also for appends in a session, and gone with a session rolled back. The same
/// projection run by the runner gives the same read model.
async fn inline_projections_change_read_models_with_the_append(db: TestDb) {
    create_read_model(&db.db, "accounts_inline", false).await;
    create_read_model(&db.db, "accounts_runner", false).await;
    let store = db.store().inline("accounts", ProjectionRegistry::new().with(projection("accounts_inline")));
    let opts = AppendOptions::default().partition("t1");
    store.append_to_stream("a", [Ev::Opened { owner: "a".into() }], opts.clone()).await.unwrap();
    store
        .append_to_stream("a", [Ev::Deposited { amount: 5 }, Ev::Deposited { amount: 7 }], opts.clone())
        .await
        .unwrap();
    assert_eq!(read_model(&db.db, "accounts_inline", "t1").await, vec![("a".into(), 12, 2)]);

    store
        .with_session(|s| {
            let opts = opts.clone();
            async move {
                s.append_to_stream("b", [Ev::Opened { owner: "b".into() }], opts.clone()).await?;
                s.append_to_stream("b", [Ev::Deposited { amount: 1 }], opts).await?;
                Ok::<_, Error>(())
            }
        })
        .await
        .unwrap();
    let rolled_back = store
        .with_session(|s| {
            let opts = opts.clone();
            async move {
                s.append_to_stream("c", [Ev::Opened { owner: "c".into() }], opts).await?;
                Err::<(), _>(Error::SessionStillInUse)
            }
        })
        .await;
    assert!(rolled_back.is_err());
    assert_eq!(read_model(&db.db, "accounts_inline", "t1").await, vec![("a".into(), 12, 2), ("b".into(), 1, 1)]);

    seed(&store, "t1", 4).await;
    let runner = ProjectionRunner::new(store.clone(), ProjectionRegistry::new().with(projection("accounts_runner")));
    runner.project_partition("runner", RunOptions::default().partition("t1")).await.unwrap();
    let inline = read_model(&db.db, "accounts_inline", "t1").await;
    assert_eq!(inline.len(), 6);
    assert_eq!(inline, read_model(&db.db, "accounts_runner", "t1").await);
}

/// Records every event it is given.
struct Recorder(Arc<std::sync::Mutex<Vec<RecordedEvent<serde_json::Value>>>>);

#[async_trait::async_trait]
impl EventHandler<serde_json::Value> for Recorder {
    async fn handle(
        &self,
        _: &ProjectionContext<'_>,
        e: &RecordedEvent<serde_json::Value>,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        self.0.lock().unwrap().push(e.clone());
        Ok(())
    }
}

/// An inline projection is given the events exactly as they are stored (the append returns
/// them, it does not read them back): positions, ids, creation times, data and metadata, for
/// every kind of expected version, several events at once, and inside a session.
async fn inline_projections_see_events_as_stored(db: TestDb) {
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let store = db.store().inline("recorder", ProjectionRegistry::new().on([], Recorder(Arc::clone(&seen))));
    let opts = |expected| {
        AppendOptions::default()
            .partition("t1")
            .expected(expected)
            .metadata(serde_json::json!({ "by": "ünïcode \\ \"quoted\"", "n": 1.5e300 }))
    };
    let events = |n: i64| (0..n).map(|i| Ev::Deposited { amount: i * 1_000_000_007 }).collect::<Vec<_>>();
    store.append_to_stream("a", events(3), opts(ExpectedVersion::NoStream)).await.unwrap();
    store.append_to_stream("a", events(1), opts(ExpectedVersion::Exact(3))).await.unwrap();
    store.append_to_stream("a", events(2), opts(ExpectedVersion::StreamExists)).await.unwrap();
    store.append_to_stream("b", events(2), opts(ExpectedVersion::Any)).await.unwrap();
    store
        .with_session(|s| async move {
            s.append_to_stream("a", events(2), opts(ExpectedVersion::Any)).await?;
            s.append_to_stream("b", events(1), opts(ExpectedVersion::Exact(2))).await
        })
        .await
        .unwrap();
    let mut stored = Vec::new();
    for stream in ["a", "b"] {
        let read = store.read_stream::<serde_json::Value>(stream, ReadOptions::default().partition("t1"));
        stored.extend(read.await.unwrap().events);
    }
    let mut seen = seen.lock().unwrap().clone();
    seen.sort_by(|x, y| (&x.stream_id, x.stream_position).cmp(&(&y.stream_id, y.stream_position)));
    assert_eq!(seen.len(), 11);
    assert_eq!(seen, stored);
}

/// A failing inline projection rejects the append: a typed error naming the projection and the
/// event, the stream's version unchanged, no snapshot and no read-model row written.
async fn a_failing_inline_projection_rejects_the_append(db: TestDb) {
    create_read_model(&db.db, "accounts", false).await;
    let failing = Arc::new(AtomicBool::new(true));
    let registry =
        ProjectionRegistry::new().with(projection("accounts")).on(["Deposited"], Picky(Arc::clone(&failing)));
    let store = db.store().inline("picky", registry);
    let opts = AppendOptions::default().partition("t1");
    store.append_to_stream("a", [Ev::Opened { owner: "a".into() }], opts.clone()).await.unwrap();
    let err = store
        .append_to_stream("a", [Ev::Deposited { amount: 1 }, Ev::Deposited { amount: 13 }], opts.clone())
        .await
        .unwrap_err();
    match &err {
        Error::InlineProjection { projection, source } => {
            assert_eq!(projection, "picky");
            assert!(matches!(&**source, Error::Handler { stream, position: 3, .. } if stream == "a"), "{source:?}");
        }
        other => panic!("expected InlineProjection, got {other:?}"),
    }
    let version = store.read_stream::<Ev>("a", ReadOptions::default().partition("t1")).await.unwrap();
    assert_eq!(version.current_stream_version, 1);
    assert_eq!(read_model(&db.db, "accounts", "t1").await, vec![("a".into(), 0, 0)]);
    let snapshots = snapshots::Entity::find().all(&db.db).await.unwrap();
    assert_eq!(snapshots.iter().map(|s| s.last_global_position).collect::<Vec<_>>(), vec![1]);
    failing.store(false, Ordering::SeqCst);
    store.append_to_stream("a", [Ev::Deposited { amount: 13 }], opts).await.unwrap();
    assert_eq!(read_model(&db.db, "accounts", "t1").await, vec![("a".into(), 13, 1)]);
}

conformance!(with_pooler:
    inline_projections_change_read_models_with_the_append,
    inline_projections_see_events_as_stored,
    a_failing_inline_projection_rejects_the_append,
    read_model_tables_are_checked_and_keys_are_typed,
    other_aggregates_events_are_not_the_projections_business,
    fold_equals_read_model_and_rerun_is_a_no_op,
    project_events_per_stream_resumes_from_its_checkpoint,
    concurrent_runners_give_one_sequential_fold,
    a_row_shared_by_streams_and_tenants_loses_no_event,
    handler_failure_rolls_the_batch_back,
    key_set_mismatch_is_a_typed_error,
    corrupt_snapshot_is_a_typed_error,
    identifiers_are_quoted_never_executed,
    in_table_mode_keeps_state_in_the_row,
    map_to_columns_runs_once_per_written_state,
    late_commit_is_not_skipped,
);

/// Read models of the same table name in two schemas (PostgreSQL) or databases (MySQL): a
/// `schema.table` name is accepted, and each keeps snapshots of its own.
#[cfg(any(feature = "postgres", feature = "mysql"))]
async fn same_named_tables_in_two_schemas_keep_their_own_snapshots(db: TestDb) {
    let backend = db.db.get_database_backend();
    let current = match backend {
        DbBackend::Postgres => "SELECT current_database()",
        _ => "SELECT DATABASE()",
    };
    let row = db.db.query_one_raw(Statement::from_string(backend, current)).await.unwrap().unwrap();
    let database: String = row.try_get_by_index(0).unwrap();
    let other = format!("{database}_b");
    let create_other = match backend {
        DbBackend::Postgres => format!("CREATE SCHEMA {other}"),
        _ => {
            let collation = emmett_seaorm::migrations::exact_collation(&db.db).await.unwrap().unwrap();
            format!("CREATE DATABASE {other} CHARACTER SET utf8mb4 COLLATE {collation}")
        }
    };
    db.db.execute_unprepared(&create_other).await.unwrap();
    for table in ["totals".to_owned(), format!("{other}.totals")] {
        let create = format!(
            "CREATE TABLE {table} (tenant_id VARCHAR(100) NOT NULL, account_id VARCHAR(100) NOT NULL, \
             total BIGINT, PRIMARY KEY (tenant_id, account_id))"
        );
        db.db.execute_unprepared(&create).await.unwrap();
    }
    let projection = |table: String, step: i64| {
        let totals = SnapshotProjection::new(
            table,
            |e: &RecordedEvent<Ev>, tenant: &str| keys! { "tenant_id" => tenant, "account_id" => &e.stream_id },
            move |total: i64, _: &Ev| total + step,
            || 0,
        )
        .columns(|total: &i64| columns! { "total" => *total });
        ProjectionRegistry::new().with(totals)
    };
    let store = db.store();
    for _ in 0..3 {
        store
            .append_to_stream("acc", [Ev::Deposited { amount: 1 }], AppendOptions::default().partition("t"))
            .await
            .unwrap();
    }
    let here = ProjectionRunner::new(store.clone(), projection("totals".into(), 1));
    let there = ProjectionRunner::new(store.clone(), projection(format!("{other}.totals"), 10));
    here.project_partition("here", RunOptions::default().partition("t")).await.expect("bare name");
    there.project_partition("there", RunOptions::default().partition("t")).await.expect("qualified name");
    let total = |table: String| {
        let db = db.db.clone();
        async move {
            let row = db.query_one_raw(Statement::from_string(backend, format!("SELECT total FROM {table}"))).await;
            row.unwrap().unwrap().try_get_by_index::<i64>(0).unwrap()
        }
    };
    assert_eq!((total("totals".into()).await, total(format!("{other}.totals")).await), (3, 30));
    if backend == DbBackend::MySql {
        db.db.execute_unprepared(&format!("DROP DATABASE {other}")).await.unwrap();
    }
}

#[cfg(any(feature = "postgres", feature = "mysql"))]
mod servers {
    use super::*;
    crate::conformance!(servers: same_named_tables_in_two_schemas_keep_their_own_snapshots);
}
