//! The alerts service against a real Mosquitto broker and an SQLite store: a breach fires,
//! the alert is published on `alerts/{subject}` and stored, acknowledged over MQTT, and
//! resolved; active alerts survive a restart without firing twice; webhooks are signed and
//! retried.
//!
//! Needs Debian's `mosquitto` (`apt-get install mosquitto`); the tests fail without it.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use hmac::{Hmac, Mac};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use sha2::Sha256;
use telemon_alerts::notify::{Notifier, RetryPolicy, Webhook, SIGNATURE_HEADER};
use telemon_alerts::service::{self, AlertsSettings};
use telemon_alerts::{Directory, RuleFile, SetRulesError};
use telemon_ingest::decode::Decoder;
use telemon_model::alert::AckRequest;
use telemon_model::bus::BusConfig;
use telemon_model::health::{Health, Status};
use telemon_model::topic::{ALERTS_FILTER, ALERT_ACK_TOPIC};
use telemon_model::{AlertEvent, AlertState, Priority};
use telemon_store::Store;
use tokio::sync::mpsc;

const MOSQUITTO: &str = "/usr/sbin/mosquitto";
const WAIT: Duration = Duration::from_secs(10);

const HR_HIGH: &str = r#"
[[rule]]
id = "hr-high"
name = "Heart rate high"
priority = "high"

[rule.kind]
type = "threshold"
metric = "heart_rate"
above = 120
"#;

/// A Mosquitto of this test's own, killed by its PID when dropped.
struct Broker {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl Broker {
    fn start(dir: &Path) -> Broker {
        let installed =
            Path::new(MOSQUITTO).exists() || Command::new("mosquitto").arg("-h").output().is_ok();
        assert!(
            installed,
            "mosquitto not installed: run scripts/test.sh or apt-get install mosquitto"
        );
        let binary = if Path::new(MOSQUITTO).exists() {
            MOSQUITTO
        } else {
            "mosquitto"
        };

        let port = free_port();
        let config = dir.join("mosquitto.conf");
        let text = format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n");
        std::fs::write(&config, text).unwrap();
        let child = Command::new(binary)
            .arg("-c")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {binary}: {e}"));
        let broker = Broker {
            child,
            port,
            dir: dir.to_path_buf(),
        };

        let deadline = Instant::now() + WAIT;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            assert!(
                Instant::now() < deadline,
                "mosquitto did not listen on {port}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        broker
    }

    fn bus(&self) -> BusConfig {
        BusConfig::from_url(&format!("mqtt://127.0.0.1:{}", self.port)).unwrap()
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("telemon-alerts-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

async fn sqlite(dir: &Path) -> Store {
    let store = Store::connect(&format!("sqlite:{}", dir.join("telemon.db").display()))
        .await
        .unwrap();
    store.migrate().await.unwrap();
    store
}

/// A test client: publishes like a device or the API, and collects alert transitions.
struct Client {
    client: AsyncClient,
    alerts: mpsc::UnboundedReceiver<(String, AlertEvent)>,
}

impl Client {
    async fn connect(bus: &BusConfig, id: &str) -> Client {
        let options = MqttOptions::new(id, &bus.host, bus.port);
        let (client, mut eventloop) = AsyncClient::new(options, 100);
        let (tx, alerts) = mpsc::unbounded_channel();
        let (subscribed, on_suback) = tokio::sync::oneshot::channel();
        client
            .subscribe(ALERTS_FILTER, QoS::AtLeastOnce)
            .await
            .unwrap();
        tokio::spawn(async move {
            let mut subscribed = Some(subscribed);
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        subscribed.take().map(|s| s.send(()));
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let event = serde_json::from_slice(&p.payload).unwrap();
                        if tx.send((p.topic.clone(), event)).is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => return,
                }
            }
        });
        tokio::time::timeout(WAIT, on_suback)
            .await
            .unwrap()
            .unwrap();
        Client { client, alerts }
    }

    async fn publish(&self, topic: &str, payload: &str) {
        let payload = payload.as_bytes().to_vec();
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
            .unwrap();
    }

    /// The next transition into `state`, skipping any other.
    async fn next(&mut self, state: AlertState) -> (String, AlertEvent) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let received = tokio::time::timeout_at(deadline, self.alerts.recv()).await;
            let (topic, event) = received
                .unwrap_or_else(|_| panic!("no {} alert within {WAIT:?}", state.as_str()))
                .unwrap();
            if event.state == state {
                return (topic, event);
            }
        }
    }

