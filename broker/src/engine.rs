//! The embedded rumqttd engine: routing, QoS, sessions and retained messages.
//!
//! It listens on loopback ports chosen at start-up and accepts only clients that present a
//! secret generated for this process, which the edge and the in-process services hold. A
//! device can therefore reach it only through the edge.
//!
//! Each protocol has [`LISTENERS`] listeners, and the edge spreads devices across them:
//! a rumqttd listener accepts on one thread and sleeps after every accept (`tokio::time::
//! sleep`, which rounds even a zero delay up to the timer's next millisecond tick), so one
//! listener admits fewer than 1,000 connections a second however idle the machine is.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::distributions::{Alphanumeric, DistString};
use rumqttd::{Config, ConnectionSettings, RouterConfig, ServerSettings};
use telemon_model::bus::BusConfig;
use tracing::error;

use crate::edge::packet::Protocol;

/// The username every engine client presents; the password is the process secret.
pub const ENGINE_USER: &str = "telemon-edge";

/// Listeners (each with its own accept loop and thread) per protocol.
pub const LISTENERS: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("reserving a loopback port for the engine: {0}")]
    Port(std::io::Error),
    #[error("starting the engine thread: {0}")]
    Thread(std::io::Error),
    #[error("the engine did not start listening on {0} within 10 s")]
    NotListening(SocketAddr),
}

/// Engine sizing. The edge enforces the device-facing limits below these.
#[derive(Clone, Debug)]
pub struct EngineSettings {
    pub max_connections: usize,
    pub max_payload_size: usize,
    /// Unacknowledged QoS 1/2 messages in flight per connection. High enough that ingest,
    /// which acknowledges only after a batch is committed, is never starved mid-batch.
    pub max_inflight: usize,
}

impl Default for EngineSettings {
    fn default() -> Self {
        EngineSettings {
            max_connections: 21_000,
            max_payload_size: 256 * 1024,
            max_inflight: 2_000,
        }
    }
}

/// A running engine: where it listens and the secret it wants.
#[derive(Clone)]
pub struct Engine {
    v4: Arc<[SocketAddr]>,
    v5: Arc<[SocketAddr]>,
    secret: Arc<str>,
}

impl Engine {
    /// Starts rumqttd on its own threads and waits until it accepts connections.
    pub fn start(settings: &EngineSettings) -> Result<Engine, EngineError> {
        let secret: Arc<str> = Alphanumeric
            .sample_string(&mut rand::thread_rng(), 40)
            .into();
        let ports = free_loopback_ports(2 * LISTENERS).map_err(EngineError::Port)?;
        let (v4, v5) = ports.split_at(LISTENERS);
        let (v4, v5): (Arc<[SocketAddr]>, Arc<[SocketAddr]>) = (v4.into(), v5.into());
        let config = config(settings, &v4, &v5, &secret);

        std::thread::Builder::new()
            .name("engine".into())
            .spawn(move || {
                let mut broker = rumqttd::Broker::new(config);
                if let Err(e) = broker.start() {
                    error!(cause = %e, "MQTT engine stopped");
                }
            })
            .map_err(EngineError::Thread)?;

        let engine = Engine { v4, v5, secret };
        for addr in engine.v4.iter().chain(engine.v5.iter()) {
            engine.wait_listening(*addr)?;
        }
        Ok(engine)
    }

    fn listeners(&self, protocol: Protocol) -> &[SocketAddr] {
        match protocol {
            Protocol::V311 => &self.v4,
            Protocol::V5 => &self.v5,
        }
    }

    /// The first listener of the protocol: where the in-process services connect.
    pub fn addr(&self, protocol: Protocol) -> SocketAddr {
        self.listeners(protocol)[0]
    }

    /// Where a device's links go: always the same listener for the same client id. Each
    /// rumqttd listener keeps its own table of pending wills, and a reconnect cancels a
    /// delayed will only through the table of the listener it arrives on.
    pub fn link_addr(&self, protocol: Protocol, client_id: &str) -> SocketAddr {
        use std::hash::{Hash, Hasher};

        let listeners = self.listeners(protocol);
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        client_id.hash(&mut hasher);
        listeners[hasher.finish() as usize % listeners.len()]
    }

