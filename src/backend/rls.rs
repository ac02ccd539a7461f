//! Tenant isolation in the database: the `partition` column of `snapshots` on every backend, and
//! on PostgreSQL the row-level security policies keyed on the tenant a transaction is bound to
//! (the setting [`TENANT_SETTING`]), switched on and off by [`row_security`].

use sea_orm::{ConnectionTrait, DbBackend, DbErr, Statement};

/// The transaction-local setting that names the tenant a statement runs for.
pub(crate) const TENANT_SETTING: &str = "emt.tenant";

/// The store's tables that hold a tenant's rows, each with a `partition` column.
const TENANT_TABLES: [&str; 7] = [
    "streams",
    "messages",
    "subscriptions",
    "snapshots",
    "emt_aggregate_snapshots",
    "emt_leases",
    "emt_skipped_events",
];

/// The policy's name on each of [`TENANT_TABLES`].
const POLICY: &str = "emt_tenant_rows";

/// DDL of migration `tenant_policies`, not run: `snapshots.partition` (where it is missing) and,
/// on PostgreSQL, a policy per tenant table letting a statement see and write the rows of the
/// tenant its transaction is bound to. Policies do nothing until [`row_security`] enables them.
pub(crate) async fn tenant_policies(conn: &impl ConnectionTrait) -> Result<Vec<String>, DbErr> {
    let backend = conn.get_database_backend();
    // (A schema created since has the column; MySQL's then takes the exact collation.)
    let mut ddl = Vec::new();
    if let Some(shape) = super::table_shape(conn, "snapshots").await? {
        let (column, change) = match backend {
            DbBackend::MySql => {
                let collation = super::mysql_exact_collation(conn).await?;
                (format!("VARCHAR(255) CHARACTER SET utf8mb4 COLLATE {collation}"), "MODIFY")
            }
            _ => ("TEXT".to_owned(), ""),
        };
        let partition = super::partition_column(backend);
        if !shape.columns.contains_key("partition") {
            ddl.push(format!("ALTER TABLE snapshots ADD COLUMN {partition} {column}"));
        } else if !change.is_empty() {
            ddl.push(format!("ALTER TABLE snapshots {change} {partition} {column}"));
        }
    }
    if backend == DbBackend::Postgres {
        let bound = format!("partition = current_setting('{TENANT_SETTING}', true)");
        for table in TENANT_TABLES {
            ddl.push(format!("DROP POLICY IF EXISTS {POLICY} ON {table}"));
            ddl.push(format!("CREATE POLICY {POLICY} ON {table} USING ({bound}) WITH CHECK ({bound})"));
        }
    }
    Ok(ddl)
}

/// Undoes [`tenant_policies`]: row security off, the policies and `snapshots.partition` dropped.
pub(crate) fn drop_tenant_policies(backend: DbBackend) -> Vec<String> {
    let mut ddl = Vec::new();
    if backend == DbBackend::Postgres {
        ddl.extend(row_security(backend, false));
        ddl.extend(TENANT_TABLES.iter().map(|table| format!("DROP POLICY IF EXISTS {POLICY} ON {table}")));
    }
    ddl.push(format!("ALTER TABLE snapshots DROP COLUMN {}", super::partition_column(backend)));
    ddl
}

/// PostgreSQL: row-level security on (or off) for the tenant tables. On, a role other than the
/// tables' owner (or one with `BYPASSRLS`) sees and writes only the rows of the tenant its
/// transaction is bound to: none outside a tenant-bound store. Nothing on SQLite and MySQL.
pub(crate) fn row_security(backend: DbBackend, on: bool) -> Vec<String> {
    if backend != DbBackend::Postgres {
        return Vec::new();
    }
    let switch = if on { "ENABLE" } else { "DISABLE" };
    TENANT_TABLES.iter().map(|table| format!("ALTER TABLE {table} {switch} ROW LEVEL SECURITY")).collect()
}

/// PostgreSQL: the least an application role needs to append, read and project inline
/// through tenant-bound stores: rows of the tenant tables (reads everywhere, writes where
/// appends and inline projections write) and the global-position sequence. No `DELETE` but of
/// aggregate snapshots (archiving forgets them), no `TRUNCATE`, nothing of the daemon's tables,
/// no tenant partition by its own name, and no DDL: the role owns nothing.
pub(crate) fn app_role_grants(role: &str) -> Vec<String> {
    let role = quote_identifier(role);
    vec![
        format!("GRANT USAGE ON SCHEMA public TO {role}"),
        format!("GRANT SELECT, INSERT, UPDATE ON streams, messages, snapshots, emt_aggregate_snapshots TO {role}"),
        format!("GRANT DELETE ON emt_aggregate_snapshots TO {role}"),
        format!("GRANT SELECT ON subscriptions, emt_leases, emt_skipped_events TO {role}"),
        format!("GRANT USAGE ON SEQUENCE emt_global_message_position TO {role}"),
    ]
}

/// PostgreSQL: whether row-level security is on for every tenant table.
pub(crate) async fn row_security_on(conn: &impl ConnectionTrait) -> Result<bool, DbErr> {
    let tables = TENANT_TABLES.map(|t| format!("'{t}'")).join(", ");
    let sql = format!(
        "SELECT count(*) FILTER (WHERE c.relrowsecurity) = {} AS enabled FROM pg_class c
         WHERE c.oid IN (SELECT to_regclass(t) FROM unnest(ARRAY[{tables}]) AS t)",
        TENANT_TABLES.len()
    );
    let row = conn.query_one_raw(Statement::from_string(DbBackend::Postgres, sql)).await?;
    Ok(row.map(|row| row.try_get::<bool>("", "enabled")).transpose()?.unwrap_or(false))
}

/// `SET LOCAL` of the tenant setting to `tenant`, its value quoted as sea-query quotes strings.
pub(crate) fn bind_tenant(tenant: &str) -> String {
    use sea_orm::sea_query::{PostgresQueryBuilder, QueryBuilder};
    format!("SET LOCAL {TENANT_SETTING} = {}", PostgresQueryBuilder.value_to_string(&tenant.into()))
}

/// `name` as a PostgreSQL identifier, quoted.
fn quote_identifier(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}
