//! What a reading must satisfy before it is stored, and the reasons a message or one of its
//! fields is refused.
//!
//! Everything here is pure and cheap: it runs for every field of every message. A refusal is
//! a [`Rejection`] whose [`RejectReason::as_str`] is the stable label the pipeline counts
//! rejections under and writes to the dead-letter store.

use std::fmt;

use chrono::{DateTime, Duration, Utc};

use crate::decode::Limits;

/// Longest metric name accepted: metric names are index keys and alert-rule operands.
pub const MAX_METRIC_LEN: usize = 128;

/// Longest text value accepted. Text readings are states ("charging", "single"), not
/// documents; anything longer is a payload we do not understand.
pub const MAX_TEXT_LEN: usize = 1024;

/// Why a message or one field of it was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RejectReason {
    /// The payload has no bytes (or only white space).
    Empty,
    /// The payload is larger than [`Limits::max_payload_bytes`], or a text value longer
    /// than [`MAX_TEXT_LEN`].
    Oversize,
    /// The payload or a text value contains a NUL byte, which PostgreSQL text cannot hold.
    NulByte,
    /// The payload is not UTF-8.
    InvalidUtf8,
    /// The payload is not JSON, or not the JSON shape its decoder reads (an object, an
    /// array).
    InvalidJson,
    /// A SenML pack breaks RFC 8428 (not an array, a must-understand field, two values).
    InvalidSenml,
    /// A status payload is none of online/offline/true/false.
    InvalidStatus,
    /// A value where a number belongs is not one ("71", "n/a"); never coerced.
    NotANumber,
    /// A number is NaN or infinite ("nan" from ESPHome, "inf").
    NonFinite,
    /// A device's "no reading" marker: a sentinel number or word (see [`SENTINELS`]).
    Sentinel,
    /// A number no sensor of that metric can read (see [`PLAUSIBLE`]): a glitch or a wrong
    /// unit, which would otherwise raise alerts and wreck every chart and average.
    Implausible,
    /// A value of a kind no reading can hold (an array).
    UnsupportedValue,
    /// A SenML record names a measurement but carries no value.
    MissingValue,
    /// A timestamp that is not RFC 3339 nor an epoch number.
    InvalidTimestamp,
    /// A timestamp outside the window around the time of receipt (see [`Limits`]).
    TimestampOutOfRange,
    /// A metric name that is empty, too long or has characters outside the allowed set.
    InvalidMetric,
    /// No native topic and no configured mapping covers the topic.
    UnknownTopic,
    /// The device id from the topic, payload or publisher is not a valid device id.
    InvalidDeviceId,
    /// A native topic names another device than the publisher's certificate identity.
    IdentityMismatch,
}

impl RejectReason {
    /// The stable label for metrics and the dead-letter store. Never change one: dashboards
    /// and alert rules select on them.
    pub fn as_str(&self) -> &'static str {
        match self {
            RejectReason::Empty => "empty",
            RejectReason::Oversize => "oversize",
            RejectReason::NulByte => "nul_byte",
            RejectReason::InvalidUtf8 => "invalid_utf8",
            RejectReason::InvalidJson => "invalid_json",
            RejectReason::InvalidSenml => "invalid_senml",
            RejectReason::InvalidStatus => "invalid_status",
            RejectReason::NotANumber => "not_a_number",
            RejectReason::NonFinite => "non_finite",
            RejectReason::Sentinel => "sentinel",
            RejectReason::Implausible => "implausible",
            RejectReason::UnsupportedValue => "unsupported_value",
            RejectReason::MissingValue => "missing_value",
            RejectReason::InvalidTimestamp => "invalid_timestamp",
            RejectReason::TimestampOutOfRange => "timestamp_out_of_range",
            RejectReason::InvalidMetric => "invalid_metric",
            RejectReason::UnknownTopic => "unknown_topic",
            RejectReason::InvalidDeviceId => "invalid_device_id",
            RejectReason::IdentityMismatch => "identity_mismatch",
        }
    }

    /// Every reason, for registering one counter per label up front.
    pub const ALL: [RejectReason; 19] = [
        RejectReason::Empty,
        RejectReason::Oversize,
        RejectReason::NulByte,
        RejectReason::InvalidUtf8,
        RejectReason::InvalidJson,
        RejectReason::InvalidSenml,
        RejectReason::InvalidStatus,
        RejectReason::NotANumber,
        RejectReason::NonFinite,
        RejectReason::Sentinel,
        RejectReason::Implausible,
        RejectReason::UnsupportedValue,
        RejectReason::MissingValue,
        RejectReason::InvalidTimestamp,
        RejectReason::TimestampOutOfRange,
        RejectReason::InvalidMetric,
        RejectReason::UnknownTopic,
        RejectReason::InvalidDeviceId,
        RejectReason::IdentityMismatch,
    ];
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A refused message or field: the reason, and which field and what was wrong with it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{reason}: {detail}")]
pub struct Rejection {
    pub reason: RejectReason,
    pub detail: String,
}

