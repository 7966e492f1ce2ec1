//! The live feed: readings and alert transitions as they cross the broker, routed to the
//! stream clients that want them.
//!
//! The API subscribes to device topics itself (QoS 0: a live view wants the newest data, not
//! a backlog) and decodes with the same decoder as ingest, so a reading reaches dashboards
//! without waiting for its batch to be committed. A short history of events is kept so that
//! a reconnecting client resumes from `Last-Event-ID` without a gap.
//!
//! Routing: each client registers the devices it may and wants to see, and a reading goes
//! only to the clients registered for its device (or for every device). With a thousand
//! clients each watching a few beds, a reading wakes a handful of them, not all of them. Each
//! client has its own bounded queue: one that falls behind loses the events that do not fit,
//! is told how many, and never slows the feed or anyone else.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use chrono::Utc;
use parking_lot::Mutex;
use rumqttc::{AsyncClient, Event, Packet, QoS};
use serde::Serialize;
use telemon_ingest::decode::{Decoder, Message};
use telemon_model::alert::AckRequest;
use telemon_model::bus::{BusConfig, BusError};
use telemon_model::health::{Health, Status};
use telemon_model::metrics::{self, Counter};
use telemon_model::topic::{ALERTS_FILTER, ALERT_ACK_TOPIC};
use telemon_model::{AlertEvent, Reading};
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

/// Events a client may fall behind by before it skips ahead. At 100 readings a second for a
/// bed that is ten seconds of a stalled client; the queue allocates only what it holds.
const CLIENT_QUEUE: usize = 1024;
/// Events kept for `Last-Event-ID` resumption.
const HISTORY: usize = 1024;
const HEALTH: &str = "api-live";

#[derive(Clone, Debug, Serialize)]
#[serde(tag = "type", content = "data", rename_all = "lowercase")]
pub enum LiveData {
    Reading(Reading),
    Alert(AlertEvent),
}

#[derive(Debug)]
pub struct LiveEvent {
    pub id: u64,
    pub data: LiveData,
    /// The event's data as JSON, made once by the first client that sends it: a reading
    /// usually goes to several clients.
    json: OnceLock<Box<str>>,
}

impl LiveEvent {
    pub fn new(id: u64, data: LiveData) -> Self {
        LiveEvent {
            id,
            data,
            json: OnceLock::new(),
        }
    }

    /// The reading or alert itself as JSON (without the `type` wrapper).
    pub fn json(&self) -> &str {
        self.json.get_or_init(|| {
            let json = match &self.data {
                LiveData::Reading(r) => serde_json::to_string(r),
                LiveData::Alert(a) => serde_json::to_string(a),
            };
            json.unwrap_or_default().into_boxed_str()
        })
    }

    pub fn device(&self) -> Option<&str> {
        match &self.data {
            LiveData::Reading(r) => Some(r.device_id.as_str()),
            LiveData::Alert(_) => None,
        }
    }
}

/// What a client wants routed to it. Finer filters (metric, an alert's subject, the caller's
/// scope) are the stream's to apply; routing only decides who is woken.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Interest {
    /// The devices whose readings the client gets; `None` for every device.
    pub devices: Option<HashSet<String>>,
    pub readings: bool,
    pub alerts: bool,
}

/// What a client receives: an event, or how many it lost because its queue was full.
#[derive(Debug)]
pub enum Delivery {
    Event(Arc<LiveEvent>),
    Lagged(u64),
}

/// One queued event, with the number of events dropped for this client just before it.
struct Queued {
    lost_before: u64,
    event: Arc<LiveEvent>,
}

struct Sink {
    tx: mpsc::Sender<Queued>,
    /// Events dropped since the last one queued, reported ahead of the next one.
    lost: AtomicU64,
}

impl Sink {
    /// Queues without waiting: a full queue drops the event and counts it.
    fn offer(&self, event: &Arc<LiveEvent>, dropped: &Counter) {
        let lost_before = self.lost.swap(0, Ordering::Relaxed);
        let queued = Queued {
            lost_before,
            event: event.clone(),
        };
        match self.tx.try_send(queued) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(q)) => {
                self.lost.fetch_add(q.lost_before + 1, Ordering::Relaxed);
                dropped.inc();
            }
            // The client is leaving; its registration goes with its subscription.
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }
}

