//! What a database error means for the caller: retry, busy, connection lost — by backend codes.

use sea_orm::DbErr;

use crate::error::Error;

/// What kind of failure a database error is, for the typed errors and the retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    /// A deadlock or serialization failure: the transaction lost a race; run it again.
    Retry,
    /// A lock wait or busy timeout ran out: the database already waited; give up for now.
    Busy,
    /// The connection broke or could not be had; `maybe_written` unless it never reached the server.
    Connection { maybe_written: bool },
    /// The role may not do it: a privilege it lacks, or (PostgreSQL) a row that row-level
    /// security keeps from it.
    Denied,
    /// A prepared statement a transaction pooler routed to the wrong server (nothing ran).
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    Pooler,
    /// Anything else.
    Other,
}

/// Sorts a database error by what a caller can do about it.
///
/// Codes: PostgreSQL 40001/40P01 (serialization failure, deadlock), 55P03 (lock timeout),
/// 57P01–57P03 and class 08 (connection), 25P03/57P05 (idle timeouts: the session ended), 42501 (insufficient privilege, row-level security);
/// MySQL 1213 (deadlock, SQLSTATE 40001), 1205 (lock wait timeout), 1927 (connection killed),
/// 1142/1143/1227 (access denied); SQLite 5/6 and extended BUSY/LOCKED codes
/// (`database is locked` after the busy timeout), 517 (BUSY_SNAPSHOT: retry at once).
#[cfg(any(feature = "sqlite", feature = "postgres", feature = "mysql"))]
pub(crate) fn classify(err: &DbErr) -> Failure {
    use sea_orm::sqlx::Error as Sqlx;
    let sqlx = match err {
        DbErr::Custom(message) if message.starts_with(LOST_RACE) => return Failure::Retry,
        DbErr::ConnectionAcquire(_) => return Failure::Connection { maybe_written: false },
        DbErr::Conn(sea_orm::RuntimeErr::SqlxError(e))
        | DbErr::Exec(sea_orm::RuntimeErr::SqlxError(e))
        | DbErr::Query(sea_orm::RuntimeErr::SqlxError(e)) => e.as_ref(),
        DbErr::Conn(_) => return Failure::Connection { maybe_written: true },
        _ => return Failure::Other,
    };
    let db = match sqlx {
        #[cfg(feature = "postgres")]
        sqlx if crate::connect::statements_mixed_up(sqlx) => return Failure::Pooler,
        Sqlx::PoolTimedOut | Sqlx::PoolClosed => return Failure::Connection { maybe_written: false },
        Sqlx::Io(_) | Sqlx::Tls(_) | Sqlx::Protocol(_) | Sqlx::WorkerCrashed => {
            return Failure::Connection { maybe_written: true };
        }
        Sqlx::Database(db) => db,
        _ => return Failure::Other,
    };
    #[cfg(feature = "mysql")]
    if let Some(mysql) = db.try_downcast_ref::<sea_orm::sqlx::mysql::MySqlDatabaseError>() {
        return match mysql.number() {
            1213 => Failure::Retry,
            1205 => Failure::Busy,
            1053 | 1927 => Failure::Connection { maybe_written: true },
            1142 | 1143 | 1227 => Failure::Denied,
            _ => Failure::Other,
        };
    }
    match db.code().as_deref() {
        Some("40001" | "40P01" | "517") => Failure::Retry,
        Some("55P03" | "5" | "6" | "261" | "262" | "773") => Failure::Busy,
        Some("57P01" | "57P02" | "57P03") => Failure::Connection { maybe_written: true },
        // The server ended an idle session, or one idle in its transaction (rolled back): the
        // statement that meets it never ran.
        Some("25P03" | "57P05") => Failure::Connection { maybe_written: false },
        Some("42501") => Failure::Denied,
        Some(code) if code.starts_with("08") => Failure::Connection { maybe_written: true },
        _ => Failure::Other,
    }
}

/// How the message of a race the store lost and found itself begins: classified (and retried)
/// like a serialization failure.
const LOST_RACE: &str = "lost a race: ";

/// A race the store lost and found itself (`what` happened meanwhile): nothing of the
/// transaction may commit; it runs again, like after a serialization failure.
pub(crate) fn lost_race(what: &str) -> DbErr {
    DbErr::Custom(format!("{LOST_RACE}{what}"))
}

/// Without a backend there is no driver error to sort (and `lib.rs` stops the build).
#[cfg(not(any(feature = "sqlite", feature = "postgres", feature = "mysql")))]
pub(crate) fn classify(_: &DbErr) -> Failure {
    Failure::Other
}

impl From<sea_orm::DbErr> for Error {
    /// Sorts database errors into the typed ones a caller can act on: busy, connection lost,
    /// or any other database error.
    fn from(source: sea_orm::DbErr) -> Self {
        match classify(&source) {
            Failure::Busy | Failure::Retry => Error::Busy { source },
            Failure::Connection { maybe_written } => Error::ConnectionLost { maybe_written, source },
            Failure::Pooler => Error::Pooler { source },
            Failure::Denied => Error::Denied { source },
            Failure::Other => Error::Database(source),
        }
    }
}

/// Whether the store retries `err` at once by itself: a deadlock or serialization failure (a
/// lost race), or a lost connection. Timeouts already waited; they are not retried.
pub(crate) fn is_retried(err: &Error) -> bool {
    match err {
        Error::Busy { source } => classify(source) == Failure::Retry,
        Error::ConnectionLost { .. } => true,
        _ => false,
    }
}

/// The backoff of the store's own retries: 5 attempts, 10 ms doubling to 320 ms, with jitter.
pub(crate) fn retry_policy() -> backon::ExponentialBuilder {
    backon::ExponentialBuilder::default()
        .with_min_delay(std::time::Duration::from_millis(10))
        .with_max_delay(std::time::Duration::from_millis(320))
        .with_max_times(4)
        .with_jitter()
}
