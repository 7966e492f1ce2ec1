//! Runs a fleet of simulated devices against an MQTT broker, one task per device, and counts
//! what they took and delivered.
//!
//! Each device connects like a real one: mutual TLS with its own certificate and key from
//! `<certs_dir>/<id>.crt` and `.key`, client id = device id, a persistent session, a
//! retained will `offline` on `devices/{id}/status` and a retained `online` there after
//! every connect, QoS 1 telemetry on `devices/{id}/telemetry`. It listens on
//! `devices/{id}/commands/#`; `devices/{id}/commands/scenario` with a scenario such as
//! `SlowDeterioration(10m)` changes a patient's course.
//!
//! A Zigbee2MQTT gateway connects the same way with its own certificate and client id, but
//! speaks Zigbee2MQTT: its birth and will are `online`/`offline` on
//! `zigbee2mqtt/bridge/state`, each child's readings go to `zigbee2mqtt/<friendly name>`
//! (see [`crate::zigbee`]), and it listens on `zigbee2mqtt/+/set`.
//!
//! Readings are taken on schedule whether or not the broker is reachable; the ones taken
//! while offline wait in a bounded per-device buffer and are published, with the time they
//! were taken, once the device is back.

mod device;
mod outbox;

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::rngs::StdRng;
use rand::SeedableRng;
use telemon_model::bus::{BusConfig, BusError, BusTls};
use telemon_model::{DeviceId, InvalidDeviceId};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::debug;

use crate::home::{HomeKind, HomeSensor};
use crate::physiology::{Artefacts, Patient, Scenario};
use crate::zigbee::ZigbeeChild;

use device::{Device, Model, Settings};

/// Shortest sampling interval: below it a fleet measures the scheduler, not the broker.
pub const MIN_INTERVAL: Duration = Duration::from_millis(10);
/// Readings a device buffers while offline by default: an hour at one per second.
pub const DEFAULT_BUFFER: usize = 3600;
/// How long [`FleetHandle::shutdown`] waits for devices to say `offline` and disconnect.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error(transparent)]
    InvalidDevice(#[from] InvalidDeviceId),
    #[error("device {0} appears twice in the fleet")]
    DuplicateDevice(String),
    #[error("device {device}: {path} is missing; issue its certificate first")]
    MissingCertificate { device: String, path: PathBuf },
    #[error("device {device}: {source}")]
    Bus { device: String, source: BusError },
    #[error("interval {0:?} is under the minimum of {MIN_INTERVAL:?}")]
    Interval(Duration),
    #[error("event for {0}, which is not a vital monitor of this fleet")]
    UnknownEventDevice(String),
    #[error("the fleet has no devices")]
    NoDevices,
    #[error("gateway {gateway}: child {child:?} {reason}")]
    InvalidChild {
        gateway: String,
        child: String,
        reason: &'static str,
    },
    #[error("gateway {0} has no children")]
    EmptyGateway(String),
    #[error("gateway {0}: a fleet has one Zigbee2MQTT gateway (they share the bridge topics)")]
    SecondGateway(String),
}

/// What a simulated device is.
#[derive(Clone, Debug, PartialEq)]
pub enum DeviceKind {
    /// A bedside vital-sign monitor on a patient going through `scenario`.
    Vitals { scenario: Scenario },
    /// A smart-home sensor.
    Home { sensor: HomeKind },
    /// A Zigbee2MQTT gateway publishing for its children, given as (friendly name, sensor).
    /// The friendly name is the device id telemon files the child's readings under.
    Gateway { children: Vec<(String, HomeKind)> },
}

#[derive(Clone, Debug, PartialEq)]
pub struct DeviceSpec {
    pub id: String,
    pub kind: DeviceKind,
}

/// A scenario change for one patient, `at` after the fleet started.
#[derive(Clone, Debug, PartialEq)]
pub struct TimedEvent {
    pub at: Duration,
    pub device: String,
    pub scenario: Scenario,
}

/// Reconnect delays: doubling from `min` up to `max`, each drawn at random from its upper
/// half so that a fleet dropped at once does not come back in one wave.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    pub min: Duration,
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            min: Duration::from_millis(100),
            max: Duration::from_secs(10),
        }
    }
}

