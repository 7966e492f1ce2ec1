//! A simulated fleet against a real Mosquitto that requires client certificates issued by the
//! project's CA: readings, the retained birth, and delivery of readings taken while the
//! broker was down; a Zigbee2MQTT gateway's child readings, decoded with telemon's
//! reference mappings.
//!
//! Needs `mosquitto` (Debian package `mosquitto`); set `MOSQUITTO` to use another binary.
//! The tests fail, rather than skip, when it is missing.

use std::collections::BTreeMap;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rumqttc::{AsyncClient, Event, Packet, QoS};
use telemon_broker::pki::Pki;
use telemon_ingest::decode::{DecodeConfig, Decoder, Message};
use telemon_model::bus::{BusConfig, BusTls};
use telemon_model::Value;
use telemon_simulators::fleet::Backoff;
use telemon_simulators::home::HomeKind;
use telemon_simulators::physiology::{Artefacts, METRICS};
use telemon_simulators::{run_fleet, vital_monitor_ids, DeviceKind, DeviceSpec, FleetConfig};
use telemon_simulators::{FleetHandle, Scenario};

const INTERVAL: Duration = Duration::from_millis(200);

/// A scratch directory removed when the test ends.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let path = std::env::temp_dir().join(format!(
            "telemon-sim-{name}-{}-{}",
            std::process::id(),
            now_ms()
        ));
        std::fs::create_dir_all(&path).expect("create a scratch directory");
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

fn mosquitto_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("MOSQUITTO") {
        return PathBuf::from(path);
    }
    let debian = Path::new("/usr/sbin/mosquitto");
    assert!(
        debian.is_file(),
        "mosquitto is not installed (no /usr/sbin/mosquitto): install the Debian package \
         `mosquitto` or set MOSQUITTO to its binary; these tests need a real broker"
    );
    debian.to_path_buf()
}

/// Mosquitto on `port`, requiring client certificates from the test CA. Killed by PID when
/// dropped.
struct Mosquitto {
    child: Child,
}

