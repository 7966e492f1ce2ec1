//! Reading times: RFC 3339 strings, epoch numbers in any of four units, and device-local
//! times read in the device's configured zone.
//!
//! Epoch numbers are told apart by magnitude, because devices send all four units and
//! rarely say which. With `x` the absolute value:
//!
//! | `x` below | read as | why the bound is safe |
//! |---|---|---|
//! | 1e11 | seconds | 1e11 s is the year 5138; 1e11 ms would be March 1973 |
//! | 1e14 | milliseconds | 1e14 ms is 5138; 1e14 µs would be 1973 |
//! | 1e17 | microseconds | same again |
//! | 1e20 | nanoseconds | same again |
//!
//! Every present-day time falls far from a bound in every unit, so the rule cannot confuse
//! two units for any time the window check lets through. Integers, floats and exponent forms
//! (`1.7e12`) are all numbers to JSON and read alike; a string holding a number is read as
//! that number. SenML times are always seconds (RFC 8428) and do not use this rule.

use std::str::FromStr;

use chrono::{DateTime, FixedOffset, LocalResult, NaiveDateTime, TimeZone, Utc};

use crate::validate::{RejectReason, Rejection};

/// The zone a device's offset-less local times are in.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum DeviceZone {
    Utc,
    Fixed(FixedOffset),
    Named(chrono_tz::Tz),
}

impl FromStr for DeviceZone {
    type Err = String;

    /// `UTC`, a fixed offset such as `+01:00`, or an IANA zone such as `Europe/Berlin`.
    fn from_str(s: &str) -> Result<Self, String> {
        if s.eq_ignore_ascii_case("utc") || s == "Z" {
            return Ok(DeviceZone::Utc);
        }

        if s.starts_with(['+', '-']) {
            let probe = format!("2000-01-01T00:00:00{s}");
            return DateTime::parse_from_rfc3339(&probe)
                .map(|t| DeviceZone::Fixed(*t.offset()))
                .map_err(|_| format!("invalid offset {s:?}: use +HH:MM or -HH:MM"));
        }
        s.parse::<chrono_tz::Tz>()
            .map(DeviceZone::Named)
            .map_err(|_| format!("unknown time zone {s:?}: use an IANA name or +HH:MM"))
    }
}

impl DeviceZone {
    /// The instant a device-local time names. In the repeated hour after a DST change the
    /// earlier instant is taken; a time in the skipped hour names no instant and is refused.
    fn resolve(&self, local: NaiveDateTime) -> Option<DateTime<Utc>> {
        fn first<T: TimeZone>(r: LocalResult<DateTime<T>>) -> Option<DateTime<Utc>> {
            r.earliest().map(|t| t.with_timezone(&Utc))
        }
        match self {
            DeviceZone::Utc => Some(local.and_utc()),
            DeviceZone::Fixed(offset) => first(offset.from_local_datetime(&local)),
            DeviceZone::Named(tz) => first(tz.from_local_datetime(&local)),
        }
    }
}

/// Reads a JSON timestamp: an RFC 3339 string (an offset-less one in `zone`), or an epoch
/// number (see the module doc for units).
pub fn parse_timestamp(
    value: &serde_json::Value,
    zone: &DeviceZone,
) -> Result<DateTime<Utc>, Rejection> {
    match value {
        serde_json::Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                epoch_int(i as i128)
            } else if let Some(u) = n.as_u64() {
                epoch_int(u as i128)
            } else {
                epoch_float(n.as_f64().unwrap_or(f64::NAN))
            }
        }
        serde_json::Value::String(s) => parse_text(s.trim(), zone),
        other => Err(invalid(&other.to_string())),
    }
}

