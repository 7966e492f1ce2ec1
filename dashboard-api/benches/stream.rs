//! Live-stream fan-out: 1,000 SSE clients held while readings enter the feed at 10,000/s.
//!
//!     cargo bench -p telemon-dashboard-api --bench stream
//!
//! The server runs in a child process (this program started again with `STREAM_BENCH_SERVER`)
//! so that its RSS is the server's alone: the API with a SQLite store and a feed that a
//! generator fills at the given rate, stamping each reading with the time it entered the feed.
//! The parent holds the clients: one measured client that takes every reading of ten
//! devices, and the rest each following one device. Latency is from a reading entering the
//! feed to the measured client parsing it (same machine, same clock). Environment:
//! `CLIENTS` (1000), `RATE` readings/s (10000), `SECONDS` (10).
//!
//! Two rounds, each with a fresh server: clients whose stream request opens their connection
//! (served directly on the socket), then clients that ask for `/healthz` first on the same
//! connection, so that their stream goes through the general HTTP server (axum and hyper) as a
//! browser's pooled connection would. The ratios compare the two.

use std::io::{BufRead, Write};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use telemon_dashboard_api::live::{Live, LiveData};
use telemon_dashboard_api::{AppState, Auth};
use telemon_model::health::Health;
use telemon_model::{DeviceId, Reading, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TOKEN: &str = "bench-admin-token";
const DEVICES: usize = 100;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    if std::env::var_os("STREAM_BENCH_SERVER").is_some() {
        runtime.block_on(server());
    } else {
        runtime.block_on(clients());
    }
}

