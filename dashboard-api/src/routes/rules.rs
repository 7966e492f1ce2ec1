//! Alert rules: the merged set the alerts service runs (the rules file with the rules made
//! through the API laid over it), and creating, replacing, disabling and deleting API rules.
//! Any authenticated principal may read; writes are for admins and audited.
//!
//! Rules are stored, not sent to the engine: the alerts service (in this process or another)
//! reads them every few seconds, so a change is in force within that time, without a
//! restart. The file rules listed here are the store's mirror of the rules file the alerts
//! service runs with.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use telemon_alerts::ruleset::{self, Layered, RuleSource};
use telemon_alerts::Rule;
use telemon_store::{RuleTable, StoredRule};
use tracing::debug;
use utoipa::ToSchema;

use crate::access::Access;
use crate::auth::Principal;
use crate::error::HttpError;
use crate::openapi::ErrorBody;
use crate::AppState;

/// One rule of the merged set.
#[derive(Debug, Serialize, ToSchema)]
pub struct RuleView {
    pub id: String,
    /// `file` (the rules file the alerts service runs with) or `api`.
    #[schema(pattern = "^(file|api)$")]
    pub source: String,
    /// An API rule that replaces the file rule of the same id; deleting it brings that
    /// file rule back.
    pub overrides_file: bool,
    pub updated_at: DateTime<Utc>,
    pub updated_by: String,
    /// The rule, in the JSON form of a rule file's `[[rule]]` table.
    #[schema(value_type = RuleDoc)]
    pub rule: serde_json::Value,
}

/// A rule as JSON: the fields of a rule file's `[[rule]]` table (see alerts/rules.toml).
#[derive(Debug, Deserialize, ToSchema)]
#[allow(dead_code)]
pub struct RuleDoc {
    /// The same as the path's id; taken from the path when absent.
    #[schema(pattern = "^[A-Za-z0-9._-]{1,64}$")]
    id: Option<String>,
    name: Option<String>,
    description: Option<String>,
    #[schema(pattern = "^(high|medium|low)$")]
    priority: String,
    /// `"all"` (the default), `{"device": id}`, `{"patient": id}` or `{"group": ward}`.
    #[schema(value_type = Value)]
    scope: Option<serde_json::Value>,
    /// false disables the rule; its alerts resolve.
    enabled: Option<bool>,
    /// A duration such as `"2m"` or a number of seconds.
    escalate_after: Option<String>,
    /// `type` (threshold, rate_of_change, silent or news2) and that kind's fields.
    #[schema(value_type = Object)]
    kind: serde_json::Value,
}

fn view(layered: Layered<StoredRule>) -> Option<RuleView> {
    let stored = layered.rule;
    let rule = match serde_json::from_str(&stored.definition) {
        Ok(rule) => rule,
        Err(e) => {
            debug!(rule = %stored.id, cause = %e, "stored rule is not JSON; not listed");
            return None;
        }
    };
    let source = match layered.source {
        RuleSource::File => "file",
        RuleSource::Api => "api",
    };
    Some(RuleView {
        id: stored.id,
        source: source.to_string(),
        overrides_file: layered.overrides_file,
        updated_at: stored.updated_at,
        updated_by: stored.updated_by,
        rule,
    })
}

async fn merged(state: &AppState) -> Result<Vec<RuleView>, HttpError> {
    let file = state.store.stored_rules(RuleTable::File).await?;
    let api = state.store.stored_rules(RuleTable::Api).await?;
    let merged = ruleset::merge(file, api, |r: &StoredRule| r.id.as_str());
    Ok(merged.into_iter().filter_map(view).collect())
}

/// The rules in force, in the order the alerts service evaluates them.
#[utoipa::path(get, path = "/api/v1/rules", tag = "rules",
    responses((status = 200, body = Vec<RuleView>), (status = 401, body = ErrorBody)))]
pub async fn list(
    _principal: Principal,
    State(state): State<AppState>,
) -> Result<Json<Vec<RuleView>>, HttpError> {
    Ok(Json(merged(&state).await?))
}

#[utoipa::path(get, path = "/api/v1/rules/{id}", tag = "rules",
    params(("id" = String, Path, description = "rule id", pattern = "^[A-Za-z0-9._-]{1,64}$")),
    responses((status = 200, body = RuleView), (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody)))]
