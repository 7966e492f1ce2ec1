//! MQTT 3.1.1 and 5 packet framing and the few packet bodies the edge must understand.
//!
//! The edge forwards packets to the engine byte for byte; it parses only what it authorizes
//! (CONNECT, PUBLISH, SUBSCRIBE) and what it writes itself (CONNACK, PUBACK, SUBACK,
//! DISCONNECT). Everything here works on untrusted bytes: every length is checked and every
//! failure is a [`PacketError`], never a panic.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::Decoder;

pub const CONNECT: u8 = 1;
pub const CONNACK: u8 = 2;
pub const PUBLISH: u8 = 3;
pub const PUBACK: u8 = 4;
pub const PUBREC: u8 = 5;
pub const PUBREL: u8 = 6;
pub const PUBCOMP: u8 = 7;
pub const SUBSCRIBE: u8 = 8;
pub const SUBACK: u8 = 9;
pub const UNSUBSCRIBE: u8 = 10;
pub const UNSUBACK: u8 = 11;
pub const PINGREQ: u8 = 12;
pub const PINGRESP: u8 = 13;
pub const DISCONNECT: u8 = 14;
pub const AUTH: u8 = 15;

/// MQTT 5 reason codes the edge sends.
pub mod reason {
    pub const UNSPECIFIED: u8 = 0x80;
    pub const MALFORMED: u8 = 0x81;
    pub const PROTOCOL_ERROR: u8 = 0x82;
    pub const NOT_AUTHORIZED: u8 = 0x87;
    pub const SERVER_BUSY: u8 = 0x89;
    pub const KEEP_ALIVE_TIMEOUT: u8 = 0x8D;
    pub const SESSION_TAKEN_OVER: u8 = 0x8E;
    pub const TOPIC_NAME_INVALID: u8 = 0x90;
    pub const PACKET_TOO_LARGE: u8 = 0x95;
    pub const QUOTA_EXCEEDED: u8 = 0x97;
    pub const ADMINISTRATIVE_ACTION: u8 = 0x98;
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PacketError {
    #[error("malformed remaining length")]
    BadLength,
    #[error("packet of {0} bytes exceeds the maximum packet size")]
    TooLarge(usize),
    #[error("truncated packet")]
    Truncated,
    #[error("invalid UTF-8 string")]
    InvalidUtf8,
    #[error("reserved flags set")]
    ReservedFlags,
    #[error("unsupported protocol {name:?} level {level}")]
    UnsupportedProtocol { name: String, level: u8 },
    #[error("invalid topic name")]
    InvalidTopic,
    #[error("invalid QoS")]
    InvalidQos,
    #[error("unknown property 0x{0:02x}")]
    UnknownProperty(u8),
    #[error("packet has no topic filters")]
    NoFilters,
    #[error("packet type {0} not allowed here")]
    Unexpected(u8),
}

impl PacketError {
    /// The MQTT 5 reason code a DISCONNECT for this error carries.
    pub fn reason_code(&self) -> u8 {
        match self {
            PacketError::TooLarge(_) => reason::PACKET_TOO_LARGE,
            PacketError::InvalidTopic => reason::TOPIC_NAME_INVALID,
            PacketError::Unexpected(_) | PacketError::UnsupportedProtocol { .. } => {
                reason::PROTOCOL_ERROR
            }
            _ => reason::MALFORMED,
        }
    }
}

/// One whole packet as it came off the wire.
#[derive(Clone, Debug)]
pub struct Frame {
    /// The first byte: packet type in the high nibble, flags in the low one.
    pub header: u8,
    /// The whole packet, header included, for forwarding unchanged.
    pub raw: Bytes,
    /// Offset of the variable header in `raw`.
    body_start: usize,
}

impl Frame {
    pub fn packet_type(&self) -> u8 {
        self.header >> 4
    }

    pub fn flags(&self) -> u8 {
        self.header & 0x0f
    }

