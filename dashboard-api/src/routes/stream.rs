//! The live stream, over Server-Sent Events and over a WebSocket, filtered per client by the
//! caller's scope and by the filters it asks for.
//!
//! A client that falls more than its queue behind skips ahead: it gets a `lagged` event with
//! the number of events it missed, and never slows the feed or other clients. A client's
//! state is its subscription and its filter; both go when it disconnects.
//!
//! The caller's scope is not fixed at connect: when an assignment or a patient's devices
//! change in this process, and every [`RECHECK`] in any case, an open stream checks its
//! credential and scope again. A stream whose session has ended or expired gets an `end`
//! event and closes; one whose patients changed sees the new ones from then on.

use std::collections::HashSet;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use futures::stream;
use futures::FutureExt;
use serde::Deserialize;
use serde_json::json;
use tokio::sync::watch;
use tracing::debug;
use utoipa::IntoParams;

use crate::access::{scope_of, Access, Scope};
use crate::auth::BearerToken;
use crate::error::HttpError;
use crate::live::{Delivery, Interest, LiveData, LiveEvent, ScopeChange, Subscription};
use crate::openapi::ErrorBody;
use crate::AppState;

/// Proxies drop idle connections after 30 to 60 s; a heartbeat well inside that keeps a quiet
/// stream open and lets clients notice a dead one.
const HEARTBEAT: Duration = Duration::from_secs(15);
/// How often an open stream checks its caller again when nothing here announced a change:
/// another API process may have changed assignments, or the session may have expired.
const RECHECK: Duration = Duration::from_secs(30);
/// WebSocket buffers: tungstenite's defaults (128 KiB each way) would dominate a client's
/// memory; events are a few hundred bytes and clients send nothing but control frames.
const WS_READ_BUFFER: usize = 4 * 1024;
const WS_WRITE_BUFFER: usize = 4 * 1024;
const WS_MAX_MESSAGE: usize = 16 * 1024;
/// How long the WebSocket closing handshake may take before the connection is dropped.
const CLOSING: Duration = Duration::from_secs(1);

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
    #[param(pattern = "^(readings|alerts|all)$")]
    kind: Option<String>,
    /// The bearer token, for browsers whose EventSource and WebSocket cannot set headers.
    /// Read by the principal extractor from the raw query; declared here so it is allowed.
    #[allow(dead_code)]
    access_token: Option<String>,
}

/// What a client asked for, parsed once; its scope is applied on top, as it stands.
struct Request {
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

impl Request {
    fn parse(params: StreamParams) -> Result<Self, HttpError> {
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
        Ok(Request {
            devices: split(params.device),
            patients: split(params.patient),
            metrics: split(params.metric),
            readings,
            alerts,
        })
    }
}

pub struct StreamFilter {
    scope: Scope,
    devices: Option<HashSet<String>>,
    patients: Option<HashSet<String>>,
    metrics: Option<HashSet<String>>,
    readings: bool,
    alerts: bool,
}

impl StreamFilter {
    /// The filter of one client. Asking for patients means their devices as of now.
    async fn new(state: &AppState, scope: Scope, request: &Request) -> Result<Self, HttpError> {
        let mut devices = request.devices.clone();
        if let Some(wanted) = &request.patients {
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
            patients: request.patients.clone(),
            metrics: request.metrics.clone(),
            readings: request.readings,
            alerts: request.alerts,
        })
    }

