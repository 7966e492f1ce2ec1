//! The patient behind a simulated bedside monitor: eight vital signs that drift slowly around
//! a personal baseline, influence each other, carry sensor noise and artefacts, and follow a
//! scripted [`Scenario`].
//!
//! Each vital sign is a mean-reverting random process (Ornstein-Uhlenbeck, sampled exactly
//! for any time step) around a target. The target is the patient's baseline plus a slow
//! personal drift, plus the offsets the scenario drives towards, plus the couplings a
//! clinician expects: fever raises heart and respiratory rate, and so does hypoxia. When the
//! saturation on air falls low the simulated ward puts the patient on oxygen, which lifts the
//! measured saturation and scores in NEWS2 on its own.
//!
//! Metric names and units are those the alert engine's NEWS2 rule reads.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::scenario::{format_duration, parse_duration};
use crate::{standard_normal, Metrics};

/// One sample of a patient's vital signs, by metric name.
pub type Vitals = Metrics;

/// Beats per minute.
pub const HEART_RATE: &str = "heart_rate";
/// Breaths per minute.
pub const RESPIRATORY_RATE: &str = "respiratory_rate";
/// Percent; absent while the probe is off.
pub const SPO2: &str = "spo2";
/// Degrees Celsius.
pub const TEMPERATURE: &str = "temperature";
/// mmHg.
pub const SYSTOLIC_BP: &str = "systolic_bp";
/// mmHg.
pub const DIASTOLIC_BP: &str = "diastolic_bp";
/// ACVPU code: 0 alert, 1 new confusion, 2 voice, 3 pain, 4 unresponsive.
pub const CONSCIOUSNESS: &str = "consciousness";
/// 1 on supplemental oxygen, 0 on room air.
pub const SUPPLEMENTAL_OXYGEN: &str = "supplemental_oxygen";

/// Every metric a vital-sign monitor publishes.
pub const METRICS: [&str; 8] = [
    HEART_RATE,
    RESPIRATORY_RATE,
    SPO2,
    TEMPERATURE,
    SYSTOLIC_BP,
    DIASTOLIC_BP,
    CONSCIOUSNESS,
    SUPPLEMENTAL_OXYGEN,
];

/// How long a deterioration takes when the scenario does not say: a sepsis-like course
/// that a ward would notice within one observation round.
pub const DEFAULT_DETERIORATION: Duration = Duration::from_secs(30 * 60);
/// How fast a sudden event (an acute desaturation) sets in by default.
pub const DEFAULT_ONSET: Duration = Duration::from_secs(60);
/// How long a recovery takes by default.
pub const DEFAULT_RECOVERY: Duration = Duration::from_secs(20 * 60);

/// What happens to a patient from the moment the scenario is set.
///
/// Written as `Stable`, `SlowDeterioration`, `SuddenEvent` or `Recovery`, optionally with a
/// duration in brackets: `SlowDeterioration(20m)`, `SuddenEvent(30s)`, `Recovery(1h)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Scenario {
    /// The vital signs stay where they are, varying only by drift and noise.
    Stable,
    /// Sepsis-like: respiratory rate, heart rate and temperature rise, saturation and blood
    /// pressure fall, linearly over `over`; new confusion near the end.
    SlowDeterioration { over: Duration },
    /// An acute desaturation with a raised heart and respiratory rate, reached in `onset`.
    SuddenEvent { onset: Duration },
    /// Back to the patient's own baseline over `over`, from wherever the patient is.
    Recovery { over: Duration },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "invalid scenario {0:?}: use Stable, SlowDeterioration, SuddenEvent or Recovery, \
     optionally with a duration such as SlowDeterioration(20m)"
)]
pub struct InvalidScenario(pub String);

impl Scenario {
    /// The scenario's name without its duration.
    pub fn name(&self) -> &'static str {
        match self {
            Scenario::Stable => "Stable",
            Scenario::SlowDeterioration { .. } => "SlowDeterioration",
            Scenario::SuddenEvent { .. } => "SuddenEvent",
            Scenario::Recovery { .. } => "Recovery",
        }
    }

    /// How long the scenario takes to reach its end state; zero for `Stable`.
    pub fn duration(&self) -> Duration {
        match *self {
            Scenario::Stable => Duration::ZERO,
            Scenario::SlowDeterioration { over } | Scenario::Recovery { over } => over,
            Scenario::SuddenEvent { onset } => onset,
        }
    }
}

