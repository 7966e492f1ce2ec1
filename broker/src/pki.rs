//! The development certificate authority: the CA itself, the broker's server certificate,
//! device client certificates, the index of what was issued, and the revocation list (CRL).
//!
//! Everything lives in one directory (`<data-dir>/certs`):
//!
//! | file | what |
//! |---|---|
//! | `ca.crt`, `ca.key` | the CA (ECDSA P-256, key mode 0600) |
//! | `crl.pem` | the CRL, re-signed on every revocation and when half its life is gone |
//! | `crlnumber` | the last CRL number used, so every CRL supersedes the one before |
//! | `index.tsv` | one line per issued device certificate: serial, identity, expiry, revocation |
//! | `server.crt`, `server.key` | the broker's own certificate (serverAuth) |
//!
//! Every file is written to a temporary name and renamed into place, so the edge reloading the
//! CRL, or a Mosquitto broker reading it, never sees half a file. Two processes revoking at the
//! same moment are not serialized: the last writer wins, and a second `revoke` of the same
//! identity repairs the CRL because the CRL is always rebuilt from the index.
//!
//! The identity of a device is taken from its certificate ([`identity_from_cert`]); certificates
//! issued here carry it as the subject Common Name. Key material is never logged.

use std::collections::BTreeSet;
use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use rand::RngCore;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, KeyIdMethod, KeyPair, KeyUsagePurpose,
    RevokedCertParams, SanType, SerialNumber,
};
use rustls::server::danger::ClientCertVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer};
use serde::{Deserialize, Serialize};
use telemon_model::{DeviceId, InvalidDeviceId};
use time::{Duration, OffsetDateTime};
use tracing::debug;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::FromDer;

/// Validity of a device certificate when the operator does not say: 825 days is the longest
/// lifetime Apple platforms accept for TLS certificates, a common ceiling in device fleets too.
pub const DEFAULT_DEVICE_DAYS: u32 = 825;

/// The CA outlives every certificate it issues with the default validity several times over.
const CA_DAYS: i64 = 3650;
/// The server certificate is re-issued at start-up when less than this is left, so a broker
/// restarted now and then never serves an expired certificate.
const SERVER_RENEW_BEFORE_DAYS: i64 = 30;
/// How long a CRL stays valid. Verifiers that enforce `nextUpdate` (OpenSSL, Mosquitto) refuse
/// every client after it, so the CRL is re-signed when half of this is gone.
const CRL_VALID_DAYS: i64 = 7;
/// Certificates start a little in the past so a device whose clock lags accepts them.
const BACKDATE: Duration = Duration::hours(1);

const CA_CERT: &str = "ca.crt";
const CA_KEY: &str = "ca.key";
const CRL: &str = "crl.pem";
const CRL_NUMBER: &str = "crlnumber";
const INDEX: &str = "index.tsv";
const SERVER_CERT: &str = "server.crt";
const SERVER_KEY: &str = "server.key";
const INDEX_HEADER: &str = "# serial\tidentity\tnot_after\trevoked_at\n";

/// Names the broker's server certificate always covers, so local clients and tests can connect.
const LOCAL_NAMES: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PkiError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("no certificate authority in {0} (ca.crt and ca.key)")]
    NoCa(PathBuf),
    #[error("incomplete certificate authority in {dir}: {missing} is missing")]
    IncompleteCa { dir: PathBuf, missing: &'static str },
    #[error("{path}: the CA key does not belong to the CA certificate")]
    KeyMismatch { path: PathBuf },
    #[error("{context}: {source}")]
    Rcgen {
        context: String,
        source: rcgen::Error,
    },
    #[error("cannot parse {what}: {reason}")]
    Parse { what: String, reason: String },
    #[error(transparent)]
    InvalidIdentity(#[from] InvalidDeviceId),
    #[error("the certificate has no {0} to take the device identity from")]
    NoIdentity(IdentitySource),
    #[error("the certificate has several {0} values; the device identity would be ambiguous")]
    AmbiguousIdentity(IdentitySource),
    #[error("{path}:{line}: {reason}")]
    Index {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("no issued certificate matches {0:?} (an identity or a serial)")]
    UnknownCert(String),
    #[error("validity must be at least one day")]
    InvalidValidity,
    #[error("{path}: no PEM certificate found")]
    NoCertificates { path: PathBuf },
    #[error("{path}: no PEM X509 CRL found")]
    NoCrl { path: PathBuf },
    #[error("{path}: {source}")]
    TrustAnchor {
        path: PathBuf,
        source: rustls::Error,
    },
    #[error("cannot build the client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

/// Where the device identity is read from in a client certificate.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum IdentitySource {
    /// The subject Common Name; what `telemon cert issue` writes, and what Mosquitto's
    /// `use_identity_as_username` reads.
    #[default]
    #[serde(alias = "cn")]
    CommonName,
    /// A subjectAltName DNS name.
    SanDns,
    /// A subjectAltName URI, used whole (e.g. `urn:dev:ow:10e2073a01080063`).
    SanUri,
}

impl fmt::Display for IdentitySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IdentitySource::CommonName => "subject common name",
            IdentitySource::SanDns => "subjectAltName DNS name",
            IdentitySource::SanUri => "subjectAltName URI",
        })
    }
}

impl FromStr for IdentitySource {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "common-name" | "cn" => Ok(IdentitySource::CommonName),
            "san-dns" => Ok(IdentitySource::SanDns),
            "san-uri" => Ok(IdentitySource::SanUri),
            other => Err(format!(
                "unknown identity source {other:?}: use common-name, san-dns or san-uri"
            )),
        }
    }
}

/// A device certificate just issued, and where its files are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Issued {
    pub record: CertRecord,
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
}

/// One line of the index of issued device certificates.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertRecord {
    /// Lowercase hex without leading zeros, as [`serial_hex`] gives it.
    pub serial: String,
    pub identity: String,
    pub not_after: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
}

/// The development CA in one directory. Cheap to open; holds the CA key in memory.
pub struct Pki {
    dir: PathBuf,
    /// The CA as rcgen needs it to sign: subject, key identifier, key usages.
    issuer: rcgen::Certificate,
    key: KeyPair,
    /// The CA's subject key identifier, to tell whether a certificate on disk was issued by
    /// this CA or by one that was replaced.
    key_id: Vec<u8>,
}

// Written by hand so that the key can never end up in a log line.
impl fmt::Debug for Pki {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pki")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl Pki {
    /// Opens the CA in `dir`, creating the directory, the CA, an empty CRL and an empty index
    /// when absent. Re-signs the CRL when half of its validity is gone.
    pub fn open_or_init(dir: &Path) -> Result<Pki, PkiError> {
        create_private_dir(dir)?;

        let has_cert = dir.join(CA_CERT).exists();
        let has_key = dir.join(CA_KEY).exists();
        match (has_cert, has_key) {
            (false, false) => init_ca(dir)?,
            (true, false) => return Err(incomplete(dir, CA_KEY)),
            (false, true) => return Err(incomplete(dir, CA_CERT)),
            (true, true) => {}
        }

        let pki = Pki::open(dir)?;
        if !pki.dir.join(INDEX).exists() {
            write_atomic(&pki.dir.join(INDEX), INDEX_HEADER.as_bytes(), 0o644)?;
        }
        if pki.crl_needs_refresh()? {
            pki.write_crl(&pki.read_index()?)?;
        }
        Ok(pki)
    }

