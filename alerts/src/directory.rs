//! The directory: which patient a device is attached to, which group (ward) a patient is in,
//! the SpO2 scale each patient is scored on, and per-patient overrides of rule limits.
//!
//! The engine asks the directory for a reading's subject: the patient of its device, or the
//! device itself when it belongs to no patient (a room sensor, a gateway).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::news2::Spo2Scale;

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Directory {
    /// Device id -> patient id.
    #[serde(default)]
    pub devices: BTreeMap<String, String>,
    /// Patient id -> what the engine needs to know about the patient.
    #[serde(default)]
    pub patients: BTreeMap<String, Patient>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Patient {
    /// The group (ward) the patient is in, matched by `Scope::Group`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Scale 1 unless a clinician prescribed the 88-92 % target of scale 2.
    #[serde(default)]
    pub spo2_scale: Spo2Scale,
    /// Rule id -> limits that replace the rule's for this patient only.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub overrides: BTreeMap<String, LimitOverride>,
}

/// A patient's own limits for one threshold rule: every field set here replaces the rule's,
/// every field left out keeps it. `enabled = false` switches the rule off for the patient.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitOverride {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub above: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub below: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clear_above: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clear_below: Option<f64>,
    #[serde(
        rename = "for",
        default,
        skip_serializing_if = "Option::is_none",
        with = "crate::duration::option"
    )]
    pub for_: Option<Duration>,
}

impl Directory {
    /// Attaches a device to a patient (builder style, for set-up code and tests).
    /// The directory as stored by the API (patients, their wards and SpO2 scales, and which
    /// device monitors whom). Per-patient limit overrides are not stored there.
    pub fn from_store(stored: telemon_store::PatientDirectory) -> Directory {
        let patients = stored
            .patients
            .into_iter()
            .map(|(id, (group, scale))| {
                let spo2_scale = if scale == 2 {
                    Spo2Scale::Two
                } else {
                    Spo2Scale::One
                };
                let patient = Patient {
                    group,
                    spo2_scale,
                    overrides: BTreeMap::new(),
                };
                (id, patient)
            })
            .collect();
        Directory {
            devices: stored.devices,
            patients,
        }
    }

    pub fn with_device(mut self, device: &str, patient: &str) -> Self {
        self.devices.insert(device.to_string(), patient.to_string());
        self
    }

    /// Adds or replaces a patient (builder style).
    pub fn with_patient(mut self, patient: &str, entry: Patient) -> Self {
        self.patients.insert(patient.to_string(), entry);
        self
    }

    pub fn patient_of(&self, device: &str) -> Option<&str> {
        self.devices.get(device).map(String::as_str)
    }

    pub fn group_of(&self, patient: &str) -> Option<&str> {
        self.patients.get(patient)?.group.as_deref()
    }

    /// Who alerts about this device's readings are about: its patient, or the device itself.
    pub fn subject_of<'a>(&'a self, device: &'a str) -> &'a str {
        self.patient_of(device).unwrap_or(device)
    }

    pub fn spo2_scale(&self, patient: &str) -> Spo2Scale {
        self.patients
            .get(patient)
            .map(|p| p.spo2_scale)
            .unwrap_or_default()
    }

    pub fn override_for(&self, patient: &str, rule: &str) -> Option<&LimitOverride> {
        self.patients.get(patient)?.overrides.get(rule)
    }

    /// Every device the directory knows of.
    pub fn devices(&self) -> impl Iterator<Item = &str> {
        self.devices.keys().map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subject_is_the_patient_or_else_the_device() {
        let dir = Directory::default().with_device("bed-1", "p1");
        assert_eq!(dir.subject_of("bed-1"), "p1");
        assert_eq!(dir.subject_of("hall-sensor"), "hall-sensor");
    }

    #[test]
    fn parses_from_toml_and_refuses_unknown_fields() {
        let text = r#"
            [devices]
            bed-1 = "p1"

            [patients.p1]
            group = "ward-3"
            spo2_scale = 2

            [patients.p1.overrides.hr-high]
            above = 140
            for = "1m"
        "#;
        let dir: Directory = toml::from_str(text).unwrap();
        assert_eq!(dir.group_of("p1"), Some("ward-3"));
        assert_eq!(dir.spo2_scale("p1"), Spo2Scale::Two);
        assert_eq!(dir.spo2_scale("nobody"), Spo2Scale::One);
        let o = dir.override_for("p1", "hr-high").unwrap();
        assert_eq!(
            (o.above, o.for_),
            (Some(140.0), Some(Duration::from_secs(60)))
        );
        assert!(toml::from_str::<Directory>("[patients.p1]\nward = \"x\"").is_err());
        assert!(toml::from_str::<Directory>("[patients.p1]\nspo2_scale = 3").is_err());
    }
}
