//! Harness for the device edge's integration tests: a real engine and edge on loopback, a CA
//! in a temporary directory, and three kinds of client: rumqttc, Debian's mosquitto_pub and
//! mosquitto_sub, and a raw MQTT client over tokio-rustls for the bytes no real client sends.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, BytesMut};
use rumqttc::{AsyncClient, Event, EventLoop, Incoming, MqttOptions, QoS};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use telemon_broker::edge::{Edge, EdgeConfig, Limits, TlsFiles};
use telemon_broker::engine::{Engine, EngineSettings};
use telemon_broker::pki::{IdentitySource, Pki};
use telemon_model::bus::{BusConfig, BusTls};
use time::OffsetDateTime;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// Generous bound for anything that should happen "promptly" on a loaded CI machine.
pub const PROMPT: Duration = Duration::from_secs(10);

/// A fresh directory under the system temp dir, removed when dropped.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        static N: AtomicU64 = AtomicU64::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("telemon-edge-{name}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// rustls 0.23 needs one process-wide provider when several are compiled in.
pub fn install_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Fails the test loudly when a Debian client it drives is missing.
pub fn require_tool(tool: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        found,
        "{tool} is not installed: run scripts/test.sh (it installs mosquitto-clients)"
    );
}

/// A device certificate and key on disk.
#[derive(Clone, Debug)]
pub struct Device {
    pub id: String,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// An engine and an edge in this process, with their CA.
pub struct Broker {
    pub dir: TempDir,
    pub pki: Pki,
    pub engine: Engine,
    pub edge: Edge,
}

impl Broker {
    pub async fn start() -> Broker {
        Broker::start_with(Limits::default(), None).await
    }

    /// Starts with these limits and, when given, this ACL file text.
    pub async fn start_with(limits: Limits, acl: Option<&str>) -> Broker {
        install_crypto();
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let dir = TempDir::new("broker");
        let pki = Pki::open_or_init(&dir.path().join("certs")).unwrap();
        let (cert, key) = pki.ensure_server_cert(&[]).unwrap();
        let acl_file = acl.map(|text| {
            let path = dir.path().join("acl");
            std::fs::write(&path, text).unwrap();
            path
        });

        // Engine::start waits on a std thread; keep it off the runtime's workers.
        let engine = tokio::task::spawn_blocking(|| Engine::start(&EngineSettings::default()))
            .await
            .unwrap()
            .unwrap();
        let config = EdgeConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            tls: TlsFiles {
                ca_bundle: pki.ca_path(),
                crl: Some(pki.crl_path()),
                cert,
                key,
            },
            identity: IdentitySource::CommonName,
            acl_file,
            limits,
        };
        let edge = Edge::start(config, engine.clone()).await.unwrap();
        Broker {
            dir,
            pki,
            engine,
            edge,
        }
    }

    pub fn port(&self) -> u16 {
        self.edge.local_addr().port()
    }

    pub fn device(&self, id: &str) -> Device {
        let issued = self
            .pki
            .issue(id, &self.dir.path().join("devices"), 30)
            .unwrap();
        Device {
            id: id.to_string(),
            cert: issued.cert_path,
            key: issued.key_path,
        }
    }

    /// A certificate of this CA whose validity window is `not_before..not_after` from now.
    pub fn device_valid(&self, id: &str, not_before: i64, not_after: i64) -> Device {
        let now = OffsetDateTime::now_utc();
        let issued = self
            .pki
            .issue_with_validity(
                id,
                &self.dir.path().join("devices"),
                now + time::Duration::days(not_before),
                now + time::Duration::days(not_after),
            )
            .unwrap();
        Device {
            id: id.to_string(),
            cert: issued.cert_path,
            key: issued.key_path,
        }
    }

    /// rumqttc options for `device` through the edge, with client id `client_id`.
    pub fn options(&self, device: &Device, client_id: &str) -> MqttOptions {
        let bus = BusConfig {
            host: "127.0.0.1".into(),
            port: self.port(),
            tls: Some(BusTls {
                ca: self.pki.ca_path(),
                client: Some((device.cert.clone(), device.key.clone())),
            }),
            username: None,
            password: None,
        };
        bus.mqtt_options(client_id).unwrap()
    }

    /// A client of the engine itself, as telemon's own services connect: it sees what
    /// devices publish after the edge let it through, and can publish commands to them.
    pub async fn observer(&self, filter: &str) -> Observer {
        let id = format!("observer-{}", NEXT.fetch_add(1, Ordering::Relaxed));
        self.observer_named(&id, filter).await
    }

