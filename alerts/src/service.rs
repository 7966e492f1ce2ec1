//! The alerts service: feeds the live MQTT stream to the [`Engine`] and sends every alert
//! transition on: published on `alerts/{subject}`, stored with its history, and handed to
//! the webhooks.
//!
//! Tasks:
//! - the MQTT task polls the connection, decodes device messages with the ingest
//!   [`Decoder`] (so mapped ecosystems are evaluated too) and reads acknowledgement requests;
//! - the engine task owns the [`Engine`] alone: readings, acknowledgements, rule changes
//!   and a tick reach it through one channel, and it publishes each transition before
//!   anything else so that dashboards see it first;
//! - the recorder task stores transitions, queueing them in memory while the store is down
//!   (see `recorder`);
//! - the rules task reads the rules made through the API from the store every
//!   [`AlertsSettings::rules_refresh`] and hands them to the engine task when they changed
//!   (see [`crate::ruleset`]); it also mirrors the file rules into the store, so that the API
//!   can list the merged set;
//! - one task per webhook (see [`crate::notify`]).
//!
//! The MQTT session is clean: the service is a live evaluator, and readings missed while it
//! was away are judged by ingest's storage, not replayed. Subscriptions are made again on
//! every connection, since rumqttc does not restore them.
//!
//! At start-up the active alerts are loaded from the store, so after a restart none is lost
//! and none fires twice.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use rumqttc::{
    AsyncClient, Event, Packet, Publish, QoS, SubAck, SubscribeFilter, SubscribeReasonCode,
};
use telemon_ingest::decode::{Decoder, Message, ONLINE_METRIC};
use telemon_model::alert::AckRequest;
use telemon_model::bus::{BusConfig, BusError};
use telemon_model::health::{Health, Status};
use telemon_model::metrics::{self, Counter, Gauge};
use telemon_model::topic::{alert_topic, ALERT_ACK_TOPIC};
use telemon_model::{AlertEvent, AlertState, Reading};
use telemon_store::{AlertQuery, RuleTable, Store, StoreError};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, info, trace, warn};

use crate::lifecycle::AckError;
use crate::notify::{Notifier, NotifyError, RetryPolicy, Webhook};
use crate::recorder::Recorder;
use crate::rule::{validate_rules, Rule, RuleError, RuleFile};
use crate::ruleset::{self, FILE_RULE_AUTHOR};
use crate::{Directory, Engine};

const HEALTH: &str = "alerts";

/// Inputs waiting for the engine. Deep enough for bursts from thousands of devices; when it
/// is full the MQTT task waits, and the broker holds messages back.
const INPUT_QUEUE: usize = 10_000;
/// Transitions waiting for the recorder, which drains them into its own retry queue.
const RECORD_QUEUE: usize = 4_096;
/// MQTT requests (publishes, subscriptions) waiting for the connection.
const MQTT_QUEUE: usize = 1_000;
/// Tries at loading active alerts from the store at start-up, a second apart and more.
const RESTORE_TRIES: u32 = 5;

