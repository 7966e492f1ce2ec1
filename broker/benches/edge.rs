//! Device edge benchmarks, each printing its figures:
//!
//! - `throughput`: QoS 1, 100-byte publishes, 4 publishers -> 1 subscriber, through the mTLS
//!   edge and, in the same run, through Debian's Mosquitto 2 with a TLS listener requiring
//!   client certificates; also the load generator alone against a sink, to show it is not
//!   the bottleneck.
//! - `storm`: full mutual-TLS handshakes per second (connect, CONNECT/CONNACK, DISCONNECT).
//! - `hold`: 10,000 device connections held; the server's RSS before and after.
//!
//! `cargo bench -p telemon-broker --bench edge [-- throughput|storm|hold ...]`. The clients
//! are a minimal MQTT 3.1.1 client over tokio-rustls, pipelined, so that the generator costs
//! little next to the broker. For `hold` the clients run in a child process (this binary
//! again), so that the RSS measured is the server's alone.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, BytesMut};
use rcgen::{CertificateParams, DnType, KeyPair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use telemon_broker::edge::{Edge, EdgeConfig, Limits, TlsFiles};
use telemon_broker::engine::{Engine, EngineSettings};
use telemon_broker::pki::{IdentitySource, Pki};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

type Error = Box<dyn std::error::Error + Send + Sync>;

const PUBLISHERS: usize = 4;
const PER_PUBLISHER: usize = 50_000;
const WINDOW: usize = 500;
const PAYLOAD: usize = 100;
const STORM_WORKERS: usize = 64;
const STORM_TIME: Duration = Duration::from_secs(5);
const HELD: usize = 10_000;

fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    // RUST_LOG=telemon_broker=debug shows why a connection ended. Without RUST_LOG the filter
    // is `telemon up`'s: rumqttd logs every ordinary disconnect at error level.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,rumqttd=off"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
    raise_fd_limit();
    let runtime = tokio::runtime::Runtime::new()?;
    match args.first().map(String::as_str) {
        Some("__hold") => return runtime.block_on(hold_clients(&args[1..])),
        Some("__storm") => return runtime.block_on(storm_clients(&args[1..])),
        _ => {}
    }

    let all = ["throughput", "storm", "hold"];
    let wanted: Vec<&str> = match args.is_empty() {
        true => all.to_vec(),
        false => args.iter().map(String::as_str).collect(),
    };
    runtime.block_on(async {
        let bench = Bench::start().await?;
        for name in wanted {
            match name {
                "throughput" => bench.throughput().await?,
                "storm" => bench.storm().await?,
                "hold" => bench.hold().await?,
                other => eprintln!("unknown benchmark {other:?}: use {all:?}"),
            }
        }
        Ok(())
    })
}

/// Lifts this process's soft RLIMIT_NOFILE to its hard limit: the child holding devices needs
/// one descriptor per device. (The server's side is the edge's own business: it raises its
/// limit at start-up and sizes its connection limit to it.)
fn raise_fd_limit() {
    telemon_model::limits::raise_open_files();
}

struct Bench {
    dir: PathBuf,
    pki: Pki,
    server: (PathBuf, PathBuf),
    edge: Edge,
}

const BENCH_ACL: &str = "topic readwrite bench/#\n";

