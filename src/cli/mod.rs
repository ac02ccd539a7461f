//! The operator's command line (feature `cli`): the `emmett-seaorm` binary, and the same
//! subcommands for an app to mount in its own binary with its projections.
//!
//! ```text
//! emmett-seaorm --database-url postgres://… projections status
//! ```
//!
//! The binary knows only what the database records (streams, checkpoints, leases); an app that
//! mounts [`Command`] with its [`Projections`] can also rebuild and fill them in-process:
//!
//! ```no_run
//! use clap::Parser;
//! use emmett_seaorm::cli::{Command, Projections};
//! use emmett_seaorm::projection::ProjectionRegistry;
//!
//! #[derive(Parser)]
//! struct App {
//!     #[arg(long, env = "DATABASE_URL")]
//!     database_url: String,
//!     #[command(subcommand)]
//!     ops: Command,
//! }
//!
//! #[tokio::main]
//! async fn main() -> std::process::ExitCode {
//!     let app = App::parse();
//!     let projections = Projections::new().projection("carts", ProjectionRegistry::<serde_json::Value>::new());
//!     app.ops.run_and_report(&app.database_url, &projections).await
//! }
//! ```

mod ops;
mod report;
mod stores;

pub use stores::StoresFile;

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use sea_orm::{DatabaseConnection, DbErr};

use crate::conn::Conn;

use crate::backend;
use crate::error::Error;
use crate::event::Event;
use crate::projection::{Progress, ProjectionRegistry, ProjectionRunner, Projector, RunOptions};
use crate::schema::DEFAULT_PARTITION;
use crate::store::EventStore;

