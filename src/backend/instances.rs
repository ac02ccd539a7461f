//! The daemon's instances: their registration rows (`emt_daemons`), renewed by a heartbeat, and
//! on PostgreSQL a presence connection; which of them are live, as the lease and segment
//! statements ask it.

use sea_orm::{ConnectionTrait, DbBackend, DbErr};

use super::statement;

/// The `application_name` prefix of a daemon's presence connection on PostgreSQL.
pub(crate) const PRESENCE_PREFIX: &str = "emt-daemon:";

/// The PostgreSQL channel on which instances announce leases they gave back.
pub(crate) const LEASES_CHANNEL: &str = "emt_leases";

/// Registers the instance (or renews its registration), and so every lease it holds, for
/// `ttl_ms` from now; forgets instances that are long gone.
pub(crate) async fn heartbeat(conn: &impl ConnectionTrait, owner: &str, ttl_ms: i64) -> Result<(), DbErr> {
    let backend = conn.get_database_backend();
    let now = now_ms(backend);
    let upsert = match backend {
        DbBackend::MySql => format!(
            "INSERT INTO emt_daemons (owner, expires_at) VALUES ($1, {now} + $2)
             ON DUPLICATE KEY UPDATE expires_at = VALUES(expires_at)"
        ),
        _ => format!(
            "INSERT INTO emt_daemons (owner, expires_at) VALUES ($1, {now} + $2)
             ON CONFLICT (owner) DO UPDATE SET expires_at = excluded.expires_at"
        ),
    };
    conn.execute_raw(statement(backend, &upsert, [owner.into(), ttl_ms.into()])).await?;
    // Instances gone for a minute (killed: nothing removed them) are forgotten.
    let forget = match backend {
        DbBackend::Postgres => {
            format!("DELETE FROM emt_daemons d WHERE d.expires_at < {now} - 60000 AND NOT {}", present("d.owner"))
        }
        _ => format!("DELETE FROM emt_daemons WHERE expires_at < {now} - 60000"),
    };
    conn.execute_unprepared(&forget).await?;
    Ok(())
}

/// Every registered instance: its name, whether it is live, and milliseconds until its
/// registration expires (0 when it has).
pub(crate) async fn registered(conn: &impl ConnectionTrait) -> Result<Vec<(String, bool, i64)>, DbErr> {
    let backend = conn.get_database_backend();
    let sql = format!(
        "SELECT d.owner, CASE WHEN {live} THEN 1 ELSE 0 END,
                CASE WHEN d.expires_at > {now} THEN d.expires_at - {now} ELSE 0 END
         FROM emt_daemons d ORDER BY d.owner",
        live = live(backend, "d"),
        now = now_ms(backend),
    );
    let rows = conn.query_all_raw(sea_orm::Statement::from_string(backend, sql)).await?;
    rows.iter()
        .map(|r| Ok((r.try_get_by_index(0)?, r.try_get_by_index::<i32>(1)? == 1, r.try_get_by_index(2)?)))
        .collect()
}

/// The database's clock, in milliseconds since the Unix epoch.
pub(super) fn now_ms(backend: DbBackend) -> &'static str {
    match backend {
        DbBackend::Postgres => "(extract(epoch from clock_timestamp()) * 1000)::bigint",
        DbBackend::MySql => "CAST(UNIX_TIMESTAMP(NOW(3)) * 1000 AS SIGNED)",
        _ => "CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)",
    }
}

/// SQL saying whether the instance of the `emt_daemons` row aliased `row` is live: its
/// registration renewed within its TTL or, on PostgreSQL, its presence connection open and
/// renewed (its `application_name` ends in a deadline, in seconds, that has not passed).
pub(super) fn live(backend: DbBackend, row: &str) -> String {
    let renewed = format!("{row}.expires_at >= {}", now_ms(backend));
    match backend {
        DbBackend::Postgres => format!("({renewed} OR {})", present(&format!("{row}.owner"))),
        _ => renewed,
    }
}

/// PostgreSQL: whether the instance named by `owner` has its presence connection open and
/// renewed (see [`presence_renewal`]).
fn present(owner: &str) -> String {
    let name = format!("'{PRESENCE_PREFIX}' || {owner} || ':'");
    format!(
        "EXISTS (SELECT 1 FROM (SELECT substr(a.application_name, length({name}) + 1) AS deadline
                 FROM pg_stat_activity a WHERE a.datname = current_database()
                 AND left(a.application_name, length({name})) = {name}) p
                 WHERE CASE WHEN p.deadline ~ '^[0-9]{{1,12}}$' THEN p.deadline::bigint ELSE 0 END * 1000 >= {})",
        now_ms(DbBackend::Postgres)
    )
}

/// PostgreSQL: the statement a presence connection renews itself with: its `application_name`
/// becomes `emt-daemon:<owner>:<deadline>`, the deadline `$2` milliseconds from now, in seconds
/// on the database's clock. No write, no transaction id: an idle daemon costs nothing but this.
#[cfg(feature = "postgres")]
pub(crate) fn presence_renewal() -> &'static str {
    "SELECT set_config('application_name',
       $1 || ':' || ceil(extract(epoch from clock_timestamp()) + $2::bigint / 1000.0)::bigint::text, false)"
}

/// SQL saying whether a segment row (its columns prefixed by `table`) may be taken: no owner, or
/// an owner that is not live.
pub(super) fn free_condition(backend: DbBackend, table: &str) -> String {
    format!(
        "{table}owner IS NULL OR NOT EXISTS (SELECT 1 FROM emt_daemons f WHERE f.owner = {table}owner AND {})",
        live(backend, "f")
    )
}