#[derive(Clone, Debug)]
pub struct FleetConfig {
    pub broker_host: String,
    pub broker_port: u16,
    /// CA bundle the broker's server certificate is checked against.
    pub ca: PathBuf,
    /// Holds `<id>.crt` and `<id>.key` for every device.
    pub certs_dir: PathBuf,
    /// Sampling and publishing interval of every device.
    pub interval: Duration,
    pub devices: Vec<DeviceSpec>,
    pub events: Vec<TimedEvent>,
    /// Seed for the models; `None` draws one per run.
    pub seed: Option<u64>,
    /// Readings each device keeps while offline.
    pub buffer: usize,
    pub artefacts: Artefacts,
    pub backoff: Backoff,
}

impl FleetConfig {
    /// A fleet with no devices yet, sampling once a second.
    pub fn new(
        broker_host: impl Into<String>,
        broker_port: u16,
        ca: impl Into<PathBuf>,
        certs_dir: impl Into<PathBuf>,
    ) -> FleetConfig {
        FleetConfig {
            broker_host: broker_host.into(),
            broker_port,
            ca: ca.into(),
            certs_dir: certs_dir.into(),
            interval: Duration::from_secs(1),
            devices: Vec::new(),
            events: Vec::new(),
            seed: None,
            buffer: DEFAULT_BUFFER,
            artefacts: Artefacts::default(),
            backoff: Backoff::default(),
        }
    }

    fn validate(&self) -> Result<(), SimError> {
        if self.devices.is_empty() {
            return Err(SimError::NoDevices);
        }
        if self.interval < MIN_INTERVAL {
            return Err(SimError::Interval(self.interval));
        }
        let mut ids = HashSet::new();
        for spec in &self.devices {
            DeviceId::new(spec.id.as_str())?;
            if !ids.insert(spec.id.as_str()) {
                return Err(SimError::DuplicateDevice(spec.id.clone()));
            }
        }
        self.validate_gateways()?;
        for event in &self.events {
            let is_monitor = self
                .devices
                .iter()
                .any(|d| d.id == event.device && matches!(d.kind, DeviceKind::Vitals { .. }));
            if !is_monitor {
                return Err(SimError::UnknownEventDevice(event.device.clone()));
            }
        }
        Ok(())
    }

    fn validate_gateways(&self) -> Result<(), SimError> {
        let mut gateways = self.devices.iter().filter_map(|d| match &d.kind {
            DeviceKind::Gateway { children } => Some((&d.id, children)),
            _ => None,
        });
        let Some((gateway, children)) = gateways.next() else {
            return Ok(());
        };
        if let Some((second, _)) = gateways.next() {
            return Err(SimError::SecondGateway(second.clone()));
        }
        if children.is_empty() {
            return Err(SimError::EmptyGateway(gateway.clone()));
        }

        let mut names = HashSet::new();
        for (name, _) in children {
            let reason = if DeviceId::new(name.as_str()).is_err() {
                Some("is not a valid device id")
            } else if name == "bridge" {
                Some("is Zigbee2MQTT's own topic")
            } else if !names.insert(name.as_str()) {
                Some("appears twice")
            } else if self.devices.iter().any(|d| &d.id == name) {
                // Its readings would be filed under the same device id as that device's.
                Some("is also a device of the fleet")
            } else {
                None
            };
            if let Some(reason) = reason {
                return Err(SimError::InvalidChild {
                    gateway: gateway.clone(),
                    child: name.clone(),
                    reason,
                });
            }
        }
        Ok(())
    }

    fn bus(&self, id: &str) -> Result<BusConfig, SimError> {
        let cert = self.certs_dir.join(format!("{id}.crt"));
        let key = self.certs_dir.join(format!("{id}.key"));
        for path in [&cert, &key] {
            if !path.is_file() {
                return Err(SimError::MissingCertificate {
                    device: id.to_string(),
                    path: path.clone(),
                });
            }
        }
        Ok(BusConfig {
            host: self.broker_host.clone(),
            port: self.broker_port,
            tls: Some(BusTls {
                ca: self.ca.clone(),
                client: Some((cert, key)),
            }),
            username: None,
            password: None,
        })
    }
}

/// Counters shared by every device task of a fleet.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub taken: AtomicU64,
    pub published: AtomicU64,
    pub dropped: AtomicU64,
    pub connects: AtomicU64,
    pub commands: AtomicU64,
    pub connected: AtomicI64,
}