impl FromStr for Scenario {
    type Err = InvalidScenario;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || InvalidScenario(text.to_string());
        let text = text.trim();
        let (name, duration) = match text.split_once('(') {
            Some((name, rest)) => {
                let inner = rest.strip_suffix(')').ok_or_else(bad)?;
                let duration = parse_duration(inner).map_err(|_| bad())?;
                if duration.is_zero() {
                    return Err(bad());
                }
                (name.trim(), Some(duration))
            }
            None => (text, None),
        };
        match name {
            "Stable" if duration.is_none() => Ok(Scenario::Stable),
            "SlowDeterioration" => Ok(Scenario::SlowDeterioration {
                over: duration.unwrap_or(DEFAULT_DETERIORATION),
            }),
            "SuddenEvent" => Ok(Scenario::SuddenEvent {
                onset: duration.unwrap_or(DEFAULT_ONSET),
            }),
            "Recovery" => Ok(Scenario::Recovery {
                over: duration.unwrap_or(DEFAULT_RECOVERY),
            }),
            _ => Err(bad()),
        }
    }
}

impl fmt::Display for Scenario {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scenario::Stable => f.write_str("Stable"),
            other => write!(f, "{}({})", other.name(), format_duration(other.duration())),
        }
    }
}

impl TryFrom<String> for Scenario {
    type Error = InvalidScenario;

    fn try_from(text: String) -> Result<Self, Self::Error> {
        text.parse()
    }
}

impl From<Scenario> for String {
    fn from(scenario: Scenario) -> String {
        scenario.to_string()
    }
}

/// How often sensor artefacts start, per hour of monitoring.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Artefacts {
    /// The SpO2 probe slips off: no saturation for a few samples.
    pub probe_off_per_hour: f64,
    /// The patient moves: the heart rate reading spikes for a few samples.
    pub motion_per_hour: f64,
}

impl Artefacts {
    /// A perfectly still patient with a well-seated probe.
    pub const NONE: Artefacts = Artefacts {
        probe_off_per_hour: 0.0,
        motion_per_hour: 0.0,
    };
}

impl Default for Artefacts {
    /// A few of each per hour: often enough that consumers meet them in any demo, rare
    /// enough not to dominate the data.
    fn default() -> Self {
        Artefacts {
            probe_off_per_hour: 4.0,
            motion_per_hour: 6.0,
        }
    }
}

/// How many artefact episodes a patient has started so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ArtefactCounts {
    pub probe_off: u64,
    pub motion: u64,
}

/// Deviation from the patient's baseline that a scenario drives towards.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Offsets {
    heart_rate: f64,
    respiratory_rate: f64,
    spo2: f64,
    temperature: f64,
    systolic_bp: f64,
    diastolic_bp: f64,
    /// 0 well, 1 critically ill: drives the level of consciousness.
    severity: f64,
}

impl Offsets {
    fn lerp(a: Offsets, b: Offsets, t: f64) -> Offsets {
        let mix = |x: f64, y: f64| x + (y - x) * t;
        Offsets {
            heart_rate: mix(a.heart_rate, b.heart_rate),
            respiratory_rate: mix(a.respiratory_rate, b.respiratory_rate),
            spo2: mix(a.spo2, b.spo2),
            temperature: mix(a.temperature, b.temperature),
            systolic_bp: mix(a.systolic_bp, b.systolic_bp),
            diastolic_bp: mix(a.diastolic_bp, b.diastolic_bp),
            severity: mix(a.severity, b.severity),
        }
    }
}

/// Where sepsis ends up. Heart and respiratory rate rise further through the fever and
/// hypoxia couplings, to about 120/min and 28/min.
const SEPSIS: Offsets = Offsets {
    heart_rate: 15.0,
    respiratory_rate: 6.0,
    spo2: -5.5,
    temperature: 2.4,
    systolic_bp: -36.0,
    diastolic_bp: -22.0,
    severity: 1.0,
};

/// An acute desaturation (a mucus plug, a pulmonary embolism): saturation on air near 85 %.
const DESATURATION: Offsets = Offsets {
    heart_rate: 12.0,
    respiratory_rate: 6.0,
    spo2: -12.0,
    temperature: 0.0,
    systolic_bp: 8.0,
    diastolic_bp: 5.0,
    severity: 0.5,
};

