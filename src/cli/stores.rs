//! `--stores FILE`: the commands across the stores of a [`StoreRouter`]. A command about one
//! tenant runs on the tenant's store; the others run on every store in turn.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use serde_json::json;

use super::report::{self, Table};
use super::{CliError, Command, JsonFlag, Partitions, Projections, Stores};
use crate::{EventStore, StoreRouter};

/// A `--stores` file (TOML): the stores by name and URL, and how tenants map to them — the
/// [`StoreRouter`] the app builds, for the command line.
///
/// ```toml
/// default = "shared"                        # the store of tenants nothing else names
/// catalog = "postgres://db0/catalog"        # the router's catalog (optional)
///
/// [stores]
/// shared = "postgres://db0/shared"
/// big = "postgres://db1/big"
///
/// [tenants]                                 # fixed entries (optional)
/// acme = "big"
/// ```
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoresFile {
    /// Each store's database URL, by store name.
    pub stores: BTreeMap<String, String>,
    /// Fixed entries: tenant → store name.
    #[serde(default)]
    pub tenants: BTreeMap<String, String>,
    /// The store of tenants neither the catalog nor `tenants` names.
    pub default: Option<String>,
    /// The catalog's database URL.
    pub catalog: Option<String>,
}

impl StoresFile {
    /// Reads and checks the file at `path`.
    pub fn read(path: &Path) -> Result<Self, CliError> {
        let invalid = |why: String| CliError::Invalid(format!("stores file {}: {why}", path.display()));
        let text = std::fs::read_to_string(path).map_err(|e| invalid(e.to_string()))?;
        let file: StoresFile = toml::from_str(&text).map_err(|e| invalid(e.to_string()))?;
        let named = file.tenants.values().chain(&file.default);
        if let Some(unknown) = named.into_iter().find(|store| !file.stores.contains_key(*store)) {
            return Err(invalid(format!("store '{unknown}' is not under [stores]")));
        }
        if file.stores.is_empty() {
            return Err(invalid("no stores under [stores]".into()));
        }
        Ok(file)
    }

    /// The router the file describes; the stores' pools connect when first used.
    pub async fn router(&self) -> Result<StoreRouter, CliError> {
        let mut router = StoreRouter::new();
        for (name, url) in &self.stores {
            let mut options = crate::connect_options(url);
            options.connect_lazy(true).acquire_timeout(Duration::from_secs(5)).sqlx_logging(false);
            let db =
                sea_orm::Database::connect(crate::configure(options)).await.map_err(|source| connect(url, source))?;
            router = router.store(name, EventStore::new(db));
        }
        for (tenant, store) in &self.tenants {
            router = router.tenant(tenant, store);
        }
        if let Some(default) = &self.default {
            router = router.default_store(default);
        }
        match &self.catalog {
            Some(url) => {
                let db = crate::connect(url).await.map_err(|source| connect(url, source))?;
                Ok(router.catalog(db, Duration::ZERO).await?)
            }
            None => Ok(router),
        }
    }

    /// The URL of the store named `name`.
    fn url(&self, name: &str) -> &str {
        &self.stores[name]
    }
}

fn connect(url: &str, source: sea_orm::DbErr) -> CliError {
    CliError::Connect { url: report::without_password(url), source }
}

