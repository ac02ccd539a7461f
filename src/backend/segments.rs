//! Segments: what the daemon's instances claim. A projection's tenants fall into [`SEGMENTS`]
//! segments by a fixed hash of their id; an instance holds segments (`emt_segments`: owner,
//! epoch) and projects every tenant in them. What instances coordinate on is then a fixed
//! number of rows per projection however many tenants there are, and a batch commits only
//! while its instance holds the tenants' segments at the epoch it claimed them with (it
//! share-locks their rows, so a takeover's claim waits for it; a batch after a takeover sees the
//! new epoch).
//!
//! Per-tenant rows of `emt_leases` keep what is per tenant: failed runs in a row, the last
//! error and when to retry.

use std::collections::BTreeSet;

use sea_orm::{ConnectionTrait, DatabaseTransaction, DbBackend, DbErr, TransactionTrait, Value};

use super::instances::{LEASES_CHANNEL, free_condition, live, now_ms};
use super::{partition_column, statement};

/// Segments per projection. Fixed: every instance, of every version, must put a tenant in the
/// same segment. Work spreads over up to this many instances per projection.
pub(crate) const SEGMENTS: i64 = 64;

/// The segment of `tenant`: FNV-1a (64-bit) of its UTF-8 bytes, modulo [`SEGMENTS`] — a hash
/// fixed by its definition, the same on every platform and Rust version.
pub(crate) fn segment_of(tenant: &str) -> i64 {
    let hash = tenant.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
    (hash % SEGMENTS as u64) as i64
}

/// DDL of the segments table (a migration), not run; on PostgreSQL also an index on global
/// positions, which the daemon reads "what changed since" by (SQLite and MySQL have a unique
/// one). (On a large `messages` table building it takes a while and holds appends back: a
/// partitioned table's index can't be built concurrently.)
pub(crate) async fn create_segment_table(conn: &impl ConnectionTrait) -> Result<Vec<String>, DbErr> {
    let backend = conn.get_database_backend();
    let (text, bigint, table) = match backend {
        DbBackend::MySql => {
            let collation = super::mysql_exact_collation(conn).await?;
            ("VARCHAR(255)", "BIGINT", format!("DEFAULT CHARACTER SET utf8mb4 COLLATE {collation}"))
        }
        DbBackend::Postgres => ("text", "bigint", String::new()),
        _ => ("TEXT", "INTEGER", String::new()),
    };
    let mut ddl = vec![format!(
        "CREATE TABLE IF NOT EXISTS emt_segments (
           subscription_id {text} NOT NULL, segment {bigint} NOT NULL, owner {text},
           epoch {bigint} NOT NULL DEFAULT 0, PRIMARY KEY (subscription_id, segment)) {table}"
    )];
    if backend == DbBackend::Postgres {
        ddl.push("CREATE INDEX IF NOT EXISTS idx_messages_global_position ON messages (global_position)".to_owned());
    }
    Ok(ddl)
}

/// Drops the segments table (and PostgreSQL's index on global positions).
pub(crate) async fn drop_segment_table(conn: &impl ConnectionTrait) -> Result<(), DbErr> {
    if conn.get_database_backend() == DbBackend::Postgres {
        conn.execute_unprepared("DROP INDEX IF EXISTS idx_messages_global_position").await?;
    }
    conn.execute_unprepared("DROP TABLE IF EXISTS emt_segments").await.map(|_| ())
}

/// A segment row as the coordinator and `status` see it.
#[derive(Debug, Clone)]
pub(crate) struct SegmentRow {
    pub subscription: String,
    pub segment: i64,
    pub owner: Option<String>,
    pub epoch: i64,
    /// Whether another instance may take it now: no owner, or an owner that is not live.
    pub free: bool,
    /// Milliseconds until the owner's registration expires unless it renews it (0 = expired).
    pub expires_in_ms: i64,
}

