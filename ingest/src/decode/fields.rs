//! Turning decoded fields into validated readings: the context one message is decoded in,
//! the collector every decoder pushes readings and rejections into, and the flattening of
//! JSON objects that most decoders share.
//!
//! Field rules, the same for every decoder:
//! - numbers and booleans are readings as they are;
//! - the state words on/off, true/false, online/offline (any case) are booleans;
//! - a string holding a number ("71") is refused as `not_a_number`: it is never coerced,
//!   because a device that sends numbers as text may send anything as text;
//! - a "no reading" word (`unavailable`, `n/a`, see [`SENTINEL_WORDS`]) is refused as
//!   `sentinel`;
//! - other strings are text readings for ecosystem decoders ([`Strings::Text`]) and
//!   `not_a_number` for the native and `json` formats ([`Strings::Refuse`]), whose contract
//!   is numbers;
//! - `null` is the absence of a value: no reading and no rejection;
//! - nested objects are flattened with `_`: `{"bp": {"systolic": 120}}` is `bp_systolic`;
//! - arrays are refused as `unsupported_value` by the strict formats and skipped by the
//!   ecosystem decoders, whose arrays are lists of options, not readings.
//!
//! [`SENTINEL_WORDS`]: crate::validate::SENTINEL_WORDS

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde_json::{Map, Value as Json};
use telemon_model::{DeviceId, Reading, Value};

use super::time::{parse_timestamp, DeviceZone};
use super::{Decoded, Limits, Message};
use crate::validate::{
    check_metric, check_number, check_text, check_time, is_sentinel_word, RejectReason, Rejection,
};

/// What a decoder does with a string that is neither a state word nor a number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Strings {
    Text,
    Refuse,
}

/// Everything a decoder needs about the message beyond its payload.
pub(crate) struct Ctx<'a> {
    pub msg: &'a Message<'a>,
    pub limits: &'a Limits,
    pub zone: &'a DeviceZone,
    pub device: DeviceId,
    /// The rendered metric template: the name of a single value, the prefix of an object.
    pub metric: Option<String>,
    pub unit: Option<&'a str>,
    pub rename: Option<&'a BTreeMap<String, String>>,
    pub ignore_fields: &'a [String],
}

impl Ctx<'_> {
    /// The time of a record: its timestamp field read in the device zone, or the time of
    /// receipt when it has none; refused outside the window either way.
    pub fn time(&self, field: Option<&Json>) -> Result<DateTime<Utc>, Rejection> {
        let time = match field {
            None | Some(Json::Null) => return Ok(self.msg.received_at),
            Some(value) => parse_timestamp(value, self.zone)?,
        };
        check_time(time, self.msg.received_at, self.limits)?;
        Ok(time)
    }

    /// The name a single-value payload is stored under.
    pub fn single_metric(&self) -> String {
        self.metric.clone().unwrap_or_else(|| "value".into())
    }

    fn ignored(&self, name: &str) -> bool {
        self.ignore_fields.iter().any(|f| f == name)
    }
}

/// Collects one message's readings and field rejections, validating each reading.
pub(crate) struct Out<'c, 'a> {
    pub ctx: &'c Ctx<'a>,
    pub decoded: Decoded,
}

impl<'c, 'a> Out<'c, 'a> {
    pub fn new(ctx: &'c Ctx<'a>) -> Self {
        Out {
            ctx,
            decoded: Decoded::default(),
        }
    }

    pub fn reject(&mut self, rejection: Rejection) {
        tracing::trace!(device = %self.ctx.device, %rejection, "field rejected");
        self.decoded.rejected.push(rejection);
    }

    /// Validates and keeps one reading: the metric after renames, the value, and the unit
    /// given or the mapping's.
    pub fn push(&mut self, metric: &str, value: Value, time: DateTime<Utc>, unit: Option<&str>) {
        let metric = match self.ctx.rename.and_then(|r| r.get(metric)) {
            Some(renamed) => renamed.clone(),
            None => metric.to_string(),
        };

        let checked = check_metric(&metric).and_then(|()| match &value {
            Value::Number(n) => check_number(&metric, *n),
            Value::Text(t) => check_text(&metric, t),
            Value::Bool(_) => Ok(()),
        });
        if let Err(rejection) = checked {
            return self.reject(rejection);
        }

        let unit = unit.or(self.ctx.unit).map(str::to_string);
        self.decoded.readings.push(Reading {
            device_id: self.ctx.device.clone(),
            metric,
            time,
            value,
            unit,
        });
    }

    /// Pushes every field of `object` (but the `skip` keys at its top level), flattened under
    /// `prefix`, at `time`. `unit_of` gives the unit of a field from its last key.
    pub fn object(
        &mut self,
        prefix: Option<&str>,
        object: &Map<String, Json>,
        skip: &[&str],
        time: DateTime<Utc>,
        strings: Strings,
        unit_of: &dyn Fn(&str) -> Option<String>,
    ) {
        for (key, value) in object {
            if skip.contains(&key.as_str()) {
                continue;
            }
            let name = join(prefix, key);
            self.field(&name, key, value, time, strings, unit_of);
        }
    }