impl Rejection {
    pub fn new(reason: RejectReason, detail: impl Into<String>) -> Self {
        Rejection {
            reason,
            detail: detail.into(),
        }
    }
}

/// Checks the raw payload before any parsing and returns it as text.
///
/// Order matters for the label: an oversize payload is refused before it is scanned, and a
/// NUL byte is reported as such even though it is valid UTF-8.
pub fn check_payload<'a>(payload: &'a [u8], limits: &Limits) -> Result<&'a str, Rejection> {
    if payload.len() > limits.max_payload_bytes {
        let detail = format!(
            "{} bytes, limit {}",
            payload.len(),
            limits.max_payload_bytes
        );
        return Err(Rejection::new(RejectReason::Oversize, detail));
    }

    if let Some(at) = payload.iter().position(|&b| b == 0) {
        return Err(Rejection::new(
            RejectReason::NulByte,
            format!("at byte {at}"),
        ));
    }

    let text = std::str::from_utf8(payload).map_err(|e| {
        Rejection::new(
            RejectReason::InvalidUtf8,
            format!("at byte {}", e.valid_up_to()),
        )
    })?;
    if text.trim().is_empty() {
        return Err(Rejection::new(RejectReason::Empty, "no payload"));
    }
    Ok(text)
}

/// Metric names become index keys, alert-rule operands and chart labels: 1 to
/// [`MAX_METRIC_LEN`] characters of the SenML name set (RFC 8428 §4.5.1):
/// `A-Z a-z 0-9 - : . / _`.
pub fn check_metric(name: &str) -> Result<(), Rejection> {
    let valid_char =
        |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | ':' | '.' | '/' | '_');
    if name.is_empty() || name.len() > MAX_METRIC_LEN || !name.chars().all(valid_char) {
        let shown: String = name.chars().take(MAX_METRIC_LEN).collect();
        return Err(Rejection::new(
            RejectReason::InvalidMetric,
            format!("{shown:?}"),
        ));
    }
    Ok(())
}

/// Checks a number for `metric`: finite, and not a device's "no reading" marker.
pub fn check_number(metric: &str, value: f64) -> Result<(), Rejection> {
    if !value.is_finite() {
        return Err(Rejection::new(
            RejectReason::NonFinite,
            format!("{metric}: {value}"),
        ));
    }

    if let Some(sentinel) = sentinel_for(metric, value) {
        let detail = format!("{metric}: {value} ({})", sentinel.why);
        return Err(Rejection::new(RejectReason::Sentinel, detail));
    }

    let normalized = normalize(metric);
    let range = PLAUSIBLE
        .iter()
        .find(|p| p.applies_to.matches(&normalized))
        .map_or((-MAX_MAGNITUDE, MAX_MAGNITUDE), |p| (p.min, p.max));
    if !(range.0..=range.1).contains(&value) {
        let detail = format!("{metric}: {value} outside {} to {}", range.0, range.1);
        return Err(Rejection::new(RejectReason::Implausible, detail));
    }
    Ok(())
}

/// The readings a sensor of a kind can possibly produce, generously: wider than any patient
/// or room, narrower than a glitch or a value in the wrong unit.
#[derive(Clone, Copy, Debug)]
pub struct Plausible {
    pub applies_to: MetricKind,
    pub min: f64,
    pub max: f64,
}

