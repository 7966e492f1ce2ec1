//! Malformed and hostile packets after a valid CONNECT: each closes only its own connection,
//! with the MQTT 5 reason code that names the fault, and a bystander keeps working.

mod common;

use common::{connected, mqtt, wait_for, Broker};
use rumqttc::{Incoming, QoS};

/// (what, bytes, MQTT 5 reason code of the DISCONNECT)
fn hostile_packets() -> Vec<(&'static str, Vec<u8>, u8)> {
    vec![
        ("CONNACK from a client", vec![0x20, 2, 0, 0], 0x82),
        ("SUBACK from a client", vec![0x90, 3, 0, 1, 0], 0x82),
        ("PINGRESP from a client", vec![0xd0, 0], 0x82),
        (
            "a second CONNECT",
            mqtt::connect(5, "", 30, None, None),
            0x82,
        ),
        (
            "PUBLISH with an empty topic and no alias",
            vec![0x30, 3, 0, 0, 0],
            0x90,
        ),
        (
            "a topic longer than its packet",
            vec![0x30, 3, 0, 5, b'a'],
            0x81,
        ),
        (
            "a five-byte remaining length",
            vec![0x30, 0xff, 0xff, 0xff, 0xff, 0x01],
            0x81,
        ),
        (
            "a 256 MB remaining length",
            vec![0x30, 0xff, 0xff, 0xff, 0x7f],
            0x95,
        ),
        (
            "invalid UTF-8 in the topic",
            vec![0x30, 5, 0, 2, 0xc3, 0x28, 0],
            0x81,
        ),
        (
            "a wildcard in a PUBLISH topic",
            mqtt::publish(5, b"devices/bed-1/#", None, b""),
            0x90,
        ),
    ]
}

#[tokio::test(flavor = "multi_thread")]
async fn each_hostile_packet_closes_only_its_connection() {
    let broker = Broker::start().await;
    let attacker = broker.device("bed-1");
    let other = broker.device("bed-2");
    let (bystander, mut events) = connected(broker.options(&other, "bed-2")).await;

    for (what, bytes, code) in hostile_packets() {
        for level in [4u8, 5] {
            let (mut raw, connack) = broker
                .raw(&attacker, &mqtt::connect(level, "", 30, None, None))
                .await;
            assert_eq!(connack[3], 0, "{what}: CONNACK");

            // Every packet above is invalid in both versions; 3.1.1 has no server
            // DISCONNECT, so there the edge only closes.
            raw.send_lossy(&bytes).await;
            let seen = raw.until_closed().await;
            let expected = match level {
                5 => vec![vec![0xe0, 2, code, 0]],
                _ => vec![],
            };
            assert_eq!(seen, expected, "{what} at level {level}");
        }

        bystander
            .publish("devices/bed-2/t", QoS::AtLeastOnce, false, "still here")
            .await
            .unwrap();
        wait_for(&mut events, |p| matches!(p, Incoming::PubAck(_))).await;
    }
    assert_eq!(broker.edge.connections(), 1, "only the bystander is left");
}
