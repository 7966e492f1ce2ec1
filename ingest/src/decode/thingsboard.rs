//! ThingsBoard device telemetry (`v1/devices/me/telemetry`): an object of values, an object
//! `{"ts": <epoch ms>, "values": {...}}`, or an array of either. A record with a bad
//! timestamp is refused alone; the other records of the batch are kept.

use serde_json::{Map, Value as Json};

use super::fields::{kind_of, no_unit, parse_json, Ctx, Out, Strings};
use super::Decoded;
use crate::validate::{RejectReason, Rejection};

pub(crate) fn decode(ctx: &Ctx<'_>, text: &str) -> Result<Decoded, Rejection> {
    let mut out = Out::new(ctx);
    match parse_json(text)? {
        Json::Object(record) => record_into(&mut out, &record),
        Json::Array(records) => {
            for (i, record) in records.iter().enumerate() {
                match record {
                    Json::Object(record) => record_into(&mut out, record),
                    other => out.reject(Rejection::new(
                        RejectReason::InvalidJson,
                        format!("record {i}: expected an object, got {}", kind_of(other)),
                    )),
                }
            }
        }
        other => {
            let detail = format!("expected an object or an array, got {}", kind_of(&other));
            return Err(Rejection::new(RejectReason::InvalidJson, detail));
        }
    }
    Ok(out.decoded)
}

fn record_into(out: &mut Out<'_, '_>, record: &Map<String, Json>) {
    let prefix = out.ctx.metric.clone();
    let (time, values) = match record.get("values") {
        Some(Json::Object(values)) => (out.ctx.time(record.get("ts")), values),
        _ => (Ok(out.ctx.msg.received_at), record),
    };
    match time {
        Ok(time) => out.object(
            prefix.as_deref(),
            values,
            &[],
            time,
            Strings::Text,
            &no_unit,
        ),
        Err(rejection) => out.reject(rejection),
    }
}