fn parse_text(s: &str, zone: &DeviceZone) -> Result<DateTime<Utc>, Rejection> {
    if let Ok(i) = s.parse::<i64>() {
        return epoch_int(i as i128);
    }
    if let Ok(x) = s.parse::<f64>() {
        return epoch_float(x);
    }

    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.to_utc());
    }

    // No offset: a device-local time (Tasmota, many data loggers).
    let local = ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f"]
        .iter()
        .find_map(|f| NaiveDateTime::parse_from_str(s, f).ok())
        .ok_or_else(|| invalid(s))?;
    zone.resolve(local).ok_or_else(|| {
        Rejection::new(
            RejectReason::InvalidTimestamp,
            format!("{s:?} does not exist in {zone:?}"),
        )
    })
}

fn invalid(shown: &str) -> Rejection {
    let shown: String = shown.chars().take(64).collect();
    Rejection::new(
        RejectReason::InvalidTimestamp,
        format!("{shown:?}: expected RFC 3339 or epoch"),
    )
}

fn out_of_range(shown: impl std::fmt::Display) -> Rejection {
    Rejection::new(RejectReason::TimestampOutOfRange, format!("epoch {shown}"))
}

/// Nanoseconds per unit, by the magnitude rule; `None` past the largest bound.
fn nanos_per_unit(magnitude: f64) -> Option<i128> {
    match magnitude {
        m if m < 1e11 => Some(1_000_000_000),
        m if m < 1e14 => Some(1_000_000),
        m if m < 1e17 => Some(1_000),
        m if m < 1e20 => Some(1),
        _ => None,
    }
}

fn epoch_int(i: i128) -> Result<DateTime<Utc>, Rejection> {
    // Before 1970 is never a reading time; refusing here keeps the rule one-sided.
    if i < 0 {
        return Err(out_of_range(i));
    }
    let per = nanos_per_unit(i as f64).ok_or_else(|| out_of_range(i))?;
    from_nanos(i * per).ok_or_else(|| out_of_range(i))
}

fn epoch_float(x: f64) -> Result<DateTime<Utc>, Rejection> {
    if !x.is_finite() || x < 0.0 {
        return Err(out_of_range(x));
    }
    let per = nanos_per_unit(x).ok_or_else(|| out_of_range(x))?;
    from_nanos(float_nanos(x, per)).ok_or_else(|| out_of_range(x))
}

/// Whole and fractional parts apart: `x * per` in one product would lose the fraction to
/// f64's 53-bit mantissa (1.7e9 s is 1.7e18 ns).
fn float_nanos(x: f64, per: i128) -> i128 {
    x.trunc() as i128 * per + (x.fract() * per as f64).round() as i128
}

/// Epoch seconds, as SenML times are (RFC 8428 §4.5.3), whatever their magnitude.
pub fn from_epoch_seconds(secs: f64) -> Result<DateTime<Utc>, Rejection> {
    if !secs.is_finite() || secs.abs() > 1e12 {
        return Err(out_of_range(secs));
    }
    from_nanos(float_nanos(secs, 1_000_000_000)).ok_or_else(|| out_of_range(secs))
}

