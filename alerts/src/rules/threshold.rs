//! Threshold rules: a metric above or below a level, held for a duration, cleared with
//! hysteresis.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use telemon_model::Priority;

use super::{finite, show, Finding, Verdict};
use crate::directory::LimitOverride;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Threshold {
    pub metric: String,
    /// Breached when the value is strictly greater.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub above: Option<f64>,
    /// Breached when the value is strictly less.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub below: Option<f64>,
    /// An active alert on `above` clears only once the value is at or under this level
    /// (default: `above`), so a value hovering at the limit does not flap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clear_above: Option<f64>,
    /// An active alert on `below` clears only once the value is at or over this level
    /// (default: `below`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clear_below: Option<f64>,
    /// How long the breach must last before the alert fires; pending until then.
    #[serde(rename = "for", default, with = "crate::duration")]
    pub for_: Duration,
}

impl Threshold {
    pub fn validate(&self) -> Result<(), String> {
        if self.above.is_none() && self.below.is_none() {
            return Err("a threshold needs `above`, `below` or both".into());
        }
        for (name, level) in [
            ("above", self.above),
            ("below", self.below),
            ("clear_above", self.clear_above),
            ("clear_below", self.clear_below),
        ] {
            finite(name, level)?;
        }
        if let (Some(below), Some(above)) = (self.below, self.above) {
            if below >= above {
                return Err("`below` must be less than `above`".into());
            }
        }
        self.validate_clear_levels()
    }

    fn validate_clear_levels(&self) -> Result<(), String> {
        match (self.clear_above, self.above) {
            (Some(_), None) => return Err("`clear_above` needs `above`".into()),
            (Some(clear), Some(above)) if clear > above => {
                return Err("`clear_above` must not be greater than `above`".into())
            }
            _ => {}
        }
        match (self.clear_below, self.below) {
            (Some(_), None) => return Err("`clear_below` needs `below`".into()),
            (Some(clear), Some(below)) if clear < below => {
                return Err("`clear_below` must not be less than `below`".into())
            }
            _ => {}
        }
        match (self.clear_below, self.clear_above) {
            (Some(low), Some(high)) if low > high => {
                Err("`clear_below` must not be greater than `clear_above`".into())
            }
            _ => Ok(()),
        }
    }

    /// These limits with a patient's overrides applied; `None` when the patient has the rule
    /// switched off.
    pub fn with_override(&self, o: Option<&LimitOverride>) -> Option<Threshold> {
        let Some(o) = o else {
            return Some(self.clone());
        };
        if o.enabled == Some(false) {
            return None;
        }
        let limits = Threshold {
            metric: self.metric.clone(),
            above: o.above.or(self.above),
            below: o.below.or(self.below),
            clear_above: o.clear_above.or(self.clear_above),
            clear_below: o.clear_below.or(self.clear_below),
            for_: o.for_.unwrap_or(self.for_),
        };
        Some(limits.with_consistent_clear_levels())
    }

    /// An override that raises `above` past the rule's `clear_above` (or lowers `below`)
    /// keeps hysteresis meaningful by never letting a clear level sit beyond its limit.
    fn with_consistent_clear_levels(mut self) -> Threshold {
        if let (Some(clear), Some(above)) = (self.clear_above, self.above) {
            self.clear_above = Some(clear.min(above));
        }
        if let (Some(clear), Some(below)) = (self.clear_below, self.below) {
            self.clear_below = Some(clear.max(below));
        }
        self
    }

    /// `active` says whether the subject already has an alert from this rule, which is what
    /// switches the clear level from the limit to the hysteresis level.
    pub fn evaluate(&self, value: f64, priority: Priority, active: bool) -> Verdict {
        if let Some(detail) = self.breach(value) {
            return Verdict::Breach(Finding {
                priority,
                metric: Some(self.metric.clone()),
                value: Some(value),
                detail,
                hold_for: self.for_,
            });
        }
        if active && self.inside_hysteresis_band(value) {
            return Verdict::Hold;
        }
        Verdict::Clear
    }

