//! Shelly Gen2 (Plus, Pro) notifications. `<device>/status/<component>` carries one
//! component's status object; `<device>/events/rpc` carries JSON-RPC notifications, of which
//! `NotifyStatus` and `NotifyFullStatus` hold readings (`params.ts` in epoch seconds) and
//! the rest (button events) none. Components are metric prefixes: `switch:0_apower`.
//! Shelly Gen1 publishes a bare value per topic and is read by [`super::bare`].

use serde_json::{Map, Value as Json};

use super::fields::{join, no_unit, parse_object, Ctx, Out, Strings};
use super::Decoded;
use crate::validate::Rejection;

/// Component fields that identify rather than measure.
const NOT_READINGS: [&str; 2] = ["id", "source"];

pub(crate) fn decode_gen2(ctx: &Ctx<'_>, text: &str) -> Result<Decoded, Rejection> {
    let object = parse_object(text)?;
    let mut out = Out::new(ctx);

    let Some(method) = object.get("method").and_then(Json::as_str) else {
        let prefix = ctx.metric.as_deref();
        let time = ctx.msg.received_at;
        out.object(
            prefix,
            &object,
            &NOT_READINGS,
            time,
            Strings::Text,
            &no_unit,
        );
        return Ok(out.decoded);
    };
    if !matches!(method, "NotifyStatus" | "NotifyFullStatus") {
        tracing::trace!(method, "Shelly notification without readings");
        return Ok(out.decoded);
    }

    let empty = Map::new();
    let params = object
        .get("params")
        .and_then(Json::as_object)
        .unwrap_or(&empty);
    let time = ctx.time(params.get("ts"))?;
    for (component, status) in params.iter().filter(|(k, _)| *k != "ts") {
        let prefix = join(ctx.metric.as_deref(), component);
        match status {
            Json::Object(fields) => out.object(
                Some(&prefix),
                fields,
                &NOT_READINGS,
                time,
                Strings::Text,
                &no_unit,
            ),
            _ => tracing::trace!(component, "Shelly component without a status object"),
        }
    }
    Ok(out.decoded)
}
