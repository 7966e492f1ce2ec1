//! Decoder configuration: the limits every message is held to, and the topic mappings that
//! bring foreign conventions in. Read from TOML (see `ingest/mappings.toml`), validated once
//! into [`CompiledMapping`]s when the [`Decoder`](super::Decoder) is built.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use telemon_model::DeviceId;

use super::time::DeviceZone;
use super::topic::{Pattern, Template};
use crate::validate::check_metric;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("decoder config: {0}")]
    Toml(#[from] toml::de::Error),
    #[error("mapping {index} (topic {topic:?}): {problem}")]
    Mapping {
        index: usize,
        topic: String,
        problem: String,
    },
    #[error("limits: {0}")]
    Limits(String),
}

/// Bounds every message is held to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest payload decoded. 64 KiB holds a ThingsBoard batch of hundreds of readings;
    /// anything bigger from a sensor is a fault or an attack, and parsing it costs the whole
    /// ingest worker.
    pub max_payload_bytes: usize,
    /// How far past the time of receipt a reading time may be: one day covers any device
    /// whose zone is misconfigured by a few hours without letting a wrong unit through.
    pub max_future_secs: u64,
    /// How far before the time of receipt a reading time may be: a little over a year
    /// covers a device that spooled readings through a long outage, and refuses the
    /// 1970 and 2000 of devices whose clock was never set.
    pub max_past_secs: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_payload_bytes: 64 * 1024,
            max_future_secs: 24 * 3600,
            max_past_secs: 366 * 24 * 3600,
        }
    }
}

impl Limits {
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        if self.max_payload_bytes == 0 {
            return Err(ConfigError::Limits(
                "max_payload_bytes must be at least 1".into(),
            ));
        }
        if self.max_past_secs == 0 {
            return Err(ConfigError::Limits(
                "max_past_secs must be at least 1".into(),
            ));
        }
        Ok(())
    }
}

/// Which decoder reads a mapped topic's payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DecoderKind {
    /// A JSON object of properties; nested objects flattened, `last_seen` is the time.
    Zigbee2mqtt,
    /// A `tele/.../SENSOR` or `STATE` object; `Time` is device-local, units from `TempUnit`.
    Tasmota,
    /// Bare numbers and on/off per topic; JSON objects flattened.
    ShellyGen1,
    /// `status/<component>` objects and `events/rpc` NotifyStatus notifications.
    ShellyGen2,
    /// Bare state per entity topic; JSON objects (lights) flattened.
    Esphome,
    /// Home Assistant MQTT state topics: bare state or a JSON object.
    HomeassistantState,
    /// ThingsBoard telemetry: an object, `{ts, values}`, or an array of either.
    Thingsboard,
    /// SenML JSON (RFC 8428).
    Senml,
    /// A JSON object of metric values, strict as the native format.
    Json,
    /// The whole payload is one value: a number, on/off, or text.
    Bare,
    /// A birth or will message: online/offline, true/false, or `{"state": "online"}`.
    Status,
    /// A topic that carries no readings (gateway state, discovery config): accepted and
    /// dropped without a rejection.
    Ignore,
}

impl DecoderKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DecoderKind::Zigbee2mqtt => "zigbee2mqtt",
            DecoderKind::Tasmota => "tasmota",
            DecoderKind::ShellyGen1 => "shelly_gen1",
            DecoderKind::ShellyGen2 => "shelly_gen2",
            DecoderKind::Esphome => "esphome",
            DecoderKind::HomeassistantState => "homeassistant_state",
            DecoderKind::Thingsboard => "thingsboard",
            DecoderKind::Senml => "senml",
            DecoderKind::Json => "json",
            DecoderKind::Bare => "bare",
            DecoderKind::Status => "status",
            DecoderKind::Ignore => "ignore",
        }
    }
}