    fn breach(&self, value: f64) -> Option<String> {
        let metric = &self.metric;
        match (self.above, self.below) {
            (Some(above), _) if value > above => {
                Some(format!("{metric} {} above {}", show(value), show(above)))
            }
            (_, Some(below)) if value < below => {
                Some(format!("{metric} {} below {}", show(value), show(below)))
            }
            _ => None,
        }
    }

    fn inside_hysteresis_band(&self, value: f64) -> bool {
        let high = self
            .above
            .is_some_and(|a| value > self.clear_above.unwrap_or(a));
        let low = self
            .below
            .is_some_and(|b| value < self.clear_below.unwrap_or(b));
        high || low
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hr() -> Threshold {
        Threshold {
            metric: "heart_rate".into(),
            above: Some(120.0),
            below: Some(40.0),
            clear_above: Some(110.0),
            clear_below: Some(45.0),
            for_: Duration::ZERO,
        }
    }

    fn is_breach(v: &Verdict) -> bool {
        matches!(v, Verdict::Breach(_))
    }

    #[test]
    fn breaches_strictly_beyond_the_limits() {
        let t = hr();
        assert!(is_breach(&t.evaluate(121.0, Priority::High, false)));
        assert_eq!(t.evaluate(120.0, Priority::High, false), Verdict::Clear);
        assert!(is_breach(&t.evaluate(39.0, Priority::High, false)));
        assert_eq!(t.evaluate(40.0, Priority::High, false), Verdict::Clear);
    }

    #[test]
    fn active_alert_holds_until_past_the_clear_level() {
        let t = hr();
        assert_eq!(t.evaluate(115.0, Priority::High, true), Verdict::Hold);
        assert_eq!(t.evaluate(110.0, Priority::High, true), Verdict::Clear);
        assert_eq!(t.evaluate(42.0, Priority::High, true), Verdict::Hold);
        assert_eq!(t.evaluate(45.0, Priority::High, true), Verdict::Clear);
    }

    #[test]
    fn finding_carries_metric_value_and_message() {
        let Verdict::Breach(f) = hr().evaluate(131.5, Priority::Medium, false) else {
            panic!("no breach");
        };
        assert_eq!(f.detail, "heart_rate 131.5 above 120");
        assert_eq!(
            (f.metric.as_deref(), f.value),
            (Some("heart_rate"), Some(131.5))
        );
        assert_eq!(f.priority, Priority::Medium);
    }

    #[test]
    fn validation_refuses_inconsistent_levels() {
        let ok = hr();
        assert_eq!(ok.validate(), Ok(()));
        let cases = [
            Threshold {
                above: None,
                below: None,
                clear_above: None,
                clear_below: None,
                ..hr()
            },
            Threshold {
                clear_above: Some(130.0),
                ..hr()
            },
            Threshold {
                clear_below: Some(30.0),
                ..hr()
            },
            Threshold {
                below: Some(130.0),
                ..hr()
            },
            Threshold {
                above: Some(f64::NAN),
                ..hr()
            },
            Threshold {
                above: None,
                clear_below: None,
                below: Some(1.0),
                ..hr()
            },
        ];
        for t in cases {
            assert!(t.validate().is_err(), "{t:?} accepted");
        }
    }

    #[test]
    fn override_replaces_only_what_it_sets_and_can_disable() {
        let o = LimitOverride {
            above: Some(140.0),
            ..Default::default()
        };
        let t = hr().with_override(Some(&o)).unwrap();
        assert_eq!(
            (t.above, t.below, t.clear_above),
            (Some(140.0), Some(40.0), Some(110.0))
        );
        let lowered = LimitOverride {
            above: Some(100.0),
            ..Default::default()
        };
        assert_eq!(
            hr().with_override(Some(&lowered)).unwrap().clear_above,
            Some(100.0)
        );
        let off = LimitOverride {
            enabled: Some(false),
            ..Default::default()
        };
        assert_eq!(hr().with_override(Some(&off)), None);
        assert_eq!(hr().with_override(None), Some(hr()));
    }
}
