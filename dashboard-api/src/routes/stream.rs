//! The live stream, over Server-Sent Events and over a WebSocket, filtered per client by the
//! caller's scope and by the filters it asks for.
//!
//! A client that falls more than the feed's buffer behind skips ahead: it gets a `lagged`
//! event with the number of events it missed, and never slows the feed or other clients. A
//! client's state is its broadcast receiver and its filter; both go when it disconnects.

use std::collections::HashSet;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::stream::{self, Stream, StreamExt};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::broadcast::error::RecvError;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
use tokio_stream::wrappers::BroadcastStream;
use utoipa::IntoParams;

use crate::access::{Access, Scope};
use crate::error::HttpError;
use crate::live::{LiveData, LiveEvent};
use crate::openapi::ErrorBody;
use crate::AppState;

/// Proxies drop idle connections after 30 to 60 s; a heartbeat well inside that keeps a quiet
/// stream open and lets clients notice a dead one.
const HEARTBEAT: Duration = Duration::from_secs(15);
/// WebSocket buffers: tungstenite's defaults (128 KiB each way) would dominate a client's
/// memory; events are a few hundred bytes and clients send nothing but control frames.
const WS_READ_BUFFER: usize = 4 * 1024;
const WS_WRITE_BUFFER: usize = 4 * 1024;
const WS_MAX_MESSAGE: usize = 16 * 1024;

#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct StreamParams {
    /// Comma-separated device ids; all devices in scope when absent.
    device: Option<String>,
    /// Comma-separated patient ids: readings of their devices and alerts about them.
    patient: Option<String>,
    /// Comma-separated metric names; all metrics when absent.
    metric: Option<String>,
    /// `readings`, `alerts` or `all` (default).
    kind: Option<String>,
    /// The bearer token, for browsers whose EventSource and WebSocket cannot set headers.
    /// Read by the principal extractor from the raw query; declared here so it is allowed.
    #[allow(dead_code)]
    access_token: Option<String>,
}

pub struct StreamFilter {
    scope: Scope,
    devices: Option<HashSet<String>>,
    patients: Option<HashSet<String>>,
    metrics: Option<HashSet<String>>,
    readings: bool,
    alerts: bool,
}

fn split(v: Option<String>) -> Option<HashSet<String>> {
    v.map(|s| {
        s.split(',')
            .map(|x| x.trim().to_string())
            .filter(|x| !x.is_empty())
            .collect()
    })
}

impl StreamFilter {
    /// The filter of one client. Asking for patients means their devices as of now.
    async fn new(state: &AppState, scope: Scope, params: StreamParams) -> Result<Self, HttpError> {
        let (readings, alerts) = match params.kind.as_deref() {
            None | Some("all") => (true, true),
            Some("readings") => (true, false),
            Some("alerts") => (false, true),
            Some(_) => {
                return Err(HttpError::BadRequest(
                    "kind must be readings, alerts or all".into(),
                ))
            }
        };
        let patients = split(params.patient);
        let mut devices = split(params.device);
        if let Some(wanted) = &patients {
            let of_patients = state
                .store
                .patients()
                .await?
                .into_iter()
                .filter(|p| wanted.contains(&p.id))
                .flat_map(|p| p.devices);
            devices.get_or_insert_with(HashSet::new).extend(of_patients);
        }
        Ok(StreamFilter {
            scope,
            devices,
            patients,
            metrics: split(params.metric),
            readings,
            alerts,
        })
    }

    pub fn wants(&self, event: &LiveEvent) -> bool {
        match &event.data {
            LiveData::Reading(r) => {
                let device = r.device_id.as_str();
                self.readings
                    && self.scope.device(device)
                    && self.devices.as_ref().is_none_or(|d| d.contains(device))
                    && self.metrics.as_ref().is_none_or(|m| m.contains(&r.metric))
            }
            LiveData::Alert(a) => {
                let asked = match (&self.devices, &self.patients) {
                    (None, None) => true,
                    (d, p) => {
                        d.as_ref().is_some_and(|d| d.contains(&a.subject))
                            || p.as_ref().is_some_and(|p| p.contains(&a.subject))
                    }
                };
                self.alerts && self.scope.alert(a) && asked
            }
        }
    }
}

fn event_name(event: &LiveEvent) -> &'static str {
    match &event.data {
        LiveData::Reading(_) => "reading",
        LiveData::Alert(_) => "alert",
    }
}