/// Severity above which the patient is newly confused (ACVPU C).
const CONFUSION_SEVERITY: f64 = 0.85;
/// Saturation on air below which the ward starts oxygen, and above which it stops it again
/// (with the patient no longer severely ill): the gap keeps it from flapping.
const OXYGEN_ON_BELOW: f64 = 92.5;
const OXYGEN_OFF_ABOVE: f64 = 95.0;
/// How much supplemental oxygen lifts the saturation.
const OXYGEN_LIFT: f64 = 3.0;
/// Couplings: per degree of fever, and per percent of saturation below 95.
const FEVER_HR: f64 = 10.0;
const FEVER_RR: f64 = 2.0;
const HYPOXIA_HR: f64 = 2.0;
const HYPOXIA_RR: f64 = 0.8;
/// Personal drift is slow: a quarter of an hour to revert.
const DRIFT_TAU_SECS: f64 = 900.0;

/// One vital sign: baseline, slow personal drift, and the current physiological level.
#[derive(Clone, Debug)]
struct Channel {
    base: f64,
    drift: f64,
    level: f64,
    /// How quickly the level follows its target, in seconds.
    tau: f64,
    /// Stationary standard deviations of drift and level, and the sensor noise per sample.
    drift_sd: f64,
    level_sd: f64,
    noise_sd: f64,
}

impl Channel {
    fn new(base: f64, tau: f64, drift_sd: f64, level_sd: f64, noise_sd: f64) -> Channel {
        Channel {
            base,
            drift: 0.0,
            level: base,
            tau,
            drift_sd,
            level_sd,
            noise_sd,
        }
    }

    /// Moves drift and level forward by `dt` seconds; `extra` is the scenario offset plus
    /// couplings on top of baseline and drift.
    fn advance<R: Rng + ?Sized>(&mut self, extra: f64, dt: f64, rng: &mut R) {
        self.drift = ou_step(self.drift, 0.0, DRIFT_TAU_SECS, self.drift_sd, dt, rng);
        let target = self.base + self.drift + extra;
        self.level = ou_step(self.level, target, self.tau, self.level_sd, dt, rng);
    }

    fn measure<R: Rng + ?Sized>(&self, rng: &mut R) -> f64 {
        self.level + self.noise_sd * standard_normal(rng)
    }
}

/// Exact Ornstein-Uhlenbeck transition: reverts towards `mean` with time constant `tau` and
/// keeps a stationary standard deviation `sd`, whatever the step.
fn ou_step<R: Rng + ?Sized>(x: f64, mean: f64, tau: f64, sd: f64, dt: f64, rng: &mut R) -> f64 {
    let a = (-dt / tau).exp();
    mean + (x - mean) * a + sd * (1.0 - a * a).sqrt() * standard_normal(rng)
}

/// A simulated adult patient.
#[derive(Clone, Debug)]
pub struct Patient {
    heart_rate: Channel,
    respiratory_rate: Channel,
    /// Saturation on room air; the oxygen lift is added when measured.
    spo2: Channel,
    temperature: Channel,
    systolic_bp: Channel,
    diastolic_bp: Channel,
    scenario: Scenario,
    in_scenario: Duration,
    /// Offsets when the scenario was set, and now.
    from: Offsets,
    offsets: Offsets,
    on_oxygen: bool,
    artefacts: Artefacts,
    probe_off_left: u32,
    motion_left: u32,
    motion_lift: f64,
    counts: ArtefactCounts,
}

impl Patient {
    /// A patient with a healthy resting baseline drawn from `rng`, stable, with the default
    /// artefact rates.
    pub fn new<R: Rng + ?Sized>(rng: &mut R) -> Patient {
        // Baselines sit far enough inside the healthy resting ranges that drift and noise
        // stay inside them over hours: HR 60-90, RR 12-18, SpO2 95-99, 36.4-37.4 °C,
        // systolic 110-135.
        Patient {
            heart_rate: Channel::new(rng.gen_range(70.0..76.0), 30.0, 1.0, 1.4, 0.8),
            respiratory_rate: Channel::new(rng.gen_range(14.0..16.0), 60.0, 0.25, 0.35, 0.25),
            spo2: Channel::new(rng.gen_range(96.5..97.3), 20.0, 0.15, 0.25, 0.3),
            temperature: Channel::new(rng.gen_range(36.7..37.1), 300.0, 0.04, 0.04, 0.02),
            systolic_bp: Channel::new(rng.gen_range(119.0..126.0), 45.0, 0.8, 1.0, 1.0),
            diastolic_bp: Channel::new(rng.gen_range(72.0..80.0), 45.0, 0.6, 0.8, 0.8),
            scenario: Scenario::Stable,
            in_scenario: Duration::ZERO,
            from: Offsets::default(),
            offsets: Offsets::default(),
            on_oxygen: false,
            artefacts: Artefacts::default(),
            probe_off_left: 0,
            motion_left: 0,
            motion_lift: 0.0,
            counts: ArtefactCounts::default(),
        }
    }

