//! Erasing a tenant: everything the store and the named read models hold of one partition.

use backon::Retryable;

use super::EventStore;
use crate::backend::{self, TenantRows};
use crate::error::{Error, Result};
use crate::limits::{self, MAX_IDENTIFIER_CHARS};
use crate::projection::{ReadModel, stream_id_part};

/// What erasing a tenant removed (or, from [`EventStore::partition_rows`], would remove):
/// rows per table, the read models' and their snapshots' included.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionRows {
    /// The tenant.
    pub partition: String,
    /// `(table, rows)`, in the order they are erased.
    pub tables: Vec<(String, u64)>,
}

impl PartitionRows {
    /// Rows over all tables: 0 when the store holds nothing of the tenant.
    pub fn total(&self) -> u64 {
        self.tables.iter().map(|(_, rows)| rows).sum()
    }
}

impl EventStore {
    /// Removes everything of tenant `partition`, in one transaction: its streams and events (all
    /// generations, archived ones included), checkpoints, leases, skipped-event records and
    /// aggregate snapshots, and for each of `read_models` its rows and their snapshots. On
    /// PostgreSQL a tenant with its own partitions ([`create_partition`](Self::create_partition))
    /// has them dropped whole. Other tenants are not touched.
    ///
    /// Writers of the tenant are shut out while it runs: a projection batch in flight for it
    /// commits first (its checkpoint rows are locked), none starts before the end, and an append
    /// in flight is erased with the rest. A daemon then finds nothing of the tenant, and its id
    /// can be used again from scratch. Idempotent (a second run removes nothing; deadlocks and
    /// lost connections are retried); a tenant the store has nothing of is not an error:
    /// [`PartitionRows::total`] is 0.
    ///
    /// ```no_run
    /// # async fn f(store: emmett_seaorm::EventStore) -> emmett_seaorm::Result<()> {
    /// use emmett_seaorm::projection::ReadModel;
    ///
    /// let erased = store.erase_partition("tenant-a", &[ReadModel::new("carts", "tenant_id")]).await?;
    /// for (table, rows) in &erased.tables {
    ///     println!("{table}: {rows} rows");
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn erase_partition(&self, partition: &str, read_models: &[ReadModel]) -> Result<PartitionRows> {
        let erase = || self.rows_of(partition, read_models, true, None);
        erase.retry(backend::retry_policy()).when(backend::is_retried).await
    }

    /// What [`erase_partition`](Self::erase_partition) would remove, table by table, without
    /// removing it.
    pub async fn partition_rows(&self, partition: &str, read_models: &[ReadModel]) -> Result<PartitionRows> {
        self.rows_of(partition, read_models, false, None).await
    }

    /// Erases the tenant if it has exactly `(streams, events)` rows (what a move copied), else
    /// erases nothing: [`Error::PartitionChanged`].
    pub(super) async fn erase_exactly(
        &self,
        partition: &str,
        read_models: &[ReadModel],
        expected: (u64, u64),
    ) -> Result<PartitionRows> {
        let erase = || self.rows_of(partition, read_models, true, Some(expected));
        erase.retry(backend::retry_policy()).when(backend::is_retried).await
    }

    async fn rows_of(
        &self,
        partition: &str,
        read_models: &[ReadModel],
        erase: bool,
        expected: Option<(u64, u64)>,
    ) -> Result<PartitionRows> {
        self.partition(Some(partition))?;
        limits::check_identifier("partition", partition, MAX_IDENTIFIER_CHARS)?;
        for read_model in read_models {
            limits::check_identifier("read model table", read_model.table(), MAX_IDENTIFIER_CHARS)?;
            limits::check_identifier("tenant column", read_model.tenant_column(), MAX_IDENTIFIER_CHARS)?;
        }
        let tenant_rows = tenant_rows(read_models, partition);
        let txn = match erase {
            true => backend::begin_write(self.executor()).await?,
            false => sea_orm::TransactionTrait::begin(self.executor()).await?,
        };
        let tables = backend::partition_rows(&txn, partition, &tenant_rows, erase).await?;
        let rows = |table: &str| tables.iter().find(|(t, _)| t == table).map_or(0, |(_, n)| *n);
        if let Some((streams, events)) = expected
            && (rows("streams"), rows("messages")) != (streams, events)
        {
            let reason = format!(
                "{streams} streams and {events} events were copied, {} and {} are here",
                rows("streams"),
                rows("messages")
            );
            return Err(Error::PartitionChanged { partition: partition.into(), reason });
        }
        txn.commit().await.map_err(Error::from)?;
        if erase {
            self.forget_partition(partition);
        }
        Ok(PartitionRows { partition: partition.to_owned(), tables })
    }
}

/// The rows of `partition` in each of `read_models`, as the backend erases them.
pub(super) fn tenant_rows<'a>(read_models: &'a [ReadModel], partition: &str) -> Vec<TenantRows<'a>> {
    read_models
        .iter()
        .map(|r| TenantRows {
            table: r.table(),
            tenant_column: r.tenant_column(),
            snapshot_key: stream_id_part(r.tenant_column(), partition),
        })
        .collect()
}
