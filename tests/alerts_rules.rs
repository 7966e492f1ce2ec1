//! Rules through the API against a running `telemon up`: the merged set with sources, admin
//! writes validated and audited, a file rule disabled by an API rule, a new API rule in
//! force without a restart, and deleting the API rule bringing the file rule back.

mod common;

use std::time::Duration;

use common::{eventually, sse_lines, TempDir, Up};
use serde_json::{json, Value};

const WITHIN: Duration = Duration::from_secs(30);

async fn call(up: &Up, token: &str, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let mut request = reqwest::Client::new()
        .request(method, format!("{}{path}", up.http))
        .bearer_auth(token);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

fn has_alert(lines: &std::sync::Mutex<Vec<String>>, rule: &str) -> bool {
    let needle = format!(r#""rule":"{rule}""#);
    lines.lock().unwrap().iter().any(|l| l.contains(&needle))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_are_listed_changed_disabled_and_restored_through_the_api() {
    common::require_tool("mosquitto_pub");
    let dir = TempDir::new("alerts-rules");
    let up = Up::start(dir.path(), None, &[]);
    let admin = up.token.clone();

    // The file rules, as the alerts service mirrors them.
    let listed = eventually("file rules listed", WITHIN, || async {
        let (_, rules) = call(&up, &admin, "GET", "/api/v1/rules", None).await;
        rules.as_array().filter(|r| !r.is_empty()).cloned()
    })
    .await;
    assert_eq!(listed[0]["id"], "hr-high");
    assert_eq!(listed[0]["source"], "file");

    // Any authenticated principal reads; only admins write.
    let viewer = json!({"name": "wall-display", "role": "viewer"});
    let (status, created) = call(&up, &admin, "POST", "/api/v1/tokens", Some(viewer)).await;
    assert_eq!(status, 201);
    let viewer = created["token"].as_str().unwrap();
    assert_eq!(
        call(&up, viewer, "GET", "/api/v1/rules/hr-high", None)
            .await
            .0,
        200
    );
    let spo2_low = json!({
        "name": "SpO2 low", "priority": "high",
        "kind": {"type": "threshold", "metric": "spo2", "below": 90, "clear_below": 92}
    });
    assert_eq!(
        call(
            &up,
            viewer,
            "PUT",
            "/api/v1/rules/spo2-low",
            Some(spo2_low.clone())
        )
        .await
        .0,
        403
    );
    let no_limit = json!({"priority": "low", "kind": {"type": "threshold", "metric": "spo2"}});
    let (status, refused) = call(&up, &admin, "PUT", "/api/v1/rules/x", Some(no_limit)).await;
    assert_eq!(status, 400);
    assert!(
        refused["error"].as_str().unwrap().contains("rule \"x\""),
        "{refused}"
    );

    // Disable the file rule, then add a new one: any refresh that sees the new rule sees the
    // disabled one too.
    let mut disabled = listed[0]["rule"].clone();
    disabled["enabled"] = false.into();
    let (status, view) = call(&up, &admin, "PUT", "/api/v1/rules/hr-high", Some(disabled)).await;
    assert_eq!(status, 201, "a new API rule over the file rule: {view}");
    assert_eq!(view["overrides_file"], true);
    let (status, created) = call(
        &up,
        &admin,
        "PUT",
        "/api/v1/rules/spo2-low",
        Some(spo2_low.clone()),
    )
    .await;
    assert_eq!((status, created["source"].as_str()), (201, Some("api")));
    assert_eq!(
        call(
            &up,
            &admin,
            "PUT",
            "/api/v1/rules/spo2-low",
            Some(spo2_low.clone())
        )
        .await
        .0,
        200,
        "replaced"
    );

    // In force without a restart: SpO2 alerts, the disabled heart-rate rule stays quiet.
    let stream = sse_lines(&format!("{}/api/v1/stream?kind=alerts", up.http), &admin).await;
    let (crt, key) = up.issue("bed-r");
    eventually("the API rule alerts", WITHIN, || async {
        let payload = r#"{"spo2": 85}"#;
        let (ok, err) = up.mosquitto_pub(Some((&crt, &key)), "devices/bed-r/telemetry", payload);
        if !ok {
            // Seen once on a loaded machine right after the certificate was issued: publish
            // again rather than fail a test about rules on a connection drop.
            eprintln!("mosquitto_pub failed, publishing again: {err}");
        }
        has_alert(&stream, "spo2-low").then_some(())
    })
    .await;
    for _ in 0..3 {
        let payload = r#"{"heart_rate": 150}"#;
        let (ok, err) = up.mosquitto_pub(Some((&crt, &key)), "devices/bed-r/telemetry", payload);
        assert!(ok, "{err}");
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!has_alert(&stream, "hr-high"), "a disabled rule alerted");

    // Deleting the API rule brings the file rule back.
    assert_eq!(
        call(&up, &admin, "DELETE", "/api/v1/rules/hr-high", None)
            .await
            .0,
        204
    );
    assert_eq!(
        call(&up, &admin, "DELETE", "/api/v1/rules/hr-high", None)
            .await
            .0,
        404
    );
    let (_, back) = call(&up, &admin, "GET", "/api/v1/rules/hr-high", None).await;
    assert_eq!(
        (back["source"].as_str(), back["rule"]["enabled"].as_bool()),
        (Some("file"), Some(true))
    );
    eventually("the file rule alerts again", WITHIN, || async {
        let payload = r#"{"heart_rate": 151}"#;
        let (ok, err) = up.mosquitto_pub(Some((&crt, &key)), "devices/bed-r/telemetry", payload);
        assert!(ok, "{err}");
        has_alert(&stream, "hr-high").then_some(())
    })
    .await;

    let (_, audit) = call(&up, &admin, "GET", "/api/v1/audit", None).await;
    let actions: Vec<&str> = audit
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["action"].as_str())
        .collect();
    assert!(
        actions.contains(&"put rule") && actions.contains(&"delete rule"),
        "{actions:?}"
    );
    let (_, doc) = call(&up, &admin, "GET", "/api/v1/openapi.json", None).await;
    assert!(doc["paths"]["/api/v1/rules/{id}"]["put"].is_object());
}
