//! `telemon ingest`: the ingest service alone, against an external MQTT broker (Mosquitto,
//! EMQX, ...), so that it can run as its own process, restart on its own, and scale out as
//! several workers sharing one subscription (`--shared-group`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use telemon_ingest::service::IngestSettings;
use telemon_model::health::{Health, Status};
use tracing::{info, warn};

use crate::{config, data_dir};

#[derive(clap::Args, Debug)]
pub struct IngestArgs {
    #[command(flatten)]
    broker: config::BrokerArgs,

    /// MQTT client id. The broker keeps this session's unacknowledged messages while the
    /// worker is away, so keep it stable across restarts and distinct between workers.
    #[arg(long, default_value = "telemon-ingest")]
    client_id: String,

    /// Share the subscription with other workers of this group ($share/GROUP/...): the
    /// broker gives each message to one of them.
    #[arg(long)]
    shared_group: Option<String>,

    /// Messages the broker sends this worker before waiting for acknowledgements (Mosquitto:
    /// its `max_inflight_messages`, 20 by default). With it, a batch closes as soon as the
    /// window is in hand instead of after a short quiet time.
    #[arg(long)]
    broker_window: Option<u64>,

    /// Topic mappings for foreign conventions (TOML, see ingest/mappings.toml).
    #[arg(long)]
    mappings: Option<PathBuf>,

    /// Once subscribed, write {"ready": true} here (for scripts and tests).
    #[arg(long)]
    ready_file: Option<PathBuf>,
}

pub async fn run(
    data_dir: &Path,
    database_url: Option<&str>,
    args: IngestArgs,
) -> anyhow::Result<()> {
    let bus = args.broker.bus()?;
    let store = data_dir::open_store(data_dir, database_url).await?;
    let decoder = Arc::new(config::load_decoder(args.mappings.as_deref())?);

    let health = Health::default();
    let mut settings = IngestSettings::new(data_dir::spool(data_dir));
    settings.client_id = args.client_id.clone();
    settings.shared_group = args.shared_group.clone();
    settings.broker_window = args.broker_window;
    let ingest = telemon_ingest::service::start(bus, settings, decoder, store, health.clone())
        .await
        .context("starting ingest")?;

    if let Some(path) = &args.ready_file {
        while !health.live() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        std::fs::write(path, r#"{"ready": true}"#)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    info!(broker = %args.broker.broker_url, client_id = %args.client_id, "ingest running");

    tokio::signal::ctrl_c()
        .await
        .context("waiting for Ctrl-C")?;
    if !ingest
        .drain(Duration::from_millis(300), Duration::from_secs(15))
        .await
    {
        warn!(
            in_flight = ingest.in_flight(),
            "stopped before ingest went quiet; the broker redelivers the rest"
        );
    }
    if health
        .snapshot()
        .values()
        .any(|c| c.status == Status::Degraded)
    {
        warn!("stopped while degraded; spooled readings are written back on the next start");
    }
    Ok(())
}
