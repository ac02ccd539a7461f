//! The sea-orm-migration crate of emmett-seaorm.
//!
//! `sea-orm-cli migrate up -d migration -u $DATABASE_URL` (or `cargo run -p migration -- up -u URL`)
//! creates the event store's tables. To run them from your own migrator, list
//! [`M20250101000001CreateEventStore`] among your migrations.

pub use emmett_seaorm::migrations::{M20250101000001CreateEventStore, Migrator};
pub use sea_orm_migration::prelude::*;
