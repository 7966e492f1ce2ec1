//! One device connection: handshake, identity, CONNECT, then a packet filter between the
//! device and the engine that authorizes every PUBLISH and SUBSCRIBE.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use parking_lot::Mutex;
use telemon_model::metrics::{self, Counter};
use telemon_model::DeviceId;
use tokio::io::{AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::time::{sleep_until, timeout, Instant};
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, info_span, warn, Instrument};

use super::gates::Gates;
use super::limits::{LimitState, Permit};
use super::packet::{self, reason, Connect, Frame, FrameCodec, FrameError, PacketError, Protocol};
use super::tls::{normalize_serial, ReloadingAcceptor};
use crate::acl::Acl;
use crate::engine::{Engine, ENGINE_USER};
use crate::pki::{self, IdentitySource};

/// Frames handled before the write buffers are flushed: batches writes under load without
/// holding back a lone packet.
const MAX_BATCH: usize = 64;

/// Initial size of each of the four relay buffers of a connection (reading and writing, device
/// and engine side). Most devices send a reading now and then, and a held connection should
/// cost little: 8 KiB each (the tokio defaults) made a quarter of the memory per connection.
/// A read buffer grows when a larger packet arrives; a larger write goes past its buffer.
const RELAY_BUFFER: usize = 2 * 1024;

/// How long a closing link waits for the engine to close its end (see [`close_engine_link`]).
const LINK_CLOSE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// How long the edge leaves closing a link to the engine after a device's DISCONNECT: the
/// engine nearly always closes it within a millisecond, and a busy one within seconds.
const DISCONNECTED_CLOSE_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Longest a new connection waits for its identity's previous link to close before it is
/// refused as busy. The previous link is told to end at once and its writes give way, so
/// this is reached only if something is stuck.
const GATE_WAIT: std::time::Duration = std::time::Duration::from_secs(15);

/// Longest a write to the engine may make no progress. The engine reads promptly unless it
/// is itself blocked writing back to this link (a device subscribed to what it publishes,
/// sending more than the sockets hold while not reading): then neither side would move again.
const ENGINE_WRITE_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Denials logged at warn level per connection; later ones go to debug so that one
/// misbehaving device cannot flood the log. All are counted.
const DENIALS_LOGGED: u32 = 5;

pub(crate) struct Shared {
    pub engine: Engine,
    pub acl: Acl,
    pub identity: IdentitySource,
    pub limits: LimitState,
    pub tls: Arc<ReloadingAcceptor>,
    pub live: Mutex<HashMap<u64, LiveConnection>>,
    /// One engine link per identity at a time.
    pub gates: Arc<Gates>,
    /// Cancelled at shutdown: stops the accept loop and ends every live connection.
    pub shutdown: CancellationToken,
}

pub(crate) struct LiveConnection {
    serial: Vec<u8>,
    identity: String,
    cancel: CancellationToken,
}

impl Shared {
    /// Ends every live connection whose certificate serial is in `serials`.
    pub fn disconnect_revoked(&self, serials: &HashSet<Vec<u8>>) {
        for conn in self.live.lock().values() {
            if serials.contains(&conn.serial) {
                info!(identity = %conn.identity, "disconnecting revoked certificate");
                conn.cancel.cancel();
            }
        }
    }
}

struct Counters {
    handshake_failed: Counter,
    handshake_timeout: Counter,
    accepted: Counter,
    denied_publish: Counter,
    denied_subscribe: Counter,
    denied_will: Counter,
    withheld: Counter,
    protocol_errors: Counter,
}