#[derive(Debug, thiserror::Error)]
pub enum AlertsError {
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error(transparent)]
    Rules(#[from] RuleError),
    #[error(transparent)]
    Webhook(#[from] NotifyError),
    #[error("loading active alerts from the store: {0}")]
    Restore(#[source] StoreError),
}

/// Why a rule change through [`AlertsHandle::set_rules`] did not happen.
#[derive(Debug, thiserror::Error)]
pub enum SetRulesError {
    #[error(transparent)]
    Invalid(#[from] RuleError),
    #[error("saving rules to {path}: {source}")]
    Save {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("encoding rules: {0}")]
    Encode(#[from] toml::ser::Error),
    /// The engine task has ended (the process is shutting down).
    #[error("the alerts service is not running")]
    Stopped,
}

#[derive(Clone, Debug)]
pub struct AlertsSettings {
    /// MQTT client id. Two evaluators with one id would disconnect each other.
    pub client_id: String,
    /// Where rule changes made through [`AlertsHandle::set_rules`] are saved (TOML, the rule
    /// file format), so that they survive a restart. Not saved when absent.
    pub rules_file: Option<PathBuf>,
    /// How often the rules made through the API are read from the store: the longest a
    /// change waits before it is in force.
    pub rules_refresh: Duration,
    pub webhooks: Vec<Webhook>,
    pub webhook_retry: RetryPolicy,
    /// How often `for` durations, silence and escalation are checked: the error on each.
    pub tick: Duration,
    /// Transitions held in memory while the store is down; past this the oldest are dropped.
    pub store_queue: usize,
}

impl Default for AlertsSettings {
    fn default() -> Self {
        AlertsSettings {
            client_id: "telemon-alerts".into(),
            rules_file: None,
            rules_refresh: Duration::from_secs(2),
            webhooks: Vec::new(),
            webhook_retry: RetryPolicy::default(),
            tick: Duration::from_secs(1),
            store_queue: 10_000,
        }
    }
}

/// Runs the service until the process ends.
pub async fn run(
    bus: BusConfig,
    settings: AlertsSettings,
    rules: Vec<Rule>,
    directory: Directory,
    decoder: Arc<Decoder>,
    store: Store,
    health: Health,
) -> Result<(), AlertsError> {
    let handle = start(bus, settings, rules, directory, decoder, store, health).await?;
    handle.inputs.closed().await;
    Ok(())
}

/// Starts the service in background tasks and returns a handle to manage its rules.
pub async fn start(
    bus: BusConfig,
    settings: AlertsSettings,
    rules: Vec<Rule>,
    directory: Directory,
    decoder: Arc<Decoder>,
    store: Store,
    health: Health,
) -> Result<AlertsHandle, AlertsError> {
    let health = Arc::new(ServiceHealth::new(health));
    validate_rules(&rules)?;
    // Before the engine starts and active alerts are restored, so that an alert of a rule
    // that exists only through the API resumes, and a file rule disabled through the API
    // does not fire for the first seconds.
    let api_rules = load_api_rules(&store).await;
    let directory = load_directory(&store).await.unwrap_or(directory);
    let engine = Engine::new(ruleset::rules_in_force(&rules, &api_rules), directory)?;
    let notifier = Notifier::start(settings.webhooks.clone(), settings.webhook_retry)?;
    let active = load_active(&store).await?;
    info!(active = active.len(), "restoring active alerts");

    let options = bus.mqtt_options(&settings.client_id)?;
    let (client, eventloop) = AsyncClient::new(options, MQTT_QUEUE);
    let (records, record_rx) = mpsc::channel(RECORD_QUEUE);
    tokio::spawn(Recorder::new(store.clone(), settings.store_queue, health.clone()).run(record_rx));

    let mut evaluator = Evaluator {
        outlet: Outlet {
            client: client.clone(),
            records,
            notifier,
            counters: Counters::new(),
        },
        engine,
        file_rules: rules.clone(),
        api_rules: api_rules.clone(),
    };
    // Restored before any reading is evaluated, so nothing fires twice.
    let restored = evaluator.engine.restore(active, Utc::now());
    evaluator.emit(restored).await;

    let (inputs, input_rx) = mpsc::channel(INPUT_QUEUE);
    let mut filters = decoder.subscriptions();
    filters.push(ALERT_ACK_TOPIC.to_string());
    tokio::spawn(evaluator.run(input_rx, settings.tick));
    tokio::spawn(refresh_directory(store.clone(), inputs.clone()));
    let (file_rules, file_rx) = watch::channel(rules);
    let refresh = RuleRefresh {
        store: store.clone(),
        inputs: inputs.clone(),
        applied: api_rules,
        rejected: Vec::new(),
        mirrored: None,
    };
    tokio::spawn(refresh.run(file_rx, settings.rules_refresh));
    let mqtt = Mqtt {
        client,
        filters,
        decoder,
        inputs: inputs.clone(),
        health,
        ack_invalid: ack_error_counter("invalid"),
    };
    tokio::spawn(mqtt.run(eventloop));

    Ok(AlertsHandle {
        inputs,
        rules_file: settings.rules_file,
        file_rules: Arc::new(file_rules),
        changing: Arc::new(tokio::sync::Mutex::new(())),
    })
}

/// How often patients and device assignments made through the API reach the engine.
const DIRECTORY_REFRESH: Duration = Duration::from_secs(5);

/// Keeps the engine's directory in step with the patients stored by the API. While the store
/// holds no patients, the directory the service was started with stays in force.
async fn refresh_directory(store: Store, inputs: mpsc::Sender<Input>) {
    let mut tick = tokio::time::interval(DIRECTORY_REFRESH);
    loop {
        tick.tick().await;
        let stored = match store.patient_directory().await {
            Ok(stored) => stored,
            Err(e) => {
                debug!(cause = %e, "patient directory not refreshed");
                continue;
            }
        };
        if stored.patients.is_empty() && stored.devices.is_empty() {
            continue;
        }
        if inputs
            .send(Input::Directory(Directory::from_store(stored)))
            .await
            .is_err()
        {
            return;
        }
    }
}

/// The patients stored by the API, read once before the engine starts: otherwise readings
/// of the first seconds after a restart would be judged as about their device rather than
/// their patient, and would not reach the patient's restored alerts. None when the store
/// holds no patients (the given directory stays) or cannot be read now.
async fn load_directory(store: &Store) -> Option<Directory> {
    match store.patient_directory().await {
        Ok(stored) if stored.patients.is_empty() && stored.devices.is_empty() => None,
        Ok(stored) => Some(Directory::from_store(stored)),
        Err(e) => {
            warn!(cause = %e, "patient directory not loaded yet");
            None
        }
    }
}

/// The rules made through the API, as stored at start-up. A store that cannot be read now
/// is read again by the rules task; the file rules alone are in force until then.
async fn load_api_rules(store: &Store) -> Vec<Rule> {
    match store.stored_rules(RuleTable::Api).await {
        Ok(stored) => {
            let (rules, rejected) = ruleset::from_stored_all(&stored);
            for e in &rejected {
                warn!(cause = %e, "stored rule left out");
            }
            rules
        }
        Err(e) => {
            warn!(cause = %e, "rules made through the API not loaded yet");
            Vec::new()
        }
    }
}

/// The rules task: keeps the engine in step with the rules stored through the API, and the
/// store's mirror of the file rules in step with the file rules in force.
struct RuleRefresh {
    store: Store,
    inputs: mpsc::Sender<Input>,
    /// The API rules last handed to the engine.
    applied: Vec<Rule>,
    /// Why stored rules were left out at the last read: logged only when it changes, not
    /// every few seconds.
    rejected: Vec<String>,
    /// The file rules last written to the store's mirror.
    mirrored: Option<Vec<Rule>>,
}

impl RuleRefresh {
    async fn run(mut self, mut file: watch::Receiver<Vec<Rule>>, period: Duration) {
        let mut tick = tokio::time::interval(period.max(Duration::from_millis(10)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Without a handle, the file rules never change again; the ticks carry on.
        let mut handle_alive = true;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                changed = file.changed(), if handle_alive => handle_alive = changed.is_ok(),
            }
            let current = file.borrow_and_update().clone();
            self.mirror(current).await;
            if !self.refresh().await {
                return;
            }
        }
    }

    async fn mirror(&mut self, file: Vec<Rule>) {
        if self.mirrored.as_ref() == Some(&file) {
            return;
        }
        let now = Utc::now();
        let stored: Result<Vec<_>, _> = file
            .iter()
            .map(|r| ruleset::to_stored(r, FILE_RULE_AUTHOR, now))
            .collect();
        let written = match stored {
            Ok(stored) => self.store.replace_file_rules(&stored).await,
            Err(e) => return warn!(cause = %e, "file rules not mirrored"),
        };
        match written {
            Ok(()) => self.mirrored = Some(file),
            Err(e) => debug!(cause = %e, "file rules not mirrored yet"),
        }
    }

    /// False once the engine task has ended.
    async fn refresh(&mut self) -> bool {
        let stored = match self.store.stored_rules(RuleTable::Api).await {
            Ok(stored) => stored,
            Err(e) => {
                debug!(cause = %e, "rules made through the API not refreshed");
                return true;
            }
        };
        let (rules, rejected) = ruleset::from_stored_all(&stored);
        let reasons: Vec<String> = rejected.iter().map(ToString::to_string).collect();
        if reasons != self.rejected {
            for reason in &reasons {
                warn!(cause = %reason, "stored rule left out");
            }
            self.rejected = reasons;
        }
        if rules == self.applied {
            return true;
        }

        if self
            .inputs
            .send(Input::ApiRules(rules.clone()))
            .await
            .is_err()
        {
            return false;
        }
        self.applied = rules;
        true
    }
}

/// Active alerts from the store, retried a few times: a database still starting must not
/// make the service start without them (they would fire a second time).
async fn load_active(store: &Store) -> Result<Vec<AlertEvent>, AlertsError> {
    let query = AlertQuery {
        active_only: true,
        limit: i64::from(i32::MAX),
        ..Default::default()
    };
    let mut wait = Duration::from_secs(1);
    let mut tries = 1;
    loop {
        match store.alerts(&query).await {
            Ok(active) => return Ok(active),
            Err(e) if tries < RESTORE_TRIES && e.is_unavailable() => {
                warn!(cause = %e, "store unreachable; retrying the load of active alerts");
                tokio::time::sleep(wait).await;
                wait *= 2;
                tries += 1;
            }
            Err(e) => return Err(AlertsError::Restore(e)),
        }
    }
}

/// Manages a running service: read and replace its rules without a restart. Cheap to clone.
#[derive(Clone)]
pub struct AlertsHandle {
    inputs: mpsc::Sender<Input>,
    rules_file: Option<PathBuf>,
    /// The file rules in force, which the rules task mirrors into the store.
    file_rules: Arc<watch::Sender<Vec<Rule>>>,
    /// One rule change at a time, so the saved file and the engine agree on the last one.
    changing: Arc<tokio::sync::Mutex<()>>,
}

impl AlertsHandle {
    /// The rules in force (the file rules with the API rules laid over them); empty once the
    /// service has stopped.
    pub async fn rules(&self) -> Vec<Rule> {
        let (reply, answer) = oneshot::channel();
        if self.inputs.send(Input::Rules(reply)).await.is_err() {
            return Vec::new();
        }
        answer.await.unwrap_or_default()
    }

    /// Replaces the file rules: validates them, saves them to the rules file (when
    /// configured) and puts them in force under the rules made through the API, which still
    /// win over a file rule of the same id. Alerts of rules removed or disabled resolve; the
    /// others carry on under the new limits from the next reading. Nothing changes when
    /// validation or saving fails.
    /// Stops evaluation, for a clean shutdown: devices disconnected by the shutdown itself
    /// must not raise "device offline" alerts. Transitions already emitted are still stored.
    pub async fn stop(&self) {
        let (done, stopped) = oneshot::channel();
        if self.inputs.send(Input::Stop(done)).await.is_ok() {
            let _ = stopped.await;
        }
    }

    pub async fn set_rules(&self, rules: Vec<Rule>) -> Result<(), SetRulesError> {
        validate_rules(&rules)?;
        let _one_at_a_time = self.changing.lock().await;
        if let Some(path) = &self.rules_file {
            save_rules(path, &rules).await?;
        }

        let (reply, answer) = oneshot::channel();
        let sent = self
            .inputs
            .send(Input::SetRules(rules.clone(), reply))
            .await;
        sent.map_err(|_| SetRulesError::Stopped)?;
        answer.await.map_err(|_| SetRulesError::Stopped)??;
        self.file_rules.send_replace(rules);
        Ok(())
    }
}

/// Writes the rule file beside itself and renames it over, so that a crash mid-write never
/// leaves a truncated file for the next start.
async fn save_rules(path: &Path, rules: &[Rule]) -> Result<(), SetRulesError> {
    let file = RuleFile {
        rules: rules.to_vec(),
    };
    let text = toml::to_string(&file)?;
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".new");
    let temporary = PathBuf::from(temporary);
    let save = |source| SetRulesError::Save {
        path: path.to_path_buf(),
        source,
    };
    tokio::fs::write(&temporary, text).await.map_err(save)?;
    tokio::fs::rename(&temporary, path).await.map_err(save)?;
    debug!(path = %path.display(), rules = rules.len(), "rules saved");
    Ok(())
}

/// What the engine task is asked to do.
enum Input {
    /// The readings of one message.
    Readings(Vec<Reading>),
    Ack(AckRequest),
    Rules(oneshot::Sender<Vec<Rule>>),
    /// New file rules (from [`AlertsHandle::set_rules`]).
    SetRules(Vec<Rule>, oneshot::Sender<Result<(), RuleError>>),
    /// The rules made through the API, as now stored.
    ApiRules(Vec<Rule>),
    Directory(Directory),
    /// Stop evaluating; acknowledged once no further transition can be emitted.
    Stop(oneshot::Sender<()>),
}

/// The engine task: the only owner of the engine.
struct Evaluator {
    engine: Engine,
    outlet: Outlet,
    /// The two layers of rules; the engine runs [`ruleset::rules_in_force`] of them.
    file_rules: Vec<Rule>,
    api_rules: Vec<Rule>,
}

impl Evaluator {
    async fn run(mut self, mut inputs: mpsc::Receiver<Input>, tick: Duration) {
        let mut ticker = tokio::time::interval(tick.max(Duration::from_millis(10)));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                input = inputs.recv() => match input {
                    Some(Input::Stop(done)) => {
                        let _ = done.send(());
                        return;
                    }
                    Some(input) => self.handle(input).await,
                    None => return,
                },
                _ = ticker.tick() => {
                    let events = self.engine.tick(Utc::now());
                    self.emit(events).await;
                }
            }
        }
    }

    async fn handle(&mut self, input: Input) {
        let now = Utc::now();
        let events = match input {
            Input::Readings(readings) => {
                let mut events = self.engine.on_readings(&readings, now);
                for r in readings.iter().filter(|r| r.metric == ONLINE_METRIC) {
                    let online = r.value.as_f64().is_some_and(|v| v > 0.0);
                    events.extend(self.engine.on_status(r.device_id.as_str(), online, now));
                }
                events
            }
            Input::Ack(request) => match self.engine.acknowledge(&request.id, &request.by, now) {
                Ok(event) => vec![event],
                Err(e) => {
                    warn!(alert = %request.id, by = %request.by, cause = %e,
                        "acknowledgement refused");
                    ack_error_counter(ack_error_reason(&e)).inc();
                    Vec::new()
                }
            },
            Input::Rules(reply) => {
                let _ = reply.send(self.engine.rules().to_vec());
                Vec::new()
            }
            // Taken by `run` before it gets here; answered anyway so a caller never hangs.
            Input::Stop(done) => {
                let _ = done.send(());
                Vec::new()
            }
            Input::Directory(directory) => {
                if *self.engine.directory() != directory {
                    info!(
                        patients = directory.patients.len(),
                        "patient directory updated"
                    );
                    self.engine.set_directory(directory);
                }
                Vec::new()
            }
            Input::SetRules(rules, reply) => {
                let file = std::mem::replace(&mut self.file_rules, rules);
                match self.apply_rules(now) {
                    Ok(events) => {
                        let _ = reply.send(Ok(()));
                        events
                    }
                    Err(e) => {
                        self.file_rules = file;
                        let _ = reply.send(Err(e));
                        Vec::new()
                    }
                }
            }
            Input::ApiRules(rules) => {
                let api = std::mem::replace(&mut self.api_rules, rules);
                match self.apply_rules(now) {
                    Ok(events) => events,
                    Err(e) => {
                        // Each stored rule was validated on its own, so this is not expected;
                        // the rules in force stay as they were.
                        warn!(cause = %e, "rules made through the API not applied");
                        self.api_rules = api;
                        Vec::new()
                    }
                }
            }
        };
        self.emit(events).await;
    }

    /// Puts the merged rules in force, only when they differ from those running: an
    /// unchanged set must not disturb pending alerts or rate-of-change histories.
    fn apply_rules(&mut self, now: chrono::DateTime<Utc>) -> Result<Vec<AlertEvent>, RuleError> {
        let merged = ruleset::rules_in_force(&self.file_rules, &self.api_rules);
        if merged == self.engine.rules() {
            return Ok(Vec::new());
        }
        let events = self.engine.set_rules(merged, now)?;
        info!(rules = self.engine.rules().len(), "rules in force changed");
        Ok(events)
    }

    async fn emit(&mut self, events: Vec<AlertEvent>) {
        if events.is_empty() {
            return;
        }
        for event in events {
            self.outlet.send(event).await;
        }
        self.outlet.count_active(self.engine.active());
    }
}

/// Where transitions go: MQTT first (the dashboards' live feed), then the store and webhooks.
struct Outlet {
    client: AsyncClient,
    records: mpsc::Sender<AlertEvent>,
    notifier: Notifier,
    counters: Counters,
}

impl Outlet {
    async fn send(&mut self, event: AlertEvent) {
        debug!(alert = %event.id, state = event.state.as_str(),
            priority = event.priority.as_str(), "alert transition");
        self.counters.transition(event.state).inc();
        match serde_json::to_vec(&event) {
            Ok(payload) => {
                let topic = alert_topic(&event.subject);
                // Never waits: a broker that is away must not stop evaluation. The
                // transition is still stored, and the API reads alerts from the store.
                if let Err(e) = self
                    .client
                    .try_publish(topic, QoS::AtLeastOnce, false, payload)
                {
                    self.counters.unpublished.inc();
                    warn!(alert = %event.id, cause = %e, "alert transition not published");
                }
            }
            Err(e) => warn!(alert = %event.id, cause = %e, "alert not serializable"),
        }
        self.notifier.notify(&event);
        if self.records.send(event).await.is_err() {
            debug!("recorder stopped; transition not stored");
        }
    }

    fn count_active<'a>(&self, active: impl Iterator<Item = &'a AlertEvent>) {
        let mut counts = [0_i64; 3];
        for event in active {
            match event.state {
                AlertState::Pending => counts[0] += 1,
                AlertState::Firing => counts[1] += 1,
                AlertState::Acknowledged => counts[2] += 1,
                AlertState::Resolved => {}
            }
        }
        for (gauge, count) in self.counters.active.iter().zip(counts) {
            gauge.set(count);
        }
    }
}

