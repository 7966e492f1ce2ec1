//! Smart-home sensors: a climate sensor (temperature, humidity), a door contact and a power
//! plug, with the slow variation and occasional events such devices report.
//!
//! Like [`crate::physiology`], a sensor is a pure model stepped with a random number
//! generator; the metric names are the ones Zigbee2MQTT uses for the same quantities.

use std::time::Duration;

use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::{standard_normal, Metrics};

/// Degrees Celsius.
pub const TEMPERATURE: &str = "temperature";
/// Relative humidity, percent.
pub const HUMIDITY: &str = "humidity";
/// 1 closed, 0 open (Zigbee2MQTT's `contact: true` is closed).
pub const CONTACT: &str = "contact";
/// Watts.
pub const POWER: &str = "power";

/// What a home sensor measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HomeKind {
    /// Room temperature and humidity.
    Climate,
    /// A door or window contact.
    Contact,
    /// A smart plug with an appliance that switches on and off.
    Power,
}

/// How often a door opens, and for how long, on average.
const DOOR_OPENS_PER_HOUR: f64 = 4.0;
const DOOR_OPEN_MEAN_SECS: f64 = 20.0;
/// The plugged-in appliance (a fridge compressor) runs about a third of the time.
const APPLIANCE_ON_MEAN_SECS: f64 = 600.0;
const APPLIANCE_OFF_MEAN_SECS: f64 = 1200.0;
/// Standby draw of the plug with the appliance off.
const STANDBY_WATTS: f64 = 0.6;

/// One simulated home sensor.
#[derive(Clone, Debug)]
pub struct HomeSensor {
    kind: HomeKind,
    temperature: f64,
    temperature_target: f64,
    humidity: f64,
    humidity_target: f64,
    open: bool,
    appliance_on: bool,
    appliance_watts: f64,
}

impl HomeSensor {
    /// A sensor with its own set-points drawn from `rng`.
    pub fn new<R: Rng + ?Sized>(kind: HomeKind, rng: &mut R) -> HomeSensor {
        let temperature_target = rng.gen_range(19.5..22.5);
        let humidity_target = rng.gen_range(38.0..55.0);
        HomeSensor {
            kind,
            temperature: temperature_target,
            temperature_target,
            humidity: humidity_target,
            humidity_target,
            open: false,
            appliance_on: false,
            appliance_watts: rng.gen_range(80.0..150.0),
        }
    }

    pub fn kind(&self) -> HomeKind {
        self.kind
    }

    /// Advances the sensor by `dt` and returns what it reports.
    pub fn step<R: Rng + ?Sized>(&mut self, dt: Duration, rng: &mut R) -> Metrics {
        let secs = dt.as_secs_f64();
        let mut metrics = Metrics::new();
        match self.kind {
            HomeKind::Climate => {
                self.step_climate(secs, rng);
                metrics.insert(TEMPERATURE, (self.temperature * 10.0).round() / 10.0);
                metrics.insert(HUMIDITY, self.humidity.clamp(0.0, 100.0).round());
            }
            HomeKind::Contact => {
                self.step_contact(secs, rng);
                metrics.insert(CONTACT, if self.open { 0.0 } else { 1.0 });
            }
            HomeKind::Power => {
                self.step_power(secs, rng);
                let watts = if self.appliance_on {
                    self.appliance_watts * (1.0 + 0.03 * standard_normal(rng))
                } else {
                    STANDBY_WATTS
                };
                metrics.insert(POWER, (watts.max(0.0) * 10.0).round() / 10.0);
            }
        }
        metrics
    }

    /// Rooms change temperature over tens of minutes; humidity follows a little faster.
    fn step_climate<R: Rng + ?Sized>(&mut self, secs: f64, rng: &mut R) {
        let revert = |x: f64, target: f64, tau: f64, sd: f64, rng: &mut R| {
            let a = (-secs / tau).exp();
            target + (x - target) * a + sd * (1.0 - a * a).sqrt() * standard_normal(rng)
        };
        self.temperature = revert(self.temperature, self.temperature_target, 1800.0, 0.4, rng);
        self.humidity = revert(self.humidity, self.humidity_target, 900.0, 2.0, rng);
    }

    fn step_contact<R: Rng + ?Sized>(&mut self, secs: f64, rng: &mut R) {
        let rate_per_sec = if self.open {
            1.0 / DOOR_OPEN_MEAN_SECS
        } else {
            DOOR_OPENS_PER_HOUR / 3600.0
        };
        if rng.gen_bool(switch_chance(rate_per_sec, secs)) {
            self.open = !self.open;
        }
    }

    fn step_power<R: Rng + ?Sized>(&mut self, secs: f64, rng: &mut R) {
        let mean = if self.appliance_on {
            APPLIANCE_ON_MEAN_SECS
        } else {
            APPLIANCE_OFF_MEAN_SECS
        };
        if rng.gen_bool(switch_chance(1.0 / mean, secs)) {
            self.appliance_on = !self.appliance_on;
        }
    }
}

/// Probability that a state with exit rate `per_sec` ends within `secs`.
fn switch_chance(per_sec: f64, secs: f64) -> f64 {
    (1.0 - (-per_sec * secs).exp()).clamp(0.0, 1.0)
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    use super::*;

    fn run(kind: HomeKind, seconds: u32) -> Vec<Metrics> {
        let mut rng = StdRng::seed_from_u64(11);
        let mut sensor = HomeSensor::new(kind, &mut rng);
        (0..seconds)
            .map(|_| sensor.step(Duration::from_secs(1), &mut rng))
            .collect()
    }

    #[test]
    fn climate_stays_indoor_and_varies() {
        let samples = run(HomeKind::Climate, 6 * 3600);
        let temps: Vec<f64> = samples.iter().map(|m| m[TEMPERATURE]).collect();
        assert!(temps.iter().all(|t| (15.0..=28.0).contains(t)), "{temps:?}");
        assert!(samples.iter().all(|m| (20.0..=80.0).contains(&m[HUMIDITY])));
        let spread = temps.iter().copied().fold(f64::MIN, f64::max)
            - temps.iter().copied().fold(f64::MAX, f64::min);
        assert!(spread > 0.3, "temperature spread {spread}");
    }

    #[test]
    fn door_opens_a_few_times_an_hour_and_closes_again() {
        let samples = run(HomeKind::Contact, 10 * 3600);
        let openings = samples
            .windows(2)
            .filter(|w| w[0][CONTACT] == 1.0 && w[1][CONTACT] == 0.0)
            .count();
        assert!((20..=65).contains(&openings), "{openings} openings in 10 h");
        let open = samples.iter().filter(|m| m[CONTACT] == 0.0).count();
        assert!(
            open < samples.len() / 20,
            "open {open} of {} seconds",
            samples.len()
        );
    }

    #[test]
    fn plug_switches_between_standby_and_load() {
        let samples = run(HomeKind::Power, 6 * 3600);
        let on = samples.iter().filter(|m| m[POWER] > 50.0).count();
        let standby = samples.iter().filter(|m| m[POWER] == STANDBY_WATTS).count();
        assert_eq!(on + standby, samples.len());
        let share = on as f64 / samples.len() as f64;
        assert!((0.1..=0.6).contains(&share), "on {share} of the time");
    }
}
