//! The connection the crate runs its statements on: a pool, or a session's transaction.
//!
//! Behind a transaction-mode pooler ([`crate::connect`]: `pooler=transaction`) a statement
//! outside a transaction is not safe as sqlx sends it: it prepares the statement and executes it
//! in two exchanges, and the pooler may give each to another server (`prepared statement
//! "sqlx_s_1" does not exist`, or another client's statement of that name). There a [`Conn`]
//! writes the statement's values into its SQL (sea-query's escaping, as `Statement`'s `Display`
//! does) and sends it by the simple protocol: one exchange, one server, no prepared statement,
//! and one round trip instead of a transaction's four. (Statements inside transactions are
//! prepared and executed on the transaction's one server.) Those statements run on connections
//! of the [`Conn`]'s own ([`Clients`]), not sqlx's pool: sqlx pings every connection handed back
//! to its pool (a lone `Sync`), for which the pooler takes a server and runs its reset query
//! again — a second server turn per statement. Everywhere else a [`Conn`] is the pool itself.
//!
//! A pool bound to a tenant (PostgreSQL, [`crate::EventStore::for_tenant`]) runs every statement
//! with the tenant setting of row-level security bound in its transaction: a statement outside
//! a transaction goes by the simple protocol after a `SET LOCAL` in the same exchange (one
//! implicit transaction, one round trip), a transaction sets it after `BEGIN`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use sea_orm::{
    AccessMode, ConnectionTrait, DatabaseConnection, DatabaseTransaction, DbBackend, DbErr, ExecResult, IsolationLevel,
    QueryResult, Statement, TransactionError, TransactionOptions, TransactionTrait,
};

/// A pool (knowing whether it is behind a transaction pooler, and the tenant it is bound to on
/// PostgreSQL) or a session's transaction.
#[derive(Clone, Debug)]
pub(crate) enum Conn {
    Pool { db: DatabaseConnection, pooled: Option<Arc<Clients>>, tenant: Option<Arc<str>> },
    Session(Arc<DatabaseTransaction>),
}

impl Conn {
    /// `db`, finding out whether it reaches PostgreSQL through a transaction pooler.
    pub fn pool(db: DatabaseConnection) -> Self {
        let pooled = crate::connect::behind_pooler(&db).then(|| Arc::new(Clients::of(&db)));
        Conn::Pool { db, pooled, tenant: None }
    }

    /// This pool with its statements bound to `tenant` on PostgreSQL (elsewhere, and for a
    /// session, unchanged: a session is bound when its pool is).
    pub fn for_tenant(&self, tenant: &str) -> Self {
        match self {
            Conn::Pool { db, pooled, .. } if db.get_database_backend() == DbBackend::Postgres => {
                Conn::Pool { db: db.clone(), pooled: pooled.clone(), tenant: Some(tenant.into()) }
            }
            other => other.clone(),
        }
    }

    /// This pool unbound, if it is bound to a tenant: for statements that bind it themselves.
    pub fn without_tenant(&self) -> Option<Self> {
        match self {
            Conn::Pool { db, pooled, tenant: Some(_) } => {
                Some(Conn::Pool { db: db.clone(), pooled: pooled.clone(), tenant: None })
            }
            _ => None,
        }
    }

    /// A new transaction of the pool bound to the tenant, if it is bound.
    async fn bind(&self, txn: DatabaseTransaction) -> Result<DatabaseTransaction, DbErr> {
        if let Conn::Pool { tenant: Some(tenant), .. } = self {
            txn.execute_unprepared(&crate::backend::rls::bind_tenant(tenant)).await?;
        }
        Ok(txn)
    }

    /// `stmt` by the simple protocol (behind a pooler, or bound to a tenant): after the
    /// tenant's `SET LOCAL` if bound, on a kept connection behind a pooler, else on one of the
    /// pool's. `run` fetches its outcome.
    #[cfg(feature = "postgres")]
    async fn simple<T>(
        &self,
        stmt: &Statement,
        run: impl AsyncFnOnce(sea_orm::sqlx::RawSql, &mut sea_orm::sqlx::PgConnection) -> Result<T, sea_orm::sqlx::Error>,
    ) -> Result<T, sea_orm::sqlx::Error> {
        let Conn::Pool { db, pooled, tenant } = self else { unreachable!("a session runs its statements itself") };
        let sql = match tenant {
            Some(tenant) => format!("{}; {stmt}", crate::backend::rls::bind_tenant(tenant)),
            None => stmt.to_string(),
        };
        let sql = sea_orm::sqlx::raw_sql(sea_orm::sqlx::AssertSqlSafe(sql));
        match pooled {
            Some(clients) => clients.run(sql, run).await,
            None => {
                let mut conn = db.get_postgres_connection_pool().acquire().await?;
                run(sql, &mut conn).await
            }
        }
    }