/// A snapshot of a fleet's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FleetStats {
    /// Readings sampled.
    pub taken: u64,
    /// Readings the broker acknowledged.
    pub published: u64,
    /// Readings dropped because a device's offline buffer was full.
    pub dropped: u64,
    /// Connections accepted by the broker, first ones included.
    pub connects: u64,
    /// Devices connected now.
    pub connected: u64,
    /// Commands received.
    pub commands: u64,
}

/// A running fleet.
pub struct FleetHandle {
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    counters: Arc<Counters>,
}

impl FleetHandle {
    /// Readings the broker has acknowledged so far.
    pub fn published(&self) -> u64 {
        self.counters.published.load(Ordering::Relaxed)
    }

    pub fn stats(&self) -> FleetStats {
        let c = &self.counters;
        FleetStats {
            taken: c.taken.load(Ordering::Relaxed),
            published: c.published.load(Ordering::Relaxed),
            dropped: c.dropped.load(Ordering::Relaxed),
            connects: c.connects.load(Ordering::Relaxed),
            connected: c.connected.load(Ordering::Relaxed).max(0) as u64,
            commands: c.commands.load(Ordering::Relaxed),
        }
    }

    /// Tells every device to say `offline` and disconnect, without waiting for them.
    pub fn stop(self) {
        let _ = self.stop.send(true);
    }

    /// Stops the fleet and waits, at most [`SHUTDOWN_GRACE`] plus a little, for the devices
    /// to disconnect; stragglers are aborted.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let deadline = tokio::time::Instant::now() + SHUTDOWN_GRACE + Duration::from_millis(500);
        for mut task in self.tasks {
            if tokio::time::timeout_at(deadline, &mut task).await.is_err() {
                task.abort();
            }
        }
    }
}

/// Device ids `bed-01` .. `bed-NN`, zero-padded to the width of `n` (at least two digits).
pub fn vital_monitor_ids(n: usize) -> Vec<String> {
    numbered_ids("bed", n)
}

pub(crate) fn numbered_ids(prefix: &str, n: usize) -> Vec<String> {
    let width = n.to_string().len().max(2);
    (1..=n).map(|i| format!("{prefix}-{i:0width$}")).collect()
}

/// Starts every device of `config` on the current tokio runtime. Fails before starting any
/// device when the configuration is invalid or a certificate cannot be read.
pub async fn run_fleet(config: FleetConfig) -> Result<FleetHandle, SimError> {
    config.validate()?;
    ensure_crypto_provider();

    let mut devices = Vec::with_capacity(config.devices.len());
    for spec in &config.devices {
        let options = config
            .bus(&spec.id)?
            .mqtt_options(&spec.id)
            .map_err(|source| SimError::Bus {
                device: spec.id.clone(),
                source,
            })?;
        devices.push((build_device(&config, spec), options));
    }

    let settings = Settings {
        interval: config.interval,
        buffer: config.buffer.max(1),
        backoff: config.backoff,
        start: tokio::time::Instant::now(),
        start_wall_ms: epoch_millis(),
    };
    let counters = Arc::new(Counters::default());
    let (stop, stopped) = watch::channel(false);
    let tasks = devices
        .into_iter()
        .map(|(device, options)| {
            let run = device.run(options, settings, counters.clone(), stopped.clone());
            tokio::spawn(run)
        })
        .collect();

    debug!(devices = config.devices.len(), broker = %config.broker_host, "fleet started");
    Ok(FleetHandle {
        stop,
        tasks,
        counters,
    })
}

fn build_device(config: &FleetConfig, spec: &DeviceSpec) -> Device {
    let mut rng = match config.seed {
        Some(seed) => StdRng::seed_from_u64(seed ^ fnv1a(&spec.id)),
        None => StdRng::from_entropy(),
    };
    let model = match &spec.kind {
        DeviceKind::Vitals { scenario } => Model::Patient(Box::new(
            Patient::new(&mut rng)
                .with_artefacts(config.artefacts)
                .with_scenario(*scenario),
        )),
        DeviceKind::Home { sensor } => Model::Home(HomeSensor::new(*sensor, &mut rng)),
        DeviceKind::Gateway { children } => Model::Gateway(
            children
                .iter()
                .map(|(name, kind)| ZigbeeChild::new(name, *kind, &mut rng))
                .collect(),
        ),
    };
    let mut events: Vec<_> = config
        .events
        .iter()
        .filter(|e| e.device == spec.id)
        .cloned()
        .collect();
    events.sort_by_key(|e| e.at);
    Device::new(spec.id.clone(), model, rng, events)
}

