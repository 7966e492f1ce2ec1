//! Ingest throughput: readings committed per second from MQTT publish to committed row,
//! against raw COPY of the same rows into the same table, in the same run.
//!
//! Two rounds, each into a fresh PostgreSQL database, with the ingest service in this process
//! at QoS 1 with a persistent session: behind a private Mosquitto (10,000 messages in flight
//! per session), as `telemon ingest` runs against an external broker; then behind telemon's
//! own engine (rumqttd, in this process), as in `telemon up`. Each broker is measured with two
//! shapes of the same 100,000 readings: one reading per message (the broker's message rate
//! dominates), and a bedside monitor's frame of eight vital signs per message. A publisher
//! sends them for 100 devices over one connection, as fast as the broker acknowledges (up to
//! 1,000 unacknowledged). The clock runs from the first publish to the acknowledgement (after
//! commit) of the last message. Then the same readings are COPYed straight into `readings` of
//! a fresh database. Every round has a broker of its own, so that no earlier subscriber takes
//! a share. If ingest stalls, a second session with the same client id shows whether the
//! broker still held the missing messages.
//!
//!     TELEMON_TEST_DATABASE_URL=postgres://... cargo bench -p telemon-ingest --bench ingest

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{TimeZone, Utc};
use telemon_broker::edge::packet::Protocol;
use telemon_broker::engine::{Engine, EngineSettings, ENGINE_USER};
use telemon_ingest::decode::Decoder;
use telemon_ingest::service::{self, IngestSettings};
use telemon_model::bus::BusConfig;
use telemon_model::health::{Health, Status};
use telemon_model::{DeviceId, Reading, Value};
use telemon_store::{ReadingQuery, Store};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

const READINGS: usize = 100_000;
const DEVICES: usize = 100;
/// QoS 1 publishes the publisher keeps unacknowledged at once; what fits goes out in one write.
const WINDOW: usize = 1_000;
/// Mosquitto's `max_inflight_messages` here (its default of 20 would measure the window).
const MOSQUITTO_WINDOW: u64 = 10_000;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

