//! Decoding: one MQTT message in, validated readings and field rejections out.
//!
//! Pure functions, no I/O: the pipeline hands each message to [`Decoder::decode`], stores
//! the readings, and sends every [`Rejection`] with the raw bytes to the dead-letter store.
//! `Err` refuses the whole message (not JSON, not UTF-8, oversize, unknown topic, a bad
//! device id); a bad field inside a good message is one entry of [`Decoded::rejected`] and
//! does not take its neighbours down.
//!
//! Topics come in two kinds:
//! - native, always on: `devices/{id}/telemetry` (a JSON object, see [`json`]),
//!   `devices/{id}/senml` ([`senml`]) and `devices/{id}/status` ([`bare`]);
//! - configured [`Mapping`]s for foreign conventions, tried in order, the first match
//!   deciding; a native topic is never handed to a mapping.
//!
//! Field rules shared by every decoder are in [`fields`]; timestamp rules in [`time`].

mod bare;
mod config;
mod fields;
mod json;
mod senml;
mod shelly;
mod tasmota;
mod thingsboard;
pub mod time;
mod topic;
mod zigbee2mqtt;

use chrono::{DateTime, Utc};
use telemon_model::topic::{parse_device_topic, DeviceTopicKind};
use telemon_model::{DeviceId, Reading};

pub use self::bare::ONLINE_METRIC;
pub use self::config::{ConfigError, DecodeConfig, DecoderKind, Limits, Mapping};
pub use self::senml::metric_for_unit;
pub use self::time::DeviceZone;
pub use crate::validate::{RejectReason, Rejection};

use self::config::{CompiledMapping, DeviceSource};
use self::fields::{parse_object, Ctx};
use self::topic::Captures;

/// One MQTT message as received.
#[derive(Clone, Copy, Debug)]
pub struct Message<'a> {
    pub topic: &'a str,
    pub payload: &'a [u8],
    /// Certificate identity of the publisher, when known (`None` for messages read from an
    /// external broker).
    pub identity: Option<&'a str>,
    /// When ingest received the message: the time of readings that carry none, and the
    /// reference of the timestamp window.
    pub received_at: DateTime<Utc>,
}

/// What one message decoded to: readings to store and fields refused.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Decoded {
    pub readings: Vec<Reading>,
    pub rejected: Vec<Rejection>,
}

/// Decodes messages by topic; built once from configuration and shared by every worker.
#[derive(Clone, Debug)]
pub struct Decoder {
    mappings: Vec<CompiledMapping>,
    limits: Limits,
}

impl Default for Decoder {
    fn default() -> Self {
        Decoder::native_only()
    }
}

impl Decoder {
    /// Validates the mappings and limits: every problem a mapping can have is found here,
    /// at start-up, not on the first message it matches.
    pub fn new(mappings: Vec<Mapping>, limits: Limits) -> Result<Self, ConfigError> {
        let mappings = mappings
            .into_iter()
            .enumerate()
            .map(|(i, m)| CompiledMapping::compile(i, m))
            .collect::<Result<Vec<_>, _>>()?;
        limits.validate()?;
        Ok(Decoder { mappings, limits })
    }

    pub fn from_config(config: DecodeConfig) -> Result<Self, ConfigError> {
        Decoder::new(config.mappings, config.limits)
    }