    pub fn with_artefacts(mut self, artefacts: Artefacts) -> Patient {
        self.artefacts = artefacts;
        self
    }

    pub fn with_scenario(mut self, scenario: Scenario) -> Patient {
        self.set_scenario(scenario);
        self
    }

    /// Starts `scenario` from the patient's present state.
    pub fn set_scenario(&mut self, scenario: Scenario) {
        self.from = self.offsets;
        self.scenario = scenario;
        self.in_scenario = Duration::ZERO;
    }

    pub fn scenario(&self) -> Scenario {
        self.scenario
    }

    pub fn artefact_counts(&self) -> ArtefactCounts {
        self.counts
    }

    /// Advances the patient by `dt` and returns what the monitor measures at the end of it.
    pub fn step<R: Rng + ?Sized>(&mut self, dt: Duration, rng: &mut R) -> Vitals {
        let secs = dt.as_secs_f64();
        self.in_scenario += dt;
        self.offsets = self.scenario_offsets();

        self.update_oxygen();
        self.advance_channels(secs, rng);
        self.update_artefacts(secs, rng);
        self.measure(rng)
    }

    fn scenario_offsets(&self) -> Offsets {
        let progress = |over: Duration| {
            if over.is_zero() {
                1.0
            } else {
                (self.in_scenario.as_secs_f64() / over.as_secs_f64()).min(1.0)
            }
        };
        match self.scenario {
            Scenario::Stable => self.from,
            Scenario::SlowDeterioration { over } => {
                Offsets::lerp(self.from, SEPSIS, progress(over))
            }
            Scenario::SuddenEvent { onset } => {
                Offsets::lerp(self.from, DESATURATION, progress(onset))
            }
            Scenario::Recovery { over } => {
                Offsets::lerp(self.from, Offsets::default(), progress(over))
            }
        }
    }

    /// The ward's response to the saturation on air, with hysteresis.
    fn update_oxygen(&mut self) {
        let on_air = self.spo2.level;
        if on_air < OXYGEN_ON_BELOW {
            self.on_oxygen = true;
        } else if on_air > OXYGEN_OFF_ABOVE && self.offsets.severity < 0.3 {
            self.on_oxygen = false;
        }
    }

    fn saturation(&self) -> f64 {
        let lift = if self.on_oxygen { OXYGEN_LIFT } else { 0.0 };
        (self.spo2.level + lift).min(100.0)
    }

    fn advance_channels<R: Rng + ?Sized>(&mut self, secs: f64, rng: &mut R) {
        let off = self.offsets;
        let fever = (self.temperature.level - self.temperature.base).max(0.0);
        let hypoxia = (95.0 - self.saturation()).max(0.0);

        let hr = off.heart_rate + FEVER_HR * fever + HYPOXIA_HR * hypoxia;
        let rr = off.respiratory_rate + FEVER_RR * fever + HYPOXIA_RR * hypoxia;
        self.heart_rate.advance(hr, secs, rng);
        self.respiratory_rate.advance(rr, secs, rng);
        self.spo2.advance(off.spo2, secs, rng);
        self.temperature.advance(off.temperature, secs, rng);
        self.systolic_bp.advance(off.systolic_bp, secs, rng);
        self.diastolic_bp.advance(off.diastolic_bp, secs, rng);
    }

    /// Ends running artefact episodes sample by sample and starts new ones at their rates.
    fn update_artefacts<R: Rng + ?Sized>(&mut self, secs: f64, rng: &mut R) {
        let hours = secs / 3600.0;
        self.probe_off_left = self.probe_off_left.saturating_sub(1);
        self.motion_left = self.motion_left.saturating_sub(1);

        if self.probe_off_left == 0
            && rng.gen_bool(chance(self.artefacts.probe_off_per_hour, hours))
        {
            self.probe_off_left = rng.gen_range(3..=10);
            self.counts.probe_off += 1;
        }
        if self.motion_left == 0 && rng.gen_bool(chance(self.artefacts.motion_per_hour, hours)) {
            self.motion_left = rng.gen_range(2..=5);
            self.motion_lift = rng.gen_range(20.0..45.0);
            self.counts.motion += 1;
        }
    }

