//! Authorization at the edge: every PUBLISH, SUBSCRIBE and will is checked against the ACL
//! before the engine sees it, with the refusal each protocol version allows.

mod common;

use std::time::Duration;

use common::{connected, fails_within, mqtt, wait_for, Broker, PROMPT};
use rumqttc::{Incoming, QoS, SubscribeReasonCode};

const QUIET: Duration = Duration::from_millis(300);

#[tokio::test(flavor = "multi_thread")]
async fn v311_publish_to_another_devices_topic_closes_the_connection() {
    let broker = Broker::start().await;
    let device = broker.device("bed-1");
    let mut observer = broker.observer("devices/#").await;
    let (client, mut events) = connected(broker.options(&device, "bed-1")).await;

    client
        .publish("devices/bed-1/t", QoS::AtLeastOnce, false, "own")
        .await
        .unwrap();
    wait_for(&mut events, |p| matches!(p, Incoming::PubAck(_))).await;
    assert_eq!(
        observer.next_publish(PROMPT).await.unwrap().0,
        "devices/bed-1/t"
    );

    client
        .publish("devices/bed-2/t", QoS::AtLeastOnce, false, "theirs")
        .await
        .unwrap();
    assert!(
        fails_within(&mut events, PROMPT).await,
        "connection stayed open"
    );
    assert!(observer.next_publish(QUIET).await.is_none());
}

#[tokio::test(flavor = "multi_thread")]
async fn v5_publish_to_another_devices_topic_gets_puback_0x87_and_stays_connected() {
    let broker = Broker::start().await;
    let device = broker.device("bed-1");
    let mut observer = broker.observer("devices/#").await;
    let (mut raw, connack) = broker
        .raw(&device, &mqtt::connect(5, "", 30, None, None))
        .await;
    assert_eq!(&connack[..4], &[0x20, connack[1], 0, 0], "CONNACK success");

    raw.send(&mqtt::publish(5, b"devices/bed-2/t", Some(7), b"x"))
        .await;
    assert_eq!(raw.recv().await, Some(vec![0x40, 3, 0, 7, 0x87]));
    // QoS 0 denial: dropped silently, the connection stays.
    raw.send(&mqtt::publish(5, b"devices/bed-2/t", None, b"x"))
        .await;

    raw.send(&mqtt::publish(5, b"devices/bed-1/t", Some(8), b"ok"))
        .await;
    let ack = raw.recv().await.expect("PUBACK for the own topic");
    assert_eq!(&ack[..4], &[0x40, ack[1], 0, 8]);
    assert!(ack.len() == 4 || ack[4] == 0, "PUBACK success: {ack:?}");
    assert_eq!(
        observer.next_publish(PROMPT).await.unwrap().0,
        "devices/bed-1/t"
    );
    assert!(observer.next_publish(QUIET).await.is_none());
}