    /// Publishes until the service hears it: its subscription may land a moment after the
    /// health check says it connected.
    async fn breach_until(&mut self, payload: &str, state: AlertState) -> (String, AlertEvent) {
        for _ in 0..20 {
            self.publish("devices/bed-1/telemetry", payload).await;
            let waited = tokio::time::timeout(Duration::from_millis(500), async {
                loop {
                    match self.alerts.recv().await {
                        Some((topic, event)) if event.state == state => return (topic, event),
                        Some(_) => {}
                        None => panic!("test client stopped"),
                    }
                }
            });
            if let Ok(found) = waited.await {
                return found;
            }
        }
        panic!("no {} alert after 20 publishes", state.as_str());
    }
}

async fn wait_until_ok(health: &Health) {
    let deadline = Instant::now() + WAIT;
    loop {
        let status = health.snapshot().get("alerts").map(|c| c.status);
        if status == Some(Status::Ok) {
            return;
        }
        assert!(Instant::now() < deadline, "alerts not healthy: {status:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls the store until the alert is there in `state`: storing follows publishing.
async fn stored(store: &Store, id: &str, state: AlertState) -> AlertEvent {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(alert) = store.alert(id).await.unwrap() {
            if alert.state == state {
                return alert;
            }
        }
        assert!(
            Instant::now() < deadline,
            "alert {id} not stored as {}",
            state.as_str()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn breach_fires_is_stored_acknowledged_over_mqtt_and_resolves() {
    let dir = temp_dir("lifecycle");
    let broker = Broker::start(&dir);
    let store = sqlite(&dir).await;
    let health = Health::default();
    let rules = RuleFile::from_toml(HR_HIGH).unwrap();
    let firing_before = transitions("firing");

    let handle = service::start(
        broker.bus(),
        AlertsSettings::default(),
        rules.clone(),
        Directory::default(),
        Arc::new(Decoder::native_only()),
        store.clone(),
        health.clone(),
    )
    .await
    .unwrap();
    wait_until_ok(&health).await;
    assert_eq!(handle.rules().await, rules);
    let mut api = Client::connect(&broker.bus(), "test-lifecycle").await;

    let (topic, fired) = api
        .breach_until(r#"{"heart_rate":130}"#, AlertState::Firing)
        .await;
    assert_eq!(topic, "alerts/bed-1");
    assert_eq!(
        (fired.rule.as_str(), fired.subject.as_str()),
        ("hr-high", "bed-1")
    );
    assert_eq!((fired.priority, fired.value), (Priority::High, Some(130.0)));
    stored(&store, &fired.id, AlertState::Firing).await;
    assert!(
        transitions("firing") > firing_before,
        "transitions are counted"
    );

    let ack = AckRequest {
        id: fired.id.clone(),
        by: "nurse.jones".into(),
    };
    api.publish(ALERT_ACK_TOPIC, &serde_json::to_string(&ack).unwrap())
        .await;
    let (_, acknowledged) = api.next(AlertState::Acknowledged).await;
    assert_eq!(acknowledged.id, fired.id);
    assert_eq!(acknowledged.acknowledged_by.as_deref(), Some("nurse.jones"));

    api.publish("devices/bed-1/telemetry", r#"{"heart_rate":80}"#)
        .await;
    let (_, resolved) = api.next(AlertState::Resolved).await;
    assert_eq!(resolved.id, fired.id);
    let kept = stored(&store, &fired.id, AlertState::Resolved).await;
    assert_eq!(kept.acknowledged_by.as_deref(), Some("nurse.jones"));
    drop(broker);
}

#[tokio::test]
async fn restored_alert_does_not_fire_again_and_resolves_under_its_own_id() {
    let dir = temp_dir("restore");
    let broker = Broker::start(&dir);
    let store = sqlite(&dir).await;
    let started = chrono::Utc::now() - chrono::Duration::minutes(5);
    let before_restart = AlertEvent {
        id: format!("hr-high:bed-1:{}", started.timestamp_millis()),
        rule: "hr-high".into(),
        subject: "bed-1".into(),
        priority: Priority::High,
        state: AlertState::Firing,
        metric: Some("heart_rate".into()),
        value: Some(140.0),
        message: "Heart rate high: 140 above 120".into(),
        started_at: started,
        updated_at: started,
        acknowledged_by: None,
        acknowledged_at: None,
    };
    store.record_alert(&before_restart).await.unwrap();
    let health = Health::default();
    let settings = AlertsSettings {
        client_id: "telemon-alerts-restore".into(),
        ..AlertsSettings::default()
    };

    service::start(
        broker.bus(),
        settings,
        RuleFile::from_toml(HR_HIGH).unwrap(),
        Directory::default(),
        Arc::new(Decoder::native_only()),
        store.clone(),
        health.clone(),
    )
    .await
    .unwrap();
    wait_until_ok(&health).await;
    let mut api = Client::connect(&broker.bus(), "test-restore").await;

    // Still breaching: the restored alert stays as it is, nothing new fires. Then clearing
    // resolves the alert that was active before the restart.
    api.publish("devices/bed-1/telemetry", r#"{"heart_rate":135}"#)
        .await;
    let (_, resolved) = api
        .breach_until(r#"{"heart_rate":80}"#, AlertState::Resolved)
        .await;
    assert_eq!(resolved.id, before_restart.id);
    assert!(api.alerts.try_recv().is_err(), "nothing else was published");
    stored(&store, &before_restart.id, AlertState::Resolved).await;
    let all = store
        .alerts(&telemon_store::AlertQuery {
            limit: 100,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(all.len(), 1, "no second alert: {all:?}");
    drop(broker);
}

fn transitions(state: &str) -> u64 {
    telemon_model::metrics::counter(
        "telemon_alerts_transitions_total",
        "Alert transitions, by the state entered.",
        &[("state", state)],
    )
    .get()
}

/// What the webhook receiver saw, and how it should answer next.
#[derive(Default)]
struct Receiver {
    requests: Vec<(Option<String>, Bytes)>,
}

type Shared = Arc<parking_lot::Mutex<Receiver>>;

async fn receive(State(seen): State<Shared>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let signature = headers
        .get(SIGNATURE_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let mut seen = seen.lock();
    seen.requests.push((signature, body));
    // The first request fails, as a receiver restarting would.
    if seen.requests.len() == 1 {
        StatusCode::INTERNAL_SERVER_ERROR
    } else {
        StatusCode::NO_CONTENT
    }
}

#[tokio::test]
async fn webhook_is_signed_and_retried_after_a_server_error() {
    let seen: Shared = Default::default();
    let app = axum::Router::new()
        .route("/hook", axum::routing::post(receive))
        .with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });

    let hook = |path: &str, min_priority| Webhook {
        url: format!("http://{addr}{path}"),
        secret: Some("webhook-secret".into()),
        min_priority,
    };
    let policy = RetryPolicy {
        first_backoff: Duration::from_millis(50),
        ..RetryPolicy::default()
    };
    let notifier = Notifier::start(vec![hook("/hook", Priority::Medium)], policy).unwrap();
    let mut event = AlertEvent {
        id: "hr-high:bed-1:1".into(),
        rule: "hr-high".into(),
        subject: "bed-1".into(),
        priority: Priority::Low,
        state: AlertState::Firing,
        metric: Some("heart_rate".into()),
        value: Some(130.0),
        message: "Heart rate high".into(),
        started_at: chrono::Utc::now(),
        updated_at: chrono::Utc::now(),
        acknowledged_by: None,
        acknowledged_at: None,
    };
    notifier.notify(&event); // below the webhook's minimum: not sent
    event.priority = Priority::High;
    notifier.notify(&event);

    let deadline = Instant::now() + WAIT;
    while seen.lock().requests.len() < 2 {
        assert!(Instant::now() < deadline, "no retry after the 500");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let seen = seen.lock();
    assert_eq!(seen.requests.len(), 2, "one failure, one retry, then done");
    for (signature, body) in &seen.requests {
        let mut mac = Hmac::<Sha256>::new_from_slice(b"webhook-secret").unwrap();
        mac.update(body);
        let expected = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
        assert_eq!(signature.as_deref(), Some(expected.as_str()));
        let sent: AlertEvent = serde_json::from_slice(body).unwrap();
        assert_eq!(sent, event);
    }
}

#[tokio::test]
async fn rule_change_resolves_alerts_of_removed_rules_saves_the_file_and_notifies() {
    let dir = temp_dir("set-rules");
    let broker = Broker::start(&dir);
    let store = sqlite(&dir).await;
    let health = Health::default();
    let seen: Shared = Default::default();
    let app = axum::Router::new()
        .route("/hook", axum::routing::post(receive))
        .with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let rules_file = dir.join("rules.toml");
    let settings = AlertsSettings {
        client_id: "telemon-alerts-set-rules".into(),
        rules_file: Some(rules_file.clone()),
        webhooks: vec![Webhook {
            url: format!("http://{addr}/hook"),
            secret: None,
            min_priority: Priority::High,
        }],
        webhook_retry: RetryPolicy {
            first_backoff: Duration::from_millis(50),
            ..RetryPolicy::default()
        },
        ..AlertsSettings::default()
    };

    let handle = service::start(
        broker.bus(),
        settings,
        RuleFile::from_toml(HR_HIGH).unwrap(),
        Directory::default(),
        Arc::new(Decoder::native_only()),
        store.clone(),
        health.clone(),
    )
    .await
    .unwrap();
    wait_until_ok(&health).await;
    let mut api = Client::connect(&broker.bus(), "test-set-rules").await;
    let (_, fired) = api
        .breach_until(r#"{"heart_rate":130}"#, AlertState::Firing)
        .await;

    let twice = [handle.rules().await, handle.rules().await].concat();
    let refused = handle.set_rules(twice).await;
    assert!(
        matches!(refused, Err(SetRulesError::Invalid(_))),
        "{refused:?}"
    );
    assert!(!rules_file.exists(), "nothing saved for refused rules");
    assert_eq!(handle.rules().await.len(), 1);
    handle.set_rules(Vec::new()).await.unwrap();
    let (_, resolved) = api.next(AlertState::Resolved).await;
    assert_eq!(resolved.id, fired.id);
    assert!(handle.rules().await.is_empty());
    let saved = std::fs::read_to_string(&rules_file).unwrap();
    assert!(RuleFile::from_toml(&saved).unwrap().is_empty(), "{saved}");

    // The webhook got both transitions (the first after a retry), in order, unsigned.
    let deadline = Instant::now() + WAIT;
    while seen.lock().requests.len() < 3 {
        assert!(
            Instant::now() < deadline,
            "webhook did not get both transitions"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let seen = seen.lock();
    let states: Vec<AlertState> = seen.requests[1..]
        .iter()
        .map(|(signature, body)| {
            assert!(signature.is_none(), "no secret, no signature");
            serde_json::from_slice::<AlertEvent>(body).unwrap().state
        })
        .collect();
    assert_eq!(states, [AlertState::Firing, AlertState::Resolved]);
    drop(broker);
}

const SILENT: &str = r#"
[[rule]]
id = "offline"
priority = "medium"

[rule.kind]
type = "silent"
after = "10m"
"#;

#[tokio::test]
async fn device_will_message_fires_a_silence_alert_and_bad_acks_are_counted() {
    let dir = temp_dir("status");
    let broker = Broker::start(&dir);
    let store = sqlite(&dir).await;
    let health = Health::default();
    let settings = AlertsSettings {
        client_id: "telemon-alerts-status".into(),
        ..AlertsSettings::default()
    };
    service::start(
        broker.bus(),
        settings,
        RuleFile::from_toml(SILENT).unwrap(),
        Directory::default(),
        Arc::new(Decoder::native_only()),
        store.clone(),
        health.clone(),
    )
    .await
    .unwrap();
    wait_until_ok(&health).await;
    let mut device = Client::connect(&broker.bus(), "test-status").await;

    let mut fired = None;
    for _ in 0..20 {
        device.publish("devices/bed-9/status", "offline").await;
        let next = tokio::time::timeout(Duration::from_millis(500), device.alerts.recv());
        if let Ok(Some((topic, event))) = next.await {
            fired = Some((topic, event));
            break;
        }
    }
    let (topic, offline) = fired.expect("no alert for a device reporting offline");
    assert_eq!(topic, "alerts/bed-9");
    assert_eq!(
        (offline.rule.as_str(), offline.state),
        ("offline", AlertState::Firing)
    );

    let unknown_before = ack_errors("unknown_alert");
    let invalid_before = ack_errors("invalid");
    let ack = AckRequest {
        id: "no-such-alert".into(),
        by: "nurse.jones".into(),
    };
    device
        .publish(ALERT_ACK_TOPIC, &serde_json::to_string(&ack).unwrap())
        .await;
    device.publish(ALERT_ACK_TOPIC, "not json").await;
    let deadline = Instant::now() + WAIT;
    while ack_errors("unknown_alert") == unknown_before || ack_errors("invalid") == invalid_before {
        assert!(
            Instant::now() < deadline,
            "acknowledgement errors not counted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    device.publish("devices/bed-9/status", "online").await;
    let (_, back) = device.next(AlertState::Resolved).await;
    assert_eq!(back.id, offline.id);
    drop(broker);
}

fn ack_errors(reason: &str) -> u64 {
    telemon_model::metrics::counter(
        "telemon_alerts_ack_errors_total",
        "Acknowledgement requests refused, by reason.",
        &[("reason", reason)],
    )
    .get()
}

/// Rules stored through the API (here written straight to the store, as the API does) are
/// laid over the file rules while the service runs: a file rule disabled by an API rule
/// resolves its alert, a new API rule fires, deleting the API rule brings the file rule
/// back, and the store mirrors the file rules for the API to list.
#[tokio::test]
async fn rules_stored_through_the_api_override_file_rules_without_a_restart() {
    use telemon_alerts::ruleset::{self, FILE_RULE_AUTHOR};
    use telemon_store::RuleTable;

    let dir = temp_dir("api-rules");
    let broker = Broker::start(&dir);
    let store = sqlite(&dir).await;
    let health = Health::default();
    let file = RuleFile::from_toml(HR_HIGH).unwrap();
    let settings = AlertsSettings {
        client_id: "telemon-alerts-api-rules".into(),
        rules_refresh: Duration::from_millis(100),
        ..AlertsSettings::default()
    };
    let handle = service::start(
        broker.bus(),
        settings,
        file.clone(),
        Directory::default(),
        Arc::new(Decoder::native_only()),
        store.clone(),
        health.clone(),
    )
    .await
    .unwrap();
    wait_until_ok(&health).await;
    let mut api = Client::connect(&broker.bus(), "test-api-rules").await;
    let (_, fired) = api
        .breach_until(r#"{"heart_rate":130}"#, AlertState::Firing)
        .await;

    let mirrored = store.stored_rules(RuleTable::File).await.unwrap();
    assert_eq!(mirrored.len(), 1);
    assert_eq!(mirrored[0].updated_by, FILE_RULE_AUTHOR);
    assert_eq!(ruleset::from_stored(&mirrored[0]).unwrap(), file[0]);

    let mut disabled = file[0].clone();
    disabled.enabled = false;
    let mut spo2 = RuleFile::from_toml(HR_HIGH).unwrap().remove(0);
    spo2.id = "hr-very-high".into();
    for rule in [&disabled, &spo2] {
        let stored = ruleset::to_stored(rule, "admin", chrono::Utc::now()).unwrap();
        store.put_api_rule(&stored).await.unwrap();
    }
    let (_, resolved) = api.next(AlertState::Resolved).await;
    assert_eq!(
        resolved.id, fired.id,
        "the disabled file rule's alert resolves"
    );
    let in_force = handle.rules().await;
    assert_eq!(in_force, vec![disabled, spo2]);

    api.publish("devices/bed-1/telemetry", r#"{"heart_rate":131}"#)
        .await;
    let (_, new_rule) = api.next(AlertState::Firing).await;
    assert_eq!(new_rule.rule, "hr-very-high");

    assert!(store.delete_api_rule("hr-high").await.unwrap());
    let deadline = Instant::now() + WAIT;
    while handle.rules().await[0] != file[0] {
        assert!(Instant::now() < deadline, "the file rule did not come back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    api.publish("devices/bed-1/telemetry", r#"{"heart_rate":132}"#)
        .await;
    let (_, back) = api.next(AlertState::Firing).await;
    assert_eq!(back.rule, "hr-high");
    assert_ne!(back.id, fired.id, "a new alert, not the resolved one");
}
