//! One simulated device's connection: sampling on schedule, the MQTT session with its birth,
//! will and command subscription, delivery through the [`Outbox`], and reconnects.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rumqttc::{AsyncClient, Event, EventLoop, LastWill, MqttOptions, Outgoing, Packet, QoS};
use telemon_model::topic::{status_topic, telemetry_topic};
use tokio::sync::watch;
use tokio::time::{sleep, sleep_until, timeout, Instant};
use tracing::{debug, trace, Instrument};

use super::outbox::{Kind, Outbox};
use super::{Backoff, Counters, TimedEvent};
use crate::home::HomeSensor;
use crate::physiology::{Patient, Scenario};
use crate::zigbee::{ZigbeeChild, BRIDGE_STATE_TOPIC, SET_FILTER};
use crate::Metrics;

/// Most messages a device has handed to the client and not seen acknowledged: well under
/// rumqttc's in-flight limit (100), so its packet ids never collide.
const WINDOW: usize = 32;
/// Room in the client's request channel for the window plus birth, subscription, will and
/// disconnect.
const CHANNEL_CAPACITY: usize = WINDOW + 8;
/// How long a stopping device tries to announce `offline` and disconnect cleanly.
const GOODBYE: Duration = Duration::from_secs(1);

/// Timing shared by every device of a fleet.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Settings {
    pub interval: Duration,
    pub buffer: usize,
    pub backoff: Backoff,
    /// The fleet's start, as a monotonic instant and as wall-clock epoch milliseconds:
    /// reading timestamps are derived from the schedule, not from when they were sent.
    pub start: Instant,
    pub start_wall_ms: u64,
}

/// What produces a device's readings.
#[derive(Debug)]
pub(crate) enum Model {
    Patient(Box<Patient>),
    Home(HomeSensor),
    /// A Zigbee2MQTT gateway publishing for its children.
    Gateway(Vec<ZigbeeChild>),
}

impl Model {
    fn set_scenario(&mut self, scenario: Scenario) -> bool {
        match self {
            Model::Patient(patient) => {
                patient.set_scenario(scenario);
                true
            }
            Model::Home(_) | Model::Gateway(_) => false,
        }
    }
}

pub(crate) struct Device {
    id: String,
    /// The native telemetry topic; a gateway publishes on its children's topics instead.
    telemetry: String,
    status: String,
    commands: String,
    model: Model,
    rng: StdRng,
    /// Scenario changes still to come, earliest first.
    events: VecDeque<TimedEvent>,
}

impl Device {
    pub fn new(id: String, model: Model, rng: StdRng, events: Vec<TimedEvent>) -> Device {
        let (status, commands) = match model {
            Model::Gateway(_) => (BRIDGE_STATE_TOPIC.to_string(), SET_FILTER.to_string()),
            Model::Patient(_) | Model::Home(_) => {
                (status_topic(&id), format!("devices/{id}/commands/#"))
            }
        };
        Device {
            telemetry: telemetry_topic(&id),
            status,
            commands,
            id,
            model,
            rng,
            events: events.into(),
        }
    }

    /// Runs until `stop` turns true (or its sender goes away).
    pub async fn run(
        self,
        options: MqttOptions,
        settings: Settings,
        counters: Arc<Counters>,
        stop: watch::Receiver<bool>,
    ) {
        let span = tracing::debug_span!("device", id = %self.id);
        let connection = Connection::new(self, options, settings, counters, stop);
        connection.run().instrument(span).await;
    }

    /// Messages one sampling turn produces: one per child for a gateway, else one.
    fn messages_per_turn(&self) -> usize {
        match &self.model {
            Model::Gateway(children) => children.len().max(1),
            Model::Patient(_) | Model::Home(_) => 1,
        }
    }

    /// Takes one turn of readings `dt` after the last, stamped `ts`, and hands each message
    /// (topic, payload) to `emit`.
    fn sample(&mut self, dt: Duration, ts: u64, mut emit: impl FnMut(&str, Vec<u8>)) {
        let rng = &mut self.rng;
        match &mut self.model {
            Model::Patient(patient) => emit(
                &self.telemetry,
                telemetry_payload(ts, &patient.step(dt, rng)),
            ),
            Model::Home(sensor) => emit(
                &self.telemetry,
                telemetry_payload(ts, &sensor.step(dt, rng)),
            ),
            Model::Gateway(children) => {
                for child in children {
                    let payload = child.step(dt, ts, rng);
                    emit(child.topic(), payload);
                }
            }
        }
    }
}