    /// Opens an existing CA; an error when `dir` has none.
    pub fn open(dir: &Path) -> Result<Pki, PkiError> {
        let cert_path = dir.join(CA_CERT);
        let key_path = dir.join(CA_KEY);
        if !cert_path.exists() && !key_path.exists() {
            return Err(PkiError::NoCa(dir.to_path_buf()));
        }

        let cert_pem = read_to_string(&cert_path)?;
        let key_pem = read_to_string(&key_path)?;
        let key = KeyPair::from_pem(&key_pem).map_err(|source| PkiError::Rcgen {
            context: format!("{}: reading the CA key", key_path.display()),
            source,
        })?;

        let cert_der =
            CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(|e| PkiError::Parse {
                what: cert_path.display().to_string(),
                reason: e.to_string(),
            })?;
        let cert = parse_cert(&cert_der, &cert_path.display().to_string())?;
        if cert.public_key().raw != key.public_key_der().as_slice() {
            return Err(PkiError::KeyMismatch { path: key_path });
        }

        let params =
            CertificateParams::from_ca_cert_der(&cert_der).map_err(|source| PkiError::Rcgen {
                context: format!("{}: reading the CA certificate", cert_path.display()),
                source,
            })?;
        let issuer = params.self_signed(&key).map_err(|source| PkiError::Rcgen {
            context: "loading the CA".into(),
            source,
        })?;

        // What issued certificates and CRLs carry as authority key identifier: the CA's own
        // subject key identifier when it has one, else the SHA-256 of its key.
        let key_id = issuer.key_identifier();

        debug!(dir = %dir.display(), "opened certificate authority");
        Ok(Pki {
            dir: dir.to_path_buf(),
            issuer,
            key,
            key_id,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn ca_path(&self) -> PathBuf {
        self.dir.join(CA_CERT)
    }

    pub fn crl_path(&self) -> PathBuf {
        self.dir.join(CRL)
    }

    /// The broker's server certificate and key (`server.crt`, `server.key`), issued when
    /// absent, not from this CA, expiring within 30 days, or not covering every one of `names`
    /// (DNS names or IP addresses; localhost, 127.0.0.1 and ::1 are always added).
    pub fn ensure_server_cert(&self, names: &[String]) -> Result<(PathBuf, PathBuf), PkiError> {
        let cert_path = self.dir.join(SERVER_CERT);
        let key_path = self.dir.join(SERVER_KEY);
        let mut wanted: BTreeSet<String> = LOCAL_NAMES.iter().map(|n| n.to_string()).collect();
        wanted.extend(names.iter().map(|n| normalize_name(n)));

        if key_path.exists() && self.server_cert_is_current(&cert_path, &wanted)? {
            return Ok((cert_path, key_path));
        }

        let mut params = CertificateParams::default();
        params.distinguished_name = distinguished_name("telemon broker");
        params.subject_alt_names = wanted
            .iter()
            .map(|name| san_for(name))
            .collect::<Result<_, _>>()?;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let now = OffsetDateTime::now_utc();
        let (cert_pem, key_pem, _) = self.sign(
            params,
            now - BACKDATE,
            now + Duration::days(DEFAULT_DEVICE_DAYS.into()),
        )?;

        write_atomic(&key_path, key_pem.as_bytes(), 0o600)?;
        write_atomic(&cert_path, cert_pem.as_bytes(), 0o644)?;
        debug!(names = ?wanted, "issued the broker's server certificate");
        Ok((cert_path, key_path))
    }

    /// Issues a client certificate for the device `id`, valid for `days`, written as
    /// `out_dir/<id>.crt` and `out_dir/<id>.key` (mode 0600), and records it in the index.
    pub fn issue(&self, id: &str, out_dir: &Path, days: u32) -> Result<Issued, PkiError> {
        if days == 0 {
            return Err(PkiError::InvalidValidity);
        }
        let now = OffsetDateTime::now_utc();
        self.issue_with_validity(
            id,
            out_dir,
            now - BACKDATE,
            now + Duration::days(days.into()),
        )
    }

    /// Issues a device certificate with an explicit validity window, e.g. one already expired
    /// or not yet valid. For tests of the edge's refusals; operators use [`Pki::issue`].
    #[doc(hidden)]
    pub fn issue_with_validity(
        &self,
        id: &str,
        out_dir: &Path,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<Issued, PkiError> {
        let id = DeviceId::new(id)?;

        let mut params = CertificateParams::default();
        params.distinguished_name = distinguished_name(id.as_str());
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let (cert_pem, key_pem, serial) = self.sign(params, not_before, not_after)?;

        fs::create_dir_all(out_dir).map_err(|source| io_error(out_dir, source))?;
        let cert_path = out_dir.join(format!("{id}.crt"));
        let key_path = out_dir.join(format!("{id}.key"));
        write_atomic(&key_path, key_pem.as_bytes(), 0o600)?;
        write_atomic(&cert_path, cert_pem.as_bytes(), 0o644)?;

        let record = CertRecord {
            serial,
            identity: id.to_string(),
            not_after: to_chrono(not_after),
            revoked_at: None,
        };
        let mut index = self.read_index()?;
        index.push(record.clone());
        self.write_index(&index)?;

        debug!(device = %id, serial = %record.serial, "issued device certificate");
        Ok(Issued {
            record,
            cert_path,
            key_path,
        })
    }

    /// Revokes every unrevoked certificate of the identity `id_or_serial`, or the one
    /// certificate with that serial (hex, `:` separators and case ignored), and re-signs the
    /// CRL. Returns the certificates revoked now: empty when all were revoked already. The
    /// CRL is re-signed even then, which repairs a CRL whose earlier write failed.
    pub fn revoke(&self, id_or_serial: &str) -> Result<Vec<CertRecord>, PkiError> {
        let wanted_serial = normalize_serial(id_or_serial);
        let mut index = self.read_index()?;
        let matches = |r: &CertRecord| {
            r.identity == id_or_serial || Some(&r.serial) == wanted_serial.as_ref()
        };
        if !index.iter().any(matches) {
            return Err(PkiError::UnknownCert(id_or_serial.to_string()));
        }

        let now = Utc::now();
        let mut revoked = Vec::new();
        for record in index
            .iter_mut()
            .filter(|r| matches(r) && r.revoked_at.is_none())
        {
            record.revoked_at = Some(now);
            revoked.push(record.clone());
        }

        // The index first: the CRL is derived from it, so a failure between the two writes
        // is repaired by the next revoke or CRL refresh.
        self.write_index(&index)?;
        self.write_crl(&index)?;
        for record in &revoked {
            debug!(device = %record.identity, serial = %record.serial, "revoked certificate");
        }
        Ok(revoked)
    }

    /// Every device certificate issued, oldest first.
    pub fn list(&self) -> Result<Vec<CertRecord>, PkiError> {
        self.read_index()
    }

    /// Re-signs the CRL from the index now, e.g. from a daily timer in a long-running broker.
    pub fn refresh_crl(&self) -> Result<(), PkiError> {
        self.write_crl(&self.read_index()?)
    }

    /// Signs `params` with a fresh key and a random serial; returns (cert PEM, key PEM, serial).
    fn sign(
        &self,
        mut params: CertificateParams,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<(String, String, String), PkiError> {
        let key = KeyPair::generate().map_err(|source| PkiError::Rcgen {
            context: "generating a key".into(),
            source,
        })?;
        let serial = random_serial();
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        params.not_before = not_before;
        params.not_after = not_after;
        params.use_authority_key_identifier_extension = true;
        params.key_identifier_method = KeyIdMethod::Sha256;

        let cert = params
            .signed_by(&key, &self.issuer, &self.key)
            .map_err(|source| PkiError::Rcgen {
                context: "signing a certificate".into(),
                source,
            })?;
        Ok((cert.pem(), key.serialize_pem(), hex::encode(serial)))
    }

    fn server_cert_is_current(
        &self,
        cert_path: &Path,
        wanted: &BTreeSet<String>,
    ) -> Result<bool, PkiError> {
        let Ok(pem) = fs::read(cert_path) else {
            return Ok(false);
        };
        let Ok(der) = CertificateDer::from_pem_slice(&pem) else {
            return Ok(false);
        };
        let Ok(cert) = parse_cert(&der, "server.crt") else {
            return Ok(false);
        };

        let renew_after = Utc::now().timestamp() + SERVER_RENEW_BEFORE_DAYS * 86_400;
        if cert.validity().not_after.timestamp() < renew_after {
            return Ok(false);
        }
        if authority_key_id(&cert).as_deref() != Some(self.key_id.as_slice()) {
            return Ok(false);
        }
        let covered = san_names(&cert);
        Ok(wanted.iter().all(|name| covered.contains(name)))
    }

    fn crl_needs_refresh(&self) -> Result<bool, PkiError> {
        let Ok(pem) = fs::read(self.crl_path()) else {
            return Ok(true);
        };
        let Ok(der) = CertificateRevocationListDer::from_pem_slice(&pem) else {
            return Ok(true);
        };
        let Ok((_, crl)) = x509_parser::parse_x509_crl(&der) else {
            return Ok(true);
        };
        let half_life = CRL_VALID_DAYS * 86_400 / 2;
        Ok(match crl.next_update() {
            Some(next) => next.timestamp() < Utc::now().timestamp() + half_life,
            None => true,
        })
    }

    /// Signs a CRL listing every revoked certificate of `index` under the next CRL number.
    fn write_crl(&self, index: &[CertRecord]) -> Result<(), PkiError> {
        let number_path = self.dir.join(CRL_NUMBER);
        let last: u64 = match fs::read_to_string(&number_path) {
            Ok(text) => text.trim().parse().map_err(|_| PkiError::Parse {
                what: number_path.display().to_string(),
                reason: "not a number".into(),
            })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
            Err(source) => return Err(io_error(&number_path, source)),
        };
        let number = last + 1;

        let revoked_certs = index
            .iter()
            .filter_map(|r| Some((r, r.revoked_at?)))
            .map(|(r, at)| {
                let serial = hex::decode(&r.serial).map_err(|e| PkiError::Parse {
                    what: format!("serial {}", r.serial),
                    reason: e.to_string(),
                })?;
                Ok(RevokedCertParams {
                    serial_number: SerialNumber::from_slice(&serial),
                    revocation_time: to_time(at),
                    reason_code: None,
                    invalidity_date: None,
                })
            })
            .collect::<Result<Vec<_>, PkiError>>()?;

        let now = OffsetDateTime::now_utc();
        let params = CertificateRevocationListParams {
            this_update: now,
            next_update: now + Duration::days(CRL_VALID_DAYS),
            crl_number: SerialNumber::from(number),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: KeyIdMethod::PreSpecified(self.key_id.clone()),
        };
        let crl = params
            .signed_by(&self.issuer, &self.key)
            .map_err(|source| PkiError::Rcgen {
                context: "signing the CRL".into(),
                source,
            })?;
        let pem = crl.pem().map_err(|source| PkiError::Rcgen {
            context: "encoding the CRL".into(),
            source,
        })?;

        write_atomic(&self.crl_path(), pem.as_bytes(), 0o644)?;
        write_atomic(&number_path, format!("{number}\n").as_bytes(), 0o644)?;
        debug!(crl_number = number, "signed the CRL");
        Ok(())
    }

    fn read_index(&self) -> Result<Vec<CertRecord>, PkiError> {
        let path = self.dir.join(INDEX);
        let text = match fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => return Err(io_error(&path, source)),
        };
        text.lines()
            .enumerate()
            .filter(|(_, line)| !line.trim().is_empty() && !line.starts_with('#'))
            .map(|(n, line)| {
                parse_index_line(line).map_err(|reason| PkiError::Index {
                    path: path.clone(),
                    line: n + 1,
                    reason,
                })
            })
            .collect()
    }

    fn write_index(&self, index: &[CertRecord]) -> Result<(), PkiError> {
        let mut text = String::from(INDEX_HEADER);
        for r in index {
            let revoked = r
                .revoked_at
                .map_or_else(|| "-".to_string(), |t| t.to_rfc3339());
            let not_after = r.not_after.to_rfc3339();
            text.push_str(&format!(
                "{}\t{}\t{not_after}\t{revoked}\n",
                r.serial, r.identity
            ));
        }
        write_atomic(&self.dir.join(INDEX), text.as_bytes(), 0o644)
    }
}

/// The device identity in a DER client certificate, validated as a [`DeviceId`]. A certificate
/// with several values of the chosen kind is refused rather than guessed at.
pub fn identity_from_cert(der: &[u8], source: IdentitySource) -> Result<String, PkiError> {
    let cert = parse_cert(der, "client certificate")?;
    let candidates: Vec<String> = match source {
        IdentitySource::CommonName => cert
            .subject()
            .iter_common_name()
            .map(|cn| {
                cn.as_str().map(str::to_owned).map_err(|e| PkiError::Parse {
                    what: "subject common name".into(),
                    reason: e.to_string(),
                })
            })
            .collect::<Result<_, _>>()?,
        IdentitySource::SanDns | IdentitySource::SanUri => general_names(&cert)
            .into_iter()
            .filter_map(|name| match (source, name) {
                (IdentitySource::SanDns, GeneralName::DNSName(dns)) => Some(dns.to_string()),
                (IdentitySource::SanUri, GeneralName::URI(uri)) => Some(uri.to_string()),
                _ => None,
            })
            .collect(),
    };

    match candidates.as_slice() {
        [] => Err(PkiError::NoIdentity(source)),
        [one] => Ok(DeviceId::new(one.as_str())?.to_string()),
        _ => Err(PkiError::AmbiguousIdentity(source)),
    }
}

/// The serial number of a DER certificate as lowercase hex without leading zeros: the form the
/// index and [`Pki::revoke`] use, to find live sessions of a revoked certificate.
pub fn serial_hex(der: &[u8]) -> Result<String, PkiError> {
    let cert = parse_cert(der, "certificate")?;
    Ok(canonical_serial(cert.raw_serial()))
}

/// A verifier for client certificates chaining to any certificate in the PEM bundle
/// `ca_bundle`, refusing those revoked by the CRLs in the PEM file `crl`.
///
/// With a CRL file, every CA in the bundle that issues device certificates needs its CRL in
/// that file (several PEM blocks are fine): a certificate whose revocation status is unknown
/// is refused, because accepting it would make deleting a CRL a way around revocation. Only
/// the end-entity certificate is checked against the CRLs, so intermediates need none.
pub fn client_verifier(
    ca_bundle: &Path,
    crl: Option<&Path>,
) -> Result<Arc<dyn ClientCertVerifier>, PkiError> {
    let bundle = fs::read(ca_bundle).map_err(|source| io_error(ca_bundle, source))?;
    let mut roots = RootCertStore::empty();
    for der in CertificateDer::pem_slice_iter(&bundle) {
        let der = der.map_err(|e| PkiError::Parse {
            what: ca_bundle.display().to_string(),
            reason: e.to_string(),
        })?;
        roots.add(der).map_err(|source| PkiError::TrustAnchor {
            path: ca_bundle.to_path_buf(),
            source,
        })?;
    }
    if roots.is_empty() {
        return Err(PkiError::NoCertificates {
            path: ca_bundle.to_path_buf(),
        });
    }

    let provider = crate::crypto::provider();
    let mut builder = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
    if let Some(crl) = crl {
        let crls = read_crls(crl)?;
        builder = builder.with_crls(crls).only_check_end_entity_revocation();
    }
    Ok(builder.build()?)
}

fn read_crls(path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, PkiError> {
    let pem = fs::read(path).map_err(|source| io_error(path, source))?;
    let crls = CertificateRevocationListDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PkiError::Parse {
            what: path.display().to_string(),
            reason: e.to_string(),
        })?;
    if crls.is_empty() {
        return Err(PkiError::NoCrl {
            path: path.to_path_buf(),
        });
    }
    Ok(crls)
}

fn init_ca(dir: &Path) -> Result<(), PkiError> {
    let key = KeyPair::generate().map_err(|source| PkiError::Rcgen {
        context: "generating the CA key".into(),
        source,
    })?;
    let mut params = CertificateParams::default();
    // A distinct name per CA: verifiers pick candidate issuers by name, and two development
    // CAs in one bundle (or a replaced CA) must not be mistaken for each other.
    let tag = hex::encode(&random_serial()[..4]);
    params.distinguished_name = distinguished_name(&format!("telemon development CA {tag}"));
    // Path length 0: this CA signs devices and the broker, never another CA.
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.serial_number = Some(SerialNumber::from_slice(&random_serial()));
    let now = OffsetDateTime::now_utc();
    params.not_before = now - BACKDATE;
    params.not_after = now + Duration::days(CA_DAYS);
    let cert = params.self_signed(&key).map_err(|source| PkiError::Rcgen {
        context: "signing the CA certificate".into(),
        source,
    })?;

    // The key first: a crash in between leaves "incomplete CA" (an error asking for a human)
    // rather than a certificate whose key is lost.
    write_atomic(&dir.join(CA_KEY), key.serialize_pem().as_bytes(), 0o600)?;
    write_atomic(&dir.join(CA_CERT), cert.pem().as_bytes(), 0o644)?;
    debug!(dir = %dir.display(), "created certificate authority");
    Ok(())
}

fn distinguished_name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "telemon");
    dn.push(DnType::CommonName, common_name);
    dn
}

/// 16 random bytes with the top bit clear (a DER INTEGER stays positive without padding) and
/// the next one set (the encoding keeps all 16 bytes): 126 random bits, well over the 64 that
/// CA/Browser Forum rules ask for.
fn random_serial() -> [u8; 16] {
    let mut serial = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut serial);
    serial[0] = (serial[0] & 0x7f) | 0x40;
    serial
}

fn canonical_serial(raw: &[u8]) -> String {
    let start = raw.iter().position(|b| *b != 0).unwrap_or(raw.len());
    if start == raw.len() {
        return "00".into();
    }
    hex::encode(&raw[start..])
}

/// A serial typed by an operator (`4A:0B...`, `0x4a0b...`) in canonical form, or `None` when
/// it is not hex.
fn normalize_serial(text: &str) -> Option<String> {
    let text = text.trim();
    let text = text.strip_prefix("0x").unwrap_or(text);
    let digits: String = text.chars().filter(|c| *c != ':').collect();
    if digits.is_empty() || !digits.chars().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    let padded = if digits.len() % 2 == 1 {
        format!("0{digits}")
    } else {
        digits
    };
    hex::decode(padded.to_ascii_lowercase())
        .ok()
        .map(|raw| canonical_serial(&raw))
}

fn parse_index_line(line: &str) -> Result<CertRecord, String> {
    let fields: Vec<&str> = line.split('\t').collect();
    let [serial, identity, not_after, revoked] = fields.as_slice() else {
        return Err(format!(
            "expected 4 tab-separated fields, found {}",
            fields.len()
        ));
    };
    let serial = normalize_serial(serial).ok_or_else(|| format!("bad serial {serial:?}"))?;
    let identity = DeviceId::new(*identity)
        .map_err(|e| e.to_string())?
        .to_string();
    let not_after = parse_time(not_after)?;
    let revoked_at = match *revoked {
        "-" => None,
        t => Some(parse_time(t)?),
    };
    Ok(CertRecord {
        serial,
        identity,
        not_after,
        revoked_at,
    })
}

fn parse_time(text: &str) -> Result<DateTime<Utc>, String> {
    DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| format!("bad time {text:?}: {e}"))
}

