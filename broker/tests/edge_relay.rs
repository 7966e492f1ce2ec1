//! The relay under bursts: packets arriving back to back in both directions are forwarded
//! whole and in order, however many come in one read.

mod common;

use common::{mqtt, Broker, PROMPT};
use rumqttc::QoS;

const BURST: u16 = 300;
const COMMANDS: u16 = 90;

#[tokio::test(flavor = "multi_thread")]
async fn a_burst_of_publishes_is_forwarded_and_acknowledged_in_full() {
    let broker = Broker::start().await;
    let device = broker.device("bed-1");
    let mut observer = broker.observer("devices/#").await;
    let (mut raw, _) = broker
        .raw(&device, &mqtt::connect(4, "", 30, None, None))
        .await;

    // One write: the edge reads these in batches, device to engine.
    let burst: Vec<u8> = (1..=BURST)
        .flat_map(|id| mqtt::publish(4, b"devices/bed-1/t", Some(id), &id.to_be_bytes()))
        .collect();
    raw.send(&burst).await;

    for id in 1..=BURST {
        let ack = raw.recv().await.expect("a PUBACK");
        assert_eq!(
            ack,
            [0x40, 2, (id >> 8) as u8, id as u8],
            "PUBACKs in order"
        );
        let (_, payload) = observer.next_publish(PROMPT).await.expect("forwarded");
        assert_eq!(payload, id.to_be_bytes(), "publishes in order");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_burst_of_commands_reaches_the_device_in_full() {
    let broker = Broker::start().await;
    let device = broker.device("bed-1");
    let observer = broker.observer("unused/#").await;
    let (mut raw, _) = broker
        .raw(&device, &mqtt::connect(4, "", 30, None, None))
        .await;
    raw.send(&mqtt::subscribe(4, 1, &["devices/bed-1/commands/#"]))
        .await;
    assert_eq!(raw.recv().await, Some(vec![0x90, 3, 0, 1, 1]));

    // QoS 0 both ways: the engine writes them back to back, engine to device. More than one
    // relay batch (64), fewer than the engine's own QoS 0 burst limit here (about 100).
    for i in 0..COMMANDS {
        let topic = "devices/bed-1/commands/set";
        observer
            .client
            .publish(topic, QoS::AtMostOnce, false, i.to_be_bytes().to_vec())
            .await
            .unwrap();
    }
    for i in 0..COMMANDS {
        let publish = raw.recv().await.expect("a command");
        assert_eq!(
            &publish[publish.len() - 2..],
            &i.to_be_bytes(),
            "command {i}"
        );
    }
}
