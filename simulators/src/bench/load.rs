//! The two kinds of benchmark connection: a publisher that pipelines up to a window of
//! unacknowledged publishes, and a subscriber that acknowledges what it receives and times it
//! by the send time the publisher wrote into the payload.
//!
//! Each connection is one task owning its stream (no split halves, no channels) and its own
//! latency histogram, so recording a latency is an array increment, and histograms are merged
//! once at the end.

use std::time::Duration;

use bytes::BytesMut;
use hdrhistogram::Histogram;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tokio::time::{sleep_until, Instant};
use tracing::debug;

use super::conn::Stream;
use super::wire::{self, Packet};
use super::BenchError;

/// Publishes encoded per write when nothing else limits a burst: large enough to fill a TLS
/// record, small enough to keep reading acknowledgements between bursts.
const BATCH: usize = 64;
/// A subscriber that saw nothing for this long after the publishers finished has all it
/// will get.
const IDLE: Duration = Duration::from_millis(500);
/// The send time at the start of every payload: nanoseconds since the run's epoch.
pub const STAMP: usize = 8;
/// Latencies are recorded in microseconds, from 1 us to 60 s, to 3 significant digits.
const HIGHEST_US: u64 = 60_000_000;

pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, HIGHEST_US, 3).expect("constant bounds that hdrhistogram accepts")
}

/// What every connection of a run shares.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    /// Time zero of the payload stamps.
    pub epoch: Instant,
    /// When publishers begin, and when the measured interval ends.
    pub start: Instant,
    pub end: Instant,
    /// How long after `end` publishers wait for their last acknowledgements.
    pub drain: Duration,
}

impl Clock {
    fn stamp(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.epoch).as_nanos() as u64
    }
}

#[derive(Clone, Debug)]
pub struct PublisherPlan {
    pub client_id: String,
    pub topic: String,
    pub qos: u8,
    pub payload: usize,
    /// Messages per second; `None` is flat out, bounded by the window.
    pub rate: Option<f64>,
    pub window: usize,
}

#[derive(Debug)]
pub struct PublisherReport {
    pub sent: u64,
    pub sent_in_window: u64,
    pub acked: u64,
    pub acked_in_window: u64,
    /// Publish to PUBACK (QoS 1) or PUBCOMP (QoS 2), microseconds.
    pub latency: Histogram<u64>,
}

/// Packet ids in flight and when each was sent (0: free).
struct InFlight {
    sent_at: Vec<u64>,
    next: u16,
    count: usize,
}

impl InFlight {
    fn new() -> InFlight {
        InFlight {
            sent_at: vec![0; 1 << 16],
            next: 0,
            count: 0,
        }
    }

    /// A free packet id; the window is far below 65,535, so the scan ends quickly.
    fn take(&mut self, stamp: u64) -> u16 {
        for _ in 0..u16::MAX {
            self.next = self.next.checked_add(1).unwrap_or(1);
            let slot = &mut self.sent_at[self.next as usize];
            if *slot == 0 {
                // +1 keeps a send at stamp 0 distinguishable from a free slot.
                *slot = stamp + 1;
                self.count += 1;
                return self.next;
            }
        }
        0
    }

    /// The send stamp of `id`, freeing it; `None` for an id not in flight (a duplicate).
    fn complete(&mut self, id: u16) -> Option<u64> {
        let slot = self.sent_at.get_mut(id as usize)?;
        let sent = slot.checked_sub(1)?;
        *slot = 0;
        self.count -= 1;
        Some(sent)
    }
}

