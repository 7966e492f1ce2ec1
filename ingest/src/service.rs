//! The ingest service: subscribes to device topics, decodes, and stores in batches.
//!
//! Delivery is at least once from the broker to committed storage. The MQTT session is
//! persistent (clean session off) at QoS 1 with manual acknowledgements: a message is
//! acknowledged only after its batch is committed to the database or written to the local
//! spool. Storage deduplicates on (device, metric, time), so a redelivered message never
//! makes a second row. Subscriptions are made again on every connection, since a broker
//! that lost the session (`session present = 0`) would otherwise send nothing.
//!
//! A packet id names a message only on the connection that delivered it: on the next one the
//! broker may give the same id to another message (always, when the session was lost). So a
//! message is acknowledged only on the connection it arrived on; once that connection is
//! gone, its acknowledgement is dropped and the broker's redelivery, deduplicated by storage,
//! is acknowledged instead.

use std::cell::Cell;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use rumqttc::{AsyncClient, Event, Packet, Publish, QoS};
use telemon_model::bus::{BusConfig, BusError};
use telemon_model::health::{Health, Status};
use telemon_model::metrics::{self, Counter, Gauge};
use telemon_store::{DeadLetter, Store};
use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};

use crate::decode::{Decoder, Message, Rejection, ONLINE_METRIC};
use crate::spool::{Spool, SpoolError, SpooledBatch};

const HEALTH: &str = "ingest";
const SPOOLING: &str = "database unreachable; spooling";

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error(transparent)]
    Spool(#[from] SpoolError),
}

/// What telemon's engine (rumqttd 0.20) sends a connection unacknowledged: a constant there
/// (`MAX_INFLIGHT` in its router), whatever the listener's `max_inflight_count` says.
pub const ENGINE_WINDOW: u64 = 100;

/// Dead letters kept, newest first: enough to see what a device has been sending wrong for a
/// long while, bounded so that a device sending only refused messages (each up to the
/// broker's 256 KiB) cannot fill the disk.
pub const DEAD_LETTERS_KEPT: i64 = 10_000;
/// How often the dead-letter table is cut back to [`DEAD_LETTERS_KEPT`].
const PRUNE_EVERY: Duration = Duration::from_secs(60);

#[derive(Clone, Debug)]
pub struct IngestSettings {
    /// MQTT client id; the broker keeps this session's unacknowledged messages across
    /// reconnects, so it must be stable across restarts.
    pub client_id: String,
    /// Shared-subscription group, for several ingest workers behind one broker.
    pub shared_group: Option<String>,
    /// Messages per database transaction: large enough to amortize the round trip.
    pub batch_size: usize,
    /// Longest a message waits for its batch to fill: bounds the latency added to storage.
    pub batch_delay: Duration,
    /// A batch also closes when no message has come for this long. A broker sends only so
    /// many unacknowledged messages (rumqttd 100 per connection, Mosquitto 20 by default)
    /// and then waits for acknowledgements, which come only once the batch is committed:
    /// waiting out `batch_delay` then would idle both sides.
    pub batch_quiet: Duration,
    /// Unacknowledged messages the broker sends this session before it waits for
    /// acknowledgements, when known (telemon's engine: [`ENGINE_WINDOW`]; Mosquitto: its
    /// `max_inflight_messages`). With that many in hand no more can come, so the batch closes
    /// at once instead of after `batch_quiet`. A wrong figure costs only speed: too small
    /// closes batches early, too large falls back on `batch_quiet`.
    pub broker_window: Option<u64>,
    pub spool_dir: PathBuf,
    /// Disk the spool may use before ingest stops acknowledging (and the broker holds on).
    pub spool_max_bytes: u64,
}

impl IngestSettings {
    pub fn new(spool_dir: PathBuf) -> Self {
        IngestSettings {
            client_id: "telemon-ingest".into(),
            shared_group: None,
            batch_size: 2_000,
            batch_delay: Duration::from_millis(20),
            batch_quiet: Duration::from_millis(2),
            broker_window: None,
            spool_dir,
            spool_max_bytes: 1 << 30,
        }
    }
}

