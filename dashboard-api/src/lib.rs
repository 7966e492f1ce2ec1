//! telemon's HTTP API: REST under `/api/v1`, the live stream of readings and alerts
//! (Server-Sent Events), `/healthz`, `/readyz` and Prometheus `/metrics`.
//!
//! - [`access`]: the access filter (which patients and devices a request may see) and the
//!   audit log of views of patient data.
//! - [`auth`]: users, passwords, sessions, API tokens, login rate limiting.
//! - [`error`]: the one place where failures become HTTP statuses; clients never see SQL or
//!   internal text.
//! - [`live`]: the feed of readings and alerts from the broker that streams fan out from.
//! - [`openapi`]: the OpenAPI document, generated from the handlers.
//! - [`routes`]: the handlers, one file per resource, and the embedded dashboard.

pub mod access;
pub mod auth;
pub mod error;
pub mod live;
pub mod openapi;
pub mod routes;
mod serve;

pub use serve::serve;

use std::net::SocketAddr;
use std::sync::Arc;

use telemon_ingest::decode::Decoder;
use telemon_model::bus::BusConfig;
use telemon_model::health::Health;
use telemon_store::Store;
use tokio::net::TcpListener;
use tracing::info;

pub use auth::Auth;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub store: Store,
    pub health: Health,
    pub auth: Arc<Auth>,
    pub live: live::Live,
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("binding the HTTP listener on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Bus(#[from] telemon_model::bus::BusError),
}

/// A running API server.
pub struct Api {
    local_addr: SocketAddr,
}

impl Api {
    /// Binds `listen`, connects the live feed to the broker and starts serving.
    pub async fn start(
        listen: SocketAddr,
        auth: Auth,
        store: Store,
        health: Health,
        bus: BusConfig,
        decoder: Arc<Decoder>,
    ) -> Result<Api, ApiError> {
        let live = live::Live::start(bus, decoder, health.clone())?;
        let state = AppState {
            store,
            health,
            auth: Arc::new(auth),
            live,
        };
        let bind = |source| ApiError::Bind {
            addr: listen,
            source,
        };
        let listener = TcpListener::bind(listen).await.map_err(bind)?;
        let local_addr = listener.local_addr().map_err(bind)?;
        tokio::spawn(async move {
            if let Err(e) = serve(listener, state).await {
                tracing::error!(cause = %e, "HTTP server stopped");
            }
        });
        info!(%local_addr, "HTTP API ready");
        Ok(Api { local_addr })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }
}
