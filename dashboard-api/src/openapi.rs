//! The OpenAPI document, served at `/api/v1/openapi.json`. Paths come from the handlers'
//! `#[utoipa::path]` attributes as the router registers them; the types below describe
//! bodies whose Rust types live in crates without OpenAPI derives (the shared model).

use serde::Serialize;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};

#[derive(OpenApi)]
#[openapi(
    info(title = "telemon API", description = "Devices, patients, readings, alerts and live \
        streams. Authenticate with `Authorization: Bearer <token>` from `POST /api/v1/login`."),
    modifiers(&BearerAuth),
    security(("bearer" = [])),
    components(schemas(ErrorBody, ReadingDoc, AlertDoc, ValueDoc))
)]
pub struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// Every error response: a short message, never SQL or internal detail.
#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: String,
}

/// A reading value: a number, a boolean or text.
#[derive(Serialize, ToSchema)]
#[serde(untagged)]
#[allow(dead_code)]
pub enum ValueDoc {
    Number(f64),
    Bool(bool),
    Text(String),
}

/// One value of one metric from one device at one time (`telemon_model::Reading`).
#[derive(Serialize, ToSchema)]
#[allow(dead_code)]
pub struct ReadingDoc {
    device_id: String,
    metric: String,
    time: chrono::DateTime<chrono::Utc>,
    value: ValueDoc,
    #[schema(nullable = false)]
    #[serde(skip_serializing_if = "Option::is_none")]
    unit: Option<String>,
}

/// One alert as of its latest transition (`telemon_model::AlertEvent`).
#[derive(Serialize, ToSchema)]
#[allow(dead_code)]
pub struct AlertDoc {
    id: String,
    rule: String,
    /// The patient, or the device when it monitors no patient.
    subject: String,
    #[schema(pattern = "^(high|medium|low)$")]
    priority: String,
    #[schema(pattern = "^(pending|firing|acknowledged|resolved)$")]
    state: String,
    #[schema(nullable = false)]
    #[serde(skip_serializing_if = "Option::is_none")]
    metric: Option<String>,
    #[schema(nullable = false)]
    #[serde(skip_serializing_if = "Option::is_none")]
    value: Option<f64>,
    message: String,
    started_at: chrono::DateTime<chrono::Utc>,
    updated_at: chrono::DateTime<chrono::Utc>,
    #[schema(nullable = false)]
    #[serde(skip_serializing_if = "Option::is_none")]
    acknowledged_by: Option<String>,
    #[schema(nullable = false)]
    #[serde(skip_serializing_if = "Option::is_none")]
    acknowledged_at: Option<chrono::DateTime<chrono::Utc>>,
}