    pub fn secret(&self) -> &str {
        &self.secret
    }

    /// How an in-process service (ingest, alerts, API) reaches the engine directly.
    pub fn bus(&self) -> BusConfig {
        let addr = self.addr(Protocol::V311);
        BusConfig {
            host: addr.ip().to_string(),
            port: addr.port(),
            tls: None,
            username: Some(ENGINE_USER.to_string()),
            password: Some(self.secret.to_string()),
        }
    }
}

fn config(settings: &EngineSettings, v4: &[SocketAddr], v5: &[SocketAddr], secret: &str) -> Config {
    let server = |name: String, listen| ServerSettings {
        name,
        listen,
        tls: None,
        // rumqttd sleeps this long after every accept; the edge already paces connections.
        next_connection_delay_ms: 0,
        connections: ConnectionSettings {
            connection_timeout_ms: 10_000,
            max_payload_size: settings.max_payload_size,
            max_inflight_count: settings.max_inflight,
            auth: Some(HashMap::from([(
                ENGINE_USER.to_string(),
                secret.to_string(),
            )])),
            external_auth: None,
            dynamic_filters: true,
        },
    };
    let servers = |protocol: &str, addrs: &[SocketAddr]| {
        addrs
            .iter()
            .enumerate()
            .map(|(i, addr)| {
                let name = format!("engine-{protocol}-{i}");
                (name.clone(), server(name, *addr))
            })
            .collect::<HashMap<_, _>>()
    };
    Config {
        id: 0,
        router: RouterConfig {
            max_connections: settings.max_connections,
            max_outgoing_packet_count: 200,
            // Each subscription filter keeps up to count x size bytes in memory; a reader
            // further behind than that skips ahead (rumqttd's CursorJump).
            max_segment_size: 4 * 1024 * 1024,
            max_segment_count: 10,
            ..Default::default()
        },
        v4: Some(servers("v4", v4)),
        v5: Some(servers("v5", v5)),
        ..Default::default()
    }
}

/// `count` distinct free loopback ports: all are held until all are chosen, so that none is
/// handed out twice.
fn free_loopback_ports(count: usize) -> std::io::Result<Vec<SocketAddr>> {
    let held = (0..count)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<Vec<_>>>()?;
    held.iter().map(TcpListener::local_addr).collect()
}

impl Engine {
    /// Waits until the engine answers a real CONNECT on a listener. A bare TCP probe would
    /// make rumqttd log a failed connection at error level.
    fn wait_listening(&self, addr: SocketAddr) -> Result<(), EngineError> {
        let protocol = match self.v4.contains(&addr) {
            true => Protocol::V311,
            false => Protocol::V5,
        };
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            if self.probe(protocol, addr).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(EngineError::NotListening(addr))
    }

    fn probe(&self, protocol: Protocol, addr: SocketAddr) -> std::io::Result<()> {
        use std::io::{Read, Write};

        let timeout = Some(Duration::from_millis(500));
        let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200))?;
        stream.set_read_timeout(timeout)?;
        // A fresh client id per probe. The v4 and v5 listeners share one router, so a reused
        // id makes the router drop one probe as a duplicate; rumqttd 0.20 then leaves a stale
        // will handler behind on the v5 listener, and the next CONNECT with that id panics
        // while holding its lock, which poisons the v5 listener for every later client.
        static PROBES: AtomicU64 = AtomicU64::new(0);
        let n = PROBES.fetch_add(1, Ordering::Relaxed);
        let client_id = format!("telemon-probe-{protocol:?}-{n}");
        let connect =
            crate::edge::packet::probe_connect(protocol, &client_id, ENGINE_USER, &self.secret);
        stream.write_all(&connect)?;
        let mut connack = [0u8; 4];
        stream.read_exact(&mut connack[..2])?;
        // DISCONNECT with no reason code: normal disconnection in both protocol versions.
        // Then the engine closes first (as the edge lets it; see the edge's link closing):
        // closing from here could leave the engine a late notice for a connection id that the
        // next probe already holds.
        stream.write_all(&[0xe0, 0x00])?;
        let mut rest = [0u8; 16];
        while stream.read(&mut rest)? > 0 {}
        Ok(())
    }
}
