//! `emmett-seaorm`: operate an event store from the shell (`cargo install emmett-seaorm --features cli`).
//! It knows what the database records; an app mounts the same commands with its projections to
//! rebuild them (see `emmett_seaorm::cli`).

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    emmett_seaorm::cli::main(&emmett_seaorm::cli::Projections::new()).await
}
