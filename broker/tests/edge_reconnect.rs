//! Devices that disconnect and reconnect at once, many at a time: every connect gets its
//! CONNACK and every publish its PUBACK. The engine reuses connection ids, and a late notice
//! of one device's old link must never end another device's new one.

mod common;

use common::{mqtt, Broker};

const DEVICES: usize = 8;
const CYCLES: usize = 10;

/// Connects, publishes at QoS 1, disconnects; `Err` names the step that failed.
async fn cycle(broker: &Broker, device: &common::Device, topic: &str) -> Result<(), String> {
    let (mut raw, connack) = broker
        .raw(device, &mqtt::connect(4, "", 30, None, None))
        .await;
    if connack != [0x20, 2, 0, 0] {
        return Err(format!("CONNACK {connack:?}"));
    }
    raw.send_lossy(&mqtt::publish(4, topic.as_bytes(), Some(7), b"1"))
        .await;
    match raw.recv().await {
        Some(puback) if puback == [0x40, 2, 0, 7] => {}
        other => return Err(format!("instead of the PUBACK: {other:?}")),
    }
    raw.send_lossy(&[0xe0, 0]).await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn devices_reconnecting_at_once_are_never_dropped() {
    let broker = std::sync::Arc::new(Broker::start().await);
    let workers = (0..DEVICES).map(|n| {
        let broker = broker.clone();
        tokio::spawn(async move {
            let id = format!("bed-{n}");
            let device = broker.device(&id);
            let topic = format!("devices/{id}/t");
            let mut failures = Vec::new();
            for _ in 0..CYCLES {
                if let Err(e) = cycle(&broker, &device, &topic).await {
                    failures.push(format!("{id}: {e}"));
                }
            }
            failures
        })
    });

    let mut failures = Vec::new();
    for worker in workers {
        failures.extend(worker.await.expect("no panic"));
    }

    assert!(
        failures.is_empty(),
        "{} of {} cycles failed, first: {:?}",
        failures.len(),
        DEVICES * CYCLES,
        failures.first()
    );
    let late = broker.device("bed-late");
    assert_eq!(
        cycle(&broker, &late, "devices/bed-late/t").await,
        Ok(()),
        "a new device gets in afterwards"
    );
}

/// bed-1 connected with `keep_alive` and subscribed to its commands.
async fn subscribed_to_commands(
    broker: &Broker,
    device: &common::Device,
    keep_alive: u16,
) -> common::Raw {
    let (mut raw, connack) = broker
        .raw(device, &mqtt::connect(4, "", keep_alive, None, None))
        .await;
    assert_eq!(connack, [0x20, 2, 0, 0]);
    raw.send(&mqtt::subscribe(4, 1, &["devices/bed-1/commands/#"]))
        .await;
    assert_eq!(raw.recv().await, Some(vec![0x90, 3, 0, 1, 1]));
    raw
}

/// 25 MiB of commands to bed-1 from a service client: more than the sockets between the edge
/// and a device that does not read them can hold.
async fn send_more_commands_than_sockets_hold(broker: &Broker) {
    let sender = broker.observer("nothing/#").await;
    let command = vec![b'x'; 64 * 1024];
    for _ in 0..400 {
        sender
            .client
            .publish(
                "devices/bed-1/commands/x",
                rumqttc::QoS::AtMostOnce,
                false,
                command.clone(),
            )
            .await
            .expect("queued");
    }
}

/// A device whose old connection stopped reading (its socket full of commands it never
/// read) reconnects: the new connection takes the session over at once.
#[tokio::test(flavor = "multi_thread")]
async fn a_reconnect_takes_over_from_a_connection_that_stopped_reading() {
    let broker = Broker::start().await;
    let device = broker.device("bed-1");
    let stalled = subscribed_to_commands(&broker, &device, 60).await;

    send_more_commands_than_sockets_hold(&broker).await;
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;

    let connect = mqtt::connect(4, "", 60, None, None);
    let reconnect = broker.raw(&device, &connect);
    let (_fresh, connack) = tokio::time::timeout(common::PROMPT, reconnect)
        .await
        .expect("the new connection answered");
    assert_eq!(connack, [0x20, 2, 0, 0]);
    drop(stalled);
}

/// A device subscribed to its own commands sends large ones faster than it reads them back:
/// the edge blocks writing to the engine while the engine blocks writing back. The device's
/// next connection still gets in.
#[tokio::test(flavor = "multi_thread")]
async fn a_device_flooding_itself_cannot_lock_out_its_identity() {
    let broker = Broker::start().await;
    let device = broker.device("bed-1");
    let mut flooding = subscribed_to_commands(&broker, &device, 60).await;

    // Never read back; the writes stop once every socket on the way is full.
    let command = mqtt::publish(4, b"devices/bed-1/commands/x", None, &[b'x'; 200_000]);
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        for _ in 0..100 {
            flooding.send_lossy(&command).await;
        }
    })
    .await;
    drop(flooding);
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;

    let connect = mqtt::connect(4, "", 60, None, None);
    let (_fresh, connack) = tokio::time::timeout(common::PROMPT, broker.raw(&device, &connect))
        .await
        .expect("the new connection answered");
    assert_eq!(connack, [0x20, 2, 0, 0]);
}