    /// The pool (`None` for a session).
    pub fn database(&self) -> Option<&DatabaseConnection> {
        match self {
            Conn::Pool { db, .. } => Some(db),
            Conn::Session(_) => None,
        }
    }

    /// Whether statements go through a transaction pooler (see the module docs).
    pub fn pooled(&self) -> bool {
        matches!(self, Conn::Pool { pooled: Some(_), .. })
    }
}

/// Connections to a transaction pooler, as many as the pool may open, kept open between
/// statements (see the module docs). A connection whose statement failed other than by the
/// server's refusal (or whose future was dropped mid-statement) is closed, not reused.
#[derive(Debug)]
pub(crate) struct Clients {
    #[cfg(feature = "postgres")]
    options: Arc<sea_orm::sqlx::postgres::PgConnectOptions>,
    #[cfg(feature = "postgres")]
    slots: tokio::sync::Semaphore,
    #[cfg(feature = "postgres")]
    idle: std::sync::Mutex<Vec<sea_orm::sqlx::PgConnection>>,
}

impl Clients {
    /// Room for as many connections as `db`'s pool, none open yet.
    fn of(db: &DatabaseConnection) -> Self {
        #[cfg(feature = "postgres")]
        {
            let pool = db.get_postgres_connection_pool();
            Clients {
                options: pool.connect_options(),
                slots: tokio::sync::Semaphore::new(pool.options().get_max_connections() as usize),
                idle: Default::default(),
            }
        }
        #[cfg(not(feature = "postgres"))]
        {
            let _ = db;
            Clients {}
        }
    }

    /// `sql` on one of the connections: `run` fetches its outcome.
    #[cfg(feature = "postgres")]
    async fn run<T>(
        &self,
        sql: sea_orm::sqlx::RawSql,
        run: impl AsyncFnOnce(sea_orm::sqlx::RawSql, &mut sea_orm::sqlx::PgConnection) -> Result<T, sea_orm::sqlx::Error>,
    ) -> Result<T, sea_orm::sqlx::Error> {
        use sea_orm::sqlx::Connection as _;
        let _slot = self.slots.acquire().await.expect("the semaphore is never closed");
        let idle = self.idle.lock().expect("no panics under the lock").pop();
        let mut conn = match idle {
            Some(conn) => conn,
            None => sea_orm::sqlx::PgConnection::connect_with(&self.options).await?,
        };
        // Dropped mid-statement (the caller's future dropped), the connection closes with it.
        let done = run(sql, &mut conn).await;
        if matches!(done, Ok(_) | Err(sea_orm::sqlx::Error::Database(_))) {
            self.idle.lock().expect("no panics under the lock").push(conn);
        }
        done
    }
}

/// `$call` on the pool or the session's transaction, or `$simple` for a pool behind a
/// transaction pooler or bound to a tenant ([`Conn::simple`]).
macro_rules! on {
    ($conn:expr, $c:ident => $call:expr, $simple:expr) => {
        match $conn {
            #[cfg(feature = "postgres")]
            Conn::Pool { pooled, tenant, .. } if pooled.is_some() || tenant.is_some() => $simple,
            Conn::Pool { db: $c, .. } => $call.await,
            Conn::Session($c) => $call.await,
        }
    };
}

/// A query error as SeaORM reports sqlx's.
#[cfg(feature = "postgres")]
fn query_error(error: sea_orm::sqlx::Error) -> DbErr {
    DbErr::Query(sea_orm::RuntimeErr::SqlxError(Arc::new(error)))
}

#[async_trait::async_trait]
impl ConnectionTrait for Conn {
    fn get_database_backend(&self) -> DbBackend {
        match self {
            Conn::Pool { db, .. } => db.get_database_backend(),
            Conn::Session(txn) => txn.get_database_backend(),
        }
    }

    async fn execute_raw(&self, stmt: Statement) -> Result<ExecResult, DbErr> {
        on!(self, c => c.execute_raw(stmt), {
            let done = self.simple(&stmt, async |sql, conn| sql.execute(conn).await).await;
            done.map(ExecResult::from).map_err(|e| DbErr::Exec(sea_orm::RuntimeErr::SqlxError(Arc::new(e))))
        })
    }

