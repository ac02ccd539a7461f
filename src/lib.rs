#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

#[cfg(not(any(feature = "sqlite", feature = "postgres", feature = "mysql")))]
compile_error!(
    "emmett-seaorm needs a database backend: enable at least one of the features `sqlite`, `postgres`, `mysql`"
);

pub mod admin;
mod backend;
#[cfg(feature = "cli")]
pub mod cli;
mod command;
mod conn;
mod connect;
pub mod daemon;
mod error;
mod event;
mod expected_version;
mod limits;
pub mod migrations;
pub mod projection;
pub mod rls;
mod router;
pub mod schema;
mod store;
pub mod testing;
pub mod upcast;

/// The retry crate whose backoff [`CommandHandler::retry_on_conflict`] takes.
pub use backon;
/// The SeaORM this crate is built on, for the macros and for apps that want the same version.
pub use sea_orm;

pub use command::{CommandHandler, Handled};
pub use connect::{configure, connect, connect_options};
pub use error::{Error, Result};
pub use event::{Event, RecordedEvent};
pub use expected_version::ExpectedVersion;
pub use limits::{MAX_IDENTIFIER_CHARS, MAX_SNAPSHOT_ID_CHARS};
pub use migrations::{Migrator, migrate};
pub use router::StoreRouter;
pub use schema::DEFAULT_PARTITION;
pub use store::{
    AggregateStreamResult, AppendOptions, AppendResult, EventStore, ImportOptions, PartitionCounts, PartitionRows,
    ReadOptions, ReadStreamResult, SnapshotPolicy,
};
