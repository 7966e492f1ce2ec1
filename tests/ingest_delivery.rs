//! Delivery through outages, with real processes: every reading a broker acknowledged ends up
//! stored exactly once, counted by query.
//!
//! - PostgreSQL stopped for 30 s in the middle of 10,000 QoS 1 readings into `telemon up`
//!   (a private PostgreSQL instance, so that stopping it disturbs no other test);
//! - `telemon ingest` killed with SIGKILL mid-stream behind Mosquitto, then restarted;
//! - the connection between Mosquitto and ingest black-holed for longer than the keepalive;
//! - two `telemon ingest` workers sharing one subscription.
//!
//! Each reading carries a distinct timestamp and its sequence number as the value, so that
//! `count(*)` and `count(DISTINCT value)` say whether anything was lost or doubled.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{TempDir, Up};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, TlsConfiguration, Transport};
use sqlx::Connection;

/// Publishes a device keeps unacknowledged at once on telemon's edge.
const INFLIGHT: u16 = 10;

const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// A PostgreSQL instance of this test's own, which it may stop and start at will.
struct PrivatePostgres {
    dir: TempDir,
    port: u16,
    as_postgres: bool,
}

impl PrivatePostgres {
    fn start() -> PrivatePostgres {
        assert!(
            Path::new(PG_BIN).join("initdb").exists(),
            "PostgreSQL 15 server binaries missing: run scripts/test.sh (it installs them)"
        );
        let dir = TempDir::new("ingest-pg");
        let as_postgres = is_root();
        if as_postgres {
            // PostgreSQL refuses to run as root: the instance runs as postgres, in a
            // directory that user owns.
            let ok = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .status()
                .unwrap();
            assert!(ok.success());
        }
        let pg = PrivatePostgres {
            dir,
            port: common::free_port(),
            as_postgres,
        };
        let data = pg.dir.path().join("data");
        pg.run(
            "initdb",
            &[
                "-D",
                data.to_str().unwrap(),
                "-A",
                "trust",
                "-U",
                &pg.user(),
            ],
        );
        pg.pg_ctl_start();
        pg
    }

    fn user(&self) -> String {
        if self.as_postgres {
            "postgres".into()
        } else {
            std::env::var("USER").unwrap_or_else(|_| "postgres".into())
        }
    }

    fn url(&self) -> String {
        format!(
            "postgres://{}@127.0.0.1:{}/postgres",
            self.user(),
            self.port
        )
    }

    fn run(&self, tool: &str, args: &[&str]) {
        let path = Path::new(PG_BIN).join(tool);
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        };
        let out = cmd.args(args).output().expect("running a PostgreSQL tool");
        assert!(
            out.status.success(),
            "{tool} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn pg_ctl_start(&self) {
        let dir = self.dir.path();
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port,
            dir.display()
        );
        self.run(
            "pg_ctl",
            &[
                "-D",
                dir.join("data").to_str().unwrap(),
                "-l",
                dir.join("log").to_str().unwrap(),
                "-w",
                "start",
                "-o",
                &options,
            ],
        );
    }

    fn pg_ctl_stop(&self) {
        let data = self.dir.path().join("data");
        self.run(
            "pg_ctl",
            &["-D", data.to_str().unwrap(), "-m", "fast", "-w", "stop"],
        );
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let data = self.dir.path().join("data");
        if data.join("postmaster.pid").exists() {
            let _ = std::panic::catch_unwind(|| self.pg_ctl_stop());
        }
    }
}

/// Counts the readings of `device`: (rows, distinct values).
/// These tests each run PostgreSQL, Mosquitto and telemon processes and time outages in
/// seconds; run together on a small machine they starve each other, so they take turns.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn count(url: &str, device: &str) -> (i64, i64) {
    let mut conn = sqlx::PgConnection::connect(url).await.expect("connecting");
    sqlx::query_as("SELECT count(*), count(DISTINCT value) FROM readings WHERE device_id = $1")
        .bind(device)
        .fetch_one(&mut conn)
        .await
        .expect("counting readings")
}

