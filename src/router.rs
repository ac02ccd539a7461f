//! Tenants spread over several databases: [`StoreRouter`].

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use sea_orm::sea_query::{Expr, ExprTrait, OnConflict, Query};
use sea_orm::{ConnectionTrait, DatabaseConnection};

use crate::conn::Conn;
use crate::projection::ReadModel;
use crate::{Error, EventStore, PartitionCounts, Result};

/// Tenants spread over several databases: resolves a tenant to the [`EventStore`] that holds it.
///
/// A tenant's store comes from, in order: the router's catalog (a table `emt_tenant_stores` in a
/// small database of its own, which you change at runtime; read through a cache that forgets
/// an entry after [`StoreRouter::catalog`]'s `ttl`), its fixed map, then the default store.
/// The store is handed out bound to the tenant
/// ([`EventStore::for_tenant`]), so everything the crate does through it — appends, reads,
/// aggregates, sessions, the command handler, inline projections — stays in that tenant and
/// that database: a tenant never straddles two stores.
///
/// ```no_run
/// # async fn f(shared: emmett_seaorm::EventStore, big: emmett_seaorm::EventStore,
/// #            catalog: sea_orm::DatabaseConnection) -> emmett_seaorm::Result<()> {
/// use emmett_seaorm::{AppendOptions, StoreRouter};
/// use std::time::Duration;
///
/// let router = StoreRouter::new()
///     .store("shared", shared)
///     .store("big", big)
///     .tenant("acme", "big") // a fixed entry (the catalog can override it)
///     .default_store("shared") // the long tail
///     .catalog(catalog, Duration::from_secs(1))
///     .await?;
/// router.assign("globex", "big").await?; // a new tenant, recorded in the catalog
/// let acme = router.for_tenant("acme").await?; // the "big" store, bound to tenant acme
/// let e = serde_json::json!({ "type": "Opened", "data": {} });
/// acme.append_to_stream("cart-1", [e], AppendOptions::default()).await?;
/// # Ok(()) }
/// ```
///
/// Cheap to clone: clones share the stores (a store added to one is in all) and the catalog's
/// cache.
#[derive(Clone, Default)]
pub struct StoreRouter {
    stores: Arc<RwLock<BTreeMap<String, EventStore>>>,
    fixed: HashMap<String, String>,
    default: Option<String>,
    catalog: Option<Arc<Catalog>>,
}

/// The table-backed map and what was read of it.
struct Catalog {
    conn: Conn,
    ttl: Duration,
    /// Tenant → (its entry in the catalog, if any; when it was read).
    cache: Mutex<HashMap<String, (Option<Entry>, Instant)>>,
}

/// A tenant's row in the catalog.
#[derive(Clone, Debug)]
struct Entry {
    store: String,
    moving: bool,
}

impl std::fmt::Debug for StoreRouter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreRouter")
            .field("stores", &self.stores().into_iter().map(|(name, _)| name).collect::<Vec<_>>())
            .field("fixed", &self.fixed)
            .field("default", &self.default)
            .field("catalog", &self.catalog.as_ref().map(|c| c.ttl))
            .finish()
    }
}

impl StoreRouter {
    /// A router with no stores.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a store under `name` (any backend).
    pub fn store(self, name: impl Into<String>, store: EventStore) -> Self {
        self.add_store(name, store);
        self
    }

    /// Adds a store under `name` to a running router (and its clones), replacing one of that
    /// name: tenants the catalog maps to it resolve from now on, and a
    /// [`DaemonFleet`](crate::daemon::DaemonFleet) started on the router runs its daemon
    /// within a second.
    pub fn add_store(&self, name: impl Into<String>, store: EventStore) {
        self.stores.write().expect("not poisoned").insert(name.into(), store);
    }

    /// A fixed entry: `tenant` lives in the store named `store` (unless the catalog says otherwise).
    pub fn tenant(mut self, tenant: impl Into<String>, store: impl Into<String>) -> Self {
        self.fixed.insert(tenant.into(), store.into());
        self
    }

    /// The store of every tenant that neither the fixed map nor the catalog names.
    pub fn default_store(mut self, store: impl Into<String>) -> Self {
        self.default = Some(store.into());
        self
    }

    /// Reads the tenant → store map from `emt_tenant_stores` in `db` (created if missing), each
    /// answer kept for `ttl`: a change made there ([`assign`](Self::assign), or SQL) reaches
    /// this router within `ttl`.
    pub async fn catalog(mut self, db: DatabaseConnection, ttl: Duration) -> Result<Self> {
        let conn = Conn::pool(db);
        conn.execute_unprepared(&crate::backend::catalog_table(conn.get_database_backend())).await?;
        self.catalog = Some(Arc::new(Catalog { conn, ttl, cache: Mutex::default() }));
        Ok(self)
    }

    /// The names of the stores, with the stores, in name order.
    pub fn stores(&self) -> Vec<(String, EventStore)> {
        let stores = self.stores.read().expect("not poisoned");
        stores.iter().map(|(name, store)| (name.clone(), store.clone())).collect()
    }

    /// The store named `name`.
    pub fn store_named(&self, name: &str) -> Option<EventStore> {
        self.stores.read().expect("not poisoned").get(name).cloned()
    }

    /// The name of the store that holds `tenant`: [`Error::UnknownTenant`] when nothing maps it
    /// and there is no default, [`Error::UnknownStore`] when it maps to a store this router
    /// does not have, [`Error::TenantMoving`] while it is being moved.
    pub async fn store_of(&self, tenant: &str) -> Result<String> {
        Ok(self.resolve(tenant).await?.0)
    }