/// The `emmett-seaorm` binary: a database URL and a [`Command`].
#[derive(Parser, Debug)]
#[command(
    name = "emmett-seaorm",
    version,
    about = "Operate an emmett-seaorm event store: schema, tenants, streams, projections, leases"
)]
pub struct Cli {
    /// The database (postgres://…, mysql://…, sqlite://…).
    #[arg(long, env = "DATABASE_URL", global = true, hide_env_values = true)]
    pub database_url: Option<String>,
    /// Tenants spread over several databases: a TOML file naming the stores, the default
    /// store, fixed tenants and the catalog ([`StoresFile`]); used instead of --database-url.
    #[arg(long, env = "EMMETT_STORES", global = true, value_name = "FILE")]
    pub stores: Option<std::path::PathBuf>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The operator's subcommands; mount them in an app's own clap parser (see the [module](self)).
#[derive(Subcommand, Debug, Clone)]
pub enum Command {
    /// The store's schema.
    #[command(subcommand)]
    Migrate(Migrate),
    /// Tenants.
    #[command(subcommand)]
    Partitions(Partitions),
    /// Streams and their events.
    #[command(subcommand)]
    Streams(Streams),
    /// Projections: lag, failures, rebuilds.
    #[command(subcommand)]
    Projections(ProjectionsCommand),
    /// The projection daemons' leases.
    #[command(subcommand)]
    Leases(Leases),
    /// Row-level security (PostgreSQL): tenants kept apart by the database.
    #[command(subcommand)]
    Rls(Rls),
    /// The stores of a `--stores` file: which tenant lives where.
    #[command(subcommand)]
    Stores(Stores),
}

/// `stores …` (with `--stores FILE`)
#[derive(Subcommand, Debug, Clone)]
pub enum Stores {
    /// Each store: its URL (no password), tenants, whether it answers.
    List(JsonFlag),
    /// The store that holds a tenant.
    Locate {
        /// The tenant.
        tenant: String,
    },
    /// Record in the catalog that a tenant lives in a store (moves no data: `partitions move
    /// --to STORE` moves a tenant that has some).
    Assign {
        /// The tenant.
        tenant: String,
        /// The store's name.
        store: String,
    },
}

/// `rls …` (run as the tables' owner)
#[derive(Subcommand, Debug, Clone)]
pub enum Rls {
    /// Whether row-level security is on for the store's tenant tables.
    Status,
    /// Switch it on (the snapshots of the app's registered read models that name no tenant
    /// get theirs first).
    Enable,
    /// Switch it off.
    Disable,
    /// Grant an application role what it needs through tenant-bound stores, and no more.
    Grant {
        /// The role.
        role: String,
    },
}

/// `migrate …`
#[derive(Subcommand, Debug, Clone)]
pub enum Migrate {
    /// Apply every pending migration.
    Up,
    /// Roll back the last migrations.
    Down {
        /// How many.
        #[arg(long, default_value_t = 1)]
        steps: u32,
    },
    /// List the migrations and whether each is applied.
    Status,
    /// Drop every table of the database (the app's too) and apply every migration.
    Fresh {
        /// Yes, drop every table.
        #[arg(long)]
        yes: bool,
    },
    /// Print the SQL of the pending migrations for this database, without running it.
    Sql,
}

/// `partitions …`
#[derive(Subcommand, Debug, Clone)]
pub enum Partitions {
    /// Create a tenant's own partitions (PostgreSQL; nothing to do on the others).
    Add {
        /// The tenant.
        tenant: String,
    },
    /// Tenants with streams, with their number of streams and last global position.
    List(JsonFlag),
    /// Remove everything of a tenant: events, streams, checkpoints, leases, snapshots, and the
    /// rows of the read models the app registered. Without --yes, print what would be removed.
    Erase {
        /// The tenant.
        tenant: String,
        /// Yes, erase it.
        #[arg(long)]
        yes: bool,
        /// Print JSON lines instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Write a tenant's streams and events as JSON Lines (a header, the stream rows, every
    /// event with all its columns in global order), to import elsewhere.
    Export {
        /// The tenant.
        tenant: String,
        /// The file to write (default: standard output).
        #[arg(long)]
        output: Option<std::path::PathBuf>,
    },
    /// Read a tenant's export into this database, all or nothing; the daemon projects it.
    Import {
        /// The file to read (default: standard input).
        #[arg(long)]
        input: Option<std::path::PathBuf>,
        /// Import under this tenant id instead of the file's.
        #[arg(long)]
        partition: Option<String>,
        /// Replace the tenant if this database has it (erased first, with the app's read models).
        #[arg(long)]
        replace: bool,
    },
    /// Move a tenant to another database (any backend, migrated): export, import there, check
    /// both hold the same streams and events, erase it here. Stop its writers first.
    Move {
        /// The tenant.
        tenant: String,
        /// The database to move it to (with --stores: the store's name).
        #[arg(long, hide_env_values = true)]
        to: String,
        /// Print what would move, and whether the target has the tenant; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

/// `streams …`
#[derive(Subcommand, Debug, Clone)]
pub enum Streams {
    /// Live streams, by partition and id.
    List {
        /// Only this tenant's.
        #[arg(long)]
        partition: Option<String>,
        /// Only streams of this type.
        #[arg(long = "type")]
        stream_type: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: u64,
        /// `--json`.
        #[command(flatten)]
        json: JsonFlag,
    },
    /// The event types stored, at each version, per tenant: how many rows each, and the version
    /// this binary's upcasters bring them to (a version no row has any more can lose its
    /// upcaster).
    Types {
        /// Only this tenant.
        #[arg(long)]
        partition: Option<String>,
        /// `--json`.
        #[command(flatten)]
        json: JsonFlag,
    },
    /// A stream's events.
    Read {
        /// The stream id.
        stream: String,
        /// Its tenant.
        #[arg(long, default_value = DEFAULT_PARTITION)]
        partition: String,
        /// From this stream position on.
        #[arg(long, default_value_t = 1)]
        from: u64,
        /// The rows as stored: no upcasting to the current versions of their types.
        #[arg(long)]
        raw: bool,
        /// `--json`.
        #[command(flatten)]
        json: JsonFlag,
    },
}

/// `projections …`
#[derive(Subcommand, Debug, Clone)]
pub enum ProjectionsCommand {
    /// Per projection and tenant: checkpoint, head, lag, lease owner and expiry, parked error
    /// (projections run by a daemon, and those run by a `ProjectionRunner` alone).
    Status(StatusFilter),
    /// Replay a projection from the first event of every tenant, or of one (in place; needs the
    /// app's registry: run it from the app's binary). Each tenant is rebuilt in one
    /// transaction: a tenant that fails keeps its previous rows and checkpoint, its error is
    /// shown by `status`, the others are rebuilt, and the command exits 1 naming it. Running
    /// daemons go on from each tenant's new checkpoint.
    Rebuild {
        /// The projection's subscription id.
        name: String,
        /// Only this tenant.
        #[arg(long)]
        partition: Option<String>,
        /// Events per batch.
        #[arg(long, default_value_t = 500)]
        batch_size: u64,
    },
    /// Project a projection's tenants up to their last event, e.g. a new version filling its
    /// new tables (needs the app's registry).
    CatchUp {
        /// The projection's subscription id.
        name: String,
        /// Only this tenant.
        #[arg(long)]
        partition: Option<String>,
        /// Events per batch.
        #[arg(long, default_value_t = 500)]
        batch_size: u64,
    },
    /// Move a tenant's checkpoint back, or past a poison event (`--to` the `error_position`
    /// that `status` shows), and clear its failures. Running daemons give the lease up and take
    /// it again within a poll interval (at once on PostgreSQL), then deliver the events after
    /// the new checkpoint; a batch they had in flight is refused. Custom handlers and reactors
    /// see those events again (reactors repeat their effects). Snapshot projections skip events
    /// their snapshots have folded already: to re-fold a tenant, use `rebuild --partition`.
    Reset {
        /// The projection's subscription id.
        name: String,
        /// The tenant.
        #[arg(long)]
        partition: String,
        /// The new checkpoint (a global position; 0 replays the tenant from its first event).
        #[arg(long)]
        to: u64,
    },
    /// Forget a projection nobody runs any more: its checkpoints, leases and skipped-event
    /// records (its read-model tables and snapshots are the app's to drop). A daemon still
    /// running it would start it again from the first event.
    Retire {
        /// The projection's subscription id.
        name: String,
        /// Yes, forget it.
        #[arg(long)]
        yes: bool,
    },
    /// Go past the event a tenant's projection failed on (the `error_position` that `status`
    /// shows): recorded in `emt_skipped_events` with the error, the checkpoint moved to it, the
    /// failures cleared; running daemons go on with the next event.
    Skip {
        /// The projection's subscription id.
        name: String,
        /// The tenant.
        #[arg(long)]
        partition: String,
    },
    /// Retry parked tenants now instead of after their backoff (e.g. once a fix is deployed):
    /// running daemons take the leases again within a poll interval and run them at once.
    Resume {
        /// The projection's subscription id.
        name: String,
        /// Only this tenant (default: every tenant of the projection).
        #[arg(long)]
        partition: Option<String>,
    },
}

/// `leases …`
#[derive(Subcommand, Debug, Clone)]
pub enum Leases {
    /// Every lease: owner, expiry, failures.
    List(JsonFlag),
    /// Give back every segment of tenants an instance holds (one that is gone, or to move its
    /// work).
    Release {
        /// The instance (the owner column of `leases list`).
        owner: String,
    },
}

/// `projections status`: which (projection, tenant) pairs to show.
#[derive(Args, Debug, Clone)]
pub struct StatusFilter {
    /// Only parked ones (failed their retries in a row).
    #[arg(long)]
    pub parked: bool,
    /// Only those with events past their checkpoint.
    #[arg(long)]
    pub lagging: bool,
    /// Only this projection (subscription id).
    #[arg(long)]
    pub projection: Option<String>,
    /// Only this tenant.
    #[arg(long)]
    pub partition: Option<String>,
    /// `--json`.
    #[command(flatten)]
    pub json: JsonFlag,
}

/// `--json`: one JSON object per line instead of a table.
#[derive(Args, Debug, Clone, Copy)]
pub struct JsonFlag {
    /// Print one JSON object per line.
    #[arg(long)]
    pub json: bool,
}

/// Why a command failed: printed as one line on stderr, with a non-zero exit code.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// No database URL was given.
    #[error("no database: pass --database-url or set DATABASE_URL (or --stores FILE)")]
    NoDatabase,
    /// The database could not be reached or refused the connection.
    #[error("cannot connect to {url} (is the server running, and the URL right?): {source}")]
    Connect {
        /// The URL, without its password.
        url: String,
        /// Why.
        source: DbErr,
    },
    /// A SQLite URL names a file that does not exist (and does not ask to create it).
    #[error(
        "SQLite database file {path} does not exist; to create it, add ?mode=rwc to the URL (sqlite://{path}?mode=rwc)"
    )]
    NoSuchFile {
        /// The file.
        path: String,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] Error),
    /// A command run on every store failed on these (each one's error printed as it failed).
    #[error("failed on store(s) {}", .0.join(", "))]
    StoresFailed(Vec<String>),
    /// The database failed.
    #[error("database error: {0}")]
    Database(#[from] DbErr),
    /// The arguments name something that isn't there, or ask for something unsafe.
    #[error("{0}")]
    Invalid(String),
}

/// The projections an app can rebuild and catch up in-process, by subscription id.
#[derive(Default)]
pub struct Projections {
    runners: BTreeMap<String, Runner>,
    read_models: Vec<crate::projection::ReadModel>,
    upcasters: crate::upcast::Upcasters,
}

/// A projection's runner on the store a command connects to.
type Runner = Box<dyn Fn(EventStore) -> Box<dyn Projector> + Send + Sync>;

impl Projections {
    /// No projections: the binary's commands work on what the database records.
    pub fn new() -> Self {
        Self::default()
    }

