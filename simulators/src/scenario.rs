//! The scenario file: which devices a simulated fleet has, how often they sample, what each
//! patient goes through, and timed events that change a patient's scenario during a run.
//!
//! ```toml
//! interval = "1s"
//! events = ["at 2m bed-03 SlowDeterioration(20m)"]
//!
//! [vital_monitors]
//! count = 12
//! scenario = "Stable"
//! scenarios = { bed-07 = "Recovery(30m)" }
//!
//! [home_sensors]
//! climate = 2
//!
//! [zigbee_gateway]
//! id = "zigbee-gw"
//! children = { kitchen = "climate", front_door = "contact" }
//! ```
//!
//! Unknown keys are refused, so a misspelt key is an error rather than a silent default.
//! The broker address and certificates are not part of the file: they belong to the machine
//! the fleet runs on, not to the scenario.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;

use crate::fleet::{numbered_ids, vital_monitor_ids, DeviceKind, DeviceSpec, FleetConfig};
use crate::fleet::{TimedEvent, MIN_INTERVAL};
use crate::home::HomeKind;
use crate::physiology::{Artefacts, Scenario};

/// More devices than one simulator process should try to run; beyond it, start several.
pub const MAX_DEVICES: usize = 100_000;

#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    #[error("reading scenario file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("scenario file{}: {source}", path_suffix(.path))]
    Toml {
        path: Option<PathBuf>,
        source: toml::de::Error,
    },
    #[error("scenario: {0}")]
    Invalid(String),
}

fn path_suffix(path: &Option<PathBuf>) -> String {
    path.as_ref()
        .map(|p| format!(" {}", p.display()))
        .unwrap_or_default()
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid duration {0:?}: use a whole number with ms, s, m or h, such as 500ms or 2m")]
pub struct InvalidDuration(pub String);

/// Parses `500ms`, `30s`, `2m` or `1h`.
pub fn parse_duration(text: &str) -> Result<Duration, InvalidDuration> {
    let bad = || InvalidDuration(text.to_string());
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (number, unit) = text.split_at(split);
    let n: u64 = number.parse().map_err(|_| bad())?;
    let millis = match unit {
        "ms" => Some(n),
        "s" => n.checked_mul(1_000),
        "m" => n.checked_mul(60_000),
        "h" => n.checked_mul(3_600_000),
        _ => None,
    };
    millis.map(Duration::from_millis).ok_or_else(bad)
}

/// The shortest exact form [`parse_duration`] reads back.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        return "0s".to_string();
    }
    let units = [("h", 3_600_000), ("m", 60_000), ("s", 1_000)];
    match units
        .iter()
        .find(|(_, size)| ms.checked_rem(*size) == Some(0))
    {
        Some((unit, size)) => format!("{}{unit}", ms / size),
        None => format!("{ms}ms"),
    }
}

/// A duration written as text in the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct TextDuration(pub Duration);

impl TryFrom<String> for TextDuration {
    type Error = InvalidDuration;

    fn try_from(text: String) -> Result<Self, Self::Error> {
        parse_duration(&text).map(TextDuration)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid event {0:?}: write it as \"at <duration> <device> <scenario>\"")]
pub struct InvalidEvent(pub String);

impl FromStr for TimedEvent {
    type Err = InvalidEvent;

    /// `at 2m bed-03 SlowDeterioration(20m)`.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || InvalidEvent(text.to_string());
        let mut words = text.split_whitespace();
        if words.next() != Some("at") {
            return Err(bad());
        }
        let at = words.next().ok_or_else(bad).map(parse_duration)?;
        let device = words.next().ok_or_else(bad)?;
        let scenario = words.collect::<Vec<_>>().join(" ");
        Ok(TimedEvent {
            at: at.map_err(|_| bad())?,
            device: device.to_string(),
            scenario: scenario.parse().map_err(|_| bad())?,
        })
    }
}

impl TryFrom<String> for TimedEvent {
    type Error = InvalidEvent;

    fn try_from(text: String) -> Result<Self, Self::Error> {
        text.parse()
    }
}

impl<'de> Deserialize<'de> for TimedEvent {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// A whole scenario file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScenarioFile {
    /// How often every device samples and publishes. One second is a bedside monitor's
    /// usual numeric update.
    #[serde(default = "default_interval")]
    pub interval: TextDuration,
    /// Seed for the patients' physiology; absent for a different run every time.
    #[serde(default)]
    pub seed: Option<u64>,
    /// Readings each device keeps while it cannot reach the broker; the oldest go first.
    #[serde(default)]
    pub buffer: Option<usize>,
    /// Scenario changes during the run, counted from the start of the fleet.
    #[serde(default)]
    pub events: Vec<TimedEvent>,
    #[serde(default)]
    pub vital_monitors: Option<VitalMonitors>,
    #[serde(default)]
    pub home_sensors: Option<HomeSensors>,
    #[serde(default)]
    pub zigbee_gateway: Option<ZigbeeGateway>,
}

fn default_interval() -> TextDuration {
    TextDuration(Duration::from_secs(1))
}

