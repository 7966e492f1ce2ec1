//! `telemon up`: every service in one process, on an embedded default that needs nothing
//! installed or configured.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use telemon_alerts::directory::Directory;
use telemon_alerts::service::AlertsSettings;
use telemon_broker::edge::{Edge, EdgeConfig, TlsFiles};
use telemon_broker::engine::{Engine, EngineSettings};
use telemon_broker::pki::{IdentitySource, Pki};
use telemon_dashboard_api::{Api, Auth};
use telemon_ingest::service::IngestSettings;
use telemon_model::health::{Health, Status};
use tracing::{info, warn};

use crate::config::{self, Config};
use crate::{bootstrap, data_dir, simulate};

#[derive(clap::Args, Debug)]
pub struct UpArgs {
    /// Address of the device listener (MQTT over mutual TLS).
    #[arg(long, default_value = "0.0.0.0:8883")]
    mqtt_listen: SocketAddr,

    /// Address of the HTTP API and dashboard.
    #[arg(long, default_value = "127.0.0.1:8080")]
    http_listen: SocketAddr,

    /// Run this many simulated vital-sign monitors against the broker.
    #[arg(long, default_value_t = 0)]
    simulate: usize,

    /// Alert rules file (TOML); the built-in defaults when absent.
    #[arg(long)]
    rules: Option<PathBuf>,

    /// Topic mappings for foreign conventions (TOML, see ingest/mappings.toml).
    #[arg(long)]
    mappings: Option<PathBuf>,

    /// Mosquitto-style ACL file; the default lets a device write devices/<its id>/# and read
    /// devices/<its id>/commands/#.
    #[arg(long)]
    acl: Option<PathBuf>,

    /// Extra DNS names or IP addresses for the broker's certificate (localhost and loopback
    /// are always included).
    #[arg(long, value_delimiter = ',')]
    server_name: Vec<String>,

    /// Where the device identity is read from in client certificates: cn (the default),
    /// san-dns or san-uri.
    #[arg(long)]
    identity: Option<IdentitySource>,

    /// Configuration file (see telemon.example.toml); flags win over it.
    #[arg(long)]
    config: Option<PathBuf>,

    /// Once ready, write the bound addresses here as JSON (for scripts and tests that
    /// listen on port 0).
    #[arg(long)]
    ready_file: Option<PathBuf>,
}

pub async fn run(
    data_dir: &Path,
    database_url: Option<&str>,
    mut args: UpArgs,
) -> anyhow::Result<()> {
    let config = match &args.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    args.acl = args.acl.or(config.broker.acl_file);
    args.mappings = args.mappings.or(config.ingest.mappings_file);
    args.rules = args.rules.or(config.alerts.rules_file);
    args.server_name.extend(config.broker.server_names);
    let identity = args.identity.or(config.broker.identity).unwrap_or_default();

    data_dir::create(data_dir)?;
    let health = Health::default();
    for part in ["broker", "ingest", "alerts", "api-live"] {
        health.set(part, Status::Starting, "");
    }

    let pki = Pki::open_or_init(&data_dir::certs(data_dir)).context("opening the CA")?;
    let (server_cert, server_key) = pki
        .ensure_server_cert(&args.server_name)
        .context("issuing the broker certificate")?;
    let token = data_dir::admin_token(data_dir)?;
    let store = data_dir::open_store(data_dir, database_url).await?;
    let decoder = Arc::new(config::load_decoder(args.mappings.as_deref())?);

    let engine = Engine::start(&EngineSettings::default()).context("starting the MQTT engine")?;
    let edge_config = EdgeConfig {
        listen: args.mqtt_listen,
        tls: TlsFiles {
            ca_bundle: pki.ca_path(),
            crl: Some(pki.crl_path()),
            cert: server_cert,
            key: server_key,
        },
        identity,
        acl_file: args.acl.clone(),
        limits: config.broker.limits,
    };
    let edge = Edge::start(edge_config, engine.clone())
        .await
        .context("starting the broker")?;
    health.set("broker", Status::Ok, "");

    let ingest = telemon_ingest::service::start(
        engine.bus(),
        IngestSettings {
            broker_window: Some(telemon_ingest::service::ENGINE_WINDOW),
            ..IngestSettings::new(data_dir::spool(data_dir))
        },
        decoder.clone(),
        store.clone(),
        health.clone(),
    )
    .await
    .context("starting ingest")?;

    let rules = config::load_rules(args.rules.as_deref())?;
    let alerts = telemon_alerts::service::start(
        engine.bus(),
        AlertsSettings {
            webhooks: config.alerts.webhooks,
            ..AlertsSettings::default()
        },
        rules,
        Directory::default(),
        decoder.clone(),
        store.clone(),
        health.clone(),
    )
    .await
    .context("starting alerts")?;

    let api = Api::start(
        args.http_listen,
        Auth::new(token),
        store.clone(),
        health.clone(),
        engine.bus(),
        decoder.clone(),
    )
    .await
    .context("starting the HTTP API")?;

    tokio::spawn(refresh_crl(pki));
    wait_until_live(&health).await;
    bootstrap::ensure_admin_user(&store, data_dir).await?;
    let fleet = match args.simulate {
        0 => None,
        n => {
            let port = edge.local_addr().port();
            let ca = data_dir::certs(data_dir).join("ca.crt");
            let devices = simulate::default_fleet(n);
            let ids: Vec<String> = devices.iter().map(|d| d.id.clone()).collect();
            bootstrap::register_simulated_patients(&store, &ids).await?;
            Some(simulate::start(data_dir, "localhost", port, &ca, devices).await?)
        }
    };
    announce(data_dir, &edge, &api, &args)?;

    tokio::signal::ctrl_c()
        .await
        .context("waiting for Ctrl-C")?;
    info!("stopping: disconnecting devices, then storing what they sent");
    // Alerts stop first: devices going offline because telemon stops are not alarms.
    alerts.stop().await;
    if let Some(fleet) = fleet {
        fleet.shutdown().await;
    }
    edge.shutdown();
    if !ingest
        .drain(Duration::from_millis(300), Duration::from_secs(15))
        .await
    {
        warn!(
            in_flight = ingest.in_flight(),
            "stopped before ingest went quiet"
        );
    }
    info!("stopped");
    Ok(())
}

