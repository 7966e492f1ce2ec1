//! The rule kinds. Each file owns one kind: its configuration (as written in the rule file),
//! how it is validated, and how it turns what the engine knows into a [`Verdict`]. The
//! lifecycle (pending, firing, acknowledgement, escalation) is the same for every kind and
//! lives in `crate::lifecycle`.

use std::time::Duration;

use telemon_model::Priority;

pub mod news2;
pub mod rate;
pub mod silent;
pub mod threshold;

pub use news2::News2;
pub use rate::RateOfChange;
pub use silent::Silent;
pub use threshold::Threshold;

/// What one evaluation of a rule says about one subject.
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    /// The condition holds.
    Breach(Finding),
    /// The condition is over: an active alert resolves, a pending one is cancelled.
    Clear,
    /// Nothing to decide: inside a hysteresis band, or not enough data to say.
    Hold,
}

/// The details of a breach, carried into the alert.
#[derive(Clone, Debug, PartialEq)]
pub struct Finding {
    pub priority: Priority,
    pub metric: Option<String>,
    pub value: Option<f64>,
    /// What is wrong, for the alert message: "heart_rate 131 above 120".
    pub detail: String,
    /// How long the breach must last before the alert fires (the rule's `for`).
    pub hold_for: Duration,
}

/// A number for a message: integers without a fraction, others with at most two decimals.
pub(crate) fn show(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{v:.0}")
    } else {
        let text = format!("{v:.2}");
        text.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

/// Checks that every configured level is a finite number.
pub(crate) fn finite(name: &str, level: Option<f64>) -> Result<(), String> {
    match level {
        Some(v) if !v.is_finite() => Err(format!("{name} must be a finite number")),
        _ => Ok(()),
    }
}
