//! The few MQTT 3.1.1 packets a load generator needs, encoded straight into a buffer and
//! split off a read buffer without copying payloads: CONNECT/CONNACK, PUBLISH and its
//! acknowledgements at QoS 1 and 2, SUBSCRIBE/SUBACK and DISCONNECT.
//!
//! A general client library (rumqttc) allocates per message and keeps one packet in flight
//! per `poll`; this codec lets a connection pipeline a whole window of publishes into one
//! write.

use bytes::{Buf, BufMut, BytesMut};

/// Packet types (the high nibble of the first byte).
pub const CONNACK: u8 = 2;
pub const PUBLISH: u8 = 3;
pub const PUBACK: u8 = 4;
pub const PUBREC: u8 = 5;
pub const PUBREL: u8 = 6;
pub const PUBCOMP: u8 = 7;
pub const SUBSCRIBE: u8 = 8;
pub const SUBACK: u8 = 9;
pub const PINGREQ: u8 = 12;
pub const DISCONNECT: u8 = 14;

/// The largest remaining length MQTT can express (four length bytes).
const MAX_REMAINING: usize = 268_435_455;

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("malformed remaining length")]
    Length,
    #[error("malformed {0} packet")]
    Malformed(&'static str),
}

/// One packet split off the read buffer: its first byte and its body.
#[derive(Debug)]
pub struct Packet {
    pub header: u8,
    pub body: BytesMut,
}

impl Packet {
    pub fn kind(&self) -> u8 {
        self.header >> 4
    }

    /// QoS of a PUBLISH (bits 1-2 of the first byte).
    pub fn qos(&self) -> u8 {
        (self.header >> 1) & 3
    }
}

fn put_remaining(out: &mut BytesMut, mut len: usize) {
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        out.put_u8(byte);
        if len == 0 {
            return;
        }
    }
}

/// CONNECT with a clean session and no keepalive (the broker's own idle cap applies; a run
/// is far shorter), MQTT 3.1.1.
pub fn connect(out: &mut BytesMut, client_id: &str) {
    let id = client_id.as_bytes();
    out.put_u8(0x10);
    put_remaining(out, 10 + 2 + id.len());
    out.put_slice(&[0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 0]);
    out.put_u16(id.len() as u16);
    out.put_slice(id);
}

/// PUBLISH at `qos`; `id` is ignored at QoS 0, which carries none.
pub fn publish(out: &mut BytesMut, topic: &str, qos: u8, id: u16, payload: &[u8]) {
    let id_len = if qos > 0 { 2 } else { 0 };
    out.put_u8(0x30 | (qos << 1));
    put_remaining(out, 2 + topic.len() + id_len + payload.len());
    out.put_u16(topic.len() as u16);
    out.put_slice(topic.as_bytes());
    if qos > 0 {
        out.put_u16(id);
    }
    out.put_slice(payload);
}

/// PUBACK, PUBREC, PUBREL or PUBCOMP for packet `id`.
pub fn ack(out: &mut BytesMut, kind: u8, id: u16) {
    // PUBREL is the one acknowledgement with reserved flags 0b0010.
    let flags = if kind == PUBREL { 0x02 } else { 0 };
    out.put_u8(kind << 4 | flags);
    out.put_u8(2);
    out.put_u16(id);
}

pub fn subscribe(out: &mut BytesMut, id: u16, filter: &str, qos: u8) {
    out.put_u8(0x82);
    put_remaining(out, 2 + 2 + filter.len() + 1);
    out.put_u16(id);
    out.put_u16(filter.len() as u16);
    out.put_slice(filter.as_bytes());
    out.put_u8(qos);
}

pub fn disconnect(out: &mut BytesMut) {
    out.put_slice(&[DISCONNECT << 4, 0]);
}

/// Splits the next whole packet off `buf`; `None` until one has fully arrived.
pub fn next_packet(buf: &mut BytesMut) -> Result<Option<Packet>, WireError> {
    let mut len = 0usize;
    for i in 0..4 {
        let Some(&byte) = buf.get(1 + i) else {
            return Ok(None);
        };
        len |= ((byte & 0x7f) as usize) << (7 * i);
        if byte & 0x80 == 0 {
            if len > MAX_REMAINING {
                return Err(WireError::Length);
            }
            if buf.len() < 2 + i + len {
                return Ok(None);
            }
            let header = buf[0];
            buf.advance(2 + i);
            let body = buf.split_to(len);
            return Ok(Some(Packet { header, body }));
        }
    }
    Err(WireError::Length)
}