    /// The projection `subscription_id`, fed to `registry`.
    pub fn projection<E: Event + 'static>(mut self, subscription_id: &str, registry: ProjectionRegistry<E>) -> Self {
        self.read_models.extend(registry.read_models().iter().cloned());
        let registry = Arc::new(registry);
        let runner =
            move |store| Box::new(ProjectionRunner::shared(store, Arc::clone(&registry))) as Box<dyn Projector>;
        self.runners.insert(subscription_id.to_owned(), Box::new(runner));
        self
    }

    /// The app's upcasters: `streams read`, `rebuild` and `catch-up` read events at the current
    /// versions of their types (`streams read --raw` shows the rows as stored).
    pub fn upcasters(mut self, upcasters: crate::upcast::Upcasters) -> Self {
        self.upcasters = upcasters;
        self
    }

    /// The subscription ids of the projections, in order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.runners.keys().map(String::as_str)
    }

    /// Rebuilds projection `name` on `store` in place, tenant by tenant (as `projections
    /// rebuild` does), calling `progress` after each batch; the events read. A tenant that
    /// fails keeps its previous read model: [`Error::RebuildIncomplete`] names it.
    pub async fn rebuild(
        &self,
        store: EventStore,
        name: &str,
        options: RunOptions,
        progress: &mut (dyn for<'p> FnMut(&'p Progress) + Send),
    ) -> Result<u64, CliError> {
        Ok(self.runner(name, store)?.rebuild(name, options, progress).await?.processed)
    }

    /// The runner of projection `name` on `store`.
    fn runner(&self, name: &str, store: EventStore) -> Result<Box<dyn Projector>, CliError> {
        self.runners.get(name).map(|runner| runner(store)).ok_or_else(|| {
            let known = self.runners.keys().cloned().collect::<Vec<_>>().join(", ");
            CliError::Invalid(match known.is_empty() {
                true => format!(
                    "projection '{name}' is not known to this binary: run this from your app's binary, which mounts \
                     these commands with its projections (emmett_seaorm::cli::Projections)"
                ),
                false => format!("unknown projection '{name}' (known: {known})"),
            })
        })
    }
}

