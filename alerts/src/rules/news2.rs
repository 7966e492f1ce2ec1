//! NEWS2 rules: score a patient's latest observations and alert on the clinical risk band,
//! urgent (aggregate 5-6 or any single parameter at 3) or emergency (aggregate 7 or more).

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use telemon_model::{Priority, Value};

use super::{Finding, Verdict};
use crate::duration;
use crate::news2::{score, ClinicalRisk, Consciousness, News2Score, Observations, Spo2Scale};

/// The metric names NEWS2 reads, as devices and the simulator publish them.
pub const METRICS: [&str; 7] = [
    "respiratory_rate",
    "spo2",
    "supplemental_oxygen",
    "systolic_bp",
    "heart_rate",
    "consciousness",
    "temperature",
];

/// The metric an alert from a NEWS2 rule carries, with the aggregate as its value.
pub const SCORE_METRIC: &str = "news2";

/// Default for `max_age`: continuous monitors report far more often, and a score built on a
/// quarter-hour-old blood pressure still describes the patient; older values do not.
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(15 * 60);

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct News2 {
    /// How old, relative to the newest of them, an observation may be and still be scored.
    #[serde(default = "default_max_age", with = "crate::duration")]
    pub max_age: Duration,
    /// Priority at aggregate 7 or more; the rule's own `priority` applies to urgent scores.
    #[serde(default = "default_emergency_priority")]
    pub emergency_priority: Priority,
    /// How long the score must stay out of the alerting bands before an alert resolves. A
    /// deteriorating patient's score crosses a band boundary back and forth as each vital
    /// sign arrives; without this, every crossing would resolve the alert and the next raise a
    /// new one, losing its acknowledgement.
    #[serde(default = "default_clear_after", with = "crate::duration")]
    pub clear_after: Duration,
}

/// Default for `clear_after`: several readings of a continuous monitor, short next to how
/// often a ward reviews a patient whose score has settled.
pub const DEFAULT_CLEAR_AFTER: Duration = Duration::from_secs(2 * 60);

fn default_clear_after() -> Duration {
    DEFAULT_CLEAR_AFTER
}

fn default_max_age() -> Duration {
    DEFAULT_MAX_AGE
}

fn default_emergency_priority() -> Priority {
    Priority::High
}

impl Default for News2 {
    fn default() -> Self {
        News2 {
            max_age: DEFAULT_MAX_AGE,
            emergency_priority: default_emergency_priority(),
            clear_after: DEFAULT_CLEAR_AFTER,
        }
    }
}

/// A subject's latest value of each NEWS2 metric, with the reading time it was taken at.
#[derive(Clone, Debug, Default)]
pub struct Vitals {
    latest: BTreeMap<&'static str, (DateTime<Utc>, Value)>,
}

impl Vitals {
    /// Keeps a reading if it is a NEWS2 metric and newer than what is held. Two devices of
    /// one patient may report the same metric; the newest reading wins.
    pub fn record(&mut self, metric: &str, time: DateTime<Utc>, value: &Value) {
        let Some(name) = METRICS.iter().find(|m| **m == metric) else {
            return;
        };
        if self.latest.get(name).is_some_and(|(held, _)| *held > time) {
            return;
        }
        self.latest.insert(name, (time, value.clone()));
    }

    /// The observations as of `at`, or `None` while any parameter is missing, older than
    /// `max_age` or not a valid value (a consciousness code of 7).
    pub fn observations(&self, at: DateTime<Utc>, max_age: Duration) -> Option<Observations> {
        let oldest = at - duration::delta(max_age);
        let number = |metric: &str| {
            let (time, value) = self.latest.get(metric)?;
            let v = value.as_f64()?;
            (*time >= oldest && v.is_finite()).then_some(v)
        };
        let consciousness = match self.latest.get("consciousness")? {
            (time, _) if *time < oldest => return None,
            (_, Value::Text(letter)) => Consciousness::from_letter(letter)?,
            (_, value) => Consciousness::from_code(value.as_f64()?)?,
        };
        Some(Observations {
            respiratory_rate: number("respiratory_rate")?,
            spo2: number("spo2")?,
            supplemental_oxygen: number("supplemental_oxygen")? != 0.0,
            systolic_bp: number("systolic_bp")?,
            heart_rate: number("heart_rate")?,
            consciousness,
            temperature: number("temperature")?,
        })
    }
}

impl News2 {
    pub fn validate(&self) -> Result<(), String> {
        if self.max_age.is_zero() {
            return Err("`max_age` must be longer than zero".into());
        }
        Ok(())
    }

