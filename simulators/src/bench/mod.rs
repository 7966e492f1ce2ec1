//! The load generator behind `telemon bench`: many MQTT connections publishing at a rate or
//! flat out, some subscribing to all of it, and a summary of throughput and latency.
//!
//! - [`run_load`] drives one broker with a [`LoadConfig`] and returns a [`Summary`]:
//!   publishes acknowledged per second, deliveries per second, publish-to-acknowledge
//!   latency (QoS 1 and 2) and publish-to-subscriber latency (the send time travels in the
//!   first 8 bytes of every payload), each as p50 / p99 / p99.9 / max.
//! - [`sink`]: a server that acknowledges everything at once, to measure what the generator
//!   itself can produce on this machine.
//! - [`mosquitto`]: Debian's Mosquitto 2 started for a run with mutual TLS, the yardstick.
//!
//! The connections speak a minimal MQTT 3.1.1 of their own ([`wire`]) over tokio and
//! tokio-rustls rather than rumqttc: a publisher pipelines a window of in-flight packet ids
//! into one write per burst and records latencies into its own HDR histogram, so the
//! generator costs a fraction of what the broker under test does.

mod conn;
mod load;
pub mod mosquitto;
pub mod sink;
mod wire;

use std::path::PathBuf;
use std::time::Duration;

use rand::Rng;
use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::debug;

use conn::{Connector, Stream};
pub use conn::{Identity, Transport};
use load::{Clock, PublisherPlan, SubscriberPlan};

/// Publishers' in-flight window by default: enough to keep a loopback TLS pipe full.
pub const DEFAULT_WINDOW: usize = 256;
/// Packet ids are 16 bits, and a few must stay free for the scan in flight tracking.
pub const MAX_WINDOW: usize = 60_000;
/// Time after the measured interval for the last acknowledgements and deliveries.
pub const DEFAULT_DRAIN: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("{client}: cannot connect to {address}: {source}")]
    Connect {
        client: String,
        address: String,
        source: std::io::Error,
    },
    #[error("{client}: no CONNACK from {address} within 10 s")]
    ConnectTimeout { client: String, address: String },
    #[error("{client}: the broker refused the connection (CONNACK return code {code})")]
    Refused { client: String, code: u8 },
    #[error("{0}: the broker refused the subscription or did not answer it")]
    SubscribeRefused(String),
    #[error("{0}: the broker closed the connection during the run")]
    Closed(String),
    #[error("{client}: {source}")]
    Io {
        client: String,
        source: std::io::Error,
    },
    #[error("malformed packet from the broker: {0}")]
    Wire(#[from] wire::WireError),
    #[error("reading {path}: {reason}")]
    Pem { path: PathBuf, reason: String },
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("{0:?} is not a valid TLS server name")]
    ServerName(String),
    #[error("invalid load: {0}")]
    Invalid(String),
    #[error("a connection task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    #[error("{what}: {source}")]
    Process {
        what: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Broker(String),
}

/// One run of load against one broker.
#[derive(Clone, Debug)]
pub struct LoadConfig {
    pub host: String,
    pub port: u16,
    pub transport: Transport,
    /// One connection each; with mutual TLS each may carry its own certificate.
    pub publishers: Vec<Identity>,
    /// Each receives every message of the run.
    pub subscribers: Vec<Identity>,
    /// 0, 1 or 2, for publishing and subscribing alike.
    pub qos: u8,
    /// Bytes per payload, at least 8 (the send time).
    pub payload: usize,
    /// Messages per second per publisher; `None` publishes flat out.
    pub rate: Option<f64>,
    /// Unacknowledged publishes per publisher (QoS 1 and 2).
    pub window: usize,
    /// The measured interval.
    pub duration: Duration,
    pub drain: Duration,
}

impl LoadConfig {
    /// The load DESIGN.md's targets are stated for: QoS 1, 100-byte payloads, 4 publishers,
    /// 1 subscriber, flat out for 10 s; identities without certificates.
    pub fn new(host: impl Into<String>, port: u16, transport: Transport) -> LoadConfig {
        LoadConfig {
            host: host.into(),
            port,
            transport,
            publishers: numbered("bench-pub", 4),
            subscribers: numbered("bench-sub", 1),
            qos: 1,
            payload: 100,
            rate: None,
            window: DEFAULT_WINDOW,
            duration: Duration::from_secs(10),
            drain: DEFAULT_DRAIN,
        }
    }

    pub fn validate(&self) -> Result<(), BenchError> {
        let invalid = |why: &str| Err(BenchError::Invalid(why.to_string()));
        if self.publishers.is_empty() {
            return invalid("at least one publisher is needed");
        }
        if self.qos > 2 {
            return invalid("QoS is 0, 1 or 2");
        }
        if self.payload < load::STAMP || self.payload > 1 << 20 {
            return invalid("payloads are 8 bytes (the send time) to 1 MiB");
        }
        if self.window == 0 || self.window > MAX_WINDOW {
            return invalid("the window is 1 to 60000 messages");
        }
        if self.duration.is_zero() {
            return invalid("the duration must be above zero");
        }
        if self.rate.is_some_and(|r| !(r.is_finite() && r > 0.0)) {
            return invalid("a rate must be a positive number of messages per second");
        }
        Ok(())
    }
}

