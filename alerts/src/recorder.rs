//! Storing alert transitions: one task writes them to the store in the order they happened,
//! and keeps those the store could not take in a bounded in-memory queue, retried with
//! backoff, so that a database outage never holds up evaluation.
//!
//! Order matters: the store keeps an alert's latest state by upsert, so `acknowledged`
//! written before `firing` would leave the alert looking unacknowledged. While anything is
//! queued, new transitions queue behind it.
//!
//! # Known shortcomings
//!
//! - The queue lives in memory: transitions still queued when the process stops are not
//!   stored (they were published on MQTT and sent to webhooks all the same).
//! - A write that timed out may still have committed; its retry then adds a second history
//!   row for the same transition (the alert row itself is an upsert and stays right).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use telemon_model::metrics::{self, Counter, Gauge};
use telemon_model::AlertEvent;
use telemon_store::{Store, StoreError};
use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};

use crate::service::ServiceHealth;

/// Longest one write may take before the transition is queued for a retry instead.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// First wait before retrying the queue; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Tries of a transition the store refuses while reachable (a constraint, a bad value):
/// past this it is dropped so that it cannot hold up every transition behind it. A store
/// that is unreachable is retried without limit.
const MAX_REFUSALS: u32 = 5;

struct Queued {
    event: AlertEvent,
    refusals: u32,
}

struct Counters {
    retries: Counter,
    dropped: Counter,
    queued: Gauge,
}

pub(crate) struct Recorder {
    store: Store,
    queue: VecDeque<Queued>,
    max_queue: usize,
    backoff: Duration,
    health: Arc<ServiceHealth>,
    counters: Counters,
}

impl Recorder {
    pub(crate) fn new(store: Store, max_queue: usize, health: Arc<ServiceHealth>) -> Self {
        Recorder {
            store,
            queue: VecDeque::new(),
            max_queue: max_queue.max(1),
            backoff: FIRST_BACKOFF,
            health,
            counters: Counters {
                retries: metrics::counter(
                    "telemon_alerts_store_retries_total",
                    "Alert transitions written to the store again after a failed write.",
                    &[],
                ),
                dropped: metrics::counter(
                    "telemon_alerts_store_dropped_total",
                    "Alert transitions never stored: the retry queue was full, or the store \
                     kept refusing them.",
                    &[],
                ),
                queued: metrics::gauge(
                    "telemon_alerts_store_queue",
                    "Alert transitions waiting for the store to come back.",
                    &[],
                ),
            },
        }
    }

    /// Records every transition received until the sender side closes.
    pub(crate) async fn run(mut self, mut rx: mpsc::Receiver<AlertEvent>) {
        loop {
            let retry = tokio::time::sleep(self.backoff);
            tokio::select! {
                event = rx.recv() => match event {
                    Some(event) => self.record(event).await,
                    None => return,
                },
                () = retry, if !self.queue.is_empty() => self.retry().await,
            }
        }
    }

    /// Writes the transition now, or queues it behind those already waiting.
    pub(crate) async fn record(&mut self, event: AlertEvent) {
        if !self.queue.is_empty() {
            return self.enqueue(event);
        }
        match self.write(&event).await {
            Ok(()) => {}
            Err(e) => {
                warn!(alert = %event.id, cause = %e, "alert not stored; queued for retry");
                self.enqueue(event);
            }
        }
    }

    /// Writes queued transitions, oldest first, until the store fails again.
    pub(crate) async fn retry(&mut self) {
        while let Some(event) = self.queue.front().map(|q| q.event.clone()) {
            self.counters.retries.inc();
            match self.write(&event).await {
                Ok(()) => {
                    self.queue.pop_front();
                }
                Err(e) => {
                    let reachable = !e.is_unavailable();
                    let mut refusals = 0;
                    if let Some(front) = self.queue.front_mut().filter(|_| reachable) {
                        front.refusals += 1;
                        refusals = front.refusals;
                    }
                    if refusals >= MAX_REFUSALS {
                        error!(alert = %event.id, cause = %e, "store keeps refusing the alert; \
                               transition dropped");
                        self.counters.dropped.inc();
                        self.queue.pop_front();
                        continue;
                    }
                    debug!(alert = %event.id, cause = %e, "store still failing");
                    self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
                    return self.report();
                }
            }
        }
        info!("alert store queue drained");
        self.backoff = FIRST_BACKOFF;
        self.report();
    }