/// Bedside monitors, named `bed-01` upwards.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VitalMonitors {
    pub count: usize,
    /// What every patient goes through unless `scenarios` names the bed.
    #[serde(default = "stable")]
    pub scenario: Scenario,
    /// Per bed, by device id.
    #[serde(default)]
    pub scenarios: BTreeMap<String, Scenario>,
    /// Artefact episodes per hour; the defaults of [`Artefacts`] when absent.
    #[serde(default)]
    pub probe_off_per_hour: Option<f64>,
    #[serde(default)]
    pub motion_per_hour: Option<f64>,
}

fn stable() -> Scenario {
    Scenario::Stable
}

/// Smart-home sensors by kind, named `climate-01`, `contact-01`, `plug-01` upwards.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HomeSensors {
    #[serde(default)]
    pub climate: usize,
    #[serde(default)]
    pub contact: usize,
    #[serde(default)]
    pub power: usize,
}

/// A Zigbee2MQTT gateway and the sensors paired with it, by friendly name.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ZigbeeGateway {
    /// The gateway's own device id: its certificate and MQTT client id.
    pub id: String,
    pub children: BTreeMap<String, HomeKind>,
}

impl ScenarioFile {
    pub fn load(path: &Path) -> Result<ScenarioFile, ScenarioError> {
        let text = std::fs::read_to_string(path).map_err(|source| ScenarioError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ScenarioError::Toml {
            path: Some(path.to_path_buf()),
            source,
        })
    }

    pub fn parse(text: &str) -> Result<ScenarioFile, ScenarioError> {
        toml::from_str(text).map_err(|source| ScenarioError::Toml { path: None, source })
    }

    /// The devices the file describes, after checking that every per-bed scenario and event
    /// names one of them.
    pub fn devices(&self) -> Result<Vec<DeviceSpec>, ScenarioError> {
        let mut devices = Vec::new();
        if let Some(monitors) = &self.vital_monitors {
            for id in vital_monitor_ids(monitors.count) {
                let scenario = monitors.scenarios.get(&id).copied();
                let kind = DeviceKind::Vitals {
                    scenario: scenario.unwrap_or(monitors.scenario),
                };
                devices.push(DeviceSpec { id, kind });
            }
        }
        let home = self.home_sensors.clone().unwrap_or_default();
        for (prefix, count, sensor) in [
            ("climate", home.climate, HomeKind::Climate),
            ("contact", home.contact, HomeKind::Contact),
            ("plug", home.power, HomeKind::Power),
        ] {
            for id in numbered_ids(prefix, count) {
                devices.push(DeviceSpec {
                    id,
                    kind: DeviceKind::Home { sensor },
                });
            }
        }

        if let Some(gateway) = &self.zigbee_gateway {
            let children = gateway
                .children
                .iter()
                .map(|(name, kind)| (name.clone(), *kind))
                .collect();
            devices.push(DeviceSpec {
                id: gateway.id.clone(),
                kind: DeviceKind::Gateway { children },
            });
        }

        self.check(&devices)?;
        Ok(devices)
    }

    fn check(&self, devices: &[DeviceSpec]) -> Result<(), ScenarioError> {
        let invalid = |msg: String| Err(ScenarioError::Invalid(msg));
        if devices.len() > MAX_DEVICES {
            return invalid(format!("{} devices, at most {MAX_DEVICES}", devices.len()));
        }
        if self.interval.0 < MIN_INTERVAL {
            return invalid(format!("interval under {}", format_duration(MIN_INTERVAL)));
        }
        if self.buffer == Some(0) {
            return invalid("buffer 0: a device needs room for at least one reading".into());
        }

        let monitors: BTreeSet<&str> = devices
            .iter()
            .filter(|d| matches!(d.kind, DeviceKind::Vitals { .. }))
            .map(|d| d.id.as_str())
            .collect();
        let named = self.vital_monitors.iter().flat_map(|m| m.scenarios.keys());
        let in_events = self.events.iter().map(|e| &e.device);
        for id in named.chain(in_events) {
            if !monitors.contains(id.as_str()) {
                return invalid(format!("{id:?} is not one of the fleet's vital monitors"));
            }
        }

        let rates = self
            .vital_monitors
            .iter()
            .flat_map(|m| [m.probe_off_per_hour, m.motion_per_hour]);
        if rates.flatten().any(|r| !r.is_finite() || r < 0.0) {
            return invalid("artefact rates must be finite and not negative".into());
        }
        Ok(())
    }

    /// Artefact rates for the vital monitors.
    pub fn artefacts(&self) -> Artefacts {
        let defaults = Artefacts::default();
        let monitors = self.vital_monitors.as_ref();
        Artefacts {
            probe_off_per_hour: monitors
                .and_then(|m| m.probe_off_per_hour)
                .unwrap_or(defaults.probe_off_per_hour),
            motion_per_hour: monitors
                .and_then(|m| m.motion_per_hour)
                .unwrap_or(defaults.motion_per_hour),
        }
    }

