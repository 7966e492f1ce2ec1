//! Devices, their readings, and the dead-letter store.

use axum::extract::{Path, Query, State};
use axum::Json;
use chrono::{DateTime, Utc};
use serde::Deserialize;
use telemon_model::{DeviceId, Reading};
use telemon_store::{DeadLetter, Device, ReadingQuery};

use crate::auth::Principal;
use crate::error::HttpError;
use crate::AppState;

/// Most rows one request returns: bounds memory per request.
const MAX_LIMIT: i64 = 10_000;

pub async fn list(
    _: Principal,
    State(state): State<AppState>,
) -> Result<Json<Vec<Device>>, HttpError> {
    Ok(Json(state.store.devices().await?))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReadingParams {
    metric: Option<String>,
    from: Option<DateTime<Utc>>,
    to: Option<DateTime<Utc>>,
    /// Average numeric readings over buckets of this many seconds.
    bucket: Option<i64>,
    limit: Option<i64>,
}

fn device_id(id: String) -> Result<DeviceId, HttpError> {
    DeviceId::new(id).map_err(|e| HttpError::BadRequest(e.to_string()))
}

pub async fn readings(
    _: Principal,
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(params): Query<ReadingParams>,
) -> Result<Json<Vec<Reading>>, HttpError> {
    let device = device_id(id)?;
    let limit = params.limit.unwrap_or(1000);
    if !(1..=MAX_LIMIT).contains(&limit) {
        return Err(HttpError::BadRequest(format!(
            "limit must be 1 to {MAX_LIMIT}"
        )));
    }
    if params
        .bucket
        .is_some_and(|b| !(1..=86_400 * 31).contains(&b))
    {
        return Err(HttpError::BadRequest(
            "bucket must be 1 to 2678400 seconds".into(),
        ));
    }
    let query = ReadingQuery {
        device: device.to_string(),
        metric: params.metric,
        from: params.from,
        to: params.to,
        bucket_secs: params.bucket,
        limit,
    };
    Ok(Json(state.store.readings(&query).await?))
}

pub async fn latest(
    _: Principal,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Vec<Reading>>, HttpError> {
    let device = device_id(id)?;
    Ok(Json(state.store.latest(device.as_str()).await?))
}

#[derive(serde::Serialize)]
pub struct DeadLetterView {
    received_at: DateTime<Utc>,
    topic: String,
    identity: Option<String>,
    reason: String,
    detail: String,
    /// The raw payload, lossily as text, for a person to read.
    payload: String,
}

pub async fn dead_letters(
    _: Principal,
    State(state): State<AppState>,
) -> Result<Json<Vec<DeadLetterView>>, HttpError> {
    let letters = state.store.dead_letters(500).await?;
    Ok(Json(letters.into_iter().map(view).collect()))
}

fn view(d: DeadLetter) -> DeadLetterView {
    DeadLetterView {
        received_at: d.received_at,
        topic: d.topic,
        identity: d.identity,
        reason: d.reason,
        detail: d.detail,
        payload: String::from_utf8_lossy(&d.payload).into_owned(),
    }
}