impl Command {
    /// Runs the command across the stores of `stores`: on the tenant's store for a command
    /// about one tenant (`partitions move --to` names a store, and the catalog records the
    /// move), on every store in turn for the others (each store's output after a `store NAME`
    /// line, or with a `store` key in JSON lines); a store that fails does not stop the others.
    pub async fn run_across(self, stores: &StoresFile, projections: &Projections) -> Result<(), CliError> {
        let router = stores.router().await?;
        match self {
            Command::Stores(command) => run(command, &router, stores).await,
            Command::Partitions(Partitions::Move { tenant, to, dry_run: false }) => {
                let moved = router.move_tenant(&tenant, &to, &projections.read_models).await?;
                eprintln!("tenant '{tenant}' moved to store {to}: {} streams, {} events", moved.streams, moved.events);
                Ok(())
            }
            Command::Partitions(Partitions::Move { tenant, to, dry_run: true }) => {
                router.store_named(&to).ok_or_else(|| {
                    CliError::Store(crate::Error::UnknownStore { store: to.clone(), partition: tenant.clone() })
                })?;
                let to = stores.url(&to).to_owned();
                let from = router.store_of(&tenant).await?;
                Command::Partitions(Partitions::Move { tenant, to, dry_run: true })
                    .run(stores.url(&from), projections)
                    .await
            }
            Command::Partitions(Partitions::Import { partition: None, .. }) => Err(CliError::Invalid(
                "with --stores, `partitions import` needs --partition: the tenant decides the store".into(),
            )),
            command => match command.tenant() {
                Some(tenant) => {
                    let store = router.store_of(tenant).await?;
                    command.run(stores.url(&store), projections).await
                }
                None => {
                    let mut failed = Vec::new();
                    for (name, url) in &stores.stores {
                        if !command.json() {
                            println!("store {name}");
                        }
                        let outcome = report::STORE.scope(name.clone(), command.clone().run(url, projections)).await;
                        if let Err(error) = outcome {
                            report::failed(&CliError::Invalid(format!("store {name}: {error}")));
                            failed.push(name.clone());
                        }
                    }
                    match failed.is_empty() {
                        true => Ok(()),
                        false => Err(CliError::StoresFailed(failed)),
                    }
                }
            },
        }
    }

    /// The one tenant the command is about, if it is about one.
    fn tenant(&self) -> Option<&str> {
        use super::{ProjectionsCommand as P, Streams as S};
        match self {
            Command::Partitions(
                Partitions::Add { tenant } | Partitions::Erase { tenant, .. } | Partitions::Export { tenant, .. },
            ) => Some(tenant),
            Command::Partitions(Partitions::Import { partition, .. }) => partition.as_deref(),
            Command::Streams(S::Read { partition, .. })
            | Command::Projections(P::Reset { partition, .. } | P::Skip { partition, .. }) => Some(partition),
            Command::Streams(S::List { partition, .. } | S::Types { partition, .. })
            | Command::Projections(
                P::Rebuild { partition, .. } | P::CatchUp { partition, .. } | P::Resume { partition, .. },
            ) => partition.as_deref(),
            Command::Projections(P::Status(filter)) => filter.partition.as_deref(),
            _ => None,
        }
    }

    /// Whether the command prints JSON lines.
    fn json(&self) -> bool {
        use super::{Leases as L, ProjectionsCommand as P, Streams as S};
        match self {
            Command::Partitions(Partitions::List(JsonFlag { json }))
            | Command::Streams(S::List { json: JsonFlag { json }, .. } | S::Types { json: JsonFlag { json }, .. })
            | Command::Leases(L::List(JsonFlag { json })) => *json,
            Command::Projections(P::Status(filter)) => filter.json.json,
            _ => false,
        }
    }
}

/// `stores …`
async fn run(command: Stores, router: &StoreRouter, file: &StoresFile) -> Result<(), CliError> {
    match command {
        Stores::List(flag) => {
            let mut table = Table::new(["store", "url", "tenants", "default", "state"]).json(flag.json);
            for (name, store) in router.stores() {
                let tenants = crate::backend::partition_heads(&store, None).await;
                table.record(json!({
                    "store": name, "url": report::without_password(file.url(&name)),
                    "tenants": tenants.as_ref().ok().map(Vec::len),
                    "default": file.default.as_deref() == Some(name.as_str()),
                    "state": tenants.map_or_else(|e| e.to_string(), |_| "up".into()),
                }));
            }
            table.print();
            Ok(())
        }
        Stores::Locate { tenant } => {
            println!("{}", router.store_of(&tenant).await?);
            Ok(())
        }
        Stores::Assign { tenant, store } => {
            router.assign(&tenant, &store).await?;
            println!("tenant '{tenant}' assigned to store {store}");
            Ok(())
        }
    }
}
