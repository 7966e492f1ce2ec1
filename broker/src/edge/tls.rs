//! The TLS side of the edge: a server configuration rebuilt whenever the CA bundle or the CRL
//! changes on disk, so that revocation applies to new connections without a restart and
//! disconnects live sessions of revoked certificates.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;
use tracing::{info, warn};

use super::connection::Shared;
use crate::pki;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}: {source}")]
    Pem {
        path: PathBuf,
        source: rustls::pki_types::pem::Error,
    },
    #[error("client certificate verifier: {0}")]
    Verifier(#[from] pki::PkiError),
    #[error("server TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("reading the CRL {path}: {detail}")]
    Crl { path: PathBuf, detail: String },
}

/// The files the device listener's TLS is built from.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    /// Every certificate in this bundle is a trust anchor for device certificates.
    pub ca_bundle: PathBuf,
    pub crl: Option<PathBuf>,
    pub cert: PathBuf,
    pub key: PathBuf,
}

pub(crate) struct ReloadingAcceptor {
    files: TlsFiles,
    current: ArcSwap<TlsAcceptor>,
    stamps: Mutex<Vec<Option<SystemTime>>>,
    /// Serials on the CRL, for connections whose handshake came before a revocation.
    revoked: ArcSwap<HashSet<Vec<u8>>>,
}

impl ReloadingAcceptor {
    pub fn new(files: TlsFiles) -> Result<Self, TlsError> {
        let acceptor = build(&files)?;
        let stamps = stamps(&files);
        let acceptor = ReloadingAcceptor {
            files,
            current: ArcSwap::from_pointee(acceptor),
            stamps: Mutex::new(stamps),
            revoked: ArcSwap::default(),
        };
        acceptor
            .revoked
            .store(Arc::new(acceptor.revoked_serials()?));
        Ok(acceptor)
    }

    /// Whether a certificate serial (normalized) is on the CRL as last loaded.
    pub fn is_revoked(&self, serial: &[u8]) -> bool {
        self.revoked.load().contains(serial)
    }

    pub fn acceptor(&self) -> Arc<TlsAcceptor> {
        self.current.load_full()
    }

    /// Rebuilds the configuration if a file changed; returns whether it did.
    fn reload_if_changed(&self) -> Result<bool, TlsError> {
        let now = stamps(&self.files);
        if *self.stamps.lock() == now {
            return Ok(false);
        }
        self.current.store(Arc::new(build(&self.files)?));
        *self.stamps.lock() = now;
        Ok(true)
    }

    /// Serial numbers (DER integer bytes, leading zeros removed) on the CRL.
    fn revoked_serials(&self) -> Result<HashSet<Vec<u8>>, TlsError> {
        let Some(path) = &self.files.crl else {
            return Ok(HashSet::new());
        };
        let mut serials = HashSet::new();
        for der in CertificateRevocationListDer::pem_file_iter(path).map_err(|e| pem(path, e))? {
            let der = der.map_err(|e| pem(path, e))?;
            let (_, crl) = x509_parser::parse_x509_crl(&der).map_err(|e| TlsError::Crl {
                path: path.clone(),
                detail: e.to_string(),
            })?;
            for revoked in crl.iter_revoked_certificates() {
                serials.insert(normalize_serial(revoked.raw_serial()));
            }
        }
        Ok(serials)
    }
}

pub(crate) fn normalize_serial(raw: &[u8]) -> Vec<u8> {
    let start = raw.iter().position(|b| *b != 0).unwrap_or(raw.len());
    raw[start..].to_vec()
}

fn pem(path: &Path, source: rustls::pki_types::pem::Error) -> TlsError {
    TlsError::Pem {
        path: path.to_path_buf(),
        source,
    }
}

fn stamps(files: &TlsFiles) -> Vec<Option<SystemTime>> {
    let mtime = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let mut out = vec![
        mtime(&files.ca_bundle),
        mtime(&files.cert),
        mtime(&files.key),
    ];
    out.push(files.crl.as_deref().and_then(mtime));
    out
}

fn build(files: &TlsFiles) -> Result<TlsAcceptor, TlsError> {
    let verifier = pki::client_verifier(&files.ca_bundle, files.crl.as_deref())?;
    let chain = CertificateDer::pem_file_iter(&files.cert)
        .map_err(|e| pem(&files.cert, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem(&files.cert, e))?;
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| pem(&files.key, e))?;
    let mut config = rustls::ServerConfig::builder_with_provider(crate::crypto::provider())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    // No session resumption. A resumed session is not checked by the client certificate
    // verifier again (expiry included), and rustls's in-memory store keeps 256 sessions: in a
    // fleet larger than that most would be evicted before use, while every full handshake
    // paid for issuing two tickets (about a sixth of the edge's CPU per connect).
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Polls the CA bundle and CRL once a second; on a change, rebuilds the TLS configuration and
/// disconnects live connections whose certificate is now revoked. A broken file keeps the
/// previous configuration in force and is logged.
pub(crate) async fn watch_revocations(tls: Arc<ReloadingAcceptor>, shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        match tls.reload_if_changed() {
            Ok(false) => continue,
            Ok(true) => info!("device TLS configuration reloaded"),
            Err(e) => {
                warn!(cause = %e, "device TLS configuration not reloaded; previous one stays");
                continue;
            }
        }
        // The list first, then the live connections: a connection registers itself before it
        // checks the list, so either it sees the new list or this sees it.
        match tls.revoked_serials() {
            Ok(serials) => {
                let serials = Arc::new(serials);
                tls.revoked.store(serials.clone());
                shared.disconnect_revoked(&serials);
            }
            Err(e) => warn!(cause = %e, "revocation list unreadable"),
        }
    }
}
