//! NEWS2, the National Early Warning Score 2 (Royal College of Physicians, 2017): sub-scores
//! for seven physiological parameters, their aggregate and the clinical risk band.
//!
//! Scoring is a pure function of one set of observations. Each cut-off in the RCP chart is
//! the inclusive upper bound of its band, so values between two printed bands (a temperature
//! of 36.05 °C, a rate of 8.5/min) fall into the band above the lower bound they exceed.

use serde::{Deserialize, Serialize};

/// Which SpO2 scale a patient is scored on. Scale 2 is for patients with hypercapnic
/// respiratory failure whose prescribed target saturation is 88-92 %; it is a clinical
/// decision per patient, so it comes from the [`crate::Directory`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "u8", into = "u8")]
pub enum Spo2Scale {
    #[default]
    One,
    Two,
}

impl TryFrom<u8> for Spo2Scale {
    type Error = String;

    fn try_from(n: u8) -> Result<Self, String> {
        match n {
            1 => Ok(Spo2Scale::One),
            2 => Ok(Spo2Scale::Two),
            _ => Err(format!("SpO2 scale {n}: use 1 or 2")),
        }
    }
}

impl From<Spo2Scale> for u8 {
    fn from(s: Spo2Scale) -> u8 {
        match s {
            Spo2Scale::One => 1,
            Spo2Scale::Two => 2,
        }
    }
}

/// Level of consciousness on the ACVPU scale. The wire encoding (metric `consciousness`) is
/// the number in brackets, or the letter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Consciousness {
    /// A (0): alert.
    Alert,
    /// C (1): new confusion.
    NewConfusion,
    /// V (2): responds to voice.
    Voice,
    /// P (3): responds to pain.
    Pain,
    /// U (4): unresponsive.
    Unresponsive,
}

impl Consciousness {
    /// From the numeric code 0-4; anything else (fractions, other numbers) is not a level.
    pub fn from_code(code: f64) -> Option<Self> {
        const LEVELS: [Consciousness; 5] = [
            Consciousness::Alert,
            Consciousness::NewConfusion,
            Consciousness::Voice,
            Consciousness::Pain,
            Consciousness::Unresponsive,
        ];
        if code.fract() != 0.0 || !(0.0..=4.0).contains(&code) {
            return None;
        }
        LEVELS.get(code as usize).copied()
    }

    /// From the ACVPU letter, in either case.
    pub fn from_letter(letter: &str) -> Option<Self> {
        match letter.trim().to_ascii_uppercase().as_str() {
            "A" => Some(Consciousness::Alert),
            "C" => Some(Consciousness::NewConfusion),
            "V" => Some(Consciousness::Voice),
            "P" => Some(Consciousness::Pain),
            "U" => Some(Consciousness::Unresponsive),
            _ => None,
        }
    }
}

/// One complete set of observations, in the units of the NEWS2 chart.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Observations {
    /// Breaths per minute.
    pub respiratory_rate: f64,
    /// Percent.
    pub spo2: f64,
    /// On supplemental oxygen (any device, any flow) rather than room air.
    pub supplemental_oxygen: bool,
    /// mmHg.
    pub systolic_bp: f64,
    /// Pulse, beats per minute.
    pub heart_rate: f64,
    pub consciousness: Consciousness,
    /// Degrees Celsius.
    pub temperature: f64,
}

/// The score of each parameter, 0-3.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct SubScores {
    pub respiratory_rate: u8,
    pub spo2: u8,
    pub supplemental_oxygen: u8,
    pub systolic_bp: u8,
    pub heart_rate: u8,
    pub consciousness: u8,
    pub temperature: u8,
}

impl SubScores {
    fn all(&self) -> [u8; 7] {
        [
            self.respiratory_rate,
            self.spo2,
            self.supplemental_oxygen,
            self.systolic_bp,
            self.heart_rate,
            self.consciousness,
            self.temperature,
        ]
    }
}

/// The RCP clinical risk bands, which set the urgency of the clinical response.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ClinicalRisk {
    /// Aggregate 0-4 and no single parameter at 3.
    Low,
    /// Aggregate 0-4 with a single parameter at 3: an urgent ward-based response.
    LowMedium,
    /// Aggregate 5-6: an urgent response.
    Medium,
    /// Aggregate 7 or more: an emergency response.
    High,
}