/// Fills `name` with a progress bar; the events it read.
async fn catch_up(runner: &dyn Projector, name: &str, options: RunOptions) -> Result<u64, Error> {
    let mut bar = report::ProgressBar::new(name, "events");
    let done = runner.catch_up(name, options, &mut |p: &Progress| bar.update(p)).await?;
    bar.finish(done.processed);
    Ok(done.processed)
}

/// The file of a SQLite URL when it does not exist and the URL does not ask to create it
/// (`mode=rwc`) or name an in-memory database.
fn missing_sqlite_file(url: &str) -> Option<String> {
    let rest = url.strip_prefix("sqlite://").or_else(|| url.strip_prefix("sqlite:"))?;
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    let creates_or_memory = query.split('&').any(|p| p == "mode=rwc" || p == "mode=memory");
    let missing = !creates_or_memory && !path.is_empty() && path != ":memory:" && !std::path::Path::new(path).exists();
    missing.then(|| path.to_owned())
}

/// Parses the arguments, runs the command and reports an error as one line on stderr: the whole
/// `emmett-seaorm` binary, for an app's `main` to call with its projections.
pub async fn main(projections: &Projections) -> ExitCode {
    let cli = Cli::parse();
    let outcome = match (cli.stores, cli.database_url) {
        (Some(path), _) => match StoresFile::read(&path) {
            Ok(stores) => cli.command.run_across(&stores, projections).await,
            Err(error) => Err(error),
        },
        (None, Some(url)) => cli.command.run(&url, projections).await,
        (None, None) => Err(CliError::NoDatabase),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => report::failed(&error),
    }
}

