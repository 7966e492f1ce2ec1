//! Breach -> alert on the live stream, under load, with real processes: `telemon up` (release
//! build), background readings through the mTLS edge from Debian's mosquitto_pub (`-l`, one
//! connection per device, one reading per line), and a probe device whose heart rate crosses
//! the fixture's `hr-high` threshold (no `for`), then recovers, again and again. Prints p50,
//! p99 and max from the write of the breaching reading to the `firing` event arriving on an
//! SSE client of /api/v1/stream, and from the write of each probe reading to that reading
//! arriving on a second SSE client (publish -> dashboard, through edge, engine, the API's live
//! feed and SSE, while the background load flows).
//!
//! Run: `cargo build --release -p telemon && cargo bench -p telemon-alerts --bench
//! breach_latency` (`TELEMON_BIN` names another binary; `BENCH_RATE` sets the background
//! readings per second, 10,000 by default).

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

/// Background publishers (devices); each sends rate / PUBLISHERS readings a second.
const PUBLISHERS: usize = 4;
/// Breaches measured, after a few for warm-up.
const SAMPLES: usize = 200;
const WARM_UP: usize = 10;

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let bin = std::env::var_os("TELEMON_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target/release/telemon"));
    if !bin.exists() {
        eprintln!(
            "{} not found: run `cargo build --release -p telemon` first",
            bin.display()
        );
        std::process::exit(2);
    }
    let rate: u64 = std::env::var("BENCH_RATE")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(10_000);

    let dir = std::env::temp_dir().join(format!("telemon-breach-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("creating the bench directory");
    let up = Up::start(&bin, &dir, &root.join("tests/fixtures/rules.toml"));

    let sent = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut load = Vec::new();
    for i in 0..PUBLISHERS {
        let publisher = up.publisher(&bin, &format!("bench-load-{i}"));
        let (sent, stop) = (sent.clone(), stop.clone());
        let per_publisher = rate / PUBLISHERS as u64;
        load.push(std::thread::spawn(move || {
            background(publisher, per_publisher, &sent, &stop)
        }));
    }
    let alerts = up.stream("kind=alerts", "state");
    let readings = up.stream("kind=readings&device=bench-probe", "value");
    std::thread::sleep(Duration::from_secs(2));

    let mut probe = up.publisher(&bin, "bench-probe");
    let started = Instant::now();
    let sent_before = sent.load(Ordering::Relaxed);
    let mut latencies = Vec::with_capacity(SAMPLES);
    let mut reading_latencies = Vec::with_capacity(2 * SAMPLES);
    let mut missed = 0;
    let mut readings_missed = 0;
    for n in 0..SAMPLES + WARM_UP {
        while alerts.try_recv().is_ok() {}
        while readings.try_recv().is_ok() {}
        let breached = Instant::now();
        probe.line(r#"{"heart_rate": 150}"#);
        match wait_for(&alerts, |s| s == "firing") {
            Some(at) if n >= WARM_UP => latencies.push(at - breached),
            Some(_) => {}
            None => missed += 1,
        }
        let recovered = Instant::now();
        probe.line(r#"{"heart_rate": 80}"#);
        wait_for(&alerts, |s| s == "resolved");

        // Both readings reached the stream before their alert transitions did.
        for (sent, value) in [(breached, "150"), (recovered, "80")] {
            match wait_for(&readings, |s| s.starts_with(value)) {
                Some(at) if n >= WARM_UP => reading_latencies.push(at - sent),
                Some(_) => {}
                None => readings_missed += 1,
            }
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let background_rate = (sent.load(Ordering::Relaxed) - sent_before) as f64 / elapsed;
    stop.store(true, Ordering::Relaxed);
    for thread in load {
        let _ = thread.join();
    }

    println!("telemon up, SQLite store, SSE clients of /api/v1/stream");
    println!("  background load: {background_rate:.0} readings/s through the mTLS edge");
    print_latencies("breach -> alert", &mut latencies, missed);
    print_latencies(
        "publish -> reading",
        &mut reading_latencies,
        readings_missed,
    );
    drop(up);
    let _ = std::fs::remove_dir_all(&dir);
}

fn print_latencies(what: &str, latencies: &mut [Duration], missed: usize) {
    latencies.sort();
    let pct = |p: f64| {
        let i = ((latencies.len() as f64 * p).ceil() as usize).saturating_sub(1);
        latencies.get(i).map_or(f64::NAN, |d| d.as_secs_f64() * 1e3)
    };
    println!(
        "  {what}: samples {}  missed {missed}  p50 {:.1} ms  p99 {:.1} ms  max {:.1} ms",
        latencies.len(),
        pct(0.50),
        pct(0.99),
        pct(1.0)
    );
}

/// The arrival time of the next stream event whose field matches; None after 5 s.
fn wait_for(
    events: &mpsc::Receiver<(String, Instant)>,
    wanted: impl Fn(&str) -> bool,
) -> Option<Instant> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left = deadline.checked_duration_since(Instant::now())?;
        let (seen, at) = events.recv_timeout(left).ok()?;
        if wanted(&seen) {
            return Some(at);
        }
    }
}

/// Sends `rate` readings a second in 10 ms slices until told to stop.
fn background(mut publisher: Publisher, rate: u64, sent: &AtomicU64, stop: &AtomicBool) {
    let slice = Duration::from_millis(10);
    let per_slice = (rate / 100).max(1);
    let mut next = Instant::now();
    let mut n: u64 = 0;
    while !stop.load(Ordering::Relaxed) {
        let mut batch = String::new();
        for _ in 0..per_slice {
            n += 1;
            batch.push_str(&format!("{{\"heart_rate\": {}}}\n", 60 + n % 30));
        }
        if publisher.stdin.write_all(batch.as_bytes()).is_err() {
            return;
        }
        sent.fetch_add(per_slice, Ordering::Relaxed);
        next += slice;
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
}

/// A mosquitto_pub -l process: one mTLS connection, one message per line written.
struct Publisher {
    child: Child,
    stdin: ChildStdin,
}

impl Publisher {
    fn line(&mut self, text: &str) {
        let ok = writeln!(self.stdin, "{text}").and_then(|_| self.stdin.flush());
        ok.expect("writing to mosquitto_pub");
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `telemon up` as a child process, killed by its PID when dropped.
struct Up {
    child: Child,
    data_dir: PathBuf,
    mqtt_port: u16,
    http: String,
    token: String,
}

impl Up {
    fn start(bin: &Path, dir: &Path, rules: &Path) -> Up {
        let data_dir = dir.join("data");
        let ready = dir.join("ready.json");
        let child = Command::new(bin)
            .arg("--data-dir")
            .arg(&data_dir)
            .args(["up", "--mqtt-listen", "127.0.0.1:0"])
            .args(["--http-listen", "127.0.0.1:0", "--rules"])
            .arg(rules)
            .arg("--ready-file")
            .arg(&ready)
            .env_remove("DATABASE_URL")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting telemon up");
        let deadline = Instant::now() + Duration::from_secs(60);
        while !ready.exists() {
            assert!(Instant::now() < deadline, "telemon up not ready in 60 s");
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(100));
        let text = std::fs::read_to_string(&ready).expect("reading the ready file");
        let ready: serde_json::Value = serde_json::from_str(&text).expect("ready file JSON");
        let field = |name: &str| ready[name].as_str().unwrap_or_default().to_string();
        let mqtt_port = field("mqtt")
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("MQTT port in the ready file");
        let token = std::fs::read_to_string(data_dir.join("admin.token")).expect("admin token");
        Up {
            child,
            data_dir,
            mqtt_port,
            http: field("http"),
            token: token.trim().to_string(),
        }
    }

    fn publisher(&self, bin: &Path, device: &str) -> Publisher {
        let out = self.data_dir.join("devices");
        let issued = Command::new(bin)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(["certs", "issue", device, "--out"])
            .arg(&out)
            .output()
            .expect("issuing a device certificate");
        assert!(issued.status.success(), "certs issue {device}");
        let mut child = Command::new("mosquitto_pub")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.mqtt_port.to_string(),
                "-q",
                "0",
            ])
            .arg("--cafile")
            .arg(self.data_dir.join("certs/ca.crt"))
            .arg("--cert")
            .arg(out.join(format!("{device}.crt")))
            .arg("--key")
            .arg(out.join(format!("{device}.key")))
            .args(["-t", &format!("devices/{device}/telemetry"), "-l"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("starting mosquitto_pub (apt-get install mosquitto-clients)");
        let stdin = child.stdin.take().expect("mosquitto_pub stdin");
        Publisher { child, stdin }
    }

    /// One field of each event of a live stream (`/api/v1/stream?{query}`), with its arrival
    /// time: the state of alert events, the value of readings.
    fn stream(&self, query: &str, field: &str) -> mpsc::Receiver<(String, Instant)> {
        let mut socket = TcpStream::connect(&self.http).expect("connecting to the API");
        socket.set_nodelay(true).expect("nodelay");
        let request = format!(
            "GET /api/v1/stream?{query} HTTP/1.1\r\nHost: {}\r\n\
             Authorization: Bearer {}\r\nAccept: text/event-stream\r\n\r\n",
            self.http, self.token
        );
        socket
            .write_all(request.as_bytes())
            .expect("stream request");
        let key = format!("\"{field}\":");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(socket).lines().map_while(Result::ok) {
                let at = Instant::now();
                let Some((_, rest)) = line.split_once(&key) else {
                    continue;
                };
                let value = rest.split([',', '}']).next().unwrap_or_default();
                if tx.send((value.trim_matches('"').to_string(), at)).is_err() {
                    return;
                }
            }
        });
        rx
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
