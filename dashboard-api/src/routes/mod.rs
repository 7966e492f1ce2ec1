//! The router: every route, and the state each handler gets.

mod alerts;
mod devices;
mod ops;
mod stream;

use axum::routing::{get, post};
use axum::Router;
use tower_http::trace::TraceLayer;

use crate::AppState;

pub fn router(state: AppState) -> Router {
    let api = Router::new()
        .route("/devices", get(devices::list))
        .route("/devices/{id}/readings", get(devices::readings))
        .route("/devices/{id}/latest", get(devices::latest))
        .route("/alerts", get(alerts::list))
        .route("/alerts/{id}", get(alerts::get))
        .route("/alerts/{id}/ack", post(alerts::acknowledge))
        .route("/dead-letters", get(devices::dead_letters))
        .route("/stream", get(stream::sse));
    Router::new()
        .nest("/api/v1", api)
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .route("/metrics", get(ops::metrics))
        .layer(TraceLayer::new_for_http())
        .with_state(state)
}
