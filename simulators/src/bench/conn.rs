//! Opening one benchmark connection: TCP, optionally TLS (with a client certificate for
//! mutual TLS), then CONNECT and an accepted CONNACK.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tracing::trace;

use super::wire::{self, Packet};
use super::BenchError;

/// A byte stream to the broker, plain or TLS.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

pub type Stream = Box<dyn Io>;

/// How connections reach the broker.
#[derive(Clone, Debug)]
pub enum Transport {
    Plain,
    /// TLS, the server's certificate checked against `ca` for `server_name`.
    Tls {
        ca: PathBuf,
        server_name: String,
    },
}

/// One connection's MQTT client id, and its certificate and key for mutual TLS.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub client_id: String,
    pub cert: Option<(PathBuf, PathBuf)>,
}

/// Bounds the TCP connect, the TLS handshake and the wait for CONNACK together.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What [`connect`] needs beyond the identity, built once per run.
#[derive(Clone)]
pub struct Connector {
    host: String,
    port: u16,
    tls: Option<(Arc<rustls::RootCertStore>, ServerName<'static>)>,
}

impl Connector {
    pub fn new(host: &str, port: u16, transport: &Transport) -> Result<Connector, BenchError> {
        let tls = match transport {
            Transport::Plain => None,
            Transport::Tls { ca, server_name } => {
                let mut roots = rustls::RootCertStore::empty();
                for cert in read_certs(ca)? {
                    roots.add(cert)?;
                }
                let name = ServerName::try_from(server_name.clone())
                    .map_err(|_| BenchError::ServerName(server_name.clone()))?;
                Some((Arc::new(roots), name))
            }
        };
        Ok(Connector {
            host: host.to_string(),
            port,
            tls,
        })
    }

    pub fn address(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    /// Connects `identity` and waits for the broker to accept it.
    pub async fn connect(&self, identity: &Identity) -> Result<Stream, BenchError> {
        let attempt = self.connect_unbounded(identity);
        match tokio::time::timeout(CONNECT_TIMEOUT, attempt).await {
            Ok(result) => result,
            Err(_) => Err(BenchError::ConnectTimeout {
                client: identity.client_id.clone(),
                address: self.address(),
            }),
        }
    }

    async fn connect_unbounded(&self, identity: &Identity) -> Result<Stream, BenchError> {
        let io_error = |source| BenchError::Connect {
            client: identity.client_id.clone(),
            address: self.address(),
            source,
        };
        let tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(io_error)?;
        tcp.set_nodelay(true).map_err(io_error)?;

        let mut stream: Stream = match &self.tls {
            None => Box::new(tcp),
            Some((roots, name)) => {
                let config = client_config(roots.clone(), identity)?;
                let tls = TlsConnector::from(Arc::new(config))
                    .connect(name.clone(), tcp)
                    .await
                    .map_err(io_error)?;
                Box::new(tls)
            }
        };

        let mut out = BytesMut::new();
        wire::connect(&mut out, &identity.client_id);
        stream.write_all(&out).await.map_err(io_error)?;
        let connack = read_packet(&mut stream, &mut BytesMut::new())
            .await
            .map_err(io_error)?;
        let code = wire::connack_code(&connack)?;
        if code != 0 {
            return Err(BenchError::Refused {
                client: identity.client_id.clone(),
                code,
            });
        }
        trace!(client = %identity.client_id, "connected");
        Ok(stream)
    }
}

fn client_config(
    roots: Arc<rustls::RootCertStore>,
    identity: &Identity,
) -> Result<rustls::ClientConfig, BenchError> {
    let builder = rustls::ClientConfig::builder().with_root_certificates(roots);
    let config = match &identity.cert {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let chain = read_certs(cert)?;
            let key = PrivateKeyDer::from_pem_file(key).map_err(|e| BenchError::Pem {
                path: key.clone(),
                reason: e.to_string(),
            })?;
            builder.with_client_auth_cert(chain, key)?
        }
    };
    Ok(config)
}

pub(crate) fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, BenchError> {
    let pem = |e: rustls::pki_types::pem::Error| BenchError::Pem {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(pem)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem)?;
    if certs.is_empty() {
        return Err(BenchError::Pem {
            path: path.to_path_buf(),
            reason: "no certificate in the file".into(),
        });
    }
    Ok(certs)
}

/// Reads until one whole packet is in `buf` and returns it.
pub async fn read_packet(stream: &mut Stream, buf: &mut BytesMut) -> std::io::Result<Packet> {
    loop {
        match wire::next_packet(buf) {
            Ok(Some(packet)) => return Ok(packet),
            Ok(None) => {}
            Err(e) => return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, e)),
        }
        if stream.read_buf(buf).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
}
