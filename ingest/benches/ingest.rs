//! Ingest throughput: readings committed per second from MQTT publish to committed row,
//! against raw COPY of the same rows into the same table, in the same run.
//!
//! A private Mosquitto (10,000 messages in flight per session) on a free port; the ingest
//! service in this process at QoS 1 with a persistent session, writing to a fresh PostgreSQL
//! database; a publisher sending one reading per message from 100 devices as fast as the
//! broker acknowledges. The
//! clock runs from the first publish to the acknowledgement (after commit) of the last
//! message. Then the same readings are COPYed straight into `readings` of a second fresh
//! database.
//!
//!     TELEMON_TEST_DATABASE_URL=postgres://... cargo bench -p telemon-ingest --bench ingest

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{TimeZone, Utc};
use rumqttc::{AsyncClient, MqttOptions, QoS};
use telemon_ingest::decode::Decoder;
use telemon_ingest::service::{self, IngestSettings};
use telemon_model::bus::BusConfig;
use telemon_model::health::Health;
use telemon_model::{DeviceId, Reading, Value};
use telemon_store::{ReadingQuery, Store};

const READINGS: usize = 100_000;
const DEVICES: usize = 100;

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
    let mut options = MqttOptions::new("bench-publisher", "127.0.0.1", port);
    options.set_inflight(1_000);
    // A persistent session, so that a publish caught in a reconnect is sent again.
    options.set_clean_session(false);
    let (client, mut eventloop) = AsyncClient::new(options, 10_000);
    let broker_acks = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let acks = broker_acks.clone();
    tokio::spawn(async move {
        loop {
            let event = eventloop.poll().await;
            if let Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) = event {
                acks.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            if let Err(e) = event {
                eprintln!("publisher: {e}; reconnecting");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });
    let started = Instant::now();
    for n in 0..READINGS {
        let r = reading(n, start_ms);
        let topic = format!("devices/{}/telemetry", r.device_id.as_str());
        let payload = format!(
            r#"{{"heart_rate": {}, "ts": {}}}"#,
            heart_rate(n),
            start_ms + n as i64
        );
        client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
            .expect("publishing");
    }
    let published = started.elapsed();
    let mut last = (0, Instant::now());
    while ingest.acknowledged() < READINGS as u64 {
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
                broker_acks.load(std::sync::atomic::Ordering::Relaxed),
                health.snapshot()
            );
            std::process::exit(1);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let pipeline = READINGS as f64 / started.elapsed().as_secs_f64();
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
