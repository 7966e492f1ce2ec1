//! The API in-process on a real socket, with a SQLite store and a feed fed by the test:
//! logins, the access filter on every endpoint and stream, and stream clients' clean-up.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use futures::StreamExt;
use serde_json::{json, Value};
use telemon_dashboard_api::live::{Live, LiveData};
use telemon_dashboard_api::{AppState, Auth};
use telemon_model::health::Health;
use telemon_model::{AlertEvent, AlertState, DeviceId, Priority, Reading};
use telemon_store::Store;

const ADMIN: &str = "bootstrap-admin-token";

struct Server {
    url: String,
    state: AppState,
    http: reqwest::Client,
    _dir: TempDir,
}

struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn serve() -> Server {
    let nanos = Utc::now().timestamp_nanos_opt().unwrap_or_default();
    let dir = std::env::temp_dir().join(format!("telemon-api-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let store = Store::connect(&format!("sqlite:{}/t.db", dir.display()))
        .await
        .unwrap();
    store.migrate().await.unwrap();
    let state = AppState {
        store,
        health: Health::default(),
        auth: Arc::new(Auth::new(ADMIN.into())),
        live: Live::detached(),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(telemon_dashboard_api::serve(listener, state.clone()));
    Server {
        url: format!("http://{addr}"),
        state,
        http: reqwest::Client::new(),
        _dir: TempDir(dir),
    }
}

impl Server {
    async fn call(
        &self,
        method: &str,
        path: &str,
        token: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(token);
        if let Some(body) = body {
            req = req.json(&body);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    async fn admin(&self, method: &str, path: &str, body: Option<Value>) -> u16 {
        let (status, body) = self.call(method, path, ADMIN, body).await;
        assert!(status < 300, "{method} {path}: {status} {body}");
        status
    }

    async fn login(&self, user: &str, password: &str) -> (u16, Value) {
        let resp = self
            .http
            .post(format!("{}/api/v1/login", self.url))
            .json(&json!({ "user": user, "password": password }))
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    /// Two clinicians, each with one patient monitored by one device.
    async fn ward(&self) -> (String, String) {
        for (user, patient, device) in [("ann", "p1", "bed-1"), ("bob", "p2", "bed-2")] {
            let user_body = json!({ "name": user, "password": "password-1", "role": "clinician" });
            self.admin("POST", "/api/v1/users", Some(user_body)).await;
            let patient_body = json!({ "name": format!("Patient {patient}"), "ward": "A" });
            self.admin(
                "PUT",
                &format!("/api/v1/patients/{patient}"),
                Some(patient_body),
            )
            .await;
            self.admin(
                "PUT",
                &format!("/api/v1/patients/{patient}/devices/{device}"),
                None,
            )
            .await;
            self.admin(
                "PUT",
                &format!("/api/v1/users/{user}/patients/{patient}"),
                None,
            )
            .await;
        }
        let ann = self.login("ann", "password-1").await.1["token"]
            .as_str()
            .unwrap()
            .to_string();
        let bob = self.login("bob", "password-1").await.1["token"]
            .as_str()
            .unwrap()
            .to_string();
        (ann, bob)
    }

    fn publish_reading(&self, device: &str, value: f64) {
        let reading = Reading {
            device_id: DeviceId::new(device).unwrap(),
            metric: "heart_rate".into(),
            time: Utc::now(),
            value: telemon_model::Value::Number(value),
            unit: None,
        };
        self.state.live.publish(LiveData::Reading(reading));
    }

    fn publish_alert(&self, subject: &str) {
        let alert = AlertEvent {
            id: format!("alert-{subject}"),
            rule: "hr-high".into(),
            subject: subject.into(),
            priority: Priority::High,
            state: AlertState::Firing,
            metric: Some("heart_rate".into()),
            value: Some(150.0),
            message: "heart rate high".into(),
            started_at: Utc::now(),
            updated_at: Utc::now(),
            acknowledged_by: None,
            acknowledged_at: None,
        };
        self.state.live.publish(LiveData::Alert(alert));
    }

    /// Opens the WebSocket stream with `query` (then the token) as the given caller.
    async fn websocket(&self, query: &str, token: &str) -> Ws {
        let sep = if query.is_empty() { "" } else { "&" };
        let url = format!(
            "{}/api/v1/ws?{query}{sep}access_token={token}",
            self.url.replace("http", "ws")
        );
        tokio_tungstenite::connect_async(url).await.unwrap().0
    }

    async fn wait_for_clients(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.state.live.clients() != n {
            assert!(
                Instant::now() < deadline,
                "stream clients stayed at {}, expected {n}",
                self.state.live.clients()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[tokio::test]
async fn logins_issue_expiring_sessions_that_logout_ends() {
    let server = serve().await;
    let (ann, _) = server.ward().await;
    assert!(ann.starts_with("tms_"));

    let (status, me) = server.call("GET", "/api/v1/me", &ann, None).await;
    assert_eq!((status, me["role"].as_str()), (200, Some("clinician")));
    assert_eq!(server.login("ann", "wrong-password").await.0, 401);
    assert_eq!(server.login("nobody", "password-1").await.0, 401);

    server.admin("POST", "/api/v1/logout", None).await;
    let (status, _) = server.call("POST", "/api/v1/logout", &ann, None).await;
    assert_eq!(status, 204);
    assert_eq!(server.call("GET", "/api/v1/me", &ann, None).await.0, 401);
}

#[tokio::test]
async fn repeated_failed_logins_are_refused_for_a_while() {
    let server = serve().await;
    server.ward().await;
    for _ in 0..5 {
        assert_eq!(server.login("ann", "guess").await.0, 401);
    }
    // Even the right password waits: the guesser must not learn it was right.
    assert_eq!(server.login("ann", "password-1").await.0, 429);
    assert_eq!(server.login("bob", "password-1").await.0, 200);
}

#[tokio::test]
async fn a_clinician_sees_only_assigned_patients_on_every_endpoint() {
    let server = serve().await;
    let (ann, _) = server.ward().await;
    let now = Utc::now();
    for device in ["bed-1", "bed-2"] {
        let reading = Reading {
            device_id: DeviceId::new(device).unwrap(),
            metric: "heart_rate".into(),
            time: now,
            value: telemon_model::Value::Number(72.0),
            unit: None,
        };
        server
            .state
            .store
            .insert_readings(&[reading], now)
            .await
            .unwrap();
    }

    let (_, devices) = server.call("GET", "/api/v1/devices", &ann, None).await;
    assert_eq!(devices.as_array().unwrap().len(), 1);
    assert_eq!(devices[0]["id"], "bed-1");
    let (_, patients) = server.call("GET", "/api/v1/patients", &ann, None).await;
    assert_eq!(patients.as_array().unwrap().len(), 1);
    for path in [
        "/api/v1/devices/bed-1/latest",
        "/api/v1/devices/bed-1/readings",
        "/api/v1/patients/p1",
        "/api/v1/patients/p1/latest",
    ] {
        assert_eq!(server.call("GET", path, &ann, None).await.0, 200, "{path}");
    }
    for path in [
        "/api/v1/devices/bed-2/latest",
        "/api/v1/devices/bed-2/readings",
        "/api/v1/patients/p2",
        "/api/v1/patients/p2/latest",
        "/api/v1/patients/nobody",
    ] {
        assert_eq!(server.call("GET", path, &ann, None).await.0, 404, "{path}");
    }
    for path in ["/api/v1/audit", "/api/v1/users", "/api/v1/dead-letters"] {
        assert_eq!(server.call("GET", path, &ann, None).await.0, 403, "{path}");
    }

    let (status, audit) = server
        .call("GET", "/api/v1/audit?actor=ann", ADMIN, None)
        .await;
    assert_eq!(status, 200);
    let targets: Vec<&str> = audit
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["target"].as_str())
        .collect();
    assert!(
        targets.contains(&"bed-1") && targets.contains(&"p1"),
        "{audit}"
    );
    assert!(
        !targets.contains(&"p2"),
        "refused views are not views: {audit}"
    );
}

#[tokio::test]
async fn integration_and_device_tokens_have_their_own_scope() {
    let server = serve().await;
    server.ward().await;
    let (status, created) = server
        .call(
            "POST",
            "/api/v1/tokens",
            ADMIN,
            Some(json!({ "name": "bed-2-token", "device": "bed-2" })),
        )
        .await;
    assert_eq!(status, 201);
    let device_token = created["token"].as_str().unwrap().to_string();
    let (_, integration) = server
        .call(
            "POST",
            "/api/v1/tokens",
            ADMIN,
            Some(json!({ "name": "ehr", "role": "admin" })),
        )
        .await;
    let integration = integration["token"].as_str().unwrap().to_string();

    let (_, devices) = server
        .call("GET", "/api/v1/devices/bed-2/latest", &device_token, None)
        .await;
    assert!(devices.is_array());
    assert_eq!(
        server
            .call("GET", "/api/v1/devices/bed-1/latest", &device_token, None)
            .await
            .0,
        404
    );
    assert_eq!(
        server
            .call("GET", "/api/v1/users", &integration, None)
            .await
            .0,
        200
    );
    let (status, _) = server
        .call("POST", "/api/v1/logout", &device_token, None)
        .await;
    assert_eq!(
        status, 204,
        "a token has no session to end, and stays valid"
    );
    assert_eq!(
        server
            .call("GET", "/api/v1/me", &device_token, None)
            .await
            .0,
        200
    );
}

/// Reads SSE events (name, data) until `n` have arrived.
async fn sse_events(
    http: reqwest::Client,
    url: String,
    token: String,
    n: usize,
) -> Vec<(String, Value)> {
    let resp = http
        .get(format!("{url}/api/v1/stream"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    sse_blocks(resp, n)
        .await
        .into_iter()
        .map(|(event, _, data)| (event, serde_json::from_str(&data).unwrap_or(Value::Null)))
        .collect()
}

#[tokio::test]
async fn streams_carry_only_the_clinicians_patients() {
    let server = serve().await;
    let (ann, _) = server.ward().await;

    let baseline = server.state.live.clients();
    let sse = tokio::spawn(sse_events(
        server.http.clone(),
        server.url.clone(),
        ann.clone(),
        2,
    ));
    let mut ws = server.websocket("", &ann).await;
    server.wait_for_clients(baseline + 2).await;

    server.publish_reading("bed-2", 90.0);
    server.publish_alert("p2");
    server.publish_reading("bed-1", 80.0);
    server.publish_alert("p1");

    let events = sse.await.unwrap();
    assert_eq!(events[0].0, "reading");
    assert_eq!(events[0].1["device_id"], "bed-1");
    assert_eq!(events[1].0, "alert");
    assert_eq!(events[1].1["subject"], "p1");

    let mut seen = Vec::new();
    while seen.len() < 2 {
        let message = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("websocket message in time")
            .unwrap()
            .unwrap();
        if let tokio_tungstenite::tungstenite::Message::Text(text) = message {
            seen.push(serde_json::from_str::<Value>(text.as_str()).unwrap());
        }
    }
    assert_eq!(
        (
            seen[0]["type"].as_str(),
            seen[0]["data"]["device_id"].as_str()
        ),
        (Some("reading"), Some("bed-1"))
    );
    assert_eq!(
        (
            seen[1]["type"].as_str(),
            seen[1]["data"]["subject"].as_str()
        ),
        (Some("alert"), Some("p1"))
    );
    ws.close(None).await.unwrap();
    // The server completes the closing handshake instead of dropping the connection.
    let reply = tokio::time::timeout(Duration::from_secs(10), ws.next()).await;
    let reply = reply.expect("the server answers the close");
    assert!(
        matches!(
            reply,
            Some(Ok(tokio_tungstenite::tungstenite::Message::Close(_))) | None
        ),
        "{reply:?}"
    );
}

#[tokio::test]
async fn a_stream_filtered_by_an_unassigned_patient_carries_nothing_of_it() {
    let server = serve().await;
    let (ann, _) = server.ward().await;
    let mut ws = server.websocket("patient=p2,p1", &ann).await;
    server.wait_for_clients(1).await;
    server.publish_reading("bed-2", 90.0);
    server.publish_reading("bed-1", 81.0);
    let message = tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let value: Value = serde_json::from_str(message.to_text().unwrap()).unwrap();
    assert_eq!(value["data"]["device_id"], "bed-1");
}

#[tokio::test]
async fn closed_stream_clients_leave_nothing_behind() {
    let server = serve().await;
    let (ann, _) = server.ward().await;
    let baseline = server.state.live.clients();

    let mut sse = Vec::new();
    let mut ws = Vec::new();
    for i in 0..200 {
        if i % 2 == 0 {
            let resp = server
                .http
                .get(format!("{}/api/v1/stream", server.url))
                .bearer_auth(&ann)
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 200);
            sse.push(resp);
        } else {
            ws.push(server.websocket("", &ann).await);
        }
    }
    server.wait_for_clients(baseline + 200).await;
    let metrics = server
        .http
        .get(format!("{}/metrics", server.url))
        .send()
        .await
        .unwrap();
    let metrics = metrics.text().await.unwrap();
    assert!(
        metrics.contains(&format!("telemon_api_stream_clients {}", baseline + 200)),
        "{metrics}"
    );

    drop(sse);
    for mut socket in ws.drain(..).step_by(2) {
        socket.close(None).await.unwrap();
    }
    // The other half vanish without a close frame, as a crashed browser would; their
    // receivers go when the next event fails to send.
    server.publish_reading("bed-1", 70.0);
    server.wait_for_clients(baseline).await;
    let metrics = server
        .http
        .get(format!("{}/metrics", server.url))
        .send()
        .await
        .unwrap();
    let metrics = metrics.text().await.unwrap();
    assert!(
        metrics.contains(&format!("telemon_api_stream_clients {baseline}")),
        "{metrics}"
    );
}

#[tokio::test]
async fn the_openapi_document_lists_every_route() {
    let server = serve().await;
    let doc: Value = server
        .http
        .get(format!("{}/api/v1/openapi.json", server.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    for path in [
        "/api/v1/login",
        "/api/v1/devices/{id}/readings",
        "/api/v1/ws",
        "/api/v1/audit",
    ] {
        assert!(doc["paths"][path].is_object(), "{path} missing");
    }
    assert!(doc["components"]["securitySchemes"]["bearer"].is_object());
    let dashboard = server.http.get(&server.url).send().await.unwrap();
    assert_eq!(dashboard.status(), 200);
}

#[tokio::test]
async fn malformed_requests_get_the_json_error_body() {
    let server = serve().await;
    let bad_body = json!({ "name": "x", "spo2_scale": 1.5 });
    let (status, body) = server
        .call("PUT", "/api/v1/patients/p1", ADMIN, Some(bad_body))
        .await;
    assert_eq!(status, 400);
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("spo2_scale")),
        "{body}"
    );
    let (status, body) = server
        .call("GET", "/api/v1/alerts?limit=many", ADMIN, None)
        .await;
    assert_eq!(status, 400);
    assert!(body["error"].is_string(), "{body}");

    // Unknown paths and methods too.
    for (method, path, want) in [
        ("GET", "/api/v1/nonexistent", 404),
        ("GET", "/API/V1/STREAM", 404),
        ("DELETE", "/api/v1/me", 405),
    ] {
        let (status, body) = server.call(method, path, ADMIN, None).await;
        assert_eq!(status, want, "{method} {path}");
        assert!(body["error"].is_string(), "{method} {path}: {body}");
    }
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// The next JSON message of a WebSocket stream other than a heartbeat, if one comes in `wait`.
async fn next_message(ws: &mut Ws, wait: Duration) -> Option<Value> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let message = tokio::time::timeout_at(deadline, ws.next()).await.ok()??;
        if let Ok(tokio_tungstenite::tungstenite::Message::Text(text)) = message {
            let value: Value = serde_json::from_str(text.as_str()).unwrap();
            if value["type"] != "heartbeat" {
                return Some(value);
            }
        }
    }
}

/// Publishes a reading of `device` and then of `marker` until the marker arrives with nothing
/// of `device` before it (or, when `device` should now be seen, until it arrives): the scope
/// change is applied by the stream shortly after the API call that made it.
async fn settles(server: &Server, ws: &mut Ws, device: &str, marker: &str, seen: bool) -> bool {
    for round in 0..100 {
        server.publish_reading(device, 100.0 + round as f64);
        server.publish_reading(marker, 60.0);
        let mut got_device = false;
        while let Some(m) = next_message(ws, Duration::from_millis(200)).await {
            match m["data"]["device_id"].as_str() {
                Some(d) if d == device => got_device = true,
                Some(d) if d == marker => break,
                _ => {}
            }
        }
        if got_device == seen {
            return true;
        }
    }
    false
}

#[tokio::test]
async fn an_open_stream_follows_assignments_and_ends_with_its_session() {
    let server = serve().await;
    let (ann, _) = server.ward().await;
    let mut ws = server.websocket("kind=readings", &ann).await;
    server.wait_for_clients(1).await;

    // bed-2 monitors p2, bob's patient: nothing of it until ann is assigned p2 too.
    server.publish_reading("bed-2", 90.0);
    server.publish_reading("bed-1", 70.0);
    let first = next_message(&mut ws, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(
        first["data"]["device_id"], "bed-1",
        "bed-2 is not ann's yet"
    );

    server
        .admin("PUT", "/api/v1/users/ann/patients/p2", None)
        .await;
    assert!(
        settles(&server, &mut ws, "bed-2", "bed-1", true).await,
        "the open stream never gained p2's device"
    );

    server
        .admin("DELETE", "/api/v1/users/ann/patients/p2", None)
        .await;
    assert!(
        settles(&server, &mut ws, "bed-2", "bed-1", false).await,
        "the open stream kept p2's device after the assignment ended"
    );
    server.publish_reading("bed-2", 99.0);
    server.publish_reading("bed-1", 71.0);
    let after = next_message(&mut ws, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(after["data"]["device_id"], "bed-1");

    let (status, _) = server.call("POST", "/api/v1/logout", &ann, None).await;
    assert_eq!(status, 204);
    let end = next_message(&mut ws, Duration::from_secs(10)).await;
    assert_eq!(end.as_ref().map(|m| m["type"].clone()), Some(json!("end")));
    server.wait_for_clients(0).await;
}

/// The events of an SSE response body until `n` have come, as (event, id, data) text.
async fn sse_blocks(resp: reqwest::Response, n: usize) -> Vec<(String, String, String)> {
    let mut body = resp.bytes_stream();
    let mut text = String::new();
    let mut events = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while events.len() < n {
        let chunk = tokio::time::timeout_at(deadline, body.next())
            .await
            .expect("events in time")
            .expect("the stream stays open")
            .unwrap();
        text.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = text.find("\n\n") {
            let block: String = text.drain(..end + 2).collect();
            let field = |name: &str| {
                block
                    .lines()
                    .find_map(|l| l.strip_prefix(name).map(str::to_string))
                    .unwrap_or_default()
            };
            if !block.starts_with(':') {
                events.push((field("event: "), field("id: "), field("data: ")));
            }
        }
    }
    events
}

/// A stream request that opens a connection is written straight to the socket; one on a
/// connection that served another request first goes through axum. Both carry the same events
/// with the same headers, and both refuse a bad token the same way.
#[tokio::test]
async fn both_stream_paths_carry_the_same_events() {
    let server = serve().await;
    let (ann, _) = server.ward().await;
    let fresh = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let pooled = reqwest::Client::new();
    let stream_url = format!("{}/api/v1/stream", server.url);

    let direct = fresh
        .get(&stream_url)
        .bearer_auth(&ann)
        .send()
        .await
        .unwrap();
    let health = pooled.get(format!("{}/healthz", server.url)).send().await;
    health.unwrap().bytes().await.unwrap();
    let general = pooled
        .get(&stream_url)
        .bearer_auth(&ann)
        .send()
        .await
        .unwrap();
    // hyper stamps every response with a Date header; the direct path does not, which is how
    // this test knows that each path was taken.
    assert!(
        direct.headers().get("date").is_none(),
        "not served directly"
    );
    assert!(
        general.headers().get("date").is_some(),
        "not served by axum"
    );
    for resp in [&direct, &general] {
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["content-type"], "text/event-stream");
        assert_eq!(resp.headers()["cache-control"], "no-cache");
    }
    server.wait_for_clients(2).await;

    server.publish_reading("bed-2", 90.0);
    server.publish_reading("bed-1", 80.0);
    server.publish_alert("p1");
    let (direct, general) = tokio::join!(sse_blocks(direct, 2), sse_blocks(general, 2));
    assert_eq!(direct, general);
    assert_eq!(
        (direct[0].0.as_str(), direct[1].0.as_str()),
        ("reading", "alert")
    );
    let reading: Value = serde_json::from_str(&direct[0].2).unwrap();
    assert_eq!(reading["device_id"], "bed-1");

    // Resuming from before the first of them replays both, on either path.
    let before: u64 = direct[0].1.parse::<u64>().unwrap() - 1;
    for client in [&fresh, &pooled] {
        let resumed = client.get(&stream_url).bearer_auth(&ann);
        let resumed = resumed
            .header("last-event-id", before.to_string())
            .send()
            .await;
        assert_eq!(sse_blocks(resumed.unwrap(), 2).await, direct);
    }

    for client in [&fresh, &pooled] {
        let refused = client
            .get(&stream_url)
            .bearer_auth("tms_wrong")
            .send()
            .await;
        let refused = refused.unwrap();
        assert_eq!(refused.status(), 401);
        let body: Value = refused.json().await.unwrap();
        assert!(body["error"].is_string(), "{body}");
    }
    server.wait_for_clients(0).await;
}
