//! The dashboard in real headless Chromium (Debian's, driven by playwright-core from
//! tests/browser): log in, watch a patient's values update, acknowledge an alert, and be
//! refused another clinician's patient. Screenshots land in tests/browser/artifacts/.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{require_tool, TempDir, Up};
use serde_json::json;

async fn admin(
    up: &Up,
    http: &reqwest::Client,
    method: reqwest::Method,
    path: &str,
    body: serde_json::Value,
) {
    let resp = http
        .request(method.clone(), format!("{}{path}", up.http))
        .bearer_auth(&up.token)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert!(
        resp.status().is_success(),
        "{method} {path}: {}",
        resp.status()
    );
}

/// One message with Debian's mosquitto_pub, as the device whose certificate and key are given.
fn publish(port: &str, ca: &Path, (cert, key): &(PathBuf, PathBuf), topic: &str, payload: &str) {
    let status = Command::new("mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            port,
            "-q",
            "1",
            "-t",
            topic,
            "-m",
            payload,
        ])
        .arg("--cafile")
        .arg(ca)
        .arg("--cert")
        .arg(cert)
        .arg("--key")
        .arg(key)
        .status();
    assert!(
        status.is_ok_and(|s| s.success()),
        "mosquitto_pub to {topic} failed"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_dashboard_in_chromium() {
    require_tool("mosquitto_pub");
    assert!(
        Path::new("/usr/bin/chromium").exists(),
        "/usr/bin/chromium is missing: run scripts/test.sh, which installs Debian's chromium"
    );
    let browser_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
    assert!(
        browser_dir.join("node_modules/playwright-core").exists(),
        "playwright-core is missing: run scripts/test.sh (npm ci in tests/browser)"
    );

    let dir = TempDir::new("browser");
    let up = Up::start(dir.path(), None, &[]);
    let http = reqwest::Client::new();
    use reqwest::Method;
    for (user, patient, device) in [("ann", "p1", "bed-1"), ("bob", "p2", "bed-2")] {
        let user_body = json!({ "name": user, "password": "password-1", "role": "clinician" });
        admin(&up, &http, Method::POST, "/api/v1/users", user_body).await;
        let patient_body = json!({ "name": format!("Patient {patient}"), "ward": "A" });
        admin(
            &up,
            &http,
            Method::PUT,
            &format!("/api/v1/patients/{patient}"),
            patient_body,
        )
        .await;
        let attach = format!("/api/v1/patients/{patient}/devices/{device}");
        admin(&up, &http, Method::PUT, &attach, json!(null)).await;
        let assign = format!("/api/v1/users/{user}/patients/{patient}");
        admin(&up, &http, Method::PUT, &assign, json!(null)).await;
    }

    // Both monitors publish while the browser watches: p1's pulse is above the fixture
    // rule's 120 limit, so it also raises the alert to acknowledge.
    let (bed1, bed2) = (up.issue("bed-1"), up.issue("bed-2"));
    let stop = Arc::new(AtomicBool::new(false));
    let (port, ca) = (up.mqtt_port.to_string(), up.ca());
    let publisher = std::thread::spawn({
        let stop = stop.clone();
        move || {
            for i in 0..600 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let p1 = format!(
                    r#"{{"heart_rate": {}, "spo2": 95, "respiratory_rate": 18}}"#,
                    130 + i % 7
                );
                publish(&port, &ca, &bed1, "devices/bed-1/telemetry", &p1);
                let p2 = format!(r#"{{"heart_rate": {}}}"#, 70 + i % 5);
                publish(&port, &ca, &bed2, "devices/bed-2/telemetry", &p2);
                std::thread::sleep(Duration::from_millis(300));
            }
        }
    });

    let out = Command::new("node")
        .arg("dashboard.mjs")
        .current_dir(&browser_dir)
        .env("TELEMON_URL", &up.http)
        .env("ARTIFACTS", browser_dir.join("artifacts"))
        .output()
        .expect("running node");
    stop.store(true, Ordering::Relaxed);
    let _ = publisher.join();
    assert!(
        out.status.success(),
        "browser test failed:\n{}\n{}\n--- telemon log ---\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        up.log_text()
    );
}
