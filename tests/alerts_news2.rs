//! End to end, with real processes: a patient monitored through `telemon up` deteriorates
//! (readings published with mosquitto_pub through the mTLS edge, one simulated minute per
//! message, with explicit `ts`), the NEWS2 alert reaches an SSE client of /api/v1/stream
//! and a webhook (its signature checked with openssl), is acknowledged through the API,
//! survives a restart of `telemon up` under the same id without firing again, and resolves
//! when the patient recovers.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{eventually, sse_lines, TempDir, Up};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WITHIN: Duration = Duration::from_secs(30);
const SECRET: &str = "ward-7-secret";
const PATIENT: &str = "p-news2";
const DEVICE: &str = "bed-n2";

/// What the webhook receiver got: the signature header and the body of each request.
type Requests = Arc<Mutex<Vec<(Option<String>, Vec<u8>)>>>;

/// A plain HTTP/1.1 receiver on 127.0.0.1:0 that answers 200 to every request.
async fn webhook_receiver() -> (String, Requests) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let requests: Requests = Arc::default();
    let sink = requests.clone();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            tokio::spawn(serve(socket, sink.clone()));
        }
    });
    (url, requests)
}

/// Serves the requests of one connection (keep-alive) until the client closes it.
async fn serve(mut socket: tokio::net::TcpStream, sink: Requests) -> std::io::Result<()> {
    let mut buf = Vec::new();
    let mut chunk = [0_u8; 8192];
    loop {
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let n = socket.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        let header = |name: &str| {
            head.lines().find_map(|line| {
                let (key, value) = line.split_once(':')?;
                key.eq_ignore_ascii_case(name)
                    .then(|| value.trim().to_string())
            })
        };
        let length: usize = header("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        while buf.len() < head_end + length {
            let n = socket.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        let body = buf[head_end..head_end + length].to_vec();
        buf.drain(..head_end + length);
        sink.lock()
            .unwrap()
            .push((header("x-telemon-signature"), body));
        socket
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
            .await?;
    }
}

/// HMAC-SHA256 of `body` in hex, computed by openssl: a check independent of telemon's code.
fn openssl_hmac(body: &[u8]) -> String {
    let mut child = Command::new("openssl")
        .args(["dgst", "-sha256", "-hmac", SECRET, "-r"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("running openssl");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(body).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "openssl failed");
    let text = String::from_utf8(out.stdout).unwrap();
    text.split_whitespace().next().unwrap().to_string()
}

/// The webhook's alert events, each with its signature verified.
fn webhook_alerts(requests: &Requests) -> Vec<Value> {
    let requests = requests.lock().unwrap();
    requests
        .iter()
        .map(|(signature, body)| {
            let expected = format!("sha256={}", openssl_hmac(body));
            assert_eq!(
                signature.as_deref(),
                Some(expected.as_str()),
                "bad signature"
            );
            serde_json::from_slice(body).unwrap()
        })
        .collect()
}

/// The alert events an SSE client has received so far.
fn stream_alerts(lines: &Mutex<Vec<String>>) -> Vec<Value> {
    let lines = lines.lock().unwrap();
    lines
        .iter()
        .filter_map(|l| l.strip_prefix("data:"))
        .filter_map(|d| serde_json::from_str::<Value>(d.trim()).ok())
        .filter(|v| v.get("rule").is_some())
        .collect()
}

fn find<'a>(alerts: &'a [Value], id: &str, state: &str) -> Vec<&'a Value> {
    alerts
        .iter()
        .filter(|a| a["id"] == id && a["state"] == state)
        .collect()
}

async fn call(up: &Up, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let mut request = reqwest::Client::new()
        .request(method, format!("{}{path}", up.http))
        .bearer_auth(&up.token);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let body = response.json().await.unwrap_or(Value::Null);
    (status, body)
}

/// Respiration, SpO2, systolic BP, pulse, temperature (on air, alert).
type Vitals = (f64, f64, f64, f64, f64);

fn publish(up: &Up, cert: (&Path, &Path), ts_ms: i64, v: Vitals) {
    let payload = json!({
        "ts": ts_ms,
        "respiratory_rate": v.0,
        "spo2": v.1,
        "supplemental_oxygen": false,
        "systolic_bp": v.2,
        "heart_rate": v.3,
        "consciousness": 0,
        "temperature": v.4,
    });
    let topic = format!("devices/{DEVICE}/telemetry");
    let (ok, err) = up.mosquitto_pub(Some(cert), &topic, &payload.to_string());
    assert!(ok, "mosquitto_pub: {err}");
}

fn now_ms() -> i64 {
    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    since.unwrap().as_millis() as i64
}

fn start(dir: &TempDir, config: &Path) -> Up {
    let rules =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/alerts-news2-rules.toml");
    Up::start_with_rules(
        dir.path(),
        None,
        &rules,
        &["--config", config.to_str().unwrap()],
    )
}

