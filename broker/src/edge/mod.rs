//! The device listener: mutual TLS, identity, limits, and the packet filter in front of the
//! engine.
//!
//! The accept loop only accepts, applies the cheap limits (total connections, connections per
//! source address, handshake rate) and spawns; every handshake runs in its own task under a
//! timeout, so idle or slow sockets never delay anyone else's connect.

mod connection;
mod descriptors;
mod gates;
mod limits;
pub mod packet;
mod tls;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

pub use limits::Limits;
pub use tls::TlsFiles;

use crate::acl::Acl;
use crate::engine::Engine;
use crate::pki::IdentitySource;

#[derive(Debug, thiserror::Error)]
pub enum EdgeError {
    #[error("binding the device listener on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error(transparent)]
    Acl(#[from] crate::acl::AclError),
}

/// Everything the device listener needs, validated at start-up.
#[derive(Clone, Debug)]
pub struct EdgeConfig {
    pub listen: SocketAddr,
    pub tls: TlsFiles,
    pub identity: IdentitySource,
    /// Mosquitto-style ACL file; `None` means the default (a device writes `devices/%c/#`
    /// and reads `devices/%c/commands/#`).
    pub acl_file: Option<PathBuf>,
    pub limits: Limits,
}

/// A running device listener.
pub struct Edge {
    local_addr: SocketAddr,
    shared: Arc<connection::Shared>,
}

impl Edge {
    /// Binds the listener and starts accepting. The returned handle reports the bound address
    /// (useful with port 0); the listener lives as long as the runtime.
    pub async fn start(config: EdgeConfig, engine: Engine) -> Result<Edge, EdgeError> {
        let acl = match &config.acl_file {
            Some(path) => Acl::load(path)?,
            None => Acl::default_devices(),
        };
        let tls = Arc::new(tls::ReloadingAcceptor::new(config.tls.clone())?);
        let limits = within_descriptors(config.limits.clone());
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| EdgeError::Bind {
                    addr: config.listen,
                    source,
                })?;
        let local_addr = listener.local_addr().map_err(|source| EdgeError::Bind {
            addr: config.listen,
            source,
        })?;

        let shared = Arc::new(connection::Shared {
            engine,
            acl,
            identity: config.identity,
            limits: limits::LimitState::new(limits),
            tls: tls.clone(),
            live: Default::default(),
            gates: Default::default(),
            shutdown: CancellationToken::new(),
        });
        tokio::spawn(tls::watch_revocations(tls, shared.clone()));
        tokio::spawn(accept_loop(listener, shared.clone()));
        info!(%local_addr, "device listener (mutual TLS) ready");
        Ok(Edge { local_addr, shared })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Device connections open now.
    pub fn connections(&self) -> usize {
        self.shared.live.lock().len()
    }

    /// Connections the edge admits at once: the configured limit, or less when the process's
    /// descriptor limit cannot hold that many.
    pub fn max_connections(&self) -> usize {
        self.shared.limits.config.max_connections
    }

    /// Stops accepting and closes every device connection. Devices see a DISCONNECT
    /// (MQTT 5) or a close, and reconnect elsewhere or later with their sessions.
    pub fn shutdown(&self) {
        self.shared.shutdown.cancel();
    }
}

/// Lowers the connection limit to what the process's descriptors can hold (raising the soft
/// descriptor limit first), so that a full edge refuses devices before their handshake instead
/// of starving the engine of descriptors.
fn within_descriptors(mut limits: Limits) -> Limits {
    let descriptors = telemon_model::limits::raise_open_files();
    let fit = descriptors::connections_within(descriptors);
    if limits.max_connections > fit {
        warn!(
            configured = limits.max_connections,
            admitted = fit,
            descriptors,
            per_connection = descriptors::PER_CONNECTION,
            "connection limit lowered to what the open file limit holds"
        );
        limits.max_connections = fit;
    }
    limits
}

async fn accept_loop(listener: TcpListener, shared: Arc<connection::Shared>) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shared.shutdown.cancelled() => return,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                // Usually EMFILE: back off briefly instead of spinning on the error.
                warn!(cause = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(permit) = shared.limits.admit(peer.ip()) else {
            debug!(%peer, "connection refused by limits");
            continue;
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(connection::serve(stream, peer, shared.clone(), permit));
    }
}
