//! How a service reaches the MQTT broker: telemon's own engine in-process, or an external
//! broker (Mosquitto, EMQX, ...) over TCP, TLS or mutual TLS.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{MqttOptions, TlsConfiguration, Transport};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("invalid broker URL {0:?}: expected mqtt://host:port or mqtts://host:port")]
    Url(String),
    #[error("reading {path}: {source}")]
    Pem {
        path: PathBuf,
        source: rustls::pki_types::pem::Error,
    },
    #[error("TLS client configuration: {0}")]
    Tls(#[from] rustls::Error),
}

/// Certificates for a TLS connection to an external broker.
#[derive(Clone, Debug)]
pub struct BusTls {
    pub ca: PathBuf,
    /// Client certificate and key, for brokers that require mutual TLS.
    pub client: Option<(PathBuf, PathBuf)>,
}

/// Where and how to connect to the broker.
#[derive(Clone)]
pub struct BusConfig {
    pub host: String,
    pub port: u16,
    pub tls: Option<BusTls>,
    pub username: Option<String>,
    pub password: Option<String>,
}

// Hand-written so that the password never reaches a log line.
impl fmt::Debug for BusConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BusConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("tls", &self.tls)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl BusConfig {
    /// Parses `mqtt://host:port` (plain) or `mqtts://host:port` (TLS; set `tls` after).
    pub fn from_url(url: &str) -> Result<Self, BusError> {
        let bad = || BusError::Url(url.to_string());
        let (scheme, rest) = url.split_once("://").ok_or_else(bad)?;
        let default_port = match scheme {
            "mqtt" | "tcp" => 1883,
            "mqtts" | "ssl" => 8883,
            _ => return Err(bad()),
        };
        let rest = rest.trim_end_matches('/');
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) => (h, p.parse().map_err(|_| bad())?),
            None => (rest, default_port),
        };
        if host.is_empty() {
            return Err(bad());
        }
        Ok(BusConfig {
            host: host.trim_matches(['[', ']']).to_string(),
            port,
            tls: None,
            username: None,
            password: None,
        })
    }

    /// MQTT options for one client of this broker. `keep_alive` bounds how long a dead
    /// connection goes unnoticed.
    pub fn mqtt_options(&self, client_id: &str) -> Result<MqttOptions, BusError> {
        let mut options = MqttOptions::new(client_id, &self.host, self.port);
        options.set_keep_alive(Duration::from_secs(10));
        options.set_max_packet_size(1 << 20, 1 << 20);
        if let (Some(user), Some(pass)) = (&self.username, &self.password) {
            options.set_credentials(user, pass);
        }
        if let Some(tls) = &self.tls {
            options.set_transport(Transport::tls_with_config(self.tls_config(tls)?));
        }
        Ok(options)
    }

    fn tls_config(&self, tls: &BusTls) -> Result<TlsConfiguration, BusError> {
        let pem = |path: &PathBuf, e| BusError::Pem {
            path: path.clone(),
            source: e,
        };
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(&tls.ca).map_err(|e| pem(&tls.ca, e))? {
            roots.add(cert.map_err(|e| pem(&tls.ca, e))?)?;
        }
        let builder = rustls::ClientConfig::builder().with_root_certificates(roots);
        let config = match &tls.client {
            Some((cert, key)) => {
                let chain = CertificateDer::pem_file_iter(cert)
                    .map_err(|e| pem(cert, e))?
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| pem(cert, e))?;
                let key = PrivateKeyDer::from_pem_file(key).map_err(|e| pem(key, e))?;
                builder.with_client_auth_cert(chain, key)?
            }
            None => builder.with_no_client_auth(),
        };
        Ok(TlsConfiguration::Rustls(Arc::new(config)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_broker_urls() {
        let b = BusConfig::from_url("mqtt://127.0.0.1:1884").unwrap();
        assert_eq!((b.host.as_str(), b.port), ("127.0.0.1", 1884));
        let b = BusConfig::from_url("mqtts://broker.example").unwrap();
        assert_eq!((b.host.as_str(), b.port), ("broker.example", 8883));
        assert!(BusConfig::from_url("http://x").is_err());
        assert!(BusConfig::from_url("mqtt://:1").is_err());
    }

    #[test]
    fn debug_output_hides_the_password() {
        let mut b = BusConfig::from_url("mqtt://h:1").unwrap();
        b.password = Some("s3cret".into());
        assert!(!format!("{b:?}").contains("s3cret"));
    }
}