/// Who gets what, keyed so that publishing a reading touches only its device's clients.
#[derive(Default)]
struct Routes {
    next_client: u64,
    sinks: HashMap<u64, (Arc<Sink>, Interest)>,
    by_device: HashMap<String, Vec<(u64, Arc<Sink>)>>,
    every_device: Vec<(u64, Arc<Sink>)>,
    alerts: Vec<(u64, Arc<Sink>)>,
}

impl Routes {
    fn add(&mut self, id: u64, sink: Arc<Sink>, interest: Interest) {
        if interest.readings {
            match &interest.devices {
                None => self.every_device.push((id, sink.clone())),
                Some(devices) => {
                    for device in devices {
                        let clients = self.by_device.entry(device.clone()).or_default();
                        clients.push((id, sink.clone()));
                    }
                }
            }
        }
        if interest.alerts {
            self.alerts.push((id, sink.clone()));
        }
        self.sinks.insert(id, (sink, interest));
    }

    fn remove(&mut self, id: u64) -> Option<Arc<Sink>> {
        let (sink, interest) = self.sinks.remove(&id)?;
        let drop_id = |clients: &mut Vec<(u64, Arc<Sink>)>| clients.retain(|(c, _)| *c != id);
        if interest.readings {
            match &interest.devices {
                None => drop_id(&mut self.every_device),
                Some(devices) => {
                    for device in devices {
                        if let Some(clients) = self.by_device.get_mut(device) {
                            drop_id(clients);
                            if clients.is_empty() {
                                self.by_device.remove(device);
                            }
                        }
                    }
                }
            }
        }
        if interest.alerts {
            drop_id(&mut self.alerts);
        }
        Some(sink)
    }

    fn route(&self, event: &Arc<LiveEvent>, dropped: &Counter) {
        let (general, particular) = match &event.data {
            LiveData::Reading(r) => (&self.every_device, self.by_device.get(r.device_id.as_str())),
            LiveData::Alert(_) => (&self.alerts, None),
        };
        for (_, sink) in general.iter().chain(particular.into_iter().flatten()) {
            sink.offer(event, dropped);
        }
    }
}

/// The kept history and the routes, under one lock so that a client resuming from
/// `Last-Event-ID` sees every event exactly once: from the history or from its queue.
#[derive(Default)]
struct Feed {
    history: VecDeque<Arc<LiveEvent>>,
    routes: Routes,
}

/// A client's registration with the feed; dropping it unregisters the client.
pub struct Subscription {
    live: Live,
    id: u64,
    rx: mpsc::Receiver<Queued>,
    /// An event received together with a loss report, delivered after the report.
    held: Option<Arc<LiveEvent>>,
}

impl Subscription {
    /// The next delivery; `None` only if the feed is gone.
    pub async fn recv(&mut self) -> Option<Delivery> {
        if let Some(event) = self.held.take() {
            return Some(Delivery::Event(event));
        }
        let queued = self.rx.recv().await?;
        if queued.lost_before > 0 {
            self.held = Some(queued.event);
            return Some(Delivery::Lagged(queued.lost_before));
        }
        Some(Delivery::Event(queued.event))
    }