struct Counters {
    messages: Counter,
    stored: Counter,
    duplicates: Counter,
    spooled: Counter,
    stale_acks: Counter,
    spool_bytes: Gauge,
    lag_ms: Gauge,
}

impl Counters {
    fn new() -> Self {
        Counters {
            messages: metrics::counter(
                "telemon_ingest_messages_total",
                "MQTT messages received by ingest.",
                &[],
            ),
            stored: metrics::counter(
                "telemon_ingest_readings_stored_total",
                "Readings committed to storage.",
                &[],
            ),
            duplicates: metrics::counter(
                "telemon_ingest_readings_duplicate_total",
                "Readings already stored (redeliveries), not stored again.",
                &[],
            ),
            spooled: metrics::counter(
                "telemon_ingest_readings_spooled_total",
                "Readings written to the local spool while the database was unreachable.",
                &[],
            ),
            stale_acks: metrics::counter(
                "telemon_ingest_acknowledgements_dropped_total",
                "Acknowledgements not sent because the connection their message arrived on was \
                 lost; the broker redelivers those messages.",
                &[],
            ),
            spool_bytes: metrics::gauge(
                "telemon_ingest_spool_bytes",
                "Bytes waiting in the local spool.",
                &[],
            ),
            lag_ms: metrics::gauge(
                "telemon_ingest_lag_milliseconds",
                "Time from receipt of the oldest message of the last batch to its commit.",
                &[],
            ),
        }
    }
}

fn dead_letter_counter(reason: &str) -> Counter {
    metrics::counter(
        "telemon_ingest_dead_letters_total",
        "Messages or fields refused and sent to the dead-letter store, by reason.",
        &[("reason", reason)],
    )
}

/// Progress of a running ingest service, for a clean shutdown.
#[derive(Clone, Default)]
pub struct IngestHandle {
    received: Arc<AtomicU64>,
    acknowledged: Arc<AtomicU64>,
}

impl IngestHandle {
    /// Messages committed (or spooled) and acknowledged to the broker so far, counting those
    /// whose acknowledgement was dropped with their connection (the broker redelivers them,
    /// and each redelivery is received and counted again).
    pub fn acknowledged(&self) -> u64 {
        self.acknowledged.load(Ordering::SeqCst)
    }

    /// Messages received but not yet committed and acknowledged.
    pub fn in_flight(&self) -> u64 {
        let received = self.received.load(Ordering::SeqCst);
        received.saturating_sub(self.acknowledged.load(Ordering::SeqCst))
    }

    /// Waits until everything received is committed and nothing new arrived for `quiet`, or
    /// `max` passes. Returns whether ingest went quiet. Used at shutdown, after devices are
    /// disconnected, so that what the broker acknowledged to them is stored before exit.
    pub async fn drain(&self, quiet: Duration, max: Duration) -> bool {
        let start = Instant::now();
        let mut last_seen = self.received.load(Ordering::SeqCst);
        let mut quiet_since = Instant::now();
        while start.elapsed() < max {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let received = self.received.load(Ordering::SeqCst);
            if received != last_seen {
                last_seen = received;
                quiet_since = Instant::now();
            }
            if self.in_flight() == 0 && quiet_since.elapsed() >= quiet {
                return true;
            }
        }
        false
    }
}

/// Starts ingest in the background.
pub async fn start(
    bus: BusConfig,
    settings: IngestSettings,
    decoder: Arc<Decoder>,
    store: Store,
    health: Health,
) -> Result<IngestHandle, IngestError> {
    let handle = IngestHandle::default();
    let task_handle = handle.clone();
    let mut options = bus.mqtt_options(&settings.client_id)?;
    options.set_clean_session(false);
    options.set_manual_acks(true);
    let spool = Spool::open(&settings.spool_dir, settings.spool_max_bytes)?;
    tokio::spawn(async move {
        run(
            options,
            settings,
            decoder,
            store,
            health,
            spool,
            task_handle,
        )
        .await;
    });
    Ok(handle)
}