    pub fn body(&self) -> Bytes {
        self.raw.slice(self.body_start..)
    }
}

/// Splits a byte stream into [`Frame`]s, refusing any packet over `max_packet_size` before
/// buffering it.
#[derive(Clone, Debug)]
pub struct FrameCodec {
    pub max_packet_size: usize,
}

impl Decoder for FrameCodec {
    type Item = Frame;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        if src.len() < 2 {
            return Ok(None);
        }
        let Some((remaining, len_bytes)) = read_varint(&src[1..])? else {
            return Ok(None);
        };
        let total = 1 + len_bytes + remaining;
        if total > self.max_packet_size {
            return Err(PacketError::TooLarge(total).into());
        }
        if src.len() < total {
            src.reserve(total - src.len());
            return Ok(None);
        }
        let raw = src.split_to(total).freeze();
        Ok(Some(Frame {
            header: raw[0],
            raw,
            body_start: 1 + len_bytes,
        }))
    }
}

/// What can end a framed read: the socket, or the bytes on it.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Packet(#[from] PacketError),
}

/// Reads a variable byte integer; `Ok(None)` when more bytes are needed.
fn read_varint(buf: &[u8]) -> Result<Option<(usize, usize)>, PacketError> {
    let mut value = 0usize;
    for (i, byte) in buf.iter().take(4).enumerate() {
        value |= ((byte & 0x7f) as usize) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(Some((value, i + 1)));
        }
    }
    if buf.len() >= 4 {
        return Err(PacketError::BadLength);
    }
    Ok(None)
}

fn get_varint(buf: &mut Bytes) -> Result<usize, PacketError> {
    match read_varint(buf)? {
        Some((value, len)) => {
            buf.advance(len);
            Ok(value)
        }
        None => Err(PacketError::Truncated),
    }
}

fn put_varint(out: &mut BytesMut, mut value: usize) {
    loop {
        let mut byte = (value % 128) as u8;
        value /= 128;
        if value > 0 {
            byte |= 0x80;
        }
        out.put_u8(byte);
        if value == 0 {
            break;
        }
    }
}

fn get_u8(buf: &mut Bytes) -> Result<u8, PacketError> {
    if buf.is_empty() {
        return Err(PacketError::Truncated);
    }
    Ok(buf.get_u8())
}

fn get_u16(buf: &mut Bytes) -> Result<u16, PacketError> {
    if buf.len() < 2 {
        return Err(PacketError::Truncated);
    }
    Ok(buf.get_u16())
}

fn get_binary(buf: &mut Bytes) -> Result<Bytes, PacketError> {
    let len = get_u16(buf)? as usize;
    if buf.len() < len {
        return Err(PacketError::Truncated);
    }
    Ok(buf.split_to(len))
}

/// An MQTT UTF-8 string: valid UTF-8 without U+0000 (MQTT 1.5.4).
fn get_string(buf: &mut Bytes) -> Result<String, PacketError> {
    let bytes = get_binary(buf)?;
    let s = std::str::from_utf8(&bytes).map_err(|_| PacketError::InvalidUtf8)?;
    if s.contains('\0') {
        return Err(PacketError::InvalidUtf8);
    }
    Ok(s.to_string())
}

fn put_binary(out: &mut BytesMut, bytes: &[u8]) {
    out.put_u16(bytes.len() as u16);
    out.put_slice(bytes);
}

/// Splits off an MQTT 5 property block, returned raw with its length prefix removed.
fn get_properties(buf: &mut Bytes) -> Result<Bytes, PacketError> {
    let len = get_varint(buf)?;
    if buf.len() < len {
        return Err(PacketError::Truncated);
    }
    Ok(buf.split_to(len))
}

/// Finds the Topic Alias property (0x23) in a PUBLISH property block, checking that every
/// property in the block is well formed.
fn find_topic_alias(mut props: Bytes) -> Result<Option<u16>, PacketError> {
    let mut alias = None;
    while !props.is_empty() {
        let id = get_varint(&mut props)?;
        match id {
            0x01 | 0x17 | 0x19 | 0x24 | 0x25 | 0x28 | 0x29 | 0x2A => {
                get_u8(&mut props)?;
            }
            0x13 | 0x21 | 0x22 => {
                get_u16(&mut props)?;
            }
            0x23 => alias = Some(get_u16(&mut props)?),
            0x02 | 0x11 | 0x18 | 0x27 => {
                if props.len() < 4 {
                    return Err(PacketError::Truncated);
                }
                props.advance(4);
            }
            0x0B => {
                get_varint(&mut props)?;
            }
            0x03 | 0x08 | 0x12 | 0x15 | 0x1A | 0x1C | 0x1F => {
                get_string(&mut props)?;
            }
            0x09 | 0x16 => {
                get_binary(&mut props)?;
            }
            0x26 => {
                get_string(&mut props)?;
                get_string(&mut props)?;
            }
            other => return Err(PacketError::UnknownProperty(other as u8)),
        }
    }
    Ok(alias)
}