/// Ranges refused as [`RejectReason::Implausible`], first match wins; any other metric is
/// held to ±[`MAX_MAGNITUDE`].
pub const PLAUSIBLE: &[Plausible] = &[
    // A percentage.
    Plausible {
        applies_to: MetricKind::Spo2,
        min: 0.0,
        max: 100.0,
    },
    // Beats a minute: nothing beats faster than 350 (fetal tachycardia tops out near 300).
    Plausible {
        applies_to: MetricKind::HeartRate,
        min: 0.0,
        max: 350.0,
    },
    // Body, room, freezer or oven, in degrees Celsius or Fahrenheit.
    Plausible {
        applies_to: MetricKind::Temperature,
        min: -100.0,
        max: 600.0,
    },
];

/// The magnitude beyond which no metric is believed (1e15: an energy meter in Wh would take
/// a thousand years at a gigawatt to get there; 1e308 is a float overflow, not a reading).
pub const MAX_MAGNITUDE: f64 = 1e15;

/// Checks a text value: short, and storable.
pub fn check_text(metric: &str, text: &str) -> Result<(), Rejection> {
    if text.len() > MAX_TEXT_LEN {
        let detail = format!("{metric}: text of {} bytes", text.len());
        return Err(Rejection::new(RejectReason::Oversize, detail));
    }

    if text.contains('\0') {
        return Err(Rejection::new(
            RejectReason::NulByte,
            format!("{metric}: in text"),
        ));
    }
    Ok(())
}

/// Refuses a reading time outside `[received_at - max_past, received_at + max_future]`: a
/// device with an unset clock sends 1970 or 2000, and a wrong unit sends year 50000; either
/// would land in the wrong partition and mislead every chart.
pub fn check_time(
    time: DateTime<Utc>,
    received_at: DateTime<Utc>,
    limits: &Limits,
) -> Result<(), Rejection> {
    let future = Duration::seconds(limits.max_future_secs.min(i64::MAX as u64) as i64);
    let past = Duration::seconds(limits.max_past_secs.min(i64::MAX as u64) as i64);
    let latest = received_at
        .checked_add_signed(future)
        .unwrap_or(DateTime::<Utc>::MAX_UTC);
    let earliest = received_at
        .checked_sub_signed(past)
        .unwrap_or(DateTime::<Utc>::MIN_UTC);
    if time > latest || time < earliest {
        let detail = format!(
            "{} received at {}",
            time.to_rfc3339(),
            received_at.to_rfc3339()
        );
        return Err(Rejection::new(RejectReason::TimestampOutOfRange, detail));
    }
    Ok(())
}

/// Which metrics a sentinel applies to, matched on the metric name lowercased with `_ - . :
/// /` removed, so `heart_rate`, `heartRate` and `vitals_heartRate` are all heart rates.
#[derive(Clone, Copy, Debug)]
pub enum MetricKind {
    /// Every metric.
    Any,
    /// Oxygen saturation: names containing `spo2`.
    Spo2,
    /// Pulse or heart rate: names containing `heartrate`, `pulse` or `bpm`, or equal to `hr`
    /// or `pr`.
    HeartRate,
    /// Temperature: names containing `temp`.
    Temperature,
}

impl MetricKind {
    fn matches(self, normalized: &str) -> bool {
        match self {
            MetricKind::Any => true,
            MetricKind::Spo2 => normalized.contains("spo2"),
            MetricKind::HeartRate => {
                ["heartrate", "pulse", "bpm"]
                    .iter()
                    .any(|k| normalized.contains(k))
                    || normalized == "hr"
                    || normalized == "pr"
            }
            MetricKind::Temperature => normalized.contains("temp"),
        }
    }
}

/// A number a device sends to mean "no reading", never a measurement.
#[derive(Clone, Copy, Debug)]
pub struct Sentinel {
    pub applies_to: MetricKind,
    pub value: f64,
    /// Where the marker comes from, written into the rejection detail.
    pub why: &'static str,
}