    /// What the feed should route to this client: the devices both asked for and in scope.
    fn interest(&self) -> Interest {
        let devices = match (&self.scope, &self.devices) {
            (Scope::All, asked) => asked.clone(),
            (Scope::Only { devices, .. }, None) => Some(devices.clone()),
            (Scope::Only { devices, .. }, Some(asked)) => {
                Some(asked.intersection(devices).cloned().collect())
            }
        };
        Interest {
            devices,
            readings: self.readings,
            alerts: self.alerts,
        }
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

/// An event as one WebSocket text message, `{"id", "type", "data"}`.
fn to_ws(event: &LiveEvent) -> String {
    format!(
        r#"{{"id":{},"type":"{}","data":{}}}"#,
        event.id,
        event_name(event),
        event.json()
    )
}

/// What an open stream sends next.
enum Next {
    Event(Arc<LiveEvent>),
    Lagged(u64),
    /// The caller's credential no longer stands; the stream closes after saying so.
    Ended,
}

/// One open stream: its subscription and filter, and what it needs to check its caller again.
struct Watch {
    state: AppState,
    token: BearerToken,
    request: Request,
    filter: StreamFilter,
    subscription: Subscription,
    scope_changes: watch::Receiver<ScopeChange>,
    /// The caller's user or token name, and the last scope change this stream saw.
    name: String,
    seen: u64,
    recheck: tokio::time::Interval,
    check_due: bool,
    ended: bool,
}

impl Watch {
    /// Checks the caller's access, audits the view and subscribes; `last_id` resumes.
    async fn open(
        state: AppState,
        access: Access,
        token: BearerToken,
        params: StreamParams,
        how: &str,
        last_id: Option<u64>,
    ) -> Result<(Vec<Arc<LiveEvent>>, u64, Watch), HttpError> {
        let request = Request::parse(params)?;
        let filter = StreamFilter::new(&state, access.scope.clone(), &request).await?;
        access.audit(&state, how, "live stream").await?;

        // Subscribed to changes before the feed, so that none between the two is missed.
        let scope_changes = state.live.scope_changes();
        let seen = scope_changes.borrow().version;
        let name = access.principal.name.clone();
        let (missed, lost, subscription) = state.live.subscribe(filter.interest(), last_id);
        let missed = missed.into_iter().filter(|e| filter.wants(e)).collect();
        let mut recheck = tokio::time::interval(RECHECK);
        recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        recheck.reset();
        let watch = Watch {
            state,
            token,
            request,
            filter,
            subscription,
            scope_changes,
            name,
            seen,
            recheck,
            check_due: false,
            ended: false,
        };
        Ok((missed, lost, watch))
    }

    async fn next(&mut self) -> Option<Next> {
        if self.ended {
            return None;
        }
        loop {
            // A check cut short (the WebSocket loop also waits on its socket) is done again.
            if self.check_due {
                // Boxed: the store queries' futures are large, and inline they would size
                // every idle client's stream state.
                let stands = Box::pin(self.check_caller()).await;
                self.check_due = false;
                if !stands {
                    self.ended = true;
                    return Some(Next::Ended);
                }
            }
            tokio::select! {
                delivery = self.subscription.recv() => match delivery? {
                    Delivery::Event(e) if self.filter.wants(&e) => return Some(Next::Event(e)),
                    Delivery::Event(_) => {}
                    Delivery::Lagged(n) => return Some(Next::Lagged(n)),
                },
                changed = self.scope_changes.changed() => {
                    changed.ok()?;
                    // Another user's assignments or logout leave this stream alone.
                    let change = self.scope_changes.borrow_and_update().clone();
                    self.check_due |= change.concerns(&self.name, self.seen);
                    self.seen = change.version;
                }
                _ = self.recheck.tick() => self.check_due = true,
            }
        }
    }

    /// Re-reads the caller's credential and scope; false when the credential is gone. When
    /// the store cannot answer, the stream keeps the scope it has and tries again later.
    async fn check_caller(&mut self) -> bool {
        let state = &self.state;
        let principal = match state.auth.check(&state.store, &self.token.0).await {
            Ok(Some(principal)) => principal,
            Ok(None) => return false,
            Err(e) => {
                debug!(cause = %e, "stream could not check its caller; keeping its scope");
                return true;
            }
        };
        let filter = match scope_of(state, &principal).await {
            Ok(scope) => StreamFilter::new(state, scope, &self.request).await,
            Err(e) => Err(e),
        };
        match filter {
            Ok(filter) => {
                if filter.interest() != self.filter.interest() {
                    self.subscription.set_interest(filter.interest());
                }
                self.filter = filter;
            }
            Err(e) => debug!(cause = %e, "stream could not refresh its scope; keeping it"),
        }
        true
    }
}

/// Readings and alert transitions as Server-Sent Events (`reading`, `alert`, `lagged`, `end`),
/// with `Last-Event-ID` resumption and a comment heartbeat.
#[utoipa::path(get, path = "/api/v1/stream", tag = "stream", params(StreamParams),
    responses((status = 200, content_type = "text/event-stream", description = "event stream"),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)))]
