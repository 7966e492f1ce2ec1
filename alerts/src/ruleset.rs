//! The rules in force: the rules file (or the built-in defaults) as the base, with the rules
//! created or changed through the API laid over it. An API rule replaces the file rule with
//! the same id, so a file rule is disabled by storing it with `enabled = false`, and comes
//! back when the API rule is deleted. API rules live in the store (`alert_rules`); the
//! service reads them every few seconds, so a change made by the API in any process reaches
//! the engine without a restart.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use telemon_store::StoredRule;

use crate::rule::{Rule, RuleError};

/// Who wrote a file rule into the store's mirror of the rules file.
pub const FILE_RULE_AUTHOR: &str = "rules file";

#[derive(Debug, thiserror::Error)]
pub enum StoredRuleError {
    #[error("stored rule {id:?} is not a rule: {cause}")]
    Json {
        id: String,
        cause: serde_json::Error,
    },
    #[error("stored rule {stored:?} names itself {named:?}")]
    IdMismatch { stored: String, named: String },
    #[error(transparent)]
    Invalid(#[from] RuleError),
    #[error("encoding rule {id:?}: {cause}")]
    Encode {
        id: String,
        cause: serde_json::Error,
    },
}

/// Where a rule in force comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RuleSource {
    File,
    Api,
}

/// One rule of the merged set, with its source.
#[derive(Clone, Debug, PartialEq)]
pub struct Layered<T> {
    pub rule: T,
    pub source: RuleSource,
    /// An API rule that replaces a file rule of the same id.
    pub overrides_file: bool,
}

/// Lays the API rules over the file rules: file rules keep their order, each replaced in
/// place by an API rule of the same id; API rules of new ids follow, by id. Generic so that
/// the engine (over [`Rule`]) and the API (over stored definitions) merge the same way.
pub fn merge<T>(file: Vec<T>, api: Vec<T>, id: impl Fn(&T) -> &str) -> Vec<Layered<T>> {
    let mut api: HashMap<String, T> = api.into_iter().map(|r| (id(&r).to_string(), r)).collect();
    let mut merged = Vec::with_capacity(file.len() + api.len());
    let mut seen = HashSet::new();
    for rule in file {
        let key = id(&rule).to_string();
        if !seen.insert(key.clone()) {
            continue;
        }
        merged.push(match api.remove(&key) {
            Some(over) => Layered {
                rule: over,
                source: RuleSource::Api,
                overrides_file: true,
            },
            None => Layered {
                rule,
                source: RuleSource::File,
                overrides_file: false,
            },
        });
    }

    let mut added: Vec<T> = api.into_values().collect();
    added.sort_by(|a, b| id(a).cmp(id(b)));
    merged.extend(added.into_iter().map(|rule| Layered {
        rule,
        source: RuleSource::Api,
        overrides_file: false,
    }));
    merged
}

/// The rules the engine runs: the file rules with the API rules laid over them.
pub fn rules_in_force(file: &[Rule], api: &[Rule]) -> Vec<Rule> {
    merge(file.to_vec(), api.to_vec(), |r: &Rule| r.id.as_str())
        .into_iter()
        .map(|l| l.rule)
        .collect()
}

/// Reads one stored definition back into a validated rule.
pub fn from_stored(stored: &StoredRule) -> Result<Rule, StoredRuleError> {
    let rule: Rule =
        serde_json::from_str(&stored.definition).map_err(|cause| StoredRuleError::Json {
            id: stored.id.clone(),
            cause,
        })?;
    if rule.id != stored.id {
        return Err(StoredRuleError::IdMismatch {
            stored: stored.id.clone(),
            named: rule.id,
        });
    }
    rule.validate()?;
    Ok(rule)
}

/// Every stored rule that reads back, and why the others do not. A rule that does not read
/// back (written by another version, or edited by hand) is left out rather than stopping the
/// others.
pub fn from_stored_all(stored: &[StoredRule]) -> (Vec<Rule>, Vec<StoredRuleError>) {
    let mut rules = Vec::with_capacity(stored.len());
    let mut errors = Vec::new();
    for s in stored {
        match from_stored(s) {
            Ok(rule) => rules.push(rule),
            Err(e) => errors.push(e),
        }
    }
    (rules, errors)
}

/// A rule as the store keeps it.
pub fn to_stored(rule: &Rule, by: &str, at: DateTime<Utc>) -> Result<StoredRule, StoredRuleError> {
    let definition = serde_json::to_string(rule).map_err(|cause| StoredRuleError::Encode {
        id: rule.id.clone(),
        cause,
    })?;
    Ok(StoredRule {
        id: rule.id.clone(),
        definition,
        updated_at: at,
        updated_by: by.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rule::RuleFile;

    fn file_rules() -> Vec<Rule> {
        RuleFile::from_toml(include_str!("../rules.toml")).unwrap()
    }

    fn ids(rules: &[Rule]) -> Vec<&str> {
        rules.iter().map(|r| r.id.as_str()).collect()
    }

    #[test]
    fn an_api_rule_replaces_the_file_rule_in_place_and_new_ones_follow_by_id() {
        let file = file_rules();
        let mut disabled = file[1].clone();
        disabled.enabled = false;
        let mut zeta = file[0].clone();
        zeta.id = "zeta".into();
        let mut alpha = file[0].clone();
        alpha.id = "alpha".into();

        let api = vec![zeta, disabled.clone(), alpha];
        let merged = merge(file.clone(), api, |r: &Rule| r.id.as_str());
        let in_force: Vec<Rule> = merged.iter().map(|l| l.rule.clone()).collect();
        let mut expected = ids(&file);
        expected.extend(["alpha", "zeta"]);
        assert_eq!(ids(&in_force), expected);
        assert_eq!(in_force[1], disabled, "replaced where the file had it");
        assert_eq!(merged[0].source, RuleSource::File);
        assert!(merged[1].overrides_file && merged[1].source == RuleSource::Api);
        let last = merged.last().unwrap();
        assert!(!last.overrides_file && last.source == RuleSource::Api);
    }

    #[test]
    fn without_api_rules_the_file_rules_are_in_force_unchanged() {
        let file = file_rules();
        assert_eq!(rules_in_force(&file, &[]), file);
        assert!(rules_in_force(&[], &[]).is_empty());
    }

    #[test]
    fn stored_rules_read_back_and_bad_ones_are_left_out_with_the_reason() {
        let rule = file_rules().remove(0);
        let at = Utc::now();
        let good = to_stored(&rule, "admin", at).unwrap();
        assert_eq!(from_stored(&good).unwrap(), rule);

        let renamed = StoredRule {
            id: "other".into(),
            ..good.clone()
        };
        let garbage = StoredRule {
            definition: "{\"id\":".into(),
            ..good.clone()
        };
        let mut invalid_rule = rule.clone();
        invalid_rule.id = "has space".into();
        let invalid = StoredRule {
            id: "has space".into(),
            ..to_stored(&invalid_rule, "admin", at).unwrap()
        };
        let (rules, errors) = from_stored_all(&[renamed, good, garbage, invalid]);
        assert_eq!(rules, vec![rule]);
        assert!(matches!(errors[0], StoredRuleError::IdMismatch { .. }));
        assert!(matches!(errors[1], StoredRuleError::Json { .. }));
        assert!(matches!(errors[2], StoredRuleError::Invalid(_)));
    }
}