    /// The default: native topics only, default limits.
    pub fn native_only() -> Self {
        Decoder {
            mappings: Vec::new(),
            limits: Limits::default(),
        }
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The MQTT filters that cover every topic this decoder reads: the native ones, then one
    /// per mapping (`ignore` mappings excluded), without duplicates.
    pub fn subscriptions(&self) -> Vec<String> {
        use telemon_model::topic::{SENML_FILTER, STATUS_FILTER, TELEMETRY_FILTER};

        let mut filters: Vec<String> = [TELEMETRY_FILTER, SENML_FILTER, STATUS_FILTER]
            .map(String::from)
            .to_vec();
        for m in self
            .mappings
            .iter()
            .filter(|m| m.decoder != DecoderKind::Ignore)
        {
            let filter = m.pattern.filter();
            if !filters.contains(&filter) {
                filters.push(filter);
            }
        }
        filters
    }

    pub fn decode(&self, msg: &Message<'_>) -> Result<Decoded, Rejection> {
        if let Some((device, kind)) = parse_device_topic(msg.topic) {
            return self.decode_native(msg, device, kind);
        }

        let matched = self
            .mappings
            .iter()
            .find_map(|m| Some((m, m.pattern.matches(msg.topic)?)));
        let Some((mapping, captures)) = matched else {
            let shown: String = msg.topic.chars().take(128).collect();
            return Err(Rejection::new(RejectReason::UnknownTopic, shown));
        };
        if mapping.decoder == DecoderKind::Ignore {
            tracing::trace!(topic = msg.topic, "topic carries no readings");
            return Ok(Decoded::default());
        }
        self.decode_mapped(msg, mapping, &captures)
    }

    fn decode_native(
        &self,
        msg: &Message<'_>,
        device: &str,
        kind: DeviceTopicKind,
    ) -> Result<Decoded, Rejection> {
        // Defense in depth behind the broker's ACL: a device publishes only for itself.
        if let Some(identity) = msg.identity.filter(|identity| *identity != device) {
            let detail = format!("{identity:?} published for {device:?}");
            return Err(Rejection::new(RejectReason::IdentityMismatch, detail));
        }
        let device = device_id(device)?;
        let text = crate::validate::check_payload(msg.payload, &self.limits)?;

        let ctx = Ctx {
            msg,
            limits: &self.limits,
            zone: &DeviceZone::Utc,
            device,
            metric: None,
            unit: None,
            rename: None,
            ignore_fields: &[],
        };
        match kind {
            DeviceTopicKind::Telemetry => json::decode(&ctx, text),
            DeviceTopicKind::Senml => senml::decode(&ctx, text),
            DeviceTopicKind::Status => bare::decode_status(&ctx, text),
        }
    }

    fn decode_mapped(
        &self,
        msg: &Message<'_>,
        m: &CompiledMapping,
        captures: &Captures<'_, '_>,
    ) -> Result<Decoded, Rejection> {
        let text = crate::validate::check_payload(msg.payload, &self.limits)?;

        let prefixed = |id: &str| device_id(&format!("{}{id}", m.device_prefix));
        let device = match &m.device {
            DeviceSource::Fixed(id) => id.clone(),
            DeviceSource::Capture => {
                let captured = captures.iter().find(|(n, _)| *n == "device").map(|c| c.1);
                prefixed(captured.unwrap_or_default())?
            }
            DeviceSource::Identity => {
                let identity = msg.identity.ok_or_else(|| {
                    Rejection::new(RejectReason::InvalidDeviceId, "no publisher identity")
                })?;
                prefixed(identity)?
            }
            DeviceSource::PayloadField(field) => {
                return self.decode_device_field(msg, m, captures, text, field);
            }
            DeviceSource::None => return Ok(Decoded::default()),
        };

        let ctx = self.mapped_ctx(msg, m, captures, device);
        match m.decoder {
            DecoderKind::Zigbee2mqtt => zigbee2mqtt::decode(&ctx, text),
            DecoderKind::Tasmota => tasmota::decode(&ctx, text),
            DecoderKind::ShellyGen2 => shelly::decode_gen2(&ctx, text),
            DecoderKind::ShellyGen1 | DecoderKind::Esphome | DecoderKind::HomeassistantState => {
                bare::decode_object_or_bare(&ctx, text)
            }
            DecoderKind::Thingsboard => thingsboard::decode(&ctx, text),
            DecoderKind::Senml => senml::decode(&ctx, text),
            DecoderKind::Json => json::decode(&ctx, text),
            DecoderKind::Bare => Ok(bare::decode(&ctx, text)),
            DecoderKind::Status => bare::decode_status(&ctx, text),
            DecoderKind::Ignore => Ok(Decoded::default()),
        }
    }

    /// The `json` decoder with the device id in the payload.
    fn decode_device_field(
        &self,
        msg: &Message<'_>,
        m: &CompiledMapping,
        captures: &Captures<'_, '_>,
        text: &str,
        field: &str,
    ) -> Result<Decoded, Rejection> {
        let object = parse_object(text)?;
        let id = object
            .get(field)
            .and_then(serde_json::Value::as_str)
            .ok_or_else(|| {
                Rejection::new(
                    RejectReason::InvalidDeviceId,
                    format!("no string field {field:?}"),
                )
            })?;
        let device = device_id(&format!("{}{id}", m.device_prefix))?;

        let ctx = self.mapped_ctx(msg, m, captures, device);
        json::decode_object(&ctx, &object, Some(field))
    }

    fn mapped_ctx<'a>(
        &'a self,
        msg: &'a Message<'a>,
        m: &'a CompiledMapping,
        captures: &Captures<'_, '_>,
        device: DeviceId,
    ) -> Ctx<'a> {
        Ctx {
            msg,
            limits: &self.limits,
            zone: &m.zone,
            device,
            metric: m.metric.as_ref().map(|t| t.render(captures)),
            unit: m.unit.as_deref(),
            rename: Some(&m.rename),
            ignore_fields: &m.ignore_fields,
        }
    }
}

fn device_id(id: &str) -> Result<DeviceId, Rejection> {
    DeviceId::new(id).map_err(|e| Rejection::new(RejectReason::InvalidDeviceId, e.to_string()))
}

#[cfg(test)]
mod tests;