/// Identities `<prefix>-1 .. <prefix>-n` without certificates.
pub fn numbered(prefix: &str, n: usize) -> Vec<Identity> {
    (1..=n)
        .map(|i| Identity {
            client_id: format!("{prefix}-{i}"),
            cert: None,
        })
        .collect()
}

/// Latency percentiles in microseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Latency {
    pub count: u64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
}

impl Latency {
    fn of(histogram: &hdrhistogram::Histogram<u64>) -> Option<Latency> {
        if histogram.is_empty() {
            return None;
        }
        Some(Latency {
            count: histogram.len(),
            p50_us: histogram.value_at_quantile(0.50),
            p99_us: histogram.value_at_quantile(0.99),
            p999_us: histogram.value_at_quantile(0.999),
            max_us: histogram.max(),
        })
    }
}

/// What one run measured. Rates count only what happened within `duration_s`; totals
/// include the drain after it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Summary {
    pub qos: u8,
    pub payload_bytes: usize,
    pub publishers: usize,
    pub subscribers: usize,
    pub duration_s: f64,
    /// Publishes acknowledged (QoS 1, 2) or written (QoS 0) per second.
    pub published_per_s: f64,
    /// Messages received per second, all subscribers together.
    pub delivered_per_s: f64,
    pub sent: u64,
    pub acknowledged: u64,
    pub delivered: u64,
    /// Deliveries owed (sent x subscribers) that never came; above zero at QoS 1 or 2 is a
    /// broker losing messages.
    pub missing: u64,
    /// Publish to PUBACK (QoS 1) or PUBCOMP (QoS 2).
    pub ack_latency: Option<Latency>,
    /// Publish to arrival at a subscriber.
    pub delivery_latency: Option<Latency>,
    /// CPU the generator's process used during the run, in percent of one core (it includes
    /// a sink running in the same process).
    pub generator_cpu_percent: Option<f64>,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "  QoS {}, {} B payloads, {} publishers, {} subscribers, {:.1} s",
            self.qos, self.payload_bytes, self.publishers, self.subscribers, self.duration_s
        )?;
        writeln!(
            f,
            "  published {:>10.0} msgs/s   delivered {:>10.0} msgs/s   missing {}",
            self.published_per_s, self.delivered_per_s, self.missing
        )?;
        for (name, latency) in [
            ("publish -> ack", self.ack_latency),
            ("publish -> subscriber", self.delivery_latency),
        ] {
            if let Some(l) = latency {
                writeln!(
                    f,
                    "  {name:<22} p50 {:>7} us   p99 {:>7} us   p99.9 {:>7} us   max {:>7} us",
                    l.p50_us, l.p99_us, l.p999_us, l.max_us
                )?;
            }
        }
        if let Some(cpu) = self.generator_cpu_percent {
            write!(f, "  generator CPU {cpu:.0}% of one core")?;
        }
        Ok(())
    }
}