impl Mosquitto {
    fn start(dir: &Path, pki: &Pki, server: &(PathBuf, PathBuf), port: u16) -> Mosquitto {
        let conf = dir.join(format!("mosquitto-{port}.conf"));
        let text = format!(
            "user root\npersistence false\nlog_dest file {log}\nlistener {port} 127.0.0.1\n\
             cafile {ca}\ncertfile {cert}\nkeyfile {key}\nrequire_certificate true\n\
             use_identity_as_username true\n",
            log = dir.join("mosquitto.log").display(),
            ca = pki.ca_path().display(),
            cert = server.0.display(),
            key = server.1.display(),
        );
        std::fs::write(&conf, text).expect("write the mosquitto config");
        let child = Command::new(mosquitto_binary())
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start mosquitto");
        let mosquitto = Mosquitto { child };
        for _ in 0..100 {
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return mosquitto;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "mosquitto did not listen on port {port}; see {}",
            dir.display()
        );
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A CA with the broker's certificate and one certificate per device, plus `watcher` for
/// the test's own subscriber.
struct Setup {
    dir: TempDir,
    pki: Pki,
    server: (PathBuf, PathBuf),
    certs: PathBuf,
}

fn setup(name: &str, devices: &[String]) -> Setup {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = TempDir::new(name);
    let pki = Pki::open_or_init(&dir.0.join("pki")).expect("create the CA");
    let server = pki
        .ensure_server_cert(&[])
        .expect("issue the server certificate");
    let certs = dir.0.join("certs");
    for id in devices.iter().map(String::as_str).chain(["watcher"]) {
        pki.issue(id, &certs, 1)
            .expect("issue a device certificate");
    }
    Setup {
        dir,
        pki,
        server,
        certs,
    }
}

fn fleet_config(setup: &Setup, port: u16, ids: &[String]) -> FleetConfig {
    let mut config = FleetConfig::new("127.0.0.1", port, setup.pki.ca_path(), &setup.certs);
    config.interval = INTERVAL;
    config.seed = Some(1);
    // Every reading complete, so that the test can check every metric.
    config.artefacts = Artefacts::NONE;
    config.devices = ids
        .iter()
        .map(|id| DeviceSpec {
            id: id.clone(),
            kind: DeviceKind::Vitals {
                scenario: Scenario::Stable,
            },
        })
        .collect();
    config
}

#[derive(Clone, Debug)]
struct Received {
    topic: String,
    payload: Vec<u8>,
    retain: bool,
}

/// The test's subscriber: subscribes again after every connect (its sessions do not survive
/// a broker restart either) and counts completed subscriptions.
struct Watcher {
    client: AsyncClient,
    received: Arc<Mutex<Vec<Received>>>,
    subscribed: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Watcher {
    fn start(setup: &Setup, port: u16, client_id: &str, filters: &[&str]) -> Watcher {
        let bus = BusConfig {
            host: "127.0.0.1".into(),
            port,
            tls: Some(BusTls {
                ca: setup.pki.ca_path(),
                client: Some((
                    setup.certs.join("watcher.crt"),
                    setup.certs.join("watcher.key"),
                )),
            }),
            username: None,
            password: None,
        };
        let options = bus.mqtt_options(client_id).expect("watcher options");
        let (client, mut eventloop) = AsyncClient::new(options, 16);
        let received = Arc::new(Mutex::new(Vec::new()));
        let subscribed = Arc::new(AtomicU64::new(0));
        let filters: Vec<String> = filters.iter().map(|f| f.to_string()).collect();

        let (sink, count) = (received.clone(), subscribed.clone());
        let commands = client.clone();
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        for filter in &filters {
                            let _ = commands.try_subscribe(filter, QoS::AtLeastOnce);
                        }
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        count.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        sink.lock().unwrap().push(Received {
                            topic: p.topic.clone(),
                            payload: p.payload.to_vec(),
                            retain: p.retain,
                        });
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
        });
        Watcher {
            client,
            received,
            subscribed,
            task,
        }
    }

    /// Waits until `n` subscriptions in all have been acknowledged.
    async fn wait_subscribed(&self, n: u64) {
        let ok = wait_for(Duration::from_secs(10), || {
            self.subscribed.load(Ordering::SeqCst) >= n
        })
        .await;
        assert!(ok, "the watcher's subscriptions were not acknowledged");
    }

    fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    /// Telemetry by device: (ts, metrics object).
    fn telemetry(&self) -> BTreeMap<String, Vec<serde_json::Map<String, serde_json::Value>>> {
        let mut by_device: BTreeMap<String, Vec<_>> = BTreeMap::new();
        for message in self.received() {
            let Some(device) = message
                .topic
                .strip_prefix("devices/")
                .and_then(|rest| rest.strip_suffix("/telemetry"))
            else {
                continue;
            };
            let value: serde_json::Value =
                serde_json::from_slice(&message.payload).expect("telemetry is JSON");
            let object = value
                .as_object()
                .expect("telemetry is a JSON object")
                .clone();
            by_device
                .entry(device.to_string())
                .or_default()
                .push(object);
        }
        by_device
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn ts(reading: &serde_json::Map<String, serde_json::Value>) -> u64 {
    reading["ts"].as_u64().expect("ts is epoch milliseconds")
}

/// Polls `done` every 20 ms for at most `limit`.
async fn wait_for(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < deadline {
        if done() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    done()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_publishes_vitals_and_a_retained_birth_over_mutual_tls() {
    let ids = vital_monitor_ids(3);
    let setup = setup("publish", &ids);
    let port = free_port();
    let _mosquitto = Mosquitto::start(&setup.dir.0, &setup.pki, &setup.server, port);
    let watcher = Watcher::start(&setup, port, "watcher-telemetry", &["devices/+/telemetry"]);
    watcher.wait_subscribed(1).await;

    let started = now_ms();
    let fleet = run_fleet(fleet_config(&setup, port, &ids))
        .await
        .expect("fleet starts");
    // About 2 s at 200 ms; the bound is generous for a loaded machine.
    let enough = |w: &Watcher| {
        let telemetry = w.telemetry();
        ids.iter()
            .all(|id| telemetry.get(id).is_some_and(|r| r.len() >= 10))
    };
    let arrived = wait_for(Duration::from_secs(15), || enough(&watcher)).await;
    assert!(arrived, "readings missing: {:?}", fleet.stats());

    let telemetry = watcher.telemetry();
    for id in &ids {
        let readings = telemetry.get(id).map(Vec::as_slice).unwrap_or_default();
        for reading in readings {
            for metric in METRICS {
                assert!(
                    reading[metric].is_f64(),
                    "{id}: {metric} missing in {reading:?}"
                );
            }
            assert_eq!(reading.len(), METRICS.len() + 1, "{reading:?}");
            assert!(
                ts(reading) >= started && ts(reading) <= now_ms(),
                "{reading:?}"
            );
        }
        let mut times: Vec<u64> = readings.iter().map(ts).collect();
        times.dedup();
        assert_eq!(times.len(), readings.len(), "{id}: repeated timestamps");
    }
    assert!(wait_for(Duration::from_secs(5), || fleet.published() >= 30).await);
    assert_eq!(fleet.stats().connected, 3, "{:?}", fleet.stats());

    // A subscriber arriving later gets every device's retained birth.
    let status = Watcher::start(&setup, port, "watcher-status", &["devices/+/status"]);
    status.wait_subscribed(1).await;
    let births = |w: &Watcher| {
        w.received()
            .iter()
            .filter(|m| m.retain && m.payload == b"online")
            .map(|m| m.topic.clone())
            .collect::<Vec<_>>()
    };
    assert!(wait_for(Duration::from_secs(5), || births(&status).len() >= 3).await);
    let mut topics = births(&status);
    topics.sort();
    let want: Vec<String> = ids
        .iter()
        .map(|id| format!("devices/{id}/status"))
        .collect();
    assert_eq!(topics, want);

    // Stopping says offline, retained, for each device.
    fleet.shutdown().await;
    let offline = |w: &Watcher| {
        w.received()
            .iter()
            .filter(|m| m.payload == b"offline")
            .count()
    };
    assert!(wait_for(Duration::from_secs(5), || offline(&status) >= 3).await);
}

/// Accepts connections on its own port and relays them to `upstream` while open; refuses
/// them while closed. Lets the test hold devices off until its watcher has subscribed again
/// after the broker restart, so that nothing is delivered to nobody.
struct Gate {
    port: u16,
    open: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Gate {
    async fn start(upstream: u16) -> Gate {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the gate");
        let port = listener.local_addr().expect("gate address").port();
        let open = Arc::new(AtomicBool::new(true));
        let is_open = open.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !is_open.load(Ordering::SeqCst) {
                    continue;
                }
                tokio::spawn(async move {
                    let Ok(mut outbound) =
                        tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                    else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                });
            }
        });
        Gate { port, open, task }
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_taken_while_the_broker_is_down_are_delivered_after_it_returns() {
    let ids = vital_monitor_ids(3);
    let setup = setup("restart", &ids);
    let port = free_port();
    let mosquitto = Mosquitto::start(&setup.dir.0, &setup.pki, &setup.server, port);
    let gate = Gate::start(port).await;
    let watcher = Watcher::start(&setup, port, "watcher-restart", &["devices/+/telemetry"]);
    watcher.wait_subscribed(1).await;

    let mut config = fleet_config(&setup, gate.port, &ids);
    config.backoff = Backoff {
        min: Duration::from_millis(50),
        max: Duration::from_millis(400),
    };
    let fleet: FleetHandle = run_fleet(config).await.expect("fleet starts");
    let before = |w: &Watcher| w.telemetry().values().filter(|r| r.len() >= 2).count();
    assert!(wait_for(Duration::from_secs(10), || before(&watcher) == 3).await);

    // The outage: the broker dies and comes back empty (no persistence) on the same port.
    gate.open.store(false, Ordering::SeqCst);
    drop(mosquitto);
    let down = now_ms();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let _mosquitto = Mosquitto::start(&setup.dir.0, &setup.pki, &setup.server, port);
    let up = now_ms();
    watcher.wait_subscribed(2).await;
    gate.open.store(true, Ordering::SeqCst);

    // Every device delivers what it took during the outage, and carries on.
    let caught_up = |w: &Watcher| {
        let telemetry = w.telemetry();
        ids.iter().all(|id| {
            let readings = telemetry.get(id).map(Vec::as_slice).unwrap_or_default();
            readings.iter().any(|r| ts(r) > up + 1000)
        })
    };
    assert!(
        wait_for(Duration::from_secs(15), || caught_up(&watcher)).await,
        "devices did not come back: {:?}",
        fleet.stats()
    );

    let telemetry = watcher.telemetry();
    let expected = (up - down) / INTERVAL.as_millis() as u64;
    for id in &ids {
        let during: Vec<u64> = telemetry[id]
            .iter()
            .map(ts)
            .filter(|&t| t > down && t < up)
            .collect();
        assert!(
            during.len() as u64 + 2 >= expected,
            "{id}: {} of about {expected} readings from the outage arrived",
            during.len()
        );
    }
    // The broker lost every session: commands arrive only because the devices subscribed
    // again on reconnecting.
    watcher
        .client
        .publish(
            "devices/bed-02/commands/scenario",
            QoS::AtLeastOnce,
            false,
            "SuddenEvent(10s)",
        )
        .await
        .expect("queue a command");
    assert!(
        wait_for(Duration::from_secs(5), || fleet.stats().commands == 1).await,
        "{:?}",
        fleet.stats()
    );

    let stats = fleet.stats();
    assert!(stats.connects >= 6, "{stats:?}");
    assert_eq!(stats.dropped, 0, "{stats:?}");
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_publishes_its_children_as_zigbee2mqtt_and_telemon_decodes_them() {
    let ids = ["zigbee-gw".to_string()];
    let setup = setup("gateway", &ids);
    let port = free_port();
    let _mosquitto = Mosquitto::start(&setup.dir.0, &setup.pki, &setup.server, port);
    let watcher = Watcher::start(&setup, port, "watcher-zigbee", &["zigbee2mqtt/#"]);
    watcher.wait_subscribed(1).await;

    let mut config = fleet_config(&setup, port, &[]);
    config.devices = vec![DeviceSpec {
        id: ids[0].clone(),
        kind: DeviceKind::Gateway {
            children: vec![
                ("kitchen".into(), HomeKind::Climate),
                ("front_door".into(), HomeKind::Contact),
            ],
        },
    }];
    let started = now_ms();
    let fleet = run_fleet(config).await.expect("fleet starts");

    let on = |w: &Watcher, topic: &str| {
        w.received()
            .into_iter()
            .filter(|m| m.topic == topic)
            .collect::<Vec<_>>()
    };
    let enough = |w: &Watcher| {
        ["zigbee2mqtt/kitchen", "zigbee2mqtt/front_door"]
            .iter()
            .all(|t| on(w, t).len() >= 5)
    };
    let arrived = wait_for(Duration::from_secs(15), || enough(&watcher)).await;
    assert!(arrived, "child readings missing: {:?}", fleet.stats());
    let births = on(&watcher, "zigbee2mqtt/bridge/state");
    assert!(births.iter().any(|m| m.payload == b"online"), "{births:?}");
    assert_eq!(fleet.stats().connected, 1, "one connection for the gateway");

    let door = on(&watcher, "zigbee2mqtt/front_door");
    let door: serde_json::Value = serde_json::from_slice(&door[0].payload).expect("JSON");
    assert!(door["contact"].is_boolean(), "{door}");

    // telemon's reference mappings file the kitchen's readings under its friendly name.
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../ingest/mappings.toml");
    let text = std::fs::read_to_string(&path).expect("read ingest/mappings.toml");
    let decoder = Decoder::from_config(DecodeConfig::from_toml(&text).expect("parse mappings"))
        .expect("build the decoder");
    let kitchen = on(&watcher, "zigbee2mqtt/kitchen");
    let message = Message {
        topic: &kitchen[0].topic,
        payload: &kitchen[0].payload,
        identity: Some("zigbee-gw"),
        received_at: chrono::Utc::now(),
    };
    let decoded = decoder
        .decode(&message)
        .expect("telemon decodes the payload");
    assert!(decoded.rejected.is_empty(), "{:?}", decoded.rejected);
    let mut metrics: Vec<&str> = decoded.readings.iter().map(|r| r.metric.as_str()).collect();
    metrics.sort();
    let want = [
        "battery",
        "humidity",
        "linkquality",
        "temperature",
        "voltage",
    ];
    assert_eq!(metrics, want);
    for reading in &decoded.readings {
        assert_eq!(reading.device_id.as_str(), "kitchen");
        let ms = reading.time.timestamp_millis() as u64;
        assert!(ms >= started && ms <= now_ms(), "{reading:?}");
        assert!(matches!(reading.value, Value::Number(_)), "{reading:?}");
    }

    fleet.shutdown().await;
    let offline = |w: &Watcher| {
        on(w, "zigbee2mqtt/bridge/state")
            .iter()
            .any(|m| m.payload == b"offline")
    };
    assert!(wait_for(Duration::from_secs(5), || offline(&watcher)).await);
}
