//! Patients in the caller's scope, with their devices and newest values.

use axum::extract::{Path, State};
use axum::Json;
use serde::Serialize;
use telemon_model::Reading;
use utoipa::ToSchema;

use crate::access::Access;
use crate::error::HttpError;
use crate::openapi::{ErrorBody, ReadingDoc};
use crate::AppState;

#[derive(Debug, Serialize, ToSchema)]
pub struct PatientView {
    pub id: String,
    pub name: String,
    /// The ward or group the patient is in.
    pub ward: Option<String>,
    /// NEWS2 SpO2 scale: 1, or 2 for a prescribed 88-92 % target.
    pub spo2_scale: i16,
    /// Devices monitoring the patient now.
    pub devices: Vec<String>,
}

impl From<telemon_store::Patient> for PatientView {
    fn from(p: telemon_store::Patient) -> Self {
        PatientView {
            id: p.id,
            name: p.name,
            ward: p.ward,
            spo2_scale: p.spo2_scale,
            devices: p.devices,
        }
    }
}

/// Patients in the caller's scope, by id.
#[utoipa::path(get, path = "/api/v1/patients", tag = "patients",
    responses((status = 200, body = Vec<PatientView>), (status = 401, body = ErrorBody)))]
pub async fn list(
    access: Access,
    State(state): State<AppState>,
) -> Result<Json<Vec<PatientView>>, HttpError> {
    let patients: Vec<PatientView> = state
        .store
        .patients()
        .await?
        .into_iter()
        .filter(|p| access.scope.patient(&p.id))
        .map(PatientView::from)
        .collect();
    access
        .audit(
            &state,
            "list patients",
            &format!("{} patients", patients.len()),
        )
        .await?;
    Ok(Json(patients))
}

async fn visible(access: &Access, state: &AppState, id: &str) -> Result<PatientView, HttpError> {
    access.patient(id)?;
    state
        .store
        .patients()
        .await?
        .into_iter()
        .find(|p| p.id == id)
        .map(PatientView::from)
        .ok_or(HttpError::NotFound("patient"))
}

#[utoipa::path(get, path = "/api/v1/patients/{id}", tag = "patients",
    params(("id" = String, Path, description = "patient id", pattern = "^[A-Za-z0-9._@-]{1,128}$")),
    responses((status = 200, body = PatientView), (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody)))]
pub async fn get(
    access: Access,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<PatientView>, HttpError> {
    let patient = visible(&access, &state, &id).await?;
    access.audit(&state, "view patient", &id).await?;
    Ok(Json(patient))
}

/// The newest reading of every metric of every device monitoring the patient.
#[utoipa::path(get, path = "/api/v1/patients/{id}/latest", tag = "patients",
    params(("id" = String, Path, description = "patient id", pattern = "^[A-Za-z0-9._@-]{1,128}$")),
    responses((status = 200, body = Vec<ReadingDoc>), (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody)))]
pub async fn latest(
    access: Access,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Vec<Reading>>, HttpError> {
    let patient = visible(&access, &state, &id).await?;
    access.audit(&state, "view latest", &id).await?;
    let mut readings = Vec::new();
    for device in &patient.devices {
        readings.extend(state.store.latest(device).await?);
    }
    Ok(Json(readings))
}