/// One configured topic mapping, as written in TOML under `[[mapping]]`.
///
/// The device a reading belongs to comes from exactly one of: a `{device}` capture in
/// `topic`, a fixed `device` (or `device = "{identity}"`: the publisher's certificate
/// identity, as for ThingsBoard's `v1/devices/me/...`), or `device_field` (a top-level
/// payload key, `json` decoder only). `ignore` mappings need none.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mapping {
    /// MQTT filter syntax with named captures, e.g. `shellies/{device}/sensor/{metric}`.
    pub topic: String,
    pub decoder: DecoderKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_field: Option<String>,
    /// Put before a captured or payload device id, to keep ecosystems' names apart
    /// (`z2m-front_door`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_prefix: Option<String>,
    /// For single-value payloads, the metric name; for objects, a prefix joined with `_`.
    /// May use captures: `relay_{channel}`. Defaults to `{metric}` when the topic captures
    /// `{metric}`, else to `value` for single values and no prefix for objects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metric: Option<String>,
    /// Unit of single-value readings, when the topic says nothing of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
    /// Zone of offset-less device-local times: an IANA name or `+HH:MM`. Default UTC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
    /// Metric renames applied after flattening: `{ vitals_spO2 = "spo2" }`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub rename: BTreeMap<String, String>,
    /// Payload fields that are not readings (a field and everything under it).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ignore_fields: Vec<String>,
}

/// A whole decoder configuration file.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecodeConfig {
    #[serde(default)]
    pub limits: Limits,
    /// Tried in order; the first whose topic matches decodes the message.
    #[serde(default, rename = "mapping")]
    pub mappings: Vec<Mapping>,
}

impl DecodeConfig {
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        Ok(toml::from_str(text)?)
    }
}

/// Where a mapped message's device id comes from.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum DeviceSource {
    Capture,
    Fixed(DeviceId),
    Identity,
    PayloadField(String),
    /// `ignore` mappings name no device.
    None,
}

/// A validated mapping.
#[derive(Clone, Debug)]
pub(crate) struct CompiledMapping {
    pub pattern: Pattern,
    pub decoder: DecoderKind,
    pub device: DeviceSource,
    pub device_prefix: String,
    pub metric: Option<Template>,
    pub unit: Option<String>,
    pub zone: DeviceZone,
    pub rename: BTreeMap<String, String>,
    pub ignore_fields: Vec<String>,
}

impl CompiledMapping {
    pub fn compile(index: usize, m: Mapping) -> Result<Self, ConfigError> {
        let fail = |problem: String| ConfigError::Mapping {
            index,
            topic: m.topic.clone(),
            problem,
        };

        let pattern = Pattern::parse(&m.topic).map_err(fail)?;
        let device = Self::device_source(&m, &pattern).map_err(fail)?;
        let metric = match (&m.metric, pattern.has_capture("metric")) {
            (Some(t), _) => Some(Template::parse(t, &pattern).map_err(fail)?),
            (None, true) => Some(Template::parse("{metric}", &pattern).map_err(fail)?),
            (None, false) => None,
        };
        let zone = match &m.timezone {
            Some(z) => z.parse().map_err(fail)?,
            None => DeviceZone::Utc,
        };
        for (from, to) in &m.rename {
            check_metric(to).map_err(|e| fail(format!("rename of {from:?}: {e}")))?;
        }

        Ok(CompiledMapping {
            pattern,
            decoder: m.decoder,
            device,
            device_prefix: m.device_prefix.clone().unwrap_or_default(),
            metric,
            unit: m.unit.clone(),
            zone,
            rename: m.rename.clone(),
            ignore_fields: m.ignore_fields.clone(),
        })
    }