/// What one coordination round reads, in one statement.
pub(crate) struct Segments {
    /// The segment rows of the daemon's subscriptions.
    pub rows: Vec<SegmentRow>,
    /// Live instances.
    pub instances: u64,
    /// The store's [`head`](super::head).
    pub head: i64,
}

/// Creates the segment rows of `subscriptions` that do not exist yet (unowned). Their epochs
/// start above every epoch the subscription's per-tenant leases reached (earlier versions
/// fenced per tenant), so the epoch a handler sees never goes back.
pub(crate) async fn ensure_segments(conn: &impl ConnectionTrait, subscriptions: &[String]) -> Result<(), DbErr> {
    let backend = conn.get_database_backend();
    for subscription in subscriptions {
        let sql = "SELECT count(*), (SELECT coalesce(max(epoch), 0) FROM emt_leases WHERE subscription_id = $1)
                   FROM emt_segments WHERE subscription_id = $2";
        let values = [subscription.as_str().into(), subscription.as_str().into()];
        let row = conn.query_one_raw(statement(backend, sql, values)).await?;
        let (count, epoch): (i64, i64) = match row {
            Some(row) => (row.try_get_by_index(0)?, row.try_get_by_index(1)?),
            None => (0, 0),
        };
        if count >= SEGMENTS {
            continue;
        }
        let rows = (0..SEGMENTS).map(|s| format!("(${}, {s}, {epoch})", s + 1)).collect::<Vec<_>>().join(", ");
        let sql = match backend {
            DbBackend::MySql => {
                format!("INSERT IGNORE INTO emt_segments (subscription_id, segment, epoch) VALUES {rows}")
            }
            _ => format!(
                "INSERT INTO emt_segments (subscription_id, segment, epoch) VALUES {rows} ON CONFLICT DO NOTHING"
            ),
        };
        let values = (0..SEGMENTS).map(|_| Value::from(subscription.as_str()));
        conn.execute_raw(statement(backend, &sql, values)).await?;
    }
    Ok(())
}

/// The segment rows of `subscriptions`, the number of live instances and the store's head: an
/// idle daemon's coordination round, one statement reading [`SEGMENTS`] rows per projection.
pub(crate) async fn segments(conn: &impl ConnectionTrait, subscriptions: &[String]) -> Result<Segments, DbErr> {
    let backend = conn.get_database_backend();
    let marks = (1..=subscriptions.len()).map(|i| format!("${i}")).collect::<Vec<_>>().join(", ");
    let matching =
        if subscriptions.is_empty() { "1 = 0".to_owned() } else { format!("s.subscription_id IN ({marks})") };
    let sql = format!(
        "WITH live AS (SELECT d.owner FROM emt_daemons d WHERE {live})
         SELECT (SELECT count(*) FROM live), {head}, s.subscription_id, s.segment, s.owner, s.epoch,
                CASE WHEN s.owner IS NULL OR s.owner NOT IN (SELECT owner FROM live) THEN 1 ELSE 0 END,
                CASE WHEN o.expires_at > {now} THEN o.expires_at - {now} ELSE 0 END
         FROM (SELECT 1 AS one) x LEFT JOIN emt_segments s ON {matching}
         LEFT JOIN emt_daemons o ON o.owner = s.owner",
        live = live(backend, "d"),
        head = super::horizon::head_sql(backend),
        now = now_ms(backend),
    );
    let values = subscriptions.iter().map(|s| Value::from(s.as_str()));
    let rows = conn.query_all_raw(statement(backend, &sql, values)).await?;
    let mut segments = Segments { rows: Vec::with_capacity(rows.len()), instances: 0, head: 0 };
    for row in rows {
        segments.instances = row.try_get_by_index::<i64>(0)?.max(0) as u64;
        segments.head = row.try_get_by_index::<Option<i64>>(1)?.unwrap_or(0);
        let Some(subscription) = row.try_get_by_index::<Option<String>>(2)? else { continue };
        segments.rows.push(SegmentRow {
            subscription,
            segment: row.try_get_by_index(3)?,
            owner: row.try_get_by_index(4)?,
            epoch: row.try_get_by_index(5)?,
            free: row.try_get_by_index::<i32>(6)? == 1,
            expires_in_ms: row.try_get_by_index(7)?,
        });
    }
    Ok(segments)
}