pub async fn sse(
    access: Access,
    token: BearerToken,
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(params): Query<StreamParams>,
) -> Result<Response, HttpError> {
    let feed = SseFeed::open(state, access, token, params, &headers).await?;
    let body = Body::from_stream(stream::unfold(feed, |mut feed| async move {
        let text = feed.next_text().await?;
        Some((Ok::<_, Infallible>(text), feed))
    }));
    Ok((
        [
            (CONTENT_TYPE, SSE_CONTENT_TYPE),
            (CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response())
}

pub(crate) const SSE_CONTENT_TYPE: &str = "text/event-stream";
/// Events already queued for a client go out in one write, up to this many bytes.
const COALESCE: usize = 16 * 1024;

/// One client's Server-Sent Events as text, served by axum or written straight to a socket
/// (see `crate::serve`): events replayed for `Last-Event-ID` first, then live events, and a
/// heartbeat comment when the stream has been quiet for [`HEARTBEAT`].
pub(crate) struct SseFeed {
    replay: Option<String>,
    watch: Watch,
    heartbeat: tokio::time::Interval,
    done: bool,
}

impl SseFeed {
    pub(crate) async fn open(
        state: AppState,
        access: Access,
        token: BearerToken,
        params: StreamParams,
        headers: &HeaderMap,
    ) -> Result<SseFeed, HttpError> {
        let last_id = headers
            .get("last-event-id")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let how = "open event stream";
        let (missed, lost, watch) = Watch::open(state, access, token, params, how, last_id).await?;

        // Events older than the kept history cannot be replayed: say how many, as for a
        // client that fell behind, rather than resume with a silent gap.
        let mut replay = String::new();
        if lost > 0 {
            push_sse(&mut replay, &Next::Lagged(lost));
        }
        for event in missed {
            push_sse(&mut replay, &Next::Event(event));
        }
        let mut heartbeat = tokio::time::interval(HEARTBEAT);
        heartbeat.reset();
        Ok(SseFeed {
            replay: Some(replay).filter(|r| !r.is_empty()),
            watch,
            heartbeat,
            done: false,
        })
    }

    /// The next piece of the stream: one or more events, or a heartbeat; `None` at its end.
    pub(crate) async fn next_text(&mut self) -> Option<String> {
        if let Some(replay) = self.replay.take() {
            return Some(replay);
        }
        if self.done {
            return None;
        }
        let mut text = String::new();
        tokio::select! {
            next = self.watch.next() => self.push(&mut text, &next?),
            _ = self.heartbeat.tick() => text.push_str(":heartbeat\n\n"),
        }
        while !self.done && text.len() < COALESCE {
            match self.watch.next().now_or_never() {
                Some(Some(next)) => self.push(&mut text, &next),
                _ => break,
            }
        }
        self.heartbeat.reset();
        Some(text)
    }

    fn push(&mut self, text: &mut String, next: &Next) {
        push_sse(text, next);
        self.done |= matches!(next, Next::Ended);
    }
}

/// Appends one SSE event. Event data is compact JSON (or a number, or a phrase): one line.
fn push_sse(text: &mut String, next: &Next) {
    use std::fmt::Write;
    let _ = match next {
        Next::Event(e) => write!(
            text,
            "id: {}\nevent: {}\ndata: {}\n\n",
            e.id,
            event_name(e),
            e.json()
        ),
        Next::Lagged(n) => write!(text, "event: lagged\ndata: {n}\n\n"),
        Next::Ended => write!(text, "event: end\ndata: {ENDED}\n\n"),
    };
}

const ENDED: &str = "credential expired or revoked";

/// The same events over a WebSocket, as JSON text messages
/// `{"id", "type": "reading"|"alert", "data"}`, `{"type": "lagged", "missed"}` and
/// `{"type": "heartbeat"}`; the server also pings.
#[utoipa::path(get, path = "/api/v1/ws", tag = "stream", params(StreamParams),
    responses((status = 101, description = "switching to the WebSocket protocol"),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)))]
pub async fn ws(
    access: Access,
    token: BearerToken,
    State(state): State<AppState>,
    Query(params): Query<StreamParams>,
    upgrade: WebSocketUpgrade,
) -> Result<Response, HttpError> {
    let how = "open websocket";
    let (_, _, watch) = Watch::open(state, access, token, params, how, None).await?;
    let upgrade = upgrade
        .read_buffer_size(WS_READ_BUFFER)
        .write_buffer_size(WS_WRITE_BUFFER)
        .max_message_size(WS_MAX_MESSAGE)
        .max_frame_size(WS_MAX_MESSAGE);
    Ok(upgrade
        .on_upgrade(move |socket| feed_websocket(socket, watch))
        .into_response())
}

async fn feed_websocket(mut socket: WebSocket, mut watch: Watch) {
    let mut heartbeat = tokio::time::interval(HEARTBEAT);
    heartbeat.tick().await;

    loop {
        let message = tokio::select! {
            next = watch.next() => match next {
                Some(Next::Event(event)) => to_ws(&event),
                Some(Next::Lagged(n)) => json!({ "type": "lagged", "missed": n }).to_string(),
                Some(Next::Ended) => json!({ "type": "end", "reason": ENDED })
                .to_string(),
                // The feed is gone or the stream ended: close as a WebSocket should.
                None => {
                    let _ = socket.send(Message::Close(None)).await;
                    break;
                }
            },
            _ = heartbeat.tick() => {
                if socket.send(Message::Ping(Default::default())).await.is_err() {
                    break;
                }
                json!({ "type": "heartbeat" }).to_string()
            }
            incoming = socket.recv() => match incoming {
                // The client has nothing to say but control frames; axum answers pings.
                // Its close frame gets the closing handshake's reply before the socket goes.
                Some(Ok(Message::Close(_))) => {
                    // The reply is queued by the protocol and written while reading on.
                    let finish = async { while socket.recv().await.is_some() {} };
                    let _ = tokio::time::timeout(CLOSING, finish).await;
                    break;
                }
                None | Some(Err(_)) => break,
                Some(Ok(_)) => continue,
            },
        };
        if socket.send(Message::Text(message.into())).await.is_err() {
            break;
        }
    }
    debug!("websocket client left");
}
