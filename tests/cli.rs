//! The operator's command line on every backend: the built `emmett-seaorm` binary (exit codes,
//! `--json` parsed, one-line errors) and the commands an app mounts with its projections (a
//! rebuild while appends go on ends equal to the sequential fold).

mod common;

use std::process::{Command as Process, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use clap::Parser;
use common::{Ev, Picky, TestDb, balances};
use emmett_seaorm::cli::{Command, Projections};
use emmett_seaorm::daemon::Daemon;
use emmett_seaorm::projection::ProjectionRegistry;
use emmett_seaorm::{AppendOptions, EventStore};
use sea_orm::{ConnectionTrait, EntityTrait};
use serde_json::Value;

/// Runs the binary on `db` with `args`.
fn cli(db: &TestDb, args: &[&str]) -> Output {
    Process::new(env!("CARGO_BIN_EXE_emmett-seaorm"))
        .args(args)
        .env("DATABASE_URL", &db.url)
        .output()
        .expect("run the binary")
}

/// The command's stdout, which must have succeeded.
fn ok(output: Output) -> String {
    let (stdout, stderr) = (String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "failed: {stderr}{stdout}");
    stdout.into_owned()
}

/// The one-line error of a command that must have failed with exit code 1.
fn failed(output: Output) -> String {
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.starts_with("error: ") && stderr.trim_end().lines().count() == 1, "one line: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

/// `--json` output: one object per line.
fn json_lines(stdout: &str) -> Vec<Value> {
    stdout.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"))).collect()
}

async fn migrations_report_apply_and_print_their_sql(db: TestDb) {
    let status = ok(cli(&db, &["migrate", "status"]));
    assert_eq!(status.matches("applied").count(), 10, "{status}");
    assert!(ok(cli(&db, &["migrate", "sql"])).contains("no pending migrations"));
    ok(cli(&db, &["migrate", "down", "--steps", "8"]));
    let status = ok(cli(&db, &["migrate", "status"]));
    let line = status.lines().find(|l| l.starts_with("m20261128_000002_create_daemon_leases")).unwrap_or_default();
    assert!(line.ends_with(" pending"), "{status}");
    // The SQL of what is pending, printed and not run.
    let sql = ok(cli(&db, &["migrate", "sql"]));
    assert!(
        sql.starts_with("-- m20261128_000002_create_daemon_leases")
            && sql.contains("CREATE TABLE IF NOT EXISTS emt_leases"),
        "{sql}"
    );
    assert!(ok(cli(&db, &["migrate", "status"])).contains("pending"), "still pending after printing");
    // Applied by hand, as a DBA would, the migrator finds it in place (every statement is idempotent).
    // A statement ends with a line ending in `;` outside a `$$` body (PostgreSQL's append function).
    let (mut statement, mut in_body) = (String::new(), false);
    for line in sql.lines().filter(|l| !l.starts_with("--")) {
        in_body ^= line.matches("$$").count() % 2 == 1;
        statement.push_str(line);
        statement.push('\n');
        if !in_body && line.ends_with(';') {
            db.db.execute_unprepared(&statement).await.unwrap_or_else(|e| panic!("{e}: {statement}"));
            statement.clear();
        }
    }
    assert!(statement.trim().is_empty(), "left over: {statement}");
    ok(cli(&db, &["migrate", "up"]));
    assert_eq!(ok(cli(&db, &["migrate", "status"])).matches("applied").count(), 10);
    assert!(failed(cli(&db, &["migrate", "fresh"])).contains("--yes"));
}

async fn streams_and_partitions_are_listed_and_read(db: TestDb) {
    let store = db.store();
    let tenant = |t: &str| AppendOptions::default().partition(t).stream_type("account");
    store
        .append_to_stream("acc-1", [Ev::Opened { owner: "ann".into() }, Ev::Deposited { amount: 5 }], tenant("t1"))
        .await
        .unwrap();
    store.append_to_stream("acc-2", [Ev::Opened { owner: "bob".into() }], tenant("t1")).await.unwrap();
    store.append_to_stream("acc-1", [Ev::Closed], tenant("t2")).await.unwrap();
    let partitions = json_lines(&ok(cli(&db, &["partitions", "list", "--json"])));
    let counts: Vec<(String, i64)> = partitions
        .iter()
        .map(|p| (p["partition"].as_str().unwrap().to_owned(), p["streams"].as_i64().unwrap()))
        .collect();
    assert_eq!(counts, [("t1".to_owned(), 2), ("t2".to_owned(), 1)]);
    let streams = json_lines(&ok(cli(&db, &["streams", "list", "--partition", "t1", "--json"])));
    let ids: Vec<&str> = streams.iter().map(|s| s["stream"].as_str().unwrap()).collect();
    assert_eq!(ids, ["acc-1", "acc-2"]);
    assert_eq!(json_lines(&ok(cli(&db, &["streams", "list", "--limit", "1", "--json"]))).len(), 1);
    assert!(json_lines(&ok(cli(&db, &["streams", "list", "--type", "cart", "--json"]))).is_empty());
    let events = json_lines(&ok(cli(&db, &["streams", "read", "acc-1", "--partition", "t1", "--json"])));
    assert_eq!(events.len(), 2);
    assert_eq!(
        (events[1]["type"].as_str(), &events[1]["data"]),
        (Some("Deposited"), &serde_json::json!({ "amount": 5 }))
    );
    assert_eq!((events[1]["stream_position"].as_u64(), events[1]["partition"].as_str()), (Some(2), Some("t1")));
    assert!(events[1]["global_position"].as_u64().unwrap() > events[0]["global_position"].as_u64().unwrap());
    let later = json_lines(&ok(cli(&db, &["streams", "read", "acc-1", "--partition", "t1", "--from", "2", "--json"])));
    assert_eq!(later.len(), 1);
    let table = ok(cli(&db, &["streams", "read", "acc-1", "--partition", "t1"]));
    assert!(table.starts_with("STREAM POSITION") && table.contains("Deposited"), "{table}");
    // Errors name what was wrong, on one line, with exit code 1.
    assert!(
        failed(cli(&db, &["streams", "read", "acc-1", "--partition", "t3"]))
            .contains("'acc-1' not found in partition 't3'")
    );
    assert!(failed(cli(&db, &["projections", "rebuild", "nothing"])).contains("not known to this binary"));
    assert!(
        failed(cli(&db, &["projections", "reset", "nothing", "--partition", "t1", "--to", "0"]))
            .contains("no checkpoint")
    );
    ok(cli(&db, &["partitions", "add", "t9"]));
    // A projection run by a runner alone (no daemon, no lease) shows with its checkpoint and lag.
    let runner = emmett_seaorm::projection::ProjectionRunner::new(store.clone(), ProjectionRegistry::<Ev>::new());
    runner
        .project_partition("by-runner", emmett_seaorm::projection::RunOptions::default().partition("t1"))
        .await
        .unwrap();
    store.append_to_stream("acc-2", [Ev::Deposited { amount: 1 }], tenant("t1")).await.unwrap();
    let status = json_lines(&ok(cli(&db, &["projections", "status", "--json"])));
    assert_eq!(status.len(), 1, "{status:?}");
    let (checkpoint, head) = (status[0]["checkpoint"].as_u64().unwrap(), status[0]["head"].as_u64().unwrap());
    assert_eq!((status[0]["projection"].as_str(), status[0]["tenant"].as_str()), (Some("by-runner"), Some("t1")));
    assert_eq!((status[0]["lag"].as_u64(), &status[0]["owner"]), (Some(1), &Value::Null));
    assert!(checkpoint < head, "{status:?}");
}

async fn projections_and_leases_show_what_the_daemons_do(db: TestDb) {
    let store = db.store();
    store
        .append_to_stream("a", [Ev::Deposited { amount: 1 }], AppendOptions::default().partition("good"))
        .await
        .unwrap();
    store
        .append_to_stream("b", [Ev::Deposited { amount: 13 }], AppendOptions::default().partition("bad"))
        .await
        .unwrap();
    let daemon = Daemon::new(EventStore::new(db.second_pool().await))
        .projection("picky", ProjectionRegistry::new().on(["Deposited"], Picky::failing()))
        .backoff(std::time::Duration::from_secs(30), std::time::Duration::from_secs(60))
        .start()
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let status = loop {
        let status = json_lines(&ok(cli(&db, &["projections", "status", "--json"])));
        if status.len() == 2 && status.iter().any(|s| s["error"].is_string()) && status.iter().any(|s| s["lag"] == 0) {
            break status;
        }
        assert!(std::time::Instant::now() < deadline, "{status:?}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    let bad = status.iter().find(|s| s["tenant"] == "bad").unwrap();
    assert_eq!((bad["lag"].as_u64(), bad["checkpoint"].as_u64()), (Some(1), Some(0)));
    assert!(bad["error"].as_str().unwrap().contains("13 is unlucky"), "{bad}");
    assert_eq!(bad["owner"].as_str(), Some(daemon.owner()));
    let good = status.iter().find(|s| s["tenant"] == "good").unwrap();
    assert_eq!(good["lag"].as_u64(), Some(0));
    assert_eq!(good["checkpoint"], good["head"]);
    let table = ok(cli(&db, &["projections", "status"]));
    assert!(table.starts_with("PROJECTION") && table.contains("13 is unlucky"), "{table}");
    // Filters.
    let tenants = |args: &[&str]| -> Vec<String> {
        let mut all = vec!["projections", "status", "--json"];
        all.extend_from_slice(args);
        json_lines(&ok(cli(&db, &all))).iter().map(|s| s["tenant"].as_str().unwrap().to_owned()).collect()
    };
    assert_eq!(tenants(&["--lagging"]), ["bad"]);
    assert_eq!(tenants(&["--partition", "good"]), ["good"]);
    assert_eq!(tenants(&["--projection", "picky", "--partition", "good"]), ["good"]);
    assert!(tenants(&["--projection", "other"]).is_empty());
    assert!(tenants(&["--parked"]).is_empty(), "one failure of 3 retries is not parked yet");
    let leases = json_lines(&ok(cli(&db, &["leases", "list", "--json"])));
    assert!(leases.iter().all(|l| l["owner"].as_str() == Some(daemon.owner())), "{leases:?}");
    // Resume: retried now, not after its 30 s backoff (it fails again: failures 1 → 2).
    let resumed = ok(cli(&db, &["projections", "resume", "picky", "--partition", "bad"]));
    assert!(resumed.contains("1 lease(s)"), "{resumed}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    while daemon.status().await.unwrap().get("picky", "bad").is_none_or(|l| l.failures < 2) {
        assert!(std::time::Instant::now() < deadline, "resume did not retry at once");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(failed(cli(&db, &["projections", "resume", "nothing"])).contains("no checkpoint or lease"));
    // The parked error names the poison event's global position: a reset to it skips it.
    let poison = bad["error_position"].as_u64().unwrap();
    assert_eq!(poison, bad["head"].as_u64().unwrap(), "{bad}");
    // No default checkpoint: a reset that would replay a reactor's effects is never implied.
    let missing = cli(&db, &["projections", "reset", "picky", "--partition", "bad"]);
    assert!(!missing.status.success() && String::from_utf8_lossy(&missing.stderr).contains("--to"));
    ok(cli(&db, &["projections", "reset", "picky", "--partition", "bad", "--to", &poison.to_string()]));
    let status = json_lines(&ok(cli(&db, &["projections", "status", "--json"])));
    let bad = status.iter().find(|s| s["tenant"] == "bad").unwrap();
    assert_eq!((bad["lag"].as_u64(), bad["failures"].as_u64(), &bad["error"]), (Some(0), Some(0), &Value::Null));
    // The running daemon gave the lease up and took it again (at once, not after its 30 s backoff).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    while daemon.status().await.unwrap().get("picky", "bad").and_then(|l| l.owner.clone()).as_deref()
        != Some(daemon.owner())
    {
        assert!(std::time::Instant::now() < deadline, "the daemon did not take the reset lease again");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // Another poison event: skipped, recorded with its error; the next event is projected.
    let next = [Ev::Deposited { amount: 13 }, Ev::Deposited { amount: 2 }];
    store.append_to_stream("b", next, AppendOptions::default().partition("bad")).await.unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while daemon.status().await.unwrap().get("picky", "bad").is_none_or(|l| l.last_error.is_none()) {
        assert!(std::time::Instant::now() < deadline, "the daemon did not fail on the second poison event");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(failed(cli(&db, &["projections", "skip", "picky", "--partition", "good"])).contains("nothing to skip"));
    let skipped = ok(cli(&db, &["projections", "skip", "picky", "--partition", "bad"]));
    assert!(skipped.contains("went past event 2 of stream 'b'"), "{skipped}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while daemon.status().await.unwrap().get("picky", "bad").is_none_or(|l| l.lag_events > 0 || l.failures > 0) {
        assert!(std::time::Instant::now() < deadline, "the event after the skipped one was not projected");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let records = emmett_seaorm::schema::skipped_events::Entity::find().all(&db.db).await.unwrap();
    assert_eq!(records.len(), 1, "{records:?}");
    assert!(records[0].reason.contains("13 is unlucky") && records[0].stream_position == 2, "{records:?}");
    // Releasing an instance's leases frees them.
    let released = ok(cli(&db, &["leases", "release", daemon.owner()]));
    assert!(released.contains("released 64 segment(s)"), "{released}");
    drop(daemon);
    // A projection nobody runs any more is retired, with a confirmation.
    assert!(failed(cli(&db, &["projections", "retire", "picky"])).contains("--yes"));
    let retired = ok(cli(&db, &["projections", "retire", "picky", "--yes"]));
    assert!(retired.contains("2 checkpoint(s), 2 lease(s)"), "{retired}");
    assert!(tenants(&[]).is_empty());
    assert!(failed(cli(&db, &["projections", "retire", "picky", "--yes"])).contains("no checkpoint or lease"));
    // Tenant ids that differ only by spaces are told apart in tables.
    store
        .append_to_stream("c", [Ev::Deposited { amount: 1 }], AppendOptions::default().partition("good "))
        .await
        .unwrap();
    let table = ok(cli(&db, &["partitions", "list"]));
    assert!(table.lines().any(|l| l.starts_with("\"good \"")), "{table}");
}

/// The app's own binary, mounting the commands.
#[derive(Parser)]
struct App {
    #[command(subcommand)]
    ops: Command,
}

async fn a_rebuild_while_appends_go_on_ends_equal_to_the_fold(db: TestDb) {
    balances::create_table(&db.db).await;
    let store = db.store();
    for i in 0..600 {
        balances::deposit(&store, i, i as i64).await;
    }
    let projections = Projections::new().projection("balances", balances::registry());
    let run = |args: &[&str]| App::try_parse_from(["app"].iter().chain(args)).expect("arguments").ops;
    run(&["projections", "catch-up", "balances"]).run(&db.url, &projections).await.expect("catch-up");
    balances::corrupt(&db.db).await;
    // Rebuilt while a writer keeps appending.
    let writing = Arc::new(AtomicBool::new(true));
    let writer = {
        let (store, writing) = (EventStore::new(db.second_pool().await), Arc::clone(&writing));
        tokio::spawn(async move {
            let mut i = 600;
            while writing.load(Ordering::SeqCst) {
                balances::deposit(&store, i, 1).await;
                i += 1;
            }
            i - 600
        })
    };
    run(&["projections", "rebuild", "balances", "--batch-size", "50"])
        .run(&db.url, &projections)
        .await
        .expect("rebuild");
    writing.store(false, Ordering::SeqCst);
    assert!(writer.await.unwrap() > 0, "appends went on during the rebuild");
    run(&["projections", "catch-up", "balances"]).run(&db.url, &projections).await.expect("catch-up");
    assert_eq!(balances::rows(&db.db).await, balances::folded(&store).await);
}

/// `streams types` counts the stored rows per tenant, type and version; an app's mounted
/// commands read through its upcasters, and `streams read --raw` reads the rows as stored.
async fn event_types_and_versions_are_listed_and_reads_upcast(db: TestDb) {
    let store = db.store();
    let t1 = AppendOptions::default().partition("t1");
    store
        .append_to_stream("acc-1", [Ev::Opened { owner: "ann".into() }, Ev::Deposited { amount: 5 }], t1.clone())
        .await
        .unwrap();
    let v2 = db.store().with_upcasters(emmett_seaorm::upcast::Upcasters::new().current("Deposited", 2)).unwrap();
    v2.append_to_stream("acc-1", [Ev::Deposited { amount: 6 }], t1.clone()).await.unwrap();
    store.append_to_stream("acc-9", [Ev::Closed], AppendOptions::default().partition("t2")).await.unwrap();
    let types = json_lines(&ok(cli(&db, &["streams", "types", "--json"])));
    let rows: Vec<(&str, &str, &str, i64, i64)> = types
        .iter()
        .map(|t| {
            let text = |k: &str| t[k].as_str().unwrap();
            (
                text("partition"),
                text("type"),
                text("version"),
                t["count"].as_i64().unwrap(),
                t["current"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        rows,
        [
            ("t1", "Deposited", "1", 1, 1),
            ("t1", "Deposited", "2", 1, 1),
            ("t1", "Opened", "1", 1, 1),
            ("t2", "Closed", "1", 1, 1)
        ]
    );
    assert_eq!(json_lines(&ok(cli(&db, &["streams", "types", "--partition", "t2", "--json"]))).len(), 1);
    // The app's binary: an upcaster that can't handle the old deposits fails the read, by name;
    // `--raw` reads the rows as stored.
    let broken = emmett_seaorm::upcast::Upcasters::new().step("Deposited", 1, |_| panic!("no old deposits"));
    let projections = Projections::new().upcasters(broken);
    let run = |args: &[&str]| App::try_parse_from(["app"].iter().chain(args)).expect("arguments").ops;
    let read = run(&["streams", "read", "acc-1", "--partition", "t1"]).run(&db.url, &projections).await;
    assert!(read.unwrap_err().to_string().contains("no old deposits"));
    run(&["streams", "read", "acc-1", "--partition", "t1", "--raw"]).run(&db.url, &projections).await.expect("raw");
}

/// `partitions erase`: without `--yes` a count per table and nothing changed; the standalone
/// binary erases the store's tables, the app's binary its registered read models too; a tenant
/// with nothing is an error.
async fn a_tenant_is_erased_only_when_asked(db: TestDb) {
    balances::create_table(&db.db).await;
    let store = db.store();
    for i in 0..30 {
        balances::deposit(&store, i, 1).await;
    }
    let projections = Projections::new().projection("balances", balances::registry());
    let run = |args: &[&str]| App::try_parse_from(["app"].iter().chain(args)).expect("arguments").ops;
    run(&["projections", "catch-up", "balances"]).run(&db.url, &projections).await.expect("catch-up");
    let counted = json_lines(&ok(cli(&db, &["partitions", "erase", "t1", "--json"])));
    let would = |table: &str| counted.iter().find(|r| r["table"] == table).and_then(|r| r["would_remove"].as_u64());
    assert_eq!((would("messages"), would("streams"), would("subscriptions")), (Some(10), Some(7), Some(1)));
    assert_eq!(would("balances"), None, "the standalone binary knows no read model");
    let tenants = || json_lines(&ok(cli(&db, &["partitions", "list", "--json"]))).len();
    assert_eq!(tenants(), 3, "nothing changed without --yes");
    ok(cli(&db, &["partitions", "erase", "t1", "--yes"]));
    assert_eq!(tenants(), 2);
    assert_eq!(balances::rows(&db.db).await.iter().filter(|r| r.0 == "t1").count(), 7, "read models are the app's");
    run(&["partitions", "erase", "t2", "--yes"]).run(&db.url, &projections).await.expect("erase");
    assert!(balances::rows(&db.db).await.iter().all(|r| r.0 != "t2"));
    assert!(failed(cli(&db, &["partitions", "erase", "t2", "--yes"])).contains("tenant 't2' has no rows"));
    assert!(failed(cli(&db, &["partitions", "erase", "nobody"])).contains("tenant 'nobody' has no rows"));
    assert_eq!(tenants(), 1, "t3 stays");
}

/// `partitions export | import | move`: a file round trip under another id, a refused and a
/// replacing import, and a move to a SQLite file with a dry run first.
async fn a_tenant_is_exported_imported_and_moved(db: TestDb) {
    let store = db.store();
    for i in 0..30 {
        balances::deposit(&store, i, 1).await;
    }
    let dir = std::env::temp_dir().join(format!("emmett-cli-{}", uuid::Uuid::now_v7().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("t1.jsonl");
    let file = file.to_str().unwrap();
    ok(cli(&db, &["partitions", "export", "t1", "--output", file]));
    assert_eq!(std::fs::read_to_string(file).unwrap().lines().count(), 1 + 7 + 10);
    let stdout = ok(cli(&db, &["partitions", "export", "t1"]));
    assert_eq!(stdout, std::fs::read_to_string(file).unwrap(), "the same file on standard output");
    ok(cli(&db, &["partitions", "import", "--input", file, "--partition", "t1-copy"]));
    assert!(failed(cli(&db, &["partitions", "import", "--input", file])).contains("tenant 't1' already has"));
    ok(cli(&db, &["partitions", "import", "--input", file, "--replace"]));
    let tenants = |db: &TestDb| -> Vec<String> {
        let list = json_lines(&ok(cli(db, &["partitions", "list", "--json"])));
        list.iter().map(|p| p["partition"].as_str().unwrap().to_owned()).collect()
    };
    assert_eq!(tenants(&db), ["t1", "t1-copy", "t2", "t3"]);
    assert!(failed(cli(&db, &["partitions", "export", "nobody"])).contains("tenant 'nobody' has no streams"));

    let target = format!("sqlite://{}?mode=rwc", dir.join("target.db").display());
    let target_db = TestDb { db: common::connect(&target).await.unwrap(), url: target.clone(), pooled: None };
    ok(cli(&target_db, &["migrate", "up"]));
    let dry = ok(cli(&db, &["partitions", "move", "t2", "--to", &target, "--dry-run"]));
    assert!(dry.contains("would move tenant 't2' (7 streams, 10 events)"), "{dry}");
    assert_eq!(tenants(&db), ["t1", "t1-copy", "t2", "t3"], "nothing moved by a dry run");
    ok(cli(&db, &["partitions", "move", "t2", "--to", &target]));
    assert_eq!(tenants(&db), ["t1", "t1-copy", "t3"]);
    assert_eq!(tenants(&target_db), ["t2"]);
    target_db.db.close().await.unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `rls` switches row-level security on PostgreSQL, and elsewhere says it is PostgreSQL's.
async fn row_level_security_is_switched_on_and_off(db: TestDb) {
    if db.db.get_database_backend() != sea_orm::DbBackend::Postgres {
        let error = failed(cli(&db, &["rls", "enable"]));
        assert!(error.contains("row-level security"), "{error}");
        return;
    }
    assert_eq!(ok(cli(&db, &["rls", "status"])).trim(), "row-level security is off");
    let create =
        "DO $$ BEGIN CREATE ROLE emt_app LOGIN; EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$";
    db.db.execute_unprepared(create).await.unwrap();
    assert!(ok(cli(&db, &["rls", "grant", "emt_app"])).contains("granted 'emt_app'"));
    assert_eq!(ok(cli(&db, &["rls", "enable"])).trim(), "row-level security is on");
    assert_eq!(ok(cli(&db, &["rls", "status"])).trim(), "row-level security is on");
    assert_eq!(ok(cli(&db, &["rls", "disable"])).trim(), "row-level security is off");
}

conformance!(
    migrations_report_apply_and_print_their_sql,
    streams_and_partitions_are_listed_and_read,
    projections_and_leases_show_what_the_daemons_do,
    a_rebuild_while_appends_go_on_ends_equal_to_the_fold,
    event_types_and_versions_are_listed_and_reads_upcast,
    a_tenant_is_erased_only_when_asked,
    a_tenant_is_exported_imported_and_moved,
    row_level_security_is_switched_on_and_off,
);

#[test]
fn unreachable_databases_and_bad_urls_are_one_line_errors() {
    let run = |url: &str| {
        Process::new(env!("CARGO_BIN_EXE_emmett-seaorm"))
            .args(["streams", "list"])
            .env("DATABASE_URL", url)
            .output()
            .unwrap()
    };
    let refused = failed(run("postgres://postgres:secret@127.0.0.1:1/db"));
    assert!(refused.contains("cannot connect to postgres://postgres:***@127.0.0.1:1/db"), "{refused}");
    assert!(!refused.contains("secret"));
    assert!(failed(run("nonsense")).contains("cannot connect to nonsense"));
    let missing = failed(run("sqlite:///no/such/dir/file.db"));
    assert!(missing.contains("/no/such/dir/file.db does not exist") && missing.contains("?mode=rwc"), "{missing}");
    let none = Process::new(env!("CARGO_BIN_EXE_emmett-seaorm"))
        .args(["streams", "list"])
        .env_remove("DATABASE_URL")
        .output()
        .unwrap();
    assert!(failed(none).contains("DATABASE_URL"));
}

/// `--stores FILE`: two PostgreSQL databases and a SQLite file as stores, a SQLite catalog.
#[cfg(all(feature = "postgres", feature = "sqlite"))]
#[tokio::test]
async fn commands_work_across_the_stores_of_a_stores_file() {
    let urls = [common::postgres().await, common::postgres().await, common::sqlite().await];
    let catalog = common::sqlite().await;
    let dir = std::env::temp_dir().join(format!("emt-stores-{}", uuid::Uuid::now_v7()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("stores.toml");
    let text = format!(
        "default = \"pg0\"\ncatalog = \"{catalog}\"\n[stores]\npg0 = \"{}\"\npg1 = \"{}\"\nlite = \"{}\"\n[tenants]\nacme = \"pg1\"\n",
        urls[0], urls[1], urls[2]
    );
    std::fs::write(&file, text).unwrap();
    let run = |args: &[&str]| {
        Process::new(env!("CARGO_BIN_EXE_emmett-seaorm")).args(args).env("EMMETT_STORES", &file).output().unwrap()
    };
    // Every store migrated at once, each one's output under its name.
    let migrated = ok(run(&["migrate", "up"]));
    for store in ["lite", "pg0", "pg1"] {
        assert!(migrated.contains(&format!("store {store}\n")), "{migrated}");
    }
    // Tenants resolve: fixed (acme → pg1), the catalog (globex → lite), the default (rest → pg0).
    ok(run(&["stores", "assign", "globex", "lite"]));
    for (tenant, store) in [("acme", "pg1"), ("globex", "lite"), ("initech", "pg0")] {
        assert_eq!(ok(run(&["stores", "locate", tenant])).trim(), store);
        let db =
            common::connect(&urls[["pg0", "pg1", "lite"].iter().position(|s| *s == store).unwrap()]).await.unwrap();
        let events = [Ev::Deposited { amount: 1 }, Ev::Deposited { amount: 2 }];
        let options = AppendOptions::default().partition(tenant);
        EventStore::new(db).append_to_stream("acc", events, options).await.unwrap();
    }
    // A tenant's command runs on its store only.
    let read = json_lines(&ok(run(&["streams", "read", "acc", "--partition", "globex", "--json"])));
    assert_eq!(read.len(), 2);
    assert!(read.iter().all(|e| e["partition"] == "globex" && e.get("store").is_none()), "{read:?}");
    // The others on every store: JSON lines name their store.
    let listed = json_lines(&ok(run(&["partitions", "list", "--json"])));
    let mut seen: Vec<_> =
        listed.iter().map(|l| (l["store"].as_str().unwrap(), l["partition"].as_str().unwrap())).collect();
    seen.sort();
    assert_eq!(seen, [("lite", "globex"), ("pg0", "initech"), ("pg1", "acme")]);
    let stores = json_lines(&ok(run(&["stores", "list", "--json"])));
    assert!(stores.iter().all(|s| s["state"] == "up" && s["tenants"] == 1), "{stores:?}");

    // Moved to another store: the catalog records it, the data is there and gone from here.
    assert!(
        ok(run(&["partitions", "move", "acme", "--to", "lite", "--dry-run"]))
            .contains("would move tenant 'acme' (1 streams, 2 events)")
    );
    ok(run(&["partitions", "move", "acme", "--to", "lite"]));
    assert_eq!(ok(run(&["stores", "locate", "acme"])).trim(), "lite");
    let read = json_lines(&ok(run(&["streams", "read", "acc", "--partition", "acme", "--json"])));
    assert_eq!(read.iter().map(|e| e["data"]["amount"].as_i64().unwrap()).collect::<Vec<_>>(), [1, 2]);
    let pg1 = json_lines(&ok(run(&["partitions", "list", "--json"])));
    assert!(!pg1.iter().any(|l| l["store"] == "pg1"), "{pg1:?}");

    // Bad input: an unknown store, a store file naming one it lacks.
    assert!(failed(run(&["stores", "assign", "x", "nowhere"])).contains("nowhere"));
    assert!(failed(run(&["partitions", "move", "globex", "--to", "nowhere"])).contains("nowhere"));
    assert!(failed(run(&["partitions", "import", "--input", "x.jsonl"])).contains("needs --partition"));
    std::fs::write(&file, "default = \"gone\"\n[stores]\na = \"sqlite::memory:\"\n").unwrap();
    assert!(failed(run(&["stores", "list"])).contains("store 'gone' is not under [stores]"));
    // A store that does not answer: the others still answer, the command fails naming it.
    let text =
        format!("default = \"pg0\"\n[stores]\npg0 = \"{}\"\ndown = \"postgres://postgres@127.0.0.1:1/x\"\n", urls[0]);
    std::fs::write(&file, text).unwrap();
    let output = run(&["partitions", "list", "--json"]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("store down: cannot connect") && stderr.contains("failed on store(s) down"), "{stderr}");
    assert_eq!(json_lines(&String::from_utf8_lossy(&output.stdout)).len(), 1, "pg0's tenant listed");
    for url in urls.iter().chain([&catalog]) {
        common::drop_database(url).await;
    }
    std::fs::remove_dir_all(dir).ok();
}
