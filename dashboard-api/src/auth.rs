//! Bearer-token authentication.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use subtle::ConstantTimeEq;

use crate::error::HttpError;
use crate::AppState;

/// The tokens the API accepts.
pub struct Auth {
    admin_token: String,
}

impl Auth {
    pub fn new(admin_token: String) -> Self {
        Auth { admin_token }
    }

    fn check(&self, token: &str) -> Option<Principal> {
        // Constant time, so the comparison leaks nothing about how much of a guess matched.
        let ok: bool = token.as_bytes().ct_eq(self.admin_token.as_bytes()).into();
        ok.then(|| Principal {
            name: "admin".to_string(),
        })
    }
}

/// Who made a request, extracted from its `Authorization: Bearer` header.
#[derive(Clone, Debug)]
pub struct Principal {
    pub name: String,
}

impl FromRequestParts<AppState> for Principal {
    type Rejection = HttpError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, HttpError> {
        let header = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .ok_or(HttpError::Unauthorized)?;
        let token = header
            .strip_prefix("Bearer ")
            .ok_or(HttpError::Unauthorized)?
            .trim();
        state.auth.check(token).ok_or(HttpError::Unauthorized)
    }
}
