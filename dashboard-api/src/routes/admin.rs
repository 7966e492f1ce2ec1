//! Administration: users, API tokens, patients, which devices monitor them, assignments,
//! and the audit log. Admins only.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use chrono::Utc;
use serde::{Deserialize, Serialize};
use telemon_model::DeviceId;
use telemon_store::{ApiToken, AuditEntry, NewPatient, User};
use utoipa::{IntoParams, ToSchema};

use crate::auth::{self, Principal, Role};
use crate::error::HttpError;
use crate::openapi::ErrorBody;
use crate::routes::patients::PatientView;
use crate::AppState;

/// Shortest password accepted for a new user.
const MIN_PASSWORD: usize = 8;
const MAX_PASSWORD: usize = 256;

/// Names of users, tokens and patients: short, printable, safe in URLs and logs.
fn check_name(what: &str, name: &str) -> Result<(), HttpError> {
    let ok = (1..=128).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._@-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(HttpError::BadRequest(format!(
            "{what} must be 1 to 128 of A-Z a-z 0-9 . _ @ -"
        )))
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewUser {
    #[schema(pattern = "^[A-Za-z0-9._@-]{1,128}$")]
    pub name: String,
    #[schema(min_length = 8, max_length = 256)]
    pub password: String,
    pub role: Role,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct UserView {
    pub name: String,
    pub role: String,
}

#[utoipa::path(post, path = "/api/v1/users", tag = "admin", request_body = NewUser,
    responses((status = 201, body = UserView), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 409, body = ErrorBody)))]
pub async fn create_user(
    principal: Principal,
    State(state): State<AppState>,
    Json(new): Json<NewUser>,
) -> Result<(StatusCode, Json<UserView>), HttpError> {
    principal.require_admin()?;
    check_name("name", &new.name)?;
    if !(MIN_PASSWORD..=MAX_PASSWORD).contains(&new.password.chars().count()) {
        return Err(HttpError::BadRequest(format!(
            "password must be {MIN_PASSWORD} to {MAX_PASSWORD} characters"
        )));
    }

    let user = User {
        name: new.name.clone(),
        role: new.role.as_str().to_string(),
        password_hash: auth::hash_password(&new.password)?,
    };
    if !state.store.create_user(&user, Utc::now()).await? {
        return Err(HttpError::Conflict("user exists".into()));
    }
    let view = UserView {
        name: user.name,
        role: user.role,
    };
    Ok((StatusCode::CREATED, Json(view)))
}

#[utoipa::path(get, path = "/api/v1/users", tag = "admin",
    responses((status = 200, body = Vec<UserView>), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody)))]
pub async fn list_users(
    principal: Principal,
    State(state): State<AppState>,
) -> Result<Json<Vec<UserView>>, HttpError> {
    principal.require_admin()?;
    let users = state.store.users().await?;
    Ok(Json(
        users
            .into_iter()
            .map(|(name, role)| UserView { name, role })
            .collect(),
    ))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewToken {
    #[schema(pattern = "^[A-Za-z0-9._@-]{1,128}$")]
    pub name: String,
    /// The integration's role (viewer when absent); a device token is always a viewer of
    /// its device.
    pub role: Option<Role>,
    /// Makes a device-only token that reads this device's data and nothing else.
    #[schema(pattern = "^[A-Za-z0-9._:-]{1,128}$")]
    pub device: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CreatedToken {
    pub name: String,
    /// Shown once; only its hash is kept.
    pub token: String,
}

/// Creates a named integration token (with a role) or a device-only token.
#[utoipa::path(post, path = "/api/v1/tokens", tag = "admin", request_body = NewToken,
    responses((status = 201, body = CreatedToken), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 409, body = ErrorBody)))]