    fn measure<R: Rng + ?Sized>(&self, rng: &mut R) -> Vitals {
        let mut vitals = Vitals::new();
        let motion = if self.motion_left > 0 {
            self.motion_lift
        } else {
            0.0
        };
        let hr = self.heart_rate.measure(rng) + motion;
        vitals.insert(HEART_RATE, hr.clamp(20.0, 250.0).round());
        let rr = self.respiratory_rate.measure(rng);
        vitals.insert(RESPIRATORY_RATE, rr.clamp(4.0, 60.0).round());

        // The noise is drawn even while the probe is off, so that an artefact does not shift
        // every later random draw and a seeded run stays comparable with and without them.
        let spo2 = self.saturation() + self.spo2.noise_sd * standard_normal(rng);
        if self.probe_off_left == 0 {
            vitals.insert(SPO2, spo2.clamp(50.0, 100.0).round());
        }

        let temperature = self.temperature.measure(rng).clamp(30.0, 43.0);
        vitals.insert(TEMPERATURE, (temperature * 10.0).round() / 10.0);
        let systolic = self.systolic_bp.measure(rng).clamp(40.0, 260.0).round();
        let diastolic = self
            .diastolic_bp
            .measure(rng)
            .clamp(20.0, systolic - 10.0)
            .round();
        vitals.insert(SYSTOLIC_BP, systolic);
        vitals.insert(DIASTOLIC_BP, diastolic);

        let confused = self.offsets.severity > CONFUSION_SEVERITY;
        vitals.insert(CONSCIOUSNESS, if confused { 1.0 } else { 0.0 });
        vitals.insert(SUPPLEMENTAL_OXYGEN, if self.on_oxygen { 1.0 } else { 0.0 });
        vitals
    }
}