    /// Writes the file's fleet, timing and events into `config`, which already says where
    /// the broker and the certificates are.
    pub fn configure(&self, config: &mut FleetConfig) -> Result<(), ScenarioError> {
        config.devices = self.devices()?;
        config.interval = self.interval.0;
        config.events = self.events.clone();
        config.seed = self.seed;
        config.artefacts = self.artefacts();
        if let Some(buffer) = self.buffer {
            config.buffer = buffer;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_and_print_back() {
        for (text, ms) in [
            ("500ms", 500),
            ("30s", 30_000),
            ("2m", 120_000),
            ("1h", 3_600_000),
        ] {
            let d = parse_duration(text).unwrap();
            assert_eq!(d, Duration::from_millis(ms));
            assert_eq!(format_duration(d), text);
        }
        for bad in [
            "",
            "5",
            "m",
            "1.5s",
            "-1s",
            "2 days",
            "99999999999999999999h",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn events_read_like_a_script() {
        let event: TimedEvent = "at 2m bed-03 SlowDeterioration".parse().unwrap();
        assert_eq!(event.at, Duration::from_secs(120));
        assert_eq!(event.device, "bed-03");
        assert_eq!(event.scenario.name(), "SlowDeterioration");
        for bad in [
            "2m bed-03 Stable",
            "at bed-03 Stable",
            "at 2m bed-03",
            "at 2m bed-03 Sick",
        ] {
            assert!(bad.parse::<TimedEvent>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn reference_scenario_file_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenario.toml");
        let file = ScenarioFile::load(&path).unwrap();
        let devices = file.devices().unwrap();
        let monitors = devices
            .iter()
            .filter(|d| matches!(d.kind, DeviceKind::Vitals { .. }))
            .count();
        assert_eq!(monitors, 12);
        assert!(devices
            .iter()
            .any(|d| matches!(d.kind, DeviceKind::Home { .. })));
        assert!(!file.events.is_empty());
        let children = devices.iter().find_map(|d| match &d.kind {
            DeviceKind::Gateway { children } => Some(children.len()),
            _ => None,
        });
        assert!(children.is_some_and(|n| n >= 2), "{children:?}");

        let bed = |id: &str| devices.iter().find(|d| d.id == id).map(|d| d.kind.clone());
        assert!(matches!(
            bed("bed-07"),
            Some(DeviceKind::Vitals {
                scenario: Scenario::SuddenEvent { .. }
            })
        ));
        assert!(matches!(
            bed("bed-01"),
            Some(DeviceKind::Vitals {
                scenario: Scenario::Stable
            })
        ));
    }

    #[test]
    fn a_gateway_lists_its_children_by_friendly_name() {
        let text = "[zigbee_gateway]\nid = \"gw\"\nchildren = { kitchen = \"climate\", \
                    door = \"contact\" }\n";
        let devices = ScenarioFile::parse(text).and_then(|f| f.devices()).unwrap();
        let want = DeviceKind::Gateway {
            children: vec![
                ("door".to_string(), HomeKind::Contact),
                ("kitchen".to_string(), HomeKind::Climate),
            ],
        };
        assert_eq!(
            devices,
            [DeviceSpec {
                id: "gw".into(),
                kind: want
            }]
        );
        let bad = "[zigbee_gateway]\nid = \"gw\"\nchildren = { kitchen = \"toaster\" }\n";
        assert!(ScenarioFile::parse(bad).is_err());
    }

    #[test]
    fn unknown_keys_are_refused() {
        let err = ScenarioFile::parse("intervall = \"1s\"\n").unwrap_err();
        assert!(err.to_string().contains("intervall"), "{err}");
        let err = ScenarioFile::parse("[vital_monitors]\ncount = 1\ncolour = 2\n").unwrap_err();
        assert!(err.to_string().contains("colour"), "{err}");
    }

    #[test]
    fn events_and_scenarios_must_name_a_monitor_of_the_fleet() {
        let file = ScenarioFile::parse(
            "events = [\"at 1m bed-09 SuddenEvent\"]\n[vital_monitors]\ncount = 3\n",
        )
        .unwrap();
        assert!(matches!(file.devices(), Err(ScenarioError::Invalid(m)) if m.contains("bed-09")));

        let file = ScenarioFile::parse(
            "[vital_monitors]\ncount = 3\nscenarios = { bed-04 = \"Stable\" }\n",
        )
        .unwrap();
        assert!(file.devices().is_err());
    }

    #[test]
    fn bad_values_are_refused_with_their_reason() {
        let cases = [
            ("interval = \"1ms\"\n", "interval"),
            ("buffer = 0\n", "buffer"),
            (
                "[vital_monitors]\ncount = 1\nmotion_per_hour = -1.0\n",
                "rates",
            ),
        ];
        for (text, word) in cases {
            let err = ScenarioFile::parse(text)
                .and_then(|f| f.devices())
                .unwrap_err();
            assert!(err.to_string().contains(word), "{text:?}: {err}");
        }
        assert!(ScenarioFile::parse("interval = \"soon\"\n").is_err());
        assert!(ScenarioFile::parse("events = [\"tomorrow\"]\n").is_err());
    }
}
