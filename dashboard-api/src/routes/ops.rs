//! Operations endpoints: health, readiness and metrics. Unauthenticated, as load balancers
//! and Prometheus expect; they reveal no patient data.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use serde_json::json;

use crate::AppState;

/// 200 while every service of the process runs (degraded included), 503 otherwise.
pub async fn healthz(State(state): State<AppState>) -> impl IntoResponse {
    let live = state.health.live();
    let status = if live {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({
        "status": if live { "ok" } else { "unavailable" },
        "parts": state.health.snapshot(),
    });
    (status, Json(body))
}

/// 200 when the process can serve requests: every service runs and storage answers.
pub async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let store_ok = state.store.ping().await.is_ok();
    let ready = store_ok && state.health.live();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({
        "ready": ready,
        "storage": if store_ok { "ok" } else { "unreachable" },
        "parts": state.health.snapshot(),
    });
    (status, Json(body))
}

pub async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    telemon_model::metrics::gauge(
        "telemon_api_stream_clients",
        "Live stream clients connected.",
        &[],
    )
    .set(state.live.clients() as i64);
    (
        [("content-type", "text/plain; version=0.0.4")],
        telemon_model::metrics::render(),
    )
}
