//! SenML JSON (RFC 8428): a pack of records with base name, time, unit, value and sum.
//!
//! - The resolved name is base name + name. The metric is that name with the device id
//!   removed when it starts with it (followed by a separator or nothing), and leading
//!   separators (`: / . _ -`) after it: `urn:dev:ow:10e2...:voltage` from device
//!   `urn:dev:ow:10e2...` is `voltage`. Other names are kept whole.
//! - A name that is only the device id names the device's one measurement; the metric is
//!   then taken from the unit (`Cel` is `temperature`, see [`metric_for_unit`]), else
//!   `value`.
//! - Time is base time + time, in seconds. Values below 2^28 are relative to the time of
//!   receipt (§4.5.3): 0 is now, -60 a minute ago.
//! - `v` (plus base value) is a number, `vs` and `vd` (base64 data, kept as sent) text,
//!   `vb` a boolean; a sum `s` (plus base sum) is a reading of `<metric>_sum`.
//! - A field whose name ends in `_` must be understood (§4.4); none is, so such a pack is
//!   refused whole, as the RFC requires. A record with more than one value is refused.
//! - The device is the topic's, whatever the names say: a device publishes only for itself.

use chrono::{DateTime, Duration, Utc};
use serde_json::{Map, Value as Json};
use telemon_model::Value;

use super::fields::{kind_of, parse_json, Ctx, Out};
use super::time::from_epoch_seconds;
use super::Decoded;
use crate::validate::{check_time, RejectReason, Rejection};

/// Times below this are relative to now (RFC 8428 §4.5.3).
const RELATIVE_LIMIT: f64 = (1u64 << 28) as f64;

const SEPARATORS: [char; 5] = [':', '/', '.', '_', '-'];

/// Base fields carried from record to record.
#[derive(Default)]
struct Base {
    name: String,
    time: f64,
    unit: Option<String>,
    value: f64,
    sum: f64,
}

pub(crate) fn decode(ctx: &Ctx<'_>, text: &str) -> Result<Decoded, Rejection> {
    let records = match parse_json(text)? {
        Json::Array(records) => records,
        other => {
            let detail = format!("a pack is an array, got {}", kind_of(&other));
            return Err(Rejection::new(RejectReason::InvalidSenml, detail));
        }
    };
    must_understand(&records)?;

    let mut out = Out::new(ctx);
    let mut base = Base::default();
    for (i, record) in records.iter().enumerate() {
        let Json::Object(record) = record else {
            let detail = format!("record {i}: expected an object, got {}", kind_of(record));
            out.reject(Rejection::new(RejectReason::InvalidSenml, detail));
            continue;
        };
        if let Err(rejection) = record_into(&mut out, &mut base, record) {
            out.reject(Rejection::new(
                rejection.reason,
                format!("record {i}: {}", rejection.detail),
            ));
        }
    }
    Ok(out.decoded)
}

fn must_understand(records: &[Json]) -> Result<(), Rejection> {
    let keys = records
        .iter()
        .filter_map(Json::as_object)
        .flat_map(|r| r.keys());
    for key in keys {
        if key.ends_with('_') {
            let detail = format!("must-understand field {key:?} is not supported");
            return Err(Rejection::new(RejectReason::InvalidSenml, detail));
        }
    }
    Ok(())
}

fn record_into(
    out: &mut Out<'_, '_>,
    base: &mut Base,
    record: &Map<String, Json>,
) -> Result<(), Rejection> {
    update_base(base, record)?;
    let has_value = ["v", "vs", "vb", "vd", "s"]
        .iter()
        .any(|k| record.contains_key(*k));
    let has_name = record.contains_key("n") || record.contains_key("t");
    if !has_value && !has_name {
        // A record of base fields only sets them for the records after it.
        return Ok(());
    }

    let name = format!("{}{}", base.name, text(record, "n")?.unwrap_or(""));
    let unit = text(record, "u")?
        .map(str::to_string)
        .or_else(|| base.unit.clone());
    let metric = metric_name(&name, out.ctx.device.as_str(), unit.as_deref());
    let time = record_time(out, base.time + number(record, "t")?.unwrap_or(0.0))?;
    if !has_value {
        return Err(Rejection::new(
            RejectReason::MissingValue,
            format!("{name:?}"),
        ));
    }

    if let Some(value) = value(record, base)? {
        out.push(&metric, value, time, unit.as_deref());
    }
    if let Some(sum) = number(record, "s")? {
        out.push(
            &format!("{metric}_sum"),
            Value::Number(base.sum + sum),
            time,
            unit.as_deref(),
        );
    }
    Ok(())
}