async fn run(
    options: rumqttc::MqttOptions,
    settings: IngestSettings,
    decoder: Arc<Decoder>,
    store: Store,
    health: Health,
    spool: Spool,
    handle: IngestHandle,
) {
    let (client, eventloop) = AsyncClient::new(options, 10_000);

    let filters: Vec<String> = decoder
        .subscriptions()
        .into_iter()
        .map(|f| match &settings.shared_group {
            Some(group) => format!("$share/{group}/{f}"),
            None => f,
        })
        .collect();
    // Unbounded on purpose: the poll task must never stop driving the event loop, because
    // the batcher's acknowledgements go out through that same loop; a bounded channel
    // deadlocks (poll waits for the batcher, the batcher waits for poll to take its acks).
    // Memory stays bounded by the broker, which sends a session no more unacknowledged QoS 1
    // messages than its in-flight window.
    let (tx, rx) = mpsc::unbounded_channel();
    health.set(HEALTH, Status::Starting, "connecting to the broker");
    let received = handle.received.clone();
    let spooling = Arc::new(AtomicBool::new(false));
    let connection = Connection::default();
    tokio::spawn(poll(
        eventloop,
        client.clone(),
        filters,
        Feed {
            tx,
            received,
            last_stamp: Cell::new(DateTime::<Utc>::MIN_UTC),
        },
        health.clone(),
        spooling.clone(),
        connection.clone(),
    ));

    let mut batcher = Batcher {
        settings,
        decoder,
        store,
        client,
        spool,
        health,
        counters: Counters::new(),
        refusal_log: Default::default(),
        acknowledged: handle.acknowledged,
        received: handle.received,
        spooling,
        connection,
    };
    batcher.run(rx).await;
}

/// A message as the poll task hands it to the batcher.
struct Received {
    publish: Publish,
    at: DateTime<Utc>,
    /// The connection it arrived on: its packet id means this message on that one only.
    connection: u64,
}

/// The way from the poll task to the batcher, counting what goes through.
struct Feed {
    tx: mpsc::UnboundedSender<Received>,
    received: Arc<AtomicU64>,
    last_stamp: Cell<DateTime<Utc>>,
}

impl Feed {
    /// Hands a message over; false once the batcher is gone.
    fn send(&self, publish: Publish, connection: u64) -> bool {
        self.received.fetch_add(1, Ordering::SeqCst);
        let message = Received {
            publish,
            at: self.receive_time(),
            connection,
        };
        self.tx.send(message).is_ok()
    }

    /// Now, but at least a microsecond after the last message. A reading without a timestamp
    /// of its own is stamped with its receive time, and storage keeps one reading per device,
    /// metric and time: two different readings received within a microsecond (a burst from
    /// one device) must not look like one reading delivered twice.
    fn receive_time(&self) -> DateTime<Utc> {
        let next = self.last_stamp.get() + chrono::Duration::microseconds(1);
        let at = Utc::now().max(next);
        self.last_stamp.set(at);
        at
    }
}

/// Which broker connection is current. The batcher holds the lock while it queues an
/// acknowledgement, and the poll task while it moves to the next connection and empties the
/// request queue of acknowledgements, so that none queued for an old connection is ever sent
/// on a new one.
type Connection = Arc<Mutex<u64>>;