/// Takes `segments` (of one projection), each if it is still at its epoch and free (or held by
/// anyone, with `from_live`: an instance with none of a projection's segments while none is
/// free takes one, so the others count it), in one transaction: the `(segment, new epoch)` of
/// each taken. Each is a compare-and-set (no lock is held afterwards; a live holder's batches
/// are then refused by the epoch); one another instance took first is left out. A segment
/// share-locked by a batch in flight (its holder paused mid-batch) is not waited for: the round
/// goes on with the others, and looks at it again later.
pub(crate) async fn claim<C: ConnectionTrait + TransactionTrait<Transaction = DatabaseTransaction>>(
    conn: &C,
    segments: &[&SegmentRow],
    owner: &str,
    from_live: bool,
) -> Result<Vec<(i64, i64)>, DbErr> {
    let Some(first) = segments.first() else { return Ok(Vec::new()) };
    let backend = conn.get_database_backend();
    // `subscription_id = $1 AND (segment = $2 AND epoch = $3 OR …)`, keys in order (MySQL's
    // and SQLite's placeholders are positional), after `before` other values.
    let keys = |segments: &[(i64, i64)], before: usize| {
        let pairs: Vec<String> = (0..segments.len())
            .map(|i| format!("segment = ${} AND epoch = ${}", before + 2 + 2 * i, before + 3 + 2 * i))
            .collect();
        let sql = format!("subscription_id = ${} AND ({})", before + 1, pairs.join(" OR "));
        let values = std::iter::once(Value::from(first.subscription.as_str()))
            .chain(segments.iter().flat_map(|(segment, epoch)| [Value::from(*segment), Value::from(*epoch)]));
        (sql, values.collect::<Vec<_>>())
    };
    let mut candidates: Vec<(i64, i64)> = segments.iter().map(|s| (s.segment, s.epoch)).collect();
    let txn = super::begin_write(conn).await?;
    // The ones still at their epoch, locked (SQLite: the writer's lock, taken at `BEGIN`, holds
    // them all).
    let (matching, values) = keys(&candidates, 0);
    let lock = if backend == DbBackend::Sqlite { "" } else { "FOR UPDATE SKIP LOCKED" };
    let lock = format!("SELECT segment FROM emt_segments WHERE {matching} {lock}");
    let rows = txn.query_all_raw(statement(backend, &lock, values)).await?;
    let lockable: BTreeSet<i64> = rows.iter().map(|r| r.try_get_by_index(0)).collect::<Result<_, _>>()?;
    candidates.retain(|(segment, _)| lockable.contains(segment));
    if candidates.is_empty() {
        txn.rollback().await?;
        return Ok(Vec::new());
    }
    let (matching, values) = keys(&candidates, 1);
    let free = if from_live { "1 = 1".to_owned() } else { free_condition(backend, "emt_segments.") };
    let update = format!("UPDATE emt_segments SET owner = $1, epoch = epoch + 1 WHERE ({matching}) AND ({free})");
    let values = std::iter::once(Value::from(owner)).chain(values);
    txn.execute_raw(statement(backend, &update, values)).await?;
    let taken: Vec<(i64, i64)> = candidates.iter().map(|(segment, epoch)| (*segment, epoch + 1)).collect();
    let (matching, values) = keys(&taken, 1);
    let read = format!("SELECT segment, epoch FROM emt_segments WHERE owner = $1 AND ({matching})");
    let values = std::iter::once(Value::from(owner)).chain(values);
    let rows = txn.query_all_raw(statement(backend, &read, values)).await?;
    let taken =
        rows.iter().map(|r| Ok((r.try_get_by_index(0)?, r.try_get_by_index(1)?))).collect::<Result<_, DbErr>>()?;
    txn.commit().await?;
    Ok(taken)
}