/// Waits until `device` has `n` rows, then returns the final count.
async fn wait_for_rows(url: &str, device: &str, n: i64, within: Duration) -> (i64, i64) {
    let deadline = Instant::now() + within;
    loop {
        let counted = count(url, device).await;
        if counted.0 >= n || Instant::now() > deadline {
            // Anything more would be a duplicate arriving late: look once more.
            tokio::time::sleep(Duration::from_millis(500)).await;
            return count(url, device).await;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A device publishing readings at QoS 1, counting the broker's acknowledgements.
struct Publisher {
    client: AsyncClient,
    acked: Arc<AtomicU64>,
    topic: String,
    base_ms: i64,
}

impl Publisher {
    fn start(options: MqttOptions, device: &str) -> Publisher {
        let (client, mut eventloop) = AsyncClient::new(options, 1_000);
        let acked = Arc::new(AtomicU64::new(0));
        let count = acked.clone();
        tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::PubAck(_))) => {
                        count.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            }
        });
        Publisher {
            client,
            acked,
            topic: format!("devices/{device}/telemetry"),
            // An hour back, one millisecond apart: distinct times inside the sane window.
            base_ms: now_ms() - 3_600_000,
        }
    }

    async fn publish(&self, range: std::ops::Range<u64>) {
        for seq in range {
            let payload = format!(r#"{{"seq": {seq}, "ts": {}}}"#, self.base_ms + seq as i64);
            self.client
                .publish(&self.topic, QoS::AtLeastOnce, false, payload)
                .await
                .expect("queueing a publish");
        }
    }

    /// Waits for `n` acknowledgements in all; on failure, says how many came.
    async fn wait_acked(&self, n: u64, within: Duration) -> Result<(), String> {
        let deadline = Instant::now() + within;
        while self.acked.load(Ordering::SeqCst) < n {
            if Instant::now() > deadline {
                let acked = self.acked.load(Ordering::SeqCst);
                return Err(format!("only {acked} of {n} publishes acknowledged"));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }
}

fn now_ms() -> i64 {
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    since.as_millis() as i64
}

fn install_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// (a) PostgreSQL stopped for 30 s in the middle of 10,000 QoS 1 readings through
/// `telemon up`: ingest spools and reports degraded, then writes everything back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_outage_loses_nothing() {
    let _one_at_a_time = SERIAL.lock().await;
    install_crypto();
    let pg = PrivatePostgres::start();
    let dir = TempDir::new("ingest-outage");
    let up = Up::start(dir.path(), Some(&pg.url()), &[]);
    let (crt, key) = up.issue("bed-1");

    let mut options = MqttOptions::new("bed-1", "127.0.0.1", up.mqtt_port);
    options.set_keep_alive(Duration::from_secs(10));
    options.set_inflight(INFLIGHT);
    options.set_transport(Transport::Tls(TlsConfiguration::Simple {
        ca: std::fs::read(up.ca()).unwrap(),
        alpn: None,
        client_auth: Some((std::fs::read(&crt).unwrap(), std::fs::read(&key).unwrap())),
    }));
    let device = Publisher::start(options, "bed-1");

    device.publish(0..5_000).await;
    let acked = device.wait_acked(5_000, Duration::from_secs(60)).await;
    assert!(acked.is_ok(), "{acked:?}\n{}", up.log_text());
    pg.pg_ctl_stop();
    let stopped = Instant::now();

    device.publish(5_000..10_000).await;
    let acked = device.wait_acked(10_000, Duration::from_secs(60)).await;
    assert!(acked.is_ok(), "{acked:?}\n{}", up.log_text());
    let mut degraded = false;
    while stopped.elapsed() < Duration::from_secs(30) {
        let body: serde_json::Value = reqwest::get(format!("{}/healthz", up.http))
            .await
            .expect("GET /healthz")
            .json()
            .await
            .unwrap_or_default();
        degraded |= body["parts"]["ingest"]["status"] == "degraded";
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        degraded,
        "/healthz never showed ingest degraded\n{}",
        up.log_text()
    );
    pg.pg_ctl_start();

    let (rows, distinct) = wait_for_rows(&pg.url(), "bed-1", 10_000, Duration::from_secs(60)).await;
    assert_eq!((rows, distinct), (10_000, 10_000), "{}", up.log_text());
    drop(up);
}

/// Mosquitto with persistence, unlimited queues for offline sessions and no in-flight cap
/// (ingest acknowledges in batches), on a free port.
struct Mosquitto {
    child: Child,
    port: u16,
    config: PathBuf,
}

impl Mosquitto {
    fn start(dir: &Path) -> Mosquitto {
        common::require_tool("mosquitto");
        let port = common::free_port();
        let config = dir.join("mosquitto.conf");
        let store = dir.join("mosquitto-data");
        std::fs::create_dir_all(&store).unwrap();
        if is_root() {
            // Mosquitto started as root drops to the mosquitto user, which must own its store.
            let _ = Command::new("chown")
                .args(["-R", "mosquitto"])
                .arg(&store)
                .status();
        }
        std::fs::write(
            &config,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\n\
                 persistence_location {}/\nmax_queued_messages 0\nmax_inflight_messages 10000\n",
                store.display()
            ),
        )
        .unwrap();
        let child = Mosquitto::spawn(&config);
        let m = Mosquitto {
            child,
            port,
            config,
        };
        m.wait_listening();
        m
    }

    fn spawn(config: &Path) -> Child {
        Command::new("mosquitto")
            .arg("-c")
            .arg(config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting mosquitto")
    }

    fn wait_listening(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "mosquitto not listening");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = &self.config;
    }
}

