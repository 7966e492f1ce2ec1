//! Tasmota telemetry: `tele/<topic>/SENSOR` and `STATE` objects. `Time` is the device's
//! local time without an offset, read in the mapping's zone. Sensor groups are flattened
//! (`AM2301.Temperature` is `AM2301_Temperature`), and the `TempUnit`, `PressureUnit` and
//! `SpeedUnit` fields become the units of the matching readings.

use serde_json::{Map, Value as Json};

use super::fields::{parse_object, Ctx, Out, Strings};
use super::Decoded;
use crate::validate::Rejection;

const TIME_KEY: &str = "Time";
const UNIT_KEYS: [&str; 3] = ["TempUnit", "PressureUnit", "SpeedUnit"];

pub(crate) fn decode(ctx: &Ctx<'_>, text: &str) -> Result<Decoded, Rejection> {
    let object = parse_object(text)?;
    let time = ctx.time(object.get(TIME_KEY))?;

    let units = Units::from(&object);
    let unit_of = |key: &str| units.of(key);
    let skip = [TIME_KEY, UNIT_KEYS[0], UNIT_KEYS[1], UNIT_KEYS[2]];
    let mut out = Out::new(ctx);
    out.object(
        ctx.metric.as_deref(),
        &object,
        &skip,
        time,
        Strings::Text,
        &unit_of,
    );
    Ok(out.decoded)
}

struct Units {
    temperature: Option<String>,
    pressure: Option<String>,
    speed: Option<String>,
}

impl Units {
    fn from(object: &Map<String, Json>) -> Self {
        let text = |key: &str| object.get(key).and_then(Json::as_str).map(str::to_string);

        // Temperatures in the UCUM/SenML spelling every other decoder uses.
        let temperature = text("TempUnit").map(|u| match u.as_str() {
            "C" => "Cel".to_string(),
            "F" => "[degF]".to_string(),
            _ => u,
        });
        Units {
            temperature,
            pressure: text("PressureUnit"),
            speed: text("SpeedUnit"),
        }
    }

    fn of(&self, key: &str) -> Option<String> {
        if key.ends_with("Temperature") || key == "DewPoint" {
            self.temperature.clone()
        } else if key == "Pressure" || key == "SeaPressure" {
            self.pressure.clone()
        } else if key == "Speed" {
            self.speed.clone()
        } else {
            None
        }
    }
}
