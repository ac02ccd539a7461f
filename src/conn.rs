//! The connection the crate runs its statements on: a pool, or a session's transaction.
//!
//! Behind a transaction-mode pooler ([`crate::connect`]: `pooler=transaction`) a statement
//! outside a transaction is not safe: sqlx prepares it and executes it in two exchanges, and the
//! pooler may give each to another server (`prepared statement "sqlx_s_1" does not exist`, or
//! another client's statement of that name). There a [`Conn`] runs each statement outside a
//! transaction in a transaction of its own, so one server sees both exchanges. Statements sent
//! without parameters by [`ConnectionTrait::execute_unprepared`] take one exchange and stay as
//! they are. Everywhere else a [`Conn`] is the pool itself.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use sea_orm::{
    AccessMode, ConnectionTrait, DatabaseConnection, DatabaseTransaction, DbBackend, DbErr, ExecResult, IsolationLevel,
    QueryResult, Statement, TransactionError, TransactionOptions, TransactionTrait,
};

/// A pool (knowing whether it is behind a transaction pooler) or a session's transaction.
#[derive(Clone, Debug)]
pub(crate) enum Conn {
    Pool { db: DatabaseConnection, pooled: bool },
    Session(Arc<DatabaseTransaction>),
}

impl Conn {
    /// `db`, finding out whether it reaches PostgreSQL through a transaction pooler.
    pub fn pool(db: DatabaseConnection) -> Self {
        let pooled = crate::connect::behind_pooler(&db);
        Conn::Pool { db, pooled }
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
        matches!(self, Conn::Pool { pooled: true, .. })
    }
}

/// `$call` with `$c` bound to the pool, to a transaction of its own behind a transaction pooler,
/// or to the session's transaction.
macro_rules! on {
    ($conn:expr, $c:ident => $call:expr) => {
        match $conn {
            Conn::Pool { db: $c, pooled: false } => $call.await,
            Conn::Pool { db, pooled: true } => {
                let $c = db.begin().await?;
                let done = $call.await?;
                $c.commit().await?;
                Ok(done)
            }
            Conn::Session($c) => $call.await,
        }
    };
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
        on!(self, c => c.execute_raw(stmt))
    }

    /// One exchange (no parameters, the simple protocol): safe behind a pooler as it is.
    async fn execute_unprepared(&self, sql: &str) -> Result<ExecResult, DbErr> {
        match self {
            Conn::Pool { db, .. } => db.execute_unprepared(sql).await,
            Conn::Session(txn) => txn.execute_unprepared(sql).await,
        }
    }

    async fn query_one_raw(&self, stmt: Statement) -> Result<Option<QueryResult>, DbErr> {
        on!(self, c => c.query_one_raw(stmt))
    }

    async fn query_all_raw(&self, stmt: Statement) -> Result<Vec<QueryResult>, DbErr> {
        on!(self, c => c.query_all_raw(stmt))
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
            Conn::Pool { db, .. } => db.begin().await,
            Conn::Session(txn) => txn.begin().await,
        }
    }

    async fn begin_with_config(
        &self,
        isolation_level: Option<IsolationLevel>,
        access_mode: Option<AccessMode>,
    ) -> Result<DatabaseTransaction, DbErr> {
        match self {
            Conn::Pool { db, .. } => db.begin_with_config(isolation_level, access_mode).await,
            Conn::Session(txn) => txn.begin_with_config(isolation_level, access_mode).await,
        }
    }

    async fn begin_with_options(&self, options: TransactionOptions) -> Result<DatabaseTransaction, DbErr> {
        match self {
            Conn::Pool { db, .. } => db.begin_with_options(options).await,
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
        let txn = self.begin_with_config(isolation_level, access_mode).await.map_err(TransactionError::Connection)?;
        match callback(&txn).await {
            Ok(done) => {
                txn.commit().await.map_err(TransactionError::Connection)?;
                Ok(done)
            }
            Err(error) => {
                txn.rollback().await.map_err(TransactionError::Connection)?;
                Err(TransactionError::Transaction(error))
            }
        }
    }
}
