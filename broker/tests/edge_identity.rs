//! Who may connect: certificates refused at the handshake, revocation of new and live
//! connections, the certificate identity overriding what the client says, session takeover.

mod common;

use std::time::Duration;

use common::{connected, fails_within, mqtt, Broker, Device, TempDir, PROMPT};
use rumqttc::QoS;
use telemon_broker::pki::Pki;

fn tls_args(device: &Device) -> Vec<String> {
    vec![
        "--cert".into(),
        device.cert.display().to_string(),
        "--key".into(),
        device.key.display().to_string(),
    ]
}

fn pub_as(broker: &Broker, device: Option<&Device>, topic: &str) -> (bool, String) {
    let tls = device.map(tls_args).unwrap_or_default();
    let tls: Vec<&str> = tls.iter().map(String::as_str).collect();
    broker.mosquitto_pub(&tls, &["-t", topic, "-m", "21.5"])
}

/// A raw TLS client is refused when the server ends the connection before any CONNACK.
async fn refused_at_handshake(broker: &Broker, device: Option<&Device>) -> bool {
    let Ok(mut stream) = broker.tls(device).await else {
        return true;
    };
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = stream
        .write_all(&mqtt::connect(4, "x", 30, None, None))
        .await;
    let mut buf = [0u8; 4];
    let read = tokio::time::timeout(PROMPT, stream.read(&mut buf)).await;
    matches!(read, Ok(Ok(0)) | Ok(Err(_)))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_valid_certificate_publishes_with_mosquitto_pub() {
    let broker = Broker::start().await;
    let device = broker.device("bed-1");
    let mut observer = broker.observer("devices/#").await;

    let (ok, stderr) = pub_as(&broker, Some(&device), "devices/bed-1/telemetry");
    assert!(ok, "mosquitto_pub failed: {stderr}");
    let (topic, payload) = observer.next_publish(PROMPT).await.expect("the publish");
    assert_eq!(topic, "devices/bed-1/telemetry");
    assert_eq!(payload, b"21.5");
}

#[tokio::test(flavor = "multi_thread")]
async fn no_client_certificate_is_refused() {
    let broker = Broker::start().await;
    let mut observer = broker.observer("devices/#").await;

    let (ok, _) = pub_as(&broker, None, "devices/bed-1/telemetry");
    assert!(!ok, "mosquitto_pub without a certificate succeeded");
    assert!(refused_at_handshake(&broker, None).await);
    assert!(observer
        .next_publish(Duration::from_millis(300))
        .await
        .is_none());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_foreign_ca_is_refused() {
    let broker = Broker::start().await;
    let other = TempDir::new("foreign-ca");
    let foreign = Pki::open_or_init(&other.path().join("certs")).unwrap();
    let issued = foreign.issue("bed-1", other.path(), 30).unwrap();
    let device = Device {
        id: "bed-1".into(),
        cert: issued.cert_path,
        key: issued.key_path,
    };

    let (ok, _) = pub_as(&broker, Some(&device), "devices/bed-1/telemetry");
    assert!(!ok, "a certificate from a foreign CA was accepted");
    assert!(refused_at_handshake(&broker, Some(&device)).await);
}

#[tokio::test(flavor = "multi_thread")]
async fn expired_and_not_yet_valid_certificates_are_refused() {
    let broker = Broker::start().await;
    let expired = broker.device_valid("old-1", -30, -1);
    let future = broker.device_valid("new-1", 2, 30);

    for device in [&expired, &future] {
        let (ok, _) = pub_as(&broker, Some(device), &format!("devices/{}/t", device.id));
        assert!(!ok, "{} was accepted", device.id);
        assert!(refused_at_handshake(&broker, Some(device)).await);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn revocation_refuses_new_connections_and_ends_live_ones() {
    let broker = Broker::start().await;
    let revoked = broker.device("bed-1");
    let kept = broker.device("bed-2");
    let (_live, mut live_events) = connected(broker.options(&revoked, "bed-1")).await;
    let (kept_client, mut kept_events) = connected(broker.options(&kept, "bed-2")).await;

    broker.pki.revoke("bed-1").unwrap();

    // The CRL watcher polls once a second: the live session ends within about two.
    assert!(
        fails_within(&mut live_events, Duration::from_secs(4)).await,
        "the revoked device's live connection stayed open"
    );
    let (ok, _) = pub_as(&broker, Some(&revoked), "devices/bed-1/telemetry");
    assert!(!ok, "a revoked certificate connected again");

    kept_client
        .publish("devices/bed-2/t", QoS::AtLeastOnce, false, "1")
        .await
        .unwrap();
    common::wait_for(&mut kept_events, |p| {
        matches!(p, rumqttc::Incoming::PubAck(_))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_certificate_identity_overrides_client_id_and_username() {
    let broker = Broker::start().await;
    let device = broker.device("bed-1");
    let mut observer = broker.observer("devices/#").await;

    // The device claims to be bed-2 in both fields; the ACL and the engine use its CN.
    let connect = mqtt::connect(4, "bed-2", 30, Some("bed-2"), None);
    let (mut raw, connack) = broker.raw(&device, &connect).await;
    assert_eq!(connack, [0x20, 2, 0, 0]);
    raw.send(&mqtt::publish(4, b"devices/bed-1/t", Some(1), b"mine"))
        .await;
    assert_eq!(raw.recv().await, Some(vec![0x40, 2, 0, 1]));
    let (topic, _) = observer.next_publish(PROMPT).await.expect("own topic");
    assert_eq!(topic, "devices/bed-1/t");

    raw.send(&mqtt::publish(4, b"devices/bed-2/t", Some(2), b"theirs"))
        .await;
    assert!(raw.until_closed().await.is_empty(), "3.1.1 gets no PUBACK");
    assert!(observer
        .next_publish(Duration::from_millis(300))
        .await
        .is_none());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_connection_with_the_same_identity_takes_the_session_over() {
    let broker = Broker::start().await;
    let device = broker.device("bed-1");
    let mut observer = broker.observer("devices/#").await;

    // Different client ids: the engine sees the same certificate identity for both.
    let (_first, mut first_events) = connected(broker.options(&device, "first")).await;
    let (second, mut second_events) = connected(broker.options(&device, "second")).await;
    assert!(
        fails_within(&mut first_events, PROMPT).await,
        "the first connection was not taken over"
    );

    second
        .publish("devices/bed-1/t", QoS::AtLeastOnce, false, "2")
        .await
        .unwrap();
    common::wait_for(&mut second_events, |p| {
        matches!(p, rumqttc::Incoming::PubAck(_))
    })
    .await;
    let (topic, payload) = observer.next_publish(PROMPT).await.expect("publish");
    assert_eq!(
        (topic.as_str(), payload.as_slice()),
        ("devices/bed-1/t", &b"2"[..])
    );
}

/// Regression: a device whose certificate carried the client id of one of telemon's own
/// services (`telemon-ingest`) took over that service's engine session, and received the
/// readings meant for it.
#[tokio::test(flavor = "multi_thread")]
async fn a_device_named_like_a_service_cannot_take_its_session() {
    let broker = Broker::start().await;
    let mut service = broker.observer_named("telemon-ingest", "devices/#").await;
    let impostor = broker.device("telemon-ingest");
    let (_client, mut events) = connected(broker.options(&impostor, "telemon-ingest")).await;
    tokio::spawn(async move { while events.poll().await.is_ok() {} });

    let device = broker.device("bed-1");
    let (ok, err) = pub_as(&broker, Some(&device), "devices/bed-1/t");
    assert!(ok, "mosquitto_pub: {err}");
    let (topic, _) = service
        .next_publish(PROMPT)
        .await
        .expect("the service lost its session to a device");
    assert_eq!(topic, "devices/bed-1/t");
}
