//! Aggregates of long streams: `aggregate-1m` folds a 1,000,000-event stream; `aggregate-1m-snapshot`
//! the same stream from a snapshot stored 50 events before its end; `command` /
//! `command-snapshot` run single-event commands through a `CommandHandler` without and with
//! snapshots every 100 events.

use std::time::Instant;

use emmett_seaorm::{AppendOptions, CommandHandler, EventStore, ReadOptions, SnapshotPolicy};

use crate::{CartEvent, cart_event, report};

type Res<T = ()> = Result<T, Box<dyn std::error::Error>>;

/// Items and total of a cart.
fn evolve(state: (i64, i64), e: &CartEvent) -> (i64, i64) {
    match e {
        CartEvent::ItemAdded { qty, price, .. } => (state.0 + qty, state.1 + qty * price),
        _ => state,
    }
}

/// `aggregate-1m` and `aggregate-1m-snapshot` on a stream of `events` events.
pub async fn long_stream(store: &EventStore, partition: &str, events: u64) -> Res {
    let options = || AppendOptions::default().partition(partition);
    let mut written = 0;
    while written < events {
        let n = 1_000.min(events - written);
        store.append_to_stream("long", (written..written + n).map(|e| cart_event(0, e + 1)), options()).await?;
        written += n;
    }
    let read = || ReadOptions::default().partition(partition);
    let started = Instant::now();
    let plain = store.aggregate_stream("long", evolve, || (0, 0), read()).await?;
    let name = if events == 1_000_000 { "aggregate-1m".to_owned() } else { format!("aggregate-{events}") };
    report(&name, plain.current_stream_version, started);
    // A snapshot at the end, then 50 more events: the aggregate folds those.
    let policy = SnapshotPolicy::every(1_000);
    store.aggregate_stream_snapshotted("long", evolve, || (0, 0), read(), policy).await?;
    store.append_to_stream("long", (0..50).map(|e| cart_event(0, e + 1)), options()).await?;
    let started = Instant::now();
    let snapshotted = store.aggregate_stream_snapshotted("long", evolve, || (0, 0), read(), policy).await?;
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{}\t{}\tevents\t{secs:.3}\ts\t{}\tevents/s\tms={:.1}",
        crate::label(&format!("{name}-snapshot")),
        snapshotted.current_stream_version,
        (snapshotted.current_stream_version as f64 / secs).round(),
        secs * 1000.0
    );
    let all = store.aggregate_stream("long", evolve, || (0, 0), read()).await?;
    assert_eq!(snapshotted.state, all.state, "the snapshot's fold equals the whole fold");
    Ok(())
}

/// `command` (no snapshots) or `command-snapshot` (every 100 events): `commands` single-event
/// commands by 8 concurrent callers over 8 streams.
pub async fn commands(store: &EventStore, partition: &str, commands: u64, snapshots: bool) -> Res {
    let mut handler = CommandHandler::new(evolve, || (0, 0));
    if snapshots {
        handler = handler.snapshots(SnapshotPolicy::every(100));
    }
    let handler = std::sync::Arc::new(handler);
    let started = Instant::now();
    let callers: Vec<_> = (0..8u64)
        .map(|c| {
            let (store, handler, partition) = (store.clone(), handler.clone(), partition.to_owned());
            tokio::spawn(async move {
                for i in 0..commands / 8 {
                    let options = AppendOptions::default().partition(&partition);
                    let decide = |_: &(i64, i64)| Ok::<_, emmett_seaorm::Error>([cart_event(c, i + 1)]);
                    handler.handle(&store, &format!("cmd-{c}"), options, decide).await?;
                }
                Ok::<_, emmett_seaorm::Error>(())
            })
        })
        .collect();
    for caller in callers {
        caller.await??;
    }
    report(if snapshots { "command-snapshot" } else { "command" }, commands / 8 * 8, started);
    Ok(())
}