fn counters() -> &'static Counters {
    static COUNTERS: std::sync::OnceLock<Counters> = std::sync::OnceLock::new();
    COUNTERS.get_or_init(|| {
        let conn = |result| {
            metrics::counter(
                "telemon_edge_handshakes_total",
                "TLS handshakes at the device listener, by result.",
                &[("result", result)],
            )
        };
        let denied = |action| {
            metrics::counter(
                "telemon_edge_acl_denied_total",
                "Packets refused by the ACL, by action.",
                &[("action", action)],
            )
        };
        Counters {
            handshake_failed: conn("failed"),
            handshake_timeout: conn("timeout"),
            accepted: conn("ok"),
            denied_publish: denied("publish"),
            denied_subscribe: denied("subscribe"),
            denied_will: denied("will"),
            withheld: denied("deliver"),
            protocol_errors: metrics::counter(
                "telemon_edge_protocol_errors_total",
                "Connections closed for malformed or forbidden packets.",
                &[],
            ),
        }
    })
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// True at most once per second, for rate-limited log lines about refused handshakes.
fn log_refusal_now() -> bool {
    static LAST_SECOND: AtomicU64 = AtomicU64::new(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    LAST_SECOND.swap(now, Ordering::Relaxed) != now
}

pub(crate) async fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    permit: Permit,
) {
    let _permit = permit;
    let limits = &shared.limits.config;
    let acceptor = shared.tls.acceptor();
    let tls = match timeout(limits.handshake_timeout, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            counters().handshake_failed.inc();
            // Operators need to see refused devices (revoked, foreign CA, no certificate), but
            // a flood of bad handshakes must not flood the log: one line a second at info.
            if log_refusal_now() {
                info!(%peer, cause = %e, "TLS handshake refused");
            } else {
                debug!(%peer, cause = %e, "TLS handshake refused");
            }
            return;
        }
        Err(_) => {
            counters().handshake_timeout.inc();
            debug!(%peer, "TLS handshake timed out");
            return;
        }
    };

    let Some(cert) = tls.get_ref().1.peer_certificates().and_then(|c| c.first()) else {
        counters().handshake_failed.inc();
        return;
    };
    let (identity, serial) = match identity_of(cert, shared.identity) {
        Ok(found) => found,
        Err(cause) => {
            counters().handshake_failed.inc();
            warn!(%peer, %cause, "certificate carries no usable device identity");
            return;
        }
    };
    counters().accepted.inc();

    let span = info_span!("device", identity = %identity, %peer);
    let session = Session {
        shared: shared.clone(),
        identity,
        serial,
        denials: 0,
        connack_relayed: false,
    };
    session.run(tls).instrument(span).await;
}

fn identity_of(cert: &[u8], source: IdentitySource) -> Result<(String, Vec<u8>), String> {
    let identity = pki::identity_from_cert(cert, source).map_err(|e| e.to_string())?;
    let identity = DeviceId::new(identity).map_err(|e| e.to_string())?;
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).map_err(|e| e.to_string())?;
    let serial = normalize_serial(parsed.tbs_certificate.raw_serial());
    Ok((identity.to_string(), serial))
}

struct Session {
    shared: Arc<Shared>,
    identity: String,
    serial: Vec<u8>,
    denials: u32,
    /// Whether the engine's CONNACK has gone to the device: a server must not send a
    /// DISCONNECT before it (MQTT 5 §3.14.0-1), so until then the edge only closes.
    connack_relayed: bool,
}

/// Why a connection ended, for the log.
#[derive(Clone)]
enum End {
    ClientClosed,
    ClientDisconnected,
    EngineClosed,
    KeepAlive,
    Cancelled,
    TakenOver,
    /// The device stopped reading what it was sent.
    NotReading,
    /// The engine stopped reading what the device sent.
    EngineStalled,
    Refused(u8, String),
}