    /// `urgent` is the rule's priority, used for the low-medium and medium bands.
    pub fn evaluate(
        &self,
        vitals: &Vitals,
        at: DateTime<Utc>,
        scale: Spo2Scale,
        urgent: Priority,
    ) -> Verdict {
        let Some(obs) = vitals.observations(at, self.max_age) else {
            return Verdict::Hold;
        };
        let s = score(&obs, scale);
        let priority = match s.clinical_risk {
            ClinicalRisk::Low => return Verdict::Clear,
            ClinicalRisk::LowMedium | ClinicalRisk::Medium => urgent,
            ClinicalRisk::High => self.emergency_priority,
        };
        Verdict::Breach(Finding {
            priority,
            metric: Some(SCORE_METRIC.to_string()),
            value: Some(f64::from(s.aggregate)),
            detail: describe(&s),
            hold_for: Duration::ZERO,
        })
    }
}

fn describe(s: &News2Score) -> String {
    let p = &s.sub_scores;
    format!(
        "score {} ({} risk): RR {}, SpO2 {}, O2 {}, SBP {}, pulse {}, ACVPU {}, temp {}",
        s.aggregate,
        s.clinical_risk.as_str(),
        p.respiratory_rate,
        p.spo2,
        p.supplemental_oxygen,
        p.systolic_bp,
        p.heart_rate,
        p.consciousness,
        p.temperature
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn at(secs: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_700_000_000 + secs, 0).unwrap()
    }

    fn vitals(time: DateTime<Utc>, values: [f64; 7]) -> Vitals {
        let mut v = Vitals::default();
        for (metric, value) in METRICS.iter().zip(values) {
            v.record(metric, time, &Value::Number(value));
        }
        v
    }

    const HEALTHY: [f64; 7] = [16.0, 97.0, 0.0, 120.0, 70.0, 0.0, 37.0];

    #[test]
    fn scores_only_a_complete_and_fresh_set() {
        let rule = News2::default();
        let mut v = vitals(at(0), HEALTHY);
        assert_eq!(
            rule.evaluate(&v, at(900), Spo2Scale::One, Priority::Medium),
            Verdict::Clear
        );
        assert_eq!(
            rule.evaluate(&v, at(901), Spo2Scale::One, Priority::Medium),
            Verdict::Hold
        );

        v.latest.remove("temperature");
        assert_eq!(
            rule.evaluate(&v, at(1), Spo2Scale::One, Priority::Medium),
            Verdict::Hold
        );
    }

    #[test]
    fn urgent_and_emergency_priorities() {
        let rule = News2::default();
        // New confusion alone: a single 3.
        let confused = vitals(at(0), [16.0, 97.0, 0.0, 120.0, 70.0, 1.0, 37.0]);
        let Verdict::Breach(f) = rule.evaluate(&confused, at(0), Spo2Scale::One, Priority::Low)
        else {
            panic!("a single 3 must alert");
        };
        assert_eq!((f.priority, f.value), (Priority::Low, Some(3.0)));

        let septic = vitals(at(0), [22.0, 95.0, 1.0, 105.0, 95.0, 0.0, 38.5]);
        let Verdict::Breach(f) = rule.evaluate(&septic, at(0), Spo2Scale::One, Priority::Low)
        else {
            panic!("NEWS2 8 must alert");
        };
        assert_eq!((f.priority, f.value), (Priority::High, Some(8.0)));
        assert!(f.detail.starts_with("score 8 (high risk)"), "{}", f.detail);
    }

    #[test]
    fn consciousness_accepts_letters_and_refuses_unknown_codes() {
        let mut v = vitals(at(0), HEALTHY);
        v.record("consciousness", at(1), &Value::Text("V".into()));
        let obs = v.observations(at(1), DEFAULT_MAX_AGE).unwrap();
        assert_eq!(obs.consciousness, Consciousness::Voice);
        v.record("consciousness", at(2), &Value::Number(7.0));
        assert_eq!(v.observations(at(2), DEFAULT_MAX_AGE), None);
    }

    #[test]
    fn older_reading_does_not_replace_a_newer_one() {
        let mut v = vitals(at(10), HEALTHY);
        v.record("heart_rate", at(5), &Value::Number(150.0));
        assert_eq!(
            v.observations(at(10), DEFAULT_MAX_AGE).unwrap().heart_rate,
            70.0
        );
        v.record("not_a_vital", at(11), &Value::Number(1.0));
        assert_eq!(v.latest.len(), 7);
    }
}