pub async fn publisher(
    mut stream: Stream,
    plan: PublisherPlan,
    clock: Clock,
) -> Result<PublisherReport, BenchError> {
    let closed = |source| BenchError::Io {
        client: plan.client_id.clone(),
        source,
    };
    let mut report = PublisherReport {
        sent: 0,
        sent_in_window: 0,
        acked: 0,
        acked_in_window: 0,
        latency: histogram(),
    };
    let mut flight = InFlight::new();
    let mut out = BytesMut::with_capacity(64 * 1024);
    let mut input = BytesMut::with_capacity(64 * 1024);
    let mut payload = vec![b'x'; plan.payload.max(STAMP)];
    sleep_until(clock.start).await;

    loop {
        let now = Instant::now();
        if now >= clock.end {
            break;
        }

        let room = match plan.qos {
            0 => BATCH,
            _ => plan.window.saturating_sub(flight.count),
        };
        let due = match plan.rate {
            None => BATCH as u64,
            Some(rate) => {
                let allowed = (now - clock.start).as_secs_f64() * rate;
                (allowed as u64 + 1).saturating_sub(report.sent)
            }
        };
        let burst = room.min(due.min(BATCH as u64) as usize);
        for _ in 0..burst {
            let stamp = clock.stamp(Instant::now());
            payload[..STAMP].copy_from_slice(&stamp.to_be_bytes());
            let id = match plan.qos {
                0 => 0,
                _ => flight.take(stamp),
            };
            wire::publish(&mut out, &plan.topic, plan.qos, id, &payload);
        }
        report.sent += burst as u64;
        report.sent_in_window += burst as u64;
        if !out.is_empty() {
            stream.write_all(&out).await.map_err(closed)?;
            out.clear();
        }
        if burst == BATCH && (plan.qos == 0 || flight.count < plan.window) {
            continue;
        }

        // Nothing more may go out now: wait for acknowledgements, the next due publish, or
        // the end of the run, whichever comes first.
        let wake = match plan.rate {
            Some(rate) if room > 0 => {
                let next = Duration::from_secs_f64(report.sent as f64 / rate);
                (clock.start + next).min(clock.end)
            }
            _ => clock.end,
        };
        tokio::select! {
            read = stream.read_buf(&mut input) => {
                if read.map_err(closed)? == 0 {
                    return Err(BenchError::Closed(plan.client_id.clone()));
                }
                acknowledge(&mut input, &mut out, &mut flight, &mut report, &clock)?;
            }
            _ = sleep_until(wake) => {}
        }
    }

    // The measured interval is over: collect the acknowledgements still owed, within the
    // drain time, so that latencies of the last publishes count too.
    let deadline = clock.end + clock.drain;
    while flight.count > 0 {
        if !out.is_empty() {
            stream.write_all(&out).await.map_err(closed)?;
            out.clear();
        }
        let read = tokio::time::timeout_at(deadline, stream.read_buf(&mut input)).await;
        let Ok(read) = read else {
            debug!(client = %plan.client_id, in_flight = flight.count, "drain time over");
            break;
        };
        if read.map_err(closed)? == 0 {
            return Err(BenchError::Closed(plan.client_id.clone()));
        }
        acknowledge(&mut input, &mut out, &mut flight, &mut report, &clock)?;
    }
    wire::disconnect(&mut out);
    let _ = stream.write_all(&out).await;
    let _ = stream.shutdown().await;
    Ok(report)
}

/// Handles every whole packet in `input`: PUBACK and PUBCOMP complete a publish, PUBREC is
/// answered with PUBREL (queued in `out`).
fn acknowledge(
    input: &mut BytesMut,
    out: &mut BytesMut,
    flight: &mut InFlight,
    report: &mut PublisherReport,
    clock: &Clock,
) -> Result<(), BenchError> {
    let now = Instant::now();
    let stamp = clock.stamp(now);
    while let Some(packet) = wire::next_packet(input)? {
        match packet.kind() {
            wire::PUBACK | wire::PUBCOMP => {
                let id = wire::ack_id(&packet)?;
                if let Some(sent) = flight.complete(id) {
                    let micros = stamp.saturating_sub(sent) / 1000;
                    report
                        .latency
                        .saturating_record(micros.clamp(1, HIGHEST_US));
                    report.acked += 1;
                    if now < clock.end {
                        report.acked_in_window += 1;
                    }
                }
            }
            wire::PUBREC => wire::ack(out, wire::PUBREL, wire::ack_id(&packet)?),
            _ => {}
        }
    }
    Ok(())
}

#[derive(Clone, Debug)]
pub struct SubscriberPlan {
    pub client_id: String,
}

#[derive(Debug)]
pub struct SubscriberReport {
    pub delivered: u64,
    pub delivered_in_window: u64,
    /// Publish to delivery, microseconds.
    pub latency: Histogram<u64>,
}

/// Receives until the publishers are done (`expected` then holds how many messages each
/// subscriber should get) and either all came or the stream went quiet.
pub async fn subscriber(
    mut stream: Stream,
    plan: SubscriberPlan,
    clock: Clock,
    mut expected: watch::Receiver<Option<u64>>,
) -> Result<SubscriberReport, BenchError> {
    let closed = |source| BenchError::Io {
        client: plan.client_id.clone(),
        source,
    };
    let mut report = SubscriberReport {
        delivered: 0,
        delivered_in_window: 0,
        latency: histogram(),
    };
    let mut input = BytesMut::with_capacity(256 * 1024);
    let mut out = BytesMut::with_capacity(16 * 1024);
    let hard_stop = clock.end + clock.drain * 2 + IDLE;
    let mut last_data = Instant::now();

    loop {
        let want = *expected.borrow();
        if want.is_some_and(|want| report.delivered >= want) {
            break;
        }
        let wake = match want {
            Some(_) => (last_data + IDLE).min(hard_stop),
            None => hard_stop,
        };
        tokio::select! {
            read = stream.read_buf(&mut input) => {
                if read.map_err(closed)? == 0 {
                    return Err(BenchError::Closed(plan.client_id.clone()));
                }
                last_data = Instant::now();
                receive(&mut input, &mut out, &mut report, &clock)?;
                if !out.is_empty() {
                    stream.write_all(&out).await.map_err(closed)?;
                    out.clear();
                }
            }
            changed = expected.changed(), if want.is_none() => {
                if changed.is_err() {
                    break;
                }
                last_data = Instant::now();
            }
            _ = sleep_until(wake) => break,
        }
    }

    wire::disconnect(&mut out);
    let _ = stream.write_all(&out).await;
    let _ = stream.shutdown().await;
    Ok(report)
}