/// The "no reading" markers refused as [`RejectReason::Sentinel`].
///
/// Each is a value that is physiologically or physically impossible for the metrics it
/// applies to, or the all-ones / reset value of a firmware field. The trade-off: a genuine
/// reading of exactly one of these values (a counter passing 32767, an oven at exactly
/// 85.0 °C) is refused too; it reaches the dead-letter store, not the void.
pub const SENTINELS: &[Sentinel] = &[
    Sentinel {
        applies_to: MetricKind::Spo2,
        value: 127.0,
        why: "pulse-oximeter 7-bit SpO2 field all ones: no finger or searching",
    },
    Sentinel {
        applies_to: MetricKind::Spo2,
        value: 255.0,
        why: "pulse-oximeter SpO2 byte all ones: invalid",
    },
    Sentinel {
        applies_to: MetricKind::HeartRate,
        value: 255.0,
        why: "pulse-oximeter pulse-rate byte all ones: invalid",
    },
    Sentinel {
        applies_to: MetricKind::HeartRate,
        value: 511.0,
        why: "pulse-oximeter 9-bit pulse-rate field all ones: invalid",
    },
    Sentinel {
        applies_to: MetricKind::Temperature,
        value: -127.0,
        why: "DS18B20 DEVICE_DISCONNECTED_C",
    },
    Sentinel {
        applies_to: MetricKind::Temperature,
        value: -196.6,
        why: "DS18B20 DEVICE_DISCONNECTED_F",
    },
    Sentinel {
        applies_to: MetricKind::Temperature,
        value: 85.0,
        why: "DS18B20 power-on reset value, read before a conversion finished",
    },
    Sentinel {
        applies_to: MetricKind::Any,
        value: -999.0,
        why: "common firmware and data-logger 'no data' marker",
    },
    Sentinel {
        applies_to: MetricKind::Any,
        value: -9999.0,
        why: "common firmware and data-logger 'no data' marker",
    },
    Sentinel {
        applies_to: MetricKind::Any,
        value: 32767.0,
        why: "0x7FFF, int16 maximum used as 'invalid' by many sensor registers",
    },
    Sentinel {
        applies_to: MetricKind::Any,
        value: -32768.0,
        why: "0x8000, int16 minimum used as 'invalid' by many sensor registers",
    },
];

/// Text values that ecosystems send to mean "no reading": Home Assistant's `unavailable`
/// and `unknown`, and the usual placeholders. Compared case-insensitively.
pub const SENTINEL_WORDS: &[&str] = &["unavailable", "unknown", "n/a", "na", "none", "null", "-"];

fn sentinel_for(metric: &str, value: f64) -> Option<&'static Sentinel> {
    let candidates = SENTINELS.iter().filter(|s| s.value == value);
    let mut candidates = candidates.peekable();
    candidates.peek()?;

    let normalized = normalize(metric);
    candidates.find(|s| s.applies_to.matches(&normalized))
}

/// A metric name lowercased without `_ - . : /`, as [`MetricKind`] matches it.
fn normalize(metric: &str) -> String {
    metric
        .chars()
        .filter(|c| !matches!(c, '_' | '-' | '.' | ':' | '/'))
        .map(|c| c.to_ascii_lowercase())
        .collect()
}

