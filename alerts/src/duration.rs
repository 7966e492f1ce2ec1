//! Durations in rule files and directories: a string with units (`"250ms"`, `"30s"`, `"5m"`,
//! `"1h30m"`, `"1d"`) or a bare integer number of seconds (`30`). They serialize back as
//! strings with units.

use std::fmt;
use std::time::Duration;

use chrono::TimeDelta;
use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Longest duration accepted. No clinical `for`, window or escalation is longer than a day;
/// a year leaves room for odd uses while keeping every date computation far from overflow.
pub const MAX_DURATION: Duration = Duration::from_secs(366 * 24 * 3600);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DurationError {
    #[error(
        "invalid duration {0:?}: use a number with a unit (250ms, 30s, 5m, 2h, 1d) or seconds"
    )]
    Syntax(String),
    #[error("duration {0:?} is longer than a year")]
    TooLong(String),
}

/// Parses `"30s"`, `"5m"`, `"1h 30m"`, `"250ms"` or a bare number of seconds.
pub fn parse(text: &str) -> Result<Duration, DurationError> {
    let text = text.trim();
    let syntax = || DurationError::Syntax(text.to_string());
    let too_long = || DurationError::TooLong(text.to_string());
    if text.is_empty() {
        return Err(syntax());
    }
    if let Ok(secs) = text.parse::<u64>() {
        return bounded(Duration::from_secs(secs)).ok_or_else(too_long);
    }

    let mut total_ms: u64 = 0;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        let amount: u64 = rest[..digits].parse().map_err(|_| syntax())?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit_ms = unit_millis(rest[..unit_len].trim()).ok_or_else(syntax)?;
        rest = rest[unit_len..].trim_start();
        let part = amount.checked_mul(unit_ms).ok_or_else(too_long)?;
        total_ms = total_ms.checked_add(part).ok_or_else(too_long)?;
    }
    bounded(Duration::from_millis(total_ms)).ok_or_else(too_long)
}

fn unit_millis(unit: &str) -> Option<u64> {
    match unit {
        "ms" => Some(1),
        "s" => Some(1_000),
        "m" => Some(60_000),
        "h" => Some(3_600_000),
        "d" => Some(86_400_000),
        _ => None,
    }
}

fn bounded(d: Duration) -> Option<Duration> {
    (d <= MAX_DURATION).then_some(d)
}

/// The shortest text `parse` reads back as the same duration (to the millisecond).
pub fn format(d: Duration) -> String {
    let mut ms = d.as_millis();
    if ms == 0 {
        return "0s".to_string();
    }
    let mut out = String::new();
    for (unit, size) in [
        ("d", 86_400_000),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1_000),
    ] {
        if ms >= size {
            out.push_str(&format!("{}{unit}", ms / size));
            ms %= size;
        }
    }
    if ms > 0 {
        out.push_str(&format!("{ms}ms"));
    }
    out
}

/// A rule duration as a chrono delta, for arithmetic on `DateTime<Utc>`. Durations are bounded
/// by [`MAX_DURATION`] when parsed; a larger one built in code saturates rather than panics.
pub fn delta(d: Duration) -> TimeDelta {
    TimeDelta::from_std(d.min(MAX_DURATION)).unwrap_or(TimeDelta::MAX)
}

/// A chrono delta as text for messages, never negative.
pub fn format_delta(d: TimeDelta) -> String {
    format(d.to_std().unwrap_or(Duration::ZERO))
}

/// `#[serde(with = "crate::duration")]` for a `Duration` field.
pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format(*d))
}

/// `#[serde(with = "crate::duration")]` for a `Duration` field.
pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    d.deserialize_any(DurationVisitor)
}

struct DurationVisitor;

impl Visitor<'_> for DurationVisitor {
    type Value = Duration;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a duration such as \"30s\" or \"5m\", or a whole number of seconds")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Duration, E> {
        parse(v).map_err(E::custom)
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Duration, E> {
        bounded(Duration::from_secs(v))
            .ok_or_else(|| E::custom(DurationError::TooLong(v.to_string())))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Duration, E> {
        let secs = u64::try_from(v).map_err(|_| E::custom("a duration cannot be negative"))?;
        self.visit_u64(secs)
    }
}

/// The newtype that lets `Option<Duration>` reuse the same text form.
#[derive(Clone, Copy)]
struct Text(Duration);

impl Serialize for Text {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        serialize(&self.0, s)
    }
}

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        deserialize(d).map(Text)
    }
}

/// `#[serde(default, with = "crate::duration::option")]` for an `Option<Duration>` field.
pub mod option {
    use super::*;

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        d.map(Text).serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        Ok(Option::<Text>::deserialize(d)?.map(|t| t.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units_and_bare_seconds() {
        assert_eq!(parse("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse("1h 30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse("2d"), Ok(Duration::from_secs(172_800)));
        assert_eq!(parse("45"), Ok(Duration::from_secs(45)));
    }

    #[test]
    fn refuses_bad_text_and_huge_values() {
        for bad in ["", "s", "5x", "-5s", "1.5s", "m5"] {
            assert!(
                matches!(parse(bad), Err(DurationError::Syntax(_))),
                "{bad:?} accepted"
            );
        }
        assert!(matches!(parse("400d"), Err(DurationError::TooLong(_))));
        assert!(matches!(
            parse("999999999999d"),
            Err(DurationError::TooLong(_))
        ));
    }

    #[test]
    fn formats_what_it_parses() {
        for text in ["0s", "250ms", "30s", "5m", "1h30m", "1d2h3m4s5ms"] {
            assert_eq!(format(parse(text).unwrap()), text);
        }
    }

    #[test]
    fn deserializes_strings_and_integers() {
        #[derive(Deserialize)]
        struct T {
            #[serde(with = "crate::duration")]
            a: Duration,
            #[serde(default, with = "crate::duration::option")]
            b: Option<Duration>,
            #[serde(default, with = "crate::duration::option")]
            c: Option<Duration>,
        }
        let t: T = toml::from_str("a = 90\nb = \"2m\"").unwrap();
        assert_eq!(
            (t.a, t.b, t.c),
            (
                Duration::from_secs(90),
                Some(Duration::from_secs(120)),
                None
            )
        );
        assert!(toml::from_str::<T>("a = -1").is_err());
        assert!(toml::from_str::<T>("a = \"soon\"").is_err());
    }
}
