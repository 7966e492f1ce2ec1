//! `telemon simulate` and `telemon up --simulate N`: simulated vital-sign monitors that
//! connect like real devices, each with its own certificate.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use telemon_broker::pki::{Pki, DEFAULT_DEVICE_DAYS};
use telemon_simulators::fleet::{run_fleet, DeviceKind, DeviceSpec, FleetConfig, FleetHandle};
use telemon_simulators::physiology::Scenario;
use telemon_simulators::scenario::ScenarioFile;

use crate::data_dir;

#[derive(clap::Args, Debug)]
pub struct SimulateArgs {
    /// Number of vital-sign monitors (ignored with --scenario).
    #[arg(default_value_t = 10)]
    count: usize,

    /// Broker to connect to, host:port (mutual TLS).
    #[arg(long, default_value = "localhost:8883")]
    broker: String,

    /// A fleet described in a scenario file (see simulators/scenario.toml).
    #[arg(long)]
    scenario: Option<PathBuf>,

    /// CA bundle for the broker's certificate; the data directory's CA by default.
    #[arg(long)]
    ca: Option<PathBuf>,
}

/// Every fifth monitor slowly deteriorates over 5 minutes, so that a demo shows NEWS2 and
/// threshold alerts within minutes; the others are stable patients.
pub fn default_fleet(count: usize) -> Vec<DeviceSpec> {
    telemon_simulators::fleet::vital_monitor_ids(count)
        .into_iter()
        .enumerate()
        .map(|(i, id)| {
            let scenario = if i % 5 == 4 {
                Scenario::SlowDeterioration {
                    over: Duration::from_secs(5 * 60),
                }
            } else {
                Scenario::Stable
            };
            DeviceSpec {
                id,
                kind: DeviceKind::Vitals { scenario },
            }
        })
        .collect()
}

/// Issues a certificate for every device that has none yet, from the data directory's CA.
pub fn ensure_certificates(pki: &Pki, dir: &Path, devices: &[DeviceSpec]) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for device in devices {
        if !dir.join(format!("{}.crt", device.id)).exists() {
            pki.issue(&device.id, dir, DEFAULT_DEVICE_DAYS)
                .with_context(|| format!("issuing a certificate for {}", device.id))?;
        }
    }
    Ok(())
}

/// Starts a fleet against `host:port` with certificates from the data directory.
pub async fn start(
    data_dir: &Path,
    host: &str,
    port: u16,
    ca: &Path,
    devices: Vec<DeviceSpec>,
) -> anyhow::Result<FleetHandle> {
    let pki = Pki::open_or_init(&data_dir::certs(data_dir)).context("opening the CA")?;
    let certs = data_dir::devices(data_dir);
    ensure_certificates(&pki, &certs, &devices)?;
    let mut config = FleetConfig::new(host, port, ca, certs);
    config.devices = devices;
    run_fleet(config)
        .await
        .context("starting the simulated fleet")
}

pub async fn run(data_dir: &Path, args: SimulateArgs) -> anyhow::Result<()> {
    let (host, port) = args
        .broker
        .rsplit_once(':')
        .and_then(|(h, p)| Some((h.to_string(), p.parse::<u16>().ok()?)))
        .context("--broker must be host:port")?;
    let ca = args
        .ca
        .unwrap_or_else(|| data_dir::certs(data_dir).join("ca.crt"));
    let fleet = match &args.scenario {
        Some(path) => {
            let file =
                ScenarioFile::load(path).with_context(|| format!("in {}", path.display()))?;
            let pki = Pki::open_or_init(&data_dir::certs(data_dir)).context("opening the CA")?;
            let certs = data_dir::devices(data_dir);
            let devices = file.devices()?;
            ensure_certificates(&pki, &certs, &devices)?;
            let mut config = FleetConfig::new(host, port, ca, certs);
            file.configure(&mut config)?;
            run_fleet(config)
                .await
                .context("starting the simulated fleet")?
        }
        None => start(data_dir, &host, port, &ca, default_fleet(args.count)).await?,
    };
    println!("simulating; Ctrl-C stops");
    tokio::signal::ctrl_c()
        .await
        .context("waiting for Ctrl-C")?;
    let stats = fleet.stats();
    fleet.shutdown().await;
    println!("published {} readings", stats.published);
    Ok(())
}