struct Counters {
    /// Per state, in the order of [`AlertState`]: pending, firing, acknowledged, resolved.
    transitions: [Counter; 4],
    /// Pending, firing, acknowledged.
    active: [Gauge; 3],
    unpublished: Counter,
}

impl Counters {
    fn new() -> Self {
        let transitions = |state: &str| {
            metrics::counter(
                "telemon_alerts_transitions_total",
                "Alert transitions, by the state entered.",
                &[("state", state)],
            )
        };
        let active = |state: &str| {
            metrics::gauge(
                "telemon_alerts_active",
                "Active alerts, by state.",
                &[("state", state)],
            )
        };
        Counters {
            transitions: ["pending", "firing", "acknowledged", "resolved"].map(transitions),
            active: ["pending", "firing", "acknowledged"].map(active),
            unpublished: metrics::counter(
                "telemon_alerts_unpublished_total",
                "Alert transitions not published on MQTT: the client queue was full.",
                &[],
            ),
        }
    }

    fn transition(&self, state: AlertState) -> &Counter {
        let index = match state {
            AlertState::Pending => 0,
            AlertState::Firing => 1,
            AlertState::Acknowledged => 2,
            AlertState::Resolved => 3,
        };
        &self.transitions[index]
    }
}

fn ack_error_counter(reason: &str) -> Counter {
    metrics::counter(
        "telemon_alerts_ack_errors_total",
        "Acknowledgement requests refused, by reason.",
        &[("reason", reason)],
    )
}