    /// The name of the store that holds `tenant`, with the store (see [`store_of`](Self::store_of)).
    async fn resolve(&self, tenant: &str) -> Result<(String, EventStore)> {
        let entry = match &self.catalog {
            Some(catalog) => catalog.entry(tenant).await?,
            None => None,
        };
        if entry.as_ref().is_some_and(|e| e.moving) {
            return Err(Error::TenantMoving { partition: tenant.into() });
        }
        let store = entry
            .map(|e| e.store)
            .or_else(|| self.fixed.get(tenant).cloned())
            .or_else(|| self.default.clone())
            .ok_or_else(|| Error::UnknownTenant { partition: tenant.into() })?;
        let named = self.named(&store, tenant)?;
        Ok((store, named))
    }

    /// The store that holds `tenant`, bound to it ([`EventStore::for_tenant`]). Take one per
    /// unit of work: a handle kept across a [`move_tenant`](Self::move_tenant) still reaches
    /// the old store.
    pub async fn for_tenant(&self, tenant: &str) -> Result<EventStore> {
        Ok(self.resolve(tenant).await?.1.for_tenant(tenant))
    }

    /// Records in the catalog that `tenant` lives in `store` (a store of this router), for
    /// every router reading the catalog (within their `ttl`). It moves no data: see
    /// [`move_tenant`](Self::move_tenant) for a tenant that has some.
    pub async fn assign(&self, tenant: &str, store: &str) -> Result<()> {
        self.catalog_and_store(tenant, store)?.set(tenant, store, false).await
    }

    /// Moves `tenant` to the store named `to`: marks it as moving in the catalog (every router
    /// then refuses it with [`Error::TenantMoving`], a transient error, once its cache has
    /// seen the mark: the move waits twice the catalog's `ttl` for that), moves its data with
    /// [`EventStore::move_partition`] (the rows of `read_models` erased at the old store; the
    /// new store's daemon projects it), then records the new store. If the move fails the
    /// tenant stays where it was, unmarked.
    pub async fn move_tenant(&self, tenant: &str, to: &str, read_models: &[ReadModel]) -> Result<PartitionCounts> {
        let catalog = self.catalog_and_store(tenant, to)?;
        let (from, source) = self.resolve(tenant).await?;
        if from == to {
            return Ok(PartitionCounts { partition: tenant.into(), streams: 0, events: 0 });
        }
        catalog.set(tenant, &from, true).await?;
        // Once for every router's cache to see the mark, once more for what they let through.
        tokio::time::sleep(catalog.ttl * 2).await;
        let target = self.named(to, tenant)?;
        match source.move_partition(tenant, &target, read_models).await {
            Ok(moved) => {
                catalog.set(tenant, to, false).await?;
                Ok(moved)
            }
            Err(error) => {
                catalog.set(tenant, &from, false).await?;
                Err(error)
            }
        }
    }

    /// The catalog, once `store` is known to be one of the router's.
    fn catalog_and_store(&self, tenant: &str, store: &str) -> Result<&Catalog> {
        let catalog = self.catalog.as_deref().ok_or(Error::NoCatalog)?;
        self.named(store, tenant)?;
        Ok(catalog)
    }

    /// The store named `store`, asked for on behalf of `tenant`.
    fn named(&self, store: &str, tenant: &str) -> Result<EventStore> {
        self.store_named(store).ok_or_else(|| Error::UnknownStore { store: store.into(), partition: tenant.into() })
    }
}

impl Catalog {
    /// The catalog's entry for `tenant`, from the cache while it is fresh.
    async fn entry(&self, tenant: &str) -> Result<Option<Entry>> {
        if let Some((entry, read)) = self.cache.lock().expect("not poisoned").get(tenant)
            && read.elapsed() < self.ttl
        {
            return Ok(entry.clone());
        }
        let read = Instant::now();
        let select = Query::select()
            .columns([table::store(), table::moving()])
            .from(table::name())
            .and_where(Expr::col(table::tenant()).eq(tenant))
            .to_owned();
        let row = self.conn.query_one(&select).await?;
        let entry = match row {
            Some(row) => Some(Entry { store: row.try_get("", "store")?, moving: row.try_get("", "moving")? }),
            None => None,
        };
        self.cache.lock().expect("not poisoned").insert(tenant.to_owned(), (entry.clone(), read));
        Ok(entry)
    }

    /// Records `tenant` in `store`, moving or not.
    async fn set(&self, tenant: &str, store: &str, moving: bool) -> Result<()> {
        let upsert = Query::insert()
            .into_table(table::name())
            .columns([table::tenant(), table::store(), table::moving()])
            .values_panic([tenant.into(), store.into(), moving.into()])
            .on_conflict(
                OnConflict::column(table::tenant()).update_columns([table::store(), table::moving()]).to_owned(),
            )
            .to_owned();
        self.conn.execute(&upsert).await?;
        self.cache.lock().expect("not poisoned").remove(tenant);
        Ok(())
    }
}

/// The catalog's table and columns.
mod table {
    use sea_orm::sea_query::Alias;

    pub fn name() -> Alias {
        Alias::new("emt_tenant_stores")
    }
    pub fn tenant() -> Alias {
        Alias::new("tenant")
    }
    pub fn store() -> Alias {
        Alias::new("store")
    }
    pub fn moving() -> Alias {
        Alias::new("moving")
    }
}
