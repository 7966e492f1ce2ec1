//! Alerts: listing and acknowledgement.

use axum::extract::{Path, Query, State};
use axum::Json;
use serde::Deserialize;
use telemon_model::{AlertEvent, AlertState};
use telemon_store::AlertQuery;

use crate::auth::Principal;
use crate::error::HttpError;
use crate::AppState;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertParams {
    state: Option<String>,
    /// Only alerts not yet resolved.
    active: Option<bool>,
    subject: Option<String>,
    limit: Option<i64>,
}

pub async fn list(
    _: Principal,
    State(state): State<AppState>,
    Query(params): Query<AlertParams>,
) -> Result<Json<Vec<AlertEvent>>, HttpError> {
    let alert_state = match params.state.as_deref() {
        Some(s) => Some(AlertState::parse(s).ok_or_else(|| {
            HttpError::BadRequest("state must be pending, firing, acknowledged or resolved".into())
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
        limit,
    };
    Ok(Json(state.store.alerts(&query).await?))
}

pub async fn get(
    _: Principal,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<AlertEvent>, HttpError> {
    state
        .store
        .alert(&id)
        .await?
        .map(Json)
        .ok_or(HttpError::NotFound("alert"))
}

/// Asks the alerts service to acknowledge; the acknowledged transition then arrives on the
/// stream and in storage like any other.
pub async fn acknowledge(
    who: Principal,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<axum::http::StatusCode, HttpError> {
    let alert = state
        .store
        .alert(&id)
        .await?
        .ok_or(HttpError::NotFound("alert"))?;
    if !matches!(alert.state, AlertState::Firing | AlertState::Pending) {
        return Err(HttpError::Conflict(format!(
            "alert is {}",
            alert.state.as_str()
        )));
    }
    state
        .live
        .request_ack(&id, &who.name)
        .await
        .map_err(|_| HttpError::Unavailable)?;
    Ok(axum::http::StatusCode::ACCEPTED)
}