/// The packet id of an acknowledgement (PUBACK .. PUBCOMP).
pub fn ack_id(packet: &Packet) -> Result<u16, WireError> {
    match packet.body.get(..2) {
        Some(b) => Ok(u16::from_be_bytes([b[0], b[1]])),
        None => Err(WireError::Malformed("acknowledgement")),
    }
}

/// A PUBLISH's packet id (0 at QoS 0) and payload.
pub fn publish_parts(packet: &Packet) -> Result<(u16, &[u8]), WireError> {
    let body = &packet.body[..];
    let bad = WireError::Malformed("PUBLISH");
    let topic_len = match body.get(..2) {
        Some(b) => u16::from_be_bytes([b[0], b[1]]) as usize,
        None => return Err(bad),
    };
    let mut at = 2 + topic_len;
    let mut id = 0;
    if packet.qos() > 0 {
        let b = body
            .get(at..at + 2)
            .ok_or(WireError::Malformed("PUBLISH"))?;
        id = u16::from_be_bytes([b[0], b[1]]);
        at += 2;
    }
    let payload = body.get(at..).ok_or(bad)?;
    Ok((id, payload))
}

/// The return code of a CONNACK (0 is accepted).
pub fn connack_code(packet: &Packet) -> Result<u8, WireError> {
    match packet.body.get(1) {
        Some(&code) if packet.kind() == CONNACK => Ok(code),
        _ => Err(WireError::Malformed("CONNACK")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_round_trips_at_every_qos() {
        for qos in 0..=2u8 {
            let mut buf = BytesMut::new();
            publish(&mut buf, "bench/a", qos, 513, b"payload");
            let packet = next_packet(&mut buf).unwrap().unwrap();
            assert!(buf.is_empty());
            assert_eq!((packet.kind(), packet.qos()), (PUBLISH, qos));
            let (id, payload) = publish_parts(&packet).unwrap();
            assert_eq!(id, if qos > 0 { 513 } else { 0 });
            assert_eq!(payload, b"payload");
        }
    }

    #[test]
    fn long_payloads_use_a_multi_byte_length() {
        let mut buf = BytesMut::new();
        let payload = vec![7u8; 20_000];
        publish(&mut buf, "t", 1, 1, &payload);
        assert_eq!(buf[1] & 0x80, 0x80);
        let packet = next_packet(&mut buf).unwrap().unwrap();
        assert_eq!(publish_parts(&packet).unwrap().1.len(), 20_000);
    }

    #[test]
    fn partial_packets_wait_for_the_rest() {
        let mut whole = BytesMut::new();
        ack(&mut whole, PUBACK, 9);
        ack(&mut whole, PUBREL, 10);
        let mut buf = BytesMut::from(&whole[..3]);
        assert!(next_packet(&mut buf).unwrap().is_none());
        buf.extend_from_slice(&whole[3..]);
        let first = next_packet(&mut buf).unwrap().unwrap();
        assert_eq!((first.kind(), ack_id(&first).unwrap()), (PUBACK, 9));
        let second = next_packet(&mut buf).unwrap().unwrap();
        assert_eq!((second.header, ack_id(&second).unwrap()), (0x62, 10));
        assert!(next_packet(&mut buf).unwrap().is_none());
    }

    #[test]
    fn hostile_input_is_an_error_not_a_panic() {
        let mut endless = BytesMut::from(&[0x30, 0xff, 0xff, 0xff, 0xff, 0x01][..]);
        assert_eq!(next_packet(&mut endless).unwrap_err(), WireError::Length);

        let short = Packet {
            header: 0x32,
            body: BytesMut::from(&[0, 9, b'x'][..]),
        };
        assert!(publish_parts(&short).is_err());
        let empty_ack = Packet {
            header: 0x40,
            body: BytesMut::new(),
        };
        assert!(ack_id(&empty_ack).is_err());
    }

    #[test]
    fn connect_and_subscribe_encode_what_brokers_expect() {
        let mut buf = BytesMut::new();
        connect(&mut buf, "bench-pub-1");
        assert_eq!(&buf[..2], &[0x10, 10 + 2 + 11]);
        assert_eq!(&buf[2..10], b"\0\x04MQTT\x04\x02");

        let mut buf = BytesMut::new();
        subscribe(&mut buf, 1, "bench/#", 1);
        assert_eq!(&buf[..], b"\x82\x0c\0\x01\0\x07bench/#\x01");

        let connack = Packet {
            header: 0x20,
            body: BytesMut::from(&[0, 5][..]),
        };
        assert_eq!(connack_code(&connack).unwrap(), 5);
    }
}
