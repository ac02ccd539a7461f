//! The router's catalog: which store holds which tenant (`emt_tenant_stores`).

use sea_orm::DbBackend;

/// DDL of the catalog's table on `backend` (idempotent): a tenant, the name of its store, and
/// whether it is being moved (its store then refuses it for a moment).
pub(crate) fn catalog_table(backend: DbBackend) -> String {
    let text = match backend {
        DbBackend::MySql => "VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin",
        _ => "TEXT",
    };
    format!(
        "CREATE TABLE IF NOT EXISTS emt_tenant_stores (tenant {text} NOT NULL PRIMARY KEY, store {text} NOT NULL, \
         moving BOOLEAN NOT NULL DEFAULT FALSE)"
    )
}