    /// Changes what is routed to this client from the next event on, e.g. when the caller's
    /// patients change.
    pub fn set_interest(&mut self, interest: Interest) {
        let mut feed = self.live.0.feed.lock();
        if let Some(sink) = feed.routes.remove(self.id) {
            feed.routes.add(self.id, sink, interest);
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.live.0.feed.lock().routes.remove(self.id);
    }
}

struct Inner {
    feed: Mutex<Feed>,
    client: OnceLock<AsyncClient>,
    next_id: AtomicU64,
    /// Bumped whenever who-may-see-what changes here (assignments, devices attached to
    /// patients, sessions ended), so open streams re-check their caller's scope at once.
    scope_version: watch::Sender<ScopeChange>,
    dropped: Counter,
}

/// The latest change of who may see what, numbered so that a stream can tell whether it
/// missed one in between (and then checks its caller whoever the latest was about).
#[derive(Clone, Debug, Default)]
pub struct ScopeChange {
    pub version: u64,
    pub who: Option<String>,
}

impl ScopeChange {
    /// Whether a stream of `name` that last saw `seen` must check its caller again.
    pub fn concerns(&self, name: &str, seen: u64) -> bool {
        self.version > seen + 1 || self.who.as_deref().is_none_or(|who| who == name)
    }
}

/// Handle to the feed; cheap to clone.
#[derive(Clone)]
pub struct Live(Arc<Inner>);

impl Live {
    /// A feed with no broker behind it; events come only from [`Live::publish`].
    pub fn detached() -> Live {
        let dropped = metrics::counter(
            "telemon_api_stream_events_dropped_total",
            "Live events not delivered to a stream client whose queue was full.",
            &[],
        );
        Live(Arc::new(Inner {
            feed: Mutex::new(Feed {
                history: VecDeque::with_capacity(HISTORY),
                routes: Routes::default(),
            }),
            client: OnceLock::new(),
            next_id: AtomicU64::new(1),
            scope_version: watch::Sender::new(ScopeChange::default()),
            dropped,
        }))
    }

    pub fn start(bus: BusConfig, decoder: Arc<Decoder>, health: Health) -> Result<Live, BusError> {
        let live = Live::detached();
        let client_id = format!("telemon-api-{}", std::process::id());
        let mut options = bus.mqtt_options(&client_id)?;
        options.set_clean_session(true);
        let (client, eventloop) = AsyncClient::new(options, 64);
        let _ = live.0.client.set(client.clone());
        let mut filters = decoder.subscriptions();
        filters.push(ALERTS_FILTER.to_string());
        health.set(HEALTH, Status::Starting, "connecting to the broker");
        tokio::spawn(
            live.clone()
                .follow(client, eventloop, filters, decoder, health),
        );
        Ok(live)
    }

    /// Sends an event to the clients that want it and keeps it for resumption.
    pub fn publish(&self, data: LiveData) {
        // Numbered under the lock, so that the history is in id order.
        let mut feed = self.0.feed.lock();
        let id = self.0.next_id.fetch_add(1, Ordering::Relaxed);
        let event = Arc::new(LiveEvent::new(id, data));
        if feed.history.len() == HISTORY {
            feed.history.pop_front();
        }
        feed.history.push_back(event.clone());
        feed.routes.route(&event, &self.0.dropped);
    }

    /// Registers a client. Returns the kept events after `last_id` (for resumption), how many
    /// events after `last_id` are no longer kept (the client was away longer than the history
    /// covers, so the stream can say so), and the subscription for what comes next.
    pub fn subscribe(
        &self,
        interest: Interest,
        last_id: Option<u64>,
    ) -> (Vec<Arc<LiveEvent>>, u64, Subscription) {
        let (tx, rx) = mpsc::channel(CLIENT_QUEUE);
        let sink = Arc::new(Sink {
            tx,
            lost: AtomicU64::new(0),
        });
        let mut feed = self.0.feed.lock();
        let id = feed.routes.next_client;
        feed.routes.next_client += 1;
        feed.routes.add(id, sink, interest);
        let subscription = Subscription {
            live: self.clone(),
            id,
            rx,
            held: None,
        };
        let Some(last) = last_id else {
            return (Vec::new(), 0, subscription);
        };

        let missed: Vec<_> = feed
            .history
            .iter()
            .filter(|e| e.id > last)
            .cloned()
            .collect();
        let next = self.0.next_id.load(Ordering::Relaxed);
        let first_kept = feed.history.front().map_or(next, |e| e.id);
        let lost = first_kept.saturating_sub(last.saturating_add(1));
        (missed, lost, subscription)
    }

