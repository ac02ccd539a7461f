//! The command handler on every backend: racing commands land exactly once, decisions and their
//! errors, sessions.

mod common;

use std::collections::BTreeMap;

use common::{Ev, TestDb};
use emmett_seaorm::backon::ExponentialBuilder;
use emmett_seaorm::{AppendOptions, CommandHandler, Error, EventStore, ExpectedVersion, Handled, ReadOptions};

/// The bank account: its balance, or `None` before it is opened.
fn evolve(balance: Option<i64>, e: &Ev) -> Option<i64> {
    match e {
        Ev::Opened { .. } => Some(0),
        Ev::Deposited { amount } => balance.map(|b| b + amount),
        Ev::Closed => None,
    }
}

/// Opens an account, whatever its state.
fn open(_: &Option<i64>) -> Result<[Ev; 1], Error> {
    Ok([Ev::Opened { owner: "o".into() }])
}

fn accounts() -> CommandHandler<Option<i64>, Ev> {
    CommandHandler::new(evolve, || None)
}

/// Deposits into an open account; a rejected command is the domain's own error.
fn deposit(amount: i64) -> impl Fn(&Option<i64>) -> Result<Vec<Ev>, Error> {
    move |balance| match balance {
        Some(_) => Ok(vec![Ev::Deposited { amount }]),
        None => Err(Error::InvalidEvent { stream: "account".into(), reason: "account is not open".into() }),
    }
}

async fn racing_commands_each_land_exactly_once(db: TestDb) {
    let store = db.store();
    let tenant = AppendOptions::default().partition("t1");
    assert!(accounts().handle(&store, "acc", tenant.clone(), open).await.expect("open").created_new_stream);
    // 8 tasks, each on its own pool, race 10 commands each on the one stream.
    let decided = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for task in 0..8i64 {
        let store = emmett_seaorm::EventStore::new(db.second_pool().await);
        let (tenant, decided) = (tenant.clone(), decided.clone());
        tasks.push(tokio::spawn(async move {
            let handler = accounts().retry_on_conflict(
                ExponentialBuilder::default()
                    .with_min_delay(std::time::Duration::from_millis(1))
                    .with_jitter()
                    .with_max_times(200),
            );
            for i in 0..10 {
                let amount = task * 100 + i + 1;
                let decide = |b: &Option<i64>| {
                    decided.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    deposit(amount)(b)
                };
                let handled = handler.handle(&store, "acc", tenant.clone(), decide).await.expect("command");
                assert_eq!(handled.events, [Ev::Deposited { amount }]);
                assert!(handled.state.is_some_and(|b| b >= amount), "the state includes the command's own event");
            }
        }));
    }
    for task in tasks {
        task.await.expect("task");
    }
    let read = store.read_stream::<Ev>("acc", ReadOptions::default().partition("t1")).await.expect("read");
    assert_eq!(read.current_stream_version, 81);
    let positions: Vec<u64> = read.events.iter().map(|e| e.stream_position).collect();
    assert_eq!(positions, (1..=81).collect::<Vec<_>>());
    let mut landed: BTreeMap<i64, usize> = BTreeMap::new();
    for e in &read.events[1..] {
        let Ev::Deposited { amount } = e.event else { panic!("unexpected {e:?}") };
        *landed.entry(amount).or_default() += 1;
    }
    let expected: BTreeMap<i64, usize> = (0..8).flat_map(|t| (1..=10).map(move |i| (t * 100 + i, 1))).collect();
    assert_eq!(landed, expected, "every command landed exactly once");
    let decided = decided.load(std::sync::atomic::Ordering::SeqCst);
    assert!(decided > 80, "the commands raced: {decided} decisions for 80 commands");
}