/// Connects every subscriber and publisher, runs the load for `duration`, drains, and
/// summarises. Any connection failing fails the run: a partial load measures nothing.
pub async fn run_load(config: &LoadConfig) -> Result<Summary, BenchError> {
    config.validate()?;
    let connector = Connector::new(&config.host, config.port, &config.transport)?;
    let run = format!("{:08x}", rand::thread_rng().gen::<u32>());
    let filter = format!("bench/{run}/#");

    let mut subscribers = connect_all(&connector, &config.subscribers).await?;
    for (identity, stream) in config.subscribers.iter().zip(subscribers.iter_mut()) {
        load::subscribe(stream, &identity.client_id, &filter, config.qos).await?;
    }
    let publishers = connect_all(&connector, &config.publishers).await?;
    debug!(
        publishers = publishers.len(),
        subscribers = subscribers.len(),
        broker = %connector.address(),
        "connected"
    );

    let cpu_before = process_cpu_seconds();
    let epoch = tokio::time::Instant::now();
    // A moment for every task to be scheduled before the first publish.
    let start = epoch + Duration::from_millis(20);
    let clock = Clock {
        epoch,
        start,
        end: start + config.duration,
        drain: config.drain,
    };
    let (expected_tx, expected_rx) = watch::channel(None);
    let mut receiving = JoinSet::new();
    for (identity, stream) in config.subscribers.iter().zip(subscribers) {
        let plan = SubscriberPlan {
            client_id: identity.client_id.clone(),
        };
        receiving.spawn(load::subscriber(stream, plan, clock, expected_rx.clone()));
    }
    let mut publishing = JoinSet::new();
    for (identity, stream) in config.publishers.iter().zip(publishers) {
        let plan = PublisherPlan {
            client_id: identity.client_id.clone(),
            topic: format!("bench/{run}/{}", identity.client_id),
            qos: config.qos,
            payload: config.payload,
            rate: config.rate,
            window: config.window,
        };
        publishing.spawn(load::publisher(stream, plan, clock));
    }

    let mut summary = Summary {
        qos: config.qos,
        payload_bytes: config.payload,
        publishers: config.publishers.len(),
        subscribers: config.subscribers.len(),
        duration_s: config.duration.as_secs_f64(),
        published_per_s: 0.0,
        delivered_per_s: 0.0,
        sent: 0,
        acknowledged: 0,
        delivered: 0,
        missing: 0,
        ack_latency: None,
        delivery_latency: None,
        generator_cpu_percent: None,
    };
    let mut ack_latency = load::histogram();
    let mut published_in_window = 0;
    while let Some(report) = publishing.join_next().await {
        let report = report??;
        summary.sent += report.sent;
        summary.acknowledged += report.acked;
        published_in_window += match config.qos {
            0 => report.sent_in_window,
            _ => report.acked_in_window,
        };
        ack_latency.add(&report.latency).ok();
    }
    let cpu_after = process_cpu_seconds();
    let _ = expected_tx.send(Some(summary.sent));

    let mut delivery_latency = load::histogram();
    let mut delivered_in_window = 0;
    while let Some(report) = receiving.join_next().await {
        let report = report??;
        summary.delivered += report.delivered;
        delivered_in_window += report.delivered_in_window;
        delivery_latency.add(&report.latency).ok();
    }

    let seconds = config.duration.as_secs_f64();
    summary.published_per_s = published_in_window as f64 / seconds;
    summary.delivered_per_s = delivered_in_window as f64 / seconds;
    let owed = summary.sent * config.subscribers.len() as u64;
    summary.missing = owed.saturating_sub(summary.delivered);
    summary.ack_latency = Latency::of(&ack_latency);
    summary.delivery_latency = Latency::of(&delivery_latency);
    if let (Some(before), Some(after)) = (cpu_before, cpu_after) {
        // Publishers finish at the end of the drain at the latest; the interval measured is
        // from the start to when the last one finished.
        let wall = epoch.elapsed().as_secs_f64().max(seconds);
        summary.generator_cpu_percent = Some((after - before) / wall * 100.0);
    }
    Ok(summary)
}

/// Connects every identity concurrently, in order of `identities`.
async fn connect_all(
    connector: &Connector,
    identities: &[Identity],
) -> Result<Vec<Stream>, BenchError> {
    let mut tasks = JoinSet::new();
    for (i, identity) in identities.iter().enumerate() {
        let (connector, identity) = (connector.clone(), identity.clone());
        tasks.spawn(async move { (i, connector.connect(&identity).await) });
    }
    let mut streams: Vec<Option<Stream>> = identities.iter().map(|_| None).collect();
    while let Some(joined) = tasks.join_next().await {
        let (i, stream) = joined?;
        streams[i] = Some(stream?);
    }
    Ok(streams.into_iter().flatten().collect())
}

/// User plus system CPU time of this process so far, from /proc (Linux only).
fn process_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name, which is in parentheses and may contain spaces;
    // utime and stime are fields 14 and 15, in clock ticks of 1/100 s on Linux.
    let rest = stat.rsplit_once(')')?.1;
    let mut fields = rest.split_whitespace().skip(11);
    let user: f64 = fields.next()?.parse().ok()?;
    let system: f64 = fields.next()?.parse().ok()?;
    Some((user + system) / 100.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_loads_are_refused() {
        let base = LoadConfig::new("127.0.0.1", 1, Transport::Plain);
        assert!(base.validate().is_ok());
        type Change = fn(&mut LoadConfig);
        let cases: [(&str, Change); 6] = [
            ("publisher", |c| c.publishers.clear()),
            ("QoS", |c| c.qos = 3),
            ("8 bytes", |c| c.payload = 4),
            ("window", |c| c.window = 0),
            ("duration", |c| c.duration = Duration::ZERO),
            ("rate", |c| c.rate = Some(f64::NAN)),
        ];
        for (want, change) in cases {
            let mut config = base.clone();
            change(&mut config);
            let err = config.validate().err().map(|e| e.to_string());
            assert!(err.as_deref().is_some_and(|e| e.contains(want)), "{err:?}");
        }
    }

    #[test]
    fn cpu_time_of_this_process_is_readable() {
        let cpu = process_cpu_seconds();
        assert!(cpu.is_some_and(|s| s >= 0.0), "{cpu:?}");
    }

    #[tokio::test]
    async fn a_closed_port_is_a_clear_connect_error() {
        let port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().port()
        };
        let mut config = LoadConfig::new("127.0.0.1", port, Transport::Plain);
        config.duration = Duration::from_millis(100);
        let err = run_load(&config).await.unwrap_err().to_string();
        assert!(
            err.contains("cannot connect") && err.contains(&port.to_string()),
            "{err}"
        );
    }
}