fn from_nanos(nanos: i128) -> Option<DateTime<Utc>> {
    let secs = i64::try_from(nanos.div_euclid(1_000_000_000)).ok()?;
    let sub = u32::try_from(nanos.rem_euclid(1_000_000_000)).ok()?;
    DateTime::from_timestamp(secs, sub)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const EXPECTED: &str = "2023-11-14T22:13:20Z";

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().to_utc()
    }

    fn parse(v: serde_json::Value) -> Result<DateTime<Utc>, Rejection> {
        parse_timestamp(&v, &DeviceZone::Utc)
    }

    #[test]
    fn epoch_numbers_in_every_unit_and_form() {
        let forms = [
            json!(1_700_000_000),
            json!(1_700_000_000.0),
            json!(1.7e9),
            json!(1_700_000_000_000u64),
            json!(1.7e12),
            json!(1_700_000_000_000_000u64),
            json!(1.7e15),
            json!(1_700_000_000_000_000_000u64),
            json!(1.7e18),
            json!("1700000000000"),
            json!("1.7e12"),
        ];
        for form in forms {
            assert_eq!(parse(form.clone()), Ok(utc(EXPECTED)), "{form}");
        }
    }

    #[test]
    fn fractional_epochs_keep_their_fraction() {
        assert_eq!(
            parse(json!(1_700_000_000.25)),
            Ok(utc("2023-11-14T22:13:20.25Z"))
        );
        assert_eq!(
            parse(json!(1_700_000_000_123u64)),
            Ok(utc("2023-11-14T22:13:20.123Z"))
        );
    }

    #[test]
    fn rfc3339_with_and_without_offset() {
        assert_eq!(parse(json!("2023-11-14T22:13:20Z")), Ok(utc(EXPECTED)));
        assert_eq!(parse(json!("2023-11-15T00:13:20+02:00")), Ok(utc(EXPECTED)));
        assert_eq!(parse(json!("2023-11-14T22:13:20.000z")), Ok(utc(EXPECTED)));
        assert_eq!(parse(json!("2023-11-14T22:13:20")), Ok(utc(EXPECTED)));
        assert_eq!(parse(json!("2023-11-14 22:13:20")), Ok(utc(EXPECTED)));
    }

    #[test]
    fn offset_less_times_are_read_in_the_device_zone() {
        let berlin: DeviceZone = "Europe/Berlin".parse().unwrap();
        let t = parse_timestamp(&json!("2023-11-14T23:13:20"), &berlin);
        assert_eq!(t, Ok(utc(EXPECTED)));
        let summer = parse_timestamp(&json!("2023-07-01T12:00:00"), &berlin);
        assert_eq!(summer, Ok(utc("2023-07-01T10:00:00Z")));

        let fixed: DeviceZone = "-05:00".parse().unwrap();
        let t = parse_timestamp(&json!("2023-11-14T17:13:20"), &fixed);
        assert_eq!(t, Ok(utc(EXPECTED)));

        // An explicit offset wins over the configured zone.
        let t = parse_timestamp(&json!("2023-11-14T22:13:20Z"), &berlin);
        assert_eq!(t, Ok(utc(EXPECTED)));
    }

    #[test]
    fn dst_gaps_are_refused_and_folds_take_the_earlier_instant() {
        let berlin: DeviceZone = "Europe/Berlin".parse().unwrap();
        let gap = parse_timestamp(&json!("2023-03-26T02:30:00"), &berlin);
        assert_eq!(gap.unwrap_err().reason, RejectReason::InvalidTimestamp);
        let fold = parse_timestamp(&json!("2023-10-29T02:30:00"), &berlin);
        assert_eq!(fold, Ok(utc("2023-10-29T00:30:00Z")));
    }

    #[test]
    fn unreadable_and_impossible_timestamps_are_refused() {
        for bad in [
            json!("yesterday"),
            json!(true),
            json!({"t": 1}),
            json!("2023-13-01T00:00:00"),
        ] {
            assert_eq!(
                parse(bad.clone()).unwrap_err().reason,
                RejectReason::InvalidTimestamp
            );
        }
        for bad in [json!(-1), json!(-1.5), json!(1e21), json!(2e20)] {
            let r = parse(bad.clone()).unwrap_err().reason;
            assert_eq!(r, RejectReason::TimestampOutOfRange, "{bad}");
        }
    }

    #[test]
    fn zones_parse_from_config_text() {
        assert_eq!("UTC".parse::<DeviceZone>(), Ok(DeviceZone::Utc));
        assert!(matches!(
            "+01:00".parse::<DeviceZone>(),
            Ok(DeviceZone::Fixed(_))
        ));
        assert!(matches!(
            "America/New_York".parse::<DeviceZone>(),
            Ok(DeviceZone::Named(_))
        ));
        assert!("Mars/Olympus".parse::<DeviceZone>().is_err());
        assert!("+25:00".parse::<DeviceZone>().is_err());
    }
}