async fn without_retry_the_loser_gets_the_conflict(db: TestDb) {
    let store = db.store();
    let handler = accounts();
    handler.handle(&store, "acc", AppendOptions::default(), open).await.unwrap();
    // Another writer appends between this command's read and its append.
    let other = store.clone();
    let err = handler
        .handle(&store, "acc", AppendOptions::default(), |_| {
            let other = other.clone();
            std::thread::spawn(move || {
                tokio::runtime::Runtime::new().unwrap().block_on(other.append_to_stream(
                    "acc",
                    [Ev::Deposited { amount: 5 }],
                    AppendOptions::default(),
                ))
            })
            .join()
            .unwrap()
            .expect("the other append");
            Ok::<_, Error>([Ev::Deposited { amount: 1 }])
        })
        .await
        .expect_err("the race is lost");
    match err {
        Error::ExpectedVersionConflict { stream, expected, actual, .. } => {
            assert_eq!((stream.as_str(), expected, actual), ("acc", ExpectedVersion::Exact(1), 2));
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
    let read = store.read_stream::<Ev>("acc", ReadOptions::default()).await.unwrap();
    assert_eq!(read.current_stream_version, 2, "the loser wrote nothing");
}

async fn decisions_errors_and_stale_expectations(db: TestDb) {
    let store = db.store();
    let handler = accounts().retry_on_conflict(ExponentialBuilder::default());
    // The domain's error comes back as it is; nothing is written.
    let err = handler.handle(&store, "acc", AppendOptions::default(), deposit(5)).await.expect_err("not open");
    assert!(matches!(&err, Error::InvalidEvent { reason, .. } if reason == "account is not open"), "{err:?}");
    assert!(!store.stream_exists("acc", "default_partition").await.unwrap());
    // No events decided: nothing written, the state as loaded.
    let opened = handler.handle(&store, "acc", AppendOptions::default(), open);
    assert_eq!(opened.await.unwrap().next_expected_stream_version, 1);
    let nothing =
        handler.handle(&store, "acc", AppendOptions::default(), |_| Ok::<_, Error>(Vec::new())).await.unwrap();
    assert_eq!((nothing.state, nothing.events.len(), nothing.next_expected_stream_version), (Some(0), 0, 1));
    assert_eq!(nothing.last_event_global_position, None);
    // A caller's stale expected version is checked before deciding and never retried.
    let stale = AppendOptions::default().expected(ExpectedVersion::Exact(0));
    let decided = std::sync::atomic::AtomicUsize::new(0);
    let err = handler
        .handle(&store, "acc", stale, |b| {
            decided.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            deposit(1)(b)
        })
        .await
        .expect_err("stale");
    assert!(matches!(err, Error::ExpectedVersionConflict { actual: 1, .. }), "{err:?}");
    assert_eq!(decided.into_inner(), 0, "not decided on a state the caller did not expect");
    // The state returned is the fold of the stream.
    let handled =
        handler.handle(&store, "acc", AppendOptions::default().expected(ExpectedVersion::Exact(1)), deposit(7));
    let handled = handled.await.unwrap();
    assert_eq!((handled.state, handled.next_expected_stream_version, handled.created_new_stream), (Some(7), 2, false));
}

/// In one session: opens account "a", then deposits `amount` into `then`.
async fn open_then_deposit(store: &EventStore, then: &str, amount: i64) -> Result<Handled<Option<i64>, Ev>, Error> {
    let handler = accounts();
    store
        .with_session(|session| async move {
            handler.handle(&session, "a", AppendOptions::default(), open).await?;
            handler.handle(&session, then, AppendOptions::default(), deposit(amount)).await
        })
        .await
}

async fn commands_in_a_session_commit_with_it(db: TestDb) {
    let store = db.store();
    // The second command fails (account "b" is not open): neither is written.
    assert!(open_then_deposit(&store, "b", 1).await.is_err());
    assert!(!store.stream_exists("a", "default_partition").await.unwrap(), "rolled back with the session");
    let done = open_then_deposit(&store, "a", 3).await.expect("session");
    assert_eq!((done.state, done.next_expected_stream_version), (Some(3), 2));
    assert_eq!(store.read_stream::<Ev>("a", ReadOptions::default()).await.unwrap().current_stream_version, 2);
}

conformance!(with_pooler:
    racing_commands_each_land_exactly_once,
    without_retry_the_loser_gets_the_conflict,
    decisions_errors_and_stale_expectations,
    commands_in_a_session_commit_with_it,
);
