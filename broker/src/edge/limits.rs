//! Connection limits, applied in the accept loop before any TLS work is done.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::Deserialize;
use telemon_model::metrics::{self, Counter, Gauge};

/// Bounds on what devices may hold open. Defaults suit one broker on a small machine.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Connections held at once, all devices together. rumqttd's own limit sits above this,
    /// so the engine never reaches the point where it has panicked.
    pub max_connections: usize,
    /// Connections from one source address: one misbehaving host cannot take every slot.
    /// Gateways and NAT put many devices behind one address, hence the generous default.
    pub max_per_address: usize,
    /// New connections accepted per second (burst of the same size): full handshakes cost
    /// CPU, and a reconnect storm must not starve connected devices.
    pub handshakes_per_second: u32,
    /// Time a client has to finish the TLS handshake.
    #[serde(with = "secs")]
    pub handshake_timeout: Duration,
    /// Time a client has after the handshake to send CONNECT.
    #[serde(with = "secs")]
    pub connect_timeout: Duration,
    /// Largest MQTT packet accepted, header included.
    pub max_packet_size: usize,
    /// Idle limit for clients that ask for no keepalive (0) or a very long one.
    #[serde(with = "secs")]
    pub max_keep_alive: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 20_000,
            max_per_address: 12_000,
            handshakes_per_second: 5_000,
            handshake_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            max_packet_size: 256 * 1024,
            max_keep_alive: Duration::from_secs(3600),
        }
    }
}

mod secs {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_secs_f64(f64::deserialize(d)?))
    }
}

struct Bucket {
    tokens: f64,
    last: Instant,
}

pub(crate) struct LimitState {
    pub config: Limits,
    inner: Arc<Mutex<Counts>>,
    bucket: Mutex<Bucket>,
    open: Gauge,
    refused_total: Counter,
    refused_address: Counter,
    refused_rate: Counter,
}

#[derive(Default)]
struct Counts {
    total: usize,
    per_address: HashMap<IpAddr, usize>,
}

/// A held connection slot; freed when dropped, however the connection ends.
pub(crate) struct Permit {
    ip: IpAddr,
    counts: Arc<Mutex<Counts>>,
    open: Gauge,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut counts = self.counts.lock();
        counts.total -= 1;
        if let Some(n) = counts.per_address.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                counts.per_address.remove(&self.ip);
            }
        }
        self.open.add(-1);
    }
}

impl LimitState {
    pub fn new(config: Limits) -> Self {
        let refused = |limit| {
            metrics::counter(
                "telemon_edge_connections_refused_total",
                "Connections refused by a limit before the TLS handshake.",
                &[("limit", limit)],
            )
        };
        LimitState {
            bucket: Mutex::new(Bucket {
                tokens: config.handshakes_per_second as f64,
                last: Instant::now(),
            }),
            config,
            inner: Default::default(),
            open: metrics::gauge(
                "telemon_edge_connections",
                "Device connections open at the edge.",
                &[],
            ),
            refused_total: refused("total"),
            refused_address: refused("per_address"),
            refused_rate: refused("handshake_rate"),
        }
    }

    /// Takes a slot for a new connection from `ip`, or `None` when a limit refuses it.
    pub fn admit(&self, ip: IpAddr) -> Option<Permit> {
        if !self.take_token() {
            self.refused_rate.inc();
            return None;
        }
        let mut counts = self.inner.lock();
        if counts.total >= self.config.max_connections {
            self.refused_total.inc();
            return None;
        }
        let from_ip = counts.per_address.entry(ip).or_insert(0);
        if *from_ip >= self.config.max_per_address {
            self.refused_address.inc();
            return None;
        }
        *from_ip += 1;
        counts.total += 1;
        self.open.add(1);
        Some(Permit {
            ip,
            counts: self.inner.clone(),
            open: self.open.clone(),
        })
    }

    fn take_token(&self) -> bool {
        let rate = self.config.handshakes_per_second as f64;
        let mut bucket = self.bucket.lock();
        let now = Instant::now();
        let refill = now.duration_since(bucket.last).as_secs_f64() * rate;
        bucket.tokens = (bucket.tokens + refill).min(rate);
        bucket.last = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(max_connections: usize, max_per_address: usize) -> LimitState {
        LimitState::new(Limits {
            max_connections,
            max_per_address,
            ..Limits::default()
        })
    }

    #[test]
    fn per_address_limit_frees_slots_on_drop() {
        let limits = state(10, 2);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let a = limits.admit(ip).unwrap();
        let _b = limits.admit(ip).unwrap();
        assert!(limits.admit(ip).is_none());
        assert!(limits.admit("10.0.0.2".parse().unwrap()).is_some());
        drop(a);
        assert!(limits.admit(ip).is_some());
    }

    #[test]
    fn total_limit_applies_across_addresses() {
        let limits = state(2, 10);
        let _a = limits.admit("10.0.0.1".parse().unwrap()).unwrap();
        let _b = limits.admit("10.0.0.2".parse().unwrap()).unwrap();
        assert!(limits.admit("10.0.0.3".parse().unwrap()).is_none());
    }

    #[test]
    fn handshake_rate_is_bounded() {
        let limits = LimitState::new(Limits {
            handshakes_per_second: 3,
            ..Limits::default()
        });
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let held: Vec<_> = (0..5).filter_map(|_| limits.admit(ip)).collect();
        assert_eq!(held.len(), 3);
    }
}
