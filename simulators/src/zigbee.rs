//! The child devices of a simulated Zigbee2MQTT gateway: a [`HomeSensor`] each, reported the
//! way Zigbee2MQTT reports it, as one JSON object of properties on
//! `zigbee2mqtt/<friendly name>` with the radio's link quality and, for battery devices,
//! the battery level and voltage.
//!
//! Like the other models this is pure; the gateway's connection lives in [`crate::fleet`].

use std::time::Duration;

use rand::Rng;
use serde_json::{Map, Value};

use crate::home::{HomeKind, HomeSensor, CONTACT, HUMIDITY, POWER, TEMPERATURE};
use crate::standard_normal;

/// Zigbee2MQTT's default base topic.
pub const BASE_TOPIC: &str = "zigbee2mqtt";
/// Where Zigbee2MQTT says whether the bridge is `online` or `offline`, retained.
pub const BRIDGE_STATE_TOPIC: &str = "zigbee2mqtt/bridge/state";
/// Zigbee2MQTT's commands to its devices, which a gateway listens on.
pub const SET_FILTER: &str = "zigbee2mqtt/+/set";

/// A coin cell loses about a percent a week.
const BATTERY_PERCENT_PER_SEC: f64 = 1.0 / (7.0 * 24.0 * 3600.0);
/// Mains voltage a plug measures, volts.
const MAINS_VOLTS: f64 = 230.0;

/// The topic a child's readings go to.
pub fn device_topic(friendly_name: &str) -> String {
    format!("{BASE_TOPIC}/{friendly_name}")
}

/// One device paired with a gateway.
#[derive(Clone, Debug)]
pub struct ZigbeeChild {
    topic: String,
    sensor: HomeSensor,
    /// Percent; `None` for a mains-powered device.
    battery: Option<f64>,
    /// Link quality, 0..=255, wandering around the device's distance from the gateway.
    linkquality: f64,
    linkquality_base: f64,
}

impl ZigbeeChild {
    pub fn new<R: Rng + ?Sized>(friendly_name: &str, kind: HomeKind, rng: &mut R) -> ZigbeeChild {
        let battery = match kind {
            HomeKind::Power => None,
            HomeKind::Climate | HomeKind::Contact => Some(rng.gen_range(60.0..=100.0)),
        };
        let linkquality_base = rng.gen_range(40.0..220.0);
        ZigbeeChild {
            topic: device_topic(friendly_name),
            sensor: HomeSensor::new(kind, rng),
            battery,
            linkquality: linkquality_base,
            linkquality_base,
        }
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Advances the device by `dt` and returns its Zigbee2MQTT payload. `last_seen` is `ts`
    /// in epoch milliseconds (Zigbee2MQTT's `last_seen: epoch` setting), so that a reading
    /// delivered late keeps the time it was taken.
    pub fn step<R: Rng + ?Sized>(&mut self, dt: Duration, ts: u64, rng: &mut R) -> Vec<u8> {
        let metrics = self.sensor.step(dt, rng);
        self.linkquality = (self.linkquality_base + 10.0 * standard_normal(rng)).clamp(0.0, 255.0);
        if let Some(battery) = &mut self.battery {
            *battery = (*battery - BATTERY_PERCENT_PER_SEC * dt.as_secs_f64()).max(0.0);
        }

        let mut object = Map::new();
        let metric = |name| metrics.get(name).copied().unwrap_or_default();
        match self.sensor.kind() {
            HomeKind::Climate => {
                object.insert(TEMPERATURE.into(), metric(TEMPERATURE).into());
                object.insert(HUMIDITY.into(), metric(HUMIDITY).into());
            }
            HomeKind::Contact => {
                // Zigbee2MQTT's `contact: true` is closed, the model's 1.
                object.insert(CONTACT.into(), Value::Bool(metric(CONTACT) == 1.0));
            }
            HomeKind::Power => {
                let watts = metric(POWER);
                let amps = (watts / MAINS_VOLTS * 1000.0).round() / 1000.0;
                object.insert("state".into(), "ON".into());
                object.insert(POWER.into(), watts.into());
                object.insert("voltage".into(), MAINS_VOLTS.into());
                object.insert("current".into(), amps.into());
            }
        }
        if let Some(battery) = self.battery {
            // A CR2032 reads about 3.0 V full and 2.7 V flat.
            let millivolts = (2700.0 + 3.3 * battery).round() as u64;
            object.insert("battery".into(), (battery.round() as u64).into());
            object.insert("voltage".into(), millivolts.into());
        }
        object.insert(
            "linkquality".into(),
            (self.linkquality.round() as u64).into(),
        );
        object.insert("last_seen".into(), ts.into());
        Value::Object(object).to_string().into_bytes()
    }
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    use super::*;

    fn payload(kind: HomeKind) -> Map<String, Value> {
        let mut rng = StdRng::seed_from_u64(3);
        let mut child = ZigbeeChild::new("kitchen", kind, &mut rng);
        assert_eq!(child.topic(), "zigbee2mqtt/kitchen");
        let bytes = child.step(Duration::from_secs(1), 1_700_000_000_000, &mut rng);
        let value: Value = serde_json::from_slice(&bytes).unwrap_or_default();
        value.as_object().cloned().unwrap_or_default()
    }

    fn keys(object: &Map<String, Value>) -> Vec<&str> {
        let mut keys: Vec<&str> = object.keys().map(String::as_str).collect();
        keys.sort();
        keys
    }

    #[test]
    fn climate_sensor_reports_like_zigbee2mqtt() {
        let object = payload(HomeKind::Climate);
        let want = [
            "battery",
            "humidity",
            "last_seen",
            "linkquality",
            "temperature",
            "voltage",
        ];
        assert_eq!(keys(&object), want);
        assert!(object["temperature"]
            .as_f64()
            .is_some_and(|t| (15.0..28.0).contains(&t)));
        assert!(object["battery"]
            .as_u64()
            .is_some_and(|b| (60..=100).contains(&b)));
        assert!(object["voltage"]
            .as_u64()
            .is_some_and(|v| (2900..=3030).contains(&v)));
        assert!(object["linkquality"].as_u64().is_some_and(|q| q <= 255));
        assert_eq!(object["last_seen"], 1_700_000_000_000u64);
    }

    #[test]
    fn contact_sensor_reports_a_boolean_closed_at_rest() {
        let object = payload(HomeKind::Contact);
        assert_eq!(
            keys(&object),
            ["battery", "contact", "last_seen", "linkquality", "voltage"]
        );
        assert_eq!(object["contact"], Value::Bool(true));
    }

    #[test]
    fn plug_is_mains_powered_and_reports_its_load() {
        let object = payload(HomeKind::Power);
        assert_eq!(
            keys(&object),
            [
                "current",
                "last_seen",
                "linkquality",
                "power",
                "state",
                "voltage"
            ]
        );
        assert_eq!(object["state"], "ON");
        assert_eq!(object["voltage"], MAINS_VOLTS);
        assert!(object["power"].as_f64().is_some_and(|w| w >= 0.0));
    }
}