impl ClinicalRisk {
    pub fn as_str(self) -> &'static str {
        match self {
            ClinicalRisk::Low => "low",
            ClinicalRisk::LowMedium => "low-medium",
            ClinicalRisk::Medium => "medium",
            ClinicalRisk::High => "high",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct News2Score {
    pub aggregate: u8,
    pub sub_scores: SubScores,
    /// Some parameter scored 3 on its own, which calls for an urgent review whatever the sum.
    pub has_single_3: bool,
    pub clinical_risk: ClinicalRisk,
}

/// Scores one set of observations on the patient's SpO2 scale.
pub fn score(obs: &Observations, scale: Spo2Scale) -> News2Score {
    let sub_scores = SubScores {
        respiratory_rate: respiratory_rate(obs.respiratory_rate),
        spo2: spo2(obs.spo2, scale, obs.supplemental_oxygen),
        supplemental_oxygen: if obs.supplemental_oxygen { 2 } else { 0 },
        systolic_bp: systolic_bp(obs.systolic_bp),
        heart_rate: heart_rate(obs.heart_rate),
        consciousness: consciousness(obs.consciousness),
        temperature: temperature(obs.temperature),
    };
    let aggregate = sub_scores.all().iter().sum();
    let has_single_3 = sub_scores.all().contains(&3);
    let clinical_risk = match aggregate {
        7.. => ClinicalRisk::High,
        5..=6 => ClinicalRisk::Medium,
        _ if has_single_3 => ClinicalRisk::LowMedium,
        _ => ClinicalRisk::Low,
    };
    News2Score {
        aggregate,
        sub_scores,
        has_single_3,
        clinical_risk,
    }
}

/// Scores by the first band whose inclusive upper bound holds the value; above all bounds
/// scores `top`.
fn banded(value: f64, bands: &[(f64, u8)], top: u8) -> u8 {
    bands
        .iter()
        .find(|(upper, _)| value <= *upper)
        .map_or(top, |(_, s)| *s)
}

pub fn respiratory_rate(per_min: f64) -> u8 {
    banded(per_min, &[(8.0, 3), (11.0, 1), (20.0, 0), (24.0, 2)], 3)
}

pub fn spo2(percent: f64, scale: Spo2Scale, on_oxygen: bool) -> u8 {
    match scale {
        Spo2Scale::One => banded(percent, &[(91.0, 3), (93.0, 2), (95.0, 1)], 0),
        // On scale 2, 93 % and above only scores when the patient is on oxygen: on air it is
        // within target, on oxygen it risks hypercapnia.
        Spo2Scale::Two if percent <= 92.0 || !on_oxygen => {
            banded(percent, &[(83.0, 3), (85.0, 2), (87.0, 1)], 0)
        }
        Spo2Scale::Two => banded(percent, &[(94.0, 1), (96.0, 2)], 3),
    }
}

pub fn systolic_bp(mmhg: f64) -> u8 {
    banded(mmhg, &[(90.0, 3), (100.0, 2), (110.0, 1), (219.0, 0)], 3)
}

pub fn heart_rate(per_min: f64) -> u8 {
    banded(
        per_min,
        &[(40.0, 3), (50.0, 1), (90.0, 0), (110.0, 1), (130.0, 2)],
        3,
    )
}

pub fn consciousness(level: Consciousness) -> u8 {
    if level == Consciousness::Alert {
        0
    } else {
        3
    }
}

pub fn temperature(celsius: f64) -> u8 {
    banded(celsius, &[(35.0, 3), (36.0, 1), (38.0, 0), (39.0, 1)], 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every (value, expected sub-score) pair sits on one side of a cut-off; each cut-off
    /// appears with its neighbour on the other side.
    #[test]
    fn respiratory_rate_at_every_boundary() {
        let cases = [
            (8.0, 3),
            (9.0, 1),
            (11.0, 1),
            (12.0, 0),
            (20.0, 0),
            (21.0, 2),
        ];
        let cases = cases
            .iter()
            .chain(&[(24.0, 2), (25.0, 3), (0.0, 3), (60.0, 3)]);
        for &(v, want) in cases {
            assert_eq!(respiratory_rate(v), want, "respiratory rate {v}");
        }
    }

    #[test]
    fn spo2_scale_1_at_every_boundary_on_air_and_oxygen() {
        for on_oxygen in [false, true] {
            for (v, want) in [
                (91.0, 3),
                (92.0, 2),
                (93.0, 2),
                (94.0, 1),
                (95.0, 1),
                (96.0, 0),
            ] {
                assert_eq!(
                    spo2(v, Spo2Scale::One, on_oxygen),
                    want,
                    "{v} oxygen={on_oxygen}"
                );
            }
            assert_eq!(spo2(100.0, Spo2Scale::One, on_oxygen), 0);
        }
    }

    #[test]
    fn spo2_scale_2_at_every_boundary_on_air() {
        let cases = [
            (83.0, 3),
            (84.0, 2),
            (85.0, 2),
            (86.0, 1),
            (87.0, 1),
            (88.0, 0),
        ];
        let cases = cases
            .iter()
            .chain(&[(92.0, 0), (93.0, 0), (97.0, 0), (100.0, 0)]);
        for &(v, want) in cases {
            assert_eq!(spo2(v, Spo2Scale::Two, false), want, "{v} on air");
        }
    }

    #[test]
    fn spo2_scale_2_at_every_boundary_on_oxygen() {
        let low = [
            (83.0, 3),
            (84.0, 2),
            (85.0, 2),
            (86.0, 1),
            (87.0, 1),
            (88.0, 0),
            (92.0, 0),
        ];
        let high = [
            (93.0, 1),
            (94.0, 1),
            (95.0, 2),
            (96.0, 2),
            (97.0, 3),
            (100.0, 3),
        ];
        for &(v, want) in low.iter().chain(&high) {
            assert_eq!(spo2(v, Spo2Scale::Two, true), want, "{v} on oxygen");
        }
    }

    #[test]
    fn systolic_bp_at_every_boundary() {
        let cases = [
            (90.0, 3),
            (91.0, 2),
            (100.0, 2),
            (101.0, 1),
            (110.0, 1),
            (111.0, 0),
        ];
        for &(v, want) in cases.iter().chain(&[(219.0, 0), (220.0, 3)]) {
            assert_eq!(systolic_bp(v), want, "systolic {v}");
        }
    }

    #[test]
    fn heart_rate_at_every_boundary() {
        let cases = [
            (40.0, 3),
            (41.0, 1),
            (50.0, 1),
            (51.0, 0),
            (90.0, 0),
            (91.0, 1),
        ];
        let cases = cases
            .iter()
            .chain(&[(110.0, 1), (111.0, 2), (130.0, 2), (131.0, 3)]);
        for &(v, want) in cases {
            assert_eq!(heart_rate(v), want, "pulse {v}");
        }
    }

    #[test]
    fn consciousness_scores_anything_but_alert_as_3() {
        assert_eq!(consciousness(Consciousness::Alert), 0);
        for code in 1..=4 {
            let level = Consciousness::from_code(code as f64).unwrap();
            assert_eq!(consciousness(level), 3, "code {code}");
        }
        assert_eq!(Consciousness::from_code(0.0), Some(Consciousness::Alert));
        assert_eq!(
            Consciousness::from_letter("c"),
            Some(Consciousness::NewConfusion)
        );
        for bad in [-1.0, 0.5, 5.0, f64::NAN] {
            assert_eq!(Consciousness::from_code(bad), None, "{bad}");
        }
        assert_eq!(Consciousness::from_letter("X"), None);
    }

    #[test]
    fn temperature_at_every_boundary() {
        let cases = [
            (35.0, 3),
            (35.1, 1),
            (36.0, 1),
            (36.1, 0),
            (38.0, 0),
            (38.1, 1),
        ];
        for &(v, want) in cases.iter().chain(&[(39.0, 1), (39.1, 2), (42.0, 2)]) {
            assert_eq!(temperature(v), want, "temperature {v}");
        }
    }

    #[test]
    fn supplemental_oxygen_scores_2() {
        let mut obs = normal();
        assert_eq!(
            score(&obs, Spo2Scale::One).sub_scores.supplemental_oxygen,
            0
        );
        obs.supplemental_oxygen = true;
        assert_eq!(
            score(&obs, Spo2Scale::One).sub_scores.supplemental_oxygen,
            2
        );
    }

    fn normal() -> Observations {
        Observations {
            respiratory_rate: 16.0,
            spo2: 97.0,
            supplemental_oxygen: false,
            systolic_bp: 120.0,
            heart_rate: 70.0,
            consciousness: Consciousness::Alert,
            temperature: 37.0,
        }
    }

    #[test]
    fn healthy_adult_scores_0_low_risk() {
        let s = score(&normal(), Spo2Scale::One);
        assert_eq!(
            (s.aggregate, s.has_single_3, s.clinical_risk),
            (0, false, ClinicalRisk::Low)
        );
    }

    /// RR 22 (2), SpO2 95 on scale 1 (1), on oxygen (2), systolic 105 (1), pulse 95 (1),
    /// alert (0), 38.5 °C (1): aggregate 8, high risk.
    #[test]
    fn worked_example_septic_patient_scores_8_high() {
        let obs = Observations {
            respiratory_rate: 22.0,
            spo2: 95.0,
            supplemental_oxygen: true,
            systolic_bp: 105.0,
            heart_rate: 95.0,
            consciousness: Consciousness::Alert,
            temperature: 38.5,
        };
        let s = score(&obs, Spo2Scale::One);
        let want = SubScores {
            respiratory_rate: 2,
            spo2: 1,
            supplemental_oxygen: 2,
            systolic_bp: 1,
            heart_rate: 1,
            consciousness: 0,
            temperature: 1,
        };
        assert_eq!(s.sub_scores, want);
        assert_eq!(
            (s.aggregate, s.has_single_3, s.clinical_risk),
            (8, false, ClinicalRisk::High)
        );
    }

    /// RR 18 (0), SpO2 94 on scale 2 on oxygen (1), on oxygen (2), systolic 100 (2),
    /// pulse 88 (0), alert (0), 36.0 °C (1): aggregate 6, medium risk. The same saturation on
    /// scale 1 would score 1 as well but for a different reason (below target, not above).
    #[test]
    fn worked_example_copd_patient_on_scale_2_scores_6_medium() {
        let obs = Observations {
            respiratory_rate: 18.0,
            spo2: 94.0,
            supplemental_oxygen: true,
            systolic_bp: 100.0,
            heart_rate: 88.0,
            consciousness: Consciousness::Alert,
            temperature: 36.0,
        };
        let s = score(&obs, Spo2Scale::Two);
        assert_eq!(s.sub_scores.spo2, 1);
        assert_eq!((s.aggregate, s.clinical_risk), (6, ClinicalRisk::Medium));
    }

    /// New confusion alone scores 3: aggregate 3 but low-medium risk, an urgent response.
    #[test]
    fn worked_example_single_3_is_low_medium() {
        let obs = Observations {
            consciousness: Consciousness::NewConfusion,
            ..normal()
        };
        let s = score(&obs, Spo2Scale::One);
        assert_eq!((s.aggregate, s.has_single_3), (3, true));
        assert_eq!(s.clinical_risk, ClinicalRisk::LowMedium);
    }

    #[test]
    fn risk_band_edges() {
        // Pulse 111 (2) + RR 21 (2) = 4: low; + temperature 38.1 (1) = 5: medium.
        let four = Observations {
            heart_rate: 111.0,
            respiratory_rate: 21.0,
            ..normal()
        };
        assert_eq!(
            score(&four, Spo2Scale::One).clinical_risk,
            ClinicalRisk::Low
        );
        let five = Observations {
            temperature: 38.1,
            ..four
        };
        assert_eq!(
            score(&five, Spo2Scale::One).clinical_risk,
            ClinicalRisk::Medium
        );
        let seven = Observations {
            systolic_bp: 100.0,
            ..five
        };
        assert_eq!(score(&seven, Spo2Scale::One).aggregate, 7);
        assert_eq!(
            score(&seven, Spo2Scale::One).clinical_risk,
            ClinicalRisk::High
        );
    }

    #[test]
    fn scale_parses_from_1_or_2_only() {
        assert_eq!(Spo2Scale::try_from(2), Ok(Spo2Scale::Two));
        assert!(Spo2Scale::try_from(3).is_err());
    }
}
