//! Login, logout and who-am-I.

use axum::extract::{ConnectInfo, State};
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use utoipa::ToSchema;

use crate::auth::{self, Credential, Principal, Role};
use crate::error::HttpError;
use crate::openapi::ErrorBody;
use crate::AppState;

/// Longest accepted user name or password, in characters: bounds argon2's input and the
/// limiter's keys.
const MAX_FIELD: usize = 256;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoginRequest {
    #[schema(min_length = 1, max_length = 256)]
    pub user: String,
    #[schema(max_length = 256)]
    pub password: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct LoginResponse {
    /// Send as `Authorization: Bearer <token>`.
    pub token: String,
    pub expires_at: DateTime<Utc>,
    pub user: String,
    pub role: Role,
}

/// Exchanges a user name and password for a session token.
#[utoipa::path(post, path = "/api/v1/login", tag = "session", request_body = LoginRequest,
    security(()),
    responses((status = 200, body = LoginResponse), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 429, body = ErrorBody)))]
pub async fn login(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Json(request): Json<LoginRequest>,
) -> Result<Json<LoginResponse>, HttpError> {
    if request.user.is_empty()
        || request.user.chars().count() > MAX_FIELD
        || request.password.chars().count() > MAX_FIELD
    {
        return Err(HttpError::BadRequest(format!(
            "user must be 1 to {MAX_FIELD} characters, password at most {MAX_FIELD}"
        )));
    }
    let limiter = state.auth.limiter();
    let addr = Some(peer.ip());
    // The attempt is counted before the password is checked, so concurrent guesses cannot
    // all pass the budget check while the (slow) verification runs.
    if let Some(retry_after_secs) = limiter.attempt(&request.user, addr) {
        return Err(HttpError::TooManyRequests { retry_after_secs });
    }

    let verified = state
        .auth
        .verify_password(&state.store, &request.user, &request.password)
        .await?;
    let Some(user) = verified else {
        return Err(HttpError::LoginFailed);
    };
    let role = Role::parse(&user.role).ok_or(HttpError::LoginFailed)?;
    limiter.succeeded(&request.user, addr);

    let token = auth::new_token(auth::SESSION_PREFIX);
    let now = Utc::now();
    let ttl =
        chrono::Duration::from_std(state.auth.session_ttl()).map_err(|_| HttpError::Unavailable)?;
    let expires_at = now + ttl;
    state
        .store
        .create_session(&auth::hash_token(&token), &user.name, now, expires_at)
        .await?;
    Ok(Json(LoginResponse {
        token,
        expires_at,
        user: user.name,
        role,
    }))
}

/// Ends the caller's session. Other credentials have no session to end.
#[utoipa::path(post, path = "/api/v1/logout", tag = "session",
    responses((status = 204, description = "session ended"), (status = 401, body = ErrorBody)))]
pub async fn logout(
    principal: Principal,
    State(state): State<AppState>,
) -> Result<axum::http::StatusCode, HttpError> {
    if let Credential::Session { token_hash } = &principal.credential {
        state.store.delete_session(token_hash).await?;
        state.live.scope_changed(Some(&principal.name));
    }
    Ok(axum::http::StatusCode::NO_CONTENT)
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Me {
    pub name: String,
    pub role: Role,
}

#[utoipa::path(get, path = "/api/v1/me", tag = "session",
    responses((status = 200, body = Me), (status = 401, body = ErrorBody)))]
pub async fn me(principal: Principal) -> Json<Me> {
    Json(Me {
        name: principal.name,
        role: principal.role,
    })
}
