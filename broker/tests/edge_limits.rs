//! Limits under load and attack: keepalive with the will, idle sockets that never handshake,
//! total and per-address connection limits, maximum packet size.

mod common;

use std::time::{Duration, Instant};

use common::{connected, eventually, fails_within, mqtt, wait_for, Broker, PROMPT};
use rumqttc::{Incoming, QoS};
use telemon_broker::edge::Limits;
use tokio::net::TcpStream;

#[tokio::test(flavor = "multi_thread")]
async fn a_silent_client_is_dropped_after_one_and_a_half_keepalives_and_its_will_published() {
    let broker = Broker::start().await;
    let device = broker.device("bed-1");
    let mut observer = broker.observer("devices/#").await;

    let will = Some(("devices/bed-1/status", &b"offline"[..]));
    let (mut raw, connack) = broker
        .raw(&device, &mqtt::connect(4, "", 2, None, will))
        .await;
    assert_eq!(connack, [0x20, 2, 0, 0]);
    let start = Instant::now();

    let (topic, payload) = observer
        .next_publish(Duration::from_secs(8))
        .await
        .expect("the will after the keepalive ran out");
    let waited = start.elapsed();
    assert_eq!(
        (topic.as_str(), payload.as_slice()),
        ("devices/bed-1/status", &b"offline"[..])
    );
    // 1.5 x 2 s: not before the keepalive, and well within a generous bound after it.
    assert!(
        waited >= Duration::from_secs(2),
        "dropped early, after {waited:?}"
    );
    assert!(
        waited < Duration::from_secs(8),
        "dropped late, after {waited:?}"
    );
    assert!(raw.until_closed().await.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn five_hundred_idle_sockets_do_not_keep_a_device_out() {
    let broker = Broker::start().await;
    let device = broker.device("bed-1");

    let mut idle = Vec::new();
    for _ in 0..500 {
        idle.push(
            TcpStream::connect(("127.0.0.1", broker.port()))
                .await
                .unwrap(),
        );
    }

    // wait_for fails the test if the CONNACK does not come within PROMPT.
    let (client, mut events) = connected(broker.options(&device, "bed-1")).await;
    client
        .publish("devices/bed-1/t", QoS::AtLeastOnce, false, "1")
        .await
        .unwrap();
    wait_for(&mut events, |p| matches!(p, Incoming::PubAck(_))).await;
    assert_eq!(broker.edge.connections(), 1);
    drop(idle);
}

/// Whether a device gets through the handshake and a CONNACK with a raw client.
async fn can_connect(broker: &Broker, device: &common::Device) -> bool {
    let Ok(stream) = broker.tls(Some(device)).await else {
        return false;
    };
    let mut raw = common::Raw::from_stream(stream);
    raw.send_lossy(&mqtt::connect(4, "", 30, None, None)).await;
    raw.recv().await == Some(vec![0x20, 2, 0, 0])
}

async fn refuses_over_limit_then_frees_the_slot(limits: Limits) {
    let broker = Broker::start_with(limits, None).await;
    let devices: Vec<_> = ["bed-1", "bed-2", "bed-3"]
        .iter()
        .map(|id| broker.device(id))
        .collect();
    let (_a, a_events) = connected(broker.options(&devices[0], "a")).await;
    let (b, mut b_events) = connected(broker.options(&devices[1], "b")).await;

    assert!(!can_connect(&broker, &devices[2]).await, "over the limit");

    // The first client leaves; its slot serves the next connection.
    drop(a_events);
    eventually("the slot freed", PROMPT, || broker.edge.connections() == 1).await;
    assert!(can_connect(&broker, &devices[2]).await, "the freed slot");

    b.publish("devices/bed-2/t", QoS::AtLeastOnce, false, "1")
        .await
        .unwrap();
    wait_for(&mut b_events, |p| matches!(p, Incoming::PubAck(_))).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_total_connection_limit_refuses_cleanly_and_frees_slots() {
    let limits = Limits {
        max_connections: 2,
        ..Limits::default()
    };
    refuses_over_limit_then_frees_the_slot(limits).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_per_address_limit_refuses_cleanly_and_frees_slots() {
    let limits = Limits {
        max_per_address: 2,
        ..Limits::default()
    };
    refuses_over_limit_then_frees_the_slot(limits).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_packet_over_the_maximum_size_closes_that_connection_only() {
    let limits = Limits {
        max_packet_size: 1024,
        ..Limits::default()
    };
    let broker = Broker::start_with(limits, None).await;
    let big = broker.device("bed-1");
    let other = broker.device("bed-2");
    let mut observer = broker.observer("devices/#").await;
    let (bystander, mut bystander_events) = connected(broker.options(&other, "bed-2")).await;

    let (mut raw, _) = broker
        .raw(&big, &mqtt::connect(5, "", 30, None, None))
        .await;
    raw.send_lossy(&mqtt::publish(5, b"devices/bed-1/t", Some(1), &[7u8; 2000]))
        .await;
    assert_eq!(raw.until_closed().await, vec![vec![0xe0, 2, 0x95, 0]]);

    // 3.1.1 through rumqttc: closed, nothing forwarded.
    let (client, mut events) = connected(broker.options(&big, "bed-1")).await;
    client
        .publish("devices/bed-1/t", QoS::AtLeastOnce, false, vec![7u8; 2000])
        .await
        .unwrap();
    assert!(fails_within(&mut events, PROMPT).await);
    assert!(observer
        .next_publish(Duration::from_millis(300))
        .await
        .is_none());

    bystander
        .publish("devices/bed-2/t", QoS::AtLeastOnce, false, vec![1u8; 500])
        .await
        .unwrap();
    wait_for(&mut bystander_events, |p| matches!(p, Incoming::PubAck(_))).await;
    assert_eq!(
        observer.next_publish(PROMPT).await.unwrap().0,
        "devices/bed-2/t"
    );
}

/// An MQTT 5 client that asks for no keepalive is held to the edge's maximum silence, and its
/// CONNACK says so (Server Keep Alive); one that asks for a shorter one is told nothing.
#[tokio::test(flavor = "multi_thread")]
async fn mqtt5_clients_are_told_the_server_keep_alive() {
    let limits = Limits {
        max_keep_alive: Duration::from_secs(60),
        ..Limits::default()
    };
    let broker = Broker::start_with(limits, None).await;
    let device = broker.device("bed-1");

    // The engine's CONNACK as it comes: flags, reason, properties.
    let (short, plain) = broker
        .raw(&device, &mqtt::connect(5, "", 30, None, None))
        .await;
    assert_eq!(plain[..4], [0x20, plain[1], 0, 0], "accepted: {plain:?}");
    drop(short);

    let (_none, told) = broker
        .raw(&device, &mqtt::connect(5, "", 0, None, None))
        .await;
    // 60 s of silence at most: a keepalive of 40 s, 1.5 times of which fits, as one more
    // property (0x13) after the engine's.
    let mut expected = plain.clone();
    expected[1] += 3;
    expected[4] += 3;
    expected.extend([0x13, 0, 40]);
    assert_eq!(told, expected);
}