/// `telemon ingest` as its own process.
struct Ingest {
    child: Child,
}

impl Ingest {
    fn start(data_dir: &Path, database_url: &str, broker: &str, extra: &[&str]) -> Ingest {
        let ready = data_dir.with_extension("ready");
        let _ = std::fs::remove_file(&ready);
        let child = Command::new(common::BIN)
            .arg("--data-dir")
            .arg(data_dir)
            .env("DATABASE_URL", database_url)
            .args(["ingest", "--broker-url", broker, "--ready-file"])
            .arg(&ready)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting telemon ingest");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !ready.exists() {
            assert!(
                Instant::now() < deadline,
                "telemon ingest not subscribed in 30 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Ingest { child }
    }

    fn kill9(mut self) {
        let pid = self.child.id().to_string();
        let ok = Command::new("kill").args(["-KILL", &pid]).status().unwrap();
        assert!(ok.success());
        let _ = self.child.wait();
    }
}

impl Drop for Ingest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn plain_options(client_id: &str, port: u16) -> MqttOptions {
    let mut options = MqttOptions::new(client_id, "127.0.0.1", port);
    options.set_keep_alive(Duration::from_secs(10));
    options
}

/// (b) `telemon ingest` killed with SIGKILL mid-stream and restarted: the persistent session
/// at the broker holds what was not acknowledged, and nothing is stored twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_killed_mid_stream_loses_nothing() {
    let _one_at_a_time = SERIAL.lock().await;
    let dir = TempDir::new("ingest-kill");
    let db = common::fresh_postgres_database("ingest_kill").await;
    let broker = Mosquitto::start(dir.path());
    let data = dir.path().join("ingest");
    let ingest = Ingest::start(&data, &db, &broker.url(), &[]);

    let device = Publisher::start(plain_options("bed-2", broker.port), "bed-2");
    device.publish(0..3_000).await;
    device
        .wait_acked(3_000, Duration::from_secs(60))
        .await
        .unwrap();
    ingest.kill9();

    device.publish(3_000..6_000).await;
    device
        .wait_acked(6_000, Duration::from_secs(60))
        .await
        .unwrap();
    let _ingest = Ingest::start(&data, &db, &broker.url(), &[]);