    #[cfg(test)]
    pub(crate) fn queued(&self) -> usize {
        self.queue.len()
    }

    fn enqueue(&mut self, event: AlertEvent) {
        if self.queue.len() >= self.max_queue {
            // The oldest goes: the newest transitions say what is true now.
            if let Some(lost) = self.queue.pop_front() {
                error!(alert = %lost.event.id, "alert store queue full; oldest transition dropped");
                self.counters.dropped.inc();
            }
        }
        self.queue.push_back(Queued { event, refusals: 0 });
        self.report();
    }

    async fn write(&self, event: &AlertEvent) -> Result<(), WriteError> {
        match tokio::time::timeout(WRITE_TIMEOUT, self.store.record_alert(event)).await {
            Ok(result) => result.map_err(WriteError::Store),
            Err(_) => Err(WriteError::Timeout),
        }
    }

    fn report(&self) {
        self.counters.queued.set(self.queue.len() as i64);
        self.health.store_queue(self.queue.len());
    }
}

#[derive(Debug, thiserror::Error)]
enum WriteError {
    #[error(transparent)]
    Store(StoreError),
    #[error("the store did not answer within {WRITE_TIMEOUT:?}")]
    Timeout,
}

impl WriteError {
    fn is_unavailable(&self) -> bool {
        match self {
            WriteError::Store(e) => e.is_unavailable(),
            WriteError::Timeout => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{TimeZone, Utc};
    use telemon_model::health::Health;
    use telemon_model::{AlertState, Priority};

    fn event(state: AlertState, secs: i64) -> AlertEvent {
        let at = |s| Utc.timestamp_opt(1_700_000_000 + s, 0).unwrap();
        AlertEvent {
            id: "hr-high:bed-1:1700000000000".into(),
            rule: "hr-high".into(),
            subject: "bed-1".into(),
            priority: Priority::High,
            state,
            metric: Some("heart_rate".into()),
            value: Some(130.0),
            message: "Heart rate high".into(),
            started_at: at(0),
            updated_at: at(secs),
            acknowledged_by: None,
            acknowledged_at: None,
        }
    }

    async fn sqlite(name: &str) -> (Store, std::path::PathBuf) {
        let dir =
            std::env::temp_dir().join(format!("telemon-recorder-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let url = format!("sqlite:{}", dir.join("alerts.db").display());
        (Store::connect(&url).await.unwrap(), dir)
    }

    #[tokio::test]
    async fn transitions_the_store_cannot_take_are_queued_and_written_in_order_later() {
        // Without migrations the alerts table is missing, so every write fails.
        let (store, dir) = sqlite("order").await;
        let health = Arc::new(ServiceHealth::new(Health::default()));
        let mut recorder = Recorder::new(store.clone(), 10, health.clone());
        recorder.record(event(AlertState::Firing, 0)).await;
        recorder.record(event(AlertState::Acknowledged, 5)).await;
        assert_eq!(recorder.queued(), 2);
        assert!(health.is_degraded());

        store.migrate().await.unwrap();
        recorder.retry().await;
        assert_eq!(recorder.queued(), 0);
        let stored = store
            .alert("hr-high:bed-1:1700000000000")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(stored.state, AlertState::Acknowledged, "written in order");
        assert!(!health.is_degraded());
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn a_full_queue_drops_the_oldest_transition() {
        let (store, dir) = sqlite("full").await;
        let health = Arc::new(ServiceHealth::new(Health::default()));
        let mut recorder = Recorder::new(store.clone(), 2, health);
        recorder.record(event(AlertState::Firing, 0)).await;
        recorder.record(event(AlertState::Acknowledged, 5)).await;
        recorder.record(event(AlertState::Resolved, 9)).await;
        assert_eq!(recorder.queued(), 2);
        assert_eq!(recorder.queue[0].event.state, AlertState::Acknowledged);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn a_transition_refused_by_a_reachable_store_is_dropped_after_a_few_tries() {
        let (store, dir) = sqlite("refused").await;
        let health = Arc::new(ServiceHealth::new(Health::default()));
        let mut recorder = Recorder::new(store, 10, health);
        recorder.record(event(AlertState::Firing, 0)).await;
        for _ in 0..MAX_REFUSALS {
            assert_eq!(recorder.queued(), 1);
            recorder.retry().await;
        }
        assert_eq!(recorder.queued(), 0);
        let _ = std::fs::remove_dir_all(dir);
    }
}