#[tokio::test(flavor = "multi_thread")]
async fn subscribing_to_another_devices_commands_is_refused() {
    let broker = Broker::start().await;
    let device = broker.device("bed-1");

    // 3.1.1 through rumqttc: SUBACK failure 0x80.
    let (client, mut events) = connected(broker.options(&device, "bed-1")).await;
    client
        .subscribe("devices/bed-2/commands/#", QoS::AtLeastOnce)
        .await
        .unwrap();
    let mut codes = None;
    wait_for(&mut events, |p| match p {
        Incoming::SubAck(ack) => {
            codes = Some(ack.return_codes.clone());
            true
        }
        _ => false,
    })
    .await;
    assert_eq!(codes, Some(vec![SubscribeReasonCode::Failure]));

    // MQTT 5: SUBACK 0x87.
    let other = broker.device("bed-3");
    let (mut raw, _) = broker
        .raw(&other, &mqtt::connect(5, "", 30, None, None))
        .await;
    raw.send(&mqtt::subscribe(5, 3, &["devices/bed-2/commands/#"]))
        .await;
    assert_eq!(raw.recv().await, Some(vec![0x90, 4, 0, 3, 0, 0x87]));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_partial_subscribe_gets_mixed_codes_and_only_the_allowed_filter() {
    let broker = Broker::start().await;
    let device = broker.device("bed-1");
    let observer = broker.observer("unused/#").await;

    for level in [4u8, 5] {
        let (mut raw, _) = broker
            .raw(&device, &mqtt::connect(level, "", 30, None, None))
            .await;
        let filters = ["devices/bed-2/commands/#", "devices/bed-1/commands/#"];
        raw.send(&mqtt::subscribe(level, 9, &filters)).await;
        let ack = raw.recv().await.expect("SUBACK");
        let refused = if level == 5 { 0x87 } else { 0x80 };
        assert_eq!(
            &ack[ack.len() - 2..],
            &[refused, 1],
            "level {level}: {ack:?}"
        );

        observer
            .client
            .publish(
                "devices/bed-1/commands/reboot",
                QoS::AtLeastOnce,
                false,
                "now",
            )
            .await
            .unwrap();
        observer
            .client
            .publish(
                "devices/bed-2/commands/reboot",
                QoS::AtLeastOnce,
                false,
                "no",
            )
            .await
            .unwrap();
        let delivered = raw.recv().await.expect("the allowed command");
        assert_eq!(delivered[0] >> 4, 3, "a PUBLISH: {delivered:?}");
        assert!(contains(&delivered, b"devices/bed-1/commands/reboot"));
    }
    drop(observer);
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_will_on_a_foreign_topic_is_refused_at_connect() {
    let broker = Broker::start().await;
    let device = broker.device("bed-1");

    let will = Some(("devices/bed-2/status", &b"offline"[..]));
    let (mut raw, connack) = broker
        .raw(&device, &mqtt::connect(4, "", 30, None, will))
        .await;
    assert_eq!(connack, [0x20, 2, 0, 5], "3.1.1: not authorized");
    assert!(raw.until_closed().await.is_empty());

    let (mut raw, connack) = broker
        .raw(&device, &mqtt::connect(5, "", 30, None, will))
        .await;
    assert_eq!(connack, [0x20, 3, 0, 0x87, 0], "MQTT 5: not authorized");
    assert!(raw.until_closed().await.is_empty());

    let own = Some(("devices/bed-1/status", &b"offline"[..]));
    let (_raw, connack) = broker
        .raw(&device, &mqtt::connect(4, "", 30, None, own))
        .await;
    assert_eq!(connack, [0x20, 2, 0, 0], "own will topic accepted");
}

const GATEWAY_ACL: &str = "\
pattern write devices/%c/#
pattern read devices/%c/commands/#
user gw-1
topic write zigbee2mqtt/#
topic read zigbee2mqtt/bridge/request/#
";

#[tokio::test(flavor = "multi_thread")]
async fn a_gateway_publishes_where_the_acl_file_grants_it() {
    let broker = Broker::start_with(Default::default(), Some(GATEWAY_ACL)).await;
    let gateway = broker.device("gw-1");
    let device = broker.device("bed-1");
    let mut observer = broker.observer("zigbee2mqtt/#").await;

    let (gw, mut gw_events) = connected(broker.options(&gateway, "gw-1")).await;
    gw.publish("zigbee2mqtt/kitchen-plug", QoS::AtLeastOnce, false, "{}")
        .await
        .unwrap();
    wait_for(&mut gw_events, |p| matches!(p, Incoming::PubAck(_))).await;
    assert_eq!(
        observer.next_publish(PROMPT).await.unwrap().0,
        "zigbee2mqtt/kitchen-plug"
    );
    gw.subscribe("zigbee2mqtt/bridge/request/#", QoS::AtLeastOnce)
        .await
        .unwrap();
    let mut codes = None;
    wait_for(&mut gw_events, |p| match p {
        Incoming::SubAck(ack) => {
            codes = Some(ack.return_codes.clone());
            true
        }
        _ => false,
    })
    .await;
    assert_eq!(
        codes,
        Some(vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)])
    );

    // An ordinary device gets no such grant.
    let (dev, mut dev_events) = connected(broker.options(&device, "bed-1")).await;
    dev.publish("zigbee2mqtt/kitchen-plug", QoS::AtLeastOnce, false, "{}")
        .await
        .unwrap();
    assert!(fails_within(&mut dev_events, PROMPT).await);
    assert!(observer.next_publish(QUIET).await.is_none());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_deny_inside_a_granted_subscription_is_withheld_at_delivery() {
    let acl = "topic readwrite #\nuser watcher\ntopic deny secret/#\n";
    let broker = Broker::start_with(Default::default(), Some(acl)).await;
    let watcher = broker.device("watcher");
    let publisher = broker.device("pub-1");

    // The subscription overlaps the deny without lying inside it, so it stands (as in
    // Mosquitto); one wholly inside the deny is refused.
    let (watch, mut watch_events) = connected(broker.options(&watcher, "watcher")).await;
    watch.subscribe("#", QoS::AtLeastOnce).await.unwrap();
    watch.subscribe("secret/+", QoS::AtLeastOnce).await.unwrap();
    let mut codes = Vec::new();
    while codes.len() < 2 {
        match tokio::time::timeout(PROMPT, watch_events.poll()).await {
            Ok(Ok(rumqttc::Event::Incoming(Incoming::SubAck(ack)))) => {
                codes.extend(ack.return_codes)
            }
            Ok(Ok(_)) => {}
            other => panic!("no SUBACK: {other:?}"),
        }
    }
    assert!(
        matches!(codes[0], SubscribeReasonCode::Success(_)),
        "{codes:?}"
    );
    assert_eq!(codes[1], SubscribeReasonCode::Failure, "{codes:?}");

    let (client, mut events) = connected(broker.options(&publisher, "pub-1")).await;
    for (topic, qos) in [
        ("secret/a", QoS::AtLeastOnce),
        ("secret/b", QoS::AtLeastOnce),
        ("open/a", QoS::AtLeastOnce),
    ] {
        client.publish(topic, qos, false, "x").await.unwrap();
    }
    tokio::spawn(async move { while events.poll().await.is_ok() {} });

    // Only the open topic reaches the watcher; the withheld messages were
    // acknowledged for it, so the next delivery still arrives in order.
    let mut received = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while tokio::time::Instant::now() < deadline {
        if let Ok(Ok(rumqttc::Event::Incoming(Incoming::Publish(p)))) =
            tokio::time::timeout(QUIET, watch_events.poll()).await
        {
            received.push(p.topic.clone());
            if p.topic == "open/a" {
                break;
            }
        }
    }
    assert_eq!(received, vec!["open/a".to_string()]);
    client
        .publish("open/b", QoS::AtLeastOnce, false, "y")
        .await
        .unwrap();
    let next = loop {
        match tokio::time::timeout(PROMPT, watch_events.poll()).await {
            Ok(Ok(rumqttc::Event::Incoming(Incoming::Publish(p)))) => break p.topic,
            Ok(Ok(_)) => {}
            other => panic!("watcher stopped receiving: {other:?}"),
        }
    };
    assert_eq!(next, "open/b");
}