/// The probability that an event with `per_hour` rate starts within `hours`.
fn chance(per_hour: f64, hours: f64) -> f64 {
    if per_hour.is_finite() && per_hour > 0.0 {
        (1.0 - (-per_hour * hours).exp()).clamp(0.0, 1.0)
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::SeedableRng;
    use telemon_alerts::news2::{self, Consciousness, Observations, Spo2Scale};

    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    fn news2(v: &Vitals) -> Option<u8> {
        let obs = Observations {
            respiratory_rate: *v.get(RESPIRATORY_RATE)?,
            spo2: *v.get(SPO2)?,
            supplemental_oxygen: *v.get(SUPPLEMENTAL_OXYGEN)? == 1.0,
            systolic_bp: *v.get(SYSTOLIC_BP)?,
            heart_rate: *v.get(HEART_RATE)?,
            consciousness: Consciousness::from_code(*v.get(CONSCIOUSNESS)?)?,
            temperature: *v.get(TEMPERATURE)?,
        };
        Some(news2::score(&obs, Spo2Scale::One).aggregate)
    }

    fn run(patient: &mut Patient, rng: &mut StdRng, seconds: u64) -> Vec<Vitals> {
        (0..seconds).map(|_| patient.step(SECOND, rng)).collect()
    }

    #[test]
    fn stable_patient_stays_in_resting_ranges_for_an_hour() {
        let ranges = [
            (HEART_RATE, 60.0, 90.0),
            (RESPIRATORY_RATE, 12.0, 18.0),
            (SPO2, 95.0, 99.0),
            (TEMPERATURE, 36.4, 37.4),
            (SYSTOLIC_BP, 110.0, 135.0),
            (DIASTOLIC_BP, 60.0, 90.0),
            (CONSCIOUSNESS, 0.0, 0.0),
            (SUPPLEMENTAL_OXYGEN, 0.0, 0.0),
        ];
        for seed in 0..8 {
            let mut rng = StdRng::seed_from_u64(seed);
            let mut patient = Patient::new(&mut rng).with_artefacts(Artefacts::NONE);
            let samples = run(&mut patient, &mut rng, 3600);
            for (i, vitals) in samples.iter().enumerate() {
                assert_eq!(vitals.len(), METRICS.len(), "seed {seed} sample {i}");
                for (metric, low, high) in ranges {
                    let v = vitals[metric];
                    assert!(
                        (low..=high).contains(&v),
                        "seed {seed} second {i}: {metric} {v} outside {low}-{high}"
                    );
                }
                // SpO2 95 is within resting range yet scores 1 in NEWS2.
                let score = news2(vitals);
                assert!(score <= Some(1), "seed {seed} second {i}: {vitals:?}");
            }
            let zero = samples.iter().filter(|v| news2(v) == Some(0)).count();
            assert!(
                zero > samples.len() * 9 / 10,
                "seed {seed}: NEWS2 0 only {zero} times"
            );
        }
    }

    #[test]
    fn stable_vitals_vary_rather_than_flatline() {
        let mut rng = StdRng::seed_from_u64(1);
        let mut patient = Patient::new(&mut rng);
        let samples = run(&mut patient, &mut rng, 600);
        for metric in [HEART_RATE, SYSTOLIC_BP, TEMPERATURE] {
            let values: Vec<f64> = samples
                .iter()
                .filter_map(|v| v.get(metric).copied())
                .collect();
            let min = values.iter().copied().fold(f64::INFINITY, f64::min);
            let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            assert!(max > min, "{metric} never changed");
        }
    }

    #[test]
    fn slow_deterioration_reaches_news2_emergency_within_its_duration() {
        let over = Duration::from_secs(20 * 60);
        for seed in 0..5 {
            let mut rng = StdRng::seed_from_u64(seed);
            let mut patient =
                Patient::new(&mut rng).with_scenario(Scenario::SlowDeterioration { over });
            let samples = run(&mut patient, &mut rng, over.as_secs());

            let first = samples
                .iter()
                .position(|v| news2(v).is_some_and(|s| s >= 7));
            assert!(first.is_some(), "seed {seed}: NEWS2 never reached 7");
            let tail: Vec<_> = samples[samples.len() - 60..]
                .iter()
                .filter_map(news2)
                .collect();
            assert!(
                !tail.is_empty(),
                "seed {seed}: no complete sample in the last minute"
            );
            assert!(
                tail.iter().all(|&s| s >= 7),
                "seed {seed}: last minute {tail:?}"
            );

            let start: Vec<_> = samples[..60].iter().filter_map(news2).collect();
            assert!(
                start.iter().all(|&s| s <= 2),
                "seed {seed}: started ill {start:?}"
            );
        }
    }

    #[test]
    fn deterioration_moves_every_vital_sign_the_septic_way() {
        let mut rng = StdRng::seed_from_u64(3);
        let mut patient = Patient::new(&mut rng).with_artefacts(Artefacts::NONE);
        let before = run(&mut patient, &mut rng, 60).pop().unwrap_or_default();
        patient.set_scenario(Scenario::SlowDeterioration {
            over: Duration::from_secs(600),
        });
        let after = run(&mut patient, &mut rng, 900).pop().unwrap_or_default();
        assert!(
            after[HEART_RATE] > before[HEART_RATE] + 25.0,
            "{before:?} {after:?}"
        );
        assert!(after[RESPIRATORY_RATE] > before[RESPIRATORY_RATE] + 6.0);
        assert!(after[TEMPERATURE] > before[TEMPERATURE] + 1.5);
        assert!(after[SYSTOLIC_BP] < before[SYSTOLIC_BP] - 25.0);
        assert_eq!(after[SUPPLEMENTAL_OXYGEN], 1.0);
        assert_eq!(after[CONSCIOUSNESS], 1.0);
    }

    #[test]
    fn sudden_event_desaturates_within_its_onset() {
        let mut rng = StdRng::seed_from_u64(4);
        let mut patient = Patient::new(&mut rng).with_artefacts(Artefacts::NONE);
        run(&mut patient, &mut rng, 60);
        patient.set_scenario(Scenario::SuddenEvent {
            onset: Duration::from_secs(30),
        });
        let samples = run(&mut patient, &mut rng, 120);
        let lowest = samples.iter().map(|v| v[SPO2]).fold(100.0, f64::min);
        assert!(lowest <= 90.0, "lowest SpO2 {lowest}");
        let last = &samples[samples.len() - 1];
        assert_eq!(last[SUPPLEMENTAL_OXYGEN], 1.0, "{last:?}");
        assert!(news2(last).is_some_and(|s| s >= 5), "{last:?}");
    }

    #[test]
    fn recovery_returns_to_baseline_after_deterioration() {
        let mut rng = StdRng::seed_from_u64(5);
        let mut patient = Patient::new(&mut rng).with_artefacts(Artefacts::NONE);
        let baseline = run(&mut patient, &mut rng, 120);
        patient.set_scenario(Scenario::SlowDeterioration {
            over: Duration::from_secs(900),
        });
        let ill = run(&mut patient, &mut rng, 900);
        assert!(news2(&ill[ill.len() - 1]).is_some_and(|s| s >= 7));

        patient.set_scenario(Scenario::Recovery {
            over: Duration::from_secs(900),
        });
        let recovered = run(&mut patient, &mut rng, 1800);
        let tail = &recovered[recovered.len() - 300..];
        assert!(
            tail.iter().all(|v| news2(v).is_some_and(|s| s <= 1)),
            "{:?}",
            tail[0]
        );
        let mean = |s: &[Vitals], m| s.iter().map(|v| v[m]).sum::<f64>() / s.len() as f64;
        for (metric, tolerance) in [(HEART_RATE, 6.0), (SYSTOLIC_BP, 6.0), (TEMPERATURE, 0.3)] {
            let (was, now) = (mean(&baseline, metric), mean(tail, metric));
            assert!((was - now).abs() < tolerance, "{metric}: {was} then {now}");
        }
    }

    #[test]
    fn artefacts_appear_at_the_configured_rate() {
        let mut rng = StdRng::seed_from_u64(6);
        let artefacts = Artefacts {
            probe_off_per_hour: 12.0,
            motion_per_hour: 30.0,
        };
        let mut patient = Patient::new(&mut rng).with_artefacts(artefacts);
        let hours = 10;
        let samples = run(&mut patient, &mut rng, hours * 3600);

        // Probe-off episodes, counted from the published data: SpO2 present, then missing.
        let gaps = samples
            .windows(2)
            .filter(|w| w[0].contains_key(SPO2) && !w[1].contains_key(SPO2))
            .count() as f64;
        // Expected 120 (Poisson, sd 11); the bound is generous but far from 0 or 2x.
        assert!((90.0..=150.0).contains(&gaps), "{gaps} probe-off episodes");
        assert_eq!(patient.artefact_counts().probe_off as f64, gaps);

        let motion = patient.artefact_counts().motion as f64;
        assert!(
            (240.0..=360.0).contains(&motion),
            "{motion} motion episodes"
        );
        let spikes = samples.iter().filter(|v| v[HEART_RATE] > 95.0).count();
        assert!(spikes as f64 >= motion * 2.0, "{spikes} spiked samples");
    }

    #[test]
    fn no_artefacts_when_disabled() {
        let mut rng = StdRng::seed_from_u64(7);
        let mut patient = Patient::new(&mut rng).with_artefacts(Artefacts::NONE);
        let samples = run(&mut patient, &mut rng, 3600);
        assert!(samples.iter().all(|v| v.contains_key(SPO2)));
        assert_eq!(patient.artefact_counts(), ArtefactCounts::default());
    }

    #[test]
    fn same_seed_same_patient() {
        let replay = |seed| {
            let mut rng = StdRng::seed_from_u64(seed);
            let mut patient = Patient::new(&mut rng).with_scenario(Scenario::SlowDeterioration {
                over: Duration::from_secs(300),
            });
            run(&mut patient, &mut rng, 600)
        };
        assert_eq!(replay(42), replay(42));
        assert_ne!(replay(42), replay(43));
    }

    #[test]
    fn scenarios_parse_with_and_without_durations() {
        assert_eq!("Stable".parse(), Ok(Scenario::Stable));
        assert_eq!(
            "SlowDeterioration".parse(),
            Ok(Scenario::SlowDeterioration {
                over: DEFAULT_DETERIORATION
            })
        );
        assert_eq!(
            " SuddenEvent(30s) ".parse(),
            Ok(Scenario::SuddenEvent {
                onset: Duration::from_secs(30)
            })
        );
        let recovery = Scenario::Recovery {
            over: Duration::from_secs(3600),
        };
        assert_eq!("Recovery(1h)".parse(), Ok(recovery));
        assert_eq!(recovery.to_string().parse(), Ok(recovery));
        for bad in [
            "",
            "stable",
            "Stable(1m)",
            "Recovery(",
            "Recovery(0s)",
            "Recovery(x)",
        ] {
            assert!(bad.parse::<Scenario>().is_err(), "{bad:?} accepted");
        }
    }
}