struct Connection {
    device: Device,
    client: AsyncClient,
    eventloop: EventLoop,
    outbox: Outbox,
    settings: Settings,
    counters: Arc<Counters>,
    stop: watch::Receiver<bool>,
    connected: bool,
    next_tick: Instant,
    backoff: Duration,
    /// Reconnect jitter comes from its own generator so that the models' seeded sequence
    /// does not depend on how the network behaved.
    jitter: StdRng,
}

impl Connection {
    fn new(
        device: Device,
        mut options: MqttOptions,
        settings: Settings,
        counters: Arc<Counters>,
        stop: watch::Receiver<bool>,
    ) -> Connection {
        // A persistent session, so that a short network break loses nothing in flight; the
        // outbox covers the case where the broker lost the session anyway.
        options.set_clean_session(false);
        options.set_last_will(LastWill::new(
            &device.status,
            "offline",
            QoS::AtLeastOnce,
            true,
        ));
        let (client, eventloop) = AsyncClient::new(options, CHANNEL_CAPACITY);
        // The buffer is counted in sampling turns, so a gateway keeps as long a stretch of
        // readings for each of its children as a single sensor keeps of its own.
        let capacity = settings.buffer.saturating_mul(device.messages_per_turn());
        Connection {
            device,
            client,
            eventloop,
            outbox: Outbox::new(capacity, WINDOW),
            counters,
            stop,
            connected: false,
            next_tick: settings.start + settings.interval,
            backoff: settings.backoff.min,
            settings,
            jitter: StdRng::from_entropy(),
        }
    }

    async fn run(mut self) {
        while !*self.stop.borrow() {
            self.take_due_readings();
            if self.connected {
                self.flush();
            }

            // While disconnected the poll is connecting and is not raced against the tick:
            // dropping a half-done TLS handshake would only start it again. Readings that
            // fall due meanwhile are taken, with their scheduled time, on the next turn.
            tokio::select! {
                biased;
                _ = self.stop.changed() => break,
                event = self.eventloop.poll() => match event {
                    Ok(event) => self.on_event(event),
                    Err(err) => {
                        self.on_disconnect(&err);
                        if !self.wait_backoff().await {
                            break;
                        }
                    }
                },
                _ = sleep_until(self.next_tick), if self.connected => {}
            }
        }
        self.say_goodbye().await;
    }

    /// Takes every reading whose time has come. A device that fell behind by more than its
    /// buffer (a stalled process) skips ahead instead of producing a burst, and counts the
    /// skipped readings as dropped.
    fn take_due_readings(&mut self) {
        let now = Instant::now();
        let interval = self.settings.interval;
        let mut taken = 0;
        while self.next_tick <= now {
            if taken >= self.settings.buffer {
                let behind = now.duration_since(self.next_tick).as_nanos() / interval.as_nanos();
                let skipped = u32::try_from(behind + 1).unwrap_or(u32::MAX);
                self.next_tick += interval * skipped;
                let per_turn = self.device.messages_per_turn() as u64;
                self.counters
                    .dropped
                    .fetch_add(u64::from(skipped) * per_turn, Ordering::Relaxed);
                break;
            }
            self.take_reading(self.next_tick);
            self.next_tick += interval;
            taken += 1;
        }
    }

    fn take_reading(&mut self, at: Instant) {
        let since_start = at.duration_since(self.settings.start);
        self.apply_events(since_start);

        let ts = self.settings.start_wall_ms + since_start.as_millis() as u64;
        let (mut taken, mut dropped) = (0, 0);
        let outbox = &mut self.outbox;
        self.device
            .sample(self.settings.interval, ts, |topic, payload| {
                dropped += outbox.push(topic, payload);
                taken += 1;
            });

        self.counters.taken.fetch_add(taken, Ordering::Relaxed);
        if dropped > 0 {
            self.counters.dropped.fetch_add(dropped, Ordering::Relaxed);
            trace!(dropped, "offline buffer full, dropped the oldest readings");
        }
    }

    fn apply_events(&mut self, since_start: Duration) {
        while self
            .device
            .events
            .front()
            .is_some_and(|e| e.at <= since_start)
        {
            if let Some(event) = self.device.events.pop_front() {
                debug!(scenario = %event.scenario, "scheduled scenario change");
                self.device.model.set_scenario(event.scenario);
            }
        }
    }

    /// Hands queued readings to the client. A refused request (channel full or closed)
    /// stays queued for the next turn.
    fn flush(&mut self) {
        let client = &self.client;
        self.outbox.issue_with(|m| {
            client
                .try_publish(&m.topic, QoS::AtLeastOnce, m.retain, m.payload.clone())
                .is_ok()
        });
    }

