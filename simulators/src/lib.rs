//! Simulated devices that connect to a broker the way real ones do: mutual TLS with their own
//! certificates, their own topics, a retained birth and will, QoS 1 telemetry.
//!
//! - [`physiology`]: the patient model behind a bedside vital-sign monitor, with noise,
//!   artefacts and scripted scenarios (stable, deterioration, sudden events, recovery).
//! - [`home`]: smart-home sensors (climate, door contact, power plug).
//! - [`zigbee`]: a Zigbee2MQTT gateway's child devices and their payloads.
//! - [`fleet`]: runs many devices against a broker and counts what they published.
//! - [`scenario`]: the TOML file that describes a fleet and its timed events.
//! - [`bench`]: the load generator: many connections flat out or at a rate, throughput and
//!   latency percentiles, a sink to measure itself, and Mosquitto started as the yardstick.
//!
//! The models are pure: they take a time step and a random number generator and return the
//! metric values, so a seeded generator replays a run exactly. Only [`fleet`] and [`bench`]
//! do I/O.

use std::collections::BTreeMap;

pub mod bench;
pub mod fleet;
pub mod home;
pub mod physiology;
pub mod scenario;
pub mod zigbee;

pub use fleet::{
    run_fleet, vital_monitor_ids, DeviceKind, DeviceSpec, FleetConfig, FleetHandle, FleetStats,
    SimError,
};
pub use physiology::{Patient, Scenario};

/// Metric values of one sample, by metric name. Names are the wire names of the native
/// telemetry payload; a metric the device could not measure this time is absent.
pub type Metrics = BTreeMap<&'static str, f64>;

/// One standard normal variate (Box-Muller), so the models need nothing beyond `rand`.
pub(crate) fn standard_normal<R: rand::Rng + ?Sized>(rng: &mut R) -> f64 {
    // `gen` is in [0, 1): taking 1 - u keeps the logarithm finite.
    let u1: f64 = 1.0 - rng.gen::<f64>();
    let u2: f64 = rng.gen::<f64>();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}
