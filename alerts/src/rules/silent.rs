//! Silent-device rules: no reading from a device for longer than `after`, or the device
//! reported itself offline (its will message). Silence is measured on the engine's `now`,
//! not on device clocks, so a device with a wrong clock is judged by when it was heard.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use telemon_model::Priority;

use super::{Finding, Verdict};
use crate::duration;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Silent {
    #[serde(with = "crate::duration")]
    pub after: Duration,
}

/// What the engine knows of a device's liveness.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Liveness {
    /// When the device was last heard from (a reading or an `online` status), or when the
    /// engine started watching it if it has not been heard from since.
    pub last_seen: DateTime<Utc>,
    /// The device's latest status said `offline`, and nothing was heard from it since.
    pub offline: bool,
}

impl Silent {
    pub fn validate(&self) -> Result<(), String> {
        if self.after.is_zero() {
            return Err("`after` must be longer than zero".into());
        }
        Ok(())
    }

    pub fn evaluate(&self, life: &Liveness, now: DateTime<Utc>, priority: Priority) -> Verdict {
        let quiet = now - life.last_seen;
        let detail = if life.offline {
            "device reported offline".to_string()
        } else if quiet > duration::delta(self.after) {
            let after = duration::format(self.after);
            format!(
                "no reading for {} (limit {after})",
                duration::format_delta(quiet)
            )
        } else {
            return Verdict::Clear;
        };
        Verdict::Breach(Finding {
            priority,
            metric: None,
            value: None,
            detail,
            hold_for: Duration::ZERO,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn at(secs: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_700_000_000 + secs, 0).unwrap()
    }

    #[test]
    fn breaches_only_after_the_silence_exceeds_after() {
        let rule = Silent {
            after: Duration::from_secs(60),
        };
        let life = Liveness {
            last_seen: at(0),
            offline: false,
        };
        assert_eq!(rule.evaluate(&life, at(60), Priority::Low), Verdict::Clear);
        let Verdict::Breach(f) = rule.evaluate(&life, at(61), Priority::Low) else {
            panic!("61s of silence must breach a 60s limit");
        };
        assert_eq!(f.detail, "no reading for 1m1s (limit 1m)");
    }

    #[test]
    fn offline_breaches_at_once() {
        let rule = Silent {
            after: Duration::from_secs(60),
        };
        let life = Liveness {
            last_seen: at(0),
            offline: true,
        };
        assert!(matches!(
            rule.evaluate(&life, at(1), Priority::Low),
            Verdict::Breach(_)
        ));
        assert!(Silent {
            after: Duration::ZERO
        }
        .validate()
        .is_err());
    }
}