pub async fn create_token(
    principal: Principal,
    State(state): State<AppState>,
    Json(new): Json<NewToken>,
) -> Result<(StatusCode, Json<CreatedToken>), HttpError> {
    principal.require_admin()?;
    check_name("name", &new.name)?;
    let role = match (&new.device, new.role) {
        (Some(device), _) => {
            DeviceId::new(device.clone()).map_err(|e| HttpError::BadRequest(e.to_string()))?;
            Role::Viewer
        }
        // Least privilege when the role is left out.
        (None, role) => role.unwrap_or(Role::Viewer),
    };

    let token = auth::new_token(auth::API_TOKEN_PREFIX);
    let record = ApiToken {
        name: new.name.clone(),
        role: role.as_str().to_string(),
        device: new.device,
    };
    let created = state
        .store
        .create_api_token(
            &record,
            &auth::hash_token(&token),
            &principal.name,
            Utc::now(),
        )
        .await?;
    if !created {
        return Err(HttpError::Conflict("token name exists".into()));
    }
    Ok((
        StatusCode::CREATED,
        Json(CreatedToken {
            name: new.name,
            token,
        }),
    ))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PatientBody {
    #[schema(min_length = 1, max_length = 256)]
    pub name: String,
    pub ward: Option<String>,
    /// 1 (default) or 2.
    #[schema(value_type = Option<i16>, minimum = 1, maximum = 2)]
    pub spo2_scale: Option<f64>,
}

/// Creates or replaces a patient (its devices and assignments stay).
#[utoipa::path(put, path = "/api/v1/patients/{id}", tag = "admin", request_body = PatientBody,
    params(("id" = String, Path, description = "patient id", pattern = "^[A-Za-z0-9._@-]{1,128}$")),
    responses((status = 200, body = PatientView), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub async fn put_patient(
    principal: Principal,
    State(state): State<AppState>,
    Path(id): Path<String>,
    Json(body): Json<PatientBody>,
) -> Result<Json<PatientView>, HttpError> {
    principal.require_admin()?;
    check_name("patient id", &id)?;
    // A number, so that 2.0 is read as 2 the way JSON Schema's integer allows.
    let spo2_scale = match body.spo2_scale.unwrap_or(1.0) {
        1.0 => 1,
        2.0 => 2,
        _ => return Err(HttpError::BadRequest("spo2_scale must be 1 or 2".into())),
    };
    if body.name.is_empty() || body.name.chars().count() > 256 {
        return Err(HttpError::BadRequest(
            "name must be 1 to 256 characters".into(),
        ));
    }

    let patient = NewPatient {
        id: id.clone(),
        name: body.name,
        ward: body.ward,
        spo2_scale,
    };
    state.store.upsert_patient(&patient).await?;
    let stored = state
        .store
        .patients()
        .await?
        .into_iter()
        .find(|p| p.id == id);
    stored
        .map(|p| Json(PatientView::from(p)))
        .ok_or(HttpError::NotFound("patient"))
}

async fn patient_exists(state: &AppState, id: &str) -> Result<(), HttpError> {
    let patients = state.store.patients().await?;
    patients
        .iter()
        .any(|p| p.id == id)
        .then_some(())
        .ok_or(HttpError::NotFound("patient"))
}

/// Attaches a device to a patient, moving it from any patient it monitored before.
#[utoipa::path(put, path = "/api/v1/patients/{id}/devices/{device}", tag = "admin",
    params(("id" = String, Path, description = "patient id", pattern = "^[A-Za-z0-9._@-]{1,128}$"),
        ("device" = String, Path, description = "device id", pattern = "^[A-Za-z0-9._:-]{1,128}$")),
    responses((status = 204, description = "attached"), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody)))]