impl Command {
    /// [`run`](Self::run), printing an error as one line on stderr; the exit code to return.
    pub async fn run_and_report(self, database_url: &str, projections: &Projections) -> ExitCode {
        match self.run(database_url, projections).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => report::failed(&err),
        }
    }

    /// Connects to `database_url` and runs the command, printing its output on stdout.
    pub async fn run(self, database_url: &str, projections: &Projections) -> Result<(), CliError> {
        if let Some(path) = missing_sqlite_file(database_url) {
            return Err(CliError::NoSuchFile { path });
        }
        let mut options = crate::connect_options(database_url);
        options.connect_timeout(Duration::from_secs(5)).acquire_timeout(Duration::from_secs(5)).sqlx_logging(false);
        let db = sea_orm::Database::connect(crate::configure(options))
            .await
            .map_err(|source| CliError::Connect { url: report::without_password(database_url), source })?;
        let outcome = self.run_on(&db, projections).await;
        db.close().await.ok();
        outcome
    }

    async fn run_on(self, db: &DatabaseConnection, projections: &Projections) -> Result<(), CliError> {
        let raw = EventStore::new(db.clone());
        let store = raw.clone().with_upcasters(projections.upcasters.clone())?;
        let conn = Conn::pool(db.clone());
        match self {
            Command::Migrate(m) => ops::migrate(db, m).await,
            Command::Rls(command) => ops::rls(db, command, &projections.read_models).await,
            Command::Partitions(Partitions::Add { tenant }) => {
                store.create_partition(&tenant).await?;
                println!("partition '{tenant}' ready");
                Ok(())
            }
            Command::Partitions(Partitions::List(flag)) => ops::partitions(&raw, flag).await,
            Command::Partitions(Partitions::Erase { tenant, yes, json }) => {
                ops::erase(&raw, &tenant, &projections.read_models, yes, json).await
            }
            Command::Partitions(Partitions::Export { tenant, output }) => ops::export(&raw, &tenant, output).await,
            Command::Partitions(Partitions::Move { tenant, to, dry_run }) => {
                ops::move_partition(&raw, &tenant, &to, &projections.read_models, dry_run).await
            }
            Command::Partitions(Partitions::Import { input, partition, replace }) => {
                ops::import(&raw, input, partition, replace.then_some(&projections.read_models[..])).await
            }
            Command::Streams(Streams::List { partition, stream_type, limit, json }) => {
                ops::list_streams(&raw, partition, stream_type, limit, json).await
            }
            Command::Streams(Streams::Types { partition, json }) => {
                ops::event_types(&conn, store.upcasters(), partition, json).await
            }
            Command::Streams(Streams::Read { stream, partition, from, raw: as_stored, json }) => {
                ops::read_stream(if as_stored { &raw } else { &store }, &stream, &partition, from, json).await
            }
            Command::Projections(ProjectionsCommand::Status(filter)) => ops::status(&raw, filter).await,
            Command::Projections(ProjectionsCommand::Retire { name, yes }) => ops::retire(&raw, &name, yes).await,
            Command::Projections(ProjectionsCommand::Rebuild { name, partition, batch_size }) => {
                let mut options = RunOptions::default().batch_size(batch_size);
                if let Some(tenant) = partition {
                    options = options.partition(tenant);
                }
                let mut bar = report::ProgressBar::new(&name, "events");
                let processed = projections.rebuild(store, &name, options, &mut |p: &Progress| bar.update(p)).await?;
                bar.finish(processed);
                Ok(())
            }
            Command::Projections(ProjectionsCommand::CatchUp { name, partition, batch_size }) => {
                let runner = projections.runner(&name, store)?;
                let tenants = match partition {
                    Some(p) => vec![p],
                    None => backend::partition_heads(&conn, None).await?.into_iter().map(|(t, _)| t).collect(),
                };
                for tenant in tenants {
                    let options = RunOptions::default().partition(tenant).batch_size(batch_size);
                    catch_up(&*runner, &name, options).await?;
                }
                Ok(())
            }
            Command::Projections(ProjectionsCommand::Reset { name, partition, to }) => {
                ops::reset(&raw, &name, &partition, to).await
            }
            Command::Projections(ProjectionsCommand::Resume { name, partition }) => {
                ops::resume(&raw, &name, partition.as_deref()).await
            }
            Command::Projections(ProjectionsCommand::Skip { name, partition }) => {
                ops::skip(&raw, &name, &partition).await
            }
            Command::Stores(_) => Err(CliError::Invalid("`stores` needs --stores FILE".into())),
            Command::Leases(Leases::List(flag)) => ops::leases(&conn, flag).await,
            Command::Leases(Leases::Release { owner }) => {
                let released = backend::leave(&conn, &owner).await?;
                println!("released {released} segment(s) of {owner}");
                Ok(())
            }
        }
    }
}