impl Session {
    async fn run<S>(mut self, tls: S)
    where
        S: tokio::io::AsyncRead + AsyncWrite + Unpin,
    {
        let limits = self.shared.limits.config.clone();
        let (rd, wr) = tokio::io::split(tls);
        let mut client_rx = FramedRead::with_capacity(
            rd,
            FrameCodec {
                max_packet_size: limits.max_packet_size,
            },
            RELAY_BUFFER,
        );
        let mut client_tx = BufWriter::with_capacity(RELAY_BUFFER, wr);

        let connect = match timeout(limits.connect_timeout, client_rx.next()).await {
            Ok(Some(Ok(frame))) => packet::parse_connect(&frame),
            Ok(Some(Err(e))) => return debug!(cause = %e, "closed before CONNECT"),
            Ok(None) => return,
            Err(_) => return debug!("no CONNECT in time"),
        };
        let connect = match connect {
            Ok(connect) => connect,
            Err(e) => {
                counters().protocol_errors.inc();
                warn!(cause = %e, "invalid CONNECT");
                // MQTT 3.1.1 §3.1.2.2: answer an unsupported level with return code 1.
                if let PacketError::UnsupportedProtocol { .. } = e {
                    send_refusal(&mut client_tx, &[0x20, 2, 0, 1]).await;
                }
                return;
            }
        };
        // MQTT 3.1.1 §3.1.3-8: a client without an id cannot resume a session. The edge
        // replaces the id with the certificate identity, so the engine would not notice.
        if connect.client_id.is_empty()
            && !connect.clean_start
            && connect.protocol == Protocol::V311
        {
            debug!("empty client id with a persistent session; refused");
            send_refusal(&mut client_tx, &packet::connack_identifier_rejected()).await;
            return;
        }
        if let Some(will) = &connect.will {
            if !self.shared.acl.can_publish(&self.identity, &will.topic) {
                counters().denied_will.inc();
                warn!(topic = %will.topic, "will topic not allowed; connection refused");
                let refusal = packet::connack_refused(connect.protocol, reason::NOT_AUTHORIZED);
                send_refusal(&mut client_tx, &refusal).await;
                return;
            }
        }

        // Registered from here on, so that a revocation or shutdown reaches this connection
        // while it waits; and checked against the CRL now, as a TLS session made before a
        // revocation would otherwise still get in (the revocation watcher updates the list
        // before it looks for live connections, so one of the two sees the other).
        let cancel = self.shared.shutdown.child_token();
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        self.shared.live.lock().insert(
            id,
            LiveConnection {
                serial: self.serial.clone(),
                identity: self.identity.clone(),
                cancel: cancel.clone(),
            },
        );
        let registered = Registered {
            shared: self.shared.clone(),
            id,
        };
        if self.shared.tls.is_revoked(&self.serial) {
            info!("certificate revoked after its handshake; connection refused");
            let refusal = packet::connack_refused(connect.protocol, reason::NOT_AUTHORIZED);
            send_refusal(&mut client_tx, &refusal).await;
            return;
        }

        // Before the engine hears of this connection, the identity's link open now (if any)
        // is told to close and has closed.
        let taken_over = CancellationToken::new();
        let gates = self.shared.gates.clone();
        let enter = timeout(GATE_WAIT, gates.enter(&self.identity, taken_over.clone()));
        let entered = tokio::select! {
            entered = enter => entered,
            _ = cancel.cancelled() => Ok(None),
        };
        let ticket = match entered {
            Ok(Some(ticket)) => ticket,
            Ok(None) => {
                debug!("a newer connection with this identity came, or an end; closed");
                let _ = timeout(LINK_CLOSE_WAIT, client_tx.shutdown()).await;
                return;
            }
            Err(_) => {
                warn!("the previous link of this identity did not close; connection refused");
                let refusal = packet::connack_refused(connect.protocol, reason::SERVER_BUSY);
                send_refusal(&mut client_tx, &refusal).await;
                return;
            }
        };

        let upstream = match self.connect_engine(&connect).await {
            Ok(upstream) => upstream,
            Err(e) => {
                warn!(cause = %e, "engine unreachable; connection refused");
                let refusal = packet::connack_refused(connect.protocol, reason::SERVER_BUSY);
                send_refusal(&mut client_tx, &refusal).await;
                return;
            }
        };
        debug!(protocol = ?connect.protocol, keep_alive = connect.keep_alive, "connected");

        let (erd, ewr) = upstream.into_split();
        // The engine is trusted and enforces its own payload limit; this bound only guards
        // against a runaway length field.
        let mut engine = EngineLink {
            rx: FramedRead::with_capacity(
                erd,
                FrameCodec {
                    max_packet_size: limits.max_packet_size.max(1 << 20) + 1024,
                },
                RELAY_BUFFER,
            ),
            tx: BufWriter::with_capacity(RELAY_BUFFER, ewr),
        };
        let stop = Stop { cancel, taken_over };
        let end = self
            .relay(&connect, client_rx, &mut client_tx, &mut engine, stop)
            .await;
        if matches!(end, End::ClientDisconnected) {
            // The engine's router ends the link on the DISCONNECT, and must be the one to close
            // it (see `close_engine_link`); however long that takes, the identity's next link
            // need not wait: the router hands a duplicate client id over by itself, and the
            // DISCONNECT queued for the old link touches nothing else.
            drop(ticket);
            self.finish(connect.protocol, end, &mut client_tx).await;
            close_engine_link(engine, true).await;
        } else {
            close_engine_link(engine, false).await;
            drop(ticket);
            self.finish(connect.protocol, end, &mut client_tx).await;
        }
        drop(registered);
    }

    async fn connect_engine(&self, connect: &Connect) -> std::io::Result<TcpStream> {
        let engine = &self.shared.engine;
        let client_id = engine_client_id(&self.identity);
        let mut upstream =
            TcpStream::connect(engine.link_addr(connect.protocol, &client_id)).await?;
        upstream.set_nodelay(true)?;
        let rewritten = packet::encode_connect(connect, &client_id, ENGINE_USER, engine.secret());
        upstream.write_all(&rewritten).await?;
        Ok(upstream)
    }