/// rustls panics at the first handshake when more than one crypto provider is compiled in
/// (ring for the workspace, aws-lc-rs through rumqttc) and none was chosen. The workspace
/// standardises on ring; a provider the binary installed first is kept.
fn ensure_crypto_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

/// A stable per-device seed component, so that adding a device does not change the others.
fn fnv1a(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

pub(crate) fn epoch_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn monitor_ids_are_zero_padded_to_the_fleet_size() {
        assert_eq!(vital_monitor_ids(3), ["bed-01", "bed-02", "bed-03"]);
        let ids = vital_monitor_ids(120);
        assert_eq!((ids[0].as_str(), ids[119].as_str()), ("bed-001", "bed-120"));
        assert!(vital_monitor_ids(0).is_empty());
    }

    fn config(devices: &[&str]) -> FleetConfig {
        let mut config = FleetConfig::new("127.0.0.1", 1, "/nonexistent/ca.crt", "/nonexistent");
        config.devices = devices
            .iter()
            .map(|id| DeviceSpec {
                id: id.to_string(),
                kind: DeviceKind::Vitals {
                    scenario: Scenario::Stable,
                },
            })
            .collect();
        config
    }

    #[tokio::test]
    async fn invalid_fleets_are_refused_before_anything_starts() {
        let cases = [
            (config(&[]), "no devices"),
            (config(&["bed/1"]), "invalid device id"),
            (config(&["bed-01", "bed-01"]), "twice"),
            (config(&["bed-01"]), "missing"),
        ];
        for (config, want) in cases {
            let err = run_fleet(config).await.err().map(|e| e.to_string());
            assert!(err.as_deref().is_some_and(|e| e.contains(want)), "{err:?}");
        }

        let mut fast = config(&["bed-01"]);
        fast.interval = Duration::from_millis(1);
        assert!(matches!(run_fleet(fast).await, Err(SimError::Interval(_))));

        let mut event = config(&["bed-01"]);
        event.events.push(TimedEvent {
            at: Duration::ZERO,
            device: "bed-02".into(),
            scenario: Scenario::Stable,
        });
        let err = run_fleet(event).await.err();
        assert!(matches!(err, Some(SimError::UnknownEventDevice(d)) if d == "bed-02"));
    }

    #[tokio::test]
    async fn gateways_are_checked_before_anything_starts() {
        let gateway = |children: &[&str]| DeviceSpec {
            id: "zigbee-gw".into(),
            kind: DeviceKind::Gateway {
                children: children
                    .iter()
                    .map(|c| (c.to_string(), HomeKind::Climate))
                    .collect(),
            },
        };
        let cases = [
            (vec![gateway(&[])], "no children"),
            (vec![gateway(&["kitchen", "kitchen"])], "twice"),
            (vec![gateway(&["bridge"])], "own topic"),
            (vec![gateway(&["a/b"])], "valid device id"),
            (vec![gateway(&["a"]), gateway(&["b"])], "twice"),
            (vec![gateway(&["zigbee-gw"])], "also a device"),
            (vec![gateway(&["kitchen"])], "missing"),
        ];
        for (devices, want) in cases {
            let mut config = config(&[]);
            config.devices = devices;
            let err = run_fleet(config).await.err().map(|e| e.to_string());
            assert!(err.as_deref().is_some_and(|e| e.contains(want)), "{err:?}");
        }

        let mut two = config(&[]);
        let mut other = gateway(&["hall"]);
        other.id = "zigbee-gw-2".into();
        two.devices = vec![gateway(&["kitchen"]), other];
        assert!(
            matches!(run_fleet(two).await, Err(SimError::SecondGateway(id)) if id == "zigbee-gw-2")
        );
    }

    #[test]
    fn seeds_differ_per_device_and_stay_put() {
        assert_ne!(fnv1a("bed-01"), fnv1a("bed-02"));
        assert_eq!(fnv1a("bed-01"), fnv1a("bed-01"));
    }
}