    /// Tells open streams that who may see what has changed.
    /// `who`: the user or token whose access changed, or `None` when it may be anyone's
    /// (a device attached to or detached from a patient).
    pub fn scope_changed(&self, who: Option<&str>) {
        self.0.scope_version.send_modify(|change| {
            change.version += 1;
            change.who = who.map(str::to_string);
        });
    }

    /// Sees each [`Live::scope_changed`] made after this receiver was.
    pub fn scope_changes(&self) -> watch::Receiver<ScopeChange> {
        self.0.scope_version.subscribe()
    }

    /// Asks the alerts service, over the broker, to acknowledge an alert.
    pub async fn request_ack(&self, id: &str, by: &str) -> Result<(), rumqttc::ClientError> {
        let request = AckRequest {
            id: id.to_string(),
            by: by.to_string(),
        };
        let payload = serde_json::to_vec(&request).unwrap_or_default();
        match self.0.client.get() {
            Some(client) => {
                client
                    .publish(ALERT_ACK_TOPIC, QoS::AtLeastOnce, false, payload)
                    .await
            }
            None => Err(rumqttc::ClientError::Request(rumqttc::Request::Disconnect(
                rumqttc::Disconnect,
            ))),
        }
    }

    pub fn clients(&self) -> usize {
        self.0.feed.lock().routes.sinks.len()
    }

