//! The live stream over Server-Sent Events, filtered per client.
//!
//! A client that falls more than the feed's buffer behind skips ahead: it gets a `lagged`
//! event with the number of events it missed, and never slows the feed or other clients.

use std::collections::HashSet;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures::stream::{self, Stream, StreamExt};
use serde::Deserialize;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
use tokio_stream::wrappers::BroadcastStream;

use crate::auth::Principal;
use crate::error::HttpError;
use crate::live::{LiveData, LiveEvent};
use crate::AppState;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamParams {
    /// Comma-separated device ids; all devices when absent.
    device: Option<String>,
    /// Comma-separated metric names; all metrics when absent.
    metric: Option<String>,
    /// `readings`, `alerts` or both (default).
    kind: Option<String>,
}

struct StreamFilter {
    devices: Option<HashSet<String>>,
    metrics: Option<HashSet<String>>,
    readings: bool,
    alerts: bool,
}

impl StreamFilter {
    fn new(params: StreamParams) -> Result<Self, HttpError> {
        let set = |v: Option<String>| {
            v.map(|s| {
                s.split(',')
                    .map(|x| x.trim().to_string())
                    .filter(|x| !x.is_empty())
                    .collect()
            })
        };
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
        Ok(StreamFilter {
            devices: set(params.device),
            metrics: set(params.metric),
            readings,
            alerts,
        })
    }

    fn wants(&self, event: &LiveEvent) -> bool {
        match &event.data {
            LiveData::Reading(r) => {
                self.readings
                    && self
                        .devices
                        .as_ref()
                        .is_none_or(|d| d.contains(r.device_id.as_str()))
                    && self.metrics.as_ref().is_none_or(|m| m.contains(&r.metric))
            }
            LiveData::Alert(a) => {
                self.alerts && self.devices.as_ref().is_none_or(|d| d.contains(&a.subject))
            }
        }
    }
}

fn to_sse(event: &LiveEvent) -> Event {
    let (name, data) = match &event.data {
        LiveData::Reading(r) => ("reading", serde_json::to_string(r)),
        LiveData::Alert(a) => ("alert", serde_json::to_string(a)),
    };
    Event::default()
        .id(event.id.to_string())
        .event(name)
        .data(data.unwrap_or_default())
}

pub async fn sse(
    _: Principal,
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(params): Query<StreamParams>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, HttpError> {
    let filter = Arc::new(StreamFilter::new(params)?);
    let last_id = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let (missed, rx) = state.live.subscribe(last_id);

    let replay_filter = filter.clone();
    let replay = stream::iter(missed)
        .filter(move |e| std::future::ready(replay_filter.wants(e)))
        .map(|e| Ok(to_sse(&e)));
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
    let keep_alive = KeepAlive::new()
        .interval(Duration::from_secs(15))
        .text("heartbeat");
    Ok(Sse::new(replay.chain(live)).keep_alive(keep_alive))
}