/// Counts and times every PUBLISH in `input`, queueing PUBACK / PUBREC / PUBCOMP in `out`.
fn receive(
    input: &mut BytesMut,
    out: &mut BytesMut,
    report: &mut SubscriberReport,
    clock: &Clock,
) -> Result<(), BenchError> {
    let now = Instant::now();
    let stamp_now = clock.stamp(now);
    while let Some(packet) = wire::next_packet(input)? {
        match packet.kind() {
            wire::PUBLISH => {
                let (id, payload) = wire::publish_parts(&packet)?;
                if let Some(sent) = payload_stamp(payload) {
                    let micros = stamp_now.saturating_sub(sent) / 1000;
                    report
                        .latency
                        .saturating_record(micros.clamp(1, HIGHEST_US));
                }
                report.delivered += 1;
                if now < clock.end {
                    report.delivered_in_window += 1;
                }
                match packet.qos() {
                    1 => wire::ack(out, wire::PUBACK, id),
                    2 => wire::ack(out, wire::PUBREC, id),
                    _ => {}
                }
            }
            wire::PUBREL => wire::ack(out, wire::PUBCOMP, wire::ack_id(&packet)?),
            _ => {}
        }
    }
    Ok(())
}

fn payload_stamp(payload: &[u8]) -> Option<u64> {
    let bytes: [u8; STAMP] = payload.get(..STAMP)?.try_into().ok()?;
    Some(u64::from_be_bytes(bytes))
}

/// Sends SUBSCRIBE for `filter` and waits for a SUBACK that grants it.
pub async fn subscribe(
    stream: &mut Stream,
    client_id: &str,
    filter: &str,
    qos: u8,
) -> Result<(), BenchError> {
    let closed = |source| BenchError::Io {
        client: client_id.to_string(),
        source,
    };
    let mut out = BytesMut::new();
    wire::subscribe(&mut out, 1, filter, qos);
    stream.write_all(&out).await.map_err(closed)?;
    let mut input = BytesMut::new();
    let suback: Packet = tokio::time::timeout(
        Duration::from_secs(10),
        super::conn::read_packet(stream, &mut input),
    )
    .await
    .map_err(|_| BenchError::SubscribeRefused(client_id.to_string()))?
    .map_err(closed)?;
    let granted = suback.body.get(2).copied();
    if suback.kind() != wire::SUBACK || granted.is_none_or(|code| code == 0x80) {
        return Err(BenchError::SubscribeRefused(client_id.to_string()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use bytes::BufMut;

    use super::*;

    fn stamped_payload(size: usize, at: u64) -> BytesMut {
        let mut payload = BytesMut::with_capacity(size);
        payload.put_u64(at);
        payload.resize(size, b'x');
        payload
    }

    #[test]
    fn packet_ids_are_reused_only_once_acknowledged() {
        let mut flight = InFlight::new();
        let first = flight.take(10);
        let second = flight.take(20);
        assert_ne!(first, second);
        assert_eq!(flight.count, 2);
        assert_eq!(flight.complete(first), Some(10));
        assert_eq!(
            flight.complete(first),
            None,
            "a duplicate PUBACK counts once"
        );
        assert_eq!(flight.complete(0), None);
        assert_eq!(flight.count, 1);
    }

    #[test]
    fn packet_ids_wrap_past_65535_and_skip_busy_ones() {
        let mut flight = InFlight::new();
        let held = flight.take(0);
        for _ in 0..70_000 {
            let id = flight.take(5);
            assert_ne!(id, 0);
            assert_ne!(id, held);
            assert_eq!(flight.complete(id), Some(5));
        }
        assert_eq!(flight.count, 1);
    }

    #[test]
    fn subscribers_time_and_acknowledge_what_they_receive() {
        let epoch = Instant::now();
        let clock = Clock {
            epoch,
            start: epoch,
            end: epoch + Duration::from_secs(3600),
            drain: Duration::ZERO,
        };
        let mut input = BytesMut::new();
        wire::publish(&mut input, "bench/x", 1, 77, &stamped_payload(100, 0));
        wire::publish(&mut input, "bench/x", 2, 78, &stamped_payload(100, 0));
        wire::publish(&mut input, "bench/x", 0, 0, b"short");
        let mut out = BytesMut::new();
        let mut report = SubscriberReport {
            delivered: 0,
            delivered_in_window: 0,
            latency: histogram(),
        };
        receive(&mut input, &mut out, &mut report, &clock).unwrap();
        assert_eq!((report.delivered, report.delivered_in_window), (3, 3));
        assert_eq!(report.latency.len(), 2, "the short payload has no stamp");
        assert_eq!(&out[..], &[0x40, 2, 0, 77, 0x50, 2, 0, 78]);
    }
}