    /// One exchange (no parameters, the simple protocol): safe behind a pooler as it is.
    async fn execute_unprepared(&self, sql: &str) -> Result<ExecResult, DbErr> {
        match self {
            Conn::Pool { db, tenant: Some(tenant), .. } => {
                db.execute_unprepared(&format!("{}; {sql}", crate::backend::rls::bind_tenant(tenant))).await
            }
            Conn::Pool { db, .. } => db.execute_unprepared(sql).await,
            Conn::Session(txn) => txn.execute_unprepared(sql).await,
        }
    }

    async fn query_one_raw(&self, stmt: Statement) -> Result<Option<QueryResult>, DbErr> {
        on!(self, c => c.query_one_raw(stmt), {
            let row = self.simple(&stmt, async |sql, conn| sql.fetch_optional(conn).await).await;
            row.map(|row| row.map(QueryResult::from)).map_err(query_error)
        })
    }

    async fn query_all_raw(&self, stmt: Statement) -> Result<Vec<QueryResult>, DbErr> {
        on!(self, c => c.query_all_raw(stmt), {
            let rows = self.simple(&stmt, async |sql, conn| sql.fetch_all(conn).await).await;
            rows.map(|rows| rows.into_iter().map(QueryResult::from).collect()).map_err(query_error)
        })
    }

    fn support_returning(&self) -> bool {
        match self {
            Conn::Pool { db, .. } => db.support_returning(),
            Conn::Session(txn) => txn.support_returning(),
        }
    }
}

#[async_trait::async_trait]
impl TransactionTrait for Conn {
    type Transaction = DatabaseTransaction;

    async fn begin(&self) -> Result<DatabaseTransaction, DbErr> {
        match self {
            Conn::Pool { db, .. } => self.bind(db.begin().await?).await,
            Conn::Session(txn) => txn.begin().await,
        }
    }

    async fn begin_with_config(
        &self,
        isolation_level: Option<IsolationLevel>,
        access_mode: Option<AccessMode>,
    ) -> Result<DatabaseTransaction, DbErr> {
        match self {
            Conn::Pool { db, .. } => self.bind(db.begin_with_config(isolation_level, access_mode).await?).await,
            Conn::Session(txn) => txn.begin_with_config(isolation_level, access_mode).await,
        }
    }

    async fn begin_with_options(&self, options: TransactionOptions) -> Result<DatabaseTransaction, DbErr> {
        match self {
            Conn::Pool { db, .. } => self.bind(db.begin_with_options(options).await?).await,
            Conn::Session(txn) => txn.begin_with_options(options).await,
        }
    }

    async fn transaction<F, T, E>(&self, callback: F) -> Result<T, TransactionError<E>>
    where
        F: for<'c> FnOnce(&'c DatabaseTransaction) -> Pin<Box<dyn Future<Output = Result<T, E>> + Send + 'c>> + Send,
        T: Send,
        E: std::fmt::Display + std::fmt::Debug + Send,
    {
        self.transaction_with_config(callback, None, None).await
    }

    async fn transaction_with_config<F, T, E>(
        &self,
        callback: F,
        isolation_level: Option<IsolationLevel>,
        access_mode: Option<AccessMode>,
    ) -> Result<T, TransactionError<E>>
    where
        F: for<'c> FnOnce(&'c DatabaseTransaction) -> Pin<Box<dyn Future<Output = Result<T, E>> + Send + 'c>> + Send,
        T: Send,
        E: std::fmt::Display + std::fmt::Debug + Send,
    {
        match self {
            Conn::Pool { tenant: Some(_), .. } => {
                let txn =
                    self.begin_with_config(isolation_level, access_mode).await.map_err(TransactionError::Connection)?;
                match callback(&txn).await {
                    Ok(value) => txn.commit().await.map(|_| value).map_err(TransactionError::Connection),
                    Err(error) => {
                        txn.rollback().await.map_err(TransactionError::Connection)?;
                        Err(TransactionError::Transaction(error))
                    }
                }
            }
            Conn::Pool { db, .. } => db.transaction_with_config(callback, isolation_level, access_mode).await,
            Conn::Session(txn) => txn.transaction_with_config(callback, isolation_level, access_mode).await,
        }
    }
}