fn to_chrono(t: OffsetDateTime) -> DateTime<Utc> {
    DateTime::from_timestamp(t.unix_timestamp(), 0).unwrap_or(DateTime::<Utc>::MIN_UTC)
}

fn to_time(t: DateTime<Utc>) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(t.timestamp()).unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

fn parse_cert<'a>(der: &'a [u8], what: &str) -> Result<X509Certificate<'a>, PkiError> {
    X509Certificate::from_der(der)
        .map(|(_, cert)| cert)
        .map_err(|e| PkiError::Parse {
            what: what.to_string(),
            reason: e.to_string(),
        })
}

fn general_names<'a>(cert: &'a X509Certificate<'_>) -> Vec<&'a GeneralName<'a>> {
    match cert.subject_alternative_name() {
        Ok(Some(san)) => san.value.general_names.iter().collect(),
        _ => Vec::new(),
    }
}

/// The DNS names (lowercase) and IP addresses (canonical text) a certificate covers.
fn san_names(cert: &X509Certificate<'_>) -> BTreeSet<String> {
    general_names(cert)
        .into_iter()
        .filter_map(|name| match name {
            GeneralName::DNSName(dns) => Some(dns.to_ascii_lowercase()),
            GeneralName::IPAddress(bytes) => ip_from_bytes(bytes).map(|ip| ip.to_string()),
            _ => None,
        })
        .collect()
}