    fn on_event(&mut self, event: Event) {
        match event {
            Event::Incoming(Packet::ConnAck(ack)) => self.on_connected(ack.session_present),
            Event::Outgoing(Outgoing::Publish(pkid)) => self.outbox.on_sent(pkid),
            Event::Incoming(Packet::PubAck(ack)) => {
                let delivered = self.outbox.on_acked(ack.pkid);
                if delivered.is_some_and(|m| m.kind == Kind::Reading) {
                    self.counters.published.fetch_add(1, Ordering::Relaxed);
                }
            }
            Event::Incoming(Packet::Publish(publish)) => {
                self.on_command(&publish.topic, &publish.payload)
            }
            _ => {}
        }
    }

    /// rumqttc 0.25 neither subscribes again nor keeps its queue when the session is gone,
    /// so every accepted connection subscribes and announces itself afresh.
    fn on_connected(&mut self, session_present: bool) {
        if !self.connected {
            self.connected = true;
            self.counters.connected.fetch_add(1, Ordering::Relaxed);
        }
        self.counters.connects.fetch_add(1, Ordering::Relaxed);
        self.backoff = self.settings.backoff.min;

        let dropped = self.outbox.on_connack(session_present);
        self.counters.dropped.fetch_add(dropped, Ordering::Relaxed);
        debug!(session_present, queued = self.outbox.queued(), "connected");

        if let Err(err) = self
            .client
            .try_subscribe(&self.device.commands, QoS::AtLeastOnce)
        {
            debug!(cause = %err, "could not subscribe to commands");
        }
        let client = &self.client;
        let announced = self
            .outbox
            .issue_status(&self.device.status, "online", |m| {
                client
                    .try_publish(&m.topic, QoS::AtLeastOnce, m.retain, m.payload.clone())
                    .is_ok()
            });
        if !announced {
            debug!("could not announce online");
        }
    }

    fn on_command(&mut self, topic: &str, payload: &[u8]) {
        self.counters.commands.fetch_add(1, Ordering::Relaxed);
        let command = topic.rsplit('/').next().unwrap_or_default();
        let text = String::from_utf8_lossy(payload);
        match (command, text.parse::<Scenario>()) {
            ("scenario", Ok(scenario)) if self.device.model.set_scenario(scenario) => {
                debug!(%scenario, "scenario changed by command");
            }
            _ => debug!(topic, payload = %text, "ignored command"),
        }
    }

    fn on_disconnect(&mut self, err: &rumqttc::ConnectionError) {
        if self.connected {
            self.connected = false;
            self.counters.connected.fetch_sub(1, Ordering::Relaxed);
            debug!(cause = %err, unacked = self.outbox.unacked(), "disconnected");
        } else {
            trace!(cause = %err, "connect failed");
        }
    }

    /// Sleeps the next jittered backoff; false when told to stop meanwhile.
    async fn wait_backoff(&mut self) -> bool {
        let delay = self.backoff;
        self.backoff = (delay * 2).min(self.settings.backoff.max);
        let jittered = delay.mul_f64(self.jitter.gen_range(0.5..=1.0));
        tokio::select! {
            _ = self.stop.changed() => false,
            _ = sleep(jittered) => true,
        }
    }

    /// A device switched off on purpose says `offline` itself: the broker only sends the
    /// will for a connection that breaks.
    async fn say_goodbye(mut self) {
        if !self.connected {
            return;
        }
        let offline = self.client.try_publish(
            &self.device.status,
            QoS::AtLeastOnce,
            true,
            "offline".as_bytes().to_vec(),
        );
        let disconnect = self.client.try_disconnect();
        if offline.is_err() || disconnect.is_err() {
            debug!("could not queue the goodbye");
        }

        let eventloop = &mut self.eventloop;
        let drained = timeout(GOODBYE, async {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        });
        if drained.await.is_err() {
            debug!("broker did not take the goodbye in time");
        }
        self.counters.connected.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The native telemetry payload: metric values and `ts` in epoch milliseconds.
fn telemetry_payload(ts: u64, metrics: &Metrics) -> Vec<u8> {
    let mut object = serde_json::Map::with_capacity(metrics.len() + 1);
    object.insert("ts".into(), ts.into());
    for (name, value) in metrics {
        object.insert((*name).into(), (*value).into());
    }
    serde_json::Value::Object(object).to_string().into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_carries_every_metric_and_the_timestamp() {
        let mut metrics = Metrics::new();
        metrics.insert("heart_rate", 72.0);
        metrics.insert("temperature", 36.9);
        let payload = telemetry_payload(1_700_000_000_123, &metrics);
        let value: serde_json::Value = serde_json::from_slice(&payload).unwrap_or_default();
        assert_eq!(value["ts"], 1_700_000_000_123u64);
        assert_eq!(value["heart_rate"], 72.0);
        assert_eq!(value["temperature"], 36.9);
        assert_eq!(value.as_object().map(|o| o.len()), Some(3));
    }
}
