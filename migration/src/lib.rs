//! The sea-orm-migration crate of emmett-seaorm's own repository.
//!
//! `sea-orm-cli migrate up -d migration -u $DATABASE_URL` (or `cargo run -p migration -- up -u URL`)
//! creates the event store's tables. In your own project, put
//! `emmett_seaorm::Migrator::migrations()` first in your migrator (see the README, "Migrations").

pub use emmett_seaorm::migrations::{
    M20250101000001CreateEventStore, M20261128000001HardenEventStore, M20261128000002CreateDaemonLeases, Migrator,
};
pub use sea_orm_migration::prelude::*;