async fn log_has(up: &Up, needle: &str) {
    eventually(needle, WITHIN, || async {
        up.log_text().contains(needle).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deteriorating_patient_alerts_by_news2_is_acknowledged_survives_a_restart_and_resolves() {
    common::require_tool("mosquitto_pub");
    common::require_tool("openssl");
    let dir = TempDir::new("alerts-news2");
    let (hook_url, hook) = webhook_receiver().await;
    let config = dir.path().join("telemon.toml");
    let text = format!(
        "[[alerts.webhooks]]\nurl = \"{hook_url}\"\nsecret = \"{SECRET}\"\n\
         min_priority = \"medium\"\n"
    );
    std::fs::write(&config, text).unwrap();

    let up = start(&dir, &config);
    let (crt, key) = up.issue(DEVICE);
    let patient = json!({"name": "Ward 7, bed 2", "ward": "ward-7"});
    let (status, _) = call(
        &up,
        "PUT",
        &format!("/api/v1/patients/{PATIENT}"),
        Some(patient),
    )
    .await;
    assert_eq!(status, 200);
    let attach = format!("/api/v1/patients/{PATIENT}/devices/{DEVICE}");
    assert_eq!(call(&up, "PUT", &attach, None).await.0, 204);
    log_has(&up, "patient directory updated").await;
    let stream_url = format!("{}/api/v1/stream?kind=alerts", up.http);
    let stream = sse_lines(&stream_url, &up.token).await;

    // One simulated minute per message, ending now: breathing faster, saturating less,
    // pulse and temperature up, blood pressure down. Scores 0, 0, 4 (low risk), then 6.
    let start_ms = now_ms() - 10 * 60_000;
    let course: [Vitals; 4] = [
        (16.0, 97.0, 122.0, 78.0, 37.0),
        (19.0, 96.0, 118.0, 88.0, 37.4),
        (21.0, 95.0, 112.0, 92.0, 37.9),
        (23.0, 94.0, 108.0, 98.0, 38.2),
    ];
    for (minute, vitals) in course.into_iter().enumerate() {
        publish(&up, (&crt, &key), start_ms + minute as i64 * 60_000, vitals);
    }

    let fired = eventually("NEWS2 alert on the stream", WITHIN, || async {
        stream_alerts(&stream)
            .into_iter()
            .find(|a| a["state"] == "firing")
    })
    .await;
    assert_eq!(fired["rule"], "news2");
    assert_eq!(
        fired["subject"], PATIENT,
        "about the patient, not the device"
    );
    assert_eq!(fired["metric"], "news2");
    assert_eq!(fired["value"], 6.0, "aggregate 6: urgent");
    assert_eq!(fired["priority"], "medium");
    let id = fired["id"].as_str().unwrap().to_string();
    assert_eq!(
        stream_alerts(&stream).len(),
        1,
        "nothing before: a score of 4 is low risk"
    );
    eventually("the firing alert at the webhook", WITHIN, || async {
        let sent = webhook_alerts(&hook);
        (find(&sent, &id, "firing").len() == 1).then_some(())
    })
    .await;

    // Acknowledged through the API once the alert is stored.
    let ack = format!("/api/v1/alerts/{id}/ack");
    eventually("acknowledgement accepted", WITHIN, || async {
        (call(&up, "POST", &ack, None).await.0 == 202).then_some(())
    })
    .await;
    let acknowledged = eventually("acknowledged on the stream", WITHIN, || async {
        let seen = stream_alerts(&stream);
        find(&seen, &id, "acknowledged")
            .first()
            .map(|a| (*a).clone())
    })
    .await;
    assert!(acknowledged["acknowledged_by"].is_string());
    eventually("acknowledged at the webhook", WITHIN, || async {
        (find(&webhook_alerts(&hook), &id, "acknowledged").len() == 1).then_some(())
    })
    .await;
    let stored = format!("/api/v1/alerts/{id}");
    eventually("acknowledgement stored", WITHIN, || async {
        (call(&up, "GET", &stored, None).await.1["state"] == "acknowledged").then_some(())
    })
    .await;

    // A restart resumes the alert from storage: same id, still acknowledged, not fired again.
    assert!(up.stop().success(), "telemon up did not stop cleanly");
    let up = start(&dir, &config);
    let (status, active) = call(&up, "GET", "/api/v1/alerts?active=true", None).await;
    assert_eq!(status, 200);
    let active = active.as_array().unwrap();
    assert_eq!(active.len(), 1, "{active:?}");
    assert_eq!(
        (active[0]["id"].as_str(), active[0]["state"].as_str()),
        (Some(id.as_str()), Some("acknowledged"))
    );
    let stream_url = format!("{}/api/v1/stream?kind=alerts", up.http);
    let stream = sse_lines(&stream_url, &up.token).await;

    // The patient recovers: the same alert resolves, everywhere.
    publish(&up, (&crt, &key), now_ms(), (16.0, 97.0, 122.0, 76.0, 37.0));
    let resolved = eventually("resolved on the stream", WITHIN, || async {
        let seen = stream_alerts(&stream);
        seen.into_iter().find(|a| a["state"] == "resolved")
    })
    .await;
    assert_eq!(resolved["id"], id.as_str(), "resolved under its own id");
    eventually("resolved at the webhook", WITHIN, || async {
        (find(&webhook_alerts(&hook), &id, "resolved").len() == 1).then_some(())
    })
    .await;
    let seen = stream_alerts(&stream);
    assert!(
        seen.iter().all(|a| a["state"] != "firing"),
        "fired again after the restart: {seen:?}"
    );
    let sent = webhook_alerts(&hook);
    let states: Vec<&str> = sent.iter().filter_map(|a| a["state"].as_str()).collect();
    assert_eq!(states, ["firing", "acknowledged", "resolved"], "{sent:?}");
    assert!(sent.iter().all(|a| a["id"] == id.as_str()));
    drop(up);
}