pub async fn get(
    _principal: Principal,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<RuleView>, HttpError> {
    merged(&state)
        .await?
        .into_iter()
        .find(|r| r.id == id)
        .map(Json)
        .ok_or(HttpError::NotFound("rule"))
}

/// Reads a request body into a rule: the path names it, and the alerts crate validates it
/// exactly as it validates a rules file.
fn rule_from_body(id: &str, mut body: serde_json::Value) -> Result<Rule, HttpError> {
    let object = body
        .as_object_mut()
        .ok_or_else(|| HttpError::BadRequest("the rule must be a JSON object".into()))?;
    match object.get("id") {
        None => {
            object.insert("id".into(), id.into());
        }
        Some(named) if named.as_str() == Some(id) => {}
        Some(_) => {
            return Err(HttpError::BadRequest(
                "the rule's id differs from the path".into(),
            ))
        }
    }

    let rule: Rule = serde_json::from_value(body)
        .map_err(|e| HttpError::BadRequest(format!("not a rule: {e}")))?;
    rule.validate()
        .map_err(|e| HttpError::BadRequest(e.to_string()))?;
    Ok(rule)
}

/// Creates or replaces an API rule. A rule with the id of a file rule replaces it (send it
/// with `"enabled": false` to disable a file rule). In force within seconds.
#[utoipa::path(put, path = "/api/v1/rules/{id}", tag = "rules", request_body = RuleDoc,
    params(("id" = String, Path, description = "rule id", pattern = "^[A-Za-z0-9._-]{1,64}$")),
    responses((status = 200, description = "replaced", body = RuleView),
        (status = 201, description = "created", body = RuleView),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody)))]
pub async fn put(
    access: Access,
    State(state): State<AppState>,
    Path(id): Path<String>,
    Json(body): Json<serde_json::Value>,
) -> Result<(StatusCode, Json<RuleView>), HttpError> {
    access.principal.require_admin()?;
    let rule = rule_from_body(&id, body)?;
    let stored = ruleset::to_stored(&rule, &access.principal.name, Utc::now())
        .map_err(|e| HttpError::BadRequest(e.to_string()))?;

    // Audited before it is written: a change that cannot be audited is not made.
    access.audit(&state, "put rule", &id).await?;
    let created = state.store.put_api_rule(&stored).await?;
    let view = merged(&state)
        .await?
        .into_iter()
        .find(|r| r.id == id)
        .ok_or(HttpError::NotFound("rule"))?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(view)))
}

/// Deletes an API rule. A file rule it replaced is in force again; a rule that exists only
/// in the rules file cannot be deleted (disable it with PUT instead).
#[utoipa::path(delete, path = "/api/v1/rules/{id}", tag = "rules",
    params(("id" = String, Path, description = "rule id", pattern = "^[A-Za-z0-9._-]{1,64}$")),
    responses((status = 204, description = "deleted"), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn delete(
    access: Access,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<StatusCode, HttpError> {
    access.principal.require_admin()?;
    access.audit(&state, "delete rule", &id).await?;
    if !state.store.delete_api_rule(&id).await? {
        return Err(HttpError::NotFound("rule made through the API"));
    }
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn body() -> serde_json::Value {
        json!({
            "priority": "high",
            "kind": {"type": "threshold", "metric": "spo2", "below": 90, "for": "15s"}
        })
    }

    #[test]
    fn the_path_names_the_rule() {
        let rule = rule_from_body("spo2-low", body()).unwrap();
        assert_eq!(rule.id, "spo2-low");
        let mut same = body();
        same["id"] = "spo2-low".into();
        assert!(rule_from_body("spo2-low", same).is_ok());
        let mut other = body();
        other["id"] = "other".into();
        assert!(matches!(
            rule_from_body("spo2-low", other),
            Err(HttpError::BadRequest(_))
        ));
    }

    #[test]
    fn invalid_rules_are_refused_with_the_reason() {
        let reason = |id: &str, body: serde_json::Value| match rule_from_body(id, body) {
            Err(HttpError::BadRequest(reason)) => reason,
            other => panic!("not refused: {other:?}"),
        };
        assert!(reason("bad id", body()).contains("id must be"));
        let mut no_limit = body();
        no_limit["kind"] = json!({"type": "threshold", "metric": "spo2"});
        assert!(reason("x", no_limit).starts_with("rule \"x\""));
        let mut typo = body();
        typo["prority"] = "low".into();
        assert!(reason("x", typo).contains("prority"));
        assert!(reason("x", json!([1])).contains("JSON object"));
    }
}