/// Waits for every service to report in (connected to the engine), so that "up" is printed
/// only once the whole pipeline works; gives up waiting after 30 s and says what is missing.
async fn wait_until_live(health: &Health) {
    for _ in 0..600 {
        if health.live() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let waiting: Vec<_> = health
        .snapshot()
        .into_iter()
        .filter(|(_, c)| !matches!(c.status, Status::Ok | Status::Degraded))
        .map(|(name, _)| name)
        .collect();
    warn!(?waiting, "some services are not running yet");
}

/// Keeps the CRL's next-update in the future: verifiers that enforce it (OpenSSL, Mosquitto)
/// would otherwise refuse every device once it passes.
async fn refresh_crl(pki: Pki) {
    let period = Duration::from_secs(6 * 3600);
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    loop {
        tick.tick().await;
        if let Err(e) = pki.refresh_crl() {
            warn!(cause = %e, "CRL not refreshed");
        }
    }
}

fn announce(data_dir: &Path, edge: &Edge, api: &Api, args: &UpArgs) -> anyhow::Result<()> {
    let mqtt = edge.local_addr();
    let http = api.local_addr();
    let certs = data_dir::certs(data_dir);
    let token_path = data_dir::admin_token_path(data_dir);
    if let Some(path) = &args.ready_file {
        let ready = serde_json::json!({
            "mqtt": mqtt.to_string(),
            "http": http.to_string(),
            "ca": certs.join("ca.crt"),
            "admin_token_file": token_path,
        });
        std::fs::write(path, ready.to_string())
            .with_context(|| format!("writing {}", path.display()))?;
    }
    // A loopback or wildcard listener is reached as `localhost`, a name the server
    // certificate carries; an IP address as the TLS server name is not valid SNI.
    let host = if mqtt.ip().is_unspecified() || mqtt.ip().is_loopback() {
        "localhost".to_string()
    } else {
        mqtt.ip().to_string()
    };
    let dir = data_dir.display();
    let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("telemon"));
    let exe = exe.display();
    let devices = data_dir::devices(data_dir);
    let devices = devices.display();
    println!(
        "\ntelemon is up.\n\
         \n  API and dashboard  http://{http}/  (log in as admin, password in {password})\
         \n  admin token        {token}  (Authorization: Bearer $(cat {token}))\
         \n  MQTT (mutual TLS)  {host}:{port}\
         \n\nPublish as a new device:\
         \n  {exe} --data-dir {dir} certs issue bed-7 --out {devices}\
         \n  mosquitto_pub -h {host} -p {port} --cafile {ca} \\\
         \n    --cert {devices}/bed-7.crt --key {devices}/bed-7.key \\\
         \n    -t devices/bed-7/telemetry -q 1 -m '{{\"heart_rate\": 71, \"spo2\": 97}}'\
         \n\nRead it back:\
         \n  curl -H \"Authorization: Bearer $(cat {token})\" \\\
         \n    http://{http}/api/v1/devices/bed-7/readings\
         \n\nCtrl-C stops.\n",
        token = token_path.display(),
        password = bootstrap::admin_password_path(data_dir).display(),
        port = mqtt.port(),
        ca = certs.join("ca.crt").display(),
    );
    Ok(())
}
