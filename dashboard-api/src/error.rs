//! Failures as HTTP responses. Clients get a status and a short message; the detail (SQL,
//! I/O) goes to the log only.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use tracing::error;

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("missing or invalid bearer token")]
    Unauthorized,
    #[error("invalid user name or password")]
    LoginFailed,
    #[error("not permitted")]
    Forbidden,
    #[error("too many failed logins, try again later")]
    TooManyRequests { retry_after_secs: u64 },
    #[error("{0}")]
    BadRequest(String),
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("{0}")]
    Conflict(String),
    #[error("service unavailable, try again")]
    Unavailable,
    #[error("internal error")]
    Auth(#[from] crate::auth::AuthError),
    #[error("storage unavailable")]
    Store(#[from] telemon_store::StoreError),
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let status = match &self {
            HttpError::Unauthorized | HttpError::LoginFailed => StatusCode::UNAUTHORIZED,
            HttpError::Forbidden => StatusCode::FORBIDDEN,
            HttpError::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            HttpError::BadRequest(_) => StatusCode::BAD_REQUEST,
            HttpError::NotFound(_) => StatusCode::NOT_FOUND,
            HttpError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            HttpError::Conflict(_) => StatusCode::CONFLICT,
            HttpError::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            HttpError::Auth(e) => {
                error!(cause = %e, "request failed in authentication");
                StatusCode::INTERNAL_SERVER_ERROR
            }
            HttpError::Store(e) => {
                error!(cause = %e, "request failed in storage");
                StatusCode::SERVICE_UNAVAILABLE
            }
        };
        let mut response = (status, Json(json!({ "error": self.to_string() }))).into_response();
        if let HttpError::TooManyRequests { retry_after_secs } = &self {
            response
                .headers_mut()
                .insert("retry-after", (*retry_after_secs).into());
        }
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                "www-authenticate",
                "Bearer".parse().expect("static header value"),
            );
        }
        response
    }
}

/// Turns axum's own rejections (a malformed query, path or JSON body: plain text, with 400,
/// 415 or 422) into the API's JSON error body with 400, so every client error has one shape
/// and one documented status.
pub async fn json_rejections(response: Response) -> Response {
    let plain_text = response
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"text/plain"));
    if !response.status().is_client_error() || !plain_text {
        return response;
    }
    // Rejection messages are short; the bound only guards against surprises.
    let body = axum::body::to_bytes(response.into_body(), 4096)
        .await
        .unwrap_or_default();
    HttpError::BadRequest(String::from_utf8_lossy(&body).into_owned()).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_detail_stays_in_the_log() {
        let err = HttpError::Store(telemon_store::StoreError::UnsupportedUrl);
        assert_eq!(err.to_string(), "storage unavailable");
        assert_eq!(
            err.into_response().status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
    }

    #[test]
    fn rate_limited_responses_say_when_to_retry() {
        let response = HttpError::TooManyRequests {
            retry_after_secs: 42,
        }
        .into_response();
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()["retry-after"], "42");
    }
}