fn ack_error_reason(e: &AckError) -> &'static str {
    match e {
        AckError::UnknownAlert(_) => "unknown_alert",
        AckError::NotFiring(_) => "not_firing",
        AckError::AlreadyAcknowledged { .. } => "already_acknowledged",
        AckError::MissingUser => "missing_user",
    }
}

/// The MQTT task: the connection, subscriptions, and turning messages into engine inputs.
struct Mqtt {
    client: AsyncClient,
    filters: Vec<String>,
    decoder: Arc<Decoder>,
    inputs: mpsc::Sender<Input>,
    health: Arc<ServiceHealth>,
    ack_invalid: Counter,
}

impl Mqtt {
    async fn run(self, mut eventloop: rumqttc::EventLoop) {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::Publish(publish))) => {
                    let Some(input) = self.input(&publish) else {
                        continue;
                    };
                    if self.inputs.send(input).await.is_err() {
                        return;
                    }
                }
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    info!(
                        session_present = ack.session_present,
                        "alerts connected to the broker"
                    );
                    let subscriptions = self
                        .filters
                        .iter()
                        .map(|f| SubscribeFilter::new(f.clone(), QoS::AtLeastOnce));
                    // Queued for this same loop to send, so it must not wait.
                    if let Err(e) = self.client.try_subscribe_many(subscriptions) {
                        warn!(cause = %e, "could not subscribe");
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(ack))) => self.subscribed(&ack),
                Ok(_) => {}
                Err(e) => {
                    warn!(cause = %e, "broker connection lost; reconnecting");
                    self.health.broker(Broker::Down);
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    /// Healthy only when the broker took every filter: without the acknowledgement topic,
    /// clinicians' acknowledgements would go unheard.
    fn subscribed(&self, ack: &SubAck) {
        let refused: Vec<&str> = self
            .filters
            .iter()
            .zip(&ack.return_codes)
            .filter(|(_, code)| matches!(code, SubscribeReasonCode::Failure))
            .map(|(filter, _)| filter.as_str())
            .collect();
        if refused.is_empty() {
            return self.health.broker(Broker::Up);
        }
        warn!(?refused, "the broker refused subscriptions");
        self.health.broker(Broker::Refused);
    }

    fn input(&self, publish: &Publish) -> Option<Input> {
        if publish.topic == ALERT_ACK_TOPIC {
            return match serde_json::from_slice::<AckRequest>(&publish.payload) {
                Ok(request) => Some(Input::Ack(request)),
                Err(e) => {
                    warn!(cause = %e, "acknowledgement request is not valid JSON");
                    self.ack_invalid.inc();
                    None
                }
            };
        }

        let message = Message {
            topic: &publish.topic,
            payload: &publish.payload,
            identity: None,
            received_at: Utc::now(),
        };
        // Refused messages and fields are ingest's to dead-letter and count.
        match self.decoder.decode(&message) {
            Ok(decoded) if !decoded.readings.is_empty() => Some(Input::Readings(decoded.readings)),
            Ok(_) => None,
            Err(rejection) => {
                trace!(topic = %publish.topic, reason = rejection.reason.as_str(), "not evaluated");
                None
            }
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Broker {
    Connecting = 0,
    Up = 1,
    Down = 2,
    /// Connected, but some subscriptions were refused (an ACL).
    Refused = 3,
}

/// The service's health, from two sources: the broker connection and the store queue.
pub(crate) struct ServiceHealth {
    health: Health,
    broker: AtomicU8,
    queued: AtomicUsize,
    /// Serializes reports so that the last one written reflects the latest of both sources.
    report: parking_lot::Mutex<()>,
}

impl ServiceHealth {
    pub(crate) fn new(health: Health) -> Self {
        health.set(HEALTH, Status::Starting, "connecting to the broker");
        ServiceHealth {
            health,
            broker: AtomicU8::new(Broker::Connecting as u8),
            queued: AtomicUsize::new(0),
            report: parking_lot::Mutex::new(()),
        }
    }

    pub(crate) fn broker(&self, state: Broker) {
        self.broker.store(state as u8, Ordering::Relaxed);
        self.report();
    }

    pub(crate) fn store_queue(&self, queued: usize) {
        self.queued.store(queued, Ordering::Relaxed);
        self.report();
    }

    #[cfg(test)]
    pub(crate) fn is_degraded(&self) -> bool {
        self.health
            .snapshot()
            .get(HEALTH)
            .is_some_and(|c| c.status == Status::Degraded)
    }

    fn report(&self) {
        let _serial = self.report.lock();
        let queued = self.queued.load(Ordering::Relaxed);
        let broker = self.broker.load(Ordering::Relaxed);
        let (status, detail) = match broker {
            b if b == Broker::Down as u8 => (Status::Degraded, "broker unreachable".to_string()),
            b if b == Broker::Refused as u8 => (
                Status::Degraded,
                "the broker refused some subscriptions".to_string(),
            ),
            _ if queued > 0 => (
                Status::Degraded,
                format!("store unreachable; {queued} alert transitions queued"),
            ),
            b if b == Broker::Up as u8 => (Status::Ok, String::new()),
            _ => (Status::Starting, "connecting to the broker".to_string()),
        };
        self.health.set(HEALTH, status, detail);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(health: &Health) -> Status {
        health.snapshot()[HEALTH].status
    }

    #[test]
    fn health_is_ok_only_when_subscribed_and_nothing_waits_for_the_store() {
        let health = Health::default();
        let service = ServiceHealth::new(health.clone());
        assert_eq!(status(&health), Status::Starting);
        service.broker(Broker::Up);
        assert_eq!(status(&health), Status::Ok);
        service.store_queue(3);
        assert_eq!(status(&health), Status::Degraded);
        service.store_queue(0);
        assert_eq!(status(&health), Status::Ok);
        service.broker(Broker::Down);
        assert_eq!(status(&health), Status::Degraded);
        service.broker(Broker::Refused);
        assert_eq!(status(&health), Status::Degraded);
    }

    #[tokio::test]
    async fn saved_rules_load_back_from_the_rule_file() {
        let dir = std::env::temp_dir().join(format!("telemon-rules-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("rules.toml");
        let rules = RuleFile::from_toml(include_str!("../rules.toml")).unwrap();
        save_rules(&path, &rules).await.unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(RuleFile::from_toml(&text).unwrap(), rules);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn every_ack_error_has_its_own_reason() {
        let reasons = [
            AckError::UnknownAlert("a".into()),
            AckError::NotFiring("a".into()),
            AckError::AlreadyAcknowledged {
                id: "a".into(),
                by: "b".into(),
            },
            AckError::MissingUser,
        ]
        .map(|e| ack_error_reason(&e));
        let distinct: std::collections::HashSet<_> = reasons.iter().collect();
        assert_eq!(distinct.len(), reasons.len());
    }
}
