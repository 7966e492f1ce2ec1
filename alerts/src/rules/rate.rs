//! Rate-of-change rules: a metric rising or falling by more than a limit within a window,
//! measured on the readings' own times.

use std::collections::VecDeque;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use telemon_model::Priority;

use super::{finite, show, Finding, Verdict};
use crate::duration;

/// Points kept per rule and device. A 1 Hz device fills an hour's window; a faster one over
/// a longer window sees a shorter window rather than growing memory without bound.
pub const MAX_POINTS: usize = 4096;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateOfChange {
    pub metric: String,
    #[serde(with = "crate::duration")]
    pub window: Duration,
    /// Breached when the value is more than this above the lowest value in the window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_rise: Option<f64>,
    /// Breached when the value is more than this below the highest value in the window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_fall: Option<f64>,
}

/// Recent values of one metric from one device, oldest first.
#[derive(Clone, Debug, Default)]
pub struct History {
    points: VecDeque<(DateTime<Utc>, f64)>,
}

impl History {
    /// Adds a reading and forgets what fell out of the window before it.
    pub fn push(&mut self, time: DateTime<Utc>, value: f64, window: Duration) {
        let oldest = time - duration::delta(window);
        while self.points.front().is_some_and(|(t, _)| *t < oldest) {
            self.points.pop_front();
        }
        if self.points.len() >= MAX_POINTS {
            self.points.pop_front();
        }
        self.points.push_back((time, value));
    }

    fn min(&self) -> Option<f64> {
        self.points.iter().map(|(_, v)| *v).reduce(f64::min)
    }

    fn max(&self) -> Option<f64> {
        self.points.iter().map(|(_, v)| *v).reduce(f64::max)
    }
}

impl RateOfChange {
    pub fn validate(&self) -> Result<(), String> {
        if self.window.is_zero() {
            return Err("`window` must be longer than zero".into());
        }
        if self.max_rise.is_none() && self.max_fall.is_none() {
            return Err("a rate-of-change rule needs `max_rise`, `max_fall` or both".into());
        }
        finite("max_rise", self.max_rise)?;
        finite("max_fall", self.max_fall)?;
        if self.max_rise.is_some_and(|v| v <= 0.0) || self.max_fall.is_some_and(|v| v <= 0.0) {
            return Err("`max_rise` and `max_fall` are amounts and must be positive".into());
        }
        Ok(())
    }

    /// Judges the latest value, already pushed into `history`, against the rest of the window.
    pub fn evaluate(&self, history: &History, value: f64, priority: Priority) -> Verdict {
        let rise = history.min().map_or(0.0, |low| value - low);
        let fall = history.max().map_or(0.0, |high| high - value);
        let detail = match (self.max_rise, self.max_fall) {
            (Some(limit), _) if rise > limit => self.describe("rose", rise, limit),
            (_, Some(limit)) if fall > limit => self.describe("fell", fall, limit),
            _ => return Verdict::Clear,
        };
        Verdict::Breach(Finding {
            priority,
            metric: Some(self.metric.clone()),
            value: Some(value),
            detail,
            hold_for: Duration::ZERO,
        })
    }

    fn describe(&self, moved: &str, by: f64, limit: f64) -> String {
        let window = duration::format(self.window);
        format!(
            "{} {moved} by {} within {window} (limit {})",
            self.metric,
            show(by),
            show(limit)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn at(secs: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_700_000_000 + secs, 0).unwrap()
    }

    fn rule() -> RateOfChange {
        RateOfChange {
            metric: "heart_rate".into(),
            window: Duration::from_secs(60),
            max_rise: Some(20.0),
            max_fall: Some(30.0),
        }
    }

    fn judge(history: &mut History, secs: i64, value: f64) -> Verdict {
        history.push(at(secs), value, rule().window);
        rule().evaluate(history, value, Priority::Medium)
    }

    #[test]
    fn rise_within_the_window_breaches_and_outside_does_not() {
        let mut h = History::default();
        assert_eq!(judge(&mut h, 0, 70.0), Verdict::Clear);
        assert_eq!(judge(&mut h, 30, 90.0), Verdict::Clear);
        let Verdict::Breach(f) = judge(&mut h, 50, 91.0) else {
            panic!("a rise of 21 within 60s must breach");
        };
        assert_eq!(f.detail, "heart_rate rose by 21 within 1m (limit 20)");

        let mut slow = History::default();
        judge(&mut slow, 0, 70.0);
        assert_eq!(judge(&mut slow, 61, 95.0), Verdict::Clear);
    }

    #[test]
    fn fall_beyond_the_limit_breaches() {
        let mut h = History::default();
        judge(&mut h, 0, 100.0);
        assert_eq!(judge(&mut h, 10, 70.0), Verdict::Clear);
        assert!(matches!(judge(&mut h, 20, 69.0), Verdict::Breach(_)));
    }

    #[test]
    fn history_is_bounded() {
        let mut h = History::default();
        for i in 0..(MAX_POINTS as i64 + 10) {
            h.push(
                at(0) + chrono::TimeDelta::milliseconds(i),
                1.0,
                Duration::from_secs(3600),
            );
        }
        assert_eq!(h.points.len(), MAX_POINTS);
    }

    #[test]
    fn validation_needs_a_window_and_a_positive_limit() {
        assert_eq!(rule().validate(), Ok(()));
        assert!(RateOfChange {
            window: Duration::ZERO,
            ..rule()
        }
        .validate()
        .is_err());
        assert!(RateOfChange {
            max_rise: None,
            max_fall: None,
            ..rule()
        }
        .validate()
        .is_err());
        assert!(RateOfChange {
            max_rise: Some(-1.0),
            ..rule()
        }
        .validate()
        .is_err());
    }
}
