#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

mod backend;
mod error;
mod event;
mod limits;
pub mod migrations;
pub mod projection;
pub mod schema;
mod store;

pub use error::{Error, Result};
pub use event::{Event, RecordedEvent};
pub use limits::{MAX_IDENTIFIER_CHARS, MAX_SNAPSHOT_ID_CHARS};
pub use migrations::{Migrator, migrate};
pub use schema::DEFAULT_PARTITION;
pub use store::{
    AggregateStreamResult, AppendOptions, AppendResult, EventStore, ExpectedVersion, ReadOptions, ReadStreamResult,
};