async fn fresh(admin: &str, name: &str) -> Store {
    let base = admin.rsplit_once('/').expect("a database URL").0;
    let admin_store = Store::connect(admin).await.expect("connecting");
    let Store::Postgres(_) = &admin_store else {
        panic!("TELEMON_TEST_DATABASE_URL must be a PostgreSQL URL");
    };
    drop(admin_store);
    let db = format!("bench_ingest_{name}_{}", std::process::id());
    let psql = |sql: String| {
        let out = Command::new("psql")
            .args([admin, "-q", "-c", &sql])
            .output()
            .expect("running psql");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    psql(format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"));
    psql(format!("CREATE DATABASE {db}"));
    let store = Store::connect(&format!("{base}/{db}"))
        .await
        .expect("connecting");
    store.migrate().await.expect("migrating");
    store
}

/// What a bedside monitor sends in one frame, in order; a message of `k` readings carries the
/// first `k`.
const VITALS: [&str; 8] = [
    "heart_rate",
    "spo2",
    "respiratory_rate",
    "temperature",
    "systolic_bp",
    "diastolic_bp",
    "mean_arterial_pressure",
    "pulse_rate",
];

/// How the readings travel: `per_message` readings in each MQTT message.
#[derive(Clone, Copy)]
struct Shape {
    name: &'static str,
    per_message: usize,
}

const SHAPES: [Shape; 2] = [
    Shape {
        name: "one reading per message",
        per_message: 1,
    },
    Shape {
        name: "vital-sign frames of 8 readings per message",
        per_message: 8,
    },
];

impl Shape {
    fn messages(&self) -> usize {
        READINGS / self.per_message
    }

    /// Reading `n`: the `n % per_message`-th vital of message `n / per_message`, which comes
    /// from device m % DEVICES; messages are one millisecond apart.
    fn reading(&self, n: usize, start_ms: i64) -> Reading {
        let m = n / self.per_message;
        let k = n % self.per_message;
        Reading {
            device_id: DeviceId::new(format!("bed-{}", m % DEVICES)).expect("a valid id"),
            metric: VITALS[k].into(),
            time: Utc
                .timestamp_millis_opt(start_ms + m as i64)
                .single()
                .expect("a valid time"),
            value: Value::Number(vital(k, m)),
            unit: None,
        }
    }

    /// Message `m` as native JSON.
    fn payload(&self, m: usize, start_ms: i64) -> String {
        let mut payload = String::from("{");
        for (k, metric) in VITALS.iter().enumerate().take(self.per_message) {
            payload.push_str(&format!(r#""{metric}": {}, "#, vital(k, m)));
        }
        payload.push_str(&format!(r#""ts": {}}}"#, start_ms + m as i64));
        payload
    }
}

/// Plausible values only: 0 and the like are device sentinels, refused by validation.
fn vital(k: usize, m: usize) -> f64 {
    let base = [40.0, 90.0, 10.0, 36.0, 100.0, 60.0, 75.0, 40.0][k];
    base + (m % 10) as f64
}

async fn stored_rows(store: &Store) -> usize {
    let mut total = 0;
    for d in 0..DEVICES {
        let query = ReadingQuery {
            device: format!("bed-{d}"),
            metric: None,
            from: None,
            to: None,
            bucket_secs: None,
            limit: READINGS as i64,
        };
        total += store.readings(&query).await.expect("reading back").len();
    }
    total
}

/// A QoS 1 publisher speaking just enough MQTT 3.1.1 over one plain TCP connection: it
/// pipelines up to [`WINDOW`] publishes into few writes and counts PUBACKs. rumqttc writes and
/// flushes one packet per event-loop turn, which capped the publisher near the rate ingest
/// was to be measured at, so the figure measured the publisher.
struct Publisher {
    writer: OwnedWriteHalf,
    window: Arc<Semaphore>,
    acked: Arc<AtomicU64>,
}

impl Publisher {
    async fn connect(port: u16, credentials: Option<(&str, &str)>) -> Publisher {
        let stream = TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connecting the publisher");
        stream.set_nodelay(true).expect("TCP_NODELAY");
        let (mut reader, mut writer) = stream.into_split();

        // CONNECT: protocol "MQTT" level 4, clean session, keepalive 60 s, and a user name
        // and password when the broker wants them.
        let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60];
        let field = |body: &mut Vec<u8>, bytes: &[u8]| {
            body.extend_from_slice(&(bytes.len() as u16).to_be_bytes());
            body.extend_from_slice(bytes);
        };
        field(&mut body, b"bench-publisher");
        if let Some((user, password)) = credentials {
            body[7] |= 0xC0;
            field(&mut body, user.as_bytes());
            field(&mut body, password.as_bytes());
        }
        let mut connect = vec![0x10];
        encode_length(&mut connect, body.len());
        connect.extend_from_slice(&body);
        writer.write_all(&connect).await.expect("sending CONNECT");
        let mut connack = [0u8; 4];
        reader
            .read_exact(&mut connack)
            .await
            .expect("reading CONNACK");
        assert_eq!(connack, [0x20, 2, 0, 0], "CONNACK accepted");

        let window = Arc::new(Semaphore::new(WINDOW));
        let acked = Arc::new(AtomicU64::new(0));
        tokio::spawn(read_pubacks(reader, window.clone(), acked.clone()));
        Publisher {
            writer,
            window,
            acked,
        }
    }

    /// Publishes every message, waiting for acknowledgements only when the window is full.
    /// The connection stays open afterwards: dropping the write half would half-close it, and
    /// a broker that reads the end of the stream drops the session with the acknowledgements
    /// it had not yet written.
    async fn publish_all(&mut self, shape: Shape, start_ms: i64) {
        let mut out = Vec::with_capacity(256 * WINDOW);
        for n in 0..shape.messages() {
            let window = self.window.clone();
            let permit = match window.try_acquire() {
                Ok(permit) => permit,
                Err(_) => {
                    self.flush(&mut out).await;
                    window.acquire().await.expect("window open")
                }
            };
            permit.forget();
            let topic = format!("devices/bed-{}/telemetry", n % DEVICES);
            let payload = shape.payload(n, start_ms);
            // Packet ids 1..=65535 in turn: with at most WINDOW outstanding, an id is free
            // again long before it comes round.
            let pkid = (n % 65_535) as u16 + 1;
            encode_publish(&mut out, &topic, pkid, payload.as_bytes());
        }
        self.flush(&mut out).await;
    }

    async fn flush(&mut self, out: &mut Vec<u8>) {
        self.writer.write_all(out).await.expect("publishing");
        out.clear();
    }
}

/// MQTT's variable-length "remaining length".
fn encode_length(out: &mut Vec<u8>, mut remaining: usize) {
    loop {
        let byte = (remaining % 128) as u8;
        remaining /= 128;
        out.push(if remaining > 0 { byte | 0x80 } else { byte });
        if remaining == 0 {
            break;
        }
    }
}

fn encode_publish(out: &mut Vec<u8>, topic: &str, pkid: u16, payload: &[u8]) {
    out.push(0x32);
    encode_length(out, 2 + topic.len() + 2 + payload.len());
    out.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    out.extend_from_slice(topic.as_bytes());
    out.extend_from_slice(&pkid.to_be_bytes());
    out.extend_from_slice(payload);
}

/// Counts PUBACKs (4 bytes each, the only packet the broker sends this session) and opens
/// the window by one for each.
async fn read_pubacks(
    mut reader: tokio::net::tcp::OwnedReadHalf,
    window: Arc<Semaphore>,
    acked: Arc<AtomicU64>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut pending = 0;
    loop {
        let n = match reader.read(&mut buf[pending..]).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n + pending,
        };
        let whole = n / 4 * 4;
        for ack in buf[..whole].chunks_exact(4) {
            assert_eq!(ack[..2], [0x40, 2], "a PUBACK");
        }
        acked.fetch_add((whole / 4) as u64, Ordering::SeqCst);
        window.add_permits(whole / 4);
        buf.copy_within(whole..n, 0);
        pending = n - whole;
    }
}

/// User and system CPU time of a process so far, from /proc (0 where unreadable).
fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let ticks: f64 = after
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|t| t.parse::<f64>().ok())
        .sum();
    // The kernel reports in clock ticks, 100 a second on Linux.
    ticks / 100.0
}

/// The broker of one round.
struct Broker {
    name: &'static str,
    port: u16,
    bus: BusConfig,
    credentials: Option<(String, String)>,
    /// The broker's own process, when it has one, for its CPU time.
    pid: Option<u32>,
    /// What the broker sends before it waits for acknowledgements.
    window: u64,
}

/// What one round measured.
struct Round {
    stored: usize,
    published: Duration,
    broker_acked: Duration,
    committed: Duration,
    cpu_broker: f64,
    cpu_here: f64,
}

impl Round {
    fn rate(&self) -> f64 {
        READINGS as f64 / self.committed.as_secs_f64()
    }
}

/// Ingest into a fresh database behind `broker`, the publisher flat out, until every message
/// is committed and acknowledged; `None` if ingest stalls for 30 s.
async fn round(
    broker: &Broker,
    shape: Shape,
    store: Store,
    dir: &std::path::Path,
    start_ms: i64,
) -> Option<Round> {
    let health = Health::default();
    let spool = format!("spool-{}-{}", broker.name, shape.per_message);
    let settings = IngestSettings {
        broker_window: Some(broker.window),
        ..IngestSettings::new(dir.join(spool))
    };
    let ingest = service::start(
        broker.bus.clone(),
        settings,
        Arc::new(Decoder::native_only()),
        store.clone(),
        health.clone(),
    )
    .await
    .expect("starting ingest");
    // Ready once the broker has taken the subscriptions (before that, `live` holds vacuously:
    // nothing has registered yet, and a message published then would reach no one).
    let subscribed = || {
        let snapshot = health.snapshot();
        snapshot
            .get("ingest")
            .is_some_and(|c| c.status == Status::Ok)
    };
    while !subscribed() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let credentials = broker
        .credentials
        .as_ref()
        .map(|(u, p)| (u.as_str(), p.as_str()));
    let mut publisher = Publisher::connect(broker.port, credentials).await;
    let broker_acks = publisher.acked.clone();
    let cpu = || {
        (
            broker.pid.map_or(0.0, cpu_seconds),
            cpu_seconds(std::process::id()),
        )
    };
    let cpu_before = cpu();
    let started = Instant::now();
    publisher.publish_all(shape, start_ms).await;
    let published = started.elapsed();
    let mut broker_acked = None;
    let mut last = (0, Instant::now());
    let messages = shape.messages() as u64;
    while ingest.acknowledged() < messages {
        let acked = broker_acks.load(Ordering::SeqCst);
        if broker_acked.is_none() && acked >= messages {
            broker_acked = Some(started.elapsed());
        }
        let acknowledged = ingest.acknowledged();
        if acknowledged != last.0 {
            last = (acknowledged, Instant::now());
        }
        if last.1.elapsed() > Duration::from_secs(30) {
            eprintln!(
                "{}: ingest stalled at {acknowledged} of {messages} messages, {} in flight, {} \
                 acknowledged by the broker (published in {published:?}, health {:?})",
                broker.name,
                ingest.in_flight(),
                broker_acks.load(Ordering::SeqCst),
                health.snapshot()
            );
            // Whether the broker still holds the missing messages: a new session with the
            // same client id takes the old one over and is sent what it had not delivered.
            let again = service::start(
                broker.bus.clone(),
                IngestSettings::new(dir.join(format!("spool-{}-again", broker.name))),
                Arc::new(Decoder::native_only()),
                store.clone(),
                Health::default(),
            )
            .await
            .expect("starting ingest again");
            tokio::time::sleep(Duration::from_secs(10)).await;
            eprintln!(
                "a new ingest session then received and committed {} more; rows stored: {}",
                again.acknowledged(),
                stored_rows(&store).await
            );
            return None;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let committed = started.elapsed();
    let cpu_after = cpu();

    // The broker may forward the last message before the publisher has read its PUBACK.
    let deadline = Instant::now() + Duration::from_secs(5);
    while broker_acks.load(Ordering::SeqCst) < messages && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let acked = broker_acks.load(Ordering::SeqCst);
    if acked != messages {
        eprintln!(
            "{}: the publisher has {acked} of {messages} acknowledgements, though ingest \
             committed every message: the broker has not sent the rest",
            broker.name
        );
    }
    Some(Round {
        stored: stored_rows(&store).await,
        published,
        broker_acked: broker_acked.unwrap_or(committed),
        committed,
        cpu_broker: cpu_after.0 - cpu_before.0,
        cpu_here: cpu_after.1 - cpu_before.1,
    })
}

/// The bench's Mosquitto, stopped when dropped (on a panic too).
struct Mosquitto(std::process::Child);

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_mosquitto(dir: &std::path::Path) -> (Mosquitto, u16) {
    let port = free_port();
    let config = dir.join("mosquitto.conf");
    std::fs::write(
        &config,
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\nmax_queued_messages 1000000\n\
             max_inflight_messages {MOSQUITTO_WINDOW}\n"
        ),
    )
    .expect("writing mosquitto.conf");
    let mosquitto = Command::new("mosquitto")
        .arg("-c")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting mosquitto (apt-get install mosquitto)");
    let mosquitto = Mosquitto(mosquitto);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        std::thread::sleep(Duration::from_millis(20));
    }
    (mosquitto, port)
}

/// One broker of the given kind, fresh for each round.
enum Kind {
    Mosquitto,
    Engine,
}

impl Kind {
    fn name(&self) -> &'static str {
        match self {
            Kind::Mosquitto => "Mosquitto",
            Kind::Engine => "telemon engine",
        }
    }
}

/// Runs one round behind a fresh broker of `kind`; the broker stops with the round (an engine
/// idles on: rumqttd has no stop, and its subscriber has nothing more to receive).
async fn measure(kind: &Kind, shape: Shape, admin: &str, dir: &std::path::Path) -> Option<Round> {
    let start_ms = Utc::now().timestamp_millis() - 3_600_000;
    let db = format!("{}_{}", kind.name().replace(" ", "_"), shape.per_message).to_lowercase();
    let store = fresh(admin, &db).await;
    match kind {
        Kind::Mosquitto => {
            // As `telemon ingest` runs against an external broker.
            let (mosquitto, port) = start_mosquitto(dir);
            let broker = Broker {
                name: kind.name(),
                port,
                bus: BusConfig::from_url(&format!("mqtt://127.0.0.1:{port}")).expect("a URL"),
                credentials: None,
                pid: Some(mosquitto.0.id()),
                window: MOSQUITTO_WINDOW,
            };
            let measured = round(&broker, shape, store, dir, start_ms).await;
            drop(mosquitto);
            measured
        }
        Kind::Engine => {
            // As in `telemon up`; the engine runs in this process, so its CPU is counted with
            // the publisher's and ingest's.
            let engine = Engine::start(&EngineSettings::default()).expect("starting the engine");
            let broker = Broker {
                name: kind.name(),
                port: engine.addr(Protocol::V311).port(),
                credentials: Some((ENGINE_USER.to_string(), engine.secret().to_string())),
                bus: engine.bus(),
                pid: None,
                window: service::ENGINE_WINDOW,
            };
            round(&broker, shape, store, dir, start_ms).await
        }
    }
}

/// Raw COPY of the shape's readings, twice into a fresh database each time; the faster counts,
/// so the ratio errs against the pipeline when the machine is busy.
async fn raw_copy(shape: Shape, admin: &str) -> f64 {
    let start_ms = Utc::now().timestamp_millis() - 3_600_000;
    let rows: Vec<Reading> = (0..READINGS).map(|n| shape.reading(n, start_ms)).collect();
    let mut raw: f64 = 0.0;
    for round in 0..2 {
        let store = fresh(admin, &format!("raw{round}_{}", shape.per_message)).await;
        let started = Instant::now();
        for chunk in rows.chunks(2_000) {
            store.copy_readings_raw(chunk).await.expect("raw COPY");
        }
        raw = raw.max(READINGS as f64 / started.elapsed().as_secs_f64());
    }
    raw
}

#[tokio::main]
async fn main() {
    let Ok(admin) = std::env::var("TELEMON_TEST_DATABASE_URL") else {
        eprintln!("set TELEMON_TEST_DATABASE_URL to a PostgreSQL server to run this benchmark");
        std::process::exit(2);
    };
    let dir = std::env::temp_dir().join(format!("telemon-bench-ingest-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a temp dir");

    let mut failed = false;
    println!("readings: {READINGS} from {DEVICES} devices, QoS 1, each shape and broker fresh");
    for shape in SHAPES {
        let mut rounds = Vec::new();
        for kind in [Kind::Mosquitto, Kind::Engine] {
            let measured = measure(&kind, shape, &admin, &dir).await;
            failed |= measured.is_none();
            rounds.extend(measured.map(|r| (kind.name(), r)));
        }
        let raw = raw_copy(shape, &admin).await;

        println!("{} ({} messages):", shape.name, shape.messages());
        for (name, r) in &rounds {
            println!("  behind {name}:");
            println!("    rows stored: {}", r.stored);
            println!(
                "    publisher: queued in {:.2} s, all acknowledged by the broker in {:.2} s, \
                 last committed at {:.2} s",
                r.published.as_secs_f64(),
                r.broker_acked.as_secs_f64(),
                r.committed.as_secs_f64()
            );
            println!(
                "    CPU meanwhile: broker process {:.2} s, this process {:.2} s",
                r.cpu_broker, r.cpu_here
            );
            println!(
                "    MQTT publish -> committed row: {:>8.0} readings/s, {:.1}% of raw COPY",
                r.rate(),
                100.0 * r.rate() / raw
            );
        }
        println!("  raw COPY, same rows and table:   {raw:>8.0} readings/s");
    }
    let _ = std::fs::remove_dir_all(&dir);
    if failed {
        std::process::exit(1);
    }
}