    async fn relay<W: AsyncWrite + Unpin>(
        &mut self,
        connect: &Connect,
        mut client_rx: FramedRead<impl tokio::io::AsyncRead + Unpin, FrameCodec>,
        client_tx: &mut BufWriter<W>,
        engine: &mut EngineLink,
        stop: Stop,
    ) -> End {
        let protocol = connect.protocol;
        let limits = &self.shared.limits.config;
        let EngineLink {
            rx: engine_rx,
            tx: engine_tx,
        } = engine;
        let idle = keep_alive_limit(connect.keep_alive, limits.max_keep_alive);
        // Writes to the device may stall no longer than the device may stay silent.
        let to_client = Bounded {
            stop: &stop,
            within: idle,
            stalled: End::NotReading,
        };
        let to_engine = Bounded {
            stop: &stop,
            within: ENGINE_WRITE_WAIT,
            stalled: End::EngineStalled,
        };
        let mut deadline = Instant::now() + idle;
        let mut filter = Filter {
            server_keep_alive: server_keep_alive(protocol, connect.keep_alive, idle),
            ..Filter::default()
        };
        // The edge's own answers to packets that came before the engine's CONNACK.
        let mut before_connack: Vec<Bytes> = Vec::new();

        loop {
            tokio::select! {
                frame = client_rx.next() => {
                    deadline = Instant::now() + idle;
                    let mut next = frame;
                    for n in 1..=MAX_BATCH {
                        let frame = match next {
                            Some(Ok(frame)) => frame,
                            Some(Err(FrameError::Packet(e))) => return self.refuse(e),
                            Some(Err(FrameError::Io(_))) | None => return End::ClientClosed,
                        };
                        match self.client_packet(protocol, frame, &mut filter) {
                            Verdict::Forward(bytes) => {
                                let written = to_engine.run(engine_tx.write_all(&bytes));
                                if let Err(end) = written.await {
                                    return end.unwrap_or(End::EngineClosed);
                                }
                            }
                            // The device's first packet from the server must be the CONNACK
                            // (MQTT-3.2.0-1); a device may send before it has one.
                            Verdict::Answer(bytes) if !self.connack_relayed => {
                                before_connack.push(bytes);
                            }
                            Verdict::Answer(bytes) => {
                                let written = to_client.run(client_tx.write_all(&bytes));
                                if let Err(end) = written.await {
                                    return end.unwrap_or(End::ClientClosed);
                                }
                            }
                            Verdict::Drop => {}
                            Verdict::Disconnect(bytes) => {
                                let _ = to_engine.run(send_now(engine_tx, &bytes)).await;
                                return End::ClientDisconnected;
                            }
                            Verdict::Close(end) => return end,
                        }
                        // Take another frame only if this batch will handle it: one taken
                        // after the last iteration would be lost.
                        if n == MAX_BATCH {
                            break;
                        }
                        match client_rx.next().now_or_never() {
                            Some(more) => next = more,
                            None => break,
                        }
                    }
                    if let Err(end) = to_engine.run(engine_tx.flush()).await {
                        return end.unwrap_or(End::EngineClosed);
                    }
                    if let Err(end) = to_client.run(client_tx.flush()).await {
                        return end.unwrap_or(End::ClientClosed);
                    }
                }
                frame = engine_rx.next() => {
                    let mut next = frame;
                    for n in 1..=MAX_BATCH {
                        let Some(Ok(frame)) = next else { return End::EngineClosed };
                        let connack = frame.packet_type() == packet::CONNACK;
                        self.connack_relayed |= connack;
                        match self.delivery(protocol, frame, &mut filter) {
                            Delivery::ToClient(bytes) => {
                                let written = to_client.run(client_tx.write_all(&bytes));
                                if let Err(end) = written.await {
                                    return end.unwrap_or(End::ClientClosed);
                                }
                                // Then what the edge answered before it.
                                let answers = if connack {
                                    std::mem::take(&mut before_connack)
                                } else {
                                    Vec::new()
                                };
                                for bytes in answers {
                                    let written = to_client.run(client_tx.write_all(&bytes));
                                    if let Err(end) = written.await {
                                        return end.unwrap_or(End::ClientClosed);
                                    }
                                }
                            }
                            Delivery::Withheld(Some(ack)) => {
                                let written = to_engine.run(engine_tx.write_all(&ack));
                                if let Err(end) = written.await {
                                    return end.unwrap_or(End::EngineClosed);
                                }
                            }
                            Delivery::Withheld(None) => {}
                        }
                        if n == MAX_BATCH {
                            break;
                        }
                        match engine_rx.next().now_or_never() {
                            Some(more) => next = more,
                            None => break,
                        }
                    }
                    if let Err(end) = to_client.run(client_tx.flush()).await {
                        return end.unwrap_or(End::ClientClosed);
                    }
                    if let Err(end) = to_engine.run(engine_tx.flush()).await {
                        return end.unwrap_or(End::EngineClosed);
                    }
                }
                _ = sleep_until(deadline) => return End::KeepAlive,
                _ = stop.cancel.cancelled() => return End::Cancelled,
                _ = stop.taken_over.cancelled() => return End::TakenOver,
            }
        }
    }

    fn refuse(&self, e: PacketError) -> End {
        End::Refused(e.reason_code(), e.to_string())
    }

    fn client_packet(&mut self, protocol: Protocol, frame: Frame, filter: &mut Filter) -> Verdict {
        match frame.packet_type() {
            packet::PUBLISH => self.check_publish(protocol, frame, filter),
            packet::SUBSCRIBE => self.check_subscribe(protocol, frame, filter),
            packet::DISCONNECT => Verdict::Disconnect(frame.raw),
            packet::PUBACK
            | packet::PUBREC
            | packet::PUBREL
            | packet::PUBCOMP
            | packet::UNSUBSCRIBE
            | packet::PINGREQ => Verdict::Forward(frame.raw),
            other => {
                let e = PacketError::Unexpected(other);
                Verdict::Close(End::Refused(e.reason_code(), e.to_string()))
            }
        }
    }