/// The protocol a connection speaks, from its CONNECT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    V311,
    V5,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Will {
    pub topic: String,
    pub qos: u8,
    pub retain: bool,
    properties: Bytes,
    payload: Bytes,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Connect {
    pub protocol: Protocol,
    pub clean_start: bool,
    pub keep_alive: u16,
    pub client_id: String,
    pub will: Option<Will>,
    pub username: Option<String>,
    pub password: Option<Bytes>,
    properties: Bytes,
}

pub fn parse_connect(frame: &Frame) -> Result<Connect, PacketError> {
    if frame.packet_type() != CONNECT {
        return Err(PacketError::Unexpected(frame.packet_type()));
    }
    if frame.flags() != 0 {
        return Err(PacketError::ReservedFlags);
    }
    let mut buf = frame.body();
    let name = get_string(&mut buf)?;
    let level = get_u8(&mut buf)?;
    let protocol = match (name.as_str(), level) {
        ("MQTT", 4) => Protocol::V311,
        ("MQTT", 5) => Protocol::V5,
        _ => return Err(PacketError::UnsupportedProtocol { name, level }),
    };
    let flags = get_u8(&mut buf)?;
    if flags & 0x01 != 0 {
        return Err(PacketError::ReservedFlags);
    }
    let keep_alive = get_u16(&mut buf)?;
    let properties = match protocol {
        Protocol::V5 => get_properties(&mut buf)?,
        Protocol::V311 => Bytes::new(),
    };
    let client_id = get_string(&mut buf)?;
    let will = if flags & 0x04 != 0 {
        let properties = match protocol {
            Protocol::V5 => get_properties(&mut buf)?,
            Protocol::V311 => Bytes::new(),
        };
        let topic = get_string(&mut buf)?;
        check_topic_name(&topic)?;
        let payload = get_binary(&mut buf)?;
        let qos = (flags >> 3) & 0x03;
        if qos > 2 {
            return Err(PacketError::InvalidQos);
        }
        Some(Will {
            topic,
            qos,
            retain: flags & 0x20 != 0,
            properties,
            payload,
        })
    } else {
        if flags & 0x38 != 0 {
            return Err(PacketError::ReservedFlags);
        }
        None
    };
    let username = (flags & 0x80 != 0)
        .then(|| get_string(&mut buf))
        .transpose()?;
    let password = (flags & 0x40 != 0)
        .then(|| get_binary(&mut buf))
        .transpose()?;
    Ok(Connect {
        protocol,
        clean_start: flags & 0x02 != 0,
        keep_alive,
        client_id,
        will,
        username,
        password,
        properties,
    })
}

/// Keepalive the edge asks of the engine. The edge enforces each device's own keepalive
/// itself, and rumqttd refuses a keepalive of 0, so the engine gets the longest one.
pub const ENGINE_KEEP_ALIVE: u16 = u16::MAX;

/// Encodes a CONNECT for the engine, keeping every field of `connect` but its credentials,
/// client id and keepalive: the edge puts in the certificate identity, the engine secret and
/// [`ENGINE_KEEP_ALIVE`].
pub fn encode_connect(connect: &Connect, client_id: &str, username: &str, password: &str) -> Bytes {
    let mut body = BytesMut::new();
    put_binary(&mut body, b"MQTT");
    body.put_u8(match connect.protocol {
        Protocol::V311 => 4,
        Protocol::V5 => 5,
    });
    let mut flags = 0x80 | 0x40;
    if connect.clean_start {
        flags |= 0x02;
    }
    if let Some(will) = &connect.will {
        flags |= 0x04 | (will.qos << 3);
        if will.retain {
            flags |= 0x20;
        }
    }
    body.put_u8(flags);
    body.put_u16(ENGINE_KEEP_ALIVE);
    if connect.protocol == Protocol::V5 {
        put_varint(&mut body, connect.properties.len());
        body.put_slice(&connect.properties);
    }
    put_binary(&mut body, client_id.as_bytes());
    if let Some(will) = &connect.will {
        if connect.protocol == Protocol::V5 {
            put_varint(&mut body, will.properties.len());
            body.put_slice(&will.properties);
        }
        put_binary(&mut body, will.topic.as_bytes());
        put_binary(&mut body, &will.payload);
    }
    put_binary(&mut body, username.as_bytes());
    put_binary(&mut body, password.as_bytes());
    packet(CONNECT << 4, &body)
}

/// A minimal clean-session CONNECT with credentials, for probing the engine.
pub fn probe_connect(protocol: Protocol, client_id: &str, username: &str, password: &str) -> Bytes {
    let connect = Connect {
        protocol,
        clean_start: true,
        keep_alive: 0,
        client_id: String::new(),
        will: None,
        username: None,
        password: None,
        properties: Bytes::new(),
    };
    encode_connect(&connect, client_id, username, password)
}

fn packet(header: u8, body: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(body.len() + 5);
    out.put_u8(header);
    put_varint(&mut out, body.len());
    out.put_slice(body);
    out.freeze()
}

/// A topic name a client may publish to: non-empty, no wildcards (MQTT 4.7.3 and 3.3.2.1).
fn check_topic_name(topic: &str) -> Result<(), PacketError> {
    if topic.is_empty() || topic.contains(['+', '#']) {
        return Err(PacketError::InvalidTopic);
    }
    Ok(())
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Publish {
    /// Empty when the client relies on a topic alias set earlier.
    pub topic: String,
    pub qos: u8,
    pub packet_id: Option<u16>,
    pub topic_alias: Option<u16>,
}

pub fn parse_publish(frame: &Frame, protocol: Protocol) -> Result<Publish, PacketError> {
    let qos = (frame.flags() >> 1) & 0x03;
    if qos > 2 {
        return Err(PacketError::InvalidQos);
    }
    let mut buf = frame.body();
    let topic = get_string(&mut buf)?;
    if topic.contains(['+', '#']) {
        return Err(PacketError::InvalidTopic);
    }
    let packet_id = (qos > 0).then(|| get_u16(&mut buf)).transpose()?;
    let topic_alias = match protocol {
        Protocol::V5 => find_topic_alias(get_properties(&mut buf)?)?,
        Protocol::V311 => None,
    };
    if topic.is_empty() && topic_alias.is_none() {
        return Err(PacketError::InvalidTopic);
    }
    Ok(Publish {
        topic,
        qos,
        packet_id,
        topic_alias,
    })
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subscribe {
    pub packet_id: u16,
    /// Each filter with its options byte.
    pub filters: Vec<(String, u8)>,
    properties: Bytes,
}

pub fn parse_subscribe(frame: &Frame, protocol: Protocol) -> Result<Subscribe, PacketError> {
    if frame.flags() != 0b0010 {
        return Err(PacketError::ReservedFlags);
    }
    let mut buf = frame.body();
    let packet_id = get_u16(&mut buf)?;
    let properties = match protocol {
        Protocol::V5 => get_properties(&mut buf)?,
        Protocol::V311 => Bytes::new(),
    };
    let mut filters = Vec::new();
    while !buf.is_empty() {
        let filter = get_string(&mut buf)?;
        let options = get_u8(&mut buf)?;
        if filter.is_empty() || options & 0x03 > 2 {
            return Err(PacketError::InvalidTopic);
        }
        filters.push((filter, options));
    }
    if filters.is_empty() {
        return Err(PacketError::NoFilters);
    }
    Ok(Subscribe {
        packet_id,
        filters,
        properties,
    })
}

/// Re-encodes a SUBSCRIBE with only some of its filters.
pub fn encode_subscribe(sub: &Subscribe, protocol: Protocol, keep: &[bool]) -> Bytes {
    let mut body = BytesMut::new();
    body.put_u16(sub.packet_id);
    if protocol == Protocol::V5 {
        put_varint(&mut body, sub.properties.len());
        body.put_slice(&sub.properties);
    }
    for ((filter, options), _) in sub.filters.iter().zip(keep).filter(|(_, k)| **k) {
        put_binary(&mut body, filter.as_bytes());
        body.put_u8(*options);
    }
    packet((SUBSCRIBE << 4) | 0b0010, &body)
}

/// The packet id and return codes of a SUBACK from the engine.
pub fn parse_suback(frame: &Frame, protocol: Protocol) -> Result<(u16, Vec<u8>), PacketError> {
    let mut buf = frame.body();
    let packet_id = get_u16(&mut buf)?;
    if protocol == Protocol::V5 {
        get_properties(&mut buf)?;
    }
    Ok((packet_id, buf.to_vec()))
}

/// A SUBACK with one return code per filter.
pub fn suback(protocol: Protocol, packet_id: u16, codes: &[u8]) -> Bytes {
    let mut body = BytesMut::new();
    body.put_u16(packet_id);
    if protocol == Protocol::V5 {
        body.put_u8(0);
    }
    body.put_slice(codes);
    packet(SUBACK << 4, &body)
}

/// The SUBACK failure code for a refused filter in this protocol.
pub fn suback_refused(protocol: Protocol) -> u8 {
    match protocol {
        Protocol::V311 => 0x80,
        Protocol::V5 => reason::NOT_AUTHORIZED,
    }
}

/// An MQTT 5 CONNACK with a Server Keep Alive property (0x13) of `seconds` added, which the
/// client must then use instead of the keepalive it asked for (MQTT 5 §3.2.2.3.14). The
/// CONNACK comes unchanged if it is malformed or already carries one.
pub fn connack_with_server_keep_alive(frame: &Frame, seconds: u16) -> Bytes {
    let body = frame.body();
    let (Some(flags_and_code), Ok(Some((props_len, props_len_size)))) = (
        body.get(..2),
        read_varint(body.get(2..).unwrap_or_default()),
    ) else {
        return frame.raw.clone();
    };
    let props_start = 2 + props_len_size;
    let Some(props) = body.get(props_start..props_start + props_len) else {
        return frame.raw.clone();
    };
    if has_property(props, SERVER_KEEP_ALIVE) {
        return frame.raw.clone();
    }

    let mut out = BytesMut::with_capacity(body.len() + 3);
    out.put_slice(flags_and_code);
    put_varint(&mut out, props_len + 3);
    out.put_slice(props);
    out.put_u8(SERVER_KEEP_ALIVE);
    out.put_u16(seconds);
    out.put_slice(&body[props_start + props_len..]);
    packet(CONNACK << 4, &out)
}

/// MQTT 5 property identifier of Server Keep Alive (a two-byte integer).
const SERVER_KEEP_ALIVE: u8 = 0x13;

/// Whether a CONNACK's properties carry `id`. Only the identifiers a CONNACK may carry are
/// walked; anything else ends the walk as not found.
fn has_property(mut props: &[u8], id: u8) -> bool {
    while let Some((&found, rest)) = props.split_first() {
        if found == id {
            return true;
        }
        let skip = match found {
            // One-byte values.
            0x24 | 0x25 | 0x28 | 0x29 | 0x2A => 1,
            // Two-byte integers.
            0x13 | 0x21 | 0x22 => 2,
            // Four-byte integers.
            0x11 | 0x27 => 4,
            // UTF-8 strings and binary data: a two-byte length first.
            0x12 | 0x15 | 0x16 | 0x1A | 0x1C | 0x1F => match rest.get(..2) {
                Some(len) => 2 + u16::from_be_bytes([len[0], len[1]]) as usize,
                None => return false,
            },
            // User property: two strings.
            0x26 => {
                let Some(first) = rest.get(..2) else {
                    return false;
                };
                let first = 2 + u16::from_be_bytes([first[0], first[1]]) as usize;
                let Some(second) = rest.get(first..first + 2) else {
                    return false;
                };
                first + 2 + u16::from_be_bytes([second[0], second[1]]) as usize
            }
            _ => return false,
        };
        props = rest.get(skip..).unwrap_or_default();
    }
    false
}

/// A CONNACK refusing the connection. `code` is an MQTT 5 reason code; for 3.1.1 it maps to
/// the nearest return code.
pub fn connack_refused(protocol: Protocol, code: u8) -> Bytes {
    match protocol {
        Protocol::V5 => packet(CONNACK << 4, &[0, code, 0]),
        Protocol::V311 => {
            let rc = match code {
                reason::NOT_AUTHORIZED => 5,
                reason::SERVER_BUSY | reason::QUOTA_EXCEEDED => 3,
                _ => 2,
            };
            packet(CONNACK << 4, &[0, rc])
        }
    }
}

/// The MQTT 3.1.1 CONNACK "identifier rejected" (return code 2).
pub fn connack_identifier_rejected() -> Bytes {
    packet(CONNACK << 4, &[0, 2])
}

/// A PUBACK (QoS 1) or PUBREC (QoS 2) carrying an MQTT 5 reason code.
pub fn publish_refused(qos: u8, packet_id: u16, code: u8) -> Bytes {
    let kind = if qos == 2 { PUBREC } else { PUBACK };
    let id = packet_id.to_be_bytes();
    packet(kind << 4, &[id[0], id[1], code])
}

/// A PUBACK, PUBREC or PUBCOMP (`kind`) with success, valid in both protocol versions.
pub fn ack(kind: u8, packet_id: u16) -> Bytes {
    let id = packet_id.to_be_bytes();
    packet(kind << 4, &[id[0], id[1]])
}

/// The packet id of a PUBREL.
pub fn parse_pubrel(frame: &Frame) -> Result<u16, PacketError> {
    get_u16(&mut frame.body())
}

/// A DISCONNECT; MQTT 3.1.1 has no server DISCONNECT, so there the edge only closes.
pub fn disconnect(protocol: Protocol, code: u8) -> Option<Bytes> {
    match protocol {
        Protocol::V5 => Some(packet(DISCONNECT << 4, &[code, 0])),
        Protocol::V311 => None,
    }
}

/// Runs every parser the edge applies to client bytes over `data`, as the edge would: split
/// into frames under a small maximum size, then CONNECT, PUBLISH and SUBSCRIBE parsing in both
/// protocol versions, and the re-encodings the edge sends to the engine. Returns how many
/// frames parsed as a packet; panics only if a re-encoding does not parse back, which is a bug.
/// The entry point of the fuzz target and of the seeded random test below.
#[doc(hidden)]
pub fn exercise(data: &[u8]) -> usize {
    let mut codec = FrameCodec {
        max_packet_size: 4096,
    };
    let mut buf = BytesMut::from(data);
    let mut parsed = 0;
    while let Ok(Some(frame)) = codec.decode(&mut buf) {
        parsed += exercise_frame(&frame);
    }
    parsed
}

fn exercise_frame(frame: &Frame) -> usize {
    let mut parsed = 0;
    if frame.packet_type() == CONNACK {
        let told = connack_with_server_keep_alive(frame, 40);
        assert!(
            decode_one(&told).is_some(),
            "a rewritten CONNACK frames again"
        );
        parsed += 1;
    }
    if let Ok(connect) = parse_connect(frame) {
        let again = encode_connect(&connect, "id", "user", "secret");
        let again = decode_one(&again).and_then(|f| parse_connect(&f).ok());
        assert_eq!(
            again.map(|c| c.will),
            Some(connect.will),
            "CONNECT re-encoding"
        );
        parsed += 1;
    }
    for protocol in [Protocol::V311, Protocol::V5] {
        if parse_publish(frame, protocol).is_ok() {
            parsed += 1;
        }
        if let Ok(sub) = parse_subscribe(frame, protocol) {
            let keep: Vec<bool> = (0..sub.filters.len()).map(|i| i % 2 == 0).collect();
            let again = encode_subscribe(&sub, protocol, &keep);
            let again = decode_one(&again).and_then(|f| parse_subscribe(&f, protocol).ok());
            assert!(again.is_some(), "SUBSCRIBE re-encoding");
            parsed += 1;
        }
        let _ = parse_suback(frame, protocol);
    }
    parsed
}

pub(crate) fn decode_one(bytes: &[u8]) -> Option<Frame> {
    let mut codec = FrameCodec {
        max_packet_size: usize::MAX,
    };
    codec.decode(&mut BytesMut::from(bytes)).ok().flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(bytes: &[u8]) -> Result<Option<Frame>, FrameError> {
        let mut buf = BytesMut::from(bytes);
        FrameCodec {
            max_packet_size: 1024,
        }
        .decode(&mut buf)
    }

    fn whole(bytes: &[u8]) -> Frame {
        frame(bytes).unwrap().unwrap()
    }

    fn connect_v4(flags: u8, payload: &[u8]) -> Vec<u8> {
        let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, flags, 0, 60];
        body.extend_from_slice(payload);
        let mut p = vec![0x10, body.len() as u8];
        p.extend(body);
        p
    }

    #[test]
    fn frames_wait_for_whole_packets() {
        assert!(frame(&[0x30]).unwrap().is_none());
        assert!(frame(&[0x30, 5, 0, 1]).unwrap().is_none());
        assert!(frame(&[0x30, 0x80]).unwrap().is_none());
        let f = whole(&[0xc0, 0]);
        assert_eq!(f.packet_type(), PINGREQ);
    }

    #[test]
    fn refuses_oversize_and_overlong_lengths_before_buffering() {
        let err = frame(&[0x30, 0xff, 0xff, 0x7f]).unwrap_err();
        assert!(matches!(err, FrameError::Packet(PacketError::TooLarge(_))));
        let err = frame(&[0x30, 0xff, 0xff, 0xff, 0xff, 0x01]).unwrap_err();
        assert!(matches!(err, FrameError::Packet(PacketError::BadLength)));
    }

    #[test]
    fn connect_round_trips_with_new_credentials() {
        let raw = connect_v4(0x02 | 0x04 | 0x08, b"\0\x03dev\0\x01t\0\x02hi");
        let c = parse_connect(&whole(&raw)).unwrap();
        assert_eq!(c.client_id, "dev");
        assert_eq!(c.will.as_ref().unwrap().topic, "t");
        assert_eq!(c.will.as_ref().unwrap().qos, 1);
        let out = encode_connect(&c, "bed-7", "edge", "secret");
        let again = parse_connect(&whole(&out)).unwrap();
        assert_eq!(again.client_id, "bed-7");
        assert_eq!(again.username.as_deref(), Some("edge"));
        assert_eq!(again.password.as_deref(), Some(&b"secret"[..]));
        assert_eq!(again.will, c.will);
        assert!(again.clean_start);
    }

    #[test]
    fn connect_refuses_bad_protocols_and_flags() {
        let mut raw = connect_v4(0x02, b"\0\0");
        raw[8] = 3;
        assert!(matches!(
            parse_connect(&whole(&raw)),
            Err(PacketError::UnsupportedProtocol { .. })
        ));
        let raw = connect_v4(0x03, b"\0\0");
        assert_eq!(parse_connect(&whole(&raw)), Err(PacketError::ReservedFlags));
        let raw = connect_v4(0x02, b"\0\x02\xff\xfe");
        assert_eq!(parse_connect(&whole(&raw)), Err(PacketError::InvalidUtf8));
        let raw = connect_v4(0x02 | 0x04, b"\0\0\0\x01#\0\0");
        assert_eq!(parse_connect(&whole(&raw)), Err(PacketError::InvalidTopic));
        let raw = connect_v4(0x02 | 0x80, b"\0\0");
        assert_eq!(parse_connect(&whole(&raw)), Err(PacketError::Truncated));
    }

    #[test]
    fn publish_topics_are_checked() {
        let p = parse_publish(&whole(b"\x32\x07\0\x03a/b\0\x01"), Protocol::V311).unwrap();
        assert_eq!((p.topic.as_str(), p.qos, p.packet_id), ("a/b", 1, Some(1)));
        let empty = whole(b"\x30\x02\0\0");
        assert_eq!(
            parse_publish(&empty, Protocol::V311),
            Err(PacketError::InvalidTopic)
        );
        let wild = whole(b"\x30\x03\0\x01#");
        assert_eq!(
            parse_publish(&wild, Protocol::V311),
            Err(PacketError::InvalidTopic)
        );
        let qos3 = whole(b"\x36\x03\0\x01a");
        assert_eq!(
            parse_publish(&qos3, Protocol::V311),
            Err(PacketError::InvalidQos)
        );
        let bad_utf8 = whole(b"\x30\x04\0\x02\xc3\x28");
        assert_eq!(
            parse_publish(&bad_utf8, Protocol::V311),
            Err(PacketError::InvalidUtf8)
        );
    }

    #[test]
    fn publish_v5_reads_topic_alias() {
        let p = parse_publish(&whole(b"\x30\x06\0\0\x03\x23\0\x07"), Protocol::V5).unwrap();
        assert_eq!(p.topic_alias, Some(7));
        let no_alias = whole(b"\x30\x03\0\0\0");
        assert_eq!(
            parse_publish(&no_alias, Protocol::V5),
            Err(PacketError::InvalidTopic)
        );
        let unknown = whole(b"\x30\x06\0\x01a\x02\x7f\0");
        assert_eq!(
            parse_publish(&unknown, Protocol::V5),
            Err(PacketError::UnknownProperty(0x7f))
        );
    }

    #[test]
    fn subscribe_keeps_only_allowed_filters() {
        let raw = b"\x82\x0c\0\x05\0\x01a\x01\0\x03b/#\x00";
        let sub = parse_subscribe(&whole(raw), Protocol::V311).unwrap();
        assert_eq!(sub.filters, vec![("a".into(), 1), ("b/#".into(), 0)]);
        let out = encode_subscribe(&sub, Protocol::V311, &[false, true]);
        let again = parse_subscribe(&whole(&out), Protocol::V311).unwrap();
        assert_eq!(again.filters, vec![("b/#".into(), 0)]);
        assert_eq!(again.packet_id, 5);
        let bad_flags = whole(b"\x80\x06\0\x01\0\x01a\0");
        assert_eq!(
            parse_subscribe(&bad_flags, Protocol::V311),
            Err(PacketError::ReservedFlags)
        );
        let none = whole(b"\x82\x02\0\x01");
        assert_eq!(
            parse_subscribe(&none, Protocol::V311),
            Err(PacketError::NoFilters)
        );
    }

    #[test]
    fn written_packets_parse_back() {
        let ack = whole(&suback(Protocol::V5, 9, &[0, 0x87]));
        assert_eq!(
            parse_suback(&ack, Protocol::V5).unwrap(),
            (9, vec![0, 0x87])
        );
        assert_eq!(
            &connack_refused(Protocol::V311, reason::NOT_AUTHORIZED)[..],
            &[0x20, 2, 0, 5]
        );
        assert_eq!(
            &publish_refused(1, 0x0102, 0x87)[..],
            &[0x40, 3, 1, 2, 0x87]
        );
        assert!(disconnect(Protocol::V311, reason::MALFORMED).is_none());
    }

    /// Seeds: one valid packet of each kind the edge parses, to mutate.
    fn seeds() -> Vec<Vec<u8>> {
        vec![
            connect_v4(
                0x02 | 0x04 | 0x08 | 0x80 | 0x40,
                b"\0\x03dev\0\x01t\0\x02hi\0\x01u\0\x01p",
            ),
            b"\x32\x07\0\x03a/b\0\x01".to_vec(),
            b"\x30\x06\0\0\x03\x23\0\x07".to_vec(),
            b"\x82\x0c\0\x05\0\x01a\x01\0\x03b/#\x00".to_vec(),
            b"\x82\x0d\0\x05\0\0\x01a\x01\0\x03b/#\x00".to_vec(),
            // MQTT 5 CONNACK: topic alias maximum, a user property.
            b"\x20\x0e\0\0\x0b\x22\x10\0\x26\0\x01k\0\x01v\x21".to_vec(),
        ]
    }

    #[test]
    fn seeded_random_bytes_never_panic_the_parsers() {
        use rand::{Rng, SeedableRng};

        let mut rng = rand::rngs::StdRng::seed_from_u64(0x07e1_e303);
        let seeds = seeds();
        let mut parsed = 0;
        for round in 0..4000 {
            let data = if round % 2 == 0 {
                let len = rng.gen_range(0..64);
                (0..len).map(|_| rng.gen()).collect()
            } else {
                let mut data = seeds[rng.gen_range(0..seeds.len())].clone();
                for _ in 0..rng.gen_range(1..4) {
                    let at = rng.gen_range(0..data.len());
                    data[at] = rng.gen();
                }
                data
            };
            parsed += exercise(&data);
        }
        // The mutated seeds must reach the body parsers, not only the framing.
        assert!(parsed > 500, "only {parsed} frames parsed");
        assert!(seeds.iter().all(|s| exercise(s) > 0));
    }
}