    async fn follow(
        self,
        client: AsyncClient,
        mut eventloop: rumqttc::EventLoop,
        filters: Vec<String>,
        decoder: Arc<Decoder>,
        health: Health,
    ) {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    self.on_message(&p.topic, &p.payload, &decoder)
                }
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    info!("live feed connected to the broker");
                    let subs = filters
                        .iter()
                        .map(|f| rumqttc::SubscribeFilter::new(f.clone(), QoS::AtMostOnce));
                    if let Err(e) = client.try_subscribe_many(subs) {
                        warn!(cause = %e, "live feed could not subscribe");
                    }
                    health.set(HEALTH, Status::Ok, "");
                }
                Ok(_) => {}
                Err(e) => {
                    warn!(cause = %e, "live feed lost the broker; reconnecting");
                    health.set(HEALTH, Status::Degraded, "broker unreachable");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    fn on_message(&self, topic: &str, payload: &[u8], decoder: &Decoder) {
        if topic.starts_with("alerts/") {
            match serde_json::from_slice::<AlertEvent>(payload) {
                Ok(alert) => self.publish(LiveData::Alert(alert)),
                Err(e) => debug!(topic, cause = %e, "unreadable alert event"),
            }
            return;
        }
        let message = Message {
            topic,
            payload,
            identity: None,
            received_at: Utc::now(),
        };
        // Refusals are ingest's to report and dead-letter; the live view just skips them.
        if let Ok(decoded) = decoder.decode(&message) {
            for reading in decoded.readings {
                self.publish(LiveData::Reading(reading));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;
    use telemon_model::{DeviceId, Value};

    fn reading_of(device: &str, v: f64) -> LiveData {
        LiveData::Reading(Reading {
            device_id: DeviceId::new(device).unwrap(),
            metric: "heart_rate".into(),
            time: Utc::now(),
            value: Value::Number(v),
            unit: None,
        })
    }

    fn reading(v: f64) -> LiveData {
        reading_of("bed-1", v)
    }

    fn everything() -> Interest {
        Interest {
            devices: None,
            readings: true,
            alerts: true,
        }
    }

    fn devices(ids: &[&str]) -> Interest {
        Interest {
            devices: Some(ids.iter().map(|d| d.to_string()).collect()),
            readings: true,
            alerts: false,
        }
    }

    /// The events queued for a client right now, without waiting.
    fn queued(sub: &mut Subscription) -> Vec<String> {
        let mut out = Vec::new();
        while let Some(delivery) = sub.recv().now_or_never().flatten() {
            out.push(match delivery {
                Delivery::Event(e) => format!("{}:{}", e.id, e.device().unwrap_or("alert")),
                Delivery::Lagged(n) => format!("lagged {n}"),
            });
        }
        out
    }

    #[test]
    fn resumes_after_the_last_event_seen() {
        let live = Live::detached();
        for v in 0..5 {
            live.publish(reading(v as f64));
        }
        let (missed, _, _sub) = live.subscribe(everything(), Some(3));
        assert_eq!(missed.iter().map(|e| e.id).collect::<Vec<_>>(), vec![4, 5]);
        let (missed, _, _sub) = live.subscribe(everything(), None);
        assert!(missed.is_empty());
    }

    #[test]
    fn history_is_bounded() {
        let live = Live::detached();
        for v in 0..(HISTORY + 10) {
            live.publish(reading(v as f64));
        }
        let (missed, lost, _sub) = live.subscribe(everything(), Some(0));
        assert_eq!(missed.len(), HISTORY);
        assert_eq!(lost, 10, "events 1-10 are no longer kept");
        let (_, lost, _sub) = live.subscribe(everything(), Some(20));
        assert_eq!(lost, 0);
        assert_eq!(missed[0].id, 11);
    }

    #[test]
    fn a_reading_reaches_only_the_clients_of_its_device() {
        let live = Live::detached();
        let (_, _, mut bed1) = live.subscribe(devices(&["bed-1"]), None);
        let (_, _, mut bed2) = live.subscribe(devices(&["bed-2", "bed-3"]), None);
        let (_, _, mut all) = live.subscribe(everything(), None);
        let (_, _, mut alerts_only) = live.subscribe(
            Interest {
                devices: None,
                readings: false,
                alerts: true,
            },
            None,
        );

        live.publish(reading_of("bed-1", 1.0));
        live.publish(reading_of("bed-3", 2.0));

        assert_eq!(queued(&mut bed1), ["1:bed-1"]);
        assert_eq!(queued(&mut bed2), ["2:bed-3"]);
        assert_eq!(queued(&mut all), ["1:bed-1", "2:bed-3"]);
        assert!(queued(&mut alerts_only).is_empty());
    }

    #[test]
    fn a_full_queue_drops_and_reports_how_many_before_the_next_event() {
        let live = Live::detached();
        let (_, _, mut slow) = live.subscribe(devices(&["bed-1"]), None);
        for v in 0..(CLIENT_QUEUE + 5) {
            live.publish(reading(v as f64));
        }
        assert!(live.0.dropped.get() >= 5, "drops are counted");
        let first = queued(&mut slow);
        assert_eq!(first.len(), CLIENT_QUEUE, "the queue holds what fits");

        let next = CLIENT_QUEUE + 6;
        live.publish(reading(0.0));
        assert_eq!(
            queued(&mut slow),
            ["lagged 5".to_string(), format!("{next}:bed-1")]
        );
    }

    #[test]
    fn a_scope_change_concerns_its_user_or_everyone() {
        let change = |version, who: Option<&str>| ScopeChange {
            version,
            who: who.map(str::to_string),
        };
        assert!(change(5, Some("ann")).concerns("ann", 4));
        assert!(!change(5, Some("ann")).concerns("bob", 4));
        assert!(
            change(5, None).concerns("bob", 4),
            "a device moved: anyone's"
        );
        assert!(
            change(6, Some("ann")).concerns("bob", 4),
            "one missed in between"
        );
    }

    #[test]
    fn a_client_leaves_nothing_behind_and_can_change_its_devices() {
        let live = Live::detached();
        let (_, _, mut sub) = live.subscribe(devices(&["bed-1"]), None);
        let (_, _, gone) = live.subscribe(devices(&["bed-1"]), None);
        assert_eq!(live.clients(), 2);
        drop(gone);
        assert_eq!(live.clients(), 1);

        sub.set_interest(devices(&["bed-2"]));
        live.publish(reading_of("bed-1", 1.0));
        live.publish(reading_of("bed-2", 2.0));
        assert_eq!(queued(&mut sub), ["2:bed-2"]);

        drop(sub);
        let feed = live.0.feed.lock();
        assert_eq!(feed.routes.sinks.len(), 0);
        assert!(
            feed.routes.by_device.is_empty(),
            "no empty device entries kept"
        );
    }
}