    fn check_publish(&mut self, protocol: Protocol, frame: Frame, filter: &mut Filter) -> Verdict {
        let mut publish = match packet::parse_publish(&frame, protocol) {
            Ok(p) => p,
            Err(e) => return Verdict::Close(self.refuse(e)),
        };
        // Authorize the topic an alias stands for, tracked exactly as the engine tracks it.
        if let Some(alias) = publish.topic_alias {
            if !publish.topic.is_empty() {
                filter.topic_aliases.insert(alias, publish.topic.clone());
            } else if let Some(topic) = filter.topic_aliases.get(&alias) {
                publish.topic = topic.clone();
            } else {
                return Verdict::Close(End::Refused(0x94, "unknown topic alias".into()));
            }
        }
        if self.shared.acl.can_publish(&self.identity, &publish.topic) {
            return Verdict::Forward(frame.raw);
        }

        counters().denied_publish.inc();
        self.log_denial("publish", &publish.topic);
        match (protocol, publish.packet_id) {
            (Protocol::V5, Some(id)) => Verdict::Answer(packet::publish_refused(
                publish.qos,
                id,
                reason::NOT_AUTHORIZED,
            )),
            (Protocol::V5, None) => Verdict::Drop,
            // MQTT 3.1.1 has no way to refuse one publish: close the connection (§3.3.5).
            (Protocol::V311, _) => Verdict::Close(End::Refused(
                reason::NOT_AUTHORIZED,
                format!("publish to {:?} not allowed", publish.topic),
            )),
        }
    }

    fn check_subscribe(
        &mut self,
        protocol: Protocol,
        frame: Frame,
        filter: &mut Filter,
    ) -> Verdict {
        let subscribe = match packet::parse_subscribe(&frame, protocol) {
            Ok(s) => s,
            Err(e) => return Verdict::Close(self.refuse(e)),
        };
        let allowed: Vec<bool> = subscribe
            .filters
            .iter()
            .map(|(f, _)| self.shared.acl.can_subscribe(&self.identity, f))
            .collect();
        for ((topic, _), ok) in subscribe.filters.iter().zip(&allowed) {
            if !ok {
                counters().denied_subscribe.inc();
                self.log_denial("subscribe", topic);
            }
        }

        if allowed.iter().all(|ok| *ok) {
            return Verdict::Forward(frame.raw);
        }
        if !allowed.iter().any(|ok| *ok) {
            let codes = vec![packet::suback_refused(protocol); allowed.len()];
            return Verdict::Answer(packet::suback(protocol, subscribe.packet_id, &codes));
        }
        let forwarded = packet::encode_subscribe(&subscribe, protocol, &allowed);
        filter.pending_subacks.insert(subscribe.packet_id, allowed);
        Verdict::Forward(forwarded)
    }

    /// What to do with a packet from the engine. A PUBLISH on a topic this device may not read
    /// (possible only when the ACL has `deny` entries narrower than a granted subscription) is
    /// withheld, and acknowledged to the engine on the device's behalf so that the session's
    /// flow stays intact.
    fn delivery(&self, protocol: Protocol, frame: Frame, filter: &mut Filter) -> Delivery {
        let acl = &self.shared.acl;
        match frame.packet_type() {
            packet::PUBLISH if acl.has_deny() => {
                let Ok(publish) = packet::parse_publish(&frame, protocol) else {
                    return Delivery::ToClient(frame.raw);
                };
                let topic = filter.engine_topic(&publish);
                if topic.is_none_or(|t| acl.can_read(&self.identity, t)) {
                    return Delivery::ToClient(frame.raw);
                }
                counters().withheld.inc();
                match (publish.qos, publish.packet_id) {
                    (1, Some(id)) => Delivery::Withheld(Some(packet::ack(packet::PUBACK, id))),
                    (2, Some(id)) => {
                        filter.withheld_qos2.insert(id);
                        Delivery::Withheld(Some(packet::ack(packet::PUBREC, id)))
                    }
                    _ => Delivery::Withheld(None),
                }
            }
            packet::PUBREL if !filter.withheld_qos2.is_empty() => {
                match packet::parse_pubrel(&frame) {
                    Ok(id) if filter.withheld_qos2.remove(&id) => {
                        Delivery::Withheld(Some(packet::ack(packet::PUBCOMP, id)))
                    }
                    _ => Delivery::ToClient(frame.raw),
                }
            }
            _ => Delivery::ToClient(filter.engine_packet(protocol, frame)),
        }
    }

    fn log_denial(&mut self, action: &str, topic: &str) {
        self.denials += 1;
        if self.denials <= DENIALS_LOGGED {
            warn!(action, topic, "denied by ACL");
        } else {
            debug!(action, topic, "denied by ACL");
        }
    }

