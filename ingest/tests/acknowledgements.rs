//! Acknowledgements across a reconnect, against a scripted broker on a loopback port.
//!
//! A packet id names a message only on the connection that delivered it. The broker here
//! delivers message A as packet 1 and drops the connection before ingest has stored A; on the
//! next connection it has lost the session and delivers a different message B as packet 1.
//! An acknowledgement of A sent on the new connection would tell the broker that B is stored
//! when it is not, and B would be lost if ingest stopped before storing it.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use telemon_ingest::decode::Decoder;
use telemon_ingest::service::{self, IngestSettings};
use telemon_model::bus::BusConfig;
use telemon_model::health::Health;
use telemon_store::{ReadingQuery, Store};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const CONNECT: u8 = 0x10;
const PUBACK: u8 = 0x40;
const SUBSCRIBE: u8 = 0x80;

/// One MQTT packet: the type nibble and the body after the remaining length.
async fn read_packet(stream: &mut TcpStream) -> (u8, Vec<u8>) {
    let first = stream.read_u8().await.expect("a packet");
    let (mut length, mut shift) = (0usize, 0);
    loop {
        let byte = stream.read_u8().await.expect("a remaining length");
        length |= ((byte & 0x7f) as usize) << shift;
        shift += 7;
        if byte & 0x80 == 0 {
            break;
        }
    }
    let mut body = vec![0; length];
    stream.read_exact(&mut body).await.expect("a packet body");
    (first & 0xf0, body)
}

fn packet_id(body: &[u8]) -> u16 {
    u16::from_be_bytes([body[0], body[1]])
}

/// Answers CONNECT, then SUBSCRIBE, as a broker without the client's session.
async fn accept_and_subscribe(listener: &TcpListener) -> TcpStream {
    let (mut stream, _) = listener.accept().await.expect("ingest connecting");
    let (kind, _) = read_packet(&mut stream).await;
    assert_eq!(kind, CONNECT);
    stream.write_all(&[0x20, 2, 0, 0]).await.unwrap();
    loop {
        let (kind, body) = read_packet(&mut stream).await;
        assert_ne!(
            kind, PUBACK,
            "an acknowledgement before any message on this connection"
        );
        if kind == SUBSCRIBE {
            let [hi, lo] = packet_id(&body).to_be_bytes();
            stream.write_all(&[0x90, 3, hi, lo, 0x01]).await.unwrap();
            return stream;
        }
    }
}

/// A QoS 1 PUBLISH of one heart rate reading of `bed-1` at `ts` (epoch milliseconds).
async fn publish(stream: &mut TcpStream, pkid: u16, heart_rate: u32, ts: i64) {
    let topic = b"devices/bed-1/telemetry";
    let payload = format!(r#"{{"heart_rate": {heart_rate}, "ts": {ts}}}"#);
    let mut packet = vec![0x32, (2 + topic.len() + 2 + payload.len()) as u8];
    packet.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    packet.extend_from_slice(topic);
    packet.extend_from_slice(&pkid.to_be_bytes());
    packet.extend_from_slice(payload.as_bytes());
    stream.write_all(&packet).await.unwrap();
}

async fn heart_rates(store: &Store) -> Vec<f64> {
    let query = ReadingQuery {
        device: "bed-1".into(),
        metric: None,
        from: None,
        to: None,
        bucket_secs: None,
        limit: 10,
    };
    let mut values: Vec<f64> = store
        .readings(&query)
        .await
        .expect("reading back")
        .iter()
        .filter_map(|r| r.value.as_f64())
        .collect();
    values.sort_by(f64::total_cmp);
    values
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_acknowledgement_after_reconnect_acknowledges_an_unstored_message() {
    let dir = std::env::temp_dir().join(format!("telemon-ingest-acks-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let store = Store::connect(&format!("sqlite:{}", dir.join("store.db").display()))
        .await
        .unwrap();
    store.migrate().await.unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let bus = BusConfig::from_url(&format!("mqtt://127.0.0.1:{port}")).unwrap();
    service::start(
        bus,
        IngestSettings::new(dir.join("spool")),
        Arc::new(Decoder::native_only()),
        store.clone(),
        Health::default(),
    )
    .await
    .unwrap();
    let ts = Utc::now().timestamp_millis() - 60_000;

    // Message A as packet 1, and the connection gone before ingest can store it (a batch
    // waits for company first).
    let mut first = accept_and_subscribe(&listener).await;
    publish(&mut first, 1, 61, ts).await;
    drop(first);

    // The session lost: another message, B, as packet 1. The first acknowledgement of packet
    // 1 on this connection must come after B is stored.
    let mut second = accept_and_subscribe(&listener).await;
    publish(&mut second, 1, 62, ts + 1).await;
    let acknowledged = async {
        loop {
            let (kind, body) = read_packet(&mut second).await;
            if kind == PUBACK {
                return packet_id(&body);
            }
        }
    };
    let pkid = tokio::time::timeout(Duration::from_secs(30), acknowledged)
        .await
        .expect("B acknowledged");
    assert_eq!(pkid, 1);
    assert!(
        heart_rates(&store).await.contains(&62.0),
        "packet 1 acknowledged on the new connection before its message B was stored"
    );
    assert_eq!(heart_rates(&store).await, [61.0, 62.0]);

    let _ = std::fs::remove_dir_all(&dir);
}
