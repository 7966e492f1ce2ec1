//! The live feed: readings and alert transitions as they cross the broker, fanned out to
//! every stream client.
//!
//! The API subscribes to device topics itself (QoS 0: a live view wants the newest data, not
//! a backlog) and decodes with the same decoder as ingest, so a reading reaches dashboards
//! without waiting for its batch to be committed. A short history of events is kept so that
//! a reconnecting client resumes from `Last-Event-ID` without a gap.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use parking_lot::Mutex;
use rumqttc::{AsyncClient, Event, Packet, QoS};
use serde::Serialize;
use telemon_ingest::decode::{Decoder, Message};
use telemon_model::alert::AckRequest;
use telemon_model::bus::{BusConfig, BusError};
use telemon_model::health::{Health, Status};
use telemon_model::topic::{ALERTS_FILTER, ALERT_ACK_TOPIC};
use telemon_model::{AlertEvent, Reading};
use tokio::sync::broadcast;
use tracing::{debug, info, warn};

/// Events a slow client may fall behind by before it skips ahead.
const CHANNEL_CAPACITY: usize = 4096;
/// Events kept for `Last-Event-ID` resumption.
const HISTORY: usize = 1024;
const HEALTH: &str = "api-live";

#[derive(Clone, Debug, Serialize)]
#[serde(tag = "type", content = "data", rename_all = "lowercase")]
pub enum LiveData {
    Reading(Reading),
    Alert(AlertEvent),
}

#[derive(Clone, Debug)]
pub struct LiveEvent {
    pub id: u64,
    pub data: LiveData,
}

impl LiveEvent {
    pub fn device(&self) -> Option<&str> {
        match &self.data {
            LiveData::Reading(r) => Some(r.device_id.as_str()),
            LiveData::Alert(_) => None,
        }
    }
}

struct Inner {
    tx: broadcast::Sender<Arc<LiveEvent>>,
    client: std::sync::OnceLock<AsyncClient>,
    next_id: AtomicU64,
    history: Mutex<VecDeque<Arc<LiveEvent>>>,
}

/// Handle to the feed; cheap to clone.
#[derive(Clone)]
pub struct Live(Arc<Inner>);

impl Live {
    /// A feed with no broker behind it; events come only from [`Live::publish`].
    pub fn detached() -> Live {
        let (tx, _) = broadcast::channel(CHANNEL_CAPACITY);
        Live(Arc::new(Inner {
            tx,
            client: std::sync::OnceLock::new(),
            next_id: AtomicU64::new(1),
            history: Mutex::new(VecDeque::with_capacity(HISTORY)),
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

    /// Sends an event to every stream client and keeps it for resumption.
    pub fn publish(&self, data: LiveData) {
        let event = Arc::new(LiveEvent {
            id: self.0.next_id.fetch_add(1, Ordering::Relaxed),
            data,
        });
        {
            let mut history = self.0.history.lock();
            if history.len() == HISTORY {
                history.pop_front();
            }
            history.push_back(event.clone());
        }
        let _ = self.0.tx.send(event);
    }

    /// A receiver of new events, plus the kept events after `last_id` (for resumption).
    pub fn subscribe(
        &self,
        last_id: Option<u64>,
    ) -> (Vec<Arc<LiveEvent>>, broadcast::Receiver<Arc<LiveEvent>>) {
        let (missed, _, rx) = self.resume(last_id);
        (missed, rx)
    }

    /// Like [`Live::subscribe`], and also how many events after `last_id` are no longer kept
    /// (the client was away longer than the history covers), so the stream can say so.
    pub fn resume(
        &self,
        last_id: Option<u64>,
    ) -> (
        Vec<Arc<LiveEvent>>,
        u64,
        broadcast::Receiver<Arc<LiveEvent>>,
    ) {
        let history = self.0.history.lock();
        let rx = self.0.tx.subscribe();
        let Some(last) = last_id else {
            return (Vec::new(), 0, rx);
        };
        let missed: Vec<_> = history.iter().filter(|e| e.id > last).cloned().collect();
        let next = self.0.next_id.load(Ordering::Relaxed);
        let first_kept = history.front().map_or(next, |e| e.id);
        let lost = first_kept.saturating_sub(last + 1);
        (missed, lost, rx)
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
        self.0.tx.receiver_count()
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
    use telemon_model::{DeviceId, Value};

    fn reading(v: f64) -> LiveData {
        LiveData::Reading(Reading {
            device_id: DeviceId::new("bed-1").unwrap(),
            metric: "heart_rate".into(),
            time: Utc::now(),
            value: Value::Number(v),
            unit: None,
        })
    }

    #[test]
    fn resumes_after_the_last_event_seen() {
        let live = Live::detached();
        for v in 0..5 {
            live.publish(reading(v as f64));
        }
        let (missed, _rx) = live.subscribe(Some(3));
        assert_eq!(missed.iter().map(|e| e.id).collect::<Vec<_>>(), vec![4, 5]);
        let (missed, _rx) = live.subscribe(None);
        assert!(missed.is_empty());
    }

    #[test]
    fn history_is_bounded() {
        let live = Live::detached();
        for v in 0..(HISTORY + 10) {
            live.publish(reading(v as f64));
        }
        let (missed, lost, _rx) = live.resume(Some(0));
        assert_eq!(missed.len(), HISTORY);
        assert_eq!(lost, 10, "events 1-10 are no longer kept");
        let (_, lost, _rx) = live.resume(Some(20));
        assert_eq!(lost, 0);
        assert_eq!(missed[0].id, 11);
    }
}
