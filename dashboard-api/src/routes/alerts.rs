//! Alerts: listing and acknowledgement, within the caller's scope.

use axum::extract::{Path, Query, State};
use axum::Json;
use serde::Deserialize;
use telemon_model::{AlertEvent, AlertState, Priority};
use telemon_store::AlertQuery;
use utoipa::IntoParams;

use crate::access::Access;
use crate::error::HttpError;
use crate::openapi::{AlertDoc, ErrorBody};
use crate::AppState;

/// Rows read from storage per listing before the scope filter: a clinician's alerts are
/// found among the newest ones of the whole ward.
const SCAN_LIMIT: i64 = 5000;

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct AlertParams {
    /// pending, firing, acknowledged or resolved.
    #[param(pattern = "^(pending|firing|acknowledged|resolved)$")]
    state: Option<String>,
    /// high, medium or low.
    #[param(pattern = "^(high|medium|low)$")]
    priority: Option<String>,
    /// Only alerts not yet resolved.
    active: Option<bool>,
    /// The patient or device the alert is about.
    subject: Option<String>,
    /// At most this many (1 to 1000, default 200).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<i64>,
}

/// Alerts in the caller's scope, newest first.
#[utoipa::path(get, path = "/api/v1/alerts", tag = "alerts", params(AlertParams),
    responses((status = 200, body = Vec<AlertDoc>), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody)))]
pub async fn list(
    access: Access,
    State(state): State<AppState>,
    Query(params): Query<AlertParams>,
) -> Result<Json<Vec<AlertEvent>>, HttpError> {
    let alert_state = match params.state.as_deref() {
        Some(s) => Some(AlertState::parse(s).ok_or_else(|| {
            HttpError::BadRequest("state must be pending, firing, acknowledged or resolved".into())
        })?),
        None => None,
    };
    let priority =
        match params.priority.as_deref() {
            Some(p) => Some(Priority::parse(p).ok_or_else(|| {
                HttpError::BadRequest("priority must be high, medium or low".into())
            })?),
            None => None,
        };
    let limit = params.limit.unwrap_or(200);
    if !(1..=1000).contains(&limit) {
        return Err(HttpError::BadRequest("limit must be 1 to 1000".into()));
    }

    let query = AlertQuery {
        state: alert_state,
        active_only: params.active.unwrap_or(false),
        subject: params.subject,
        limit: SCAN_LIMIT,
    };
    let alerts: Vec<AlertEvent> = state
        .store
        .alerts(&query)
        .await?
        .into_iter()
        .filter(|a| access.scope.alert(a) && priority.is_none_or(|p| a.priority == p))
        .take(limit as usize)
        .collect();
    access
        .audit(&state, "list alerts", &format!("{} alerts", alerts.len()))
        .await?;
    Ok(Json(alerts))
}

async fn visible_alert(
    access: &Access,
    state: &AppState,
    id: &str,
) -> Result<AlertEvent, HttpError> {
    state
        .store
        .alert(id)
        .await?
        .filter(|a| access.scope.alert(a))
        .ok_or(HttpError::NotFound("alert"))
}

#[utoipa::path(get, path = "/api/v1/alerts/{id}", tag = "alerts",
    params(("id" = String, Path, description = "alert id")),
    responses((status = 200, body = AlertDoc), (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody)))]
pub async fn get(
    access: Access,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<AlertEvent>, HttpError> {
    let alert = visible_alert(&access, &state, &id).await?;
    access.audit(&state, "view alert", &alert.subject).await?;
    Ok(Json(alert))
}

/// Asks the alerts service to acknowledge; the acknowledged transition then arrives on the
/// stream and in storage like any other.
#[utoipa::path(post, path = "/api/v1/alerts/{id}/ack", tag = "alerts",
    params(("id" = String, Path, description = "alert id")),
    responses((status = 202, description = "acknowledgement requested"),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody),
        (status = 503, body = ErrorBody)))]
pub async fn acknowledge(
    access: Access,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<axum::http::StatusCode, HttpError> {
    let alert = visible_alert(&access, &state, &id).await?;
    access.may_acknowledge()?;
    if !matches!(alert.state, AlertState::Firing | AlertState::Pending) {
        return Err(HttpError::Conflict(format!(
            "alert is {}",
            alert.state.as_str()
        )));
    }

    access
        .audit(&state, "acknowledge alert", &alert.subject)
        .await?;
    state
        .live
        .request_ack(&id, &access.principal.name)
        .await
        .map_err(|_| HttpError::Unavailable)?;
    Ok(axum::http::StatusCode::ACCEPTED)
}
