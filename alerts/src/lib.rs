//! telemon's alert rule engine: rules, the directory of devices and patients, the NEWS2
//! early-warning score, and the lifecycle of every alert.
//!
//! The [`Engine`] is pure and synchronous. It performs no I/O and never reads a clock: every
//! call takes the current time as `now`, so tests drive time by hand and the service owns
//! the wall clock. Each call returns the alert transitions it caused, which the service
//! stores and publishes.
//!
//! # Modules
//!
//! - [`rule`]: rules as written in a rule file (see `rules.toml` beside this crate) or sent
//!   as JSON, and their validation.
//! - [`rules`]: one file per rule kind: `threshold`, `rate` (rate of change), `silent`,
//!   `news2`.
//! - [`directory`]: device -> patient -> group (ward), SpO2 scale, per-patient overrides.
//! - [`news2`]: NEWS2 scoring, a pure function.
//! - [`duration`]: the duration syntax of rule files.
//! - `lifecycle` (private): pending, firing, acknowledged, resolved; escalation.
//! - [`ruleset`]: the rules in force: the rules file as the base, the rules made through the
//!   API (stored in the database) laid over it.
//! - [`service`]: the running service: MQTT in, the engine in one task, every transition
//!   published, stored and sent to webhooks; rule changes without a restart.
//! - [`notify`]: webhooks, signed, retried with backoff from their own tasks.
//! - `recorder` (private): storing transitions in order, queued in memory while the store
//!   is down.
//!
//! # Time
//!
//! - A reading is evaluated on its own time (`Reading::time`): rate-of-change windows and
//!   NEWS2 staleness are measured between reading times.
//! - A reading whose time is not newer than the newest already seen for the same device and
//!   metric is late: it is not evaluated, so out-of-order or redelivered readings never fire
//!   or clear an alert. It still counts as a sign of life for silence rules.
//! - `for` durations, silence and escalation are measured on `now`, the time the caller
//!   passes in, so a device with a wrong clock cannot shorten or stretch them. Pending
//!   alerts fire and unacknowledged ones escalate on [`Engine::tick`] (or on the next
//!   breaching reading); call `tick` about once a second.
//!
//! # Subjects and ids
//!
//! An alert is about a subject. For threshold, rate-of-change and NEWS2 rules it is the
//! patient the device is attached to in the [`Directory`], or the device itself when it has
//! no patient; for silence rules it is always the device. There is at most one active alert
//! per (rule, subject). Alert ids are `{rule}:{subject}:{started_at epoch ms}`, stable for
//! the alert's life and unique (a new alert of the same rule and subject never reuses one).
//!
//! # Lifecycle
//!
//! A breach starts an alert: `pending` when the rule has a `for`, `firing` otherwise. A
//! pending alert fires once the breach has lasted `for`; if the condition clears first it is
//! emitted once as `resolved` (cancelled) so that anyone shown the pending state drops it.
//! A firing alert can be acknowledged (who, when); an acknowledged alert stays until its
//! condition clears, then resolves; an alert also resolves without acknowledgement. A firing
//! alert not acknowledged within the rule's `escalate_after` goes up one priority level,
//! and again after each further period, up to high. If the condition itself gets worse
//! (a NEWS2 score going from urgent to emergency) an acknowledged alert fires again.
//! Thresholds clear with hysteresis: only once the value is back past `clear_above` /
//! `clear_below`. This holds for pending alerts too: a value inside the band keeps a pending
//! alert pending (it fires when `for` has passed), so a value hovering at the limit neither
//! flaps between pending and cancelled nor restarts its `for`. Disabling or removing a rule
//! resolves its alerts. A transition is emitted only when the state or the priority changes;
//! new values of an alert already firing are not announced.
//!
//! # NEWS2
//!
//! Input metrics, as devices and the simulator publish them:
//!
//! | metric | unit / encoding |
//! |---|---|
//! | `respiratory_rate` | breaths per minute |
//! | `spo2` | percent |
//! | `supplemental_oxygen` | boolean, or 0 (air) / 1 (oxygen) |
//! | `systolic_bp` | mmHg |
//! | `heart_rate` | pulse, beats per minute |
//! | `consciousness` | ACVPU code 0-4, or its letter (below) |
//! | `temperature` | °C |
//!
//! Consciousness codes: 0 = A (alert), 1 = C (new confusion), 2 = V (responds to voice),
//! 3 = P (responds to pain), 4 = U (unresponsive). A text value `"A"`..`"U"` is read too.
//! Any other value leaves the parameter missing, so no score is computed.
//!
//! The subject's latest value of each metric is kept, from any of its devices. A score is
//! computed only when all seven are present and none is older than the rule's `max_age`
//! (default 15 minutes) before the reading being evaluated; an incomplete or stale set
//! changes nothing (an active NEWS2 alert stays as it is). Clinical risk low-medium (a single
//! parameter at 3) and medium (aggregate 5-6) are urgent and alert at the rule's priority;
//! high (7 or more) is an emergency and alerts at `emergency_priority` (default high). The
//! alert's metric is `news2` and its value the aggregate. The SpO2 scale comes from the
//! patient's directory entry (scale 1 unless set to 2).
//!
//! # Known shortcomings
//!
//! - Two devices of one patient reporting the same metric feed one threshold alert; if they
//!   disagree across a limit, the alert follows whichever reported last.
//! - After a restart, the engine does not know when a device last reported: silence timers
//!   of devices without an active silence alert start again at the first `tick`, and a
//!   restored silence alert stays until the device is heard from.

pub mod directory;
pub mod duration;
mod engine;
mod lifecycle;
pub mod news2;
pub mod notify;
mod recorder;
pub mod rule;
pub mod rules;
pub mod ruleset;
pub mod service;

pub use directory::{Directory, LimitOverride, Patient};
pub use engine::Engine;
pub use lifecycle::AckError;
pub use news2::{ClinicalRisk, Consciousness, News2Score, Observations, Spo2Scale};
pub use rule::{Rule, RuleError, RuleFile, RuleKind, Scope};
pub use ruleset::{RuleSource, StoredRuleError};
pub use service::{AlertsError, AlertsHandle, AlertsSettings, SetRulesError};