    let (rows, distinct) = wait_for_rows(&db, "bed-2", 6_000, Duration::from_secs(60)).await;
    assert_eq!((rows, distinct), (6_000, 6_000));
}

/// A TCP proxy that can black-hole its connections: bytes stop flowing but the sockets stay
/// open, as when a network path dies, so that only keepalive notices.
struct Proxy {
    port: u16,
    blocked: Arc<AtomicBool>,
    generation: Arc<AtomicU64>,
}

impl Proxy {
    async fn start(upstream: u16) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let blocked = Arc::new(AtomicBool::new(false));
        let generation = Arc::new(AtomicU64::new(0));
        let (b, g) = (blocked.clone(), generation.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                else {
                    continue;
                };
                let born = g.load(Ordering::SeqCst);
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::spawn(pump(cr, sw, b.clone(), g.clone(), born));
                tokio::spawn(pump(sr, cw, b.clone(), g.clone(), born));
            }
        });
        Proxy {
            port,
            blocked,
            generation,
        }
    }

    fn cut(&self) {
        self.blocked.store(true, Ordering::SeqCst);
    }

    /// Lets bytes flow again on new connections; those made before are closed, as a dead
    /// path's connections would be by then.
    fn restore(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.blocked.store(false, Ordering::SeqCst);
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    blocked: Arc<AtomicBool>,
    generation: Arc<AtomicU64>,
    born: u64,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        while blocked.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if generation.load(Ordering::SeqCst) != born {
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// (c) The path between Mosquitto and ingest black-holed for 25 s, longer than the 10 s
/// keepalive (Mosquitto gives up on the client after 15 s): every reading the broker
/// acknowledged is stored exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_connection_cut_past_keepalive_loses_nothing() {
    let _one_at_a_time = SERIAL.lock().await;
    let dir = TempDir::new("ingest-cut");
    let db = common::fresh_postgres_database("ingest_cut").await;
    let broker = Mosquitto::start(dir.path());
    let proxy = Proxy::start(broker.port).await;
    let data = dir.path().join("ingest");
    let via_proxy = format!("mqtt://127.0.0.1:{}", proxy.port);
    let _ingest = Ingest::start(&data, &db, &via_proxy, &[]);

    let device = Publisher::start(plain_options("bed-3", broker.port), "bed-3");
    device.publish(0..2_000).await;
    device
        .wait_acked(2_000, Duration::from_secs(60))
        .await
        .unwrap();
    proxy.cut();
    device.publish(2_000..4_000).await;
    device
        .wait_acked(4_000, Duration::from_secs(60))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(25)).await;
    proxy.restore();

    let (rows, distinct) = wait_for_rows(&db, "bed-3", 4_000, Duration::from_secs(60)).await;
    assert_eq!((rows, distinct), (4_000, 4_000));
}

/// (d) Two workers behind one shared subscription store every reading exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_subscription_workers_store_each_reading_once() {
    let _one_at_a_time = SERIAL.lock().await;
    let dir = TempDir::new("ingest-shared");
    let db = common::fresh_postgres_database("ingest_shared").await;
    let broker = Mosquitto::start(dir.path());
    let shared = ["--shared-group", "ingest", "--client-id"];
    let mut args_a = shared.to_vec();
    args_a.push("ingest-a");
    let mut args_b = shared.to_vec();
    args_b.push("ingest-b");
    let _a = Ingest::start(&dir.path().join("a"), &db, &broker.url(), &args_a);
    let _b = Ingest::start(&dir.path().join("b"), &db, &broker.url(), &args_b);

    let device = Publisher::start(plain_options("bed-4", broker.port), "bed-4");
    device.publish(0..5_000).await;
    device
        .wait_acked(5_000, Duration::from_secs(60))
        .await
        .unwrap();

    let (rows, distinct) = wait_for_rows(&db, "bed-4", 5_000, Duration::from_secs(60)).await;
    assert_eq!((rows, distinct), (5_000, 5_000));
}