    /// An engine client with a chosen client id, as telemon's services have fixed ones.
    pub async fn observer_named(&self, id: &str, filter: &str) -> Observer {
        let options = self.engine.bus().mqtt_options(id).unwrap();
        let (client, mut events) = AsyncClient::new(options, 100);
        client.subscribe(filter, QoS::AtLeastOnce).await.unwrap();
        wait_for(&mut events, |e| matches!(e, Incoming::SubAck(_))).await;

        // Polled in the background so that the observer's own publishes go out too.
        let (tx, received) = tokio::sync::mpsc::unbounded_channel();
        let poller = tokio::spawn(async move {
            loop {
                match events.poll().await {
                    Ok(Event::Incoming(Incoming::Publish(p))) => {
                        let _ = tx.send((p.topic.clone(), p.payload.to_vec()));
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        Observer {
            client,
            received,
            poller,
        }
    }

    /// mosquitto_pub through the edge at QoS 1; returns success and stderr.
    pub fn mosquitto_pub(&self, tls: &[&str], extra: &[&str]) -> (bool, String) {
        require_tool("mosquitto_pub");
        let out = Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &self.port().to_string(), "-q", "1"])
            .arg("--cafile")
            .arg(self.pki.ca_path())
            .args(tls)
            .args(extra)
            .output()
            .expect("running mosquitto_pub");
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        (out.status.success(), stderr)
    }

    /// Raw TLS connection as `device` (or with no client certificate).
    pub async fn tls(&self, device: Option<&Device>) -> std::io::Result<TlsStream<TcpStream>> {
        tls_connect(&self.pki.ca_path(), device, self.port()).await
    }

    /// A raw client that has sent a CONNECT and read the CONNACK (returned as well).
    pub async fn raw(&self, device: &Device, connect: &[u8]) -> (Raw, Vec<u8>) {
        let stream = self.tls(Some(device)).await.unwrap();
        let mut raw = Raw {
            stream,
            buf: BytesMut::new(),
        };
        raw.send(connect).await;
        let connack = raw.recv().await.expect("a CONNACK");
        (raw, connack)
    }
}

static NEXT: AtomicU64 = AtomicU64::new(0);

/// Client TLS configuration trusting `ca`, presenting `device` when given.
pub fn client_config(ca: &Path, device: Option<&Device>) -> rustls::ClientConfig {
    install_crypto();
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder().with_root_certificates(roots);
    match device {
        Some(d) => {
            let chain = CertificateDer::pem_file_iter(&d.cert)
                .unwrap()
                .collect::<Result<Vec<_>, _>>()
                .unwrap();
            let key = PrivateKeyDer::from_pem_file(&d.key).unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        }
        None => builder.with_no_client_auth(),
    }
}

pub async fn tls_connect(
    ca: &Path,
    device: Option<&Device>,
    port: u16,
) -> std::io::Result<TlsStream<TcpStream>> {
    let connector = TlsConnector::from(Arc::new(client_config(ca, device)));
    let tcp = TcpStream::connect(("127.0.0.1", port)).await?;
    let name = ServerName::try_from("localhost").unwrap();
    connector.connect(name, tcp).await
}

/// A connection to the engine that records what it receives.
pub struct Observer {
    pub client: AsyncClient,
    received: tokio::sync::mpsc::UnboundedReceiver<(String, Vec<u8>)>,
    poller: tokio::task::JoinHandle<()>,
}

impl Observer {
    /// The next publish's (topic, payload), or None after `within`.
    pub async fn next_publish(&mut self, within: Duration) -> Option<(String, Vec<u8>)> {
        tokio::time::timeout(within, self.received.recv())
            .await
            .ok()
            .flatten()
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        self.poller.abort();
    }
}

/// Polls an event loop until an incoming packet matches; panics after [`PROMPT`].
pub async fn wait_for(events: &mut EventLoop, mut wanted: impl FnMut(&Incoming) -> bool) {
    let deadline = tokio::time::Instant::now() + PROMPT;
    loop {
        let event = tokio::time::timeout_at(deadline, events.poll())
            .await
            .expect("the awaited packet did not come in time");
        match event {
            Ok(Event::Incoming(packet)) if wanted(&packet) => return,
            Ok(_) => {}
            Err(e) => panic!("connection failed while waiting: {e}"),
        }
    }
}

/// Polls until the event loop reports a connection error; returns whether one came before
/// `within` ran out.
pub async fn fails_within(events: &mut EventLoop, within: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, events.poll()).await {
            Err(_) => return false,
            Ok(Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

/// A connected rumqttc client whose CONNACK has arrived.
pub async fn connected(options: MqttOptions) -> (AsyncClient, EventLoop) {
    let (client, mut events) = AsyncClient::new(options, 100);
    wait_for(&mut events, |p| matches!(p, Incoming::ConnAck(_))).await;
    (client, events)
}

/// Waits (bounded) until `check` holds.
pub async fn eventually(what: &str, within: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !check() {
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A raw MQTT client over TLS, for packets real clients never send.
pub struct Raw {
    pub stream: TlsStream<TcpStream>,
    buf: BytesMut,
}

impl Raw {
    pub fn from_stream(stream: TlsStream<TcpStream>) -> Raw {
        Raw {
            stream,
            buf: BytesMut::new(),
        }
    }

    /// Sends and ignores write errors: for bytes the server may refuse mid-write.
    pub async fn send_lossy(&mut self, bytes: &[u8]) {
        let _ = self.stream.write_all(bytes).await;
        let _ = self.stream.flush().await;
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
        self.stream.flush().await.unwrap();
    }

    /// The next whole packet, or None when the connection closed. Panics after [`PROMPT`].
    pub async fn recv(&mut self) -> Option<Vec<u8>> {
        tokio::time::timeout(PROMPT, self.recv_inner())
            .await
            .expect("no packet and no close in time")
    }

    async fn recv_inner(&mut self) -> Option<Vec<u8>> {
        loop {
            if let Some(packet) = split_packet(&mut self.buf) {
                return Some(packet);
            }
            match self.stream.read_buf(&mut self.buf).await {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    }

    /// Reads until the server closes; returns the packets that came first.
    pub async fn until_closed(&mut self) -> Vec<Vec<u8>> {
        let mut packets = Vec::new();
        while let Some(p) = self.recv().await {
            packets.push(p);
        }
        packets
    }
}

fn split_packet(buf: &mut BytesMut) -> Option<Vec<u8>> {
    let mut len = 0usize;
    for i in 0..4 {
        let byte = *buf.get(1 + i)?;
        len |= ((byte & 0x7f) as usize) << (7 * i);
        if byte & 0x80 == 0 {
            let total = 2 + i + len;
            if buf.len() < total {
                return None;
            }
            let packet = buf[..total].to_vec();
            buf.advance(total);
            return Some(packet);
        }
    }
    None
}

/// Packet builders for the raw client.
pub mod mqtt {
    use super::*;

    fn with_header(header: u8, body: &[u8]) -> Vec<u8> {
        let mut out = BytesMut::new();
        out.put_u8(header);
        let mut len = body.len();
        loop {
            let mut byte = (len % 128) as u8;
            len /= 128;
            if len > 0 {
                byte |= 0x80;
            }
            out.put_u8(byte);
            if len == 0 {
                break;
            }
        }
        out.put_slice(body);
        out.to_vec()
    }

    fn string(out: &mut BytesMut, s: &[u8]) {
        out.put_u16(s.len() as u16);
        out.put_slice(s);
    }

    /// CONNECT at `level` (4 = 3.1.1, 5) with a clean session, optional username and will.
    pub fn connect(
        level: u8,
        client_id: &str,
        keep_alive: u16,
        username: Option<&str>,
        will: Option<(&str, &[u8])>,
    ) -> Vec<u8> {
        let mut body = BytesMut::new();
        string(&mut body, b"MQTT");
        body.put_u8(level);
        let mut flags = 0x02;
        if will.is_some() {
            flags |= 0x04 | 0x08;
        }
        if username.is_some() {
            flags |= 0x80 | 0x40;
        }
        body.put_u8(flags);
        body.put_u16(keep_alive);
        if level == 5 {
            body.put_u8(0);
        }
        string(&mut body, client_id.as_bytes());
        if let Some((topic, payload)) = will {
            if level == 5 {
                body.put_u8(0);
            }
            string(&mut body, topic.as_bytes());
            string(&mut body, payload);
        }
        if let Some(user) = username {
            string(&mut body, user.as_bytes());
            string(&mut body, b"guess");
        }
        with_header(0x10, &body)
    }

    /// PUBLISH at QoS 0 (`id` None) or QoS 1.
    pub fn publish(level: u8, topic: &[u8], id: Option<u16>, payload: &[u8]) -> Vec<u8> {
        let mut body = BytesMut::new();
        string(&mut body, topic);
        if let Some(id) = id {
            body.put_u16(id);
        }
        if level == 5 {
            body.put_u8(0);
        }
        body.put_slice(payload);
        let header = if id.is_some() { 0x32 } else { 0x30 };
        with_header(header, &body)
    }

    pub fn subscribe(level: u8, id: u16, filters: &[&str]) -> Vec<u8> {
        let mut body = BytesMut::new();
        body.put_u16(id);
        if level == 5 {
            body.put_u8(0);
        }
        for f in filters {
            string(&mut body, f.as_bytes());
            body.put_u8(1);
        }
        with_header(0x82, &body)
    }
}