/// Gives a segment back (only if `owner` still holds it at `epoch`), so another instance may
/// take it at once.
pub(crate) async fn release(
    conn: &impl ConnectionTrait,
    subscription: &str,
    segment: i64,
    owner: &str,
    epoch: i64,
) -> Result<(), DbErr> {
    let backend = conn.get_database_backend();
    let sql = "UPDATE emt_segments SET owner = NULL
               WHERE subscription_id = $1 AND segment = $2 AND owner = $3 AND epoch = $4";
    let values: [Value; 4] = [subscription.into(), segment.into(), owner.into(), epoch.into()];
    conn.execute_raw(statement(backend, sql, values)).await?;
    Ok(())
}

/// Gives back every segment `owner` holds (their number).
pub(crate) async fn release_all(conn: &impl ConnectionTrait, owner: &str) -> Result<u64, DbErr> {
    let backend = conn.get_database_backend();
    let sql = "UPDATE emt_segments SET owner = NULL WHERE owner = $1";
    Ok(conn.execute_raw(statement(backend, sql, [owner.into()])).await?.rows_affected())
}

/// Takes the segments of `subscription`'s tenants (of `partitions`, or all) from whoever holds
/// them, after an operator changed their checkpoints or failures: the epoch moves on, so a batch
/// in flight under the old epoch can't commit, and the holder's next round drops the segment and
/// claims it again, reading the new checkpoints; the tenants' `retry_at` is cleared, so they run
/// at once. On PostgreSQL the instances are told (on [`LEASES_CHANNEL`], on commit) to look now.
/// How many tenants' leases it reset.
pub(crate) async fn revoke(
    conn: &impl ConnectionTrait,
    subscription: &str,
    partitions: Option<&[&str]>,
) -> Result<u64, DbErr> {
    let backend = conn.get_database_backend();
    let p = partition_column(backend);
    let (segments, tenants) = match partitions {
        None => (String::new(), String::new()),
        Some([]) => return Ok(0),
        Some(partitions) => {
            let mut segments: Vec<i64> = partitions.iter().map(|t| segment_of(t)).collect();
            segments.sort_unstable();
            segments.dedup();
            let list = segments.iter().map(i64::to_string).collect::<Vec<_>>().join(", ");
            let marks = (2..partitions.len() + 2).map(|i| format!("${i}")).collect::<Vec<_>>().join(", ");
            (format!(" AND segment IN ({list})"), format!(" AND {p} IN ({marks})"))
        }
    };
    let sql = format!("UPDATE emt_segments SET owner = NULL, epoch = epoch + 1 WHERE subscription_id = $1{segments}");
    conn.execute_raw(statement(backend, &sql, [subscription.into()])).await?;
    let sql = format!("UPDATE emt_leases SET retry_at = 0 WHERE subscription_id = $1{tenants}");
    let values =
        std::iter::once(Value::from(subscription)).chain(partitions.into_iter().flatten().map(|p| Value::from(*p)));
    let revoked = conn.execute_raw(statement(backend, &sql, values)).await?.rows_affected();
    if backend == DbBackend::Postgres {
        conn.execute_unprepared(&format!("NOTIFY {LEASES_CHANNEL}")).await?;
    }
    Ok(revoked)
}

