//! The router: every route, and the state each handler gets. API routes are registered with
//! their OpenAPI descriptions, so the document cannot drift from the routes.

mod admin;
mod alerts;
mod dashboard;
mod devices;
mod ops;
pub(crate) mod patients;
mod rules;
mod session;
pub(crate) mod stream;

use axum::routing::get;
use axum::{Json, Router};
use tower_http::trace::TraceLayer;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::error::HttpError;
use crate::openapi::ApiDoc;
use crate::AppState;

/// The API routes and the OpenAPI document describing them.
pub fn api() -> (Router<AppState>, utoipa::openapi::OpenApi) {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(session::login))
        .routes(routes!(session::logout))
        .routes(routes!(session::me))
        .routes(routes!(devices::list))
        .routes(routes!(devices::readings))
        .routes(routes!(devices::latest))
        .routes(routes!(devices::dead_letters))
        .routes(routes!(patients::list))
        .routes(routes!(patients::get, admin::put_patient))
        .routes(routes!(patients::latest))
        .routes(routes!(admin::attach_device, admin::detach_device))
        .routes(routes!(admin::create_user, admin::list_users))
        .routes(routes!(admin::assign, admin::unassign))
        .routes(routes!(admin::create_token))
        .routes(routes!(admin::audit))
        .routes(routes!(alerts::list))
        .routes(routes!(alerts::get))
        .routes(routes!(alerts::acknowledge))
        .routes(routes!(rules::list))
        .routes(routes!(rules::get, rules::put, rules::delete))
        .routes(routes!(stream::sse))
        .routes(routes!(stream::ws))
        .split_for_parts()
}

pub fn router(state: AppState) -> Router {
    let (api, document) = api();
    let api = api.layer(axum::middleware::map_response(
        crate::error::json_rejections,
    ));
    let document = std::sync::Arc::new(document);
    Router::new()
        .merge(api)
        .route(
            "/api/v1/openapi.json",
            get(move || std::future::ready(Json(document.as_ref().clone()))),
        )
        .merge(dashboard::router())
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .route("/metrics", get(ops::metrics))
        // Unknown paths and methods answer with the same JSON error body as everything else.
        .fallback(|| std::future::ready(HttpError::NotFound("route")))
        .method_not_allowed_fallback(|| std::future::ready(HttpError::MethodNotAllowed))
        .layer(TraceLayer::new_for_http().make_span_with(request_span))
        .with_state(state)
}

/// The span of one request: method and path only. The query string is left out because
/// browsers' stream requests carry their bearer token there (`access_token=`).
fn request_span(request: &axum::http::Request<axum::body::Body>) -> tracing::Span {
    tracing::debug_span!("request", method = %request.method(), path = %request.uri().path())
}