fn event_data(event: &LiveEvent) -> serde_json::Value {
    let data = match &event.data {
        LiveData::Reading(r) => serde_json::to_value(r),
        LiveData::Alert(a) => serde_json::to_value(a),
    };
    data.unwrap_or_default()
}

fn to_sse(event: &LiveEvent) -> Event {
    Event::default()
        .id(event.id.to_string())
        .event(event_name(event))
        .data(event_data(event).to_string())
}

async fn open(
    access: &Access,
    state: &AppState,
    params: StreamParams,
    how: &str,
) -> Result<StreamFilter, HttpError> {
    let filter = StreamFilter::new(state, access.scope.clone(), params).await?;
    access.audit(state, how, "live stream").await?;
    Ok(filter)
}

/// Readings and alert transitions as Server-Sent Events (`reading`, `alert`, `lagged`), with
/// `Last-Event-ID` resumption and a comment heartbeat.
#[utoipa::path(get, path = "/api/v1/stream", tag = "stream", params(StreamParams),
    responses((status = 200, content_type = "text/event-stream", description = "event stream"),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)))]
pub async fn sse(
    access: Access,
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(params): Query<StreamParams>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, HttpError> {
    let filter = Arc::new(open(&access, &state, params, "open event stream").await?);
    let last_id = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let (missed, lost, rx) = state.live.resume(last_id);

    // Events older than the kept history cannot be replayed: say how many, as for a client
    // that fell behind, rather than resume with a silent gap.
    let gap = (lost > 0).then(|| Ok(Event::default().event("lagged").data(lost.to_string())));
    let replay_filter = filter.clone();
    let replay = stream::iter(gap).chain(
        stream::iter(missed)
            .filter(move |e| std::future::ready(replay_filter.wants(e)))
            .map(|e| Ok(to_sse(&e))),
    );
    let live = BroadcastStream::new(rx).filter_map(move |item| {
        let out = match item {
            Ok(event) if filter.wants(&event) => Some(Ok(to_sse(&event))),
            Ok(_) => None,
            Err(BroadcastStreamRecvError::Lagged(n)) => {
                Some(Ok(Event::default().event("lagged").data(n.to_string())))
            }
        };
        std::future::ready(out)
    });
    let keep_alive = KeepAlive::new().interval(HEARTBEAT).text("heartbeat");
    Ok(Sse::new(replay.chain(live)).keep_alive(keep_alive))
}

/// The same events over a WebSocket, as JSON text messages
/// `{"id", "type": "reading"|"alert", "data"}`, `{"type": "lagged", "missed"}` and
/// `{"type": "heartbeat"}`; the server also pings.
#[utoipa::path(get, path = "/api/v1/ws", tag = "stream", params(StreamParams),
    responses((status = 101, description = "switching to the WebSocket protocol"),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)))]
pub async fn ws(
    access: Access,
    State(state): State<AppState>,
    Query(params): Query<StreamParams>,
    upgrade: WebSocketUpgrade,
) -> Result<Response, HttpError> {
    let filter = open(&access, &state, params, "open websocket").await?;
    let upgrade = upgrade
        .read_buffer_size(WS_READ_BUFFER)
        .write_buffer_size(WS_WRITE_BUFFER)
        .max_message_size(WS_MAX_MESSAGE)
        .max_frame_size(WS_MAX_MESSAGE);
    Ok(upgrade
        .on_upgrade(move |socket| feed_websocket(socket, state, filter))
        .into_response())
}

async fn feed_websocket(mut socket: WebSocket, state: AppState, filter: StreamFilter) {
    let (_, mut rx) = state.live.subscribe(None);
    let mut heartbeat = tokio::time::interval(HEARTBEAT);
    heartbeat.tick().await;

    loop {
        let message = tokio::select! {
            event = rx.recv() => match event {
                Ok(event) if filter.wants(&event) => json!({
                    "id": event.id,
                    "type": event_name(&event),
                    "data": event_data(&event),
                }),
                Ok(_) => continue,
                Err(RecvError::Lagged(n)) => json!({ "type": "lagged", "missed": n }),
                Err(RecvError::Closed) => break,
            },
            _ = heartbeat.tick() => {
                if socket.send(Message::Ping(Default::default())).await.is_err() {
                    break;
                }
                json!({ "type": "heartbeat" })
            }
            incoming = socket.recv() => match incoming {
                // The client has nothing to say but control frames; axum answers pings.
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                Some(Ok(_)) => continue,
            },
        };
        if socket
            .send(Message::Text(message.to_string().into()))
            .await
            .is_err()
        {
            break;
        }
    }
    tracing::debug!("websocket client left");
}