fn ip_from_bytes(bytes: &[u8]) -> Option<IpAddr> {
    match bytes.len() {
        4 => <[u8; 4]>::try_from(bytes).ok().map(IpAddr::from),
        16 => <[u8; 16]>::try_from(bytes).ok().map(IpAddr::from),
        _ => None,
    }
}

fn normalize_name(name: &str) -> String {
    let name = name.trim();
    match name.parse::<IpAddr>() {
        Ok(ip) => ip.to_string(),
        Err(_) => name.to_ascii_lowercase(),
    }
}

fn san_for(name: &str) -> Result<SanType, PkiError> {
    if let Ok(ip) = name.parse::<IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    let dns = name.try_into().map_err(|source| PkiError::Rcgen {
        context: format!("server name {name:?}"),
        source,
    })?;
    Ok(SanType::DnsName(dns))
}

fn authority_key_id(cert: &X509Certificate<'_>) -> Option<Vec<u8>> {
    cert.iter_extensions()
        .find_map(|ext| match ext.parsed_extension() {
            ParsedExtension::AuthorityKeyIdentifier(aki) => {
                aki.key_identifier.as_ref().map(|id| id.0.to_vec())
            }
            _ => None,
        })
}

fn read_to_string(path: &Path) -> Result<String, PkiError> {
    fs::read_to_string(path).map_err(|source| io_error(path, source))
}