/// Drives the MQTT connection and hands messages to the batcher.
async fn poll(
    mut eventloop: rumqttc::EventLoop,
    client: AsyncClient,
    filters: Vec<String>,
    feed: Feed,
    health: Health,
    spooling: Arc<AtomicBool>,
    connection: Connection,
) {
    let mut current = 0;
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::Publish(publish))) => {
                if !feed.send(publish, current) {
                    return;
                }
            }
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                info!(
                    session_present = ack.session_present,
                    "ingest connected to the broker"
                );
                let subscriptions = filters
                    .iter()
                    .map(|f| rumqttc::SubscribeFilter::new(f.clone(), QoS::AtLeastOnce));
                // Sent from the request queue that this same loop drains, so it must not wait.
                if let Err(e) = client.try_subscribe_many(subscriptions) {
                    error!(cause = %e, "could not subscribe");
                }
                health.set(HEALTH, Status::Starting, "subscribing");
            }
            // Ready only once the broker has taken the subscriptions: a message published
            // before that would reach no one.
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                let refused = ack
                    .return_codes
                    .iter()
                    .any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure));
                if refused {
                    error!("the broker refused a subscription");
                    health.set(
                        HEALTH,
                        Status::Degraded,
                        "subscription refused by the broker",
                    );
                } else if spooling.load(Ordering::SeqCst) {
                    health.set(HEALTH, Status::Degraded, SPOOLING);
                } else {
                    health.set(HEALTH, Status::Ok, "");
                }
            }
            Ok(_) => {}
            Err(e) => {
                warn!(cause = %e, "broker connection lost; reconnecting");
                if !forward_leftovers(&mut eventloop, &feed, current) {
                    return;
                }
                current = next_connection(&mut eventloop, &connection);
                health.set(HEALTH, Status::Degraded, "broker unreachable");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// Hands over the messages rumqttc had read from the lost connection but not yet returned:
/// it would return them after the next connection's CONNACK, as if they came on that one.
/// They are stored but, belonging to the old connection, never acknowledged. Returns false
/// once the batcher is gone.
fn forward_leftovers(eventloop: &mut rumqttc::EventLoop, feed: &Feed, current: u64) -> bool {
    for event in eventloop.state.events.drain(..) {
        if let Event::Incoming(Packet::Publish(publish)) = event {
            if !feed.send(publish, current) {
                return false;
            }
        }
    }
    true
}

/// Moves on to a new connection. rumqttc drops the acknowledgements queued when it noticed
/// the loss, but the batcher may have queued more since; `clean` drops those too (and keeps
/// any other request). Under the lock, so that no acknowledgement slips in between.
fn next_connection(eventloop: &mut rumqttc::EventLoop, connection: &Mutex<u64>) -> u64 {
    let mut current = connection.lock().unwrap_or_else(|e| e.into_inner());
    *current += 1;
    eventloop.clean();
    *current
}

struct Batcher {
    settings: IngestSettings,
    decoder: Arc<Decoder>,
    store: Store,
    client: AsyncClient,
    spool: Spool,
    health: Health,
    counters: Counters,
    refusal_log: std::collections::HashMap<String, Instant>,
    acknowledged: Arc<AtomicU64>,
    received: Arc<AtomicU64>,
    /// Set while batches go to the spool, so that a reconnect does not report healthy.
    spooling: Arc<AtomicBool>,
    connection: Connection,
}

/// What one batch of messages became.
#[derive(Default)]
struct Batch {
    /// Each message with the connection it arrived on.
    publishes: Vec<(Publish, u64)>,
    contents: SpooledBatch,
    dead_letters: Vec<DeadLetter>,
    oldest: Option<Instant>,
}

impl Batcher {
    /// Collects a batch, then commits it while the next one is collected: the database
    /// round trip overlaps receiving, instead of the two taking turns. Batches are still
    /// committed and acknowledged one after another, in the order they arrived.
    async fn run(&mut self, mut rx: mpsc::UnboundedReceiver<Received>) {
        let mut last_drain = Instant::now();
        let mut last_prune = Instant::now();
        let size = self.settings.batch_size;
        let limits = Closing {
            size,
            delay: self.settings.batch_delay,
            quiet: self.settings.batch_quiet,
            window: self.settings.broker_window,
            received: self.received.clone(),
            acknowledged: self.acknowledged.clone(),
        };
        let (mut carried, mut closed) = collect(&mut rx, &limits).await;
        loop {
            let mut batch = Batch::default();
            for message in carried.drain(..) {
                self.add(&mut batch, message);
            }
            // Whatever arrived during the last commit joins this batch, up to its size.
            while batch.publishes.len() < size {
                match rx.try_recv() {
                    Ok(message) => self.add(&mut batch, message),
                    Err(_) => break,
                }
            }

            if batch.publishes.is_empty() {
                if closed {
                    return;
                }
                (carried, closed) = collect(&mut rx, &limits).await;
            } else {
                let next = collect(&mut rx, &limits);
                ((), (carried, closed)) = tokio::join!(self.commit(batch), next);
            }

            if last_drain.elapsed() >= Duration::from_secs(1) {
                last_drain = Instant::now();
                self.drain_spool().await;
            }
            if last_prune.elapsed() >= PRUNE_EVERY {
                last_prune = Instant::now();
                self.prune_dead_letters().await;
            }
        }
    }

    /// Keeps the dead-letter table to its newest [`DEAD_LETTERS_KEPT`] messages.
    async fn prune_dead_letters(&self) {
        match self.store.prune_dead_letters(DEAD_LETTERS_KEPT).await {
            Ok(0) => {}
            Ok(pruned) => info!(
                pruned,
                kept = DEAD_LETTERS_KEPT,
                "oldest dead letters deleted"
            ),
            Err(e) => warn!(cause = %e, "could not prune dead letters"),
        }
    }

    fn add(&mut self, batch: &mut Batch, received: Received) {
        let Received {
            publish,
            at: received_at,
            connection,
        } = received;
        self.counters.messages.inc();
        batch.oldest.get_or_insert_with(Instant::now);
        let topic = publish.topic.clone();
        let message = Message {
            topic: &topic,
            payload: &publish.payload,
            identity: None,
            received_at,
        };
        match self.decoder.decode(&message) {
            Ok(decoded) => {
                for rejection in decoded.rejected {
                    self.log_refusal(&topic, &rejection);
                    batch.dead_letters.push(dead_letter(&message, rejection));
                }
                batch.contents.readings.extend(decoded.readings);
            }
            Err(rejection) => {
                self.log_refusal(&topic, &rejection);
                batch.dead_letters.push(dead_letter(&message, rejection));
            }
        }
        batch.publishes.push((publish, connection));
    }

    /// One warning per topic per interval: a device sending garbage at a high rate must not
    /// flood the log. Every refusal is counted and dead-lettered regardless.
    fn log_refusal(&mut self, topic: &str, rejection: &Rejection) {
        const INTERVAL: Duration = Duration::from_secs(10);
        let now = Instant::now();
        if self.refusal_log.len() > 10_000 {
            self.refusal_log
                .retain(|_, at| now.duration_since(*at) < INTERVAL);
        }
        let due = self
            .refusal_log
            .get(topic)
            .is_none_or(|at| now.duration_since(*at) >= INTERVAL);
        if due {
            self.refusal_log.insert(topic.to_string(), now);
            warn!(topic, reason = rejection.reason.as_str(), detail = %rejection.detail,
                "reading refused; sent to the dead-letter store");
        }
    }

    /// Commits a batch to the database, or else to the spool, then acknowledges it. When both
    /// fail the batch is retried, unacknowledged, until one succeeds: nothing acknowledged is
    /// ever lost.
    async fn commit(&mut self, mut batch: Batch) {
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.store_batch(&batch).await {
                Ok(()) => break,
                Err(e) => {
                    warn!(cause = %e, "database write failed; spooling the batch");
                    batch.contents.dead_letters =
                        batch.dead_letters.iter().map(Into::into).collect();
                    match self.spool.append(&batch.contents) {
                        Ok(()) => {
                            self.counters
                                .spooled
                                .add(batch.contents.readings.len() as u64);
                            self.counters
                                .spool_bytes
                                .set(self.spool.used_bytes() as i64);
                            self.spooling.store(true, Ordering::SeqCst);
                            self.health.set(HEALTH, Status::Degraded, SPOOLING);
                            break;
                        }
                        Err(e) => {
                            error!(
                                cause = %e,
                                "spool write failed; holding the batch unacknowledged"
                            );
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(Duration::from_secs(5));
                        }
                    }
                }
            }
        }
        for (publish, connection) in &batch.publishes {
            self.acknowledge(publish, *connection).await;
        }
        self.acknowledged
            .fetch_add(batch.publishes.len() as u64, Ordering::SeqCst);
        if let Some(oldest) = batch.oldest {
            self.counters
                .lag_ms
                .set(oldest.elapsed().as_millis() as i64);
        }
    }

    /// Queues the acknowledgement of a stored message, unless the connection it came on is
    /// gone: then its packet id may name another message now, and the broker redelivers it.
    async fn acknowledge(&self, publish: &Publish, connection: u64) {
        loop {
            {
                let current = self.connection.lock().unwrap_or_else(|e| e.into_inner());
                if *current != connection {
                    self.counters.stale_acks.inc();
                    return debug!(
                        pkid = publish.pkid,
                        "connection gone; acknowledgement dropped, the broker will redeliver"
                    );
                }
                // Without waiting, since the lock is held: a full queue is retried below.
                if self.client.try_ack(publish).is_ok() {
                    return;
                }
            }
            // The request queue is full (the event loop drains it as it writes) or, if the
            // loop has stopped, the connection number moves on and ends this.
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    async fn store_batch(&self, batch: &Batch) -> Result<(), telemon_store::StoreError> {
        let now = Utc::now();
        let readings = &batch.contents.readings;
        let inserted = self.store.insert_readings(readings, now).await?;
        self.store.insert_dead_letters(&batch.dead_letters).await?;
        for r in readings.iter().filter(|r| r.metric == ONLINE_METRIC) {
            let online = r.value.as_f64().is_some_and(|v| v > 0.0);
            self.store
                .set_online(r.device_id.as_str(), online, r.time)
                .await?;
        }
        self.counters.stored.add(inserted);
        self.counters
            .duplicates
            .add(readings.len() as u64 - inserted.min(readings.len() as u64));
        for letter in &batch.dead_letters {
            dead_letter_counter(&letter.reason).inc();
        }
        Ok(())
    }

    /// Writes spooled batches back, oldest first, while the database accepts them.
    async fn drain_spool(&mut self) {
        loop {
            let (path, batch) = match self.spool.oldest() {
                Ok(Some(found)) => found,
                Ok(None) => return,
                Err(e) => return error!(cause = %e, "spool unreadable"),
            };
            let letters: Vec<DeadLetter> = batch.dead_letters.into_iter().map(Into::into).collect();
            let stored = async {
                let inserted = self
                    .store
                    .insert_readings(&batch.readings, Utc::now())
                    .await?;
                self.store.insert_dead_letters(&letters).await?;
                Ok::<_, telemon_store::StoreError>(inserted)
            }
            .await;
            match stored {
                Ok(inserted) => {
                    self.counters.stored.add(inserted);
                    if let Err(e) = self.spool.remove(&path) {
                        return error!(cause = %e, "spooled batch stored but not removed");
                    }
                    self.counters
                        .spool_bytes
                        .set(self.spool.used_bytes() as i64);
                    if self.spool.used_bytes() == 0 {
                        info!("spool drained; database writes resumed");
                        self.spooling.store(false, Ordering::SeqCst);
                        self.health.set(HEALTH, Status::Ok, "");
                    }
                }
                Err(e) => return debug!(cause = %e, "database still unreachable"),
            }
        }
    }
}

/// Up to `size` messages: waits up to a second for the first (so that the caller gets to
/// its periodic work), then up to `delay` for the rest. Also says whether the channel closed.
/// Up to `size` messages: waits up to 1 s for the first, then until `delay` has passed since
/// it or no message has come for `quiet`. Also returns whether the sender is gone.
/// When a batch being collected closes.
struct Closing {
    size: usize,
    delay: Duration,
    quiet: Duration,
    window: Option<u64>,
    received: Arc<AtomicU64>,
    acknowledged: Arc<AtomicU64>,
}

impl Closing {
    /// Whether the broker has sent all it will before some of it is acknowledged.
    fn window_full(&self) -> bool {
        self.window.is_some_and(|window| {
            let received = self.received.load(Ordering::SeqCst);
            received.saturating_sub(self.acknowledged.load(Ordering::SeqCst)) >= window
        })
    }
}

async fn collect(
    rx: &mut mpsc::UnboundedReceiver<Received>,
    limits: &Closing,
) -> (Vec<Received>, bool) {
    let mut out = Vec::new();
    match tokio::time::timeout(Duration::from_secs(1), rx.recv()).await {
        Ok(Some(message)) => out.push(message),
        Ok(None) => return (out, true),
        Err(_) => return (out, false),
    }
    let deadline = tokio::time::Instant::now() + limits.delay;
    while out.len() < limits.size {
        // Whatever is already queued joins the batch; then, if the broker's window is full,
        // nothing more comes until this batch is acknowledged.
        match rx.try_recv() {
            Ok(message) => {
                out.push(message);
                continue;
            }
            Err(mpsc::error::TryRecvError::Disconnected) => return (out, true),
            Err(mpsc::error::TryRecvError::Empty) if limits.window_full() => break,
            Err(mpsc::error::TryRecvError::Empty) => {}
        }
        let wait = deadline.min(tokio::time::Instant::now() + limits.quiet);
        match tokio::time::timeout_at(wait, rx.recv()).await {
            Ok(Some(message)) => out.push(message),
            Ok(None) => return (out, true),
            Err(_) => break,
        }
    }
    (out, false)
}

fn dead_letter(message: &Message<'_>, rejection: Rejection) -> DeadLetter {
    DeadLetter {
        received_at: message.received_at,
        topic: message.topic.to_string(),
        identity: message.identity.map(str::to_string),
        reason: rejection.reason.as_str().to_string(),
        detail: rejection.detail,
        payload: message.payload.to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Limits that would hold a batch open for a minute, and `received` messages the broker
    /// has sent, none acknowledged yet.
    fn closing(window: Option<u64>, received: u64) -> Closing {
        Closing {
            size: 2_000,
            delay: Duration::from_secs(60),
            quiet: Duration::from_secs(60),
            window,
            received: Arc::new(AtomicU64::new(received)),
            acknowledged: Arc::new(AtomicU64::new(0)),
        }
    }

    /// `count` messages waiting, and the sender, kept so that the channel stays open (a closed
    /// one would end the batch for another reason).
    fn queue(
        count: usize,
    ) -> (
        mpsc::UnboundedSender<Received>,
        mpsc::UnboundedReceiver<Received>,
    ) {
        let (tx, rx) = mpsc::unbounded_channel();
        for n in 0..count {
            let publish = Publish::new(format!("devices/bed-{n}/telemetry"), QoS::AtLeastOnce, "1");
            let message = Received {
                publish,
                at: Utc::now(),
                connection: 0,
            };
            tx.send(message).expect("queued");
        }
        (tx, rx)
    }

    #[tokio::test]
    async fn a_batch_closes_once_the_brokers_window_is_in_hand() {
        let (_tx, mut rx) = queue(100);
        let limits = closing(Some(100), 100);

        let collected = tokio::time::timeout(Duration::from_secs(10), collect(&mut rx, &limits))
            .await
            .expect("closed without waiting out the quiet time");

        let (batch, closed) = collected;
        assert_eq!(batch.len(), 100);
        assert!(!closed);
    }

    #[tokio::test]
    async fn a_batch_short_of_the_window_waits_for_the_quiet_time() {
        let (_tx, mut rx) = queue(99);
        let mut limits = closing(Some(100), 99);
        limits.quiet = Duration::from_millis(50);
        let started = Instant::now();

        let (batch, _) = collect(&mut rx, &limits).await;

        assert_eq!(batch.len(), 99);
        assert!(started.elapsed() >= Duration::from_millis(50));
    }

    #[tokio::test]
    async fn without_a_known_window_a_batch_waits_for_the_quiet_time() {
        let (_tx, mut rx) = queue(100);
        let limits = closing(None, 100);

        let waited = tokio::time::timeout(Duration::from_millis(200), collect(&mut rx, &limits));

        assert!(waited.await.is_err(), "closed before the quiet time");
    }
}