    async fn finish<W: AsyncWrite + Unpin>(
        &self,
        protocol: Protocol,
        end: End,
        client_tx: &mut BufWriter<W>,
    ) {
        let code = match end {
            End::ClientClosed => return debug!("connection closed by device"),
            End::ClientDisconnected => return debug!("device disconnected"),
            End::EngineClosed => {
                debug!("session ended by the engine (taken over or refused)");
                None
            }
            End::KeepAlive => {
                info!("keepalive expired; disconnecting");
                Some(reason::KEEP_ALIVE_TIMEOUT)
            }
            End::Cancelled => Some(reason::ADMINISTRATIVE_ACTION),
            End::TakenOver => {
                info!("session taken over by a newer connection");
                Some(reason::SESSION_TAKEN_OVER)
            }
            End::NotReading => {
                info!("device stopped reading; disconnecting");
                Some(reason::KEEP_ALIVE_TIMEOUT)
            }
            End::EngineStalled => {
                // Seen with a device subscribed to what it publishes, sending large messages
                // faster than it reads them back.
                warn!("engine link stalled; disconnecting");
                Some(reason::SERVER_BUSY)
            }
            End::Refused(code, detail) => {
                counters().protocol_errors.inc();
                warn!(reason = format_args!("0x{code:02x}"), %detail, "closing connection");
                Some(code)
            }
        };
        // No DISCONNECT before the CONNACK (MQTT 5 §3.14.0-1): such a connection only closes.
        let code = code.filter(|_| self.connack_relayed);
        // Bounded: a device that stopped reading must not hold its connection slot.
        let farewell = async {
            if let Some(bytes) = code.and_then(|c| packet::disconnect(protocol, c)) {
                client_tx.write_all(&bytes).await?;
            }
            client_tx.flush().await?;
            client_tx.shutdown().await
        };
        let _ = timeout(LINK_CLOSE_WAIT, farewell).await;
    }
}

/// A device's link to the engine.
struct EngineLink {
    rx: FramedRead<OwnedReadHalf, FrameCodec>,
    tx: BufWriter<OwnedWriteHalf>,
}

/// What ends a relay from outside: revocation or shutdown, and a newer connection with the
/// same identity.
struct Stop {
    cancel: CancellationToken,
    taken_over: CancellationToken,
}

/// Bounds for the writes of one direction of a relay.
struct Bounded<'a> {
    stop: &'a Stop,
    /// Longest a write may take.
    within: std::time::Duration,
    /// Why the connection ends when it takes longer.
    stalled: End,
}

impl Bounded<'_> {
    /// Waits for a write unless it stalls or the connection is told to end meanwhile: a
    /// device that stopped reading must not keep its link (and with it a reconnect of its
    /// identity) waiting on a full socket. `Err(None)` when the write failed.
    async fn run<T>(
        &self,
        write: impl std::future::Future<Output = std::io::Result<T>>,
    ) -> Result<T, Option<End>> {
        // Most writes complete at once into the buffer: those touch neither a timer nor the
        // tokens. (A future polled once may be polled again later with another waker.)
        let mut write = std::pin::pin!(write);
        if let Some(written) = write.as_mut().now_or_never() {
            return written.map_err(|_| None);
        }
        tokio::select! {
            written = timeout(self.within, write) => match written {
                Ok(Ok(value)) => Ok(value),
                Ok(Err(_)) => Err(None),
                Err(_) => Err(Some(self.stalled.clone())),
            },
            _ = self.stop.cancel.cancelled() => Err(Some(End::Cancelled)),
            _ = self.stop.taken_over.cancelled() => Err(Some(End::TakenOver)),
        }
    }
}

/// Writes and flushes at once.
async fn send_now<W: AsyncWrite + Unpin>(
    tx: &mut BufWriter<W>,
    bytes: &[u8],
) -> std::io::Result<()> {
    tx.write_all(bytes).await?;
    tx.flush().await
}

/// Sends a refusal (a CONNACK with an error code) before closing; bounded, so that a device
/// that does not read cannot hold its connection slot.
async fn send_refusal<W: AsyncWrite + Unpin>(tx: &mut BufWriter<W>, bytes: &[u8]) {
    let _ = timeout(LINK_CLOSE_WAIT, send_now(tx, bytes)).await;
}

/// Removes a connection from the live table when it ends, however it ends.
struct Registered {
    shared: Arc<Shared>,
    id: u64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.shared.live.lock().remove(&self.id);
    }
}