fn io_error(path: &Path, source: io::Error) -> PkiError {
    PkiError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn incomplete(dir: &Path, missing: &'static str) -> PkiError {
    PkiError::IncompleteCa {
        dir: dir.to_path_buf(),
        missing,
    }
}

/// Creates `dir` (mode 0700 on Unix: it holds the CA key) unless it exists.
fn create_private_dir(dir: &Path) -> Result<(), PkiError> {
    if dir.is_dir() {
        return Ok(());
    }
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir).map_err(|source| io_error(dir, source))
}

/// Writes `bytes` to a temporary file beside `path` created with `mode`, syncs it and renames
/// it over `path`: readers see the old file or the new one, and a key is never readable by
/// others, not even for a moment.
fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), PkiError> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(
        ".{file_name}.tmp.{}.{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));

    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, mode);
    #[cfg(not(unix))]
    let _ = mode;

    let result = options
        .open(&tmp)
        .and_then(|mut file| {
            file.write_all(bytes)?;
            file.sync_all()
        })
        .and_then(|()| fs::rename(&tmp, path));
    if let Err(source) = result {
        let _ = fs::remove_file(&tmp);
        return Err(io_error(path, source));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::process::{Command, Stdio};

    use rustls::client::danger::ServerCertVerifier;
    use rustls::client::WebPkiServerVerifier;
    use rustls_pki_types::{ServerName, UnixTime};

    use super::*;

    /// A fresh directory under the system temp dir, removed when dropped.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> TempDir {
            static N: AtomicU64 = AtomicU64::new(0);
            let n = N.fetch_add(1, Ordering::Relaxed);
            let dir =
                std::env::temp_dir().join(format!("telemon-pki-{name}-{}-{n}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            TempDir(dir)
        }

        fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn cert_der(path: &Path) -> CertificateDer<'static> {
        CertificateDer::from_pem_slice(&fs::read(path).unwrap()).unwrap()
    }

    fn verify(pki: &Pki, cert: &Path) -> Result<(), rustls::Error> {
        let verifier = client_verifier(&pki.ca_path(), Some(&pki.crl_path())).unwrap();
        verifier
            .verify_client_cert(&cert_der(cert), &[], UnixTime::now())
            .map(|_| ())
    }

    #[cfg(unix)]
    fn mode(path: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn init_creates_the_ca_files_and_open_finds_them() {
        let tmp = TempDir::new("init");
        let dir = tmp.path().join("certs");
        assert!(matches!(Pki::open(&dir), Err(PkiError::NoCa(_))));

        let pki = Pki::open_or_init(&dir).unwrap();
        for file in [CA_CERT, CA_KEY, CRL, CRL_NUMBER, INDEX] {
            assert!(dir.join(file).is_file(), "{file} missing");
        }
        #[cfg(unix)]
        {
            assert_eq!(mode(&dir.join(CA_KEY)), 0o600);
            assert_eq!(mode(&dir), 0o700);
        }
        let ca_before = fs::read(pki.ca_path()).unwrap();

        // Opening again keeps the same CA.
        let again = Pki::open_or_init(&dir).unwrap();
        assert_eq!(fs::read(again.ca_path()).unwrap(), ca_before);
        Pki::open(&dir).unwrap();
        assert!(again.list().unwrap().is_empty());
        assert!(!format!("{again:?}").contains("PRIVATE"));
    }

    #[test]
    fn a_half_written_ca_is_reported_not_replaced() {
        let tmp = TempDir::new("half");
        let pki = Pki::open_or_init(tmp.path()).unwrap();
        fs::remove_file(pki.dir().join(CA_KEY)).unwrap();
        let err = Pki::open_or_init(tmp.path()).unwrap_err();
        assert!(
            matches!(
                err,
                PkiError::IncompleteCa {
                    missing: CA_KEY,
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn a_key_from_another_ca_is_refused() {
        let a = TempDir::new("key-a");
        let b = TempDir::new("key-b");
        Pki::open_or_init(a.path()).unwrap();
        Pki::open_or_init(b.path()).unwrap();
        fs::copy(b.path().join(CA_KEY), a.path().join(CA_KEY)).unwrap();
        let err = Pki::open(a.path()).unwrap_err();
        assert!(matches!(err, PkiError::KeyMismatch { .. }), "{err:?}");
    }

    #[test]
    fn issued_certificate_verifies_until_revoked() {
        let tmp = TempDir::new("revoke");
        let pki = Pki::open_or_init(&tmp.path().join("ca")).unwrap();
        let out = tmp.path().join("devices");

        let issued = pki.issue("bed-7", &out, DEFAULT_DEVICE_DAYS).unwrap();
        let other = pki.issue("bed-8", &out, 30).unwrap();
        assert_eq!(issued.cert_path, out.join("bed-7.crt"));
        assert_eq!(issued.key_path, out.join("bed-7.key"));
        #[cfg(unix)]
        assert_eq!(mode(&issued.key_path), 0o600);
        let der = cert_der(&issued.cert_path);
        assert_eq!(serial_hex(&der).unwrap(), issued.record.serial);
        assert_eq!(issued.record.serial.len(), 32);
        assert_eq!(
            identity_from_cert(&der, IdentitySource::CommonName).unwrap(),
            "bed-7"
        );
        verify(&pki, &issued.cert_path).unwrap();

        let revoked = pki.revoke("bed-7").unwrap();
        assert_eq!(revoked.len(), 1);
        assert_eq!(revoked[0].serial, issued.record.serial);
        let err = verify(&pki, &issued.cert_path).unwrap_err();
        assert!(
            matches!(
                err,
                rustls::Error::InvalidCertificate(rustls::CertificateError::Revoked)
            ),
            "{err:?}"
        );
        verify(&pki, &other.cert_path).unwrap();

        // Revoking again changes nothing but still succeeds; an unknown name is an error.
        assert!(pki.revoke("bed-7").unwrap().is_empty());
        assert!(matches!(pki.revoke("bed-9"), Err(PkiError::UnknownCert(_))));

        let list = pki.list().unwrap();
        assert_eq!(list.len(), 2);
        assert!(list[0].revoked_at.is_some());
        assert!(list[1].revoked_at.is_none());
    }

    #[test]
    fn revoke_by_serial_accepts_operator_spellings() {
        let tmp = TempDir::new("serial");
        let pki = Pki::open_or_init(tmp.path()).unwrap();
        let first = pki.issue("gw-1", tmp.path(), 10).unwrap();
        let second = pki.issue("gw-1", &tmp.path().join("second"), 10).unwrap();

        let spelled = first
            .record
            .serial
            .to_ascii_uppercase()
            .as_bytes()
            .chunks(2)
            .map(|pair| String::from_utf8_lossy(pair).into_owned())
            .collect::<Vec<_>>()
            .join(":");
        let revoked = pki.revoke(&spelled).unwrap();
        assert_eq!(revoked.len(), 1);
        assert_eq!(revoked[0].serial, first.record.serial);
        assert!(verify(&pki, &first.cert_path).is_err());
        verify(&pki, &second.cert_path).unwrap();
    }

    #[test]
    fn every_crl_has_a_higher_number_and_lists_all_revocations() {
        let tmp = TempDir::new("crlnumber");
        let pki = Pki::open_or_init(tmp.path()).unwrap();
        let crl_info = |pki: &Pki| {
            let der =
                CertificateRevocationListDer::from_pem_slice(&fs::read(pki.crl_path()).unwrap())
                    .unwrap();
            let (_, crl) = x509_parser::parse_x509_crl(&der).unwrap();
            let number = crl.crl_number().unwrap().to_string();
            let serials: Vec<String> = crl
                .iter_revoked_certificates()
                .map(|r| canonical_serial(r.raw_serial()))
                .collect();
            (number, serials)
        };
        assert_eq!(crl_info(&pki), ("1".to_string(), vec![]));

        let a = pki.issue("a", tmp.path(), 1).unwrap();
        let b = pki.issue("b", tmp.path(), 1).unwrap();
        pki.revoke("a").unwrap();
        pki.revoke("b").unwrap();
        let (number, serials) = crl_info(&pki);
        assert_eq!(number, "3");
        assert_eq!(serials, vec![a.record.serial, b.record.serial]);
    }

    #[test]
    fn certificates_and_crls_name_the_ca_key() {
        let tmp = TempDir::new("aki");
        let pki = Pki::open_or_init(tmp.path()).unwrap();
        let issued = pki.issue("bed-7", tmp.path(), 1).unwrap();

        let ca_der = cert_der(&pki.ca_path());
        let ca = parse_cert(&ca_der, "ca").unwrap();
        let ski = ca
            .iter_extensions()
            .find_map(|ext| match ext.parsed_extension() {
                ParsedExtension::SubjectKeyIdentifier(id) => Some(id.0.to_vec()),
                _ => None,
            });
        assert!(ski.is_some());

        let device_der = cert_der(&issued.cert_path);
        let device = parse_cert(&device_der, "device").unwrap();
        assert_eq!(authority_key_id(&device), ski);

        let crl_der =
            CertificateRevocationListDer::from_pem_slice(&fs::read(pki.crl_path()).unwrap())
                .unwrap();
        let (_, crl) = x509_parser::parse_x509_crl(&crl_der).unwrap();
        let crl_aki = crl
            .extensions()
            .iter()
            .find_map(|ext| match ext.parsed_extension() {
                ParsedExtension::AuthorityKeyIdentifier(aki) => {
                    aki.key_identifier.as_ref().map(|id| id.0.to_vec())
                }
                _ => None,
            });
        assert_eq!(crl_aki, ski);
    }

    #[test]
    fn certificates_from_another_ca_are_refused() {
        let ours = TempDir::new("ours");
        let theirs = TempDir::new("theirs");
        let pki = Pki::open_or_init(ours.path()).unwrap();
        let foreign = Pki::open_or_init(theirs.path()).unwrap();
        let issued = foreign.issue("bed-7", theirs.path(), 10).unwrap();

        let err = verify(&pki, &issued.cert_path).unwrap_err();
        assert!(
            matches!(
                err,
                rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer)
            ),
            "{err:?}"
        );
    }

    #[test]
    fn a_bundle_trusts_every_ca_in_it() {
        let a = TempDir::new("bundle-a");
        let b = TempDir::new("bundle-b");
        let pki_a = Pki::open_or_init(a.path()).unwrap();
        let pki_b = Pki::open_or_init(b.path()).unwrap();
        let cert_a = pki_a.issue("dev-a", a.path(), 10).unwrap();
        let cert_b = pki_b.issue("dev-b", b.path(), 10).unwrap();

        let bundle = a.path().join("bundle.pem");
        let crls = a.path().join("crls.pem");
        let cat = |paths: [PathBuf; 2]| paths.map(|p| fs::read(p).unwrap()).concat();
        fs::write(&bundle, cat([pki_a.ca_path(), pki_b.ca_path()])).unwrap();
        fs::write(&crls, cat([pki_a.crl_path(), pki_b.crl_path()])).unwrap();

        let verifier = client_verifier(&bundle, Some(&crls)).unwrap();
        for cert in [&cert_a.cert_path, &cert_b.cert_path] {
            verifier
                .verify_client_cert(&cert_der(cert), &[], UnixTime::now())
                .unwrap();
        }

        // With only A's CRL, B's devices have an unknown revocation status: refused.
        let strict = client_verifier(&bundle, Some(&pki_a.crl_path())).unwrap();
        let der_b = cert_der(&cert_b.cert_path);
        assert!(strict
            .verify_client_cert(&der_b, &[], UnixTime::now())
            .is_err());
        let no_crl = client_verifier(&bundle, None).unwrap();
        no_crl
            .verify_client_cert(&der_b, &[], UnixTime::now())
            .unwrap();
    }

    #[test]
    fn expired_certificates_are_refused() {
        let tmp = TempDir::new("expired");
        let pki = Pki::open_or_init(tmp.path()).unwrap();
        let now = OffsetDateTime::now_utc();
        let issued = pki
            .issue_with_validity(
                "bed-7",
                tmp.path(),
                now - Duration::days(10),
                now - Duration::days(1),
            )
            .unwrap();
        let err = verify(&pki, &issued.cert_path).unwrap_err();
        assert!(
            matches!(
                err,
                rustls::Error::InvalidCertificate(
                    rustls::CertificateError::Expired
                        | rustls::CertificateError::ExpiredContext { .. }
                )
            ),
            "{err:?}"
        );
    }

    #[test]
    fn verifier_inputs_must_hold_what_they_promise() {
        let tmp = TempDir::new("inputs");
        let pki = Pki::open_or_init(tmp.path()).unwrap();
        let empty = tmp.path().join("empty.pem");
        fs::write(&empty, "").unwrap();
        assert!(matches!(
            client_verifier(&empty, None),
            Err(PkiError::NoCertificates { .. })
        ));
        assert!(matches!(
            client_verifier(&pki.ca_path(), Some(&empty)),
            Err(PkiError::NoCrl { .. })
        ));
        assert!(matches!(
            client_verifier(&tmp.path().join("missing.pem"), None),
            Err(PkiError::Io { .. })
        ));
    }

    #[test]
    fn issue_refuses_identities_that_are_not_device_ids() {
        let tmp = TempDir::new("badid");
        let pki = Pki::open_or_init(tmp.path()).unwrap();
        for id in ["", "a/b", "+", "bed 7", "../x"] {
            let err = pki.issue(id, tmp.path(), 1).unwrap_err();
            assert!(
                matches!(err, PkiError::InvalidIdentity(_)),
                "{id:?}: {err:?}"
            );
        }
        assert!(matches!(
            pki.issue("ok", tmp.path(), 0),
            Err(PkiError::InvalidValidity)
        ));
        assert!(pki.list().unwrap().is_empty());
    }

    #[test]
    fn server_certificate_covers_local_names_and_is_reissued_only_when_needed() {
        let tmp = TempDir::new("server");
        let pki = Pki::open_or_init(tmp.path()).unwrap();
        let (cert, key) = pki.ensure_server_cert(&["broker.example".into()]).unwrap();
        #[cfg(unix)]
        assert_eq!(mode(&key), 0o600);
        let first = fs::read(&cert).unwrap();

        let roots = {
            let mut roots = RootCertStore::empty();
            roots.add(cert_der(&pki.ca_path())).unwrap();
            Arc::new(roots)
        };
        let provider = crate::crypto::provider();
        let verifier = WebPkiServerVerifier::builder_with_provider(roots, provider)
            .build()
            .unwrap();
        let der = cert_der(&cert);
        for name in ["localhost", "127.0.0.1", "::1", "broker.example"] {
            let name = ServerName::try_from(name).unwrap();
            verifier
                .verify_server_cert(&der, &[], &name, &[], UnixTime::now())
                .unwrap_or_else(|e| panic!("{name:?}: {e}"));
        }
        let elsewhere = ServerName::try_from("other.example").unwrap();
        assert!(verifier
            .verify_server_cert(&der, &[], &elsewhere, &[], UnixTime::now())
            .is_err());

        // Same names (in another case): kept. A new name: re-issued, old names still covered.
        pki.ensure_server_cert(&["BROKER.example".into(), "::1".into()])
            .unwrap();
        assert_eq!(fs::read(&cert).unwrap(), first);
        pki.ensure_server_cert(&["10.0.0.5".into()]).unwrap();
        let second = fs::read(&cert).unwrap();
        assert_ne!(second, first);
        let covered = san_names(&parse_cert(&cert_der(&cert), "server").unwrap());
        assert!(
            covered.contains("10.0.0.5") && covered.contains("localhost"),
            "{covered:?}"
        );

        // A new CA in the same directory means a new server certificate.
        for file in [CA_CERT, CA_KEY] {
            fs::remove_file(tmp.path().join(file)).unwrap();
        }
        let replaced = Pki::open_or_init(tmp.path()).unwrap();
        replaced.ensure_server_cert(&["10.0.0.5".into()]).unwrap();
        assert_ne!(fs::read(&cert).unwrap(), second);
    }

    fn cert_with(params: CertificateParams) -> Vec<u8> {
        let key = KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn identity_comes_from_the_configured_field() {
        let mut params = CertificateParams::new(vec!["bed-7.ward-3".to_string()]).unwrap();
        params.distinguished_name = distinguished_name("bed-7");
        params.subject_alt_names.push(SanType::URI(
            "urn:dev:ow:10e2073a01080063".try_into().unwrap(),
        ));
        let der = cert_with(params);

        let cn = identity_from_cert(&der, IdentitySource::CommonName).unwrap();
        let dns = identity_from_cert(&der, IdentitySource::SanDns).unwrap();
        let uri = identity_from_cert(&der, IdentitySource::SanUri).unwrap();
        assert_eq!(cn, "bed-7");
        assert_eq!(dns, "bed-7.ward-3");
        assert_eq!(uri, "urn:dev:ow:10e2073a01080063");
    }

    #[test]
    fn identity_that_is_missing_ambiguous_or_invalid_is_refused() {
        let mut none = CertificateParams::default();
        none.distinguished_name = DistinguishedName::new();
        let der = cert_with(none);
        for source in [
            IdentitySource::CommonName,
            IdentitySource::SanDns,
            IdentitySource::SanUri,
        ] {
            let err = identity_from_cert(&der, source).unwrap_err();
            assert!(
                matches!(err, PkiError::NoIdentity(s) if s == source),
                "{err:?}"
            );
        }

        let two = CertificateParams::new(vec!["a".to_string(), "b".to_string()]).unwrap();
        let err = identity_from_cert(&cert_with(two), IdentitySource::SanDns).unwrap_err();
        assert!(matches!(err, PkiError::AmbiguousIdentity(_)), "{err:?}");

        let mut wildcard = CertificateParams::default();
        wildcard.distinguished_name = distinguished_name("devices/#");
        let err = identity_from_cert(&cert_with(wildcard), IdentitySource::CommonName);
        assert!(matches!(err, Err(PkiError::InvalidIdentity(_))), "{err:?}");

        let mut spiffe = CertificateParams::default();
        spiffe.subject_alt_names = vec![SanType::URI("spiffe://ward/bed-7".try_into().unwrap())];
        let err = identity_from_cert(&cert_with(spiffe), IdentitySource::SanUri);
        assert!(matches!(err, Err(PkiError::InvalidIdentity(_))), "{err:?}");

        assert!(matches!(
            identity_from_cert(b"not a certificate", IdentitySource::CommonName),
            Err(PkiError::Parse { .. })
        ));
        assert!(serial_hex(b"\x30\x03\x02\x01").is_err());
    }

    #[test]
    fn identity_source_reads_from_config_words() {
        assert_eq!("cn".parse(), Ok(IdentitySource::CommonName));
        assert_eq!("san-dns".parse(), Ok(IdentitySource::SanDns));
        assert_eq!("san-uri".parse(), Ok(IdentitySource::SanUri));
        assert!("subject".parse::<IdentitySource>().is_err());
    }

    #[test]
    fn serials_are_canonical() {
        assert_eq!(canonical_serial(&[0, 0, 0x4a, 0x01]), "4a01");
        assert_eq!(canonical_serial(&[0, 0]), "00");
        assert_eq!(normalize_serial("4A:01").as_deref(), Some("4a01"));
        assert_eq!(normalize_serial("0x004a01").as_deref(), Some("4a01"));
        assert_eq!(normalize_serial("a01").as_deref(), Some("0a01"));
        assert_eq!(normalize_serial("bed-7"), None);
        for _ in 0..64 {
            let serial = random_serial();
            assert_eq!(canonical_serial(&serial).len(), 32);
        }
    }

    #[test]
    fn a_damaged_index_names_the_line() {
        let tmp = TempDir::new("index");
        let pki = Pki::open_or_init(tmp.path()).unwrap();
        pki.issue("bed-7", tmp.path(), 1).unwrap();
        let path = tmp.path().join(INDEX);
        let mut text = fs::read_to_string(&path).unwrap();
        text.push_str("zz\tbed-8\tyesterday\t-\n");
        fs::write(&path, text).unwrap();
        let err = pki.list().unwrap_err();
        assert!(matches!(err, PkiError::Index { line: 3, .. }), "{err:?}");
    }

    #[test]
    fn a_stale_crl_is_resigned_when_opened() {
        let tmp = TempDir::new("stale");
        let pki = Pki::open_or_init(tmp.path()).unwrap();
        let issued = pki.issue("bed-7", tmp.path(), 1).unwrap();
        pki.revoke("bed-7").unwrap();
        fs::write(pki.crl_path(), "garbage").unwrap();

        let pki = Pki::open_or_init(tmp.path()).unwrap();
        let err = verify(&pki, &issued.cert_path).unwrap_err();
        assert!(
            matches!(
                err,
                rustls::Error::InvalidCertificate(rustls::CertificateError::Revoked)
            ),
            "{err:?}"
        );
    }

    /// A child process killed when the test ends, however it ends.
    struct Child(std::process::Child);

    impl Drop for Child {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    /// Runs `cmd` for at most `secs` seconds; `Some(success)`, or `None` on timeout.
    fn run_bounded(cmd: &mut Command, secs: u64) -> Option<bool> {
        let mut child = Child(
            cmd.stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        for _ in 0..secs * 20 {
            if let Some(status) = child.0.try_wait().unwrap() {
                return Some(status.success());
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        None
    }

    /// Starts Mosquitto on a free loopback port with the broker files of `pki`, requiring
    /// client certificates and checking the CRL; returns it and its port.
    fn start_mosquitto(pki: &Pki, server: &(PathBuf, PathBuf)) -> (Child, u16) {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let conf = pki.dir().join(format!("mosquitto-{port}.conf"));
        let text = format!(
            "user root\npersistence false\nlog_dest none\nlistener {port} 127.0.0.1\n\
             cafile {}\ncertfile {}\nkeyfile {}\ncrlfile {}\nrequire_certificate true\n\
             use_identity_as_username true\n",
            pki.ca_path().display(),
            server.0.display(),
            server.1.display(),
            pki.crl_path().display(),
        );
        fs::write(&conf, text).unwrap();
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto runs");
        let child = Child(child);
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return (child, port);
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        panic!("mosquitto did not listen on port {port}");
    }

    #[test]
    fn mosquitto_accepts_issued_certificates_and_refuses_revoked_ones() {
        let tmp = TempDir::new("mosquitto");
        let pki = Pki::open_or_init(tmp.path()).unwrap();
        let server = pki.ensure_server_cert(&[]).unwrap();
        let device = pki.issue("bed-7", tmp.path(), 10).unwrap();
        let publish = |port: u16| {
            let mut cmd = Command::new("mosquitto_pub");
            cmd.args(["-h", "127.0.0.1", "-p", &port.to_string()])
                .arg("--cafile")
                .arg(pki.ca_path())
                .arg("--cert")
                .arg(&device.cert_path)
                .arg("--key")
                .arg(&device.key_path)
                .args(["-t", "devices/bed-7/telemetry", "-m", "{\"spo2\":97}"]);
            run_bounded(&mut cmd, 10)
        };

        let (broker, port) = start_mosquitto(&pki, &server);
        assert_eq!(publish(port), Some(true), "issued certificate refused");
        drop(broker);

        pki.revoke("bed-7").unwrap();
        let (_broker, port) = start_mosquitto(&pki, &server);
        assert_eq!(publish(port), Some(false), "revoked certificate accepted");
    }

    /// The files work for OpenSSL-based clients and brokers (mosquitto_pub, Mosquitto) too.
    #[test]
    fn openssl_verifies_issued_and_refuses_revoked_certificates() {
        let tmp = TempDir::new("openssl");
        let pki = Pki::open_or_init(tmp.path()).unwrap();
        let issued = pki.issue("bed-7", tmp.path(), 10).unwrap();
        let (server, _) = pki.ensure_server_cert(&[]).unwrap();

        let openssl_verify = |purpose: &str, cert: &Path| {
            let output = Command::new("openssl")
                .arg("verify")
                .args(["-purpose", purpose, "-crl_check"])
                .arg("-CAfile")
                .arg(pki.ca_path())
                .arg("-CRLfile")
                .arg(pki.crl_path())
                .arg(cert)
                .output()
                .expect("the openssl command runs");
            (
                output.status.success(),
                String::from_utf8_lossy(&output.stdout).into_owned(),
            )
        };

        let (ok, out) = openssl_verify("sslclient", &issued.cert_path);
        assert!(ok, "{out}");
        let (ok, out) = openssl_verify("sslserver", &issued.cert_path);
        assert!(!ok, "a client certificate passed as a server one: {out}");
        let (ok, out) = openssl_verify("sslserver", &server);
        assert!(ok, "{out}");

        pki.revoke(&issued.record.serial).unwrap();
        let (ok, out) = openssl_verify("sslclient", &issued.cert_path);
        assert!(!ok, "revoked certificate accepted: {out}");
    }
}
