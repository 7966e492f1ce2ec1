//! The life of an alert, the same for every rule kind: pending while a breach has not yet
//! lasted the rule's `for`, firing, acknowledged, resolved; escalation of a firing alert
//! nobody acknowledges. At most one active alert exists per (rule, subject).

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use chrono::{DateTime, Utc};
use telemon_model::{AlertEvent, AlertState, Priority};
use tracing::debug;

use crate::duration;
use crate::rule::Rule;
use crate::rules::{Finding, Verdict};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AckError {
    #[error("no active alert {0:?}")]
    UnknownAlert(String),
    #[error("alert {0:?} is still pending: only a firing alert can be acknowledged")]
    NotFiring(String),
    #[error("alert {id:?} was already acknowledged by {by}")]
    AlreadyAcknowledged { id: String, by: String },
    #[error("an acknowledgement must name who acknowledged")]
    MissingUser,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct AlertKey {
    rule: String,
    subject: String,
}

impl AlertKey {
    fn new(rule: &str, subject: &str) -> Self {
        AlertKey {
            rule: rule.to_string(),
            subject: subject.to_string(),
        }
    }
}

/// One active alert and what its next transitions depend on.
#[derive(Clone, Debug)]
struct Tracked {
    event: AlertEvent,
    /// The priority the condition asks for, before escalation.
    base: Priority,
    /// Escalation steps taken since the alert last (re)started firing.
    escalations: u8,
    /// How long the breach must last before a pending alert fires.
    hold_for: Duration,
    /// Since when the alert has been firing unacknowledged at its current priority.
    escalation_clock: DateTime<Utc>,
}

impl Tracked {
    fn on_breach(&mut self, f: Finding, title: &str, now: DateTime<Utc>) -> Option<AlertEvent> {
        match self.event.state {
            AlertState::Pending => {
                // Keep the newest value, so the alert fires with what is true now.
                self.hold_for = f.hold_for;
                self.take_finding(f, title);
                self.base = self.event.priority;
                self.held_long_enough(now).then(|| self.fire(now))
            }
            AlertState::Firing | AlertState::Acknowledged if f.priority != self.base => {
                Some(self.reprioritise(f, title, now))
            }
            _ => None,
        }
    }

    fn take_finding(&mut self, f: Finding, title: &str) {
        self.event.priority = f.priority;
        self.event.metric = f.metric;
        self.event.value = f.value;
        self.event.message = format!("{title}: {}", f.detail);
    }

    fn held_long_enough(&self, now: DateTime<Utc>) -> bool {
        now - self.event.started_at >= duration::delta(self.hold_for)
    }

    fn fire(&mut self, now: DateTime<Utc>) -> AlertEvent {
        self.event.state = AlertState::Firing;
        self.event.updated_at = now;
        self.escalation_clock = now;
        self.event.clone()
    }

    /// The condition itself changed severity (a NEWS2 score crossing into emergency). A
    /// worse condition on an acknowledged alert needs fresh attention, so it fires again.
    fn reprioritise(&mut self, f: Finding, title: &str, now: DateTime<Utc>) -> AlertEvent {
        let worse = f.priority > self.base;
        self.base = f.priority;
        self.take_finding(f, title);
        if worse && self.event.state == AlertState::Acknowledged {
            self.event.state = AlertState::Firing;
            self.event.acknowledged_by = None;
            self.event.acknowledged_at = None;
            self.escalations = 0;
            self.escalation_clock = now;
        }
        self.event.priority = raise(self.base, self.escalations);
        self.event.updated_at = now;
        self.event.clone()
    }

    fn on_tick(
        &mut self,
        escalate_after: Option<Duration>,
        now: DateTime<Utc>,
    ) -> Option<AlertEvent> {
        match self.event.state {
            AlertState::Pending if self.held_long_enough(now) => Some(self.fire(now)),
            AlertState::Firing => self.escalate(escalate_after?, now),
            _ => None,
        }
    }

    fn escalate(&mut self, after: Duration, now: DateTime<Utc>) -> Option<AlertEvent> {
        if self.event.priority == Priority::High
            || now - self.escalation_clock < duration::delta(after)
        {
            return None;
        }
        self.escalations = self.escalations.saturating_add(1);
        self.event.priority = raise(self.base, self.escalations);
        self.event.updated_at = now;
        self.escalation_clock = now;
        Some(self.event.clone())
    }
}

/// `steps` levels above `base`, at most high.
fn raise(base: Priority, steps: u8) -> Priority {
    (0..steps).fold(base, |p, _| match p {
        Priority::Low => Priority::Medium,
        Priority::Medium | Priority::High => Priority::High,
    })
}

/// Every active alert, keyed by (rule, subject).
#[derive(Debug, Default)]
pub(crate) struct Alerts {
    active: BTreeMap<AlertKey, Tracked>,
    /// The millisecond stamp in the newest id per key: an alert that starts again within
    /// the same millisecond as its predecessor still gets an id of its own.
    last_stamp: HashMap<AlertKey, i64>,
}

impl Alerts {
    pub fn is_active(&self, rule: &str, subject: &str) -> bool {
        self.active.contains_key(&AlertKey::new(rule, subject))
    }

    pub fn events(&self) -> impl Iterator<Item = &AlertEvent> {
        self.active.values().map(|t| &t.event)
    }

    /// Moves the (rule, subject) alert along according to the verdict; the transition, if
    /// any, is returned.
    pub fn apply(
        &mut self,
        rule: &Rule,
        subject: &str,
        verdict: Verdict,
        now: DateTime<Utc>,
    ) -> Option<AlertEvent> {
        let key = AlertKey::new(&rule.id, subject);
        let event = match verdict {
            Verdict::Hold => None,
            Verdict::Clear => self.resolve(&key, now),
            Verdict::Breach(f) => match self.active.get_mut(&key) {
                Some(tracked) => tracked.on_breach(f, rule.title(), now),
                None => Some(self.start(key, rule.title(), f, now)),
            },
        };
        if let Some(e) = &event {
            debug!(rule = %e.rule, subject = %e.subject, alert = %e.id,
                   state = e.state.as_str(), priority = e.priority.as_str(), "alert transition");
        }
        event
    }

    fn start(&mut self, key: AlertKey, title: &str, f: Finding, now: DateTime<Utc>) -> AlertEvent {
        let id = self.next_id(&key, now);
        let state = if f.hold_for.is_zero() {
            AlertState::Firing
        } else {
            AlertState::Pending
        };
        let event = AlertEvent {
            id,
            rule: key.rule.clone(),
            subject: key.subject.clone(),
            priority: f.priority,
            state,
            metric: f.metric,
            value: f.value,
            message: format!("{title}: {}", f.detail),
            started_at: now,
            updated_at: now,
            acknowledged_by: None,
            acknowledged_at: None,
        };
        let tracked = Tracked {
            event: event.clone(),
            base: f.priority,
            escalations: 0,
            hold_for: f.hold_for,
            escalation_clock: now,
        };
        self.active.insert(key, tracked);
        event
    }

    /// `{rule}:{subject}:{started_at in epoch milliseconds}`: readable, stable for the life of
    /// the alert, and unique because one key never has two alerts starting in one millisecond.
    fn next_id(&mut self, key: &AlertKey, now: DateTime<Utc>) -> String {
        let mut stamp = now.timestamp_millis();
        if let Some(last) = self.last_stamp.get(key) {
            stamp = stamp.max(last.saturating_add(1));
        }
        self.last_stamp.insert(key.clone(), stamp);
        format!("{}:{}:{stamp}", key.rule, key.subject)
    }

    fn resolve(&mut self, key: &AlertKey, now: DateTime<Utc>) -> Option<AlertEvent> {
        let mut event = self.active.remove(key)?.event;
        event.state = AlertState::Resolved;
        event.updated_at = now;
        Some(event)
    }

    /// Resolves every active alert the predicate picks (its rule was removed or disabled).
    pub fn resolve_where(
        &mut self,
        pick: impl Fn(&AlertEvent) -> bool,
        now: DateTime<Utc>,
    ) -> Vec<AlertEvent> {
        let keys: Vec<AlertKey> = self
            .active
            .iter()
            .filter(|(_, t)| pick(&t.event))
            .map(|(k, _)| k.clone())
            .collect();
        keys.iter().filter_map(|k| self.resolve(k, now)).collect()
    }

    /// Fires pending alerts whose `for` has passed and escalates unacknowledged ones.
    pub fn tick(&mut self, rules: &[Rule], now: DateTime<Utc>) -> Vec<AlertEvent> {
        let escalation: HashMap<&str, Option<Duration>> = rules
            .iter()
            .map(|r| (r.id.as_str(), r.escalate_after))
            .collect();
        self.active
            .values_mut()
            .filter_map(|t| {
                let after = escalation.get(t.event.rule.as_str()).copied().flatten();
                t.on_tick(after, now)
            })
            .collect()
    }

    pub fn acknowledge(
        &mut self,
        id: &str,
        by: &str,
        now: DateTime<Utc>,
    ) -> Result<AlertEvent, AckError> {
        if by.trim().is_empty() {
            return Err(AckError::MissingUser);
        }
        let tracked = self
            .active
            .values_mut()
            .find(|t| t.event.id == id)
            .ok_or_else(|| AckError::UnknownAlert(id.to_string()))?;
        let event = &mut tracked.event;
        match event.state {
            AlertState::Pending => return Err(AckError::NotFiring(id.to_string())),
            AlertState::Acknowledged => {
                return Err(AckError::AlreadyAcknowledged {
                    id: id.to_string(),
                    by: event.acknowledged_by.clone().unwrap_or_default(),
                })
            }
            AlertState::Firing | AlertState::Resolved => {}
        }
        event.state = AlertState::Acknowledged;
        event.acknowledged_by = Some(by.to_string());
        event.acknowledged_at = Some(now);
        event.updated_at = now;
        debug!(alert = %id, by, "alert acknowledged");
        Ok(event.clone())
    }

    /// Takes back an alert that was active before a restart, as it was: no transition is
    /// emitted, so it does not fire twice. Its escalation clock keeps running from its last
    /// update. Returns false when the (rule, subject) already has an alert.
    pub fn restore(&mut self, event: AlertEvent, hold_for: Duration) -> bool {
        let key = AlertKey::new(&event.rule, &event.subject);
        if self.active.contains_key(&key) {
            return false;
        }
        let stamp = event.started_at.timestamp_millis();
        let last = self.last_stamp.entry(key.clone()).or_insert(stamp);
        *last = (*last).max(stamp);
        let tracked = Tracked {
            base: event.priority,
            escalations: 0,
            hold_for,
            escalation_clock: event.updated_at,
            event,
        };
        self.active.insert(key, tracked);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raise_climbs_one_level_per_step_and_stops_at_high() {
        assert_eq!(raise(Priority::Low, 0), Priority::Low);
        assert_eq!(raise(Priority::Low, 1), Priority::Medium);
        assert_eq!(raise(Priority::Low, 2), Priority::High);
        assert_eq!(raise(Priority::Medium, 5), Priority::High);
    }
}
