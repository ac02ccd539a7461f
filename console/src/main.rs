//! `emmett-seaorm-console`: the web console on its own (`ui`), and the operator's commands of
//! the `emmett-seaorm` binary beside it.

use std::net::SocketAddr;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use emmett_seaorm::EventStore;
use emmett_seaorm::cli::{Command, Projections, StoresFile};
use emmett_seaorm_console::Console;

#[derive(Parser)]
#[command(
    name = "emmett-seaorm-console",
    version,
    about = "The emmett-seaorm web console, and the operator's commands"
)]
struct Cli {
    /// The database (postgres://…, mysql://…, sqlite://…).
    #[arg(long, env = "DATABASE_URL", global = true, hide_env_values = true)]
    database_url: Option<String>,
    /// Tenants spread over several databases: a TOML file naming the stores (see `emmett-seaorm --help`).
    #[arg(long, env = "EMMETT_STORES", global = true, value_name = "FILE")]
    stores: Option<std::path::PathBuf>,
    #[command(subcommand)]
    command: Top,
}

#[derive(Subcommand)]
enum Top {
    /// Serve the web console.
    Ui(Ui),
    #[command(flatten)]
    Ops(Command),
}

#[derive(Args)]
struct Ui {
    /// Where to listen (localhost unless told otherwise).
    #[arg(long, default_value = "127.0.0.1:8089")]
    listen: SocketAddr,
    /// Let the pages resume parked tenants and skip events (read-only without it).
    #[arg(long)]
    actions: bool,
    /// Answer only requests with this token (`Authorization: Bearer …`, or open /login?token=…).
    #[arg(long, env = "EMMETT_CONSOLE_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let stores = match cli.stores.as_deref().map(StoresFile::read).transpose() {
        Ok(stores) => stores,
        Err(error) => return fail(&error),
    };
    match (cli.command, stores, cli.database_url) {
        (Top::Ops(command), Some(stores), _) => report(command.run_across(&stores, &Projections::new()).await),
        (Top::Ops(command), None, Some(url)) => report(command.run(&url, &Projections::new()).await),
        (Top::Ui(ui), Some(stores), _) => match stores.router().await {
            Ok(router) => serve(ui, Console::new().stores(&router)).await,
            Err(error) => fail(&error),
        },
        (Top::Ui(ui), None, Some(url)) => match emmett_seaorm::connect(url.as_str()).await {
            Ok(db) => serve(ui, Console::new().store("main", EventStore::new(db))).await,
            Err(error) => fail(&error),
        },
        (_, None, None) => fail(&"no database: pass --database-url or set DATABASE_URL (or --stores FILE)"),
    }
}

async fn serve(ui: Ui, mut console: Console) -> ExitCode {
    console = console.actions(ui.actions);
    if let Some(token) = ui.token {
        console = console.bearer_token(token);
    }
    let listener = match tokio::net::TcpListener::bind(ui.listen).await {
        Ok(listener) => listener,
        Err(error) => return fail(&format!("cannot listen on {}: {error}", ui.listen)),
    };
    eprintln!("emmett-seaorm console on http://{}/", ui.listen);
    match axum::serve(listener, console.into_router()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => fail(&error),
    }
}

fn report(outcome: Result<(), emmett_seaorm::cli::CliError>) -> ExitCode {
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => fail(&error),
    }
}

fn fail(error: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("error: {error}");
    ExitCode::FAILURE
}