/// A device that stops reading is disconnected after 1.5 x its keepalive, as a silent one is,
/// even while the edge is blocked writing to it.
#[tokio::test(flavor = "multi_thread")]
async fn a_device_that_stops_reading_is_disconnected_within_its_keepalive() {
    let broker = Broker::start().await;
    let device = broker.device("bed-1");
    let stalled = subscribed_to_commands(&broker, &device, 2).await;

    send_more_commands_than_sockets_hold(&broker).await;

    common::eventually("the stalled device disconnected", common::PROMPT, || {
        broker.edge.connections() == 0
    })
    .await;
    drop(stalled);
}

/// A TLS session opened before its certificate was revoked cannot start an MQTT session
/// afterwards.
#[tokio::test(flavor = "multi_thread")]
async fn a_connection_made_before_a_revocation_gets_no_session_after_it() {
    let broker = Broker::start().await;
    let device = broker.device("bed-1");
    let early = broker
        .tls(Some(&device))
        .await
        .expect("handshake before the revocation");
    let mut early = common::Raw::from_stream(early);

    broker.pki.revoke("bed-1").unwrap();
    // The edge reloads the CRL within a second of the change.
    tokio::time::sleep(std::time::Duration::from_millis(2_500)).await;

    early
        .send_lossy(&mqtt::connect(4, "", 30, None, None))
        .await;
    let answer = early.recv().await;
    assert!(
        answer.as_deref().is_none_or(|p| p != [0x20, 2, 0, 0]),
        "accepted after revocation: {answer:?}"
    );
    assert_eq!(broker.edge.connections(), 0);
}

/// A device may send before it has its CONNACK; the edge's own answers (here a refused
/// subscription) still come after it: a server's first packet is the CONNACK.
#[tokio::test(flavor = "multi_thread")]
async fn the_edges_own_answers_never_come_before_the_connack() {
    let broker = Broker::start().await;
    let device = broker.device("bed-1");
    for level in [4u8, 5] {
        let stream = broker.tls(Some(&device)).await.expect("handshake");
        let mut raw = common::Raw::from_stream(stream);
        let mut both = mqtt::connect(level, "", 30, None, None);
        both.extend(mqtt::subscribe(level, 1, &["devices/bed-2/#"]));
        raw.send(&both).await;

        let first = raw.recv().await.expect("a packet");
        assert_eq!(first[0], 0x20, "MQTT {level}: first packet {first:?}");
        let second = raw.recv().await.expect("the SUBACK");
        assert_eq!(second[0], 0x90, "MQTT {level}: second packet {second:?}");
        // 0x80 (failure) on 3.1.1, 0x87 (not authorized) on MQTT 5.
        let refused = if level == 4 { 0x80 } else { 0x87 };
        assert_eq!(second.last(), Some(&refused), "MQTT {level}: {second:?}");
    }
}