pub async fn attach_device(
    principal: Principal,
    State(state): State<AppState>,
    Path((id, device)): Path<(String, String)>,
) -> Result<StatusCode, HttpError> {
    principal.require_admin()?;
    DeviceId::new(device.clone()).map_err(|e| HttpError::BadRequest(e.to_string()))?;
    patient_exists(&state, &id).await?;
    state.store.attach_device(&device, &id).await?;
    state.live.scope_changed(None);
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(delete, path = "/api/v1/patients/{id}/devices/{device}", tag = "admin",
    params(("id" = String, Path, description = "patient id", pattern = "^[A-Za-z0-9._@-]{1,128}$"),
        ("device" = String, Path, description = "device id", pattern = "^[A-Za-z0-9._:-]{1,128}$")),
    responses((status = 204, description = "detached"), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn detach_device(
    principal: Principal,
    State(state): State<AppState>,
    Path((id, device)): Path<(String, String)>,
) -> Result<StatusCode, HttpError> {
    principal.require_admin()?;
    let attached = state
        .store
        .patients()
        .await?
        .iter()
        .any(|p| p.id == id && p.devices.contains(&device));
    if !attached || !state.store.detach_device(&device).await? {
        return Err(HttpError::NotFound("device"));
    }
    state.live.scope_changed(None);
    Ok(StatusCode::NO_CONTENT)
}

/// Assigns a patient to a user (or to an integration token, by name).
#[utoipa::path(put, path = "/api/v1/users/{name}/patients/{id}", tag = "admin",
    params(("name" = String, Path, description = "user or token name",
        pattern = "^[A-Za-z0-9._@-]{1,128}$"),
        ("id" = String, Path, description = "patient id", pattern = "^[A-Za-z0-9._@-]{1,128}$")),
    responses((status = 204, description = "assigned"), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn assign(
    principal: Principal,
    State(state): State<AppState>,
    Path((name, id)): Path<(String, String)>,
) -> Result<StatusCode, HttpError> {
    principal.require_admin()?;
    check_name("name", &name)?;
    check_name("patient id", &id)?;
    patient_exists(&state, &id).await?;
    state.store.assign(&name, &id).await?;
    state.live.scope_changed(Some(&name));
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(delete, path = "/api/v1/users/{name}/patients/{id}", tag = "admin",
    params(("name" = String, Path, description = "user or token name",
        pattern = "^[A-Za-z0-9._@-]{1,128}$"),
        ("id" = String, Path, description = "patient id", pattern = "^[A-Za-z0-9._@-]{1,128}$")),
    responses((status = 204, description = "unassigned"), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn unassign(
    principal: Principal,
    State(state): State<AppState>,
    Path((name, id)): Path<(String, String)>,
) -> Result<StatusCode, HttpError> {
    principal.require_admin()?;
    check_name("name", &name)?;
    check_name("patient id", &id)?;
    if !state.store.unassign(&name, &id).await? {
        return Err(HttpError::NotFound("assignment"));
    }
    state.live.scope_changed(Some(&name));
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct AuditParams {
    /// Only this principal's views.
    actor: Option<String>,
    /// At most this many (1 to 1000, default 200).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<i64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AuditView {
    pub at: chrono::DateTime<Utc>,
    pub actor: String,
    pub action: String,
    pub target: String,
}

impl From<AuditEntry> for AuditView {
    fn from(e: AuditEntry) -> Self {
        AuditView {
            at: e.at,
            actor: e.actor,
            action: e.action,
            target: e.target,
        }
    }
}

/// Who viewed which patient data, newest first.
#[utoipa::path(get, path = "/api/v1/audit", tag = "admin", params(AuditParams),
    responses((status = 200, body = Vec<AuditView>), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub async fn audit(
    principal: Principal,
    State(state): State<AppState>,
    Query(params): Query<AuditParams>,
) -> Result<Json<Vec<AuditView>>, HttpError> {
    principal.require_admin()?;
    let limit = params.limit.unwrap_or(200);
    if !(1..=1000).contains(&limit) {
        return Err(HttpError::BadRequest("limit must be 1 to 1000".into()));
    }
    let entries = state.store.audit(params.actor.as_deref(), limit).await?;
    Ok(Json(entries.into_iter().map(AuditView::from).collect()))
}
