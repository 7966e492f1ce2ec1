//! `telemon`: the telemetry broker and remote-monitoring service.
//!
//! One binary runs every service in one process (`up`), or one alone against any broker
//! (`ingest`, `alerts`, `api`, `simulate`), plus the tools around them (`certs`, `migrate`,
//! `bench`). This crate is only the command line and the wiring; the services live in the
//! workspace crates.

mod bench;
mod bootstrap;
mod certs;
mod config;
mod data_dir;
mod ingest_cmd;
mod services;
mod simulate;
mod up;

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

#[derive(Parser, Debug)]
#[command(
    name = "telemon",
    version,
    about = "Telemetry broker and remote-monitoring service"
)]
struct Cli {
    /// Where telemon keeps its CA, certificates, admin token, spool and embedded store.
    #[arg(
        long,
        global = true,
        env = "TELEMON_DATA_DIR",
        default_value = "./telemon-data"
    )]
    data_dir: PathBuf,

    /// PostgreSQL URL (postgres://...). Without it, readings go to SQLite in the data dir.
    #[arg(long, global = true, env = "DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run broker, ingest, alerts and the HTTP API in one process.
    Up(up::UpArgs),
    /// Run ingest alone against an external MQTT broker.
    Ingest(ingest_cmd::IngestArgs),
    /// Prepare the database: apply every pending migration.
    Migrate,
    /// Run the alerts service alone, against any broker.
    Alerts(services::AlertsArgs),
    /// Run the HTTP API and dashboard alone, against any broker.
    Api(services::ApiArgs),
    /// Run simulated vital-sign monitors against a broker (telemon's or any other).
    Simulate(simulate::SimulateArgs),
    /// Load generator: drive a broker and measure throughput and latency, or compare telemon
    /// with Mosquitto side by side (`bench compare`).
    Bench(bench::BenchArgs),
    /// Manage the development CA and device certificates.
    Certs {
        #[command(subcommand)]
        command: certs::CertsCommand,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging();

    // rustls finds both ring and aws-lc-rs in this build (through different dependencies) and
    // then refuses to pick one at the first TLS connection; choose ring for the process.
    let _ = rustls::crypto::ring::default_provider().install_default();

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        match cli.command {
            Command::Up(args) => up::run(&cli.data_dir, cli.database_url.as_deref(), args).await,
            Command::Ingest(args) => {
                ingest_cmd::run(&cli.data_dir, cli.database_url.as_deref(), args).await
            }
            Command::Migrate => migrate(&cli.data_dir, cli.database_url.as_deref()).await,
            Command::Simulate(args) => simulate::run(&cli.data_dir, args).await,
            Command::Alerts(args) => {
                services::alerts(&cli.data_dir, cli.database_url.as_deref(), args).await
            }
            Command::Api(args) => {
                services::api(&cli.data_dir, cli.database_url.as_deref(), args).await
            }
            Command::Bench(args) => bench::run(&cli.data_dir, args).await,
            Command::Certs { command } => certs::run(&cli.data_dir, command),
        }
    })
}

fn init_logging() {
    // rumqttd logs every accept and every ordinary disconnect, some at error level; the edge
    // logs what matters about device connections, so the engine stays quiet unless asked
    // (RUST_LOG=rumqttd=info).
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new("info,rumqttd=off,rumqttc=warn,sqlx=warn,tower_http=warn")
    });
    // Colours only on a terminal: a log written to a file stays plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(ansi)
        .init();
}

async fn migrate(data_dir: &std::path::Path, database_url: Option<&str>) -> anyhow::Result<()> {
    let store = data_dir::open_store(data_dir, database_url).await?;
    println!("migrations applied to the {} store", store.backend());
    Ok(())
}