/// Ends an engine link and waits until the engine has closed its end, so that the
/// identity's next link cannot overtake the engine's notice of this one (see
/// [`super::gates`]).
///
/// After a DISCONNECT the engine's router drops the link itself, and the edge only waits (at
/// most [`DISCONNECTED_CLOSE_WAIT`]): were the edge to close first, rumqttd's link could see the
/// closed socket before its router has taken the queued DISCONNECT and send it a second, late
/// notice for a connection id that may by then belong to another device, which the router
/// would then drop (before its CONNACK, poisoning the listener). Otherwise (the device went
/// away, the session was taken over, the edge is closing it) the edge closes its end at once
/// and waits at most [`LINK_CLOSE_WAIT`]: rumqttd tells its router of the lost link (which
/// publishes the will) before it closes the socket.
async fn close_engine_link(link: EngineLink, disconnected: bool) {
    let EngineLink { mut rx, mut tx } = link;
    let wait = match disconnected {
        true => DISCONNECTED_CLOSE_WAIT,
        false => LINK_CLOSE_WAIT,
    };
    let closed = timeout(wait, async {
        let _ = tx.flush().await;
        if !disconnected {
            let _ = tx.shutdown().await;
        }
        while let Some(Ok(_)) = rx.next().await {}
    });
    if closed.await.is_err() {
        warn!(
            ?wait,
            "the engine kept the link open; closed from this side"
        );
    }
}

/// Prefix of every device's client id inside the engine. telemon's own services are clients
/// of the same engine with fixed ids (`telemon-ingest`, ...); without a namespace, a device
/// whose certificate carried such a name would take over that service's session.
pub(crate) const DEVICE_CLIENT_PREFIX: &str = "dev:";

fn engine_client_id(identity: &str) -> String {
    format!("{DEVICE_CLIENT_PREFIX}{identity}")
}

/// The Server Keep Alive to announce in an MQTT 5 CONNACK: when the edge holds the client to
/// a shorter silence than its keepalive asked for (none, or one above the configured maximum),
/// the client is told a keepalive whose 1.5 times fits, so that it pings in time.
fn server_keep_alive(protocol: Protocol, asked: u16, idle: std::time::Duration) -> Option<u16> {
    let asked_idle = std::time::Duration::from_millis(asked as u64 * 1500);
    if protocol != Protocol::V5 || (asked != 0 && asked_idle <= idle) {
        return None;
    }
    let seconds = (idle.as_secs_f64() / 1.5).floor();
    Some(seconds.clamp(1.0, u16::MAX as f64) as u16)
}

/// How long a client may stay silent: 1.5 times its keepalive (MQTT §3.1.2.10), with no
/// keepalive or a very long one capped so that dead sockets are reclaimed.
fn keep_alive_limit(keep_alive: u16, max: std::time::Duration) -> std::time::Duration {
    let asked = std::time::Duration::from_millis(keep_alive as u64 * 1500);
    if keep_alive == 0 {
        max
    } else {
        asked.min(max)
    }
}

/// A packet from the engine: passed to the device, or withheld (with the acknowledgement
/// the edge sends the engine in the device's place, if the QoS needs one).
enum Delivery {
    ToClient(Bytes),
    Withheld(Option<Bytes>),
}

enum Verdict {
    /// Send these bytes to the engine.
    Forward(Bytes),
    /// Answer the client directly; nothing goes to the engine.
    Answer(Bytes),
    Drop,
    /// The client's DISCONNECT: pass it on so that the engine discards the will.
    Disconnect(Bytes),
    Close(End),
}

/// State that spans both directions of one connection.
#[derive(Default)]
struct Filter {
    /// SUBSCRIBE packets forwarded with some filters removed: which positions were kept, so
    /// the engine's SUBACK can be widened back to one code per filter the client sent.
    pending_subacks: HashMap<u16, Vec<bool>>,
    /// MQTT 5 topic aliases the client has set; bounded by the 16-bit alias space.
    topic_aliases: HashMap<u16, String>,
    /// Topic aliases the engine has set towards the device.
    engine_aliases: HashMap<u16, String>,
    /// QoS 2 deliveries withheld from the device, waiting for the engine's PUBREL.
    withheld_qos2: HashSet<u16>,
    /// The Server Keep Alive to add to the engine's CONNACK (MQTT 5), if any.
    server_keep_alive: Option<u16>,
}

impl Filter {
    /// The topic of a PUBLISH from the engine, resolving the aliases it set.
    fn engine_topic<'a>(&'a mut self, publish: &'a packet::Publish) -> Option<&'a str> {
        match publish.topic_alias {
            Some(alias) if publish.topic.is_empty() => {
                self.engine_aliases.get(&alias).map(String::as_str)
            }
            Some(alias) => {
                self.engine_aliases.insert(alias, publish.topic.clone());
                Some(&publish.topic)
            }
            None => Some(&publish.topic),
        }
    }

