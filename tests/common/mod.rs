//! Helpers for the tests that run the real `telemon` binary with real clients.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_telemon");

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A fresh directory under the system temp dir, removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let dir =
            std::env::temp_dir().join(format!("telemon-{name}-{}-{nanos}", std::process::id()));
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

/// The PostgreSQL server the test command started; a test that needs it fails loudly without.
pub fn postgres_url() -> String {
    std::env::var("TELEMON_TEST_DATABASE_URL").expect(
        "TELEMON_TEST_DATABASE_URL is not set: run the tests with scripts/test.sh, which starts \
         a private PostgreSQL",
    )
}

/// Creates a fresh database on the test server and returns its URL.
pub async fn fresh_postgres_database(name: &str) -> String {
    use sqlx::Connection;

    let admin = postgres_url();
    let mut conn = sqlx::PgConnection::connect(&admin)
        .await
        .expect("connecting to PostgreSQL");
    let db = format!("{name}_{}", std::process::id());
    sqlx::query(&format!("DROP DATABASE IF EXISTS {db}"))
        .execute(&mut conn)
        .await
        .unwrap();
    sqlx::query(&format!("CREATE DATABASE {db}"))
        .execute(&mut conn)
        .await
        .unwrap();
    let base = admin.rsplit_once('/').unwrap().0;
    format!("{base}/{db}")
}

/// Checks that a Debian tool the tests drive is installed, naming the fix when it is not.
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

pub fn telemon(data_dir: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("--data-dir")
        .arg(data_dir)
        .args(args)
        .output()
        .expect("running telemon")
}

/// `telemon up` running as a child process; killed when dropped.
pub struct Up {
    pub child: Child,
    pub data_dir: PathBuf,
    pub mqtt_port: u16,
    pub http: String,
    pub token: String,
    pub log: Arc<Mutex<Vec<String>>>,
}

impl Up {
    pub fn start(dir: &Path, database_url: Option<&str>, extra: &[&str]) -> Up {
        let rules = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/rules.toml");
        Up::start_with_rules(dir, database_url, &rules, extra)
    }

    /// Like [`Up::start`] with another rules file. A ready file left by an earlier run in
    /// the same directory is removed first, so a restart waits for the new process.
    pub fn start_with_rules(
        dir: &Path,
        database_url: Option<&str>,
        rules: &Path,
        extra: &[&str],
    ) -> Up {
        let data_dir = dir.join("data");
        let ready = dir.join("ready.json");
        let _ = std::fs::remove_file(&ready);
        let mut cmd = Command::new(BIN);
        cmd.arg("--data-dir").arg(&data_dir);
        match database_url {
            Some(url) => cmd.env("DATABASE_URL", url),
            None => cmd.env_remove("DATABASE_URL"),
        };
        cmd.args([
            "up",
            "--mqtt-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ])
        .arg("--rules")
        .arg(rules)
        .arg("--ready-file")
        .arg(&ready)
        .args(extra)
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("starting telemon up");
        let log = Arc::new(Mutex::new(Vec::new()));
        for pipe in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    log.lock().unwrap().push(line);
                }
            });
        }

        let deadline = Instant::now() + Duration::from_secs(60);
        while !ready.exists() {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "telemon up exited with {status}:\n{}",
                    log.lock().unwrap().join("\n")
                );
            }
            assert!(Instant::now() < deadline, "telemon up not ready in 60 s");
            std::thread::sleep(Duration::from_millis(50));
        }
        let ready: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&ready).unwrap()).unwrap();
        let mqtt: std::net::SocketAddr = ready["mqtt"].as_str().unwrap().parse().unwrap();
        let token = std::fs::read_to_string(data_dir.join("admin.token")).unwrap();
        Up {
            child,
            data_dir,
            mqtt_port: mqtt.port(),
            http: format!("http://{}", ready["http"].as_str().unwrap()),
            token: token.trim().to_string(),
            log,
        }
    }

    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Issues a device certificate from this instance's CA into `<data>/devices`.
    pub fn issue(&self, device: &str) -> (PathBuf, PathBuf) {
        let out = self.data_dir.join("devices");
        let result = telemon(
            &self.data_dir,
            &["certs", "issue", device, "--out", out.to_str().unwrap()],
        );
        assert!(
            result.status.success(),
            "certs issue: {}",
            String::from_utf8_lossy(&result.stderr)
        );
        (
            out.join(format!("{device}.crt")),
            out.join(format!("{device}.key")),
        )
    }

    pub fn ca(&self) -> PathBuf {
        self.data_dir.join("certs/ca.crt")
    }

    /// Publishes with Debian's mosquitto_pub; returns whether it succeeded, and its stderr.
    pub fn mosquitto_pub(
        &self,
        cert: Option<(&Path, &Path)>,
        topic: &str,
        payload: &str,
    ) -> (bool, String) {
        let mut cmd = Command::new("mosquitto_pub");
        cmd.args([
            "-h",
            "127.0.0.1",
            "-p",
            &self.mqtt_port.to_string(),
            "-q",
            "1",
        ])
        .arg("--cafile")
        .arg(self.ca())
        .args(["-t", topic, "-m", payload]);
        if let Some((crt, key)) = cert {
            cmd.arg("--cert").arg(crt).arg("--key").arg(key);
        }
        let out = cmd.output().expect("running mosquitto_pub");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Publishes each line of `lines` as one message over one connection (`mosquitto_pub
    /// -l`), as fast as the broker takes them; returns whether it succeeded, and its stderr.
    pub fn mosquitto_pub_lines(
        &self,
        (crt, key): (&Path, &Path),
        topic: &str,
        lines: &str,
    ) -> (bool, String) {
        let mut child = Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &self.mqtt_port.to_string()])
            .args(["-q", "1", "-l", "-t", topic])
            .arg("--cafile")
            .arg(self.ca())
            .arg("--cert")
            .arg(crt)
            .arg("--key")
            .arg(key)
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("running mosquitto_pub");
        let mut stdin = child.stdin.take().expect("mosquitto_pub stdin");
        stdin.write_all(lines.as_bytes()).expect("writing lines");
        drop(stdin);
        let out = child.wait_with_output().expect("waiting for mosquitto_pub");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Sends SIGINT (Ctrl-C) and waits for a clean exit.
    pub fn stop(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-INT", &pid]).status().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "telemon up did not stop within 30 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `check` until it returns Some, or fails after `within`.
pub async fn eventually<T, F, Fut>(what: &str, within: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not seen within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Collects the lines of a Server-Sent Events stream in the background.
pub async fn sse_lines(url: &str, token: &str) -> Arc<Mutex<Vec<String>>> {
    let response = reqwest::Client::new()
        .get(url)
        .bearer_auth(token)
        .send()
        .await
        .expect("connecting to the stream");
    assert_eq!(response.status(), 200, "stream refused");
    let lines = Arc::new(Mutex::new(Vec::new()));
    let sink = lines.clone();
    tokio::spawn(async move {
        use futures::StreamExt;
        let mut body = response.bytes_stream();
        let mut buf = String::new();
        while let Some(Ok(chunk)) = body.next().await {
            buf.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(i) = buf.find('\n') {
                let line: String = buf.drain(..=i).collect();
                sink.lock().unwrap().push(line.trim_end().to_string());
            }
        }
    });
    lines
}