fn update_base(base: &mut Base, record: &Map<String, Json>) -> Result<(), Rejection> {
    if let Some(name) = text(record, "bn")? {
        base.name = name.to_string();
    }
    if let Some(time) = number(record, "bt")? {
        base.time = time;
    }
    if let Some(unit) = text(record, "bu")? {
        base.unit = Some(unit.to_string());
    }
    if let Some(value) = number(record, "bv")? {
        base.value = value;
    }
    if let Some(sum) = number(record, "bs")? {
        base.sum = sum;
    }
    Ok(())
}

/// The record's one value, or `None` when it has only a sum.
fn value(record: &Map<String, Json>, base: &Base) -> Result<Option<Value>, Rejection> {
    let given: Vec<&str> = ["v", "vs", "vb", "vd"]
        .into_iter()
        .filter(|k| record.contains_key(*k))
        .collect();
    if given.len() > 1 {
        let detail = format!("more than one value: {}", given.join(", "));
        return Err(Rejection::new(RejectReason::InvalidSenml, detail));
    }

    let value = match given.first().copied() {
        None => None,
        Some("v") => number(record, "v")?.map(|v| Value::Number(base.value + v)),
        Some("vb") => match record.get("vb") {
            Some(Json::Bool(b)) => Some(Value::Bool(*b)),
            _ => return Err(wrong_type("vb", "a boolean")),
        },
        Some(key) => text(record, key)?.map(|s| Value::Text(s.to_string())),
    };
    Ok(value)
}

fn record_time(out: &Out<'_, '_>, secs: f64) -> Result<DateTime<Utc>, Rejection> {
    let received_at = out.ctx.msg.received_at;
    let time = if secs.abs() < RELATIVE_LIMIT {
        let offset = Duration::nanoseconds((secs * 1e9).round() as i64);
        received_at.checked_add_signed(offset).ok_or_else(|| {
            Rejection::new(
                RejectReason::TimestampOutOfRange,
                format!("relative time {secs}"),
            )
        })?
    } else {
        from_epoch_seconds(secs)?
    };
    check_time(time, received_at, out.ctx.limits)?;
    Ok(time)
}

fn metric_name(name: &str, device: &str, unit: Option<&str>) -> String {
    let rest = match name.strip_prefix(device) {
        Some(rest) if rest.is_empty() || rest.starts_with(SEPARATORS) => rest,
        _ => return name.to_string(),
    };
    let rest = rest.trim_start_matches(SEPARATORS);
    if !rest.is_empty() {
        return rest.to_string();
    }
    unit.and_then(metric_for_unit)
        .unwrap_or("value")
        .to_string()
}

/// The measurement a SenML unit (RFC 8428 §12.1 registry) most likely names, for records
/// named only by their device.
pub fn metric_for_unit(unit: &str) -> Option<&'static str> {
    let metric = match unit {
        "Cel" | "K" | "[degF]" => "temperature",
        "%RH" => "humidity",
        "V" => "voltage",
        "A" => "current",
        "W" => "power",
        "J" | "Wh" | "kWh" => "energy",
        "Pa" | "hPa" => "pressure",
        "lx" => "illuminance",
        "%EL" => "battery",
        "beat/min" | "beats" => "heart_rate",
        "breath/min" => "respiratory_rate",
        _ => return None,
    };
    Some(metric)
}

fn number(record: &Map<String, Json>, key: &str) -> Result<Option<f64>, Rejection> {
    match record.get(key) {
        None => Ok(None),
        Some(Json::Number(n)) => Ok(n.as_f64()),
        Some(_) => Err(wrong_type(key, "a number")),
    }
}

fn text<'r>(record: &'r Map<String, Json>, key: &str) -> Result<Option<&'r str>, Rejection> {
    match record.get(key) {
        None => Ok(None),
        Some(Json::String(s)) => Ok(Some(s)),
        Some(_) => Err(wrong_type(key, "a string")),
    }
}

fn wrong_type(key: &str, expected: &str) -> Rejection {
    let reason = if key == "v" || key == "s" {
        RejectReason::NotANumber
    } else {
        RejectReason::InvalidSenml
    };
    Rejection::new(reason, format!("{key:?} must be {expected}"))
}
