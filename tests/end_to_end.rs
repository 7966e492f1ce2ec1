//! The main job end to end: `telemon up` with real device traffic from Debian's
//! mosquitto_pub, read back through the API and the live stream, on SQLite and PostgreSQL.

mod common;

use std::time::Duration;

use common::{eventually, sse_lines, TempDir, Up};
use serde_json::Value;

/// Generous bounds: these tests check behaviour, not speed (benchmarks measure that).
const WITHIN: Duration = Duration::from_secs(15);

async fn get(up: &Up, path: &str, token: Option<&str>) -> (u16, Value) {
    let mut request = reqwest::Client::new().get(format!("{}{path}", up.http));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.expect("HTTP request");
    let status = response.status().as_u16();
    let body = response.json().await.unwrap_or(Value::Null);
    (status, body)
}

fn stream_has(lines: &std::sync::Mutex<Vec<String>>, event: &str, needle: &str) -> bool {
    let lines = lines.lock().unwrap();
    lines
        .windows(2)
        .any(|w| w[0] == format!("event: {event}") && w[1].contains(needle))
}

async fn main_job(database_url: Option<&str>) {
    common::require_tool("mosquitto_pub");
    let dir = TempDir::new("e2e");
    let up = Up::start(dir.path(), database_url, &[]);
    let token = up.token.clone();
    let (crt, key) = up.issue("bed-7");
    let device = Some((crt.as_path(), key.as_path()));

    let (status, health) = get(&up, "/healthz", None).await;
    assert_eq!(status, 200, "healthz: {health}");

    let stream = sse_lines(&format!("{}/api/v1/stream", up.http), &token).await;

    // A real client with an issued certificate publishes; the readings are stored, served
    // and streamed.
    let (ok, err) = up.mosquitto_pub(
        device,
        "devices/bed-7/telemetry",
        r#"{"heart_rate": 71, "spo2": 97}"#,
    );
    assert!(ok, "mosquitto_pub failed: {err}\n{}", up.log_text());
    let readings = eventually("stored readings", WITHIN, || async {
        let (_, body) = get(&up, "/api/v1/devices/bed-7/readings", Some(&token)).await;
        (body.as_array().map(|a| a.len()) == Some(2)).then_some(body)
    })
    .await;
    let value_of = |metric: &str| {
        readings
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["metric"] == metric)
            .unwrap()["value"]
            .as_f64()
    };
    assert_eq!(value_of("heart_rate"), Some(71.0));
    assert_eq!(value_of("spo2"), Some(97.0));
    eventually("readings on the stream", WITHIN, || async {
        (stream_has(&stream, "reading", r#""metric":"heart_rate""#)
            && stream_has(&stream, "reading", r#""metric":"spo2""#))
        .then_some(())
    })
    .await;

    // A burst of readings without timestamps, many received within one microsecond: each is
    // a different reading, none may be taken for a redelivery of another.
    let (crt8, key8) = up.issue("burst-1");
    // (A metric no rule watches, so that the alerts below are bed-7's alone.)
    let burst: String = (1..=200)
        .map(|v| format!("{{\"counter\": {v}}}\n"))
        .collect();
    let (ok, err) = up.mosquitto_pub_lines((&crt8, &key8), "devices/burst-1/telemetry", &burst);
    assert!(ok, "mosquitto_pub -l failed: {err}");
    let path = "/api/v1/devices/burst-1/readings?metric=counter&limit=1000";
    eventually("all 200 readings of the burst stored", WITHIN, || async {
        let (_, body) = get(&up, path, Some(&token)).await;
        (body.as_array().map(|a| a.len()) == Some(200)).then_some(())
    })
    .await;

    // Without a token, both endpoints refuse.
    for path in ["/api/v1/devices/bed-7/readings", "/api/v1/stream"] {
        let (status, _) = get(&up, path, None).await;
        assert_eq!(status, 401, "{path} without a token");
        let (status, _) = get(&up, path, Some("not-the-token")).await;
        assert_eq!(status, 401, "{path} with a wrong token");
    }

    // No certificate, or one from another CA: refused at the handshake.
    let (ok, _) = up.mosquitto_pub(None, "devices/bed-7/telemetry", r#"{"heart_rate": 1}"#);
    assert!(!ok, "a client without a certificate got in");
    let foreign = TempDir::new("foreign-ca");
    let out = foreign.path().join("out");
    let issued = common::telemon(
        foreign.path(),
        &["certs", "issue", "bed-7", "--out", out.to_str().unwrap()],
    );
    assert!(issued.status.success());
    let (fcrt, fkey) = (out.join("bed-7.crt"), out.join("bed-7.key"));
    let (ok, _) = up.mosquitto_pub(
        Some((&fcrt, &fkey)),
        "devices/bed-7/telemetry",
        r#"{"heart_rate": 2}"#,
    );
    assert!(!ok, "a certificate from another CA got in");

    // Bad input: not JSON, a non-numeric value, another device's topic. Each is refused with
    // a reason; the device's other readings are still stored.
    let (ok, _) = up.mosquitto_pub(device, "devices/bed-7/telemetry", "not json");
    assert!(ok, "the broker accepts the message; ingest refuses it");
    let (ok, _) = up.mosquitto_pub(
        device,
        "devices/bed-7/telemetry",
        r#"{"heart_rate": "fast", "respiratory_rate": 16}"#,
    );
    assert!(ok);
    let (ok, _) = up.mosquitto_pub(device, "devices/bed-8/telemetry", r#"{"heart_rate": 60}"#);
    assert!(
        !ok,
        "publishing to another device's topic must close the connection"
    );
    let letters = eventually("dead letters", WITHIN, || async {
        let (_, body) = get(&up, "/api/v1/dead-letters", Some(&token)).await;
        (body.as_array().map(|a| a.len()) == Some(2)).then_some(body)
    })
    .await;
    let reasons: Vec<&str> = letters
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["reason"].as_str().unwrap())
        .collect();
    assert!(reasons.contains(&"invalid_json"), "{reasons:?}");
    assert!(reasons.contains(&"not_a_number"), "{reasons:?}");
    eventually("the good field of a mixed message", WITHIN, || async {
        let (_, body) = get(
            &up,
            "/api/v1/devices/bed-7/readings?metric=respiratory_rate",
            Some(&token),
        )
        .await;
        (body.as_array().map(|a| a.len()) == Some(1)).then_some(())
    })
    .await;
    let (_, bed8) = get(&up, "/api/v1/devices/bed-8/readings", Some(&token)).await;
    assert_eq!(bed8, serde_json::json!([]), "bed-7 wrote into bed-8");
    let (_, metrics) = (
        0,
        reqwest::get(format!("{}/metrics", up.http))
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
    );
    assert!(
        metrics.contains(r#"telemon_ingest_dead_letters_total{reason="invalid_json"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"telemon_edge_acl_denied_total{action="publish"} 1"#),
        "{metrics}"
    );

    // A heart rate over the configured threshold raises an alert, on the stream and the API.
    let (ok, _) = up.mosquitto_pub(device, "devices/bed-7/telemetry", r#"{"heart_rate": 150}"#);
    assert!(ok);
    eventually("alert on the stream", WITHIN, || async {
        stream_has(&stream, "alert", r#""rule":"hr-high""#).then_some(())
    })
    .await;
    let alerts = eventually("alert in the API", WITHIN, || async {
        let (_, body) = get(&up, "/api/v1/alerts?active=true", Some(&token)).await;
        (body.as_array().map(|a| !a.is_empty()) == Some(true)).then_some(body)
    })
    .await;
    let alert = &alerts[0];
    assert_eq!(alert["rule"], "hr-high");
    assert_eq!(alert["subject"], "bed-7");
    assert_eq!(alert["state"], "firing");
    assert_eq!(alert["value"], 150.0);

    // Ctrl-C: a clean stop.
    let status = up.stop();
    assert!(status.success(), "telemon up exited with {status}");
}

#[tokio::test(flavor = "multi_thread")]
async fn main_job_on_sqlite() {
    main_job(None).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn main_job_on_postgresql() {
    let url = common::fresh_postgres_database("telemon_e2e").await;
    main_job(Some(&url)).await;
}
