//! The engine: holds the rules, the directory and every active alert, and turns readings,
//! device status and the passing of time into alert transitions. Pure and synchronous: the
//! caller owns I/O and the clock, and passes `now` in.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use chrono::{DateTime, Utc};
use telemon_model::{AlertEvent, Reading};
use tracing::trace;

use crate::directory::Directory;
use crate::duration;
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
    /// Reading time of the last alerting NEWS2 score per (rule id, subject), for `clear_after`.
    news2_breached: HashMap<(String, String), DateTime<Utc>>,
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
            news2_breached: HashMap::new(),
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
        self.on_readings(std::slice::from_ref(r), now)
    }

    /// Evaluates the readings of one message together. NEWS2 is scored once per subject after
    /// all of them are recorded, so a message carrying all seven vital signs moves a NEWS2
    /// alert once rather than through a score per metric.
    pub fn on_readings(&mut self, readings: &[Reading], now: DateTime<Utc>) -> Vec<AlertEvent> {
        let mut events = Vec::new();
        let mut to_score: BTreeMap<String, (String, DateTime<Utc>)> = BTreeMap::new();
        for r in readings {
            let device = r.device_id.as_str();
            events.extend(self.heard_from(device, now));
            if !self.is_newest(r) {
                trace!(device, metric = %r.metric, time = %r.time, "late reading not evaluated");
                continue;
            }

            let subject = self.directory.subject_of(device).to_string();
            if NEWS2_METRICS.contains(&r.metric.as_str()) {
                self.vitals
                    .entry(subject.clone())
                    .or_default()
                    .record(&r.metric, r.time, &r.value);
                let newest = to_score
                    .get(&subject)
                    .map_or(r.time, |(_, t)| r.time.max(*t));
                to_score.insert(subject.clone(), (device.to_string(), newest));
            }
            events.extend(self.judge_reading(r, &subject, now));
        }

        for (subject, (device, time)) in to_score {
            events.extend(self.judge_news2(&device, &subject, time, now));
        }
        events
    }

    /// Records the reading's time if it is newer than any seen for its device and metric.
    fn is_newest(&mut self, r: &Reading) -> bool {
        let key = (r.device_id.as_str().to_string(), r.metric.clone());
        if self.latest.get(&key).is_some_and(|seen| r.time <= *seen) {
            return false;
        }
        self.latest.insert(key, r.time);
        true
    }

    /// Threshold and rate-of-change rules on one reading.
    fn judge_reading(&mut self, r: &Reading, subject: &str, now: DateTime<Utc>) -> Vec<AlertEvent> {
        let device = r.device_id.as_str();
        let mut events = Vec::new();
        for rule in &self.rules {
            if !rule.enabled || !rule.scope.covers(device, &self.directory) {
                continue;
            }
            let verdict = match &rule.kind {
                RuleKind::Threshold(t) if t.metric == r.metric => {
                    self.threshold_verdict(rule, t, r, subject)
                }
                RuleKind::RateOfChange(k) if k.metric == r.metric => {
                    let Some(value) = number(r) else { continue };
                    let key = (rule.id.clone(), device.to_string());
                    let history = self.histories.entry(key).or_default();
                    history.push(r.time, value, k.window);
                    k.evaluate(history, value, rule.priority)
                }
                _ => continue,
            };
            events.extend(self.alerts.apply(rule, subject, verdict, now));
        }
        events
    }

    /// NEWS2 rules covering the device, on its subject's observations as of `at`.
    fn judge_news2(
        &mut self,
        device: &str,
        subject: &str,
        at: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Vec<AlertEvent> {
        let Some(vitals) = self.vitals.get(subject) else {
            return Vec::new();
        };
        let scale = self.directory.spo2_scale(subject);
        let mut events = Vec::new();
        for rule in &self.rules {
            let RuleKind::News2(k) = &rule.kind else {
                continue;
            };
            if rule.enabled && rule.scope.covers(device, &self.directory) {
                let key = (rule.id.clone(), subject.to_string());
                let verdict = match k.evaluate(vitals, at, scale, rule.priority) {
                    Verdict::Breach(f) => {
                        self.news2_breached.insert(key, at);
                        Verdict::Breach(f)
                    }
                    // Resolved only once the score has stayed low for `clear_after`.
                    Verdict::Clear => match self.news2_breached.get(&key) {
                        Some(last) if at - *last < duration::delta(k.clear_after) => Verdict::Hold,
                        _ => {
                            self.news2_breached.remove(&key);
                            Verdict::Clear
                        }
                    },
                    Verdict::Hold => Verdict::Hold,
                };
                events.extend(self.alerts.apply(rule, subject, verdict, now));
            }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::directory::{LimitOverride, Patient};
    use crate::rule::Scope;
    use crate::rules::{News2, RateOfChange, Silent};
    use chrono::TimeZone;
    use telemon_model::{AlertState, DeviceId, Priority, Value};

    fn at(secs: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_700_000_000 + secs, 0).unwrap()
    }

    fn reading(device: &str, metric: &str, value: f64, secs: i64) -> Reading {
        Reading {
            device_id: DeviceId::new(device).unwrap(),
            metric: metric.into(),
            time: at(secs),
            value: Value::Number(value),
            unit: None,
        }
    }

    fn rule(id: &str, kind: RuleKind) -> Rule {
        Rule {
            id: id.into(),
            name: None,
            description: None,
            priority: Priority::Medium,
            scope: Scope::All,
            enabled: true,
            escalate_after: None,
            kind,
        }
    }

    fn hr_high(for_secs: u64) -> Rule {
        rule(
            "hr-high",
            RuleKind::Threshold(Threshold {
                metric: "heart_rate".into(),
                above: Some(120.0),
                below: None,
                clear_above: Some(110.0),
                clear_below: None,
                for_: Duration::from_secs(for_secs),
            }),
        )
    }

    fn silent(after_secs: u64) -> Rule {
        rule(
            "silent",
            RuleKind::Silent(Silent {
                after: Duration::from_secs(after_secs),
            }),
        )
    }

    fn ward() -> Directory {
        let in_ward = |ward: &str| Patient {
            group: Some(ward.into()),
            ..Default::default()
        };
        Directory::default()
            .with_device("bed-1", "p1")
            .with_device("bed-2", "p2")
            .with_patient("p1", in_ward("ward-3"))
            .with_patient("p2", in_ward("ward-4"))
    }

    fn engine(rules: Vec<Rule>) -> Engine {
        Engine::new(rules, ward()).unwrap()
    }

    fn states(events: &[AlertEvent]) -> Vec<AlertState> {
        events.iter().map(|e| e.state).collect()
    }

    /// Drives `heart_rate` on bed-1 (patient p1), one reading per second of `now`.
    fn hr(e: &mut Engine, value: f64, secs: i64) -> Vec<AlertEvent> {
        e.on_reading(&reading("bed-1", "heart_rate", value, secs), at(secs))
    }

    #[test]
    fn pending_fires_once_the_breach_has_lasted_for() {
        let mut e = engine(vec![hr_high(30)]);
        let started = hr(&mut e, 130.0, 0);
        assert_eq!(states(&started), [AlertState::Pending]);
        assert_eq!(started[0].subject, "p1");
        assert!(e.tick(at(29)).is_empty());
        assert!(hr(&mut e, 131.0, 29).is_empty());

        let fired = e.tick(at(30));
        assert_eq!(states(&fired), [AlertState::Firing]);
        assert_eq!(
            fired[0].id, started[0].id,
            "the id is stable across transitions"
        );
        assert_eq!((fired[0].value, fired[0].started_at), (Some(131.0), at(0)));
        assert!(e.tick(at(31)).is_empty());
    }

    #[test]
    fn breaching_reading_after_for_fires_without_a_tick() {
        let mut e = engine(vec![hr_high(30)]);
        hr(&mut e, 130.0, 0);
        assert_eq!(states(&hr(&mut e, 130.0, 30)), [AlertState::Firing]);
    }

    #[test]
    fn pending_is_cancelled_when_the_condition_clears_before_for() {
        let mut e = engine(vec![hr_high(30)]);
        let started = hr(&mut e, 130.0, 0);
        let cancelled = hr(&mut e, 100.0, 10);
        assert_eq!(states(&cancelled), [AlertState::Resolved]);
        assert_eq!(cancelled[0].id, started[0].id);
        assert!(
            e.tick(at(60)).is_empty(),
            "a cancelled alert must not fire later"
        );
        assert_eq!(e.active().count(), 0);
    }

    #[test]
    fn firing_alert_clears_only_past_the_hysteresis_level() {
        let mut e = engine(vec![hr_high(0)]);
        assert_eq!(states(&hr(&mut e, 125.0, 0)), [AlertState::Firing]);
        assert!(
            hr(&mut e, 115.0, 1).is_empty(),
            "115 is inside the 110-120 band"
        );
        assert!(hr(&mut e, 120.0, 2).is_empty());
        assert_eq!(states(&hr(&mut e, 110.0, 3)), [AlertState::Resolved]);
    }

    #[test]
    fn pending_inside_the_hysteresis_band_stays_pending() {
        let mut e = engine(vec![hr_high(30)]);
        hr(&mut e, 125.0, 0);
        assert!(
            hr(&mut e, 115.0, 10).is_empty(),
            "115 is inside the 110-120 band"
        );
        assert_eq!(states(&e.tick(at(30))), [AlertState::Firing]);
    }

    #[test]
    fn repeated_breaches_keep_one_alert() {
        let mut e = engine(vec![hr_high(0)]);
        hr(&mut e, 125.0, 0);
        for secs in 1..20 {
            assert!(hr(&mut e, 125.0 + secs as f64, secs).is_empty());
        }
        assert_eq!(e.active().count(), 1);
    }

    #[test]
    fn acknowledged_alert_resolves_when_the_condition_clears() {
        let mut e = engine(vec![hr_high(0)]);
        let id = hr(&mut e, 125.0, 0)[0].id.clone();
        let ack = e.acknowledge(&id, "nurse.jones", at(5)).unwrap();
        assert_eq!(ack.state, AlertState::Acknowledged);
        assert_eq!(ack.acknowledged_by.as_deref(), Some("nurse.jones"));
        assert_eq!(ack.acknowledged_at, Some(at(5)));
        assert!(
            hr(&mut e, 130.0, 6).is_empty(),
            "still breaching: stays acknowledged"
        );

        let resolved = hr(&mut e, 100.0, 7);
        assert_eq!(states(&resolved), [AlertState::Resolved]);
        assert_eq!(resolved[0].acknowledged_by.as_deref(), Some("nurse.jones"));
        assert_eq!(resolved[0].id, id);
    }

    #[test]
    fn unacknowledged_alert_resolves_too() {
        let mut e = engine(vec![hr_high(0)]);
        hr(&mut e, 125.0, 0);
        let resolved = hr(&mut e, 90.0, 1);
        assert_eq!(states(&resolved), [AlertState::Resolved]);
        assert_eq!(resolved[0].acknowledged_by, None);
    }

    #[test]
    fn acknowledgement_errors() {
        let mut e = engine(vec![hr_high(30)]);
        let id = hr(&mut e, 125.0, 0)[0].id.clone();
        assert_eq!(
            e.acknowledge(&id, "n", at(1)),
            Err(AckError::NotFiring(id.clone()))
        );
        e.tick(at(30));
        assert_eq!(e.acknowledge(&id, " ", at(31)), Err(AckError::MissingUser));
        e.acknowledge(&id, "n", at(31)).unwrap();
        assert!(matches!(
            e.acknowledge(&id, "m", at(32)),
            Err(AckError::AlreadyAcknowledged { .. })
        ));
        assert_eq!(
            e.acknowledge("nope", "n", at(33)),
            Err(AckError::UnknownAlert("nope".into()))
        );
    }

    #[test]
    fn unacknowledged_alert_escalates_each_period_until_high() {
        let mut rule = hr_high(0);
        rule.priority = Priority::Low;
        rule.escalate_after = Some(Duration::from_secs(60));
        let mut e = engine(vec![rule]);
        let id = hr(&mut e, 125.0, 0)[0].id.clone();
        assert!(e.tick(at(59)).is_empty());

        let first = e.tick(at(60));
        assert_eq!(first.len(), 1);
        assert_eq!(
            (first[0].priority, first[0].state),
            (Priority::Medium, AlertState::Firing)
        );
        assert_eq!(first[0].id, id);
        assert!(e.tick(at(119)).is_empty());
        assert_eq!(e.tick(at(120))[0].priority, Priority::High);
        assert!(e.tick(at(1000)).is_empty(), "high is the top");
    }

    #[test]
    fn acknowledged_alert_does_not_escalate() {
        let mut rule = hr_high(0);
        rule.escalate_after = Some(Duration::from_secs(60));
        let mut e = engine(vec![rule]);
        let id = hr(&mut e, 125.0, 0)[0].id.clone();
        e.acknowledge(&id, "n", at(30)).unwrap();
        assert!(e.tick(at(600)).is_empty());
    }

    #[test]
    fn restored_alert_does_not_fire_again_and_resolves_with_its_id() {
        let mut before = engine(vec![hr_high(0)]);
        let fired = hr(&mut before, 125.0, 0);
        let saved: Vec<AlertEvent> = before.active().cloned().collect();

        let mut after = engine(vec![hr_high(0)]);
        assert!(after.restore(saved, at(100)).is_empty());
        assert!(
            hr(&mut after, 130.0, 101).is_empty(),
            "no duplicate fire after restart"
        );
        assert!(after.tick(at(102)).is_empty());
        let resolved = hr(&mut after, 90.0, 103);
        assert_eq!(states(&resolved), [AlertState::Resolved]);
        assert_eq!(resolved[0].id, fired[0].id);
    }

    #[test]
    fn restored_escalation_clock_keeps_running() {
        let mut rule = hr_high(0);
        rule.escalate_after = Some(Duration::from_secs(60));
        let mut before = engine(vec![rule.clone()]);
        hr(&mut before, 125.0, 0);

        let mut after = engine(vec![rule]);
        after.restore(before.active().cloned().collect(), at(50));
        assert_eq!(after.tick(at(60))[0].priority, Priority::High);
    }

    #[test]
    fn restored_alerts_of_removed_rules_resolve() {
        let mut before = engine(vec![hr_high(0)]);
        hr(&mut before, 125.0, 0);
        let mut after = engine(vec![]);
        let resolved = after.restore(before.active().cloned().collect(), at(10));
        assert_eq!(states(&resolved), [AlertState::Resolved]);
        assert_eq!(after.active().count(), 0);
    }

    #[test]
    fn late_reading_neither_clears_nor_fires() {
        let mut e = engine(vec![hr_high(0)]);
        hr(&mut e, 125.0, 10);
        let late = reading("bed-1", "heart_rate", 80.0, 5);
        assert!(
            e.on_reading(&late, at(11)).is_empty(),
            "an older normal value must not clear"
        );
        hr(&mut e, 100.0, 12);

        let late = reading("bed-1", "heart_rate", 150.0, 11);
        assert!(
            e.on_reading(&late, at(13)).is_empty(),
            "an older breach must not fire"
        );
        let duplicate = reading("bed-1", "heart_rate", 150.0, 12);
        assert!(e.on_reading(&duplicate, at(14)).is_empty());
        assert_eq!(e.active().count(), 0);
    }

    #[test]
    fn disabled_rule_raises_nothing_and_disabling_resolves() {
        let mut off = hr_high(0);
        off.enabled = false;
        let mut e = engine(vec![off.clone()]);
        assert!(hr(&mut e, 150.0, 0).is_empty());

        let mut e = engine(vec![hr_high(0)]);
        hr(&mut e, 150.0, 0);
        let resolved = e.set_rules(vec![off], at(1)).unwrap();
        assert_eq!(states(&resolved), [AlertState::Resolved]);
        assert!(hr(&mut e, 160.0, 2).is_empty());
    }

    #[test]
    fn changed_rules_apply_without_restart() {
        let mut e = engine(vec![hr_high(0)]);
        assert!(hr(&mut e, 115.0, 0).is_empty());
        let mut stricter = hr_high(0);
        if let RuleKind::Threshold(t) = &mut stricter.kind {
            t.above = Some(100.0);
            t.clear_above = None;
        }
        assert!(e.set_rules(vec![stricter], at(1)).unwrap().is_empty());
        assert_eq!(states(&hr(&mut e, 115.0, 2)), [AlertState::Firing]);

        let mut bad = hr_high(0);
        bad.id = "bad id".into();
        assert!(e.set_rules(vec![bad], at(3)).is_err());
        assert_eq!(
            e.rules()[0].id,
            "hr-high",
            "a refused rule set changes nothing"
        );
    }

    #[test]
    fn patient_override_replaces_the_group_limit() {
        let mut group_rule = hr_high(0);
        group_rule.scope = Scope::Group("ward-3".into());
        let mut dir = ward().with_device("bed-3", "p3").with_patient(
            "p3",
            Patient {
                group: Some("ward-3".into()),
                ..Default::default()
            },
        );
        let own = LimitOverride {
            above: Some(140.0),
            ..Default::default()
        };
        if let Some(p1) = dir.patients.get_mut("p1") {
            p1.overrides.insert("hr-high".into(), own);
        }
        let mut e = Engine::new(vec![group_rule], dir).unwrap();

        assert!(hr(&mut e, 130.0, 0).is_empty(), "p1's own limit is 140");
        assert_eq!(states(&hr(&mut e, 141.0, 1)), [AlertState::Firing]);
        let p3 = reading("bed-3", "heart_rate", 130.0, 0);
        assert_eq!(
            states(&e.on_reading(&p3, at(0))),
            [AlertState::Firing],
            "p3 keeps 120"
        );
        let p2 = reading("bed-2", "heart_rate", 200.0, 0);
        assert!(e.on_reading(&p2, at(0)).is_empty(), "p2 is in another ward");
    }

    #[test]
    fn patient_override_can_switch_a_rule_off() {
        let mut dir = ward();
        let off = LimitOverride {
            enabled: Some(false),
            ..Default::default()
        };
        if let Some(p1) = dir.patients.get_mut("p1") {
            p1.overrides.insert("hr-high".into(), off);
        }
        let mut e = Engine::new(vec![hr_high(0)], dir).unwrap();
        assert!(hr(&mut e, 200.0, 0).is_empty());
    }

    #[test]
    fn silent_device_fires_after_the_quiet_period_and_clears_on_a_reading() {
        let mut e = engine(vec![silent(60)]);
        assert!(
            e.tick(at(0)).is_empty(),
            "starts the clock for directory devices"
        );
        assert!(e.tick(at(60)).is_empty());
        hr(&mut e, 80.0, 30);

        let fired = e.tick(at(61));
        assert_eq!(states(&fired), [AlertState::Firing]);
        assert_eq!(fired[0].subject, "bed-2", "silence is about the device");
        assert_eq!(e.tick(at(91)).len(), 1, "bed-1 went quiet at 30");
        assert!(e.tick(at(200)).is_empty(), "no duplicate while silent");

        let back = hr(&mut e, 80.0, 201);
        assert_eq!(states(&back), [AlertState::Resolved]);
        assert_eq!(back[0].subject, "bed-1");
    }

    #[test]
    fn offline_status_fires_at_once_and_online_clears() {
        let mut e = engine(vec![silent(600)]);
        let fired = e.on_status("bed-1", false, at(0));
        assert_eq!(states(&fired), [AlertState::Firing]);
        assert!(fired[0].message.contains("offline"), "{}", fired[0].message);
        assert!(e.tick(at(1)).is_empty());
        assert_eq!(
            states(&e.on_status("bed-1", true, at(2))),
            [AlertState::Resolved]
        );
    }

    #[test]
    fn silent_rule_watches_a_named_device_never_heard_from() {
        let mut rule = silent(60);
        rule.scope = Scope::Device("gateway-9".into());
        let mut e = engine(vec![rule]);
        e.tick(at(0));
        let fired = e.tick(at(61));
        assert_eq!(fired.len(), 1);
        assert_eq!(fired[0].subject, "gateway-9");
    }

    #[test]
    fn restored_silence_alert_stays_until_the_device_is_heard() {
        let mut before = engine(vec![silent(60)]);
        before.on_status("bed-1", false, at(0));

        let mut after = engine(vec![silent(60)]);
        after.restore(before.active().cloned().collect(), at(100));
        assert!(after.tick(at(101)).is_empty(), "not re-fired, not cleared");
        assert!(after.tick(at(200)).iter().all(|e| e.subject != "bed-1"));
        assert_eq!(after.active().filter(|e| e.subject == "bed-1").count(), 1);
        assert_eq!(
            states(&after.on_status("bed-1", true, at(201))),
            [AlertState::Resolved]
        );
    }

    #[test]
    fn rate_of_change_fires_and_clears() {
        let kind = RuleKind::RateOfChange(RateOfChange {
            metric: "heart_rate".into(),
            window: Duration::from_secs(60),
            max_rise: Some(20.0),
            max_fall: None,
        });
        let mut e = engine(vec![rule("hr-rate", kind)]);
        assert!(hr(&mut e, 70.0, 0).is_empty());
        assert_eq!(states(&hr(&mut e, 95.0, 30)), [AlertState::Firing]);
        assert!(hr(&mut e, 96.0, 40).is_empty());
        assert_eq!(
            states(&hr(&mut e, 96.0, 100)),
            [AlertState::Resolved],
            "70 left the window"
        );
    }

    fn observe(e: &mut Engine, device: &str, values: [f64; 7], secs: i64) -> Vec<AlertEvent> {
        let metrics = crate::rules::news2::METRICS;
        let message: Vec<Reading> = metrics
            .iter()
            .zip(values)
            .map(|(m, v)| reading(device, m, v, secs))
            .collect();
        e.on_readings(&message, at(secs))
    }

    const SEPTIC: [f64; 7] = [22.0, 95.0, 1.0, 105.0, 95.0, 0.0, 38.5];
    const HEALTHY: [f64; 7] = [16.0, 97.0, 0.0, 120.0, 70.0, 0.0, 37.0];
    const CONFUSED: [f64; 7] = [16.0, 97.0, 0.0, 120.0, 70.0, 1.0, 37.0];

    #[test]
    fn news2_alerts_on_the_patient_and_resolves() {
        let mut e = engine(vec![rule("news2", RuleKind::News2(News2::default()))]);
        let events = observe(&mut e, "bed-1", SEPTIC, 0);
        assert_eq!(
            states(&events),
            [AlertState::Firing],
            "scored once all seven are in"
        );
        let alert = &events[0];
        assert_eq!(
            (alert.subject.as_str(), alert.priority),
            ("p1", Priority::High)
        );
        assert_eq!(
            (alert.metric.as_deref(), alert.value),
            (Some("news2"), Some(8.0))
        );

        // A low score resolves the alert only once it has stayed low for `clear_after`.
        assert!(observe(&mut e, "bed-1", HEALTHY, 10).is_empty());
        assert!(observe(&mut e, "bed-1", HEALTHY, 119).is_empty());
        let events = observe(&mut e, "bed-1", HEALTHY, 120);
        assert_eq!(states(&events), [AlertState::Resolved]);
        assert_eq!(events[0].id, alert.id);
    }

    /// A deteriorating patient's score crossing back and forth over the alerting boundary
    /// (seen as an alert resolving and a new one firing every second or two) keeps one alert,
    /// and its acknowledgement.
    #[test]
    fn news2_crossing_the_boundary_back_and_forth_keeps_one_alert() {
        let mut e = engine(vec![rule("news2", RuleKind::News2(News2::default()))]);
        let id = observe(&mut e, "bed-1", CONFUSED, 0)[0].id.clone();
        e.acknowledge(&id, "dr.who", at(1)).unwrap();
        for t in 1..60 {
            let values = if t % 2 == 0 { CONFUSED } else { HEALTHY };
            let events = observe(&mut e, "bed-1", values, t);
            assert!(events.is_empty(), "at {t} s: {events:?}");
        }
        let events = observe(&mut e, "bed-1", HEALTHY, 58 + 120);
        assert_eq!(
            (states(&events), events[0].id.as_str()),
            (vec![AlertState::Resolved], id.as_str())
        );
    }

    #[test]
    fn news2_follows_the_score_one_reading_at_a_time() {
        let immediate = News2 {
            clear_after: Duration::ZERO,
            ..News2::default()
        };
        let mut e = engine(vec![rule("news2", RuleKind::News2(immediate))]);
        let id = observe(&mut e, "bed-1", SEPTIC, 0)[0].id.clone();

        // Separate messages: the score falls as each new value arrives, and the priority
        // follows it down before the alert resolves, all under one id.
        let mut events = Vec::new();
        for (m, v) in crate::rules::news2::METRICS.iter().zip(HEALTHY) {
            events.extend(e.on_reading(&reading("bed-1", m, v, 10), at(10)));
        }
        assert_eq!(events.first().map(|e| e.priority), Some(Priority::Medium));
        assert_eq!(events.last().map(|e| e.state), Some(AlertState::Resolved));
        assert!(events.iter().all(|e| e.id == id));
    }

    #[test]
    fn news2_for_a_device_without_patient_is_about_the_device() {
        let mut e = engine(vec![rule("news2", RuleKind::News2(News2::default()))]);
        let events = observe(&mut e, "loan-monitor", CONFUSED, 0);
        assert_eq!(events.len(), 1);
        assert_eq!(
            (events[0].subject.as_str(), events[0].priority),
            ("loan-monitor", Priority::Medium)
        );
    }

    #[test]
    fn news2_uses_the_patients_spo2_scale() {
        let mut dir = ward();
        if let Some(p1) = dir.patients.get_mut("p1") {
            p1.spo2_scale = crate::news2::Spo2Scale::Two;
        }
        let mut e =
            Engine::new(vec![rule("news2", RuleKind::News2(News2::default()))], dir).unwrap();
        // SpO2 89 on air scores 3 on scale 1 (an urgent single 3) but 0 on scale 2.
        let values = [16.0, 89.0, 0.0, 120.0, 70.0, 0.0, 37.0];
        assert!(observe(&mut e, "bed-1", values, 0).is_empty());
        assert_eq!(observe(&mut e, "bed-2", values, 0).len(), 1);
    }

    #[test]
    fn worse_news2_on_an_acknowledged_alert_fires_again() {
        let mut e = engine(vec![rule("news2", RuleKind::News2(News2::default()))]);
        let id = observe(&mut e, "bed-1", CONFUSED, 0)[0].id.clone();
        e.acknowledge(&id, "dr.who", at(1)).unwrap();

        let events = observe(&mut e, "bed-1", SEPTIC, 10);
        let last = events.last().unwrap();
        assert_eq!(
            (last.state, last.priority),
            (AlertState::Firing, Priority::High)
        );
        assert_eq!(
            (last.id.as_str(), last.acknowledged_by.as_deref()),
            (id.as_str(), None)
        );
    }

    #[test]
    fn new_alert_after_resolution_gets_a_new_id_even_in_the_same_millisecond() {
        let mut e = engine(vec![hr_high(0)]);
        let first = hr(&mut e, 125.0, 0)[0].id.clone();
        hr(&mut e, 100.0, 1);
        let again = e.on_reading(&reading("bed-1", "heart_rate", 125.0, 2), at(1));
        assert_eq!(again.len(), 1);
        assert_ne!(again[0].id, first);
        assert!(again[0].id.starts_with("hr-high:p1:"), "{}", again[0].id);
    }

    #[test]
    fn engine_refuses_invalid_rules() {
        let twice = vec![hr_high(0), hr_high(0)];
        assert!(matches!(
            Engine::new(twice, ward()),
            Err(RuleError::DuplicateId(_))
        ));
    }
}
