//! Rules as operators write them (TOML) and as the API exchanges them (JSON): what to watch,
//! for whom, and how urgent it is. Validation happens here, once, before the engine sees a
//! rule.

use std::collections::HashSet;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use telemon_model::Priority;

use crate::directory::Directory;
use crate::rules::{News2, RateOfChange, Silent, Threshold};

/// Longest rule id. Ids become part of alert ids and topics, so they stay short.
pub const MAX_RULE_ID_LEN: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum RuleError {
    #[error("rule file: {0}")]
    Toml(#[from] toml::de::Error),
    #[error("rule {rule:?}: {reason}")]
    Invalid { rule: String, reason: String },
    #[error("rule id {0:?} is used by more than one rule")]
    DuplicateId(String),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Stable name of the rule: 1-64 characters of A-Z a-z 0-9 . _ -
    pub id: String,
    /// Short human title, the start of every alert message (the id when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Priority of the alerts it raises (NEWS2 rules raise emergencies higher).
    pub priority: Priority,
    /// Which devices' readings the rule applies to; every device when absent.
    #[serde(default)]
    pub scope: Scope,
    /// A disabled rule evaluates nothing, and its active alerts resolve.
    #[serde(default = "enabled_by_default")]
    pub enabled: bool,
    /// A firing alert nobody acknowledged within this time goes up one priority level, and
    /// again after each further period, up to high.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "crate::duration::option"
    )]
    pub escalate_after: Option<Duration>,
    pub kind: RuleKind,
}

fn enabled_by_default() -> bool {
    true
}

/// The devices a rule watches.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// One device.
    Device(String),
    /// The devices attached to one patient.
    Patient(String),
    /// The devices of every patient in one group (ward).
    Group(String),
    #[default]
    All,
}

impl Scope {
    pub fn covers(&self, device: &str, directory: &Directory) -> bool {
        match self {
            Scope::Device(d) => d == device,
            Scope::Patient(p) => directory.patient_of(device) == Some(p.as_str()),
            Scope::Group(g) => directory
                .patient_of(device)
                .and_then(|p| directory.group_of(p))
                .is_some_and(|group| group == g),
            Scope::All => true,
        }
    }
}

/// What a rule watches for. Written as a `[rule.kind]` table whose `type` names the kind.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum RuleKind {
    Threshold(Threshold),
    RateOfChange(RateOfChange),
    Silent(Silent),
    News2(News2),
}

impl Rule {
    /// The title alert messages start with.
    pub fn title(&self) -> &str {
        self.name.as_deref().unwrap_or(&self.id)
    }

    pub fn validate(&self) -> Result<(), RuleError> {
        let invalid = |reason: String| RuleError::Invalid {
            rule: self.id.clone(),
            reason,
        };
        validate_id(&self.id).map_err(invalid)?;
        if self.escalate_after.is_some_and(|d| d.is_zero()) {
            return Err(invalid("`escalate_after` must be longer than zero".into()));
        }
        match &self.kind {
            RuleKind::Threshold(k) => k.validate(),
            RuleKind::RateOfChange(k) => k.validate(),
            RuleKind::Silent(k) => k.validate(),
            RuleKind::News2(k) => k.validate(),
        }
        .map_err(invalid)
    }
}

fn validate_id(id: &str) -> Result<(), String> {
    let valid_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if id.is_empty() || id.len() > MAX_RULE_ID_LEN || !id.chars().all(valid_char) {
        return Err("the id must be 1-64 characters of A-Z a-z 0-9 . _ -".into());
    }
    Ok(())
}

/// Validates every rule and that no two share an id.
pub fn validate_rules(rules: &[Rule]) -> Result<(), RuleError> {
    let mut seen = HashSet::new();
    for rule in rules {
        rule.validate()?;
        if !seen.insert(rule.id.as_str()) {
            return Err(RuleError::DuplicateId(rule.id.clone()));
        }
    }
    Ok(())
}

/// A rule file: a list of `[[rule]]` tables.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleFile {
    #[serde(default, rename = "rule")]
    pub rules: Vec<Rule>,
}