/// In a projection batch: share-locks the segment rows of `tenants` (with the epochs they were
/// claimed at) and returns the tenants whose segment `owner` still holds at that epoch. A
/// takeover's claim waits for the batch to commit, and a batch after the takeover sees the new
/// epoch: work commits only under the segment it was started with; batches of one segment don't
/// wait for each other. On PostgreSQL, with `idle_timeout`, the server ends the batch's
/// transaction if its process goes silent that long (paused, hung).
pub(crate) async fn held_tenants(
    txn: &DatabaseTransaction,
    subscription: &str,
    owner: &str,
    tenants: &[(String, i64)],
    idle_timeout: Option<std::time::Duration>,
) -> Result<BTreeSet<String>, DbErr> {
    let backend = txn.get_database_backend();
    // (Set in the same statement: no extra round trip.)
    let idle = match (backend, idle_timeout) {
        (DbBackend::Postgres, Some(ttl)) => {
            format!(", set_config('idle_in_transaction_session_timeout', '{}', true)", ttl.as_millis())
        }
        _ => String::new(),
    };
    let lock = match backend {
        DbBackend::Postgres => " ORDER BY segment FOR SHARE",
        DbBackend::MySql => " ORDER BY segment LOCK IN SHARE MODE",
        _ => "",
    };
    let of: Vec<i64> = tenants.iter().map(|(t, _)| segment_of(t)).collect();
    let mut segments = of.clone();
    segments.sort_unstable();
    segments.dedup();
    let list = segments.iter().map(i64::to_string).collect::<Vec<_>>().join(", ");
    // (MySQL: by primary key ranges only, so only these rows are locked; see
    // `MYSQL_PRIMARY_KEY_ONLY`.)
    let hint = if backend == DbBackend::MySql { super::MYSQL_PRIMARY_KEY_ONLY } else { "" };
    let sql = format!(
        "SELECT segment, owner, epoch{idle} FROM emt_segments {hint}
         WHERE subscription_id = $1 AND segment IN ({list}){lock}"
    );
    let rows = txn.query_all_raw(statement(backend, &sql, [subscription.into()])).await?;
    let mut epochs = std::collections::HashMap::new();
    for row in rows {
        let (segment, holder, epoch): (i64, Option<String>, i64) =
            (row.try_get_by_index(0)?, row.try_get_by_index(1)?, row.try_get_by_index(2)?);
        if holder.as_deref() == Some(owner) {
            epochs.insert(segment, epoch);
        }
    }
    let held = tenants.iter().zip(of).filter(|((_, e), segment)| epochs.get(segment) == Some(e));
    Ok(held.map(|((t, _), _)| t.clone()).collect())
}

/// Removes the instance and gives back every segment it still holds (their number); on
/// PostgreSQL it tells the other instances (on [`LEASES_CHANNEL`]) so they take them at once.
pub(crate) async fn leave(conn: &impl ConnectionTrait, owner: &str) -> Result<u64, DbErr> {
    let backend = conn.get_database_backend();
    let released = release_all(conn, owner).await?;
    conn.execute_raw(statement(backend, "DELETE FROM emt_daemons WHERE owner = $1", [owner.into()])).await?;
    if backend == DbBackend::Postgres {
        conn.execute_unprepared(&format!("NOTIFY {LEASES_CHANNEL}")).await?;
    }
    Ok(released)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_are_fixed_by_definition() {
        // FNV-1a 64 of the bytes: these values must never change (instances of every version
        // must agree).
        assert_eq!(segment_of(""), (0xcbf2_9ce4_8422_2325_u64 % 64) as i64);
        assert_eq!(segment_of("a"), (0xaf63_dc4c_8601_ec8c_u64 % 64) as i64);
        let spread: std::collections::BTreeSet<i64> = (0..1000).map(|i| segment_of(&format!("t{i}"))).collect();
        assert_eq!(spread.len(), SEGMENTS as usize, "1,000 tenants fall in every segment");
    }
}

/// Claims and fenced failure records on every backend the build has (PostgreSQL and MySQL at
/// `EMMETT_TEST_POSTGRES_URL` / `EMMETT_TEST_MYSQL_URL`, default the local servers).
#[cfg(test)]
mod on_backends {
    use super::*;
    use crate::backend::{FailedRun, ensure_leases, lease_rows, park};
    use crate::testing::TestDatabase;