impl Bench {
    async fn start() -> Result<Bench, Error> {
        let dir = std::env::temp_dir().join(format!("telemon-edge-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let pki = Pki::open_or_init(&dir.join("certs"))?;
        let server = pki.ensure_server_cert(&[])?;
        std::fs::write(dir.join("acl"), BENCH_ACL)?;
        let engine =
            tokio::task::spawn_blocking(|| Engine::start(&EngineSettings::default())).await??;
        let limits = Limits {
            handshakes_per_second: 1_000_000,
            ..Limits::default()
        };
        let config = EdgeConfig {
            listen: "127.0.0.1:0".parse()?,
            tls: TlsFiles {
                ca_bundle: pki.ca_path(),
                crl: Some(pki.crl_path()),
                cert: server.0.clone(),
                key: server.1.clone(),
            },
            identity: IdentitySource::CommonName,
            acl_file: Some(dir.join("acl")),
            limits,
        };
        let edge = Edge::start(config, engine).await?;
        Ok(Bench {
            dir,
            pki,
            server,
            edge,
        })
    }

    /// Device certificates `<prefix>-0..n` sharing one key, signed with the CA's key directly:
    /// `Pki::issue` keeps an index, which is not what 10,000 throwaway identities need.
    fn devices(&self, prefix: &str, n: usize) -> Result<Devices, Error> {
        let ca_key = KeyPair::from_pem(&std::fs::read_to_string(self.pki.dir().join("ca.key"))?)?;
        let ca_pem = std::fs::read_to_string(self.pki.ca_path())?;
        let issuer = CertificateParams::from_ca_cert_pem(&ca_pem)?.self_signed(&ca_key)?;
        let key = KeyPair::generate()?;
        let mut certs = Vec::with_capacity(n);
        for i in 0..n {
            let mut params = CertificateParams::new(Vec::<String>::new())?;
            params
                .distinguished_name
                .push(DnType::CommonName, format!("{prefix}-{i}"));
            certs.push(params.signed_by(&key, &issuer, &ca_key)?.der().clone());
        }
        let key = PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes())?;
        Ok(Devices { certs, key })
    }
}

struct Devices {
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

fn client_connector(
    ca: &Path,
    cert: CertificateDer<'static>,
    key: &PrivateKeyDer<'static>,
) -> Result<TlsConnector, Error> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca)? {
        roots.add(c?)?;
    }
    // The edge's own provider: the client side of a handshake shares this machine's CPU.
    let mut config =
        rustls::ClientConfig::builder_with_provider(telemon_broker::crypto::provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_client_auth_cert(vec![cert], key.clone_key())?;
    // Every connection pays the full handshake, as a fleet of distinct devices does.
    config.resumption = rustls::client::Resumption::disabled();
    Ok(TlsConnector::from(Arc::new(config)))
}

// ---- a minimal MQTT 3.1.1 client -------------------------------------------------------

fn put_varint(out: &mut BytesMut, mut len: usize) {
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        out.put_u8(byte);
        if len == 0 {
            return;
        }
    }
}

fn with_header(header: u8, body: &[u8]) -> Vec<u8> {
    let mut out = BytesMut::new();
    out.put_u8(header);
    put_varint(&mut out, body.len());
    out.put_slice(body);
    out.to_vec()
}

fn connect_packet(client_id: &str) -> Vec<u8> {
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 120];
    body.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
    body.extend_from_slice(client_id.as_bytes());
    with_header(0x10, &body)
}

fn publish_packet(out: &mut BytesMut, topic: &str, id: u16, payload: &[u8]) {
    out.put_u8(0x32);
    put_varint(out, 2 + topic.len() + 2 + payload.len());
    out.put_u16(topic.len() as u16);
    out.put_slice(topic.as_bytes());
    out.put_u16(id);
    out.put_slice(payload);
}

/// Splits one packet off `buf`: (first byte, body).
fn next_packet(buf: &mut BytesMut) -> Option<(u8, BytesMut)> {
    let mut len = 0usize;
    for i in 0..4 {
        let byte = *buf.get(1 + i)?;
        len |= ((byte & 0x7f) as usize) << (7 * i);
        if byte & 0x80 == 0 {
            if buf.len() < 2 + i + len {
                return None;
            }
            let header = buf[0];
            buf.advance(2 + i);
            return Some((header, buf.split_to(len)));
        }
    }
    None
}

