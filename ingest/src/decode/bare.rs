//! Payloads that are one value: bare numbers and on/off text (Shelly Gen1, ESPHome, Home
//! Assistant state topics), birth and will messages, and the ecosystems that send either a
//! bare value or a JSON object on the same kind of topic.
//!
//! A bare value is stored under the mapping's metric (default `value`) at the time of
//! receipt: these payloads carry no time.

use serde_json::Value as Json;
use telemon_model::Value;

use super::fields::{bare_value, no_unit, parse_object, state_word, Ctx, Out, Strings};
use super::Decoded;
use crate::validate::{RejectReason, Rejection};

/// The metric a status message is stored under: `online`, true or false.
pub const ONLINE_METRIC: &str = "online";

pub(crate) fn decode(ctx: &Ctx<'_>, text: &str) -> Decoded {
    let metric = ctx.single_metric();
    let mut out = Out::new(ctx);
    match bare_value(&metric, text) {
        Ok(value) => out.push(&metric, value, ctx.msg.received_at, None),
        Err(rejection) => out.reject(rejection),
    }
    out.decoded
}

/// A JSON object (ESPHome lights, Shelly Gen1 info) flattened, or else a bare value.
pub(crate) fn decode_object_or_bare(ctx: &Ctx<'_>, text: &str) -> Result<Decoded, Rejection> {
    if !text.trim_start().starts_with('{') {
        return Ok(decode(ctx, text));
    }

    let object = parse_object(text)?;
    let mut out = Out::new(ctx);
    let time = ctx.msg.received_at;
    out.object(
        ctx.metric.as_deref(),
        &object,
        &[],
        time,
        Strings::Text,
        &no_unit,
    );
    Ok(out.decoded)
}

/// A birth or will message: `online`/`offline` (any case, as Tasmota's `Online`),
/// `true`/`false` (Shelly), or Zigbee2MQTT's `{"state": "online"}`.
pub(crate) fn decode_status(ctx: &Ctx<'_>, text: &str) -> Result<Decoded, Rejection> {
    let word = if text.trim_start().starts_with('{') {
        let object = parse_object(text)?;
        match object.get("state") {
            Some(Json::String(s)) => s.clone(),
            _ => String::new(),
        }
    } else {
        text.trim().to_string()
    };

    let online = state_word(&word).ok_or_else(|| {
        let shown: String = word.chars().take(32).collect();
        Rejection::new(
            RejectReason::InvalidStatus,
            format!("{shown:?}: expected online/offline"),
        )
    })?;
    let mut out = Out::new(ctx);
    out.push(
        ONLINE_METRIC,
        Value::Bool(online),
        ctx.msg.received_at,
        None,
    );
    Ok(out.decoded)
}