impl RuleFile {
    /// Parses and validates a rule file's text.
    pub fn from_toml(text: &str) -> Result<Vec<Rule>, RuleError> {
        let file: RuleFile = toml::from_str(text)?;
        validate_rules(&file.rules)?;
        Ok(file.rules)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::directory::Patient;

    /// The reference rule file shipped beside the crate must always load.
    #[test]
    fn reference_rules_toml_parses_and_validates() {
        let text = include_str!("../rules.toml");
        let rules = RuleFile::from_toml(text).unwrap();
        let kinds: HashSet<&str> = rules
            .iter()
            .map(|r| match r.kind {
                RuleKind::Threshold(_) => "threshold",
                RuleKind::RateOfChange(_) => "rate_of_change",
                RuleKind::Silent(_) => "silent",
                RuleKind::News2(_) => "news2",
            })
            .collect();
        assert_eq!(kinds.len(), 4, "every rule kind has an example: {kinds:?}");
        let hr = rules.iter().find(|r| r.id == "hr-high").unwrap();
        let RuleKind::Threshold(t) = &hr.kind else {
            panic!("hr-high is a threshold");
        };
        assert_eq!((t.above, t.for_), (Some(120.0), Duration::from_secs(30)));
        assert_eq!(hr.escalate_after, Some(Duration::from_secs(120)));
    }

    #[test]
    fn rules_round_trip_through_json() {
        let rules = RuleFile::from_toml(include_str!("../rules.toml")).unwrap();
        let json = serde_json::to_string(&rules).unwrap();
        let back: Vec<Rule> = serde_json::from_str(&json).unwrap();
        assert_eq!(back, rules);
    }

    #[test]
    fn rules_round_trip_through_toml() {
        let rules = RuleFile::from_toml(include_str!("../rules.toml")).unwrap();
        let text = toml::to_string(&RuleFile {
            rules: rules.clone(),
        })
        .unwrap();
        assert_eq!(RuleFile::from_toml(&text).unwrap(), rules, "{text}");
    }

    #[test]
    fn refuses_unknown_fields_at_every_level() {
        let base = "[[rule]]\nid = \"x\"\npriority = \"low\"\n";
        let kind = "[rule.kind]\ntype = \"silent\"\nafter = \"1m\"\n";
        assert!(RuleFile::from_toml(&format!("{base}{kind}")).is_ok());
        let typo_rule = format!("{base}prority = \"high\"\n{kind}");
        assert!(RuleFile::from_toml(&typo_rule).is_err());
        let typo_kind = format!("{base}{kind}afetr = \"2m\"\n");
        assert!(RuleFile::from_toml(&typo_kind).is_err());
        assert!(RuleFile::from_toml("[[rules]]\nid = \"x\"").is_err());
    }

    #[test]
    fn refuses_invalid_rules_and_duplicate_ids() {
        let rule = |id: &str| {
            let kind = "[rule.kind]\ntype = \"silent\"\nafter = 60\n";
            format!("[[rule]]\nid = \"{id}\"\npriority = \"low\"\n{kind}")
        };
        assert!(matches!(
            RuleFile::from_toml(&rule("a:b")),
            Err(RuleError::Invalid { .. })
        ));
        let twice = format!("{}{}", rule("a"), rule("a"));
        assert!(matches!(
            RuleFile::from_toml(&twice),
            Err(RuleError::DuplicateId(_))
        ));
        let no_limit = "[[rule]]\nid = \"t\"\npriority = \"low\"\n\
                        [rule.kind]\ntype = \"threshold\"\nmetric = \"spo2\"\n";
        assert!(matches!(
            RuleFile::from_toml(no_limit),
            Err(RuleError::Invalid { .. })
        ));
    }

    #[test]
    fn scope_covers_devices_patients_and_groups() {
        let dir = Directory::default()
            .with_device("bed-1", "p1")
            .with_patient(
                "p1",
                Patient {
                    group: Some("ward-3".into()),
                    ..Default::default()
                },
            );
        assert!(Scope::Device("bed-1".into()).covers("bed-1", &dir));
        assert!(!Scope::Device("bed-1".into()).covers("bed-2", &dir));
        assert!(Scope::Patient("p1".into()).covers("bed-1", &dir));
        assert!(Scope::Group("ward-3".into()).covers("bed-1", &dir));
        assert!(!Scope::Group("ward-4".into()).covers("bed-1", &dir));
        assert!(!Scope::Group("ward-3".into()).covers("bed-2", &dir));
        assert!(Scope::All.covers("anything", &dir));
    }
}
