//! The `json` decoder and the native telemetry format: one JSON object of metric values,
//! with an optional `ts` (see [`super::time`]). Strict: strings other than state words and
//! arrays are refused, because this format's contract is numbers.

use serde_json::{Map, Value as Json};

use super::fields::{no_unit, parse_object, Ctx, Out, Strings};
use super::Decoded;
use crate::validate::Rejection;

/// The key of a record's timestamp.
pub(crate) const TIME_KEY: &str = "ts";

pub(crate) fn decode(ctx: &Ctx<'_>, text: &str) -> Result<Decoded, Rejection> {
    let object = parse_object(text)?;
    decode_object(ctx, &object, None)
}

/// Decodes an already parsed object; `device_field` is the key the device id was read
/// from, which is not a reading.
pub(crate) fn decode_object(
    ctx: &Ctx<'_>,
    object: &Map<String, Json>,
    device_field: Option<&str>,
) -> Result<Decoded, Rejection> {
    let time = ctx.time(object.get(TIME_KEY))?;

    let mut out = Out::new(ctx);
    let skip: &[&str] = match device_field {
        Some(field) => &[TIME_KEY, field],
        None => &[TIME_KEY],
    };
    out.object(
        ctx.metric.as_deref(),
        object,
        skip,
        time,
        Strings::Refuse,
        &no_unit,
    );
    Ok(out.decoded)
}
