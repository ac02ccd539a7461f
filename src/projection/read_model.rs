//! A read model's table as tenant operations see it: where a tenant's rows are.

/// A read-model table whose rows carry the tenant, and the column that holds it (the key that
/// `extract_keys` fills with the partition). [`EventStore::erase_partition`](crate::EventStore::erase_partition)
/// removes a tenant's rows of each read model named, and their snapshots.
///
/// Snapshot projections declare theirs with
/// [`SnapshotProjection::tenant_column`](super::SnapshotProjection::tenant_column) and a
/// [`ProjectionRegistry`](super::ProjectionRegistry) lists them; name a custom handler's table
/// with [`ProjectionRegistry::read_model`](super::ProjectionRegistry::read_model).
///
/// ```
/// use emmett_seaorm::projection::ReadModel;
///
/// let carts = ReadModel::new("carts", "tenant_id");
/// assert_eq!((carts.table(), carts.tenant_column()), ("carts", "tenant_id"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadModel {
    table: String,
    tenant_column: String,
}

impl ReadModel {
    /// The rows of `table` (`schema.table` when qualified) whose `tenant_column` holds the tenant.
    pub fn new(table: impl Into<String>, tenant_column: impl Into<String>) -> Self {
        Self { table: table.into(), tenant_column: tenant_column.into() }
    }

    /// The table.
    pub fn table(&self) -> &str {
        &self.table
    }

    /// The column holding the tenant.
    pub fn tenant_column(&self) -> &str {
        &self.tenant_column
    }
}
