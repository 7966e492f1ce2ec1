//! `telemon alerts` and `telemon api`: one service alone, against any broker (Mosquitto,
//! EMQX, or telemon's own edge) and a shared database, so that each can run, restart and
//! scale on its own.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use telemon_alerts::directory::Directory;
use telemon_alerts::service::AlertsSettings;
use telemon_dashboard_api::{Api, Auth};
use telemon_model::health::Health;
use tracing::info;

use crate::config::{self, BrokerArgs, Config};
use crate::data_dir;

#[derive(clap::Args, Debug)]
pub struct AlertsArgs {
    #[command(flatten)]
    broker: BrokerArgs,

    /// Alert rules file (TOML); the built-in defaults when absent.
    #[arg(long)]
    rules: Option<PathBuf>,

    /// Topic mappings for foreign conventions (TOML, see ingest/mappings.toml).
    #[arg(long)]
    mappings: Option<PathBuf>,

    /// Configuration file, for its `[alerts]` webhooks (see telemon.example.toml).
    #[arg(long)]
    config: Option<PathBuf>,

    /// MQTT client id; two evaluators with one id would take each other's session.
    #[arg(long, default_value = "telemon-alerts")]
    client_id: String,
}

#[derive(clap::Args, Debug)]
pub struct ApiArgs {
    #[command(flatten)]
    broker: BrokerArgs,

    /// Address of the HTTP API and dashboard.
    #[arg(long, default_value = "127.0.0.1:8080")]
    http_listen: SocketAddr,

    /// Topic mappings, so the live stream decodes mapped devices as ingest does.
    #[arg(long)]
    mappings: Option<PathBuf>,

    /// Once serving, write the bound address here as JSON (for scripts and tests).
    #[arg(long)]
    ready_file: Option<PathBuf>,
}

pub async fn alerts(
    data_dir: &Path,
    database_url: Option<&str>,
    args: AlertsArgs,
) -> anyhow::Result<()> {
    let config = match &args.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    let rules_file = args.rules.or(config.alerts.rules_file);
    let rules = config::load_rules(rules_file.as_deref())?;
    let store = data_dir::open_store(data_dir, database_url).await?;
    let decoder = Arc::new(config::load_decoder(args.mappings.as_deref())?);
    let settings = AlertsSettings {
        client_id: args.client_id,
        webhooks: config.alerts.webhooks,
        ..AlertsSettings::default()
    };
    let handle = telemon_alerts::service::start(
        args.broker.bus()?,
        settings,
        rules,
        Directory::default(),
        decoder,
        store,
        Health::default(),
    )
    .await
    .context("starting alerts")?;
    info!(broker = %args.broker.broker_url, "alerts running");

    tokio::signal::ctrl_c()
        .await
        .context("waiting for Ctrl-C")?;
    handle.stop().await;
    Ok(())
}

pub async fn api(data_dir: &Path, database_url: Option<&str>, args: ApiArgs) -> anyhow::Result<()> {
    data_dir::create(data_dir)?;
    let token = data_dir::admin_token(data_dir)?;
    let store = data_dir::open_store(data_dir, database_url).await?;
    crate::bootstrap::ensure_admin_user(&store, data_dir).await?;
    let decoder = Arc::new(config::load_decoder(args.mappings.as_deref())?);
    let api = Api::start(
        args.http_listen,
        Auth::new(token),
        store,
        Health::default(),
        args.broker.bus()?,
        decoder,
    )
    .await
    .context("starting the HTTP API")?;
    if let Some(path) = &args.ready_file {
        let ready = serde_json::json!({ "http": api.local_addr().to_string() });
        std::fs::write(path, ready.to_string())
            .with_context(|| format!("writing {}", path.display()))?;
    }
    info!(http = %api.local_addr(), broker = %args.broker.broker_url, "API running");

    tokio::signal::ctrl_c()
        .await
        .context("waiting for Ctrl-C")?;
    Ok(())
}
