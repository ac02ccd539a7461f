#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

mod backend;
mod error;
mod event;
pub mod migrations;
pub mod projection;
pub mod schema;
mod store;

pub use error::{Error, Result};
pub use event::{Event, RecordedEvent};
pub use migrations::{Migrator, migrate};
pub use schema::DEFAULT_PARTITION;
pub use store::{
    AggregateStreamResult, AppendOptions, AppendResult, EventStore, ExpectedVersion, ReadOptions, ReadStreamResult,
};