/// Whether a text value is a "no reading" word (see [`SENTINEL_WORDS`]).
pub fn is_sentinel_word(text: &str) -> bool {
    let text = text.trim();
    SENTINEL_WORDS.iter().any(|w| w.eq_ignore_ascii_case(text))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits::default()
    }

    fn reason<T>(r: Result<T, Rejection>) -> &'static str {
        match r {
            Ok(_) => "accepted",
            Err(e) => e.reason.as_str(),
        }
    }

    #[test]
    fn numbers_no_sensor_can_read_are_implausible() {
        for (metric, value, want) in [
            ("spo2", 100.0, "accepted"),
            ("SpO2", 100.5, "implausible"),
            ("heart_rate", 0.0, "accepted"),
            ("pulse", 351.0, "implausible"),
            ("temperature", -40.0, "accepted"),
            ("body_temp", 1.23e29, "implausible"),
            ("energy_wh", 9.9e14, "accepted"),
            ("energy_wh", -1.7e308, "implausible"),
        ] {
            assert_eq!(
                reason(check_number(metric, value)),
                want,
                "{metric} {value}"
            );
        }
    }

    #[test]
    fn payload_checks_name_the_first_failure() {
        let big = vec![b'1'; limits().max_payload_bytes + 1];
        assert_eq!(reason(check_payload(&big, &limits())), "oversize");
        assert_eq!(reason(check_payload(b"{\"a\":1}\0", &limits())), "nul_byte");
        assert_eq!(
            reason(check_payload(b"\xff\xfe", &limits())),
            "invalid_utf8"
        );
        assert_eq!(reason(check_payload(b"", &limits())), "empty");
        assert_eq!(reason(check_payload(b" \n", &limits())), "empty");
        assert_eq!(
            check_payload("23.4 °C".as_bytes(), &limits()),
            Ok("23.4 °C")
        );
    }

    #[test]
    fn metric_names_use_the_senml_character_set() {
        for ok in [
            "heart_rate",
            "3303/0/5700",
            "switch:0_apower",
            "a.b-c",
            &"m".repeat(128),
        ] {
            assert_eq!(check_metric(ok), Ok(()), "{ok}");
        }
        for bad in ["", "heart rate", "temp°", "a\"b", &"m".repeat(129)] {
            assert_eq!(reason(check_metric(bad)), "invalid_metric", "{bad}");
        }
    }

    #[test]
    fn non_finite_numbers_are_refused() {
        for v in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            assert_eq!(reason(check_number("temperature", v)), "non_finite");
        }
    }

    #[test]
    fn sentinels_apply_only_to_their_metrics() {
        assert_eq!(reason(check_number("spo2", 127.0)), "sentinel");
        assert_eq!(reason(check_number("vitals_spO2", 127.0)), "sentinel");
        assert_eq!(reason(check_number("heartRate", 255.0)), "sentinel");
        assert_eq!(reason(check_number("heart_rate", 511.0)), "sentinel");
        assert_eq!(reason(check_number("AM2301_Temperature", 85.0)), "sentinel");
        assert_eq!(reason(check_number("ds18b20_temp", -127.0)), "sentinel");
        assert_eq!(reason(check_number("anything", -999.0)), "sentinel");
        assert_eq!(reason(check_number("register", 32767.0)), "sentinel");

        // The same numbers are ordinary readings of other metrics.
        assert_eq!(check_number("heart_rate", 127.0), Ok(()));
        assert_eq!(check_number("voltage", 255.0), Ok(()));
        assert_eq!(check_number("humidity", 85.0), Ok(()));
        assert_eq!(check_number("spo2", 98.0), Ok(()));
    }

    #[test]
    fn sentinel_words_are_case_insensitive() {
        assert!(is_sentinel_word("unavailable"));
        assert!(is_sentinel_word("N/A"));
        assert!(!is_sentinel_word("charging"));
    }

    #[test]
    fn text_values_are_bounded_and_storable() {
        assert_eq!(check_text("action", "single"), Ok(()));
        assert_eq!(reason(check_text("action", "a\0b")), "nul_byte");
        assert_eq!(
            reason(check_text("action", &"x".repeat(MAX_TEXT_LEN + 1))),
            "oversize"
        );
    }

    #[test]
    fn reading_times_must_be_near_the_time_of_receipt() {
        let now = DateTime::parse_from_rfc3339("2024-06-01T12:00:00Z")
            .unwrap()
            .to_utc();
        let day = Duration::days(1);
        assert_eq!(check_time(now, now, &limits()), Ok(()));
        assert_eq!(check_time(now + day, now, &limits()), Ok(()));
        assert_eq!(
            check_time(now - Duration::days(365), now, &limits()),
            Ok(())
        );
        let late = now + day + Duration::seconds(1);
        assert_eq!(
            reason(check_time(late, now, &limits())),
            "timestamp_out_of_range"
        );
        let epoch = DateTime::UNIX_EPOCH;
        assert_eq!(
            reason(check_time(epoch, now, &limits())),
            "timestamp_out_of_range"
        );
    }

    #[test]
    fn every_reason_has_a_distinct_label() {
        let mut labels: Vec<_> = RejectReason::ALL.iter().map(|r| r.as_str()).collect();
        labels.sort_unstable();
        labels.dedup();
        assert_eq!(labels.len(), RejectReason::ALL.len());
    }
}