    fn field(
        &mut self,
        name: &str,
        key: &str,
        value: &Json,
        time: DateTime<Utc>,
        strings: Strings,
        unit_of: &dyn Fn(&str) -> Option<String>,
    ) {
        if self.ctx.ignored(name) {
            return;
        }
        match value {
            // serde_json's recursion limit (128) bounds this recursion.
            Json::Object(inner) => {
                for (k, v) in inner {
                    self.field(&join(Some(name), k), k, v, time, strings, unit_of);
                }
            }
            Json::Null => tracing::trace!(metric = name, "null field: no reading"),
            Json::Array(_) if strings == Strings::Text => {
                tracing::trace!(metric = name, "array field skipped");
            }
            Json::Array(_) => {
                let detail = format!("{name}: an array is not a reading");
                self.reject(Rejection::new(RejectReason::UnsupportedValue, detail));
            }
            scalar => match json_value(name, scalar, strings) {
                Ok(v) => self.push(name, v, time, unit_of(key).as_deref()),
                Err(rejection) => self.reject(rejection),
            },
        }
    }
}

pub(crate) fn join(prefix: Option<&str>, key: &str) -> String {
    match prefix {
        Some(p) if !p.is_empty() => format!("{p}_{key}"),
        _ => key.to_string(),
    }
}

/// The reading value of a JSON scalar, by the rules in the module doc.
pub(crate) fn json_value(metric: &str, value: &Json, strings: Strings) -> Result<Value, Rejection> {
    match value {
        Json::Bool(b) => Ok(Value::Bool(*b)),
        Json::Number(n) => Ok(Value::Number(n.as_f64().unwrap_or(f64::NAN))),
        Json::String(s) => {
            if let Some(b) = state_word(s) {
                return Ok(Value::Bool(b));
            }
            if is_sentinel_word(s) {
                return Err(Rejection::new(
                    RejectReason::Sentinel,
                    format!("{metric}: {s:?}"),
                ));
            }
            if strings == Strings::Refuse || s.trim().parse::<f64>().is_ok() {
                let shown: String = s.chars().take(32).collect();
                let detail = format!("{metric}: text {shown:?} where a number belongs");
                return Err(Rejection::new(RejectReason::NotANumber, detail));
            }
            Ok(Value::Text(s.clone()))
        }
        other => Err(Rejection::new(
            RejectReason::UnsupportedValue,
            format!("{metric}: {other}"),
        )),
    }
}

/// The value of a whole payload that is one value (Shelly, ESPHome, Home Assistant): here
/// the text is the format, so numbers are read from it.
pub(crate) fn bare_value(metric: &str, text: &str) -> Result<Value, Rejection> {
    let text = text.trim();
    if let Ok(n) = text.parse::<f64>() {
        return Ok(Value::Number(n));
    }
    if let Some(b) = state_word(text) {
        return Ok(Value::Bool(b));
    }
    if is_sentinel_word(text) {
        return Err(Rejection::new(
            RejectReason::Sentinel,
            format!("{metric}: {text:?}"),
        ));
    }
    Ok(Value::Text(text.to_string()))
}

/// on/off, true/false, online/offline in any case.
pub(crate) fn state_word(text: &str) -> Option<bool> {
    const WORDS: [(&str, bool); 6] = [
        ("on", true),
        ("off", false),
        ("true", true),
        ("false", false),
        ("online", true),
        ("offline", false),
    ];
    let text = text.trim();
    WORDS
        .iter()
        .find(|(w, _)| w.eq_ignore_ascii_case(text))
        .map(|(_, b)| *b)
}

/// Parses a JSON payload, refusing the whole message when it is not JSON.
pub(crate) fn parse_json(text: &str) -> Result<Json, Rejection> {
    serde_json::from_str(text).map_err(|e| Rejection::new(RejectReason::InvalidJson, e.to_string()))
}

/// Parses a payload that must be one JSON object.
pub(crate) fn parse_object(text: &str) -> Result<Map<String, Json>, Rejection> {
    match parse_json(text)? {
        Json::Object(map) => Ok(map),
        other => Err(Rejection::new(
            RejectReason::InvalidJson,
            format!("expected a JSON object, got {}", kind_of(&other)),
        )),
    }
}

pub(crate) fn kind_of(value: &Json) -> &'static str {
    match value {
        Json::Null => "null",
        Json::Bool(_) => "a boolean",
        Json::Number(_) => "a number",
        Json::String(_) => "a string",
        Json::Array(_) => "an array",
        Json::Object(_) => "an object",
    }
}

pub(crate) fn no_unit(_: &str) -> Option<String> {
    None
}
