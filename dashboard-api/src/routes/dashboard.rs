//! The web dashboard: static files embedded in the binary, so the process serves it with
//! nothing to build or install. The pages talk to the API like any client, with the session
//! token from `POST /api/v1/login` kept in the browser's session storage.

use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

use crate::AppState;

/// (path, content type, bytes)
const ASSETS: &[(&str, &str, &[u8])] = &[
    (
        "/",
        "text/html; charset=utf-8",
        include_bytes!("../../assets/index.html"),
    ),
    (
        "/assets/app.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../assets/app.js"),
    ),
    (
        "/assets/app.css",
        "text/css; charset=utf-8",
        include_bytes!("../../assets/app.css"),
    ),
    (
        "/assets/vendor/uplot/uPlot.iife.min.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../assets/vendor/uplot/uPlot.iife.min.js"),
    ),
    (
        "/assets/vendor/uplot/uPlot.min.css",
        "text/css; charset=utf-8",
        include_bytes!("../../assets/vendor/uplot/uPlot.min.css"),
    ),
    (
        "/assets/vendor/uplot/LICENSE",
        "text/plain; charset=utf-8",
        include_bytes!("../../assets/vendor/uplot/LICENSE"),
    ),
];

pub fn router() -> Router<AppState> {
    ASSETS
        .iter()
        .fold(Router::new(), |router, &(path, content_type, body)| {
            router.route(
                path,
                get(move || async move {
                    (
                        [
                            (header::CONTENT_TYPE, content_type),
                            // The page holds patient data: keep it out of shared caches.
                            (header::CACHE_CONTROL, "no-store"),
                            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
                        ],
                        body,
                    )
                        .into_response()
                }),
            )
        })
}
