//! Ingest throughput: readings committed per second from MQTT publish to committed row,
//! against raw COPY of the same rows into the same table, in the same run.
//!
//! A private Mosquitto (10,000 messages in flight per session) on a free port; the ingest
//! service in this process at QoS 1 with a persistent session, writing to a fresh PostgreSQL
//! database; a publisher sending one reading per message for 100 devices over one connection,
//! as fast as the broker acknowledges (up to 1,000 unacknowledged). The clock runs from the
//! first publish to the acknowledgement (after commit) of the last message. Then the same readings are COPYed straight into `readings` of a second fresh
//! database.
//!
//!     TELEMON_TEST_DATABASE_URL=postgres://... cargo bench -p telemon-ingest --bench ingest

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{TimeZone, Utc};
use telemon_ingest::decode::Decoder;
use telemon_ingest::service::{self, IngestSettings};
use telemon_model::bus::BusConfig;
use telemon_model::health::Health;
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

/// Reading `n`: device n % DEVICES, one millisecond apart.
fn reading(n: usize, start_ms: i64) -> Reading {
    Reading {
        device_id: DeviceId::new(format!("bed-{}", n % DEVICES)).expect("a valid id"),
        metric: "heart_rate".into(),
        time: Utc
            .timestamp_millis_opt(start_ms + n as i64)
            .single()
            .expect("a valid time"),
        value: Value::Number(heart_rate(n) as f64),
        unit: None,
    }
}

/// Plausible values only: 0 and the like are device sentinels, refused by validation.
fn heart_rate(n: usize) -> usize {
    40 + n % 100
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
    async fn connect(port: u16) -> Publisher {
        let stream = TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connecting the publisher");
        stream.set_nodelay(true).expect("TCP_NODELAY");
        let (mut reader, mut writer) = stream.into_split();

        // CONNECT: protocol "MQTT" level 4, clean session, keepalive 60 s.
        let id = b"bench-publisher";
        let mut connect = vec![0x10, (10 + 2 + id.len()) as u8];
        connect.extend_from_slice(&[0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60]);
        connect.extend_from_slice(&(id.len() as u16).to_be_bytes());
        connect.extend_from_slice(id);
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

    /// Publishes every reading, waiting for acknowledgements only when the window is full.
    async fn publish_all(mut self, start_ms: i64) {
        let mut out = Vec::with_capacity(128 * WINDOW);
        for n in 0..READINGS {
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
            let payload = format!(
                r#"{{"heart_rate": {}, "ts": {}}}"#,
                heart_rate(n),
                start_ms + n as i64
            );
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

fn encode_publish(out: &mut Vec<u8>, topic: &str, pkid: u16, payload: &[u8]) {
    out.push(0x32);
    let mut remaining = 2 + topic.len() + 2 + payload.len();
    loop {
        let byte = (remaining % 128) as u8;
        remaining /= 128;
        out.push(if remaining > 0 { byte | 0x80 } else { byte });
        if remaining == 0 {
            break;
        }
    }
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

#[tokio::main]
async fn main() {
    let Ok(admin) = std::env::var("TELEMON_TEST_DATABASE_URL") else {
        eprintln!("set TELEMON_TEST_DATABASE_URL to a PostgreSQL server to run this benchmark");
        std::process::exit(2);
    };
    let dir = std::env::temp_dir().join(format!("telemon-bench-ingest-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a temp dir");

    let port = free_port();
    let config = dir.join("mosquitto.conf");
    std::fs::write(
        &config,
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\nmax_queued_messages 0\n\
             max_inflight_messages 10000\n"
        ),
    )
    .expect("writing mosquitto.conf");
    let mut mosquitto = Command::new("mosquitto")
        .arg("-c")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting mosquitto (apt-get install mosquitto)");
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let store = fresh(&admin, "pipeline").await;
    let bus = BusConfig::from_url(&format!("mqtt://127.0.0.1:{port}")).expect("broker URL");
    let health = Health::default();
    let settings = IngestSettings::new(dir.join("spool"));
    let ingest = service::start(
        bus,
        settings,
        Arc::new(Decoder::native_only()),
        store.clone(),
        health.clone(),
    )
    .await
    .expect("starting ingest");
    while !health.live() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let start_ms = Utc::now().timestamp_millis() - 3_600_000;
    let publisher = Publisher::connect(port).await;
    let broker_acks = publisher.acked.clone();
    let cpu_before = (cpu_seconds(mosquitto.id()), cpu_seconds(std::process::id()));
    let started = Instant::now();
    publisher.publish_all(start_ms).await;
    let published = started.elapsed();
    let mut broker_acked = None;
    let mut last = (0, Instant::now());
    while ingest.acknowledged() < READINGS as u64 {
        let acked = broker_acks.load(Ordering::SeqCst);
        if broker_acked.is_none() && acked >= READINGS as u64 {
            broker_acked = Some(started.elapsed());
        }
        let acknowledged = ingest.acknowledged();
        if acknowledged != last.0 {
            last = (acknowledged, Instant::now());
        }
        if last.1.elapsed() > Duration::from_secs(30) {
            eprintln!(
                "ingest stalled at {acknowledged} of {READINGS}, {} in flight, {} acknowledged \
                 by the broker (published in {published:?}, \
                 health {:?})",
                ingest.in_flight(),
                broker_acks.load(Ordering::SeqCst),
                health.snapshot()
            );
            // Exiting skips the end of main: the broker and its files go here.
            let _ = mosquitto.kill();
            let _ = mosquitto.wait();
            let _ = std::fs::remove_dir_all(&dir);
            std::process::exit(1);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let committed = started.elapsed();
    let cpu = (
        cpu_seconds(mosquitto.id()) - cpu_before.0,
        cpu_seconds(std::process::id()) - cpu_before.1,
    );
    assert_eq!(
        broker_acks.load(Ordering::SeqCst),
        READINGS as u64,
        "every publish acknowledged by the broker"
    );
    let pipeline = READINGS as f64 / committed.as_secs_f64();
    let stored = stored_rows(&store).await;

    // Raw COPY twice, into a fresh database each time, and the faster counts: the ratio
    // errs against the pipeline when the machine is busy.
    let rows: Vec<Reading> = (0..READINGS).map(|n| reading(n, start_ms)).collect();
    let mut raw: f64 = 0.0;
    for round in 0..2 {
        let raw_store = fresh(&admin, &format!("raw{round}")).await;
        let started = Instant::now();
        for chunk in rows.chunks(2_000) {
            raw_store.copy_readings_raw(chunk).await.expect("raw COPY");
        }
        raw = raw.max(READINGS as f64 / started.elapsed().as_secs_f64());
    }

    println!("readings: {READINGS} from {DEVICES} devices, one per QoS 1 message");
    println!("rows stored by the pipeline: {stored}");
    let broker_acked = broker_acked.unwrap_or(committed);
    println!(
        "publisher: queued in {:.2} s, all acknowledged by the broker in {:.2} s, \
         last committed at {:.2} s",
        published.as_secs_f64(),
        broker_acked.as_secs_f64(),
        committed.as_secs_f64()
    );
    println!(
        "CPU meanwhile: Mosquitto {:.2} s, this process (publisher and ingest) {:.2} s",
        cpu.0, cpu.1
    );
    println!("MQTT publish -> committed row: {pipeline:>10.0} readings/s");
    println!("raw COPY, same rows and table: {raw:>10.0} readings/s");
    println!(
        "ratio:                         {:>10.1}%",
        100.0 * pipeline / raw
    );

    let _ = mosquitto.kill();
    let _ = mosquitto.wait();
    let _ = std::fs::remove_dir_all(&dir);
}
