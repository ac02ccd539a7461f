//! `cargo run -p migration -- up -u URL` — the standard sea-orm-migration CLI.

use sea_orm_migration::prelude::*;

#[tokio::main]
async fn main() {
    cli::run_cli(migration::Migrator).await;
}
