//! The engine: holds the rules, the directory and every active alert, and turns readings,
//! device status and the passing of time into alert transitions. Pure and synchronous: the
//! caller owns I/O and the clock, and passes `now` in.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use chrono::{DateTime, Utc};
use telemon_model::{AlertEvent, Reading};
use tracing::trace;

use crate::directory::Directory;
use crate::lifecycle::{AckError, Alerts};
use crate::rule::{validate_rules, Rule, RuleError, RuleKind};
use crate::rules::news2::{Vitals, METRICS as NEWS2_METRICS};
use crate::rules::rate::History;
use crate::rules::silent::Liveness;
use crate::rules::{Threshold, Verdict};

pub struct Engine {
    rules: Vec<Rule>,
    directory: Directory,
    alerts: Alerts,
    /// Reading time of the newest reading per (device, metric); anything not newer is late.
    latest: HashMap<(String, String), DateTime<Utc>>,
    liveness: HashMap<String, Liveness>,
    /// Rate-of-change windows per (rule id, device).
    histories: HashMap<(String, String), History>,
    /// NEWS2 observations per subject.
    vitals: HashMap<String, Vitals>,
}

impl Engine {
    pub fn new(rules: Vec<Rule>, directory: Directory) -> Result<Self, RuleError> {
        validate_rules(&rules)?;
        Ok(Engine {
            rules,
            directory,
            alerts: Alerts::default(),
            latest: HashMap::new(),
            liveness: HashMap::new(),
            histories: HashMap::new(),
            vitals: HashMap::new(),
        })
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    pub fn directory(&self) -> &Directory {
        &self.directory
    }

    /// Every active (pending, firing or acknowledged) alert.
    pub fn active(&self) -> impl Iterator<Item = &AlertEvent> {
        self.alerts.events()
    }

    /// Evaluates one reading. Any reading counts as a sign of life for silence rules; only a
    /// reading newer than the last one of its device and metric is evaluated further.
    pub fn on_reading(&mut self, r: &Reading, now: DateTime<Utc>) -> Vec<AlertEvent> {
        let device = r.device_id.as_str();
        let mut events = self.heard_from(device, now);
        let key = (device.to_string(), r.metric.clone());
        if self.latest.get(&key).is_some_and(|seen| r.time <= *seen) {
            trace!(device, metric = %r.metric, time = %r.time, "late reading not evaluated");
            return events;
        }
        self.latest.insert(key, r.time);

        let subject = self.directory.subject_of(device).to_string();
        if NEWS2_METRICS.contains(&r.metric.as_str()) {
            let vitals = self.vitals.entry(subject.clone()).or_default();
            vitals.record(&r.metric, r.time, &r.value);
        }
        for rule in &self.rules {
            if !rule.enabled || !rule.scope.covers(device, &self.directory) {
                continue;
            }
            let verdict = match &rule.kind {
                RuleKind::Threshold(t) if t.metric == r.metric => {
                    self.threshold_verdict(rule, t, r, &subject)
                }
                RuleKind::RateOfChange(k) if k.metric == r.metric => {
                    let Some(value) = number(r) else { continue };
                    let key = (rule.id.clone(), device.to_string());
                    let history = self.histories.entry(key).or_default();
                    history.push(r.time, value, k.window);
                    k.evaluate(history, value, rule.priority)
                }
                RuleKind::News2(k) if NEWS2_METRICS.contains(&r.metric.as_str()) => {
                    let scale = self.directory.spo2_scale(&subject);
                    match self.vitals.get(&subject) {
                        Some(vitals) => k.evaluate(vitals, r.time, scale, rule.priority),
                        None => Verdict::Hold,
                    }
                }
                _ => continue,
            };
            events.extend(self.alerts.apply(rule, &subject, verdict, now));
        }
        events
    }

    fn threshold_verdict(&self, rule: &Rule, t: &Threshold, r: &Reading, subject: &str) -> Verdict {
        let Some(value) = number(r) else {
            return Verdict::Hold;
        };
        let patient = self.directory.patient_of(r.device_id.as_str());
        let own_limits = patient.and_then(|p| self.directory.override_for(p, &rule.id));
        match t.with_override(own_limits) {
            Some(limits) => {
                let active = self.alerts.is_active(&rule.id, subject);
                limits.evaluate(value, rule.priority, active)
            }
            None => Verdict::Clear,
        }
    }

    /// A device's `online`/`offline` status (its birth and will messages).
    pub fn on_status(&mut self, device: &str, online: bool, now: DateTime<Utc>) -> Vec<AlertEvent> {
        if online {
            return self.heard_from(device, now);
        }
        self.liveness
            .entry(device.to_string())
            .and_modify(|life| life.offline = true)
            .or_insert(Liveness {
                last_seen: now,
                offline: true,
            });
        self.judge_silence(device, now)
    }

    fn heard_from(&mut self, device: &str, now: DateTime<Utc>) -> Vec<AlertEvent> {
        let life = Liveness {
            last_seen: now,
            offline: false,
        };
        self.liveness.insert(device.to_string(), life);
        self.judge_silence(device, now)
    }

    /// Evaluates every silence rule covering the device. A device the engine has not heard
    /// from since it started has no liveness yet and is not judged.
    fn judge_silence(&mut self, device: &str, now: DateTime<Utc>) -> Vec<AlertEvent> {
        let Some(life) = self.liveness.get(device).copied() else {
            return Vec::new();
        };
        let mut events = Vec::new();
        for rule in &self.rules {
            let RuleKind::Silent(k) = &rule.kind else {
                continue;
            };
            if rule.enabled && rule.scope.covers(device, &self.directory) {
                let verdict = k.evaluate(&life, now, rule.priority);
                events.extend(self.alerts.apply(rule, device, verdict, now));
            }
        }
        events
    }

    /// Advances time: silence, pending alerts whose `for` has passed, escalation. Call it
    /// periodically (every second is plenty); it does nothing when nothing is due.
    pub fn tick(&mut self, now: DateTime<Utc>) -> Vec<AlertEvent> {
        let mut events = self.check_silence(now);
        events.extend(self.alerts.tick(&self.rules, now));
        events
    }

    fn check_silence(&mut self, now: DateTime<Utc>) -> Vec<AlertEvent> {
        let mut events = Vec::new();
        for device in self.watched_devices() {
            if !self.liveness.contains_key(&device) && !self.has_silence_alert(&device) {
                // Start the clock: a device the engine was told about but never heard from
                // goes silent `after` from now.
                let life = Liveness {
                    last_seen: now,
                    offline: false,
                };
                self.liveness.insert(device.clone(), life);
            }
            events.extend(self.judge_silence(&device, now));
        }
        let (rules, directory) = (&self.rules, &self.directory);
        let out_of_scope = |e: &AlertEvent| {
            rules.iter().any(|r| {
                r.id == e.rule
                    && matches!(r.kind, RuleKind::Silent(_))
                    && !r.scope.covers(&e.subject, directory)
            })
        };
        events.extend(self.alerts.resolve_where(out_of_scope, now));
        events
    }

    /// Devices any silence rule may cover: the directory's, the ones heard from, and the ones
    /// a rule names.
    fn watched_devices(&self) -> BTreeSet<String> {
        let silence_rules = || {
            self.rules
                .iter()
                .filter(|r| r.enabled && matches!(r.kind, RuleKind::Silent(_)))
        };
        if silence_rules().next().is_none() {
            return BTreeSet::new();
        }
        let named = silence_rules().filter_map(|r| match &r.scope {
            crate::rule::Scope::Device(d) => Some(d.as_str()),
            _ => None,
        });
        self.directory
            .devices()
            .chain(self.liveness.keys().map(String::as_str))
            .chain(named)
            .map(str::to_string)
            .collect()
    }

    fn has_silence_alert(&self, device: &str) -> bool {
        self.rules
            .iter()
            .filter(|r| matches!(r.kind, RuleKind::Silent(_)))
            .any(|r| self.alerts.is_active(&r.id, device))
    }

    /// Acknowledges a firing alert: it stops escalating and resolves when its condition ends.
    pub fn acknowledge(
        &mut self,
        alert_id: &str,
        by: &str,
        now: DateTime<Utc>,
    ) -> Result<AlertEvent, AckError> {
        self.alerts.acknowledge(alert_id, by, now)
    }

    /// Resumes after a restart with the alerts that were active (from the store): they keep
    /// their ids and states and are not announced again. Alerts whose rule is gone or
    /// disabled are resolved, and those transitions returned.
    pub fn restore(&mut self, active: Vec<AlertEvent>, now: DateTime<Utc>) -> Vec<AlertEvent> {
        let mut events = Vec::new();
        for mut event in active.into_iter().filter(|e| e.state.is_active()) {
            let Some(rule) = self.rules.iter().find(|r| r.id == event.rule && r.enabled) else {
                event.state = telemon_model::AlertState::Resolved;
                event.updated_at = now;
                events.push(event);
                continue;
            };
            let hold_for = self.hold_for(rule, &event.subject);
            if !self.alerts.restore(event, hold_for) {
                trace!(rule = %rule.id, "restored alert already active, ignored");
            }
        }
        events
    }

    /// The `for` of a rule for a subject, with the patient's override when it has one.
    fn hold_for(&self, rule: &Rule, subject: &str) -> Duration {
        let RuleKind::Threshold(t) = &rule.kind else {
            return Duration::ZERO;
        };
        let own = self.directory.override_for(subject, &rule.id);
        own.and_then(|o| o.for_).unwrap_or(t.for_)
    }

    /// Replaces the rules without a restart. Alerts of rules that are gone or now disabled
    /// resolve; the others carry on and follow the new limits from the next reading.
    pub fn set_rules(
        &mut self,
        rules: Vec<Rule>,
        now: DateTime<Utc>,
    ) -> Result<Vec<AlertEvent>, RuleError> {
        validate_rules(&rules)?;
        self.rules = rules;

        let live = |id: &str| self.rules.iter().any(|r| r.id == id && r.enabled);
        self.histories.retain(|(rule, _), _| live(rule));
        let rules = &self.rules;
        let retired = |e: &AlertEvent| !rules.iter().any(|r| r.id == e.rule && r.enabled);
        Ok(self.alerts.resolve_where(retired, now))
    }

    /// Replaces the directory. Active alerts keep their subject; the new device-patient
    /// assignments, groups and overrides apply from the next reading.
    pub fn set_directory(&mut self, directory: Directory) {
        self.directory = directory;
    }
}

/// The value of a reading as a finite number, if it has one.
fn number(r: &Reading) -> Option<f64> {
    r.value.as_f64().filter(|v| v.is_finite())
}