    fn device_source(m: &Mapping, pattern: &Pattern) -> Result<DeviceSource, String> {
        let captured = pattern.has_capture("device");
        let given = [captured, m.device.is_some(), m.device_field.is_some()];
        let count = given.iter().filter(|g| **g).count();
        if m.decoder == DecoderKind::Ignore {
            return Ok(DeviceSource::None);
        }
        if count != 1 {
            return Err("give exactly one of a {device} capture, device, device_field".into());
        }

        if let Some(field) = &m.device_field {
            if m.decoder != DecoderKind::Json {
                return Err("device_field works with the json decoder only".into());
            }
            return Ok(DeviceSource::PayloadField(field.clone()));
        }
        match m.device.as_deref() {
            Some("{identity}") => Ok(DeviceSource::Identity),
            Some(fixed) => {
                if m.device_prefix.is_some() {
                    return Err("device_prefix applies to captured devices, not a fixed one".into());
                }
                DeviceId::new(fixed)
                    .map(DeviceSource::Fixed)
                    .map_err(|e| e.to_string())
            }
            None => Ok(DeviceSource::Capture),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compile(toml_text: &str) -> Result<CompiledMapping, ConfigError> {
        let config = DecodeConfig::from_toml(toml_text)?;
        let mapping = config
            .mappings
            .into_iter()
            .next()
            .expect("one mapping in the test");
        CompiledMapping::compile(0, mapping)
    }

    #[test]
    fn unknown_fields_are_refused() {
        let err = DecodeConfig::from_toml("[[mapping]]\ntopic='a/{device}'\ndecoder='bare'\nx=1");
        assert!(matches!(err, Err(ConfigError::Toml(_))));
        let err = DecodeConfig::from_toml("[limits]\nmax_payload=1");
        assert!(matches!(err, Err(ConfigError::Toml(_))));
        let err = DecodeConfig::from_toml("[[mapping]]\ntopic='a/{device}'\ndecoder='xml'");
        assert!(matches!(err, Err(ConfigError::Toml(_))));
    }

    #[test]
    fn a_mapping_names_its_device_exactly_once() {
        assert!(compile("[[mapping]]\ntopic='a/{device}'\ndecoder='bare'").is_ok());
        assert!(compile("[[mapping]]\ntopic='a/b'\ndecoder='bare'\ndevice='d1'").is_ok());
        assert!(compile("[[mapping]]\ntopic='a/b'\ndecoder='bare'").is_err());
        let both = "[[mapping]]\ntopic='a/{device}'\ndecoder='bare'\ndevice='d1'";
        assert!(compile(both).is_err());
        let bad_id = "[[mapping]]\ntopic='a/b'\ndecoder='bare'\ndevice='bed 7'";
        assert!(compile(bad_id).is_err());
        let field = "[[mapping]]\ntopic='a/b'\ndecoder='tasmota'\ndevice_field='id'";
        assert!(compile(field).is_err());
        let ignore = compile("[[mapping]]\ntopic='a/#'\ndecoder='ignore'").unwrap();
        assert_eq!(ignore.device, DeviceSource::None);
        let tb = "[[mapping]]\ntopic='v1/devices/me/telemetry'\ndecoder='thingsboard'\n\
                  device='{identity}'";
        assert_eq!(compile(tb).unwrap().device, DeviceSource::Identity);
    }

    #[test]
    fn templates_zones_and_renames_are_checked_at_start() {
        let bad_template = "[[mapping]]\ntopic='a/{device}'\ndecoder='bare'\nmetric='{x}'";
        assert!(compile(bad_template).is_err());
        let bad_zone = "[[mapping]]\ntopic='a/{device}'\ndecoder='bare'\ntimezone='Nowhere'";
        assert!(compile(bad_zone).is_err());
        let bad_rename = "[[mapping]]\ntopic='a/{device}'\ndecoder='json'\nrename={a='b c'}";
        assert!(compile(bad_rename).is_err());
    }

    #[test]
    fn limits_default_and_refuse_zero() {
        let limits = DecodeConfig::from_toml("").unwrap().limits;
        assert_eq!(limits.max_payload_bytes, 65536);
        assert!(Limits {
            max_payload_bytes: 0,
            ..Limits::default()
        }
        .validate()
        .is_err());
    }
}