/// Serves the API, prints its port, then feeds readings once told to on stdin.
async fn server() {
    let dir = std::env::temp_dir().join(format!("telemon-stream-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("bench directory");
    let store = telemon_store::Store::connect(&format!("sqlite:{}/b.db", dir.display()))
        .await
        .expect("store");
    store.migrate().await.expect("migrations");
    let live = Live::detached();
    let state = AppState {
        store,
        health: Health::default(),
        auth: Arc::new(Auth::new(TOKEN.into())),
        live: live.clone(),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("address").port();
    tokio::spawn(telemon_dashboard_api::serve(listener, state));
    println!("{port}");

    let mut line = String::new();
    let _ = std::io::stdin().lock().read_line(&mut line);
    let rate = env("RATE", 10_000);
    let seconds = env("SECONDS", 10);
    // Batches every millisecond: a steady rate without a timer per reading.
    let per_tick = (rate / 1000).max(1);
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    let mut n = 0u64;
    for _ in 0..seconds * 1000 {
        tick.tick().await;
        for _ in 0..per_tick {
            let device = DeviceId::new(format!("bed-{}", n as usize % DEVICES)).expect("id");
            live.publish(LiveData::Reading(Reading {
                device_id: device,
                metric: "heart_rate".into(),
                time: Utc::now(),
                value: Value::Number(70.0),
                unit: None,
            }));
            n += 1;
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Reads one whole HTTP response with a Content-Length body (the `/healthz` answer).
async fn read_response(stream: &mut tokio::net::TcpStream) {
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        let n = stream.read(&mut buf).await.expect("response");
        assert!(n > 0, "connection closed");
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got);
        let Some(end) = text.find("\r\n\r\n") else {
            continue;
        };
        let length: usize = text[..end]
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length:")
                    .map(|v| v.trim().parse().unwrap_or(0))
            })
            .unwrap_or(0);
        if got.len() >= end + 4 + length {
            return;
        }
    }
}

/// Opens one SSE client; returns the stream once the response headers are in. With `pooled`,
/// the connection serves a `/healthz` request first.
async fn open(port: u16, query: &str, pooled: bool) -> tokio::net::TcpStream {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    if pooled {
        let health = "GET /healthz HTTP/1.1\r\nHost: bench\r\n\r\n";
        stream.write_all(health.as_bytes()).await.expect("request");
        read_response(&mut stream).await;
    }
    let request = format!(
        "GET /api/v1/stream?{query} HTTP/1.1\r\nHost: bench\r\n\
         Authorization: Bearer {TOKEN}\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.expect("request");
    let mut head = [0u8; 512];
    let n = stream.read(&mut head).await.expect("response");
    assert!(head[..n].starts_with(b"HTTP/1.1 200"), "stream refused");
    stream
}

/// What one round measured.
struct Round {
    latencies: Vec<u64>,
    delivered: u64,
    starved: usize,
    elapsed: f64,
    rss: [u64; 3],
}

impl Round {
    fn percentile(&self, p: f64) -> f64 {
        let i = ((self.latencies.len() as f64 * p) as usize).min(self.latencies.len() - 1);
        self.latencies
            .get(i)
            .map_or(f64::NAN, |us| *us as f64 / 1000.0)
    }

    fn per_client_kib(&self, count: usize) -> f64 {
        self.rss[1].saturating_sub(self.rss[0]) as f64 / count as f64
    }

    fn print(&self, label: &str, count: usize) {
        let max = self
            .latencies
            .last()
            .map_or(f64::NAN, |us| *us as f64 / 1000.0);
        println!("  {label}:");
        println!(
            "    measured client (10 devices): {} events, p50 {:.2} ms, p99 {:.2} ms, \
             max {max:.2} ms",
            self.latencies.len(),
            self.percentile(0.50),
            self.percentile(0.99),
        );
        println!(
            "    all clients: {} events delivered ({:.0}/s), {} of {} background clients got none",
            self.delivered,
            self.delivered as f64 / self.elapsed,
            self.starved,
            count - 1
        );
        println!(
            "    server RSS: {} KiB idle, {} KiB holding clients, {} KiB under load; \
             {:.1} KiB per held client",
            self.rss[0],
            self.rss[1],
            self.rss[2],
            self.per_client_kib(count)
        );
    }
}

async fn clients() {
    let count = env("CLIENTS", 1000) as usize;
    let rate = env("RATE", 10_000);
    let seconds = env("SECONDS", 10);
    println!("stream fan-out: {count} SSE clients, {rate} readings/s for {seconds} s");
    let direct = round(false).await;
    direct.print(
        "stream requests opening their connection (served directly)",
        count,
    );
    let pooled = round(true).await;
    pooled.print(
        "stream requests after /healthz on the connection (axum)",
        count,
    );
    println!(
        "  direct / axum: p99 {:.2}, memory per client {:.2}",
        direct.percentile(0.99) / pooled.percentile(0.99),
        direct.per_client_kib(count) / pooled.per_client_kib(count)
    );
}

/// Starts a server, holds the clients, feeds readings and measures.
async fn round(pooled: bool) -> Round {
    let exe = std::env::current_exe().expect("own path");
    let mut child = Command::new(exe)
        .env("STREAM_BENCH_SERVER", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("server process");
    let mut port = String::new();
    let stdout = child.stdout.take().expect("server stdout");
    std::io::BufReader::new(stdout)
        .read_line(&mut port)
        .expect("server port");
    let port: u16 = port.trim().parse().expect("port number");
    let pid = child.id();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss_before = rss_kib(pid);

    let count = env("CLIENTS", 1000) as usize;
    let fed: Arc<Vec<AtomicU64>> = Arc::new((0..count).map(|_| AtomicU64::new(0)).collect());
    let mut held = Vec::new();
    for i in 1..count {
        let stream = open(port, &format!("device=bed-{}", i % DEVICES), pooled).await;
        let fed = fed.clone();
        held.push(tokio::spawn(async move { drain(stream, &fed[i]).await }));
    }
    let measured = open(
        port,
        "device=bed-0,bed-1,bed-2,bed-3,bed-4,bed-5,bed-6,bed-7,bed-8,bed-9",
        pooled,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_held = rss_kib(pid);

    let seconds = env("SECONDS", 10);
    let mut stdin = child.stdin.take().expect("server stdin");
    writeln!(stdin, "go").expect("start the feed");
    let started = Instant::now();
    let mut latencies = measure(measured, &fed[0], Duration::from_secs(seconds)).await;
    let rss_loaded = rss_kib(pid);
    let elapsed = started.elapsed().as_secs_f64();
    let starved = fed[1..]
        .iter()
        .filter(|c| c.load(Ordering::Relaxed) == 0)
        .count();
    let delivered: u64 = fed.iter().map(|c| c.load(Ordering::Relaxed)).sum();
    let _ = child.kill();
    let _ = child.wait();
    let server_dir = std::env::temp_dir().join(format!("telemon-stream-bench-{pid}"));
    let _ = std::fs::remove_dir_all(server_dir);
    for client in held {
        client.abort();
    }

    latencies.sort_unstable();
    Round {
        latencies,
        delivered,
        starved,
        elapsed,
        rss: [rss_before, rss_held, rss_loaded],
    }
}

/// Reads a client's stream, counting events.
async fn drain(mut stream: tokio::net::TcpStream, fed: &AtomicU64) {
    let mut buf = vec![0u8; 4096];
    while let Ok(n) = stream.read(&mut buf).await {
        if n == 0 {
            return;
        }
        let events = buf[..n].windows(6).filter(|w| w == b"data: ").count();
        fed.fetch_add(events as u64, Ordering::Relaxed);
    }
}

/// Reads the measured client for `run`, returning each reading's latency in microseconds.
async fn measure(mut stream: tokio::net::TcpStream, fed: &AtomicU64, run: Duration) -> Vec<u64> {
    let mut latencies = Vec::new();
    let mut pending = String::new();
    let mut buf = vec![0u8; 64 * 1024];
    let deadline = tokio::time::Instant::now() + run;
    while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
        if n == 0 {
            break;
        }
        let now = Utc::now();
        pending.push_str(&String::from_utf8_lossy(&buf[..n]));
        while let Some(end) = pending.find('\n') {
            let line: String = pending.drain(..=end).collect();
            let Some(data) = line.trim().strip_prefix("data: ") else {
                continue;
            };
            let Ok(reading) = serde_json::from_str::<Reading>(data) else {
                continue;
            };
            fed.fetch_add(1, Ordering::Relaxed);
            let us = (now - reading.time).num_microseconds().unwrap_or(i64::MAX);
            latencies.push(us.max(0) as u64);
        }
    }
    latencies
}