    async fn backends() -> Vec<TestDatabase> {
        let server = |var: &str, default: &str| std::env::var(var).unwrap_or(default.to_owned());
        let urls = [
            Some("sqlite::memory:".to_owned()),
            cfg!(feature = "postgres")
                .then(|| server("EMMETT_TEST_POSTGRES_URL", "postgres://postgres@127.0.0.1:5432")),
            cfg!(feature = "mysql").then(|| server("EMMETT_TEST_MYSQL_URL", "mysql://root@127.0.0.1:3306")),
        ];
        let mut dbs = Vec::new();
        for url in urls.into_iter().flatten() {
            dbs.push(TestDatabase::at(&url).await);
        }
        dbs
    }

    /// One round's claims in one transaction: every free segment asked for is taken at the next
    /// epoch; one another instance took meanwhile (its epoch moved) is left out, and the
    /// claimed ones are not taken again from their live holder.
    #[tokio::test]
    async fn claims_take_the_free_segments_asked_for_and_leave_out_the_ones_taken_meanwhile() {
        for test in backends().await {
            let db = test.connection();
            super::super::heartbeat(db, "a", 60_000).await.unwrap();
            super::super::heartbeat(db, "b", 60_000).await.unwrap();
            ensure_segments(db, &["p".to_owned()]).await.unwrap();
            let rows = segments(db, &["p".to_owned()]).await.unwrap().rows;
            let asked: Vec<&SegmentRow> = rows.iter().take(5).collect();
            // Another instance takes segment 2 first.
            assert_eq!(claim(db, &asked[2..3], "b", false).await.unwrap(), [(asked[2].segment, asked[2].epoch + 1)]);
            let taken = claim(db, &asked, "a", false).await.unwrap();
            let expected: Vec<(i64, i64)> =
                asked.iter().filter(|r| r.segment != asked[2].segment).map(|r| (r.segment, r.epoch + 1)).collect();
            assert_eq!(taken, expected, "{:?}", db.get_database_backend());
            assert!(claim(db, &asked, "b", false).await.unwrap().is_empty(), "live holders keep theirs");
        }
    }

    /// A failure is recorded with a fence only while the fencing instance holds the tenant's
    /// segment at that epoch (a paused instance's late batch records nothing after a takeover);
    /// without one (a rebuild), always.
    #[tokio::test]
    async fn a_fenced_failure_is_recorded_only_by_the_segment_holder() {
        for test in backends().await {
            let db = test.connection();
            super::super::heartbeat(db, "a", 60_000).await.unwrap();
            ensure_segments(db, &["p".to_owned()]).await.unwrap();
            ensure_leases(db, &[("p".to_owned(), "t".to_owned())]).await.unwrap();
            let row = segments(db, &["p".to_owned()]).await.unwrap().rows;
            let row = row.iter().find(|r| r.segment == segment_of("t")).unwrap();
            let [(_, epoch)] = claim(db, &[row], "a", false).await.unwrap()[..] else { panic!("claimed") };
            let run = |failures| FailedRun { failures, retry_in_ms: 0, error: "boom", position: 7 };
            assert!(!park(db, "p", "t", run(1), Some(("a", epoch - 1))).await.unwrap(), "an old epoch");
            assert!(!park(db, "p", "t", run(1), Some(("b", epoch))).await.unwrap(), "another owner");
            let failures = || async { lease_rows(db, &["p".to_owned()]).await.unwrap()[0].failures };
            assert_eq!(failures().await, 0, "{:?}", db.get_database_backend());
            assert!(park(db, "p", "t", run(2), Some(("a", epoch))).await.unwrap());
            assert_eq!(failures().await, 2);
            assert!(park(db, "p", "t", run(3), None).await.unwrap());
            assert_eq!(failures().await, 3);
        }
    }
}