/// TLS connection, CONNECT, CONNACK accepted.
async fn mqtt_connect(
    connector: &TlsConnector,
    port: u16,
    client_id: &str,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, Error> {
    let tcp = TcpStream::connect(("127.0.0.1", port)).await?;
    tcp.set_nodelay(true)?;
    let mut tls = connector
        .connect(ServerName::try_from("localhost")?, tcp)
        .await?;
    tls.write_all(&connect_packet(client_id)).await?;
    let mut connack = [0u8; 4];
    tls.read_exact(&mut connack).await?;
    if connack != [0x20, 2, 0, 0] {
        return Err(format!("refused: {connack:?}").into());
    }
    Ok(tls)
}

/// Publishes `count` QoS 1 messages with up to WINDOW unacknowledged.
async fn publisher<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    stream: S,
    topic: String,
    count: usize,
) -> Result<(), Error> {
    let (mut rd, mut wr) = tokio::io::split(stream);
    let acked = Arc::new(AtomicU64::new(0));
    let reader_acked = acked.clone();
    let reader = tokio::spawn(async move {
        let mut buf = BytesMut::with_capacity(64 * 1024);
        while (reader_acked.load(Ordering::Relaxed) as usize) < count {
            if rd.read_buf(&mut buf).await? == 0 {
                return Err::<(), Error>("closed while publishing".into());
            }
            while let Some((header, _)) = next_packet(&mut buf) {
                if header >> 4 == 4 {
                    reader_acked.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        Ok(())
    });

    let payload = [b'x'; PAYLOAD];
    let mut sent = 0usize;
    let mut out = BytesMut::with_capacity(64 * 1024);
    while sent < count {
        let in_flight = sent - acked.load(Ordering::Relaxed) as usize;
        if in_flight >= WINDOW {
            tokio::task::yield_now().await;
            continue;
        }
        let batch = (WINDOW - in_flight).min(count - sent).min(64);
        for _ in 0..batch {
            sent += 1;
            publish_packet(&mut out, &topic, (sent % 65_535 + 1) as u16, &payload);
        }
        wr.write_all(&out).await?;
        out.clear();
    }
    wr.flush().await?;
    reader.await??;
    Ok(())
}

/// Subscribes to `bench/#` at QoS 1 (the caller has connected), acknowledges every PUBLISH,
/// and returns when `expected` have come or after `limit`: (received, elapsed since first).
async fn subscriber<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    mut stream: S,
    expected: usize,
    ready: tokio::sync::oneshot::Sender<()>,
    limit: Duration,
) -> Result<(usize, Duration), Error> {
    let mut sub = vec![0, 1, 0, 7];
    sub.extend_from_slice(b"bench/#");
    sub.push(1);
    stream.write_all(&with_header(0x82, &sub)).await?;
    let mut buf = BytesMut::with_capacity(256 * 1024);
    let mut acks = BytesMut::new();
    let mut received = 0usize;
    let mut first = None;
    let deadline = tokio::time::Instant::now() + limit;
    let mut ready = Some(ready);
    while received < expected {
        let n = tokio::time::timeout_at(deadline, stream.read_buf(&mut buf)).await;
        let Ok(n) = n else { break };
        if n? == 0 {
            return Err("subscriber closed".into());
        }
        while let Some((header, mut body)) = next_packet(&mut buf) {
            match header >> 4 {
                9 => {
                    if let Some(tx) = ready.take() {
                        let _ = tx.send(());
                    }
                }
                3 => {
                    first.get_or_insert_with(Instant::now);
                    received += 1;
                    if (header >> 1) & 3 == 1 {
                        let topic_len = body.get_u16() as usize;
                        body.advance(topic_len);
                        acks.put_slice(&[0x40, 2]);
                        let id = body.get_u16();
                        if received < 200 && std::env::var("DBG").is_ok() {
                            eprint!("{id}/{header:x} ");
                        }
                        acks.put_u16(id);
                    }
                }
                _ => {}
            }
        }
        if !acks.is_empty() {
            stream.write_all(&acks).await?;
            acks.clear();
        }
    }
    Ok((received, first.map(|f| f.elapsed()).unwrap_or_default()))
}

/// One run of the 4 -> 1 load against a broker on `port`; returns msgs/s at the subscriber.
async fn load(ca: &Path, devices: &Devices, port: u16) -> Result<(f64, usize), Error> {
    let expected = PUBLISHERS * PER_PUBLISHER;
    let sub_conn = client_connector(ca, devices.certs[0].clone(), &devices.key)?;
    let stream = mqtt_connect(&sub_conn, port, "bench-0").await?;
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let sub = tokio::spawn(subscriber(
        stream,
        expected,
        ready_tx,
        Duration::from_secs(120),
    ));
    ready_rx.await?;

    let mut pubs = Vec::new();
    for i in 1..=PUBLISHERS {
        let conn = client_connector(ca, devices.certs[i].clone(), &devices.key)?;
        let stream = mqtt_connect(&conn, port, &format!("bench-{i}")).await?;
        let topic = format!("bench/{i}/reading");
        pubs.push(tokio::spawn(publisher(stream, topic, PER_PUBLISHER)));
    }
    for p in pubs {
        p.await??;
    }
    let (received, elapsed) = sub.await??;
    Ok((received as f64 / elapsed.as_secs_f64(), received))
}

impl Bench {
    async fn throughput(&self) -> Result<(), Error> {
        let devices = self.devices("bench", PUBLISHERS + 1)?;
        let expected = PUBLISHERS * PER_PUBLISHER;
        println!(
            "throughput: QoS 1, {PAYLOAD}-byte payloads, {PUBLISHERS} publishers -> 1 \
             subscriber, {expected} messages, mutual TLS"
        );

        let sink = sink_rate(&self.pki.ca_path(), &self.server, &devices).await?;
        println!("  generator alone (TLS sink that acks) : {sink:>9.0} msgs/s");

        let (edge, got) =
            load(&self.pki.ca_path(), &devices, self.edge.local_addr().port()).await?;
        println!("  telemon edge + rumqttd               : {edge:>9.0} msgs/s ({got} received)");

        let mosquitto = Mosquitto::start(&self.dir, &self.pki, &self.server)?;
        let result = load(&self.pki.ca_path(), &devices, mosquitto.port).await;
        drop(mosquitto);
        let (mosq, got) = result?;
        println!("  mosquitto 2 (TLS, client certs)      : {mosq:>9.0} msgs/s ({got} received)");
        println!(
            "  ratio edge / mosquitto               : {:>9.2}",
            edge / mosq
        );
        println!(
            "  generator headroom over the edge     : {:>9.2}x",
            sink / edge
        );
        Ok(())
    }

    async fn storm(&self) -> Result<(), Error> {
        let devices = self.devices("storm", STORM_WORKERS)?;
        let (certs, key) = self.write_devices("storm", &devices)?;
        let load = load_average();
        let server_cpu = cpu_seconds();
        let output = tokio::process::Command::new(std::env::current_exe()?)
            .arg("__storm")
            .arg(self.edge.local_addr().port().to_string())
            .arg(self.pki.ca_path())
            .arg(&certs)
            .arg(&key)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .output()
            .await?;
        let server_cpu = cpu_seconds() - server_cpu;
        let report = String::from_utf8(output.stdout)?;
        let mut fields = report.split_whitespace();
        let mut next = || fields.next().ok_or("storm clients printed no report");
        let done: u64 = next()?.parse()?;
        let failed: u64 = next()?.parse()?;
        let elapsed: f64 = next()?.parse()?;
        let client_cpu: f64 = next()?.parse()?;
        let mut phases = [0.0f64; 4];
        for phase in &mut phases {
            *phase = next()?.parse()?;
        }
        let first_error = fields.collect::<Vec<_>>().join(" ");
        let per_connect = |cpu: f64| cpu * 1e6 / done.max(1) as f64;
        println!(
            "storm: {STORM_WORKERS} clients (child process) for {elapsed:.1} s: {done} full mTLS \
             connects (CONNECT/CONNACK/DISCONNECT), {:.0}/s, {failed} failed \
             (first: {first_error})",
            done as f64 / elapsed
        );
        println!(
            "  CPU per connect: server (edge + engine) {:.0} us, clients {:.0} us; the server \
             alone on both cores: {:.0}/s; load average before the run: {load}",
            per_connect(server_cpu),
            per_connect(client_cpu),
            2.0 * done as f64 / server_cpu.max(1e-9),
        );
        println!(
            "  mean time per connect: TCP connect {:.2} ms, TLS handshake {:.2} ms, \
             CONNECT -> CONNACK {:.2} ms, DISCONNECT and close {:.2} ms",
            phases[0], phases[1], phases[2], phases[3]
        );
        Ok(())
    }

    async fn hold(&self) -> Result<(), Error> {
        // In one process the edge spends three descriptors per device (the device's socket
        // and both ends of its engine link), and sizes its connection limit to its
        // descriptor limit: hold what it admits, at most HELD.
        let admitted = self.edge.max_connections();
        let count = HELD.min(admitted);
        if count < HELD {
            println!(
                "hold: {HELD} connections need {} descriptors in the server process; with the \
                 hard limit of this machine ({}) the edge admits {admitted}",
                3 * HELD,
                fd_limit()
            );
        }
        let devices = self.devices("held", count)?;
        let (certs, key) = self.write_devices("held", &devices)?;

        settle().await;
        let before = rss_kib()?;
        let mut child = Command::new(std::env::current_exe()?)
            .arg("__hold")
            .arg(self.edge.local_addr().port().to_string())
            .arg(self.pki.ca_path())
            .arg(&certs)
            .arg(&key)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        let held = read_held(&mut child)?;
        settle().await;
        let after = rss_kib()?;
        let open = self.edge.connections();
        drop(child.stdin.take());
        let _ = child.wait();
        println!(
            "hold: {held} mTLS device connections held ({open} open at the edge); server RSS \
             {before} KiB -> {after} KiB: {:.1} KiB per connection (edge + engine)",
            (after.saturating_sub(before)) as f64 / open.max(1) as f64
        );
        Ok(())
    }

    /// Writes the devices' certificates (one PEM file) and their shared key for a child.
    fn write_devices(&self, name: &str, devices: &Devices) -> Result<(PathBuf, PathBuf), Error> {
        let certs = self.dir.join(format!("{name}.pem"));
        let mut pem = String::new();
        for c in &devices.certs {
            pem.push_str(&pem_block("CERTIFICATE", c));
        }
        std::fs::write(&certs, pem)?;
        let key = self.dir.join(format!("{name}.key"));
        std::fs::write(&key, pem_block("PRIVATE KEY", devices.key.secret_der()))?;
        Ok((certs, key))
    }
}

impl Drop for Bench {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// CPU time (user + system) this process has used, in seconds.
fn cpu_seconds() -> f64 {
    // SAFETY: getrusage writes one plain struct, zero-initialised here.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

fn fd_limit() -> u64 {
    telemon_model::limits::open_files().map_or(0, |(_, hard)| hard)
}

fn pem_block(label: &str, der: &[u8]) -> String {
    use base64_lite::encode;
    let b64 = encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// Base64 for PEM output, small enough not to need a crate.
mod base64_lite {
    const TABLE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

    pub fn encode(data: &[u8]) -> String {
        let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
        for chunk in data.chunks(3) {
            let b = [
                chunk[0],
                *chunk.get(1).unwrap_or(&0),
                *chunk.get(2).unwrap_or(&0),
            ];
            let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(TABLE[(n >> (18 - 6 * i) & 63) as usize] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    }
}

/// Lets freed memory and background work settle before reading RSS.
async fn settle() {
    tokio::time::sleep(Duration::from_secs(2)).await;
}

fn read_held(child: &mut Child) -> Result<usize, Error> {
    let stdout = child.stdout.take().ok_or("no child stdout")?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    Ok(line.trim().parse()?)
}

fn rss_kib() -> Result<u64, Error> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .ok_or("no VmRSS")?;
    Ok(line.split_whitespace().nth(1).ok_or("bad VmRSS")?.parse()?)
}

/// Microseconds spent in each phase of the storm's connects, summed over all of them.
static PHASES: [AtomicU64; 4] = [const { AtomicU64::new(0) }; 4];

async fn handshake_once(connector: &TlsConnector, port: u16, i: usize) -> Result<(), Error> {
    let mut at = Instant::now();
    let mut lap = |phase: usize| {
        PHASES[phase].fetch_add(at.elapsed().as_micros() as u64, Ordering::Relaxed);
        at = Instant::now();
    };
    let tcp = TcpStream::connect(("127.0.0.1", port)).await?;
    tcp.set_nodelay(true)?;
    lap(0);
    let mut tls = connector
        .connect(ServerName::try_from("localhost")?, tcp)
        .await?;
    lap(1);
    tls.write_all(&connect_packet(&format!("storm-{i}")))
        .await?;
    let mut connack = [0u8; 4];
    tls.read_exact(&mut connack).await?;
    if connack != [0x20, 2, 0, 0] {
        return Err(format!("refused: {connack:?}").into());
    }
    lap(2);
    tls.write_all(&[0xe0, 0]).await?;
    tls.shutdown().await?;
    lap(3);
    Ok(())
}

/// A client child process's arguments: the edge's port, and one TLS client per certificate
/// in the bundle, all with the same key.
fn client_args(args: &[String], role: &str) -> Result<(u16, Vec<TlsConnector>), Error> {
    let [port, ca, certs, key] = args else {
        return Err(format!("usage: {role} <port> <ca> <certs> <key>").into());
    };
    let key = PrivateKeyDer::from_pem_file(key)?;
    let connectors = CertificateDer::pem_file_iter(certs)?
        .map(|cert| client_connector(Path::new(ca), cert?, &key))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((port.parse()?, connectors))
}

/// Child side of `storm`: STORM_WORKERS clients connect and disconnect in a loop for
/// STORM_TIME, each with its own certificate; prints connects, failures, seconds and the CPU
/// seconds the clients used.
async fn storm_clients(args: &[String]) -> Result<(), Error> {
    let (port, connectors) = client_args(args, "__storm")?;

    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let first_error = Arc::new(parking_lot::Mutex::new(None::<String>));
    let cpu = cpu_seconds();
    let start = Instant::now();
    let until = start + STORM_TIME;
    let mut workers = Vec::new();
    for (i, connector) in connectors.into_iter().enumerate() {
        let (done, failed, first_error) = (done.clone(), failed.clone(), first_error.clone());
        workers.push(tokio::spawn(async move {
            while Instant::now() < until {
                match handshake_once(&connector, port, i).await {
                    Ok(()) => done.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        first_error.lock().get_or_insert_with(|| e.to_string());
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
        }));
    }
    for w in workers {
        w.await?;
    }
    let done = done.load(Ordering::Relaxed);
    let phase = |p: usize| PHASES[p].load(Ordering::Relaxed) as f64 / done.max(1) as f64 / 1e3;
    println!(
        "{} {} {:.3} {:.3} {:.2} {:.2} {:.2} {:.2} {}",
        done,
        failed.load(Ordering::Relaxed),
        start.elapsed().as_secs_f64(),
        cpu_seconds() - cpu,
        phase(0),
        phase(1),
        phase(2),
        phase(3),
        first_error.lock().as_deref().unwrap_or("-")
    );
    Ok(())
}

/// Child side of `hold`: opens every connection, prints how many, holds until stdin closes.
async fn hold_clients(args: &[String]) -> Result<(), Error> {
    let (port, connectors) = client_args(args, "__hold")?;
    let mut held = Vec::with_capacity(connectors.len());
    let tasks = connectors
        .into_iter()
        .enumerate()
        .map(|(i, connector)| async move {
            for _ in 0..5 {
                if let Ok(stream) = mqtt_connect(&connector, port, "held").await {
                    return Ok(stream);
                }
                tokio::time::sleep(Duration::from_millis(200 + i as u64 % 100)).await;
            }
            Err::<_, Error>("could not connect".into())
        });
    let mut stream = futures::stream::iter(tasks).buffer_unordered(200);
    use futures::StreamExt;
    while let Some(result) = stream.next().await {
        if let Ok(s) = result {
            held.push(s);
        }
    }
    println!("{}", held.len());
    std::io::stdout().flush()?;
    let mut stdin = tokio::io::stdin();
    let mut buf = [0u8; 1];
    let _ = stdin.read(&mut buf).await;
    Ok(())
}

// ---- the generator against a sink ------------------------------------------------------

/// The same load against a TLS server that only acknowledges: the generator's ceiling.
async fn sink_rate(
    ca: &Path,
    server: &(PathBuf, PathBuf),
    devices: &Devices,
) -> Result<f64, Error> {
    let chain = CertificateDer::pem_file_iter(&server.0)?.collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_file(&server.1)?;
    let config = rustls::ServerConfig::builder_with_provider(telemon_broker::crypto::provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let server = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(tls) = acceptor.accept(tcp).await {
                    let _ = sink_connection(tls).await;
                }
            });
        }
    });

    let mut pubs = Vec::new();
    let start = Instant::now();
    for i in 1..=PUBLISHERS {
        let conn = client_connector(ca, devices.certs[i].clone(), &devices.key)?;
        let stream = mqtt_connect(&conn, port, &format!("bench-{i}")).await?;
        pubs.push(tokio::spawn(publisher(
            stream,
            "bench/x".into(),
            PER_PUBLISHER,
        )));
    }
    for p in pubs {
        p.await??;
    }
    let rate = (PUBLISHERS * PER_PUBLISHER) as f64 / start.elapsed().as_secs_f64();
    server.abort();
    Ok(rate)
}

async fn sink_connection<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    mut tls: S,
) -> Result<(), Error> {
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let mut out = BytesMut::new();
    loop {
        if tls.read_buf(&mut buf).await? == 0 {
            return Ok(());
        }
        while let Some((header, mut body)) = next_packet(&mut buf) {
            match header >> 4 {
                1 => out.put_slice(&[0x20, 2, 0, 0]),
                3 => {
                    let topic_len = body.get_u16() as usize;
                    body.advance(topic_len);
                    out.put_slice(&[0x40, 2]);
                    out.put_u16(body.get_u16());
                }
                _ => {}
            }
        }
        tls.write_all(&out).await?;
        out.clear();
    }
}

// ---- Mosquitto --------------------------------------------------------------------------

/// Debian's Mosquitto 2 with a TLS listener that requires client certificates; killed by
/// PID when dropped.
struct Mosquitto {
    child: Child,
    port: u16,
}

impl Mosquitto {
    fn start(dir: &Path, pki: &Pki, server: &(PathBuf, PathBuf)) -> Result<Mosquitto, Error> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let conf = dir.join("mosquitto.conf");
        let text = format!(
            "listener {port} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\n\
             require_certificate true\nuse_identity_as_username true\nallow_anonymous true\n\
             persistence false\nlog_dest none\nuser root\nmax_inflight_messages 2000\n\
             max_queued_messages 0\n",
            pki.ca_path().display(),
            server.0.display(),
            server.1.display(),
        );
        std::fs::write(&conf, text)?;
        // Run as root, Mosquitto drops to its own user unless told not to, and could then not
        // read the 0600 server key.
        let child = Command::new("/usr/sbin/mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("starting /usr/sbin/mosquitto (apt install mosquitto): {e}"))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                return Err("mosquitto did not listen within 10 s".into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(Mosquitto { child, port })
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
