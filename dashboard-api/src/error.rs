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
    #[error("{0}")]
    BadRequest(String),
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("{0}")]
    Conflict(String),
    #[error("service unavailable, try again")]
    Unavailable,
    #[error("storage unavailable")]
    Store(#[from] telemon_store::StoreError),
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let status = match &self {
            HttpError::Unauthorized => StatusCode::UNAUTHORIZED,
            HttpError::BadRequest(_) => StatusCode::BAD_REQUEST,
            HttpError::NotFound(_) => StatusCode::NOT_FOUND,
            HttpError::Conflict(_) => StatusCode::CONFLICT,
            HttpError::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            HttpError::Store(e) => {
                error!(cause = %e, "request failed in storage");
                StatusCode::SERVICE_UNAVAILABLE
            }
        };
        let mut response = (status, Json(json!({ "error": self.to_string() }))).into_response();
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                "www-authenticate",
                "Bearer".parse().expect("static header value"),
            );
        }
        response
    }
}
