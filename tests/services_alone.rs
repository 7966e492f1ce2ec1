//! Alerts and the API each running alone, against Debian's Mosquitto and a shared store:
//! the path past one process that DESIGN.md describes.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{eventually, sse_lines, TempDir, BIN};

const WITHIN: Duration = Duration::from_secs(20);

/// A child process killed when the test ends, however it ends.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn mosquitto(dir: &Path, port: u16) -> Killed {
    assert!(
        Path::new("/usr/sbin/mosquitto").is_file(),
        "/usr/sbin/mosquitto is missing: run scripts/test.sh (it installs mosquitto)"
    );
    let config = dir.join("mosquitto.conf");
    std::fs::write(
        &config,
        format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nuser root\n"),
    )
    .unwrap();
    let child = Command::new("/usr/sbin/mosquitto")
        .arg("-c")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting mosquitto");
    Killed(child)
}

fn telemon(data_dir: &Path, args: &[&str]) -> Killed {
    let child = Command::new(BIN)
        .arg("--data-dir")
        .arg(data_dir)
        .args(args)
        .env_remove("DATABASE_URL")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting telemon");
    Killed(child)
}

#[tokio::test(flavor = "multi_thread")]
async fn alerts_and_api_run_alone_against_mosquitto() {
    common::require_tool("mosquitto_pub");
    let dir = TempDir::new("services-alone");
    let data = dir.path().join("data");
    let port = common::free_port();
    let _broker = mosquitto(dir.path(), port);
    let url = format!("mqtt://127.0.0.1:{port}");
    let rules = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/rules.toml");

    // Both share one data directory: the SQLite store, and the API's admin token.
    let ready = dir.path().join("api.json");
    let _api = telemon(
        &data,
        &[
            "api",
            "--broker-url",
            &url,
            "--http-listen",
            "127.0.0.1:0",
            "--ready-file",
            ready.to_str().unwrap(),
        ],
    );
    let http = eventually("the API ready", WITHIN, || async {
        let text = std::fs::read_to_string(&ready).ok()?;
        let json: serde_json::Value = serde_json::from_str(&text).ok()?;
        Some(format!("http://{}", json["http"].as_str()?))
    })
    .await;
    let token = std::fs::read_to_string(data.join("admin.token"))
        .unwrap()
        .trim()
        .to_string();
    let _alerts = telemon(
        &data,
        &[
            "alerts",
            "--broker-url",
            &url,
            "--rules",
            rules.to_str().unwrap(),
        ],
    );
    let stream = sse_lines(&format!("{http}/api/v1/stream"), &token).await;

    // Publish until the alert shows: the alerts process may still be subscribing.
    let client = reqwest::Client::new();
    let alerts = eventually(
        "the alert, stored by alerts and served by the API",
        WITHIN,
        || {
            let client = client.clone();
            let (http, token) = (http.clone(), token.clone());
            async move {
                let status = Command::new("mosquitto_pub")
                    .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-q", "1"])
                    .args([
                        "-t",
                        "devices/bed-1/telemetry",
                        "-m",
                        r#"{"heart_rate": 150}"#,
                    ])
                    .status()
                    .ok()?;
                assert!(status.success(), "mosquitto_pub failed");
                let response = client
                    .get(format!("{http}/api/v1/alerts?active=true"))
                    .bearer_auth(&token)
                    .send()
                    .await
                    .ok()?;
                let body: serde_json::Value = response.json().await.ok()?;
                (body.as_array()?.len() == 1).then_some(body)
            }
        },
    )
    .await;
    assert_eq!(alerts[0]["rule"], "hr-high");
    assert_eq!(alerts[0]["subject"], "bed-1");
    assert_eq!(alerts[0]["state"], "firing");

    eventually("reading and alert on the API's stream", WITHIN, || async {
        let lines = stream.lock().unwrap();
        let reading = lines.iter().any(|l| l.contains(r#""metric":"heart_rate""#));
        let alert = lines.iter().any(|l| l.contains(r#""rule":"hr-high""#));
        (reading && alert).then_some(())
    })
    .await;
}
