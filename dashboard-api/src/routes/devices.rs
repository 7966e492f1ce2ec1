//! Devices, their readings, and the dead-letter store.

use axum::extract::{Path, Query, State};
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use telemon_model::{DeviceId, Reading};
use telemon_store::{DeadLetter, ReadingQuery};
use utoipa::{IntoParams, ToSchema};

use crate::access::Access;
use crate::error::HttpError;
use crate::openapi::{ErrorBody, ReadingDoc};
use crate::AppState;

/// Most rows one request returns: bounds memory per request.
const MAX_LIMIT: i64 = 10_000;

/// A device as the API shows it.
#[derive(Debug, Serialize, ToSchema)]
pub struct DeviceView {
    pub id: String,
    pub first_seen: DateTime<Utc>,
    pub last_seen: DateTime<Utc>,
    /// From the device's will message; absent when it never said.
    pub online: Option<bool>,
}

/// Devices in the caller's scope.
#[utoipa::path(get, path = "/api/v1/devices", tag = "devices",
    responses((status = 200, body = Vec<DeviceView>), (status = 401, body = ErrorBody)))]
pub async fn list(
    access: Access,
    State(state): State<AppState>,
) -> Result<Json<Vec<DeviceView>>, HttpError> {
    let devices = state.store.devices().await?;
    let visible = devices
        .into_iter()
        .filter(|d| access.scope.device(&d.id))
        .map(|d| DeviceView {
            id: d.id,
            first_seen: d.first_seen,
            last_seen: d.last_seen,
            online: d.online,
        })
        .collect();
    Ok(Json(visible))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ReadingParams {
    metric: Option<String>,
    from: Option<DateTime<Utc>>,
    to: Option<DateTime<Utc>>,
    /// Average numeric readings over buckets of this many seconds (1 to 2678400).
    #[param(minimum = 1, maximum = 2678400)]
    bucket: Option<i64>,
    /// Newest first, at most this many (1 to 10000, default 1000).
    #[param(minimum = 1, maximum = 10000)]
    limit: Option<i64>,
}

fn device_id(id: String) -> Result<DeviceId, HttpError> {
    DeviceId::new(id).map_err(|e| HttpError::BadRequest(e.to_string()))
}

/// Readings of one device, newest first, optionally bucketed.
#[utoipa::path(get, path = "/api/v1/devices/{id}/readings", tag = "devices",
    params(
        ("id" = String, Path, description = "device id", pattern = "^[A-Za-z0-9._:-]{1,128}$"),
        ReadingParams
    ),
    responses((status = 200, body = Vec<ReadingDoc>), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn readings(
    access: Access,
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(params): Query<ReadingParams>,
) -> Result<Json<Vec<Reading>>, HttpError> {
    let device = device_id(id)?;
    access.device(device.as_str())?;
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

    access
        .audit(&state, "view readings", device.as_str())
        .await?;
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

/// The newest reading of every metric of one device.
#[utoipa::path(get, path = "/api/v1/devices/{id}/latest", tag = "devices",
    params(("id" = String, Path, description = "device id", pattern = "^[A-Za-z0-9._:-]{1,128}$")),
    responses((status = 200, body = Vec<ReadingDoc>), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn latest(
    access: Access,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Vec<Reading>>, HttpError> {
    let device = device_id(id)?;
    access.device(device.as_str())?;
    access.audit(&state, "view latest", device.as_str()).await?;
    Ok(Json(state.store.latest(device.as_str()).await?))
}

#[derive(Serialize, ToSchema)]
pub struct DeadLetterView {
    received_at: DateTime<Utc>,
    topic: String,
    identity: Option<String>,
    reason: String,
    detail: String,
    /// The raw payload, lossily as text, for a person to read; its first
    /// [`PAYLOAD_SHOWN`] bytes when longer.
    payload: String,
    /// The payload's full length in bytes.
    payload_bytes: usize,
}

/// Dead letters listed per request by default, and at most.
const DEAD_LETTERS: i64 = 100;
const MAX_DEAD_LETTERS: i64 = 500;
/// Bytes of each payload shown: enough to see what a device sent, while a listing of
/// oversize payloads (each up to the broker's 256 KiB) stays small.
const PAYLOAD_SHOWN: usize = 4096;

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct DeadLetterParams {
    /// The newest this many (1 to 500, default 100).
    #[param(minimum = 1, maximum = 500)]
    limit: Option<i64>,
}

/// Messages that could not become readings, newest first (admins only: payloads may hold
/// patient data).
#[utoipa::path(get, path = "/api/v1/dead-letters", tag = "admin", params(DeadLetterParams),
    responses((status = 200, body = Vec<DeadLetterView>), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub async fn dead_letters(
    access: Access,
    State(state): State<AppState>,
    Query(params): Query<DeadLetterParams>,
) -> Result<Json<Vec<DeadLetterView>>, HttpError> {
    access.principal.require_admin()?;
    let limit = params.limit.unwrap_or(DEAD_LETTERS);
    if !(1..=MAX_DEAD_LETTERS).contains(&limit) {
        return Err(HttpError::BadRequest(format!(
            "limit must be 1 to {MAX_DEAD_LETTERS}"
        )));
    }
    let letters = state.store.dead_letters(limit).await?;
    Ok(Json(letters.into_iter().map(view).collect()))
}

fn view(d: DeadLetter) -> DeadLetterView {
    DeadLetterView {
        received_at: d.received_at,
        topic: d.topic,
        identity: d.identity,
        reason: d.reason,
        detail: d.detail,
        payload: String::from_utf8_lossy(&d.payload[..d.payload.len().min(PAYLOAD_SHOWN)])
            .into_owned(),
        payload_bytes: d.payload.len(),
    }
}