    fn engine_packet(&mut self, protocol: Protocol, frame: Frame) -> Bytes {
        if frame.packet_type() == packet::CONNACK {
            return match self.server_keep_alive {
                Some(seconds) => packet::connack_with_server_keep_alive(&frame, seconds),
                None => frame.raw,
            };
        }
        if frame.packet_type() != packet::SUBACK || self.pending_subacks.is_empty() {
            return frame.raw;
        }
        let Ok((id, codes)) = packet::parse_suback(&frame, protocol) else {
            return frame.raw;
        };
        let Some(kept) = self.pending_subacks.remove(&id) else {
            return frame.raw;
        };
        let mut engine_codes = codes.into_iter();
        let widened: Vec<u8> = kept
            .iter()
            .map(|k| match k {
                true => engine_codes
                    .next()
                    .unwrap_or(packet::suback_refused(protocol)),
                false => packet::suback_refused(protocol),
            })
            .collect();
        packet::suback(protocol, id, &widened)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn mqtt5_clients_are_told_the_keepalive_the_edge_holds_them_to() {
        let max = Duration::from_secs(3600);
        let told = |asked| server_keep_alive(Protocol::V5, asked, keep_alive_limit(asked, max));
        assert_eq!(
            told(0),
            Some(2400),
            "no keepalive asked: held to the maximum"
        );
        assert_eq!(told(u16::MAX), Some(2400), "more than the maximum");
        assert_eq!(told(60), None, "within the maximum: nothing to say");
        assert_eq!(told(2400), None);
        let v311 = server_keep_alive(Protocol::V311, 0, keep_alive_limit(0, max));
        assert_eq!(v311, None, "3.1.1 has no way to say it");
    }

    #[test]
    fn the_server_keep_alive_is_added_to_the_connacks_properties() {
        // CONNACK: flags 0, success, properties: topic alias maximum (0x22) 10.
        let engine = packet::decode_one(&[0x20, 6, 0, 0, 3, 0x22, 0, 10]).unwrap();
        let mut filter = Filter {
            server_keep_alive: Some(2400),
            ..Filter::default()
        };
        let out = filter.engine_packet(Protocol::V5, engine);
        assert_eq!(&out[..], &[0x20, 9, 0, 0, 6, 0x22, 0, 10, 0x13, 0x09, 0x60]);
    }

    #[test]
    fn keep_alive_is_one_and_a_half_times_with_a_cap() {
        let max = Duration::from_secs(3600);
        assert_eq!(keep_alive_limit(10, max), Duration::from_secs(15));
        assert_eq!(keep_alive_limit(0, max), max);
        assert_eq!(keep_alive_limit(u16::MAX, max), max);
    }

    #[test]
    fn suback_is_widened_to_every_filter_sent() {
        let mut filter = Filter::default();
        filter.pending_subacks.insert(4, vec![false, true, false]);
        let engine_ack = packet::decode_one(&packet::suback(Protocol::V311, 4, &[1])).unwrap();
        let out = filter.engine_packet(Protocol::V311, engine_ack);
        assert_eq!(&out[..], &[0x90, 5, 0, 4, 0x80, 1, 0x80]);
    }

    /// A link to a stand-in engine, and the engine's end of it.
    async fn link_pair() -> (EngineLink, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let edge_end = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (engine_end, _) = listener.accept().await.unwrap();
        let (rd, wr) = edge_end.into_split();
        let link = EngineLink {
            rx: FramedRead::new(
                rd,
                FrameCodec {
                    max_packet_size: 64,
                },
            ),
            tx: BufWriter::new(wr),
        };
        (link, engine_end)
    }

    /// Whether the engine's end reads the end of the stream within `within`.
    async fn sees_end(engine_end: &mut TcpStream, within: Duration) -> bool {
        use tokio::io::AsyncReadExt;

        let mut buf = [0u8; 16];
        matches!(timeout(within, engine_end.read(&mut buf)).await, Ok(Ok(0)))
    }

    #[tokio::test]
    async fn after_a_disconnect_the_engine_closes_the_link_first() {
        let (link, mut engine_end) = link_pair().await;
        let closing = tokio::spawn(close_engine_link(link, true));

        assert!(
            !sees_end(&mut engine_end, Duration::from_secs(1)).await,
            "the edge closed the link before the engine did"
        );
        assert!(!closing.is_finished(), "returned before the engine closed");

        drop(engine_end);
        timeout(Duration::from_secs(1), closing)
            .await
            .expect("returned once the engine closed")
            .expect("no panic");
    }

    #[tokio::test]
    async fn otherwise_the_edge_closes_and_waits_for_the_engine() {
        let (link, mut engine_end) = link_pair().await;
        let closing = tokio::spawn(close_engine_link(link, false));

        assert!(sees_end(&mut engine_end, Duration::from_secs(1)).await);
        assert!(!closing.is_finished(), "returned before the engine closed");

        drop(engine_end);
        timeout(Duration::from_secs(1), closing)
            .await
            .expect("returned once the engine closed")
            .expect("no panic");
    }
}
