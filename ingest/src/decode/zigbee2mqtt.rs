//! Zigbee2MQTT device messages: `zigbee2mqtt/<friendly_name>` with a JSON object of
//! properties (temperature, contact, battery, linkquality, state "ON"...). Its optional
//! `last_seen` (ISO 8601 or epoch milliseconds, per Z2M's `last_seen` setting) is the
//! reading time; without it, the time of receipt.

use super::fields::{no_unit, parse_object, Ctx, Out, Strings};
use super::Decoded;
use crate::validate::Rejection;

const TIME_KEY: &str = "last_seen";

pub(crate) fn decode(ctx: &Ctx<'_>, text: &str) -> Result<Decoded, Rejection> {
    let object = parse_object(text)?;
    let time = ctx.time(object.get(TIME_KEY))?;

    let mut out = Out::new(ctx);
    out.object(
        ctx.metric.as_deref(),
        &object,
        &[TIME_KEY],
        time,
        Strings::Text,
        &no_unit,
    );
    Ok(out.decoded)
}
